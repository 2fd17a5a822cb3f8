"""``chatrlhf report DIR``: (re)write DIR/report.md and DIR/plots/*.png for a run directory.

Reads what exists (any step may be missing or still running; a torn last metrics line is skipped):
``step1_sft/metrics.jsonl``, ``step2_reward/metrics.jsonl``, ``step3_ppo/metrics.jsonl`` (kinds "train", "eval",
"throughput"), each step's ``done.json``, ``summary.json`` (the demo's before/after evaluation) and
``resolved_config.yaml``. Plots use matplotlib's Agg backend (no display needed). Regenerating is idempotent: the
same inputs give the same report.md, and plots whose data disappeared are removed.

A ``--recipe dpo`` run (``step1_sft/``, ``step2_dpo/``) gets the DPO step's curves and the DPO actor compared with
the SFT actor on the DPO step's held-out pairs (log-prob preference accuracy and margins, DPO's implicit reward,
greedy answers side by side). That comparison loads both models once and is kept in ``dpo_vs_sft.json``, redone
only when either step finished again.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from chatrlhf.config import parse_config
from chatrlhf.errors import UserError
from chatrlhf.models.loading import load_causal_lm, load_tokenizer
from chatrlhf.trainers.metrics import read_metrics
from chatrlhf.utils import atomic_write_text

STEPS = (("sft", "step1_sft", "Step 1: supervised fine-tuning"),
         ("reward", "step2_reward", "Step 2: reward model"),
         ("ppo", "step3_ppo", "Step 3: RLHF with PPO"))
DPO_STEPS = (STEPS[0], ("dpo", "step2_dpo", "Step 2: DPO (direct preference optimization)"))
PLOTS = ("sft_loss.png", "reward_accuracy.png", "ppo_curves.png", "ppo_eval.png", "dpo_curves.png", "throughput.png")
COMPARISON = "dpo_vs_sft.json"


def run_steps(run: Path) -> tuple[tuple[str, str, str], ...]:
    """The run's recipe, told by its dirs: SFT -> DPO when step2_dpo/ exists, else SFT -> reward -> PPO."""
    return DPO_STEPS if (run / DPO_STEPS[1][1]).exists() else STEPS


@dataclass
class ReportConfig:
    run_dir: str = field(default=None, metadata={"help": "Run directory (the --output_dir of `chatrlhf train`/`demo`)."})


# ------------------------------------------------------------------------------------------------ data helpers
def _num(v: Any) -> float | None:
    """A finite float, or None (metrics keep nan/inf as strings; bools are not metrics)."""
    if isinstance(v, bool) or v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def series(records: Sequence[dict], kind: str, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key`` in records of ``kind``, finite values only."""
    xs, ys = [], []
    for r in records:
        if r.get("kind") == kind and _num(r.get(key)) is not None:
            xs.append(int(r.get("step", 0)))
            ys.append(_num(r[key]))
    return xs, ys


def _last(records: Sequence[dict], kind: str) -> dict:
    rs = [r for r in records if r.get("kind") == kind]
    return rs[-1] if rs else {}


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)


def _cell(v: Any, limit: int = 160) -> str:
    """A markdown table cell: one line, pipes escaped, long text shortened."""
    s = _fmt(v) if not isinstance(v, str) else repr(v)[1:-1]  # repr shows \n and trailing spaces of answers
    s = s.replace("|", "\\|")
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows]
    return out


# -------------------------------------------------------------------------------------------------------- plots
def _plot(path: Path, panels: list[tuple[str, list[tuple[str, list[int], list[float]]]]], xlabel: str = "step") -> bool:
    """One figure with a panel per (title, [(label, xs, ys), ...]); panels without data are left out."""
    panels = [(t, [s for s in lines if s[1]]) for t, lines in panels]
    panels = [(t, lines) for t, lines in panels if lines]
    if not panels:
        return False
    import matplotlib  # lazy: matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: matplotlib

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, (title, lines) in zip(axes[0], panels):
        for label, xs, ys in lines:
            ax.plot(xs, ys, marker="o" if len(xs) < 20 else None, markersize=3, label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=90, metadata={"Software": None})  # no version stamp: same data, same bytes
    plt.close(fig)
    tmp.replace(path)
    return True


def _eval_keys(records: Sequence[dict], limit: int = 6) -> list[str]:
    """The eval function's headline metrics in a step's eval records (per-type breakdowns like 'pass_rate/x' and
    the generic ones left out)."""
    keys: dict[str, None] = {}
    for r in records:
        if r.get("kind") == "eval":
            keys.update({k: None for k, v in r.items() if _num(v) is not None and "/" not in k
                         and k not in ("step", "time", "rm_score", "response_length", "n")})
    return list(keys)[:limit]


def draw_plots(run_dir: Path, metrics: dict[str, list[dict]]) -> dict[str, Path]:
    """Write the plots there is data for into run_dir/plots; returns {name: path}."""
    plots = run_dir / "plots"
    sft, rm, ppo = metrics.get("sft", []), metrics.get("reward", []), metrics.get("ppo", [])
    dpo = metrics.get("dpo", [])
    gap = [r for r in rm if r.get("kind") == "eval"]
    gap_xs = [int(r["step"]) for r in gap if _num(r.get("chosen_score")) is not None and _num(r.get("rejected_score")) is not None]
    gap_ys = [_num(r["chosen_score"]) - _num(r["rejected_score"]) for r in gap
              if _num(r.get("chosen_score")) is not None and _num(r.get("rejected_score")) is not None]
    if not gap_xs:
        gap_xs, gap_ys = series(rm, "eval", "score_gap")
    specs = {
        "sft_loss.png": [
            ("SFT loss", [("train loss", *series(sft, "train", "loss")), ("eval loss", *series(sft, "eval", "eval_loss"))]),
            ("SFT eval perplexity", [("perplexity", *series(sft, "eval", "perplexity"))]),
        ],
        "reward_accuracy.png": [
            ("RM accuracy (chosen > rejected)", [("eval", *series(rm, "eval", "accuracy")),
                                                  ("train", *series(rm, "train", "accuracy"))]),
            ("RM score gap (chosen - rejected)", [("eval", gap_xs, gap_ys)]),
        ],
        "ppo_curves.png": [
            ("PPO reward", [("reward_mean", *series(ppo, "train", "reward_mean")),
                            ("ema_reward", *series(ppo, "train", "ema_reward"))]),
            ("KL to reference", [("kl", *series(ppo, "train", "kl"))]),
            ("response length", [("tokens", *series(ppo, "train", "response_length"))]),
        ],
        # --eval_interval: greedy held-out answers scored by --eval_fn (not only by the reward model)
        "ppo_eval.png": [
            ("held-out eval (--eval_fn)", [(k, *series(ppo, "eval", k)) for k in _eval_keys(ppo)]),
            ("held-out reward-model score", [("rm_score", *series(ppo, "eval", "rm_score"))]),
        ],
        "dpo_curves.png": [
            ("DPO loss", [("train loss", *series(dpo, "train", "loss")), ("eval loss", *series(dpo, "eval", "eval_loss"))]),
            ("implicit reward margin (chosen - rejected)", [("train", *series(dpo, "train", "reward_margin")),
                                                            ("eval", *series(dpo, "eval", "reward_margin"))]),
            ("implicit reward accuracy", [("eval", *series(dpo, "eval", "accuracy"))]),
        ],
        "throughput.png": [
            ("samples / s", [(name, *series(metrics.get(name, []), "throughput", "samples_per_s")) for name in metrics]),
            ("TFLOPs", [(name, *series(metrics.get(name, []), "throughput", key))
                        for name in metrics for key in ("tflops", "e2e_tflops")
                        if series(metrics.get(name, []), "throughput", key)[0]]),
        ],
    }
    out = {}
    for name, panels in specs.items():
        path = plots / name
        if _plot(path, panels):
            out[name] = path
        elif path.exists():  # data gone (e.g. a step's metrics removed): no stale plot
            path.unlink()
    return out


# ------------------------------------------------------------------------------------------------------ sections
def _step_section(title: str, step_dir: Path, records: list[dict]) -> list[str]:
    lines = [f"## {title}", ""]
    done = _read_json(step_dir / "done.json")
    if not records and done is None:
        state = "not run" if not step_dir.exists() else "no metrics yet"
        return lines + [f"_{state} (no `{step_dir.name}/metrics.jsonl`)._", ""]
    status = "finished" if done is not None else "incomplete (no done.json: running, stopped or failed)"
    n_train = sum(r.get("kind") == "train" for r in records)
    lines += [f"Status: **{status}**; {n_train} train records, "
              f"{sum(r.get('kind') == 'eval' for r in records)} eval records.", ""]
    rows = []
    for kind in ("train", "eval", "throughput"):
        last = _last(records, kind)
        for k, v in last.items():
            if k not in ("kind", "step", "time") and (_num(v) is not None or isinstance(v, str)):
                rows.append((kind, k, v, last.get("step", "")))
    if done and isinstance(done.get("metrics"), dict):
        rows += [("done.json", k, v, "") for k, v in done["metrics"].items() if not isinstance(v, (dict, list))]
    if rows:
        lines += _table(["record", "metric", "last value", "step"], rows) + [""]
    return lines


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _summary_section(summary: dict) -> list[str]:
    """The demo's before/after evaluation: every ``X_sft``/``X_final`` pair side by side, other scalars, samples."""
    ev = summary.get("eval") if isinstance(summary.get("eval"), dict) else summary
    lines = ["## Before / after: SFT actor vs final actor", ""]
    pairs = [k[: -len("_sft")] for k in ev if k.endswith("_sft") and f"{k[:-4]}_final" in ev]
    rows = []
    for base in pairs:
        a, b = ev[f"{base}_sft"], ev[f"{base}_final"]
        if isinstance(a, dict) and isinstance(b, dict):
            rows += [(f"{base}: {k}", a.get(k), b.get(k)) for k in dict.fromkeys([*a, *b])]
        elif not isinstance(a, (list, dict)):
            rows.append((base, a, b))
    if rows:
        lines += _table(["metric", "SFT actor", "final actor"], rows) + [""]
    used = {f"{b}_sft" for b in pairs} | {f"{b}_final" for b in pairs}
    other = [(k, v) for k, v in ev.items() if k not in used and not isinstance(v, (dict, list))]
    if other:
        lines += _table(["metric", "value"], other) + [""]
    notes = {"rm_accuracy": "reward model held-out accuracy", "kl_final_to_sft": "KL(final || SFT) per answer token",
             "win_rate_final_vs_sft": "gold win-rate of the final actor over SFT (ties half)"}
    named = [f"- {label}: **{_fmt(ev[k])}**" for k, label in notes.items() if _num(ev.get(k)) is not None]
    if named:
        lines += named + [""]
    samples = ev.get("samples")
    if isinstance(samples, list) and samples and all(isinstance(s, dict) for s in samples):
        cols = list(dict.fromkeys(k for s in samples for k in s))
        lines += ["### Sample answers", ""] + _table(cols, [[s.get(c, "") for c in cols] for s in samples]) + [""]
    wall = summary.get("wall_s")
    if isinstance(wall, dict) and wall:
        lines += ["### Wall time (s)", ""] + _table(["phase", "seconds"], [(k, v) for k, v in wall.items()]) + [""]
    return lines


# ------------------------------------------------------------------------------------------- DPO vs SFT actor
def _answer_prompt(text: str) -> str:
    """The prompt part of a DeepSpeed-Chat-format text: up to and including its last "Assistant:"."""
    i = text.rfind("Assistant:")
    return text[: i + len("Assistant:")] if i >= 0 else text


def compare_dpo_actors(run: Path, max_pairs: int = 64, n_samples: int = 3, max_new_tokens: int = 32) -> dict:
    """The SFT actor (DPO's reference) and the DPO actor on the DPO step's held-out pairs: how often each gives the
    chosen answer a higher log-probability than the rejected one (summed over the answer tokens from where the two
    differ, as DPO scores them), the mean margins, DPO's implicit reward with the SFT actor as reference, and
    greedy answers to a few of the pairs' prompts. One model in memory at a time."""
    import torch  # lazy: torch

    from chatrlhf.data.phases import PairCollator, build_phase_datasets  # lazy: torch
    from chatrlhf.engine.device import accelerator_info, inference_dtype  # lazy: torch
    from chatrlhf.trainers.dpo import DPOConfig, pair_logps  # lazy: torch

    sft_dir, dpo_dir = run / STEPS[0][1], run / DPO_STEPS[1][1]
    cfg = parse_config(DPOConfig, ["--config", str(dpo_dir / "step_config.yaml")])
    trust = bool(getattr(cfg, "trust_remote_code", False))
    tok = load_tokenizer(str(dpo_dir), **({"trust_remote_code": True} if trust else {}))
    _, eval_ds = build_phase_datasets(2, cfg, tok)
    n = min(max_pairs, len(eval_ds))
    if n == 0:
        raise UserError(f"{dpo_dir}: the DPO step has no held-out pairs to compare the actors on")
    collate = PairCollator(tok.pad_token_id)
    batches = [collate([eval_ds[j] for j in range(i, min(i + 8, n))]) for i in range(0, n, 8)]
    name = accelerator_info()["name"]
    device = torch.device("cpu" if name == "cpu" else name)
    dtype = inference_dtype(None, device)
    firsts = [tok.decode(eval_ds[j]["chosen_input_ids"], skip_special_tokens=True) for j in range(min(n_samples, n))]
    prompts = [_answer_prompt(t) for t in firsts]

    def measure(path: Path):
        model = load_causal_lm(str(path), dtype=dtype, **({"trust_remote_code": True} if trust else {})).to(device)
        model.eval()
        cs, rs = [], []
        with torch.no_grad():
            for b in batches:
                c, r = pair_logps(model, {k: b[k].to(device) for k in ("input_ids", "attention_mask")})
                cs.append(c.float().cpu())
                rs.append(r.float().cpu())
            answers = []
            for p in prompts:
                enc = tok(p, return_tensors="pt").to(device)
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
                answers.append(tok.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
        del model
        return torch.cat(cs), torch.cat(rs), answers

    sc, sr, s_ans = measure(sft_dir)
    dc, dr, d_ans = measure(dpo_dir)

    def stats(c, r) -> dict:
        return {"preference_accuracy": float((c > r).float().mean()), "logp_margin": float((c - r).mean()),
                "logp_chosen": float(c.mean()), "logp_rejected": float(r.mean())}

    implicit = cfg.beta * ((dc - sc) - (dr - sr))
    return {"finished": _finished(run), "pairs": n, "beta": cfg.beta, "sft": stats(sc, sr), "dpo": stats(dc, dr),
            "implicit_reward": {"accuracy": float((implicit > 0).float().mean()), "margin": float(implicit.mean())},
            "samples": [{"prompt": p, "sft": a, "dpo": b} for p, a, b in zip(prompts, s_ans, d_ans)]}


def _finished(run: Path) -> list:
    return [(_read_json(run / sub / "done.json") or {}).get("finished_at") for _, sub, _ in DPO_STEPS]


def dpo_comparison(run: Path) -> dict | None:
    """compare_dpo_actors' result, from dpo_vs_sft.json while both steps' done.json are the ones it was made
    from; None until both steps finished. A failure is reported in the section, never fatal to the report."""
    if not all((run / sub / "done.json").is_file() for _, sub, _ in DPO_STEPS):
        return None
    cached = _read_json(run / COMPARISON)
    if cached is not None and cached.get("finished") == _finished(run):
        return cached
    try:
        result = compare_dpo_actors(run)
    except Exception as e:  # noqa: BLE001 - the report is a bonus: say what failed, keep the rest
        return {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"}
    atomic_write_text(run / COMPARISON, json.dumps(result, indent=2, sort_keys=True) + "\n")
    return result


def _dpo_section(cmp: dict) -> list[str]:
    lines = ["## DPO actor vs SFT actor", ""]
    if "error" in cmp:
        return lines + [f"_comparison failed: {cmp['error']}_", ""]
    s, d = cmp["sft"], cmp["dpo"]
    lines += [f"On {cmp['pairs']} held-out preference pairs (the DPO step's eval split); log-probabilities are summed "
              "over each answer's tokens from where chosen and rejected differ.", ""]
    rows = [("preference accuracy: log p(chosen) > log p(rejected)", s["preference_accuracy"], d["preference_accuracy"]),
            ("log-prob margin, chosen - rejected (mean)", s["logp_margin"], d["logp_margin"]),
            ("log p(chosen answer) (mean)", s["logp_chosen"], d["logp_chosen"]),
            ("log p(rejected answer) (mean)", s["logp_rejected"], d["logp_rejected"])]
    lines += _table(["metric", "SFT actor", "DPO actor"], rows) + [""]
    ir = cmp["implicit_reward"]
    lines += [f"- DPO implicit reward (beta {_fmt(cmp['beta'])}, SFT actor as reference): chosen above rejected on "
              f"**{_fmt(ir['accuracy'])}** of the pairs, mean margin **{_fmt(ir['margin'])}**", ""]
    if cmp.get("samples"):
        lines += ["### Greedy answers", ""] + _table(["prompt", "SFT actor", "DPO actor"],
                                                    [(x["prompt"], x["sft"], x["dpo"]) for x in cmp["samples"]]) + [""]
    return lines


# --------------------------------------------------------------------------------------------------------- report
def write_report(run_dir: str | Path) -> Path:
    """Write run_dir/report.md (and run_dir/plots/*.png) from whatever the run has produced; returns its path."""
    run = Path(run_dir)
    if not run.is_dir():
        raise UserError(f"run directory not found: {run}")
    steps = run_steps(run)
    metrics = {name: read_metrics(run / sub / "metrics.jsonl") for name, sub, _ in steps}
    summary = _read_json(run / "summary.json")
    if not any(metrics.values()) and summary is None and not any((run / sub).exists() for _, sub, _ in steps):
        raise UserError(f"{run} does not look like a run directory (no step1_sft/, step2_reward/, step3_ppo/, "
                        "step2_dpo/ or summary.json)")
    plots = draw_plots(run, metrics)
    lines = [f"# chatrlhf run report: `{run.resolve().name}`", ""]
    present = [title for name, sub, title in steps if metrics[name] or (run / sub / "done.json").exists()]
    lines += [f"Steps with results: {', '.join(present) if present else 'none yet'}.", ""]
    if summary is not None:
        lines += _summary_section(summary)
    if steps is DPO_STEPS:
        cmp = dpo_comparison(run)
        if cmp is not None:
            lines += _dpo_section(cmp)
    plot_for = {"sft": ["sft_loss.png"], "reward": ["reward_accuracy.png"], "ppo": ["ppo_curves.png", "ppo_eval.png"],
                "dpo": ["dpo_curves.png"]}
    for name, sub, title in steps:
        lines += _step_section(title, run / sub, metrics[name])
        lines += [f"![{p}](plots/{p})\n" for p in plot_for[name] if p in plots]
    if "throughput.png" in plots:
        lines += ["## Throughput", "", "![throughput.png](plots/throughput.png)", ""]
    cfg_file = run / "resolved_config.yaml"
    if cfg_file.is_file():
        lines += ["## Resolved config", "", "```yaml", cfg_file.read_text(encoding="utf-8").rstrip(), "```", ""]
    out = run / "report.md"
    atomic_write_text(out, "\n".join(lines).rstrip() + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(argv or [])
    if argv and not argv[0].startswith("-"):  # `chatrlhf report DIR` as well as `--run_dir DIR`
        argv = ["--run_dir", argv[0], *argv[1:]]
    cfg = parse_config(ReportConfig, argv, prog="chatrlhf report", description=__doc__.split("\n")[0])
    if not cfg.run_dir:
        raise UserError("usage: chatrlhf report RUN_DIR")
    path = write_report(cfg.run_dir)
    print(f"report: {path}")
    return 0
