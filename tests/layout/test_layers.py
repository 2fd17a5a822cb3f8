"""The layering contracts (pyproject.toml [tool.importlinter]) hold, and would fail on an import that points up."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(tree: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    return subprocess.run([str(LINT), "--config", str(tree / "pyproject.toml"), "--no-cache"], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("layers")
    shutil.copytree(REPO / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


@pytest.mark.parametrize("module,line,broken", [
    ("engine/strategy.py", "from chatrlhf.trainers import common as _up", "layers"),  # engine -> trainers
    ("models/loading.py", "import chatrlhf.apps.pipeline as _up", "layers"),  # models -> apps
    ("data/phases.py", "from chatrlhf.models import loading as _up", "layers"),  # data -> models
    ("algo/rlhf_math.py", "import deepspeed as _up", "pure"),  # algo -> DeepSpeed
])
def test_an_upward_import_breaks_a_contract(tree, module, line, broken):
    f = tree / "src" / "chatrlhf" / module
    original = f.read_text()
    f.write_text(original + f"\n{line}  # probe\n")
    try:
        r = _lint(tree)
    finally:
        f.write_text(original)
    assert r.returncode != 0, r.stdout
    out = " ".join(r.stdout.split())
    assert "BROKEN" in out and broken in out.split("BROKEN")[0].rsplit("KEPT", 1)[-1], out[-2000:]


def test_the_tree_as_it_is_keeps_every_contract(tree):
    r = _lint(tree)
    assert r.returncode == 0 and "BROKEN" not in r.stdout, r.stdout[-2000:]


@pytest.mark.slow  # over 2 s on a 2-core CPU
def test_the_wheel_holds_the_package_and_no_benchmark_code(tmp_path):
    import zipfile

    src = tmp_path / "tree"
    shutil.copytree(REPO / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "bench", src / "bench", ignore=shutil.ignore_patterns("out", "__pycache__"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("chatrlhf-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "chatrlhf/trainers/ppo/trainer.py" in names and "chatrlhf/engine/decode.c" in names
    assert not [n for n in names if "bench" in n.split("/")[-1] or n.startswith("bench/")], names
