"""Shared, session-built artifacts for the pipeline tests: the demo's --quick assets (task data + two tiny models
with the same tokenizer) and a third tiny model with a different tokenizer (for the preflight tests)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def quick_assets(tmp_path_factory):
    from chatrlhf.apps.demo import DemoConfig, build_assets

    out = tmp_path_factory.mktemp("pipeline_assets")
    paths = build_assets(out, DemoConfig(quick=True))
    return {k: str(v) for k, v in paths.items()} | {"data": str(paths["task"] / "data")}


@pytest.fixture(scope="session")
def other_tokenizer_model(tmp_path_factory):
    from chatrlhf.models.tiny import build_tiny_model

    out = tmp_path_factory.mktemp("gpt2_model") / "gpt2"
    build_tiny_model("gpt2", out, hidden=32, layers=1, heads=2, vocab=300, max_positions=64)
    return str(out)


def cli_env() -> dict:
    """Environment for `chatrlhf` subprocesses: CPU, offline, one thread (tiny models are latency-bound and the
    test machine's cores are shared), the repo's compiled-op cache."""
    # not this process's own 1-rank group settings (set by any in-process test): a child must start its own
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                          "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
    return env


def run_cli(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chatrlhf", *args], cwd=cwd, env=cli_env(), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
