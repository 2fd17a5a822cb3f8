"""Bad input gives one clear DataError naming the file, the 1-based row and the field."""

from __future__ import annotations

import json
import logging

import pytest

from chatrlhf.cli import main as cli_main
from chatrlhf.data import DataConfig, build_phase_datasets, parse_data_split
from chatrlhf.data.sources import open_source
from chatrlhf.errors import DataError

from data_helpers import FIXTURES, pair_rows, write_jsonl

GOOD = {"prompt": "Name a fruit.", "chosen": "Apple.", "rejected": "Chair."}


def error_of(entry: str) -> str:
    with pytest.raises(DataError) as info:
        open_source(entry).mapped(seed=1234)
    return str(info.value)


def bad_row_file(tmp_path, bad: dict, name="rows.jsonl") -> str:
    return str(write_jsonl(tmp_path / name, [GOOD, GOOD, bad, GOOD]))


@pytest.mark.parametrize("bad,field,text", [
    ({"prompt": "Q", "rejected": "no"}, "chosen", "is missing"),
    ({"prompt": "Q", "chosen": 42, "rejected": "no"}, "chosen", "must be a string, got int"),
    ({"prompt": "Q", "chosen": ["a", "b"], "rejected": "no"}, "chosen", "must be a string, got list"),
    ({"prompt": "   ", "chosen": "yes", "rejected": "no"}, "prompt", "is empty"),
    ({"prompt": "Q", "chosen": "yes", "rejected": None}, "rejected", "is missing (null)"),
])
def test_bad_field_names_file_row_and_field(tmp_path, bad, field, text):
    path = bad_row_file(tmp_path, bad)
    msg = error_of(f"Dahoas/synthetic-instruct-gptj-pairwise={path}")
    assert "rows.jsonl" in msg and "row 3" in msg and f"field {field!r}" in msg and text in msg


def test_nested_field_missing(tmp_path):
    raw = json.loads((FIXTURES / "webgpt.jsonl").read_text(encoding="utf-8").splitlines()[0])
    del raw["question"]["full_text"]
    msg = error_of(str(write_jsonl(tmp_path / "w.jsonl", [raw])))
    assert "w.jsonl, row 1, field 'question.full_text': is missing" in msg


def test_webgpt_score_and_shp_label_types(tmp_path):
    raw = json.loads((FIXTURES / "webgpt.jsonl").read_text(encoding="utf-8").splitlines()[0])
    raw["score_1"] = "high"
    assert "field 'score_1': must be a number" in error_of(str(write_jsonl(tmp_path / "w.jsonl", [raw])))
    shp = json.loads((FIXTURES / "shp.jsonl").read_text(encoding="utf-8").splitlines()[0])
    shp["labels"] = 2
    assert "field 'labels': must be 0 or 1, got 2" in error_of(str(write_jsonl(tmp_path / "s.jsonl", [shp])))


def test_non_utf8_bytes_in_jsonl_and_json(tmp_path):
    lines = [json.dumps(GOOD), json.dumps(GOOD).replace("Apple.", "Appl\\u00e9"), json.dumps(GOOD)]
    raw = "\n".join(lines).encode("utf-8").replace(b"\\u00e9", b"\xe9")  # a Latin-1 byte in a UTF-8 file
    (tmp_path / "latin.jsonl").write_bytes(raw)
    msg = error_of(str(tmp_path / "latin.jsonl"))
    assert "latin.jsonl, row 2, field 'chosen'" in msg and "not valid UTF-8" in msg
    listing = json.dumps([GOOD, GOOD, {**GOOD, "rejected": "Ch\\u00e9ir"}]).encode().replace(b"\\\\u00e9", b"\xff")
    (tmp_path / "latin.json").write_bytes(listing)
    msg = error_of(str(tmp_path / "latin.json"))
    assert "latin.json, row 3, field 'rejected'" in msg and "not valid UTF-8" in msg


def test_malformed_json_line_and_file(tmp_path):
    (tmp_path / "broken.jsonl").write_text(json.dumps(GOOD) + "\n\n" + '{"prompt": "x", "chosen": }\n', encoding="utf-8")
    msg = error_of(str(tmp_path / "broken.jsonl"))
    assert "broken.jsonl, row 3" in msg and "malformed JSON line" in msg
    (tmp_path / "broken.json").write_text('[{"prompt": "x",', encoding="utf-8")
    msg = error_of(str(tmp_path / "broken.json"))
    assert "broken.json" in msg and "malformed JSON" in msg and "line 1" in msg
    (tmp_path / "obj.json").write_text('{"prompt": "x"}', encoding="utf-8")
    assert "expected a JSON list of objects" in error_of(str(tmp_path / "obj.json"))
    write_jsonl(tmp_path / "lists.jsonl", [GOOD, ["not", "an", "object"]])
    assert "lists.jsonl, row 2: expected a JSON object, got list" in error_of(str(tmp_path / "lists.jsonl"))


def test_missing_and_unreadable_files(tmp_path):
    msg = error_of(str(tmp_path / "nowhere.jsonl"))
    assert "nowhere.jsonl" in msg and "no such file" in msg
    (tmp_path / "garbage.parquet").write_bytes(b"this is not parquet")
    msg = error_of(str(tmp_path / "garbage.parquet"))
    assert "garbage.parquet" in msg and "cannot read parquet" in msg
    (tmp_path / "empty_dir").mkdir()
    assert "holds no" in error_of(str(tmp_path / "empty_dir"))
    (tmp_path / "empty.jsonl").write_text("", encoding="utf-8")
    assert "empty.jsonl: dataset has no rows" in error_of(str(tmp_path / "empty.jsonl"))


def test_unknown_names():
    msg = error_of("Nobody/such-dataset")
    assert "unknown dataset name 'Nobody/such-dataset'" in msg and "Dahoas/rm-static" in msg and "mkqa-Japanese" in msg
    msg = error_of(f"Nobody/such={FIXTURES / 'rm_static.jsonl'}")
    assert "unknown dataset name 'Nobody/such' in NAME=PATH" in msg and "stanfordnlp/SHP" in msg


def test_columns_matching_no_adapter(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"instruction": "x", "output": "y"}])
    msg = error_of(str(path))
    assert "odd.jsonl" in msg and "['instruction', 'output'] match no dataset adapter" in msg
    assert "stanfordnlp/SHP: history, human_ref_A, human_ref_B, labels" in msg and "NAME=PATH" in msg


def test_ambiguous_columns_need_an_explicit_name(tmp_path):
    neutral = tmp_path / "qa.jsonl"
    neutral.write_bytes((FIXTURES / "mkqa.jsonl").read_bytes())
    msg = error_of(str(neutral))
    assert "mkqa-Chinese" in msg and "mkqa-Japanese" in msg and f"mkqa-Chinese={neutral}" in msg
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"prompt": " Human: a Assistant:", "chosen": " x", "rejected": " y"},
                                                  {"prompt": "plain question", "chosen": "x", "rejected": "y"}])
    msg = error_of(str(mixed))
    assert "mixed.jsonl, row 2, field 'prompt'" in msg and "end with 'Assistant:'" in msg


def test_kwise_ranking_with_fewer_than_two_answers(tmp_path):
    path = write_jsonl(tmp_path / "k.jsonl", [{"prompt": " Human: a Assistant:", "answers": [" x", " y"]},
                                              {"prompt": " Human: b Assistant:", "answers": [" only one"]}])
    msg = error_of(str(path))
    assert "k.jsonl, row 2, field 'answers'" in msg and "at least 2 answers, got 1" in msg


def test_kwise_rankings_of_different_sizes(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "k.jsonl", [{"prompt": " Human: a Assistant:", "answers": [" x", " y", " z"]},
                                              {"prompt": " Human: b Assistant:", "answers": [" u", " v"]}])
    cfg = DataConfig(data_path=[str(path)], data_split="0,1,0", kwise=True, data_output_path=str(tmp_path / "c"))
    with pytest.raises(DataError, match=r"k.jsonl, row \d, field 'answers'.*different numbers of answers.*--kwise_k"):
        build_phase_datasets(2, cfg, tokenizer)
    cfg.kwise_k = 3
    with pytest.raises(DataError, match=r"k.jsonl, row 2, field 'answers': --kwise_k 3 needs 3 ranked answers"):
        build_phase_datasets(2, cfg, tokenizer)


@pytest.mark.parametrize("split,text", [
    ("2,x,4", "expected three comma-separated numbers"),
    ("5,5", "expected 3 shares"),
    ("2,-1,4", "non-negative"),
    ("0,0,0", "sum to 0"),
])
def test_bad_data_split(split, text):
    with pytest.raises(DataError, match=text) as info:
        parse_data_split(split)
    assert "--data_split" in str(info.value)
    with pytest.raises(DataError, match=text):
        DataConfig(data_split=split).validate()


def test_everything_filtered_out(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f" Human: what is {i} Assistant:", "chosen": " a",
                                               "rejected": " b"} for i in range(5)])
    cfg = DataConfig(data_path=[str(path)], data_split="0,0,1", max_prompt_seq_len=2,
                     data_output_path=str(tmp_path / "c"))
    with pytest.raises(DataError, match=r"phase 3: all \d training rows were filtered out .*dropped_prompt_too_long"
                                        r".*--max_prompt_seq_len"):
        build_phase_datasets(3, cfg, tokenizer)
    assert not list((tmp_path / "c").glob("phase3_*/meta.json"))  # nothing half-built left as a cache


def test_sft_only_data_cannot_train_a_reward_model(tmp_path, tokenizer):
    cfg = DataConfig(data_path=[str(FIXTURES / "zhihu_kol.jsonl")], data_split="0,1,0",
                     data_output_path=str(tmp_path / "c"))
    with pytest.raises(DataError, match="no rejected answer"):
        build_phase_datasets(2, cfg, tokenizer)


def test_skip_bad_rows_counts_and_logs(tmp_path, tokenizer, caplog):
    rows = pair_rows(10)
    rows[3]["chosen"] = 7
    del rows[6]["prompt"]
    path = write_jsonl(tmp_path / "r.jsonl", rows)
    cfg = DataConfig(data_path=[str(path)], data_split="1,0,0", data_output_path=str(tmp_path / "c"))
    with pytest.raises(DataError, match="row 4, field 'chosen'"):
        build_phase_datasets(1, cfg, tokenizer)
    cfg.skip_bad_rows = True
    with caplog.at_level(logging.WARNING, logger="chatrlhf"):
        train, evl = build_phase_datasets(1, cfg, tokenizer)
    assert len(train) + len(evl) == 8 and train.info["stats"]["skipped_bad_rows"] == 2
    assert "skipped 2 bad row(s)" in caplog.text


def test_cli_prints_one_line_and_exits_2(tmp_path, capsys):
    path = bad_row_file(tmp_path, {"prompt": "Q", "chosen": 3.5, "rejected": "no"})
    assert cli_main(["data", "inspect", "--json", path]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "rows.jsonl, row 3, field 'chosen': must be a string, got float" in err
    assert "Traceback" not in err
