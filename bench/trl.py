"""TRL side of the benchmark (``bench/harness.py``): one TRL trainer timed on the bench's model, batch and lengths.

Run as a script with a TRL venv's python (it must not import chatrlhf: the TRL venvs do not install it):

    .venv-trl/bin/python bench/trl.py '{"task": "sft", "model_dir": ..., ...}'

(As a script its own folder would come first on ``sys.path``, where this file, ``trl.py``, would shadow the trl
package: the ``__main__`` block takes that folder off ``sys.path`` first.)

Tasks: ``sft``, ``reward``, ``grpo`` (trl as installed, e.g. 1.16) and ``ppo`` (trl 1.12.0's
``trl.experimental.ppo.PPOTrainer``; later releases have no PPO). The last line printed is
``BENCH_JSON {...}`` with per-step wall times (the first ``warmup`` steps dropped by the caller), the versions and
what was checked (response lengths). Step time = the interval between consecutive ``on_step_end`` callbacks, i.e.
everything the trainer does per optimizer step (data, generation, forwards, backward, optimizer, logging), less
the short matmul probe :class:`StepClock` runs at each boundary (``step_peaks``: the machine's speed beside each
step).
"""

from __future__ import annotations

import json
import os
import random
import sys
import tempfile
import time


def _log(*a):
    print("[bench_trl]", *a, file=sys.stderr, flush=True)


def _device_kw() -> dict:
    import torch

    return {} if torch.cuda.is_available() else {"use_cpu": True}


def _common_args(a: dict, out: str) -> dict:
    return dict(output_dir=out, per_device_train_batch_size=a["batch"], gradient_accumulation_steps=1,
                max_steps=a["warmup"] + a["steps"], learning_rate=1e-6, logging_steps=10**6, save_strategy="no",
                report_to="none", bf16=a["dtype"] == "bf16", gradient_checkpointing=False, seed=a.get("seed", 0), dataloader_num_workers=0,
                disable_tqdm=True, **_device_kw())


def _special_ids(tok) -> set:
    return {i for i in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) if i is not None}


def single_token_words(tok) -> list[str]:
    """Vocabulary entries " xyz" that are one token each and re-encode to themselves (so k words = k tokens)."""
    bad = _special_ids(tok)
    words = []
    for i in range(len(tok)):
        if i in bad:
            continue
        w = tok.decode([i])
        if len(w) > 1 and w[0] == " " and w[1:].isalpha() and tok(w, add_special_tokens=False)["input_ids"] == [i]:
            words.append(w)
    return words


def _random_ids(tok, n: int, rng: random.Random) -> list[int]:
    bad = _special_ids(tok)
    ids = []
    while len(ids) < n:
        i = rng.randrange(len(tok))
        if i not in bad:
            ids.append(i)
    return ids


def _prompt_ids(tok, n_total: int, rng: random.Random) -> list[int]:
    """Prompt token ids of exactly ``n_total`` tokens as the tokenizer encodes them (BOS included if it adds one)."""
    n_bos = len(tok("a")["input_ids"]) - len(tok("a", add_special_tokens=False)["input_ids"])
    return ([tok.bos_token_id] if n_bos else []) + _random_ids(tok, n_total - n_bos, rng)


def _exact_prompt_texts(tok, n_total: int, count: int, rng: random.Random) -> list[str]:
    """Texts that encode to exactly ``n_total`` tokens (for trainers that tokenize text themselves): words
    " xyz" that are one token each and that the pre-tokenizer splits on spaces, so k words are k tokens."""
    n_bos = len(tok("a")["input_ids"]) - len(tok("a", add_special_tokens=False)["input_ids"])
    words = single_token_words(tok)
    if not words:
        raise RuntimeError("tokenizer has no single-token words to build prompts from")
    out = []
    for _ in range(count):
        text = "".join(rng.choice(words) for _ in range(n_total - n_bos))
        if len(tok(text)["input_ids"]) != n_total:
            raise RuntimeError(f"could not build prompts of exactly {n_total} tokens")
        out.append(text)
    return out


class StepClock:
    """Step boundaries, each followed by a short matmul-peak probe that the next step's time excludes.

    Shared VMs change speed within seconds (this bench's CPU swung between about 130 and 260 GFLOP/s on the same
    2048^3 matmul): the probes join the run's peak and show whether a step ran in a slow spell;
    ``step_peaks()[i]`` is the higher of the two probes around step i. Used by both sides of the bench (chatrlhf
    imports it from here, with its accelerator's device and synchronize; alone it uses CUDA when present, else the
    CPU)."""

    def __init__(self, dtype: str = "fp32", probe: bool = True, device: str | None = None, sync=None):
        self.dtype, self.probe, self.device, self.sync = dtype, probe, device, sync
        self.ends: list[float] = []  # when each boundary was reached
        self.starts: list[float] = []  # when the next step began (after the probe)
        self.peaks: list[float] = []  # probe FLOP/s at each boundary
        self._mm = None

    def mark(self) -> None:
        self.ends.append(time.perf_counter())
        if self.probe:
            self.peaks.append(self._probe())
        self.starts.append(time.perf_counter())

    def last_probe_s(self) -> float:
        return self.starts[-1] - self.ends[-1] if self.starts else 0.0

    def step_times(self) -> list[float]:
        return [e - s for s, e in zip(self.starts, self.ends[1:])]

    def step_peaks(self) -> list[float]:
        return [max(a, b) for a, b in zip(self.peaks, self.peaks[1:])]

    def _probe(self) -> float:
        """2048^3 matmuls (8192^3 on GPU), best of 3 batches of >= 30 ms: about 0.1-0.2 s."""
        import torch

        if self.device is None:
            cuda = torch.cuda.is_available()
            self.device, self.sync = ("cuda", torch.cuda.synchronize) if cuda else ("cpu", None)
        if self._mm is None:
            n = 2048 if torch.device(self.device).type == "cpu" else 8192
            dt = torch.bfloat16 if self.dtype == "bf16" else torch.float32
            a, b = (torch.randn(n, n, device=self.device, dtype=dt) for _ in range(2))
            self._mm = (a, b, torch.empty(n, n, device=self.device, dtype=dt), n)
        a, b, c, n = self._mm
        return best_rate(lambda: torch.matmul(a, b, out=c), 2.0 * n**3, 0.03, 3, self.sync)


def best_rate(fn, work: float, min_time: float, trials: int, sync=None) -> float:
    """work / seconds of the fastest of ``trials`` timed batches of ``fn`` (each >= min_time, after one warm-up
    call): the achievable peak, not an average. ``sync`` waits for an accelerator (None on the CPU)."""
    sync = sync or (lambda: None)
    fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    reps = max(1, int(min_time / max(time.perf_counter() - t0, 1e-6)))
    best = 0.0
    for _ in range(trials):
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        best = max(best, work * reps / (time.perf_counter() - t0))
    return best


class _Timer:
    def __init__(self, dtype: str = "fp32"):
        from transformers import TrainerCallback

        clock = self.clock = StepClock(dtype)

        class CB(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                clock.mark()

            def on_step_end(self, args, state, control, **kw):
                clock.mark()

        self.callback = CB()

    def result(self) -> dict:
        return {"step_times": self.clock.step_times(), "step_peaks": self.clock.step_peaks()}


def run_sft(a: dict, out: str) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(a["model_dir"])
    rng = random.Random(0)
    n = a["batch"] * (a["warmup"] + a["steps"])
    P, R = a["prompt_len"], a["response_len"]
    rows = []
    for _ in range(n):
        ids = _prompt_ids(tok, P, rng) + _random_ids(tok, R, rng)
        rows.append({"input_ids": ids, "labels": [-100] * P + ids[P:]})
    model = AutoModelForCausalLM.from_pretrained(a["model_dir"], dtype="float32")
    args = SFTConfig(max_length=P + R, packing=False, **_common_args(a, out))
    timer = _Timer(a.get("dtype", "fp32"))
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         callbacks=[timer.callback])
    trainer.train()
    return {**timer.result(), "samples_per_step": a["batch"], "tokens_per_step": a["batch"] * (P + R)}


def run_reward(a: dict, out: str) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    tok = AutoTokenizer.from_pretrained(a["rm_dir"])
    rng = random.Random(0)
    n = a["batch"] * (a["warmup"] + a["steps"])
    P, R = a["prompt_len"], a["response_len"]
    rows = []
    for _ in range(n):
        p = _prompt_ids(tok, P, rng)
        rows.append({"chosen_ids": p + _random_ids(tok, R, rng), "rejected_ids": p + _random_ids(tok, R, rng)})
    model = AutoModelForSequenceClassification.from_pretrained(a["rm_dir"], num_labels=1, dtype="float32")
    model.config.pad_token_id = tok.pad_token_id
    args = RewardConfig(max_length=P + R, **_common_args(a, out))
    timer = _Timer(a.get("dtype", "fp32"))
    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                            callbacks=[timer.callback])
    trainer.train()
    # pairs per step = batch; sequences per step = 2 * batch
    return {**timer.result(), "samples_per_step": a["batch"],
            "tokens_per_step": 2 * a["batch"] * (P + R)}


def run_grpo(a: dict, out: str) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    tok = AutoTokenizer.from_pretrained(a["model_dir"], padding_side="left")
    rm_tok = AutoTokenizer.from_pretrained(a["rm_dir"])
    rng = random.Random(0)
    P, R, B, G = a["prompt_len"], a["response_len"], a["batch"], a["group_size"]
    n_prompts = (B // G) * (a["warmup"] + a["steps"])
    prompts = _exact_prompt_texts(tok, P, n_prompts, rng)
    model = AutoModelForCausalLM.from_pretrained(a["model_dir"], dtype="float32")
    rm = AutoModelForSequenceClassification.from_pretrained(a["rm_dir"], num_labels=1, dtype="float32")
    rm.config.pad_token_id = rm_tok.pad_token_id
    lengths: list[int] = []
    gen_times: list[float] = []
    orig_generate = model.generate

    def counting_generate(*args, **kw):  # records how many tokens each generate call produced, and its time
        t0 = time.perf_counter()
        out_ids = orig_generate(*args, **kw)
        gen_times.append(time.perf_counter() - t0)
        inp = kw.get("input_ids", args[0] if args else None)
        if isinstance(out_ids, torch.Tensor) and inp is not None:
            lengths.append(int(out_ids.shape[1] - inp.shape[1]))
        return out_ids

    model.generate = counting_generate
    args = GRPOConfig(num_generations=G, max_completion_length=R, temperature=1.0, beta=a.get("beta", 0.0),
                      generation_kwargs={"min_new_tokens": R}, **_common_args(a, out))
    timer = _Timer(a.get("dtype", "fp32"))
    trainer = GRPOTrainer(model=model, reward_funcs=rm, reward_processing_classes=rm_tok, args=args,
                          train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]), processing_class=tok,
                          callbacks=[timer.callback])
    trainer.train()
    return {**timer.result(), "samples_per_step": B, "response_lengths": lengths,
            "generation_times": gen_times}


def run_ppo(a: dict, out: str) -> dict:
    import trl.experimental.ppo.ppo_trainer as ppo_mod
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    P, R, B = a["prompt_len"], a["response_len"], a["batch"]
    tok = AutoTokenizer.from_pretrained(a["model_dir"], padding_side="left")
    rng = random.Random(0)
    n = B * (a["warmup"] + a["steps"])
    rows = [{"input_ids": _prompt_ids(tok, P, rng)} for _ in range(n)]

    # The benchmark fixes the response length (min_new_tokens = max_new_tokens), as on our side.
    orig_gc = ppo_mod.GenerationConfig
    ppo_mod.GenerationConfig = lambda **kw: orig_gc(**{**kw, "min_new_tokens": kw.get("max_new_tokens", R)})
    lengths: list[int] = []
    gen_times: list[float] = []
    orig_bg = ppo_mod.batch_generation

    def counting_batch_generation(model, queries, *args, **kw):
        t0 = time.perf_counter()
        qr, logits = orig_bg(model, queries, *args, **kw)
        gen_times.append(time.perf_counter() - t0)
        lengths.append(int(qr.shape[1] - queries.shape[1]))
        return qr, logits

    ppo_mod.batch_generation = counting_batch_generation

    policy = AutoModelForCausalLM.from_pretrained(a["model_dir"], dtype="float32")
    ref = AutoModelForCausalLM.from_pretrained(a["model_dir"], dtype="float32")
    reward = AutoModelForSequenceClassification.from_pretrained(a["rm_dir"], num_labels=1, dtype="float32")
    value = AutoModelForSequenceClassification.from_pretrained(a["rm_dir"], num_labels=1, dtype="float32")
    for m in (reward, value):
        m.config.pad_token_id = tok.pad_token_id
    c = _common_args(a, out)
    c.pop("max_steps")
    args = PPOConfig(total_episodes=n, num_ppo_epochs=1, num_mini_batches=1, local_rollout_forward_batch_size=B,
                     response_length=R, stop_token=None, missing_eos_penalty=None, num_sample_generations=0,
                     kl_coef=0.1, **c)
    timer = _Timer(a.get("dtype", "fp32"))
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         value_model=value, train_dataset=Dataset.from_list(rows), callbacks=[timer.callback])
    trainer.train()
    return {**timer.result(), "samples_per_step": B, "response_lengths": lengths,
            "generation_times": gen_times}


TASKS = {"sft": run_sft, "reward": run_reward, "grpo": run_grpo, "ppo": run_ppo}


def main(argv: list[str]) -> int:
    a = json.loads(argv[0])
    import torch

    threads = int(a.get("threads") or os.cpu_count() or 1)
    if not torch.cuda.is_available():
        torch.set_num_threads(threads)
    torch.manual_seed(a.get("seed", 0))
    import transformers
    import trl

    transformers.logging.set_verbosity_error()
    res = {"task": a["task"], "ok": False}
    with tempfile.TemporaryDirectory(prefix=f"bench_trl_{a['task']}_") as out:
        t0 = time.perf_counter()
        try:
            res.update(TASKS[a["task"]](a, out))
            res["ok"] = True
        except Exception as e:  # reported in the results table, never fatal for the whole bench
            import traceback

            traceback.print_exc()
            res["error"] = f"{type(e).__name__}: {e}"[:500]
        res["wall_s"] = time.perf_counter() - t0
    res["versions"] = {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__}
    res["threads"] = torch.get_num_threads()
    print("BENCH_JSON " + json.dumps(res), flush=True)
    return 0 if res["ok"] else 1


def _unshadow_trl() -> None:
    """Take this file's folder off ``sys.path`` (put there, first, when it runs as a script), so that
    ``import trl`` finds the trl package and not this file."""
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]


if __name__ == "__main__":
    _unshadow_trl()
    raise SystemExit(main(sys.argv[1:]))
