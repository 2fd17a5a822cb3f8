"""``chatrlhf train``: steps 1 -> 2 -> 3 (SFT, reward model, PPO) in one command, DeepSpeed-Chat's e2e launcher;
``--recipe dpo``: SFT -> DPO (``step1_sft/``, ``step2_dpo/``) instead.

How a run goes, top to bottom:

1. Resolve one full config per step: the step's dataclass defaults < values the pipeline derives (model paths,
   output dirs, data flags, ZeRO stages) < the YAML's per-step section (``sft:``, ``reward:``, ``ppo:``, ``dpo:``).
   The whole thing is written to ``OUTPUT/resolved_config.yaml``, less what the pipeline derives (paths under the
   output dir among them), so ``chatrlhf train --config`` on that file reproduces the run, also into another
   ``--output_dir``. Each step's own config goes to ``OUTPUT/stepN_*/step_config.yaml``.
2. Checks before anything runs: a selected step whose input (an earlier step's output) is missing is refused; a
   finished step whose settings changed is refused with the differences (``--force_steps N`` trains it again).
   Preflight (``chatrlhf.apps.preflight``): models, tokenizers, data and memory.
3. Each selected step runs as a subprocess (``python -m chatrlhf sft --config ...``, or under ``torchrun`` /
   the ``deepspeed`` launcher for single_node / multi_node), its output streamed to the terminal and to
   ``stepN_*/train.log`` (clean lines: progress-bar redraws are dropped). A step whose ``done.json`` exists is
   skipped; an interrupted one is simply rerun with the same output dir and resumes from its own ``checkpoints/``.
4. ``OUTPUT/report.md`` via ``chatrlhf.apps.report.write_report`` (when that module is available).

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
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from chatrlhf.apps.preflight import run_preflight
from chatrlhf.apps.report import write_report
from chatrlhf.config import ConfigError, parse_config
from chatrlhf.errors import UserError
from chatrlhf.utils import atomic_write_json, atomic_write_text, find_latest_checkpoint, free_port

logger = logging.getLogger(__name__)

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
    StepSpec(1, "sft", "step1_sft", "chatrlhf.trainers.sft", "SFTConfig"),
    StepSpec(2, "reward", "step2_reward", "chatrlhf.trainers.reward", "RewardConfig"),
    StepSpec(3, "ppo", "step3_ppo", "chatrlhf.trainers.ppo.trainer", "PPOConfig"),
)
STEP_BY_NUMBER = {s.number: s for s in STEPS}
# --recipe: the steps a run is made of. DeepSpeed-Chat ships DPO as its own step: SFT, then DPO on the pairs.
RECIPES: dict[str, tuple[StepSpec, ...]] = {
    "ppo": STEPS,
    "dpo": (STEPS[0], StepSpec(2, "dpo", "step2_dpo", "chatrlhf.trainers.dpo", "DPOConfig")),
}
SECTIONS = ("sft", "reward", "ppo", "dpo")
# What a step takes from an earlier step's output: (that step's number, the fields that name the model instead).
STEP_INPUTS: dict[str, tuple[tuple[int, tuple[str, ...]], ...]] = {
    "ppo": ((1, ("actor_model_name_or_path", "model_name_or_path")), (2, ("critic_model_name_or_path",))),
    "dpo": ((1, ("model_name_or_path",)),),
}


def recipe_steps(cfg: "TrainPipelineConfig") -> tuple[StepSpec, ...]:
    return RECIPES.get(cfg.recipe, STEPS)


def spec_by_number(cfg: "TrainPipelineConfig") -> dict[int, StepSpec]:
    return {s.number: s for s in recipe_steps(cfg)}


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
    recipe: str = field(default="ppo", metadata={
        "help": "ppo: SFT -> reward model -> PPO (step1_sft, step2_reward, step3_ppo); dpo: SFT -> DPO on the "
                "preference pairs (step1_sft, step2_dpo; no reward model, the third share of --data_split unused)."})
    step: list[int] = field(default_factory=lambda: [1, 2, 3], metadata={
        "help": "Which steps to run, e.g. --step 2 3 (--recipe dpo: 1 2). A step left out must have finished "
                "in this output dir before when a selected step trains from its output (or name that model in "
                "the step's section, e.g. --ppo '{critic_model_name_or_path: DIR}')."})
    force_steps: list[int] = field(default_factory=list, metadata={
        "help": "Train these finished steps again from the start (their output and checkpoints are replaced), "
                "e.g. after changing their settings; finished steps that train from their output rerun too."})
    actor_zero_stage: Optional[int] = field(default=None, metadata={
        "help": "ZeRO stage (0-3) for the actor: step 1 and the PPO actor. Default: each step's default."})
    reward_zero_stage: Optional[int] = field(default=None, metadata={
        "help": "ZeRO stage (0-3) for the reward model: step 2 and the PPO critic. Default: each step's default."})
    output_dir: str = field(default="output", metadata={
        "help": "Run dir: step1_sft/, step2_reward/, step3_ppo/, resolved_config.yaml, report.md."})
    deployment_type: str = field(default="auto", metadata={
        "help": "cpu (one process on the CPU, also on a host with an accelerator) | single_gpu (one process) | "
                "single_node (torchrun, --num_gpus procs) | multi_node (deepspeed launcher with --hostfile) | auto "
                "(cpu when DeepSpeed finds no accelerator, else single_gpu/single_node)."})
    num_gpus: Optional[int] = field(default=None, metadata={
        "help": "Processes per node for single_node/multi_node (GPUs; on CPU: worker processes). "
                "Default: all visible GPUs (CPU: 2)."})
    hostfile: Optional[str] = field(default=None, metadata={
        "help": "MPI-style hostfile (`host slots=N` per line) for --deployment_type multi_node."})
    master_addr: Optional[str] = field(default=None, metadata={
        "help": "multi_node: address of node 0 (default: the deepspeed launcher infers it)."})
    master_port: int = field(default=29500, metadata={"help": "multi_node: rendezvous port on node 0."})
    no_ssh: bool = field(default=False, metadata={
        "help": "multi_node without ssh/pdsh (Slurm, Kubernetes, ...): start this same command on every node of "
                "the hostfile yourself, each with its own --node_rank; needs --master_addr."})
    node_rank: Optional[int] = field(default=None, metadata={
        "help": "multi_node --no_ssh: this node's index in the hostfile (0 = the first line, which hosts rank 0)."})
    seed: int = field(default=1234, metadata={"help": "Random seed passed to every step."})
    sft: dict = field(default_factory=dict, metadata={
        "help": "Step-1 options merged over the pipeline-derived ones: a YAML section `sft: {learning_rate: 1e-4}` "
                "in --config, or --sft '{learning_rate: 1e-4}'."})
    reward: dict = field(default_factory=dict, metadata={
        "help": "Step-2 options (YAML section `reward:` or --reward '{...}')."})
    ppo: dict = field(default_factory=dict, metadata={
        "help": "Step-3 options (YAML section `ppo:` or --ppo '{...}')."})
    dpo: dict = field(default_factory=dict, metadata={
        "help": "--recipe dpo: step-2 DPO options (YAML section `dpo:` or --dpo '{beta: 0.1}')."})
    dry_run: bool = field(default=False, metadata={
        "help": "Resolve and write the configs, print each step's command line, run nothing."})
    preflight_only: bool = field(default=False, metadata={
        "help": "Run the preflight checks (models, tokenizers, data, memory), print the estimate and stop."})
    skip_preflight: bool = field(default=False, metadata={"help": "Do not run the preflight checks."})
    memory_budget_gb: Optional[float] = field(default=None, metadata={
        "help": "Preflight: memory per rank in GB to plan against, instead of the detected free memory."})
    report: bool = field(default=True, metadata={"help": "Write OUTPUT/report.md after the steps."})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "Run the Python code in the model folders (a custom model family: config.json auto_map naming "
                "classes in its modeling_*.py); passed to every step. It runs with your permissions: only for "
                "folders you trust."})

    def validate(self) -> None:
        problems = []
        if self.deployment_type not in DEPLOYMENT_TYPES:
            problems.append(f"--deployment_type must be one of {', '.join(DEPLOYMENT_TYPES)}, got {self.deployment_type!r}")
        if self.recipe not in RECIPES:
            problems.append(f"--recipe must be one of {', '.join(RECIPES)}, got {self.recipe!r}")
        numbers = [s.number for s in recipe_steps(self)]
        names = [s.name for s in recipe_steps(self)]
        if self.recipe == "dpo" and self.step == [1, 2, 3]:  # --step's default: all of the ppo recipe's steps
            self.step = [1, 2]
        bad = [s for s in self.step if s not in numbers]
        if bad or not self.step:
            problems.append(f"--step takes numbers from {' '.join(map(str, numbers))}, got "
                            f"{' '.join(map(str, self.step)) or 'nothing'} (--recipe {self.recipe}: {' -> '.join(names)})")
        bad = [s for s in self.force_steps if s not in self.step]
        if bad:
            problems.append(f"--force_steps {' '.join(map(str, bad))}: not among the steps this run runs "
                            f"(--step {' '.join(map(str, self.step))})")
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
        if self.no_ssh or self.node_rank is not None:
            if self.deployment_type != "multi_node":
                problems.append("--no_ssh / --node_rank are for --deployment_type multi_node")
            elif not self.no_ssh:
                problems.append("--node_rank is for --no_ssh runs (with ssh, node 0 starts every node itself)")
            elif self.node_rank is None or not self.master_addr:
                problems.append("--no_ssh needs --node_rank (this node's line in the hostfile, from 0) and "
                                "--master_addr (node 0's address, reachable from every node)")
            elif self.hostfile and Path(self.hostfile).is_file():
                n = len(hostfile_slots(self.hostfile))
                if not 0 <= self.node_rank < n:
                    problems.append(f"--node_rank must be in 0..{n - 1} (the hostfile {self.hostfile} has {n} "
                                    f"node(s)), got {self.node_rank}")
        for sec in SECTIONS:
            if not isinstance(getattr(self, sec), dict):
                problems.append(f"section {sec!r} must be a mapping of option names to values")
            elif getattr(self, sec) and sec not in names and self.recipe in RECIPES:
                problems.append(f"section {sec!r} is not a step of --recipe {self.recipe} ({', '.join(names)})")
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
    """Accelerator devices on this node as DeepSpeed's detection sees them (CUDA, NPU, XPU, ...); 0 on CPU."""
    from chatrlhf.engine.device import accelerator_info  # lazy: torch

    info = accelerator_info()
    return 0 if info["name"] == "cpu" else info["count"]


def hostfile_slots(path: str) -> list[tuple[str, Optional[int]]]:
    """(host, slots or None) per line of an MPI-style hostfile, in order (node_rank = position)."""
    out = []
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        n = [p.split("=", 1)[1] for p in line.split()[1:] if p.startswith("slots=")]
        out.append((line.split()[0], int(n[0]) if n and n[0].isdigit() else None))
    return out


def world_size_of(cfg: TrainPipelineConfig) -> int:
    """Total ranks: processes per node times the hostfile's node count (multi_node)."""
    dep, nproc = resolve_deployment(cfg)
    if dep != "multi_node" or not cfg.hostfile or not Path(cfg.hostfile).is_file():
        return nproc
    slots = [min(n, cfg.num_gpus) if n and cfg.num_gpus else (n or nproc) for _, n in hostfile_slots(cfg.hostfile)]
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
    # --no_ssh: this launcher starts only this node's ranks (--node_rank); every node runs the same command.
    cmd = [_sibling_tool("deepspeed") or "deepspeed", "--hostfile", str(cfg.hostfile), "--no_local_rank",
           "--master_port", str(cfg.master_port)]
    if cfg.master_addr:
        cmd += ["--master_addr", cfg.master_addr]
    if cfg.no_ssh:
        cmd += ["--no_ssh", "--node_rank", str(cfg.node_rank)]
    if cfg.num_gpus:
        cmd += ["--num_gpus", str(cfg.num_gpus)]
    return [*cmd, "--module", *module_args]


def launch_env(cfg: TrainPipelineConfig) -> dict[str, str]:
    """Environment of a step subprocess: unbuffered output; a one-rank world for single-process runs (on a free
    port, so runs side by side do not collide); one OpenMP thread pool per rank that does not oversubscribe."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    # The step's output reaches the terminal through a pipe: bars only when this command is on a terminal (the
    # log file gets clean lines either way, see LogCleaner).
    env.setdefault("CHATRLHF_PROGRESS", "1" if _stdout_is_tty() else "0")
    if cfg.deployment_type == "cpu":  # asked for by name: a host with an accelerator trains on the CPU all the same
        env.setdefault("DS_ACCELERATOR", "cpu")
    dep, nproc = resolve_deployment(cfg)
    if dep in ("cpu", "single_gpu"):
        for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
            env[k] = "1" if "WORLD_SIZE" in k else "0"
        env["MASTER_ADDR"] = "127.0.0.1"
        env["MASTER_PORT"] = str(free_port())
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
        "trust_remote_code": cfg.trust_remote_code,
    }
    if not cfg.data_output_path and resolve_deployment(cfg)[0] != "multi_node":
        # A cache per run dir; multi-node keeps the steps' node-local default (nodes would race on a shared disk).
        common["data_output_path"] = str(Path(cfg.output_dir) / "data_cache")
    if spec.name == "sft":
        common.update(model_name_or_path=cfg.actor_model, sft_only_data_path=list(cfg.sft_only_data_path),
                      zero_stage=cfg.actor_zero_stage)
    elif spec.name == "reward":
        common.update(model_name_or_path=cfg.reward_model, zero_stage=cfg.reward_zero_stage)
    elif spec.name == "dpo":
        # the policy (and its frozen reference) is step 1's actor, as PPO's is
        sft_out = step_dir(cfg, STEP_BY_NUMBER[1])
        common.update(model_name_or_path=str(sft_out) if (1 in cfg.step or is_done(sft_out)) else cfg.actor_model,
                      zero_stage=cfg.actor_zero_stage)
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
    import yaml  # lazy: yaml

    return yaml.safe_dump(json.loads(json.dumps(data, default=str)), sort_keys=False, default_flow_style=False)


def _plain(value: Any) -> Any:
    """``value`` as YAML/JSON gives it back (lists, not tuples; paths as strings)."""
    return json.loads(json.dumps(value, default=str))


RESOLVED_HEADER = """\
# `chatrlhf train --config THIS_FILE` replays this run; add --output_dir NEW to replay it elsewhere (the old run
# is not touched). What the pipeline derives from the flags above (each step's output_dir, the data cache, the
# models a step takes from an earlier step or from --actor_model/--reward_model, data and seed flags) is left out
# of the step sections, so it follows the replay's own flags. Each step's exact config: <step dir>/step_config.yaml.
"""


def resolved_config_dict(cfg: TrainPipelineConfig, step_cfgs: dict[str, Any]) -> dict[str, Any]:
    """Pipeline flags + every step's config as its section, less the values the pipeline derives (unless the
    section set them): fed back with --config it reproduces the run, and into another --output_dir it writes
    there only (derived paths no longer point into this run)."""
    d = dataclasses.asdict(cfg)
    # how this invocation was called, not what the run is
    for k in ("dry_run", "preflight_only", "node_rank", "force_steps"):
        d.pop(k, None)
    dep, nproc = resolve_deployment(cfg)
    # "auto" stays auto (it resolved to this machine's devices; a replay elsewhere resolves it there)
    if dep in ("single_node", "multi_node"):
        d["num_gpus"] = nproc
    specs = {s.name: s for s in recipe_steps(cfg)}
    for sec in SECTIONS:
        if sec not in specs:
            d.pop(sec, None)  # sections of the other recipe (empty; validate refuses them otherwise)
    for name, obj in step_cfgs.items():
        full = _plain(dataclasses.asdict(obj))
        derived = _plain(derived_step_values(cfg, specs[name]))
        user = {str(k).replace("-", "_") for k in (getattr(cfg, name) or {})}
        d[name] = {k: v for k, v in full.items() if k in user or k not in derived or derived[k] != v}
    return d


# ------------------------------------------------------------------------------------------ running a step
_ANSI = re.compile(rb"\x1b\[[0-9;?]*[ -/]*[@-~]")


class LogCleaner:
    """A terminal stream -> clean log lines: a line redrawn with carriage returns (tqdm's bars) keeps only what was
    drawn last, a line left blank by that (a bar cleared on close) is dropped, ANSI escapes go."""

    def __init__(self) -> None:
        self.buf = b""

    def feed(self, chunk: bytes) -> bytes:
        *lines, self.buf = (self.buf + chunk).split(b"\n")
        if len(self.buf) > 1 << 16 and b"\r" in self.buf:  # a bar redrawn for long without a newline
            self.buf = self.buf[self.buf.rindex(b"\r"):]
        return b"".join(self._clean(line) for line in lines)

    def flush(self) -> bytes:
        rest, self.buf = self.buf, b""
        return self._clean(rest) if rest else b""

    @staticmethod
    def _clean(line: bytes) -> bytes:
        if b"\r" in line or b"\x1b" in line:
            line = _ANSI.sub(b"", line).rstrip(b"\r").rsplit(b"\r", 1)[-1]
            if not line.strip():
                return b""
        return line + b"\n"


def _stdout_is_tty() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def run_subprocess(cmd: list[str], env: dict[str, str], log_path: Path) -> int:
    """Run a step, streaming its output to stdout as it comes (progress bars intact) and to a log file as clean
    lines (LogCleaner)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    cleaner = LogCleaner()
    with open(log_path, "ab") as log:
        log.write(f"\n$ {shlex.join(cmd)}\n".encode())
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        try:
            while True:
                chunk = os.read(proc.stdout.fileno(), 8192)
                if not chunk:
                    break
                log.write(cleaner.feed(chunk))
                log.flush()
                sys.stdout.write(decoder.decode(chunk))
                sys.stdout.flush()
            log.write(cleaner.flush())
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


def _read_yaml(path: Path) -> Optional[dict]:
    import yaml  # lazy: yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


# ------------------------------------------------------------------------------------------ checks before running
def check_step_inputs(cfg: TrainPipelineConfig) -> None:
    """Refuse a selected step that trains from an earlier step's output when that step neither runs now nor
    finished in this output dir: it would silently start from the base model instead (``--step 3`` alone on a
    fresh dir: PPO with an untrained reward model). Naming the model in the step's section allows it."""
    by_num = spec_by_number(cfg)
    problems, fixes, needed = [], [], set(cfg.step)
    for spec in recipe_steps(cfg):
        if spec.number not in cfg.step:
            continue
        section = {str(k).replace("-", "_"): v for k, v in (getattr(cfg, spec.name) or {}).items()}
        missing = []
        for num, fields in STEP_INPUTS.get(spec.name, ()):
            if num in cfg.step or is_done(step_dir(cfg, by_num[num])):
                continue
            named = [f for f in fields if section.get(f)]
            if spec.name == "ppo" and num == 2 and section.get("algo", "ppo") != "ppo":
                named += [f for f in ("reward_model_name_or_path",) if section.get(f)]  # no critic to train
            if not named:
                missing.append((by_num[num], fields[0]))
        if missing:
            needed |= {d.number for d, _ in missing}
            problems.append(f"step {spec.number} ({spec.name}) trains from the output of "
                            f"{' and '.join(f'step {d.number} ({d.name})' for d, _ in missing)}, but "
                            f"{' and '.join(str(step_dir(cfg, d)) for d, _ in missing)} "
                            f"{'has' if len(missing) == 1 else 'have'} no finished run (no done.json)")
            fixes.append(f"--{spec.name} '{{{', '.join(f'{f}: DIR' for _, f in missing)}}}'")
    if problems:
        raise UserError("; ".join(problems) + f"; run {'it' if len(needed - set(cfg.step)) == 1 else 'them'} here "
                        f"too (--step {' '.join(map(str, sorted(needed)))}) or name the model(s): {' '.join(fixes)}")


def _norm_value(v: Any) -> Any:
    """Paths compared as the files they name (a relative and an absolute spelling of one dir are equal)."""
    if isinstance(v, list):
        return [_norm_value(x) for x in v]
    if isinstance(v, str) and v and os.path.exists(v):
        return str(Path(v).resolve())
    return v


def _show_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, str):
        return v if v and " " not in v else json.dumps(v)
    return json.dumps(v)


def settings_diff(old: dict, new: dict) -> list[str]:
    """``--flag old -> new`` for each setting of a step that changes what it trains (output, logging and other
    fields a resumed run may change, as the steps' own resume check, are left out)."""
    from chatrlhf.trainers.checkpoints import RESUME_FREE_FIELDS  # lazy: torch

    return [f"--{k} {_show_value(old[k])} -> {_show_value(new[k])}" for k in new
            if k in old and k not in RESUME_FREE_FIELDS and _norm_value(old[k]) != _norm_value(new[k])]


def step_inputs(cfg: TrainPipelineConfig, spec: StepSpec, step_cfg: Any) -> set[int]:
    """Numbers of the earlier steps whose output dir this step's config names as a model."""
    dirs = {s.number: step_dir(cfg, s).resolve() for s in recipe_steps(cfg) if s.number < spec.number}
    out = set()
    for f in dataclasses.fields(step_cfg):
        v = getattr(step_cfg, f.name)
        if f.name.endswith("model_name_or_path") and isinstance(v, str) and v:
            out |= {n for n, d in dirs.items() if Path(v).resolve() == d}
    return out


def plan_reruns(cfg: TrainPipelineConfig, selected: list[StepSpec], step_cfgs: dict[str, Any]) -> dict[int, str]:
    """Finished steps that train again from the start -> why: ``--force_steps``, or an earlier step whose output
    they train from runs now (they were trained on its old output). A finished step whose settings changed and
    that is not forced: UserError naming each difference and what to do."""
    changed = []
    for spec in selected:
        sdir = step_dir(cfg, spec)
        if not is_done(sdir) or spec.number in cfg.force_steps:
            continue
        old = _read_yaml(sdir / "step_config.yaml")
        diffs = settings_diff(old, _plain(dataclasses.asdict(step_cfgs[spec.name]))) if old else []
        if diffs:
            changed.append((spec, diffs))
    if changed:
        one = len(changed) == 1
        raise UserError(
            "; ".join(f"step {s.number} ({s.name}) finished with other settings: {', '.join(d)}" for s, d in changed)
            + f"; to train {'it' if one else 'them'} again with these settings add --force_steps "
            f"{' '.join(str(s.number) for s, _ in changed)} (finished steps that train from {'its' if one else 'their'}"
            " output rerun too), or write to a new --output_dir")
    rerun = {n: "--force_steps" for n in cfg.force_steps if is_done(step_dir(cfg, spec_by_number(cfg)[n]))}
    runs = set()
    for spec in selected:
        if spec.number in rerun or not is_done(step_dir(cfg, spec)):
            runs.add(spec.number)
            continue
        ahead = sorted(step_inputs(cfg, spec, step_cfgs[spec.name]) & runs)
        if ahead:
            rerun[spec.number] = (f"it trains from step {' and '.join(map(str, ahead))}'s output, which is "
                                  "trained again")
            runs.add(spec.number)
    return rerun


def _clear_finished(sdir: Path) -> None:
    """A finished step about to train again from the start: no done.json (it is not finished until it is) and no
    resumable state of the earlier training (the step would resume it)."""
    (sdir / "done.json").unlink(missing_ok=True)
    shutil.rmtree(sdir / "checkpoints", ignore_errors=True)


def _announce_device(cfg: TrainPipelineConfig, step_cfgs: dict[str, Any], selected: list[StepSpec]) -> None:
    """The device/dtype line of ``chatrlhf train``: what its steps will use."""
    from chatrlhf.engine.device import accelerator_info, announce_device, train_dtype  # lazy: torch

    flags = {s.name: str(getattr(step_cfgs[s.name], "dtype", "auto")) for s in selected if s.name in step_cfgs}
    if cfg.deployment_type == "cpu":
        from chatrlhf.engine.device import cpu_supports_bf16  # lazy: torch

        info = {"name": "cpu", "count": 0, "how": "--deployment_type cpu"}
        auto = ("bf16", "auto: AVX512-BF16/AMX on this CPU") if cpu_supports_bf16() else \
            ("fp32", "auto: no AVX512-BF16/AMX on this CPU")
        per = {k: auto if f == "auto" else (f, "--dtype") for k, f in flags.items()}
    else:
        info = accelerator_info()
        per = {k: train_dtype(f) for k, f in flags.items()}
    kinds = set(per.values())
    if len(kinds) <= 1:
        dtype, why = next(iter(kinds), ("fp32", "no step selected"))
    else:
        dtype, why = ", ".join(f"{k} {d}" for k, (d, _) in per.items()), "per step --dtype"
    announce_device(dtype, why, info)


def _wait_for_done(sdir: Path, timeout: float = 120.0) -> bool:
    """--no_ssh node > 0: rank 0 (on node 0) writes done.json; on a shared filesystem it may show up here late."""
    deadline = time.time() + timeout
    while not is_done(sdir) and time.time() < deadline:
        time.sleep(0.5)
    return is_done(sdir)


# ------------------------------------------------------------------------------------------ the pipeline
def run_train(cfg: TrainPipelineConfig) -> dict:
    """Run the selected steps; returns {"output_dir", "deployment_type", "world_size", "steps": {name: {...}}}."""
    out = Path(cfg.output_dir)
    dep, nproc = resolve_deployment(cfg)
    world = world_size_of(cfg)
    # --no_ssh: every node runs this pipeline; node 0 keeps the run's books (resolved config, timings, report)
    node0 = not cfg.no_ssh or cfg.node_rank == 0

    # 1. Resolve every step's config (all of the recipe's, so resolved_config.yaml is complete even for --step 3).
    step_cfgs, selected = _resolve_step_configs(cfg)
    rerun = plan_reruns(cfg, selected, step_cfgs)
    out.mkdir(parents=True, exist_ok=True)
    if node0:
        resolved = resolved_config_dict(cfg, step_cfgs)
        atomic_write_text(out / "resolved_config.yaml", RESOLVED_HEADER + _yaml_dump(resolved))
    logger.info("pipeline: %s, %d rank(s); resolved config -> %s", dep, world, out / "resolved_config.yaml")
    pending = [s for s in selected if s.number in rerun or not is_done(step_dir(cfg, s))]

    # 2. Preflight: everything that can be checked before a step trains, all problems reported at once.
    if not cfg.skip_preflight and not cfg.dry_run and (pending or cfg.preflight_only):
        checked = pending if pending else selected
        pre = run_preflight(cfg, {s.name: step_cfgs[s.name] for s in checked}, world_size=world,
                            procs_per_node=nproc, deployment_type=dep)
        print(pre["text"], flush=True)
        if cfg.preflight_only:
            return {"output_dir": str(out), "deployment_type": dep, "world_size": world, "preflight": pre, "steps": {}}

    # 3. The steps, in order.
    timings = _read_json(out / "pipeline_timings.json")
    results = {spec.name: _run_step(cfg, spec, step_cfgs[spec.name], rerun.get(spec.number), timings, node0)
               for spec in selected}
    summary = {"output_dir": str(out), "deployment_type": dep, "world_size": world, "steps": results}

    # 4. Report.
    if cfg.report and node0 and not cfg.dry_run:
        summary["report"] = write_run_report(out)
    return summary


def _resolve_step_configs(cfg: TrainPipelineConfig) -> tuple[dict[str, Any], list[StepSpec]]:
    """Every recipe step's resolved config (those that can be built), and the steps --step selects; says which
    device and dtype they use and which of them write outside --output_dir."""
    steps = recipe_steps(cfg)
    missing = []
    for spec in steps:
        if spec.number in cfg.step and spec.name == "sft" and not cfg.actor_model and "model_name_or_path" not in cfg.sft:
            missing.append("--actor_model (step 1 trains it)")
        if spec.number in cfg.step and spec.name == "reward" and not cfg.reward_model and "model_name_or_path" not in cfg.reward:
            missing.append("--reward_model (step 2 trains it)")
    if not cfg.data_path and not all(getattr(cfg, s.name).get("data_path") for s in steps):
        missing.append("--data_path")
    if missing:
        raise UserError("missing " + ", ".join(missing))
    check_step_inputs(cfg)
    step_cfgs = {spec.name: resolve_step_config(cfg, spec) for spec in steps
                 if spec.number in cfg.step or _importable(spec)}
    selected = [s for s in steps if s.number in cfg.step]
    _announce_device(cfg, step_cfgs, selected)
    out = Path(cfg.output_dir).resolve()
    for spec in selected:  # e.g. a resolved_config.yaml of an older chatrlhf, which baked each step's dir in
        where = Path(step_cfgs[spec.name].output_dir).resolve()
        if not where.is_relative_to(out):
            print(f"[chatrlhf train] note: step {spec.number} ({spec.name}) writes to {where}, outside --output_dir "
                  f"{cfg.output_dir} (its section sets output_dir)", flush=True)
    return step_cfgs, selected


def _run_step(cfg: TrainPipelineConfig, spec: StepSpec, step_cfg: Any, rerun_why: Optional[str], timings: dict,
              node0: bool) -> dict:
    """One step: skipped when done (unless it must rerun), else launched as its own process (resuming from its
    last checkpoint when there is one); its wall time is added to OUTPUT/pipeline_timings.json."""
    tag = f"[chatrlhf train] step {spec.number} ({spec.name})"
    sdir = step_dir(cfg, spec)
    sdir.mkdir(parents=True, exist_ok=True)
    step_config = sdir / "step_config.yaml"
    if is_done(sdir) and rerun_why is None:
        print(f"{tag}: already done ({sdir / 'done.json'}), skipping", flush=True)
        return {"status": "skipped", "output_dir": str(sdir), "metrics": _read_json(sdir / "done.json").get("metrics", {}),
                "wall_s": timings.get(spec.name, {}).get("wall_s")}
    if rerun_why is not None:
        print(f"{tag}: finished before; {'would train' if cfg.dry_run else 'trains'} again from the start "
              f"({rerun_why})", flush=True)
        if node0 and not cfg.dry_run:
            _clear_finished(sdir)
    # also on --dry_run, so the printed command runs as shown
    atomic_write_text(step_config, _yaml_dump(dataclasses.asdict(step_cfg)))
    cmd = launch_command(cfg, spec, step_config)
    if cfg.dry_run:
        print(f"{tag}: {shlex.join(cmd)}", flush=True)
        return {"status": "dry_run", "command": cmd, "output_dir": str(sdir)}
    ckpt = find_latest_checkpoint(sdir / "checkpoints")
    if ckpt:  # the step itself restores it (--resume auto); this line says why the step starts midway
        print(f"{tag}: resuming from {ckpt}", flush=True)
    print(f"{tag}: starting -> {sdir}\n  $ {shlex.join(cmd)}", flush=True)
    t0 = time.time()
    log_name = "train.log" if node0 else f"train.node{cfg.node_rank}.log"  # nodes share the step dir
    rc = run_subprocess(cmd, launch_env(cfg), sdir / log_name)
    wall = time.time() - t0
    if rc != 0 or not (is_done(sdir) or (not node0 and _wait_for_done(sdir))):
        why = f"exited with code {rc}" if rc != 0 else "exited without writing done.json"
        raise UserError(f"step {spec.number} ({spec.name}) {why}; log: {sdir / log_name}. "
                        f"Rerun the same command to resume from its last checkpoint.")
    prev = timings.get(spec.name, {}).get("wall_s", 0.0) if ckpt else 0.0
    timings[spec.name] = {"wall_s": round(wall + prev, 2), "resumed": bool(ckpt)}
    if node0:
        atomic_write_json(Path(cfg.output_dir) / "pipeline_timings.json", timings)
    print(f"{tag}: done in {wall:.1f}s", flush=True)
    return {"status": "ran", "output_dir": str(sdir), "wall_s": round(wall, 2),
            "metrics": _read_json(sdir / "done.json").get("metrics", {})}


def _importable(spec: StepSpec) -> bool:
    try:
        load_step_class(spec)
        return True
    except (UserError, AttributeError):
        return False


def write_run_report(out: Path) -> Optional[str]:
    """OUTPUT/report.md through chatrlhf.apps.report (the report is a bonus, never fatal)."""
    try:
        path = write_report(out)
    except UserError as e:
        logger.warning("report: %s", e)
        return None
    return str(path) if path else str(out / "report.md")


def _pop_section_flags(argv: list[str], names: tuple[str, ...] = ("sft", "reward", "ppo")) -> tuple[list[str], dict[str, dict]]:
    """Take ``--sft '{learning_rate: 1e-4}'`` (YAML/JSON mappings) off the command line; they are merged over the
    config file's sections after parsing, so the command line wins as for every other flag."""
    rest, sections, i = [], {}, 0
    while i < len(argv):
        a = argv[i]
        name, _, inline = a[2:].partition("=") if a.startswith("--") else ("", "", "")
        if name in names:
            text = inline if inline else (argv[i + 1] if i + 1 < len(argv) else "")
            i += 1 if inline else 2
            import yaml  # lazy: yaml

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
    argv, cli_sections = _pop_section_flags(list(sys.argv[1:] if argv is None else argv), SECTIONS)
    cfg = parse_config(TrainPipelineConfig, argv, prog="chatrlhf train",
                       description="Run steps 1 -> 2 -> 3 (SFT, reward model, PPO) in one command, or SFT -> DPO "
                                   "with --recipe dpo.")
    for name, values in cli_sections.items():
        getattr(cfg, name).update(values)
    if cli_sections:
        cfg.validate()  # a --dpo section on a ppo-recipe run (and the like) is refused as a file's would be
    summary = run_train(cfg)
    if summary.get("steps"):
        done = ", ".join(f"{k}: {v['status']}" for k, v in summary["steps"].items())
        print(f"[chatrlhf train] {done}; run dir {summary['output_dir']}", flush=True)
    return 0
