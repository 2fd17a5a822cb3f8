"""`chatrlhf train --deployment-type multi_node --no_ssh`: two "nodes" on loopback (node_rank 0 and 1, one process
each, gloo on CPU, a shared output dir as on a cluster's shared filesystem) run all three steps and train exactly
what one node with two processes trains (`--deployment-type single_node --num_gpus 2`: every step really runs under
torchrun with 2 ranks, not only as a dry-run command line)."""

import json
import subprocess
import sys

import pytest

from chatrlhf.trainers.metrics import read_metrics
from chatrlhf.utils import free_port

from .conftest import cli_env, run_cli

STEP_BUDGETS = """\
sft: {max_steps: 2, per_device_train_batch_size: 4, max_seq_len: 64, log_interval: 1, eval_iters: 1, dtype: fp32}
reward: {max_steps: 2, per_device_train_batch_size: 4, max_seq_len: 64, log_interval: 1, eval_iters: 1, dtype: fp32}
ppo: {max_steps: 1, per_device_generation_batch_size: 4, per_device_training_batch_size: 4, max_prompt_seq_len: 32,
      max_answer_seq_len: 8, log_interval: 1, dtype: fp32}
"""
STEP_DIRS = ("step1_sft", "step2_reward", "step3_ppo")


def _train_rows(out, d):
    return [{k: v for k, v in r.items() if k != "time"} for r in read_metrics(out / d) if r["kind"] == "train"]


@pytest.mark.slow
@pytest.mark.heavy  # minutes: scheduled first
def test_two_nodes_without_ssh_train_what_one_node_with_two_ranks_trains(quick_assets, tmp_path):
    budgets = tmp_path / "budgets.yaml"
    budgets.write_text(STEP_BUDGETS)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    base = ["train", "--actor-model", quick_assets["actor"], "--reward-model", quick_assets["reward"],
            "--data_path", quick_assets["data"], "--config", str(budgets), "--skip_preflight"]

    # two nodes, each started on its own (what a Slurm/Kubernetes job script does on every node)
    multi = tmp_path / "multi"
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-m", "chatrlhf", *base, "--output-dir", str(multi),
                               "--deployment-type", "multi_node", "--hostfile", str(hostfile), "--no_ssh",
                               "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", port],
                              cwd=tmp_path, env=cli_env(), text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)
             for rank in (0, 1)]
    try:
        outs = [p.communicate(timeout=400)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, (p, text) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"node {rank}:\n{text[-4000:]}"
        assert text.count(f"--no_ssh --node_rank {rank}") == 3  # all three steps through the launcher, no ssh
    for d in STEP_DIRS:
        assert json.loads((multi / d / "done.json").read_text())["step"] == d.split("_", 1)[1]
        assert (multi / d / "train.log").is_file() and (multi / d / "train.node1.log").is_file()
        node0_log = (multi / d / "train.log").read_text()
        assert "dist_world_size=2" in node0_log
        # INFO lines come from rank 0 only, once each (the launcher's own lines aside)
        info = [line.split(" INFO ", 1)[1] for line in node0_log.splitlines()
                if " INFO chatrlhf" in line]
        assert info and len(info) == len(set(info)), info
        assert " INFO chatrlhf" not in (multi / d / "train.node1.log").read_text()

    # one node, two processes
    single = tmp_path / "single"
    r = run_cli([*base, "--output-dir", str(single), "--deployment-type", "single_node", "--num_gpus", "2"],
                cwd=tmp_path, timeout=400)
    assert r.returncode == 0, r.stdout[-4000:]
    assert r.stdout.count("torchrun --standalone --nproc_per_node=2 -m chatrlhf") == 3
    assert "2 rank(s)" in (single / "step3_ppo" / "train.log").read_text()  # the PPO step saw two ranks
    assert (single / "step3_ppo" / "actor" / "model.safetensors").is_file()

    for d in STEP_DIRS:
        assert json.loads((single / d / "done.json").read_text())["step"] == d.split("_", 1)[1]
        # two ranks in one log: still one copy of each INFO line (rank 0's)
        info = [line.split(" INFO ", 1)[1] for line in (single / d / "train.log").read_text().splitlines()
                if " INFO chatrlhf" in line]
        assert info and len(info) == len(set(info)), info
        got, want = _train_rows(multi, d), _train_rows(single, d)
        assert len(got) == len(want) > 0, d
        for g, w in zip(got, want):
            assert g.keys() == w.keys(), d
            for k, v in w.items():
                if isinstance(v, float):
                    assert g[k] == pytest.approx(v, rel=1e-5, abs=1e-6), (d, k)
                else:
                    assert g[k] == v, (d, k)
