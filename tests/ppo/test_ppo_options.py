"""Step-3 options exercised inside the real loop: ptx (unsupervised LM loss), TensorBoard, and the improvements
over the reference's math (adaptive KL, k3 KL, whitening, reward normalization, entropy bonus)."""

from pathlib import Path

import pytest
import torch

from chatrlhf.errors import UserError
from chatrlhf.trainers.metrics import read_metrics
from chatrlhf.trainers.ppo.trainer import run_ppo


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


def test_align_overflow_is_accepted_and_changes_nothing(ppo_cfg, tiny_model_dir, fresh_rm_dir):
    """DeepSpeed-Chat's --align_overflow parses (its command lines keep working) and has no effect: the same
    metrics and the same trained weights with it as without it."""
    from safetensors.torch import load_file

    from chatrlhf.config import parse_config
    from chatrlhf.trainers.ppo.config import PPOConfig

    cfg = parse_config(PPOConfig, ["--actor_model_name_or_path", str(tiny_model_dir), "--critic_model_name_or_path",
                                   str(fresh_rm_dir), "--align_overflow"])
    assert cfg.align_overflow is True
    assert "no effect" in PPOConfig.__dataclass_fields__["align_overflow"].metadata["help"]
    runs = {}
    for flag in (False, True):
        cfg = ppo_cfg(align_overflow=flag, output_dir=str(Path(ppo_cfg().output_dir).parent / f"align_{flag}"))
        out = run_ppo(cfg)
        train = [{k: v for k, v in r.items() if k != "time"} for r in read_metrics(cfg.output_dir)
                 if r["kind"] == "train"]
        runs[flag] = (out["actor_loss"], out["critic_loss"], train,
                      load_file(str(Path(cfg.output_dir) / "actor" / "model.safetensors")))
    (loss_a, closs_a, train_a, w_a), (loss_b, closs_b, train_b, w_b) = runs[False], runs[True]
    assert (loss_a, closs_a) == (loss_b, closs_b) and train_a == train_b and len(train_a) == 2
    assert w_a.keys() == w_b.keys() and all(torch.equal(w_a[k], w_b[k]) for k in w_a)
