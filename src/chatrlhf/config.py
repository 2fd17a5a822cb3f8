"""Typed configs: dataclasses parsed from the command line and from YAML/JSON files.

Every step defines one ``@dataclass`` whose fields carry a ``metadata={"help": ...}`` docstring. Flag names follow
DeepSpeed-Chat (``--data_path``, ``--max_seq_len``); transformers' HfArgumentParser also accepts dashes
(``--data-path``). ``--config FILE`` (YAML or JSON) supplies defaults; flags given on the command line win.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence, TypeVar

T = TypeVar("T")


from chatrlhf.errors import UserError


class ConfigError(UserError):
    """A config file or flag value that cannot be used; the message names the file and key."""


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML or JSON mapping; keys may use dashes or underscores."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # yaml.YAMLError / json.JSONDecodeError: both say line and column
        raise ConfigError(f"{p}: cannot parse config: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a config file must hold a mapping of option names to values, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _field_names(classes: Sequence[type]) -> set[str]:
    return {f.name for c in classes for f in dataclasses.fields(c)}


def make_parser(classes: Sequence[type], prog: str | None = None, description: str | None = None):
    from transformers import HfArgumentParser

    parser = HfArgumentParser(list(classes), prog=prog, description=description)
    parser.add_argument("--config", default=None, help="YAML or JSON file of option values; command-line flags override it.")
    return parser


def parse_config(cls: type[T] | Sequence[type], argv: Sequence[str] | None = None, *, prog: str | None = None,
                 description: str | None = None, overrides: dict[str, Any] | None = None):
    """Parse ``argv`` into one dataclass instance (or a tuple when ``cls`` is a sequence).

    Precedence: dataclass defaults < ``overrides`` (e.g. a pipeline's per-step section) < ``--config`` file < flags.
    """
    classes = list(cls) if isinstance(cls, (list, tuple)) else [cls]
    parser = make_parser(classes, prog=prog, description=description)
    argv = list(sys.argv[1:] if argv is None else argv)
    pre, _ = parser.parse_known_args(argv) if "--config" in argv else (None, None)
    defaults: dict[str, Any] = dict(overrides or {})
    if pre is not None and pre.config:
        defaults.update(load_config_file(pre.config))
    known = _field_names(classes)
    unknown = sorted(set(defaults) - known)
    if unknown:
        src = pre.config if pre is not None and pre.config else "overrides"
        raise ConfigError(f"{src}: unknown option(s) {', '.join(unknown)}")
    if defaults:
        parser.set_defaults(**defaults)
    out = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    *out, remaining = out
    if remaining:
        import difflib

        flags = sorted({o for a in parser._actions for o in a.option_strings if o.startswith("--")})
        hints = []
        for r in remaining:
            if r.startswith("--"):
                near = difflib.get_close_matches(r.split("=")[0], flags, n=1)
                hints.append(f"{r} (did you mean {near[0]}?)" if near else r)
            else:
                hints.append(r)
        raise ConfigError(f"unrecognized arguments: {' '.join(hints)}; see --help")
    objs = [o for o in out if dataclasses.is_dataclass(o)]
    for o in objs:
        post = getattr(o, "validate", None)
        if callable(post):
            post()
    return objs[0] if len(objs) == 1 and not isinstance(cls, (list, tuple)) else tuple(objs)


def config_to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def save_config(obj: Any, path: str | os.PathLike) -> None:
    """Write the resolved config as JSON (atomically) so a run can be reproduced with ``--config``."""
    from chatrlhf.utils import atomic_write_text

    data = config_to_dict(obj) if dataclasses.is_dataclass(obj) else obj
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
