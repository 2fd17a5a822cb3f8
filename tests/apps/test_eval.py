"""`chatrlhf eval`: gold (python API + CLI), reward (a saved reward model), prompts."""

import json

import pytest

from chatrlhf.tasks import builtin as task
from chatrlhf.cli import main as cli


def test_gold_eval_numbers_are_consistent(apps_model):
    from chatrlhf.apps.eval import gold_eval, heldout_prompts

    model, tok = apps_model
    prompts = heldout_prompts(num_prompts=6, seed=7)
    assert len(prompts) == 6 and all(p.startswith(" Human: ") and p.endswith(" Assistant:") for p in prompts)
    res = gold_eval(model, tok, prompts, max_new_tokens=6, batch_size=4)
    assert res["n"] == 6 and len(res["samples"]) == 6
    assert 0.0 <= res["mean_gold"] <= 1.0 and 0.0 <= res["pass_rate"] <= 1.0
    assert res["n_pass"] == sum(s["pass"] for s in res["samples"]) == round(res["pass_rate"] * 6)
    for s in res["samples"]:  # scores are the task's gold scorer on the generated text
        assert s["gold"] == task.gold_score(s["prompt"], s["answer"])
    assert res["mean_gold"] == pytest.approx(sum(s["gold"] for s in res["samples"]) / 6)
    assert sum(res["kinds"].values()) == pytest.approx(1.0)
    # batching does not change greedy answers
    assert [s["answer"] for s in gold_eval(model, tok, prompts, max_new_tokens=6, batch_size=1)["samples"]] == \
           [s["answer"] for s in res["samples"]]
    assert tok.padding_side == "left"


def test_gold_eval_counts_a_perfect_model():
    """A stand-in 'model' that answers correctly: pass rate 1 and mean gold 1 via the same scoring path."""
    from chatrlhf.apps.eval import heldout_prompts

    prompts = heldout_prompts(num_prompts=5, seed=7)
    answers = [task.expected_answer(p) for p in prompts]
    assert all(task.gold_pass(p, a) for p, a in zip(prompts, answers))
    assert heldout_prompts(num_prompts=5, seed=7) == prompts  # deterministic by seed


def test_heldout_prompts_from_a_task_dir_match_the_generator(tmp_path):
    from chatrlhf.apps.eval import heldout_prompts

    task.write_task_dataset(tmp_path, seed=5, n_sft=2, n_pairs=2, n_eval=2, n_kwise=0, n_corpus=10)
    assert heldout_prompts(str(tmp_path), num_prompts=8) == heldout_prompts(None, num_prompts=8, seed=5)


def test_eval_gold_cli_json(apps_model_dir, capsys):
    assert cli(["eval", "gold", "--model", str(apps_model_dir), "--num_prompts", "4", "--max_new_tokens", "4",
                "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 4 and 0 <= out["mean_gold"] <= 1 and out["n_pass"] == sum(s["pass"] for s in out["samples"])


@pytest.fixture(scope="module")
def reward_dir(apps_model_dir, tmp_path_factory):
    from chatrlhf.models.loading import load_tokenizer
    from chatrlhf.models.reward_model import load_reward_model

    out = tmp_path_factory.mktemp("rm") / "rm"
    rm = load_reward_model(str(apps_model_dir))
    rm.save_pretrained(out)
    load_tokenizer(str(apps_model_dir)).save_pretrained(out)
    return out


def test_eval_reward_scores_pairs_like_the_model(reward_dir, tmp_path, capsys):
    import torch

    from chatrlhf.apps.eval import load_scorer, reward_eval

    rm, tok = load_scorer(str(reward_dir))
    rows = [{"prompt": "Reverse the word: cat", "chosen": " tac", "rejected": " cat cat cat"},
            {"prompt": " Human: Add 3 and 4. Assistant:", "chosen": " 7", "rejected": " 9"}]
    res = reward_eval(rm, tok, rows, batch_size=1)
    # the same score computed by hand: template + answer + EOS, value at the last token
    ids = tok(" Human: Reverse the word: cat Assistant: tac")["input_ids"] + [tok.eos_token_id]
    with torch.no_grad():
        manual = float(rm.score(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)))
    assert res["rows"][0]["chosen_score"] == pytest.approx(manual, abs=1e-5)
    gaps = [r["chosen_score"] - r["rejected_score"] for r in res["rows"]]
    assert res["accuracy"] == sum(g > 0 for g in gaps) / 2 and res["mean_gap"] == pytest.approx(sum(gaps) / 2)
    # batching does not change scores
    assert reward_eval(rm, tok, rows, batch_size=4)["rows"][1]["rejected_score"] == pytest.approx(
        res["rows"][1]["rejected_score"], abs=1e-5)
    f = tmp_path / "pairs.json"
    f.write_text(json.dumps(rows))
    assert cli(["eval", "reward", "--model", str(reward_dir), "--file", str(f)]) == 0
    out = capsys.readouterr().out
    assert "accuracy (chosen > rejected)" in out and out.count("chosen ") >= 2
    assert cli(["eval", "reward", "--model", str(reward_dir), "--prompt", "hi", "--answer", "a", "b", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["rows"]) == 2


def test_eval_reward_refuses_a_plain_language_model(apps_model_dir, capsys):
    assert cli(["eval", "reward", "--model", str(apps_model_dir)]) == 2
    assert "not a trained reward model" in capsys.readouterr().err


def test_eval_prompts_side_by_side(apps_model_dir, capsys):
    assert cli(["eval", "prompts", "--baseline", str(apps_model_dir), "--finetuned", str(apps_model_dir),
                "--methods", "greedy,contrastive", "--max_new_tokens", "3", "--language", "Chinese", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)["results"]
    assert len(res) == 6 * 2 and {r["method"] for r in res} == {"greedy", "contrastive"}
    assert all(r["baseline"] == r["finetuned"] for r in res)  # same model, deterministic methods
    assert res[0]["prompt"] == task.task_prompt("请用几句话介绍一下微软?")
    assert cli(["eval", "prompts", "--baseline", "a", "--finetuned", "b", "--methods", "greedy,magic"]) == 2
