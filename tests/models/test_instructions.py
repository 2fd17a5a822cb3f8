"""The verifiable-instruction task: strict verifiers, fixes that always comply, prompts, scoring, dataset files."""

import json
import random

import pytest

from chatrlhf.errors import DataError, UserError
from chatrlhf.tasks.instructions import (
    ALL_TYPES,
    CONFLICTS,
    END_PHRASES,
    FIX_ORDER,
    HELDOUT_TYPES,
    INCLUDE_WORDS,
    INSTRUCTIONS,
    SEEN_TYPES,
    START_WORDS,
    TOPICS,
    _apply_fixes,
    _preclean,
    _instructions,
    best_and_worst,
    compatible,
    count_words,
    demonstrations,
    eval_fn,
    good_answer,
    make_compliant,
    make_prompt,
    on_topic,
    passes,
    preference_pairs,
    read_instruction_prompts,
    repetitive,
    reward,
    verify,
    write_instruction_prompts,
)

PHRASE = "Is there anything else I can help with?"
PARA = "Owls are birds that hunt at night. They have large eyes, soft feathers and silent wings."

# type -> (params, passing answers, failing answers); every failing list has the empty and blank answers too
CASES = {
    "lowercase": ({}, ["owls hunt at night.", "  owls, mostly, hunt at night!  \n", "42 owls"],
                  ["Owls hunt at night.", "owls hunt at Night", "123 456", "!!!"]),
    "uppercase": ({}, ["OWLS HUNT AT NIGHT.", "  OWLS, MOSTLY!\n", "42 OWLS"],
                  ["OWLS HUNT AT NIGHt", "Owls", "123", "..."]),
    "max_words": ({"n": 5}, ["Owls hunt at night.", "one two three four five", "  Owls - hunt - well.  ", "x"],
                  ["one two three four five six", "- * -", PARA]),
    "no_commas": ({}, ["Owls hunt at night.", "owls\nhunt", "Owls hunt; they fly."],
                  ["Owls, hunt.", "owls，hunt", "a,b", ",,,"]),
    "end_with_phrase": ({"phrase": PHRASE}, [f"Owls hunt. {PHRASE}", f"{PHRASE}  \n", f"Owls hunt!\n{PHRASE}"],
                        [f"{PHRASE} Owls hunt.", f"Owls hunt. {PHRASE.lower()}", f"Owls hunt. {PHRASE[:-1]}",
                         f"Owls hunt.{PHRASE}x", f"Owls hunt{PHRASE}"]),
    "include_word": ({"word": "remarkable"}, ["Owls are remarkable.", "REMARKABLE owls", "(remarkable)"],
                     ["Owls are unremarkable.", "Owls are remarkably quiet.", "remarkable_owls", "Owls hunt."]),
    "wrap_in_quotes": ({}, ['"Owls hunt at night."', '  "owls"\n', '"Owls say "hoot" at night."'],
                       ['"Owls hunt at night.', 'Owls hunt."', '""', '"   "', '"', "'Owls'", "“Owls”"]),
    "start_with_word": ({"word": "Certainly"}, ["Certainly owls hunt.", '"Certainly, owls hunt."',
                                                "  certainly!", "CERTAINLY owls"],
                        ["Owls certainly hunt.", "Certainlyowls hunt.", "Certainly-owls hunt", "* Certainly"]),
    "end_with_question": ({}, ["Do owls hunt?", "Owls hunt. Why?  ", "owls hunt?\n"],
                          ["Owls hunt.", "Do owls hunt? Yes.", "?", "Owls hunt?!"]),
    "bullet_list": ({"n": 3}, ["* a\n* b\n* c", "Owls:\n* hunt\n* fly\n* sleep\n", "  * one.\n  * two.\n  * three."],
                    ["* a\n* b", "* a\n* b\n* c\n* d", "- a\n- b\n- c", "* a\n* b\n* c\n- d", "*a\n*b\n*c",
                     "* a\n* b\n*  "]),
    "word_twice": ({"word": "simple"}, ["Simple and simple.", "simple, SIMPLE", "It is simple. Very simple."],
                   ["It is simple.", "simplest simpler simple", "Simplesimple"]),
}


def _meta(*instrs, topic="owl"):
    return {"topic": topic, "instructions": [{"type": t, "params": p} for t, p in instrs], "split": "seen"}


# --------------------------------------------------------------------------------------------------- verifiers
@pytest.mark.parametrize("name", ALL_TYPES)
def test_verifier_on_hand_written_answers(name):
    params, good, bad = CASES[name]
    it = INSTRUCTIONS[name]
    assert len(good) >= 3 and len(bad) >= 3
    for a in good:
        assert it.check(a, params), (name, a)
    for a in bad + ["", "   ", "\n\t"]:
        assert not it.check(a, params), (name, a)


@pytest.mark.parametrize("name", ALL_TYPES)
def test_each_fix_alone_makes_its_type_pass(name):
    params, good, bad = CASES[name]
    it = INSTRUCTIONS[name]
    for a in good:
        assert it.fix(a, params) == a  # compliant answers are left alone
    for a in bad + ["", "  ", PARA, "Owls, owls, owls"]:
        fixed = it.fix(a, params)
        assert it.check(fixed, params), (name, a, fixed)


def test_type_registry_and_split():
    assert set(SEEN_TYPES) >= {"lowercase", "uppercase", "max_words", "no_commas", "end_with_phrase", "include_word",
                               "wrap_in_quotes", "start_with_word"}
    assert 2 <= len(HELDOUT_TYPES) <= 3 and not set(SEEN_TYPES) & set(HELDOUT_TYPES)
    assert set(ALL_TYPES) == set(INSTRUCTIONS) == set(FIX_ORDER)
    for it in INSTRUCTIONS.values():
        assert len(it.phrasings) >= 3 and len(set(it.phrasings)) == len(it.phrasings)
    assert not compatible("lowercase", "uppercase") and not compatible("max_words", "max_words")
    assert compatible("max_words", "end_with_phrase")
    assert all(len(p) == 2 for p in CONFLICTS)
    assert len({t.keyword for t in TOPICS}) >= 60
    assert all("," not in ph for ph in END_PHRASES)  # the phrase must be compatible with no_commas


def test_word_counting_ignores_punctuation_tokens():
    assert count_words("  Owls - hunt *  at night!  ") == 4
    assert count_words("") == 0 and count_words("* - !") == 0


# ----------------------------------------------------------------------------------------------------- prompts
def test_make_prompt_text_and_meta():
    rng = random.Random(0)
    for i in range(300):
        n = 1 + i % 2
        text, meta = make_prompt(rng, SEEN_TYPES, n)
        assert json.loads(json.dumps(meta)) == meta
        assert text.startswith(meta["request"] + " ") and meta["split"] == "seen"
        types = [x["type"] for x in meta["instructions"]]
        assert len(types) == n and set(types) <= set(SEEN_TYPES)
        if n == 2:
            assert compatible(*types), types
        for x in meta["instructions"]:
            if x["type"] == "max_words":
                assert 15 <= x["params"]["n"] <= 30
        assert any(t.keyword == meta["topic"] for t in TOPICS)
    _, meta = make_prompt(rng, HELDOUT_TYPES, 2)
    assert meta["split"] == "heldout"
    _, meta = make_prompt(rng, SEEN_TYPES, 1, first="no_commas")
    assert meta["instructions"][0]["type"] == "no_commas"
    with pytest.raises(UserError):
        make_prompt(rng, ["lowercase", "uppercase"], 2)
    with pytest.raises(UserError):
        make_prompt(rng, ["shouting"], 1)
    with pytest.raises(UserError):
        make_prompt(rng, SEEN_TYPES, 3)


# --------------------------------------------------------------------------------------- make_compliant property
_VOCAB = ["owls", "Owls", "hunt", "AT", "night", "Paris", "the", "The", "and", "simple", "remarkable", "Certainly",
          "3", "1,000", "é", "ß", "Ünder", "ª", "ǅ", "🦉", "-", "*", '"', "'", ",", ".", "!", "?", "Is", "there",
          "anything", "else", "I", "can", "help", "with?", "don't", "well-known", "(yes)", "“quoted”", "，"]


def _random_answer(rng: random.Random) -> str:
    while True:
        toks = [rng.choice(_VOCAB) for _ in range(rng.randint(1, 60))]
        seps = [rng.choice([" ", " ", " ", " ", "\n", "  ", ", ", "\n* ", "\t"]) for _ in toks]
        a = "".join(s + t for s, t in zip(seps, toks))
        a = rng.choice(["", "  ", "\n", '"', "* "]) + a + rng.choice(["", " ", "\n", ".", '"', ",", " and"])
        if rng.random() < 0.1:
            a += " " + rng.choice(END_PHRASES) + rng.choice(["", " More text."])
        if a.strip():
            return a


def _random_cases(seed: int, types, n: int):
    rng = random.Random(seed)
    for _ in range(n):
        _, meta = make_prompt(rng, types, rng.choice((1, 2)))
        yield _random_answer(rng), meta


@pytest.mark.parametrize("types", [SEEN_TYPES, HELDOUT_TYPES, ALL_TYPES], ids=["seen", "heldout", "all"])
def test_make_compliant_always_passes(types):
    for a, meta in _random_cases(7, types, 400):
        fixed = make_compliant(a, meta)
        assert passes(fixed, meta), (a, meta, fixed)
        assert make_compliant(fixed, meta) == fixed  # idempotent: compliant answers are left alone


def test_fixes_comply_without_the_safety_net():
    """The fix chain itself (not make_compliant's fallback note) handles ordinary text, with every pair of types."""
    rng = random.Random(3)
    for a, meta in _random_cases(11, SEEN_TYPES, 300):
        if passes(a, meta):
            continue
        instrs = _instructions(meta)
        body = _preclean(a, instrs)
        if any(c.isalpha() for c in body):
            assert passes(_apply_fixes(body, instrs), meta), (a, meta)
    for t1 in ALL_TYPES:  # every compatible pair, on a realistic answer
        for t2 in ALL_TYPES:
            if compatible(t1, t2):
                meta = _meta((t1, INSTRUCTIONS[t1].sample_params(rng)), (t2, INSTRUCTIONS[t2].sample_params(rng)))
                instrs = _instructions(meta)
                assert passes(_apply_fixes(_preclean(PARA, instrs), instrs), meta), (t1, t2)


def test_make_compliant_keeps_answers_readable():
    a = "Owls are birds that hunt at night, and they have large eyes. They fly silently and eat mice and"
    out = make_compliant(a, _meta(("max_words", {"n": 20}), ("end_with_phrase", {"phrase": PHRASE})))
    assert out == f"Owls are birds that hunt at night, and they have large eyes. {PHRASE}"  # whole sentences fit
    out = make_compliant(a, _meta(("max_words", {"n": 15}), ("end_with_phrase", {"phrase": PHRASE})))
    assert out == f"Owls are birds that hunt at night. {PHRASE}"  # 7 words left: cut, ended cleanly
    out = make_compliant(a, _meta(("start_with_word", {"word": "Honestly"}), ("no_commas", {})))
    assert out == "Honestly owls are birds that hunt at night and they have large eyes."
    out = make_compliant(f"Owls hunt. {PHRASE} Also they fly.", _meta(("end_with_phrase", {"phrase": PHRASE})))
    assert out == f"Owls hunt. {PHRASE}"  # said too early: cut there, not appended twice
    out = make_compliant(PARA, _meta(("bullet_list", {"n": 3})))
    assert out == "* Owls are birds that hunt at night.\n* They have large eyes\n* Soft feathers and silent wings."
    assert make_compliant("Owls hunt.", _meta(("lowercase", {}))) == "owls hunt."
    # a chat preamble and a sentence cut off by the sampling limit are dropped (demonstrations stop cleanly)
    sampled = "Sure! Here's a short paragraph about owls:\n\nOwls hunt at night. They eat mice and"
    assert make_compliant(sampled, _meta(("no_commas", {}))) == "Owls hunt at night."
    assert make_compliant("owls hunt. they eat mice and", _meta(("lowercase", {}))) == "owls hunt."
    assert make_compliant("owls hunt. they eat mice and", _meta(("lowercase", {})), tidy=False) == \
        "owls hunt. they eat mice and"  # already compliant: untouched
    assert make_compliant("   ", _meta(("include_word", {"word": "simple"}))) == \
        "Here is a short note about owls. It is truly simple."


# ------------------------------------------------------------------------------------------------------ scoring
def test_verify_passes_and_on_topic():
    meta = _meta(("lowercase", {}), ("include_word", {"word": "simple"}))
    assert verify("owls are simple.", meta) == {"lowercase": True, "include_word": True}
    assert verify("Owls are simple.", meta) == {"lowercase": False, "include_word": True}
    assert passes("owls are simple.", meta) and not passes("", meta)
    assert on_topic("An OWL hunts.", meta) and on_topic("owls' eyes", meta) and on_topic("Owl's eyes", meta)
    assert not on_topic("Bowls of soup.", meta) and not on_topic("owlet", meta) and not on_topic("", meta)
    assert on_topic("Wolves howl.", {"topic": "wolf"}) and on_topic("BLACK  HOLES", {"topic": "black hole"})
    assert on_topic("My garden grows.", {"topic": "gardening"})
    with pytest.raises(DataError):
        verify("x", {"topic": "owl", "instructions": [{"type": "shouting"}]})
    with pytest.raises(DataError):
        verify("x", {"topic": "owl", "instructions": []})


def test_reward_range_and_ordering():
    meta = _meta(("max_words", {"n": 15}), ("include_word", {"word": "simple"}))
    answers = {"both_on": "Owls are simple birds.", "both_off": "Cats are simple.", "one_on": "Owls hunt at night.",
               "one_off": "Cats are nice.", "none_on": PARA,
               "none_off": "x " * 20, "empty": "", "blank": "  \n"}
    r = dict(zip(answers, reward([""] * len(answers), list(answers.values()), [meta] * len(answers))))
    assert all(0.0 <= v <= 1.0 for v in r.values())
    assert r["both_on"] == 1.0 and r["empty"] == 0.0 and r["blank"] == 0.0 and r["none_off"] == 0.0
    assert r["both_on"] > r["both_off"] > r["one_on"] > r["one_off"] > r["none_on"] > r["none_off"]
    for a, meta in _random_cases(5, SEEN_TYPES, 100):  # compliant beats non-compliant, on or off topic
        if not passes(a, meta):
            ra, rf = reward(["", ""], [a, make_compliant(a, meta)], [meta, meta])
            assert rf >= 0.8 > 0.6 >= ra, (a, meta)
    with pytest.raises(UserError):
        reward(["p"], ["a", "b"], [meta])


def test_eval_fn_metrics():
    m1 = _meta(("lowercase", {}))
    m2 = _meta(("max_words", {"n": 15}), ("no_commas", {}))
    out = eval_fn(["p"] * 4, ["owls hunt.", "Owls, hunt.", "owls hunt at night", "cats sleep."], [m1, m2, m1, m1])
    assert {"pass_rate", "on_topic_rate", "pass_on_topic_rate", "repetitive_rate", "mean_words", "pass_rate/lowercase",
            "pass_rate/max_words", "pass_rate/no_commas", "instruction_rate", "reward", "n"} <= set(out)
    assert "pass_rate/uppercase" not in out
    assert out["pass_rate"] == pytest.approx(3 / 4) and out["pass_rate/lowercase"] == 1.0
    assert out["pass_rate/no_commas"] == 0.0 and out["pass_rate/max_words"] == 1.0
    assert out["on_topic_rate"] == 3 / 4 and out["mean_words"] == pytest.approx(10 / 4)
    assert out["pass_on_topic_rate"] == 2 / 4  # the cat answer passes its instruction, about something else
    assert out["instruction_rate"] == pytest.approx(4 / 5) and out["repetitive_rate"] == 0.0
    loop = eval_fn(["p"] * 2, ["owls hunt. " * 5, "owls hunt at night."], [m1, m1])
    assert loop["repetitive_rate"] == 1 / 2 and loop["pass_on_topic_rate"] == 1.0  # a loop is still reported apart
    with pytest.raises(UserError):
        eval_fn([], [], [])


def test_repetitive_answers_are_loops_not_prose():
    assert repetitive("MAGIC MAGIC MAGIC MAGIC MAGIC MAGIC")
    assert repetitive("Owls are owls. Owls are owls! owls ARE owls.")  # case and punctuation ignored
    assert repetitive("It is a wonderful thing. It is a wonderful thing. It is a wonderful thing.")
    assert not repetitive(PARA) and not repetitive("") and not repetitive("Owls hunt.")
    # one repeated phrase in real prose stays under the bar (2 of 17 trigrams repeat)
    assert not repetitive("Owls hunt at night. They have large eyes. Owls hunt at dawn too, and they rest by day.")
    meta = _meta(("lowercase", {}))
    assert good_answer("owls hunt at night.", meta)
    assert not good_answer("owls owls owls owls owls owls", meta)  # passes and on topic, but a loop
    assert not good_answer("cats hunt at night.", meta) and not good_answer("Owls hunt at night.", meta)


def test_best_and_worst():
    meta = _meta(("include_word", {"word": "simple"}))
    cands = ["Owls hunt.", "Owls are simple.", "Cats are simple.", "Owls are simple birds that hunt at night.",
             "Owls hunt mice at night in the dark woods."]
    chosen, rejected = best_and_worst(cands, meta)
    assert chosen in ("Owls are simple.", "Owls are simple birds that hunt at night.")
    assert rejected in ("Owls hunt.", "Owls hunt mice at night in the dark woods.")
    assert reward(["", ""], [chosen, rejected], [meta, meta]) == [1.0, 0.2]
    # the rejected answer is the one closest in length to the chosen one (compliance, not length, differs)
    assert abs(count_words(chosen) - count_words(rejected)) <= 3
    assert best_and_worst(["Owls hunt.", "Owls fly."], meta) is None  # equal reward: no signal
    assert best_and_worst([], meta) is None
    assert best_and_worst(["", "Owls are simple."], meta) == ("Owls are simple.", "")


def test_preference_pairs_are_meaningful():
    meta = _meta(("include_word", {"word": "simple"}))
    good = ["Owls are simple.", "Owls are simple birds that hunt at night."]
    off_topic = "Cats are simple."  # passes the instruction, but about nothing asked for
    fail = ["Owls hunt.", "Owls hunt mice at night in the dark woods."]
    cands = [fail[1], good[0], off_topic, "", good[1], fail[0], good[0]]
    pairs = preference_pairs(cands, meta, natural=3, fixed=5)
    natural = [(c, r) for c, r, k in pairs if k == "natural"]
    fixed = [(c, r) for c, r, k in pairs if k == "fixed"]
    # every pair: chosen passes and is on topic, rejected does not (fails an instruction or is off topic)
    for c, r, _ in pairs:
        assert passes(c, meta) and on_topic(c, meta)
        assert not (passes(r, meta) and on_topic(r, meta)) and r.strip()
    # natural pairs: each good answer against its closest bad answer in length first, then second-closest ones
    assert natural == [(good[0], off_topic), (good[1], fail[1]), (good[0], fail[0])]
    assert len(preference_pairs(cands, meta, natural=99, fixed=0)) == len(good) * 3  # every (good, bad) combination
    # fixed pairs: only for answers failing an instruction (not for the off-topic one, which the fixes leave as is)
    assert sorted(r for _, r in fixed) == sorted(fail)
    assert all(c == make_compliant(r, meta) for c, r in fixed)
    # the caps hold, and no comparison without both sides
    assert len(preference_pairs(cands, meta, natural=1, fixed=0)) == 1
    assert [k for *_, k in preference_pairs(cands, meta, natural=0, fixed=1)] == ["fixed"]
    assert preference_pairs(good, meta, natural=2, fixed=2) == []  # all good: nothing to prefer
    assert preference_pairs([off_topic, ""], meta, natural=2, fixed=2) == []  # nothing good, nothing to fix
    loop = "Owls are simple. Owls are simple. Owls are simple."  # passes, on topic, a loop: never chosen
    assert preference_pairs([loop, good[0]], meta, natural=2, fixed=0) == [(good[0], loop, "natural")]


def test_demonstrations_are_good_answers_and_never_off_topic():
    meta = _meta(("end_with_phrase", {"phrase": PHRASE}))
    ok = f"Owls hunt at night. {PARA} {PHRASE}"
    cands = [PHRASE, "Owls fly silently.", "Cats sleep all day.", ok, "Owls hoot. " * 6 + PHRASE, ok]
    demos, fixed = demonstrations(cands, meta, n=3)
    # the passing sample first; then the on-topic failing one made compliant; the phrase alone (passing, about
    # nothing), the cat answer (off topic) and the loop (passing, on topic) never
    assert demos == [ok, make_compliant("Owls fly silently.", meta)] and fixed == 1
    assert all(good_answer(d, meta) for d in demos)
    assert demonstrations(cands, meta, n=1) == ([ok], 0)
    assert demonstrations([PHRASE, "Cats sleep all day."], meta, n=2) == ([], 0)  # nothing on topic: no demo
    assert demonstrations([], meta, n=2) == ([], 0)


def test_swap_pairs_are_compliant_answers_to_another_topic():
    meta = _meta(("include_word", {"word": "simple"}), ("no_commas", {}))
    good, bad = "Owls are simple birds.", "Owls hunt, mostly at night."
    elsewhere = ["", "Owls are birds.", "Cats sleep, a lot, all day.", "Dogs are loyal and simple."]
    pairs = preference_pairs([good, bad], meta, natural=0, fixed=0, swapped=2, elsewhere=elsewhere)
    assert [k for *_, k in pairs] == ["swap", "swap"]
    for c, r, _ in pairs:
        assert c == good
        assert passes(r, meta) and not on_topic(r, meta)  # satisfies every instruction, about something else
    # the owl answer (on topic once fixed) and the empty one are skipped; the others in order, made compliant
    assert [r for _, r, _ in pairs] == [make_compliant(elsewhere[2], meta), make_compliant(elsewhere[3], meta)]
    assert len(preference_pairs([good, bad], meta, natural=0, fixed=0, swapped=1, elsewhere=elsewhere)) == 1
    assert preference_pairs([bad], meta, natural=0, fixed=0, swapped=2, elsewhere=elsewhere) == []  # no good answer


def test_cross_pairs_are_one_answer_made_to_follow_these_or_other_instructions():
    meta = _meta(("start_with_word", {"word": "Surprisingly"}))
    good, bad = "Surprisingly, owls are quiet hunters.", "Owls are quiet, patient hunters."
    others = [{"instructions": _meta(*i)["instructions"]} for i in (
        [("start_with_word", {"word": "Surprisingly"})],  # the same instruction: nothing made from it fails ours
        [("lowercase", {})], [("no_commas", {}), ("uppercase", {})])]
    pairs = preference_pairs([good, bad], meta, natural=0, fixed=0, crossed=3, others=others)
    # the good answer lowercased or capitalised still starts with "Surprisingly": the failing candidate is used
    fixed = make_compliant(bad, meta)
    assert pairs == [(fixed, "owls are quiet, patient hunters.", "cross"),
                     (fixed, "OWLS ARE QUIET PATIENT HUNTERS.", "cross")]
    for (c, r, _), other in zip(pairs, others[1:]):
        assert passes(c, meta) and on_topic(c, meta)
        assert not passes(r, meta) and on_topic(r, meta) and passes(r, {**meta, **other})  # the wrong instructions
    assert len(preference_pairs([good, bad], meta, natural=0, fixed=0, crossed=1, others=others)) == 1
    # a passing candidate comes first and stays as it is
    lower = _meta(("lowercase", {}))
    assert preference_pairs(["owls are quiet.", "Owls sing."], lower, natural=0, fixed=0, crossed=1,
                            others=others[2:]) == [("owls are quiet.", "OWLS ARE QUIET.", "cross")]
    assert preference_pairs([good], meta, natural=0, fixed=0, crossed=2, others=others[:1]) == []


# ------------------------------------------------------------------------------------------------------ dataset
def test_writer_is_deterministic_and_disjoint(tmp_path):
    kw = dict(seed=3, n_train=300, n_eval=40, n_heldout=30)
    a = write_instruction_prompts(tmp_path / "a", **kw)
    b = write_instruction_prompts(tmp_path / "b", **kw)
    for name in ("train", "eval_seen", "eval_heldout_types", "meta"):
        assert a[name].read_bytes() == b[name].read_bytes(), name
    c = write_instruction_prompts(tmp_path / "c", **{**kw, "seed": 4})
    assert a["train"].read_bytes() != c["train"].read_bytes()

    train, ev, held = (read_instruction_prompts(a[k]) for k in ("train", "eval_seen", "eval_heldout_types"))
    assert (len(train), len(ev), len(held)) == (300, 40, 30)
    assert set(train[0]) == {"prompt", "metadata"}
    for rows in (train, ev, held):
        assert len({r["prompt"] for r in rows}) == len(rows)  # no duplicate prompts within a file
    assert all(t["type"] in SEEN_TYPES for r in train + ev for t in r["metadata"]["instructions"])
    assert all(r["metadata"]["split"] == "seen" for r in train + ev)
    assert all(r["metadata"]["split"] == "heldout" for r in held)
    assert all(t["type"] in HELDOUT_TYPES for r in held for t in r["metadata"]["instructions"])
    train_topics = {r["metadata"]["topic"] for r in train}
    assert not train_topics & {r["metadata"]["topic"] for r in ev + held}
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in ev + held}
    assert not {r["metadata"]["request"] for r in train} & {r["metadata"]["request"] for r in ev + held}
    assert {t["type"] for r in train for t in r["metadata"]["instructions"]} == set(SEEN_TYPES)
    assert sum(len(r["metadata"]["instructions"]) == 2 for r in train) == 90  # two_frac=0.3
    meta = json.loads(a["meta"].read_text())
    assert not set(meta["train_topics"]) & set(meta["eval_topics"])
    with pytest.raises(UserError):
        write_instruction_prompts(tmp_path / "d", n_train=-1)


def test_read_rejects_bad_rows(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "x", "metadata": {"topic": "owl", "instructions": [{"type": "nope"}]}}\n')
    with pytest.raises(DataError, match="row 1"):
        read_instruction_prompts(p)
    p.write_text("not json\n")
    with pytest.raises(DataError, match="row 1"):
        read_instruction_prompts(p)


def test_parameter_vocabularies_fit_their_fixes():
    # every start word / include word is a single word that its own check accepts after the fix
    start, twice = INSTRUCTIONS["start_with_word"], INSTRUCTIONS["word_twice"]
    for w in START_WORDS:
        assert start.check(start.fix(PARA, {"word": w}), {"word": w}) and len(w.split()) == 1
    for w in INCLUDE_WORDS:
        assert twice.check(twice.fix(PARA, {"word": w}), {"word": w}) and len(w.split()) == 1
