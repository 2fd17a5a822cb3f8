"""The built-in task: gold scorer verdicts, dataset files, determinism, noise, disjoint held-out prompts."""

import json

import pytest

from chatrlhf.errors import DataError, UserError
from chatrlhf.tasks.builtin import (
    PAIR_MARGIN,
    classify_answer,
    expected_answer,
    task_prompt,
    gold_pass,
    gold_score,
    gold_summary,
    gold_win_rate,
    parse_question,
    read_heldout,
    task_corpus,
    write_task_dataset,
)

Q = "Reverse the word: cat"
HAND_WRITTEN = {
    "correct": " tac",
    "correct_no_space": "tac",
    "one_filler": " tac.",
    "ramble": " tac I hope this helps. Have a nice day.",
    "fake_turn": " tac Human: What comes after 5? Assistant: 6",
    "never_stop": " tac" * 30,
    "wrong_close": " tca",
    "wrong_far": " dog",
    "wrong_case": " TAC",
    "wrong_rambling": " dog I hope this helps. Have a nice day.",
    "empty": "",
    "blank": "   ",
}


def test_expected_answers_for_every_template():
    assert expected_answer(Q) == " tac"
    assert expected_answer("Uppercase: dog") == " DOG"
    assert expected_answer("Add 3 and 4.") == " 7"
    assert expected_answer("What is 9 plus 8?") == " 17"
    assert expected_answer("What comes after 5?") == " 6"
    assert expected_answer("What number precedes 10?") == " 9"
    assert expected_answer("Repeat owl 3 times.") == " owl owl owl"
    assert parse_question(task_prompt("Say pig 2 times.")) == ("repeat", {"w": "pig", "k": "2"})


def test_gold_verdicts_on_hand_written_answers():
    s = {k: gold_score(Q, a) for k, a in HAND_WRITTEN.items()}
    assert s["correct"] == 1.0 and s["correct_no_space"] == 1.0
    assert gold_pass(Q, HAND_WRITTEN["correct"]) and not gold_pass(Q, HAND_WRITTEN["one_filler"])
    for k in ("one_filler", "ramble", "fake_turn", "never_stop"):
        assert 0.3 < s[k] < 0.9, (k, s[k])  # correct but not clean: partial credit
        assert not gold_pass(Q, HAND_WRITTEN[k])
    for k in ("wrong_close", "wrong_far", "wrong_case", "wrong_rambling"):
        assert 0.0 < s[k] < 0.25, (k, s[k])
    assert s["empty"] == 0.0 and s["blank"] == 0.0
    # the ranking the reward model should learn
    assert s["correct"] > s["one_filler"] > s["ramble"] > s["never_stop"] > s["wrong_close"] > s["wrong_far"] > s["empty"]
    assert s["wrong_far"] > s["wrong_rambling"]
    # a fake next turn costs more than the same amount of plain filler
    assert gold_score(Q, " tac Human: What comes after 5?") < gold_score(Q, " tac Thank you for asking me this?")


def test_gold_score_accepts_formatted_and_multi_turn_prompts():
    ans = " 7 I hope this helps."
    assert gold_score(task_prompt("Add 3 and 4."), ans) == gold_score("Add 3 and 4.", ans)
    multi = task_prompt("Uppercase: dog") + " DOG" + task_prompt("Add 3 and 4.")
    assert gold_pass(multi, " 7") and not gold_pass(multi, " DOG")
    assert gold_score("What comes after 5?", " 7") > gold_score("What comes after 5?", " 9")  # numeric closeness


def test_unknown_question_is_a_data_error():
    with pytest.raises(DataError, match="not a built-in task question"):
        gold_score("Tell me a joke", " no")


def test_classify_answer():
    assert [classify_answer(Q, HAND_WRITTEN[k]) for k in ("correct", "ramble", "fake_turn", "never_stop", "wrong_far", "empty")] \
        == ["clean", "ramble", "fake_turn", "never_stop", "wrong", "empty"]


def test_win_rate_and_summary():
    assert gold_win_rate([1.0, 0.5, 0.2, 0.0], [0.5, 0.5, 0.3, 0.0]) == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)
    with pytest.raises(UserError, match="equally long"):
        gold_win_rate([1.0], [1.0, 0.0])
    s = gold_summary([Q, Q, Q, Q], [" tac", " tac", " dog", ""])
    assert s["gold_pass"] == 0.5 and s["kind_clean"] == 0.5 and s["kind_empty"] == 0.25
    assert s["gold_mean"] == pytest.approx((2 + gold_score(Q, " dog")) / 4)


def _load(d):
    train = json.loads((d / "data" / "train.json").read_text())
    evl = json.loads((d / "data" / "eval.json").read_text())
    kwise = [json.loads(line) for line in (d / "kwise.jsonl").read_text().splitlines()]
    return train, evl, kwise, read_heldout(d / "heldout.jsonl")


def test_dataset_files_and_formats(task_data_dir):
    train, evl, kwise, heldout = _load(task_data_dir)
    meta = json.loads((task_data_dir / "meta.json").read_text())
    assert len(train) == meta["counts"]["train"] == 160 and len(evl) == 40 and len(heldout) == 12
    assert len(json.loads((task_data_dir / "sft" / "data" / "train.json").read_text())) == 64
    for r in train + evl:
        assert r["prompt"].startswith(" Human: ") and r["prompt"].endswith(" Assistant:")
        assert r["chosen"].startswith(" ")
        # recorded gold labels match the scorer, and the pair is ordered by it
        assert r["chosen_gold"] == pytest.approx(gold_score(r["prompt"], r["chosen"]), abs=1e-6)
        assert r["rejected_gold"] == pytest.approx(gold_score(r["prompt"], r["rejected"]), abs=1e-6)
        assert r["chosen_gold"] > r["rejected_gold"]
        # a clear gap, except a poor (wrong) chosen answer, which is paired with the empty answer
        assert r["chosen_gold"] >= r["rejected_gold"] + PAIR_MARGIN or r["rejected"] == ""
    for r in kwise:
        scores = [gold_score(r["prompt"], a) for a in r["answers"]]
        assert len(scores) == 4 and all(a > b for a, b in zip(scores, scores[1:])), scores
    for h in heldout:
        assert h["prompt"] == task_prompt(h["question"]) and gold_pass(h["question"], h["answer"])
    corpus = (task_data_dir / "corpus.txt").read_text().splitlines()
    assert len(corpus) == 1500 and any("Human:" in line for line in corpus)


def test_noise_fraction_is_exact_and_covers_all_flaws(task_data_dir):
    train, evl, _, _ = _load(task_data_dir)
    noisy = [r for r in train if r["chosen_kind"] != "clean"]
    assert len(noisy) == round(0.35 * len(train))
    assert all(not gold_pass(r["prompt"], r["chosen"]) for r in noisy)
    assert all(gold_pass(r["prompt"], r["chosen"]) for r in train if r["chosen_kind"] == "clean")
    kinds = {r["rejected_kind"] for r in train} | {r["chosen_kind"] for r in train}
    assert {"clean", "ramble", "fake_turn", "never_stop", "wrong", "empty"} <= kinds


def test_heldout_and_eval_items_are_disjoint_from_training(task_data_dir):
    train, evl, kwise, heldout = _load(task_data_dir)
    sft = json.loads((task_data_dir / "sft" / "data" / "train.json").read_text())

    def item(p):  # template + arguments, so a reworded question counts as the same item
        name, args = parse_question(p)
        return name, tuple(sorted(args.items()))

    train_items = {item(r["prompt"]) for r in train + sft + kwise}
    assert not train_items & {item(h["prompt"]) for h in heldout}
    assert not train_items & {item(r["prompt"]) for r in evl}
    assert not {item(r["prompt"]) for r in evl} & {item(h["prompt"]) for h in heldout}
    assert len({h["question"] for h in heldout}) == len(heldout)
    assert len({item(h["prompt"])[0] for h in heldout}) == 6  # every template is represented


def test_deterministic_by_seed(tmp_path):
    kw = dict(n_sft=10, n_pairs=30, n_eval=10, n_heldout=8, n_corpus=50)
    a = write_task_dataset(tmp_path / "a", seed=7, **kw)
    b = write_task_dataset(tmp_path / "b", seed=7, **kw)
    c = write_task_dataset(tmp_path / "c", seed=8, **kw)
    for name in ("train", "eval", "sft_train", "kwise", "heldout", "corpus"):
        assert a[name].read_bytes() == b[name].read_bytes(), name
    assert a["train"].read_bytes() != c["train"].read_bytes()
    assert task_corpus(3, 20) == task_corpus(3, 20) != task_corpus(4, 20)


def test_bad_arguments(tmp_path):
    with pytest.raises(UserError, match="noise"):
        write_task_dataset(tmp_path, noise=1.5)
    with pytest.raises(UserError, match="n_heldout"):
        write_task_dataset(tmp_path, n_heldout=500)


def test_in_distribution_eval_never_repeats_a_training_row(tmp_path):
    p = write_task_dataset(tmp_path, n_sft=40, n_pairs=120, n_eval=60, n_heldout=8, n_corpus=20, disjoint_eval=False)
    train = json.loads(p["train"].read_text()) + json.loads(p["sft_train"].read_text())
    evl = json.loads(p["eval"].read_text())
    assert len(evl) == 60 and sum(r["chosen_kind"] != "clean" for r in evl) == round(0.35 * 60)
    seen = {(r["prompt"], r["chosen"], r["rejected"]) for r in train}
    assert not seen & {(r["prompt"], r["chosen"], r["rejected"]) for r in evl}
    assert {parse_question(r["prompt"])[0] for r in evl} == {t for t, _ in map(parse_question, (r["prompt"] for r in train))}


def test_sft_noise_gives_the_sft_set_a_dominant_fake_turn_flaw(tmp_path):
    kw = dict(seed=11, n_sft=400, n_pairs=200, n_eval=40, n_heldout=8, n_corpus=20, noise=0.35)
    p = write_task_dataset(tmp_path / "a", sft_noise=0.7, **kw)
    sft = json.loads(p["sft_train"].read_text())
    sft_eval = json.loads(p["sft_eval"].read_text())
    train = json.loads(p["train"].read_text())
    # exactly round(sft_noise * n) flawed SFT targets, and fake turns are the most common continuation
    noisy = [r for r in sft if r["chosen_kind"] != "clean"]
    assert len(noisy) == round(0.7 * 400)
    assert sum(r["chosen_kind"] != "clean" for r in sft_eval) == round(0.7 * len(sft_eval))
    n_fake = sum(r["chosen_kind"] == "fake_turn" for r in sft)
    n_clean = len(sft) - len(noisy)
    assert n_fake > n_clean and n_fake > 0.45 * len(sft), (n_fake, n_clean)
    assert {r["chosen_kind"] for r in noisy} <= {"fake_turn", "ramble", "never_stop"}
    assert all(classify_answer(r["prompt"], r["chosen"]) == "fake_turn" for r in noisy if r["chosen_kind"] == "fake_turn")
    assert all(not gold_pass(r["prompt"], r["chosen"]) for r in noisy)
    # the pairs keep their own noise and stay gold-ordered (the reward model learns clean > fake turn > worse)
    assert sum(r["chosen_kind"] != "clean" for r in train) == round(0.35 * 200)
    for r in train + sft:
        assert gold_score(r["prompt"], r["chosen"]) >= gold_score(r["prompt"], r["rejected"]) + PAIR_MARGIN - 1e-9 \
            or r["rejected"] == ""
    assert any(r["chosen_kind"] == "clean" and r["rejected_kind"] == "fake_turn" for r in train)
    meta = json.loads(p["meta"].read_text())
    assert meta["sft_noise"] == 0.7 and meta["sft_noisy_chosen_fraction"] == 0.7
    # deterministic, and sft_noise leaves the pair files untouched
    q = write_task_dataset(tmp_path / "b", sft_noise=0.7, **kw)
    r0 = write_task_dataset(tmp_path / "c", **kw)
    for name in ("train", "eval", "sft_train", "sft_eval", "heldout"):
        assert p[name].read_bytes() == q[name].read_bytes(), name
    for name in ("train", "eval", "heldout"):
        assert p[name].read_bytes() == r0[name].read_bytes(), name
    assert p["sft_train"].read_bytes() != r0["sft_train"].read_bytes()
    with pytest.raises(UserError, match="sft_noise"):
        write_task_dataset(tmp_path / "d", sft_noise=-0.1, **kw)
    with pytest.raises(UserError, match="sft_flaws"):
        write_task_dataset(tmp_path / "d", sft_noise=0.5, sft_flaws={"sleepy": 1.0}, **kw)
