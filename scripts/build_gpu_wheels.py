#!/usr/bin/env python3
"""Build gpu-wheels/: every wheel the prepared GPU check needs that the GPU machine lacks (`make gpu-wheels`).

Why: a GPU machine is lent now and then, for about 15 minutes, with NO network. It has CPython 3.12 with the CUDA
torch stack (the list is ON_GPU_MACHINE below) but no deepspeed, no datasets and not this package. What it lacks
must travel as wheels inside the working tree (64 MiB at most, all together) and is installed there with
`pip install --no-index --no-deps --target DIR gpu-wheels/*.whl` (scripts/gpu_check.sh). Nothing can be resolved
or compiled there, so this script does the resolving here, where PyPI is reachable:

  1. builds chatrlhf's own wheel from this tree (pure Python);
  2. walks Requires-Dist from it, with markers evaluated for CPython 3.12 on Linux x86-64, stopping at packages
     the GPU machine already has (ON_GPU_MACHINE) and at the ones the check never imports (LEFT_OUT);
  3. fetches each remaining package at the version pinned in requirements.lock as a cp312 manylinux x86-64 wheel;
     deepspeed is a source distribution on PyPI, so it is built here into a py3-none-any wheel with DS_BUILD_OPS=0
     and DS_ACCELERATOR=cuda (no op is compiled ahead: DeepSpeed JIT-compiles on the GPU machine; the CUDA
     accelerator makes its metadata and op list the ones a GPU install gets, nvidia-ml-py included);
  4. trims pyarrow (TRIMS): the lock's pyarrow wheel alone is 52 MiB, and with pandas the set would pass 64 MiB.
     The trimmed wheel drops Arrow Flight (an RPC framework nothing here uses; `pyarrow.flight` then raises
     pyarrow's own "not built with flight" ImportError), the test-suite, C++ headers/sources and Cython sources.
     It gets the wheel build tag `0trim` so it is never mistaken for PyPI's file;
  5. writes gpu-wheels/MANIFEST.json (name, version, file, size, sha256, why) and prints the list with the total.

Installing them there (scripts/gpu_check.sh does): `python3 -m pip install --no-index --no-deps --target
DIR gpu-wheels/*.whl`, then PYTHONPATH=DIR and PATH=DIR/bin:$PATH. Two things matter. DIR's path must contain
"site-packages" (e.g. .gpu-site/site-packages): dill, which datasets uses to fingerprint, pickles modules found
elsewhere by value, and `datasets.Dataset.from_dict(..., features=...)` then fails with "Can't pickle <class
'MonthDayNano'>". And DIR/bin must be on PATH: it holds the `ninja` DeepSpeed needs to JIT-compile its ops.

Idempotent: a wheel already in gpu-wheels/ with the right name and version is reused (no network needed then);
chatrlhf's wheel is rebuilt every run (reproducibly, SOURCE_DATE_EPOCH) and replaced only when it changed; wheels
no longer part of the set are removed. Exit status: 0 ok, 1 a build/download problem, 2 the set passes 64 MiB.

    .venv/bin/python scripts/build_gpu_wheels.py [--out gpu-wheels] [--lock requirements.lock]
"""

from __future__ import annotations

import argparse
import base64
import csv
import email.parser
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from packaging import tags
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
LIMIT_BYTES = 64 * 2**20  # what may travel inside the working tree, all together

# ---- the GPU machine, in one place ---------------------------------------------------------------------------
# What its python3 (CPython 3.12) already has. The first line is what the machine was described with; the rest is
# what those pull in and is assumed present (huggingface_hub, requests, jinja2, sympy, ... are dependencies of
# torch / transformers / pytest). A requirement on one of these stops the walk: its version there is not checked.
ON_GPU_MACHINE = frozenset(canonicalize_name(n) for n in """
    torch transformers peft accelerate triton pytest numpy safetensors tokenizers
    huggingface_hub filelock packaging pyyaml regex requests tqdm jinja2 networkx sympy fsspec typing_extensions
    psutil setuptools
""".split())

TARGET_PYTHON = "3.12"
# PEP 508 marker environment of that interpreter (Requires-Dist markers are evaluated against it, extra="")
TARGET_ENV = {
    "implementation_name": "cpython", "implementation_version": "3.12.0", "os_name": "posix",
    "platform_machine": "x86_64", "platform_python_implementation": "CPython", "platform_release": "",
    "platform_system": "Linux", "platform_version": "", "python_full_version": "3.12.0",
    "python_version": TARGET_PYTHON, "sys_platform": "linux",
}
# `pip download` flags for a CPython 3.12 manylinux x86-64 wheel (manylinux_2_28 = glibc 2.28, RHEL 8 / Ubuntu 20.04)
PIP_TARGET_FLAGS = ["--python-version", TARGET_PYTHON, "--implementation", "cp", "--abi", "cp312",
                    "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64",
                    "--platform", "manylinux_2_28_x86_64"]
TARGET_PLATFORMS = [f"manylinux_2_{m}_x86_64" for m in range(28, 4, -1)] + [
    "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
# every wheel tag that CPython 3.12 on a glibc >= 2.28 x86-64 Linux accepts (py3-none-any included)
TARGET_TAGS = frozenset(tags.cpython_tags((3, 12), abis=["cp312"], platforms=TARGET_PLATFORMS)) | frozenset(
    tags.compatible_tags((3, 12), interpreter="cp312", platforms=TARGET_PLATFORMS))

# ---- what the check does not need ---------------------------------------------------------------------------
# chatrlhf requires these, but only for commands the GPU check never runs; each is imported inside a function, not
# at module level (tests/gpu/test_gpu_wheels.py holds chatrlhf to that). name -> (why, top-level import names)
LEFT_OUT = {
    canonicalize_name("matplotlib"): ("plots of `chatrlhf report` only (imported inside report.py's plot function)",
                                      ("matplotlib",)),
    canonicalize_name("fastapi"): ("the OpenAI-compatible server `chatrlhf serve` only (imported inside apps/serve/)",
                                   ("fastapi", "starlette")),
    canonicalize_name("uvicorn"): ("the OpenAI-compatible server `chatrlhf serve` only (imported inside apps/serve/)",
                                   ("uvicorn",)),
    canonicalize_name("tensorboard"): ("only with --enable_tensorboard (off by default); metrics.py imports "
                                       "torch.utils.tensorboard lazily", ("tensorboard", "torch.utils.tensorboard")),
}

# ---- versions ----------------------------------------------------------------------------------------------
# Needed by the set but not in requirements.lock (the lock is made on a CPU machine): name -> (version, why).
NOT_IN_LOCK = {
    # DeepSpeed's setup.py adds nvidia-ml-py (pynvml) to its requirements only when built for CUDA
    canonicalize_name("nvidia-ml-py"): ("13.615.71", "deepspeed requires it when built for CUDA; the CPU lock has "
                                                     "no such entry (newest release when this was written)"),
    # --use_liger_kernel (GPU only: Triton kernels), measured by the check's liger part; never installed on CPU
    canonicalize_name("liger-kernel"): ("0.8.5", "the GPU check's --use_liger_kernel part; a GPU-only package "
                                                 "(newest release when this was written)"),
}
# Wanted by the GPU check beyond what chatrlhf's wheel requires (no CPU install needs them): walked like its needs.
EXTRA_ROOTS = ("liger-kernel",)
# A locked version without a cp312 manylinux x86-64 wheel would be replaced here: name -> (version, why). None is.
VERSION_OVERRIDES: dict[str, tuple[str, str]] = {}

# Built here from PyPI's source distribution: name -> extra environment for the build
SOURCE_BUILDS = {
    canonicalize_name("deepspeed"): {"DS_BUILD_OPS": "0", "DS_ACCELERATOR": "cuda"},
}


def _pyarrow_drop(path: str) -> bool:
    """True for the pyarrow wheel members the GPU check never loads (see the docstring, step 4)."""
    name = path.rsplit("/", 1)[-1]
    return (path.startswith(("pyarrow/tests/", "pyarrow/include/", "pyarrow/src/"))
            or name.endswith((".pyx", ".pxd", ".pxi", ".h", ".hpp", ".cc", ".cpp"))
            or name.startswith(("libarrow_flight.so", "libarrow_python_flight.so", "_flight.cpython-",
                                "_pyarrow_cpp_tests.cpython-")))


# name -> (member filter, wheel build tag of the trimmed wheel, what was dropped). Bump the build tag (1trim, ...)
# when a filter changes: a wheel is reused by name, version and build tag.
TRIMS = {
    canonicalize_name("pyarrow"): (_pyarrow_drop, "0trim",
                                   "trimmed: Arrow Flight, test-suite, C++ headers/sources and Cython sources removed"),
}


class BuildError(Exception):
    """A problem with a clear message; main() prints it and exits 1."""


def parse_lock(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            spec = list(req.specifier)
            if len(spec) != 1 or spec[0].operator != "==":
                raise BuildError(f"{path}: expected NAME==VERSION, got {line!r}")
            pins[canonicalize_name(req.name)] = spec[0].version
    return pins


def wheel_metadata(whl: Path) -> email.message.Message:
    with zipfile.ZipFile(whl) as z:
        meta = [n for n in z.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1]
        if len(meta) != 1:
            raise BuildError(f"{whl.name}: expected one .dist-info/METADATA, found {meta}")
        return email.parser.BytesParser().parsebytes(z.read(meta[0]))


def requirements_for(whl: Path, extras: frozenset[str] = frozenset()) -> list[Requirement]:
    """Requires-Dist of the wheel that apply on the GPU machine (markers for CPython 3.12 Linux x86-64)."""
    out = []
    for line in wheel_metadata(whl).get_all("Requires-Dist") or []:
        req = Requirement(line)
        if req.marker is None or any(req.marker.evaluate({**TARGET_ENV, "extra": e}) for e in ("", *extras)):
            out.append(req)
    return out


def fits_target(whl: Path) -> bool:
    return bool(parse_wheel_filename(whl.name)[3] & TARGET_TAGS)


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


NETWORK_ERRORS = ("NewConnectionError", "Max retries exceeded", "Temporary failure in name resolution",
                  "Network is unreachable", "ConnectTimeout", "ReadTimeout", "ProxyError", "Connection refused")


def run(cmd: list[str], what: str, env: dict | None = None, hint: str = "") -> None:
    """Run a pip command; on failure raise BuildError naming what failed, why if known, and pip's last lines."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode == 0:
        return
    text = proc.stdout + proc.stderr
    lines = [ln for ln in text.strip().splitlines()
             if "is ignored: it is neither a file nor a directory" not in ln]  # pip's local-mirror config noise
    if any(s in text for s in NETWORK_ERRORS):
        what = f"{what}: PyPI is not reachable from here (run `make gpu-wheels` on a machine with network access)"
    elif hint:
        what = f"{what} ({hint})"
    raise BuildError(f"{what}; pip exited {proc.returncode}:\n    " + "\n    ".join(lines[-12:]))


def pip(*args: str) -> list[str]:
    return [sys.executable, "-m", "pip", *args, "--disable-pip-version-check", "--progress-bar", "off"]


def build_env(extra: dict | None = None) -> dict:
    env = dict(os.environ, SOURCE_DATE_EPOCH="1700000000", PYTHONDONTWRITEBYTECODE="1", **(extra or {}))
    env.pop("DS_BUILD_STRING", None)
    return env


def build_chatrlhf(tmp: Path) -> Path:
    """chatrlhf's wheel from a clean copy of this tree (no stale build/ left-overs, nothing written into the tree)."""
    src = tmp / "chatrlhf-src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    dist = tmp / "chatrlhf-dist"
    run(pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "--no-cache-dir", "-w", str(dist), str(src)),
        "building chatrlhf's wheel", env=build_env())
    (whl,) = dist.glob("chatrlhf-*.whl")
    return whl


def fetch(name: str, version: str, tmp: Path) -> Path:
    """name==version as a wheel for the GPU machine: downloaded, or built from PyPI's sdist (SOURCE_BUILDS)."""
    dl = tmp / f"dl-{name}"
    dl.mkdir()
    net = ["--timeout", "60", "--retries", "2"]
    if name in SOURCE_BUILDS:
        env = build_env(SOURCE_BUILDS[name])
        run(pip("download", "--no-deps", "--no-binary=:all:", "--no-build-isolation", *net, "-d", str(dl),
                f"{name}=={version}"), f"downloading the source distribution of {name}=={version}", env=env)
        (sdist,) = [p for p in dl.iterdir() if p.name.endswith((".tar.gz", ".zip"))]
        out = tmp / f"built-{name}"
        run(pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "--no-cache-dir", "-w", str(out),
                str(sdist)), f"building {name}=={version} from {sdist.name} (DS_BUILD_OPS=0)", env=env)
        (whl,) = out.glob("*.whl")
    else:
        run(pip("download", "--no-deps", "--only-binary=:all:", *PIP_TARGET_FLAGS, *net, "-d", str(dl),
                f"{name}=={version}"),
            f"downloading {name}=={version} as a CPython {TARGET_PYTHON} manylinux x86-64 wheel",
            hint="if this version has no such wheel, pick the nearest that does in VERSION_OVERRIDES")
        (whl,) = dl.glob("*.whl")
    if not fits_target(whl):
        raise BuildError(f"{whl.name} does not install on CPython {TARGET_PYTHON} manylinux x86-64")
    return whl


def trim_wheel(whl: Path, drop, build_tag: str, out_dir: Path) -> Path:
    """A copy of the wheel without the members drop(path) selects, RECORD rewritten, named with build_tag."""
    parts = whl.name[:-4].split("-")  # name-version[-build]-python-abi-platform
    target = out_dir / ("-".join([parts[0], parts[1], build_tag, *parts[-3:]]) + ".whl")
    record_rows = []
    with zipfile.ZipFile(whl) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as dst:
        members = [i for i in src.infolist() if not drop(i.filename)]
        record = next(i.filename for i in members if i.filename.endswith(".dist-info/RECORD"))
        for info in members:
            if info.filename == record:
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/WHEEL"):
                data = data.rstrip(b"\n") + f"\nBuild: {build_tag}\n".encode()
            dst.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record_rows.append((info.filename, f"sha256={digest}", len(data)))
        record_rows.append((record, "", ""))
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(record_rows)
        dst.writestr(src.getinfo(record), buf.getvalue(), compress_type=zipfile.ZIP_DEFLATED)
    return target


def existing_wheel(out: Path, name: str, version: str) -> Path | None:
    build = TRIMS[name][1] if name in TRIMS else None
    for whl in out.glob("*.whl"):
        try:
            n, v, b, _ = parse_wheel_filename(whl.name)
        except Exception:
            continue
        if n == name and v == Version(version) and ("".join(map(str, b)) or None) == build and fits_target(whl):
            return whl
    return None


def place(whl: Path, out: Path) -> Path:
    """Move a finished wheel into out/ atomically: an interrupted run never leaves a partial wheel to be reused."""
    part = out / (whl.name + ".part")
    shutil.copyfile(whl, part)
    os.replace(part, out / whl.name)
    return out / whl.name


def human(n: int) -> str:
    return f"{n / 2**20:6.2f} MiB" if n >= 2**20 else f"{n / 2**10:6.1f} KiB"


def build(out: Path, lock: Path) -> dict:
    pins = parse_lock(lock)
    out.mkdir(parents=True, exist_ok=True)
    for part in out.glob("*.part"):  # left by an interrupted run
        part.unlink()
    entries: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="gpu-wheels-") as tmp_s:
        tmp = Path(tmp_s)
        # 1. this package, always rebuilt from the tree, replaced only when it changed
        fresh = build_chatrlhf(tmp)
        existing = out / fresh.name
        if not existing.exists() or sha256(existing) != sha256(fresh):
            existing = place(fresh, out)
        _, cver, _, _ = parse_wheel_filename(existing.name)
        entries["chatrlhf"] = dict(name="chatrlhf", version=str(cver), file=existing.name, why="this package",
                                   source="built from this tree")
        queue = [(req, "chatrlhf") for req in requirements_for(existing)]
        queue += [(Requirement(name), "chatrlhf") for name in EXTRA_ROOTS]

        # 2. walk Requires-Dist
        extras_seen: dict[str, set[str]] = {"chatrlhf": set()}
        while queue:
            req, parent = queue.pop(0)
            name = canonicalize_name(req.name)
            if name in ON_GPU_MACHINE:
                skipped.setdefault(name, "on the GPU machine")
                if req.extras:
                    print(f"note: {parent} requires {req}; the extras of {name} are assumed present on the GPU machine")
                continue
            if name in LEFT_OUT:
                skipped.setdefault(name, f"left out: {LEFT_OUT[name][0]}")
                continue
            new_extras = set(req.extras) - extras_seen.get(name, set())
            if name in entries:
                if new_extras:  # already in, but an extra of it adds requirements
                    extras_seen[name] |= new_extras
                    queue += [(r, name) for r in requirements_for(out / entries[name]["file"], frozenset(new_extras))]
                if not req.specifier.contains(entries[name]["version"], prereleases=True):
                    raise BuildError(f"{parent} requires {req}, but the set has {name}=={entries[name]['version']}")
                continue
            if name in VERSION_OVERRIDES:
                version, note = VERSION_OVERRIDES[name]
                note = f"version {version} instead of the lock's {pins.get(name)}: {note}"
            elif name in pins:
                version, note = pins[name], ""
            elif name in NOT_IN_LOCK:
                version, note = NOT_IN_LOCK[name]
                note = f"not in {lock.name}: {note}"
            else:
                raise BuildError(f"{parent} requires {req}, which is not in {lock.name}: pin it in NOT_IN_LOCK, or "
                                 f"list it in ON_GPU_MACHINE / LEFT_OUT (scripts/build_gpu_wheels.py)")
            if not req.specifier.contains(version, prereleases=True):
                raise BuildError(f"{parent} requires {req}, but the pinned version is {name}=={version}")
            whl = existing_wheel(out, name, version)
            if whl is None:
                print(f"fetching {name}=={version} ...", flush=True)
                whl = fetch(name, version, tmp)
                if name in TRIMS:
                    drop, build_tag, _ = TRIMS[name]
                    whl = trim_wheel(whl, drop, build_tag, tmp)
                whl = place(whl, out)
            notes = [note] if note else []
            if name in SOURCE_BUILDS:
                source = "built here from PyPI's source distribution"
                notes.insert(0, "py3-none-any, " + " ".join(f"{k}={v}" for k, v in SOURCE_BUILDS[name].items()))
            elif name in TRIMS:
                source = "PyPI's wheel, trimmed here"
                notes.insert(0, TRIMS[name][2])
            else:
                source = "PyPI's wheel"
            why = f"{name} <- " + ("chatrlhf" if parent == "chatrlhf" else entries[parent]["why"])
            entries[name] = dict(name=name, version=version, file=whl.name, why=why, source=source)
            if notes:
                entries[name]["note"] = "; ".join(notes)
            extras_seen[name] = set(req.extras)
            queue += [(r, name) for r in requirements_for(whl, frozenset(req.extras))]

    # 3. drop what is no longer part of the set; record sizes and hashes
    keep = {e["file"] for e in entries.values()}
    for stale in out.glob("*.whl"):
        if stale.name not in keep:
            print(f"removing {stale.name} (no longer part of the set)")
            stale.unlink()
    for e in entries.values():
        path = out / e["file"]
        e["size"], e["sha256"] = path.stat().st_size, sha256(path)
    wheels = sorted(entries.values(), key=lambda e: -e["size"])
    total = sum(e["size"] for e in wheels)
    manifest = {
        "what": "wheels the GPU check needs that the GPU machine lacks (scripts/build_gpu_wheels.py)",
        "install": "python3 -m pip install --no-index --no-deps --target DIR gpu-wheels/*.whl; then PYTHONPATH=DIR "
                   "and PATH=DIR/bin:$PATH (ninja); DIR's path must contain 'site-packages' (datasets' dill pickles "
                   "modules elsewhere by value and fails)",
        "target": f"CPython {TARGET_PYTHON}, manylinux x86-64",
        "lock": lock.name, "lock_sha256": sha256(lock),
        "total_bytes": total, "limit_bytes": LIMIT_BYTES,
        "wheels": [{k: e[k] for k in ("name", "version", "file", "size", "sha256", "why", "source", "note")
                    if k in e} for e in wheels],
        "not_included": dict(sorted(skipped.items())),
        "assumed_on_gpu_machine": sorted(ON_GPU_MACHINE),
    }
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "gpu-wheels", help="output folder (default: gpu-wheels/)")
    ap.add_argument("--lock", type=Path, default=REPO / "requirements.lock", help="the pinned versions")
    args = ap.parse_args(argv)
    t0 = time.time()
    try:
        manifest = build(args.out.resolve(), args.lock.resolve())
    except BuildError as e:
        print(f"build_gpu_wheels: {e}", file=sys.stderr)
        return 1
    rows = manifest["wheels"]
    width = max(len(e["file"]) for e in rows)
    print(f"\n{len(rows)} wheels for CPython {TARGET_PYTHON} manylinux x86-64 in {args.out}:")
    for e in rows:
        print(f"  {e['file']:<{width}}  {human(e['size'])}  {e['why']}" + (f"  [{e['note']}]" if "note" in e else ""))
    total = manifest["total_bytes"] + (args.out / "MANIFEST.json").stat().st_size
    print(f"  {'total (with MANIFEST.json)':<{width}}  {human(total)}  of {human(LIMIT_BYTES).strip()} "
          f"({time.time() - t0:.0f} s)")
    print("not included: " + ", ".join(f"{k} ({v.split(':')[0]})" for k, v in manifest["not_included"].items()))
    if total > LIMIT_BYTES:
        print(f"build_gpu_wheels: the set is {human(total).strip()}, over the {human(LIMIT_BYTES).strip()} that may "
              f"travel with the working tree: trim a wheel (TRIMS), leave out what the check does not import "
              f"(LEFT_OUT), or pick smaller versions (VERSION_OVERRIDES)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
