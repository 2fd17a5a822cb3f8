"""Fixtures for step-3 tests: a prompts-only local/jsonfile dir, a reward-model dir, a PPOConfig builder."""

import shutil

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test (still runs by default)")


@pytest.fixture(scope="session")
def ppo_prompts_dir(task_data_dir, tmp_path_factory):
    """data/train.json + data/eval.json only (the task root also holds kwise/heldout files)."""
    out = tmp_path_factory.mktemp("ppo_prompts")
    (out / "data").mkdir()
    for f in ("train.json", "eval.json"):
        shutil.copy(task_data_dir / "data" / f, out / "data" / f)
    return out


@pytest.fixture(scope="session")
def fresh_rm_dir(tiny_model_dir, tmp_path_factory):
    """A reward model saved from the tiny model (fresh value head): enough to exercise the PPO machinery."""
    import torch

    from chatrlhf.models.loading import load_tokenizer
    from chatrlhf.models.reward_model import load_reward_model

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("ppo_rm") / "rm"
    rm = load_reward_model(tiny_model_dir)
    rm.save_pretrained(out)
    load_tokenizer(tiny_model_dir).save_pretrained(out)
    return out


@pytest.fixture
def ppo_cfg(tiny_model_dir, fresh_rm_dir, ppo_prompts_dir, tmp_path):
    """callable(**overrides) -> PPOConfig with tiny sizes (fp32, 8-token answers, 2 steps)."""
    from chatrlhf.trainers.ppo.trainer import PPOConfig

    def make(**kw):
        base = dict(actor_model_name_or_path=str(tiny_model_dir), critic_model_name_or_path=str(fresh_rm_dir),
                    data_path=[f"local/jsonfile={ppo_prompts_dir}"], data_split="2,4,4", skip_bad_rows=True,
                    data_output_path=str(tmp_path / "cache"), output_dir=str(tmp_path / "out"),
                    per_device_generation_batch_size=4, per_device_training_batch_size=2, max_prompt_seq_len=32,
                    max_answer_seq_len=8, dtype="fp32", max_steps=2, log_interval=1, resume="never",
                    actor_learning_rate=1e-3, critic_learning_rate=1e-3, lr_scheduler_type="constant", seed=7)
        base.update(kw)
        return PPOConfig(**base)

    return make
