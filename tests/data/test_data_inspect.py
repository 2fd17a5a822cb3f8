"""`chatrlhf data inspect` through the real CLI entry point."""

from __future__ import annotations

import json


from chatrlhf.cli import main as cli_main

from data_helpers import FIXTURES


def test_inspect_json_prints_one_object_per_mapped_row(capsys):
    assert cli_main(["data", "inspect", "--json", str(FIXTURES / "local_jsonfile")]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows == [
        {"prompt": " Human: Say hi. Assistant:", "chosen": " Hi!", "rejected": " No.", "split": "train"},
        {"prompt": " Human: Add 1 and 1. Assistant:", "chosen": " 2", "rejected": " 3", "split": "train"},
        {"prompt": " Human: Say bye. Assistant:", "chosen": " Bye!", "rejected": " Hi.", "split": "eval"},
    ]


def test_inspect_json_with_name_and_limit(capsys):
    assert cli_main(["data", "inspect", "--name", "mkqa-Japanese", "--json", str(FIXTURES / "mkqa.jsonl")]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row == {"prompt": " Human: ハムレットを書いたのは誰 Assistant:", "chosen": " ウィリアム・シェイクスピア",
                   "rejected": None, "split": "train"}
    assert cli_main(["data", "inspect", "--json", "-n", "2", str(FIXTURES / "webgpt.jsonl")]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_inspect_summary_counts_per_phase(capsys, tmp_path):
    rows = [{"prompt": f"question {i}", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(50)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert cli_main(["data", "inspect", str(tmp_path / "p.jsonl"), "--data_split", "2,4,4", "-n", "1"]) == 0
    out = capsys.readouterr().out
    assert "adapter Dahoas/synthetic-instruct-gptj-pairwise (train=50)" in out
    # 45 train / 5 eval rows (9:1), then 2:4:4 of each
    assert "phase 1: train 9 rows, eval 1 rows" in out
    assert "phase 2: train 18 rows, eval 2 rows" in out
    assert "phase 3: train 18 rows, eval 2 rows" in out
    assert out.count("- prompt:") == 1 and "' Human: question" in out


def test_inspect_with_tokenizer_shows_token_stats(capsys, tmp_path, tokenizer):
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    assert cli_main(["data", "inspect", str(FIXTURES / "local_jsonfile"), "--data_split", "1,1,1",
                     "--tokenizer", str(tmp_path / "tok")]) == 0
    out = capsys.readouterr().out
    assert "tokens mean" in out and "decoded:  [prompt] ' Human:" in out and "<|endoftext|>" in out


def test_inspect_help(capsys):
    assert cli_main(["data", "--help"]) == 0
    assert "inspect" in capsys.readouterr().out
    assert cli_main(["data", "inspect", "--help"]) == 0  # argparse's --help exit, returned as the exit code
    out = capsys.readouterr().out
    assert "--json" in out and "--tokenizer" in out and "Dahoas/rm-static" in out


def test_inspect_unknown_tool(capsys):
    assert cli_main(["data", "frobnicate"]) == 2
    assert "unknown data tool 'frobnicate'" in capsys.readouterr().err
