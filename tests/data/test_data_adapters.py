"""Every dataset name maps its schema to exactly DeepSpeed-Chat's strings; splits are deterministic."""

from __future__ import annotations

import pytest

from chatrlhf.data import ADAPTERS, Row, format_prompt
from chatrlhf.data.adapters import split_indices, train_eval_indices
from chatrlhf.data.sources import open_source, read_local

from data_helpers import FIXTURES, write_jsonl

# (name, fixture, row index, expected prompt, chosen, rejected)
CASES = [
    ("Dahoas/rm-static", "rm_static.jsonl", 0,
     "\n\nHuman: What is two plus two?\n\nAssistant:", " It is four.", " It is five."),
    ("Dahoas/full-hh-rlhf", "full_hh.jsonl", 0,
     "\n\nHuman: Can you help me cook rice?\n\nAssistant:", " Sure, rinse it first.", " No."),
    ("Dahoas/synthetic-instruct-gptj-pairwise", "gptj_pairwise.jsonl", 0,
     " Human: Name a fruit. Assistant:", " An apple is a fruit.", " A chair."),
    ("yitingxie/rlhf-reward-datasets", "yitingxie.jsonl", 0,
     "\n\nHuman: Hi, how are you?\n\nAssistant:", " I am fine, thanks.", " Go away."),
    ("openai/webgpt_comparisons", "webgpt.jsonl", 0,
     " Human: Why is the sky blue? Assistant:", " Because of Rayleigh scattering of light.", " It reflects the sea."),
    ("openai/webgpt_comparisons", "webgpt.jsonl", 1,  # answer_1 scores higher; adjacent marks [1][2] both go
     " Human: Why do cats purr? Assistant:", " To communicate and heal.", " Nobody knows."),
    ("openai/webgpt_comparisons", "webgpt.jsonl", 2,  # tie -> answer_0
     " Human: Is it a tie? Assistant:", " First answer.", " Second answer."),
    ("stanfordnlp/SHP", "shp.jsonl", 0,
     " Human: Is water wet? Assistant:", " Water makes things wet.", " No idea."),
    ("stanfordnlp/SHP", "shp.jsonl", 1,  # labels == 0: B preferred
     " Human: Why is ice slippery? Assistant:", " A thin layer of liquid water.", " Magic."),
    ("pvduy/sharegpt_alpaca_oa_vicuna_format", "sharegpt.jsonl", 1,
     "Human: Hi Assistant: Hello! Human: Count to three. Assistant:", " One, two, three.", None),
    ("local/jsonfile", "local_jsonfile/data/train.json", 0, " Human: Say hi. Assistant:", " Hi!", " No."),
    ("wangrui6/Zhihu-KOL", "zhihu_kol.jsonl", 0, " Human: 如何学习编程？ Assistant:", " 多写代码，多读代码。", None),
    ("Cohere/miracl-zh-queries-22-12", "miracl_zh.jsonl", 0,
     " Human: 天空为什么是蓝色的？ Assistant:", " 因为瑞利散射。", " 因为海洋是蓝色的。"),
    ("Hello-SimpleAI/HC3-Chinese", "hc3_chinese.jsonl", 0, " Human: 什么是猫？ Assistant:", " 猫是一种小型哺乳动物。", None),
    ("mkqa-Chinese", "mkqa.jsonl", 0, " Human: 谁写了哈姆雷特 Assistant:", " 威廉·莎士比亚", None),
    ("mkqa-Japanese", "mkqa.jsonl", 0, " Human: ハムレットを書いたのは誰 Assistant:", " ウィリアム・シェイクスピア", None),
    ("Cohere/miracl-ja-queries-22-12", "miracl_ja.jsonl", 0, " Human: 日本の首都は？ Assistant:", " 東京です。", " 大阪です。"),
    ("Cohere/miracl-ja-queries-22-12", "miracl_ja.jsonl", 1,  # no negatives -> SFT-only row
     " Human: 富士山の高さは？ Assistant:", " 3776メートル。", None),
    ("lmqg/qg_jaquad", "qg_jaquad.jsonl", 0, " Human: 日本の首都はどこ？ Assistant:", " 日本の首都は東京である。", None),
    ("lmqg/qag_jaquad", "qag_jaquad.jsonl", 0, " Human: 日本一高い山は？ Assistant:", " 富士山は日本一高い山である。", None),
    ("prompts", "prompts.jsonl", 0,  # a plain request gets the template; no answers (step 3 only)
     " Human: Write a short paragraph about owls. Use only lowercase letters. Assistant:", "", None),
    ("prompts", "prompts.jsonl", 1, " Human: Name a colour. Assistant:", "", None),  # formatted: kept
]


def test_all_seventeen_names_are_registered():
    assert len(ADAPTERS) == 17
    assert {c[0] for c in CASES} == set(ADAPTERS)


@pytest.mark.parametrize("name,fixture,i,prompt,chosen,rejected", CASES, ids=[f"{c[0]}[{c[2]}]" for c in CASES])
def test_adapter_maps_exact_strings(name, fixture, i, prompt, chosen, rejected):
    raw = read_local(FIXTURES / fixture)["train"].rows[i]
    assert ADAPTERS[name].map(raw) == Row(prompt, chosen, rejected)


# Detection by columns: the file names carry no hint (copied to neutral names first).
DETECTED = [
    ("rm_static.jsonl", "Dahoas/rm-static"), ("full_hh.jsonl", "Dahoas/rm-static"),
    ("gptj_pairwise.jsonl", "Dahoas/synthetic-instruct-gptj-pairwise"),
    ("yitingxie.jsonl", "yitingxie/rlhf-reward-datasets"), ("webgpt.jsonl", "openai/webgpt_comparisons"),
    ("shp.jsonl", "stanfordnlp/SHP"), ("sharegpt.jsonl", "pvduy/sharegpt_alpaca_oa_vicuna_format"),
    ("zhihu_kol.jsonl", "wangrui6/Zhihu-KOL"), ("miracl_zh.jsonl", "Cohere/miracl-zh-queries-22-12"),
    ("miracl_ja.jsonl", "Cohere/miracl-zh-queries-22-12"), ("hc3_chinese.jsonl", "Hello-SimpleAI/HC3-Chinese"),
    ("qg_jaquad.jsonl", "lmqg/qg_jaquad"), ("qag_jaquad.jsonl", "lmqg/qag_jaquad"), ("kwise.jsonl", "local/jsonfile"),
]


@pytest.mark.parametrize("fixture,expected", DETECTED)
def test_adapter_detected_from_columns(tmp_path, fixture, expected):
    neutral = tmp_path / "data.jsonl"
    neutral.write_bytes((FIXTURES / fixture).read_bytes())
    assert open_source(str(neutral)).adapter.name == expected


def test_local_jsonfile_dir_uses_its_train_and_eval_files():
    src = open_source(str(FIXTURES / "local_jsonfile"))
    train, evl, skipped = src.mapped(seed=1234)
    assert src.adapter.name == "local/jsonfile" and skipped == 0
    assert [r.prompt for r in train] == [" Human: Say hi. Assistant:", " Human: Add 1 and 1. Assistant:"]
    assert [(r.prompt, r.chosen, r.rejected, r.split) for r in evl] == [(" Human: Say bye. Assistant:", " Bye!", " Hi.", "eval")]


def test_explicit_name_overrides_detection():
    src = open_source(f"mkqa-Japanese={FIXTURES / 'mkqa.jsonl'}")
    assert src.adapter.name == "mkqa-Japanese"
    src2 = open_source(str(FIXTURES / "mkqa.jsonl"), name="mkqa-Chinese")
    assert src2.adapter.name == "mkqa-Chinese"


def test_format_prompt_is_the_deepspeed_chat_template():
    assert format_prompt("Hi?") == " Human: Hi? Assistant:"


def test_adapters_know_their_splits():
    evals = {n: a.eval_split for n, a in ADAPTERS.items()}
    assert evals["Dahoas/rm-static"] == "test" and evals["stanfordnlp/SHP"] == "validation"
    assert evals["Cohere/miracl-ja-queries-22-12"] == "dev" and evals["local/jsonfile"] == "eval"
    for carved in ("Dahoas/synthetic-instruct-gptj-pairwise", "openai/webgpt_comparisons", "wangrui6/Zhihu-KOL",
                   "Hello-SimpleAI/HC3-Chinese", "mkqa-Chinese", "mkqa-Japanese"):
        assert evals[carved] is None, carved


def _gptj_rows(n):
    return [{"prompt": f"question {i}", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(n)]


def test_nine_to_one_split_is_deterministic_disjoint_and_ten_percent(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", _gptj_rows(200))
    a_train, a_eval, _ = open_source(str(path)).mapped(seed=1234)
    b_train, b_eval, _ = open_source(str(path)).mapped(seed=1234)
    assert a_train == b_train and a_eval == b_eval
    train_p, eval_p = {r.prompt for r in a_train}, {r.prompt for r in a_eval}
    assert len(eval_p) == 20 and len(train_p) == 180 and not train_p & eval_p
    assert {r.split for r in a_eval} == {"eval"} and {r.split for r in a_train} == {"train"}
    _, other_eval, _ = open_source(str(path)).mapped(seed=7)
    assert {r.prompt for r in other_eval} != eval_p


def test_split_indices_are_pinned_across_machines():
    # numpy's legacy RandomState stream and sha256-derived seeds are platform independent: pin the values.
    train, evl = train_eval_indices(20, 1234)
    assert sorted(evl.tolist()) == [1, 18] and len(train) == 18
    shares = [s.tolist() for s in split_indices(10, [2, 4, 4], 1234, "phase_split:train")]
    assert shares == [[3, 0], [7, 8, 1, 9], [6, 5, 2, 4]]


def test_hub_like_dir_with_named_split_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = read_local(FIXTURES / "shp.jsonl")["train"].rows
    (tmp_path / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data" / "train-00000-of-00001.parquet")
    write_jsonl(tmp_path / "data" / "validation-00000.jsonl", rows[:1])
    src = open_source(str(tmp_path))
    train, evl, _ = src.mapped(seed=1)
    assert src.adapter.name == "stanfordnlp/SHP"
    assert [r.chosen for r in train] == [" Water makes things wet.", " A thin layer of liquid water."]
    assert [r.chosen for r in evl] == [" Water makes things wet."]
    assert train[1].source[0].endswith("train-00000-of-00001.parquet") and train[1].source[1] == 2


def test_save_to_disk_dirs(tmp_path):
    import datasets

    rows = read_local(FIXTURES / "rm_static.jsonl")["train"].rows
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                               "test": datasets.Dataset.from_list(rows[1:])})
    dd.save_to_disk(str(tmp_path / "dd"))
    train, evl, _ = open_source(str(tmp_path / "dd")).mapped(seed=1)
    assert [r.chosen for r in train] == [" It is four.", " Blue."] and [r.chosen for r in evl] == [" Blue."]

    datasets.Dataset.from_list(_gptj_rows(10)).save_to_disk(str(tmp_path / "single"))
    src = open_source(str(tmp_path / "single"))
    train, evl, _ = src.mapped(seed=1)
    assert src.adapter.name == "Dahoas/synthetic-instruct-gptj-pairwise" and len(train) + len(evl) == 10
    assert len(evl) == 1


def test_json_file_with_json_lines_and_plain_list(tmp_path):
    lines = write_jsonl(tmp_path / "lines.json", _gptj_rows(3))
    listed = tmp_path / "list.json"
    import json

    listed.write_text(json.dumps(_gptj_rows(3)), encoding="utf-8")
    a = open_source(str(lines)).mapped(seed=3)
    b = open_source(str(listed)).mapped(seed=3)
    assert a[0] == b[0] and a[1] == b[1] and len(a[0]) + len(a[1]) == 3


def test_column_wise_nested_lists_from_datasets_features():
    # A datasets Sequence({...}) feature yields {"text": [...], ...} instead of a list of dicts.
    raw = {"query": "q?", "positive_passages": {"docid": ["d1"], "text": ["yes"], "title": ["t"]},
           "negative_passages": {"docid": [], "text": [], "title": []}}
    row = ADAPTERS["Cohere/miracl-ja-queries-22-12"].map(raw)
    assert row == Row(" Human: q? Assistant:", " yes", None)


def test_local_dir_reads_only_data_subdir_when_it_holds_splits(tmp_path):
    # DeepSpeed-Chat's local/jsonfile layout next to other files (as the built-in task writes it): only data/ counts.
    import json

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.json").write_text(json.dumps([{"prompt": " Human: a Assistant:", "chosen": " x",
                                                               "rejected": ""}]), encoding="utf-8")
    (tmp_path / "data" / "eval.json").write_text(json.dumps([{"prompt": " Human: b Assistant:", "chosen": " y",
                                                              "rejected": " z"}]), encoding="utf-8")
    write_jsonl(tmp_path / "heldout.jsonl", [{"prompt": "not training data"}])
    write_jsonl(tmp_path / "sft" / "data" / "train.json", [{"prompt": " Human: c Assistant:", "chosen": " w"}])
    train, evl, _ = open_source(str(tmp_path)).mapped(seed=1)
    # an empty rejected answer is a legitimate "said nothing" negative; an empty chosen one is an error
    assert [(r.prompt, r.rejected) for r in train] == [(" Human: a Assistant:", "")]
    assert [r.prompt for r in evl] == [" Human: b Assistant:"]
