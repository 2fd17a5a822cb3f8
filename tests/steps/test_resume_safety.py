"""What a resume trusts (issue 18): a checkpoint file that would run code is refused before DeepSpeed unpickles it;
a checkpoint trained with other settings or data is not resumed silently (``--resume force`` overrides); leftovers
of a killed save go and metrics.jsonl is cut back to the resumed step; the tokenized-data cache is the run's own;
compiled kernels come only from a private cache whose file names carry what they were built from."""

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from chatrlhf.config import parse_config
from chatrlhf.errors import UserError
from chatrlhf.trainers.sft import SFTConfig, run_sft


class Payload:
    """Unpickling it creates ``marker``: what a planted checkpoint would do with a shell command instead."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def flags(out, model, data, cache, **kw) -> list[str]:
    args = {"model_name_or_path": model, "data_path": data, "data_split": "10,0,0", "data_output_path": cache,
            "output_dir": out, "max_seq_len": 64, "skip_bad_rows": True, "per_device_train_batch_size": 8,
            "per_device_eval_batch_size": 16, "dtype": "fp32", "log_interval": 5, "seed": 1234,
            "lr_scheduler_type": "constant", "learning_rate": 2e-3, "eval_iters": 1, "save_interval": 2,
            "resume": "auto"}
    args.update(kw)
    argv = []
    for k, v in args.items():
        argv += [f"--{k}"] if v is True else [f"--{k}", str(v)]
    return argv


@pytest.fixture
def run_flags(tiny_model_dir, pairs_dir, data_cache):
    return lambda out, **kw: flags(out, tiny_model_dir, pairs_dir, data_cache, **kw)


@pytest.fixture(scope="module")
def trained(tiny_model_dir, pairs_dir, data_cache, tmp_path_factory):
    """A finished 3-step SFT run: checkpoints/step_2 (complete, with its run record), train rows 1-3, done.json."""
    out = tmp_path_factory.mktemp("resume_safety") / "run"
    run_sft(parse_config(SFTConfig, flags(out, tiny_model_dir, pairs_dir, data_cache, max_steps=3, resume="never")))
    assert (out / "checkpoints" / "step_2" / "trainer_state.json").is_file()
    return out


def copy_of(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


def cli(argv: list[str]) -> int:
    from chatrlhf.cli import main

    return main(argv)


def error_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.startswith("chatrlhf sft: error:")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


# ---- 1. nothing in a checkpoint runs ---------------------------------------------------------------------------
def test_weights_only_check_refuses_a_payload_and_a_truncated_file(tmp_path):
    from chatrlhf.engine.strategy import verify_checkpoint_files

    marker = tmp_path / "ran"
    sdir = tmp_path / "step_1" / "model"
    sdir.mkdir(parents=True)
    torch.save({"module": {"w": torch.ones(2)}, "extra": Payload(marker)}, sdir / "mp_rank_00_model_states.pt")
    with pytest.raises(UserError, match=r"mp_rank_00_model_states\.pt: refused to load: unpickling it needs exec"):
        verify_checkpoint_files(tmp_path / "step_1")
    assert not marker.exists()

    torch.save({"module": {"w": torch.ones(2)}}, sdir / "mp_rank_00_model_states.pt")
    verify_checkpoint_files(tmp_path / "step_1")  # plain tensors and dicts pass
    data = (sdir / "mp_rank_00_model_states.pt").read_bytes()
    (sdir / "mp_rank_00_model_states.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"mp_rank_00_model_states\.pt: not a readable checkpoint file"):
        verify_checkpoint_files(tmp_path / "step_1")


@pytest.mark.parametrize("where", ["model/mp_rank_00_model_states.pt", "hf_model/planted.pt"])
def test_planted_pickle_in_a_checkpoint_is_refused_and_never_runs(trained, run_flags, tmp_path, capsys, where):
    run = copy_of(trained, tmp_path / "run")
    marker = tmp_path / "pwned"
    target = run / "checkpoints" / "step_2" / where
    torch.save({"module": Payload(marker)}, target)
    rc = cli(["sft", *run_flags(run, max_steps=4)])
    line = error_line(capsys.readouterr().err)
    assert rc == 2
    assert str(target) in line and "refused to load" in line and "needs exec" in line, line
    assert not marker.exists()
    assert not (run / "checkpoints" / "step_4").exists()  # nothing trained on
    # the payload is real: plain pickle (what DeepSpeed uses) runs it
    torch.load(target, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("stage,dtype", [(0, "fp32"), (0, "bf16"), (1, "fp32"), (2, "bf16"), (3, "fp32"),
                                         (3, "bf16")])
@pytest.mark.slow  # over 2 s on a 2-core CPU
def test_every_zero_stage_and_dtype_checkpoint_passes_the_check_and_resumes_exactly(tmp_path, stage, dtype,
                                                                                   checkpoint_resumes_exactly):
    """Real DeepSpeed checkpoints (model, optimizer, scheduler) pass the weights-only check with the allow-list, and
    the state loaded after it continues bit for bit."""
    from chatrlhf.engine import DeepSpeedStrategy

    s = DeepSpeedStrategy(zero_stage=stage, dtype=dtype, per_device_train_batch_size=4)
    s.setup_distributed()
    checkpoint_resumes_exactly(s, tmp_path)


# ---- 2. no silent resume of another run ------------------------------------------------------------------------
def test_resume_with_other_settings_is_refused_and_can_be_forced(trained, run_flags, tmp_path, capsys):
    run = copy_of(trained, tmp_path / "run")
    other = dict(max_steps=4, data_split="9,1,0", learning_rate=3e-3)
    assert cli(["sft", *run_flags(run, **other)]) == 2
    line = error_line(capsys.readouterr().err)
    assert str(run / "checkpoints" / "step_2") in line
    assert '--data_split "10,0,0" -> "9,1,0"' in line and "--learning_rate 0.002 -> 0.003" in line, line
    assert "--max_steps" not in line  # a longer run is allowed
    assert "--resume never" in line and "--resume force" in line
    assert not (run / "checkpoints" / "step_4").exists()

    assert cli(["sft", *run_flags(run, resume="force", **other)]) == 0
    out = capsys.readouterr().out
    assert "warning: --resume force" in out and "--data_split" in out
    assert "resumed from" in out and "at step 2" in out
    assert json.loads((run / "done.json").read_text())["metrics"]["global_step"] == 4
    state = json.loads((run / "checkpoints" / "step_4" / "trainer_state.json").read_text())
    assert state["run"]["config"]["data_split"] == "9,1,0"  # what it was trained with from here on
    # the forced run trains at its own learning rate, not the checkpoint's (DeepSpeed restores the scheduler's)
    from chatrlhf.trainers.metrics import read_metrics

    lrs = {r["step"]: r["lr"] for r in read_metrics(run) if r["kind"] == "train"}
    assert lrs[2] == pytest.approx(2e-3) and lrs[3] == pytest.approx(3e-3) and lrs[4] == pytest.approx(3e-3), lrs


def test_run_record_compares_math_fields_and_data_only(tiny_model_dir, pairs_dir, tmp_path, capsys):
    from chatrlhf.trainers.checkpoints import check_run_record, run_record

    data = tmp_path / "data"
    shutil.copytree(pairs_dir, data)

    def cfg(**kw):
        return parse_config(SFTConfig, flags(tmp_path / "out", tiny_model_dir, data, tmp_path / "c", **kw))

    base = run_record(cfg())
    assert "output_dir" not in base["config"] and base["config"]["data_split"] == "10,0,0"
    assert base["config"]["model_name_or_path"] == str(Path(tiny_model_dir).resolve())
    ck = tmp_path / "step_2"
    # output, logging, save/eval intervals and the run's length may change
    check_run_record(ck, base, run_record(cfg(output_dir=tmp_path / "elsewhere", log_interval=1, save_interval=7,
                                              eval_interval=3, max_steps=9, gradient_checkpointing=True)))
    assert "another run length" in capsys.readouterr().out
    with pytest.raises(UserError) as e:
        check_run_record(ck, base, run_record(cfg(seed=7, zero_stage=1, per_device_train_batch_size=4)))
    msg = str(e.value)
    assert "--seed 1234 -> 7" in msg and "--zero_stage 0 -> 1" in msg and "--per_device_train_batch_size 8 -> 4" in msg
    # the data: same flags, other content
    train = data / "data" / "train.json"
    rows = json.loads(train.read_text())
    train.write_text(json.dumps(rows[:-1]))
    with pytest.raises(UserError, match="the content of the --data_path files changed"):
        check_run_record(ck, base, run_record(cfg()))
    check_run_record(ck, base, run_record(cfg()), force=True)
    assert "warning: --resume force" in capsys.readouterr().out
    # a checkpoint from before records existed resumes with a warning
    check_run_record(ck, None, run_record(cfg(seed=7)))
    assert "does not record the settings" in capsys.readouterr().out


# ---- 6. leftovers, metrics rows, shared files ------------------------------------------------------------------
def test_resume_cuts_metrics_back_and_removes_leftovers_of_a_killed_save(trained, run_flags, tmp_path, capsys):
    """The template run logged steps 1-3 but its last checkpoint is step 2: resumed to 4, step 3 runs again and
    appears once. A killed final save's staging dir and temp files go. Its checkpoint has no run record (as one
    from an older chatrlhf): resumed with a warning."""
    run = copy_of(trained, tmp_path / "run")
    (run / "done.json").unlink()
    state_file = run / "checkpoints" / "step_2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["run"]
    state_file.write_text(json.dumps(state))
    (run / ".staging-k1ll3d").mkdir()
    (run / ".staging-k1ll3d" / "model.safetensors").write_bytes(b"half")
    (run / ".tmp-actor-x2").mkdir()
    (run / ".done.json.abc.tmp").write_text("{")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 3, "lo')  # torn by the kill
    res = run_sft(parse_config(SFTConfig, run_flags(run, max_steps=4)))
    assert res["global_step"] == 4
    out = capsys.readouterr().out
    assert "does not record the settings" in out and "rows after step 2 removed" in out
    lines = (run / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(x) for x in lines]  # every line whole
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4]
    assert not [p.name for p in run.iterdir() if p.name.startswith((".staging-", ".tmp-")) or p.name.endswith(".tmp")]


def test_cut_metrics_keeps_rows_up_to_the_step(tmp_path):
    from chatrlhf.trainers.metrics import MetricsWriter, cut_metrics, read_metrics

    w = MetricsWriter(tmp_path)
    for s in (0, 1, 2, 3):
        w.log("train", s, loss=float(s))
    w.close()
    assert cut_metrics(tmp_path, 1) == 2
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1]
    assert cut_metrics(tmp_path, 5) == 0
    assert cut_metrics(tmp_path, -1) == 2 and (tmp_path / "metrics.jsonl").read_text() == ""
    assert cut_metrics(tmp_path / "none", 3) == 0


def test_data_cache_defaults_to_the_run_dir(tiny_model_dir, pairs_dir, tmp_path, monkeypatch):
    from chatrlhf.data import DataConfig
    from chatrlhf.data.phases import build_phase_datasets, data_cache_root
    from chatrlhf.models.loading import load_tokenizer

    cfg = parse_config(SFTConfig, ["--model_name_or_path", str(tiny_model_dir), "--data_path", str(pairs_dir),
                                   "--data_split", "10,0,0", "--output_dir", str(tmp_path / "out"),
                                   "--max_seq_len", "64", "--skip_bad_rows"])
    assert cfg.data_output_path == "" and SFTConfig.__dataclass_fields__["data_output_path"].default == ""
    assert data_cache_root(cfg) == tmp_path / "out" / "data_cache"
    train, _ = build_phase_datasets(1, cfg, load_tokenizer(tiny_model_dir))
    assert Path(train.info["cache_dir"]).parent == tmp_path / "out" / "data_cache" and len(train) > 0
    # ranks on several nodes: one dir per node (nodes would race on a shared output disk)
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert data_cache_root(cfg).parent == tmp_path / "out" / "data_cache"
    assert data_cache_root(cfg).name.startswith("node-")
    cfg.data_output_path = str(tmp_path / "mine")
    assert data_cache_root(cfg) == tmp_path / "mine"
    monkeypatch.delenv("WORLD_SIZE")
    assert data_cache_root(DataConfig()).parts[-3:] == (".cache", "chatrlhf", "data_cache")  # no run dir: per user


def test_remove_stale_staging_only_takes_leftovers(tmp_path):
    from chatrlhf.engine.strategy import remove_stale_staging

    for d in (".staging-a", ".tmp-actor-b", ".old-actor-1", "checkpoints", "actor", ".hidden"):
        (tmp_path / d).mkdir()
    for f in (".done.json.x.tmp", "metrics.jsonl", "model.safetensors"):
        (tmp_path / f).write_text("x")
    gone = sorted(p.name for p in remove_stale_staging(tmp_path))
    assert gone == [".done.json.x.tmp", ".old-actor-1", ".staging-a", ".tmp-actor-b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", "actor", "checkpoints", "metrics.jsonl",
                                                          "model.safetensors"]


def test_kernel_cache_names_what_it_was_built_from_and_is_used_only_when_private(tmp_path, monkeypatch, caplog):
    from chatrlhf.engine import native

    assert native._compiler() is not None, "the native kernels need a C compiler (gcc/cc) on PATH"
    monkeypatch.setenv("CHATRLHF_FUSED_KERNELS", "1")
    monkeypatch.setenv("CHATRLHF_KERNEL_DIR", str(tmp_path / "kernels"))
    monkeypatch.setattr(native, "_libs", {})
    monkeypatch.setattr(native, "_whys", {})
    assert native.load("fused") is not None, native.reason("fused")
    (so,) = (tmp_path / "kernels").glob("fused-*.so")
    st = so.stat()
    assert st.st_uid == os.getuid() and not st.st_mode & 0o022
    assert not (tmp_path / "kernels").stat().st_mode & 0o077
    src, cc = native.KERNELS["fused"][0].read_bytes(), native._compiler()
    key = native._kernel_key(src, cc)
    assert so.name == f"fused-{key}.so"
    assert native._kernel_key(src + b"\n", cc) != key
    version, base_flags = native._compiler_version, native.BASE_FLAGS
    monkeypatch.setattr(native, "_compiler_version", lambda cc: "gcc 0.1")
    assert native._kernel_key(src, cc) != key
    monkeypatch.setattr(native, "_compiler_version", version)
    monkeypatch.setattr(native, "BASE_FLAGS", [*base_flags, "-DOTHER"])
    assert native._kernel_key(src, cc) != key
    monkeypatch.setattr(native, "BASE_FLAGS", base_flags)

    # a cached library that others could have written is not loaded (garbage here: loading it would fail)
    # a new file, not the loaded one overwritten in place (that library is still mapped into this process:
    # truncating it under the mapping would crash the process with SIGBUS)
    so.unlink()
    so.write_bytes(b"not a library")
    so.chmod(0o666)
    monkeypatch.setattr(native, "_libs", {})
    monkeypatch.setattr(native, "_whys", {})
    with caplog.at_level(logging.INFO, logger="chatrlhf.engine.native"):
        assert native.load("fused") is not None, native.reason("fused")
    assert "writable by group or others" in caplog.text and "private copy" in caplog.text
    assert so.read_bytes() == b"not a library"
    if os.geteuid() == 0:  # another owner (only root can make one here)
        so.chmod(0o755)
        os.chown(so, 4321, -1)
        monkeypatch.setattr(native, "_libs", {})
        monkeypatch.setattr(native, "_whys", {})
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="chatrlhf.engine.native"):
            assert native.load("fused") is not None, native.reason("fused")
        assert "owned by uid 4321" in caplog.text


def test_resume_flag_forms(tiny_model_dir, pairs_dir, tmp_path):
    """auto / never / a path / force / force:PATH, checked against a trainer_state.json of another seed."""
    from chatrlhf.trainers.checkpoints import resolve_resume, run_record

    def cfg(**kw):
        return parse_config(SFTConfig, flags(tmp_path / "out", tiny_model_dir, pairs_dir, tmp_path / "c", **kw))

    elsewhere = tmp_path / "other" / "checkpoints" / "step_5"
    for sdir in (tmp_path / "out" / "checkpoints" / "step_3", elsewhere):
        sdir.mkdir(parents=True)
        (sdir / "trainer_state.json").write_text(json.dumps({"step": 5, "run": run_record(cfg(seed=9))}))
    assert resolve_resume(cfg(resume="never")) is None
    for form in ("auto", str(elsewhere), str(elsewhere.parent)):
        with pytest.raises(UserError, match="--seed 9 -> 1234"):
            resolve_resume(cfg(resume=form))
    assert resolve_resume(cfg(resume="force")) == tmp_path / "out" / "checkpoints" / "step_3"
    assert resolve_resume(cfg(resume=f"force:{elsewhere.parent}")) == elsewhere
    with pytest.raises(UserError, match="no complete checkpoint"):
        resolve_resume(cfg(resume=str(tmp_path / "nothing")))
