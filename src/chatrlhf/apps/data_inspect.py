"""``chatrlhf data inspect``: see what chatrlhf makes of a dataset before training on it.

    chatrlhf data inspect [--name NAME] PATH... [--json] [--tokenizer DIR [--trust_remote_code]] [--data_split 2,4,4]
                          [-n N]

Prints the adapter chosen for each PATH, train/eval row counts per phase and a few examples; with ``--tokenizer``
also token counts after filtering, token-length statistics and decoded examples (prompt part / answer part).
``--json`` prints one JSON object per mapped row instead: {"prompt", "chosen", "rejected", "split"} ("answers" too
for k-wise rows), split being "train" or "eval".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from chatrlhf.data.adapters import ADAPTERS, Row
from chatrlhf.data.phases import DataConfig, Encoder, plan_phase_rows, tokenize_phase
from chatrlhf.data.sources import open_source
from chatrlhf.errors import ModelError, UserError
from chatrlhf.models.loading import check_remote_code

USAGE = ("chatrlhf data inspect [--name NAME] PATH [PATH ...] [--json] [--tokenizer DIR] [--trust_remote_code] "
         "[--data_split S] [-n N]")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # one line naming the flag, not usage text and a SystemExit
        raise UserError(f"{' '.join(message.split())}; usage: {USAGE}")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="chatrlhf data inspect", usage=USAGE, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="dataset names: " + ", ".join(ADAPTERS))
    p.add_argument("paths", nargs="+", metavar="PATH", help="local file/dir, NAME=PATH, or a hub dataset name")
    p.add_argument("--name", default=None, help="read every PATH with this dataset adapter (like NAME=PATH)")
    p.add_argument("--json", action="store_true", help="print one JSON object per mapped row")
    p.add_argument("--tokenizer", default=None, metavar="DIR", help="tokenizer dir: adds token counts and stats")
    p.add_argument("--trust_remote_code", "--trust-remote-code", action="store_true",
                   help="run the Python code in the --tokenizer folder (a custom tokenizer class named by its "
                        "auto_map); it runs with your permissions: only for folders you trust")
    p.add_argument("--data_split", "--data-split", default="2,4,4", help="shares of steps 1,2,3 (default 2,4,4)")
    p.add_argument("--seed", type=int, default=1234, help="split seed (default 1234)")
    p.add_argument("--max_seq_len", "--max-seq-len", type=int, default=512, help="steps 1-2 token limit")
    p.add_argument("--max_prompt_seq_len", "--max-prompt-seq-len", type=int, default=256, help="step-3 prompt limit")
    p.add_argument("--kwise", action="store_true", help="count step 2 as k-wise rankings")
    p.add_argument("--skip_bad_rows", "--skip-bad-rows", action="store_true", help="skip bad rows instead of failing")
    p.add_argument("-n", type=int, default=None, help="examples to show (default 3; --json: all rows)")
    return p


def main(argv: list[str]) -> int:
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(f"usage: chatrlhf data <tool> [options]\n\ntools:\n  inspect  show how datasets are read, split and "
              f"tokenized\n\n{USAGE}")
        return 0
    if argv[0] != "inspect":
        raise UserError(f"unknown data tool {argv[0]!r}; available: inspect")
    args = _parser().parse_args(argv[1:])
    entries = [f"{args.name}={p}" for p in args.paths] if args.name else list(args.paths)
    cfg = DataConfig(data_path=entries, data_split=args.data_split, seed=args.seed, max_seq_len=args.max_seq_len,
                     max_prompt_seq_len=args.max_prompt_seq_len, kwise=args.kwise, skip_bad_rows=args.skip_bad_rows)
    cfg.validate()
    if args.json:
        _print_json(cfg, args.n)
    else:
        _print_summary(cfg, args.tokenizer, 3 if args.n is None else args.n, args.trust_remote_code)
    return 0


def row_to_json(row: Row) -> dict[str, Any]:
    out: dict[str, Any] = {"prompt": row.prompt, "chosen": row.chosen, "rejected": row.rejected, "split": row.split}
    if row.answers is not None:
        out["answers"] = list(row.answers)
    return out


def _print_json(cfg: DataConfig, limit: int | None) -> None:
    printed = 0
    for entry in cfg.data_path:
        train, evl, _ = open_source(entry).mapped(cfg.seed, cfg.skip_bad_rows)
        for row in train + evl:
            if row is None:
                continue
            if limit is not None and printed >= limit:
                return
            print(json.dumps(row_to_json(row), ensure_ascii=False))
            printed += 1


def _load_tokenizer(path: str, trust_remote_code: bool = False):
    """Only encode/decode and EOS are needed here: a local AutoTokenizer load, with the folder's own tokenizer code
    refused (one line naming --trust_remote_code) unless trusted."""

    from transformers import AutoTokenizer  # lazy: transformers

    try:
        if Path(path).is_dir():
            check_remote_code(path, trust_remote_code, which=("AutoTokenizer",))
        # trust_remote_code explicit: transformers' default (None) would ask on stdin
        return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except ModelError as e:
        raise UserError(f"--tokenizer {e}") from None
    except Exception as e:  # not a dir, no tokenizer files...: one line
        raise UserError(f"--tokenizer {path}: cannot load a tokenizer ({type(e).__name__}: {e})") from None


def _clip(text: str | None, width: int = 240) -> str:
    if text is None:
        return "None"
    return repr(text if len(text) <= width else text[:width] + "…")


def _print_summary(cfg: DataConfig, tokenizer_dir: str | None, n_examples: int,
                   trust_remote_code: bool = False) -> None:
    memo: dict = {}  # each source is read once for all three phases
    for entry in cfg.data_path:
        src = open_source(entry)
        memo[entry] = src.mapped(cfg.seed, cfg.skip_bad_rows)
        sizes = ", ".join(f"{name}={len(s)}" for name, s in src.splits.items())
        print(f"{entry}: adapter {src.adapter.name} ({sizes})")
    enc = Encoder(_load_tokenizer(tokenizer_dir, trust_remote_code)) if tokenizer_dir else None
    print(f"\nper phase (data_split {cfg.data_split}, seed {cfg.seed}):")
    for phase in (1, 2, 3):
        rows = plan_phase_rows(phase, cfg, memo)
        line = f"  phase {phase}: train {len(rows.train)} rows, eval {len(rows.eval)} rows"
        extra = {k: v for k, v in rows.stats.items() if v}
        print(line + (f"  {extra}" if extra else ""))
        if enc is not None:
            for split, split_rows in (("train", rows.train), ("eval", rows.eval)):
                print("    " + _token_stats(phase, split, split_rows, cfg, enc))
    examples = [r for train, evl, _ in memo.values() for r in train + evl if r is not None][:n_examples]
    print(f"\nexamples ({len(examples)} mapped rows):")
    for row in examples:
        print(f"- prompt:   {_clip(row.prompt)}\n  chosen:   {_clip(row.chosen)}\n  rejected: {_clip(row.rejected)}")
        if enc is not None:
            cols, _ = tokenize_phase(1, [row], cfg, enc)
            if cols["input_ids"]:
                ids, labels = cols["input_ids"][0], cols["labels"][0]
                n_prompt = sum(1 for x in labels if x == -100)
                print(f"  decoded:  [prompt] {_clip(enc.tok.decode(ids[:n_prompt]))} "
                      f"[answer] {_clip(enc.tok.decode(ids[n_prompt:]))}")


def _token_stats(phase: int, split: str, rows: list[Row], cfg: DataConfig, enc: Encoder) -> str:
    cols, stats = tokenize_phase(phase, rows, cfg, enc)
    seqs = [s for values in cols.values() for item in values for s in (item if phase == 2 and cfg.kwise else [item])]
    if phase == 1:
        seqs = cols["input_ids"]
    n_items = len(next(iter(cols.values())))
    lengths = [len(s) for s in seqs]
    dropped = {k: v for k, v in stats.items() if v and k != "k"}
    summary = f"{split}: {n_items} items"
    if lengths:
        summary += f", tokens mean {sum(lengths) / len(lengths):.1f} max {max(lengths)}"
    return summary + (f", {dropped}" if dropped else "")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
