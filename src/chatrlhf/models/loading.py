"""Offline-safe loading of tokenizers and causal LMs, plus the checks that catch DeepSpeed-Chat's common failures
early with a clear ModelError: a directory that is not a model, a tokenizer with neither pad nor eos, a
--max_seq_len beyond the model's positions, and an actor and reward model with different tokenizers.

Nothing loaded here can run code (unless the user trusts a model folder's own, see below): weights are read from
safetensors only (a folder holding only a pickled ``pytorch_model.bin`` is refused, never unpickled), and
``check_model_files`` reads the safetensors headers first, so a truncated or corrupt file is one line naming it
instead of a traceback from inside the loader. A model whose code is Python in its own folder (config.json's
``auto_map``: a family transformers does not know) is only loaded with ``trust_remote_code=True``
(``--trust_remote_code``); without it the loaders refuse it in one line naming the folder, the class and the flag,
before transformers imports anything from the folder.

Local directories are always loaded with ``local_files_only=True`` and from the directory itself (the original
re-downloaded the tokenizer named by config.json's ``_name_or_path``, which broke local checkpoints).

A known model name (``smollm2``) or a GGUF file becomes its converted folder first (registry.resolve_model_path):
the configs resolve it in validate(); the public loaders and checks here resolve again for direct callers.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from chatrlhf.errors import ModelError, one_line
from chatrlhf.models.registry import resolve_model_path

logger = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# Weight files that are Python pickles (torch.load / pickle.load can run code): found, named, never loaded.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Bytes per element of each safetensors dtype (for the header's size arithmetic).
_ST_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
                   "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}
_ST_HEADER_LIMIT = 100 << 20  # the safetensors format's own cap on the JSON header
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model")
# Config fields that hold a dropout probability in some family; the override touches only those present.
DROPOUT_FIELDS = ("dropout", "attention_dropout", "activation_dropout", "hidden_dropout", "attention_probs_dropout_prob",
                  "hidden_dropout_prob", "resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_first_dropout",
                  "classifier_dropout", "embed_dropout", "ffn_dropout")
# Attributes naming a hard position limit (learned absolute position embeddings).
_MAX_POSITION_FIELDS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")
# the config.json block that marks a trained reward model (models/reward_model.py)
REWARD_KEY = "chatrlhf_reward"
PROBE_TEXT = " Human: Reverse the word: cat Assistant: tac 1234 ÄÖ ok!\n"
TRUST_FLAG = "--trust_remote_code"
# auto_map entries named in the refusal, most telling first
_AUTO_ORDER = ("AutoModelForCausalLM", "AutoModel", "AutoConfig", "AutoTokenizer")


def _read_json(path: Path) -> dict | None:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None  # unreadable files get their own error where they are loaded
    return raw if isinstance(raw, dict) else None


def _auto_map_refs(auto_map: Any) -> dict[str, str]:
    """{auto class: "module.Class"} from an ``auto_map`` (values may be [slow, fast] pairs for tokenizers; an old
    tokenizer_config.json has the bare pair)."""
    if isinstance(auto_map, (list, tuple)):
        auto_map = {"AutoTokenizer": auto_map}
    if not isinstance(auto_map, dict):
        return {}
    out = {}
    for key, ref in auto_map.items():
        refs = [r for r in (ref if isinstance(ref, (list, tuple)) else [ref]) if isinstance(r, str) and r]
        if refs:
            out[str(key)] = refs[-1]
    return out


def remote_code_refs(local: str | Path) -> dict[str, str]:
    """The classes a local model dir would import from its own Python files: {auto class: "module.Class"} from
    config.json's ``auto_map`` when its model_type is not one transformers knows, plus tokenizer_config.json's
    AutoTokenizer when its tokenizer_class is not built in. Empty when transformers' own code loads the folder
    (an ``auto_map`` beside a known model_type is ignored without ``trust_remote_code``). Reads JSON only."""
    local = Path(local)
    refs: dict[str, str] = {}
    cfg = _read_json(local / "config.json") or {}
    model_refs = _auto_map_refs(cfg.get("auto_map"))
    if model_refs:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING  # lazy: transformers

        if cfg.get("model_type") not in CONFIG_MAPPING:
            refs.update({k: v for k, v in model_refs.items() if k != "AutoTokenizer"})
    tok_cfg = _read_json(local / "tokenizer_config.json") or {}
    tok_ref = _auto_map_refs(tok_cfg.get("auto_map")).get("AutoTokenizer") or model_refs.get("AutoTokenizer")
    if tok_ref:
        from transformers.models.auto.tokenization_auto import tokenizer_class_from_name  # lazy: transformers

        name = tok_cfg.get("tokenizer_class")
        if not isinstance(name, str) or tokenizer_class_from_name(name) is None:
            refs["AutoTokenizer"] = tok_ref
    return refs


def _remote_code_refusal(local: Path, refs: dict[str, str]) -> ModelError:
    key = next((k for k in _AUTO_ORDER if k in refs), next(iter(refs)))
    return ModelError(f"{local}: its model code is Python in that folder (auto_map {key} -> {refs[key]}), which "
                      f"chatrlhf runs only with {TRUST_FLAG}; pass {TRUST_FLAG} if you trust that code")


def check_remote_code(local: str | Path, trust_remote_code: bool, which: tuple[str, ...] | None = None) -> None:
    """Before transformers sees a local dir: ModelError naming the folder, the auto_map class and the flag when
    the folder's own Python would have to run and ``trust_remote_code`` is off; with it on, ModelError when a
    module auto_map names is not in the folder (offline, nothing is fetched). ``which``: only these auto classes
    (e.g. ("AutoTokenizer",) for a tokenizer load)."""
    local = Path(local)
    refs = remote_code_refs(local)
    if which is not None:
        refs = {k: v for k, v in refs.items() if k in which}
    if not refs:
        return
    if not trust_remote_code:
        raise _remote_code_refusal(local, refs)
    for key, ref in refs.items():
        module = ref.rsplit(".", 1)[0]
        if "--" in ref or not (local / f"{module.replace('.', '/')}.py").is_file():
            raise ModelError(f"{local}: auto_map {key} -> {ref} names code that is not in the folder "
                             f"(expected {module.split('--')[-1].replace('.', '/')}.py next to config.json); "
                             "copy the model's .py files into it")


def _is_remote_code_refusal(e: BaseException) -> bool:
    """transformers' own refusal (a safety net behind check_remote_code's reading of the files)."""
    return isinstance(e, ValueError) and "trust_remote_code" in str(e)


def copy_model_code(src: str | Path, out: str | Path) -> list[str]:
    """Copy the Python files a model dir's auto_map names (and the files they import relatively) from ``src`` to
    ``out`` when ``out`` lacks them, so a checkpoint of a custom family loads on its own. Source text is copied,
    never imported. Returns the names copied."""
    src, out = Path(src), Path(out)
    files: set[Path] = set()
    for name in ("config.json", "tokenizer_config.json"):
        for ref in _auto_map_refs((_read_json(src / name) or {}).get("auto_map")).values():
            f = src / f"{ref.rsplit('.', 1)[0].replace('.', '/')}.py"
            if "--" not in ref and f.is_file():
                files.add(f)
    try:
        from transformers.dynamic_module_utils import get_relative_import_files  # lazy: transformers; runs nothing

        for f in list(files):
            files.update(Path(x) for x in get_relative_import_files(str(f)))
    except (ImportError, OSError):
        pass
    copied = []
    for f in sorted(files):
        try:
            rel = f.resolve().relative_to(src.resolve())
        except ValueError:
            continue
        if not (out / rel).exists():
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_bytes(f.read_bytes())
            copied.append(str(rel))
    return copied


def _local_dir(path: str | Path) -> Path | None:
    """The directory when ``path`` names a local one, else None (a hub name). A path-looking string that does not
    exist is an error rather than a silent hub download attempt."""
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise ModelError(f"{path}: not a directory (a model is a directory holding config.json and weights)")
    s = str(path)
    if p.exists() or s.startswith((".", "/", "~")) or s.count("/") > 1 or "\\" in s:
        raise ModelError(f"{path}: no such model directory")
    return None


def is_model_dir(path: str | Path) -> bool:
    """True for a local directory holding config.json and model weights (safetensors or bin, sharded or not)."""
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file() and any((p / w).is_file() for w in WEIGHT_FILES)


def safetensors_files(local: Path) -> list[Path]:
    """The safetensors files holding a model dir's weights: the shards its index names, or model.safetensors."""
    index = local / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
            raise ModelError(f"{index}: not a valid safetensors index ({one_line(e)})") from None
        for shard in shards:
            if not isinstance(shard, str) or Path(shard).name != shard or shard in (".", ".."):
                raise ModelError(f"{index}: names {shard!r}, which is not a file in the model directory")
        missing = [s for s in shards if not (local / s).is_file()]
        if missing:
            raise ModelError(f"{index}: names shard(s) that are missing: {', '.join(missing[:3])}"
                             f"{' ...' if len(missing) > 3 else ''}; copy or download the model again")
        return [local / s for s in shards]
    single = local / "model.safetensors"
    return [single] if single.is_file() else []


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """{tensor name: {"dtype", "shape", "data_offsets"}} from a safetensors file's header, after checking that the
    header is well-formed and describes exactly the bytes the file holds (a truncated copy or a corrupt header is
    a ModelError naming the file; the tensors themselves are not read)."""
    advice = "re-save the model or copy/download it again"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or n > min(size - 8, _ST_HEADER_LIMIT):
                raise ModelError(f"{path}: truncated or corrupt safetensors file (no valid header in its {size} "
                                 f"bytes); {advice}")
            header = json.loads(f.read(n).decode("utf-8"))
    except OSError as e:
        raise ModelError(f"{path}: cannot read ({e.strerror or e})") from None
    except (ValueError, UnicodeDecodeError):
        raise ModelError(f"{path}: corrupt safetensors file (its header is not valid JSON); {advice}") from None
    if not isinstance(header, dict):
        raise ModelError(f"{path}: corrupt safetensors file (its header is not a mapping); {advice}")
    end = 0
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (a, b) = info["dtype"], list(info["shape"]), info["data_offsets"]
            numel = 1
            for d in shape:
                numel *= int(d)
            ok = 0 <= int(a) <= int(b) and all(int(d) >= 0 for d in shape)
            if ok and dtype in _ST_DTYPE_BYTES:
                ok = int(b) - int(a) == numel * _ST_DTYPE_BYTES[dtype]
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise ModelError(f"{path}: corrupt safetensors file (bad header entry for tensor {name!r}); {advice}")
        end = max(end, int(b))
        tensors[name] = info
    if 8 + n + end != size:
        what = "truncated" if 8 + n + end > size else "corrupt"
        raise ModelError(f"{path}: {what} safetensors file: its header describes {8 + n + end} bytes, the file has "
                         f"{size}; {advice}")
    return tensors


def check_model_files(path: str | Path, flag: str = "", trust_remote_code: bool = False) -> Any:
    """Everything about a local model dir that can be checked without building the model: config.json, weights
    in safetensors (a folder with only pickles is refused), every safetensors file complete and well-formed.
    Returns the transformers config (None for a hub name, which cannot be checked offline). ``flag`` (e.g.
    ``--model_name_or_path``) starts the message."""
    path = resolve_model_path(str(path), flag)
    who = f"{flag} {path}" if flag else str(path)
    try:
        local = _local_dir(path)
    except ModelError as e:
        raise ModelError(f"{flag} {e}" if flag else str(e)) from None
    if local is None:
        return None
    try:
        config = _read_config(local, trust_remote_code=trust_remote_code)
    except ModelError as e:
        raise ModelError(f"{flag} {e}" if flag else str(e)) from None
    try:
        files = safetensors_files(local)
        for f in files:
            read_safetensors_header(f)
    except ModelError as e:
        raise ModelError(f"{flag} {e}" if flag else str(e)) from None
    if not files:
        pickles = sorted(p.name for p in local.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ModelError(f"{who}: holds only pickled PyTorch weights ({', '.join(pickles[:3])}); chatrlhf never "
                             "loads pickles (unpickling can run code). Convert them to safetensors where you trust "
                             "the file (model.save_pretrained(dir, safe_serialization=True)) and pass that dir")
        present = ", ".join(sorted(p.name for p in local.iterdir())[:8]) or "nothing"
        raise ModelError(f"{who}: no model weights (expected model.safetensors or model.safetensors.index.json; "
                         f"found {present})")
    return config


def weight_names(path: str | Path) -> set[str]:
    """Names of the tensors stored in a local model dir's safetensors files (headers only)."""
    return {name for f in safetensors_files(Path(path)) for name in read_safetensors_header(f)}


def check_weight_shapes(path: str | Path, config, flag: str = "", trust_remote_code: bool = False) -> None:
    """ModelError when a stored tensor's shape differs from what config.json builds (e.g. vocab_size or
    hidden_size edited, or weights copied from another model): compared against a meta-device skeleton, so no
    memory is used; tensors the skeleton does not name (value head, renamed legacy keys) are not compared."""
    import torch  # lazy: torch
    from transformers import AutoModelForCausalLM  # lazy: transformers

    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception:  # a config without a causal-LM class: the loader will say so
        return
    shapes = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    prefix = getattr(skeleton, "base_model_prefix", "") or ""
    who = f"{flag} {path}" if flag else str(path)
    for f in safetensors_files(Path(path)):
        for name, info in read_safetensors_header(f).items():
            for key in (name, f"{prefix}.{name}", name.removeprefix(f"{prefix}.")):
                if key in shapes:
                    if tuple(info["shape"]) != shapes[key]:
                        raise ModelError(f"{who}: {f.name} stores {name!r} with shape {list(info['shape'])} but "
                                         f"config.json builds {list(shapes[key])}: config and weights come from "
                                         "different models (or config.json was edited)")
                    break


def check_vocab(tokenizer, config, path: str | Path) -> None:
    """ModelError when the tokenizer's own vocabulary (added tokens aside, which get fresh embedding rows) is larger
    than the model's embedding: the tokenizer belongs to another model, and its extra ids would index rows that
    were never trained (or past the end of the table)."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    rows = getattr(cfg, "vocab_size", None)
    base = getattr(tokenizer, "vocab_size", None)
    if isinstance(rows, int) and isinstance(base, int) and base > rows:
        raise ModelError(f"{path}: the tokenizer's vocabulary has {base} tokens but the model's embedding has {rows} "
                         "rows: tokenizer and weights come from different models; save the model's own tokenizer "
                         "next to it")


def preflight_model(path: str, flag: str, seq_len: int | None = None, seq_flag: str = "--max_seq_len",
                    value_head: bool = False, trust_remote_code: bool = False):
    """A step's model checks before anything is built or written: the files (check_model_files), the tokenizer
    loads and fits the embedding, ``seq_len`` fits the positions, and (``value_head``) it is a trained reward
    model. Each failure is one ModelError naming ``flag`` and the path (a folder whose own code would have to
    run, without ``trust_remote_code``, names --trust_remote_code). Returns the tokenizer (None for a hub name,
    which is not checked here)."""
    path = resolve_model_path(path, flag)
    config = check_model_files(path, flag, trust_remote_code=trust_remote_code)
    if config is None:
        return None
    check_weight_shapes(path, config, flag, trust_remote_code=trust_remote_code)
    try:
        tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    except ModelError as e:
        raise ModelError(f"{flag} {e}") from None
    check_vocab(tokenizer, config, f"{flag} {path}")
    if seq_len is not None:
        limit = max_positions(config)
        if limit is not None and seq_len > limit:
            raise ModelError(f"{seq_flag} {seq_len} is longer than the model's {limit} positions ({flag} {path}, "
                             f"{getattr(config, 'model_type', 'model')}); use {limit} or less")
    if value_head:

        raw = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
        if REWARD_KEY not in raw:
            raise ModelError(f"{flag} {path}: not a trained reward model (its config.json has no {REWARD_KEY!r} "
                             "block, so its value head would be random); pass the output dir of `chatrlhf reward`")
        if "v_head.weight" not in weight_names(path):
            raise ModelError(f"{flag} {path}: reward model without a value head (no v_head.weight in its weights); "
                             "pass the output dir of `chatrlhf reward`")
    return tokenizer


def check_finite_weights(model, path: str | Path) -> None:
    """ModelError when a loaded weight holds NaN/Inf: a corrupt file that is still well-formed. ZeRO-3 partitioned
    parameters (empty here) are skipped."""
    import torch  # lazy: torch

    for name, p in model.named_parameters():
        if hasattr(p, "ds_id") or p.numel() == 0 or p.device.type == "meta":
            continue
        if not bool(torch.isfinite(p.detach()).all()):
            raise ModelError(f"{path}: weight {name!r} holds NaN or Inf values (a corrupt weights file?); copy or "
                             "download the model again")


def load_tokenizer(path: str | Path, padding_side: str = "right", trust_remote_code: bool = False):
    """The tokenizer saved in ``path`` (a local dir; a hub name only when it is not a path), with a pad token.

    pad = eos (with a warning) when the tokenizer has no pad token; ModelError when it has neither. A tokenizer
    (or a config it reads) whose class is Python in the folder loads only with ``trust_remote_code``.
    """
    from transformers import AutoTokenizer  # lazy: transformers

    path = resolve_model_path(str(path))
    local = _local_dir(path)
    if local is not None and not any((local / f).is_file() for f in TOKENIZER_FILES):
        raise ModelError(f"{local}: no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)}); "
                         "save the tokenizer next to the model with tokenizer.save_pretrained(dir)")
    if local is not None:  # a built-in tokenizer class beside a custom model loads without running its code
        check_remote_code(local, trust_remote_code, which=("AutoTokenizer",))
    try:
        tok = AutoTokenizer.from_pretrained(str(local or path), local_files_only=local is not None,
                                            trust_remote_code=trust_remote_code)
    except Exception as e:  # a corrupt tokenizer.json raises tokenizers' bare Exception: still one line
        if local is not None and _is_remote_code_refusal(e):
            raise _remote_code_refusal(local, remote_code_refs(local) or {"AutoTokenizer": "?"}) from None
        raise ModelError(f"{path}: cannot load the tokenizer: {one_line(e)}") from None
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ModelError(f"{path}: the tokenizer has neither a pad token nor an eos token; "
                             "set one (e.g. tokenizer.add_special_tokens({'pad_token': '<pad>'})) and save it again")
        logger.warning("%s: tokenizer has no pad token; using the eos token %r as pad", path, tok.eos_token)
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


def _read_config(local: Path, trust_remote_code: bool):
    from transformers import AutoConfig  # lazy: transformers

    cfg_file = local / "config.json"
    if not cfg_file.is_file():
        raise ModelError(f"{local}: not a model directory (no config.json); expected a Hugging Face model saved "
                         "with save_pretrained")
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{cfg_file}: not valid JSON: {one_line(e)}") from None
    except OSError as e:
        raise ModelError(f"{cfg_file}: cannot read ({e.strerror or e})") from None
    if not isinstance(raw, dict):
        raise ModelError(f"{cfg_file}: not a model config (a JSON object is expected)")
    model_type = raw.get("model_type")
    check_remote_code(local, trust_remote_code, which=("AutoConfig", "AutoModel", "AutoModelForCausalLM"))
    try:
        return AutoConfig.from_pretrained(str(local), local_files_only=True, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError) as e:
        if _is_remote_code_refusal(e):
            raise _remote_code_refusal(local, remote_code_refs(local) or {"AutoConfig": str(model_type)}) from None
        raise ModelError(f"{cfg_file}: unknown or unsupported model_type {model_type!r} ({one_line(e)})") from None
    except (OSError, TypeError, AttributeError) as e:  # e.g. a field of the wrong type
        raise ModelError(f"{cfg_file}: not a usable model config ({one_line(e)})") from None
    except ImportError as e:  # the folder's code needs a package this environment lacks
        raise ModelError(f"{local}: cannot import the folder's model code: {one_line(e)}") from None


def _to_dtype(dtype: Any):
    import torch  # lazy: torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if str(dtype) not in names:
        raise ModelError(f"unknown dtype {dtype!r}; use one of {', '.join(names)}")
    return names[str(dtype)]


def apply_dropout(config, dropout: float | None) -> list[str]:
    """Set every dropout field the config has to ``dropout`` (0.0 disables); returns the fields changed."""
    if dropout is None:
        return []
    changed = [f for f in DROPOUT_FIELDS if isinstance(getattr(config, f, None), (int, float))]
    for f in changed:
        setattr(config, f, float(dropout))
    return changed


def load_causal_lm(path: str | Path, dtype: Any = None, dropout: float | None = None, trust_remote_code: bool = False,
                   tokenizer=None):
    """AutoModelForCausalLM from a local model dir (or a hub name), with a clear ModelError otherwise.

    ``dropout`` overrides the config's dropout fields; ``tokenizer`` sets config/generation pad and eos ids and
    grows the embeddings (to a multiple of 8) when the tokenizer has more tokens than the model.
    """
    from transformers import AutoConfig, AutoModelForCausalLM  # lazy: transformers

    path = resolve_model_path(str(path))
    local = _local_dir(path)
    if local is not None:
        # config, no pickles, complete safetensors: before the loader sees them
        config = check_model_files(local, trust_remote_code=trust_remote_code)
    else:
        try:
            config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            if _is_remote_code_refusal(e):
                raise ModelError(f"{path}: its model code comes with the model, which chatrlhf runs only with "
                                 f"{TRUST_FLAG}; pass {TRUST_FLAG} if you trust that code") from None
            raise ModelError(f"{path}: cannot load the model config: {one_line(e)}") from None
    apply_dropout(config, dropout)
    if tokenizer is not None:
        check_vocab(tokenizer, config, path)
    model = _from_pretrained(AutoModelForCausalLM, local or path, config, dtype, trust_remote_code, "a causal LM")
    if tokenizer is not None:
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(8 * ((len(tokenizer) + 7) // 8))
        for obj in (model.config, model.generation_config):
            if obj is not None:
                obj.pad_token_id = tokenizer.pad_token_id
                obj.eos_token_id = tokenizer.eos_token_id
    return model


def _from_pretrained(auto_cls, where, config, dtype, trust_remote_code: bool, what: str, **kw):
    """``auto_cls.from_pretrained`` from safetensors only (``use_safetensors``: transformers never falls back to a
    pickle), with what the loader raises on bad files as one ModelError line, and a NaN/Inf weight check."""
    try:
        from safetensors import SafetensorError  # lazy: safetensors
    except ImportError:  # older safetensors
        SafetensorError = OSError  # noqa: N806
    local = isinstance(where, Path)
    try:
        model = auto_cls.from_pretrained(str(where), config=config, dtype=_to_dtype(dtype), local_files_only=local,
                                         trust_remote_code=trust_remote_code, use_safetensors=True, **kw)
    except ValueError as e:  # e.g. a config of a model type without a causal-LM head
        if local and _is_remote_code_refusal(e):
            raise _remote_code_refusal(where, remote_code_refs(where) or {"AutoModel": str(config.model_type)}) \
                from None
        raise ModelError(f"{where}: cannot load as {what}: {one_line(e)}") from None
    except ImportError as e:  # the folder's code needs a package this environment lacks
        raise ModelError(f"{where}: cannot import the folder's model code: {one_line(e)}") from None
    except (OSError, KeyError, RuntimeError, SafetensorError) as e:  # unreadable shard, shape mismatch, bad dtype
        raise ModelError(f"{where}: cannot load the weights: {one_line(e)}") from None
    check_finite_weights(model, where)
    return model


def num_padding_at_beginning(tokenizer) -> int:
    """1 when the tokenizer starts every encoding with the pad token (OPT: BOS ``</s>`` == pad), else 0."""
    ids = tokenizer("hi")["input_ids"]
    pad = tokenizer.pad_token_id
    return 1 if pad is not None and ids and ids[0] == pad else 0


def _rope_or_alibi(config) -> bool:
    """Models whose positions are computed (RoPE, ALiBi) have no hard length limit."""
    if getattr(config, "model_type", "") in ("bloom", "mpt", "falcon"):
        return True
    return any(getattr(config, a, None) is not None for a in
               ("rope_theta", "rope_parameters", "rope_scaling", "rotary_pct", "rotary_emb_base", "rotary_dim"))


def max_positions(config) -> int | None:
    """The model's hard maximum sequence length, or None when it has none (RoPE / ALiBi)."""
    if _rope_or_alibi(config):
        return None
    for a in _MAX_POSITION_FIELDS:
        v = getattr(config, a, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def check_seq_len(config, max_seq_len: int) -> None:
    """ModelError when ``max_seq_len`` exceeds a model's learned position embeddings; RoPE/ALiBi models pass
    (with a warning past their trained length)."""
    limit = max_positions(config)
    if limit is not None and max_seq_len > limit:
        raise ModelError(f"--max_seq_len {max_seq_len} is longer than the model's {limit} positions "
                         f"({getattr(config, 'model_type', 'model')}); use --max_seq_len {limit} or less")
    trained = getattr(config, "max_position_embeddings", None)
    if limit is None and isinstance(trained, int) and max_seq_len > trained:
        logger.warning("--max_seq_len %d exceeds the %d positions the model was trained on", max_seq_len, trained)


def _special(tok) -> dict[str, tuple[str | None, int | None]]:
    return {name: (getattr(tok, f"{name}_token", None), getattr(tok, f"{name}_token_id", None))
            for name in ("bos", "eos", "pad", "unk")}


def check_tokenizers_compatible(tok_a, tok_b, names: tuple[str, str] = ("actor", "reward model")) -> None:
    """ModelError naming the first difference (vocabulary size, a special token, or a probe string's encoding)
    between two tokenizers that must agree, e.g. the actor's and the reward model's."""
    a, b = names
    if len(tok_a) != len(tok_b):
        raise ModelError(f"{a} and {b} tokenizers differ: vocabulary size {len(tok_a)} vs {len(tok_b)}")
    sa, sb = _special(tok_a), _special(tok_b)
    for name in sa:
        if sa[name] != sb[name]:
            raise ModelError(f"{a} and {b} tokenizers differ: {name} token {sa[name][0]!r} (id {sa[name][1]}) "
                             f"vs {sb[name][0]!r} (id {sb[name][1]})")
    ea, eb = tok_a(PROBE_TEXT)["input_ids"], tok_b(PROBE_TEXT)["input_ids"]
    if ea != eb:
        i = next((i for i, (x, y) in enumerate(zip(ea, eb)) if x != y), min(len(ea), len(eb)))
        raise ModelError(f"{a} and {b} tokenizers differ: they encode {PROBE_TEXT!r} differently from token {i} "
                         f"({ea[i:i + 4]} vs {eb[i:i + 4]})")
