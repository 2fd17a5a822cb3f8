"""The strategy with the real DeepSpeed engine: ZeRO 0/2/3, bf16 and LoRA each train; memory estimate; LoRA
merge/unmerge helpers."""

import pytest
import torch

from chatrlhf.config import parse_config
from chatrlhf.engine import estimate_memory
from chatrlhf.trainers.metrics import read_metrics
from chatrlhf.trainers.sft import SFTConfig, run_sft


def first_last(out):
    losses = [r["loss"] for r in read_metrics(out) if r["kind"] == "train"]
    return sum(losses[:2]) / 2, sum(losses[-2:]) / 2


@pytest.mark.slow  # over 2 s on a 2-core CPU
@pytest.mark.parametrize("stage,dtype", [(0, "fp32"), (2, "bf16"), (3, "bf16")])
def test_zero_stages_train(base_args, tmp_path, stage, dtype):
    out = tmp_path / f"z{stage}"
    res = run_sft(parse_config(SFTConfig, base_args(out, zero_stage=stage, dtype=dtype, learning_rate=3e-3,
                                                    max_steps=8, lr_scheduler_type="constant")))
    a, b = first_last(out)
    assert b < a - 0.2 and res["eval_loss"] < res["eval_loss_start"], (a, b, res)
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)  # ZeRO-3 weights were gathered
    assert all(p.numel() > 0 for p in m.parameters())


def test_lora_trains_and_saves_merged(base_args, tmp_path):
    out = tmp_path / "lora"
    run_sft(parse_config(SFTConfig, base_args(out, lora_dim=8, lora_module_name="q_proj,v_proj,fc1",
                                              only_optimize_lora=True, lora_learning_rate=1e-2, max_steps=8,
                                              save_lora_adapter=True, lr_scheduler_type="constant")))
    a, b = first_last(out)
    assert b < a - 0.1, (a, b)
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert not any("lora" in k or "base_layer" in k for k in keys)
    assert (out / "lora_adapter" / "adapter_model.safetensors").exists()


def test_lora_merge_helpers_exact(tiny_model_dir):
    from chatrlhf.models.loading import load_causal_lm
    from chatrlhf.models.lora import apply_lora, merged_lora, merged_state_dict

    m = apply_lora(load_causal_lm(tiny_model_dir), 4, "q_proj,v_proj", only_optimize_lora=True).eval()
    for n, p in m.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)
    ids = torch.randint(5, 200, (2, 12))
    with torch.no_grad():
        want = m(ids).logits
        base = {n: p.clone() for n, p in m.named_parameters() if "base_layer" in n}
        with merged_lora(m):
            assert torch.allclose(m(ids).logits, want, atol=1e-4)
        assert all(torch.equal(base[n], p) for n, p in m.named_parameters() if n in base)  # exact restore
        plain = load_causal_lm(tiny_model_dir)
        plain.load_state_dict(merged_state_dict(m), strict=False)
        assert torch.allclose(plain.eval()(ids).logits, want, atol=1e-4)


def test_estimate_memory_shards_state():
    n = 1_000_000_000
    z0 = estimate_memory(n, 0, "bf16", world_size=8, on_cpu=False)
    z2 = estimate_memory(n, 2, "bf16", world_size=8, on_cpu=False)
    z3 = estimate_memory(n, 3, "bf16", world_size=8, on_cpu=False)
    assert z0.bytes_per_rank == n * (2 + 2 + 12)
    assert z2.bytes_per_rank == n * 2 + n * 2 // 8 + n * 12 // 8
    assert z3.bytes_per_rank == n * 16 // 8
    lora = estimate_memory(n, 0, "bf16", 1, trainable_params=n // 100, on_cpu=False)
    assert lora.bytes_per_rank < z0.bytes_per_rank / 5
    assert "LoRA" in z0.advice and "--zero_stage" in z0.advice


@pytest.mark.slow  # over 2 s on a 2-core CPU
def test_start_up_does_not_print_deepspeeds_op_build_line():
    """DeepSpeed prints "deepspeed_shm_comm_op built successfully" on every CPU start, even when it only loaded a
    cached build; the strategy keeps it out of the user's output."""
    import os
    import subprocess
    import sys

    code = ("from chatrlhf.engine.strategy import DeepSpeedStrategy\n"
            "s = DeepSpeedStrategy(dtype='fp32'); s.setup_distributed(); print('ready')\n")
    # a fresh one-process group: none of this test process's own (its port is taken by it)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["DS_ACCELERATOR"] = "cpu"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ready" in out.stdout and "built successfully" not in out.stdout + out.stderr, out.stdout
