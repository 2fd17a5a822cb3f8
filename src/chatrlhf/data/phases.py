"""Phase data: split datasets between steps 1/2/3, tokenize, cache on disk, collate.

    train_ds, eval_ds = build_phase_datasets(phase, data_cfg, tokenizer)   # phase in {1, 2, 3}

Row selection (DeepSpeed-Chat semantics): every ``data_path`` dataset's train rows, and separately its eval rows,
are cut by a seeded permutation into three consecutive shares proportional to ``--data_split``; phase N gets share
N. ``sft_only_data_path`` datasets go entirely to phase 1. Several datasets are concatenated and then shuffled
(seeded). Rows without a rejected answer (SFT-only) take no part in phase 2.

Tokenized items are cached as Arrow (``datasets.save_to_disk``) under ``data_output_path/phase{N}_{hash}``, the hash
covering every input that changes them; the directory appears in one rename, so it exists only when complete.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from chatrlhf.config import Check, check_fields, check_output_dir
from chatrlhf.data.adapters import Row, derived_seed, split_indices
from chatrlhf.data.sources import fingerprint, open_source
from chatrlhf.data.template import DSCHAT, TEMPLATE_CHOICES, ChatFormat, resolve_format
from chatrlhf.errors import DataError, ModelError
from chatrlhf.utils import atomic_dir, get_local_rank

logger = logging.getLogger(__name__)

CACHE_VERSION = 2  # bump when the stored format or tokenization rules change
IGNORE_INDEX = -100


@dataclass
class DataConfig:
    """Dataset options shared by the sft, reward, dpo and ppo steps (DeepSpeed-Chat's flag names)."""

    data_path: list[str] = field(default_factory=lambda: ["Dahoas/rm-static"], metadata={
        "help": "Datasets: hub names, local files/dirs, or NAME=PATH to read PATH with the adapter NAME. Several "
                "are blended."})
    data_split: str = field(default="2,4,4", metadata={
        "help": "Comma-separated shares of each dataset given to steps 1, 2 and 3 (e.g. 2,4,4 or 10,0,0)."})
    sft_only_data_path: list[str] = field(default_factory=list, metadata={
        "help": "Datasets used only in step 1 (SFT), entirely."})
    data_output_path: str = field(default="", metadata={
        "help": "Cache of tokenized phase data. Default: OUTPUT/data_cache, private to the run (in a per-node subdir "
                "when the ranks span several nodes, so nodes never race on a shared disk). A dir given here must "
                "be node-local and trusted: whatever it holds is read back as training data."})
    template: str = field(default="auto", metadata={
        "help": "How conversations become text in every step: auto (the tokenizer's chat template when it has one, "
                "else DeepSpeed-Chat's ' Human: ... Assistant:'), chat, or dschat. DeepSpeed-Chat-format rows are "
                "parsed into messages for a chat template.", "check": Check(choices=TEMPLATE_CHOICES)})
    max_seq_len: int = field(default=512, metadata={
        "help": "Token limit of prompt + answer in steps 1 and 2 (longer texts are truncated).", "check": Check(ge=1)})
    max_prompt_seq_len: int = field(default=256, metadata={
        "help": "Token limit of a step-3 prompt; longer prompts are dropped (and counted).", "check": Check(ge=1)})
    seed: int = field(default=1234, metadata={"help": "Seed of the data splits and shuffles.",
                                              "check": Check(ge=0, le=2**32 - 1)})
    reload: bool = field(default=False, metadata={"help": "Rebuild the tokenized data cache even if it exists."})
    train_on_prompt: bool = field(default=False, metadata={
        "help": "Step 1: also train on prompt tokens (by default their labels are -100)."})
    skip_bad_rows: bool = field(default=False, metadata={
        "help": "Skip rows with missing/empty/wrong-typed fields (counted and logged) instead of stopping."})
    kwise: bool = field(default=False, metadata={
        "help": "Step 2: k-wise data, each prompt with k answers ranked best to worst (rows with an 'answers' list; "
                "a plain pair counts as k=2)."})
    kwise_k: int = field(default=0, metadata={
        "help": "k for --kwise: 0 = all rows must have the same number of answers; K >= 2 keeps each ranking's top K "
                "(rows with fewer answers are errors).", "check": Check(ge=2, special=(0,))})

    def validate(self) -> None:
        """Every field's type and rule (declared with the field), then the data-specific checks."""
        check_fields(self)
        parse_data_split(self.data_split)
        if not self.data_path and not self.sft_only_data_path:
            raise DataError("--data_path is empty")
        if self.data_output_path:  # empty: a default chosen by the step
            check_output_dir(self.data_output_path, "--data_output_path")


def parse_data_split(text: str) -> list[float]:
    """'2,4,4' -> [2.0, 4.0, 4.0]: three non-negative numbers, not all zero."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        raise DataError(f"--data_split {text!r}: expected three comma-separated numbers such as 2,4,4") from None
    if len(weights) != 3:
        raise DataError(f"--data_split {text!r}: expected 3 shares (steps 1, 2, 3), got {len(weights)}")
    if any(w < 0 or not np.isfinite(w) for w in weights):
        raise DataError(f"--data_split {text!r}: shares must be non-negative numbers")
    if sum(weights) <= 0:
        raise DataError(f"--data_split {text!r}: shares sum to 0")
    return weights

# ---------------------------------------------------------------------------------------------------------------
# Row selection (no tokenizer needed; also used by `chatrlhf data inspect`)


@dataclass
class PhaseRows:
    train: list[Row]
    eval: list[Row]
    stats: Counter = field(default_factory=Counter)


def plan_phase_rows(phase: int, cfg: DataConfig, memo: dict | None = None) -> PhaseRows:
    """The mapped rows of one phase, before tokenization. ``memo`` (a dict) lets several calls read each source
    once."""
    _check_phase(phase)
    weights = parse_data_split(cfg.data_split)
    memo = {} if memo is None else memo

    def mapped(entry: str):
        if entry not in memo:
            memo[entry] = open_source(entry).mapped(cfg.seed, cfg.skip_bad_rows)
        return memo[entry]

    stats: Counter = Counter()
    train: list[Row] = []
    evl: list[Row] = []
    n_sources = 0
    for entry in cfg.data_path:
        tr, ev, skipped = mapped(entry)
        stats["skipped_bad_rows"] += skipped
        train += _share(tr, weights, phase, cfg.seed, "train")
        evl += _share(ev, weights, phase, cfg.seed, "eval")
        n_sources += 1
    if phase == 1:
        for entry in cfg.sft_only_data_path:
            tr, ev, skipped = mapped(entry)
            stats["skipped_bad_rows"] += skipped
            train += [r for r in tr if r is not None]
            evl += [r for r in ev if r is not None]
            n_sources += 1
    if n_sources > 1:  # blend: one seeded shuffle over the concatenation
        train = _shuffled(train, cfg.seed, "blend:train")
        evl = _shuffled(evl, cfg.seed, "blend:eval")
    if phase == 2:
        n = len(train) + len(evl)
        train = [r for r in train if r.rejected is not None]
        evl = [r for r in evl if r.rejected is not None]
        stats["sft_only_rows_ignored"] = n - len(train) - len(evl)
        if stats["sft_only_rows_ignored"]:
            logger.info("phase 2: %d row(s) without a rejected answer (SFT-only) are not used",
                        stats["sft_only_rows_ignored"])
        train, evl = _distinct_pairs(train, cfg, stats), _distinct_pairs(evl, cfg, stats)
    return PhaseRows(train, evl, stats)


def _distinct_pairs(rows: list[Row], cfg: DataConfig, stats: Counter) -> list[Row]:
    """Phase 2: a pair whose chosen and rejected answers are the same text has no preference to learn. It is a data
    error naming the row (skipped and counted with --skip_bad_rows), not something to blame on --max_seq_len."""
    out = []
    for r in rows:
        if r.answers is None and r.chosen == r.rejected:
            if not cfg.skip_bad_rows:
                file, rowno = r.source or (None, None)
                raise DataError("is the same text as 'chosen': a preference pair needs two different answers "
                                "(--skip_bad_rows skips such rows)", file=file, row=rowno, field="rejected")
            stats["skipped_chosen_equals_rejected"] += 1
            continue
        out.append(r)
    return out


def _share(rows: list[Row | None], weights: Sequence[float], phase: int, seed: int, split: str) -> list[Row]:
    idx = split_indices(len(rows), weights, seed, f"phase_split:{split}")[phase - 1]
    return [rows[i] for i in idx if rows[i] is not None]


def _shuffled(rows: list[Row], seed: int, purpose: str) -> list[Row]:
    perm = np.random.RandomState(derived_seed(seed, purpose)).permutation(len(rows))
    return [rows[i] for i in perm]


def _check_phase(phase: int) -> None:
    if phase not in (1, 2, 3):
        raise ValueError(f"phase must be 1, 2 or 3, got {phase!r}")

# ---------------------------------------------------------------------------------------------------------------
# Tokenization


class Encoder:
    """Tokenizes prompt/answer texts rendered by a ChatFormat (chatrlhf.data.template): answers end with EOS, and the
    number of leading tokens that belong to the prompt is known exactly.

    ``dschat``: prompt + answer tokenized jointly (BOS as the tokenizer adds it; the prompt/answer boundary from
    offsets). ``chat``: the template's prompt text and its answer text are tokenized separately without automatic
    special tokens and concatenated, so the prompt ids are exactly the ones a rollout generates after."""

    def __init__(self, tokenizer: Any, fmt: ChatFormat = DSCHAT):
        self.tok = tokenizer
        self.fmt = fmt
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            raise ModelError("the tokenizer has no EOS token; answers must end with one (set tokenizer.eos_token)")
        probe = tokenizer("a")["input_ids"]
        self.adds_eos = fmt.add_special_tokens and bool(probe) and probe[-1] == self.eos_id  # Llama add_eos_token

    def _batch(self, texts: list[str], **kw) -> dict:
        # verbose=False: texts are cut to max_seq_len right after, so the "longer than model_max_length" warning
        # transformers would print here is noise
        return self.tok(texts, add_special_tokens=self.fmt.add_special_tokens, truncation=False, verbose=False, **kw)

    def answer_ids(self, prompts: list[str], answers: list[str]) -> list[tuple[list[int], int]]:
        """(prompt + answer + EOS ids, number of prompt tokens) per pair."""
        if self.fmt.name != "dschat":
            heads = self.prompt_ids(prompts)
            tails = self._batch([self.fmt.answer_from_row(p, a, self.tok) for p, a in zip(prompts, answers)])
            return [(h + self._until_eos(list(t)), len(h)) for h, t in zip(heads, tails["input_ids"])]
        texts = [p + a for p, a in zip(prompts, answers)]
        try:
            enc = self._batch(texts, return_offsets_mapping=True)
            counts = [_prompt_token_count(off, len(p)) for off, p in zip(enc["offset_mapping"], prompts)]
        except (NotImplementedError, ValueError, TypeError, KeyError):  # a tokenizer without offsets
            enc = self._batch(texts)
            counts = [len(ids) - int(self.adds_eos) for ids in self._batch(prompts)["input_ids"]]
        out = []
        for ids, n in zip(enc["input_ids"], counts):
            ids = list(ids) if self.adds_eos else list(ids) + [self.eos_id]
            out.append((ids, n))
        return out

    def _until_eos(self, ids: list[int]) -> list[int]:
        """An answer ends at its first EOS (a template's text after it, such as a newline, is not generated)."""
        return ids[:ids.index(self.eos_id) + 1] if self.eos_id in ids else ids + [self.eos_id]

    def prompt_ids(self, prompts: list[str]) -> list[list[int]]:
        out = []
        texts = [self.fmt.prompt_from_row(p, self.tok) for p in prompts]
        for ids in self._batch(texts)["input_ids"]:
            ids = list(ids)
            if self.adds_eos and ids and ids[-1] == self.eos_id:
                ids.pop()  # generation continues after the prompt: no EOS there
            out.append(ids)
        return out


def _prompt_token_count(offsets: Sequence[tuple[int, int]], prompt_chars: int) -> int:
    """Tokens before the first one that starts inside the answer; a token straddling the boundary counts as prompt.
    Special tokens have empty (0, 0) offsets: a leading BOS counts as prompt."""
    for i, (start, end) in enumerate(offsets):
        if start >= prompt_chars and end > start:
            return i
    return len(offsets)


def _chunks(rows: list[Row], size: int = 1000) -> Iterator[list[Row]]:
    for i in range(0, len(rows), size):
        yield rows[i:i + size]


def tokenize_phase(phase: int, rows: list[Row], cfg: DataConfig, enc: Encoder,
                   firsts: dict[str, Row] | None = None) -> tuple[dict[str, list], Counter]:
    """Columns of tokenized items and counts of dropped/truncated rows; ``firsts`` (a dict) receives the first
    row dropped for each reason, so a message can point at one."""
    firsts = {} if firsts is None else firsts
    if phase == 1:
        return _tokenize_sft(rows, cfg, enc, firsts)
    if phase == 2:
        return _tokenize_kwise(rows, cfg, enc, firsts) if cfg.kwise else _tokenize_pairs(rows, cfg, enc, firsts)
    return _tokenize_prompts(rows, cfg, enc, firsts)


def _drop(stats: Counter, firsts: dict[str, Row], reason: str, row: Row) -> None:
    stats[reason] += 1
    firsts.setdefault(reason, row)


def _tokenize_sft(rows, cfg, enc, firsts):
    cols: dict[str, list] = {"input_ids": [], "labels": []}
    stats: Counter = Counter()
    for chunk in _chunks(rows):
        for row in chunk:
            if not row.chosen:
                _drop(stats, firsts, "dropped_prompt_only", row)  # a step-3 prompt: no answer to imitate
        chunk = [r for r in chunk if r.chosen]
        if not chunk:
            continue
        for row, (ids, n_prompt) in zip(chunk, enc.answer_ids([r.prompt for r in chunk], [r.chosen for r in chunk])):
            stats["truncated"] += len(ids) > cfg.max_seq_len
            ids = ids[:cfg.max_seq_len]
            if n_prompt >= len(ids) and not cfg.train_on_prompt:
                _drop(stats, firsts, "dropped_prompt_fills_max_seq_len", row)  # no answer token left to learn from
                continue
            labels = list(ids) if cfg.train_on_prompt else [IGNORE_INDEX] * n_prompt + ids[n_prompt:]
            cols["input_ids"].append(ids)
            cols["labels"].append(labels)
    return cols, stats


def _tokenize_pairs(rows, cfg, enc, firsts):
    cols: dict[str, list] = {"chosen_input_ids": [], "rejected_input_ids": []}
    stats: Counter = Counter()
    for chunk in _chunks(rows):
        prompts = [r.prompt for r in chunk]
        chosen = enc.answer_ids(prompts, [r.chosen for r in chunk])
        rejected = enc.answer_ids(prompts, [r.rejected for r in chunk])
        for row, (c, _), (r, _) in zip(chunk, chosen, rejected):
            stats["truncated"] += len(c) > cfg.max_seq_len or len(r) > cfg.max_seq_len
            c, r = c[:cfg.max_seq_len], r[:cfg.max_seq_len]
            if c == r:  # the texts differ (identical pairs are refused in plan_phase_rows): truncation ate it
                _drop(stats, firsts, "dropped_identical_after_truncation", row)  # no preference signal left
                continue
            cols["chosen_input_ids"].append(c)
            cols["rejected_input_ids"].append(r)
    return cols, stats


def _ranking(row: Row, k: int) -> tuple[str, ...]:
    answers = row.answers or (row.chosen, row.rejected)
    if k and len(answers) < k:
        file, rowno = row.source or (None, None)
        raise DataError(f"--kwise_k {k} needs {k} ranked answers, this row has {len(answers)}", file=file, row=rowno,
                        field="answers")
    return answers[:k] if k else answers


def _tokenize_kwise(rows, cfg, enc, firsts):
    k = cfg.kwise_k
    if not k and rows:
        sizes = Counter(len(r.answers or (0, 0)) for r in rows)
        if len(sizes) > 1:
            k0 = len(rows[0].answers or (0, 0))
            odd = next(r for r in rows if len(r.answers or (0, 0)) != k0)
            file, rowno = odd.source or (None, None)
            raise DataError(f"k-wise rows have different numbers of answers {dict(sizes)}; set --kwise_k K to use "
                            f"each ranking's top K", file=file, row=rowno, field="answers")
        k = next(iter(sizes))
    cols: dict[str, list] = {"input_ids_list": []}
    stats: Counter = Counter()
    for row in rows:
        answers = _ranking(row, k)
        stats["rankings_cut_to_k"] += len(row.answers or ()) > k
        if len(set(answers)) < len(answers):
            _drop(stats, firsts, "dropped_identical_answers", row)  # a tie cannot be ranked
            continue
        seqs = [ids[:cfg.max_seq_len] for ids, _ in enc.answer_ids([row.prompt] * len(answers), list(answers))]
        if len({tuple(s) for s in seqs}) < len(seqs):
            _drop(stats, firsts, "dropped_identical_after_truncation", row)
            continue
        cols["input_ids_list"].append(seqs)
    stats["k"] = k
    return cols, stats


def _tokenize_prompts(rows, cfg, enc, firsts):
    # prompt/meta: the row's own prompt text and metadata, for reward and eval functions (--reward_fn)
    cols: dict[str, list] = {"prompt_input_ids": [], "prompt": [], "meta": []}
    stats: Counter = Counter()
    for chunk in _chunks(rows):
        for row, ids in zip(chunk, enc.prompt_ids([r.prompt for r in chunk])):
            if len(ids) > cfg.max_prompt_seq_len:
                _drop(stats, firsts, "dropped_prompt_too_long", row)
                continue
            cols["prompt_input_ids"].append(ids)
            cols["prompt"].append(row.prompt)
            cols["meta"].append(json.dumps(row.meta or {}, sort_keys=True, ensure_ascii=False))
    return cols, stats

# ---------------------------------------------------------------------------------------------------------------
# Datasets


class PhaseDataset(torch.utils.data.Dataset):
    """Tokenized items of one phase split, read from the Arrow cache; items are unpadded LongTensors.

    ``info`` holds the build record: row counts, dropped/skipped counts, cache dir, cache_hit.
    """

    def __init__(self, table: Any, phase: int, info: dict[str, Any]):
        self.table, self.phase, self.info = table, phase, info

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.table[int(i)]
        return {k: v if k in _TEXT_COLUMNS else [torch.tensor(s, dtype=torch.long) for s in v]
                if k == "input_ids_list" else torch.tensor(v, dtype=torch.long) for k, v in item.items()}


_TEXT_COLUMNS = ("prompt", "meta")  # phase 3: the row's prompt text and its metadata (JSON)


def _features(phase: int, kwise: bool):
    import datasets  # lazy: datasets

    seq = datasets.List(datasets.Value("int32"))
    if phase == 1:
        return datasets.Features({"input_ids": seq, "labels": seq})
    if phase == 3:
        return datasets.Features({"prompt_input_ids": seq, "prompt": datasets.Value("string"),
                                  "meta": datasets.Value("string")})
    return datasets.Features({"input_ids_list": datasets.List(seq)} if kwise else
                             {"chosen_input_ids": seq, "rejected_input_ids": seq})


def tokenizer_identity(tokenizer: Any) -> dict[str, Any]:
    """What makes two tokenizers produce the same ids: the full backend definition (vocab, merges, normalizer,
    added tokens) when available, else the vocabulary; plus the special tokens and a probe encoding."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        body = backend.to_str()
    else:
        body = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    probe = tokenizer(" Human: Héllo 你好 (1) Assistant: ok")["input_ids"]
    digest = hashlib.sha256(body.encode("utf-8", "surrogatepass")).hexdigest()
    return {"class": type(tokenizer).__name__, "hash": digest,
            "eos": [tokenizer.eos_token, tokenizer.eos_token_id], "pad": [tokenizer.pad_token, tokenizer.pad_token_id],
            "bos": [tokenizer.bos_token, tokenizer.bos_token_id], "probe": list(probe)}


def chat_format(cfg: DataConfig, tokenizer: Any) -> ChatFormat:
    """--template resolved against the tokenizer (``auto``: its chat template when it has one)."""
    try:
        return resolve_format(cfg.template, tokenizer)
    except ValueError as e:
        raise DataError(str(e)) from None


def cache_key(phase: int, cfg: DataConfig, tokenizer: Any) -> str:
    """Hash of every input that changes phase ``phase``'s items (only those: step 3's cache survives a new
    max_seq_len)."""
    fmt = chat_format(cfg, tokenizer)
    key: dict[str, Any] = {
        "version": CACHE_VERSION, "phase": phase, "data_split": parse_data_split(cfg.data_split), "seed": cfg.seed,
        "skip_bad_rows": cfg.skip_bad_rows, "tokenizer": tokenizer_identity(tokenizer),
        "template": [fmt.name, fmt.source],
        "data_path": [[e, fingerprint(e)] for e in cfg.data_path],
    }
    if phase == 1:
        key.update(sft_only=[[e, fingerprint(e)] for e in cfg.sft_only_data_path], max_seq_len=cfg.max_seq_len,
                   train_on_prompt=cfg.train_on_prompt)
    elif phase == 2:
        key.update(max_seq_len=cfg.max_seq_len, kwise=cfg.kwise, kwise_k=cfg.kwise_k if cfg.kwise else 0)
    else:
        key.update(max_prompt_seq_len=cfg.max_prompt_seq_len)
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def data_cache_root(cfg: DataConfig) -> Path:
    """--data_output_path, or by default a cache of this run's own: OUTPUT/data_cache (a shared /tmp dir would let
    another user plant data), per node when the ranks span several nodes; without an output dir (a bare DataConfig)
    a per-user cache."""
    if cfg.data_output_path:
        return Path(cfg.data_output_path)
    out = getattr(cfg, "output_dir", "")
    root = Path(out) / "data_cache" if out else Path.home() / ".cache" / "chatrlhf" / "data_cache"
    env = os.environ
    world = env.get("WORLD_SIZE", "")
    local = env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or ""  # torchrun / the deepspeed launcher
    nodes = env.get("CROSS_SIZE", "")
    if (world.isdigit() and local.isdigit() and int(world) > int(local)) or (nodes.isdigit() and int(nodes) > 1):
        root = root / f"node-{socket.gethostname()}"
    return root


def build_phase_datasets(phase: int, data_cfg: DataConfig, tokenizer: Any) -> tuple[PhaseDataset, PhaseDataset]:
    """(train, eval) datasets of ``phase`` (1 SFT, 2 reward, 3 PPO prompts), built once per node and cached."""
    _check_phase(phase)
    data_cfg.validate()
    cache_dir = data_cache_root(data_cfg) / f"phase{phase}_{cache_key(phase, data_cfg, tokenizer)[:24]}"
    hit = _build_once(cache_dir, data_cfg.reload, lambda out: _build(phase, data_cfg, tokenizer, out))
    meta = json.loads((cache_dir / "meta.json").read_text(encoding="utf-8"))
    info = {**meta, "cache_dir": str(cache_dir), "cache_hit": hit}
    train, evl = (PhaseDataset(_load_split(cache_dir, s, meta), phase, {**info, "split": s}) for s in ("train", "eval"))
    logger.info("phase %d data: %d train / %d eval items (%s)%s", phase, len(train), len(evl),
                "cache hit" if hit else "built", _describe_drops(meta))
    return train, evl


def _load_split(cache_dir: Path, split: str, meta: dict[str, Any]) -> Sequence[dict[str, Any]]:
    if meta[split]["rows"] == 0:
        return []
    import datasets  # lazy: datasets

    return datasets.load_from_disk(str(cache_dir / split))


def _describe_drops(meta: dict[str, Any]) -> str:
    counts = {k: v for s in ("train", "eval") for k, v in meta[s]["stats"].items() if v and k != "k"}
    counts.update({k: v for k, v in meta["stats"].items() if v})
    return "; " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())) if counts else ""


def _save_quietly(ds: Any, path: Path) -> None:
    import datasets as ds_tqdm  # lazy: datasets

    was_disabled = ds_tqdm.are_progress_bars_disabled()
    ds_tqdm.disable_progress_bars()  # one bar per split and phase is noise in training logs
    try:
        ds.save_to_disk(str(path))
    finally:
        if not was_disabled:
            ds_tqdm.enable_progress_bars()


def _build(phase: int, cfg: DataConfig, tokenizer: Any, out: Path) -> None:
    import datasets  # lazy: datasets

    enc = Encoder(tokenizer, chat_format(cfg, tokenizer))
    planned = plan_phase_rows(phase, cfg)
    meta: dict[str, Any] = {"phase": phase, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                            "data_path": list(cfg.data_path), "stats": dict(planned.stats),
                            "template": enc.fmt.record()}
    for split, rows in (("train", planned.train), ("eval", planned.eval)):
        firsts: dict[str, Row] = {}
        cols, stats = tokenize_phase(phase, rows, cfg, enc, firsts)
        n = len(next(iter(cols.values())))
        if split == "train" and n == 0:
            raise DataError(_empty_message(phase, len(rows), stats, planned, cfg, firsts))
        if split == "eval" and n == 0:
            logger.warning("phase %d: the eval split is empty (%d rows before filtering)", phase, len(rows))
        if n:  # datasets cannot reload a 0-row save (no shards); an empty split is just its meta entry
            _save_quietly(datasets.Dataset.from_dict(cols, features=_features(phase, cfg.kwise)), out / split)
        meta[split] = {"rows": n, "stats": dict(stats)}
    (out / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# Why rows were dropped -> what to do about it (the message names the cause, not a generic length hint).
_DROP_HINTS = {
    "dropped_prompt_fills_max_seq_len": "raise --max_seq_len: the prompt alone fills it, leaving no answer token",
    "dropped_identical_after_truncation": "raise --max_seq_len: chosen and rejected only differ after it",
    "dropped_identical_answers": "each ranking needs distinct answers",
    "dropped_prompt_too_long": "raise --max_prompt_seq_len",
    "dropped_prompt_only": "prompt-only rows feed step 3; give step 1 rows with answers",
}


def _empty_message(phase: int, n_rows: int, stats: Counter, planned: PhaseRows, cfg: DataConfig,
                   firsts: dict[str, Row] | None = None) -> str:
    data = ", ".join(cfg.data_path + (cfg.sft_only_data_path if phase == 1 else []))
    if n_rows == 0:
        skipped = sum(v for k, v in planned.stats.items() if k.startswith("skipped_"))
        if skipped:
            why = (f"all {skipped} usable-looking rows of {data} were skipped as bad (--skip_bad_rows); run "
                   f"`chatrlhf data inspect` on it without --skip_bad_rows to see the first one")
        elif planned.stats.get("sft_only_rows_ignored"):
            why = (f"its {planned.stats['sft_only_rows_ignored']} rows have no rejected answer (SFT-only data cannot "
                   "train a reward model)")
        else:
            why = f"--data_split {cfg.data_split} gives step {phase} no rows of {data}"
        return f"phase {phase}: no training data: {why}"
    counts = [(k, v) for k, v in stats.items() if v and k.startswith("dropped_")]
    reasons = ", ".join(f"{v} {k}" for k, v in counts)
    main = max(counts, key=lambda kv: kv[1])[0] if counts else ""
    first = (firsts or {}).get(main)
    where = f"; data {data}"
    if first is not None and first.source is not None:
        where = f"; first: {first.source[0]}, row {first.source[1]}"
    hint = _DROP_HINTS.get(main, "check the data with `chatrlhf data inspect`")
    return f"phase {phase}: all {n_rows} training rows were filtered out ({reasons}{where}); {hint}"

# ---------------------------------------------------------------------------------------------------------------
# Build once per node


def _dist_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive lock between processes on this node (separate launches that share the cache dir)."""

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build_once(cache_dir: Path, reload: bool, build: Callable[[Path], None]) -> bool:
    """Local rank 0 builds (under a file lock) while the other ranks wait; returns True on a cache hit.

    Ranks exchange the builder's error instead of a bare barrier, so a bad dataset stops every rank with the same
    message rather than leaving the others waiting forever.
    """
    distributed = _dist_initialized()
    hit, error, exc = True, None, None
    if not distributed or get_local_rank() == 0:
        try:
            with _file_lock(cache_dir.with_name(cache_dir.name + ".lock")):
                if reload or not (cache_dir / "meta.json").is_file():
                    with atomic_dir(cache_dir) as tmp:
                        build(tmp)
                    hit = False
        except Exception as e:  # re-raised below, after the other ranks have been told
            if not distributed:
                raise
            error, exc = f"{e}", e
    if distributed:
        errors: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(errors, error)
        if exc is not None:
            raise exc
        first = next((e for e in errors if e), None)
        if first:
            raise DataError(f"data preparation failed on another rank: {first}")
    if not (cache_dir / "meta.json").is_file():
        raise DataError(f"tokenized data cache {cache_dir} is missing after the build (is data_output_path "
                        "node-local and shared by the ranks of this node?)")
    return hit

# ---------------------------------------------------------------------------------------------------------------
# Collators


def _pad(seqs: Sequence[torch.Tensor], value: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack 1-D tensors into [N, max_len] padded with ``value``; also the attention mask (1 on real tokens)."""
    width = max(int(s.numel()) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        n = int(s.numel())
        sl = slice(width - n, width) if left else slice(0, n)
        out[i, sl] = s
        mask[i, sl] = 1
    return out, mask


def _check_pad(pad_token_id: Any) -> int:
    if pad_token_id is None:
        raise ModelError("the tokenizer has no pad token id; set one (e.g. pad = eos) before collating")
    return int(pad_token_id)


@dataclass
class SFTCollator:
    """Phase 1: right-pads input_ids (pad id) and labels (-100); adds attention_mask."""

    pad_token_id: int

    def __call__(self, items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        pad = _check_pad(self.pad_token_id)
        input_ids, mask = _pad([it["input_ids"] for it in items], pad)
        labels, _ = _pad([it["labels"] for it in items], IGNORE_INDEX)
        return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


@dataclass
class PairCollator:
    """Phase 2: pairs -> input_ids [2B, L] (all chosen, then all rejected); k-wise -> [B*k, L] grouped per example
    (example 0's k answers best to worst, then example 1's ...) and "k". Right-padded, with attention_mask."""

    pad_token_id: int

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        pad = _check_pad(self.pad_token_id)
        if "input_ids_list" in items[0]:
            ks = {len(it["input_ids_list"]) for it in items}
            if len(ks) != 1:
                raise ValueError(f"k-wise batch mixes rankings of different sizes {sorted(ks)}")
            seqs = [s for it in items for s in it["input_ids_list"]]
            input_ids, mask = _pad(seqs, pad)
            return {"input_ids": input_ids, "attention_mask": mask, "k": ks.pop()}
        seqs = [it["chosen_input_ids"] for it in items] + [it["rejected_input_ids"] for it in items]
        input_ids, mask = _pad(seqs, pad)
        return {"input_ids": input_ids, "attention_mask": mask}


@dataclass
class PromptCollator:
    """Phase 3: left-pads prompts so generation continues right after each one."""

    pad_token_id: int

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        ids, mask = _pad([it["prompt_input_ids"] for it in items], _check_pad(self.pad_token_id), left=True)
        out: dict[str, Any] = {"prompt_input_ids": ids, "prompt_attention_mask": mask}
        if any("prompt" in it for it in items):  # texts and metadata ride along for reward/eval functions
            out["prompt"] = [it.get("prompt", "") for it in items]
            out["meta"] = [json.loads(it.get("meta") or "{}") for it in items]
        return out
