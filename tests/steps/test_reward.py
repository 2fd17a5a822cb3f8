"""Step 2: RM accuracy on the task's gold-ordered held-out pairs rises well above chance; the saved RM reloads
offline (safetensors, no pytorch_model.bin) and scores exactly as the trained one; k-wise trains."""

import json
import os

import pytest
import torch

from chatrlhf.config import parse_config
from chatrlhf.trainers.reward import RewardConfig, run_reward


def test_reward_model_learns_gold_preferences_and_reloads(base_args, tmp_path, tiny_model_dir, pairs_dir):
    out = tmp_path / "rm"
    cfg = parse_config(RewardConfig, base_args(out, split="0,10,0", learning_rate=5e-4, num_train_epochs=1,
                                               disable_dropout=True, lr_scheduler_type="linear"))
    res = run_reward(cfg)
    # measured: accuracy ~0.35-0.4 before -> ~0.8 after one epoch (20 steps; 40 held-out pairs)
    assert res["accuracy_start"] < 0.6
    assert res["accuracy"] >= 0.7, res
    assert res["score_gap"] > 0.2 and res["eval_loss"] < 0.69
    files = set(os.listdir(out))
    assert "model.safetensors" in files and "pytorch_model.bin" not in files
    conf = json.loads((out / "config.json").read_text())
    assert conf["architectures"] == ["OPTModel"] and conf["chatrlhf_reward"]["num_padding_at_beginning"] == 1

    from chatrlhf.data import PairCollator, build_phase_datasets
    from chatrlhf.models.loading import load_tokenizer
    from chatrlhf.models.reward_model import load_reward_model

    rm = load_reward_model(out).eval()
    tok = load_tokenizer(str(out))
    _, eval_ds = build_phase_datasets(2, cfg, tok)
    batch = PairCollator(tok.pad_token_id)([eval_ds[i] for i in range(len(eval_ds))])
    with torch.no_grad():
        s = rm.score(batch["input_ids"], batch["attention_mask"])
    b = len(s) // 2
    acc = (s[:b] > s[b:]).float().mean().item()
    assert abs(acc - res["accuracy"]) < 1e-6
    assert abs(s[:b].mean().item() - res["chosen_score"]) < 1e-4
    # a plain causal-LM dir becomes a fresh RM with an initialised value head
    fresh = load_reward_model(tiny_model_dir)
    assert fresh.v_head.weight.abs().sum() > 0 and fresh.num_padding_at_beginning == 0


def test_kwise_reward_model_trains(base_args, tmp_path, kwise_dir):
    out = tmp_path / "rmk"
    res = run_reward(parse_config(RewardConfig, base_args(
        out, split="0,10,0", data_path=kwise_dir, kwise=True, learning_rate=5e-4, max_steps=24,
        per_device_train_batch_size=4, disable_dropout=True, lr_scheduler_type="constant")))
    from chatrlhf.trainers.metrics import read_metrics

    train = [r["loss"] for r in read_metrics(out) if r["kind"] == "train"]
    print("kwise", [round(x, 3) for x in train], res)
    assert sum(train[-6:]) / 6 < sum(train[:6]) / 6 - 0.05, train


@pytest.mark.slow  # over 2 s on a 2-core CPU
def test_kwise_reward_model_ranks_held_out_answers(base_args, tmp_path, kwise_large_dir):
    """About one epoch over 720 rankings: the best answer of a held-out ranking outscores its worst more often,
    by a positive mean gap, and the held-out k-wise loss falls (seen: accuracy 0.40/0.53 -> 0.64-0.69 over seeds)."""
    from chatrlhf.trainers.metrics import read_metrics

    out = tmp_path / "rmk_large"
    res = run_reward(parse_config(RewardConfig, base_args(
        out, split="0,10,0", data_path=kwise_large_dir, kwise=True, learning_rate=5e-4, max_steps=100,
        per_device_train_batch_size=8, disable_dropout=True, lr_scheduler_type="constant", log_interval=0)))
    evals = [r for r in read_metrics(out) if r["kind"] == "eval"]
    print("kwise held-out", res)
    assert res["accuracy"] >= 0.6 and res["accuracy"] >= res["accuracy_start"] + 0.1, res
    assert res["score_gap"] > 0.2, res
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.05, evals


def test_last_token_loss_option(base_args, tmp_path):
    out = tmp_path / "rml"
    res = run_reward(parse_config(RewardConfig, base_args(out, split="0,10,0", loss="last_token",
                                                          learning_rate=5e-4, max_steps=12, disable_dropout=True)))
    print("last_token", res)
    assert res["accuracy"] > res["accuracy_start"] + 0.1 and res["score_gap"] > 0, res
