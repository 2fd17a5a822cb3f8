"""Helpers shared by the data tests (a uniquely named module: every test folder has its own conftest)."""

from __future__ import annotations

import json
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures"


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def pair_rows(n: int, prefix: str = "q") -> list[dict]:
    """n local/jsonfile-style rows with distinct prompts."""
    return [{"prompt": f" Human: {prefix} {i} what is the answer? Assistant:", "chosen": f" good answer {i}",
             "rejected": f" bad {i}"} for i in range(n)]
