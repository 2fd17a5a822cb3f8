"""--save_lora_adapter writes what peft itself writes: PeftModel.from_pretrained(base, adapter_dir) loads every
trained LoRA weight (no missing/unexpected keys) and gives the merged checkpoint's logits."""

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from chatrlhf.config import parse_config
from chatrlhf.trainers.metrics import read_metrics
from chatrlhf.trainers.sft import SFTConfig, run_sft


@pytest.fixture(scope="module")
def pairs(task_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_pairs")
    shutil.copytree(task_data_dir / "data", out / "data")
    return out


def _sft_argv(model, data, out, **kw):
    args = {"model_name_or_path": model, "data_path": data, "data_split": "10,0,0", "output_dir": out,
            "data_output_path": Path(out).parent / "cache", "max_seq_len": 64, "skip_bad_rows": True,
            "per_device_train_batch_size": 8, "per_device_eval_batch_size": 16, "dtype": "fp32", "resume": "never",
            "seed": 1234, "lora_dim": 8, "lora_module_name": "q_proj,v_proj,fc1", "only_optimize_lora": True,
            "lora_learning_rate": 1e-2, "max_steps": 8, "save_lora_adapter": True, "lr_scheduler_type": "constant",
            **kw}
    argv = []
    for k, v in args.items():
        argv += [f"--{k}"] if v is True else [f"--{k}", str(v)]
    return argv


@pytest.mark.slow  # over 2 s on a 2-core CPU
@pytest.mark.parametrize("stage", [0, 3])
def test_saved_adapter_loads_in_peft_and_matches_the_merged_checkpoint(tiny_model_dir, pairs, tmp_path, stage):
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    run_sft(parse_config(SFTConfig, _sft_argv(tiny_model_dir, pairs, out, zero_stage=stage)))
    losses = [r["loss"] for r in read_metrics(out) if r["kind"] == "train"]
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.1, losses  # the adapter learned something

    adapter = out / "lora_adapter"
    conf = json.loads((adapter / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["r"] == 8 and conf["task_type"] == "CAUSAL_LM"
    assert conf["base_model_name_or_path"] == str(Path(tiny_model_dir).resolve())
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
    assert saved and all(k.startswith("base_model.model.") and ".lora_" in k for k in saved)

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, local_files_only=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, adapter).eval()
    key_warnings = [str(w.message) for w in caught if "keys" in str(w.message)]
    assert not key_warnings, key_warnings  # peft: "Found missing adapter keys while loading the checkpoint: ..."
    lora_params = {n.replace(".default", ""): p for n, p in model.named_parameters() if ".lora_" in n}
    assert set(lora_params) == set(saved)  # every LoRA weight of the model came from the file, none left over
    assert all(torch.equal(lora_params[k], saved[k]) for k in saved)
    assert any(k.endswith("lora_B.weight") and saved[k].abs().sum() > 0 for k in saved)  # trained, not the init

    merged = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    ids = torch.randint(5, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = model(input_ids=ids).logits, merged(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, local_files_only=True).eval()(ids).logits
    assert not torch.allclose(plain, want, atol=1e-3)  # the adapter changes the model ...
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)  # ... exactly as the merged checkpoint does
    # the config names its base, so peft's auto class needs nothing else
    from peft import AutoPeftModelForCausalLM

    with torch.no_grad():
        auto = AutoPeftModelForCausalLM.from_pretrained(adapter, local_files_only=True).eval()(input_ids=ids).logits
    torch.testing.assert_close(auto, want, atol=1e-4, rtol=1e-4)


def test_adapter_of_a_run_that_also_trained_the_base_names_no_base(tiny_model_dir, pairs, tmp_path, caplog):
    """Without --only_optimize_lora the adapter alone does not reproduce the run on the original base: the config
    records no base model and the save says so."""
    out = tmp_path / "lora_full"
    with caplog.at_level("WARNING", logger="chatrlhf"):
        run_sft(parse_config(SFTConfig, [a for a in _sft_argv(tiny_model_dir, pairs, out, max_steps=2)
                                         if a != "--only_optimize_lora"]))
    conf = json.loads((out / "lora_adapter" / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] is None
    assert "base weights were trained too" in caplog.text
