"""The benchmark as a command: ``python -m bench`` (``make bench``) from the repository root, outside the installed
package; its paths (TRL script, venvs, output folder, the PYTHONPATH its measured processes get); bench/trl.py run
as a script by a python without chatrlhf; the shape rules (short functions, no chatrlhf in bench/trl.py). The
command's whole chain on the tiny size (measured processes, analysis, report) runs in tests/gpu/test_gpu_check.py."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import harness

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench"


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the repository root alone makes it importable
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def _bench(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow  # over 2 s on a 2-core CPU
def test_python_m_bench_help_runs_from_the_repository_root():
    p = _bench("--help")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "usage: python -m bench" in p.stdout and "--skip_trl" in p.stdout and "--sizes" in p.stdout


@pytest.mark.slow  # over 2 s on a 2-core CPU
def test_a_bad_option_is_one_line_and_exit_2():
    p = _bench("--sizes", "huge")
    assert p.returncode == 2
    assert "python -m bench: error: --sizes: unknown size 'huge'" in p.stderr and "Traceback" not in p.stderr


def test_paths_point_into_the_repository():
    assert harness.REPO == REPO and (REPO / "pyproject.toml").exists()
    assert harness.TRL_SCRIPT == BENCH / "trl.py" and harness.TRL_SCRIPT.exists()
    cfg = harness.BenchConfig()
    assert cfg.out_dir == BENCH and cfg.wdir == BENCH / "out"  # wherever the command runs from
    assert harness.BenchConfig(out="x", work_dir="w").wdir == Path("w")
    assert harness.import_roots()[0] == str(REPO)  # measured processes import bench.harness from the root
    env = harness._env(1)
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(REPO)


@pytest.mark.slow  # over 2 s on a 2-core CPU
def test_trl_script_finds_the_trl_package_not_itself(tmp_path):
    """Run as a script, bench/trl.py's folder comes first on sys.path, where the file itself is named trl.py: the
    script must still import the trl package (here a stand-in on PYTHONPATH) and never chatrlhf."""
    (tmp_path / "trl").mkdir()
    (tmp_path / "trl" / "__init__.py").write_text('__version__ = "0.stand-in"\n')
    job = json.dumps({"task": "no-such-task", "threads": 1})
    p = subprocess.run([sys.executable, str(BENCH / "trl.py"), job], cwd=BENCH, capture_output=True, text=True,
                       env=_env(PYTHONPATH=str(tmp_path)), timeout=120)
    line = next((x for x in p.stdout.splitlines() if x.startswith("BENCH_JSON ")), None)
    assert line, p.stdout[-2000:] + p.stderr[-2000:]
    res = json.loads(line[len("BENCH_JSON "):])
    assert res["versions"]["trl"] == "0.stand-in" and res["error"] == "KeyError: 'no-such-task'"


def _functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_no_function_in_bench_is_over_80_lines():
    long = [f"{p.name}:{f.lineno} {f.name}() is {f.end_lineno - f.lineno + 1} lines"
            for p in sorted(BENCH.glob("*.py")) for f in _functions(p) if f.end_lineno - f.lineno + 1 > 80]
    assert not long, long


def test_trl_side_never_imports_chatrlhf_or_the_harness():
    """bench/trl.py runs in the TRL venvs, which do not install chatrlhf."""
    names = set()
    for node in ast.walk(ast.parse((BENCH / "trl.py").read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module or "")
    assert not {n for n in names if n.split(".")[0] in ("chatrlhf", "bench")}, names
