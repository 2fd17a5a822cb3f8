"""2 processes (torchrun, gloo) x batch 4 == 1 process x batch 8: the same per-step reward-model losses."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from chatrlhf.config import parse_config
from chatrlhf.trainers.metrics import read_metrics
from chatrlhf.trainers.reward import RewardConfig, run_reward


def losses(out):
    return [r["loss"] for r in read_metrics(out) if r["kind"] == "train"]


@pytest.mark.slow
def test_two_processes_match_one(base_args, tmp_path):
    common = dict(split="0,10,0", learning_rate=1e-3, max_steps=4, disable_dropout=True, zero_stage=2,
                  lr_scheduler_type="constant", log_interval=0)
    one = tmp_path / "one"
    run_reward(parse_config(RewardConfig, base_args(one, per_device_train_batch_size=8, **common)))
    two = tmp_path / "two"
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = base_args(two, per_device_train_batch_size=4, **common)
    with socket.socket() as sk:  # torchrun's static rendezvous needs a real port (0 hangs)
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    p = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", str(port), "-m", "chatrlhf",
                        "reward", *argv], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (two / "done.json").exists() and (two / "model.safetensors").exists()
    a, b = losses(one), losses(two)
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert abs(x - y) < 2e-4, (a, b)
