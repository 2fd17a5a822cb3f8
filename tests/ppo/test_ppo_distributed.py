"""A 2-process run (torchrun, gloo, OMP_NUM_THREADS=1) matches a 1-process run with the doubled batch: greedy,
fixed-length answers (min_new_tokens = max_answer_seq_len) so every rank's token-mean weighs rows equally."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from chatrlhf.trainers.metrics import read_metrics


def _argv(tiny_model_dir, rm_dir, prompts_dir, cache, out, gen_bs):
    args = {"actor_model_name_or_path": tiny_model_dir, "critic_model_name_or_path": rm_dir,
            "data_path": f"local/jsonfile={prompts_dir}", "data_split": "2,4,4", "data_output_path": cache,
            "output_dir": out, "per_device_generation_batch_size": gen_bs, "per_device_training_batch_size": gen_bs,
            "max_prompt_seq_len": 32, "max_answer_seq_len": 6, "min_new_tokens": 6, "temperature": 0,
            "dtype": "fp32", "max_steps": 2, "resume": "never", "actor_learning_rate": 1e-3,
            "critic_learning_rate": 1e-3, "lr_scheduler_type": "constant", "actor_zero_stage": 2,
            "critic_zero_stage": 2, "seed": 11, "log_interval": 1}
    argv = ["--skip_bad_rows"]
    for k, v in args.items():
        argv += [f"--{k}", str(v)]
    return argv


@pytest.mark.slow
def test_two_processes_match_one(tiny_model_dir, fresh_rm_dir, ppo_prompts_dir, tmp_path):
    # without this process's own 1-rank group settings (an earlier in-process test may have set them)
    dist_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {**{k: v for k, v in os.environ.items() if k not in dist_vars}, "OMP_NUM_THREADS": "1",
           "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    torchrun = str(Path(sys.executable).parent / "torchrun")
    one = tmp_path / "one"
    two = tmp_path / "two"
    r1 = subprocess.run([sys.executable, "-m", "chatrlhf", "ppo",
                         *_argv(tiny_model_dir, fresh_rm_dir, ppo_prompts_dir, tmp_path / "c1", one, 4)],
                        env=env, capture_output=True, text=True, timeout=300)
    assert r1.returncode == 0, r1.stderr[-3000:]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    r2 = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(port), "-m", "chatrlhf", "ppo",
                         *_argv(tiny_model_dir, fresh_rm_dir, ppo_prompts_dir, tmp_path / "c2", two, 2)],
                        env=env, capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0, r2.stderr[-3000:]
    a = {r["step"]: r for r in read_metrics(one) if r["kind"] == "train"}
    b = {r["step"]: r for r in read_metrics(two) if r["kind"] == "train"}
    assert sorted(a) == sorted(b) == [1, 2]
    for step in (1, 2):
        for k in ("reward_mean", "reward_std", "kl", "actor_loss", "critic_loss", "response_length"):
            assert b[step][k] == pytest.approx(a[step][k], rel=2e-3, abs=2e-4), (step, k, a[step][k], b[step][k])
    assert (two / "actor" / "model.safetensors").exists() and (two / "done.json").exists()
