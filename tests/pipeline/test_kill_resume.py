"""kill -9 across sft, reward and ppo: each step is killed (in the middle of a checkpoint write, mid-training, during
the final save) and rerun until it finishes; the final weights and the metrics rows equal an uninterrupted run's
bit for bit, each step's row appears once, and no leftover of the killed saves remains.

Exact kill points come from the child itself: a small bootstrap wraps ``torch.save`` (what DeepSpeed writes
checkpoints with) or safetensors' ``save_file`` (the final Hugging Face save) and sends SIGKILL to its own process
right after the chosen file is written. DeepSpeed, the steps and the files are all real."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from .conftest import cli_env

# Runs `chatrlhf <argv>`; CHATRLHF_TEST_KILL=ckpt_save:N dies after the N-th file written into checkpoints/step_*,
# =final_save after the first model file of the final save (written into a staging dir).
BOOT = r"""
import os, signal, sys
spec = os.environ.get("CHATRLHF_TEST_KILL", "")
if spec.startswith("ckpt_save:"):
    import torch
    nth, seen, save = int(spec.split(":")[1]), [0], torch.save
    def killing_save(obj, f, *a, **k):
        save(obj, f, *a, **k)
        if "/checkpoints/step_" in str(f):
            seen[0] += 1
            if seen[0] == nth:
                os.kill(os.getpid(), signal.SIGKILL)
    torch.save = killing_save
elif spec == "final_save":
    import safetensors.torch as st
    save_file = st.save_file
    def killing_save_file(tensors, filename, *a, **k):
        save_file(tensors, filename, *a, **k)
        name = str(filename)
        if "/checkpoints/" not in name and ("/.staging-" in name or "/.tmp-" in name):
            os.kill(os.getpid(), signal.SIGKILL)
    st.save_file = killing_save_file
from chatrlhf.cli import main
sys.exit(main(sys.argv[1:]))
"""


def argv(step: str, out: Path, **flags) -> list[str]:
    args = [step, "--output_dir", str(out)]
    for k, v in flags.items():
        args += [f"--{k}"] if v is True else [f"--{k}", str(v)]
    return args


def run(args: list[str], kill: str = "", cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = cli_env() | ({"CHATRLHF_TEST_KILL": kill} if kill else {})
    return subprocess.run([sys.executable, "-c", BOOT, *args], cwd=cwd, env=env, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=300)


def run_killed_after_checkpoint(args: list[str], ckpt: Path) -> None:
    """kill -9 from outside as soon as ``ckpt`` is complete: the run is then mid-way through what follows it."""
    proc = subprocess.Popen([sys.executable, "-c", BOOT, *args], env=cli_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    try:
        while not (ckpt / "trainer_state.json").exists():
            assert proc.poll() is None, f"exited with {proc.returncode} before {ckpt} was written"
            assert time.time() < deadline, f"no {ckpt} within 240 s"
            time.sleep(0.005)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def assert_killed(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stdout[-3000:])


def assert_finished(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 0, r.stdout[-3000:]


def rows(out: Path) -> list[dict]:
    """Train rows as written (no de-duplication), without their wall-clock time."""
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time"} for r in recs if r["kind"] == "train"]


def assert_same_run(ref: Path, got: Path, steps: int, model_dirs: tuple[str, ...] = ("",)) -> None:
    from safetensors.torch import load_file

    a, b = rows(ref), rows(got)
    assert [r["step"] for r in a] == list(range(1, steps + 1))
    assert [r["step"] for r in b] == [r["step"] for r in a], "a step's row is missing or repeated"
    assert a == b
    for d in model_dirs:
        wa, wb = load_file(str(ref / d / "model.safetensors")), load_file(str(got / d / "model.safetensors"))
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), (d, k)
    leftovers = [p.name for p in got.rglob(".*") if p.name.startswith((".staging-", ".tmp-", ".old-"))]
    leftovers += [p.name for p in (got / "checkpoints").glob("step_*") if not (p / "trainer_state.json").exists()]
    assert not leftovers, leftovers
    assert json.loads((got / "done.json").read_text())["metrics"]


@pytest.mark.slow
@pytest.mark.heavy  # minutes: scheduled first
def test_kill_9_at_any_point_resumes_to_the_uninterrupted_result(quick_assets, tmp_path):
    data = dict(data_path=quick_assets["data"], data_split="2,4,4", skip_bad_rows=True, dtype="fp32", seed=1234,
                log_interval=1)

    # ---- step 1: killed while DeepSpeed writes a checkpoint, then during the final save -------------------------
    sft = dict(model_name_or_path=quick_assets["actor"], max_steps=12, save_interval=3, per_device_train_batch_size=4,
               max_seq_len=48, learning_rate=1e-3, lr_scheduler_type="cosine", dropout=0.1, eval_iters=1, **data)
    ref_sft = tmp_path / "sft_ref"
    assert_finished(run(argv("sft", ref_sft, **sft)))
    out = tmp_path / "sft"
    assert_killed(run(argv("sft", out, **sft), kill="ckpt_save:2"))
    torn = out / "checkpoints" / "step_6"
    assert torn.is_dir() and not (torn / "trainer_state.json").exists()  # died inside step 6's checkpoint
    r = run(argv("sft", out, **sft), kill="final_save")
    assert_killed(r)
    assert "resumed from" in r.stdout and "at step 3" in r.stdout
    assert list(out.glob(".staging-*")), "the final save was not interrupted"
    r = run(argv("sft", out, **sft))
    assert_finished(r)
    assert "at step 12" in r.stdout
    assert_same_run(ref_sft, out, 12)

    # ---- step 2: killed from outside mid-training, right after a checkpoint --------------------------------------
    rw = dict(model_name_or_path=quick_assets["reward"], max_steps=16, save_interval=4, per_device_train_batch_size=4,
              max_seq_len=48, learning_rate=1e-3, lr_scheduler_type="linear", eval_iters=1, **data)
    ref_rw = tmp_path / "reward_ref"
    assert_finished(run(argv("reward", ref_rw, **rw)))
    out = tmp_path / "reward"
    run_killed_after_checkpoint(argv("reward", out, **rw), out / "checkpoints" / "step_4")
    assert not (out / "done.json").exists()
    r = run(argv("reward", out, **rw))
    assert_finished(r)
    assert "resumed from" in r.stdout
    assert_same_run(ref_rw, out, 16)

    # ---- step 3: killed between the actor's and the critic's checkpoint files ------------------------------------
    ppo = dict(actor_model_name_or_path=ref_sft, critic_model_name_or_path=ref_rw, max_steps=6, save_interval=2,
               per_device_generation_batch_size=4, per_device_training_batch_size=4, max_prompt_seq_len=32,
               max_answer_seq_len=8, actor_learning_rate=1e-4, critic_learning_rate=1e-4, enable_ema=True, **data)
    ref_ppo = tmp_path / "ppo_ref"
    assert_finished(run(argv("ppo", ref_ppo, **ppo)))
    out = tmp_path / "ppo"
    assert_killed(run(argv("ppo", out, **ppo), kill="ckpt_save:3"))
    torn = out / "checkpoints" / "step_4"
    assert (torn / "actor").is_dir() and not (torn / "critic").exists() and not (torn / "trainer_state.json").exists()
    r = run(argv("ppo", out, **ppo))
    assert_finished(r)
    assert "resumed from" in r.stdout and "at step 2" in r.stdout
    assert_same_run(ref_ppo, out, 6, ("actor", "critic", "actor_ema"))
