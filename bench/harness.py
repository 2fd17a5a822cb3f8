"""Throughput of SFT, reward model, PPO/GRPO and decoding against this machine's own limits and against TRL on the
same model, batch and lengths. Run from the repository root: ``make bench`` (= ``python -m bench``); the benchmark
is not part of the installed package.

What one run measures (see bench/README.md):

- the machine: matmul FLOP/s in fp32 and bf16 (large square matmuls, all cores) and memory read bandwidth;
- ours, through the product's real code paths (``run_sft``/``run_reward``/``run_ppo`` with DeepSpeedStrategy,
  ``ppo_experience.generate_answers`` for decoding), each in its own process: SFT and RM tokens/s and achieved
  FLOP/s as a fraction of the measured matmul peak; PPO and GRPO samples/s end to end with the generation /
  experience-forward / training / other split; decode tokens/s against the weight-bandwidth bound;
- TRL (``trl`` as installed in ``.venv-trl``: SFT, Reward, GRPO; ``trl==1.12.0`` in ``.venv-trl112``: PPO),
  as subprocesses of ``bench/trl.py`` with those venvs' pythons; the venvs are created on first use;
- at two sizes: ``tiny`` (hidden 64, 2 layers) and ``mid`` (hidden 768, 8 layers, vocab 8192), llama family,
  built locally by :func:`chatrlhf.models.tiny.build_tiny_model`;
- rollout decode per family (``--tasks families``): ms per token step of the hybrid engine's measured-fastest path
  against transformers' ``generate()`` on a tiny model of each family the decoder knows, side by side in one process.

Settings: batch 8, prompt 32 tokens, response exactly 32 tokens (min_new_tokens = max_new_tokens), dtype auto
(bf16 where the device does bf16 natively, else fp32: the same rule as the product's ``--dtype auto``).
Writes ``OUT/results.md`` and ``OUT/results.json``; models, runs and profiles go under ``OUT/out/`` (gitignored).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import chatrlhf
from chatrlhf.config import option as _h
from chatrlhf.errors import UserError
from chatrlhf.models.dims import model_dims

HERE = Path(__file__).resolve().parent  # bench/: the default output folder (results.md, results.json, out/)
REPO = HERE.parent  # the repository root: the TRL venvs, constraints.txt, and the import root of ``bench``
TRL_SCRIPT = HERE / "trl.py"  # run as a script by the TRL venvs' pythons (no chatrlhf there)

# name -> build_tiny_model kwargs (llama: RoPE + SwiGLU + RMSNorm, distinct pad token, tied embeddings)
# Model sizes (random weights; speed does not depend on them). ``critic``: the size of a separate reward model /
# critic (DeepSpeed-Chat's headline pair: an OPT-1.3B actor with an OPT-350M reward model); default the actor's.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(family="llama", hidden=64, layers=2, heads=4, vocab=512),
    "mid": dict(family="llama", hidden=768, layers=8, heads=12, vocab=8192),
    # SmolLM2-135M-Instruct's architecture (134.5 M parameters, the real model's 49,152-token vocabulary)
    "real": dict(family="llama", hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536, vocab=49152,
                 overrides={"rope_theta": 100000.0, "rms_norm_eps": 1e-5}),
    # OPT-1.3B (1.316 B) trained against OPT-350M (331 M: post-norm, 512-wide embeddings) as reward model and critic
    "opt1.3b": dict(family="opt", hidden=2048, layers=24, heads=32, intermediate=8192, vocab=50272,
                    critic="opt350m"),
    "opt350m": dict(family="opt", hidden=1024, layers=24, heads=16, intermediate=4096, vocab=50272,
                    overrides={"word_embed_proj_dim": 512, "do_layer_norm_before": False}),
}

# Targets (PASS/FAIL column). Per size: mid's are this bench's own, real's (SmolLM2-135M's architecture) the
# real-models issue's; other sizes get only the size-independent checks (vs plain path / generate(), tiny vs TRL).
TARGETS = {
    "ppo_vs_trl_min": 6.0,  # tiny PPO samples/s vs TRL 1.12 PPO
    "vs_plain_min": 0.97,  # default path / plain path (torch ops; generate()) at least this: equal within noise
    "sizes": {
        # train_mfu_min: SFT / RM achieved FLOP/s / measured matmul peak; ppo_floor_ratio_max: PPO step time /
        # FLOP-bound floor; decode_bw_min: decode tokens/s / weight-bandwidth bound
        "mid": {"train_mfu_min": 0.70, "ppo_floor_ratio_max": 1.4, "decode_bw_min": 0.60},
        "real": {"train_mfu_min": 0.65, "ppo_floor_ratio_max": 1.5, "decode_bw_min": 0.70},
    },
}


@dataclass
class BenchConfig:
    sizes: str = _h("Comma-separated model sizes to run: tiny, mid, real (SmolLM2-135M's architecture), opt1.3b "
                    "(with an OPT-350M reward model and critic), opt350m.", "tiny,mid")
    skip_trl: bool = _h("Do not run (or create venvs for) the TRL side.", False)
    quick: bool = _h("Fewer timed steps and shorter machine-limit probes (smoke runs; noisy figures).", False)
    out: str = _h("Directory for results.md and results.json (empty: this bench/ folder, wherever the command runs "
                  "from); work files go to OUT/out/.", "")
    tasks: str = _h("Comma-separated tasks: limits, sft, reward, ppo, grpo, decode, families (rollout decode of a "
                    "tiny model of each family: hybrid engine vs generate()).",
                    "limits,sft,reward,ppo,grpo,decode,families")
    batch: int = _h("Samples per step (SFT sequences, RM pairs, PPO/GRPO rows).", 8)
    prompt_len: int = _h("Prompt tokens (BOS included).", 32)
    response_len: int = _h("Response tokens (exactly: min_new_tokens = max_new_tokens; SFT/RM answers incl. EOS).",
                           32)
    group_size: int = _h("GRPO samples per prompt (batch / group_size prompts per step).", 4)
    warmup: int = _h("Untimed steps before the timed ones (0: 1 quick, 2 otherwise).", 0)
    steps: int = _h("Timed steps per measurement (0: 2 quick, 8 otherwise; PPO/GRPO 2 / 5).", 0)
    dtype: str = _h("auto (bf16 where native, else fp32), fp32 or bf16.", "auto")
    threads: int = _h("torch threads (0: all cores).", 0)
    profile: bool = _h("torch.profiler over our timed steps; top ops to OUT/out/profile_<size>_<task>.txt.", False)
    timeout: int = _h("Seconds allowed for each measured process.", 900)
    trl_venv: str = _h("Venv with the latest trl (SFT, Reward, GRPO); created on first use.", ".venv-trl")
    trl_version: str = _h("trl version for --trl_venv (empty: latest).", "1.16.0")
    trl_ppo_venv: str = _h("Venv with trl 1.12.0 (the last release with PPOTrainer); created on first use.",
                           ".venv-trl112")
    trl_ppo_version: str = _h("trl version for --trl_ppo_venv.", "1.12.0")
    work_dir: str = _h("Work directory (models, runs, logs); default OUT/out.", "")
    plain_repeats: int = _h("Runs of ours and of the plain torch path each, alternated (fp32 SFT/RM; 0: 1 quick, 2 "
                            "otherwise); each side's fastest run counts, so a slow spell of a shared VM that lands on "
                            "one side's run does not decide the ours-vs-plain verdict.", 0)
    liger_compare: bool = _h("Also run SFT, RM and PPO with --use_liger_kernel (Liger-Kernel's fused RMSNorm, SwiGLU, "
                             "RoPE and linear + cross-entropy; GPUs with Triton only) and compare step time and peak "
                             "memory.", False)

    def validate(self) -> None:
        for s in self.size_list:
            if s not in SIZES:
                raise UserError(f"--sizes: unknown size {s!r}; choose from {', '.join(SIZES)}")
        known = {"limits", "sft", "reward", "ppo", "grpo", "decode", "families"}
        bad = set(self.task_list) - known
        if bad:
            raise UserError(f"--tasks: unknown {', '.join(sorted(bad))}; choose from {', '.join(sorted(known))}")
        if self.batch % self.group_size:
            raise UserError(f"--batch ({self.batch}) must be a multiple of --group_size ({self.group_size})")
        if self.dtype not in ("auto", "fp32", "bf16"):
            raise UserError("--dtype must be auto, fp32 or bf16")
        if self.prompt_len < 2 or self.response_len < 2:
            raise UserError("--prompt_len and --response_len must be >= 2")
        if self.plain_repeats < 0:
            raise UserError("--plain_repeats must be >= 0")

    @property
    def size_list(self) -> list[str]:
        return [s.strip() for s in self.sizes.split(",") if s.strip()]

    @property
    def task_list(self) -> list[str]:
        return [s.strip() for s in self.tasks.split(",") if s.strip()]

    @property
    def n_warmup(self) -> int:
        return self.warmup or (1 if self.quick else 2)

    @property
    def n_plain_repeats(self) -> int:
        return self.plain_repeats or (1 if self.quick else 2)

    def n_steps(self, rl: bool = False) -> int:
        if self.steps:
            return self.steps
        return 2 if self.quick else (5 if rl else 8)

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else HERE

    @property
    def wdir(self) -> Path:
        return Path(self.work_dir) if self.work_dir else self.out_dir / "out"


# ================================================================================================ machine limits
def _accel():
    from deepspeed.accelerator import get_accelerator

    return get_accelerator()


def _sync(acc) -> None:
    if acc.device_name() != "cpu":
        acc.synchronize()


def set_threads(n: int) -> int:
    import torch

    n = n or os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


def cpu_model() -> str:
    from chatrlhf.engine.calibrate import processor

    return processor()["model"]


def cpu_flags() -> list[str]:
    """The instruction-set flags that decide which kernels are fast (a subset of calibrate.processor's)."""
    from chatrlhf.engine.calibrate import processor

    return [f for f in processor()["simd"] if f.startswith(("avx512", "amx", "avx_vnni")) or f in ("avx2", "fma")]


def _best_rate(fn, work: float, min_time: float, trials: int, acc) -> float:
    """work / seconds of the fastest of ``trials`` timed batches (each >= min_time): the achievable peak."""
    from bench.trl import best_rate

    return best_rate(fn, work, min_time, trials, None if acc.device_name() == "cpu" else acc.synchronize)


def measure_limits(quick: bool = False, n: int | None = None, nbytes: int | None = None,
                   min_time: float | None = None, dtypes: Sequence[str] = ("fp32", "bf16")) -> dict:
    """Matmul FLOP/s (of each of ``dtypes``) on large square matrices and memory read bandwidth (sum over a large
    tensor, far larger than the caches). Best of a few timed batches: the achievable peak, not an average."""
    import torch

    acc = _accel()
    dev = torch.device(acc.device_name())
    on_cpu = dev.type == "cpu"
    n = n or (2048 if on_cpu else 8192)
    min_t, trials = (0.3, 2) if quick else (1.0, 3)
    if min_time is not None:
        min_t = min_time
    out: dict[str, Any] = {"device": dev.type, "matmul_n": n}
    for name in dtypes:
        out[f"matmul_{name}_flops"] = matmul_peak(name, min_t, trials, n)
    nbytes = nbytes or ((256 << 20) if on_cpu else (2 << 30))
    x = torch.ones(nbytes // 4, device=dev, dtype=torch.float32)
    out["read_bw_bytes_per_s"] = _best_rate(lambda: x.sum(), float(nbytes), min_t, trials, acc)
    out["read_bw_tensor_bytes"] = nbytes
    return out


def matmul_peak(dtype: str, min_time: float = 0.3, trials: int = 2, n: int | None = None) -> float:
    """Matmul FLOP/s of ``dtype`` on n x n matrices (2048 on CPU, 8192 on accelerators): best of ``trials``."""
    import torch

    acc = _accel()
    dev = torch.device(acc.device_name())
    n = n or (2048 if dev.type == "cpu" else 8192)
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    a, b = torch.randn(n, n, device=dev, dtype=dt), torch.randn(n, n, device=dev, dtype=dt)
    c = torch.empty(n, n, device=dev, dtype=dt)
    return _best_rate(lambda: torch.matmul(a, b, out=c), 2.0 * n**3, min_time, trials, acc)


def with_peak_probes(run, dtype: str) -> dict:
    """Run one measured process between two matmul-peak probes (``peak_probes``). Shared VMs drift (here: 151 to
    253 GFLOP/s within one bench run), so the run probes often and compares against the highest probe it saw
    (:func:`run_limits`)."""
    before = matmul_peak(dtype)
    r = run()
    r["peak_probes"] = [before, matmul_peak(dtype)]
    return r


def run_limits(limits: dict, results: list[dict], limits_end: dict | None, dtype: str) -> dict:
    """The limits the ratios use: the highest matmul probe of the whole run (start, around every measured process,
    end) and the higher of the two bandwidth probes. Figures come from each process's fastest step, i.e. the
    machine at its fastest; so does this, so drift can only lower a ratio, never inflate it."""
    out = dict(limits)
    key = f"matmul_{dtype}_flops"
    probes = [x for r in results for x in r.get("peak_probes", []) + r.get("step_peaks", [])]
    probes += [lim[key] for lim in (limits, limits_end or {}) if lim.get(key)]
    if probes:
        out[key] = max(probes)
    bws = [lim["read_bw_bytes_per_s"] for lim in (limits, limits_end or {}) if lim.get("read_bw_bytes_per_s")]
    if bws:
        out["read_bw_bytes_per_s"] = max(bws)
    return out


# ================================================================================================ FLOP counting
def model_shape(model_dir: str | Path) -> dict:
    """Matmul parameter counts and dims of a model dir, built on the meta device (no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(config)
    lm_head = m.get_output_embeddings()
    head = lm_head.weight.numel() if lm_head is not None else 0
    linear = sum(mod.weight.numel() for mod in m.modules() if isinstance(mod, torch.nn.Linear))
    dims = model_dims(m)  # parameters, layers, hidden, vocab: as the steps' own throughput logs read them
    tc = config.get_text_config() if hasattr(config, "get_text_config") else config
    return {"family": config.model_type, "params": dims.n_params, "matmul_params_lm": linear,
            "matmul_params_body": linear - head, "lm_head_params": head, "layers": dims.layers, "hidden": dims.hidden,
            "vocab": dims.vocab, "heads": tc.num_attention_heads,
            # K/V width per layer (grouped-query attention caches fewer heads than it queries)
            "kv_dim": (getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads)
            * (getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads)}


def fwd_flops(shape: dict, batch: int, seq: int, head: str = "lm", head_tokens: int | None = None) -> float:
    """Forward FLOPs of ``batch`` sequences of ``seq`` tokens: 2 x matmul params per token (lm head for "lm", a
    1-wide value head for "value") + attention scores and weighted sum (4 s^2 h per layer per sequence, as
    DeepSpeed-Chat's F counts it). ``head_tokens``: positions per sequence whose logits are needed (default all):
    the lm head is counted there only (required FLOPs, as MFU counts them). DeepSpeed-Chat's closed form (one home:
    :func:`chatrlhf.models.dims.flops_per_pass`) assumes a 4h MLP and an untied head; this counts the model's real
    layer shapes, and equals that form's body and attention terms on such a model (tests/bench)."""
    body = 2.0 * shape["matmul_params_body"] * batch * seq + 4.0 * batch * seq * seq * shape["hidden"] * shape["layers"]
    if head != "lm":
        return body + 2.0 * shape["hidden"] * batch * seq
    return body + 2.0 * shape["lm_head_params"] * batch * (seq if head_tokens is None else head_tokens)


def generation_flops(shape: dict, batch: int, prompt: int, response: int) -> float:
    """Prefill of the prompt (lm head on its last position) + (response - 1) KV-cached decode steps: 2 x params per
    token plus attention over the cached positions."""
    h, l, mm = shape["hidden"], shape["layers"], shape["matmul_params_lm"]
    f = fwd_flops(shape, batch, prompt, head_tokens=1)  # prefill: logits of the last position only
    for t in range(1, response):
        f += 2.0 * mm * batch + 4.0 * batch * (prompt + t) * h * l
    return f


def decode_bytes_per_step(shape: dict, batch: int, ctx: float, dtype_bytes: int) -> float:
    """Bytes one decode step must read: every matmul weight (lm head included) + the KV cache of the batch."""
    kv = 2.0 * shape["layers"] * batch * ctx * shape.get("kv_dim", shape["hidden"]) * dtype_bytes
    return shape["matmul_params_lm"] * dtype_bytes + kv


# ================================================================================================ models and data
def _single_token_words(tok) -> list[str]:
    # the TRL side builds its prompts from the same words; bench/trl.py has no chatrlhf imports, so it owns the helper
    from bench.trl import single_token_words

    return single_token_words(tok)


def write_bench_dataset(model_dir: Path, out_dir: Path, cfg: BenchConfig, n_rows: int) -> Path:
    """A local/jsonfile dataset whose prompts encode to exactly prompt_len tokens (BOS included) and whose answers
    to response_len - 1 tokens (+ the EOS the data layer appends): no padding anywhere, so both sides do the same
    work. Words are single tokens that the byte-level pre-tokenizer splits on spaces, so k words = k tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    words = _single_token_words(tok)
    if len(words) < 8:
        raise RuntimeError(f"{model_dir}: tokenizer has too few single-token words to build exact-length prompts")
    n_bos = len(tok("a")["input_ids"]) - len(tok("a", add_special_tokens=False)["input_ids"])
    rng = random.Random(0)

    def text(n: int) -> str:
        return "".join(rng.choice(words) for _ in range(n))

    def row() -> dict:
        p = text(cfg.prompt_len - n_bos)
        c, r = text(cfg.response_len - 1), text(cfg.response_len - 1)
        return {"prompt": p, "chosen": c, "rejected": r if r != c else r + words[0]}

    rows = [row() for _ in range(n_rows)]
    for r in rows[:4]:  # the exact-length property the timings rely on
        assert len(tok(r["prompt"])["input_ids"]) == cfg.prompt_len, r
        assert len(tok(r["prompt"] + r["chosen"])["input_ids"]) == cfg.prompt_len + cfg.response_len - 1
    (out_dir / "data").mkdir(parents=True, exist_ok=True)
    (out_dir / "data" / "train.json").write_text(json.dumps(rows))
    (out_dir / "data" / "eval.json").write_text(json.dumps([row() for _ in range(cfg.batch)]))
    return out_dir


def build_size(size: str, cfg: BenchConfig) -> dict:
    """Model dir + dataset for one size (reused when the same spec was built before)."""
    from chatrlhf.models.tiny import build_tiny_model

    spec = {k: v for k, v in SIZES[size].items() if k != "critic"}
    mdir = cfg.wdir / "models" / size
    meta = mdir / "tiny_model.json"
    ok = meta.exists() and all(json.loads(meta.read_text()).get(k) == v for k, v in spec.items())
    if not ok:
        build_tiny_model(spec.pop("family"), mdir, max_positions=max(512, 2 * (cfg.prompt_len + cfg.response_len)),
                         seed=0, **spec)
    n_rows = 3 * cfg.batch * (cfg.n_warmup + max(cfg.n_steps(), cfg.n_steps(True)) + 4)
    ddir = write_bench_dataset(mdir, cfg.wdir / "data" / f"{size}_{cfg.prompt_len}_{cfg.response_len}", cfg, n_rows)
    built = {"model_dir": str(mdir), "data_dir": str(ddir), "shape": model_shape(mdir)}
    critic = SIZES[size].get("critic")
    if critic:  # a separate reward model / critic (same tokenizer family: the data fits both)
        c = build_size(critic, cfg)
        built.update(critic_dir=c["model_dir"], critic_shape=c["shape"])
    return built


# ================================================================================================ our side (worker)
def _common_step_kwargs(job: dict) -> dict:
    return dict(output_dir=job["run_dir"], data_path=[f"local/jsonfile={job['data_dir']}"], data_split="1,1,1",
                data_output_path=str(Path(job["run_dir"]) / "data_cache"), dtype=job["dtype"], seed=1234,
                log_interval=1, resume="never", lr_scheduler_type="constant", eval_iters=1,
                per_device_eval_batch_size=job["batch"], skip_memory_check=True,
                **({"use_liger_kernel": True} if job.get("use_liger_kernel") else {}))


def _timed_run(job: dict, fn, cfg_obj) -> dict:
    """Run a step's ``run_*`` with a clock on every "train" record it logs (= one optimizer step / PPO round) and
    a copy of its "throughput" records; optionally profile the steps after warmup."""
    import torch

    from bench.trl import StepClock
    from chatrlhf.trainers import metrics as M

    acc = _accel()
    # no probes while profiling: they would join the profile
    clock = StepClock(job["dtype"], probe=not job.get("profile"), device=acc.device_name(),
                      sync=None if acc.device_name() == "cpu" else acc.synchronize)
    tput: list[dict] = []
    prof = {"p": None}
    warm = job["warmup"]
    orig = M.MetricsWriter.log

    def log(self, kind, step, **scalars):
        if kind == "train":
            clock.mark()
            if job.get("profile") and len(clock.ends) == warm + 1 and prof["p"] is None:
                prof["p"] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True)
                prof["p"].__enter__()
        if kind == "throughput":
            rec = {k: v for k, v in scalars.items() if isinstance(v, (int, float))}
            if "e2e_latency_s" in rec:  # PPO times its round up to this record: the boundary's probe is inside
                rec["e2e_latency_s"] -= clock.last_probe_s()
            tput.append(rec)
        return orig(self, kind, step, **scalars)

    M.MetricsWriter.log = log
    t0 = time.perf_counter()
    try:
        summary = fn(cfg_obj)
    finally:
        M.MetricsWriter.log = orig
        if prof["p"] is not None:
            prof["p"].__exit__(None, None, None)
    wall = time.perf_counter() - t0
    intervals = clock.step_times()
    import resource

    peak_mem = acc.max_memory_allocated() if acc.device_name() != "cpu" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # device memory; on CPU the process's peak RSS
    res = {"peak_mem_bytes": peak_mem, "step_times": intervals[warm:], "warmup_times": intervals[:warm],
           "step_peaks": clock.step_peaks()[warm:],
           "throughput": tput[1 + warm:],
           "wall_s": wall, "threads_after": torch.get_num_threads(),
           "summary": {k: v for k, v in (summary or {}).items() if isinstance(v, (int, float, str))}}
    if prof["p"] is not None:
        res["profile"] = _profile_table(prof["p"], job)
    return res


def _profile_table(p, job: dict) -> str:
    path = Path(job["run_dir"]).parent.parent / f"profile_{job['size']}_{job['task']}.txt"
    ka = p.key_averages()
    table = ka.table(sort_by="self_cpu_time_total", row_limit=30)
    shapes = p.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=25)
    path.write_text(table + "\n\nby input shape:\n" + shapes)
    return str(path)


def worker_sft(job: dict) -> dict:
    from chatrlhf.trainers.sft import SFTConfig, run_sft

    n = job["warmup"] + job["steps"] + 1
    cfg = SFTConfig(model_name_or_path=job["model_dir"], per_device_train_batch_size=job["batch"], max_steps=n,
                    learning_rate=1e-5, max_seq_len=job["prompt_len"] + job["response_len"],
                    **_common_step_kwargs(job))
    return _timed_run(job, run_sft, cfg)


def worker_reward(job: dict) -> dict:
    from chatrlhf.trainers import reward as R

    cls = getattr(R, "RewardConfig")
    n = job["warmup"] + job["steps"] + 1
    cfg = cls(model_name_or_path=job["critic_dir"], per_device_train_batch_size=job["batch"], max_steps=n,
              learning_rate=1e-5, max_seq_len=job["prompt_len"] + job["response_len"], **_common_step_kwargs(job))
    return _timed_run(job, R.run_reward, cfg)


def worker_rl(job: dict) -> dict:
    from chatrlhf.trainers.ppo.trainer import PPOConfig, run_ppo

    algo = job["task"]
    n = job["warmup"] + job["steps"] + 1
    g = job["group_size"] if algo != "ppo" else 1
    kw = _common_step_kwargs(job)
    cfg = PPOConfig(actor_model_name_or_path=job["model_dir"], critic_model_name_or_path=job["critic_dir"],
                    algo=algo, num_samples_per_prompt=max(g, 2), per_device_generation_batch_size=job["batch"] // g,
                    per_device_training_batch_size=job["batch"], max_prompt_seq_len=job["prompt_len"],
                    max_answer_seq_len=job["response_len"], min_new_tokens=job["response_len"], max_steps=n,
                    max_ratio=0.0, max_kl=0.0, **kw)
    cfg.validate()
    return _timed_run(job, run_ppo, cfg)


def worker_decode(job: dict) -> dict:
    """Decode speed through the product's generation path (px.generate_answers on a strategy-prepared model), with
    the hybrid engine (the default) and with transformers' generate (the baseline it replaces):
    decode time = t(prompt + R new tokens) - t(prompt + 1 new token), best of the repeats."""
    import torch

    from chatrlhf.engine import DeepSpeedStrategy, StrategyConfig
    from chatrlhf.models.loading import load_causal_lm, load_tokenizer
    from chatrlhf.trainers.ppo import experience as px

    strategy = DeepSpeedStrategy(StrategyConfig(dtype=job["dtype"], per_device_train_batch_size=job["batch"]))
    strategy.setup_distributed()
    tok = load_tokenizer(job["model_dir"], padding_side="left")
    model = load_causal_lm(job["model_dir"], dtype=strategy.torch_dtype)
    model = strategy.prepare_eval(model)
    rows = json.loads((Path(job["data_dir"]) / "data" / "train.json").read_text())[:job["batch"]]
    enc = tok([r["prompt"] for r in rows], return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"].to(strategy.device), enc["attention_mask"].to(strategy.device)
    acc = _accel()

    def gen(n_new: int, hybrid: bool = True) -> float:
        p = px.GenerationParams(max_new_tokens=n_new, min_new_tokens=n_new, hybrid=hybrid)
        _sync(acc)
        t0 = time.perf_counter()
        seq, _ = px.generate_answers(model, strategy, tok, ids, mask, p)
        _sync(acc)
        assert seq.shape[1] == ids.shape[1] + n_new, (seq.shape, ids.shape, n_new)
        return time.perf_counter() - t0

    R = job["response_len"]
    for _ in range(job["warmup"]):
        gen(R)
    reps = job["steps"]
    full = [gen(R) for _ in range(reps)]
    pre = [gen(1) for _ in range(reps)]
    gen(R, hybrid=False)
    res = {"full_s": full, "prefill_s": pre, "threads_after": torch.get_num_threads(),
           "generate_full_s": [gen(R, hybrid=False) for _ in range(reps)],
           "generate_prefill_s": [gen(1, hybrid=False) for _ in range(reps)]}
    if job.get("profile"):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as p:
            gen(R)
        res["profile"] = _profile_table(p, job)
    return res


# ================================================================================================ decode per family
FAMILY_DECODE = ("opt", "llama", "gpt_neox", "gpt2", "bloom")  # the families the hybrid engine decodes


def family_decode_row(model_dir: str | Path, batch: int, prompt_len: int, response_len: int, dtype: str,
                      min_time: float = 0.1, trials: int = 3) -> dict:
    """One model's rollout decode, side by side in this process: the hybrid engine's entry point
    (``hybrid.generate``: the path its calibration picks for this model, batch and prompt) and transformers'
    ``generate()``. ms per token step = (time of ``response_len`` new tokens - time of 1) / (response_len - 1), each
    time the best of ``trials`` timed batches (:func:`_best_rate`); prompts: random ids, no padding, exactly
    ``min_new_tokens = max_new_tokens`` new tokens."""
    import torch

    from chatrlhf.engine import calibrate, hybrid
    from chatrlhf.models.loading import load_causal_lm, load_tokenizer

    tok = load_tokenizer(str(model_dir), padding_side="left")
    model = load_causal_lm(str(model_dir), dtype=torch.bfloat16 if dtype == "bf16" else torch.float32,
                           tokenizer=tok).eval()
    acc = _accel()
    dev = torch.device(acc.device_name())
    model.to(dev)
    ids = torch.randint(16, 256, (batch, prompt_len), generator=torch.Generator().manual_seed(0)).to(dev)
    mask = torch.ones_like(ids)
    pad = tok.pad_token_id
    kind = model.config.model_type
    path = hybrid.decode_path(model, ids, mask, response_len, pad)  # decided on the full response length
    d = next((x for x in reversed(calibrate.decisions()) if x["part"] == "decode"
              and x["shape"].get("model_type") == kind), None)

    def step_ms(use_hybrid: bool) -> float:
        def best_s(n: int) -> float:
            run = lambda: hybrid.generate(model, ids, mask, max_new_tokens=n, pad_token_id=pad,  # noqa: E731
                                          eos_token_id=None, min_new_tokens=n, hybrid=use_hybrid)
            return 1.0 / _best_rate(run, 1.0, min_time, trials, acc)

        return max(best_s(response_len) - best_s(1), 1e-9) / (response_len - 1) * 1e3

    hyb, gen = step_ms(True), step_ms(False)
    return {"model_type": kind, "path": path, "how": d["how"] if d else "only candidate",
            "candidates_s": d["seconds"] if d else {}, "hybrid_step_ms": hyb, "generate_step_ms": gen,
            "speedup": gen / hyb, "params": sum(p.numel() for p in model.parameters())}


def worker_families(job: dict) -> dict:
    """:func:`family_decode_row` for a tiny model of each of :data:`FAMILY_DECODE` at the ``tiny`` size's shape
    (built under ``job["models_dir"]``, reused when the same spec was built before)."""
    from chatrlhf.models.tiny import build_tiny_model

    spec = {k: v for k, v in SIZES["tiny"].items() if k != "family"}
    min_time, trials = (0.05, 2) if job.get("quick") else (0.1, 3)
    rows: dict[str, dict] = {}
    for fam in FAMILY_DECODE:
        mdir = Path(job["models_dir"]) / f"family_{fam}"
        meta = mdir / "tiny_model.json"
        if not (meta.exists() and all(json.loads(meta.read_text()).get(k) == v for k, v in spec.items())):
            build_tiny_model(fam, mdir, max_positions=max(512, 2 * (job["prompt_len"] + job["response_len"])),
                             seed=0, **spec)
        try:
            rows[fam] = family_decode_row(mdir, job["batch"], job["prompt_len"], job["response_len"], job["dtype"],
                                          min_time, trials)
        except Exception as e:  # one family's failure is reported in its row, the others still run
            rows[fam] = {"error": f"{type(e).__name__}: {e}"[:300]}
    return {"shape": spec, "batch": job["batch"], "prompt_len": job["prompt_len"],
            "response_len": job["response_len"], "dtype": job["dtype"], "rows": rows}


def run_family_decode(cfg: BenchConfig, dtype: str, threads: int) -> dict:
    """:func:`worker_families` in a fresh process (as every measured task); its result, or its error."""
    job = {"task": "families", "models_dir": str(cfg.wdir / "models"), "batch": cfg.batch,
           "prompt_len": cfg.prompt_len, "response_len": cfg.response_len, "dtype": dtype, "threads": threads,
           "quick": cfg.quick}
    cmd = [sys.executable, "-c", "import sys; from bench.harness import worker_main; sys.exit(worker_main(sys.argv[1]))",
           json.dumps(job)]
    return _run_json(cmd, cfg.wdir / "logs" / "ours_families.log", cfg.timeout, _env(threads))


def render_family_decode(fam: dict | None) -> list[str]:
    """The "rollout decode per family" table of results.md (nothing when the task did not run)."""
    if not fam:
        return []
    lines = ["## Rollout decode per family: hybrid vs generate()", ""]
    if not fam.get("ok", True) and not fam.get("rows"):
        return lines + [f"error: {fam.get('error')}", ""]
    sh = fam.get("shape", {})
    lines += [f"Tiny random models (hidden {sh.get('hidden')}, {sh.get('layers')} layers, {sh.get('heads')} heads, "
              f"vocab {sh.get('vocab')}), {fam.get('dtype')}, batch {fam.get('batch')}, prompt {fam.get('prompt_len')}"
              f", exactly {fam.get('response_len')} new tokens; one process, both sides through "
              "`hybrid.generate` (`hybrid=True`: the path the calibration picks; `hybrid=False`: transformers' "
              "`generate()`). ms/step = (time of all new tokens − time of 1) ÷ (new tokens − 1), each the best of "
              "a few timed batches. Path: the calibration's choice, how it was made, and its candidates' times "
              "(16 greedy tokens of this batch each).", "",
              "| family | hybrid ms/step | generate() ms/step | speed-up | path picked (candidates) | target | verdict |",
              "|---|---|---|---|---|---|---|"]
    target = f">= generate() (x{TARGETS['vs_plain_min']})"
    for name, r in fam.get("rows", {}).items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error']} | | | | {target} | n/a |")
            continue
        cands = ", ".join(f"{n} {t * 1e3:.3g} ms" for n, t in sorted(r["candidates_s"].items(), key=lambda x: x[1]))
        verdict = "PASS" if r["speedup"] >= TARGETS["vs_plain_min"] else "FAIL"
        lines.append(f"| {name} | {r['hybrid_step_ms']:.2f} | {r['generate_step_ms']:.2f} | {r['speedup']:.2f}x | "
                     f"**{r['path']}** ({r['how']}{': ' + cands if cands else ''}) | {target} | {verdict} |")
    return lines + [""]


WORKERS = {"sft": worker_sft, "reward": worker_reward, "ppo": worker_rl, "grpo": worker_rl, "decode": worker_decode,
           "families": worker_families}


def worker_main(arg: str) -> int:
    job = json.loads(arg)
    from chatrlhf.utils import setup_env

    setup_env()
    set_threads(job["threads"])
    import transformers

    transformers.logging.set_verbosity_error()
    res: dict[str, Any] = {"task": job["task"], "ok": False}
    try:
        res.update(WORKERS[job["task"]](job))
        res["ok"] = True
        from chatrlhf.engine import calibrate

        res["paths"] = calibrate.decisions()  # which implementation of each hot path ran, and its timings
    except ModuleNotFoundError as e:
        res["error"] = f"not available yet: {e}"
    except Exception as e:
        import traceback

        traceback.print_exc()
        res["error"] = f"{type(e).__name__}: {e}"[:500]
    print("BENCH_JSON " + json.dumps(res, default=str), flush=True)
    return 0 if res["ok"] else 1


# ================================================================================================ subprocesses
def _run_json(cmd: list[str], log: Path, timeout: int, env: dict | None = None) -> dict:
    """Run a measurement process; its last ``BENCH_JSON`` line is the result; all output goes to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        with open(log, "w") as fh:
            p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=fh, text=True, timeout=timeout, env=env)
        out = p.stdout
    except subprocess.TimeoutExpired as e:
        return {"ok": False, "error": f"timed out after {timeout}s (log: {log})", "wall_s": time.perf_counter() - t0,
                "partial": (e.stdout or b"")[-2000:].decode() if isinstance(e.stdout, bytes) else ""}
    with open(log, "a") as fh:
        fh.write("\n--- stdout ---\n" + out)
    for line in reversed(out.splitlines()):
        if line.startswith("BENCH_JSON "):
            return json.loads(line[len("BENCH_JSON "):])
    return {"ok": False, "error": f"exit {p.returncode}, no result (log: {log})"}


def _env(threads: int) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_DISABLED="true",
               TRANSFORMERS_NO_ADVISORY_WARNINGS="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join(import_roots() + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def import_roots() -> list[str]:
    """What a measured process must import, first on its PYTHONPATH: ``bench`` (the repository root) and the
    chatrlhf this process runs (its source folder, unless that is an installed copy in site-packages, which the
    child finds by itself and which must not go ahead of the standard library)."""
    roots = [str(REPO)]
    pkg_root = Path(chatrlhf.__file__).resolve().parents[1]
    if pkg_root.name not in ("site-packages", "dist-packages") and str(pkg_root) not in roots:
        roots.append(str(pkg_root))
    return roots


def run_ours(task: str, size: str, built: dict, cfg: BenchConfig, dtype: str, threads: int,
             side: str = "ours", env: dict | None = None, extra: dict | None = None) -> dict:
    """Our ``task`` in a fresh process; ``side``/``env``/``extra`` (job fields) name and configure a variant
    (``plain``: fused kernels off; ``liger``: Liger-Kernel on)."""
    rl = task in ("ppo", "grpo")
    run_dir = cfg.wdir / "runs" / f"{size}_{task}_{side}"
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir, ignore_errors=True)
    job = {"task": task, "size": size, "model_dir": built["model_dir"], "data_dir": built["data_dir"],
           "critic_dir": built.get("critic_dir", built["model_dir"]),
           "run_dir": str(run_dir), "batch": cfg.batch, "prompt_len": cfg.prompt_len,
           "response_len": cfg.response_len, "group_size": cfg.group_size, "warmup": cfg.n_warmup,
           "steps": cfg.n_steps(rl), "dtype": dtype, "threads": threads, "profile": cfg.profile, **(extra or {})}
    cmd = [sys.executable, "-c", "import sys; from bench.harness import worker_main; sys.exit(worker_main(sys.argv[1]))",
           json.dumps(job)]
    return _run_json(cmd, cfg.wdir / "logs" / f"{side}_{size}_{task}.log", cfg.timeout,
                     {**_env(threads), **(env or {})})


def ensure_trl_venv(path: Path, version: str) -> Path:
    """Create ``path`` with trl==version (torch pinned by constraints.txt, transformers/tokenizers/datasets/
    accelerate at the main venv's versions so both sides run the same model code). Returns its python."""
    py = path / "bin" / "python"
    want = version or ""
    if py.exists():
        r = subprocess.run([str(py), "-c", "import trl; print(trl.__version__)"], capture_output=True, text=True)
        if r.returncode == 0 and (not want or r.stdout.strip() == want):
            return py
    import importlib.metadata as md

    print(f"bench: creating {path} with trl{'==' + want if want else ''} (once; about a minute)...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    pins = []
    for pkg in ("torch", "transformers", "tokenizers", "datasets", "accelerate"):
        try:
            v = md.version(pkg)
            pins.append(f"{pkg}=={v}" if pkg != "torch" else f"torch=={v.split('+')[0]}")
        except md.PackageNotFoundError:
            pins.append(pkg)
    cons = REPO / "constraints.txt"
    cmd = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    if cons.exists():
        cmd += ["-c", str(cons)]
    cmd += pins + [f"trl=={want}" if want else "trl"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"pip install into {path} failed:\n{r.stderr[-3000:]}")
    return py


def run_trl(task: str, size: str, built: dict, cfg: BenchConfig, dtype: str, threads: int) -> dict:
    rl = task in ("ppo", "grpo")
    venv, version = ((cfg.trl_ppo_venv, cfg.trl_ppo_version) if task == "ppo" else (cfg.trl_venv, cfg.trl_version))
    vpath = Path(venv) if Path(venv).is_absolute() else REPO / venv
    try:
        py = ensure_trl_venv(vpath, version)
    except Exception as e:
        return {"ok": False, "error": f"venv: {e}"[:800]}
    job = {"task": task, "model_dir": built["model_dir"], "rm_dir": built.get("critic_dir", built["model_dir"]),
           "batch": cfg.batch,
           "prompt_len": cfg.prompt_len, "response_len": cfg.response_len, "group_size": cfg.group_size,
           "warmup": cfg.n_warmup, "steps": cfg.n_steps(rl), "dtype": dtype, "threads": threads, "beta": 0.1}
    env = _env(threads)
    env.pop("PYTHONPATH", None)  # the TRL side never imports chatrlhf
    res = _run_json([str(py), str(TRL_SCRIPT), json.dumps(job)], cfg.wdir / "logs" / f"trl_{size}_{task}.log",
                    cfg.timeout, env)
    if res.get("ok"):
        for key in ("step_times", "step_peaks", "generation_times"):
            if key in res:
                times = res.pop(key)
                res[f"warmup_{key}"], res[key] = times[:cfg.n_warmup], times[cfg.n_warmup:]
    return res


# ================================================================================================ analysis
def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _step_times(x: dict) -> tuple[float, float]:
    """(best, median) of a process's timed steps. Ratios and verdicts use the best, against the run's highest
    probes (:func:`run_limits`): on a shared machine noise only ever adds time (this VM's steps of one run spread
    by up to 1.5x). The median is reported beside it."""
    return min(x["step_times"]), statistics.median(x["step_times"])


def _beside_steps(x: dict) -> dict:
    """The matmul peak probed beside the timed steps (lowest, highest): whether a process ran in one of the VM's
    slow spells. Shown, not divided by: those spells slow the 2048³ probe and our steps by different factors
    (reward-model steps barely moved while the probe fell from 259 to 141 GFLOP/s; SFT steps slowed more than the
    probe), so a step-by-step ratio would be biased either way."""
    peaks = x.get("step_peaks") or []
    return {"peak_beside_steps": [min(peaks), max(peaks)]} if peaks else {}


def _split(tput: list[dict]) -> dict | None:
    """Median generation / experience-forward / training / other seconds from our PPO throughput records."""
    if not tput:
        return None
    keys = {"generation_s": "generation_latency_s", "experience_fwd_s": "inference_latency_s",
            "training_s": "training_latency_s", "e2e_s": "e2e_latency_s"}
    out = {}
    for k, src in keys.items():
        vals = [t[src] for t in tput if src in t]
        out[k] = statistics.median(vals) if vals else None
    if all(out.get(k) is not None for k in keys):
        out["other_s"] = max(0.0, out["e2e_s"] - out["generation_s"] - out["experience_fwd_s"] - out["training_s"])
    return out


@dataclass(frozen=True)
class Frame:
    """What one size's rows are computed against: the batch and lengths, the models' shapes (``cshape``: the reward
    model / critic, a separate smaller model or the actor's), the run's limits and the dtype's bytes."""
    size: str
    shape: dict
    cshape: dict
    B: int
    P: int
    R: int
    peak: float | None  # matmul FLOP/s of the dtype used
    bw: float | None  # read bandwidth, bytes/s
    dbytes: int

    @property
    def S(self) -> int:
        return self.P + self.R


def _frame(size: str, built: dict, limits: dict, cfg: BenchConfig, dtype: str) -> Frame:
    shape = built["shape"]
    return Frame(size, shape, built.get("critic_shape") or shape, cfg.batch, cfg.prompt_len, cfg.response_len,
                 limits.get(f"matmul_{dtype}_flops") if limits else None,
                 limits.get("read_bw_bytes_per_s") if limits else None, 4 if dtype == "fp32" else 2)


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def _at_least(x: float | None, target: float) -> bool | None:
    return None if x is None else x >= target


def _judge(r: dict, checks: list[tuple[str, bool | None]]) -> None:
    """A row's target (the checks' names) and verdict (PASS / FAIL / n/a per check; "-" when none applies)."""
    r["target"] = "; ".join(c[0] for c in checks)
    r["verdict"] = "; ".join(_verdict(c[1]) for c in checks) if checks else "-"


def _ratio(a: dict, b: dict, key: str) -> float | None:
    return (a[key] / b[key]) if key in a and key in b else None


def _sides(r: dict, res: dict, task: str, sides: tuple[str, ...], figures) -> None:
    """``r[side]`` for each side that ran ``task``: ``figures(side, x)`` when it timed steps, else its error."""
    for side in sides:
        x = res.get((side, task))
        if x and x.get("ok") and x.get("step_times"):
            r[side] = figures(side, x)
        elif x:
            r[side] = {"error": x.get("error", "no steps")}


def analyse(size: str, built: dict, res: dict, limits: dict, cfg: BenchConfig, dtype: str) -> dict:
    """Per-size table rows: figures, ratios and verdicts."""
    f = _frame(size, built, limits, cfg, dtype)
    rows: dict[str, dict] = {}
    # SFT trains on the answer: the lm head is needed for the R positions predicting its tokens
    for task, seqs, head, sh in (("sft", f.B, "lm", f.shape), ("reward", 2 * f.B, "value", f.cshape)):
        if res.get(("ours", task)) is not None or res.get(("trl", task)) is not None:
            rows[task] = _train_row(f, task, res, seqs, head, sh)
    for task in ("ppo", "grpo"):
        if res.get(("ours", task)) is not None or res.get(("trl", task)) is not None:
            rows[task] = _rl_row(f, task, res)
    if res.get(("ours", "decode")) is not None:
        rows.update(_decode_rows(f, res[("ours", "decode")]))
    return rows


# ---- SFT / RM
def _train_row(f: Frame, task: str, res: dict, seqs: int, head: str, sh: dict) -> dict:
    """SFT or RM: tokens/s and MFU of ours, TRL and our plain torch path; ratios; MFU and vs-plain verdicts."""
    flops = 3.0 * fwd_flops(sh, seqs, f.S, head, head_tokens=f.R)
    r: dict[str, Any] = {"flops_per_step": flops, "tokens_per_step": seqs * f.S}

    def figures(_side: str, x: dict) -> dict:
        t, med = _step_times(x)
        peak = f.peak
        return {"step_s": t, "step_s_median": med, "tokens_per_s": seqs * f.S / t, "flops_per_s": flops / t,
                "peak_flops": peak, "mfu": (flops / t / peak) if peak else None,
                "mfu_median": (flops / med / peak) if peak else None, "steps": len(x["step_times"]),
                **_beside_steps(x)}

    _sides(r, res, task, ("ours", "trl", "plain"), figures)
    o = r.get("ours", {})
    r["ours_vs_trl"] = _ratio(o, r.get("trl", {}), "tokens_per_s")
    r["ours_vs_plain"] = _ratio(o, r.get("plain", {}), "tokens_per_s")
    checks, t = [], TARGETS["sizes"].get(f.size, {})
    if "train_mfu_min" in t:
        checks.append((f"MFU >= {t['train_mfu_min']:.0%}", _at_least(o.get("mfu"), t["train_mfu_min"])))
    if r["ours_vs_plain"] is not None:  # the default path must not lose to plain torch ops (noise allowed)
        checks.append((f">= plain torch path (x{TARGETS['vs_plain_min']})",
                       r["ours_vs_plain"] >= TARGETS["vs_plain_min"]))
    _judge(r, checks)
    return r


# ---- PPO / GRPO
def _rl_flops(f: Frame, task: str) -> tuple[float, dict, float]:
    """(FLOPs of one step, its generation / experience / training split, the FLOPs our step skips when it trains
    through the experience pass's actor (and critic) forward)."""
    B, S = f.B, f.S
    gen = generation_flops(f.shape, B, f.P, f.R)
    n_fwd_lm, n_fwd_v = (2, 2) if task == "ppo" else (2, 1)  # experience: actor+ref (+critic) + reward
    lm = fwd_flops(f.shape, B, S, "lm", head_tokens=f.R)  # actor/reference log-probs of the R answer tokens
    exp = n_fwd_lm * lm + n_fwd_v * fwd_flops(f.cshape, B, S, "value")
    train = 3.0 * lm + (3.0 * fwd_flops(f.cshape, B, S, "value") if task == "ppo" else 0)
    reused = lm + (fwd_flops(f.cshape, B, S, "value") if task == "ppo" else 0)
    return gen + exp + train, {"generation": gen, "experience": exp, "training": train}, reused


def _rl_side(f: Frame, side: str, x: dict, total: float, reused: float) -> dict:
    """One side's PPO/GRPO figures: samples/s, step / FLOP-bound floor, ours: the step split and the floor of the
    work done; TRL: its generation time."""
    t, med = _step_times(x)
    peak = f.peak
    fl = total / peak if peak else None
    d = {"step_s": t, "step_s_median": med, "samples_per_s": f.B / t, "floor_s": fl, "peak_flops": peak,
         "floor_ratio": (t / fl) if fl else None, "floor_ratio_median": (med / fl) if fl else None,
         "steps": len(x["step_times"]), **_beside_steps(x)}
    if side == "ours" and (x.get("summary") or {}).get("reused_experience_forward") and peak:
        d["work_floor_s"] = (total - reused) / peak  # the FLOPs this step actually performs
        d["work_floor_ratio"] = t / d["work_floor_s"]
    if side == "ours":
        d["split"] = _split(x.get("throughput", []))
    elif x.get("generation_times"):
        d["split"] = {"generation_s": _median(x["generation_times"])}
    if x.get("response_lengths"):
        d["response_lengths"] = sorted(set(x["response_lengths"]))
    return d


def _rl_row(f: Frame, task: str, res: dict) -> dict:
    """PPO or GRPO: FLOPs and floor of a step, both sides' figures, ours/TRL, the size's verdicts."""
    total, split, reused = _rl_flops(f, task)
    r: dict[str, Any] = {"flops_per_step": total, "flops_split": split,
                         "floor_s": total / f.peak if f.peak else None, "samples_per_step": f.B}
    _sides(r, res, task, ("ours", "trl"), lambda side, x: _rl_side(f, side, x, total, reused))
    o = r.get("ours", {})
    r["ours_vs_trl"] = _ratio(o, r.get("trl", {}), "samples_per_s")
    vs_trl = r["ours_vs_trl"]
    checks, t = [], TARGETS["sizes"].get(f.size, {})
    if task == "ppo" and "ppo_floor_ratio_max" in t:
        checks.append((f"step <= {t['ppo_floor_ratio_max']}x floor",
                       None if o.get("floor_ratio") is None else o["floor_ratio"] <= t["ppo_floor_ratio_max"]))
    if f.size == "mid":
        checks.append(("faster than TRL", None if vs_trl is None else vs_trl > 1.0))
    if task == "ppo" and f.size == "tiny":
        checks.append((f">= {TARGETS['ppo_vs_trl_min']:.0f}x TRL PPO", _at_least(vs_trl, TARGETS["ppo_vs_trl_min"])))
    _judge(r, checks)
    return r


# ---- decode: the hybrid engine (default path; the target) and transformers' generate (baseline)
def _decode_figures(f: Frame, full_s: list[float], prefill_s: list[float]) -> dict:
    """Decode tokens/s and ms/step (time of R new tokens - time of 1, best of each), against the bandwidth bound."""
    B, P, R, shape = f.B, f.P, f.R, f.shape
    full, pre = min(full_s), min(prefill_s)
    dec_s = max(full - pre, 1e-9)
    toks = B * (R - 1)
    ctx = P + R / 2.0
    bound_step = decode_bytes_per_step(shape, B, ctx, f.dbytes) / f.bw if f.bw else None
    bound_tps = B / bound_step if bound_step else None
    return {"decode_tokens_per_s": toks / dec_s, "decode_step_ms": dec_s / (R - 1) * 1e3,
            "prefill_s": pre, "generate_s": full,
            "bytes_per_step": decode_bytes_per_step(shape, B, ctx, f.dbytes),
            "bound_tokens_per_s": bound_tps, "bound_step_ms": bound_step * 1e3 if bound_step else None,
            "bw_fraction": (toks / dec_s / bound_tps) if bound_tps else None,
            "flops_per_s": (generation_flops(shape, B, P, R) - fwd_flops(shape, B, P, head_tokens=1)) / dec_s}


def _decode_rows(f: Frame, d: dict) -> dict:
    """Rows ``decode`` (the default decoder, with its verdicts) and ``decode_generate`` (the baseline, none)."""
    rows: dict[str, dict] = {}
    for key, prefix in (("decode", ""), ("decode_generate", "generate_")):
        if d.get("ok") and d.get(f"{prefix}full_s"):
            rows[key] = _decode_figures(f, d[f"{prefix}full_s"], d[f"{prefix}prefill_s"])
        elif key == "decode":
            rows[key] = {"error": d.get("error")}
    o, g = rows["decode"], rows.get("decode_generate", {})
    o["vs_generate"] = _ratio(o, g, "decode_tokens_per_s")
    checks = [(f">= generate() (x{TARGETS['vs_plain_min']})", _at_least(o["vs_generate"], TARGETS["vs_plain_min"]))]
    t = TARGETS["sizes"].get(f.size, {})
    if "decode_bw_min" in t:
        checks.append((f">= {t['decode_bw_min']:.0%} of bandwidth bound",
                       _at_least(o.get("bw_fraction"), t["decode_bw_min"])))
    _judge(o, checks)
    if g:
        g["target"], g["verdict"] = "", "-"
    return rows


# ================================================================================================ report
def _f(x: Any, fmt: str = "{:.3g}") -> str:
    if x is None:
        return "—"
    if isinstance(x, str):
        return x
    return fmt.format(x)


def _pct(x: Any) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _mfu(side: dict) -> str:
    """"57.0% (52.1%) of 170": utilization at the best (median) step against the run's highest matmul peak
    (GFLOP/s)."""
    if side.get("mfu") is None:
        return "—"
    u = _pct(side["mfu"]) + (f" ({_pct(side['mfu_median'])})" if side.get("mfu_median") is not None else "")
    return f"{u} of {side['peak_flops'] / 1e9:.0f}" if side.get("peak_flops") else u


def _beside(side: dict) -> str:
    """"141-259": the matmul peak (GFLOP/s) probed beside the timed steps."""
    lo_hi = side.get("peak_beside_steps")
    return f"{lo_hi[0] / 1e9:.0f}-{lo_hi[1] / 1e9:.0f}" if lo_hi else "—"


def render_md(report: dict) -> str:
    """results.md: machine and limits, settings, each size's tables, the per-family decode table, the method."""
    lines = _md_machine(report) + _md_limits(report) + _md_settings(report)
    for size, sres in report["sizes"].items():
        lines += _md_size(size, sres)
    lines += render_family_decode(report.get("families"))
    lines += _MD_METHOD
    return "\n".join(lines)


def _md_machine(report: dict) -> list[str]:
    m = report["machine"]
    return ["# chatrlhf bench results", "",
            f"Generated {report['date']} by `python -m bench {' '.join(report['argv'])}`"
            f"{' (QUICK: few steps, noisy)' if report['config']['quick'] else ''}.", "",
            "## Machine", "",
            f"- {m['device']}: {m['cpu']} — {m['cores']} cores, torch threads {m['threads']}; flags: "
            f"{', '.join(m['cpu_flags']) or '—'}; memory {m.get('mem_gib', '—')} GiB; load at start {m.get('loadavg')}",
            f"- versions: {', '.join(f'{k} {v}' for k, v in report['versions'].items())}",
            f"- dtype used: **{report['dtype']}** (auto: bf16 only where the device does it natively)",
            ""]


def _md_limits(report: dict) -> list[str]:
    """The limits table: start and end of the run, the probes around each process, the highest (used)."""
    lim = report.get("limits") or {}
    if not lim:
        return []
    end, used = report.get("limits_end") or {}, report.get("limits_used") or lim
    probes = [x for sres in report["sizes"].values() for r in (sres.get("raw") or {}).values()
              if isinstance(r, dict) for x in r.get("peak_probes", [])]

    def row(name: str, key: str, scale: float, unit: str, extra: str = "") -> str:
        cells = [f"{d[key] / scale:.1f} {unit}" if key in d else "—" for d in (lim, end, used)]
        return f"| {name} | {cells[0]} | {cells[1]} | {extra or '—'} | **{cells[2]}** |"

    rng = (f"{min(probes) / 1e9:.0f}-{max(probes) / 1e9:.0f} GFLOP/s ({len(probes)} probes)" if probes else "")
    dt = report["dtype"]
    return ["| limit | start of run | end of run | around each measured process | used for ratios (highest) |",
            "|---|---|---|---|---|",
            row(f"matmul fp32 ({lim['matmul_n']}³)", "matmul_fp32_flops", 1e9, "GFLOP/s",
                rng if dt == "fp32" else ""),
            row(f"matmul bf16 ({lim['matmul_n']}³)", "matmul_bf16_flops", 1e9, "GFLOP/s",
                rng if dt == "bf16" else ""),
            row(f"memory read (sum over {lim['read_bw_tensor_bytes'] >> 20} MiB)", "read_bw_bytes_per_s", 1e9,
                "GB/s"), ""]


def _md_settings(report: dict) -> list[str]:
    c = report["config"]
    return [f"Settings: batch {c['batch']}, prompt {c['prompt_len']}, response exactly {c['response_len']} tokens; "
            f"GRPO group {c['group_size']}; warmup {report['warmup']}, then {report['steps']} timed train / "
            f"{report['rl_steps']} RL steps: figures from the fastest, the median in brackets. Ours = the product's "
            "`run_sft`/`run_reward`/`run_ppo` (DeepSpeedStrategy, ZeRO-0) in a fresh process; step time = interval "
            "between consecutive logged steps (data, forward, backward, optimizer, logging). TRL = `bench/trl.py` in "
            "the TRL venvs; step time = interval between `on_step_end` callbacks.", ""]


def _md_size(size: str, sres: dict) -> list[str]:
    """One size's section: its models, an error, the train / RL / decode / Liger tables, failures, paths taken."""
    sh = sres.get("shape", {})
    cs = sres.get("critic_shape")
    critic = (f"; reward model and critic: {cs.get('family', '')} hidden {cs.get('hidden')}, {cs.get('layers')} "
              f"layers, {cs.get('params', 0) / 1e6:.2f} M params" if cs else "")
    lines = [f"## {size}: {sh.get('family', 'llama')} hidden {sh.get('hidden')}, {sh.get('layers')} layers, vocab "
             f"{sh.get('vocab')}, {sh.get('params', 0) / 1e6:.2f} M params ({sh.get('matmul_params_lm', 0) / 1e6:.2f} "
             f"M in matmuls){critic}", ""]
    rows = sres.get("rows", {})
    if "error" in sres:
        lines += [f"error: {sres['error']}", ""]
    raw = sres.get("raw") if isinstance(sres.get("raw"), dict) else {}
    return lines + _md_train(rows) + _md_rl(rows) + _md_decode(rows) + _md_liger(raw) + _md_errors(raw) + \
        _md_paths(raw)


def _md_train(rows: dict) -> list[str]:
    train = [(k, rows[k]) for k in ("sft", "reward") if k in rows]
    if not train:
        return []
    lines = ["| step | ours tokens/s | ours GFLOP/s | ours MFU (median) | peak beside ours | plain torch "
             "path tokens/s (MFU) | ours/plain | TRL tokens/s | TRL MFU (median) | peak beside TRL | ours/TRL "
             "| target | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for k, r in train:
        o, t, pl = r.get("ours", {}), r.get("trl", {}), r.get("plain")
        plain = "same path (fused kernels: fp32 only)" if pl is None else \
            f"{_f(pl.get('tokens_per_s'), '{:.0f}')} ({_pct(pl.get('mfu'))})"
        lines.append(
            f"| {k.upper() if k == 'sft' else 'RM'} | {_tput(o, 'tokens_per_s', '{:.0f}')} | "
            f"{_f(o.get('flops_per_s') and o['flops_per_s'] / 1e9, '{:.1f}')} | {_mfu(o)} | {_beside(o)} | "
            f"{plain} | {_f(r.get('ours_vs_plain'), '{:.2f}x')} | "
            f"{_tput(t, 'tokens_per_s', '{:.0f}')} | {_mfu(t)} | {_beside(t)} | "
            f"{_f(r.get('ours_vs_trl'), '{:.2f}x')} | {r.get('target') or '—'} | {r['verdict']} |")
    return lines + [""]


def _tput(side: dict, key: str, fmt: str) -> str:
    """A side's throughput cell: the figure, or "error" when that side failed."""
    return _f(side.get(key), fmt) if "error" not in side else "error"


def _md_rl(rows: dict) -> list[str]:
    rl = [(k, rows[k]) for k in ("ppo", "grpo") if k in rows]
    if not rl:
        return []
    lines = ["| step | ours samples/s | ours step s (median) | gen / exp-fwd / train / other s (medians) | "
             "floor s | step/floor (median) | step/floor of work done | peak beside ours | "
             "TRL samples/s | TRL step/floor | peak beside TRL | ours/TRL | target | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for k, r in rl:
        o, t = r.get("ours", {}), r.get("trl", {})
        sp = o.get("split") or {}
        split = " / ".join(_f(sp.get(x), "{:.2f}") for x in ("generation_s", "experience_fwd_s", "training_s",
                                                               "other_s")) if sp else "—"
        trl_name = "PPO (trl 1.12)" if k == "ppo" else "GRPO"
        lines.append(
            f"| {k.upper()} | {_tput(o, 'samples_per_s', '{:.2f}')} | "
            f"{_f(o.get('step_s'), '{:.2f}')} ({_f(o.get('step_s_median'), '{:.2f}')}) | {split} | "
            f"{_f(o.get('floor_s') or r.get('floor_s'), '{:.3f}')} | "
            f"{_f(o.get('floor_ratio'), '{:.2f}x')} ({_f(o.get('floor_ratio_median'), '{:.2f}x')}) | "
            f"{_f(o.get('work_floor_ratio'), '{:.2f}x')} | {_beside(o)} | "
            f"{_tput(t, 'samples_per_s', '{:.2f}')} "
            f"({trl_name}; gen {_f((t.get('split') or {}).get('generation_s'), '{:.2f}')} s) | "
            f"{_f(t.get('floor_ratio'), '{:.1f}x')} | {_beside(t)} | {_f(r.get('ours_vs_trl'), '{:.2f}x')} | "
            f"{r.get('target') or '—'} | {r['verdict']} |")
    return lines + [""]


def _md_decode(rows: dict) -> list[str]:
    if "decode" not in rows:
        return []
    lines = ["| decode | tokens/s | ms/step | bound tokens/s (bytes/step ÷ BW) | fraction of bound | target | verdict |",
             "|---|---|---|---|---|---|---|"]
    for key, name in (("decode", "ours: default (the measured-fastest decoder)"),
                      ("decode_generate", "ours: transformers generate (--no_enable_hybrid_engine)")):
        if key not in rows:
            continue
        r = rows[key]
        lines.append(
            f"| {name} | {_f(r.get('decode_tokens_per_s'), '{:.0f}')} | "
            f"{_f(r.get('decode_step_ms'), '{:.2f}')} | {_f(r.get('bound_tokens_per_s'), '{:.0f}')} "
            f"({_f(r.get('bytes_per_step') and r['bytes_per_step'] / 1e6, '{:.1f}')} MB) | "
            f"{_pct(r.get('bw_fraction'))} | {r.get('target') or '—'} | {r['verdict']} |")
    return lines + [""]


def _md_liger(raw: dict) -> list[str]:
    """--liger_compare: step time and peak memory without and with Liger-Kernel."""
    lig = [(t, raw.get(("ours", t)) or {}, raw[("liger", t)]) for t in ("sft", "reward", "ppo")
           if ("liger", t) in raw]
    if not lig:
        return []
    lines = ["| --use_liger_kernel | step s without (median) | step s with (median) | speed-up | peak memory "
             "without | peak memory with |", "|---|---|---|---|---|---|"]
    for t, off, on in lig:
        cells = []
        for x in (off, on):
            ok = x.get("ok") and x.get("step_times")
            best, med = _step_times(x) if ok else (None, None)
            cells.append((best, f"{_f(best, '{:.3f}')} ({_f(med, '{:.3f}')})" if ok else
                          f"error: {x.get('error')}"[:200], x.get("peak_mem_bytes")))
        speed = cells[0][0] / cells[1][0] if cells[0][0] and cells[1][0] else None
        mem = [_f(c[2] and c[2] / 2**30, "{:.2f} GiB") for c in cells]
        lines.append(f"| {t.upper() if t != 'reward' else 'RM'} | {cells[0][1]} | {cells[1][1]} | "
                     f"{_f(speed, '{:.2f}x')} | {mem[0]} | {mem[1]} |")
    return lines + [""]


def _md_errors(raw: dict) -> list[str]:
    lines = [f"- {side} {task}: {x.get('error')}" for (side, task), x in raw.items()
             if isinstance(x, dict) and x.get("error")]
    return lines + [""] if lines else []


def _md_paths(raw: dict) -> list[str]:
    """Which implementation of each hot path each process ran (engine/calibrate.py's decisions), with timings."""
    paths = [(side, task, d) for (side, task), x in raw.items() if isinstance(x, dict) for d in x.get("paths") or []]
    if not paths:
        return []
    lines = ["Paths taken (engine/calibrate.py: candidates timed side by side on this CPU, fastest kept):", ""]
    for side, task, d in paths:
        times = ", ".join(f"{n} {t * 1e3:.3g} ms" for n, t in sorted(d["seconds"].items(), key=lambda x: x[1]))
        shape = ", ".join(f"{k} {d['shape'][k]}" for k in ("dtype", "rows", "prompt", "width") if k in d["shape"])
        lines.append(f"- {side} {task}: {d['part']} ({shape}) → **{d['choice']}** ({d['how']}: {times})")
    return lines + [""]


# the last section of results.md
_MD_METHOD = ("## How the figures are computed", "",
              "- FLOPs per forward of B sequences of s tokens = 2 × (matmul parameters, lm head included) × B × s + "
              "4 × B × s² × h × layers (attention), the same terms as DeepSpeed-Chat's "
              "F = 24 k B s l h² (1 + s/(6h) + V/(16 l h)) but with the model's real layer shapes (llama: SwiGLU, tied "
              "embeddings), the lm head counted only where its logits are needed (required FLOPs, the same count for ours and "
              "TRL): SFT and PPO actor/reference log-probs on the R answer predictions, generation's prefill on its last "
              "position. Training = 3 × forward. MFU = achieved FLOP/s ÷ matmul peak of the dtype used, shown as "
              "\"MFU of peak\". The peak is the highest 2048³ matmul probe of the run: at its start and end, just "
              "before and after each measured process, and at every step boundary (a short probe, excluded from the "
              "step's time). \"Peak beside\" = the lowest-highest of a process's step-boundary probes: a low figure "
              "means its steps ran in one of this shared VM's slow spells.",
              "- PPO floor = (generation: prefill + 31 KV-cached decode steps at 2 × params per token + attention; "
              "experience forwards: actor, reference, critic, reward; training: 3 × forward of actor and critic) ÷ "
              "the run's matmul peak (ours: the floor column; TRL: its step/floor). GRPO: no critic.",
              "- Decode: time(generate 32 tokens) − time(generate 1 token), best of repeats; bound = batch × bandwidth ÷ "
              "(matmul weight bytes + KV-cache bytes per step). PPO/GRPO generate with the hybrid engine (default).",
              "- Step/floor of work done: our PPO/GRPO steps train through the experience pass's actor (and critic) "
              "forward (`--reuse_experience_forward`, on by default for on-policy steps), so they run one actor "
              "(and one critic) forward fewer than the floor counts; this column divides by the FLOPs actually "
              "performed. The target and verdict use the floor as defined (the standard step).",
              "- Ours vs the plain torch path (fp32 SFT/RM, fused kernels off): each side runs --plain_repeats times "
              "(2 unless quick), alternated, and each side's fastest run counts (in results.json: every run's best "
              "step, `runs_best_step`), so a slow spell of the VM during one process cannot decide the verdict.",
              "- Step times: the fastest of the timed steps, for ours and TRL alike (the median in brackets), against the "
              "highest peak and bandwidth probed in the run: both are the machine at its fastest, so drift can only "
              "lower a ratio (the median column shows the typical step against the same limits); verdicts use it. "
              "Steps are not divided by the probe beside them: the VM's slow spells slow that probe and our steps "
              "by different factors, which would bias such a ratio.",
              "- Targets: mid PPO ≤ 1.4× floor and faster than TRL (GRPO too); tiny PPO ≥ 6× TRL PPO; mid SFT/RM MFU "
              "≥ 70%; SFT/RM no slower than the plain torch path (fused kernels off; fp32 runs only) and the default "
              "decoder no slower than generate() at every size (0.97×: equal within noise); mid decode ≥ 60% of "
              "bound. Real size (SmolLM2-135M's architecture): SFT/RM MFU ≥ 65%, PPO ≤ 1.5× floor, decode ≥ 70% of "
              "bound.",
              "")


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "deepspeed", "chatrlhf"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _machine(threads: int) -> dict:
    import torch

    acc = _accel()
    dev = acc.device_name()
    m = {"device": dev, "cpu": cpu_model(), "cores": os.cpu_count(), "threads": threads, "cpu_flags": cpu_flags(),
         "platform": platform.platform()}
    try:
        m["loadavg"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                m["mem_gib"] = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    if dev != "cpu" and torch.cuda.is_available():
        m["gpu"] = torch.cuda.get_device_name(0)
        m["device"] = f"{dev} ({m['gpu']})"
    return m


def resolve_bench_dtype(dtype: str) -> str:
    if dtype != "auto":
        return dtype
    from chatrlhf.engine.device import resolve_dtype

    d = resolve_dtype("auto")
    return "bf16" if d == "bf16" else "fp32"  # fp16 never: the bench compares bf16/fp32 peaks


def limit_dtypes(dtype: str) -> tuple[str, ...]:
    """The matmul peaks worth probing: fp32, and bf16 where the run trains in it or the device does it natively.
    Elsewhere a bf16 probe measures an emulation (about 1 GFLOP/s on an AVX2 EPYC: minutes for one 2048³ probe)."""
    return ("fp32", "bf16") if "bf16" in (dtype, resolve_bench_dtype("auto")) else ("fp32",)


def main(argv: list[str] | None = None) -> int:
    """``python -m bench [options]``: measure, then write OUT/results.md and OUT/results.json."""
    argv = list(sys.argv[1:] if argv is None else argv)
    from chatrlhf.config import parse_config

    cfg = parse_config(BenchConfig, argv, prog="python -m bench", description=__doc__.split("\n\n")[0])
    cfg.validate()
    threads = set_threads(cfg.threads)
    cfg.wdir.mkdir(parents=True, exist_ok=True)
    dtype = resolve_bench_dtype(cfg.dtype)
    run = Run(cfg, dtype, threads, _new_report(cfg, argv, dtype, threads))
    tasks = cfg.task_list
    if "limits" in tasks:
        print("bench: measuring matmul peak and memory bandwidth...", flush=True)
        run.report["limits"] = lim = measure_limits(cfg.quick, dtypes=limit_dtypes(dtype))
        print("bench: " + ", ".join(f"{d} {lim[f'matmul_{d}_flops'] / 1e9:.1f} GFLOP/s" for d in limit_dtypes(dtype))
              + f", read {lim['read_bw_bytes_per_s'] / 1e9:.1f} GB/s", flush=True)
    for size in cfg.size_list:
        bench_size(run, size)
    if "families" in tasks:
        print("bench: rollout decode per family (hybrid engine vs generate())...", flush=True)
        fam = run.report["families"] = run_family_decode(cfg, dtype, threads)
        print(f"bench: families: {'ok' if fam.get('ok') else fam.get('error')}", flush=True)
        run.write()
    if "limits" in tasks and cfg.size_list:
        # Shared VMs drift: measured again at the end, these probes join the others (the highest is used).
        print("bench: measuring the limits again (drift check)...", flush=True)
        run.report["limits_end"] = measure_limits(cfg.quick, dtypes=limit_dtypes(dtype))
        run.analyse_all()
    run.write()
    print(f"bench: wrote {cfg.out_dir / 'results.md'} and {cfg.out_dir / 'results.json'}", flush=True)
    return 0


def _new_report(cfg: BenchConfig, argv: list[str], dtype: str, threads: int) -> dict[str, Any]:
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "argv": argv, "config": dataclasses.asdict(cfg),
            "dtype": dtype, "warmup": cfg.n_warmup, "steps": cfg.n_steps(), "rl_steps": cfg.n_steps(True),
            "machine": _machine(threads), "versions": _versions(), "targets": TARGETS, "sizes": {}}


@dataclass
class Run:
    """One bench run: its settings, the report it fills, and the raw results the report's rows derive from."""
    cfg: BenchConfig
    dtype: str
    threads: int
    report: dict[str, Any]
    results: dict[str, tuple[dict, dict]] = dataclasses.field(default_factory=dict)  # size -> (built, res)
    trl_versions: dict[str, str] = dataclasses.field(default_factory=dict)

    def measure(self, size: str, task: str, side: str, fn) -> dict:
        """``fn()`` (one measured process), between two matmul-peak probes when the run probes its limits."""
        r = with_peak_probes(fn, self.dtype) if "limits" in self.cfg.task_list else fn()
        _say(size, task, side, r)
        return r

    def analyse_all(self) -> None:
        """(Re-)derive every size's rows from the run's limits so far: the peak can rise with each probe."""
        report, dtype = self.report, self.dtype
        everything = [r for _, res in self.results.values() for r in res.values()]
        lim = run_limits(report["limits"], everything, report.get("limits_end"), dtype) if "limits" in report else {}
        report["limits_used"] = lim
        for sz, (b, res) in self.results.items():
            report["sizes"][sz] = {"shape": b["shape"], "model_dir": b["model_dir"],
                                   "critic_shape": b.get("critic_shape"),
                                   "rows": analyse(sz, b, res, lim, self.cfg, dtype),
                                   "raw": {f"{k[0]}_{k[1]}": v for k, v in res.items()}}

    def write(self) -> None:
        _write(self.cfg.out_dir, self.report, self.trl_versions)


def bench_size(run: Run, size: str) -> None:
    """Build one size's model and data, run its tasks, and write the results so far."""
    print(f"bench: [{size}] building model and data...", flush=True)
    try:
        built = build_size(size, run.cfg)
    except Exception as e:
        run.report["sizes"][size] = {"error": f"{type(e).__name__}: {e}"}
        return
    res: dict[tuple[str, str], dict] = {}
    for task in ("sft", "reward", "ppo", "grpo", "decode"):
        if task in run.cfg.task_list:
            bench_task(run, size, task, built, res)
    run.results[size] = (built, res)
    run.analyse_all()
    run.write()  # after each size: partial results survive an interrupted run


def bench_task(run: Run, size: str, task: str, built: dict, res: dict) -> None:
    """One task of one size into ``res``: ours; the plain torch path (fp32 SFT/RM: the fused kernels apply);
    ours with Liger-Kernel (--liger_compare); TRL (unless --skip_trl)."""
    cfg, dtype, threads = run.cfg, run.dtype, run.threads

    def ours(side: str = "ours", env: dict | None = None, extra: dict | None = None) -> dict:
        return run_ours(task, size, built, cfg, dtype, threads, side, env, extra)

    if task in ("sft", "reward") and dtype == "fp32":  # fused kernels apply: the plain path beside, alternated
        runs: dict[str, list[dict]] = {"ours": [], "plain": []}
        for i in range(cfg.n_plain_repeats):
            of = f" (run {i + 1} of {cfg.n_plain_repeats})" if cfg.n_plain_repeats > 1 else ""
            print(f"bench: [{size}] {task}: ours{of}...", flush=True)
            runs["ours"].append(run.measure(size, task, "ours", ours))
            print(f"bench: [{size}] {task}: ours, plain torch path (fused kernels off){of}...", flush=True)
            runs["plain"].append(run.measure(size, task, "plain",
                                             lambda: ours("plain", {"CHATRLHF_FUSED_KERNELS": "0"})))
        for side, rs in runs.items():
            res[(side, task)] = fastest_run(rs)
    else:
        print(f"bench: [{size}] {task}: ours...", flush=True)
        res[("ours", task)] = run.measure(size, task, "ours", ours)
    if cfg.liger_compare and task in ("sft", "reward", "ppo"):
        print(f"bench: [{size}] {task}: ours with --use_liger_kernel...", flush=True)
        res[("liger", task)] = run.measure(size, task, "liger", lambda: ours("liger", extra={"use_liger_kernel": True}))
    if not cfg.skip_trl and task != "decode":
        print(f"bench: [{size}] {task}: TRL...", flush=True)
        res[("trl", task)] = run.measure(size, task, "trl", lambda: run_trl(task, size, built, cfg, dtype, threads))
        v = res[("trl", task)].get("versions", {}).get("trl")
        if v:
            run.trl_versions[f"trl ({task})"] = v


def fastest_run(runs: list[dict]) -> dict:
    """Of one side's repeated runs, the one with the fastest timed step (a failed run only when all failed), with
    every run's best step in ``runs_best_step``."""
    ok = [r for r in runs if r.get("ok") and r.get("step_times")]
    if not ok:
        return runs[-1]
    best = dict(min(ok, key=lambda r: min(r["step_times"])))
    best["runs_best_step"] = [min(r["step_times"]) if r.get("ok") and r.get("step_times") else None for r in runs]
    best["peak_probes"] = [p for r in runs for p in r.get("peak_probes", [])]  # every probe joins the run's peak
    return best


def _say(size: str, task: str, side: str, r: dict) -> None:
    if r.get("ok"):
        st = r.get("step_times") or []
        msg = f"best step {min(st):.3f}s, median {statistics.median(st):.3f}s over {len(st)}" if st else "ok"
    else:
        msg = f"FAILED: {r.get('error')}"
    print(f"bench: [{size}] {task} {side}: {msg}", flush=True)


def _write(out: Path, report: dict, trl_versions: dict) -> None:
    from chatrlhf.utils import atomic_write_json, atomic_write_text

    report["versions"].update(trl_versions)
    md_report = dict(report)
    # raw per-size results keyed "side_task" for the errors list
    md_sizes = {}
    for size, s in report["sizes"].items():
        s2 = dict(s)
        if isinstance(s.get("raw"), dict):
            s2["raw"] = {tuple(k.split("_", 1)): v for k, v in s["raw"].items()}
        md_sizes[size] = s2
    md_report["sizes"] = md_sizes
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.md", render_md(md_report))
    atomic_write_json(out / "results.json", report)


if __name__ == "__main__":
    raise SystemExit(main())
