"""A verifiable-instruction task in the spirit of IFEval, for the real-model RLHF demo.

The demo takes a small real chat model (SmolLM2-135M-Instruct) and makes it follow formatting instructions it
mostly ignores today. Each prompt is a natural request about a topic plus one or two instructions whose
satisfaction a plain function can decide exactly:

    "Write a short paragraph about owls. Answer in at most 18 words."
    meta = {"topic": "owl", "request": "Write a short paragraph about owls.",
            "instructions": [{"type": "max_words", "params": {"n": 18}}], "split": "seen"}

Pipeline use: (1) SFT on the model's own answers made compliant by ``make_compliant``; (2) a reward model on
pairs of the model's own answers picked by ``best_and_worst``; (3) PPO against that reward model, evaluated with
``eval_fn``. ``reward`` is the gold score with the project's reward-function signature.

Design choices:

- Instruction types are small frozen dataclasses registered in ``INSTRUCTIONS`` by name (like verl's
  registries). Each has several phrasings (so the model cannot key on one string), seeded parameters, a strict
  verifier ``check(answer, params)`` and a ``fix(answer, params)`` that makes any answer compliant for that type
  alone while keeping it fluent-ish. ``make_compliant`` chains the fixes in ``FIX_ORDER`` so that no fix undoes
  an earlier one (e.g. length before the words that other fixes append; case after every fix that adds words;
  quotes last), reserving room under ``max_words`` for the words later fixes add.
- Verifiers are strict and exact, and every one rejects an empty or whitespace-only answer. A *word* is a
  whitespace-separated token holding at least one letter or digit (so "-" or a "*" bullet marker is not a word).
- ``SEEN_TYPES`` appear in training prompts; ``HELDOUT_TYPES`` never do: they measure generalisation.
- Pairs of types that cannot both hold (lowercase + uppercase; an exact mixed-case phrase + a case rule; quotes
  + a required last character; ...) are never combined (``CONFLICTS``).
- Held-out prompts never occur in training: the dataset writer holds out whole topics (stratified by category)
  for both eval files, and checks that no eval topic or prompt text appears in train.
- ``on_topic`` is a cheap proxy: the answer mentions the topic keyword or one of its forms (plural, the person
  or the activity: "garden"/"gardener" for gardening), case-insensitively, at a word start.
"""

from __future__ import annotations

import json
import random
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from chatrlhf.errors import DataError, UserError


# ------------------------------------------------------------------------------------------------------ topics
@dataclass(frozen=True)
class Topic:
    keyword: str  # what meta["topic"] holds; an on-topic answer mentions it (or one of ``forms``)
    phrase: str  # how requests name it ("elephants", "the moon")
    category: str
    plural: bool = False  # "Explain what elephants are." vs "Explain what gravity is."
    forms: tuple[str, ...] = ()  # other spellings that count as on topic (irregular plurals, related nouns)


def _t(keyword: str, phrase: str | None = None, plural: bool = False, *forms: str, cat: str) -> Topic:
    return Topic(keyword, phrase or keyword, cat, plural, tuple(forms))


_ANIMALS = [("elephant", "elephants", True), ("dolphin", "dolphins", True), ("owl", "owls", True),
            ("penguin", "penguins", True), ("wolf", "wolves", True, "wolves"), ("bee", "bees", True),
            ("octopus", "octopuses", True, "octopi"), ("giraffe", "giraffes", True), ("turtle", "turtles", True),
            ("fox", "foxes", True), ("butterfly", "butterflies", True, "butterflies")]
_CITIES = [(c,) for c in ("Paris", "Tokyo", "Rome", "Cairo", "London", "Venice", "Sydney", "Istanbul", "Barcelona",
                          "Toronto")]
_FOODS = [("pizza",), ("chocolate",), ("strawberry", "strawberries", True, "strawberries"), ("bread",), ("sushi",),
          ("cheese",), ("honey",), ("tea",), ("pancake", "pancakes", True), ("soup",)]
_HOBBIES = [("gardening", None, False, "garden", "gardener"), ("knitting", None, False, "knit"),
            ("photography", None, False, "photo", "photograph", "photographer"),
            ("painting", None, False, "paint", "painter"), ("hiking", None, False, "hike", "hiker"),
            ("cooking", None, False, "cook"), ("fishing", None, False, "fish", "fisherman", "fishermen"),
            ("chess",), ("camping", None, False, "camp", "camper"), ("baking", None, False, "bake", "baker")]
_SCIENCE = [("photosynthesis",), ("gravity",), ("magnetism", None, False, "magnet", "magnetic"),
            ("volcano", "volcanoes", True, "volcanoes"), ("rainbow", "rainbows", True),
            ("electricity", None, False, "electric"), ("evaporation", None, False, "evaporate"),
            ("moon", "the moon", False, "lunar"), ("black hole", "black holes", True),
            ("earthquake", "earthquakes", True), ("DNA",)]
_TOOLS = [("hammer", "hammers", True), ("screwdriver", "screwdrivers", True), ("ladder", "ladders", True),
          ("compass", "compasses", True), ("microscope", "microscopes", True), ("telescope", "telescopes", True),
          ("scissors", "scissors", True, "scissor"), ("umbrella", "umbrellas", True),
          ("calculator", "calculators", True), ("bicycle", "bicycles", True, "bike")]
_INSTRUMENTS = [("piano", "the piano", False, "pianist"), ("guitar", "the guitar", False, "guitarist"),
                ("violin", "the violin", False, "violinist"), ("drum", "drums", True, "drummer"),
                ("flute", "the flute", False, "flutist"), ("trumpet", "the trumpet", False, "trumpeter")]
_SPORTS = [("soccer", None, False, "football"), ("basketball",), ("tennis",),
           ("swimming", None, False, "swim", "swimmer"), ("skiing", None, False, "ski", "skier"), ("yoga",),
           ("cycling", None, False, "cyclist", "bike", "bicycle")]
_NATURE = [("rainforest", "rainforests", True), ("desert", "deserts", True), ("ocean", "oceans", True),
           ("mountain", "mountains", True), ("river", "rivers", True), ("waterfall", "waterfalls", True),
           ("autumn",), ("snow",), ("island", "islands", True)]

TOPICS: tuple[Topic, ...] = tuple(
    _t(*spec, cat=cat)
    for cat, specs in (("animal", _ANIMALS), ("city", _CITIES), ("food", _FOODS), ("hobby", _HOBBIES),
                       ("science", _SCIENCE), ("tool", _TOOLS), ("instrument", _INSTRUMENTS), ("sport", _SPORTS),
                       ("nature", _NATURE))
    for spec in specs
)
_TOPIC_BY_KEY = {t.keyword: t for t in TOPICS}
assert len(_TOPIC_BY_KEY) == len(TOPICS), "topic keywords must be unique"
CATEGORIES = tuple(dict.fromkeys(t.category for t in TOPICS))


# ---------------------------------------------------------------------------------------------------- requests
@dataclass(frozen=True)
class RequestShape:
    template: str  # over {x} (the topic phrase) and {be} ("is"/"are")
    categories: frozenset[str] | None = None  # None: fits every topic
    avoid: frozenset[str] = frozenset()  # instruction types that would contradict the request itself


_LIKEABLE = frozenset({"animal", "city", "food", "hobby", "sport", "instrument", "nature"})
_LEARNABLE = frozenset({"hobby", "sport", "instrument", "tool", "science"})
_PROSE = frozenset({"bullet_list"})  # a request for prose sentences contradicts a bullet list

REQUESTS: tuple[RequestShape, ...] = (
    RequestShape("Write a short paragraph about {x}.", avoid=_PROSE),
    RequestShape("Describe {x} in two or three sentences.", avoid=_PROSE),
    RequestShape("Explain what {x} {be}."),
    RequestShape("Tell me something interesting about {x}."),
    RequestShape("Why do people like {x}?", _LIKEABLE),
    RequestShape("Give a brief description of {x}."),
    RequestShape("What should a beginner know about {x}?", _LEARNABLE),
    RequestShape("Write a few sentences about {x}."),
    RequestShape("What makes {x} special?"),
    RequestShape("Share a fun fact about {x}."),
    RequestShape("What is the best thing about {x}?", _LIKEABLE),
    RequestShape("How would you describe {x} to a child?"),
)


def request_text(shape: RequestShape, topic: Topic) -> str:
    return shape.template.format(x=topic.phrase, be="are" if topic.plural else "is")


def _fits(shape: RequestShape, topic: Topic) -> bool:
    return shape.categories is None or topic.category in shape.categories


# ------------------------------------------------------------------------------------------------ text helpers
FALLBACK = "Here is my answer."  # what a stand-alone fix starts from when the answer has no words at all
_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"'”)])\s+")
_SENT_END = tuple('.!?"\'”)')
_TRAILING_JUNK = ",;:-–—，"
_STOP = frozenset("a an and are as at but by for from in is it its of on or so than that the their this to was "
                  "were which while with".split())
_NAMES = frozenset(t.keyword.lower() for t in TOPICS if t.category == "city")
_STAR_BULLET = re.compile(r"^\s*\* ")
_DASH_BULLET = re.compile(r"^\s*- ")
_ANY_BULLET = re.compile(r"^\s*(?:[*\-•+]|\d+[.)])\s+")


def _has_content(text: str) -> bool:
    return any(c.isalnum() for c in text)


def words(text: str) -> list[str]:
    """Whitespace-separated tokens holding at least one letter or digit."""
    return [t for t in text.split() if _has_content(t)]


def count_words(text: str) -> int:
    return len(words(text))


def _strip_punct(token: str) -> str:
    """The token without leading/trailing characters that are not letters or digits ('"Sure,' -> 'Sure')."""
    i, j = 0, len(token)
    while i < j and not token[i].isalnum():
        i += 1
    while j > i and not token[j - 1].isalnum():
        j -= 1
    return token[i:j]


def _word_re(word: str) -> re.Pattern:
    return re.compile(r"(?<!\w)" + re.escape(word) + r"(?!\w)", re.IGNORECASE)


def _sentences(text: str) -> list[str]:
    return [s for s in _SENT_SPLIT.split(text.strip()) if s]


def _end_sentence(text: str) -> str:
    """Text ready for another sentence to follow: trailing ',;:-' dropped, a '.' after a final letter/digit."""
    text = text.rstrip()
    while text and text[-1] in _TRAILING_JUNK:
        text = text[:-1].rstrip()
    return text + "." if text and text[-1].isalnum() else text


def _append(text: str, sentence: str) -> str:
    head = _end_sentence(text)
    return f"{head} {sentence}" if head else sentence


def _truncate(text: str, n: int) -> str:
    """At most n words: whole sentences when the first fits, else the first words, ending cleanly."""
    flat = " ".join(text.split())
    kept: list[str] = []
    for s in _sentences(flat):
        if count_words(" ".join(kept + [s])) > n:
            break
        kept.append(s)
    if kept and count_words(" ".join(kept)) >= 1:
        return " ".join(kept)
    toks, out, seen = flat.split(), [], 0
    for tok in toks:
        if _has_content(tok):
            if seen == n:
                break
            seen += 1
        out.append(tok)
    # no dangling "and"/"the" at the cut (keep at least one word)
    while len(words(" ".join(out))) > 1 and (_strip_punct(out[-1]).lower() in _STOP or not _has_content(out[-1])):
        out.pop()
    return _end_sentence(" ".join(out))


def _decap(text: str) -> str:
    """Lowercase the first letter of a capitalised first word so a prepended word reads on ("Honestly elephants
    are..."), unless it looks like a name: "I", a city topic, all capitals, or capitalised again later."""
    toks = text.split()
    if not toks:
        return text
    w = _strip_punct(toks[0])
    if not w or not w[0].isupper() or w == "I" or w.startswith("I'") or w.lower() in _NAMES \
            or (len(w) > 1 and w.isupper()) or any(_strip_punct(t) == w for t in toks[1:]):
        return text
    i = text.index(w[0])
    return text[:i] + w[0].lower() + text[i + 1:]


def _chunks(items: list[str], n: int) -> list[list[str]]:
    """n contiguous, nearly equal groups (requires len(items) >= n)."""
    q, r = divmod(len(items), n)
    out, i = [], 0
    for k in range(n):
        size = q + (1 if k < r else 0)
        out.append(items[i: i + size])
        i += size
    return out


# -------------------------------------------------------------------------------------------- instruction types
@dataclass(frozen=True)
class InstructionType:
    name: str
    phrasings: tuple[str, ...]  # format strings over the parameter names
    sample_params: Callable[[random.Random], dict]
    check: Callable[[str, dict], bool]  # strict verifier; False for empty/whitespace answers
    fix: Callable[[str, dict], str]  # any answer -> one that passes ``check`` for this type alone
    added_words: Callable[[dict], int] = field(default=lambda p: 0)  # most words ``fix`` can add (max_words room)

    def phrase(self, rng: random.Random, params: dict) -> str:
        return rng.choice(self.phrasings).format(**params)


END_PHRASES = ("Is there anything else I can help with?", "Let me know if you have any other questions.",
               "Thanks for reading.", "I hope this helps!", "That is all I have to say.", "Have a wonderful day!")
INCLUDE_WORDS = ("remarkable", "fascinating", "simple", "unique", "popular", "useful", "important", "curious",
                 "wonderful", "beautiful", "special", "delightful", "clever", "gentle")
START_WORDS = ("Certainly", "Honestly", "Interestingly", "Indeed", "Surprisingly", "Basically", "Naturally",
               "Actually", "Overall", "Simply")
QUESTION = "What do you think?"  # end_with_question's fix appends it


def _is_cap(c: str) -> bool:
    """An uppercase or titlecase letter ('A', 'ǅ')."""
    return c.isupper() or unicodedata.category(c) == "Lt"


def _is_small(c: str) -> bool:
    """A lowercase or titlecase letter (a titlecase letter is half lowercase: 'ǅ')."""
    return c.islower() or unicodedata.category(c) == "Lt"


def _lowercase_check(a: str, p: dict) -> bool:
    return any(c.isalpha() for c in a) and not any(_is_cap(c) for c in a)


def _lowercase_fix(a: str, p: dict) -> str:
    # a few characters stay capitals under lower(): drop them; then make sure a letter is left
    out = "".join(c for c in a.lower() if not _is_cap(c))
    return out if any(c.isalpha() for c in out) else _append(out.strip(), FALLBACK.lower())


def _uppercase_check(a: str, p: dict) -> bool:
    return any(c.isalpha() for c in a) and not any(_is_small(c) for c in a)


def _uppercase_fix(a: str, p: dict) -> str:
    out = "".join(c for c in a.upper() if not _is_small(c))  # e.g. 'ª' has no capital
    return out if any(c.isalpha() for c in out) else _append(out.strip(), FALLBACK.upper())


def _max_words_check(a: str, p: dict) -> bool:
    return 1 <= count_words(a) <= p["n"]


def _max_words_fix(a: str, p: dict) -> str:
    if _max_words_check(a, p):
        return a
    return _truncate(a if _has_content(a) else FALLBACK, p["n"])


def _no_commas_check(a: str, p: dict) -> bool:
    return _has_content(a) and "," not in a and "，" not in a


def _no_commas_fix(a: str, p: dict) -> str:
    if not _has_content(a):
        a = FALLBACK
    a = re.sub(r"[ \t]*[,，][ \t]*", " ", a)  # keeps line breaks (bullets), "big, grey" -> "big grey"
    return "\n".join(re.sub(r" {2,}", " ", line).rstrip() for line in a.split("\n")).strip()


def _end_with_phrase_check(a: str, p: dict) -> bool:
    s, ph = a.strip(), p["phrase"]
    # the phrase must end the answer and start at a word boundary ("xThanks for reading." does not count)
    return s.endswith(ph) and (len(s) == len(ph) or not s[-len(ph) - 1].isalnum())


def _end_with_phrase_fix(a: str, p: dict) -> str:
    return a if _end_with_phrase_check(a, p) else _append(a, p["phrase"])


def _include_word_check(a: str, p: dict) -> bool:
    return _word_re(p["word"]).search(a) is not None


def _include_word_fix(a: str, p: dict) -> str:
    return a if _include_word_check(a, p) else _append(a, f"It is truly {p['word']}.")


def _wrap_check(a: str, p: dict) -> bool:
    s = a.strip()
    return len(s) >= 2 and s[0] == '"' and s[-1] == '"' and _has_content(s[1:-1])


def _wrap_fix(a: str, p: dict) -> str:
    if _wrap_check(a, p):
        return a
    s = a.strip()
    if not _has_content(s):
        s = FALLBACK
    if s.startswith('"') and len(s) > 1:  # an opening quote is already there
        return s + '"'
    if s.endswith('"') and len(s) > 1:
        return '"' + s
    return '"' + s + '"'


def _start_check(a: str, p: dict) -> bool:
    toks = a.split()
    return bool(toks) and _strip_punct(toks[0]).casefold() == p["word"].casefold()


def _start_fix(a: str, p: dict) -> str:
    if _start_check(a, p):
        return a
    s = a.strip()
    return f"{p['word']} {_decap(s)}" if _has_content(s) else f"{p['word']}."


def _question_check(a: str, p: dict) -> bool:
    s = a.strip()
    return s.endswith("?") and _has_content(s)


def _question_fix(a: str, p: dict) -> str:
    return a if _question_check(a, p) else _append(a if _has_content(a) else "", QUESTION)


def _bullet_lines(a: str) -> tuple[int, int]:
    """(star bullets with content, dash bullets)."""
    lines = a.splitlines()
    star = sum(1 for ln in lines if _STAR_BULLET.match(ln) and _has_content(_STAR_BULLET.sub("", ln, count=1)))
    return star, sum(1 for ln in lines if _DASH_BULLET.match(ln))


def _bullets_check(a: str, p: dict) -> bool:
    star, dash = _bullet_lines(a)
    return star == p["n"] and dash == 0  # exactly n "* " items; no second list style sneaking extra items in


def _split_piece(piece: str) -> tuple[str, str]:
    """Split a text in two near its middle, at a clause boundary when there is one (", " then " and "...)."""
    toks = piece.split()
    mid = len(toks) / 2
    cuts = [i for i in range(1, len(toks)) if toks[i - 1].endswith((",", ";", ":"))]
    cuts = cuts or [i for i in range(1, len(toks)) if toks[i].lower() in ("and", "but", "so", "because", "which")]
    cut = min(cuts, key=lambda i: abs(i - mid)) if cuts else len(toks) // 2
    left, right = toks[:cut], toks[cut:]
    if len(right) > 1 and right[0].lower() in ("and", "but", "so"):
        right = right[1:]
    left_s = " ".join(left).rstrip(_TRAILING_JUNK)
    right_s = " ".join(right)
    return left_s, right_s[:1].upper() + right_s[1:]


def _bullets_fix(a: str, p: dict) -> str:
    if _bullets_check(a, p):
        return a
    n = p["n"]
    text = " ".join(" ".join(_ANY_BULLET.sub("", ln, count=1) for ln in a.splitlines()).split())
    pieces = [s for s in _sentences(text) if _has_content(s)] or [FALLBACK]
    while len(pieces) < n:  # too few sentences: split the longest at a clause boundary
        i = max(range(len(pieces)), key=lambda k: count_words(pieces[k]))
        if count_words(pieces[i]) < 2:
            pieces.append("More.")  # fewer words than items (near-empty answers only)
            continue
        left, right = _split_piece(pieces[i])
        pieces[i: i + 1] = [x for x in (left, right) if _has_content(x)] or [pieces[i]]
    return "\n".join("* " + " ".join(g) for g in _chunks(pieces, n))


def _twice_check(a: str, p: dict) -> bool:
    return len(_word_re(p["word"]).findall(a)) >= 2


def _twice_fix(a: str, p: dict) -> str:
    need = 2 - len(_word_re(p["word"]).findall(a))
    for sentence in [f"It is truly {p['word']}.", f"Very {p['word']} indeed."][: max(0, need)]:
        a = _append(a, sentence)
    return a


_TYPES = (
    InstructionType(
        "lowercase",
        ("Your entire response should be in lowercase letters, with no capital letters at all.",
         "Write your whole answer in lowercase only.", "Do not use any capital letters in your answer.",
         "Please answer using only lowercase letters."),
        lambda rng: {}, _lowercase_check, _lowercase_fix),
    InstructionType(
        "uppercase",
        ("Your entire response should be in English capital letters only.",
         "Write your whole answer in uppercase letters.", "Answer in all capital letters.",
         "Use only CAPITAL letters in your response."),
        lambda rng: {}, _uppercase_check, _uppercase_fix),
    InstructionType(
        "max_words",
        ("Answer in at most {n} words.", "Use no more than {n} words.", "Your answer must not exceed {n} words.",
         "Keep your response to {n} words or fewer."),
        lambda rng: {"n": rng.randint(15, 30)}, _max_words_check, _max_words_fix),
    InstructionType(
        "no_commas",
        ("Do not use any commas in your response.", "Avoid commas entirely in your answer.",
         "Your answer must not contain a single comma.", "Write without using commas."),
        lambda rng: {}, _no_commas_check, _no_commas_fix),
    InstructionType(
        "end_with_phrase",
        ('End your response with the exact phrase "{phrase}"', 'Your response must end with "{phrase}"',
         'Finish your answer with the exact words "{phrase}" and nothing after them.',
         'Close your answer with this exact phrase: "{phrase}"'),
        lambda rng: {"phrase": rng.choice(END_PHRASES)}, _end_with_phrase_check, _end_with_phrase_fix,
        lambda p: count_words(p["phrase"])),
    InstructionType(
        "include_word",
        ('Include the word "{word}" in your answer.', 'Make sure to use the word "{word}" somewhere in your response.',
         'Your response must contain the word "{word}".', 'Use the word "{word}" at least once.'),
        lambda rng: {"word": rng.choice(INCLUDE_WORDS)}, _include_word_check, _include_word_fix, lambda p: 4),
    InstructionType(
        "wrap_in_quotes",
        ("Wrap your entire response in double quotation marks.", "Put your whole answer inside double quotes.",
         'Enclose your response in double quotes, like "this".',
         "Your answer must begin and end with a double quotation mark."),
        lambda rng: {}, _wrap_check, _wrap_fix),
    InstructionType(
        "start_with_word",
        ('Start your answer with the word "{word}".', 'Begin your response with "{word}".',
         'The first word of your answer must be "{word}".', 'Your reply should open with the word "{word}".'),
        lambda rng: {"word": rng.choice(START_WORDS)}, _start_check, _start_fix, lambda p: 1),
    # held out: never in training prompts
    InstructionType(
        "end_with_question",
        ("End your response with a question.", "Finish your answer with a question mark.",
         "The last sentence of your answer must be a question."),
        lambda rng: {}, _question_check, _question_fix, lambda p: count_words(QUESTION)),
    InstructionType(
        "bullet_list",
        ('Your answer must contain exactly {n} bullet points. Use markdown bullet points such as "* This is a point."',
         'Answer with exactly {n} bullet points, each on its own line starting with "* ".',
         'Format your response as a list of exactly {n} items, each line beginning with "* ".'),
        lambda rng: {"n": rng.randint(2, 4)}, _bullets_check, _bullets_fix),
    InstructionType(
        "word_twice",
        ('Use the word "{word}" at least twice.',
         'The word "{word}" should appear at least two times in your response.',
         'Mention the word "{word}" two or more times.'),
        lambda rng: {"word": rng.choice(INCLUDE_WORDS)}, _twice_check, _twice_fix, lambda p: 7),
)
INSTRUCTIONS: dict[str, InstructionType] = {t.name: t for t in _TYPES}
SEEN_TYPES: tuple[str, ...] = ("lowercase", "uppercase", "max_words", "no_commas", "end_with_phrase", "include_word",
                               "wrap_in_quotes", "start_with_word")
HELDOUT_TYPES: tuple[str, ...] = ("end_with_question", "bullet_list", "word_twice")
ALL_TYPES = SEEN_TYPES + HELDOUT_TYPES
assert set(ALL_TYPES) == set(INSTRUCTIONS)

# Pairs that cannot both hold (or only absurdly): never drawn together.
CONFLICTS: frozenset[frozenset[str]] = frozenset(frozenset(p) for p in (
    ("lowercase", "uppercase"),
    ("lowercase", "end_with_phrase"), ("uppercase", "end_with_phrase"),  # the exact phrase is mixed case
    ("end_with_phrase", "wrap_in_quotes"), ("end_with_phrase", "end_with_question"),
    ("wrap_in_quotes", "end_with_question"), ("wrap_in_quotes", "bullet_list"),
    ("start_with_word", "bullet_list"),  # the first token would be the "*" marker
))

# make_compliant's order: commas first (removing them can split "a,b" into two words, so before counting);
# length next, with room reserved for words later fixes add; the list rebuilds the text, so before appends;
# appends/prepends; the case after every fix that adds words; quotes last (they wrap everything).
FIX_ORDER: tuple[str, ...] = ("no_commas", "max_words", "bullet_list", "include_word", "word_twice", "start_with_word",
                              "end_with_question", "end_with_phrase", "lowercase", "uppercase", "wrap_in_quotes")
assert set(FIX_ORDER) == set(INSTRUCTIONS)


def compatible(a: str, b: str) -> bool:
    return a != b and frozenset((a, b)) not in CONFLICTS


# ------------------------------------------------------------------------------------------------------ prompts
def _check_types(types: Sequence[str]) -> tuple[str, ...]:
    bad = [t for t in types if t not in INSTRUCTIONS]
    if bad or not types:
        raise UserError(f"unknown or no instruction types {bad or list(types)}; known: {list(ALL_TYPES)}")
    return tuple(dict.fromkeys(types))


def make_prompt(rng: random.Random, types: Sequence[str] = SEEN_TYPES, n_instructions: int = 1, *,
                topics: Sequence[Topic] | None = None, first: str | None = None) -> tuple[str, dict]:
    """-> (request + " " + instruction phrasing(s), meta). ``first`` fixes the first instruction's type (for
    stratified datasets); the second is drawn among types compatible with it. ``topics`` defaults to all."""
    types = _check_types(types)
    if n_instructions not in (1, 2):
        raise UserError(f"n_instructions must be 1 or 2, got {n_instructions}")
    if first is not None and first not in types:
        raise UserError(f"first={first!r} is not among the types {list(types)}")
    chosen = [first or rng.choice(types)]
    if n_instructions == 2:
        partners = [t for t in types if compatible(chosen[0], t)]
        if not partners:
            raise UserError(f"no instruction type in {list(types)} can be combined with {chosen[0]!r}")
        chosen.append(rng.choice(partners))
    pool = list(topics if topics is not None else TOPICS)
    if not pool:
        raise UserError("make_prompt needs at least one topic")
    topic = rng.choice(pool)
    shapes = [s for s in REQUESTS if _fits(s, topic) and not s.avoid & set(chosen)]
    request = request_text(rng.choice(shapes), topic)
    instrs = []
    texts = [request]
    for name in chosen:
        it = INSTRUCTIONS[name]
        params = it.sample_params(rng)
        instrs.append({"type": name, "params": params})
        texts.append(it.phrase(rng, params))
    split = "heldout" if any(t in HELDOUT_TYPES for t in chosen) else "seen"
    meta = {"topic": topic.keyword, "request": request, "instructions": instrs, "split": split}
    return " ".join(texts), meta


# ------------------------------------------------------------------------------------------------------ scoring
def _instructions(meta: dict) -> list[tuple[InstructionType, dict]]:
    try:
        rows = meta["instructions"]
        out = [(INSTRUCTIONS[r["type"]], dict(r.get("params") or {})) for r in rows]
    except (KeyError, TypeError) as e:
        raise DataError(f"bad instruction metadata ({e!r}): {meta!r}", field="metadata") from None
    if not out:
        raise DataError(f"metadata lists no instructions: {meta!r}", field="metadata")
    return out


def verify(answer: str, meta: dict) -> dict[str, bool]:
    """Each instruction's verdict, by type."""
    return {it.name: bool(it.check(answer, params)) for it, params in _instructions(meta)}


def passes(answer: str, meta: dict) -> bool:
    """Every instruction satisfied."""
    return all(verify(answer, meta).values())


def _topic_forms(keyword: str) -> tuple[str, ...]:
    t = _TOPIC_BY_KEY.get(keyword)
    return (keyword,) + (t.forms if t else ())


def on_topic(answer: str, meta: dict) -> bool:
    """The answer mentions the topic: its keyword or a listed form, at a word start, optionally with -s/-es."""
    forms = "|".join(r"\s+".join(map(re.escape, f.split())) for f in _topic_forms(str(meta.get("topic", ""))) if f)
    return bool(forms) and re.search(rf"(?<!\w)(?:{forms})(?:s|es)?(?!\w)", answer, re.IGNORECASE) is not None


# reward = (1 - ON_TOPIC_WEIGHT) * fraction of instructions satisfied + ON_TOPIC_WEIGHT * on_topic; 0 when empty.
# The on-topic share keeps the policy from satisfying instructions with an answer about nothing (e.g. just the
# end phrase); it is small, so any extra instruction satisfied outweighs it with 1 or 2 instructions.
ON_TOPIC_WEIGHT = 0.2


def _score(answer: str, meta: dict) -> tuple[float, int, bool]:
    if not answer.strip():
        return 0.0, 0, False
    v = verify(answer, meta)
    ok, topical = sum(v.values()), on_topic(answer, meta)
    return (1 - ON_TOPIC_WEIGHT) * ok / len(v) + ON_TOPIC_WEIGHT * topical, ok, topical


# An answer whose word 3-grams repeat this much is a loop ("MAGIC MAGIC MAGIC ...", "A is A. A is A."), not prose.
MAX_REPEATED_SHARE = 0.3


def repetitive(answer: str) -> bool:
    """Over MAX_REPEATED_SHARE of the answer's word 3-grams (case and punctuation ignored) repeat an earlier one."""
    w = [_strip_punct(t).lower() for t in words(answer)]
    grams = [tuple(w[i:i + 3]) for i in range(len(w) - 2)]
    return bool(grams) and 1 - len(set(grams)) / len(grams) > MAX_REPEATED_SHARE


def _check_lengths(name: str, prompts: Sequence, answers: Sequence, metas: Sequence) -> None:
    if not len(prompts) == len(answers) == len(metas):
        raise UserError(f"{name} needs equally long lists (got {len(prompts)} prompts, {len(answers)} answers, "
                        f"{len(metas)} metas)")


def reward(prompts: Sequence[str], answers: Sequence[str], metas: Sequence[dict]) -> list[float]:
    """Gold reward per row in [0, 1]: 0.8 * (fraction of the row's instructions satisfied) + 0.2 * on_topic;
    exactly 0 for an empty/whitespace answer. Prompts are not needed (meta carries everything); they are taken
    to match the project's reward-function signature."""
    _check_lengths("reward", prompts, answers, metas)
    return [round(_score(a, m)[0], 6) for a, m in zip(answers, metas)]


def eval_fn(prompts: Sequence[str], answers: Sequence[str], metas: Sequence[dict]) -> dict[str, float]:
    """Metrics: pass_rate (all instructions held), pass_rate/<type> (over rows having that type),
    instruction_rate (over single instructions), on_topic_rate, pass_on_topic_rate (all instructions held and on
    topic: pass_rate alone counts "Honestly." as a pass of "start with 'Honestly'"), repetitive_rate (answers that
    loop, ``repetitive``), mean_words, reward (mean), n."""
    _check_lengths("eval_fn", prompts, answers, metas)
    if not answers:
        raise UserError("eval_fn needs at least one row")
    n = len(answers)
    by_type: dict[str, list[bool]] = {}
    all_ok, topical, both, loops, n_words, single = 0, 0, 0, 0, 0, []
    for a, m in zip(answers, metas):
        v, topic = verify(a, m), on_topic(a, m)
        all_ok += all(v.values())
        topical += topic
        both += all(v.values()) and topic
        loops += repetitive(a)
        n_words += count_words(a)
        single += list(v.values())
        for t, ok in v.items():
            by_type.setdefault(t, []).append(ok)
    out = {"n": float(n), "pass_rate": all_ok / n, "instruction_rate": sum(single) / len(single),
           "on_topic_rate": topical / n, "pass_on_topic_rate": both / n, "repetitive_rate": loops / n,
           "mean_words": n_words / n,
           "reward": sum(reward(prompts, answers, metas)) / n}
    for t in sorted(by_type):
        out[f"pass_rate/{t}"] = sum(by_type[t]) / len(by_type[t])
    return out


# ---------------------------------------------------------------------------------------- training-data helpers
def good_answer(answer: str, meta: dict) -> bool:
    """What a demonstration or a chosen answer must be: every instruction held, on topic, not a loop."""
    return passes(answer, meta) and on_topic(answer, meta) and not repetitive(answer)


def demonstrations(candidates: Sequence[str], meta: dict, n: int) -> tuple[list[str], int]:
    """Up to ``n`` distinct SFT demonstrations from one prompt's sampled answers, and how many of them were made
    compliant: the ``good_answer`` samples first (best first, as ``best_and_worst`` ranks them), then on-topic samples
    made compliant by ``make_compliant`` (when the result is good). An off-topic sample is never a demonstration,
    even one that passes ("I hope this helps!" for "end with 'I hope this helps!'"): SFT would teach the policy
    to drop the topic. A prompt whose samples are all off topic gets none."""
    picked = best_and_worst(candidates, meta)
    ranked = list(dict.fromkeys(([picked[0]] if picked else []) + list(candidates)))  # each sample fixed once
    ready = [c for c in ranked if good_answer(c, meta)]
    made = [make_compliant(c, meta) for c in ranked if on_topic(c, meta) and not passes(c, meta)]
    made = [m for m in made if m.strip() and good_answer(m, meta) and m not in ready]
    out = list(dict.fromkeys(ready + made))[:n]
    return out, sum(d not in ready for d in out)


def best_and_worst(candidates: Sequence[str], meta: dict) -> tuple[str, str] | None:
    """(chosen, rejected) among the model's own samples, by reward; None when all rewards are equal (no signal).

    Ties at the top go to more verifiers passed, then on topic, then the length closest to the candidates' median
    (a typical answer, not a degenerate one). The rejected answer is the lowest reward, ties broken the opposite
    way on verifiers/on-topic and then by length closest to the chosen one, so that the pair differs in
    compliance rather than in length (a reward model should not learn "shorter is better")."""
    if not candidates:
        return None
    scored = [(_score(c, meta), count_words(c), c) for c in candidates]
    rewards = [s[0][0] for s in scored]
    if max(rewards) - min(rewards) < 1e-9:
        return None
    lengths = sorted(s[1] for s in scored)
    median = lengths[len(lengths) // 2]
    best = max(scored, key=lambda s: (s[0][0], s[0][1], s[0][2], -abs(s[1] - median)))
    low = min(rewards)
    worst = min((s for s in scored if s[0][0] == low), key=lambda s: (s[0][1], s[0][2], abs(s[1] - best[1])))
    return best[2], worst[2]


def preference_pairs(candidates: Sequence[str], meta: dict, *, natural: int = 1, fixed: int = 1,
                     swapped: int = 0, elsewhere: Sequence[str] = (), crossed: int = 0,
                     others: Sequence[dict] = ()) -> list[tuple[str, str, str]]:
    """(chosen, rejected, kind) comparisons a programmatic labeller draws from one prompt's candidate answers,
    each one meaningful: the chosen answer is a ``good_answer`` (every instruction, on topic, no loop), the
    rejected one is not.

    - kind "natural" (at most ``natural``): a good candidate over a bad one (failing an instruction, off topic or
      repetitive);
      of all (good, bad) combinations, those closest in word count first (so that a pair differs in compliance
      rather than in length), each good answer's closest bad answer before any second pairing of it;
    - kind "fixed" (at most ``fixed``): ``make_compliant(c)`` over a candidate ``c`` failing an instruction (the two
      differ only where the fixes changed ``c``), when the fixed answer is on topic;
    - kind "swap" (at most ``swapped``): the first good candidate over an answer to another topic (from
      ``elsewhere``, in order) made compliant by ``make_compliant``: it satisfies every instruction and is off topic.
      These teach a reward model that the topic matters (without them, one trained on natural and fixed pairs
      ordered pairs whose rejected answer is off topic no better than chance: 5 of 12 held-out ones);
    - kind "cross" (at most ``crossed``): a candidate made compliant with these instructions over the same candidate
      made compliant with another prompt's instead (``others``: their metadata, in order; passing candidates
      first, which stay as they are): the same words, on topic, following instructions, but the wrong ones. These
      teach a reward model to read the instruction: without them, PPO against one trained on the other kinds
      raised its score by writing every answer in lowercase without commas (at actor lr 1e-4 the dev pass rate
      fell from 62.5% to 40.6% in 10 steps).

    Empty answers and duplicates are ignored; no pairs without both a good and a bad answer (or a fixable one)."""
    cands = [c for c in dict.fromkeys(candidates) if c.strip()]
    good = [c for c in cands if good_answer(c, meta)]
    bad = [c for c in cands if c not in good]
    n = {c: count_words(c) for c in cands}
    ranked = [sorted(bad, key=lambda b: abs(n[b] - n[g])) for g in good]  # per good answer, closest bad first
    combos = sorted(((rank, abs(n[b] - n[g]), i, b) for i, g in enumerate(good) for rank, b in enumerate(ranked[i])),
                    key=lambda x: x[:3])
    out: list[tuple[str, str, str]] = [(good[i], b, "natural") for _, _, i, b in combos[:natural]]
    n_fixed = 0
    for b in bad:
        if n_fixed >= fixed:
            break
        if passes(b, meta):  # passing but off topic: the fixes would not change it
            continue
        fx = make_compliant(b, meta)
        if fx.strip() != b.strip() and good_answer(fx, meta):
            out.append((fx, b, "fixed"))
            n_fixed += 1
    n_swapped = 0
    for other in elsewhere if good else ():
        if n_swapped >= swapped:
            break
        sw = make_compliant(other, meta) if other.strip() else ""
        if sw.strip() and passes(sw, meta) and not on_topic(sw, meta):
            out.append((good[0], sw, "swap"))
            n_swapped += 1
    n_crossed, made = 0, {}  # made: each candidate made compliant with these instructions, once
    for other in others:
        if n_crossed >= crossed:
            break
        cross = {**meta, "instructions": other["instructions"]}
        for base in good + bad:
            if base not in made:
                made[base] = make_compliant(base, meta)
            ch, cr = made[base], make_compliant(base, cross)
            if (good_answer(ch, meta) and cr.strip() and passes(cr, cross)
                    and not passes(cr, meta) and on_topic(cr, meta)):
                out.append((ch, cr, "cross"))
                n_crossed += 1
                break
    return out


def _topic_sentence(meta: dict) -> str:
    t = _TOPIC_BY_KEY.get(str(meta.get("topic", "")))
    return f"Here is a short note about {t.phrase if t else meta.get('topic') or 'this'}."


_PREAMBLE = re.compile(r"(?:(?:sure|certainly|of course|okay|ok|absolutely|great)[!.,]?\s*)?"
                       r"(?:here(?:'s|’s| is| are)|below is)\b.*:", re.IGNORECASE)


def _tidy(answer: str) -> str:
    """A chat model's answer without its "Sure! Here's a paragraph about X:" line and without a last sentence
    cut off by the sampling length limit (when a complete sentence comes before it)."""
    s = answer.strip()
    first, _, rest = s.partition("\n")
    if _PREAMBLE.fullmatch(first.strip()) and _has_content(rest):
        s = rest.strip()
    head, sep, last = s.rpartition("\n")
    if last.rstrip().endswith(_SENT_END) or _ANY_BULLET.match(last):
        return s
    sents = _sentences(last)
    if len(sents) > 1:
        return (head + sep + last[: last.rfind(sents[-1])]).rstrip()
    if head.strip() and head.rstrip().endswith(_SENT_END):  # the whole last line is the unfinished sentence
        return head.rstrip()
    return s


def _preclean(answer: str, instrs: list[tuple[InstructionType, dict]]) -> str:
    """Undo what would make fixes read badly: a preamble and a cut-off last sentence (``_tidy``), an end phrase
    said too early (it is re-appended once at the end), a messy list (rebuilt), outer quotes (re-added)."""
    s = _tidy(answer)
    names = {it.name for it, _ in instrs}
    for it, params in instrs:
        if it.name == "end_with_phrase" and params["phrase"] in s:
            s = s[: s.rfind(params["phrase"])].rstrip()
    if "uppercase" in names:  # letters with no capital form ('ª') would vanish in the case fix, leaving gaps
        s = "".join(c for c in s if not any(_is_small(x) for x in c.upper()))
    if "lowercase" in names:
        s = "".join(c for c in s if not any(_is_cap(x) for x in c.lower()))
    if "bullet_list" in names and not all(_STAR_BULLET.match(ln) and _has_content(ln) for ln in s.splitlines()
                                          if ln.strip()):
        # not a clean "* " list: flatten it, so the list is rebuilt and later appends land on a real item
        s = " ".join(_ANY_BULLET.sub("", ln, count=1) for ln in s.splitlines())
    if "wrap_in_quotes" in names and len(s) >= 2 and s[0] == '"' and s[-1] == '"':
        s = s[1:-1].strip()
    return s


def _apply_fixes(text: str, instrs: list[tuple[InstructionType, dict]]) -> str:
    for name in FIX_ORDER:
        for it, params in instrs:
            if it.name != name:
                continue
            if name == "max_words":  # leave room for the words the later fixes may add
                room = sum(o.added_words(p) for o, p in instrs if FIX_ORDER.index(o.name) > FIX_ORDER.index(name))
                params = {**params, "n": max(1, params["n"] - room)}
            text = it.fix(text, params)
    return text


def _compliant_once(answer: str, meta: dict, instrs: list[tuple[InstructionType, dict]], tidy: bool) -> str:
    if tidy:
        tidied = _tidy(answer)
        if passes(tidied, meta):
            return tidied
    elif passes(answer, meta):
        return answer
    body = _preclean(answer, instrs)
    if not any(c.isalpha() for c in body):
        body = _topic_sentence(meta)
    out = _apply_fixes(body, instrs).strip()  # every verifier ignores outer whitespace
    if not passes(out, meta):  # safety net for odd text (exotic Unicode...): the same fixes on a clean note
        out = _apply_fixes(_topic_sentence(meta), instrs).strip()
        if not passes(out, meta):
            raise UserError(f"cannot satisfy instructions {[it.name for it, _ in instrs]} together: {meta!r}")
    return out


def make_compliant(answer: str, meta: dict, *, tidy: bool = True) -> str:
    """The answer, changed as little as the fixes allow so that ``passes(result, meta)``: an SFT demonstration
    built from the model's own sample. With ``tidy`` a "Here is ...:" preamble and a cut-off last sentence go
    first (demonstrations should stop cleanly); an answer that (then) passes is returned as is. An answer with
    no letters at all becomes a one-line note about the topic first. Guaranteed for every meta ``make_prompt``
    can produce (tested over random answers); idempotent in practice (a fix can expose a new cut-off sentence,
    e.g. "why?, so" -> "why? so", so the pass is repeated until nothing changes)."""
    instrs = _instructions(meta)
    out = _compliant_once(answer, meta, instrs, tidy)
    for _ in range(4):
        again = _compliant_once(out, meta, instrs, tidy)
        if again == out:
            break
        out = again
    return out


# ------------------------------------------------------------------------------------------------------ dataset
def split_topics(rng: random.Random, eval_frac: float = 0.25) -> tuple[list[Topic], list[Topic]]:
    """Disjoint (train, eval) topics, stratified by category (at least one eval topic per category)."""
    train, evl = [], []
    for cat in CATEGORIES:
        ts = [t for t in TOPICS if t.category == cat]
        rng.shuffle(ts)
        k = max(1, round(len(ts) * eval_frac))
        evl += ts[:k]
        train += ts[k:]
    return train, evl


def _prompt_rows(rng: random.Random, types: Sequence[str], topics: Sequence[Topic], n: int,
                 two_frac: float) -> list[dict]:
    """n rows with distinct prompts; first instruction types balanced; round(two_frac * n) rows have two."""
    n_two = round(two_frac * n)
    twos = [True] * n_two + [False] * (n - n_two)
    rng.shuffle(twos)
    firsts = [types[i % len(types)] for i in range(n)]
    rng.shuffle(firsts)
    rows, seen = [], set()
    for first, two in zip(firsts, twos):
        for _ in range(200):
            text, meta = make_prompt(rng, types, 2 if two else 1, topics=topics, first=first)
            if text not in seen:
                break
        else:
            raise UserError(f"cannot make {n} distinct prompts from {len(topics)} topics; ask for fewer rows")
        seen.add(text)
        rows.append({"prompt": text, "metadata": meta})
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def write_instruction_prompts(out_dir: str | Path, seed: int = 1234, n_train: int = 1000, n_eval: int = 64,
                              n_heldout: int = 64, *, two_frac: float = 0.3,
                              eval_topic_frac: float = 0.25) -> dict[str, Path]:
    """Write prompt files (rows {"prompt", "metadata"}; answers come from the model later) under ``out_dir``:

    - ``train.jsonl``: seen types, on training topics;
    - ``eval_seen.jsonl``: seen types, on held-out topics (so no eval prompt occurs in training);
    - ``eval_heldout_types.jsonl``: held-out types only, on held-out topics;
    - ``meta.json``: seed, counts, the topic split and the type lists.

    round(two_frac * n) rows of each file carry two (compatible) instructions. Deterministic for a seed."""
    for name, v in (("n_train", n_train), ("n_eval", n_eval), ("n_heldout", n_heldout)):
        if v < 0:
            raise UserError(f"{name} must be >= 0, got {v}")
    if not 0.0 <= two_frac <= 1.0 or not 0.0 < eval_topic_frac < 1.0:
        raise UserError(f"two_frac must be in [0, 1] and eval_topic_frac in (0, 1); got {two_frac}, {eval_topic_frac}")
    train_topics, eval_topics = split_topics(random.Random(f"{seed}-instr-split"), eval_topic_frac)
    train = _prompt_rows(random.Random(f"{seed}-instr-train"), SEEN_TYPES, train_topics, n_train, two_frac)
    eval_seen = _prompt_rows(random.Random(f"{seed}-instr-eval"), SEEN_TYPES, eval_topics, n_eval, two_frac)
    heldout = _prompt_rows(random.Random(f"{seed}-instr-heldout"), HELDOUT_TYPES, eval_topics, n_heldout, two_frac)

    # held-out prompts never occur in training: neither their topic nor their text
    train_keys = {r["metadata"]["topic"] for r in train}
    train_texts = {r["prompt"] for r in train}
    for r in eval_seen + heldout:
        if r["metadata"]["topic"] in train_keys or r["prompt"] in train_texts:
            raise RuntimeError(f"eval prompt leaked into training: {r['prompt']!r}")
    if any(t["type"] in HELDOUT_TYPES for r in train for t in r["metadata"]["instructions"]):
        raise RuntimeError("a held-out instruction type leaked into training")

    out = Path(out_dir)
    paths = {"train": out / "train.jsonl", "eval_seen": out / "eval_seen.jsonl",
             "eval_heldout_types": out / "eval_heldout_types.jsonl", "meta": out / "meta.json"}
    _write_jsonl(paths["train"], train)
    _write_jsonl(paths["eval_seen"], eval_seen)
    _write_jsonl(paths["eval_heldout_types"], heldout)
    paths["meta"].write_text(json.dumps({
        "task": "chatrlhf instructions", "seed": seed, "two_frac": two_frac,
        "counts": {"train": len(train), "eval_seen": len(eval_seen), "eval_heldout_types": len(heldout)},
        "train_topics": [t.keyword for t in train_topics], "eval_topics": [t.keyword for t in eval_topics],
        "seen_types": list(SEEN_TYPES), "heldout_types": list(HELDOUT_TYPES),
    }, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return paths


def read_instruction_prompts(path: str | Path) -> list[dict]:
    """Rows of a prompts file written above; DataError naming the row for a malformed one."""
    rows = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"not JSON ({e.msg})", file=str(path), row=i) from None
        if not (isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("metadata"), dict)):
            raise DataError("expected {\"prompt\": str, \"metadata\": {...}}", file=str(path), row=i)
        try:
            _instructions(row["metadata"])
        except DataError as e:
            raise DataError(str(e), file=str(path), row=i, field="metadata") from None
        rows.append(row)
    return rows


__all__ = [
    "Topic", "TOPICS", "CATEGORIES", "RequestShape", "REQUESTS", "InstructionType", "INSTRUCTIONS", "SEEN_TYPES",
    "HELDOUT_TYPES", "ALL_TYPES", "CONFLICTS", "FIX_ORDER", "END_PHRASES", "INCLUDE_WORDS", "START_WORDS",
    "ON_TOPIC_WEIGHT", "compatible", "count_words", "words", "request_text", "make_prompt", "verify", "passes",
    "on_topic", "reward", "eval_fn", "best_and_worst", "preference_pairs", "make_compliant", "split_topics",
    "write_instruction_prompts", "read_instruction_prompts",
]
