"""gpu-wheels/ (`make gpu-wheels`, scripts/build_gpu_wheels.py): the wheels the offline GPU machine lacks.

The set is (re)built first: the builder is idempotent, so this downloads only when gpu-wheels/ is missing or stale
(a wheel missing, or at another version than requirements.lock pins) and rebuilds chatrlhf's own wheel from the tree.
Needs PyPI when something is missing; without network the tests fail with the builder's message, never skip.
Then, for CPython 3.12 manylinux x86-64 (the GPU machine): the set fits in 64 MiB, every Requires-Dist is met by
the set plus what the machine has, and the set installs into a clean --target with chatrlhf, deepspeed and datasets
in it. The cp312 binaries cannot be imported on this python, so the trimmed pyarrow is checked with this python's
own pyarrow, trimmed the same way, under the operations chatrlhf's data code performs with datasets.
"""

from __future__ import annotations

import ast
import email.parser
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name, parse_wheel_filename

REPO = Path(__file__).resolve().parents[2]
WHEELS = REPO / "gpu-wheels"
SCRIPT = REPO / "scripts" / "build_gpu_wheels.py"

pytestmark = pytest.mark.slow  # downloads (the first time) and installs ~60 MiB of wheels


def _load_builder():
    spec = importlib.util.spec_from_file_location("build_gpu_wheels", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


B = _load_builder()  # the GPU machine's package list, the marker environment and the target tags live there


@pytest.fixture(scope="module")
def wheel_set() -> dict:
    """Build gpu-wheels/ (a no-op apart from chatrlhf's wheel when it is up to date); its MANIFEST.json."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(WHEELS)], capture_output=True, text=True,
                          cwd=REPO, timeout=1500)
    if proc.returncode != 0:
        pytest.fail(f"`make gpu-wheels` (scripts/build_gpu_wheels.py) failed with exit {proc.returncode}"
                    f"{' (the set is over 64 MiB)' if proc.returncode == 2 else ''}:\n{proc.stdout[-3000:]}"
                    f"\n{proc.stderr[-3000:]}", pytrace=False)
    return json.loads((WHEELS / "MANIFEST.json").read_text())


def _metadata(whl: Path):
    with zipfile.ZipFile(whl) as z:
        (meta,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1]
        return email.parser.BytesParser().parsebytes(z.read(meta))


def test_set_fits_and_matches_its_manifest(wheel_set):
    files = sorted(WHEELS.iterdir())
    total = sum(p.stat().st_size for p in files)
    assert total < B.LIMIT_BYTES, f"gpu-wheels/ is {total / 2**20:.2f} MiB, over the 64 MiB that may travel"
    listed = {w["file"]: w for w in wheel_set["wheels"]}
    assert {p.name for p in files if p.suffix == ".whl"} == set(listed), "gpu-wheels/ and MANIFEST.json disagree"
    for name, w in listed.items():
        data = (WHEELS / name).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (w["size"], w["sha256"]), f"{name} changed"
        assert w["why"], name
    pins = B.parse_lock(REPO / "requirements.lock")
    for w in wheel_set["wheels"]:  # pinned to the lock, unless the builder says why not
        if w["name"] != "chatrlhf" and pins.get(w["name"]) != w["version"]:
            assert "note" in w and ("lock" in w["note"]), f"{w['name']}=={w['version']} is not the lock's version"
    assert {"chatrlhf", "deepspeed", "datasets"} <= {w["name"] for w in wheel_set["wheels"]}


def test_a_set_over_the_limit_fails_with_exit_2(wheel_set, tmp_path, monkeypatch, capsys):
    out = tmp_path / "gpu-wheels"
    shutil.copytree(WHEELS, out)  # reused as they are: nothing is downloaded
    monkeypatch.setattr(B, "LIMIT_BYTES", 2**20)
    assert B.main(["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "over the" in err and "1.00 MiB" in err, err


def test_every_wheel_is_for_cpython312_manylinux_x86_64(wheel_set):
    bad = []
    for w in wheel_set["wheels"]:
        whl = WHEELS / w["file"]
        if not parse_wheel_filename(whl.name)[3] & B.TARGET_TAGS:
            bad.append(f"{whl.name}: no tag CPython 3.12 manylinux x86-64 accepts")
        requires_python = _metadata(whl).get("Requires-Python")
        if requires_python and not SpecifierSet(requires_python).contains(B.TARGET_PYTHON + ".0"):
            bad.append(f"{whl.name}: Requires-Python {requires_python}")
    assert not bad, "\n".join(bad)
    assert any(w["file"].startswith("deepspeed-") and w["file"].endswith("-py3-none-any.whl")
               for w in wheel_set["wheels"]), "deepspeed should be a pure-Python wheel (DS_BUILD_OPS=0)"


def test_every_requirement_is_met_on_the_gpu_machine(wheel_set):
    """Requires-Dist (markers for CPython 3.12 Linux x86-64) of every wheel: in the set at an allowed version, or on
    the GPU machine (ON_GPU_MACHINE); chatrlhf alone may require a LEFT_OUT package (a command the check never runs)."""
    have = {w["name"]: w["version"] for w in wheel_set["wheels"]}
    unmet = []
    for w in wheel_set["wheels"]:
        for line in _metadata(WHEELS / w["file"]).get_all("Requires-Dist") or []:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({**B.TARGET_ENV, "extra": ""}):
                continue
            name = canonicalize_name(req.name)
            if name in have:
                if not req.specifier.contains(have[name], prereleases=True):
                    unmet.append(f"{w['name']} requires {req}; the set has {name}=={have[name]}")
            elif name in B.ON_GPU_MACHINE:
                continue
            elif name in B.LEFT_OUT and w["name"] == "chatrlhf":
                continue
            else:
                unmet.append(f"{w['name']} requires {req}: not in the set, not on the GPU machine")
    assert not unmet, "\n".join(unmet)


def test_left_out_packages_are_never_imported_at_module_level():
    """LEFT_OUT (matplotlib, fastapi, uvicorn, tensorboard) may only be imported inside functions: importing any
    chatrlhf module must work on the GPU machine without them."""
    banned = {mod for _, mods in B.LEFT_OUT.values() for mod in mods}

    def module_level(body):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if isinstance(node, ast.Import):
                yield from (a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                yield node.module
            for field in ("body", "orelse", "finalbody", "handlers"):
                yield from module_level(getattr(node, field, []) or [])

    found = []
    for path in sorted((REPO / "src" / "chatrlhf").rglob("*.py")):
        for mod in module_level(ast.parse(path.read_text(), str(path)).body):
            if any(mod == b or mod.startswith(b + ".") for b in banned):
                found.append(f"{path.relative_to(REPO)}: module-level import of {mod}")
    assert not found, "\n".join(found) + "\n(these packages are not in gpu-wheels/: import them inside functions)"


def test_set_installs_into_a_clean_target(wheel_set, tmp_path):
    target = tmp_path / "site"
    wheels = sorted(str(p) for p in WHEELS.glob("*.whl"))
    # a glibc 2.28 machine: pip does not widen --platform manylinux_2_28 to the older manylinux tags such a machine
    # accepts (ninja and pydantic-core are tagged manylinux2014 / manylinux_2_17 only), so each one is named
    platforms = [arg for platform in B.TARGET_PLATFORMS for arg in ("--platform", platform)]
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-index", "--no-deps",
           "--target", str(target), "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312",
           *platforms, "--only-binary=:all:", *wheels]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"pip install --target failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    for pkg in ("chatrlhf", "deepspeed", "datasets", "pyarrow", "pandas"):
        assert (target / pkg / "__init__.py").is_file(), f"{pkg}/ missing from the installed target"
    dist_infos = {p.name for p in target.glob("*.dist-info")}
    for w in wheel_set["wheels"]:
        name, version, _, _ = parse_wheel_filename(w["file"])
        assert f"{name.replace('-', '_')}-{version}.dist-info" in {d.lower() for d in dist_infos} | dist_infos, \
            f"no dist-info for {name}=={version} in the target"
    assert (target / "bin" / "ninja").is_file(), "ninja (DeepSpeed's JIT builds; DIR/bin goes on PATH)"
    assert list((target / "pyarrow").glob("lib.cpython-312-x86_64-linux-gnu.so")), "pyarrow's cp312 extension"
    assert (target / "deepspeed" / "ops" / "csrc" / "adam").is_dir(), "deepspeed's op sources (JIT on the GPU)"
    installed = (target / "deepspeed" / "git_version_info_installed.py").read_text()
    assert "accelerator_name='cuda'" in installed, installed


def test_trimmed_pyarrow_still_serves_datasets(tmp_path):
    """This python's pyarrow (the lock's version), trimmed by the same rule as the cp312 wheel, under what chatrlhf's
    data code does with datasets: Features with int32 lists, from_dict, save_to_disk / load_from_disk, map, torch
    format, parquet and json; pyarrow.flight must fail with pyarrow's own ImportError."""
    import pyarrow

    drop, _, _ = B.TRIMS["pyarrow"]
    src = Path(pyarrow.__file__).parent
    # "site-packages" in the path, as on the GPU machine: dill (datasets' fingerprints) pickles modules found
    # elsewhere by value, and from_dict(..., features=...) then fails on pyarrow's MonthDayNano, trimmed or not
    dst = tmp_path / "site-packages" / "pyarrow"
    dropped = []
    for path in sorted(src.rglob("*")):
        rel = "pyarrow/" + path.relative_to(src).as_posix()
        if path.is_dir() or "__pycache__" in rel:
            continue
        if drop(rel):
            dropped.append(rel)
            continue
        (dst / path.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dst / path.relative_to(src))
    assert any("libarrow_flight" in d for d in dropped) and any(d.startswith("pyarrow/tests/") for d in dropped)
    code = textwrap.dedent(f"""
        import json, pathlib
        import pyarrow, pyarrow.parquet as pq, pyarrow.compute as pc
        assert pyarrow.__file__.startswith({str(dst)!r}), pyarrow.__file__
        import datasets
        tmp = pathlib.Path({str(tmp_path)!r})
        seq = datasets.List(datasets.Value("int32"))
        feats = datasets.Features({{"input_ids": seq, "labels": seq}})
        ds = datasets.Dataset.from_dict({{"input_ids": [[1, 2, 3], [4, 5]], "labels": [[1, 2, 3], [4, 5]]}},
                                        features=feats)
        ds.save_to_disk(str(tmp / "split"))
        back = datasets.load_from_disk(str(tmp / "split")).map(lambda r: {{"n": len(r["input_ids"])}})
        assert back["n"] == [3, 2] and back[1]["input_ids"] == [4, 5]
        assert back.with_format("torch")[0]["input_ids"].tolist() == [1, 2, 3]
        assert pc.sum(pyarrow.array([1, 2, 3])).as_py() == 6
        pq.write_table(pyarrow.table({{"prompt": ["a", "b"]}}), tmp / "rows.parquet")
        assert pq.read_table(tmp / "rows.parquet").to_pylist() == [{{"prompt": "a"}}, {{"prompt": "b"}}]
        (tmp / "rows.json").write_text("\\n".join(json.dumps({{"prompt": p}}) for p in "xyz"))
        js = datasets.load_dataset("json", data_files=str(tmp / "rows.json"), split="train",
                                   cache_dir=str(tmp / "hf"))
        assert js["prompt"] == ["x", "y", "z"]
        try:
            import pyarrow.flight  # noqa: F401
            has_flight = True
        except ImportError:
            has_flight = False
        assert not has_flight, "pyarrow.flight imported from the trimmed pyarrow"
        print("ok")
    """)
    env = dict(os.environ, PYTHONPATH=str(dst.parent), HF_HOME=str(tmp_path / "hf_home"), HF_DATASETS_OFFLINE="1",
               HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-3000:] + proc.stderr[-3000:]
