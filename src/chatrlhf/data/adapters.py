"""Dataset adapters: one per dataset name, mapping a raw row to ``Row(prompt, chosen, rejected|None, split)``.

The text format is DeepSpeed-Chat's: ``prompt`` is the full prompt ending in ``Assistant:`` (built with
``format_prompt(question)`` = ``" Human: " + question + " Assistant:"`` unless the dataset already carries it), and
answers start with a space, so ``prompt + chosen`` is the training text.

Each adapter also knows its splits: the raw split used for training and the one used for evaluation, or ``None``
when the dataset only has ``train`` and a deterministic 9:1 eval split is carved out (``train_eval_indices``).

Adapters raise ``FieldError(field, message)`` for a bad row; the caller adds the file and row number and turns it
into a ``chatrlhf.errors.DataError``.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from chatrlhf.data.template import format_prompt
from chatrlhf.errors import DataError

# Split names a local or hub source may use for evaluation data, in order of preference.
EVAL_SPLIT_ALIASES = ("eval", "test", "validation", "valid", "dev")
# Longest text a row field may hold. Real prompts and answers are far shorter (training keeps at most a few
# thousand tokens of them); a field this long is a broken export (a whole file in one cell) and would only be
# tokenized to be thrown away.
MAX_FIELD_CHARS = 1_000_000


@dataclass(frozen=True)
class Row:
    """One mapped example.

    ``rejected`` is None for SFT-only data; it may be "" (an answer that says nothing is a valid bad answer).
    ``answers`` holds a k-wise ranking, best first (``chosen == answers[0]``, ``rejected == answers[-1]``).
    ``source`` = (file, 1-based row), for messages. ``meta``: the row's ``metadata`` object (any JSON), handed to
    reward and eval functions (``--reward_fn``) with its prompt. A prompt-only row (step 3) has ``chosen == ""``.
    """

    prompt: str
    chosen: str
    rejected: str | None
    split: str = "train"
    answers: tuple[str, ...] | None = None
    source: tuple[str, int] | None = field(default=None, compare=False, repr=False)
    meta: dict | None = field(default=None, compare=False, repr=False)


class FieldError(ValueError):
    """A row field that is missing, of the wrong type or empty; ``field`` is its dotted path."""

    def __init__(self, field_path: str, message: str):
        super().__init__(message)
        self.field = field_path
        self.message = message

# ---------------------------------------------------------------------------------------------------------------
# Field access: dotted paths with list indices, e.g. "answers.zh_cn[0].text".


_PATH_TOKEN = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def get_field(raw: Mapping[str, Any], path: str) -> Any:
    """Follow ``path`` into ``raw``; a missing key, short list or null on the way raises FieldError(path)."""
    cur: Any = raw
    for key, idx in _PATH_TOKEN.findall(path):
        if cur is None:
            raise FieldError(path, "is missing (null)")
        if key:
            if not isinstance(cur, Mapping):
                raise FieldError(path, f"expected an object holding {key!r}, got {type(cur).__name__}")
            if key not in cur:
                raise FieldError(path, "is missing")
            cur = cur[key]
        else:
            cur = as_records(cur)
            if not isinstance(cur, (list, tuple)):
                raise FieldError(path, f"expected a list, got {type(cur).__name__}")
            if int(idx) >= len(cur):
                raise FieldError(path, f"has no element {idx} (list has {len(cur)})")
            cur = cur[int(idx)]
    return cur


def as_records(value: Any) -> Any:
    """datasets' Sequence-of-struct features arrive column-wise ({"text": [...], "docid": [...]}): make that a list
    of dicts; anything else is returned unchanged."""
    if isinstance(value, Mapping) and value and all(isinstance(v, list) for v in value.values()):
        return [dict(zip(value, vals)) for vals in zip(*value.values())]
    return value


def get_text(raw: Mapping[str, Any], path: str, allow_empty: bool = False) -> str:
    """A string field, non-empty unless ``allow_empty`` (a rejected answer may be empty: "said nothing" is a
    legitimate bad answer)."""
    value = get_field(raw, path)
    if value is None:
        raise FieldError(path, "is missing (null)")
    if not isinstance(value, str):
        raise FieldError(path, f"must be a string, got {type(value).__name__}")
    if not value.strip() and not allow_empty:
        raise FieldError(path, "is empty")
    if len(value) > MAX_FIELD_CHARS:
        raise FieldError(path, f"is {len(value):,} characters long, more than the {MAX_FIELD_CHARS:,} a field may "
                               "hold (a broken export?)")
    return value


def get_number(raw: Mapping[str, Any], path: str) -> float:
    value = get_field(raw, path)
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise FieldError(path, f"must be a number, got {type(value).__name__}")
    try:
        return float(value)
    except ValueError:
        raise FieldError(path, f"must be a number, got {value!r}") from None


def _nonempty(path: str, text: str) -> str:
    if not text.strip():
        raise FieldError(path, "is empty after cleaning")
    return text

# ---------------------------------------------------------------------------------------------------------------
# Adapters


class Adapter:
    """Base class. Subclasses set the class attributes and implement ``map``."""

    name: str = ""
    hub_id: str | None = None  # what datasets.load_dataset() gets for the hub form
    hub_config: str | None = None
    train_split: str = "train"
    eval_split: str | None = None  # None: only train exists, carve a seeded 9:1 eval split
    columns: tuple[str, ...] = ()  # top-level columns a row needs (shown in messages)
    sft_only: bool = False  # never has a rejected answer
    note: str = ""

    def map(self, raw: Mapping[str, Any]) -> Row:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<adapter {self.name}>"


class TemplateAdapter(Adapter):
    """Plain question + answer(s): prompt = format_prompt(question), answers = " " + text."""

    prompt_field = ""
    chosen_field = ""
    rejected_field: str | None = None

    def map(self, raw: Mapping[str, Any]) -> Row:
        prompt = format_prompt(get_text(raw, self.prompt_field))
        chosen = " " + get_text(raw, self.chosen_field)
        rejected = " " + get_text(raw, self.rejected_field) if self.rejected_field else None
        return Row(prompt, chosen, rejected)


class RmStatic(Adapter):
    name, hub_id, eval_split = "Dahoas/rm-static", "Dahoas/rm-static", "test"
    columns = ("prompt", "response", "chosen", "rejected")
    note = "prompt already holds Human:/Assistant:, used verbatim"

    def map(self, raw):
        return Row(get_text(raw, "prompt"), get_text(raw, "chosen"), get_text(raw, "rejected", allow_empty=True))


class FullHH(RmStatic):
    name, hub_id = "Dahoas/full-hh-rlhf", "Dahoas/full-hh-rlhf"


class PairsAdapter(Adapter):
    """prompt + chosen (+ rejected) or a k-wise ``answers`` list (alias ``ranked``), best to worst.

    ``verbatim``: prompt and answers are used as they are (already formatted); otherwise the prompt goes through
    format_prompt and answers get a leading space. Without ``rejected`` (or null) a row is SFT-only.
    """

    verbatim = False
    requires_rejected = True
    columns = ("prompt", "chosen", "rejected")

    def _prompt(self, raw):
        text = get_text(raw, "prompt")
        return text if self.verbatim else format_prompt(text)

    def _answer(self, raw, path, allow_empty=False):
        text = get_text(raw, path, allow_empty)
        return text if self.verbatim else " " + text

    def map(self, raw):
        prompt = self._prompt(raw)
        list_key = next((k for k in ("answers", "ranked") if k in raw and raw[k] is not None), None)
        if list_key is not None:
            items = raw[list_key]
            if not isinstance(items, (list, tuple)):
                raise FieldError(list_key, "must be a list of answers ranked best to worst, "
                                           f"got {type(items).__name__}")
            if len(items) < 2:
                raise FieldError(list_key, f"a k-wise ranking needs at least 2 answers, got {len(items)}")
            # only the best answer must say something; worse ones may be empty
            answers = tuple(self._answer(raw, f"{list_key}[{i}]", i > 0) for i in range(len(items)))
            return Row(prompt, answers[0], answers[-1], answers=answers)
        chosen = self._answer(raw, "chosen")
        rejected = None
        if raw.get("rejected") is not None or self.requires_rejected:
            rejected = self._answer(raw, "rejected", allow_empty=True)
        return Row(prompt, chosen, rejected)


class GptjPairwise(PairsAdapter):
    name, hub_id = "Dahoas/synthetic-instruct-gptj-pairwise", "Dahoas/synthetic-instruct-gptj-pairwise"
    note = "plain prompt, template applied"


class LocalJsonfile(PairsAdapter):
    name, eval_split, verbatim = "local/jsonfile", "eval", True
    requires_rejected = False  # a local row without 'rejected' is SFT-only (phase 1 and 3)
    note = "DIR/data/train.json + DIR/data/eval.json; prompt and answers verbatim; optional k-wise 'answers'"


class Prompts(Adapter):
    """Prompt-only rows (step 3 prompts, e.g. for a reward function): a plain request gets the template, an already
    formatted prompt (ending with "Assistant:") is kept. Phases 1 and 2 skip them (nothing to imitate or rank)."""

    name, eval_split = "prompts", "eval"
    columns = ("prompt",)
    note = "prompt only (+ optional metadata): step-3 prompts; plain prompts get the template"

    def map(self, raw):
        text = get_text(raw, "prompt")
        return Row(text if text.rstrip().endswith("Assistant:") else format_prompt(text), "", None)


class Yitingxie(Adapter):
    name, hub_id, eval_split = "yitingxie/rlhf-reward-datasets", "yitingxie/rlhf-reward-datasets", "test"
    columns = ("prompt", "chosen", "rejected")
    note = "chosen/rejected start with 'Assistant:', which is moved to the prompt"

    def map(self, raw):
        prompt = get_text(raw, "prompt")
        # The prompt ends before "Assistant:"; the answers carry it. Keep DeepSpeed-Chat's split of the text.
        if not prompt.rstrip().endswith("Assistant:"):
            prompt = prompt + "Assistant:"
        chosen = _nonempty("chosen", get_text(raw, "chosen").split("Assistant:")[-1])
        rejected = get_text(raw, "rejected", allow_empty=True).split("Assistant:")[-1]
        return Row(prompt, chosen, rejected)


_CITATION = (re.compile(r" [\(\[].*?[\)\]]"), re.compile(r"[\(\[].*?[\)\]]"))


def strip_citations(text: str) -> str:
    """Remove browser citation marks such as ``[1]`` and ``(2)`` (and a space before them)."""
    for pattern in _CITATION:
        text = pattern.sub("", text)
    return text


class Webgpt(Adapter):
    name, hub_id = "openai/webgpt_comparisons", "openai/webgpt_comparisons"
    columns = ("question", "answer_0", "answer_1", "score_0", "score_1")
    note = "higher score wins, tie -> answer_0; citation marks stripped"

    def map(self, raw):
        prompt = format_prompt(get_text(raw, "question.full_text"))
        s0, s1 = get_number(raw, "score_0"), get_number(raw, "score_1")
        best, worst = ("answer_0", "answer_1") if s0 >= s1 else ("answer_1", "answer_0")
        chosen = _nonempty(best, strip_citations(get_text(raw, best)))
        rejected = strip_citations(get_text(raw, worst, allow_empty=True))
        return Row(prompt, " " + chosen, " " + rejected)


class SHP(Adapter):
    name, hub_id, eval_split = "stanfordnlp/SHP", "stanfordnlp/SHP", "validation"
    columns = ("history", "human_ref_A", "human_ref_B", "labels")
    note = "labels == 1: human_ref_A preferred"

    def map(self, raw):
        prompt = format_prompt(get_text(raw, "history"))
        label = get_field(raw, "labels")
        if isinstance(label, bool) or label not in (0, 1):
            raise FieldError("labels", f"must be 0 or 1, got {label!r}")
        a, b = " " + get_text(raw, "human_ref_A"), " " + get_text(raw, "human_ref_B")
        return Row(prompt, a, b) if label == 1 else Row(prompt, b, a)


class Sharegpt(Adapter):
    name = hub_id = "pvduy/sharegpt_alpaca_oa_vicuna_format"
    eval_split = "test"
    columns = ("prompt", "label")
    sft_only = True
    note = "USER:/ASSISTANT: turns renamed Human:/Assistant:; SFT only"

    def map(self, raw):
        prompt = get_text(raw, "prompt").replace("USER:", "Human:").replace("ASSISTANT:", "Assistant:")
        return Row(prompt, " " + get_text(raw, "label"), None)


class ZhihuKOL(TemplateAdapter):
    name, hub_id = "wangrui6/Zhihu-KOL", "wangrui6/Zhihu-KOL"
    columns, prompt_field, chosen_field = ("INSTRUCTION", "RESPONSE"), "INSTRUCTION", "RESPONSE"
    sft_only = True


class HC3Chinese(TemplateAdapter):
    name, hub_id, hub_config = "Hello-SimpleAI/HC3-Chinese", "Hello-SimpleAI/HC3-Chinese", "all"
    columns, prompt_field, chosen_field = ("question", "human_answers"), "question", "human_answers[0]"
    sft_only = True


class Miracl(Adapter):
    """query -> first positive passage (chosen) vs first negative passage (rejected; None when there is none)."""

    eval_split = "dev"
    columns = ("query", "positive_passages", "negative_passages")
    note = "rejected is None (SFT-only row) when a query has no negative passage"

    def map(self, raw):
        prompt = format_prompt(get_text(raw, "query"))
        chosen = " " + get_text(raw, "positive_passages[0].text")
        negatives = as_records(raw.get("negative_passages"))
        if negatives is not None and not isinstance(negatives, (list, tuple)):
            raise FieldError("negative_passages", f"must be a list, got {type(negatives).__name__}")
        rejected = " " + get_text(raw, "negative_passages[0].text") if negatives else None
        return Row(prompt, chosen, rejected)


class MiraclZh(Miracl):
    name = hub_id = "Cohere/miracl-zh-queries-22-12"


class MiraclJa(Miracl):
    name = hub_id = "Cohere/miracl-ja-queries-22-12"


class Mkqa(TemplateAdapter):
    hub_id = "apple/mkqa"
    columns = ("queries", "answers")
    sft_only = True


class MkqaChinese(Mkqa):
    name, prompt_field, chosen_field = "mkqa-Chinese", "queries.zh_cn", "answers.zh_cn[0].text"


class MkqaJapanese(Mkqa):
    name, prompt_field, chosen_field = "mkqa-Japanese", "queries.ja", "answers.ja[0].text"


class QgJaquad(TemplateAdapter):
    name, hub_id, eval_split = "lmqg/qg_jaquad", "lmqg/qg_jaquad", "validation"
    columns, prompt_field, chosen_field = ("question", "sentence"), "question", "sentence"
    sft_only = True


class QagJaquad(TemplateAdapter):
    name, hub_id, eval_split = "lmqg/qag_jaquad", "lmqg/qag_jaquad", "validation"
    columns, prompt_field, chosen_field = ("questions", "paragraph"), "questions[0]", "paragraph"
    sft_only = True


ADAPTERS: dict[str, Adapter] = {a.name: a for a in (
    RmStatic(), FullHH(), GptjPairwise(), Yitingxie(), Webgpt(), SHP(), Sharegpt(), LocalJsonfile(), ZhihuKOL(),
    MiraclZh(), HC3Chinese(), MkqaChinese(), MkqaJapanese(), MiraclJa(), QgJaquad(), QagJaquad(), Prompts(),
)}


def known_names() -> list[str]:
    return list(ADAPTERS)


def get_adapter(name: str) -> Adapter:
    if name not in ADAPTERS:
        raise DataError(f"unknown dataset name {name!r}; known names: {', '.join(ADAPTERS)} "
                        "(or give a local path, optionally as NAME=PATH)")
    return ADAPTERS[name]

# ---------------------------------------------------------------------------------------------------------------
# Deterministic splits


def derived_seed(seed: int, purpose: str) -> int:
    """A 32-bit seed for one purpose, stable across runs, machines and Python versions (no hash())."""
    digest = hashlib.sha256(f"{seed}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def share_bounds(n: int, weights: Sequence[float]) -> list[int]:
    """Cut points of ``n`` items into consecutive shares proportional to ``weights`` (cumulative rounding, so the
    shares always cover all items exactly once)."""
    total = float(sum(weights))
    bounds, acc = [0], 0.0
    for w in weights:
        acc += w
        bounds.append(int(round(n * acc / total)))
    bounds[-1] = n
    return bounds


def split_indices(n: int, weights: Sequence[float], seed: int, purpose: str) -> list[np.ndarray]:
    """DeepSpeed-Chat's get_raw_dataset_split_index: a seeded permutation of range(n) cut into consecutive shares.
    numpy's legacy RandomState stream is fixed, so the result is identical everywhere."""
    perm = np.random.RandomState(derived_seed(seed, purpose)).permutation(n)
    b = share_bounds(n, weights)
    return [perm[b[i]:b[i + 1]] for i in range(len(weights))]


def train_eval_indices(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The 9:1 eval split for datasets that only have ``train``."""
    train, evl = split_indices(n, (9, 1), seed, "train_eval")
    return train, evl
