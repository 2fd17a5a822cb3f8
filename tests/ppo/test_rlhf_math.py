"""rlhf_math against hand-computed tensors; defaults are DeepSpeed-Chat's."""

import math

import pytest
import torch

import torch.nn.functional as F

from chatrlhf.algo.losses import chunked_token_logprobs
from chatrlhf.algo.rlhf_math import (AdaptiveKLController, FixedKLController, PolicyLoss, RunningMoments, ValueLoss,
                                answer_ends, clip_scores, compute_rewards, ema_update_, entropy_from_logits, gae,
                                gather_log_probs, group_advantages, kl_k1, kl_k2, kl_k3, kl_penalized_scores,
                                logprobs_and_entropy, masked_mean, sequence_policy_loss, whiten)

# One sequence: prompt of P=2 tokens, answer of 4 tokens (fills the window) -> shifted length 5, start = P-1 = 1.
START = 1
LOGP = torch.tensor([[-9.0, -1.0, -2.0, -0.5, -1.5]])
REF = torch.tensor([[-7.0, -1.5, -1.0, -0.5, -2.5]])
MASK = torch.tensor([[0.0, 1.0, 1.0, 1.0, 1.0]])
VALUES = torch.tensor([[3.0, 0.5, 1.0, 1.5, 2.0]])
# by hand: k1 = [.5, -1, 0, 1] -> -0.1*k1 = [-.05, .1, 0, -.1]; R = 7 -> clamp 5 added at the last answer position
REWARDS = [-0.05, 0.1, 0.0, 4.9]
# GAE, gamma 1, lam .95: A4 = 4.9-2 = 2.9; A3 = 0+2-1.5+.95*2.9; A2 = .1+1.5-1+.95*A3; A1 = -.05+1-.5+.95*A2
ADV = [3.9576375, 3.69225, 3.255, 2.9]
RET = [4.4576375, 4.69225, 4.755, 4.9]


def test_compute_rewards_reference_defaults():
    r = compute_rewards(LOGP, REF, torch.tensor([7.0]), MASK, start=START)
    assert r.shape == (1, 5)
    torch.testing.assert_close(r[0, START:], torch.tensor(REWARDS))
    # the penalty is -0.1 * k1 at every position (prompt positions are ignored later by gae's start)
    assert r[0, 0].item() == pytest.approx(-0.1 * (-9.0 + 7.0))
    # negative scores clip at -5
    r = compute_rewards(LOGP, REF, torch.tensor([-12.0]), MASK, start=START)
    assert r[0, 4].item() == pytest.approx(-0.1 - 5.0)


def test_compute_rewards_padded_answer_uses_original_end_index():
    # 2 real answer tokens then 2 pads: ends = start + 2 + 1 = 4, the reward lands at index 3 (the position whose
    # input is the last real token, i.e. the state the reward model scores), exactly as DeepSpeed-Chat.
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0, 0.0]])
    assert answer_ends(mask, START).tolist() == [4]
    r = compute_rewards(LOGP, REF, torch.tensor([2.0]), mask, start=START)
    torch.testing.assert_close(r[0, 1:], torch.tensor([-0.05, 0.1, 2.0, -0.1]))
    adv, ret = gae(VALUES, r, mask, START)
    # rewards/values zeroed from index 4: A4 = 0; A3 = 2 - 1.5; A2 = .1 + 1.5 - 1 + .95 A3; A1 = -.05 + 1 - .5 + .95 A2
    a3 = 0.5
    a2 = 0.6 + 0.95 * a3
    a1 = 0.45 + 0.95 * a2
    torch.testing.assert_close(adv[0], torch.tensor([a1, a2, a3, 0.0]))
    torch.testing.assert_close(ret[0], torch.tensor([a1 + 0.5, a2 + 1.0, a3 + 1.5, 0.0]))


def test_compute_rewards_kl_ctl_and_clip_options():
    r = compute_rewards(LOGP, REF, torch.tensor([3.0]), MASK, kl_ctl=0.5, clip_reward_value=1.0, start=START)
    torch.testing.assert_close(r[0, 1:], torch.tensor([-0.25, 0.5, 0.0, -0.5 + 1.0]))
    r3 = compute_rewards(LOGP, REF, torch.tensor([0.0]), MASK, start=START, kl_estimator="k3")
    d = REF - LOGP
    torch.testing.assert_close(r3, -0.1 * (torch.exp(d) - d - 1))


def test_gae_reference_defaults():
    rewards = compute_rewards(LOGP, REF, torch.tensor([7.0]), MASK, start=START)
    adv, ret = gae(VALUES, rewards, MASK, START)
    torch.testing.assert_close(adv, torch.tensor([ADV]))
    torch.testing.assert_close(ret, torch.tensor([RET]))
    # gamma/lam are used: lam = 0 gives one-step TD errors
    adv0, _ = gae(VALUES, rewards, MASK, START, gamma=1.0, lam=0.0)
    torch.testing.assert_close(adv0, torch.tensor([[0.45, 0.6, 0.5, 2.9]]))
    adv_g, _ = gae(VALUES, rewards, MASK, START, gamma=0.5, lam=1.0)
    a4 = 4.9 - 2.0
    a3 = 0.0 + 0.5 * 2.0 - 1.5 + 0.5 * a4
    a2 = 0.1 + 0.5 * 1.5 - 1.0 + 0.5 * a3
    a1 = -0.05 + 0.5 * 1.0 - 0.5 + 0.5 * a2
    torch.testing.assert_close(adv_g, torch.tensor([[a1, a2, a3, a4]]))


def test_policy_loss_reference_defaults():
    adv = torch.tensor([ADV])
    old = LOGP[:, START:]
    new = old + torch.tensor([[0.0, math.log(1.5), math.log(0.5), 0.1]])
    out = PolicyLoss()(new, old, adv, MASK[:, START:])
    # A > 0 everywhere -> per token -A * min(ratio, clip(ratio, .8, 1.2)): ratios 1, 1.5->1.2, 0.5, e^.1
    expected = -(3.9576375 * 1.0 + 3.69225 * 1.2 + 3.255 * 0.5 + 2.9 * math.exp(0.1)) / 4
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.clipfrac.item() == pytest.approx(0.25)
    assert out.ratio_max.item() == pytest.approx(1.5, rel=1e-6)
    lr = torch.tensor([0.0, math.log(1.5), math.log(0.5), 0.1])
    assert out.approx_kl.item() == pytest.approx(((lr.exp() - 1) - lr).mean().item(), rel=1e-5)
    # masked tokens contribute nothing, even with a huge ratio, and the mean is over real tokens only
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    new2 = new.clone()
    new2[0, 3] = 50.0
    out2 = PolicyLoss()(new2, old, adv, mask)
    assert out2.loss.item() == pytest.approx(-(3.9576375 + 3.69225 * 1.2) / 2, rel=1e-6)
    assert out2.ratio_max.item() == pytest.approx(1.5, rel=1e-6)
    # negative advantages: -A * max(ratio, clip) ; ratio 0.5 -> clip 0.8 is the pessimistic one
    out3 = PolicyLoss()(torch.log(torch.tensor([[0.5]])), torch.zeros(1, 1), torch.tensor([[-2.0]]), torch.ones(1, 1))
    assert out3.loss.item() == pytest.approx(2.0 * 0.8)
    assert out3.clipfrac.item() == 1.0


def test_policy_loss_gradient_and_entropy_bonus():
    new = torch.zeros(1, 2, requires_grad=True)
    out = PolicyLoss(entropy_coef=0.5)(new, torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]), torch.ones(1, 2),
                                       entropy=torch.tensor([[2.0, 4.0]]))
    assert out.loss.item() == pytest.approx(0.0 - 0.5 * 3.0)
    assert out.entropy.item() == pytest.approx(3.0)
    out.loss.backward()
    torch.testing.assert_close(new.grad, torch.tensor([[-0.5, 0.5]]))


def test_value_loss_reference_defaults():
    v_old = VALUES[:, START:]
    v_new = torch.tensor([[0.5, 1.5, 1.0, 2.1]])
    loss, clipfrac = ValueLoss()(v_new, v_old, torch.tensor([RET]), MASK[:, START:])
    # clipped values [0.5, 1.2, 1.3, 2.1]; per token max of squared errors
    expected = 0.5 * (3.9576375**2 + 3.49225**2 + 3.755**2 + 2.8**2) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert clipfrac.item() == pytest.approx(0.25)
    loss2, _ = ValueLoss(clip_eps=10.0)(v_new, v_old, torch.tensor([RET]), torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    assert loss2.item() == pytest.approx(0.5 * 3.9576375**2, rel=1e-6)


def test_kl_estimators():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -1.0])
    torch.testing.assert_close(kl_k1(logp, ref), torch.tensor([1.0, -1.0]))
    torch.testing.assert_close(kl_k2(logp, ref), torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(kl_k3(logp, ref), torch.tensor([math.exp(-1) + 1 - 1, math.exp(1) - 1 - 1]))
    assert (kl_k3(torch.randn(100), torch.randn(100)) >= 0).all()


def test_gather_log_probs_and_entropy():
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0]]])
    lp = gather_log_probs(logits, torch.tensor([[1, 0]]))
    torch.testing.assert_close(lp, torch.tensor([[math.log(0.5), math.log(0.75)]]))
    ent = entropy_from_logits(logits)
    torch.testing.assert_close(ent, torch.tensor([[math.log(2.0), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))]]))


def test_logprobs_and_entropy_read_one_log_softmax():
    """PPO's plain log-prob path (experience.answer_logprobs without the chunked head): hand values, the entropy
    only when asked, and without a graph when it is only logged."""
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0]]], requires_grad=True)
    logp = F.log_softmax(logits.float(), dim=-1)
    lp, ent = logprobs_and_entropy(logp, torch.tensor([[1, 0]]))
    assert ent is None
    torch.testing.assert_close(lp, torch.tensor([[math.log(0.5), math.log(0.75)]]))
    lp, ent = logprobs_and_entropy(logp, torch.tensor([[1, 0]]), entropy=True)
    torch.testing.assert_close(ent, torch.tensor([[math.log(2.0), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))]]))
    assert lp.requires_grad and ent.requires_grad
    lp, ent = logprobs_and_entropy(logp, torch.tensor([[1, 0]]), entropy=True, entropy_grad=False)
    assert lp.requires_grad and not ent.requires_grad
    # the logits-level helpers are the same function
    x, labels = torch.randn(2, 3, 7, dtype=torch.bfloat16), torch.randint(0, 7, (2, 3))
    lp, ent = logprobs_and_entropy(F.log_softmax(x.float(), dim=-1), labels, entropy=True)
    assert torch.equal(gather_log_probs(x, labels), lp) and torch.equal(entropy_from_logits(x), ent)
    assert lp.dtype == ent.dtype == torch.float32


@pytest.mark.parametrize("bias", [False, True])
def test_chunked_lm_head_log_probs_equal_the_plain_path(bias):
    """losses.chunked_token_logprobs (from the lm head's input, a few rows at a time) gives the plain path's
    log-probs and entropy, and the same gradients in the hidden states, the head's weight and its bias."""
    torch.manual_seed(0)
    h = torch.randn(2, 5, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    b = torch.randn(11, requires_grad=True) if bias else None
    targets = torch.randint(0, 11, (2, 5))
    lp, ent = chunked_token_logprobs(h, w, targets, chunk=3, entropy=True, bias=b)
    ref_lp, ref_ent = logprobs_and_entropy(F.log_softmax(F.linear(h, w, b).float(), dim=-1), targets, entropy=True)
    torch.testing.assert_close(lp, ref_lp)
    torch.testing.assert_close(ent, ref_ent)
    params = [h, w] + ([b] if bias else [])
    got = torch.autograd.grad((lp * 0.7).sum() - 0.3 * ent.sum(), params)
    want = torch.autograd.grad((ref_lp * 0.7).sum() - 0.3 * ref_ent.sum(), params)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def test_clip_scores():
    s = clip_scores(torch.tensor([-7.0, -5.0, 0.5, 5.0, 9.0], dtype=torch.float64), 5.0)
    assert s.dtype == torch.float32 and s.tolist() == [-5.0, -5.0, 0.5, 5.0, 5.0]
    assert clip_scores(torch.tensor([2.0, -0.25]), 0.5).tolist() == [0.5, -0.25]


def test_kl_penalized_scores_sum_the_answer_tokens_kl():
    """RLOO's reward: score - kl_coef * sum over answer tokens of the KL estimate (masked tokens left out)."""
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -0.5]])
    ref = torch.tensor([[-2.0, -1.0, -9.0], [-1.5, -0.5, -0.5]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    scores = torch.tensor([1.0, 2.0])
    # k1 per token: [1, -1, (6, masked)] -> 0; [1, 0, 0] -> 1
    torch.testing.assert_close(kl_penalized_scores(scores, logp, ref, mask, 0.5), torch.tensor([1.0, 1.5]))
    # k2: [0.5, 0.5] -> 1; [0.5, 0, 0] -> 0.5
    torch.testing.assert_close(kl_penalized_scores(scores, logp, ref, mask, 0.5, "k2"), torch.tensor([0.5, 1.75]))
    torch.testing.assert_close(kl_penalized_scores(scores, logp, ref, mask, 0.0, "k3"), scores)


def test_whiten_and_masked_mean():
    x = torch.tensor([1.0, 2.0, 3.0, 100.0])
    m = torch.tensor([1.0, 1.0, 1.0, 0.0])
    assert masked_mean(x, m).item() == pytest.approx(2.0)
    w = whiten(x, m)
    torch.testing.assert_close(w, torch.tensor([-1.0, 0.0, 1.0, 0.0]), atol=1e-6, rtol=0)  # unbiased std = 1
    w2 = whiten(x, m, shift_mean=False)
    torch.testing.assert_close(w2, torch.tensor([1.0, 2.0, 3.0, 0.0]), atol=1e-6, rtol=0)
    assert masked_mean(x, torch.zeros(4)).item() == 0.0


def test_group_advantages_grpo_and_rloo():
    s = torch.tensor([1.0, 3.0, 0.0, 0.0, 2.0, 4.0])
    g = group_advantages(s, 2, "grpo")
    # group (1,3): mean 2, std sqrt(2); group (0,0): 0; group (2,4): mean 3, std sqrt(2)
    r2 = math.sqrt(2.0)
    torch.testing.assert_close(g, torch.tensor([-1 / r2, 1 / r2, 0.0, 0.0, -1 / r2, 1 / r2]), atol=1e-5, rtol=1e-5)
    s3 = torch.tensor([1.0, 2.0, 6.0])
    r = group_advantages(s3, 3, "rloo")
    torch.testing.assert_close(r, torch.tensor([1 - 4.0, 2 - 3.5, 6 - 1.5]))
    with pytest.raises(ValueError):
        group_advantages(s3, 2, "grpo")
    out = sequence_policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([1.0, -1.0]),
                               torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]))
    assert out.loss.item() == pytest.approx((-2 + 3) / 5)


def test_kl_controllers():
    f = FixedKLController()
    assert f.value == 0.1
    f.update(100.0, 10)
    assert f.value == 0.1
    a = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    a.update(12.0, 256)  # error clipped to +0.2
    assert a.value == pytest.approx(0.2 * (1 + 0.2 * 256 / 10000))
    a.update(6.0 * 0.95, 100)  # error -0.05
    v = 0.2 * (1 + 0.2 * 256 / 10000) * (1 - 0.05 * 100 / 10000)
    assert a.value == pytest.approx(v)
    b = AdaptiveKLController(1.0, 1.0, 1)
    b.load_state_dict(a.state_dict())
    assert (b.value, b.target, b.horizon) == (pytest.approx(v), 6.0, 10000)


def test_running_moments_matches_full_statistics():
    torch.manual_seed(0)
    xs = [torch.randn(5) * 3 + 1, torch.randn(7) * 3 + 1, torch.randn(1)]
    rm = RunningMoments()
    for x in xs:
        rm.update(x)
    allx = torch.cat(xs).double()
    assert rm.mean == pytest.approx(allx.mean().item())
    assert rm.std == pytest.approx(allx.std().item())
    assert rm.count == 13
    y = torch.tensor([2.0])
    assert rm.normalize(y).item() == pytest.approx((2.0 - rm.mean) / rm.std, rel=1e-6)
    assert rm.scale(y).item() == pytest.approx(2.0 / rm.std, rel=1e-6)
    rm2 = RunningMoments()
    rm2.load_state_dict(rm.state_dict())
    assert rm2.mean == rm.mean and rm2.var == rm.var


def test_ema_update():
    e, p = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    ema_update_(e, p)
    torch.testing.assert_close(e, torch.tensor([0.992, 0.008]))


# ---- REINFORCE++, loss aggregation, clip-higher, uniform groups (hand-computed) -----------------------------
def test_aggregate_loss_token_seq_and_dr_grpo():
    from chatrlhf.algo.rlhf_math import aggregate_loss

    per = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert aggregate_loss(per, mask, "token_mean").item() == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert aggregate_loss(per, mask, "seq_mean_token_mean").item() == pytest.approx((2.0 + 4.0) / 2)
    assert aggregate_loss(per, mask, "seq_mean_token_sum_norm").item() == pytest.approx((6 / 4 + 4 / 4) / 2)
    assert aggregate_loss(per, mask, "seq_mean_token_sum_norm", norm_len=8).item() == pytest.approx((6 / 8 + 4 / 8) / 2)
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        aggregate_loss(per, mask, "bogus")


def test_clip_higher_lets_ratios_rise_further_than_they_fall():
    from chatrlhf.algo.rlhf_math import PolicyLoss

    old = torch.zeros(1, 2)
    new = torch.log(torch.tensor([[1.25, 0.7]]))  # ratios 1.25 and 0.7
    adv = torch.tensor([[1.0, -1.0]])
    mask = torch.ones(1, 2)
    sym = PolicyLoss(clip_eps=0.2)(new, old, adv, mask)
    # token 1: max(-1.25, -1.2) = -1.2 (clipped); token 2: max(0.7, 0.8) = 0.8 (clipped below)
    assert sym.loss.item() == pytest.approx((-1.2 + 0.8) / 2, abs=1e-6)
    high = PolicyLoss(clip_eps=0.2, clip_eps_high=0.28)(new, old, adv, mask)
    # upper bound 1.28: token 1 keeps its ratio 1.25 (-1.25); the lower bound is unchanged
    assert high.loss.item() == pytest.approx((-1.25 + 0.8) / 2, abs=1e-6)
    assert sym.clipfrac.item() == pytest.approx(1.0) and high.clipfrac.item() == pytest.approx(0.5)


def test_uniform_groups_are_found():
    from chatrlhf.algo.rlhf_math import uniform_groups

    scores = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.5, 0.5000001])
    assert uniform_groups(scores, 4).tolist() == [True] * 4 + [False] * 4
    # [0.5, 0.5000001] differ (by 1.2e-7 in fp32): uniform only within a tolerance
    assert uniform_groups(scores[4:], 2).tolist() == [False, False, False, False]
    assert uniform_groups(scores[4:], 2, tol=1e-6).tolist() == [False, False, True, True]


def test_reinforce_pp_returns_kl_penalty_and_global_normalisation():
    from chatrlhf.algo.rlhf_math import reinforce_pp_advantages

    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    scores = torch.tensor([1.0, -1.0])
    adv = reinforce_pp_advantages(scores, kl, mask, kl_coef=0.5)
    # rewards: row 0 [-0.05, -0.1, -0.15 + 1] -> returns [0.7, 0.75, 0.85]; row 1 [-0.25 - 1] -> [-1.25]
    g = torch.tensor([0.7, 0.75, 0.85, -1.25])
    want = (g - g.mean()) / (g.var(unbiased=False).sqrt() + 1e-8)
    got = torch.cat([adv[0], adv[1, :1]])
    assert torch.allclose(got, want, atol=1e-6)
    assert adv[1, 1:].abs().sum() == 0  # padding stays zero
    # the group form centres scores on their group first: two groups of two
    adv_b = reinforce_pp_advantages(torch.tensor([1.0, 0.0, 3.0, 3.0]), torch.zeros(4, 2), torch.ones(4, 2),
                                    kl_coef=0.1, group_size=2)
    # returns: [0.5, 0.5], [-0.5, -0.5], [0, 0], [0, 0] -> mean 0, std sqrt(0.125)
    assert torch.allclose(adv_b[:, 0], torch.tensor([0.5, -0.5, 0.0, 0.0]) / (0.125 ** 0.5 + 1e-8), atol=1e-6)


def test_sequence_policy_loss_takes_token_advantages():
    from chatrlhf.algo.rlhf_math import sequence_policy_loss

    lp = torch.zeros(2, 3)
    mask = torch.ones(2, 3)
    per_seq = sequence_policy_loss(lp, lp, torch.tensor([1.0, -1.0]), mask)
    per_tok = sequence_policy_loss(lp, lp, torch.tensor([[1.0] * 3, [-1.0] * 3]), mask)
    assert per_seq.loss.item() == pytest.approx(per_tok.loss.item()) == pytest.approx(0.0)
    out = sequence_policy_loss(lp, lp, torch.tensor([[3.0, 0, 0], [0, 0, 0]]), mask, loss_agg="seq_mean_token_mean")
    assert out.loss.item() == pytest.approx(-(3.0 / 3) / 2)
