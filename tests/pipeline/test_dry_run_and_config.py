"""`chatrlhf train --dry_run`: the command line of every deployment type, config resolution (derived values,
per-step YAML sections, flags over files) and resolved_config.yaml reproducing the run. Nothing trains here."""

import shlex
import sys
from pathlib import Path

import pytest
import yaml

from chatrlhf.apps import pipeline
from chatrlhf.errors import UserError


def _train(quick_assets, out: Path, *extra: str) -> list[str]:
    return ["--actor-model", quick_assets["actor"], "--reward-model", quick_assets["reward"],
            "--data_path", quick_assets["data"], "--output-dir", str(out), "--dry_run", *extra]


def _commands(stdout: str) -> dict[str, list[str]]:
    """step name -> command argv, from the '[chatrlhf train] step N (name): CMD' lines."""
    out = {}
    for line in stdout.splitlines():
        if line.startswith("[chatrlhf train] step ") and "): " in line:
            name = line.split("(", 1)[1].split(")", 1)[0]
            out[name] = shlex.split(line.split("): ", 1)[1])
    return out


@pytest.mark.parametrize("dep", ["cpu", "single_gpu"])
def test_single_process_commands(quick_assets, tmp_path, capsys, dep):
    assert pipeline.main(_train(quick_assets, tmp_path, "--deployment-type", dep)) == 0
    cmds = _commands(capsys.readouterr().out)
    assert sorted(cmds) == ["ppo", "reward", "sft"]
    for name, d in (("sft", "step1_sft"), ("reward", "step2_reward"), ("ppo", "step3_ppo")):
        assert cmds[name] == [sys.executable, "-m", "chatrlhf", name, "--config", str(tmp_path / d / "step_config.yaml")]
        assert (tmp_path / d / "step_config.yaml").is_file()  # the printed command runs as shown
        assert not (tmp_path / d / "done.json").exists()


def test_single_node_uses_torchrun(quick_assets, tmp_path, capsys):
    assert pipeline.main(_train(quick_assets, tmp_path, "--deployment_type", "single_node", "--num_gpus", "2")) == 0
    cmd = _commands(capsys.readouterr().out)["reward"]
    assert Path(cmd[0]).name == "torchrun" or cmd[1:3] == ["-m", "torch.distributed.run"]
    assert "--standalone" in cmd and "--nproc_per_node=2" in cmd
    assert cmd[-5:] == ["-m", "chatrlhf", "reward", "--config", str(tmp_path / "step2_reward" / "step_config.yaml")]


def test_multi_node_uses_deepspeed_launcher_with_hostfile(quick_assets, tmp_path, capsys):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\nnode-a slots=4\nnode-b slots=4\n")
    rc = pipeline.main(_train(quick_assets, tmp_path / "run", "--deployment-type", "multi_node", "--hostfile",
                              str(hostfile), "--master_addr", "10.0.0.1", "--num_gpus", "2"))
    assert rc == 0
    cmd = _commands(capsys.readouterr().out)["ppo"]
    assert Path(cmd[0]).name == "deepspeed"
    assert cmd[cmd.index("--hostfile") + 1] == str(hostfile)
    assert cmd[cmd.index("--master_addr") + 1] == "10.0.0.1"
    assert cmd[cmd.index("--num_gpus") + 1] == "2"
    assert "--no_local_rank" in cmd
    assert cmd[cmd.index("--module"):] == ["--module", "chatrlhf", "ppo", "--config",
                                           str(tmp_path / "run" / "step3_ppo" / "step_config.yaml")]
    resolved = yaml.safe_load((tmp_path / "run" / "resolved_config.yaml").read_text())
    assert resolved["deployment_type"] == "multi_node" and resolved["num_gpus"] == 2
    # multi-node keeps the steps' node-local cache default instead of a dir under the (shared) output dir
    assert not resolved["sft"]["data_output_path"].startswith(str(tmp_path / "run"))
    assert pipeline.world_size_of(pipeline.parse_config(pipeline.TrainPipelineConfig, _train(
        quick_assets, tmp_path / "run", "--deployment-type", "multi_node", "--hostfile", str(hostfile),
        "--num_gpus", "2"))) == 4


def test_multi_node_requires_hostfile(quick_assets, tmp_path):
    with pytest.raises(UserError, match="--hostfile"):
        pipeline.main(_train(quick_assets, tmp_path, "--deployment-type", "multi_node"))


def test_derived_values_sections_and_reproducible_resolved_config(quick_assets, tmp_path, capsys):
    cfg_file = tmp_path / "pipeline.yaml"
    cfg_file.write_text(yaml.safe_dump({
        "actor-model": quick_assets["actor"], "reward_model": quick_assets["reward"],
        "data_path": [quick_assets["data"]], "actor_zero_stage": 2, "reward-zero-stage": 1,
        "sft": {"learning_rate": 0.01, "max-seq-len": 48},
        "ppo": {"actor_learning_rate": 3e-4, "max_answer_seq_len": 8},
    }))
    out = tmp_path / "run"
    # a flag beats the file's section value; --ppo on the command line merges over the file's ppo section
    assert pipeline.main(["--config", str(cfg_file), "--output_dir", str(out), "--dry_run",
                          "--ppo", "{critic_learning_rate: 7.0e-5}"]) == 0
    sft = yaml.safe_load((out / "step1_sft" / "step_config.yaml").read_text())
    rm = yaml.safe_load((out / "step2_reward" / "step_config.yaml").read_text())
    ppo = yaml.safe_load((out / "step3_ppo" / "step_config.yaml").read_text())
    assert sft["model_name_or_path"] == quick_assets["actor"] and sft["zero_stage"] == 2
    assert sft["learning_rate"] == 0.01 and sft["max_seq_len"] == 48
    assert sft["output_dir"] == str(out / "step1_sft")
    assert rm["model_name_or_path"] == quick_assets["reward"] and rm["zero_stage"] == 1
    assert ppo["actor_model_name_or_path"] == str(out / "step1_sft")
    assert ppo["critic_model_name_or_path"] == str(out / "step2_reward")
    assert (ppo["actor_zero_stage"], ppo["critic_zero_stage"]) == (2, 1)
    assert ppo["actor_learning_rate"] == 3e-4 and ppo["max_answer_seq_len"] == 8
    assert ppo["critic_learning_rate"] == 7e-5
    first = {d: (out / d / "step_config.yaml").read_text() for d in ("step1_sft", "step2_reward", "step3_ppo")}

    # resolved_config.yaml alone reproduces every step's config exactly
    resolved = out / "resolved_config.yaml"
    again = tmp_path / "again.yaml"
    again.write_text(resolved.read_text())
    assert pipeline.main(["--config", str(again), "--dry_run"]) == 0
    assert {d: (out / d / "step_config.yaml").read_text() for d in first} == first
    capsys.readouterr()


def test_unknown_section_option_is_named(quick_assets, tmp_path):
    with pytest.raises(UserError, match=r"section 'reward': unknown option\(s\) learning_rat\b"):
        pipeline.main(_train(quick_assets, tmp_path, "--reward", "{learning_rat: 0.1}"))


def test_step_subset_without_earlier_output_is_refused_unless_models_are_named(quick_assets, tmp_path, capsys):
    # --step 3 alone on a fresh dir would train PPO from the base actor with an untrained reward model
    with pytest.raises(UserError, match=r"step 3 \(ppo\) trains from the output of step 1 \(sft\) and step 2 "
                                        r"\(reward\).*no finished run.*--step 1 2 3"):
        pipeline.main(_train(quick_assets, tmp_path, "--step", "3"))
    assert not (tmp_path / "step3_ppo").exists()
    # named explicitly, the models are the user's choice
    assert pipeline.main(_train(quick_assets, tmp_path, "--step", "3", "--ppo",
                                f"{{actor_model_name_or_path: {quick_assets['actor']}, "
                                f"critic_model_name_or_path: {quick_assets['reward']}}}")) == 0
    assert sorted(_commands(capsys.readouterr().out)) == ["ppo"]
    ppo = yaml.safe_load((tmp_path / "step3_ppo" / "step_config.yaml").read_text())
    assert ppo["actor_model_name_or_path"] == quick_assets["actor"]
    assert ppo["critic_model_name_or_path"] == quick_assets["reward"]
    assert not (tmp_path / "step1_sft").exists()


def test_example_pipeline_yaml_resolves(quick_assets, tmp_path, capsys):
    example = Path(__file__).resolve().parents[2] / "examples" / "pipeline.yaml"
    assert pipeline.main(["--config", str(example), "--actor_model", quick_assets["actor"], "--reward_model",
                          quick_assets["reward"], "--data_path", quick_assets["data"], "--output_dir",
                          str(tmp_path), "--dry_run"]) == 0
    assert sorted(_commands(capsys.readouterr().out)) == ["ppo", "reward", "sft"]
