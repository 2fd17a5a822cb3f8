"""The built-in task: tiny instructions with checkable answers, and the gold scorer that defines its preference.

Why this exists: the embedded default (``chatrlhf demo``) must show all three steps doing their job with tiny
random models on a 2-core CPU in minutes. So the task is:

- short instructions with short, exactly checkable answers drawn from a small vocabulary
  ("Reverse the word: cat" -> " tac", "Add 3 and 4." -> " 7", "Repeat hi 3 times." -> " hi hi hi", ...);
- prompts in DeepSpeed-Chat's format ``" Human: " + instruction + " Assistant:"``; answers begin with a space;
- flawed answers of the kinds real SFT/preference data has: wrong, correct-then-rambling, correct-then-a-fake
  next turn ("Human: ..."), never stopping (long repetition), truncated or empty;
- a gold scorer (a plain function) that ranks them: 1.0 = correct and stops cleanly; correct-then-junk earns
  0.3..0.9 (less the more junk; a fake "Human:" turn halves the junk credit); wrong earns < 0.25; empty 0.

Noise, by design (one rule for every file): a fraction ``noise`` of *chosen* answers is flawed (ramble, fake turn,
never-stop or wrong), and each row's *rejected* answer is always strictly worse by gold score. So the same rows
serve SFT (prompt + chosen: a realistically imperfect SFT set that leaves RLHF room to improve) and the reward
model (gold-ordered pairs), exactly as DeepSpeed-Chat splits one dataset across phases with ``--data_split``.
An extra SFT-only set in the same local/jsonfile layout (``out_dir/sft``) can be passed via
``--sft_only_data_path``. Held-out and eval prompts come from task items (template + arguments, any phrasing)
that never occur in training rows.
"""

from __future__ import annotations

import difflib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from chatrlhf.data.template import ASSISTANT as PROMPT_SUFFIX
from chatrlhf.data.template import HUMAN as PROMPT_PREFIX
from chatrlhf.data.template import format_prompt
from chatrlhf.errors import DataError, UserError

WORDS = ["cat", "dog", "sun", "hat", "pen", "cup", "box", "red", "map", "bus", "egg", "fox", "jam", "owl", "pig", "net"]
FILLERS = [
    "I hope this helps.", "Let me know if you need anything else.", "That is the answer.", "Have a nice day.",
    "This was easy.", "Thank you for asking.", "Is there anything else?", "I am happy to help.",
]

# Gold-score constants (see gold_score): correct-then-junk lies in (JUNK_FLOOR, JUNK_FLOOR + JUNK_SPAN);
# wrong answers stay below WRONG_MAX, so every correct answer outranks every wrong one.
JUNK_FLOOR, JUNK_SPAN, JUNK_HALF = 0.3, 0.6, 4.0
WRONG_BASE, WRONG_SIM, WRONG_MAX = 0.05, 0.2, 0.25

FLAW_KINDS = ("ramble", "fake_turn", "never_stop", "wrong", "truncated", "empty")


def task_prompt(question: str) -> str:
    """DeepSpeed-Chat's single-turn prompt (data/template.format_prompt) for a task question."""
    return format_prompt(question.strip())


# --------------------------------------------------------------------------------------------------- templates
@dataclass(frozen=True)
class Template:
    name: str
    phrasings: tuple[str, ...]  # format strings over the argument names
    patterns: tuple[str, ...]  # regexes (full match) that parse a question back into its arguments
    items: Callable[[], list[dict]]  # all argument combinations
    answer: Callable[[dict], str]  # the correct answer, without the leading space


TEMPLATES: tuple[Template, ...] = (
    Template("reverse", ("Reverse the word: {w}", "Write {w} backwards."),
             (r"Reverse the word: (?P<w>[a-z]+)", r"Write (?P<w>[a-z]+) backwards\."),
             lambda: [{"w": w} for w in WORDS], lambda a: a["w"][::-1]),
    Template("upper", ("Uppercase: {w}", "Write {w} in capital letters."),
             (r"Uppercase: (?P<w>[a-z]+)", r"Write (?P<w>[a-z]+) in capital letters\."),
             lambda: [{"w": w} for w in WORDS], lambda a: a["w"].upper()),
    Template("add", ("Add {a} and {b}.", "What is {a} plus {b}?"),
             (r"Add (?P<a>\d+) and (?P<b>\d+)\.", r"What is (?P<a>\d+) plus (?P<b>\d+)\?"),
             lambda: [{"a": a, "b": b} for a in range(10) for b in range(10)], lambda a: str(int(a["a"]) + int(a["b"]))),
    Template("after", ("What comes after {n}?", "What number follows {n}?"),
             (r"What comes after (?P<n>\d+)\?", r"What number follows (?P<n>\d+)\?"),
             lambda: [{"n": n} for n in range(20)], lambda a: str(int(a["n"]) + 1)),
    Template("before", ("What comes before {n}?", "What number precedes {n}?"),
             (r"What comes before (?P<n>\d+)\?", r"What number precedes (?P<n>\d+)\?"),
             lambda: [{"n": n} for n in range(1, 21)], lambda a: str(int(a["n"]) - 1)),
    Template("repeat", ("Repeat {w} {k} times.", "Say {w} {k} times."),
             (r"Repeat (?P<w>[a-z]+) (?P<k>\d+) times\.", r"Say (?P<w>[a-z]+) (?P<k>\d+) times\."),
             lambda: [{"w": w, "k": k} for w in WORDS for k in (2, 3, 4)], lambda a: " ".join([a["w"]] * int(a["k"]))),
)
_BY_NAME = {t.name: t for t in TEMPLATES}


def _item_key(tname: str, args: dict) -> str:
    return tname + ":" + ",".join(f"{k}={args[k]}" for k in sorted(args))


def extract_question(prompt_or_question: str) -> str:
    """The instruction inside a formatted prompt (the last Human turn), or the text itself when unformatted."""
    text = prompt_or_question
    if "Assistant:" in text:
        text = text[: text.rfind("Assistant:")]
    if "Human:" in text:
        text = text[text.rfind("Human:") + len("Human:"):]
    return text.strip()


def parse_question(prompt_or_question: str) -> tuple[str, dict]:
    """-> (template name, arguments). DataError for text that is not a built-in task question."""
    q = extract_question(prompt_or_question)
    for t in TEMPLATES:
        for pat in t.patterns:
            m = re.fullmatch(pat, q)
            if m:
                return t.name, m.groupdict()
    raise DataError(f"not a built-in task question: {q!r}")


def expected_answer(prompt_or_question: str) -> str:
    """The correct answer text, with DeepSpeed-Chat's leading space (e.g. ' tac')."""
    name, args = parse_question(prompt_or_question)
    return " " + _BY_NAME[name].answer(args)


# ------------------------------------------------------------------------------------------------- gold scorer
_TOKEN_RE = re.compile(r"[A-Za-z]+|\d+|[^\sA-Za-z\d]")
_FAKE_TURN_RE = re.compile(r"(Human|Assistant)\s*:")


def _tokens(text: str) -> list[str]:
    return _TOKEN_RE.findall(text)


def _similarity(expected: list[str], head: list[str]) -> float:
    """How close a wrong answer is: numeric distance for numbers, character overlap otherwise, in [0, 1)."""
    if len(expected) == 1 and len(head) == 1 and expected[0].isdigit() and head[0].isdigit():
        return 0.5 / (1 + abs(int(expected[0]) - int(head[0])))
    return min(0.99, difflib.SequenceMatcher(None, " ".join(expected), " ".join(head)).ratio())


def gold_score(prompt_or_question: str, answer: str) -> float:
    """Gold preference in [0, 1] for an answer (generated text cut at EOS; it may contain a fake "Human:" turn).

    1.0: correct and stops cleanly. Correct then junk: 0.3 + 0.6 * f with f = 1 / (1 + n_junk / 4), f halved when
    the junk holds a fake next turn (so 0.3..0.9, falling with the amount of junk). Wrong: below 0.25, higher
    when closer to the right answer and lower with junk. Empty: 0. Tokens are words, numbers and punctuation
    marks; comparison is case-sensitive and ignores whitespace.
    """
    expected = _tokens(expected_answer(prompt_or_question))
    got = _tokens(answer)
    if not got:
        return 0.0
    if got[: len(expected)] == expected:
        junk = got[len(expected):]
        if not junk:
            return 1.0
        f = 1.0 / (1.0 + len(junk) / JUNK_HALF)
        if _FAKE_TURN_RE.search(answer):
            f *= 0.5
        return JUNK_FLOOR + JUNK_SPAN * f
    head = got[: len(expected)]
    n_junk = len(got) - len(head)
    score = (WRONG_BASE + WRONG_SIM * _similarity(expected, head)) * (0.5 + 0.5 / (1.0 + n_junk / JUNK_HALF))
    return min(score, WRONG_MAX - 1e-6)


def gold_pass(prompt_or_question: str, answer: str) -> bool:
    """Exactly correct and nothing after it (whitespace aside)."""
    return gold_score(prompt_or_question, answer) == 1.0


def classify_answer(prompt_or_question: str, answer: str) -> str:
    """One word for reports: clean | ramble | fake_turn | never_stop | wrong | empty."""
    expected = _tokens(expected_answer(prompt_or_question))
    got = _tokens(answer)
    if not got:
        return "empty"
    if got[: len(expected)] != expected:
        return "wrong"
    if len(got) == len(expected):
        return "clean"
    if _FAKE_TURN_RE.search(answer):
        return "fake_turn"
    junk = got[len(expected):]
    # never-stop = long and repetitive junk (a loop); varied filler is rambling
    return "never_stop" if len(junk) >= 10 and len(set(junk)) <= len(junk) / 2 else "ramble"


def gold_win_rate(scores_a: Sequence[float], scores_b: Sequence[float]) -> float:
    """Fraction of prompts where A's gold score beats B's; ties count half."""
    if len(scores_a) != len(scores_b) or not scores_a:
        raise UserError(f"gold_win_rate needs two equally long, non-empty score lists (got {len(scores_a)} and {len(scores_b)})")
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores_a, scores_b))
    return wins / len(scores_a)


def gold_summary(prompts: Sequence[str], answers: Sequence[str]) -> dict:
    """Mean gold score, pass rate and the share of each answer kind, for eval reports."""
    if len(prompts) != len(answers) or not prompts:
        raise UserError(f"gold_summary needs equally long, non-empty lists (got {len(prompts)} and {len(answers)})")
    scores = [gold_score(p, a) for p, a in zip(prompts, answers)]
    kinds = [classify_answer(p, a) for p, a in zip(prompts, answers)]
    out = {"n": len(scores), "gold_mean": sum(scores) / len(scores), "gold_pass": sum(s == 1.0 for s in scores) / len(scores)}
    for k in ("clean", "ramble", "fake_turn", "never_stop", "wrong", "empty"):
        out[f"kind_{k}"] = kinds.count(k) / len(kinds)
    return out


def reward(prompts: Sequence[str], answers: Sequence[str], metas: Sequence[dict]) -> list[float]:
    """The gold scorer as a reward function (``--reward_fn chatrlhf.tasks.builtin:reward``)."""
    return [gold_score(p, a) for p, a in zip(prompts, answers)]


def evaluate(prompts: Sequence[str], answers: Sequence[str], metas: Sequence[dict]) -> dict[str, float]:
    """The gold summary as an eval function (``--eval_fn chatrlhf.tasks.builtin:evaluate``): gold_mean, gold_pass, kind_*."""
    return {k: float(v) for k, v in gold_summary(prompts, answers).items() if k != "n"}


# ------------------------------------------------------------------------------------------- answer generators
def _all_items() -> list[tuple[str, dict]]:
    return [(t.name, args) for t in TEMPLATES for args in t.items()]


def _question(rng: random.Random, tname: str, args: dict) -> str:
    return rng.choice(_BY_NAME[tname].phrasings).format(**args)


def _wrong(rng: random.Random, tname: str, args: dict) -> str:
    """A plausible mistake of the same type as the right answer (never the right answer)."""
    right = _BY_NAME[tname].answer(args)
    for _ in range(20):
        if tname in ("add", "after", "before"):
            cand = str(max(0, int(right) + rng.choice([-3, -2, -1, 1, 2, 3])))
        elif tname == "reverse":
            cand = rng.choice([args["w"], rng.choice(WORDS)[::-1], args["w"][1:] + args["w"][0]])
        elif tname == "upper":
            cand = rng.choice([args["w"], rng.choice(WORDS).upper(), args["w"].capitalize()])
        else:  # repeat: wrong count or wrong word
            k = int(args["k"])
            cand = rng.choice([" ".join([args["w"]] * rng.choice([c for c in (1, 2, 3, 4, 5) if c != k])),
                               " ".join([rng.choice(WORDS)] * k)])
        if cand != right:
            return cand
    return right + right  # unreachable in practice; still wrong


def _fake_turn(rng: random.Random) -> str:
    tname, args = rng.choice(_all_items())
    turn = f" Human: {_question(rng, tname, args)}"
    if rng.random() < 0.6:  # sometimes the model also answers its own invented question
        turn += f" Assistant: {_BY_NAME[tname].answer(args)}"
    return turn


def make_answer(rng: random.Random, tname: str, args: dict, kind: str) -> str:
    """An answer of the given kind (clean or one of FLAW_KINDS), with the leading space."""
    right = _BY_NAME[tname].answer(args)
    if kind == "clean":
        return " " + right
    if kind == "ramble":
        return " " + right + " " + " ".join(rng.sample(FILLERS, rng.randint(1, 3)))
    if kind == "fake_turn":
        return " " + right + _fake_turn(rng)
    if kind == "never_stop":  # the answer or a filler repeated until the length limit would cut it
        if rng.random() < 0.6:
            return " " + right + (" " + right) * rng.randint(10, 24)
        return " " + right + (" " + rng.choice(FILLERS)) * rng.randint(3, 6)
    if kind == "wrong":
        junk = " " + rng.choice(FILLERS) if rng.random() < 0.3 else ""
        return " " + _wrong(rng, tname, args) + junk
    if kind == "truncated":  # one token: first word of a multi-word answer, else its first character
        parts = right.split()
        cut = parts[0] if len(parts) > 1 else right[0]
        return " " + cut if cut != right else ""
    if kind == "empty":
        return ""
    raise ValueError(f"unknown answer kind {kind!r}")


# Which flaws a noisy *chosen* answer has, and what a clean chosen answer is paired against (weights).
NOISY_CHOSEN = {"ramble": 0.35, "fake_turn": 0.25, "never_stop": 0.25, "wrong": 0.15}
REJECTED = {"ramble": 0.25, "fake_turn": 0.2, "never_stop": 0.25, "wrong": 0.15, "truncated": 0.08, "empty": 0.07}
# The SFT-only set's flaws when it has its own noise (write_task_dataset's sft_noise): dominated by DeepSpeed-Chat's
# well-known SFT failure, the assistant going on with an invented next turn (" Human: ... Assistant: ...").
SFT_FLAWS = {"fake_turn": 0.8, "ramble": 0.15, "never_stop": 0.05}
# A pair must differ by at least this much gold score: near-ties only add label noise for the reward model.
PAIR_MARGIN = 0.1


def _pick(rng: random.Random, weights: dict[str, float]) -> str:
    names = list(weights)
    return rng.choices(names, weights=[weights[n] for n in names])[0]


def _pair_row(rng: random.Random, tname: str, args: dict, noisy: bool, flaws: dict[str, float] | None = None) -> dict:
    """One {prompt, chosen, rejected} row; rejected is strictly worse than chosen by gold score. A noisy chosen
    answer's flaw is drawn from ``flaws`` (default NOISY_CHOSEN)."""
    question = _question(rng, tname, args)
    prompt = task_prompt(question)
    c_kind = _pick(rng, flaws or NOISY_CHOSEN) if noisy else "clean"
    chosen = make_answer(rng, tname, args, c_kind)
    c_score = gold_score(question, chosen)
    for _ in range(50):
        r_kind = _pick(rng, REJECTED)
        rejected = make_answer(rng, tname, args, r_kind)
        r_score = gold_score(question, rejected)
        if r_score <= c_score - PAIR_MARGIN:
            break
    else:  # nothing sampled was worse (only possible for a poor noisy chosen): the empty answer always is
        r_kind, rejected, r_score = "empty", "", 0.0
    if r_kind == "truncated" and rejected == "":
        r_kind = "empty"
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected,
            "chosen_gold": round(c_score, 6), "rejected_gold": round(r_score, 6),
            "chosen_kind": c_kind, "rejected_kind": r_kind}


def _pair_rows(rng: random.Random, items: list[tuple[str, dict]], n: int, noise: float,
               flaws: dict[str, float] | None = None) -> list[dict]:
    """n rows over items, stratified by template; exactly round(noise * n) have a flawed chosen answer."""
    by_t: dict[str, list[dict]] = {}
    for tname, args in items:
        by_t.setdefault(tname, []).append(args)
    names = sorted(by_t)
    n_noisy = round(noise * n)
    noisy_flags = [True] * n_noisy + [False] * (n - n_noisy)
    rng.shuffle(noisy_flags)
    rows = []
    for i in range(n):
        tname = names[i % len(names)] if i < n - n % len(names) else rng.choice(names)
        rows.append(_pair_row(rng, tname, rng.choice(by_t[tname]), noisy_flags[i], flaws))
    rng.shuffle(rows)
    return rows


def _unseen_rows(rng: random.Random, items: list[tuple[str, dict]], n: int, noise: float, seen: list[dict],
                 flaws: dict[str, float] | None = None) -> list[dict]:
    """n rows none of which repeats a (prompt, chosen, rejected) triple of ``seen`` (so eval is truly held out)."""
    seen_keys = {(r["prompt"], r["chosen"], r["rejected"]) for r in seen}
    out: list[dict] = []
    for _ in range(20):
        fresh = [r for r in _pair_rows(rng, items, 2 * n, noise, flaws) if (r["prompt"], r["chosen"], r["rejected"]) not in seen_keys]
        for r in fresh:  # keep the noise fraction: take noisy and clean rows in proportion
            seen_keys.add((r["prompt"], r["chosen"], r["rejected"]))
        out += fresh
        n_noisy = round(noise * n)
        noisy = [r for r in out if r["chosen_kind"] != "clean"][:n_noisy]
        clean = [r for r in out if r["chosen_kind"] == "clean"][: n - n_noisy]
        if len(noisy) == n_noisy and len(clean) == n - n_noisy:
            rows = noisy + clean
            rng.shuffle(rows)
            return rows
    raise UserError(f"cannot make {n} eval rows unseen in training; lower n_eval or raise n_heldout")


def _kwise_row(rng: random.Random, tname: str, args: dict, k: int) -> dict:
    question = _question(rng, tname, args)
    pool: dict[float, tuple[str, str]] = {}
    for _ in range(60):  # sample candidates; keep one per distinct score so the ranking is strict
        kind = rng.choice(("clean",) + FLAW_KINDS)
        ans = make_answer(rng, tname, args, kind)
        pool.setdefault(round(gold_score(question, ans), 6), (ans, kind))
        if len(pool) >= k + 3:
            break
    if len(pool) < k:
        raise UserError(f"k={k} is too large for the built-in task (found {len(pool)} distinct answer qualities)")
    picked = sorted(rng.sample(sorted(pool), k), reverse=True)
    return {"prompt": task_prompt(question), "answers": [pool[s][0] for s in picked], "gold": picked,
            "kinds": [pool[s][1] for s in picked]}


def _split_items(rng: random.Random, n_heldout: int, eval_frac: float) -> tuple[list, list, list]:
    """Disjoint item pools (train, eval, heldout); an item is a template + arguments in any phrasing, so a
    held-out question never appears in training, not even reworded."""
    by_t = {t.name: t.items() for t in TEMPLATES}
    for items in by_t.values():
        rng.shuffle(items)
    caps = {n: max(1, len(v) // 4) for n, v in by_t.items()}
    if n_heldout > sum(caps.values()):
        raise UserError(f"n_heldout={n_heldout} is too large: the built-in task can hold out at most {sum(caps.values())} items")
    held: dict[str, int] = {n: 0 for n in by_t}
    order = sorted(by_t, key=lambda n: -len(by_t[n]))
    while sum(held.values()) < n_heldout:  # round-robin, so every template is represented
        for n in order:
            if held[n] < caps[n] and sum(held.values()) < n_heldout:
                held[n] += 1
    train, evl, heldout = [], [], []
    for n, items in by_t.items():
        n_eval = max(1, round(len(items) * eval_frac))
        heldout += [(n, a) for a in items[: held[n]]]
        evl += [(n, a) for a in items[held[n]: held[n] + n_eval]]
        train += [(n, a) for a in items[held[n] + n_eval:]]
    return train, evl, heldout


def task_corpus(seed: int = 1234, n: int = 4000) -> list[str]:
    """Text for training a tokenizer: formatted prompts with answers of every kind, over all task items."""
    rng = random.Random(f"{seed}-corpus")
    items = _all_items()
    lines = [" " + " ".join(WORDS), " " + " ".join(w.upper() for w in WORDS), " " + " ".join(w[::-1] for w in WORDS),
             " " + " ".join(str(i) for i in range(40)), " " + " ".join(FILLERS)]
    while len(lines) < n:
        tname, args = rng.choice(items)
        kind = rng.choice(("clean", "clean") + FLAW_KINDS)
        lines.append(task_prompt(_question(rng, tname, args)) + make_answer(rng, tname, args, kind))
    return lines[:n]


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def write_task_dataset(out_dir: str | Path, seed: int = 1234, n_sft: int = 2000, n_pairs: int = 3000,
                       n_eval: int = 300, n_heldout: int = 40, k: int = 4, noise: float = 0.35,
                       n_kwise: int | None = None, n_corpus: int = 4000, disjoint_eval: bool = True,
                       sft_noise: float | None = None, sft_flaws: dict[str, float] | None = None) -> dict[str, Path]:
    """Write the built-in task's files under ``out_dir``; returns their paths by name.

    - ``data/train.json`` (n_pairs rows), ``data/eval.json`` (n_eval rows): JSON lists of {prompt, chosen,
      rejected, chosen_gold, rejected_gold, chosen_kind, rejected_kind} - a local/jsonfile dataset whose root is
      ``out_dir`` (use ``--data_path out_dir`` with ``--data_split``). round(noise * n) chosen answers are flawed;
      rejected is always worse by at least PAIR_MARGIN gold score (or is the empty answer). No eval row repeats a training row; with
      ``disjoint_eval`` eval questions also come from task items never used in training (a harder test).
    - ``sft/data/train.json`` (n_sft rows) and ``sft/data/eval.json``: the same layout, extra SFT data for
      ``--sft_only_data_path out_dir/sft``. Its noise is ``noise`` with NOISY_CHOSEN's flaw mix, unless
      ``sft_noise`` is given: then round(sft_noise * n) chosen answers are flawed with the kinds weighted by
      ``sft_flaws`` (default SFT_FLAWS, dominated by fake next turns - DeepSpeed-Chat's typical SFT flaw). Rows
      stay gold-ordered either way; only the chosen answers (what SFT imitates) change.
    - ``kwise.jsonl``: {prompt, answers [best..worst], gold [strictly decreasing], kinds}.
    - ``heldout.jsonl``: {prompt, question, answer, task} on items never seen in train or eval rows.
    - ``corpus.txt``: one text per line for tokenizer training; ``meta.json``: arguments and counts.
    """
    if not 0.0 <= noise <= 1.0:
        raise UserError(f"noise must be in [0, 1], got {noise}")
    if k < 2:
        raise UserError(f"k must be at least 2, got {k}")
    if sft_noise is not None and not 0.0 <= sft_noise <= 1.0:
        raise UserError(f"sft_noise must be in [0, 1], got {sft_noise}")
    if sft_flaws is not None:
        bad = [f for f, w in sft_flaws.items() if f not in FLAW_KINDS or w < 0]
        if bad or not sft_flaws or sum(sft_flaws.values()) <= 0:
            raise UserError(f"sft_flaws must map flaw kinds {FLAW_KINDS} to non-negative weights; got {sft_flaws}")
    s_noise = noise if sft_noise is None else sft_noise
    s_flaws = None if sft_noise is None else dict(sft_flaws or SFT_FLAWS)
    out = Path(out_dir)
    train_items, eval_items, held_items = _split_items(random.Random(f"{seed}-split"), n_heldout, eval_frac=0.1)
    if not disjoint_eval:  # eval rows come from the training items (as a random split would), never as seen rows
        train_items = eval_items = train_items + eval_items
    train = _pair_rows(random.Random(f"{seed}-train"), train_items, n_pairs, noise)
    sft = _pair_rows(random.Random(f"{seed}-sft"), train_items, n_sft, s_noise, s_flaws)
    evl = _unseen_rows(random.Random(f"{seed}-eval"), eval_items, n_eval, noise, seen=train + sft)
    sft_eval = _unseen_rows(random.Random(f"{seed}-sft-eval"), eval_items, max(1, n_eval // 2), s_noise,
                            seen=train + sft, flaws=s_flaws)
    krng = random.Random(f"{seed}-kwise")
    kwise = [_kwise_row(krng, *krng.choice(train_items), k) for _ in range(n_kwise if n_kwise is not None else n_pairs // 2)]
    hrng = random.Random(f"{seed}-heldout")
    heldout = []
    for tname, args in held_items:
        q = _question(hrng, tname, args)
        heldout.append({"prompt": task_prompt(q), "question": q, "answer": " " + _BY_NAME[tname].answer(args), "task": tname})
    corpus = task_corpus(seed, n_corpus)

    paths = {"root": out, "train": out / "data" / "train.json", "eval": out / "data" / "eval.json",
             "sft_root": out / "sft", "sft_train": out / "sft" / "data" / "train.json",
             "sft_eval": out / "sft" / "data" / "eval.json", "kwise": out / "kwise.jsonl",
             "heldout": out / "heldout.jsonl", "corpus": out / "corpus.txt", "meta": out / "meta.json"}
    _write_json(paths["train"], train)
    _write_json(paths["eval"], evl)
    _write_json(paths["sft_train"], sft)
    _write_json(paths["sft_eval"], sft_eval)
    _write_jsonl(paths["kwise"], kwise)
    _write_jsonl(paths["heldout"], heldout)
    paths["corpus"].write_text("\n".join(c.replace("\n", " ") for c in corpus) + "\n", encoding="utf-8")
    noisy = sum(r["chosen_kind"] != "clean" for r in train)
    _write_json(paths["meta"], {
        "task": "chatrlhf built-in", "seed": seed, "noise": noise, "k": k, "disjoint_eval": disjoint_eval,
        "sft_noise": s_noise, "sft_flaws": s_flaws or dict(NOISY_CHOSEN),
        "sft_noisy_chosen_fraction": sum(r["chosen_kind"] != "clean" for r in sft) / max(1, len(sft)),
        "counts": {"train": len(train), "eval": len(evl), "sft_train": len(sft), "sft_eval": len(sft_eval),
                   "kwise": len(kwise), "heldout": len(heldout), "corpus": len(corpus)},
        "items": {"train": len(train_items), "eval": len(eval_items), "heldout": len(held_items)},
        "noisy_chosen_fraction": noisy / max(1, len(train)),
    })
    return paths


def read_heldout(path: str | Path) -> list[dict]:
    """Rows of a heldout.jsonl ({prompt, question, answer, task})."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


__all__ = [
    "PROMPT_PREFIX", "PROMPT_SUFFIX", "TEMPLATES", "WORDS", "FILLERS", "task_prompt", "extract_question",
    "parse_question", "expected_answer", "gold_score", "gold_pass", "gold_win_rate", "gold_summary",
    "classify_answer", "make_answer", "SFT_FLAWS", "task_corpus", "write_task_dataset", "read_heldout", "reward",
    "evaluate",
]
