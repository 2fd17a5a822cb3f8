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
import mmap
import os
import shutil
import subprocess
import tempfile
import weakref
from pathlib import Path

import torch

from chatrlhf.engine import calibrate
import stat

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("decode.c")
_P = ctypes.POINTER
_f = ctypes.c_float
_v = ctypes.c_void_p
_libs: dict[str, ctypes.CDLL] = {}  # the built kernels, by name
_whys: dict[str, str] = {}  # why a kernel is not there, by name


class Net(ctypes.Structure):
    """Mirror of ``Net`` in decode.c."""
    _fields_ = ([(k, ctypes.c_int) for k in ("rows", "hidden", "n_heads", "n_kv", "head_dim", "inter", "vocab",
                                              "layers", "max_len", "bf16")]
                + [("scale", _f), ("embed", _v)]
                + [(k, _P(_v)) for k in ("wqkv", "wo", "wup", "wdown")]
                + [("floor1", _P(_f)), ("floor2", _P(_f)), ("floor_final", _f)]
                + [("g1", _P(_P(_f))), ("g2", _P(_P(_f))), ("gfinal", _P(_f))]
                + [(k, _P(_v)) for k in ("kc", "vc")]
                + [("whead", _v)]
                + [(k, _P(_f)) for k in ("x", "h", "qkv", "att", "gu", "act", "logits", "scores")]
                + [("xb", _v)])


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
    lib.chatrlhf_pack_bf16.argtypes = lib.chatrlhf_pack.argtypes
    lib.chatrlhf_decode_step.restype = lib.chatrlhf_pack.restype = lib.chatrlhf_pack_bf16.restype = None
    lib.chatrlhf_bf16_dot.argtypes, lib.chatrlhf_bf16_dot.restype = [], ctypes.c_int
    lib.chatrlhf_panel.argtypes, lib.chatrlhf_panel.restype = [], ctypes.c_int


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


def _vptrs(ts: list[torch.Tensor]):
    return (ctypes.c_void_p * len(ts))(*[t.data_ptr() for t in ts])


DTYPES = (torch.float32, torch.bfloat16)  # the weight formats decode.c has


def packed_numel(lib: ctypes.CDLL, n: int, k: int, dtype: torch.dtype) -> int:
    """Elements of W [n, k] in the GEMM layout of ``lib``'s build (see :func:`pack`)."""
    panel = lib.chatrlhf_panel()
    return (n + panel - 1) // panel * panel * ((k + 1) // 2 * 2 if dtype == torch.bfloat16 else k)


def pack(lib: ctypes.CDLL, weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """W [N, K] -> decode.c's GEMM layout, flat (into ``out`` when given), in panels of P = ``lib.chatrlhf_panel()``
    columns (32 on AVX-512, 8 elsewhere): fp32 [ceil(N/P), K, P]; bf16 [ceil(N/P), ceil(K/2), P, 2] (each column's
    k and k+1 side by side, zeros past N and K)."""
    n, k = weight.shape
    w = weight.contiguous()
    if out is None:
        out = torch.empty(packed_numel(lib, n, k, w.dtype), dtype=w.dtype)
    (lib.chatrlhf_pack_bf16 if w.dtype == torch.bfloat16 else lib.chatrlhf_pack)(w.data_ptr(), n, k,
                                                                                  out.data_ptr())
    return out


HUGE_PAGE = 2 << 20
_spare: list = []  # the weight region of the last dropped NativeStep, for the next one of the same size


def _arena(numel: int, dtype: torch.dtype) -> tuple[torch.Tensor, mmap.mmap | None]:
    """An uninitialised 1-D tensor for the packed weights and the memory region under it (None: a plain tensor).

    The region is fresh anonymous memory that Linux may back with 2 MiB pages (MADV_HUGEPAGE: transparent huge
    pages in their default `madvise` mode): the packed weights are streamed whole every step, and with 4 KiB pages
    the bf16 GEMMs of the mid model read 16% slower (measured 36.6 vs 43.4 GB/s on one core); they also fault in
    faster (8 vs 55 ms for 164 MB). A process's first huge pages can cost the kernel a compaction (0.2-0.4 s
    measured), so the region of a dropped step is kept for the next one of the same size (one rollout after the
    other: no faults at all), unless it is over an eighth of the machine's memory."""
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if not hasattr(mmap, "MADV_HUGEPAGE") or nbytes < HUGE_PAGE:
        return torch.empty(numel, dtype=dtype), None
    size = nbytes + HUGE_PAGE
    region = _spare.pop() if _spare and len(_spare[-1]) == size else None
    _spare.clear()
    if region is None:
        region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # shared memory gets no THP
    start = -ctypes.addressof(ctypes.c_char.from_buffer(region)) % HUGE_PAGE
    try:
        region.madvise(mmap.MADV_HUGEPAGE, start, (nbytes + HUGE_PAGE - 1) // HUGE_PAGE * HUGE_PAGE)
    except OSError:  # a kernel without THP: 4 KiB pages
        pass
    return torch.frombuffer(region, dtype=dtype, count=numel, offset=start), region


def spare_fits(nbytes: int) -> bool:
    """Whether memory kept for the next decoder (``nbytes``) is under an eighth of the machine's."""
    try:
        return nbytes * 8 <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return False


def _keep_spare(region: mmap.mmap) -> None:
    if spare_fits(len(region)):
        _spare[:] = [region]


class NativeStep:
    """One decode step of a HybridDecoder's llama-style layers for ``rows`` rows, writing its KV ``cache``.

    fp32 decoders (folded norms) run fp32 panels; bf16 decoders bf16 panels (half the bytes a step streams) with
    fp32 accumulation and activations, the norm weights applied in the step and the KV cache in bf16 (the one the
    torch prefill wrote). Holds the packed weights (a copy, made once per decoder, every matrix in one buffer in
    the order a step reads them) and the scratch buffers; ``logits`` is reused by every step, so consume it before
    the next call."""

    def __init__(self, lib: ctypes.CDLL, dec, rows: int):
        self.lib = lib
        H, I = dec.hidden, dec.layers[0]["up"].weight.shape[0] // 2
        nh, nkv, hd = dec.n_heads, dec.n_kv, dec.head_dim
        self.rows, self.vocab, self.bf16 = rows, dec.head.weight.shape[0], dec.dtype == torch.bfloat16
        pad = (rows + 7) // 8 * 8  # GEMM inputs: whole blocks of 8 rows (the extra rows' results are dropped)
        names = ("qkv", "o", "up", "down")
        mats = [L[k].weight for L in dec.layers for k in names] + [dec.head.weight]
        # packed copies, kept alive here: the Net struct holds only their addresses
        self.arena, region = _arena(sum(packed_numel(lib, *w.shape, dec.dtype) for w in mats), dec.dtype)
        if region is not None:
            weakref.finalize(self, _keep_spare, region)
        views = list(torch.split(self.arena, [packed_numel(lib, *w.shape, dec.dtype) for w in mats]))
        for w, v in zip(mats, views):
            pack(lib, w, v)
        n_layers = len(dec.layers)
        self.lists = {f"w{k}": _vptrs(views[j:4 * n_layers:4]) for j, k in enumerate(names)}
        self.whead = views[-1]
        self.embed = dec.embed.contiguous()
        norms = [[L[k] for L in dec.layers] for k in ("ln1", "ln2")] + [[dec.final_norm]]
        floors = [torch.tensor([(H * m.eps) ** 0.5 for m in ms], dtype=torch.float32) for ms in norms]
        self.floors = floors
        # sqrt(H) * weight of each norm, or None where it is folded into the next matrix (fp32)
        self.gains = None if dec.final_norm.fold else \
            [[(m.weight.float() * H ** 0.5).contiguous() for m in ms] for ms in norms]
        z = torch.zeros
        width = max(H, nh * hd, I)
        self.buf = dict(x=z(rows, H), h=z(pad, H), qkv=z(rows, (nh + 2 * nkv) * hd), att=z(pad, nh * hd),
                        gu=z(rows, 2 * I), act=z(pad, I), logits=z(rows, self.vocab))
        self.xb = z(pad, (width + 1) // 2 if self.bf16 else 1, dtype=torch.int32)  # bf16 GEMM input pairs
        self.H, self.I, self.nh, self.nkv, self.hd = H, I, nh, nkv, hd
        self.n_layers, self.scale = n_layers, dec.layers[0]["scaling"]  # not `dec`: no cycle, freed with it
        self.net = None

    def bind(self, cache: list[tuple[torch.Tensor, torch.Tensor]], max_len: int) -> None:
        """Point the step at a fresh KV cache [rows, n_kv, max_len, head_dim] per layer (one per generate())."""
        self.cache = cache
        self.scores = torch.empty(self.rows * self.nh, max_len)
        self.kc, self.vc = _vptrs([k for k, _ in cache]), _vptrs([v for _, v in cache])
        self._rope = None
        b, g = self.buf, self.gains
        gains = {} if g is None else dict(g1=_ptrs(g[0]), g2=_ptrs(g[1]), gfinal=_ptr(g[2][0]))
        self.net = Net(rows=self.rows, hidden=self.H, n_heads=self.nh, n_kv=self.nkv, head_dim=self.hd,
                       inter=self.I, vocab=self.vocab, layers=self.n_layers, max_len=max_len, bf16=self.bf16,
                       scale=self.scale, embed=self.embed.data_ptr(), **self.lists,
                       floor1=_ptr(self.floors[0]), floor2=_ptr(self.floors[1]),
                       floor_final=float(self.floors[2][0]), kc=self.kc, vc=self.vc, whead=self.whead.data_ptr(),
                       scores=_ptr(self.scores), xb=self.xb.data_ptr(), **gains,
                       **{k: _ptr(t) for k, t in b.items()})

    def _fp32(self, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor):
        """cos, sin, mask as contiguous fp32 (what the C side reads): converted once per generate() for bf16."""
        src = (cos, sin, mask)
        if self._rope is None or any(a is not b for a, b in zip(self._rope[0], src)):
            self._rope = (src, tuple(t.float().contiguous() for t in src))
        return self._rope[1]

    def __call__(self, ids: torch.Tensor, p: int, cos: torch.Tensor, sin: torch.Tensor,
                 mask: torch.Tensor) -> torch.Tensor:
        """ids [rows] at position p; cos/sin [rows, max_len, head_dim]; mask [rows, max_len] -> logits [rows, V]."""
        # the C side reads int64 ids and contiguous fp32 rows (no-ops for what an fp32 HybridDecoder passes)
        ids = ids.long().contiguous()
        cos, sin, mask = self._fp32(cos, sin, mask)
        self.lib.chatrlhf_decode_step(ctypes.byref(self.net), ids.data_ptr(), p, cos.data_ptr(), sin.data_ptr(),
                                      mask.data_ptr())
        return self.buf["logits"]
