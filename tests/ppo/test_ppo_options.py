"""Step-3 options exercised inside the real loop: ptx (unsupervised LM loss), TensorBoard, and the improvements
over the reference's math (adaptive KL, k3 KL, whitening, reward normalization, entropy bonus)."""

from pathlib import Path

import pytest
import torch

from chatrlhf.errors import UserError
from chatrlhf.metrics import read_metrics
from chatrlhf.steps.ppo import run_ppo


def test_ptx_step_trains_on_unsupervised_text_and_tensorboard_is_written(ppo_cfg, task_data_dir):
    corpus = Path(task_data_dir) / "corpus.txt"
    assert corpus.is_file()
    cfg = ppo_cfg(unsupervised_dataset_name=str(corpus), unsup_coef=0.5, max_steps=2, enable_tensorboard=True)
    out = run_ppo(cfg)
    assert out["steps"] == 2
    rec = [r for r in read_metrics(cfg.output_dir) if r["kind"] == "train"]
    assert len(rec) == 2
    # the ptx language-model loss is logged every step, finite and of LM size (not a zero placeholder)
    assert all(torch.isfinite(torch.tensor(r["unsup_loss"])) and r["unsup_loss"] > 0.1 for r in rec)
    events = list((Path(cfg.output_dir) / "tensorboard").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_ptx_data_too_small_is_a_clear_error(ppo_cfg, tmp_path):
    tiny = tmp_path / "ptx.txt"
    tiny.write_text("hi\n")
    with pytest.raises(UserError, match="fewer than one block"):
        run_ppo(ppo_cfg(unsupervised_dataset_name=str(tiny)))


def test_improved_math_options_run_in_the_loop(ppo_cfg):
    cfg = ppo_cfg(adaptive_kl=True, kl_target=0.01, kl_horizon=10, kl_estimator="k3", whiten_advantages=True,
                  reward_normalization="normalize", entropy_coef=0.01, max_steps=2)
    out = run_ppo(cfg)
    assert out["steps"] == 2 and out["stopped_reason"] is None
    for k in ("actor_loss", "critic_loss", "kl", "entropy"):
        assert torch.isfinite(torch.tensor(out[k])), k
    # the adaptive controller moved the coefficient away from its initial value
    assert out["kl_coef"] != pytest.approx(cfg.kl_ctl)
