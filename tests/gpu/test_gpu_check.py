"""scripts/gpu_check.sh on a machine without CUDA (CI, this CPU): it runs what a CPU can — the environment, the
device tests on the CPU, a quick bench on the tiny size (the suite's end-to-end run of the bench command) — says
plainly that CUDA was not found, and leaves its JSON and markdown summary; the CUDA parts are listed as not run, with
the reason."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run(*args, out):
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", GPU_CHECK_WORK=str(out / "work"))
    return subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--out", str(out), *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=700)


@pytest.mark.slow
@pytest.mark.heavy  # minutes: scheduled first
def test_cpu_runs_its_parts_and_says_cuda_was_not_found(tmp_path):
    p = _run(out=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "CUDA not found" in p.stdout
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["cuda"] is False and report["env"]["accelerator"] == "cpu"
    status = {r["part"]: r for r in report["parts"]}
    assert status["env"]["status"] == status["tests"]["status"] == status["bench_cpu_smoke"]["status"] == "pass"
    assert " passed" in status["tests"]["summary"] and "failed" not in status["tests"]["summary"]
    for part in ("bench_real", "bench_opt", "liger"):
        assert status[part] == {"part": part, "status": "skipped", "why": "CUDA not found"}
    md = (tmp_path / "gpu_check.md").read_text()
    assert "CUDA was not found" in md and "| tests | pass |" in md
    # the bench's whole chain on the tiny size: the command, measured worker processes (they import bench.harness
    # through the PYTHONPATH they are handed), the analysis and the report, where it was told to write them
    results = Path(status["bench_cpu_smoke"]["results"])
    assert results.parent == tmp_path / "bench_tiny"
    ours = json.loads(results.read_text())["sizes"]["tiny"]["rows"]["sft"]["ours"]
    log = tmp_path / "work" / "logs" / "ours_tiny_sft.log"
    assert ours.get("tokens_per_s", 0) > 0, (ours, log.read_text()[-3000:] if log.exists() else "no log")
    bench_md = (results.parent / "results.md").read_text()
    assert "`python -m bench --sizes tiny" in bench_md and "| SFT |" in bench_md
    assert report["seconds"] < 480


@pytest.mark.slow  # over 2 s on a 2-core CPU
def test_budgets_fit_the_lent_machine_and_bad_parts_are_refused(tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    cuda_run = sum(b for name, (b, *_) in gpu_check.PARTS.items() if name != "bench_cpu_smoke")
    assert cuda_run <= gpu_check.BUDGET_S <= 8 * 60
    assert all(b <= 600 for b, *_ in gpu_check.PARTS.values())  # one command on the lent machine: 10 minutes at most
    p = _run("--parts", "env,warp_drive", out=tmp_path)
    assert p.returncode == 2 and "unknown part(s) warp_drive" in p.stderr
    # the CUDA run's test ids (the CPU runs only the first file of them) name tests that exist
    c = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider",
                        *gpu_check.TESTS], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert c.returncode == 0, c.stdout[-2000:]
    assert gpu_check.part_plan("tests", cuda=False)[1][-1:] == gpu_check.CPU_TESTS
    assert gpu_check.part_plan("tests", cuda=True) == (130, gpu_check.PARTS["tests"][2])
