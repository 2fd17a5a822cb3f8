"""Typed configs: dataclasses parsed from the command line and from YAML/JSON files.

Every step defines one ``@dataclass`` whose fields carry a ``metadata={"help": ...}`` docstring and, where a value
can be wrong, a ``"check": Check(...)`` rule next to it (``Check(gt=0)``, ``Check(ge=1, special=(-1,))``,
``Check(choices=(...))``). Flag names follow DeepSpeed-Chat (``--data_path``, ``--max_seq_len``); transformers'
HfArgumentParser also accepts dashes (``--data-path``). ``--config FILE`` (YAML or JSON) supplies defaults; flags
given on the command line win.

Every value is checked when the config is parsed, before anything loads: values from a file (or a pipeline
section) against the field's declared type -- an int field given ``"8"`` or ``8.5``, a bool given ``5`` -- and
every field against its rule. A wrong value is one ``ConfigError`` naming the file and key, or the flag.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import numbers
import os
import re
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, TypeVar

from chatrlhf.errors import UserError
from chatrlhf.utils import atomic_write_text

T = TypeVar("T")

CHECK = "check"  # the metadata key of a field's rule


class ConfigError(UserError):
    """A config file or flag value that cannot be used; the message names the file and key."""


# ---------------------------------------------------------------------------------------------------- field rules
@dataclass(frozen=True)
class Check:
    """The values a field accepts: bounds (``ge``/``gt``/``le``/``lt``) or ``choices``; ``special`` values are
    allowed outside them and each must be documented in the field's help (e.g. ``-1: off``)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple | None = None
    special: tuple = ()

    def describe(self, for_help: bool = False) -> str:
        if self.choices is not None:
            text = "one of " + ", ".join(str(c) for c in self.choices)
        else:
            lo = f"[{_num(self.ge)}" if self.ge is not None else f"({_num(self.gt)}" if self.gt is not None else None
            hi = f"{_num(self.le)}]" if self.le is not None else f"{_num(self.lt)})" if self.lt is not None else None
            if lo and hi:
                text = f"in {lo}, {hi}"
            elif lo:
                text = (">= " if lo[0] == "[" else "> ") + lo[1:]
            elif hi:
                text = ("<= " if hi[-1] == "]" else "< ") + hi[:-1]
            else:
                text = "any value"
        if self.special:  # what a special value means is in the field's help
            text += " (or " + " or ".join(str(s) for s in self.special) + ("" if for_help else "; see --help") + ")"
        return text

    def ok(self, value: Any) -> bool:
        if value is None or any(value == s and type(value) is type(s) for s in self.special):
            return True
        if self.choices is not None:
            return value in self.choices
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else str(x)


def option(help: str, default: Any = None, *, default_factory: Any = dataclasses.MISSING, **check: Any):
    """``field()`` with its help text and (optional) rule side by side: ``option("Passes over the data.", 1, ge=1)``.
    The configs import it as ``_h`` (short, so long help texts keep their line)."""
    if default_factory is not dataclasses.MISSING:
        default = dataclasses.MISSING
    meta: dict[str, Any] = {"help": help}
    if check:
        meta[CHECK] = Check(**{k: tuple(v) if k in ("choices", "special") else v for k, v in check.items()})
    return dataclasses.field(default=default, default_factory=default_factory, metadata=meta)


# ---------------------------------------------------------------------------------------------------- type checks
class _Bad(Exception):
    """A value that does not fit a field: ``what`` it must be (and an optional hint)."""

    def __init__(self, what: str, value: Any, hint: str = ""):
        super().__init__(what)
        self.what, self.value, self.hint = what, value, hint


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return f"{value!r} (a string)"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, dict)):
        text = json.dumps(value, default=str)
        return (text if len(text) <= 60 else text[:57] + "...") + f" (a {'list' if isinstance(value, list) else 'mapping'})"
    return repr(value)


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return (_type_name(inner[0]) if len(inner) == 1 else " or ".join(map(_type_name, inner))) + " or null"
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        return f"a list of {_type_name(args[0]).removeprefix('a ').removeprefix('an ')}s" if args else "a list"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            dict: "a mapping"}.get(tp, getattr(tp, "__name__", str(tp)))


def coerce(value: Any, tp: Any) -> Any:
    """``value`` as the declared type ``tp``, or ``_Bad``. Strict: YAML/JSON already give ints, floats, bools and
    lists their own types, so a quoted number or a 0/1 for a bool is a mistake, not something to guess about. Two
    liberties: a float field takes an int or a numeric string (PyYAML reads ``1e-4``, without a dot, as a string),
    and a list field takes a single item."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            try:
                return coerce(value, inner[0])
            except _Bad as e:
                raise _Bad(_type_name(tp), value, e.hint) from None
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Bad("true or false", value)
    if tp is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):  # numbers: numpy ints from code
            return int(value) if type(value) is not int else value
        hint = ""
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            hint = "write the number without quotes"
        raise _Bad("an integer", value, hint)
    if tp is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            out = float(value)
        elif isinstance(value, str):
            try:
                out = float(value)
            except ValueError:
                raise _Bad("a number", value) from None
        else:
            raise _Bad("a number", value)
        if not math.isfinite(out):
            raise _Bad("a finite number", value)
        return out
    if tp is str:
        if isinstance(value, (str, os.PathLike)):
            return value
        raise _Bad("a string", value, "put it in quotes" if isinstance(value, (int, float)) else "")
    if origin is list or tp is list:
        item = args[0] if args else Any
        if isinstance(value, (str, os.PathLike)) and item is str:
            return [value]  # `data_path: my/dir` means the one-entry list
        if not isinstance(value, (list, tuple)):
            raise _Bad(_type_name(tp), value)
        out = []
        for i, v in enumerate(value):
            try:
                out.append(v if item is Any else coerce(v, item))
            except _Bad:
                raise _Bad(_type_name(tp), value, f"item {i + 1} is {_show(v)}") from None
        return out
    if origin is dict or tp is dict:
        if isinstance(value, dict):
            return value
        raise _Bad("a mapping", value)
    return value  # other types (enums, classes): left to the dataclass


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an unresolvable annotation: skip the type checks of that class, never crash on it
        return {}


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _problem(name: str, value: Any, tp: Any, field: dataclasses.Field | None, types_too: bool) -> tuple[Any, str]:
    """(coerced value, "" or what is wrong with it)."""
    if value is None and field is not None and field.default is None:
        return value, ""  # `x: str = None` fields: null is their own default ("unset"), whatever the annotation says
    if types_too and tp is not None:
        try:
            value = coerce(value, tp)
        except _Bad as e:
            shown = _show(e.value)
            if e.hint:  # one parenthesis: "got '8' (a string; write the number without quotes)"
                shown = f"{shown[:-1]}; {e.hint})" if shown.endswith(")") else f"{shown} ({e.hint})"
            return value, f"must be {e.what}, got {shown}"
    check = field.metadata.get(CHECK) if field is not None else None
    if check is not None:
        try:
            good = check.ok(value)
        except TypeError:  # e.g. a string compared with a bound: reported as the type it should have
            return value, f"must be {_type_name(tp) if tp is not None else 'a number'}, got {_show(value)}"
        if not good:
            return value, f"must be {check.describe()}, got {value!r}"
    return value, ""


def check_values(cls: type, values: dict[str, Any], source: str) -> dict[str, Any]:
    """Type- and rule-check raw ``values`` (from a config file or a pipeline section) for ``cls``'s fields, naming
    ``source`` and the key; returns them coerced (a float from ``"1e-4"``, a list from a single item)."""
    hints, fields = _hints(cls), _fields(cls)
    out = {}
    for key, value in values.items():
        if key not in fields:
            out[key] = value
            continue
        out[key], problem = _problem(key, value, hints.get(key), fields[key], types_too=True)
        if problem:
            raise ConfigError(f"{source}: {key}: {problem}")
    return out


def check_fields(obj: Any, types_too: bool = True) -> None:
    """Check every field of the dataclass ``obj`` against its declared type and rule; ConfigError naming the flag.
    Called by parse_config and by each step's ``validate`` (so configs built without parse_config, e.g. the
    pipeline's per-step sections, get the same checks)."""
    hints = _hints(type(obj)) if types_too else {}
    for name, f in _fields(type(obj)).items():
        value = getattr(obj, name)
        new, problem = _problem(name, value, hints.get(name), f, types_too)
        if problem:
            raise ConfigError(f"--{name} {problem}")
        if new is not value and type(new) is not type(value):
            setattr(obj, name, new)


# ---------------------------------------------------------------------------------------------------- files
def _yaml_load(text: str) -> Any:
    """yaml.safe_load (plain data only: no tags that build objects) that refuses a key given twice in one mapping
    (PyYAML silently keeps the last)."""
    import yaml  # lazy: yaml

    class Loader(yaml.SafeLoader):
        pass

    def mapping(loader, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = str(key_node.value).replace("-", "_")
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key_node.value!r} appears twice (first on line {seen[key] + 1})",
                        key_node.start_mark)
                seen[key] = key_node.start_mark.line
        return loader.construct_mapping(node, deep=deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return yaml.load(text, Loader=Loader)  # noqa: S506 -- a SafeLoader subclass


def _json_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"key {k!r} appears twice")
        out[k] = v
    return out


def _parse_error(e: Exception) -> str:
    """One line with line and column, whatever parser raised it (PyYAML's own messages span several lines)."""
    mark = getattr(e, "problem_mark", None)
    if mark is not None:
        problem = " ".join(str(getattr(e, "problem", None) or e).split())
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    if isinstance(e, json.JSONDecodeError):
        return f"line {e.lineno}, column {e.colno}: {e.msg}"
    return " ".join(str(e).split())


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML or JSON mapping; keys may use dashes or underscores."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{p}: is a directory, not a config file")
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read the config file ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{p}: not UTF-8 text (bad byte 0x{raw[e.start]:02x} on line {line})") from None
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text, object_pairs_hook=_json_pairs)
        else:
            data = _yaml_load(text)
    except Exception as e:  # yaml.YAMLError / json.JSONDecodeError / a duplicate key
        raise ConfigError(f"{p}: cannot parse config: {_parse_error(e)}") from None
    if data is None:
        # An empty file is almost always the wrong file (or a failed write); running on defaults would hide it.
        raise ConfigError(f"{p}: the config file is empty; write `option: value` lines in it or drop --config")
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a config file must hold a mapping of option names to values, got "
                          f"{'a list' if isinstance(data, list) else _show(data)}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


# ---------------------------------------------------------------------------------------------------- parsing
def _field_names(classes: Sequence[type]) -> set[str]:
    return {f.name for c in classes for f in dataclasses.fields(c)}


def make_parser(classes: Sequence[type], prog: str | None = None, description: str | None = None):
    from transformers import HfArgumentParser  # lazy: transformers

    class Parser(HfArgumentParser):
        @staticmethod
        def _parse_dataclass_field(parser, field):
            # argparse gets every metadata key as a keyword: take the rule out, and show it in --help instead.
            if CHECK in field.metadata:
                meta = dict(field.metadata)
                rule = meta.pop(CHECK)
                meta["help"] = f"{meta.get('help', '')} [{rule.describe(for_help=True)}]".strip()
                field = copy.copy(field)
                field.metadata = types.MappingProxyType(meta)
            HfArgumentParser._parse_dataclass_field(parser, field)
            # the `--no_X` complement of an on-by-default bool gets X's help verbatim, which says the opposite
            for action in parser._actions:
                if f"--no_{field.name}" in action.option_strings and action.dest == field.name:
                    action.help = f"Turn --{field.name} off (on by default: {field.metadata.get('help', '')})"

        def error(self, message: str):
            # argparse would print usage and SystemExit; one ConfigError line names the flag instead.
            raise ConfigError(" ".join(message.split()).rstrip(".") + "; see --help")

    parser = Parser(list(classes), prog=prog, description=description)
    # argparse takes "-1e-5" or "-inf" for an option name ("expected one argument"), hiding the real problem: let
    # every negative number through as a value (none of our flags looks like one), so its rule can name it.
    parser._negative_number_matcher = re.compile(r"^-(\d+|\d*\.\d+|\d*\.?\d+[eE][-+]?\d+|inf|infinity|nan)$",
                                                 re.IGNORECASE)
    parser.add_argument("--config", default=None, help="YAML or JSON file of option values; command-line flags override it.")
    return parser


def parse_config(cls: type[T] | Sequence[type], argv: Sequence[str] | None = None, *, prog: str | None = None,
                 description: str | None = None, overrides: dict[str, Any] | None = None):
    """Parse ``argv`` into one dataclass instance (or a tuple when ``cls`` is a sequence).

    Precedence: dataclass defaults < ``overrides`` (e.g. a pipeline's per-step section) < ``--config`` file < flags.
    Every value is type- and rule-checked before the instances' ``validate()`` runs.
    """
    classes = list(cls) if isinstance(cls, (list, tuple)) else [cls]
    parser = make_parser(classes, prog=prog, description=description)
    argv = list(sys.argv[1:] if argv is None else argv)
    pre, _ = parser.parse_known_args(argv) if "--config" in argv else (None, None)
    known = _field_names(classes)
    defaults: dict[str, Any] = {}
    sources = [("overrides", dict(overrides or {}))]
    if pre is not None and pre.config:
        sources.append((pre.config, load_config_file(pre.config)))
    for src, values in sources:
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{src}: unknown option(s) {', '.join(unknown)}")
        for c in classes:
            values = check_values(c, values, src)
        defaults.update(values)
    if defaults:
        parser.set_defaults(**defaults)
    out = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    *out, remaining = out
    if remaining:
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
        # flags arrive typed by argparse; defaults and file values were checked above, so rules are what is left
        check_fields(o, types_too=False)
        post = getattr(o, "validate", None)
        if callable(post):
            post()
    return objs[0] if len(objs) == 1 and not isinstance(cls, (list, tuple)) else tuple(objs)


def config_to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def save_config(obj: Any, path: str | os.PathLike) -> None:
    """Write the resolved config as JSON (atomically) so a run can be reproduced with ``--config``."""

    data = config_to_dict(obj) if dataclasses.is_dataclass(obj) else obj
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def check_output_dir(path: str | os.PathLike, flag: str) -> None:
    """Refuse, before anything is created, an output dir that cannot be made: empty, an existing file, under a
    regular file, or under a directory we may not write to."""
    if not str(path).strip():
        raise ConfigError(f"{flag} is empty")
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{flag} {path}: exists and is not a directory")
    parent = p
    while not parent.exists() and parent.parent != parent:
        parent = parent.parent
    if parent != p and parent.exists() and not parent.is_dir():
        raise ConfigError(f"{flag} {path}: {parent} is a regular file, so no directory can be made under it")
    if parent.is_dir() and not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: {parent} is not writable")
