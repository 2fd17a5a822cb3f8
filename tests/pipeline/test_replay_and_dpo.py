"""Replaying a run from its resolved_config.yaml (into another output dir, never touching the old run), reruns over
finished steps with other settings, `--recipe dpo` (SFT -> DPO with the report comparing the two actors), and the
small things of issue 17: --no_report's help, done.json's totals, `--step 3` without step 1/2's output, INFO lines
on rank 0 only, clean train.log lines."""

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from chatrlhf import cli
from chatrlhf.apps import pipeline
from chatrlhf.errors import UserError

from .conftest import cli_env, run_cli

QUICK = ("--sft", "{max_steps: 2, per_device_train_batch_size: 4, max_seq_len: 64, eval_iters: 1, dtype: fp32}",
         "--dpo", "{max_steps: 3, per_device_train_batch_size: 4, max_seq_len: 64, eval_iters: 1, dtype: fp32, "
                  "learning_rate: 0.001}")


def _files(root: Path) -> dict[str, int]:
    """Every file under root with its mtime: a snapshot that any write shows up in."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def _args(quick_assets, out: Path, *extra: str) -> list[str]:
    return ["--actor-model", quick_assets["actor"], "--reward-model", quick_assets["reward"],
            "--data_path", quick_assets["data"], "--output-dir", str(out), *extra]


def _step_cfg(out: Path, d: str) -> dict:
    return yaml.safe_load((out / d / "step_config.yaml").read_text())


def _fake_done(out: Path, d: str, name: str) -> None:
    (out / d / "done.json").write_text(json.dumps({"step": name, "metrics": {"global_step": 1}}))


# ---------------------------------------------------------------------------------------------- replay
def test_resolved_config_leaves_derived_paths_out_and_replays_into_a_new_dir_only(quick_assets, tmp_path, capsys):
    old, new = tmp_path / "old", tmp_path / "new"
    assert pipeline.main(_args(quick_assets, old, "--dry_run", "--sft", "{learning_rate: 0.002}",
                               "--ppo", "{max_answer_seq_len: 8}")) == 0
    resolved = yaml.safe_load((old / "resolved_config.yaml").read_text())
    assert "# `chatrlhf train --config THIS_FILE` replays this run" in (old / "resolved_config.yaml").read_text()
    for sec in ("sft", "reward", "ppo"):
        for key in ("output_dir", "data_output_path", "model_name_or_path", "actor_model_name_or_path",
                    "critic_model_name_or_path", "data_path", "seed"):
            assert not resolved[sec].get(key), (sec, key)  # absent (or PPO's unused empty model_name_or_path)
    assert resolved["sft"]["learning_rate"] == 0.002 and resolved["ppo"]["max_answer_seq_len"] == 8
    for _, d in (("sft", "step1_sft"), ("reward", "step2_reward"), ("ppo", "step3_ppo")):
        _fake_done(old, d, d)  # the old run "finished"
    before = _files(old)

    assert pipeline.main(["--config", str(old / "resolved_config.yaml"), "--output_dir", str(new), "--dry_run"]) == 0
    capsys.readouterr()
    assert _files(old) == before
    sft, ppo = _step_cfg(new, "step1_sft"), _step_cfg(new, "step3_ppo")
    assert sft["output_dir"] == str(new / "step1_sft") and sft["data_output_path"] == str(new / "data_cache")
    assert sft["learning_rate"] == 0.002 and sft["model_name_or_path"] == quick_assets["actor"]
    assert ppo["actor_model_name_or_path"] == str(new / "step1_sft")
    assert ppo["critic_model_name_or_path"] == str(new / "step2_reward")
    assert ppo["max_answer_seq_len"] == 8
    for d in ("step1_sft", "step2_reward", "step3_ppo"):
        assert str(old) not in (new / d / "step_config.yaml").read_text()


def test_user_set_paths_stay_in_the_resolved_config(quick_assets, tmp_path, capsys):
    cache = tmp_path / "my_cache"
    assert pipeline.main(_args(quick_assets, tmp_path / "run", "--dry_run", "--sft",
                               f"{{data_output_path: {cache}}}")) == 0
    capsys.readouterr()
    resolved = yaml.safe_load((tmp_path / "run" / "resolved_config.yaml").read_text())
    assert resolved["sft"]["data_output_path"] == str(cache)
    assert "data_output_path" not in resolved["reward"]


def test_changed_settings_over_a_finished_step_say_what_changed_and_what_to_do(quick_assets, tmp_path, capsys):
    out = tmp_path / "run"
    assert pipeline.main(_args(quick_assets, out, "--dry_run")) == 0
    for d in ("step1_sft", "step2_reward", "step3_ppo"):
        _fake_done(out, d, d)
    (out / "step1_sft" / "checkpoints" / "step_1").mkdir(parents=True)
    capsys.readouterr()

    # same settings: every step is skipped
    assert pipeline.main(_args(quick_assets, out, "--dry_run")) == 0
    assert capsys.readouterr().out.count("already done") == 3

    # other settings: one line naming the difference and the two ways on; exit code 2 through the CLI
    changed = _args(quick_assets, out, "--dry_run", "--sft", "{learning_rate: 0.002}")
    with pytest.raises(UserError) as e:
        pipeline.main(changed)
    msg = str(e.value)
    assert "\n" not in msg
    assert "step 1 (sft) finished with other settings: --learning_rate 0.001 -> 0.002" in msg
    assert "--force_steps 1" in msg and "new --output_dir" in msg
    assert cli.main(["train", *changed]) == 2
    assert "chatrlhf train: error: step 1 (sft) finished with other settings" in capsys.readouterr().err

    # forced: step 1 trains again, and PPO (which trains from step 1's output) with it; the reward model does not
    assert pipeline.main([*changed, "--force_steps", "1"]) == 0
    text = capsys.readouterr().out
    assert "step 1 (sft): finished before; would train again from the start (--force_steps)" in text
    assert "step 3 (ppo): finished before; would train again from the start (it trains from step 1's output" in text
    assert "step 2 (reward): already done" in text
    assert (out / "step1_sft" / "done.json").exists()  # a dry run changes nothing


def test_force_steps_must_be_selected(quick_assets, tmp_path):
    with pytest.raises(UserError, match=r"--force_steps 3: not among the steps this run runs \(--step 1 2\)"):
        pipeline.main(_args(quick_assets, tmp_path, "--dry_run", "--step", "1", "2", "--force_steps", "3"))


# ---------------------------------------------------------------------------------------------- --recipe dpo
def test_dpo_recipe_runs_sft_then_dpo_from_its_output(quick_assets, tmp_path, capsys):
    out = tmp_path / "run"
    assert pipeline.main(["--recipe", "dpo", "--actor-model", quick_assets["actor"], "--data_path",
                          quick_assets["data"], "--output-dir", str(out), "--dry_run", "--dpo", "{beta: 0.2}"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[chatrlhf train] step ")]
    assert [ln.split(":", 1)[0] for ln in lines] == ["[chatrlhf train] step 1 (sft)", "[chatrlhf train] step 2 (dpo)"]
    assert lines[1].endswith(f"-m chatrlhf dpo --config {out / 'step2_dpo' / 'step_config.yaml'}")
    dpo = _step_cfg(out, "step2_dpo")
    assert dpo["model_name_or_path"] == str(out / "step1_sft") and dpo["beta"] == 0.2
    resolved = yaml.safe_load((out / "resolved_config.yaml").read_text())
    assert resolved["recipe"] == "dpo" and resolved["step"] == [1, 2]
    assert "dpo" in resolved and "reward" not in resolved and "ppo" not in resolved


def test_dpo_recipe_refuses_what_it_does_not_have(quick_assets, tmp_path):
    base = ["--recipe", "dpo", "--actor-model", quick_assets["actor"], "--data_path", quick_assets["data"],
            "--output-dir", str(tmp_path), "--dry_run"]
    with pytest.raises(UserError, match=r"--step takes numbers from 1 2, got 3 \(--recipe dpo: sft -> dpo\)"):
        pipeline.main([*base, "--step", "3"])
    with pytest.raises(UserError, match=r"section 'ppo' is not a step of --recipe dpo"):
        pipeline.main([*base, "--ppo", "{max_steps: 1}"])
    with pytest.raises(UserError, match=r"step 2 \(dpo\) trains from the output of step 1 \(sft\).*"
                                        r"--dpo '\{model_name_or_path: DIR\}'"):
        pipeline.main([*base, "--step", "2"])


@pytest.mark.slow
@pytest.mark.heavy  # minutes: scheduled first
def test_dpo_run_report_replay_and_forced_rerun(quick_assets, tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    base = ["train", "--recipe", "dpo", "--actor-model", quick_assets["actor"], "--data_path", quick_assets["data"]]
    r = run_cli([*base, "--output-dir", str(old), *QUICK], cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-4000:]
    assert "device: cpu (DS_ACCELERATOR=cpu) | dtype: fp32 (--dtype)" in r.stdout
    for d, name in (("step1_sft", "sft"), ("step2_dpo", "dpo")):
        assert json.loads((old / d / "done.json").read_text())["step"] == name
        log = (old / d / "train.log").read_text()
        assert "\r" not in log and "it/s]" not in log  # clean lines, no progress-bar redraws
    # the report compares the DPO actor with the SFT actor on the DPO step's held-out pairs
    report = (old / "report.md").read_text()
    assert "## DPO actor vs SFT actor" in report and "| metric | SFT actor | DPO actor |" in report
    assert "Step 2: DPO" in report and "reward model" not in report.split("## Resolved config")[0]
    cmp = json.loads((old / "dpo_vs_sft.json").read_text())
    assert cmp["pairs"] > 0 and len(cmp["samples"]) == 3
    for who in ("sft", "dpo"):
        assert 0.0 <= cmp[who]["preference_accuracy"] <= 1.0
    assert cmp["implicit_reward"]["margin"] != 0.0  # DPO moved the policy away from its SFT reference
    assert (old / "plots" / "dpo_curves.png").is_file()

    # replay into a new dir: the old run is not touched, not even read-modified
    before = _files(old)
    r = run_cli(["train", "--config", str(old / "resolved_config.yaml"), "--output-dir", str(new)], cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-4000:]
    assert _files(old) == before
    assert json.loads((new / "step2_dpo" / "done.json").read_text())["step"] == "dpo"
    assert _step_cfg(new, "step2_dpo")["model_name_or_path"] == str(new / "step1_sft")
    assert str(old) not in (new / "resolved_config.yaml").read_text()

    # a changed DPO setting over the finished run: refused with the difference, exit 2, nothing touched
    r = run_cli([*base, "--output-dir", str(old), *QUICK[:2], "--dpo", QUICK[3].replace("0.001", "0.002")],
                cwd=tmp_path)
    assert r.returncode == 2, r.stdout[-3000:]
    assert "step 2 (dpo) finished with other settings: --learning_rate 0.001 -> 0.002" in r.stdout
    assert _files(old) == before
    # forced: step 2 only trains again (step 1 is skipped) and the report's comparison is redone
    r = run_cli([*base, "--output-dir", str(old), *QUICK[:2], "--dpo", QUICK[3].replace("0.001", "0.002"),
                 "--force_steps", "2"], cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:]
    assert "step 1 (sft): already done" in r.stdout and "step 2 (dpo): finished before; trains again" in r.stdout
    assert _step_cfg(old, "step2_dpo")["learning_rate"] == 0.002
    assert json.loads((old / "dpo_vs_sft.json").read_text())["finished"] != cmp["finished"]


# ---------------------------------------------------------------------------------------------- small things
def test_no_report_help_says_what_it_does(capsys):
    assert cli.main(["train", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--no_report, --no-report Turn --report off (on by default: Write OUTPUT/report.md" in help_text


def test_done_json_keeps_skipped_totals(tmp_path):
    from chatrlhf.trainers.checkpoints import write_done

    rows = [{"kind": "train", "step": i + 1, "skipped": n} for i, n in enumerate((1, 0, 3, 2))]
    rows.append({"kind": "throughput", "step": 4, "skipped": 100})  # not a train row
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_done(tmp_path, "ppo", {"steps": 4, "optimizer_steps": 4, "skipped": 2})
    metrics = json.loads((tmp_path / "done.json").read_text())["metrics"]
    assert metrics["skipped"] == 6 and metrics["skipped_last_step"] == 2


def test_step3_alone_on_a_fresh_dir_is_one_line_exit_2(quick_assets, tmp_path, capsys):
    assert cli.main(["train", *_args(quick_assets, tmp_path / "run", "--step", "3", "--dry_run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "chatrlhf train: error: step 3 (ppo) trains from the output of" in err
    assert str(tmp_path / "run" / "step2_reward") in err
    # named models are the user's choice; GRPO has no critic, so a named reward model stands for step 2's output
    assert pipeline.main(_args(quick_assets, tmp_path / "run", "--step", "3", "--dry_run", "--ppo",
                               f"{{algo: grpo, num_samples_per_prompt: 2, actor_model_name_or_path: "
                               f"{quick_assets['actor']}, reward_model_name_or_path: {quick_assets['reward']}}}")) == 0


_LOG_SCRIPT = """
from chatrlhf.utils import setup_env
setup_env()
import logging
logging.getLogger("chatrlhf.x").info("an-info-line")
logging.getLogger("chatrlhf.x").warning("a-warning-line")
"""


@pytest.mark.parametrize("rank, info", [("0", True), ("1", False)])
def test_info_lines_on_rank0_only(rank, info):
    env = {**cli_env(), "RANK": rank}
    r = subprocess.run([sys.executable, "-c", _LOG_SCRIPT], env=env, text=True, capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert ("an-info-line" in r.stderr) is info and "a-warning-line" in r.stderr


def test_log_file_gets_clean_lines_and_bars_only_on_a_terminal(monkeypatch):
    bar = (b"\rsft:   0%|          | 0/3 [00:00<?, ?it/s]\rsft:  33%|###3      | 1/3 [00:00<00:00, 9.1it/s]"
           b"\r                                              \r[sft] eval step 1: loss 1.0\n"
           b"\rsft:  67%|######6   | 2/3\x1b[A\r\x1b[K   \rplain\r\n\rsft: 100%|##########| 3/3\r    \r")
    c = pipeline.LogCleaner()
    got = b"".join(c.feed(bar[i:i + 7]) for i in range(0, len(bar), 7)) + c.flush()
    assert got == b"[sft] eval step 1: loss 1.0\nplain\n"
    c = pipeline.LogCleaner()
    assert c.feed(b"a\n\nb\n") + c.flush() == b"a\n\nb\n"  # ordinary lines, blank ones included, as they are

    from chatrlhf.utils import progress_bars_enabled

    monkeypatch.setenv("CHATRLHF_PROGRESS", "0")
    assert progress_bars_enabled() is False
    monkeypatch.setenv("CHATRLHF_PROGRESS", "1")
    assert progress_bars_enabled() is True
    monkeypatch.delenv("CHATRLHF_PROGRESS")
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal
    assert progress_bars_enabled() is False
    # the pipeline's steps get bars only when the pipeline itself is on a terminal
    monkeypatch.setattr(pipeline, "_stdout_is_tty", lambda: False)
    cfg = pipeline.TrainPipelineConfig(deployment_type="cpu", data_path=["x"])
    assert pipeline.launch_env(cfg)["CHATRLHF_PROGRESS"] == "0"
    monkeypatch.setattr(pipeline, "_stdout_is_tty", lambda: True)
    assert pipeline.launch_env(cfg)["CHATRLHF_PROGRESS"] == "1"
