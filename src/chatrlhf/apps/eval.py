"""``chatrlhf eval prompts|reward|gold``: evaluate trained models.

- ``prompts``: DeepSpeed-Chat's prompt_eval. The same prompts go to a baseline and a fine-tuned model with one or
  more decoding methods (greedy, beam, sample, contrastive); answers are printed side by side. Built-in prompt sets
  in English, Chinese and Japanese, or ``--prompts_file``.
- ``reward``: DeepSpeed-Chat's rw_eval. Scores (prompt, answer) pairs with a reward model's end score (the value at
  the answer's last token, EOS appended exactly as in step 2 training); with chosen/rejected pairs it also reports
  accuracy and the mean score gap.
- ``gold``: generates answers to the built-in task's held-out prompts and reports the gold scorer's mean score and
  pass rate. ``gold_eval(model, tokenizer, prompts)`` is the Python API the demo uses.

Every mode renders prompts (and answers, for the reward model) through the ChatFormat each model was trained with
(chatrlhf.data.template; the checkpoint's ``chatrlhf_config.json`` record, or ``--template``) and prints it as a
``template: NAME (why)`` line: DeepSpeed-Chat's ``" Human: ... Assistant:"`` text, or the tokenizer's chat template.
"""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from chatrlhf.config import Check, parse_config
from chatrlhf.data.template import TEMPLATE_CHOICES, resolve_format
from chatrlhf.engine.generation import (SamplingParams, format_for_checkpoint, generate, generate_batch,
                                        inference_device, load_for_inference, resolve_checkpoint_dir)
from chatrlhf.errors import DataError, UserError
from chatrlhf.models.loading import check_remote_code, load_tokenizer
from chatrlhf.models.registry import resolve_model_path
from chatrlhf.tasks import builtin as task
from chatrlhf.tasks.builtin import task_prompt

# Questions (rendered at use by the evaluated model's ChatFormat: DeepSpeed-Chat text or its chat template).
PROMPT_SETS: dict[str, list[str]] = {
    "English": [
        "Please tell me about Microsoft in a few sentence?",
        "Explain the moon landing to a 6 year old in a few sentences.",
        "Write a short poem about a wise frog.",
        "Who was president of the United States in 1955?",
        "How does a telescope work?",
        "Why do birds migrate south for the winter?",
    ],
    "Chinese": [
        "请用几句话介绍一下微软?",
        "用几句话向6岁的孩子解释登月。",
        "写一首关于一只聪明的青蛙的短诗。",
        "谁是1955年的美国总统?",
        "望远镜是如何工作的?",
        "鸟类为什么要南迁过冬?",
    ],
    "Japanese": [
        "マイクロソフトについて簡単に教えてください。",
        "6歳の子供に月面着陸を短い文で説明する。",
        "賢いカエルについて短い詩を書いてください。",
        "1955年のアメリカ合衆国大統領は誰?",
        "望遠鏡はどのように機能しますか?",
        "鳥が冬に南に移動するのはなぜですか?",
    ],
}
METHODS = ("greedy", "beam", "sample", "contrastive")

# rw_eval's default example: one prompt, a good and a bad answer.
DEFAULT_REWARD_EXAMPLE = {
    "prompt": "Please tell me about Microsoft in a few sentence?",
    "chosen": " Microsoft is a software company that develops, licenses, and supports software products, including "
              "Windows, Office, and Windows Phone. It is the largest software company in the world by revenue.",
    "rejected": " I'm not sure. Human: What's your job? Assistant: I'm not sure.",
}


TEMPLATE_HELP = ("How prompts become text: auto (the format each checkpoint records it was trained with; with no "
                 "record, the tokenizer's chat template when it has one, else DeepSpeed-Chat's ' Human: ... "
                 "Assistant:'), chat (the tokenizer's chat template) or dschat.")


def _as_row(prompt: str) -> str:
    """A data row's prompt: a bare question gets DeepSpeed-Chat's text; an already formatted prompt is kept."""

    return prompt if "Assistant:" in prompt else task_prompt(prompt)


def _format(prompt: str, fmt=None, tokenizer=None) -> str:
    """The text a model continues from for ``prompt`` (a bare question or DeepSpeed-Chat text), rendered by ``fmt``
    (a ChatFormat; default: what ``--template auto`` picks for ``tokenizer``)."""
    return _fmt(fmt, tokenizer).prompt_from_row(_as_row(prompt), tokenizer)


def _fmt(fmt, tokenizer):
    return fmt if fmt is not None else resolve_format("auto", tokenizer)


# the options every eval command has (one definition each)
def _dtype_option():
    return field(default="auto", metadata={"help": "auto, fp32, bf16 or fp16."})


def _template_option():
    return field(default="auto", metadata={"help": TEMPLATE_HELP, "check": Check(choices=TEMPLATE_CHOICES)})


def _json_option():
    return field(default=False, metadata={"help": "Print the results as one JSON object."})


def _trust_option():
    return field(default=False, metadata={
        "help": "Run the Python code in the model folder(s) (a custom model family: config.json auto_map naming "
                "classes in its modeling_*.py). It runs with your permissions: only for folders you trust."})


# ---------------------------------------------------------------------------------------------------- prompts
@dataclass
class PromptsConfig:
    baseline: str = field(default=None, metadata={"help": "Baseline model dir (e.g. the pretrained or SFT model)."})
    finetuned: str = field(default=None, metadata={"help": "Fine-tuned model dir (e.g. OUTPUT/step3_ppo/actor)."})
    language: str = field(default="English", metadata={"help": "Built-in prompt set: English, Chinese or Japanese."})
    prompts_file: str = field(default=None, metadata={
        "help": "Own prompts instead: a .txt (one per line), .json list of strings or .jsonl with a 'prompt' field."})
    methods: str = field(default="greedy", metadata={"help": "Comma-separated: greedy,beam,sample,contrastive."})
    max_new_tokens: int = field(default=100, metadata={"help": "Most tokens generated per answer."})
    num_beams: int = field(default=4, metadata={"help": "Beams for beam search."})
    top_k: int = field(default=4, metadata={"help": "Candidates for contrastive search (and top-k for sampling)."})
    penalty_alpha: float = field(default=0.6, metadata={"help": "Degeneration penalty for contrastive search."})
    temperature: float = field(default=0.9, metadata={"help": "Sampling temperature."})
    seed: int = field(default=1234, metadata={"help": "Seed for sampling (both models get the same seed)."})
    dtype: str = _dtype_option()
    template: str = _template_option()
    json: bool = _json_option()
    trust_remote_code: bool = _trust_option()

    def validate(self) -> None:
        if not self.baseline or not self.finetuned:
            raise UserError("eval prompts needs --baseline and --finetuned model dirs")
        self.baseline = resolve_model_path(self.baseline, "--baseline")
        self.finetuned = resolve_model_path(self.finetuned, "--finetuned")
        if self.language not in PROMPT_SETS:
            raise UserError(f"--language must be one of {', '.join(PROMPT_SETS)}, got {self.language!r}")
        bad = [m for m in self.method_list() if m not in METHODS]
        if bad or not self.method_list():
            raise UserError(f"--methods: unknown {', '.join(bad) or '(none given)'}; choose from {', '.join(METHODS)}")

    def method_list(self) -> list[str]:
        return [m.strip() for m in self.methods.split(",") if m.strip()]


def read_prompts_file(path: str | Path) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise DataError("file not found", file=str(p))
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix == ".json":
            data = json.loads(text)
            rows = [d if isinstance(d, str) else d["prompt"] for d in data]
        elif p.suffix == ".jsonl":
            rows = [json.loads(line)["prompt"] for line in text.splitlines() if line.strip()]
        else:
            rows = [line for line in text.splitlines() if line.strip()]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"cannot read prompts ({e}); expected strings or objects with a 'prompt' field", file=str(p))
    if not rows:
        raise DataError("no prompts", file=str(p))
    return rows


def prompt_eval(models: dict[str, tuple], prompts: Sequence[str], methods: Sequence[str], cfg: PromptsConfig,
                formats: dict | None = None) -> list[dict]:
    """For every prompt and method, each model's answer: [{prompt, method, <model name>: answer, ...}]. ``prompt``
    is the question as DeepSpeed-Chat text; each model sees it rendered by its own ChatFormat (``formats[name]``;
    default: what ``--template auto`` picks for its tokenizer)."""

    fmts = {name: _fmt((formats or {}).get(name), tok) for name, (_, tok) in models.items()}
    rows = []
    for q in prompts:
        prompt = _as_row(q)
        for method in methods:
            row = {"prompt": prompt, "method": method}
            for name, (model, tok) in models.items():
                params = SamplingParams(max_new_tokens=cfg.max_new_tokens, method=method, num_beams=cfg.num_beams,
                                        top_k=cfg.top_k, penalty_alpha=cfg.penalty_alpha,
                                        temperature=cfg.temperature, seed=cfg.seed)
                row[name] = generate(model, tok, _format(prompt, fmts[name], tok), params, fmt=fmts[name]).text
            rows.append(row)
    return rows


def _prompts_main(argv: list[str]) -> int:
    cfg = parse_config(PromptsConfig, argv, prog="chatrlhf eval prompts")

    prompts = read_prompts_file(cfg.prompts_file) if cfg.prompts_file else PROMPT_SETS[cfg.language]
    trust = cfg.trust_remote_code
    paths = {"baseline": cfg.baseline, "finetuned": cfg.finetuned}
    models = {name: load_for_inference(path, cfg.dtype, trust_remote_code=trust) for name, path in paths.items()}
    formats = {name: format_for_checkpoint(paths[name], models[name][1], cfg.template, label=name)
               for name in models}
    rows = prompt_eval(models, prompts, cfg.method_list(), cfg, formats)
    if cfg.json:
        print(json.dumps({"baseline": cfg.baseline, "finetuned": cfg.finetuned, "results": rows}, ensure_ascii=False,
                         indent=1))
        return 0
    last = None
    for r in rows:
        if r["prompt"] != last:
            print("=" * 30 + f" prompt: {r['prompt'].strip()} " + "=" * 30)
            last = r["prompt"]
        print(f"[{r['method']}] baseline : {r['baseline']}")
        print(f"[{r['method']}] finetuned: {r['finetuned']}")
    return 0


# ----------------------------------------------------------------------------------------------------- reward
@dataclass
class RewardEvalConfig:
    model: str = field(default=None, metadata={"help": "Reward model dir (e.g. OUTPUT/step2_reward)."})
    prompt: list[str] = field(default=None, metadata={
        "help": "Prompt(s): a bare question or ' Human: ... Assistant:' text, rendered by the reward model's template "
                "(--template). One prompt applies to every --answer."})
    answer: list[str] = field(default=None, metadata={"help": "Answer(s) to score, one per prompt."})
    file: str = field(default=None, metadata={
        "help": "JSON list or JSONL of {prompt, answer} or {prompt, chosen, rejected} rows (e.g. a data/eval.json)."})
    max_rows: int = field(default=200, metadata={"help": "Score at most this many rows of --file."})
    batch_size: int = field(default=8, metadata={"help": "Rows scored per forward pass."})
    dtype: str = _dtype_option()
    template: str = _template_option()
    json: bool = _json_option()
    trust_remote_code: bool = _trust_option()

    def validate(self) -> None:
        if not self.model:
            raise UserError("eval reward needs --model (a reward model dir)")
        self.model = resolve_model_path(self.model, "--model")
        if bool(self.prompt) != bool(self.answer):
            raise UserError("give --prompt and --answer together")
        if self.prompt and len(self.prompt) not in (1, len(self.answer)):
            raise UserError(f"{len(self.prompt)} prompts for {len(self.answer)} answers: give one prompt, or one "
                            "per answer")


def load_scorer(path: str, dtype=None, trust_remote_code: bool = False):
    """(reward model, tokenizer) on the inference device, in eval mode."""
    from chatrlhf.engine.device import inference_dtype  # lazy: torch
    from chatrlhf.models.reward_model import is_reward_dir, load_reward_model  # lazy: torch

    p = resolve_checkpoint_dir(path)
    if not is_reward_dir(p):  # a plain LM would get a random value head: scores would mean nothing
        raise UserError(f"{p} is not a trained reward model (its config.json has no chatrlhf_reward block); "
                        "pass the output dir of `chatrlhf reward` (e.g. OUTPUT/step2_reward)")
    dev = inference_device(dtype=dtype)
    dt = inference_dtype(dtype, dev)
    check_remote_code(p, trust_remote_code)  # before the tokenizer: the refusal names the model's class
    tok = load_tokenizer(str(p), padding_side="right", trust_remote_code=trust_remote_code)
    rm = load_reward_model(str(p), dtype=dt, pad_token_id=tok.pad_token_id,
                           trust_remote_code=trust_remote_code).to(dev).eval()
    return rm, tok


def reward_scores(rm, tokenizer, prompts: Sequence[str], answers: Sequence[str], batch_size: int = 8,
                  fmt=None) -> list[float]:
    """End scores of prompt + answer (+ EOS), rendered by ``fmt`` (the reward model's ChatFormat; default: what
    ``--template auto`` picks for ``tokenizer``) and tokenized exactly as step 2 trains (its ``Encoder``), in
    right-padded batches."""
    import torch  # lazy: torch

    from chatrlhf.data.phases import Encoder  # lazy: torch

    enc = Encoder(tokenizer, _fmt(fmt, tokenizer))
    prompts = [_as_row(p) for p in prompts]
    answers = [a if not a or a[0].isspace() else " " + a for a in answers]  # answers start with a space in training
    ids = [x for x, _ in enc.answer_ids(list(prompts), list(answers))]
    device = next(rm.parameters()).device
    out: list[float] = []
    for i in range(0, len(ids), batch_size):
        chunk = ids[i:i + batch_size]
        width = max(len(x) for x in chunk)
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in chunk], device=device)
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in chunk], device=device)
        with torch.no_grad():
            out += [float(s) for s in rm.score(input_ids, mask).float().cpu()]
    return out


def _read_rows(path: str) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise DataError("file not found", file=str(p))
    text = p.read_text(encoding="utf-8")
    try:
        rows = ([json.loads(line) for line in text.splitlines() if line.strip()] if p.suffix == ".jsonl"
                else json.loads(text))
    except json.JSONDecodeError as e:
        raise DataError(f"not valid JSON: {e}", file=str(p)) from None
    if not isinstance(rows, list) or not rows:
        raise DataError("expected a non-empty list of rows", file=str(p))
    for i, r in enumerate(rows, 1):
        if not isinstance(r, dict) or "prompt" not in r or not ("answer" in r or "chosen" in r):
            raise DataError("each row needs 'prompt' and 'answer' (or 'chosen'/'rejected')", file=str(p), row=i)
    return rows


def reward_eval(rm, tokenizer, rows: Sequence[dict], batch_size: int = 8, fmt=None) -> dict:
    """Score rows of {prompt, answer} or {prompt, chosen, rejected} (rendered by ``fmt``, as ``reward_scores``).
    Returns {"rows": [...], and for pairs "accuracy" (chosen scored above rejected) and "mean_gap" (chosen -
    rejected)}."""
    prompts, answers, where = [], [], []
    for i, r in enumerate(rows):
        for key in ("answer", "chosen", "rejected"):
            if r.get(key) is not None:
                prompts.append(r["prompt"])
                answers.append(r[key])
                where.append((i, key))
    scores = reward_scores(rm, tokenizer, prompts, answers, batch_size, fmt)
    out_rows = [dict(r) for r in rows]
    for (i, key), s in zip(where, scores):
        out_rows[i][f"{key}_score"] = s
    result: dict = {"rows": out_rows, "n": len(out_rows)}
    pairs = [r for r in out_rows if "chosen_score" in r and "rejected_score" in r]
    if pairs:
        result["accuracy"] = sum(r["chosen_score"] > r["rejected_score"] for r in pairs) / len(pairs)
        result["mean_gap"] = sum(r["chosen_score"] - r["rejected_score"] for r in pairs) / len(pairs)
        result["n_pairs"] = len(pairs)
    return result


def _clip(text: str, n: int = 60) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _reward_main(argv: list[str]) -> int:
    cfg = parse_config(RewardEvalConfig, argv, prog="chatrlhf eval reward")
    if cfg.file:
        rows = _read_rows(cfg.file)[: cfg.max_rows]
    elif cfg.answer:
        ps = cfg.prompt * len(cfg.answer) if len(cfg.prompt) == 1 else cfg.prompt
        rows = [{"prompt": p, "answer": a} for p, a in zip(ps, cfg.answer)]
    else:
        rows = [DEFAULT_REWARD_EXAMPLE]

    rm, tok = load_scorer(cfg.model, cfg.dtype, cfg.trust_remote_code)
    fmt = format_for_checkpoint(cfg.model, tok, cfg.template)  # prints "template: NAME (why)"
    res = reward_eval(rm, tok, rows, cfg.batch_size, fmt)
    if cfg.json:
        print(json.dumps(res, ensure_ascii=False, indent=1))
        return 0
    print(f"{'score':>9}  {'kind':<8}  prompt | answer")
    for r in res["rows"]:
        for key in ("answer", "chosen", "rejected"):
            if f"{key}_score" in r:
                print(f"{r[f'{key}_score']:>9.4f}  {key:<8}  {_clip(r['prompt'], 50)} | {_clip(r[key])}")
    if "accuracy" in res:
        print(f"pairs: {res['n_pairs']}  accuracy (chosen > rejected): {res['accuracy']:.3f}  "
              f"mean chosen - rejected: {res['mean_gap']:.4f}")
    return 0


# ------------------------------------------------------------------------------------------------------- gold
@dataclass
class GoldConfig:
    model: str = field(default=None, metadata={"help": "Actor model dir to evaluate."})
    data: str = field(default=None, metadata={
        "help": "A built-in task dir (with heldout.jsonl) or a heldout.jsonl file. Default: generate the held-out "
                "prompts from the task generator with --seed."})
    num_prompts: int = field(default=40, metadata={"help": "How many held-out prompts to evaluate."})
    seed: int = field(default=1234, metadata={"help": "Task seed when no --data is given (the demo's default)."})
    max_new_tokens: int = field(default=32, metadata={"help": "Most tokens generated per answer."})
    batch_size: int = field(default=16, metadata={"help": "Prompts generated per batch (left-padded)."})
    greedy: bool = field(default=True, metadata={"help": "Greedy decoding (--greedy false samples)."})
    show: int = field(default=5, metadata={"help": "Sample answers to print."})
    dtype: str = _dtype_option()
    template: str = _template_option()
    json: bool = _json_option()
    trust_remote_code: bool = _trust_option()

    def validate(self) -> None:
        if not self.model:
            raise UserError("eval gold needs --model (an actor model dir)")
        self.model = resolve_model_path(self.model, "--model")
        if self.num_prompts < 1 or self.batch_size < 1:
            raise UserError("--num_prompts and --batch_size must be >= 1")


def heldout_prompts(data: str | None = None, num_prompts: int = 40, seed: int = 1234) -> list[str]:
    """Held-out prompts of the built-in task: from a task dir / heldout.jsonl, or regenerated from the task
    generator by seed (the same items ``write_task_dataset(seed=seed)`` holds out; never seen in training)."""

    if data:
        p = Path(data)
        f = p / "heldout.jsonl" if p.is_dir() else p
        if not f.is_file():
            raise DataError("no heldout.jsonl here (write one with the built-in task generator)", file=str(f))
        rows = task.read_heldout(f)
    else:
        n_held = max(num_prompts, 40)  # 40: write_task_dataset's default, so the same items as a default run
        with tempfile.TemporaryDirectory(prefix="chatrlhf-heldout-") as tmp:
            paths = task.write_task_dataset(tmp, seed=seed, n_sft=1, n_pairs=1, n_eval=1, n_heldout=n_held,
                                            n_kwise=0, n_corpus=1)
            rows = task.read_heldout(paths["heldout"])
    if not rows:
        raise DataError("no held-out prompts", file=str(data))
    if len(rows) > num_prompts:  # spread over the file, which is grouped by task template
        rows = [rows[i * len(rows) // num_prompts] for i in range(num_prompts)]
    return [r["prompt"] for r in rows]


def gold_eval(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 32, batch_size: int = 16,
              greedy: bool = True, seed: int | None = 1234, fmt=None) -> dict:
    """Generate an answer per prompt (batched, left-padded) and score it with the built-in task's gold scorer.
    The model sees each prompt (DeepSpeed-Chat text) rendered by ``fmt`` (its ChatFormat; default: what
    ``--template auto`` picks for ``tokenizer``); the scorer sees the prompt as given.

    Answers are judged as generated up to EOS, *not* cut at a fake ``Human:`` turn: the scorer is meant to
    penalise such turns. Returns {mean_gold, pass_rate, n, n_pass, kinds: {kind: share}, samples: [{prompt,
    answer, gold, pass, kind}]}."""

    if not prompts:
        raise UserError("gold_eval needs at least one prompt")
    fmt = _fmt(fmt, tokenizer)
    params = SamplingParams(max_new_tokens=max_new_tokens, method="greedy" if greedy else "sample", stop=(),
                            seed=seed if not greedy else None)
    was_training = model.training
    model.eval()
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        answers: list[str] = []
        for i in range(0, len(prompts), batch_size):
            chunk = [_format(p, fmt, tokenizer) for p in prompts[i:i + batch_size]]
            answers += [g.raw_text for g in generate_batch(model, tokenizer, chunk, params, cut=False, fmt=fmt)]
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    samples = []
    for p, a in zip(prompts, answers):
        g = task.gold_score(p, a)
        samples.append({"prompt": p, "answer": a, "gold": g, "pass": task.gold_pass(p, a),
                        "kind": task.classify_answer(p, a)})
    n = len(samples)
    n_pass = sum(s["pass"] for s in samples)
    kinds: dict[str, float] = {}
    for s in samples:
        kinds[s["kind"]] = kinds.get(s["kind"], 0) + 1 / n
    return {"mean_gold": sum(s["gold"] for s in samples) / n, "pass_rate": n_pass / n, "n": n, "n_pass": n_pass,
            "kinds": kinds, "samples": samples}


def _gold_main(argv: list[str]) -> int:
    cfg = parse_config(GoldConfig, argv, prog="chatrlhf eval gold")

    prompts = heldout_prompts(cfg.data, cfg.num_prompts, cfg.seed)
    model, tok = load_for_inference(cfg.model, cfg.dtype, trust_remote_code=cfg.trust_remote_code)
    fmt = format_for_checkpoint(cfg.model, tok, cfg.template)  # prints "template: NAME (why)"
    res = gold_eval(model, tok, prompts, cfg.max_new_tokens, cfg.batch_size, cfg.greedy, fmt=fmt)
    if cfg.json:
        print(json.dumps({"model": cfg.model, **res}, ensure_ascii=False, indent=1))
        return 0
    print(f"model: {cfg.model}")
    print(f"held-out prompts: {res['n']}  mean gold score: {res['mean_gold']:.4f}  "
          f"pass rate: {res['pass_rate']:.4f} ({res['n_pass']}/{res['n']})")
    print("answer kinds: " + ", ".join(f"{k} {v:.0%}" for k, v in sorted(res["kinds"].items())))
    for s in res["samples"][: cfg.show]:
        print(f"  {s['gold']:.2f} {'PASS' if s['pass'] else 'fail'} {_clip(s['prompt'], 45)} -> {_clip(s['answer'])!r}")
    return 0


# ------------------------------------------------------------------------------------------------------- main
SUBCOMMANDS = {"prompts": _prompts_main, "reward": _reward_main, "gold": _gold_main}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: chatrlhf eval {prompts,reward,gold} [options]\n\n"
              "  prompts  same prompts to --baseline and --finetuned, answers side by side (prompt_eval)\n"
              "  reward   score prompt/answer pairs with a reward model (rw_eval)\n"
              "  gold     gold score and pass rate on the built-in task's held-out prompts\n\n"
              "Run `chatrlhf eval <sub> --help` for options.")
        return 0
    if argv[0] not in SUBCOMMANDS:
        raise UserError(f"unknown eval subcommand {argv[0]!r}; use one of {', '.join(SUBCOMMANDS)}")
    return SUBCOMMANDS[argv[0]](argv[1:])
