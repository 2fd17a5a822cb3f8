"""``chatrlhf train``: steps 1 -> 2 -> 3 (SFT, reward model, PPO) in one command, DeepSpeed-Chat's e2e launcher.

How a run goes, top to bottom:

1. Resolve one full config per step: the step's dataclass defaults < values the pipeline derives (model paths,
   output dirs, data flags, ZeRO stages) < the YAML's per-step section (``sft:``, ``reward:``, ``ppo:``).
   The whole thing is written to ``OUTPUT/resolved_config.yaml``; ``chatrlhf train --config`` on that file
   reproduces the run. Each step's own config goes to ``OUTPUT/stepN_*/step_config.yaml``.
2. Preflight (``chatrlhf.preflight``): models, tokenizers, data and memory are checked before anything trains.
3. Each selected step runs as a subprocess (``python -m chatrlhf sft --config ...``, or under ``torchrun`` /
   the ``deepspeed`` launcher for single_node / multi_node), its output streamed to the terminal and to
   ``stepN_*/train.log``. A step whose ``done.json`` exists is skipped; an interrupted one is simply rerun with
   the same output dir and resumes from its own ``checkpoints/``.
4. ``OUTPUT/report.md`` via ``chatrlhf.report.write_report`` (when that module is available).

Subprocesses (not in-process calls) because every step owns a DeepSpeed/torch.distributed world of its own, and
a step killed by the OOM killer must not take the pipeline's bookkeeping with it.
"""

from __future__ import annotations

import codecs
import dataclasses
import importlib
import json
import logging
import os
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from chatrlhf.config import ConfigError, parse_config
from chatrlhf.errors import UserError
from chatrlhf.utils import atomic_write_json, atomic_write_text

logger = logging.getLogger("chatrlhf.pipeline")

DEPLOYMENT_TYPES = ("auto", "cpu", "single_gpu", "single_node", "multi_node")


@dataclass(frozen=True)
class StepSpec:
    """One pipeline step: its number, subcommand, output subdir and where its config dataclass lives."""

    number: int
    name: str  # subcommand and YAML section name
    dirname: str
    module: str
    config_cls: str


STEPS: tuple[StepSpec, ...] = (
    StepSpec(1, "sft", "step1_sft", "chatrlhf.steps.sft", "SFTConfig"),
    StepSpec(2, "reward", "step2_reward", "chatrlhf.steps.reward", "RewardConfig"),
    StepSpec(3, "ppo", "step3_ppo", "chatrlhf.steps.ppo", "PPOConfig"),
)
STEP_BY_NUMBER = {s.number: s for s in STEPS}


@dataclass
class TrainPipelineConfig:
    """Flags of ``chatrlhf train`` (DeepSpeed-Chat's e2e launcher names; dashes or underscores)."""

    actor_model: Optional[str] = field(default=None, metadata={
        "help": "Local Hugging Face causal-LM dir for the actor (trained in step 1, then by PPO in step 3)."})
    reward_model: Optional[str] = field(default=None, metadata={
        "help": "Local Hugging Face causal-LM dir for the reward model body (step 2; also the PPO critic)."})
    data_path: list[str] = field(default_factory=list, metadata={
        "help": "Datasets (names, local dirs, json/jsonl/parquet files; NAME=PATH allowed), shared by all steps."})
    data_split: str = field(default="2,4,4", metadata={
        "help": "Share of every dataset given to steps 1/2/3, e.g. 2,4,4."})
    sft_only_data_path: list[str] = field(default_factory=list, metadata={
        "help": "Extra datasets used only by step 1 (SFT)."})
    data_output_path: Optional[str] = field(default=None, metadata={
        "help": "Tokenized-data cache dir (default OUTPUT/data_cache; multi_node: the steps' node-local default). "
                "Must be node-local on multi-node runs."})
    step: list[int] = field(default_factory=lambda: [1, 2, 3], metadata={
        "help": "Which steps to run, e.g. --step 2 3. Steps left out use their earlier output when present."})
    actor_zero_stage: Optional[int] = field(default=None, metadata={
        "help": "ZeRO stage (0-3) for the actor: step 1 and the PPO actor. Default: each step's default."})
    reward_zero_stage: Optional[int] = field(default=None, metadata={
        "help": "ZeRO stage (0-3) for the reward model: step 2 and the PPO critic. Default: each step's default."})
    output_dir: str = field(default="output", metadata={
        "help": "Run dir: step1_sft/, step2_reward/, step3_ppo/, resolved_config.yaml, report.md."})
    deployment_type: str = field(default="auto", metadata={
        "help": "cpu | single_gpu (one process) | single_node (torchrun, --num_gpus procs) | multi_node "
                "(deepspeed launcher with --hostfile) | auto (cpu without a GPU, else single_gpu/single_node)."})
    num_gpus: Optional[int] = field(default=None, metadata={
        "help": "Processes per node for single_node/multi_node (GPUs; on CPU: worker processes). "
                "Default: all visible GPUs (CPU: 2)."})
    hostfile: Optional[str] = field(default=None, metadata={
        "help": "MPI-style hostfile (`host slots=N` per line) for --deployment_type multi_node."})
    master_addr: Optional[str] = field(default=None, metadata={
        "help": "multi_node: address of node 0 (default: the deepspeed launcher infers it)."})
    master_port: int = field(default=29500, metadata={"help": "multi_node: rendezvous port on node 0."})
    seed: int = field(default=1234, metadata={"help": "Random seed passed to every step."})
    sft: dict = field(default_factory=dict, metadata={
        "help": "Step-1 options merged over the pipeline-derived ones: a YAML section `sft: {learning_rate: 1e-4}` "
                "in --config, or --sft '{learning_rate: 1e-4}'."})
    reward: dict = field(default_factory=dict, metadata={
        "help": "Step-2 options (YAML section `reward:` or --reward '{...}')."})
    ppo: dict = field(default_factory=dict, metadata={
        "help": "Step-3 options (YAML section `ppo:` or --ppo '{...}')."})
    dry_run: bool = field(default=False, metadata={
        "help": "Resolve and write the configs, print each step's command line, run nothing."})
    preflight_only: bool = field(default=False, metadata={
        "help": "Run the preflight checks (models, tokenizers, data, memory), print the estimate and stop."})
    skip_preflight: bool = field(default=False, metadata={"help": "Do not run the preflight checks."})
    memory_budget_gb: Optional[float] = field(default=None, metadata={
        "help": "Preflight: memory per rank in GB to plan against, instead of the detected free memory."})
    report: bool = field(default=True, metadata={"help": "Write OUTPUT/report.md after the steps."})

    def validate(self) -> None:
        problems = []
        if self.deployment_type not in DEPLOYMENT_TYPES:
            problems.append(f"--deployment_type must be one of {', '.join(DEPLOYMENT_TYPES)}, got {self.deployment_type!r}")
        bad = [s for s in self.step if s not in STEP_BY_NUMBER]
        if bad or not self.step:
            problems.append(f"--step takes numbers from 1 2 3, got {' '.join(map(str, self.step)) or 'nothing'}")
        for name in ("actor_zero_stage", "reward_zero_stage"):
            v = getattr(self, name)
            if v is not None and v not in (0, 1, 2, 3):
                problems.append(f"--{name} must be 0, 1, 2 or 3, got {v}")
        if self.deployment_type == "multi_node" and not self.hostfile:
            problems.append("--deployment_type multi_node needs --hostfile (lines like `worker-0 slots=8`)")
        if self.hostfile and not Path(self.hostfile).is_file():
            problems.append(f"--hostfile {self.hostfile}: file not found")
        if self.num_gpus is not None and self.num_gpus < 1:
            problems.append(f"--num_gpus must be at least 1, got {self.num_gpus}")
        for sec in ("sft", "reward", "ppo"):
            if not isinstance(getattr(self, sec), dict):
                problems.append(f"section {sec!r} must be a mapping of option names to values")
        if problems:
            raise ConfigError("; ".join(problems))
        self.step = sorted(set(self.step))


# ------------------------------------------------------------------------------------------ deployment
def resolve_deployment(cfg: TrainPipelineConfig) -> tuple[str, int]:
    """-> (deployment type, processes per node). "auto" picks cpu without a GPU, else one process per GPU."""
    dep = cfg.deployment_type
    n_gpu = _visible_gpus()
    if dep == "auto":
        dep = "cpu" if n_gpu == 0 else ("single_gpu" if n_gpu == 1 and not cfg.num_gpus else "single_node")
    if dep in ("cpu", "single_gpu"):
        return dep, 1
    if cfg.num_gpus:
        return dep, cfg.num_gpus
    return dep, n_gpu if n_gpu > 0 else 2  # CPU worker processes: the two the stack notes measured


def _visible_gpus() -> int:
    """Accelerator devices on this node through DeepSpeed's abstraction (CUDA, NPU, XPU, ...); 0 on CPU."""
    if os.environ.get("DS_ACCELERATOR") == "cpu":
        return 0
    try:
        from deepspeed.accelerator import get_accelerator

        acc = get_accelerator()
        return 0 if acc.device_name() == "cpu" else int(acc.device_count())
    except Exception:
        return 0


def world_size_of(cfg: TrainPipelineConfig) -> int:
    """Total ranks: processes per node times the hostfile's node count (multi_node)."""
    dep, nproc = resolve_deployment(cfg)
    if dep != "multi_node" or not cfg.hostfile or not Path(cfg.hostfile).is_file():
        return nproc
    slots = []
    for line in Path(cfg.hostfile).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        n = [int(p.split("=", 1)[1]) for p in line.split()[1:] if p.startswith("slots=")]
        slots.append(min(n[0], cfg.num_gpus) if n and cfg.num_gpus else (n[0] if n else nproc))
    return sum(slots) or nproc


def _sibling_tool(name: str) -> Optional[str]:
    """The launcher installed next to this interpreter (same venv), so ranks run the same Python."""
    p = Path(sys.executable).parent / name
    return str(p) if p.exists() else None


def launch_command(cfg: TrainPipelineConfig, spec: StepSpec, step_config: Path) -> list[str]:
    """The command line that runs one step for the chosen deployment type."""
    dep, nproc = resolve_deployment(cfg)
    module_args = ["chatrlhf", spec.name, "--config", str(step_config)]
    if dep in ("cpu", "single_gpu"):
        return [sys.executable, "-m", *module_args]
    if dep == "single_node":
        # torchrun picks a free rendezvous port itself (--standalone), so parallel runs do not collide.
        runner = [_sibling_tool("torchrun")] if _sibling_tool("torchrun") else [sys.executable, "-m", "torch.distributed.run"]
        return [*runner, "--standalone", f"--nproc_per_node={nproc}", "-m", *module_args]
    # multi_node: DeepSpeed's launcher ssh-es (pdsh) into every host of the hostfile and starts nproc ranks on
    # each; --no_local_rank because ranks read LOCAL_RANK from the environment, not from an argument.
    cmd = [_sibling_tool("deepspeed") or "deepspeed", "--hostfile", str(cfg.hostfile), "--no_local_rank",
           "--master_port", str(cfg.master_port)]
    if cfg.master_addr:
        cmd += ["--master_addr", cfg.master_addr]
    if cfg.num_gpus:
        cmd += ["--num_gpus", str(cfg.num_gpus)]
    return [*cmd, "--module", *module_args]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env(cfg: TrainPipelineConfig) -> dict[str, str]:
    """Environment of a step subprocess: unbuffered output; a one-rank world for single-process runs (on a free
    port, so runs side by side do not collide); one OpenMP thread pool per rank that does not oversubscribe."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    dep, nproc = resolve_deployment(cfg)
    if dep in ("cpu", "single_gpu"):
        for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
            env[k] = "1" if "WORLD_SIZE" in k else "0"
        env["MASTER_ADDR"] = "127.0.0.1"
        env["MASTER_PORT"] = str(_free_port())
    elif "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    return env


# ------------------------------------------------------------------------------------------ step configs
def step_dir(cfg: TrainPipelineConfig, spec: StepSpec) -> Path:
    return Path(cfg.output_dir) / spec.dirname


def is_done(path: Path) -> bool:
    return (path / "done.json").is_file()


def load_step_class(spec: StepSpec) -> type:
    try:
        mod = importlib.import_module(spec.module)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("chatrlhf"):
            raise UserError(f"step {spec.number} ({spec.name}) is not available in this build ({e.name} missing)") from None
        raise
    return getattr(mod, spec.config_cls)


def derived_step_values(cfg: TrainPipelineConfig, spec: StepSpec) -> dict[str, Any]:
    """What the pipeline decides for a step (before the YAML's section is merged over it).

    Names cover DeepSpeed-Chat's flags; resolve_step_config keeps those the step's dataclass has.
    """
    out = step_dir(cfg, spec)
    common: dict[str, Any] = {
        "output_dir": str(out),
        "data_path": list(cfg.data_path),
        "data_split": cfg.data_split,
        "data_output_path": cfg.data_output_path,
        "seed": cfg.seed,
    }
    if not cfg.data_output_path and resolve_deployment(cfg)[0] != "multi_node":
        # A cache per run dir; multi-node keeps the steps' node-local default (nodes would race on a shared disk).
        common["data_output_path"] = str(Path(cfg.output_dir) / "data_cache")
    if spec.name == "sft":
        common.update(model_name_or_path=cfg.actor_model, sft_only_data_path=list(cfg.sft_only_data_path),
                      zero_stage=cfg.actor_zero_stage)
    elif spec.name == "reward":
        common.update(model_name_or_path=cfg.reward_model, zero_stage=cfg.reward_zero_stage)
    else:
        # The actor comes from step 1 and critic + reward model from step 2, when those ran or will run here;
        # otherwise (e.g. --step 3 alone on fresh dirs) straight from --actor_model / --reward_model.
        sft_out, rm_out = step_dir(cfg, STEP_BY_NUMBER[1]), step_dir(cfg, STEP_BY_NUMBER[2])
        actor = str(sft_out) if (1 in cfg.step or is_done(sft_out)) else cfg.actor_model
        critic = str(rm_out) if (2 in cfg.step or is_done(rm_out)) else cfg.reward_model
        # The frozen reward model defaults to the critic's checkpoint inside the step (DeepSpeed-Chat's rule).
        common.update(actor_model_name_or_path=actor, critic_model_name_or_path=critic,
                      actor_zero_stage=cfg.actor_zero_stage, critic_zero_stage=cfg.reward_zero_stage)
    return {k: v for k, v in common.items() if v is not None}


def resolve_step_config(cfg: TrainPipelineConfig, spec: StepSpec) -> Any:
    """The step's full config object: dataclass defaults < pipeline-derived values < YAML section."""
    cls = load_step_class(spec)
    names = {f.name for f in dataclasses.fields(cls)}
    section = {str(k).replace("-", "_"): v for k, v in (getattr(cfg, spec.name) or {}).items()}
    unknown = sorted(set(section) - names)
    if unknown:
        raise ConfigError(f"section {spec.name!r}: unknown option(s) {', '.join(unknown)} for `chatrlhf {spec.name}`")
    values = {k: v for k, v in derived_step_values(cfg, spec).items() if k in names}
    values.update(section)
    try:
        obj = cls(**values)
    except TypeError as e:
        raise ConfigError(f"section {spec.name!r}: {e}") from None
    post = getattr(obj, "validate", None)
    if callable(post):
        post()
    return obj


def _yaml_dump(data: Any) -> str:
    import yaml

    return yaml.safe_dump(json.loads(json.dumps(data, default=str)), sort_keys=False, default_flow_style=False)


def resolved_config_dict(cfg: TrainPipelineConfig, step_cfgs: dict[str, Any]) -> dict[str, Any]:
    """Pipeline flags + every step's full config as its section: fed back with --config it reproduces the run."""
    d = dataclasses.asdict(cfg)
    for k in ("dry_run", "preflight_only"):  # how this invocation was called, not what the run is
        d.pop(k, None)
    dep, nproc = resolve_deployment(cfg)
    d["deployment_type"] = dep
    if dep in ("single_node", "multi_node"):
        d["num_gpus"] = nproc
    for name, obj in step_cfgs.items():
        d[name] = dataclasses.asdict(obj)
    return d


# ------------------------------------------------------------------------------------------ running a step
def latest_checkpoint(path: Path) -> Optional[Path]:
    """The step's newest complete resumable checkpoint (trainer_state.json is written last), if any."""
    done = [p for p in (path / "checkpoints").glob("step_*") if (p / "trainer_state.json").is_file()]
    return max(done, key=lambda p: _step_num(p.name)) if done else None


def _step_num(name: str) -> int:
    try:
        return int(name.rsplit("_", 1)[1])
    except (IndexError, ValueError):
        return -1


def run_subprocess(cmd: list[str], env: dict[str, str], log_path: Path) -> int:
    """Run a step, streaming its output byte-chunks (tqdm's carriage returns intact) to stdout and a log file."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    with open(log_path, "ab") as log:
        log.write(f"\n$ {shlex.join(cmd)}\n".encode())
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        try:
            while True:
                chunk = os.read(proc.stdout.fileno(), 8192)
                if not chunk:
                    break
                log.write(chunk)
                log.flush()
                sys.stdout.write(decoder.decode(chunk))
                sys.stdout.flush()
            return proc.wait()
        except BaseException:
            # Ctrl-C / kill of the pipeline: stop the step too (it resumes from its checkpoints on rerun).
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
        finally:
            proc.stdout.close()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


# ------------------------------------------------------------------------------------------ the pipeline
def run_train(cfg: TrainPipelineConfig) -> dict:
    """Run the selected steps; returns {"output_dir", "deployment_type", "world_size", "steps": {name: {...}}}."""
    out = Path(cfg.output_dir)
    dep, nproc = resolve_deployment(cfg)
    world = world_size_of(cfg)

    # 1. Resolve every step's config (all three, so resolved_config.yaml is complete even for --step 3).
    missing = []
    for spec in STEPS:
        if spec.number in cfg.step and spec.name == "sft" and not cfg.actor_model and "model_name_or_path" not in cfg.sft:
            missing.append("--actor_model (step 1 trains it)")
        if spec.number in cfg.step and spec.name == "reward" and not cfg.reward_model and "model_name_or_path" not in cfg.reward:
            missing.append("--reward_model (step 2 trains it)")
    if not cfg.data_path and not all(cfg_sec.get("data_path") for cfg_sec in (cfg.sft, cfg.reward, cfg.ppo)):
        missing.append("--data_path")
    if missing:
        raise UserError("missing " + ", ".join(missing))
    step_cfgs: dict[str, Any] = {}
    for spec in STEPS:
        if spec.number in cfg.step or _importable(spec):
            step_cfgs[spec.name] = resolve_step_config(cfg, spec)

    out.mkdir(parents=True, exist_ok=True)
    resolved = resolved_config_dict(cfg, step_cfgs)
    atomic_write_text(out / "resolved_config.yaml", _yaml_dump(resolved))
    logger.info("pipeline: %s, %d rank(s); resolved config -> %s", dep, world, out / "resolved_config.yaml")

    selected = [s for s in STEPS if s.number in cfg.step]
    pending = [s for s in selected if not is_done(step_dir(cfg, s))]

    # 2. Preflight: everything that can be checked before a step trains, all problems reported at once.
    if not cfg.skip_preflight and not cfg.dry_run and (pending or cfg.preflight_only):
        from chatrlhf.preflight import run_preflight

        checked = pending if pending else selected
        pre = run_preflight(cfg, {s.name: step_cfgs[s.name] for s in checked}, world_size=world,
                            procs_per_node=nproc, deployment_type=dep)
        print(pre["text"], flush=True)
        if cfg.preflight_only:
            return {"output_dir": str(out), "deployment_type": dep, "world_size": world, "preflight": pre, "steps": {}}

    # 3. The steps, in order.
    timings_path = out / "pipeline_timings.json"
    timings = _read_json(timings_path)
    results: dict[str, dict] = {}
    for spec in selected:
        sdir = step_dir(cfg, spec)
        sdir.mkdir(parents=True, exist_ok=True)
        step_config = sdir / "step_config.yaml"
        step_text = _yaml_dump(dataclasses.asdict(step_cfgs[spec.name]))
        if is_done(sdir):
            old = step_config.read_text(encoding="utf-8") if step_config.is_file() else None
            if old is not None and old != step_text:
                logger.warning("%s: its config changed since it finished; delete %s to retrain it", spec.dirname, sdir)
            print(f"[chatrlhf train] step {spec.number} ({spec.name}): already done ({sdir / 'done.json'}), skipping",
                  flush=True)
            results[spec.name] = {"status": "skipped", "output_dir": str(sdir),
                                  "metrics": _read_json(sdir / "done.json").get("metrics", {}),
                                  "wall_s": timings.get(spec.name, {}).get("wall_s")}
            continue
        atomic_write_text(step_config, step_text)  # also on --dry_run, so the printed command runs as shown
        cmd = launch_command(cfg, spec, step_config)
        if cfg.dry_run:
            print(f"[chatrlhf train] step {spec.number} ({spec.name}): {shlex.join(cmd)}", flush=True)
            results[spec.name] = {"status": "dry_run", "command": cmd, "output_dir": str(sdir)}
            continue
        ckpt = latest_checkpoint(sdir)
        if ckpt:  # the step itself restores it (--resume auto); this line says why the step starts midway
            print(f"[chatrlhf train] step {spec.number} ({spec.name}): resuming from {ckpt}", flush=True)
        print(f"[chatrlhf train] step {spec.number} ({spec.name}): starting -> {sdir}\n  $ {shlex.join(cmd)}", flush=True)
        t0 = time.time()
        rc = run_subprocess(cmd, launch_env(cfg), sdir / "train.log")
        wall = time.time() - t0
        if rc != 0 or not is_done(sdir):
            why = f"exited with code {rc}" if rc != 0 else "exited without writing done.json"
            raise UserError(f"step {spec.number} ({spec.name}) {why}; log: {sdir / 'train.log'}. "
                            f"Rerun the same command to resume from its last checkpoint.")
        prev = timings.get(spec.name, {}).get("wall_s", 0.0) if ckpt else 0.0
        timings[spec.name] = {"wall_s": round(wall + prev, 2), "resumed": bool(ckpt)}
        atomic_write_json(timings_path, timings)
        results[spec.name] = {"status": "ran", "output_dir": str(sdir), "wall_s": round(wall, 2),
                              "metrics": _read_json(sdir / "done.json").get("metrics", {})}
        print(f"[chatrlhf train] step {spec.number} ({spec.name}): done in {wall:.1f}s", flush=True)

    summary = {"output_dir": str(out), "deployment_type": dep, "world_size": world, "steps": results}
    if cfg.dry_run:
        return summary

    # 4. Report.
    if cfg.report:
        summary["report"] = write_run_report(out)
    return summary


def _importable(spec: StepSpec) -> bool:
    try:
        load_step_class(spec)
        return True
    except (UserError, AttributeError):
        return False


def write_run_report(out: Path) -> Optional[str]:
    """OUTPUT/report.md through chatrlhf.report when it is available (the report is a bonus, never fatal)."""
    try:
        from chatrlhf.report import write_report
    except ImportError:
        logger.info("chatrlhf.report is not available in this build; no report.md written")
        return None
    try:
        path = write_report(out)
    except UserError as e:
        logger.warning("report: %s", e)
        return None
    return str(path) if path else str(out / "report.md")


def _pop_section_flags(argv: list[str]) -> tuple[list[str], dict[str, dict]]:
    """Take ``--sft '{learning_rate: 1e-4}'`` (YAML/JSON mappings) off the command line; they are merged over the
    config file's sections after parsing, so the command line wins as for every other flag."""
    rest, sections, i = [], {}, 0
    while i < len(argv):
        a = argv[i]
        name, _, inline = a[2:].partition("=") if a.startswith("--") else ("", "", "")
        if name in ("sft", "reward", "ppo"):
            text = inline if inline else (argv[i + 1] if i + 1 < len(argv) else "")
            i += 1 if inline else 2
            import yaml

            try:
                value = yaml.safe_load(text) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"--{name}: not a YAML/JSON mapping: {e}") from None
            if not isinstance(value, dict):
                raise ConfigError(f"--{name} takes a mapping such as '{{learning_rate: 1e-4}}', got {text!r}")
            sections[name] = value
            continue
        rest.append(a)
        i += 1
    return rest, sections


def main(argv: list[str] | None = None) -> int:
    argv, cli_sections = _pop_section_flags(list(sys.argv[1:] if argv is None else argv))
    cfg = parse_config(TrainPipelineConfig, argv, prog="chatrlhf train",
                       description="Run steps 1 -> 2 -> 3 (SFT, reward model, PPO) in one command.")
    for name, values in cli_sections.items():
        getattr(cfg, name).update(values)
    summary = run_train(cfg)
    if summary.get("steps"):
        done = ", ".join(f"{k}: {v['status']}" for k, v in summary["steps"].items())
        print(f"[chatrlhf train] {done}; run dir {summary['output_dir']}", flush=True)
    return 0
