"""Where raw rows come from, and which adapter reads them.

A ``data_path`` entry is one of
- ``NAME=PATH``: a local file or directory read with the adapter NAME (the explicit form);
- a local path: ``.json`` (a list of objects, or JSON lines), ``.jsonl``, ``.parquet``; a directory written by
  ``Dataset/DatasetDict.save_to_disk``; or a directory laid out like a downloaded hub dataset (files named by split:
  ``train.jsonl``, ``data/train-00000-of-00001.parquet``, ``data/eval.json``, ``test/part-0.parquet``...). The
  adapter is chosen from the columns (``detect_adapter``), never from the path's name;
- a known dataset name (``Dahoas/rm-static``...): loaded with ``datasets.load_dataset`` (needs the Hub or its cache).

Column-detection rule (first match wins; "columns" = the keys of the first rows):
  question+answer_0+answer_1+score_0+score_1 -> openai/webgpt_comparisons
  history+human_ref_A+human_ref_B+labels     -> stanfordnlp/SHP
  query+positive_passages+negative_passages  -> Cohere/miracl-zh-queries-22-12 (zh and ja read identically)
  queries+answers                            -> error: mkqa-Chinese or mkqa-Japanese, say which with NAME=PATH
  INSTRUCTION+RESPONSE                       -> wangrui6/Zhihu-KOL
  question+human_answers                     -> Hello-SimpleAI/HC3-Chinese
  questions+paragraph                        -> lmqg/qag_jaquad
  question+sentence                          -> lmqg/qg_jaquad
  prompt+label                               -> pvduy/sharegpt_alpaca_oa_vicuna_format
  prompt+response+chosen+rejected            -> Dahoas/rm-static (prompts verbatim)
  prompt (+ metadata), nothing else         -> prompts (step-3 prompts; plain ones get the template)
  prompt + (chosen | answers | ranked)       -> by content of the first 100 rows:
      chosen starts with "Assistant:"         -> yitingxie/rlhf-reward-datasets
      every prompt ends with "Assistant:"     -> local/jsonfile (prompt and answers verbatim)
      no prompt ends with "Assistant:"        -> Dahoas/synthetic-instruct-gptj-pairwise (template applied)
      some do, some do not                    -> error naming the first differing row (use NAME=PATH)
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from chatrlhf.data.adapters import (ADAPTERS, EVAL_SPLIT_ALIASES, Adapter, FieldError, Row, get_adapter,
                                    train_eval_indices)
from chatrlhf.errors import DataError

logger = logging.getLogger(__name__)

DATA_EXTS = (".jsonl", ".json", ".parquet")
SPLIT_NAMES = ("train",) + EVAL_SPLIT_ALIASES
# Files save_to_disk writes next to the Arrow data; never data rows.
_METADATA_FILES = {"dataset_info.json", "state.json", "dataset_dict.json"}
_SAMPLE_ROWS = 100
# Local files up to this size are fingerprinted by content (exact); larger ones by size + mtime (fast).
_HASH_LIMIT = 64 << 20


@dataclass
class RawSplit:
    """Raw rows of one split (a list of dicts or a ``datasets.Dataset``) and where each row came from."""

    name: str
    rows: Sequence[Mapping[str, Any]]
    # (first index, file, line numbers or None for 1..n) per file, in order
    segments: list[tuple[int, str, list[int] | None]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    def origin(self, i: int) -> tuple[str, int]:
        """(file, 1-based row) of row ``i``; for JSON lines the row is the line number."""
        if not self.segments:
            return (self.name, i + 1)
        k = bisect.bisect_right([s[0] for s in self.segments], i) - 1
        start, file, numbers = self.segments[k]
        return (file, numbers[i - start] if numbers else i - start + 1)

    def columns(self) -> list[str]:
        names = getattr(self.rows, "column_names", None)
        if names is not None:
            return list(names)
        seen: dict[str, None] = {}
        for raw in self.sample():
            seen.update(dict.fromkeys(raw))
        return list(seen)

    def sample(self, n: int = _SAMPLE_ROWS) -> Iterator[Mapping[str, Any]]:
        for i in range(min(n, len(self.rows))):
            yield self.rows[i]


@dataclass
class Source:
    """One ``data_path`` entry, opened: its adapter and raw splits."""

    entry: str
    adapter: Adapter
    splits: dict[str, RawSplit]
    location: str  # the local path or hub name, for messages

    def pick_splits(self) -> tuple[RawSplit, RawSplit | None]:
        """(train, eval); eval None means: carve the seeded 9:1 split out of train."""
        train = self.splits.get(self.adapter.train_split)
        if train is None:
            if len(self.splits) != 1:
                raise DataError(f"no {self.adapter.train_split!r} split; found {sorted(self.splits)}",
                                file=self.location)
            train = next(iter(self.splits.values()))
        if self.adapter.eval_split is None:
            return train, None
        for name in (self.adapter.eval_split,) + EVAL_SPLIT_ALIASES:
            if name in self.splits and self.splits[name] is not train:
                return train, self.splits[name]
        logger.info("%s: no eval split (%s); using a seeded 9:1 split of train", self.location, self.adapter.eval_split)
        return train, None

    def mapped(self, seed: int, skip_bad_rows: bool = False) -> tuple[list[Row | None], list[Row | None], int]:
        """Map every row: (train rows, eval rows, number skipped). Skipped rows stay as None so that later seeded
        splits do not shift when rows are skipped."""
        train, evl = self.pick_splits()
        # Map in file order, so the first bad row reported is the first one in the file.
        train_rows = [self._map_one(train, i, skip_bad_rows) for i in range(len(train))]
        if evl is None:
            t_idx, e_idx = train_eval_indices(len(train), seed)
            tr = [_with_split(train_rows[i], "train") for i in t_idx]
            ev = [_with_split(train_rows[i], "eval") for i in e_idx]
        else:
            tr = [_with_split(r, "train") for r in train_rows]
            ev = [_with_split(self._map_one(evl, i, skip_bad_rows), "eval") for i in range(len(evl))]
        skipped = sum(r is None for r in tr + ev)
        if skipped:
            logger.warning("%s: skipped %d bad row(s) (--skip_bad_rows)", self.location, skipped)
        return tr, ev, skipped

    def _map_one(self, split: RawSplit, i: int, skip: bool) -> Row | None:
        file, rowno = split.origin(i)
        try:
            raw = split.rows[i]
            if not isinstance(raw, Mapping):
                raise FieldError("", f"expected an object, got {type(raw).__name__}")
            row = self.adapter.map(raw)
        except FieldError as e:
            err = DataError(f"{e.message} (dataset {self.adapter.name}; --skip_bad_rows skips such rows)", file=file,
                            row=rowno, field=e.field or None)
            if skip:
                logger.debug("skipping: %s", err)
                return None
            raise err from None
        meta = raw.get("metadata")
        if meta is not None and not isinstance(meta, Mapping):
            err = DataError(f"must be an object (reward/eval functions get it with the prompt), got "
                            f"{type(meta).__name__}", file=file, row=rowno, field="metadata")
            if skip:
                return None
            raise err
        return replace(row, source=(file, rowno), meta=dict(meta) if meta else None)


def _with_split(row: Row | None, split: str) -> Row | None:
    return None if row is None else replace(row, split=split)

# ---------------------------------------------------------------------------------------------------------------
# Entry parsing


def parse_entry(entry: str) -> tuple[Adapter | None, Path | None]:
    """(explicit adapter or None, local path or None). Neither: a hub name, returned as its adapter with path None."""
    entry = entry.strip()
    if not entry:
        raise DataError("empty data path entry")
    if os.path.exists(os.path.expanduser(entry)):
        return None, Path(os.path.expanduser(entry))
    if "=" in entry:
        name, _, path = entry.partition("=")
        if name not in ADAPTERS:
            raise DataError(f"unknown dataset name {name!r} in NAME=PATH {entry!r}; known names: {', '.join(ADAPTERS)}")
        p = Path(os.path.expanduser(path))
        if not p.exists():
            raise DataError("no such file or directory", file=path)
        return ADAPTERS[name], p
    if entry in ADAPTERS:
        if entry == "local/jsonfile":
            raise DataError("local/jsonfile needs a directory: local/jsonfile=DIR "
                            "(holding DIR/data/train.json and DIR/data/eval.json)")
        return ADAPTERS[entry], None
    if _looks_like_path(entry):
        raise DataError("no such file or directory", file=entry)
    get_adapter(entry)  # raises the unknown-name error listing the known names
    raise AssertionError("unreachable")


def _looks_like_path(entry: str) -> bool:
    return entry.startswith(("/", "./", "../", "~")) or entry.lower().endswith(DATA_EXTS)


def open_source(entry: str, name: str | None = None) -> Source:
    """Open one data_path entry (``name`` forces an adapter, as NAME=PATH does)."""
    if name is not None:
        entry = f"{name}={entry}"
    adapter, path = parse_entry(entry)
    if path is None:
        assert adapter is not None
        return Source(entry, adapter, read_hub(adapter), adapter.name)
    splits = read_local(path)
    if not splits or all(len(s) == 0 for s in splits.values()):
        raise DataError("dataset has no rows", file=str(path))
    if adapter is None:
        adapter = detect_adapter(splits, str(path))
        logger.info("%s: columns match %s", path, adapter.name)
    return Source(entry, adapter, splits, str(path))

# ---------------------------------------------------------------------------------------------------------------
# Readers


def read_hub(adapter: Adapter) -> dict[str, RawSplit]:
    """``datasets.load_dataset`` for a hub name (needs network or the HF cache)."""
    try:
        import datasets  # lazy: datasets

        args = (adapter.hub_id, adapter.hub_config) if adapter.hub_config else (adapter.hub_id,)
        dd = datasets.load_dataset(*args)
    except Exception as e:  # network, missing cache, gated dataset...: one line, not a traceback
        raise DataError(f"cannot load {adapter.name!r} from the Hugging Face Hub ({type(e).__name__}: {e}); download "
                        f"it and pass {adapter.name}=LOCAL_PATH") from None
    return {name: RawSplit(name, ds, [(0, f"{adapter.name}[{name}]", None)]) for name, ds in dd.items()}


def read_local(path: Path) -> dict[str, RawSplit]:
    if path.is_file():
        return {"train": _read_file(path)}
    if not path.is_dir():
        raise DataError("not a regular file or directory", file=str(path))
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return _read_saved(path)
    return _read_hub_like_dir(path)


def _read_saved(path: Path) -> dict[str, RawSplit]:
    import datasets  # lazy: datasets

    try:
        obj = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DataError(f"cannot load a save_to_disk dataset ({type(e).__name__}: {e})", file=str(path)) from None
    if isinstance(obj, datasets.Dataset):
        return {"train": RawSplit("train", obj, [(0, str(path), None)])}
    return {name: RawSplit(name, ds, [(0, f"{path}[{name}]", None)]) for name, ds in obj.items()}


def _split_of(rel: Path) -> str | None:
    token = re.split(r"[-_.]", rel.name, maxsplit=1)[0].lower()
    if token in SPLIT_NAMES:
        return token
    for part in reversed(rel.parts[:-1]):
        if part.lower() in SPLIT_NAMES:
            return part.lower()
    return None


def _data_files(level: Path) -> list[Path]:
    """Data files directly in ``level`` plus everything under its split-named subdirectories (train/, test/...)."""
    def is_data(p: Path) -> bool:
        return p.is_file() and p.suffix.lower() in DATA_EXTS and p.name not in _METADATA_FILES \
            and not p.name.startswith(".")

    files = [p for p in level.iterdir() if is_data(p)]
    for sub in level.iterdir():
        if sub.is_dir() and sub.name.lower() in SPLIT_NAMES:
            files += [p for p in sub.rglob("*") if is_data(p)]
    return sorted(files)


def _read_hub_like_dir(path: Path) -> dict[str, RawSplit]:
    """Files named by split, in DIR/data/ when that holds any (the hub's and DeepSpeed-Chat's local/jsonfile
    layout; other files of DIR are then not data), else in DIR itself."""
    level = path
    if (path / "data").is_dir() and any(_split_of(f.relative_to(path / "data")) for f in _data_files(path / "data")):
        level = path / "data"
    files = _data_files(level)
    if not files:
        raise DataError(f"directory holds no {'/'.join(DATA_EXTS)} data files and is not a save_to_disk dataset",
                        file=str(path))
    by_split: dict[str, list[Path]] = {}
    unknown = []
    for f in files:
        split = _split_of(f.relative_to(level))
        if split is None:
            unknown.append(f)
        else:
            by_split.setdefault(split, []).append(f)
    if unknown and not by_split:
        if len(unknown) > 1:
            names = ", ".join(str(f.relative_to(path)) for f in unknown)
            raise DataError(f"cannot tell the split of {names}; name files by split (train.jsonl, "
                            f"data/test-00000.parquet, ...) with split one of {', '.join(SPLIT_NAMES)}", file=str(path))
        by_split["train"] = unknown
    elif unknown:
        logger.warning("%s: not reading %s (file names do not say a split: %s)", path,
                       ", ".join(str(f.relative_to(path)) for f in unknown), ", ".join(SPLIT_NAMES))
    return {name: _concat(name, [_read_file(f) for f in fs]) for name, fs in by_split.items()}


def _concat(name: str, parts: list[RawSplit]) -> RawSplit:
    rows: list[Mapping[str, Any]] = []
    segments = []
    for part in parts:
        segments += [(len(rows) + start, file, nums) for start, file, nums in part.segments]
        rows.extend(part.rows)
    return RawSplit(name, rows, segments)


def _read_file(path: Path) -> RawSplit:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        rows = _read_parquet(path)
        return RawSplit("train", rows, [(0, str(path), None)])
    if suffix not in (".json", ".jsonl"):
        raise DataError(f"unsupported file type {suffix!r}; use {', '.join(DATA_EXTS)}", file=str(path))
    text = _read_text(path)
    if suffix == ".json":
        try:
            data = json.loads(text, object_pairs_hook=_object)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # anything else is a broken file; "Extra data" means JSON lines
                raise DataError(f"malformed JSON: {e.msg} (line {e.lineno}, column {e.colno})",
                                file=str(path)) from None
        else:
            if not isinstance(data, list):
                raise DataError(f"expected a JSON list of objects (or JSON lines), got a JSON {type(data).__name__}",
                                file=str(path))
            _check_rows(path, data, None)
            return RawSplit("train", data, [(0, str(path), None)])
    rows, lines = _parse_json_lines(path, text)
    _check_rows(path, rows, lines)
    return RawSplit("train", rows, [(0, str(path), lines)])


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq  # lazy: pyarrow

        return pq.read_table(str(path)).to_pylist()
    except Exception as e:
        raise DataError(f"cannot read parquet ({type(e).__name__}: {e})", file=str(path)) from None


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read file: {e.strerror or e}", file=str(path)) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        # Decode leniently so the bad bytes can be pinned to a row and field by _check_rows.
        line = data.count(b"\n", 0, e.start) + 1
        logger.debug("%s: invalid UTF-8 at byte %d (line %d)", path, e.start, line)
        return data.decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")


def _parse_json_lines(path: Path, text: str) -> tuple[list[Any], list[int]]:
    rows, lines = [], []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line, object_pairs_hook=_object))
        except json.JSONDecodeError as e:
            raise DataError(f"malformed JSON line: {e.msg} (column {e.colno})", file=str(path), row=lineno) from None
        lines.append(lineno)
    return rows, lines


_SURROGATE = re.compile("[\udc80-\udcff]")
_NOT_UTF8 = "contains bytes that are not valid UTF-8 (is the file UTF-8 encoded?)"
_TWICE = "appears twice in this object (JSON would silently keep only the last value); remove one"


class _Twice(dict):
    """A JSON object that named a key more than once (``twice``: those keys); reported with its row by
    _check_rows instead of silently keeping the last value as json.loads does."""

    twice: list[str]


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) == len(pairs):
        return out
    seen: set[str] = set()
    twice = [k for k, _ in pairs if k in seen or seen.add(k)]
    marked = _Twice(out)
    marked.twice = twice
    return marked


def _check_rows(path: Path, rows: list[Any], lines: list[int] | None) -> None:
    """Every row an object; no key given twice; no text holding bytes that were not valid UTF-8."""
    for i, raw in enumerate(rows):
        rowno = lines[i] if lines else i + 1
        if not isinstance(raw, dict):
            raise DataError(f"expected a JSON object, got {type(raw).__name__}", file=str(path), row=rowno)
        bad = _find_bad_text(raw, "")
        if bad is not None:
            raise DataError(bad[1], file=str(path), row=rowno, field=bad[0])


def _find_bad_text(value: Any, where: str) -> tuple[str, str] | None:
    """(field path, what is wrong) of the first text with non-UTF-8 bytes or key given twice, else None."""
    if isinstance(value, str):
        return (where or "?", _NOT_UTF8) if _SURROGATE.search(value) else None
    if isinstance(value, dict):
        if isinstance(value, _Twice):
            return (f"{where}.{value.twice[0]}" if where else value.twice[0], _TWICE)
        for k in value:
            if _SURROGATE.search(str(k)):
                return (f"{where}.{k}" if where else str(k), _NOT_UTF8)
        items = ((f"{where}.{k}" if where else str(k), v) for k, v in value.items())
    elif isinstance(value, list):
        items = ((f"{where}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for sub, v in items:
        bad = _find_bad_text(v, sub)
        if bad is not None:
            return bad
    return None

# ---------------------------------------------------------------------------------------------------------------
# Column detection


_RULES: list[tuple[frozenset[str], str | None]] = [
    (frozenset({"question", "answer_0", "answer_1", "score_0", "score_1"}), "openai/webgpt_comparisons"),
    (frozenset({"history", "human_ref_A", "human_ref_B", "labels"}), "stanfordnlp/SHP"),
    (frozenset({"query", "positive_passages", "negative_passages"}), "Cohere/miracl-zh-queries-22-12"),
    (frozenset({"queries", "answers"}), None),  # mkqa: the language cannot be told from the columns
    (frozenset({"INSTRUCTION", "RESPONSE"}), "wangrui6/Zhihu-KOL"),
    (frozenset({"question", "human_answers"}), "Hello-SimpleAI/HC3-Chinese"),
    (frozenset({"questions", "paragraph"}), "lmqg/qag_jaquad"),
    (frozenset({"question", "sentence"}), "lmqg/qg_jaquad"),
    (frozenset({"prompt", "label"}), "pvduy/sharegpt_alpaca_oa_vicuna_format"),
    (frozenset({"prompt", "response", "chosen", "rejected"}), "Dahoas/rm-static"),
]


def detect_adapter(splits: Mapping[str, RawSplit], location: str) -> Adapter:
    split = splits.get("train") or next(s for s in splits.values() if len(s))
    cols = set(split.columns())
    for needed, name in _RULES:
        if needed <= cols:
            if name is None:
                raise DataError(f"columns {sorted(cols)} match both mkqa-Chinese and mkqa-Japanese; say which with "
                                f"mkqa-Chinese={location} or mkqa-Japanese={location}", file=location)
            return ADAPTERS[name]
    if "prompt" in cols and cols & {"chosen", "answers", "ranked"}:
        return ADAPTERS[_detect_by_content(split, location)]
    if "prompt" in cols and cols <= {"prompt", "metadata"}:
        return ADAPTERS["prompts"]
    expected = "; ".join(f"{a.name}: {', '.join(a.columns)}" for a in ADAPTERS.values())
    raise DataError(f"columns {sorted(cols)} match no dataset adapter. Adapters expect -- {expected}; "
                    "k-wise: prompt, answers. Rename the columns or choose the adapter with NAME=PATH", file=location)


def _detect_by_content(split: RawSplit, location: str) -> str:
    first = None  # the first row's verdict: does its prompt end with "Assistant:"?
    for i, raw in enumerate(split.sample()):
        prompt, chosen = raw.get("prompt"), raw.get("chosen")
        if isinstance(chosen, str) and chosen.lstrip().startswith("Assistant:"):
            return "yitingxie/rlhf-reward-datasets"
        if not isinstance(prompt, str) or not prompt.strip():
            continue  # a missing, wrongly typed or empty prompt is reported with its row and field when mapped
        verdict = prompt.rstrip().endswith("Assistant:")
        if first is None:
            first = verdict
        elif verdict != first:
            file, rowno = split.origin(i)
            raise DataError("some prompts end with 'Assistant:' (already formatted) and some do not; make them "
                            "consistent or choose the adapter with local/jsonfile=PATH (verbatim) or "
                            "Dahoas/synthetic-instruct-gptj-pairwise=PATH (template)", file=file, row=rowno,
                            field="prompt")
    return "local/jsonfile" if first else "Dahoas/synthetic-instruct-gptj-pairwise"

# ---------------------------------------------------------------------------------------------------------------
# Cache fingerprints


def fingerprint(entry: str) -> dict[str, Any]:
    """What identifies an entry's data for the phase cache: hub name, or every local file's size, mtime and (for
    files up to 64 MiB) content hash."""
    adapter, path = parse_entry(entry)
    if path is None:
        return {"hub": adapter.name if adapter else entry}
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    stats = []
    for f in files:
        st = f.stat()
        # Content when affordable (exact, survives a touch); otherwise size + mtime.
        ident = _sha256_file(f) if st.st_size <= _HASH_LIMIT else st.st_mtime_ns
        stats.append([str(f.relative_to(path)) if f != path else f.name, st.st_size, ident])
    return {"adapter": adapter.name if adapter else None, "path": str(path.resolve()), "files": stats}


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
