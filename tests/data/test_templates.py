"""--template: DeepSpeed-Chat rows parsed into messages, rendered with a model's chat template in every step, and
token-in/token-out (a rollout samples after exactly the prompt ids the training forward sees)."""

from __future__ import annotations

import pytest
import torch

from chatrlhf.data.phases import DataConfig, Encoder, build_phase_datasets, chat_format
from chatrlhf.errors import DataError
from chatrlhf.data.template import DSCHAT, ChatFormat, parse_dschat, resolve_format

# ChatML with a default system prompt when the conversation has none (as SmolLM2's template does)
CHATML = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are helpful.<|im_end|>\n{% endif %}"
          "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.mark.parametrize("text,messages", [
    (" Human: hi Assistant:", [{"role": "user", "content": "hi"}]),
    (" Human: a Assistant: b Human: c Assistant:", [{"role": "user", "content": "a"},
                                                    {"role": "assistant", "content": "b"},
                                                    {"role": "user", "content": "c"}]),
    ("Be brief.\n Human: q Assistant:", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q"}]),
    ("just a request", [{"role": "user", "content": "just a request"}]),
    ("Human: x\n\nHuman: y\n\nAssistant:", [{"role": "user", "content": "x\ny"}]),  # one role twice: one turn
])
def test_parse_dschat(text, messages):
    assert parse_dschat(text) == messages


@pytest.fixture(scope="module")
def chatml_dir(tiny_model_dir, tmp_path_factory):
    """The tiny test model with a ChatML tokenizer (eos <|im_end|>, default system prompt)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("chatml") / "model"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token = "<|im_end|>"
    tok.chat_template = CHATML
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.resize_token_embeddings(len(tok))
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def chatml_tok(chatml_dir):
    from chatrlhf.models.loading import load_tokenizer

    return load_tokenizer(chatml_dir)


def test_auto_picks_the_tokenizers_template(chatml_tok, tiny_model_dir):
    from chatrlhf.models.loading import load_tokenizer

    assert resolve_format("auto", chatml_tok) == ChatFormat("chat", CHATML)
    assert resolve_format("auto", load_tokenizer(tiny_model_dir)) == DSCHAT
    assert resolve_format("dschat", chatml_tok) == DSCHAT
    with pytest.raises(ValueError, match="no chat template"):
        resolve_format("chat", load_tokenizer(tiny_model_dir))
    with pytest.raises(DataError, match="--template"):
        chat_format(DataConfig(template="chat"), load_tokenizer(tiny_model_dir))


def test_sft_tokens_are_the_rendered_prompt_then_the_answer_to_eos(chatml_tok):
    fmt = resolve_format("auto", chatml_tok)
    enc = Encoder(chatml_tok, fmt)
    row_prompt, answer = " Human: Reverse the word: cat Assistant:", " tac"
    (ids, n_prompt), = enc.answer_ids([row_prompt], [answer])
    prompt_text = ("<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nReverse the word: cat<|im_end|>\n"
                   "<|im_start|>assistant\n")
    assert fmt.prompt_from_row(row_prompt, chatml_tok) == prompt_text
    assert ids[:n_prompt] == chatml_tok(prompt_text, add_special_tokens=False)["input_ids"]
    assert ids[:n_prompt] == enc.prompt_ids([row_prompt])[0]  # step 3 samples after these very ids
    # the answer is the template's rendering of the reply, ended at EOS (<|im_end|>; the newline after it is not)
    assert chatml_tok.decode(ids[n_prompt:]) == "tac<|im_end|>"
    assert ids[-1] == chatml_tok.eos_token_id and ids.count(chatml_tok.eos_token_id) == 3  # system, user, answer


def test_every_phase_renders_with_the_template_and_records_it(chatml_tok, task_data_dir, tmp_path):
    cfg = DataConfig(data_path=[f"local/jsonfile={task_data_dir}"], data_split="1,1,1", skip_bad_rows=True,
                     data_output_path=str(tmp_path / "cache"), max_seq_len=128, max_prompt_seq_len=96)
    start = chatml_tok.convert_tokens_to_ids("<|im_start|>")
    for phase, column in ((1, "input_ids"), (2, "chosen_input_ids"), (3, "prompt_input_ids")):
        train, _ = build_phase_datasets(phase, cfg, chatml_tok)
        assert train.info["template"]["name"] == "chat" and len(train.info["template"]["sha256"]) == 16
        ids = train[0][column].tolist()
        assert ids[0] == start, chatml_tok.decode(ids)  # the template's own opening, no automatic BOS before it
    # the same data rendered dschat is a different cache entry with DeepSpeed-Chat text
    train, _ = build_phase_datasets(3, DataConfig(**{**vars(cfg), "template": "dschat"}), chatml_tok)
    assert chatml_tok.decode(train[0]["prompt_input_ids"], skip_special_tokens=True).startswith(" Human:")
    assert train.info["template"] == {"name": "dschat"}


def test_rollout_prompt_tokens_are_the_training_forwards(chatml_dir, chatml_tok, task_data_dir, tmp_path):
    """Token-in, token-out through step 3's real code: the experience's sequences (what the training forward reads)
    start with exactly the phase-3 prompt ids, which are the template's rendering with its system prompt."""
    from chatrlhf.data import PromptCollator
    from chatrlhf.engine.strategy import DeepSpeedStrategy, StrategyConfig
    from chatrlhf.models.loading import load_causal_lm
    from chatrlhf.trainers.ppo import experience as px
    from chatrlhf.trainers.ppo.rewards import Scorer

    cfg = DataConfig(data_path=[f"local/jsonfile={task_data_dir}"], data_split="0,0,1", skip_bad_rows=True,
                     data_output_path=str(tmp_path / "cache"), max_prompt_seq_len=96)
    train, _ = build_phase_datasets(3, cfg, chatml_tok)
    items = [train[i] for i in range(3)]
    batch = PromptCollator(chatml_tok.pad_token_id)(items)
    model = load_causal_lm(chatml_dir, dtype=torch.float32)
    strategy = DeepSpeedStrategy(StrategyConfig(dtype="fp32"))
    tok = chatml_tok
    tok.padding_side = "left"
    exp, _ = px.make_experience(model, model, None, Scorer(tok, fn=lambda p, a, m: [0.0] * len(a), spec="zero"),
                                strategy, tok, batch["prompt_input_ids"], batch["prompt_attention_mask"],
                                px.GenerationParams(max_new_tokens=6, min_new_tokens=2, hybrid=False),
                                prompts=batch["prompt"], metas=batch["meta"])
    p = exp.prompt_len
    for i, item in enumerate(items):
        n = len(item["prompt_input_ids"])
        assert exp.seq[i, p - n:p].tolist() == item["prompt_input_ids"].tolist()
        assert exp.attention_mask[i, :p].sum() == n
        rendered = resolve_format("auto", tok).prompt_from_row(batch["prompt"][i], tok)
        assert item["prompt_input_ids"].tolist() == tok(rendered, add_special_tokens=False)["input_ids"]
        assert "You are helpful." in rendered  # the template's system prompt is part of what both see
