"""The one CLI and the typed config parser: flags with dashes or underscores, YAML/JSON files, clear errors."""

import json
from dataclasses import dataclass, field

import pytest

from chatrlhf.cli import main as cli
from chatrlhf.config import ConfigError, parse_config


@dataclass
class _Cfg:
    data_path: list[str] = field(default_factory=lambda: ["Dahoas/rm-static"], metadata={"help": "datasets"})
    max_seq_len: int = field(default=512, metadata={"help": "length"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute"})


def test_flags_accept_dashes_and_underscores_and_files_set_defaults(tmp_path):
    cfg = parse_config(_Cfg, ["--data-path", "a", "b", "--max_seq_len", "3", "--gradient_checkpointing"])
    assert cfg == _Cfg(data_path=["a", "b"], max_seq_len=3, gradient_checkpointing=True)
    y = tmp_path / "c.yaml"
    y.write_text("max-seq-len: 7\ndata_path: [q]\n")
    assert parse_config(_Cfg, ["--config", str(y)]) == _Cfg(data_path=["q"], max_seq_len=7)
    assert parse_config(_Cfg, ["--config", str(y), "--max_seq_len", "9"]).max_seq_len == 9  # flags win
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"max_seq_len": 11}))
    assert parse_config(_Cfg, ["--config", str(j)]).max_seq_len == 11


def test_config_file_errors_name_the_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_seq_len: 7\nnot_an_option: 1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown option\(s\) not_an_option"):
        parse_config(_Cfg, ["--config", str(bad)])
    broken = tmp_path / "broken.yaml"
    broken.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: cannot parse config"):
        parse_config(_Cfg, ["--config", str(broken)])
    with pytest.raises(ConfigError, match="config file not found"):
        parse_config(_Cfg, ["--config", str(tmp_path / "missing.yaml")])


def test_unknown_flag_is_one_line_with_a_suggestion(capsys):
    assert cli(["sft", "--model_name_or_path", "x", "--learnin_rate", "3"]) == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --learnin_rate (did you mean --learning_rate?)" in err
    assert "Traceback" not in err


def test_help_lists_every_command_and_unknown_command_fails(capsys):
    assert cli(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("train", "demo", "sft", "reward", "dpo", "ppo", "eval", "chat", "serve", "report",
                 "tiny-model", "data"):
        assert f"  {name} " in out
    assert "  bench " not in out  # the benchmark is not part of the installed tool: `make bench` (bench/README.md)
    assert cli(["nope"]) == 2
    assert "unknown command 'nope'" in capsys.readouterr().err
