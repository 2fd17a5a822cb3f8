"""Fixtures for step tests: the built-in task's pairs as a local/jsonfile dataset dir, and flag builders."""

import json
import shutil

import pytest


@pytest.fixture(scope="session")
def pairs_dir(task_data_dir, tmp_path_factory):
    """task_data_dir/data only (the task root also holds kwise.jsonl etc., which the dataset reader refuses to
    guess a split for)."""
    out = tmp_path_factory.mktemp("pairs")
    shutil.copytree(task_data_dir / "data", out / "data")
    return out


@pytest.fixture(scope="session")
def kwise_dir(task_data_dir, tmp_path_factory):
    """k-wise rankings in local/jsonfile layout: {prompt, answers [best..worst]} split 90/10."""
    rows = [json.loads(x) for x in (task_data_dir / "kwise.jsonl").read_text().splitlines() if x.strip()]
    rows = [{"prompt": r["prompt"], "answers": r["answers"][:3]} for r in rows if all(a.strip() for a in r["answers"][:3])]
    out = tmp_path_factory.mktemp("kwise")
    (out / "data").mkdir()
    n = max(4, len(rows) // 10)
    (out / "data" / "train.json").write_text(json.dumps(rows[n:]))
    (out / "data" / "eval.json").write_text(json.dumps(rows[:n]))
    return out


@pytest.fixture(scope="session")
def kwise_large_dir(tmp_path_factory):
    """800 k=3 rankings (720 train / 80 held out): enough for held-out ranking accuracy to mean something (the
    80-row set above has 8 held-out rankings)."""
    from chatrlhf.tasks.builtin import write_task_dataset

    task = tmp_path_factory.mktemp("task_kwise")
    write_task_dataset(task, seed=1234, n_sft=16, n_pairs=16, n_eval=8, n_heldout=4, k=4, noise=0.35, n_corpus=200,
                       n_kwise=800)
    rows = [json.loads(x) for x in (task / "kwise.jsonl").read_text().splitlines() if x.strip()]
    rows = [{"prompt": r["prompt"], "answers": r["answers"][:3]} for r in rows
            if all(a.strip() for a in r["answers"][:3])]
    out = tmp_path_factory.mktemp("kwise_large")
    (out / "data").mkdir()
    n = len(rows) // 10
    (out / "data" / "train.json").write_text(json.dumps(rows[n:]))
    (out / "data" / "eval.json").write_text(json.dumps(rows[:n]))
    return out


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data_cache")


@pytest.fixture
def base_args(tiny_model_dir, pairs_dir, data_cache):
    """callable(out_dir, phase_split, **overrides) -> argv for a tiny, fast, deterministic run."""

    def make(out, split="10,0,0", **kw):
        args = {"model_name_or_path": tiny_model_dir, "data_path": pairs_dir, "data_split": split,
                "data_output_path": data_cache, "output_dir": out, "max_seq_len": 64, "skip_bad_rows": True,
                "per_device_train_batch_size": 8, "per_device_eval_batch_size": 16, "dtype": "fp32",
                "log_interval": 5, "resume": "never", "seed": 1234}
        args.update(kw)
        argv = []
        for k, v in args.items():
            if v is True:
                argv.append(f"--{k}")
            elif v is False or v is None:
                continue
            else:
                argv += [f"--{k}", str(v)]
        return argv

    return make


@pytest.fixture
def checkpoint_resumes_exactly():
    """The check below, as a fixture (test modules here are not a package to import it from)."""
    return assert_checkpoint_resumes_exactly


def assert_checkpoint_resumes_exactly(s, tmp_path):
    """With strategy ``s``: train a small net 2 steps, save, train 2 more; a fresh engine loaded from the save (after
    the weights-only check) and trained the same 2 steps ends with the same weights and learning rate."""
    import torch
    import torch.nn as nn
    from transformers import get_scheduler

    from chatrlhf.engine.strategy import verify_checkpoint_files

    def engine():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(8, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 1))
        opt = s.create_optimizer(m, 1e-2, weight_decay=0.1)
        return s.prepare(m, opt, get_scheduler("cosine", optimizer=opt, num_warmup_steps=1, num_training_steps=8))

    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(4, 8, generator=g).to(s.device, s.torch_dtype) for _ in range(4)]

    def step(e, x):
        s.backward(e(x).float().pow(2).mean(), e)
        s.step(e)

    a = engine()
    for x in xs[:2]:
        step(a, x)
    sdir = s.save_state({"model": a}, tmp_path / "ckpt", 2)
    verify_checkpoint_files(sdir)
    for x in xs[2:]:
        step(a, x)
    b = engine()
    s.load_state({"model": b}, sdir)
    for x in xs[2:]:
        step(b, x)
    wa, wb = s.full_state_dict(a), s.full_state_dict(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert s.get_lr(a) == s.get_lr(b)
