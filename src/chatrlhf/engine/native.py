"""Native CPU kernels, built with the system C compiler on first use and cached.

- ``decode`` (decode.c): ``NativeStep`` runs one KV-cached decode step of a llama-style model for all rows in a
  single C call; hybrid.py uses it for T = 1 steps on CPU fp32 (the prefill stays in torch).
- ``fused`` (fused.c): SwiGLU and RMSNorm forward and backward in one pass each, behind models/fused.py.

Whether a built kernel is used at all is measured, not assumed: engine/calibrate.py times it against the torch path
on the machine at hand (the same C code was 3-15x faster than torch on one processor and 6x slower on another).

Each library is compiled once per source, compiler, flags and machine (their hash is in the file name) into
``~/.cache/chatrlhf/kernels`` (about a second with gcc -O3 -march=native -fopenmp) and linked against the OpenMP
runtime torch already loaded, so both share one thread pool. A cached library is loaded only when it and its dir are
this user's and writable by nobody else; otherwise a private copy is built for the process. No compiler, a failed
build, or the kernel's switch (CHATRLHF_NATIVE_DECODE=0, CHATRLHF_FUSED_KERNELS=0): :func:`load` returns None with the
reason and the torch path runs instead.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from chatrlhf.engine import calibrate

logger = logging.getLogger("chatrlhf.native")

SOURCE = Path(__file__).with_name("decode.c")
PANEL = 32
_P = ctypes.POINTER
_f = ctypes.c_float
_libs: dict[str, ctypes.CDLL] = {}  # the built kernels, by name
_whys: dict[str, str] = {}  # why a kernel is not there, by name


class Net(ctypes.Structure):
    """Mirror of ``Net`` in decode.c."""
    _fields_ = ([(k, ctypes.c_int) for k in ("rows", "hidden", "n_heads", "n_kv", "head_dim", "inter", "vocab",
                                              "layers", "max_len")]
                + [("scale", _f), ("embed", _P(_f))]
                + [(k, _P(_P(_f))) for k in ("wqkv", "wo", "wup", "wdown")]
                + [("floor1", _P(_f)), ("floor2", _P(_f)), ("floor_final", _f)]
                + [(k, _P(_P(_f))) for k in ("kc", "vc")]
                + [("whead", _P(_f))]
                + [(k, _P(_f)) for k in ("x", "h", "qkv", "att", "gu", "act", "logits", "scores")])


def _cache_dir() -> Path:
    return Path(os.environ.get("CHATRLHF_KERNEL_DIR") or Path.home() / ".cache" / "chatrlhf" / "kernels")


# Tried in order: x86 / arm spellings of the host ISA, then the baseline ISA. Part of the cache key.
ARCH_FLAGS = (["-march=native"], ["-mcpu=native"], [])
BASE_FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC"]


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")


def _compiler_version(cc: str) -> str:
    try:
        p = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
        return f"{os.path.realpath(shutil.which(cc) or cc)} {p.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        return cc


def _kernel_key(src: bytes, cc: str) -> str:
    """What a built library depends on: source, compiler (path and version), flags and processor."""
    parts = [src, repr((BASE_FLAGS, ARCH_FLAGS)).encode(), _compiler_version(cc).encode(),
             json.dumps(calibrate.processor(), sort_keys=True).encode()]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


def _unsafe(path: Path) -> str | None:
    """Why a cached library or its dir must not be trusted (None: it may be): a symlink, another owner, or writable
    by group/others (whoever can write it can put code there that dlopen would run)."""
    import stat

    try:
        st = os.lstat(path)
    except OSError:
        return None
    if stat.S_ISLNK(st.st_mode):
        return f"{path} is a symlink"
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return f"{path} is owned by uid {st.st_uid}, not by this user"
    if st.st_mode & 0o022:
        return f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _build(src: Path, out: Path, cc: str | None = None) -> str | None:
    """Compile ``src`` into ``out`` (atomically, mode 0755 whatever the umask); returns an error message or None."""
    cc = cc or _compiler()
    if not cc:
        return "no C compiler (gcc/cc) on PATH"
    out.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        so = Path(tmp) / out.name
        errors = []
        for arch in ARCH_FLAGS:
            cmd = [cc, *BASE_FLAGS[:1], *arch, *BASE_FLAGS[1:], "-o", str(so), str(src), "-lm"]
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode == 0:
                os.chmod(so, 0o755)
                os.replace(so, out)
                return None
            errors.append(p.stderr.strip().splitlines()[-1:] or [f"exit {p.returncode}"])
        return f"{cc} failed: {errors[0][0]}"


def _declare_decode(lib: ctypes.CDLL) -> None:
    lib.chatrlhf_decode_step.argtypes = [_P(Net), ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                         ctypes.c_void_p]
    lib.chatrlhf_pack.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    lib.chatrlhf_decode_step.restype = lib.chatrlhf_pack.restype = None


def _declare_fused(lib: ctypes.CDLL) -> None:
    v, n, f32 = ctypes.c_void_p, ctypes.c_long, ctypes.c_float
    lib.chatrlhf_swiglu_fwd.argtypes = [v] * 3 + [n]
    lib.chatrlhf_swiglu_bwd.argtypes = [v] * 5 + [n]
    lib.chatrlhf_rmsnorm_fwd.argtypes = [v] * 4 + [n, n, f32]
    lib.chatrlhf_rmsnorm_bwd.argtypes = [v] * 6 + [n, n]
    for fn in (lib.chatrlhf_swiglu_fwd, lib.chatrlhf_swiglu_bwd, lib.chatrlhf_rmsnorm_fwd):
        fn.restype = None
    lib.chatrlhf_rmsnorm_bwd.restype = ctypes.c_int  # -1: out of memory for its per-thread sums


# name -> (source, the environment switch that turns it off, ctypes declarations)
KERNELS = {"decode": (SOURCE, "CHATRLHF_NATIVE_DECODE", _declare_decode),
           "fused": (Path(__file__).with_name("fused.c"), "CHATRLHF_FUSED_KERNELS", _declare_fused)}


def _compile_and_load(name: str) -> tuple[ctypes.CDLL | None, str | None]:
    src_path, switch, declare = KERNELS[name]
    if os.environ.get(switch, "1") == "0":
        return None, f"disabled by {switch}=0"
    cc = _compiler()
    if not cc:
        return None, "no C compiler (gcc/cc) on PATH"
    cache = _cache_dir()
    so = cache / f"{name}-{_kernel_key(src_path.read_bytes(), cc)}.so"
    private = None
    try:
        why = _unsafe(cache) or _unsafe(so)
        if why:
            # dlopen runs the library's code: load nothing from a place others could have written to
            private = Path(tempfile.mkdtemp(prefix="chatrlhf-kernels-"))
            logger.info("native %s kernel: not using the cache (%s); building a private copy in %s", name, why,
                        private)
            so = private / so.name
        if not so.exists():
            err = _build(src_path, so, cc)
            if err:
                return None, err
        lib = ctypes.CDLL(str(so))
    except OSError as e:
        return None, f"could not build or load the native {name} kernel: {e}"
    finally:
        if private is not None:
            shutil.rmtree(private, ignore_errors=True)  # a loaded library stays mapped after its file is gone
    declare(lib)
    return lib, None


def load(name: str = "decode") -> ctypes.CDLL | None:
    """The compiled library ``name`` (see ``KERNELS``), or None (``reason(name)`` says why). Tried once."""
    if name not in _libs and name not in _whys:
        lib, why = _compile_and_load(name)
        if lib is None:
            _whys[name] = why or "unknown"
        else:
            _libs[name] = lib
    return _libs.get(name)


def reason(name: str = "decode") -> str | None:
    return _whys.get(name)


def _ptr(t: torch.Tensor):
    return ctypes.cast(t.data_ptr(), _P(_f))


def _ptrs(ts: list[torch.Tensor]):
    return (_P(_f) * len(ts))(*[_ptr(t) for t in ts])


def pack(lib: ctypes.CDLL, weight: torch.Tensor) -> torch.Tensor:
    """W [N, K] -> panels [ceil(N/32), K, 32] (decode.c's GEMM layout)."""
    n, k = weight.shape
    w = weight.contiguous()
    out = torch.empty((n + PANEL - 1) // PANEL, k, PANEL, dtype=torch.float32)
    lib.chatrlhf_pack(w.data_ptr(), n, k, out.data_ptr())
    return out


class NativeStep:
    """One decode step of a HybridDecoder's llama-style layers for ``rows`` rows, writing its KV ``cache``.

    Holds the packed weights (a copy, made once per decoder) and the scratch buffers; ``logits`` is reused by
    every step, so consume it before the next call."""

    def __init__(self, lib: ctypes.CDLL, dec, rows: int):
        self.lib = lib
        H, I = dec.hidden, dec.layers[0]["up"].weight.shape[0] // 2
        nh, nkv, hd = dec.n_heads, dec.n_kv, dec.head_dim
        self.rows, self.vocab = rows, dec.head.weight.shape[0]
        pad = (rows + 7) // 8 * 8  # GEMM inputs: whole blocks of 8 rows, the extra rows stay zero
        # packed copies, kept alive here: the Net struct holds only their addresses
        self.packed = {f"w{k}": [pack(lib, L[k].weight) for L in dec.layers] for k in ("qkv", "o", "up", "down")}
        self.whead = pack(lib, dec.head.weight)
        self.embed = dec.embed.contiguous()
        self.floors = [torch.stack([L[k].floor for L in dec.layers]).float().contiguous() for k in ("ln1", "ln2")]
        z = torch.zeros
        self.buf = dict(x=z(rows, H), h=z(pad, H), qkv=z(rows, (nh + 2 * nkv) * hd), att=z(pad, nh * hd),
                        gu=z(rows, 2 * I), act=z(pad, I), logits=z(rows, self.vocab))
        self.H, self.I, self.nh, self.nkv, self.hd, self.dec = H, I, nh, nkv, hd, dec
        self.lists = {k: _ptrs(ws) for k, ws in self.packed.items()}
        self.net = None

    def bind(self, cache: list[tuple[torch.Tensor, torch.Tensor]], max_len: int) -> None:
        """Point the step at a fresh KV cache [rows, n_kv, max_len, head_dim] per layer (one per generate())."""
        self.cache = cache
        self.scores = torch.empty(self.rows * self.nh, max_len)
        self.kc, self.vc = _ptrs([k for k, _ in cache]), _ptrs([v for _, v in cache])
        dec, b = self.dec, self.buf
        self.net = Net(rows=self.rows, hidden=self.H, n_heads=self.nh, n_kv=self.nkv, head_dim=self.hd,
                       inter=self.I, vocab=self.vocab, layers=len(dec.layers), max_len=max_len,
                       scale=dec.layers[0]["scaling"], embed=_ptr(self.embed), **self.lists,
                       floor1=_ptr(self.floors[0]), floor2=_ptr(self.floors[1]),
                       floor_final=float(dec.final_norm.floor), kc=self.kc, vc=self.vc, whead=_ptr(self.whead),
                       scores=_ptr(self.scores), **{k: _ptr(t) for k, t in b.items()})

    def __call__(self, ids: torch.Tensor, p: int, cos: torch.Tensor, sin: torch.Tensor,
                 mask: torch.Tensor) -> torch.Tensor:
        """ids [rows] at position p; cos/sin [rows, max_len, head_dim]; mask [rows, max_len] -> logits [rows, V]."""
        # the C side reads int64 ids and contiguous fp32 rows (no-ops for what HybridDecoder passes)
        ids, cos, sin, mask = ids.long().contiguous(), cos.contiguous(), sin.contiguous(), mask.contiguous()
        self.lib.chatrlhf_decode_step(ctypes.byref(self.net), ids.data_ptr(), p, cos.data_ptr(), sin.data_ptr(),
                                      mask.data_ptr())
        return self.buf["logits"]
