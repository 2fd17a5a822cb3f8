"""Bad input, as a careless or hostile user gives it: datasets, config files, CLI flags and model folders.

Every case runs the CLI in-process (``chatrlhf.cli.main(argv)``) and asserts: exit code 2; one error line naming
the file/row/field or the flag (checked on its text); no traceback; nothing on disk changed -- no input file, the
shared model and data, and an earlier run's output dir are snapshotted (mtimes, sizes, hashes) before and after,
and an output dir that did not exist is not created. Set-up is shared (one tiny model, one reward model, one data
dir, built once for the module); each case only writes its own broken file into a fresh directory.

The cases are plain data (``CASES``: id, set-up function -> argv, expected texts) so ``outcome()`` can also tally
them against another checkout. HTTP cases live with the server's tests.
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from chatrlhf.cli import main as cli_main

GOOD = {"prompt": " Human: Name a fruit. Assistant:", "chosen": " Apple.", "rejected": " Chair."}


# ------------------------------------------------------------------------------------------------ shared world
@dataclass
class World:
    root: Path
    model: Path  # tiny OPT: vocab 512, 512 positions
    rm: Path  # a reward model saved from it (chatrlhf_reward block + v_head)
    data: Path  # local/jsonfile dir: data/train.json, data/eval.json
    cache: Path  # tokenized-data cache (a cache, not an input: not snapshotted)
    prev_out: Path  # an earlier run's output dir: must come through every case untouched

    def shared_inputs(self) -> list[Path]:
        return [self.model, self.rm, self.data, self.prev_out]


def build_world(root: Path, model: Path, task_data: Path) -> World:
    from chatrlhf.models.loading import load_tokenizer
    from chatrlhf.models.reward_model import load_reward_model

    root.mkdir(parents=True, exist_ok=True)
    rm = root / "rm"
    load_reward_model(model).save_pretrained(rm)
    load_tokenizer(model).save_pretrained(rm)
    data = root / "pairs"
    shutil.copytree(task_data / "data", data / "data")
    prev = root / "earlier_run"
    prev.mkdir()
    (prev / "done.json").write_text(json.dumps({"step": "sft", "metrics": {"global_step": 7}}))
    (prev / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    (prev / "notes.txt").write_text("an earlier run's output\n")
    return World(root, Path(model), rm, data, root / "cache", prev)


@pytest.fixture(scope="module")
def world(tiny_model_dir, task_data_dir, tmp_path_factory) -> World:
    return build_world(tmp_path_factory.mktemp("bad_inputs"), tiny_model_dir, task_data_dir)


# ------------------------------------------------------------------------------------------------ argv builders
def _common(w: World, out: Path | None) -> list[str]:
    return ["--data_output_path", str(w.cache), "--output_dir", str(out or w.prev_out), "--dtype", "fp32",
            "--resume", "never"]


def sft(w: World, *extra, model=None, data=None, out=None) -> list[str]:
    return ["sft", "--model_name_or_path", str(model or w.model), "--data_path", str(data or w.data),
            "--data_split", "10,0,0", "--max_seq_len", "64", "--per_device_train_batch_size", "8",
            *_common(w, out), *map(str, extra)]


def reward(w: World, *extra, model=None, data=None, out=None) -> list[str]:
    return ["reward", "--model_name_or_path", str(model or w.model), "--data_path", str(data or w.data),
            "--data_split", "0,10,0", "--max_seq_len", "64", "--per_device_train_batch_size", "8",
            *_common(w, out), *map(str, extra)]


def dpo(w: World, *extra) -> list[str]:
    return ["dpo", "--model_name_or_path", str(w.model), "--data_path", str(w.data), "--data_split", "0,10,0",
            "--max_seq_len", "64", "--per_device_train_batch_size", "8", *_common(w, None), *map(str, extra)]


def ppo(w: World, *extra, actor=None, critic=None, data=None) -> list[str]:
    return ["ppo", "--actor_model_name_or_path", str(actor or w.model), "--critic_model_name_or_path",
            str(critic or w.rm), "--data_path", str(data or w.data), "--data_split", "0,0,10",
            "--max_prompt_seq_len", "32", "--max_answer_seq_len", "8", "--per_device_generation_batch_size", "4",
            "--per_device_training_batch_size", "4", "--max_steps", "2", *_common(w, None), *map(str, extra)]


def train(w: World, d: Path, *extra) -> list[str]:
    return ["train", "--actor_model", str(w.model), "--reward_model", str(w.model), "--data_path", str(w.data),
            "--output_dir", str(d / "run"), "--dry_run", *map(str, extra)]


# ------------------------------------------------------------------------------------------------ case helpers
def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def jsonl(path: Path, rows: list) -> Path:
    return write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def rows_with(bad, n_good: int = 2, n_after: int = 1) -> list:
    """Good rows around one bad row, which is row n_good + 1."""
    return [GOOD] * n_good + [bad] + [GOOD] * n_after


def plain_rows(n: int) -> list[dict]:
    """Rows whose prompts are plain questions (the template is applied): detected as the gptj-pairwise adapter,
    which requires 'rejected'."""
    return [{"prompt": f"What is {i} plus one?", "chosen": f"It is {i + 1}.", "rejected": "No idea."} for i in range(n)]


def model_copy(w: World, d: Path, src: Path | None = None) -> Path:
    return Path(shutil.copytree(src or w.model, d / "model"))


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _weights(m: Path) -> Path:
    return m / "model.safetensors"


class _Payload:
    """Unpickling this creates MARKER: proof that a pickle was (not) loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


# ------------------------------------------------------------------------------------------------ the cases
@dataclass
class Case:
    id: str
    setup: Callable[[World, Path], list[str]]  # (world, this case's fresh dir) -> argv
    expect: tuple[str, ...]  # texts the one error line must hold
    absent: tuple[str, ...] = ()  # paths (relative to the case dir) that must not exist afterwards


CASES: list[Case] = []


def case(id: str, expect, absent=()):
    def register(fn):
        CASES.append(Case(id, fn, tuple([expect] if isinstance(expect, str) else expect), tuple(absent)))
        return fn
    return register


def flag_case(id: str, builder, extra, expect, **kw):
    CASES.append(Case(id, lambda w, d: builder(w, *extra, **kw), tuple([expect] if isinstance(expect, str) else
                                                                          expect)))


# ---- CLI flags: every field's type and range, checked when parsed ----------------------------------------------
for _id, _extra, _expect in [
    ("epochs_zero", ["--num_train_epochs", 0], "--num_train_epochs must be >= 1, got 0"),
    ("lr_negative", ["--learning_rate", -1], "--learning_rate must be > 0, got -1.0"),
    ("lr_zero", ["--learning_rate", 0], "--learning_rate must be > 0"),
    ("lr_nan", ["--learning_rate", "nan"], "--learning_rate must be > 0, got nan"),
    ("lr_inf", ["--learning_rate", "inf"], "--learning_rate must be"),
    ("lr_not_a_number", ["--learning_rate", "fast"], ("--learning_rate", "invalid float value: 'fast'")),
    ("batch_zero", ["--per_device_train_batch_size", 0], "--per_device_train_batch_size must be >= 1"),
    ("batch_fraction", ["--per_device_train_batch_size", 8.5], ("--per_device_train_batch_size",
                                                                 "invalid int value: '8.5'")),
    ("eval_batch_negative", ["--per_device_eval_batch_size", -4], "--per_device_eval_batch_size must be >= 1"),
    ("grad_accum_zero", ["--gradient_accumulation_steps", 0], "--gradient_accumulation_steps must be >= 1"),
    ("save_interval_negative", ["--save_interval", -1], "--save_interval must be >= 0, got -1"),
    ("eval_interval_negative", ["--eval_interval", -5], "--eval_interval must be >= 0"),
    ("eval_iters_negative", ["--eval_iters", -1], "--eval_iters must be >= 0"),
    ("max_steps_zero", ["--max_steps", 0], "--max_steps must be >= 1 (or -1"),
    ("max_steps_minus_two", ["--max_steps", -2], "--max_steps must be >= 1"),
    ("warmup_negative", ["--num_warmup_steps", -1], "--num_warmup_steps must be >= 0"),
    ("weight_decay_negative", ["--weight_decay", -0.1], "--weight_decay must be >= 0"),
    ("dropout_above_one", ["--dropout", 1.5], "--dropout must be in [0, 1), got 1.5"),
    ("dropout_negative", ["--dropout", -0.1], "--dropout must be in [0, 1)"),
    ("zero_stage_4", ["--zero_stage", 4], "--zero_stage must be one of 0, 1, 2, 3, got 4"),
    ("scheduler_unknown", ["--lr_scheduler_type", "triangular"], ("--lr_scheduler_type must be one of", "cosine",
                                                                   "'triangular'")),
    ("dtype_unknown", ["--dtype", "fp64"], "--dtype must be one of auto, fp32, bf16, fp16, got 'fp64'"),
    ("seed_negative", ["--seed", -1], "--seed must be in [0, 4294967295]"),
    ("seed_too_big", ["--seed", 2 ** 40], "--seed must be in [0, 4294967295]"),
    ("lora_dim_negative", ["--lora_dim", -8], "--lora_dim must be >= 0"),
    ("lora_lr_zero", ["--lora_learning_rate", 0], "--lora_learning_rate must be > 0"),
    ("keep_last_negative", ["--keep_last_checkpoints", -1], "--keep_last_checkpoints must be >= 0"),
    ("grad_clip_negative", ["--gradient_clipping", -1], "--gradient_clipping must be >= 0"),
    ("max_seq_len_zero", ["--max_seq_len", 0], "--max_seq_len must be >= 1, got 0"),
    ("max_seq_len_beyond_positions", ["--max_seq_len", 4096], ("--max_seq_len 4096 is longer than the model's 512 "
                                                               "positions", "--model_name_or_path")),
    ("max_prompt_seq_len_zero", ["--max_prompt_seq_len", 0], "--max_prompt_seq_len must be >= 1"),
    ("bool_given_5", ["--gradient_checkpointing", 5], ("--gradient_checkpointing", "Truthy value expected: got 5")),
    ("data_split_two_shares", ["--data_split", "1,2"], "--data_split '1,2': expected 3 shares"),
    ("data_split_zero", ["--data_split", "0,0,0"], "--data_split '0,0,0': shares sum to 0"),
    ("data_split_words", ["--data_split", "a,b,c"], "--data_split 'a,b,c': expected three comma-separated"),
    ("kwise_k_one", ["--kwise_k", 1], "--kwise_k must be >= 2 (or 0"),
    ("local_rank_minus_two", ["--local_rank", -2], "--local_rank must be >= -1"),
    ("log_interval_negative", ["--log_interval", -1], "--log_interval must be >= 0"),
    ("unknown_flag", ["--learnin_rate", 3], "unrecognized arguments: --learnin_rate (did you mean --learning_rate?)"),
    ("flag_without_value", ["--learning_rate"], ("--learning_rate", "expected one argument")),
    ("eot_token_empty", ["--add_eot_token", "--eot_token", ""], "--add_eot_token needs a non-empty --eot_token"),
]:
    flag_case(f"flag-sft-{_id}", sft, _extra, _expect)

for _id, _builder, _extra, _expect in [
    ("reward-loss_unknown", reward, ["--loss", "hinge"], "--loss must be one of pairwise, last_token, got 'hinge'"),
    ("reward-padding_minus_two", reward, ["--num_padding_at_beginning", -2], "--num_padding_at_beginning must be >= 0"),
    ("reward-lr_negative", reward, ["--learning_rate", -1e-5], "--learning_rate must be > 0"),
    ("dpo-beta_zero", dpo, ["--beta", 0], "--beta must be > 0, got 0.0"),
    ("dpo-beta_negative", dpo, ["--beta", -1], "--beta must be > 0"),
    ("dpo-label_smoothing_half", dpo, ["--label_smoothing", 0.5], "--label_smoothing must be in [0, 0.5), got 0.5"),
    ("ppo-temperature_negative", ppo, ["--temperature", -1], "--temperature must be >= 0, got -1.0"),
    ("ppo-top_p_2", ppo, ["--top_p", 2], "--top_p must be in (0, 1], got 2.0"),
    ("ppo-top_p_0", ppo, ["--top_p", 0], "--top_p must be in (0, 1]"),
    ("ppo-top_k_negative", ppo, ["--top_k", -1], "--top_k must be >= 0"),
    ("ppo-gamma_above_one", ppo, ["--gamma", 1.5], "--gamma must be in [0, 1]"),
    ("ppo-lam_negative", ppo, ["--lam", -0.1], "--lam must be in [0, 1]"),
    ("ppo-cliprange_zero", ppo, ["--cliprange", 0], "--cliprange must be > 0"),
    ("ppo-kl_ctl_negative", ppo, ["--kl_ctl", -1], "--kl_ctl must be >= 0"),
    ("ppo-ppo_epochs_zero", ppo, ["--ppo_epochs", 0], "--ppo_epochs must be >= 1"),
    ("ppo-algo_unknown", ppo, ["--algo", "dpo"],
     "--algo must be one of ppo, grpo, rloo, reinforce_pp, reinforce_pp_baseline, got 'dpo'"),
    ("ppo-kl_estimator_unknown", ppo, ["--kl_estimator", "k9"], "--kl_estimator must be one of k1, k2, k3"),
    ("ppo-actor_zero_stage_5", ppo, ["--actor_zero_stage", 5], "--actor_zero_stage must be one of 0, 1, 2, 3"),
    ("ppo-grpo_one_sample", ppo, ["--algo", "grpo", "--num_samples_per_prompt", 1],
     "--algo grpo needs --num_samples_per_prompt >= 2"),
    ("ppo-answer_len_zero", ppo, ["--max_answer_seq_len", 0], "--max_answer_seq_len must be >= 1"),
    ("ppo-ema_beta_2", ppo, ["--ema_beta", 2], "--ema_beta must be in [0, 1]"),
    ("ppo-critic_lr_zero", ppo, ["--critic_learning_rate", 0], "--critic_learning_rate must be > 0"),
    ("ppo-min_new_tokens_over_max", ppo, ["--min_new_tokens", 300],
     "--min_new_tokens 300 cannot exceed --max_answer_seq_len 8"),
    ("ppo-reward_normalization_unknown", ppo, ["--reward_normalization", "zscore"],
     "--reward_normalization must be one of none, normalize, scale"),
    ("ppo-generation_batch_zero", ppo, ["--per_device_generation_batch_size", 0],
     "--per_device_generation_batch_size must be >= 1"),
    ("ppo-generation_batches_zero", ppo, ["--generation_batches", 0], "--generation_batches must be >= 1"),
    ("ppo-unsup_coef_negative", ppo, ["--unsup_coef", -1], "--unsup_coef must be >= 0"),
    ("ppo-max_consecutive_skips_zero", ppo, ["--max_consecutive_skips", 0], "--max_consecutive_skips must be >= 1"),
    ("ppo-lengths_beyond_positions", ppo, ["--max_prompt_seq_len", 256, "--max_answer_seq_len", 400],
     ("--max_prompt_seq_len + --max_answer_seq_len = 656 is longer than the model's 512 positions",
      "--actor_model_name_or_path")),
]:
    flag_case(f"flag-{_id}", _builder, _extra, _expect)


@case("flag-ppo-no_critic", "--critic_model_name_or_path is required")
def _(w, d):
    argv = ppo(w)
    i = argv.index("--critic_model_name_or_path")
    return argv[:i] + argv[i + 2:]


@case("flag-output_dir_under_a_file", ("--output_dir", "is a regular file, so no directory can be made under it"))
def _(w, d):
    write(d / "afile", "x")
    return sft(w, out=d / "afile" / "run")


@case("flag-output_dir_is_a_file", ("--output_dir", "exists and is not a directory"))
def _(w, d):
    return sft(w, out=write(d / "afile", "x"))


@case("flag-data_output_path_under_a_file", ("--data_output_path", "is a regular file"))
def _(w, d):
    write(d / "afile", "x")
    return sft(w, "--data_output_path", d / "afile" / "cache")


@case("flag-train-step_4", "--step takes numbers from 1 2 3, got 4", absent=("run",))
def _(w, d):
    return train(w, d, "--step", 4)


@case("flag-train-zero_stage_7", "--actor_zero_stage must be 0, 1, 2 or 3, got 7", absent=("run",))
def _(w, d):
    return train(w, d, "--actor_zero_stage", 7)


@case("flag-train-num_gpus_zero", "--num_gpus must be at least 1, got 0", absent=("run",))
def _(w, d):
    return train(w, d, "--num_gpus", 0)


@case("flag-train-section_epochs_zero", "--num_train_epochs must be >= 1, got 0", absent=("run",))
def _(w, d):
    return train(w, d, "--sft", "{num_train_epochs: 0}")


@case("flag-train-section_batch_string", "--per_device_train_batch_size must be an integer, got '8' (a string",
      absent=("run",))
def _(w, d):
    return train(w, d, "--reward", "{per_device_train_batch_size: '8'}")


@case("flag-train-section_temperature", "--temperature must be >= 0, got -1.0", absent=("run",))
def _(w, d):
    return train(w, d, "--ppo", "{temperature: -1}")


# ---- config files ---------------------------------------------------------------------------------------------
for _id, _name, _text, _expect in [
    ("empty", "c.yaml", "", "c.yaml: the config file is empty"),
    ("only_comments", "c.yaml", "# nothing here\n\n", "c.yaml: the config file is empty"),
    ("list_at_top", "c.yaml", "- learning_rate: 1\n", "c.yaml: a config file must hold a mapping"),
    ("scalar_at_top", "c.yaml", "just words\n", "c.yaml: a config file must hold a mapping"),
    ("malformed_yaml", "c.yaml", "learning_rate: [1, 2\n", "c.yaml: cannot parse config: line 2"),
    ("malformed_json", "c.json", '{"learning_rate": }', "c.json: cannot parse config: line 1, column 19"),
    ("unknown_key", "c.yaml", "lerning_rate: 0.1\n", "c.yaml: unknown option(s) lerning_rate"),
    ("batch_as_string", "c.yaml", "per_device_eval_batch_size: '8'\n",
     "c.yaml: per_device_eval_batch_size: must be an integer, got '8' (a string; write the number without quotes)"),
    ("batch_fraction", "c.yaml", "per_device_eval_batch_size: 8.5\n",
     "c.yaml: per_device_eval_batch_size: must be an integer, got 8.5"),
    ("batch_zero", "c.yaml", "per_device_eval_batch_size: 0\n", "c.yaml: per_device_eval_batch_size: must be >= 1"),
    ("bool_as_5", "c.yaml", "gradient_checkpointing: 5\n", "c.yaml: gradient_checkpointing: must be true or false, got 5"),
    ("bool_as_string", "c.json", '{"offload": "yes"}', "c.json: offload: must be true or false, got 'yes'"),
    ("lr_word", "c.yaml", "learning_rate: fast\n", "c.yaml: learning_rate: must be a number, got 'fast'"),
    ("lr_negative", "c.yaml", "learning_rate: -1\n", "c.yaml: learning_rate: must be > 0, got -1.0"),
    ("lr_null", "c.yaml", "learning_rate:\n", "c.yaml: learning_rate: must be a number, got null"),
    ("lr_nan", "c.yaml", "learning_rate: .nan\n", "c.yaml: learning_rate: must be a finite number"),
    ("epochs_zero", "c.yaml", "num_train_epochs: 0\n", "c.yaml: num_train_epochs: must be >= 1, got 0"),
    ("zero_stage_string", "c.yaml", "zero_stage: '2'\n", "c.yaml: zero_stage: must be an integer, got '2'"),
    ("data_split_list", "c.yaml", "data_split: [2, 4, 4]\n", "c.yaml: data_split: must be a string, got [2, 4, 4]"),
    ("list_field_number", "c.yaml", "sft_only_data_path: 5\n", "c.yaml: sft_only_data_path: must be a list of strings"),
    ("list_item_number", "c.yaml", "sft_only_data_path: [a, 3]\n",
     "c.yaml: sft_only_data_path: must be a list of strings, got [\"a\", 3] (a list; item 2 is 3)"),
    ("mapping_for_int", "c.yaml", "eval_iters: {a: 1}\n", "c.yaml: eval_iters: must be an integer, got {\"a\": 1}"),
    ("duplicate_key", "c.yaml", "learning_rate: 0.1\nweight_decay: 0\nlearning_rate: 0.2\n",
     "c.yaml: cannot parse config: line 3, column 1: key 'learning_rate' appears twice (first on line 1)"),
    ("duplicate_key_json", "c.json", '{"eval_iters": 1, "eval_iters": 2}',
     "c.json: cannot parse config: key 'eval_iters' appears twice"),
    ("not_utf8", "c.yaml", b"learning_rate: 0.1\nlora_module_name: caf\xe9\n",
     "c.yaml: not UTF-8 text (bad byte 0xe9 on line 2)"),
]:
    CASES.append(Case(f"config-{_id}", (lambda name, text: lambda w, d: sft(w, "--config", write(d / name, text)))(
        _name, _text), (_expect,)))


@case("config-python_tag_runs_nothing", ("c.yaml: cannot parse config", "python/object/apply:os.system"),
      absent=("pwned",))
def _(w, d):
    return sft(w, "--config", write(d / "c.yaml", f"learning_rate: !!python/object/apply:os.system "
                                                  f"['touch {d / 'pwned'}']\n"))


@case("config-is_a_directory", "is a directory, not a config file")
def _(w, d):
    (d / "conf").mkdir()
    return sft(w, "--config", d / "conf")


@case("config-missing", "config file not found")
def _(w, d):
    return sft(w, "--config", d / "nope.yaml")


@case("config-train_section_bad", "--per_device_train_batch_size must be >= 1, got 0", absent=("run",))
def _(w, d):
    return train(w, d, "--config", write(d / "p.yaml", "sft:\n  per_device_train_batch_size: 0\n"))


# ---- datasets -------------------------------------------------------------------------------------------------
def data_case(id: str, rows_or_text, expect, step=sft, name="rows.jsonl", extra=()):
    def setup(w, d):
        path = d / name
        if isinstance(rows_or_text, list):
            jsonl(path, rows_or_text) if name.endswith(".jsonl") else write(path, json.dumps(rows_or_text))
        else:
            write(path, rows_or_text)
        return step(w, *extra, data=path)
    CASES.append(Case(f"data-{id}", setup, tuple([expect] if isinstance(expect, str) else expect)))


data_case("empty_jsonl", "", ("rows.jsonl", "dataset has no rows"))
data_case("blank_lines_only", "\n  \n\n", ("rows.jsonl", "dataset has no rows"))
data_case("empty_json_list", [], ("rows.json", "dataset has no rows"), name="rows.json")
data_case("malformed_line", json.dumps(GOOD) + "\n" + json.dumps(GOOD) + '\n{"prompt": "x", "chosen": }\n',
          ("rows.jsonl, row 3", "malformed JSON line"))
data_case("malformed_json_file", '[{"prompt": "x",', ("rows.json", "malformed JSON"), name="rows.json")
data_case("object_not_list", '{"prompt": "x"}', ("rows.json", "expected a JSON list of objects"), name="rows.json")
data_case("row_is_a_list", rows_with(["not", "an", "object"]), "rows.jsonl, row 3: expected a JSON object, got list")
data_case("row_is_a_number", rows_with(7), "rows.jsonl, row 3: expected a JSON object, got int")
data_case("missing_chosen", rows_with({"prompt": GOOD["prompt"], "rejected": " no"}),
          "rows.jsonl, row 3, field 'chosen': is missing")
data_case("chosen_int", rows_with({**GOOD, "chosen": 42}), "rows.jsonl, row 3, field 'chosen': must be a string, got int")
data_case("chosen_list", rows_with({**GOOD, "chosen": ["a", "b"]}),
          "rows.jsonl, row 3, field 'chosen': must be a string, got list")
data_case("chosen_nan", rows_with({**GOOD, "chosen": math.nan}),
          "rows.jsonl, row 3, field 'chosen': must be a string, got float")
data_case("empty_prompt", rows_with({**GOOD, "prompt": ""}), "rows.jsonl, row 3, field 'prompt': is empty")
data_case("blank_prompt_first_row", rows_with({**GOOD, "prompt": "   "}, n_good=0, n_after=3),
          "rows.jsonl, row 1, field 'prompt': is empty")
data_case("null_prompt", rows_with({**GOOD, "prompt": None}), "rows.jsonl, row 3, field 'prompt': is missing (null)")
data_case("empty_chosen", rows_with({**GOOD, "chosen": " "}), "rows.jsonl, row 3, field 'chosen': is empty")
data_case("null_rejected", plain_rows(3) + [{"prompt": "Why?", "chosen": "Because.", "rejected": None}],
          "rows.jsonl, row 4, field 'rejected': is missing (null)", step=reward)
data_case("chosen_equals_rejected", rows_with({**GOOD, "rejected": GOOD["chosen"]}, n_good=4),
          ("rows.jsonl, row 5, field 'rejected': is the same text as 'chosen'", "--skip_bad_rows"), step=reward)
data_case("all_pairs_identical", [{**GOOD, "prompt": f" Human: q{i} Assistant:", "rejected": GOOD["chosen"]}
                                  for i in range(6)],
          "field 'rejected': is the same text as 'chosen'", step=reward)
data_case("duplicate_key", '{"prompt": " Human: a Assistant:", "chosen": " x", "rejected": " y"}\n'
                           '{"prompt": " Human: b Assistant:", "chosen": " x", "chosen": " z", "rejected": " y"}\n',
          "rows.jsonl, row 2, field 'chosen': appears twice in this object")
data_case("huge_field", rows_with({**GOOD, "chosen": " " + "a" * 1_200_000}),
          "rows.jsonl, row 3, field 'chosen': is 1,200,001 characters long, more than the 1,000,000")
data_case("unknown_schema", [{"instruction": "x", "output": "y"}] * 3,
          ("rows.jsonl", "columns ['instruction', 'output'] match no dataset adapter"))
data_case("mkqa_ambiguous", [{"queries": {"ja": "a", "zh_cn": "b"}, "answers": {"ja": [{"text": "c"}]}}] * 2,
          ("mkqa-Chinese", "mkqa-Japanese"))
data_case("inconsistent_prompt_styles", [GOOD, {"prompt": "plain question", "chosen": "x", "rejected": "y"}, GOOD],
          ("rows.jsonl, row 2, field 'prompt'", "some prompts end with 'Assistant:'"))
data_case("kwise_one_answer", [{"prompt": " Human: a Assistant:", "answers": [" x", " y"]},
                               {"prompt": " Human: b Assistant:", "answers": [" only one"]}],
          "rows.jsonl, row 2, field 'answers': a k-wise ranking needs at least 2 answers, got 1", step=reward,
          extra=("--kwise",))
data_case("kwise_sizes_differ", [{"prompt": f" Human: q{i} Assistant:", "answers": [" x", " y", " z"][:2 + i % 2]}
                                 for i in range(8)],
          ("rows.jsonl, row", "field 'answers'", "different numbers of answers", "--kwise_k"), step=reward,
          extra=("--kwise",))
data_case("sft_only_for_reward", [{"prompt": f" Human: q{i} Assistant:", "chosen": " x"} for i in range(6)],
          "phase 2: no training data: its 6 rows have no rejected answer", step=reward)
data_case("prompts_fill_max_seq_len", [{**GOOD, "prompt": " Human: " + "tell me a story " * 40 + "Assistant:"}] * 6,
          ("phase 1: all", "rows were filtered out", "first: ", "rows.jsonl, row", "raise --max_seq_len"))
data_case("prompts_too_long_for_ppo", [{**GOOD, "prompt": " Human: " + "tell me a story " * 40 + "Assistant:"}] * 6,
          ("phase 3: all", "dropped_prompt_too_long", "rows.jsonl, row", "raise --max_prompt_seq_len"), step=ppo)
data_case("shp_label_2", [{"history": "Why?", "human_ref_A": "a", "human_ref_B": "b", "labels": 2}],
          "rows.jsonl, row 1, field 'labels': must be 0 or 1, got 2")
data_case("webgpt_score_word", [{"question": {"full_text": "Q?"}, "answer_0": "a", "answer_1": "b",
                                 "score_0": "high", "score_1": 0}],
          "rows.jsonl, row 1, field 'score_0': must be a number, got 'high'")
data_case("nested_field_missing", [{"question": {}, "answer_0": "a", "answer_1": "b", "score_0": 1, "score_1": 0}],
          "rows.jsonl, row 1, field 'question.full_text': is missing")
data_case("unsupported_extension", "prompt,chosen\nq,a\n", ("rows.csv", "unsupported file type '.csv'"),
          name="rows.csv")
data_case("garbage_parquet", b"this is not parquet", ("rows.parquet", "cannot read parquet"), name="rows.parquet")
data_case("data_split_gives_no_rows", rows_with(dict(GOOD)), "--data_split 10,0,0 gives step 2 no rows",
          step=reward, extra=("--data_split", "10,0,0"))


@case("data-not_utf8_jsonl", ("rows.jsonl, row 2, field 'chosen'", "not valid UTF-8"))
def _(w, d):
    raw = (json.dumps(GOOD) + "\n" + json.dumps({**GOOD, "chosen": " Appl\u00e9"}) + "\n").encode()
    return sft(w, data=write(d / "rows.jsonl", raw.replace(b"\\u00e9", b"\xe9")))  # a Latin-1 byte


@case("data-not_utf8_json", ("rows.json, row 3, field 'rejected'", "not valid UTF-8"))
def _(w, d):
    raw = json.dumps([GOOD, GOOD, {**GOOD, "rejected": " Ch\\u00e9ir"}]).encode().replace(b"\\\\u00e9", b"\xff")
    return sft(w, data=write(d / "rows.json", raw))


@case("data-missing_path", ("nowhere.jsonl", "no such file or directory"))
def _(w, d):
    return sft(w, data=d / "nowhere.jsonl")


@case("data-empty_dir", "directory holds no .jsonl/.json/.parquet data files")
def _(w, d):
    (d / "empty").mkdir()
    return sft(w, data=d / "empty")


@case("data-unknown_name", ("unknown dataset name 'Nobody/such-dataset'", "Dahoas/rm-static"))
def _(w, d):
    return sft(w, data="Nobody/such-dataset")


@case("data-unknown_adapter_in_name_path", "unknown dataset name 'Nobody/such' in NAME=PATH")
def _(w, d):
    return sft(w, data=f"Nobody/such={jsonl(d / 'rows.jsonl', [GOOD])}")


@case("data-model_dir_as_data", ("cannot tell the split of", "config.json", "name files by split"))
def _(w, d):
    return sft(w, data=w.model)


# ---- model folders -------------------------------------------------------------------------------------------
@case("model-missing_dir", ("--model_name_or_path", "no_model", "no such model directory"))
def _(w, d):
    return sft(w, model=d / "no_model")


@case("model-is_a_file", ("--model_name_or_path", "not a directory"))
def _(w, d):
    return sft(w, model=write(d / "model.bin", b"x"))


@case("model-no_config", ("--model_name_or_path", "not a model directory (no config.json)"))
def _(w, d):
    m = model_copy(w, d)
    (m / "config.json").unlink()
    return sft(w, model=m)


@case("model-config_not_json", ("config.json: not valid JSON",))
def _(w, d):
    m = model_copy(w, d)
    write(m / "config.json", "{ nope")
    return sft(w, model=m)


@case("model-config_a_list", "config.json: not a model config")
def _(w, d):
    m = model_copy(w, d)
    write(m / "config.json", "[1, 2]")
    return sft(w, model=m)


@case("model-unknown_model_type", "unknown or unsupported model_type 'no_such_arch'")
def _(w, d):
    m = model_copy(w, d)
    edit_json(m / "config.json", model_type="no_such_arch")
    return sft(w, model=m)


@case("model-no_weights", ("--model_name_or_path", "no model weights", "found config.json"))
def _(w, d):
    m = model_copy(w, d)
    _weights(m).unlink()
    return sft(w, model=m)


@case("model-only_pickle", ("holds only pickled PyTorch weights (pytorch_model.bin)", "never loads pickles",
                            "safetensors"), absent=("unpickled",))
def _(w, d):
    m = model_copy(w, d)
    _weights(m).unlink()
    with open(m / "pytorch_model.bin", "wb") as f:
        pickle.dump(_Payload(d / "unpickled"), f)
    return sft(w, model=m)


@case("model-pickle_index_only", "holds only pickled PyTorch weights", absent=("unpickled",))
def _(w, d):
    m = model_copy(w, d)
    _weights(m).unlink()
    write(m / "pytorch_model.bin.index.json", json.dumps({"weight_map": {"x": "pytorch_model-1.bin"}}))
    with open(m / "pytorch_model-1.bin", "wb") as f:
        pickle.dump(_Payload(d / "unpickled"), f)
    return sft(w, model=m)


@case("model-truncated_weights", ("model.safetensors: truncated safetensors file", "the file has 5000"))
def _(w, d):
    m = model_copy(w, d)
    _weights(m).write_bytes(_weights(m).read_bytes()[:5000])
    return sft(w, model=m)


@case("model-weights_cut_by_one_byte", "model.safetensors: truncated safetensors file")
def _(w, d):
    m = model_copy(w, d)
    _weights(m).write_bytes(_weights(m).read_bytes()[:-1])
    return sft(w, model=m)


@case("model-empty_weights_file", "model.safetensors: truncated or corrupt safetensors file (no valid header")
def _(w, d):
    m = model_copy(w, d)
    _weights(m).write_bytes(b"")
    return sft(w, model=m)


@case("model-corrupt_header", "model.safetensors: corrupt safetensors file (its header is not valid JSON)")
def _(w, d):
    m = model_copy(w, d)
    b = bytearray(_weights(m).read_bytes())
    b[10:30] = b"\xff" * 20
    _weights(m).write_bytes(bytes(b))
    return sft(w, model=m)


@case("model-header_length_huge", "model.safetensors: truncated or corrupt safetensors file")
def _(w, d):
    m = model_copy(w, d)
    b = bytearray(_weights(m).read_bytes())
    b[:8] = (2 ** 62).to_bytes(8, "little")
    _weights(m).write_bytes(bytes(b))
    return sft(w, model=m)


@case("model-bad_tensor_entry", ("model.safetensors: corrupt safetensors file (bad header entry for tensor",))
def _(w, d):
    m = model_copy(w, d)
    raw = _weights(m).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [header[name]["shape"][0] * 2] + header[name]["shape"][1:]
    new = json.dumps(header).encode()
    new += b" " * (n - len(new)) if len(new) <= n else b""
    _weights(m).write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])
    return sft(w, model=m)


@case("model-nan_weights", ("holds NaN or Inf values", "a corrupt weights file?"))
def _(w, d):
    from safetensors.torch import load_file, save_file

    m = model_copy(w, d)
    sd = load_file(str(_weights(m)))
    sd[sorted(sd)[0]].fill_(float("nan"))
    save_file(sd, str(_weights(m)), metadata={"format": "pt"})
    return sft(w, model=m)


@case("model-vocab_edited_in_config", ("model.safetensors stores", "shape [512, 64]", "config.json builds [600, 64]"))
def _(w, d):
    m = model_copy(w, d)
    edit_json(m / "config.json", vocab_size=600)
    return sft(w, model=m)


@case("model-hidden_edited_in_config", ("model.safetensors stores", "config.json builds"))
def _(w, d):
    m = model_copy(w, d)
    edit_json(m / "config.json", ffn_dim=128)
    return sft(w, model=m)


@case("model-tokenizer_from_bigger_vocab", ("--model_name_or_path", "the tokenizer's vocabulary has",
                                            "the model's embedding has 512 rows"))
def _(w, d):
    m = model_copy(w, d)
    tok = json.loads((m / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    for i in range(200):
        vocab[f"zzextra{i}"] = len(vocab)
    (m / "tokenizer.json").write_text(json.dumps(tok))
    return sft(w, model=m)


@case("model-no_tokenizer", "no tokenizer files")
def _(w, d):
    m = model_copy(w, d)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json"):
        (m / f).unlink(missing_ok=True)
    return sft(w, model=m)


@case("model-corrupt_tokenizer", ("--model_name_or_path", "cannot load the tokenizer"))
def _(w, d):
    m = model_copy(w, d)
    write(m / "tokenizer.json", "{ not json")
    return sft(w, model=m)


@case("model-missing_shard", ("model.safetensors.index.json: names shard(s) that are missing",
                              "model-00002-of-00002.safetensors"))
def _(w, d):
    m = model_copy(w, d)
    _weights(m).rename(m / "model-00001-of-00002.safetensors")
    write(m / "model.safetensors.index.json", json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    return sft(w, model=m)


@case("model-shard_outside_dir", "which is not a file in the model directory")
def _(w, d):
    m = model_copy(w, d)
    _weights(m).unlink()
    write(m / "model.safetensors.index.json", json.dumps({"weight_map": {"a": "../../etc/passwd"}}))
    return sft(w, model=m)


@case("model-index_not_json", "model.safetensors.index.json: not a valid safetensors index")
def _(w, d):
    m = model_copy(w, d)
    _weights(m).unlink()
    write(m / "model.safetensors.index.json", "{")
    return sft(w, model=m)


@case("model-reward_truncated", ("--model_name_or_path", "truncated safetensors file"))
def _(w, d):
    m = model_copy(w, d)
    _weights(m).write_bytes(_weights(m).read_bytes()[:-100])
    return reward(w, model=m)


@case("model-ppo_critic_without_value_head", ("--critic_model_name_or_path", "not a trained reward model",
                                              "chatrlhf reward"))
def _(w, d):
    return ppo(w, critic=w.model)


@case("model-ppo_reward_without_value_head", ("--reward_model_name_or_path", "not a trained reward model"))
def _(w, d):
    return ppo(w, "--reward_model_name_or_path", w.model)


@case("model-ppo_value_head_weights_missing", ("--critic_model_name_or_path", "without a value head"))
def _(w, d):
    from safetensors.torch import load_file, save_file

    m = model_copy(w, d, w.rm)
    sd = load_file(str(_weights(m)))
    del sd["v_head.weight"]
    save_file(sd, str(_weights(m)), metadata={"format": "pt"})
    return ppo(w, critic=m)


@case("model-ppo_truncated_actor", ("--actor_model_name_or_path", "truncated safetensors file"))
def _(w, d):
    m = model_copy(w, d)
    _weights(m).write_bytes(_weights(m).read_bytes()[:-1000])
    return ppo(w, actor=m)


@case("model-ppo_tokenizers_differ", ("--actor_model_name_or_path", "--critic_model_name_or_path",
                                      "actor and critic tokenizers differ: eos token"))
def _(w, d):
    m = model_copy(w, d, w.rm)
    edit_json(m / "tokenizer_config.json", eos_token="<unk>")
    return ppo(w, critic=m)


@case("model-serve_truncated", "model.safetensors: truncated safetensors file")
def _(w, d):
    m = model_copy(w, d)
    _weights(m).write_bytes(_weights(m).read_bytes()[:-10])
    return ["serve", "--path", str(m)]


@case("model-serve_pickle_only", "holds only pickled PyTorch weights", absent=("unpickled",))
def _(w, d):
    m = model_copy(w, d)
    _weights(m).unlink()
    with open(m / "pytorch_model.bin", "wb") as f:
        pickle.dump(_Payload(d / "unpickled"), f)
    return ["serve", "--path", str(m)]


@case("model-chat_corrupt_header", "corrupt safetensors file")
def _(w, d):
    m = model_copy(w, d)
    b = bytearray(_weights(m).read_bytes())
    b[8:16] = b"\x00" * 8
    _weights(m).write_bytes(bytes(b))
    return ["chat", "--path", str(m)]


# ------------------------------------------------------------------------------------------------ running a case
def snapshot(paths) -> dict[str, tuple]:
    """Every file and directory under ``paths``: (mtime_ns, size, sha256 for files)."""
    out: dict[str, tuple] = {}
    for root in paths:
        root = Path(root)
        if not root.exists():
            out[str(root)] = ("absent",)
            continue
        for p in [root, *sorted(root.rglob("*"))] if root.is_dir() else [root]:
            st = p.lstat()
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            out[str(p)] = (st.st_mtime_ns, st.st_size, digest)
    return out


def run_case(c: Case, w: World, d: Path, capsys=None) -> dict:
    """Run one case; -> {"rc", "err", "out", "exception", "changed", "present"} (no assertions)."""
    d.mkdir(parents=True, exist_ok=True)
    argv = c.setup(w, d)
    watched = w.shared_inputs() + [d]
    before = snapshot(watched)
    exc = None
    rc = None
    try:
        rc = cli_main([str(a) for a in argv])
    except BaseException as e:  # noqa: BLE001 -- a case that escapes the CLI is a finding, not a crash of the run
        exc = f"{type(e).__name__}: {e}"
    out, err = capsys.readouterr() if capsys is not None else ("", "")
    after = snapshot(watched)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    present = [a for a in c.absent if (d / a).exists()]
    return {"rc": rc, "out": out, "err": err, "exception": exc, "changed": changed, "present": present}


def error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("chatrlhf ") and ": error: " in ln]


def outcome(c: Case, r: dict) -> str:
    """clear | traceback | accepted | unclear (exit 2 but not one line holding the expected texts)."""
    if r["exception"] is not None or "Traceback" in r["out"] + r["err"]:
        return "traceback"
    if r["rc"] == 0:
        return "accepted"
    lines = error_lines(r["err"])
    if r["rc"] == 2 and len(lines) == 1 and all(t in lines[0] for t in c.expect):
        return "clear"
    return "unclear"


# ------------------------------------------------------------------------------------------------ the tests
def test_at_least_ninety_cases():
    assert len(CASES) >= 90 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_bad_input(c: Case, world: World, tmp_path, capsys):
    r = run_case(c, world, tmp_path / "case", capsys)
    assert r["exception"] is None, r["exception"]
    assert "Traceback" not in r["out"] + r["err"]
    assert r["rc"] == 2, f"exit code {r['rc']}; stderr: {r['err'][-2000:]}"
    lines = error_lines(r["err"])
    assert len(lines) == 1, r["err"]
    assert r["err"].rstrip().endswith(lines[0])  # the error is the last thing said
    for text in c.expect:
        assert text in lines[0]
    assert not r["changed"], f"changed on disk: {r['changed'][:5]}"
    assert not r["present"], f"created: {r['present']}"


def test_refused_run_leaves_no_output_dir(world: World, tmp_path, capsys):
    """A bad dataset is found after the step made its output dir: the empty dir it made is removed again."""
    out = tmp_path / "fresh_out"
    bad = jsonl(tmp_path / "rows.jsonl", rows_with({**GOOD, "chosen": 3}))
    assert cli_main(sft(world, data=bad, out=out)) == 2
    assert "rows.jsonl, row 3, field 'chosen'" in capsys.readouterr().err
    assert not out.exists()


def _strict_json(text: str):
    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=refuse)


def test_done_json_after_real_training_is_strict_json(world: World, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli_main(sft(world, "--max_steps", 1, out=out)) == 0
    done = _strict_json((out / "done.json").read_text())
    assert done["step"] == "sft" and done["metrics"]["global_step"] == 1


def test_write_done_refuses_zero_steps_and_nulls_non_finite(tmp_path):
    from chatrlhf.errors import UserError
    from chatrlhf.trainers.checkpoints import write_done
    from chatrlhf.trainers.common import finite

    with pytest.raises(UserError, match="no optimizer step was taken.*done.json not written"):
        write_done(tmp_path, "sft", {"global_step": 0, "train_loss": 1.0})
    with pytest.raises(UserError, match=r"ppo: no optimizer step was taken \(no trainable experience\)"):
        write_done(tmp_path, "ppo", {"steps": 0, "stopped_reason": "no trainable experience"})
    assert not (tmp_path / "done.json").exists()
    write_done(tmp_path, "sft", {"global_step": 3, "train_loss": float("nan"), "eval": {"loss": float("inf")},
                                 "ok": 1.5})
    done = _strict_json((tmp_path / "done.json").read_text())
    assert done["metrics"] == {"global_step": 3, "train_loss": None, "eval": {"loss": None}, "ok": 1.5}
    assert done["non_finite_metrics"] == ["train_loss", "eval.loss"]
    assert finite(float("nan")) is None and finite(2) == 2.0


def test_good_config_file_values_are_coerced_not_refused(world: World, tmp_path):
    """The two liberties of the type check: PyYAML reads 1e-4 (no dot) as a string, and a list field may be one
    item."""
    from chatrlhf.config import parse_config
    from chatrlhf.trainers.sft import SFTConfig

    cfg_file = write(tmp_path / "c.yaml", f"learning_rate: 1e-4\nsft_only_data_path: {world.data}\nmax_steps: -1\n")
    cfg = parse_config(SFTConfig, sft(world, "--config", cfg_file)[1:])
    assert cfg.learning_rate == 1e-4 and cfg.sft_only_data_path == [str(world.data)] and cfg.max_steps == -1


@pytest.mark.slow
@pytest.mark.parametrize("extra,expect", [
    (["--num_train_epochs", "0"], "--num_train_epochs must be >= 1, got 0"),
    (["--learning_rate", "-1"], "--learning_rate must be > 0"),
])
def test_subprocess_exit_code_and_one_line(world: World, tmp_path, extra, expect):
    """The real entry point (python -m chatrlhf): exit status 2, one stderr line, nothing written."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "chatrlhf", *sft(world, *extra, out=out)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and expect in proc.stderr.strip().splitlines()[-1]
    assert len(error_lines(proc.stderr)) == 1 and not out.exists()
