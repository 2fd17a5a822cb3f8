"""Rewards and evaluation as code: ``--reward_fn`` / ``--eval_fn`` for step 3.

A reward function is ``fn(prompts: list[str], answers: list[str], metas: list[dict]) -> list[float]``: the data
row's prompt text (as in the data file, e.g. DeepSpeed-Chat's " Human: ... Assistant:"), the generated answer (text
up to EOS, special tokens removed) and the row's ``metadata`` object ({} when it has none). It is the user's own
code, named explicitly on the command line (``module:function`` or ``path/to/file.py:function``), like
``--trust_remote_code``; nothing else is imported.

An eval function has the same arguments and returns ``dict[str, float]`` (metrics of the whole batch, e.g.
``{"pass_rate": 0.4}``). The built-in task's gold scorer is one such pair (``chatrlhf.tasks.builtin:reward`` and
``chatrlhf.tasks.builtin:evaluate``).

A score is the reward model's (weight ``--reward_model_weight``) plus the function's (``--reward_fn_weight``); a
function that raises or returns a non-finite value stops the run with the row and the message.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from chatrlhf.errors import UserError

RewardFn = Callable[[list[str], list[str], list[dict]], Sequence[float]]


def load_function(spec: str, flag: str) -> Callable:
    """``module:function`` or ``path/to/file.py:function`` -> the function (UserError naming ``flag`` if not)."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name.isidentifier():
        raise UserError(f"{flag} {spec!r}: expected module:function or path/to/file.py:function")
    try:
        if where.endswith(".py") or "/" in where or "\\" in where:
            path = Path(where).expanduser()
            if not path.is_file():
                raise UserError(f"{flag} {spec!r}: no such file {path}")
            mod_name = f"chatrlhf_user_{path.stem}_{abs(hash(str(path.resolve())))}"
            loader_spec = importlib.util.spec_from_file_location(mod_name, path)
            if loader_spec is None or loader_spec.loader is None:
                raise UserError(f"{flag} {spec!r}: cannot import {path}")
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[mod_name] = module
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except UserError:
        raise
    except Exception as e:  # the user's module failed to import: say so in one line
        raise UserError(f"{flag} {spec!r}: importing {where} failed: {type(e).__name__}: {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UserError(f"{flag} {spec!r}: {where} has no function {name!r}")
    return fn


def _row_error(flag: str, spec: str, i: int, prompt: str, message: str) -> UserError:
    snippet = prompt if len(prompt) <= 80 else prompt[:77] + "..."
    return UserError(f"{flag} {spec}: row {i} (prompt {snippet!r}): {message}")


def call_reward_fn(fn: RewardFn, spec: str, flag: str, prompts: list[str], answers: list[str],
                   metas: list[dict]) -> list[float]:
    """Call ``fn`` on a batch; check it returned one finite number per row. When the batch call raises, rows are
    retried one by one so the error names the row that fails."""
    try:
        out = fn(list(prompts), list(answers), list(metas))
    except Exception as batch_error:  # find the row, for the message
        for i, (p, a, m) in enumerate(zip(prompts, answers, metas)):
            try:
                fn([p], [a], [m])
            except Exception as e:
                raise _row_error(flag, spec, i, p, f"raised {type(e).__name__}: {e}") from None
        raise UserError(f"{flag} {spec}: raised {type(batch_error).__name__}: {batch_error}") from None
    try:
        values = [float(v) for v in out]
    except (TypeError, ValueError) as e:
        raise UserError(f"{flag} {spec}: must return one number per answer, got {type(out).__name__} ({e})") from None
    if len(values) != len(prompts):
        raise UserError(f"{flag} {spec}: returned {len(values)} values for {len(prompts)} answers")
    for i, v in enumerate(values):
        if not math.isfinite(v):
            raise _row_error(flag, spec, i, prompts[i], f"returned a non-finite value ({v})")
    return values


def call_eval_fn(fn: Callable, spec: str, prompts: list[str], answers: list[str], metas: list[dict]) -> dict:
    try:
        out = fn(list(prompts), list(answers), list(metas))
    except Exception as e:
        raise UserError(f"--eval_fn {spec}: raised {type(e).__name__}: {e}") from None
    if not isinstance(out, dict):
        raise UserError(f"--eval_fn {spec}: must return a dict of metric name -> number, got {type(out).__name__}")
    try:
        return {str(k): float(v) for k, v in out.items()}
    except (TypeError, ValueError) as e:
        raise UserError(f"--eval_fn {spec}: metric values must be numbers ({e})") from None


def answer_texts(tokenizer: Any, seq: torch.Tensor, mask: torch.Tensor, prompt_len: int) -> list[str]:
    """Generated answers as text: the real answer tokens (up to and including EOS), special tokens removed."""
    return [tokenizer.decode(s[prompt_len:][m[prompt_len:].bool()], skip_special_tokens=True).strip()
            for s, m in zip(seq, mask)]


@torch.no_grad()
def reward_model_scores(reward_model, seq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Reward model's value-head output at the last real token of prompt + answer, [B] (fp32)."""
    values = reward_model(seq, attention_mask=mask)
    ends = (torch.arange(seq.shape[1], device=seq.device) * mask).argmax(1)
    return values.float().gather(1, ends.unsqueeze(1)).squeeze(1)


@dataclass
class Scorer:
    """What an answer earns: ``rm_weight`` x the reward model's score + ``fn_weight`` x the reward function's."""

    tokenizer: Any
    reward_model: Any = None
    fn: RewardFn | None = None
    spec: str = ""
    rm_weight: float = 1.0
    fn_weight: float = 1.0

    def __call__(self, seq: torch.Tensor, mask: torch.Tensor, prompt_len: int, prompts: Sequence[str] | None = None,
                 metas: Sequence[dict] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(score [B], parts {"rm_score": [B], "fn_score": [B]} for the sources in use)."""
        parts: dict[str, torch.Tensor] = {}
        score = torch.zeros(seq.shape[0], device=seq.device)
        if self.reward_model is not None:
            parts["rm_score"] = reward_model_scores(self.reward_model, seq, mask)
            score = score + self.rm_weight * parts["rm_score"]
        if self.fn is not None:
            if prompts is None:
                raise UserError("--reward_fn needs the data rows' prompt texts (step-3 prompts from --data_path)")
            answers = answer_texts(self.tokenizer, seq, mask, prompt_len)
            vals = call_reward_fn(self.fn, self.spec, "--reward_fn", list(prompts), answers,
                                  list(metas or [{}] * len(answers)))
            parts["fn_score"] = torch.tensor(vals, dtype=torch.float32, device=seq.device)
            score = score + self.fn_weight * parts["fn_score"]
        return score, parts
