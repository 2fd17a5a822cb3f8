"""Bad inputs fail before training with messages that say what to do."""

import shutil

import pytest

from chatrlhf.config import parse_config
from chatrlhf.errors import ModelError, UserError
from chatrlhf.trainers.sft import SFTConfig, run_sft


def run(argv):
    return run_sft(parse_config(SFTConfig, argv))


def test_not_a_model_dir(base_args, tmp_path):
    bad = tmp_path / "notamodel"
    bad.mkdir()
    (bad / "README.md").write_text("hi")
    with pytest.raises(ModelError, match="not a model directory"):
        run(base_args(tmp_path / "o", model_name_or_path=bad))


def test_max_seq_len_beyond_positions(base_args, tmp_path):
    with pytest.raises(ModelError, match="longer than the model's 512 positions"):
        run(base_args(tmp_path / "o", max_seq_len=4096))


def test_unknown_lora_module_lists_candidates(base_args, tmp_path):
    with pytest.raises(UserError, match=r"'nonexistent_proj' matches no Linear.*q_proj"):
        run(base_args(tmp_path / "o", lora_dim=4, lora_module_name="nonexistent_proj"))


def test_fp16_on_cpu_refused(base_args, tmp_path):
    with pytest.raises(UserError, match="fp16 is not usable on CPU.*bf16"):
        run(base_args(tmp_path / "o", dtype="fp16"))


def test_out_of_memory_estimate_gives_advice():
    from chatrlhf.engine import DeepSpeedStrategy
    from chatrlhf.trainers.common import memory_preflight
    from chatrlhf.trainers.config import TrainConfig

    s = DeepSpeedStrategy(dtype="fp32")
    with pytest.raises(UserError, match=r"out of memory ahead.*--zero_stage.*LoRA.*--dtype bf16"):
        memory_preflight(s, 10 ** 12, TrainConfig(model_name_or_path="x"))


def test_tokenizer_without_pad_or_eos(base_args, tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    d = tmp_path / "nopad"
    shutil.copytree(tiny_model_dir, d)
    tok = AutoTokenizer.from_pretrained(d)
    tok.pad_token = None
    tok.eos_token = None
    tok.save_pretrained(d)
    with pytest.raises(ModelError, match="(?i)pad"):
        run(base_args(tmp_path / "o", model_name_or_path=d))
