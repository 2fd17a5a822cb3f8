"""chat, serve and eval render conversations through the ChatFormat a checkpoint was trained with.

A tiny OPT whose tokenizer has a ChatML-like chat template with a default system prompt (``<|im_start|>`` and
``<|im_end|>`` special tokens, eos ``<|im_end|>``) and a post-processor that adds a BOS, so tokenizing the rendered
prompt with and without automatic special tokens gives different ids: the apps must feed exactly
``tokenizer(fmt.prompt(messages), add_special_tokens=False)``, the ids training used. The same weights saved with a
``dschat`` record must render DeepSpeed-Chat text although the tokenizer has a template."""

from __future__ import annotations

import io
import json
import logging
import shutil
import sys

import pytest

from chatrlhf.cli import main as cli
from test_serve import KEY, make_app, running_server

CHATML = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are helpful.<|im_end|>\n{% endif %}"
          "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
REPLIES = {"hello": "hi there, I am a tiny model.", "tell me a story": "once upon a time a fox met a frog."}
HELLO = [{"role": "user", "content": "hello"}]


def _write_record(d, record: dict | None) -> None:
    f = d / "chatrlhf_config.json"
    if record is None:
        f.unlink(missing_ok=True)
    else:
        f.write_text(json.dumps({"step": "sft", "chat_format": record}), encoding="utf-8")


@pytest.fixture(scope="module")
def chat_dirs(apps_model_dir, tmp_path_factory):
    """{"chat": dir recorded chat, "dschat": same weights recorded dschat, "none": no record}."""
    import torch
    from tokenizers import processors
    from transformers import AutoTokenizer, GenerationConfig, OPTConfig, OPTForCausalLM

    from chatrlhf.data.phases import Encoder
    from chatrlhf.data.template import ChatFormat, format_prompt

    tok = AutoTokenizer.from_pretrained(apps_model_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token = "<|im_end|>"
    bos = tok.convert_tokens_to_ids("</s>")
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="</s> $A", pair="</s> $A $B",
                                                                  special_tokens=[("</s>", bos)])
    tok.chat_template = CHATML
    assert tok("hi")["input_ids"][0] == bos and tok("hi", add_special_tokens=False)["input_ids"][0] != bos
    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                    max_position_embeddings=128, word_embed_proj_dim=32, pad_token_id=tok.pad_token_id,
                    bos_token_id=bos, eos_token_id=tok.eos_token_id, dropout=0.0, attention_dropout=0.0)
    model = OPTForCausalLM(cfg)
    # memorise the replies as the chat format renders them (prompt ids without special tokens, answer up to EOS)
    fmt = ChatFormat("chat", CHATML)
    rows = Encoder(tok, fmt).answer_ids([format_prompt(q) for q in REPLIES], [" " + a for a in REPLIES.values()])
    width = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x, _ in rows])
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in rows])
    labels = ids.masked_fill(mask == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    root = tmp_path_factory.mktemp("chatml")
    dirs = {}
    for name, record in (("chat", fmt.record()), ("dschat", {"name": "dschat"}), ("none", None)):
        d = root / name
        model.save_pretrained(d)
        tok.save_pretrained(d)
        GenerationConfig(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         bos_token_id=bos).save_pretrained(d)
        _write_record(d, record)
        dirs[name] = d
    return dirs


@pytest.fixture(scope="module")
def chat_model(chat_dirs):
    from chatrlhf.engine.generation import load_for_inference

    return load_for_inference(chat_dirs["chat"])


@pytest.fixture
def fed_ids(monkeypatch):
    """The prompt ids every generation call feeds the model (padding removed), in call order."""
    from chatrlhf.engine import generation

    seen: list[list[int]] = []
    real = generation._encode

    def spy(tokenizer, prompts, device, fmt=None):
        enc = real(tokenizer, prompts, device, fmt)
        for ids, mask in zip(enc["input_ids"].tolist(), enc["attention_mask"].tolist()):
            seen.append([t for t, m in zip(ids, mask) if m])
        return enc

    monkeypatch.setattr(generation, "_encode", spy)
    return seen


def _no_special(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------------------- format_for_checkpoint
def test_format_for_checkpoint_follows_the_record_and_says_so(chat_dirs, chat_model, capsys):
    from chatrlhf.engine.generation import format_for_checkpoint
    from chatrlhf.data.template import DSCHAT

    _, tok = chat_model
    fmt = format_for_checkpoint(chat_dirs["chat"], tok)
    assert fmt.name == "chat" and fmt.source == CHATML and fmt.stop_markers == () and not fmt.add_special_tokens
    assert capsys.readouterr().err.strip().splitlines()[-1] == "template: chat (from checkpoint record)"
    # trained on DeepSpeed-Chat text: renders that text although the tokenizer has a template
    assert format_for_checkpoint(chat_dirs["dschat"], tok) == DSCHAT
    assert "template: dschat (from checkpoint record)" in capsys.readouterr().err
    # no record: what training's --template auto picks (the tokenizer has a template)
    assert format_for_checkpoint(chat_dirs["none"], tok).name == "chat"
    assert "template: chat (auto: the tokenizer has a chat template)" in capsys.readouterr().err
    assert format_for_checkpoint(chat_dirs["chat"], tok, "dschat", announce=False) == DSCHAT
    assert capsys.readouterr().err == ""


def test_template_flag_overrides_the_record_with_a_warning(chat_dirs, chat_model, caplog, capsys):
    from chatrlhf.engine.generation import format_for_checkpoint

    _, tok = chat_model
    with caplog.at_level(logging.WARNING, logger="chatrlhf.engine.generation"):
        assert format_for_checkpoint(chat_dirs["dschat"], tok, "chat").name == "chat"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "--template chat overrides the checkpoint's record" in warnings[0]
    assert "\n" not in warnings[0] and "dschat format" in warnings[0]
    assert "template: chat (--template)" in capsys.readouterr().err
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="chatrlhf.engine.generation"):
        format_for_checkpoint(chat_dirs["chat"], tok, "chat")  # agrees with the record: no warning
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_a_changed_template_is_warned_about_and_a_lost_one_refused(chat_dirs, chat_model, tmp_path, caplog):
    import copy

    from chatrlhf.errors import UserError
    from chatrlhf.engine.generation import format_for_checkpoint

    _, tok = chat_model
    d = tmp_path / "ckpt"
    shutil.copytree(chat_dirs["chat"], d)
    _write_record(d, {"name": "chat", "sha256": "0123456789abcdef"})
    with caplog.at_level(logging.WARNING, logger="chatrlhf.engine.generation"):
        assert format_for_checkpoint(d, tok, announce=False).name == "chat"
    assert any("0123456789abcdef" in r.getMessage() and "rendering with the current one" in r.getMessage()
               for r in caplog.records)
    bare = copy.deepcopy(tok)
    bare.chat_template = None
    with pytest.raises(UserError, match="trained with its tokenizer's chat template"):
        format_for_checkpoint(chat_dirs["chat"], bare, announce=False)
    assert format_for_checkpoint(chat_dirs["chat"], bare, "dschat", announce=False).name == "dschat"
    assert format_for_checkpoint(chat_dirs["none"], bare, announce=False).name == "dschat"  # auto, no template


def test_prompts_render_through_the_format(chat_model):
    from chatrlhf.engine.generation import build_prompt, messages_to_prompt, prompt_token_ids
    from chatrlhf.data.template import DSCHAT, ChatFormat

    _, tok = chat_model
    fmt = ChatFormat("chat", CHATML)
    msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"},
            {"role": "user", "content": "tell me a story"}]
    want = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert build_prompt([("hello", "hi")], "tell me a story", tok, fmt=fmt) == want == fmt.prompt(msgs, tok)
    assert messages_to_prompt(msgs, tok, fmt=fmt) == want
    assert want.startswith("<|im_start|>system\nYou are helpful.<|im_end|>\n")
    assert prompt_token_ids(tok, want, fmt) == _no_special(tok, want) != tok(want)["input_ids"]
    dschat = " Human: hello Assistant: hi Human: tell me a story Assistant:"
    assert build_prompt([("hello", "hi")], "tell me a story", tok, fmt=DSCHAT) == dschat
    assert messages_to_prompt(msgs, tok, fmt=DSCHAT) == dschat
    assert prompt_token_ids(tok, dschat, DSCHAT) == tok(dschat)["input_ids"]


# ----------------------------------------------------------------------------------------------------------- chat
def _chat(monkeypatch, capsys, path, lines: str, *extra: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    rc = cli(["chat", "--path", str(path), "--greedy", "--max_new_tokens", "24", "--show_prompt", *extra])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_chat_feeds_the_chat_template_ids(chat_dirs, chat_model, fed_ids, monkeypatch, capsys):
    _, tok = chat_model
    rc, out, err = _chat(monkeypatch, capsys, chat_dirs["chat"], "hello\ntell me a story\n")
    assert rc == 0, err
    assert "template: chat (from checkpoint record)" in err  # (the device line is printed once per process)
    replies = [line.removeprefix("Assistant: ") for line in out.splitlines() if line.startswith("Assistant: ")]
    assert replies[0] == REPLIES["hello"]  # memorised in the chat format; ended by EOS (<|im_end|>)
    first = tok.apply_chat_template(HELLO, tokenize=False, add_generation_prompt=True)
    second = tok.apply_chat_template(HELLO + [{"role": "assistant", "content": replies[0]},
                                              {"role": "user", "content": "tell me a story"}],
                                     tokenize=False, add_generation_prompt=True)
    assert f"[prompt] {json.dumps(first)}" in out and f"[prompt] {json.dumps(second)}" in out
    assert fed_ids == [_no_special(tok, first), _no_special(tok, second)]
    assert fed_ids[0][0] != tok("x")["input_ids"][0]  # no automatic BOS before the template's text


def test_chat_of_a_dschat_checkpoint_renders_dschat_despite_the_template(chat_dirs, chat_model, fed_ids,
                                                                         monkeypatch, capsys):
    _, tok = chat_model
    rc, out, err = _chat(monkeypatch, capsys, chat_dirs["dschat"], "hello\n")
    assert rc == 0, err
    assert "template: dschat (from checkpoint record)" in err
    assert '[prompt] " Human: hello Assistant:"' in out
    assert fed_ids == [tok(" Human: hello Assistant:")["input_ids"]]  # DS-Chat text keeps the tokenizer's BOS


def test_chat_template_flag_overrides_with_a_warning(chat_dirs, chat_model, fed_ids, monkeypatch, capsys, caplog):
    _, tok = chat_model
    with caplog.at_level(logging.WARNING, logger="chatrlhf.engine.generation"):
        rc, out, err = _chat(monkeypatch, capsys, chat_dirs["chat"], "hello\n", "--template", "dschat")
    assert rc == 0, err
    assert "template: dschat (--template)" in err
    assert any("--template dschat overrides" in r.getMessage() for r in caplog.records)
    assert fed_ids == [tok(" Human: hello Assistant:")["input_ids"]]
    assert _chat(monkeypatch, capsys, chat_dirs["chat"], "", "--template", "jinja")[0] == 2


# ---------------------------------------------------------------------------------------------------------- serve
def test_serve_feeds_the_chat_template_ids(chat_dirs, chat_model, fed_ids):
    import openai

    from chatrlhf.engine.generation import format_for_checkpoint, generate

    model, tok = chat_model
    fmt = format_for_checkpoint(chat_dirs["chat"], tok, announce=False)
    msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"},
            {"role": "user", "content": "tell me a story"}]
    app = make_app(chat_dirs["chat"], model, tok, api_key=KEY, max_tokens_limit=64, default_max_tokens=32)
    assert app.state.chat_format == fmt
    with running_server(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        r = client.chat.completions.create(model="tiny", messages=HELLO, temperature=0, max_tokens=24)
        stream = client.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=24,
                                                stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    hello, story = (tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in (HELLO, msgs))
    assert fed_ids == [_no_special(tok, hello), _no_special(tok, story)]
    assert r.usage.prompt_tokens == len(_no_special(tok, hello))
    assert r.choices[0].message.content == REPLIES["hello"] == generate(model, tok, hello, fmt=fmt,
                                                                        max_new_tokens=24).text
    assert r.choices[0].finish_reason == "stop"  # EOS (<|im_end|>) ended it
    assert streamed == generate(model, tok, story, fmt=fmt, max_new_tokens=24).text


def test_serve_of_a_dschat_checkpoint_and_the_flag(chat_dirs, chat_model, fed_ids, caplog):
    import httpx

    model, tok = chat_model
    body = {"model": "tiny", "messages": HELLO, "temperature": 0, "max_tokens": 4}
    with caplog.at_level(logging.WARNING, logger="chatrlhf.engine.generation"):
        apps = [make_app(chat_dirs["dschat"], model, tok, api_key=KEY),
                make_app(chat_dirs["chat"], model, tok, api_key=KEY, template="dschat")]
    assert any("--template dschat overrides" in r.getMessage() for r in caplog.records)
    for app in apps:
        assert app.state.chat_format.name == "dschat"
        with running_server(app) as url:
            r = httpx.post(url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                           timeout=60)
            assert r.status_code == 200, r.text
    assert fed_ids == [tok(" Human: hello Assistant:")["input_ids"]] * 2


def test_serve_main_prints_the_template_line(chat_dirs, monkeypatch, capsys):
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)  # build everything, serve nothing
    assert cli(["serve", "--path", str(chat_dirs["chat"])]) == 0
    err = capsys.readouterr().err
    assert "template: chat (from checkpoint record)" in err
    assert cli(["serve", "--path", str(chat_dirs["chat"]), "--template", "dschat"]) == 0
    assert "template: dschat (--template)" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------- eval
@pytest.fixture(scope="module")
def chat_reward_dir(chat_dirs, tmp_path_factory):
    from chatrlhf.models.loading import load_tokenizer
    from chatrlhf.models.reward_model import load_reward_model

    out = tmp_path_factory.mktemp("rm-chat") / "rm"
    load_reward_model(str(chat_dirs["chat"])).save_pretrained(out)
    load_tokenizer(str(chat_dirs["chat"])).save_pretrained(out)
    shutil.copy(chat_dirs["chat"] / "chatrlhf_config.json", out / "chatrlhf_config.json")
    return out


def _manual_score(rm, ids: list[int]) -> float:
    import torch

    with torch.no_grad():
        return float(rm.score(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)))


def test_reward_eval_scores_with_the_template(chat_reward_dir, capsys):
    from chatrlhf.apps.eval import load_scorer, reward_eval
    from chatrlhf.engine.generation import format_for_checkpoint
    from chatrlhf.data.template import DSCHAT

    rm, tok = load_scorer(str(chat_reward_dir))
    fmt = format_for_checkpoint(chat_reward_dir, tok, announce=False)
    assert fmt.name == "chat"
    rows = [{"prompt": "Reverse the word: cat", "chosen": " tac", "rejected": " cat cat cat"},
            {"prompt": " Human: Add 3 and 4. Assistant:", "chosen": " 7", "rejected": " 9"}]
    res = reward_eval(rm, tok, rows, batch_size=1, fmt=fmt)
    # by hand: the template's prompt + the template's rendering of the reply, no automatic special tokens, to EOS
    q = [{"role": "user", "content": "Reverse the word: cat"}]
    head = tok.apply_chat_template(q, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(q + [{"role": "assistant", "content": "tac"}], tokenize=False)
    assert full.startswith(head) and full[len(head):] == "tac<|im_end|>\n"
    ids = _no_special(tok, head) + _no_special(tok, "tac<|im_end|>")
    assert ids[-1] == tok.eos_token_id
    assert res["rows"][0]["chosen_score"] == pytest.approx(_manual_score(rm, ids), abs=1e-5)
    assert reward_eval(rm, tok, rows, batch_size=4, fmt=fmt)["rows"][1]["rejected_score"] == pytest.approx(
        res["rows"][1]["rejected_score"], abs=1e-5)
    dschat = reward_eval(rm, tok, rows[:1], fmt=DSCHAT)["rows"][0]["chosen_score"]
    ds_ids = tok(" Human: Reverse the word: cat Assistant: tac")["input_ids"] + [tok.eos_token_id]
    assert dschat == pytest.approx(_manual_score(rm, ds_ids), abs=1e-5)
    # the CLI: the checkpoint's record, said on stderr
    assert cli(["eval", "reward", "--model", str(chat_reward_dir), "--prompt", "Reverse the word: cat",
                "--answer", "tac", "--json"]) == 0
    out = capsys.readouterr()
    assert "template: chat (from checkpoint record)" in out.err
    assert json.loads(out.out)["rows"][0]["answer_score"] == pytest.approx(res["rows"][0]["chosen_score"], abs=1e-5)
    assert cli(["eval", "reward", "--model", str(chat_reward_dir), "--prompt", "Reverse the word: cat",
                "--answer", "tac", "--json", "--template", "dschat"]) == 0
    out = capsys.readouterr()
    assert "template: dschat (--template)" in out.err
    assert json.loads(out.out)["rows"][0]["answer_score"] == pytest.approx(dschat, abs=1e-5)


def test_eval_prompts_renders_each_model_with_its_own_format(chat_dirs, chat_model, fed_ids, capsys):
    _, tok = chat_model
    assert cli(["eval", "prompts", "--baseline", str(chat_dirs["dschat"]), "--finetuned", str(chat_dirs["chat"]),
                "--methods", "greedy", "--max_new_tokens", "3", "--json"]) == 0
    out = capsys.readouterr()
    assert "template [baseline]: dschat (from checkpoint record)" in out.err
    assert "template [finetuned]: chat (from checkpoint record)" in out.err
    res = json.loads(out.out)["results"]
    q = res[0]["prompt"]
    assert q.startswith(" Human: ") and q.endswith(" Assistant:")  # the question as DS-Chat text
    question = q.removeprefix(" Human: ").removesuffix(" Assistant:")
    chat = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                   add_generation_prompt=True)
    assert fed_ids[:2] == [tok(q)["input_ids"], _no_special(tok, chat)]


def test_eval_gold_generates_after_the_template(chat_dirs, chat_model, fed_ids, capsys):
    from chatrlhf.apps.eval import heldout_prompts

    _, tok = chat_model
    assert cli(["eval", "gold", "--model", str(chat_dirs["chat"]), "--num_prompts", "2", "--max_new_tokens", "2",
                "--json"]) == 0
    out = capsys.readouterr()
    assert "template: chat (from checkpoint record)" in out.err
    samples = json.loads(out.out)["samples"]
    prompts = heldout_prompts(num_prompts=2)
    assert [s["prompt"] for s in samples] == prompts  # scored against the task's own prompt text
    from chatrlhf.data.template import parse_dschat

    want = [_no_special(tok, tok.apply_chat_template(parse_dschat(p), tokenize=False, add_generation_prompt=True))
            for p in prompts]
    assert fed_ids == want
