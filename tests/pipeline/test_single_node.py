"""`chatrlhf train --deployment-type single_node`: every step really runs under torchrun with 2 ranks (gloo on
CPU), not only as a dry-run command line."""

import json

import pytest

from chatrlhf.metrics import read_metrics

from .conftest import run_cli

STEP_BUDGETS = """\
sft: {max_steps: 3, per_device_train_batch_size: 4, max_seq_len: 64, log_interval: 1}
reward: {max_steps: 3, per_device_train_batch_size: 4, max_seq_len: 64, log_interval: 1}
ppo: {max_steps: 2, per_device_generation_batch_size: 4, per_device_training_batch_size: 4, max_prompt_seq_len: 32,
      max_answer_seq_len: 8, log_interval: 1}
"""


@pytest.mark.slow
def test_train_single_node_two_ranks_runs_all_steps(quick_assets, tmp_path):
    cfg = tmp_path / "budgets.yaml"
    cfg.write_text(STEP_BUDGETS)
    out = tmp_path / "run"
    r = run_cli(["train", "--actor-model", quick_assets["actor"], "--reward-model", quick_assets["reward"],
                 "--data_path", quick_assets["data"], "--output-dir", str(out), "--deployment-type", "single_node",
                 "--num_gpus", "2", "--config", str(cfg)], cwd=tmp_path, timeout=400)
    assert r.returncode == 0, r.stdout[-4000:]
    assert r.stdout.count("torchrun --standalone --nproc_per_node=2 -m chatrlhf") == 3
    for d, name in (("step1_sft", "sft"), ("step2_reward", "reward"), ("step3_ppo", "ppo")):
        assert json.loads((out / d / "done.json").read_text())["step"] == name
        assert [m for m in read_metrics(out / d) if m["kind"] == "train"]
    # the PPO step saw two ranks
    assert "2 rank(s)" in (out / "step3_ppo" / "train.log").read_text()
    assert (out / "step3_ppo" / "actor" / "model.safetensors").is_file()
