"""The prepared GPU check: proves the CUDA path and measures it, in one command, within a fixed time.

A GPU machine is lent now and then for about 15 minutes (its start included), one command at most 10, with no
network. So everything is decided here beforehand: which parts run, in what order, and how long each may take
(``PARTS``: the whole stays under 8 minutes). Run through ``scripts/gpu_check.sh``, which first installs the wheels
``make gpu-wheels`` built (``gpu-wheels/``) when the machine lacks them.

Parts, each in its own subprocess with its own time budget (one that overruns is stopped and reported, the rest
still run):
- ``env``: versions, the device DeepSpeed's accelerator detects, its name and memory;
- ``tests``: the device paths (tests/gpu/test_device_paths.py: the strategy at ZeRO 0/2/3 — init, step, save,
  load — and every decoder against ``generate()``), SFT at ZeRO 0/2/3, one PPO iteration per ZeRO stage and with
  LoRA, one GRPO iteration — on the detected device;
- ``bench_real``: the bench on SmolLM2-135M's architecture (matmul peak 8192³ and device bandwidth first; SFT, RM,
  PPO, GRPO, decode; the PPO split into generation / experience / training; decode against the bandwidth bound);
- ``bench_opt``: DeepSpeed-Chat's headline pair, an OPT-1.3B actor with an OPT-350M reward model and critic;
- ``liger``: SFT and PPO on the real size with and without ``--use_liger_kernel``: step time and peak memory.

Without CUDA (here, in CI) the same command runs what a CPU can (env, the device-paths tests on the CPU, a quick
bench on the tiny size), with CPU_SLACK times the budgets, and says plainly that CUDA was not found. Results:
``OUT/gpu_check.json`` and ``OUT/gpu_check.md`` (OUT: ``--out``, else ``$OUT``, else ``gpu_check_out/``), the
bench's own results under ``OUT/bench_*``, logs under ``OUT/logs``. Exit status 0 when every part that ran passed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUDGET_S = 480  # the whole check (the wheel install in gpu_check.sh comes on top: ~20 s)

# The device tests: run on whatever DeepSpeed detects (CHATRLHF_TEST_DEVICE=auto, see tests/conftest.py).
TESTS = ["tests/gpu/test_device_paths.py",
         "tests/steps/test_engine.py::test_zero_stages_train",
         "tests/ppo/test_ppo_step.py::test_one_ppo_iteration_updates_actor_and_critic",
         "tests/ppo/test_ppo_step.py::test_critic_free_algos_run[grpo]"]
# Without CUDA the tests part runs the device-paths file only: the other tests above run on the CPU in `make test`
CPU_TESTS = TESTS[:1]
# Without CUDA every budget is this many times longer: they are sized for the lent GPU machine, and a 2-core CPU may
# be shared (in CI the suite's other worker runs beside this check)
CPU_SLACK = 3

# name -> (seconds allowed, needs CUDA, command after "python"); {out} is the output folder
PARTS: dict[str, tuple[int, bool, list[str]]] = {
    "env": (40, False, ["-c", "import sys; sys.path.insert(0, 'scripts'); import gpu_check; gpu_check.env_main()"]),
    "tests": (130, False, ["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *TESTS]),
    "bench_real": (120, True, ["-m", "bench", "--sizes", "real", "--tasks",
                               "limits,sft,reward,ppo,grpo,decode", "--skip_trl", "--quick", "--timeout", "100",
                               "--out", "{out}/bench_real", "--work_dir", "{work}"]),
    "bench_opt": (110, True, ["-m", "bench", "--sizes", "opt1.3b", "--tasks", "sft,reward,ppo,decode",
                              "--skip_trl", "--quick", "--timeout", "90", "--out", "{out}/bench_opt",
                              "--work_dir", "{work}"]),
    "liger": (70, True, ["-m", "bench", "--sizes", "real", "--tasks", "sft,ppo", "--skip_trl", "--quick",
                         "--liger_compare", "--timeout", "60", "--out", "{out}/bench_liger", "--work_dir", "{work}"]),
    # what a CPU does instead of the CUDA bench: the same bench code on the tiny size, quickly
    "bench_cpu_smoke": (100, False, ["-m", "bench", "--sizes", "tiny", "--tasks", "limits,sft,decode",
                                     "--skip_trl", "--quick", "--timeout", "200", "--out", "{out}/bench_tiny",
                                     "--work_dir", "{work}"]),
}
assert sum(b for n, (b, *_) in PARTS.items() if n != "bench_cpu_smoke") <= BUDGET_S


def device_info() -> dict:
    """What DeepSpeed's accelerator abstraction detects (never a hard-coded device name)."""
    import torch
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    info = {"accelerator": acc.device_name(), "torch": torch.__version__, "python": sys.version.split()[0],
            "cuda": bool(torch.cuda.is_available()) and acc.device_name() == "cuda"}
    if acc.device_name() != "cpu":
        info.update(device_count=acc.device_count(), device_name=acc.get_device_name(0) if hasattr(
            acc, "get_device_name") else torch.cuda.get_device_name(0), total_memory_gib=round(
            acc.total_memory(0) / 2**30, 1))
    import importlib.metadata as md

    for pkg in ("transformers", "deepspeed", "datasets", "peft", "accelerate", "triton", "liger-kernel", "chatrlhf"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            info[pkg] = None
    return info


def env_main() -> None:
    print("GPU_CHECK_ENV " + json.dumps(device_info()), flush=True)


def part_plan(name: str, cuda: bool) -> tuple[int, list[str]]:
    """A part's time budget and command on this machine (see CPU_TESTS and CPU_SLACK)."""
    budget, _, args = PARTS[name]
    if cuda or name == "env":  # env runs before the device is known
        return budget, args
    if name == "tests":
        args = [a for a in args if a not in TESTS] + CPU_TESTS
    return budget * CPU_SLACK, args


def run_part(name: str, out: Path, env: dict, cuda: bool) -> dict:
    budget, args = part_plan(name, cuda)
    work = Path(os.environ.get("GPU_CHECK_WORK") or REPO / ".gpu-check-work")  # models: kept out of OUT
    cmd = [sys.executable, *[a.format(out=out, work=work) for a in args]]
    log = out / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(log, "w") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        try:
            p = subprocess.run(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=budget)
            rc = p.returncode
        except subprocess.TimeoutExpired:
            rc = None
    res = {"part": name, "seconds": round(time.monotonic() - t0, 1), "budget_s": budget, "log": str(log),
           "status": "timeout" if rc is None else ("pass" if rc == 0 else f"fail (exit {rc})")}
    text = log.read_text(errors="replace")
    if name == "env":
        for line in text.splitlines():
            if line.startswith("GPU_CHECK_ENV "):
                res["env"] = json.loads(line[len("GPU_CHECK_ENV "):])
    elif name == "tests":
        tail = [line for line in text.splitlines() if " passed" in line or " failed" in line or " error" in line]
        res["summary"] = tail[-1].strip("= ") if tail else None
    else:
        rj = Path(args[args.index("--out") + 1].format(out=out)) / "results.json"
        res["results"] = str(rj) if rj.exists() else None
    return res


def _bench_lines(path: str | None) -> list[str]:
    """The result tables of a bench run's results.md (its machine and size sections)."""
    if not path:
        return ["(no results written)"]
    md = Path(path).with_name("results.md")
    if not md.exists():
        return ["(no results.md)"]
    text = md.read_text()
    return text.split("## How the figures are computed")[0].splitlines()[2:]


def write_summary(out: Path, report: dict) -> None:
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    env = report.get("env") or {}
    lines = ["# GPU check", "",
             f"Run {report['date']} in {report['seconds']:.0f} s (budget {BUDGET_S} s). Device: "
             f"{env.get('accelerator', '?')} {env.get('device_name', '')} — python {env.get('python')}, torch "
             f"{env.get('torch')}, transformers {env.get('transformers')}, deepspeed {env.get('deepspeed')}.", ""]
    if not report["cuda"]:
        lines += ["**CUDA was not found: the CUDA parts (bench on the real and OPT sizes, Liger-Kernel) did not run.** "
                  "What ran is what a CPU can: the device tests on the CPU and a quick bench on the tiny size.", ""]
    lines += ["| part | status | seconds (budget) | detail |", "|---|---|---|---|"]
    for r in report["parts"]:
        detail = r.get("summary") or r.get("why") or r.get("results") or ""
        lines.append(f"| {r['part']} | {r['status']} | {r.get('seconds', 0):.0f} ({r.get('budget_s', '—')}) | "
                     f"{detail} |")
    for r in report["parts"]:
        if r["part"].startswith(("bench", "liger")) and r["status"] not in ("skipped",):
            lines += ["", f"## {r['part']}", "", *_bench_lines(r.get("results"))]
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out", help="folder for the results")
    ap.add_argument("--parts", default="", help="comma-separated subset of: " + ", ".join(PARTS))
    a = ap.parse_args(argv)
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, CHATRLHF_TEST_DEVICE="auto", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("DS_ACCELERATOR", None)  # DeepSpeed's detection decides
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)  # each part starts its own distributed world (a caller's would clash on its port)
    env["PYTHONPATH"] = os.pathsep.join(x for x in (str(REPO / "src"), env.get("PYTHONPATH", "")) if x)
    t0 = time.monotonic()
    report: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "parts": [], "cuda": False}
    chosen = [p.strip() for p in a.parts.split(",") if p.strip()] or list(PARTS)
    unknown = set(chosen) - set(PARTS)
    if unknown:
        print(f"gpu_check: unknown part(s) {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}",
              file=sys.stderr)
        return 2
    for name in chosen:
        needs_cuda = PARTS[name][1]
        if name != "env" and needs_cuda and not report["cuda"]:
            report["parts"].append({"part": name, "status": "skipped", "why": "CUDA not found"})
            continue
        if name == "bench_cpu_smoke" and report["cuda"]:
            report["parts"].append({"part": name, "status": "skipped", "why": "CUDA found: the CUDA bench runs"})
            continue
        budget = part_plan(name, report["cuda"])[0]
        left = BUDGET_S * (1 if report["cuda"] else CPU_SLACK) - (time.monotonic() - t0)
        if left < budget / 3:
            report["parts"].append({"part": name, "status": "skipped", "why": f"only {left:.0f} s left"})
            continue
        print(f"gpu_check: {name} (up to {budget} s)...", flush=True)
        res = run_part(name, out, env, report["cuda"])
        print(f"gpu_check: {name}: {res['status']} in {res['seconds']} s", flush=True)
        report["parts"].append(res)
        if name == "env" and res.get("env"):
            report["env"], report["cuda"] = res["env"], bool(res["env"].get("cuda"))
            if not report["cuda"]:
                print(f"gpu_check: CUDA not found (DeepSpeed's accelerator: {res['env'].get('accelerator')}); "
                      "running the parts a CPU can", flush=True)
        report["seconds"] = time.monotonic() - t0
        write_summary(out, report)  # after every part: a machine taken back mid-run still leaves results
    report["seconds"] = time.monotonic() - t0
    write_summary(out, report)
    failed = [r["part"] for r in report["parts"] if r["status"] not in ("pass", "skipped")]
    print(f"gpu_check: wrote {out / 'gpu_check.md'} and gpu_check.json; "
          + (f"FAILED: {', '.join(failed)}" if failed else "every part that ran passed"), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
