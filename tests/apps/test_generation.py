"""Prompt building, reply cutting (streamed and whole) and generation helpers."""

import random

import pytest

from chatrlhf.engine.generation import (ReplyCutter, SamplingParams, build_prompt, cut_reply, generate, generate_batch,
                                 messages_to_prompt, stream_generate)


def test_build_prompt_uses_the_training_template_and_keeps_whole_conversation():
    assert build_prompt([], "hi") == " Human: hi Assistant:"
    p = build_prompt([("hi", "hello"), ("how are you?", "fine")], "bye")
    assert p == " Human: hi Assistant: hello Human: how are you? Assistant: fine Human: bye Assistant:"


def test_messages_to_prompt_matches_build_prompt_and_rejects_bad_lists():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"}]
    assert messages_to_prompt(msgs) == "Be brief.\n" + build_prompt([("hi", "hello")], "bye")
    for bad in ([], [{"role": "assistant", "content": "x"}], [{"role": "system", "content": "x"}]):
        with pytest.raises(ValueError):
            messages_to_prompt(bad)


def test_chat_template_is_used_when_the_tokenizer_has_one(apps_model):
    import copy

    _, tok = apps_model
    tok2 = copy.deepcopy(tok)
    tok2.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    assert build_prompt([("a", "b")], "c", tok2) == "<user>a<assistant>b<user>c<assistant>"
    assert build_prompt([("a", "b")], "c", tok) == build_prompt([("a", "b")], "c")  # no template: DS-Chat format


@pytest.mark.parametrize("text,expected", [
    (" Paris is the capital.\n\n Human: and Spain?\n Assistant: Madrid", "Paris is the capital."),
    ("  no marker here  ", "no marker here"),
    ("ends with a partial Hum", "ends with a partial Hum"),
    ("Human: straight away", ""),
    ("a\nHuman:b", "a"),
])
def test_cut_reply_and_streamed_cutting_agree(text, expected):
    assert cut_reply(text) == expected
    rng = random.Random(0)
    for _ in range(50):  # any split into pieces gives the same concatenation
        c, out, i = ReplyCutter(), "", 0
        while i < len(text):
            j = rng.randint(i + 1, len(text))
            out += c.feed(text[i:j])
            i = j
        assert out + c.finish() == expected


def test_streaming_equals_non_streaming_and_batch_equals_single(apps_model):
    model, tok = apps_model
    prompts = [build_prompt([], "hello"), build_prompt([("hello", "hi")], "tell me a story")]
    singles = [generate(model, tok, p, max_new_tokens=20) for p in prompts]
    assert singles[0].text == "hi there, I am a tiny model."  # memorised by the fixture model
    batch = generate_batch(model, tok, prompts, SamplingParams(max_new_tokens=20))
    assert [g.text for g in batch] == [g.text for g in singles]  # left padding does not change greedy answers
    pieces = list(stream_generate(model, tok, prompts[0], max_new_tokens=20))
    assert len(pieces) > 1 and "".join(pieces) == singles[0].text


def test_other_decoding_methods_run_and_sampling_is_seeded(apps_model):
    model, tok = apps_model
    p = build_prompt([], "hello")
    for method in ("beam", "contrastive"):
        g = generate(model, tok, p, max_new_tokens=8, method=method)
        assert isinstance(g.text, str) and 1 <= g.completion_tokens <= 8
    a = generate(model, tok, p, max_new_tokens=8, method="sample", temperature=1.5, seed=3)
    b = generate(model, tok, p, max_new_tokens=8, method="sample", temperature=1.5, seed=3)
    assert a.raw_text == b.raw_text
    with pytest.raises(Exception, match="unknown decoding method"):
        generate(model, tok, p, method="nucleus")
