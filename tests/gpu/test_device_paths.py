"""The paths that matter on an accelerator, written for whatever device DeepSpeed's accelerator reports: here (CPU,
in CI) they run on the CPU; scripts/gpu_check.sh runs them on CUDA. The strategy at ZeRO 0, 2 and 3 (init, steps
that lower the loss, save, load into a fresh engine: the same weights), and every decoder that can run a model
giving transformers' greedy tokens on that device, in the dtype a run there would use."""

import pytest
import torch


def _device_and_dtype():
    from chatrlhf.engine import DeepSpeedStrategy, StrategyConfig

    s = DeepSpeedStrategy(StrategyConfig(dtype="auto"))
    return s.device, s.torch_dtype


@pytest.fixture(scope="module")
def llama_dir(tiny_model_factory):
    return tiny_model_factory("llama", hidden=64, layers=2, vocab=512)


@pytest.mark.slow  # over 2 s on a 2-core CPU
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_strategy_steps_saves_and_loads_on_the_device(llama_dir, tmp_path, stage):
    from chatrlhf.engine import DeepSpeedStrategy, StrategyConfig, unwrap
    from chatrlhf.models.loading import load_causal_lm

    def engine():
        strategy = DeepSpeedStrategy(StrategyConfig(dtype="auto", zero_stage=stage, per_device_train_batch_size=4))
        strategy.setup_distributed()
        torch.manual_seed(0)
        with strategy.zero3_init_context(stage):
            model = load_causal_lm(str(llama_dir), dtype=strategy.torch_dtype)
        opt = strategy.create_optimizer(model, lr=3e-3)
        return strategy, strategy.prepare(model, opt)

    strategy, eng = engine()
    ids = torch.randint(4, 400, (4, 24), generator=torch.Generator().manual_seed(1)).to(strategy.device)
    losses = []
    for _ in range(6):
        loss = eng(input_ids=ids, labels=ids).loss
        strategy.backward(loss, eng)
        strategy.step(eng)
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0], losses
    assert next(unwrap(eng).parameters()).device.type == strategy.device.type
    strategy.save_state({"actor": eng}, tmp_path / "ckpt", step=6)
    want = {n: t.float().cpu() for n, t in strategy.full_state_dict(eng).items()} if strategy.is_rank0 else None

    strategy2, eng2 = engine()
    strategy2.load_state({"actor": eng2}, tmp_path / "ckpt" / "step_6")
    got = strategy2.full_state_dict(eng2)
    assert set(got) == set(want)
    for n, t in got.items():
        assert torch.equal(t.float().cpu(), want[n]), n
    # the optimizer state came back too: one more step from each gives the same loss
    l1 = eng(input_ids=ids, labels=ids).loss
    l2 = eng2(input_ids=ids, labels=ids).loss
    assert torch.equal(l1.detach(), l2.detach())


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_every_decoder_gives_generate_tokens_on_the_device(tiny_model_factory, family, monkeypatch, tmp_path):
    """The measured choice of decoder (engine/calibrate.py) only picks among equals: each candidate path gives
    ``generate()``'s greedy tokens on this device and dtype, a left-padded row included."""
    from chatrlhf.engine import hybrid
    from chatrlhf.models.loading import load_causal_lm, load_tokenizer

    monkeypatch.setenv("CHATRLHF_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(hybrid._Proj, "PACK_MIN_ELEMENTS", 0)  # pack the tiny matrices too, where packing applies
    device, dtype = _device_and_dtype()
    path = tiny_model_factory(family, hidden=64, layers=2, vocab=512)
    tok = load_tokenizer(str(path), padding_side="left")
    model = load_causal_lm(str(path), tokenizer=tok, dtype=dtype).to(device).eval()
    enc = tok(["Human: What is 12 plus 7? Assistant:", "hi"], return_tensors="pt", padding=True).to(device)
    ref = model.generate(**enc, max_new_tokens=12, min_new_tokens=12, do_sample=False, temperature=None, top_p=None,
                         top_k=None, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    paths = hybrid.candidate_paths(model)
    assert paths[-1] == "generate" and len(paths) >= 2
    for p in paths:
        monkeypatch.setenv("CHATRLHF_PATH_DECODE", p)
        out = hybrid.generate(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=12, min_new_tokens=12,
                              pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        assert out.device.type == device.type and torch.equal(out, ref), (p, device, dtype)


def test_liger_kernel_flag_is_refused_clearly_without_a_gpu(tiny_model_dir, tmp_path, capsys):
    """--use_liger_kernel on a CPU run (or without the package) is one clear line and exit 2 before any model
    loads; on a GPU machine the check measures it instead (scripts/gpu_check.py, part liger)."""
    from chatrlhf.cli import main

    device, _ = _device_and_dtype()
    if device.type != "cpu":  # on an accelerator the flag is exercised by the bench part of the GPU check
        from chatrlhf.engine import liger

        liger.check_available(device.type)
        return
    rc = main(["sft", "--model_name_or_path", str(tiny_model_dir), "--data_path", "local/jsonfile=/nonexistent",
               "--output_dir", str(tmp_path / "out"), "--use_liger_kernel"])
    err = capsys.readouterr().err
    assert rc == 2 and "--use_liger_kernel needs a GPU" in err and "Traceback" not in err, err
    assert not (tmp_path / "out" / "done.json").exists()
