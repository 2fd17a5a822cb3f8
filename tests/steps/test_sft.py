"""Step 1 end to end on the built-in task with a tiny OPT: eval loss falls, checkpoints reload offline, resume."""

import json
import os

import pytest
import torch

from chatrlhf.config import parse_config
from chatrlhf.trainers.metrics import read_metrics
from chatrlhf.trainers.sft import SFTConfig, run_sft


def sft(argv):
    return run_sft(parse_config(SFTConfig, argv))


def train_losses(out):
    return {r["step"]: r["loss"] for r in read_metrics(out) if r["kind"] == "train"}


def test_sft_lowers_eval_loss_and_checkpoint_reloads_offline(base_args, tmp_path):
    out = tmp_path / "sft"
    res = sft(base_args(out, learning_rate=3e-3, max_steps=24, lr_scheduler_type="linear", num_warmup_steps=2,
                        eval_interval=12))
    assert res["global_step"] == 24
    assert res["eval_loss"] < res["eval_loss_start"] - 0.8, res  # measured: 6.19 -> ~5.0
    recs = read_metrics(out)
    assert {r["kind"] for r in recs} >= {"train", "eval", "throughput"}
    evals = [r for r in recs if r["kind"] == "eval"]
    assert evals[0]["step"] == 0 and all("perplexity" in r for r in evals)
    done = json.loads((out / "done.json").read_text())
    assert done["step"] == "sft" and done["metrics"]["eval_loss"] == res["eval_loss"]
    files = set(os.listdir(out))
    assert {"model.safetensors", "config.json", "generation_config.json", "chatrlhf_config.json",
            "tokenizer.json"} <= files and "pytorch_model.bin" not in files
    # plain transformers, offline, no chatrlhf code
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    m = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    ids = tok(" Human: Reverse the word: cat Assistant:", return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(m(**ids).logits).all()


def test_throughput_line_format():
    from chatrlhf.trainers.common import throughput_line

    line, tp = throughput_line(1_429_000_000, 24, 2048, 50272, 0.6, 16, 512)
    assert line.startswith("Model Parameters: 1.429 B, Latency: 0.60s, TFLOPs: ")
    assert line.endswith("Samples/sec: 26.67, Time/seq 0.04s, Batch Size: 16, Sequence Length: 512")
    f = 24 * 3 * 16 * 512 * 24 * 2048 ** 2 * (1 + 512 / (6 * 2048) + 50272 / (16 * 24 * 2048))
    assert abs(tp["tflops"] - f / 0.6 / 1e12) < 1e-9


@pytest.mark.slow
def test_resume_gives_same_next_losses(base_args, tmp_path):
    """Stopped at step 4 (checkpoint), resumed to 8: steps 5-8 equal an uninterrupted run's, dropout on."""
    common = dict(learning_rate=2e-3, lr_scheduler_type="constant", dropout=0.1, per_device_train_batch_size=4)
    full = tmp_path / "full"
    sft(base_args(full, max_steps=8, **common))
    part = tmp_path / "part"
    sft(base_args(part, max_steps=4, save_interval=4, **common))
    assert (part / "checkpoints" / "step_4" / "trainer_state.json").exists()
    assert (part / "checkpoints" / "step_4" / "hf_model" / "model.safetensors").exists()
    res = sft(base_args(part, max_steps=8, resume="auto", **common))
    assert res["global_step"] == 8
    a, b = train_losses(full), train_losses(part)
    for s in range(1, 9):
        assert abs(a[s] - b[s]) < 1e-5, (s, a, b)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_answer_logits_skip_the_prompt_and_give_the_same_loss(tiny_model_factory, family):
    """The lm head runs only from the position before the batch's first labelled token; loss and gradients equal
    the full-logits ones (right-padded rows, different prompt lengths, a row with no labels at all)."""
    from chatrlhf.models.loading import load_causal_lm
    from chatrlhf.trainers.sft import answer_logits, labelled_span, lm_loss

    labels = torch.full((3, 12), -100)
    labels[0, 7:10] = 5
    labels[1, 5:12] = 6
    assert labelled_span(labels) == 12 - 5 + 1
    assert labelled_span(torch.full((2, 4), -100)) == 4
    assert labelled_span(torch.ones(2, 4, dtype=torch.long)) == 4

    torch.manual_seed(0)
    model = load_causal_lm(str(tiny_model_factory(family, hidden=64, layers=2, vocab=512)))
    ids = torch.randint(4, 500, (3, 12))
    mask = torch.ones_like(ids)
    mask[0, 10:] = 0
    labels = torch.where(labels == -100, labels, ids)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    logits, lab = answer_logits(model, batch)
    assert logits.shape[1] == 8 and lab.shape[1] == 8
    part = lm_loss(logits, lab)
    (g_part,) = torch.autograd.grad(part, model.get_output_embeddings().weight)
    full = lm_loss(model(input_ids=ids, attention_mask=mask).logits, labels)
    (g_full,) = torch.autograd.grad(full, model.get_output_embeddings().weight)
    torch.testing.assert_close(part, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_part, g_full, rtol=1e-4, atol=1e-6)
