"""GGUF files as model inputs: converted once into a cached Hugging Face folder that every step then loads.

A ``.gguf`` (llama.cpp's single-file format, usually quantised) is read through transformers' GGUF support,
dequantised to float32 and written as ``model.safetensors`` + tokenizer files + chat template + config.json under
``$CHATRLHF_CACHE_DIR/models/<name>-<sha256 of the file, 16 hex>/`` (utils.cache_dir). Converting once,
rather than reading the GGUF in every step, is what lets a GGUF go through exactly the checks and loaders of any
other model folder (loading.py): dequantising takes tens of seconds, quantised blocks cannot be trained anyway, and
every rank and later run then shares one folder keyed by the file's content (a changed file is a new folder).

Float32 because it holds a dequantised block's values (scale * q + min, in fp16 parts) exactly; the steps cast to
their --dtype when they load. Nothing read here runs code: the GGUF reader parses metadata and tensors (no pickle),
and the chat template is Jinja text rendered in transformers' sandbox. Every failure (not a GGUF, the gguf package
missing, an architecture transformers cannot read) is one ModelError naming the file and the flag.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import inspect
import json
import os
import re
import sys
import time
from pathlib import Path

from chatrlhf.errors import ModelError, one_line
from chatrlhf.models.loading import PROBE_TEXT, _special
from chatrlhf.utils import atomic_dir, cache_dir

SOURCE_FILE = "chatrlhf_source.json"  # provenance; written last, so its presence marks a complete conversion
GGUF_MAGIC = b"GGUF"
GGUF_INSTALL = "pip install 'gguf>=0.10' (or `make`, which installs the locked gguf)"
_sha_memo: dict[tuple[str, int, int], str] = {}  # (real path, size, mtime_ns) -> sha256: each rank hashes once


def models_cache_dir() -> Path:
    """Where converted models live: ``$CHATRLHF_CACHE_DIR/models``."""

    return cache_dir() / "models"


def file_sha256(path: Path) -> str:
    """The file's sha256 (hex), computed once per process for an unchanged file (validate() runs more than once)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _sha_memo:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _sha_memo[key] = h.hexdigest()
    return _sha_memo[key]


def check_gguf_file(path: Path, who: str) -> None:
    """ModelError unless ``path`` is a readable file starting with the GGUF magic: a wrong or truncated file is
    named here, before transformers' reader raises from deep inside."""
    if not path.is_file():
        raise ModelError(f"{who}: no such GGUF file" if not path.exists() else f"{who}: not a file")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise ModelError(f"{who}: cannot read ({e.strerror or e})") from None
    if head != GGUF_MAGIC:
        raise ModelError(f"{who}: not a GGUF file (it does not start with the GGUF magic bytes; a llama.cpp model "
                         "file ending in .gguf is expected)")


def converted_dir(path: Path) -> Path:
    """The cache folder for GGUF file ``path``: its name (made path-safe) and the first 16 hex of its sha256."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem).strip("._") or "model"
    return models_cache_dir() / f"{name[:64]}-{file_sha256(path)[:16]}"


def is_converted(folder: Path) -> bool:
    return (folder / SOURCE_FILE).is_file() and (folder / "config.json").is_file()


def convert_gguf(path: str | os.PathLike, who: str = "") -> Path:
    """The cached Hugging Face folder for the GGUF file ``path``, converted first when this content never was.

    ``who`` (the flag and the user's spelling) starts every error. Concurrent converters (ranks of one launch,
    separate runs sharing the cache) each build into their own temporary sibling and publish it with one rename
    (utils.atomic_dir); one that finds the folder published meanwhile discards its own, so a reader never sees a
    half-written folder."""
    p = Path(path).expanduser()
    who = who or str(path)
    check_gguf_file(p, who)
    try:
        final = converted_dir(p)
    except OSError as e:
        raise ModelError(f"{who}: cannot read ({e.strerror or e})") from None
    if is_converted(final):
        return final
    if importlib.util.find_spec("gguf") is None:
        raise ModelError(f"{who}: reading a .gguf file needs the gguf package, which is not installed: "
                         f"{GGUF_INSTALL}")

    arch = read_gguf_metadata(p, who).get("general.architecture", "")
    print(f"chatrlhf: converting {p} ({p.stat().st_size / 1e6:.0f} MB {arch} GGUF) to a Hugging Face folder, "
          f"once: {final}", file=sys.stderr, flush=True)
    t0 = time.time()
    try:
        with atomic_dir(final) as tmp:
            _convert_into(p, tmp, who)
            if is_converted(final):
                raise _Published
    except _Published:
        pass
    except OSError as e:  # cache dir not writable, disk full
        raise ModelError(f"{who}: cannot write the converted model to {final} ({e.strerror or e}); set "
                         "CHATRLHF_CACHE_DIR to a writable directory") from None
    print(f"chatrlhf: converted {p.name} in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    return final


def read_gguf_metadata(path: Path, who: str) -> dict:
    """The GGUF's metadata (no tensors read), or ModelError naming a corrupt or truncated file: said plainly here
    rather than as the struct error the model loader would raise. Empty where transformers has no such reader."""
    try:
        from transformers.integrations.gguf import read_gguf_metadata as read  # lazy: transformers
    except ImportError:
        return {}
    try:
        metadata, _ = read(str(path))
    except Exception as e:  # struct.error, UnicodeDecodeError, ValueError... from a damaged header
        raise ModelError(f"{who}: a corrupt or truncated GGUF file ({one_line(e)})") from None
    return metadata if isinstance(metadata, dict) else {}


class _Published(Exception):
    """Another process published the folder while this one converted: keep theirs."""


def _dequantize_kwargs() -> dict:
    """Ask for dense weights where transformers could keep GGUF blocks packed (GgufConfig(dequantize=...), newer
    releases): a packed module has no plain state dict to save. Older releases always dequantise."""
    try:
        from transformers import GgufConfig  # lazy: transformers
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)} \
        if "dequantize" in inspect.signature(GgufConfig).parameters else {}


def _convert_into(gguf: Path, out: Path, who: str) -> None:
    """Load ``gguf`` with transformers (dequantised, float32), then save config, safetensors weights and tokenizer
    (with its chat template) into ``out``, checked on the way and provenance written last.

    transformers refuses ``save_pretrained`` on a GGUF-loaded model (its GGUF quantizer is not serialisable), so
    the weights move into a model built from the same config: a strict ``load_state_dict`` (every tensor name must
    match), built on the meta device and assigned, so no second copy of the weights is allocated."""
    import torch  # lazy: torch
    import transformers  # lazy: transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # lazy: transformers

    src, kw = str(gguf.parent), {"gguf_file": gguf.name}  # a local file: nothing is looked up online
    try:
        config = AutoConfig.from_pretrained(src, **kw)
        tokenizer = AutoTokenizer.from_pretrained(src, **kw)
        loaded = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, **kw, **_dequantize_kwargs())
    except ImportError as e:  # gguf too old, or a reader dependency missing
        raise ModelError(f"{who}: cannot read GGUF files here ({one_line(e)}); {GGUF_INSTALL}") from None
    except Exception as e:  # the reader's and the mapping's own errors (bad file, unsupported architecture)
        raise ModelError(f"{who}: transformers cannot load this GGUF file: {one_line(e)}") from None
    gguf_name = getattr(config, "_model_name_or_path", None)
    for attr in ("quantization_config", "_model_name_or_path"):  # the GGUF loading, not the model
        if hasattr(config, attr):
            delattr(config, attr)
    state = loaded.state_dict()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    expected, got = set(model.state_dict()), set(state)
    if expected != got:
        missing, extra = sorted(expected - got), sorted(got - expected)
        raise ModelError(f"{who}: its tensors do not match the {config.model_type} model its metadata describes "
                         f"(missing: {', '.join(missing[:3]) or 'none'}; unexpected: {', '.join(extra[:3]) or 'none'})")
    model.load_state_dict(state, strict=True, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
        out_emb = model.get_output_embeddings()
        if out_emb is not None and out_emb.weight is not model.get_input_embeddings().weight:
            raise ModelError(f"{who}: the GGUF says the embeddings are tied, but the converted model's are not")
    # the meta-built buffers (e.g. rotary inv_freq) are recomputed on load; only the saved weights matter here
    model.save_pretrained(out, safe_serialization=True)
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:  # a GGUF tokenizer knows no limit; the context length is it
        tokenizer.model_max_length = positions
    tokenizer.save_pretrained(out)
    del loaded, state, model
    mode = (out / "config.json").stat().st_mode & 0o777  # the weights file is written 0600; the cache is shared
    for f in out.iterdir():
        f.chmod(mode)
    _check_tokenizer(tokenizer, out, who)
    source = {
        "gguf": str(gguf.resolve()), "sha256": file_sha256(gguf), "size_bytes": gguf.stat().st_size,
        "gguf_model_name": gguf_name, "model_type": config.model_type, "dtype": "float32",
        "transformers": transformers.__version__, "gguf_package": importlib.metadata.version("gguf"),
        "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (out / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")


def _check_tokenizer(tokenizer, out: Path, who: str) -> None:
    """The saved tokenizer must be the GGUF's: same ids for a probe text, same special tokens, same chat template
    (a tokenizer that does not survive its own save_pretrained would silently change every step's inputs)."""
    from transformers import AutoTokenizer  # lazy: transformers

    saved = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    text = PROBE_TEXT + "<|im_start|>user\nhi<|im_end|>"
    problems = []
    if saved(text)["input_ids"] != tokenizer(text)["input_ids"]:
        problems.append("encodes a probe text differently")
    if _special(saved) != _special(tokenizer):
        problems.append(f"special tokens {_special(saved)} vs {_special(tokenizer)}")
    if getattr(saved, "chat_template", None) != getattr(tokenizer, "chat_template", None):
        problems.append("lost its chat template")
    if problems:
        raise ModelError(f"{who}: the converted tokenizer differs from the GGUF's: {'; '.join(problems)}")
