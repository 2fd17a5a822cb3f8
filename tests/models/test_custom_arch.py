"""Custom model families (issue 17 item 2): a model whose code is Python in its own folder (config.json auto_map ->
modeling_*.py, GPT-Pangu's case) runs only with --trust_remote_code, which every command that loads a model or
tokenizer takes. Without it: one line naming the folder, the auto_map class and the flag, exit 2, and nothing from
the folder is imported. With it: sft -> reward -> ppo -> chat end to end, safetensors only.

The custom family ("tinycustom") is tests/fixtures/custom_arch: a 2-layer transformer of its own."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chatrlhf.errors import ModelError

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "custom_arch"
CHATRLHF = str(Path(sys.executable).with_name("chatrlhf"))
FLAG = "--trust_remote_code"
TRAP_CLASS = "modeling_trap.TrapForCausalLM"


def _build_module():
    spec = importlib.util.spec_from_file_location("custom_arch_build", FIXTURE / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def custom_model_dir(tmp_path_factory) -> Path:
    return _build_module().build_custom_model(tmp_path_factory.mktemp("custom_arch") / "tinycustom")


@pytest.fixture(scope="session")
def pangu_like_dir(custom_model_dir, tmp_path_factory) -> Path:
    """The same model with an auto_map that registers only the causal LM (no AutoModel entry), as GPT-Pangu's."""
    out = tmp_path_factory.mktemp("pangu_like") / "pangu"
    shutil.copytree(custom_model_dir, out)
    cfg = json.loads((out / "config.json").read_text())
    del cfg["auto_map"]["AutoModel"]
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture
def trap_dir(custom_model_dir, tmp_path) -> tuple[Path, Path]:
    """A complete-looking custom model dir (weights, tokenizer, a reward block) whose every .py file writes a
    marker file when imported: the marker must never appear unless --trust_remote_code is given."""
    marker = tmp_path / "EXECUTED"
    d = tmp_path / "trap_model"
    shutil.copytree(custom_model_dir, d, ignore=shutil.ignore_patterns("*.py"))
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="trapcustom", chatrlhf_reward={"num_padding_at_beginning": 0},
               auto_map={"AutoConfig": "configuration_trap.TrapConfig",
                         "AutoModelForCausalLM": "modeling_trap.TrapForCausalLM"})
    (d / "config.json").write_text(json.dumps(cfg))
    tok_cfg = json.loads((d / "tokenizer_config.json").read_text())
    tok_cfg.update(tokenizer_class="TrapTokenizerFast", auto_map={"AutoTokenizer": [None, "tokenization_trap.TrapTokenizerFast"]})
    (d / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    for name in ("configuration_trap", "modeling_trap", "tokenization_trap"):
        (d / f"{name}.py").write_text(f"open({str(marker)!r}, 'w').write({name!r})\nraise SystemExit('trap ran')\n")
    return d, marker


# ------------------------------------------------------------------------------------------------ refusals
def test_loaders_refuse_a_custom_family_without_the_flag_naming_folder_class_and_flag(trap_dir):
    from chatrlhf.engine.generation import load_for_inference
    from chatrlhf.models.loading import check_model_files, load_causal_lm, load_tokenizer, preflight_model
    from chatrlhf.models.reward_model import load_reward_model

    d, marker = trap_dir
    calls = {"check_model_files": lambda: check_model_files(d), "load_causal_lm": lambda: load_causal_lm(d),
             "load_reward_model": lambda: load_reward_model(d),
             "preflight_model": lambda: preflight_model(str(d), "--model_name_or_path"),
             "load_for_inference": lambda: load_for_inference(d)}
    for what, call in calls.items():
        with pytest.raises(ModelError) as e:
            call()
        msg = str(e.value)
        assert str(d) in msg and TRAP_CLASS in msg and FLAG in msg and "\n" not in msg, (what, msg)
    with pytest.raises(ModelError) as e:  # the tokenizer's own class is named when only the tokenizer is loaded
        load_tokenizer(d)
    assert "tokenization_trap.TrapTokenizerFast" in str(e.value) and FLAG in str(e.value)
    assert not marker.exists()


def test_known_model_type_with_auto_map_needs_no_flag(tiny_model_dir, tmp_path):
    """An auto_map beside a model_type transformers knows is ignored without the flag (transformers' own code
    loads it), so such folders keep loading as before."""
    from chatrlhf.models.loading import check_remote_code, remote_code_refs

    d = tmp_path / "opt_with_auto_map"
    shutil.copytree(tiny_model_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_x.X"}
    (d / "config.json").write_text(json.dumps(cfg))
    assert remote_code_refs(d) == {}
    check_remote_code(d, False)


def test_flag_with_code_missing_from_the_folder_is_one_line(custom_model_dir, tmp_path):
    from chatrlhf.models.loading import check_model_files

    d = tmp_path / "no_code"
    shutil.copytree(custom_model_dir, d, ignore=shutil.ignore_patterns("modeling_*.py"))
    with pytest.raises(ModelError, match=r"auto_map AutoModel\S* -> modeling_tinycustom\.\S+ names code that is "
                                         r"not in the folder \(expected modeling_tinycustom\.py"):
        check_model_files(d, trust_remote_code=True)


def _cli_cases(d: Path, data: Path, out: Path) -> dict[str, list[str]]:
    step = ["--data_path", str(data), "--output_dir", str(out)]
    return {
        "sft": ["sft", "--model_name_or_path", str(d), *step],
        "reward": ["reward", "--model_name_or_path", str(d), *step],
        "dpo": ["dpo", "--model_name_or_path", str(d), *step],
        "ppo": ["ppo", "--actor_model_name_or_path", str(d), "--critic_model_name_or_path", str(d), *step],
        "train": ["train", "--actor_model", str(d), "--reward_model", str(d), "--data_path", str(data),
                  "--output_dir", str(out), "--preflight_only"],
        "chat": ["chat", "--path", str(d)],
        "serve": ["serve", "--path", str(d)],
        "eval prompts": ["eval", "prompts", "--baseline", str(d), "--finetuned", str(d)],
        "eval reward": ["eval", "reward", "--model", str(d)],
        "eval gold": ["eval", "gold", "--model", str(d), "--num_prompts", "1"],
        "data inspect": ["data", "inspect", str(data), "--tokenizer", str(d)],
    }


@pytest.mark.parametrize("command", ["sft", "reward", "dpo", "ppo", "train", "chat", "serve", "eval prompts",
                                     "eval reward", "eval gold", "data inspect"])
def test_every_command_refuses_in_one_line_exit_2(command, trap_dir, task_data_dir, tmp_path, capsys):
    from chatrlhf.cli import main as cli

    d, marker = trap_dir
    out = tmp_path / "out"
    assert cli(_cli_cases(d, task_data_dir / "data", out)[command]) == 2
    err = capsys.readouterr().err.strip()
    line = err.splitlines()[-1]
    assert "Traceback" not in err and FLAG in line and str(d) in line, err
    # data inspect loads only the tokenizer: it names the tokenizer's class
    assert ("tokenization_trap.TrapTokenizerFast" if command == "data inspect" else TRAP_CLASS) in line
    assert not marker.exists()
    if command in ("sft", "reward", "dpo", "ppo"):
        assert not out.exists()  # refused in preflight, before anything is written


def test_every_command_takes_the_flag_off_by_default_with_a_help_that_says_what_it_runs():
    from chatrlhf.apps.chat import ChatConfig
    from chatrlhf.apps.data_inspect import _parser
    from chatrlhf.apps.eval import GoldConfig, PromptsConfig, RewardEvalConfig
    from chatrlhf.apps.pipeline import TrainPipelineConfig
    from chatrlhf.apps.serve import ServeConfig
    from chatrlhf.trainers.dpo import DPOConfig
    from chatrlhf.trainers.ppo.trainer import PPOConfig
    from chatrlhf.trainers.reward import RewardConfig
    from chatrlhf.trainers.sft import SFTConfig

    for cls in (SFTConfig, RewardConfig, DPOConfig, PPOConfig, TrainPipelineConfig, ChatConfig, ServeConfig,
                PromptsConfig, RewardEvalConfig, GoldConfig):
        f = {x.name: x for x in dataclasses.fields(cls)}["trust_remote_code"]
        assert f.default is False, cls
        assert "Python code in the model folder" in f.metadata["help"], cls
    action = next(a for a in _parser()._actions if a.dest == "trust_remote_code")
    assert action.default is False and "Python code" in action.help and FLAG in action.option_strings


def test_pipeline_passes_the_flag_to_every_step(custom_model_dir, task_data_dir, tmp_path):
    from chatrlhf.apps import pipeline
    from chatrlhf.config import parse_config

    for flag in ([], [FLAG]):
        cfg = parse_config(pipeline.TrainPipelineConfig, [
            "--actor_model", str(custom_model_dir), "--reward_model", str(custom_model_dir),
            "--data_path", str(task_data_dir / "data"), "--output_dir", str(tmp_path / "run"), *flag])
        for spec in pipeline.STEPS:
            assert pipeline.resolve_step_config(cfg, spec).trust_remote_code is bool(flag), spec.name


# ------------------------------------------------------------------------------------------------ with the flag
def test_custom_family_loads_from_safetensors_and_generates_through_the_fallback(custom_model_dir, monkeypatch):
    from chatrlhf.engine import hybrid
    from chatrlhf.engine.generation import load_for_inference

    def no_pickles(*a, **k):
        raise AssertionError("torch.load called while loading a model")

    monkeypatch.setattr(torch, "load", no_pickles)
    model, tok = load_for_inference(custom_model_dir, dtype="fp32", trust_remote_code=True)
    assert type(model).__name__ == "TinyCustomForCausalLM"
    # not a family the hybrid decoder knows: generate() it is, and the same tokens either way
    assert hybrid.candidate_paths(model) == ["generate"]
    batch = tok([" Human: Reverse the word: cat Assistant:", " Human: hi Assistant:"], return_tensors="pt",
                padding=True)
    assert tok.padding_side == "left" and int(batch["attention_mask"][1, 0]) == 0
    kw = dict(max_new_tokens=6, min_new_tokens=6, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    via_hybrid = hybrid.generate(model, batch["input_ids"], batch["attention_mask"], **kw, hybrid=True)
    plain = model.generate(**batch, do_sample=False, **kw)
    assert torch.equal(via_hybrid, plain)
    # the model's KV cache gives what one full forward gives, left padding included
    mask = torch.cat([batch["attention_mask"], torch.ones(2, 6, dtype=torch.long)], 1)
    logits = model(input_ids=plain, attention_mask=mask, use_cache=False).logits
    assert torch.equal(logits[:, -7:-1].argmax(-1), plain[:, -6:])


@pytest.mark.parametrize("which", ["auto_model", "pangu_like"])
def test_reward_model_wraps_the_custom_body_and_saves_a_dir_that_loads_on_its_own(which, custom_model_dir,
                                                                                 pangu_like_dir, tmp_path):
    from chatrlhf.models.reward_model import load_reward_model

    src = custom_model_dir if which == "auto_model" else pangu_like_dir
    torch.manual_seed(0)
    rm = load_reward_model(src, trust_remote_code=True).eval()
    assert type(rm.rwtransformer).__name__ == "TinyCustomModel"
    ids = torch.tensor([[5, 6, 7, 8, 9], [3, 3, 7, 8, 9]])
    mask = (ids != 3).long()
    scores = rm.score(ids, mask)
    assert torch.isfinite(scores).all()
    out = tmp_path / "rm"
    rm.save_pretrained(out)
    files = {p.name for p in out.iterdir()}
    assert {"modeling_tinycustom.py", "configuration_tinycustom.py", "model.safetensors"} <= files
    assert not any(f.endswith((".bin", ".pt")) for f in files)
    with pytest.raises(ModelError, match=FLAG):
        load_reward_model(out, require_value_head=True)
    again = load_reward_model(out, trust_remote_code=True, require_value_head=True).eval()
    assert torch.allclose(again.score(ids, mask), scores)


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_sft_reward_ppo_chat_end_to_end_with_the_flag(custom_model_dir, task_data_dir, tmp_path, capsys):
    """Each command as a user runs it, a step or two each at tiny sizes; the hybrid engine falls back to
    generate() for the unknown family, and every checkpoint carries the family's code."""
    from chatrlhf.cli import main as cli

    data = tmp_path / "pairs"
    shutil.copytree(task_data_dir / "data", data / "data")
    common = ["--data_path", str(data), "--dtype", "fp32", "--resume", "never", "--max_steps", "2", FLAG]
    train = ["--max_seq_len", "64", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8",
             "--eval_iters", "1", *common]
    sft, rm, ppo = tmp_path / "sft", tmp_path / "rm", tmp_path / "ppo"
    assert cli(["sft", "--model_name_or_path", str(custom_model_dir), "--output_dir", str(sft),
                "--data_split", "10,0,0", *train]) == 0
    assert cli(["reward", "--model_name_or_path", str(sft), "--output_dir", str(rm), "--data_split", "0,10,0",
                *train]) == 0
    assert cli(["ppo", "--actor_model_name_or_path", str(sft), "--critic_model_name_or_path", str(rm),
                "--output_dir", str(ppo), "--data_split", "0,0,10", "--max_prompt_seq_len", "32",
                "--max_answer_seq_len", "8", "--per_device_generation_batch_size", "4",
                "--per_device_training_batch_size", "2", *common]) == 0
    capsys.readouterr()
    for d in (sft, rm, ppo / "actor", ppo / "critic"):
        files = {p.name for p in d.iterdir()}
        assert {"modeling_tinycustom.py", "configuration_tinycustom.py", "model.safetensors"} <= files, d
        assert not any(f.endswith((".bin", ".pt")) for f in files), d
    assert json.loads((ppo / "done.json").read_text())["metrics"]
    assert json.loads((rm / "config.json").read_text())["chatrlhf_reward"]["base_model_type"] == "tinycustom"

    env = {"DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1"}
    chat = [CHATRLHF, "chat", "--path", str(ppo), "--greedy", "--max_new_tokens", "8"]
    refused = subprocess.run(chat, input="hello\n", capture_output=True, text=True, timeout=120, env=env)
    assert refused.returncode == 2 and FLAG in refused.stderr and "Traceback" not in refused.stderr
    r = subprocess.run([*chat, FLAG], input="hello\nhow are you\n", capture_output=True, text=True, timeout=120,
                       env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("Assistant:") == 2, r.stdout
