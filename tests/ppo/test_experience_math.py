"""The experience code runs the tested maths: finalize_group's score clamp and RLOO's KL term are
rlhf_math.clip_scores / kl_penalized_scores, and answer_logprobs' plain path is rlhf_math.logprobs_and_entropy."""

import pytest
import torch

from chatrlhf.algo import rlhf_math as rlm
from chatrlhf.trainers import lm_head
from chatrlhf.trainers.ppo import experience as px


def _experience(scores, seed=0):
    """Four rows (two groups of two): prompt of P = 3, answers of 1..4 tokens in a width of 4."""
    g = torch.Generator().manual_seed(seed)
    n, p, a = len(scores), 3, 4
    seq = torch.randint(4, 50, (n, p + a), generator=g)
    mask = torch.ones(n, p + a, dtype=torch.long)
    for i in range(n):
        mask[i, p + 1 + i % a:] = 0
    logprobs = px.full_width(-torch.rand(n, a, generator=g), p - 1)
    ref = px.full_width(-torch.rand(n, a, generator=g), p - 1)
    return px.Experience(seq=seq, attention_mask=mask, action_mask=mask[:, 1:].float(), logprobs=logprobs,
                         ref_logprobs=ref, reward_score=torch.tensor(scores), prompt_len=p)


def test_grpo_advantages_come_from_clipped_scores():
    exp = px.finalize_group(_experience([9.0, -9.0, 1.0, 0.5]), "grpo", 2, kl_ctl=0.1, clip_reward_value=5.0)
    clipped = rlm.clip_scores(torch.tensor([9.0, -9.0, 1.0, 0.5]), 5.0)
    assert clipped.tolist() == [5.0, -5.0, 1.0, 0.5]
    assert torch.equal(exp.rewards, clipped)  # no KL in GRPO's rewards: it is in the loss
    assert torch.equal(exp.advantages, rlm.group_advantages(clipped, 2, "grpo"))


def test_scores_equal_after_the_clamp_make_a_uniform_group():
    exp = px.finalize_group(_experience([7.0, 9.0, 1.0, 0.5]), "grpo", 2, kl_ctl=0.1, clip_reward_value=5.0,
                            drop_uniform=True)
    assert exp.info["uniform_dropped"] == 2
    assert exp.action_mask[:2, exp.start:].sum() == 0 and exp.action_mask[2:, exp.start:].sum() > 0


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_rloo_subtracts_the_answers_kl_from_the_clipped_score(estimator):
    e = _experience([9.0, -1.0, 1.0, 0.5])
    start, mask = e.start, e.action_mask[:, e.start:].clone()
    lp, ref = e.logprobs[:, start:].clone(), e.ref_logprobs[:, start:].clone()
    exp = px.finalize_group(e, "rloo", 2, kl_ctl=0.2, clip_reward_value=5.0, kl_estimator=estimator)
    want = rlm.kl_penalized_scores(rlm.clip_scores(torch.tensor([9.0, -1.0, 1.0, 0.5]), 5.0), lp, ref, mask, 0.2,
                                   estimator)
    assert torch.equal(exp.rewards, want)
    assert torch.equal(exp.advantages, rlm.group_advantages(want, 2, "rloo"))
    # by hand for row 0: 5 - 0.2 * the KL summed over its one answer token
    kl0 = rlm.kl_estimate(lp[0, :1], ref[0, :1], estimator).sum()
    assert exp.rewards[0].item() == pytest.approx(5.0 - 0.2 * kl0.item())


def test_answer_logprobs_plain_path_is_the_tested_function(tiny_model_dir, monkeypatch):
    from chatrlhf.models.loading import load_causal_lm

    model = load_causal_lm(str(tiny_model_dir))
    seq = torch.randint(4, 500, (2, 10))
    mask = torch.ones_like(seq)
    calls, tested = [], rlm.logprobs_and_entropy

    def spy(*a, **kw):
        calls.append(tested(*a, **kw))
        return calls[-1]

    monkeypatch.setattr(rlm, "logprobs_and_entropy", spy)
    monkeypatch.setenv(lm_head.ENV, "0")  # the plain logits path
    lp, ent = px.answer_logprobs(model, seq, mask, 4, entropy=True)
    assert len(calls) == 1 and calls[0][0] is lp and calls[0][1] is ent
    assert lp.shape == ent.shape == (2, 5)
    # ... and it agrees with the chunked lm-head path
    monkeypatch.delenv(lm_head.ENV)
    lm_head._decided.clear()
    lp_c, ent_c = px.answer_logprobs(model, seq, mask, 4, entropy=True)
    assert len(calls) == 1  # the chunked path took this call
    torch.testing.assert_close(lp_c, lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent_c, ent, atol=1e-5, rtol=1e-5)
