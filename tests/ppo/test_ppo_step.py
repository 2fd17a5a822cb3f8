"""Step 3 end to end on tiny models: experience helpers, one iteration per ZeRO stage / LoRA, GRPO/RLOO, guards,
resume, checkpoints."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chatrlhf.models.dims import flops_per_pass
from chatrlhf.trainers.metrics import read_metrics
from chatrlhf.trainers.ppo import experience as px
from chatrlhf.trainers.ppo.trainer import PPOConfig, run_ppo

TRAIN_KEYS = ("reward_mean", "reward_std", "kl", "actor_loss", "critic_loss", "clipfrac", "approx_kl", "ratio_max",
              "value_error", "response_length", "entropy", "ema_reward")


def _weights(d):
    return load_file(str(Path(d) / "model.safetensors"))


def _changed(before, after_dir):
    after = _weights(after_dir)
    return sum(not torch.equal(before[k], after[k]) for k in before if k in after)


# ---- experience helpers -----------------------------------------------------------------------------------
def test_answer_mask_keeps_first_eos_and_drops_short_answers():
    eos, pad = 2, 1
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1], [1, 1, 1]])
    seq = torch.tensor([[1, 5, 6, 7, 8, eos, pad],   # 3 real tokens + EOS
                        [4, 5, 6, eos, pad, pad, pad],   # EOS only: 1 real token -> dropped
                        [4, 5, 6, 9, eos, eos, eos]])  # pad == eos style: 1 token + EOS, repeats masked
    mask = px.answer_attention_mask(seq, prompt_mask, eos)
    assert mask.tolist() == [[0, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0]]
    assert px.drop_short_answers(seq, mask, 3).tolist() == [0, 2]
    # groups (GRPO/RLOO): a group with one dropped sample goes entirely
    assert px.drop_short_answers(torch.cat([seq, seq[:1]]), torch.cat([mask, mask[:1]]), 3, group_size=2).tolist() == [2, 3]
    assert px.drop_short_answers(seq[[0, 2]], mask[[0, 2]], 3, group_size=2).tolist() == [0, 1]


def test_flops_formula():
    # F = 24 k B s l h^2 (1 + s/(6h) + V/(16 l h))
    assert flops_per_pass(2, 64, 512, 4, 32, 3) == pytest.approx(24 * 3 * 4 * 32 * 2 * 64**2 * (1 + 32 / 384 + 512 / 2048))


# ---- one iteration per engine configuration ----------------------------------------------------------------
@pytest.mark.slow  # over 2 s on a 2-core CPU
@pytest.mark.parametrize("stage,lora", [(0, 0), (2, 0), (3, 0), (0, 4)], ids=["zero0", "zero2", "zero3", "lora"])
def test_one_ppo_iteration_updates_actor_and_critic(ppo_cfg, tiny_model_dir, fresh_rm_dir, stage, lora):
    cfg = ppo_cfg(actor_zero_stage=stage, critic_zero_stage=stage, actor_lora_dim=lora, critic_lora_dim=lora,
                  max_steps=1, enable_ema=stage == 3, per_device_training_batch_size=4 if stage == 3 else 2)
    out = run_ppo(cfg)
    assert out["steps"] == 1 and out["stopped_reason"] is None
    for k in TRAIN_KEYS:
        assert k in out and torch.isfinite(torch.tensor(out[k])), k
    od = Path(cfg.output_dir)
    assert _changed(_weights(tiny_model_dir), od / "actor") > 0
    rm_before = _weights(fresh_rm_dir)
    assert _changed(rm_before, od / "critic") > 0
    assert "v_head.weight" in _weights(od / "critic")
    assert json.loads((od / "done.json").read_text())["step"] == "ppo"
    rec = [r for r in read_metrics(od) if r["kind"] == "train"]
    assert len(rec) == 1 and all(k in rec[0] for k in TRAIN_KEYS)
    assert any(r["kind"] == "throughput" and r["e2e_latency_s"] > 0 for r in read_metrics(od))
    if stage == 3:  # one optimizer step, then EMA = 0.992 * initial + 0.008 * updated actor, also under ZeRO-3
        init, act, ema = _weights(tiny_model_dir), _weights(od / "actor"), _weights(od / "actor_ema")
        moved = [k for k in act if not torch.equal(init[k], act[k])]
        assert moved
        k = moved[0]
        torch.testing.assert_close(ema[k], 0.992 * init[k] + 0.008 * act[k], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_critic_free_algos_run(ppo_cfg, tiny_model_dir, algo):
    cfg = ppo_cfg(algo=algo, num_samples_per_prompt=2, per_device_generation_batch_size=2, max_steps=1)
    out = run_ppo(cfg)
    od = Path(cfg.output_dir)
    assert out["steps"] == 1 and not (od / "critic").exists()
    assert _changed(_weights(tiny_model_dir), od / "actor") > 0
    assert torch.isfinite(torch.tensor(out["actor_loss"]))


def test_guard_skips_and_stops_with_reason(ppo_cfg, tiny_model_dir):
    # a ratio threshold below 1 trips on every micro-step (the max ratio over answer tokens is >= ~1)
    # ... and since no step updated the weights, the step is not marked done (done.json would let `chatrlhf
    # train` carry an untrained actor forward): a UserError naming the guard's reason
    from chatrlhf.errors import UserError

    cfg = ppo_cfg(max_ratio=0.5, max_consecutive_skips=2, max_steps=5)
    with pytest.raises(UserError, match="no optimizer step was taken.*2 consecutive skipped steps.*ratio"):
        run_ppo(cfg)
    assert not (Path(cfg.output_dir) / "done.json").exists()
    # nothing was applied: the actor is the initial model
    assert _changed(_weights(tiny_model_dir), Path(cfg.output_dir) / "actor") == 0


def test_short_answers_are_dropped_and_whole_batch_skipped(ppo_cfg):
    # max_answer_seq_len 1: every answer has at most one real token -> every batch is skipped, run ends cleanly
    # ... and, with no optimizer step taken, the step is not marked done (the pipeline must not carry the untrained
    # actor forward): a UserError naming the reason, no done.json
    from chatrlhf.errors import UserError

    cfg = ppo_cfg(max_answer_seq_len=1, max_steps=-1, num_train_epochs=1, per_device_generation_batch_size=32)
    with pytest.raises(UserError, match="no optimizer step was taken.*no trainable experience"):
        run_ppo(cfg)
    assert not (Path(cfg.output_dir) / "done.json").exists()


def test_tokenizer_mismatch_is_a_clear_error(ppo_cfg, tiny_model_factory, tmp_path):
    from chatrlhf.errors import ModelError
    from chatrlhf.models.reward_model import load_reward_model
    from chatrlhf.models.loading import load_tokenizer

    other = tiny_model_factory("gpt2", hidden=32, layers=1, vocab=600)
    rm_dir = tmp_path / "rm_other"
    load_reward_model(other).save_pretrained(rm_dir)
    load_tokenizer(other).save_pretrained(rm_dir)
    with pytest.raises(ModelError, match="tokenizers differ"):
        run_ppo(ppo_cfg(critic_model_name_or_path=str(rm_dir)))


@pytest.mark.slow  # over 2 s on a 2-core CPU
def test_resume_continues_where_it_stopped(ppo_cfg, tmp_path):
    common = dict(max_steps=4, save_interval=2, enable_ema=True, generation_batches=1, ppo_epochs=2,
                  adaptive_kl=True, kl_target=0.01, kl_horizon=100)
    straight = ppo_cfg(output_dir=str(tmp_path / "straight"), **common)
    run_ppo(straight)
    ref = {r["step"]: r for r in read_metrics(tmp_path / "straight") if r["kind"] == "train"}
    # interrupted after step 2 (test mode), then resumed with the same flags
    cut = ppo_cfg(output_dir=str(tmp_path / "cut"), enable_test_mode=True, test_stop_step=3, **common)
    cut.max_steps = 4
    run_ppo(cut)
    assert (tmp_path / "cut" / "checkpoints" / "step_2" / "trainer_state.json").exists()
    import shutil

    shutil.rmtree(tmp_path / "cut" / "actor")
    (tmp_path / "cut" / "metrics.jsonl").unlink()
    resumed = ppo_cfg(output_dir=str(tmp_path / "cut"), resume="auto", **common)
    out = run_ppo(resumed)
    got = {r["step"]: r for r in read_metrics(tmp_path / "cut") if r["kind"] == "train"}
    assert sorted(got) == [3, 4] and out["steps"] == 4
    for step in (3, 4):
        for k in ("reward_mean", "kl", "actor_loss", "critic_loss", "kl_coef", "ema_reward"):
            assert got[step][k] == pytest.approx(ref[step][k], rel=1e-4, abs=1e-6), (step, k)
    a, b = _weights(tmp_path / "straight" / "actor_ema"), _weights(tmp_path / "cut" / "actor_ema")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


@pytest.mark.slow  # over 2 s on a 2-core CPU
def test_resume_from_a_checkpoint_at_the_end_of_an_epoch_runs_the_next_epoch(ppo_cfg, tmp_path):
    """A checkpoint saved after an epoch's last prompt batch resumes into the next epoch (its first, empty pass over
    the rest of the saved epoch is not 'a whole pass that produced nothing')."""
    import shutil

    common = dict(max_steps=-1, num_train_epochs=2, per_device_generation_batch_size=32,
                  per_device_training_batch_size=16, save_interval=2)
    straight = run_ppo(ppo_cfg(output_dir=str(tmp_path / "straight"), **common))
    assert straight["steps"] == 4  # 2 prompt batches an epoch
    run_ppo(ppo_cfg(output_dir=str(tmp_path / "cut"), enable_test_mode=True, test_stop_step=3, **common))
    state = json.loads((tmp_path / "cut" / "checkpoints" / "step_2" / "trainer_state.json").read_text())
    assert state["batch_in_epoch"] == 2  # saved at the end of epoch 0
    shutil.rmtree(tmp_path / "cut" / "actor")
    resumed = run_ppo(ppo_cfg(output_dir=str(tmp_path / "cut"), resume="auto", **common))
    assert resumed["steps"] == 4 and not resumed.get("stopped_reason"), resumed


def test_cli_flags_parse_with_reference_names(tiny_model_dir, fresh_rm_dir):
    from chatrlhf.config import parse_config

    cfg = parse_config(PPOConfig, ["--actor_model_name_or_path", str(tiny_model_dir), "--critic_model_name_or_path",
                                   str(fresh_rm_dir), "--actor_zero_stage", "2", "--unsup_coef", "1.5",
                                   "--enable_ema", "--algo", "rloo", "--num_samples_per_prompt", "3"])
    assert (cfg.actor_zero_stage, cfg.unsup_coef, cfg.enable_ema, cfg.algo) == (2, 1.5, True, "rloo")
    d = PPOConfig.__dataclass_fields__
    assert d["actor_learning_rate"].default == 9.65e-6 and d["critic_learning_rate"].default == 5e-6
    assert (d["kl_ctl"].default, d["clip_reward_value"].default, d["cliprange"].default,
            d["cliprange_value"].default, d["gamma"].default, d["lam"].default) == (0.1, 5.0, 0.2, 0.2, 1.0, 0.95)
    assert (d["unsup_coef"].default, d["generation_batches"].default, d["ppo_epochs"].default) == (27.8, 1, 1)
    assert all(f.metadata.get("help") for f in d.values())


@pytest.mark.slow  # over 2 s on a 2-core CPU
@pytest.mark.parametrize("stage,lora", [(0, 0), (3, 4)], ids=["zero0", "zero3-lora"])
def test_reused_experience_forward_trains_like_a_repeated_one(ppo_cfg, monkeypatch, stage, lora):
    """On-policy (one epoch, one micro-batch, no dropout) the experience pass's actor/critic forwards are trained
    through: one actor forward fewer per step, and the same updates as repeating the forward."""
    calls = {"n": 0}
    orig = px.answer_logprobs

    def counting(*a, **kw):
        calls["n"] += 1
        return orig(*a, **kw)

    monkeypatch.setattr(px, "answer_logprobs", counting)
    outs = {}
    for reuse in (True, False):
        calls["n"] = 0
        cfg = ppo_cfg(per_device_training_batch_size=4, max_steps=2, reuse_experience_forward=reuse,
                      actor_zero_stage=stage, critic_zero_stage=stage, actor_lora_dim=lora, critic_lora_dim=lora,
                      output_dir=str(Path(ppo_cfg().output_dir).parent / f"out_{reuse}"))
        out = run_ppo(cfg)
        assert out["steps"] == 2
        # per step: actor + reference in the experience pass, + the actor's training forward when repeated
        assert calls["n"] == (2 * 2 if reuse else 3 * 2)
        outs[reuse] = (out, Path(cfg.output_dir))
    (a, da), (b, db) = outs[True], outs[False]
    assert a["ratio_max"] == pytest.approx(1.0, abs=1e-6)
    for k in ("actor_loss", "critic_loss", "reward_mean", "kl"):
        assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k
    for who in ("actor", "critic"):
        wa, wb = _weights(da / who), _weights(db / who)
        assert wa.keys() == wb.keys()
        for k in wa:  # float noise only: the no-grad eval forward and the autograd one may differ in the last bit,
            # which Adam (lr 1e-3, update ~ lr * sign) can carry to ~1e-6 on a near-zero gradient
            torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=2e-5)


def test_dropout_makes_train_forward_random(tiny_model_factory):
    from chatrlhf.models.loading import load_causal_lm

    d = tiny_model_factory("llama", hidden=64, layers=2, vocab=512)
    assert px.train_forward_is_deterministic(load_causal_lm(str(d)))
    assert not px.train_forward_is_deterministic(load_causal_lm(str(d), dropout=0.1))
    assert not px.train_forward_is_deterministic(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.1)))
