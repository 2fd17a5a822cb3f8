"""Devices are DeepSpeed's choice and said out loud: start-up pins nothing (an NPU/XPU host is not put on the CPU),
every command prints the device and dtype it uses, and a CPU fallback says it is one."""

import os
import subprocess
import sys

import pytest

from chatrlhf.engine import device

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FALLBACK = "device: cpu (no accelerator found: DeepSpeed fell back to CPU) | dtype: "


def _env_without_accelerator() -> dict:
    """A child as a user would start it: no DS_ACCELERATOR, no launcher rank variables."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("DS_ACCELERATOR", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(REPO, ".torch_extensions"))
    return env


def test_start_up_pins_no_device_and_imports_neither_torch_nor_deepspeed():
    code = ("import os, sys\nfrom chatrlhf.utils import setup_env\nsetup_env()\n"
            "print(os.environ.get('DS_ACCELERATOR'), 'torch' in sys.modules, 'deepspeed' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], env=_env_without_accelerator(), text=True, capture_output=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["None", "False", "False"]


def test_accelerator_info_and_device_line_follow_deepspeed(monkeypatch, capsys):
    # the test session pins DeepSpeed to the CPU (tests/conftest.py): the line names that, not a fallback
    info = device.accelerator_info()
    assert info == {"name": "cpu", "count": 0, "how": "DS_ACCELERATOR=cpu"}
    from chatrlhf.engine.device import cpu_supports_bf16

    assert device.train_dtype("fp32") == ("fp32", "--dtype")
    dtype, why = device.train_dtype("auto")
    assert dtype == ("bf16" if cpu_supports_bf16() else "fp32") and why.startswith("auto: ")
    monkeypatch.setattr(device, "_ANNOUNCED", None)
    line = device.announce_device("fp32", "--dtype")
    assert line == "device: cpu (DS_ACCELERATOR=cpu) | dtype: fp32 (--dtype)"
    device.announce_device("fp32", "--dtype")  # once per process
    assert capsys.readouterr().err == line + "\n"
    # a rank other than 0 prints nothing
    monkeypatch.setattr(device, "_ANNOUNCED", None)
    monkeypatch.setenv("RANK", "1")
    device.announce_device("fp32", "--dtype")
    assert capsys.readouterr().err == ""


def test_inference_device_asks_deepspeed(monkeypatch, capsys):
    import torch

    from chatrlhf.engine.generation import inference_device

    monkeypatch.setattr(device, "_ANNOUNCED", None)
    assert inference_device() == torch.device("cpu")
    assert "device: cpu (DS_ACCELERATOR=cpu) | dtype: fp32 (auto: fp32 on CPU)" in capsys.readouterr().err
    monkeypatch.setattr(device, "_ANNOUNCED", None)
    assert inference_device("cpu", "bf16") == torch.device("cpu")
    assert "device: cpu (--device) | dtype: bf16 (--dtype)" in capsys.readouterr().err


def test_cpu_deployment_pins_its_steps_to_the_cpu_and_auto_does_not(monkeypatch):
    from chatrlhf.apps import pipeline

    monkeypatch.delenv("DS_ACCELERATOR")
    cfg = pipeline.TrainPipelineConfig(deployment_type="cpu", data_path=["x"])
    assert pipeline.launch_env(cfg)["DS_ACCELERATOR"] == "cpu"  # asked for by name, also on a GPU host
    cfg = pipeline.TrainPipelineConfig(deployment_type="auto", data_path=["x"])
    assert "DS_ACCELERATOR" not in pipeline.launch_env(cfg)  # each step lets DeepSpeed detect


@pytest.mark.slow
def test_commands_print_the_device_line_and_say_cpu_is_a_fallback(tiny_model_dir, task_data_dir, tmp_path):
    env = _env_without_accelerator()
    # chatrlhf train (the pipeline's own line, before anything runs)
    r = subprocess.run([sys.executable, "-m", "chatrlhf", "train", "--actor-model", str(tiny_model_dir),
                        "--reward-model", str(tiny_model_dir), "--data_path", str(task_data_dir / "data"),
                        "--output-dir", str(tmp_path / "run"), "--dry_run", "--sft", "{dtype: fp32}"],
                       cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       timeout=120)
    assert r.returncode == 0, r.stdout[-3000:]
    assert FALLBACK in r.stdout
    # chat (an inference command): fp32 on CPU
    r = subprocess.run([sys.executable, "-m", "chatrlhf", "chat", "--path", str(tiny_model_dir)], input="quit\n",
                       cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       timeout=120)
    assert r.returncode == 0, r.stdout[-3000:]
    assert FALLBACK + "fp32 (auto: fp32 on CPU)" in r.stdout


@pytest.mark.slow  # over 2 s on a 2-core CPU
def test_a_step_prints_its_device_line_first(task_data_dir, tmp_path):
    # before its own checks (here: a model dir that does not exist, refused at once)
    env = _env_without_accelerator()
    r = subprocess.run([sys.executable, "-m", "chatrlhf", "sft", "--model_name_or_path", str(tmp_path / "nope"),
                        "--data_path", str(task_data_dir / "data"), "--output_dir", str(tmp_path / "sft"),
                        "--dtype", "fp32"],
                       cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       timeout=120)
    assert r.returncode == 2, r.stdout[-3000:]
    assert FALLBACK + "fp32 (--dtype)" in r.stdout
