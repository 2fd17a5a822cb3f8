"""DPO raises the chosen-vs-rejected reward margin on held-out pairs; the policy saves as an HF checkpoint."""

import os

from chatrlhf.config import parse_config
from chatrlhf.steps.dpo import DPOConfig, answer_labels, run_dpo


def test_answer_labels_start_at_divergence():
    import torch

    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 9, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    lab = answer_labels(ids, mask)
    assert lab.tolist() == [[-100, -100, 7, 8], [-100, -100, 9, -100]]


def test_dpo_raises_margin(base_args, tmp_path):
    out = tmp_path / "dpo"
    res = run_dpo(parse_config(DPOConfig, base_args(out, split="0,10,0", learning_rate=5e-4, beta=0.5,
                                                    label_smoothing=0.05, max_steps=20, disable_dropout=True)))
    assert res["reward_margin_start"] == 0.0  # policy == reference at the start
    assert res["reward_margin"] > 0.3 and res["eval_loss"] < 0.66, res
    assert "model.safetensors" in os.listdir(out)
