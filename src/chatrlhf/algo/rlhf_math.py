"""RLHF math as small pure functions and classes (no DeepSpeed, no model): each is unit-tested against hand values.

Layout (DeepSpeed-Chat's): ``seq = [left-padded prompt of length P | answer, right-padded]`` of length L.
Per-token tensors (log-probs, values, rewards) are "shifted": index t belongs to the token ``seq[t+1]`` predicted
from ``seq[:t+1]``, so they have length L-1; ``action_mask = attention_mask[:, 1:]`` and the answer starts at
``start = P - 1``.

Defaults reproduce DeepSpeed-Chat's PPO exactly: fixed kl_ctl 0.1, clip_reward_value 5, cliprange 0.2,
cliprange_value 0.2, gamma 1.0, lam 0.95, k1 KL, no whitening, EMA beta 0.992. Everything else is opt-in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------------
# Log-probabilities, masks, statistics
# ----------------------------------------------------------------------------------------------------------------


def logprobs_and_entropy(logp: torch.Tensor, labels: torch.Tensor, entropy: bool = False,
                         entropy_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(label) per position, and the entropy when asked, both read from one fp32 log-softmax ``logp``
    [B, T, V] (the caller can free the logits before the entropy's [B, T, V] temporaries): -> ([B, T], [B, T] or
    None). ``entropy_grad`` False: the entropy is built without a graph (it is then only logged). PPO's plain
    (unchunked) log-prob path; :func:`chatrlhf.algo.losses.chunked_token_logprobs` computes the same from the lm
    head's input."""
    lp = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    if not entropy:
        return lp, None
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        return lp, entropy_from_log_probs(logp)


def entropy_from_log_probs(logp: torch.Tensor) -> torch.Tensor:
    """Per-position entropy -sum_v p_v log p_v of a log-softmax [..., V] -> [...]."""
    return -(logp.exp() * logp).sum(-1)


def gather_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[..., label] computed in fp32: [B, T, V], [B, T] -> [B, T]."""
    return logprobs_and_entropy(F.log_softmax(logits.float(), dim=-1), labels)[0]


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-token entropy of the categorical distribution given by ``logits`` (fp32): [B, T, V] -> [B, T]."""
    return entropy_from_log_probs(F.log_softmax(logits.float(), dim=-1))


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1 (an all-zero mask gives 0, not NaN)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mask = mask.to(x.dtype)
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def whiten(x: torch.Tensor, mask: torch.Tensor | None = None, shift_mean: bool = True,
           eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked positions (the mean is added back when ``shift_mean`` is False)."""
    if mask is None:
        mask = torch.ones_like(x)
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# KL estimators (per token, between the sampling policy and the reference), Schulman's k1/k2/k3
# ----------------------------------------------------------------------------------------------------------------


def kl_k1(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """k1 = log pi - log pi_ref (unbiased, can be negative). DeepSpeed-Chat's estimator."""
    return log_probs - ref_log_probs


def kl_k2(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """k2 = 0.5 (log pi - log pi_ref)^2 (biased, non-negative)."""
    return 0.5 * (log_probs - ref_log_probs) ** 2


def kl_k3(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """k3 = exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1 (unbiased, non-negative)."""
    d = (ref_log_probs - log_probs).clamp(-20.0, 20.0)
    return torch.exp(d) - d - 1.0


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_estimate(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    try:
        return KL_ESTIMATORS[estimator](log_probs, ref_log_probs)
    except KeyError:
        raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {sorted(KL_ESTIMATORS)}") from None


# ----------------------------------------------------------------------------------------------------------------
# Rewards and advantages (PPO with a critic)
# ----------------------------------------------------------------------------------------------------------------


def answer_ends(action_mask: torch.Tensor, start: int) -> torch.Tensor:
    """DeepSpeed-Chat's ``ends = start + action_mask[:, start:].sum(1) + 1`` (exclusive end of the reward span).

    With n real answer tokens, index ``start + n`` is the position whose input is the last real answer token (the
    state after the whole answer, the one the reward model scores); when the answer fills the whole generation
    window the span is cut at the end of the sequence, so the last index is ``start + n - 1``.
    """
    return start + action_mask[:, start:].sum(1).long() + 1


def clip_scores(scores: torch.Tensor, clip_value: float) -> torch.Tensor:
    """Reward scores clamped to [-clip_value, clip_value] in fp32 (DeepSpeed-Chat's ``clip_reward_value``)."""
    return torch.clamp(scores.float(), -clip_value, clip_value)


def compute_rewards(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, reward_score: torch.Tensor,
                    action_mask: torch.Tensor, kl_ctl: float = 0.1, clip_reward_value: float = 5.0,
                    start: int = 0, kl_estimator: str = "k1") -> torch.Tensor:
    """Per-token rewards: ``-kl_ctl * KL_t`` at every position, plus ``clamp(R, -c, c)`` at the last position of
    each answer's span ``[start, ends)`` (``rewards[j, start:ends[j]][-1]``, exactly as DeepSpeed-Chat).

    Shapes: log_probs/ref_log_probs/action_mask [B, L-1], reward_score [B]. Returns [B, L-1] (fp32). Positions
    after the span are left as they are; :func:`gae` zeroes them (as DeepSpeed-Chat's training step does).
    """
    rewards = -kl_ctl * kl_estimate(log_probs.float(), ref_log_probs.float(), kl_estimator)
    clipped = clip_scores(reward_score, clip_reward_value)
    length = rewards.shape[1]
    last = (answer_ends(action_mask, start).clamp(max=length) - 1).clamp(min=start)
    rewards = rewards.clone()
    rewards[torch.arange(rewards.shape[0], device=rewards.device), last] += clipped
    return rewards


def gae(values: torch.Tensor, rewards: torch.Tensor, action_mask: torch.Tensor, start: int,
        gamma: float = 1.0, lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation from ``start`` to the end, backwards; V after the end is 0.

    Rewards and values at and after each answer's ``ends`` (see :func:`answer_ends`) are zeroed first, as
    DeepSpeed-Chat does. delta_t = r_t + gamma V_{t+1} - V_t; A_t = delta_t + gamma lam A_{t+1}; returns = A + V.
    Shapes: values/rewards/action_mask [B, L-1] -> advantages, returns [B, L-1-start] (detached).
    """
    values, rewards = values.detach().float(), rewards.detach().float()
    length = rewards.shape[1]
    pos = torch.arange(length, device=rewards.device).unsqueeze(0)
    keep = (pos < answer_ends(action_mask, start).unsqueeze(1)).to(rewards.dtype)
    values, rewards = values * keep, rewards * keep
    lastgaelam = torch.zeros_like(rewards[:, 0])
    reversed_adv = []
    for t in reversed(range(start, length)):
        next_values = values[:, t + 1] if t < length - 1 else torch.zeros_like(values[:, t])
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        reversed_adv.append(lastgaelam)
    advantages = torch.stack(reversed_adv[::-1], dim=1)
    returns = advantages + values[:, start:]
    return advantages, returns


# ----------------------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class PolicyLossOutput:
    loss: torch.Tensor
    clipfrac: torch.Tensor
    approx_kl: torch.Tensor
    ratio_max: torch.Tensor
    entropy: torch.Tensor | None = None


LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


def aggregate_loss(per_token: torch.Tensor, mask: torch.Tensor, how: str = "token_mean",
                   norm_len: int | None = None) -> torch.Tensor:
    """A scalar loss from per-token losses [B, T] over ``mask``:

    - ``token_mean``: sum over every answer token of the batch / their number (DeepSpeed-Chat's actor loss; DAPO's
      token-level loss: long answers weigh in proportion to their tokens);
    - ``seq_mean_token_mean``: each answer's token mean, then the mean over answers (the original GRPO: a token of
      a long answer weighs less);
    - ``seq_mean_token_sum_norm``: each answer's token sum / ``norm_len`` (default T, the generation budget), then
      the mean over answers (Dr. GRPO: no length bias either way).
    """
    mask = mask.to(per_token.dtype)
    if how == "token_mean":
        return (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    rows = mask.sum(1) > 0
    n_rows = rows.sum().clamp(min=1)
    if how == "seq_mean_token_mean":
        return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1.0))[rows].sum() / n_rows
    if how == "seq_mean_token_sum_norm":
        return ((per_token * mask).sum(1) / float(norm_len or per_token.shape[1]))[rows].sum() / n_rows
    raise ValueError(f"unknown loss aggregation {how!r}; choose one of {', '.join(LOSS_AGGREGATIONS)}")


class PolicyLoss(nn.Module):
    """PPO clipped surrogate (DeepSpeed-Chat's ``actor_loss_fn``): with ratio = exp((logp - logp_old) * mask),
    loss = sum(max(-A ratio, -A clip(ratio, 1-eps, 1+eps_high)) * mask) / sum(mask), minus ``entropy_coef`` times
    the masked mean entropy when an entropy tensor is given. ``clip_eps_high`` (DAPO's "clip-higher"; default
    ``clip_eps``) lets low-probability tokens rise further than high-probability ones fall; ``loss_agg`` chooses how
    token losses become one number (:func:`aggregate_loss`; default as DeepSpeed-Chat). Also returns clip
    fraction, approx KL (k3 of old vs new) and the largest ratio over answer tokens (all detached)."""

    def __init__(self, clip_eps: float = 0.2, entropy_coef: float = 0.0, clip_eps_high: float | None = None,
                 loss_agg: str = "token_mean"):
        super().__init__()
        if loss_agg not in LOSS_AGGREGATIONS:
            raise ValueError(f"unknown loss aggregation {loss_agg!r}; choose one of {', '.join(LOSS_AGGREGATIONS)}")
        self.clip_eps = clip_eps
        self.clip_eps_high = clip_eps if clip_eps_high is None else clip_eps_high
        self.entropy_coef = entropy_coef
        self.loss_agg = loss_agg

    def forward(self, log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, entropy: torch.Tensor | None = None) -> PolicyLossOutput:
        mask = mask.to(torch.float32)
        log_ratio = (log_probs.float() - old_log_probs.float()) * mask
        ratio = torch.exp(log_ratio)
        pg1 = -advantages * ratio
        pg2 = -advantages * torch.clamp(ratio, 1.0 - self.clip_eps, 1.0 + self.clip_eps_high)
        n = mask.sum().clamp(min=1.0)
        loss = aggregate_loss(torch.max(pg1, pg2), mask, self.loss_agg)
        ent = None
        if entropy is not None:
            ent = masked_mean(entropy.float(), mask)
            if self.entropy_coef:
                loss = loss - self.entropy_coef * ent
        with torch.no_grad():
            clipfrac = ((pg2 > pg1).float() * mask).sum() / n
            approx_kl = (((ratio - 1.0) - log_ratio) * mask).sum() / n
            ratio_max = torch.where(mask > 0, ratio, torch.zeros_like(ratio)).max()
        return PolicyLossOutput(loss, clipfrac, approx_kl, ratio_max, None if ent is None else ent.detach())


class ValueLoss(nn.Module):
    """Clipped value loss (DeepSpeed-Chat's ``critic_loss_fn``): V_clip = clamp(V, V_old - eps, V_old + eps);
    loss = 0.5 * sum(max((V - R)^2, (V_clip - R)^2) * mask) / sum(mask). Returns (loss, clip fraction)."""

    def __init__(self, clip_eps: float = 0.2):
        super().__init__()
        self.clip_eps = clip_eps

    def forward(self, values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = mask.to(torch.float32)
        values, old_values, returns = values.float(), old_values.float(), returns.float()
        clipped = torch.clamp(values, old_values - self.clip_eps, old_values + self.clip_eps)
        l1, l2 = (values - returns) ** 2, (clipped - returns) ** 2
        n = mask.sum().clamp(min=1.0)
        loss = 0.5 * torch.sum(torch.max(l1, l2) * mask) / n
        with torch.no_grad():
            clipfrac = ((l2 > l1).float() * mask).sum() / n
        return loss, clipfrac


def sequence_policy_loss(log_probs, old_log_probs, advantages, mask, clip_eps=0.2, ref_log_probs=None,
                         kl_coef: float = 0.0, kl_estimator: str = "k3", entropy=None,
                         entropy_coef: float = 0.0, clip_eps_high: float | None = None,
                         loss_agg: str = "token_mean") -> PolicyLossOutput:
    """Critic-free (GRPO/RLOO) policy loss: per-sequence advantages [B] (or per-token [B, T], REINFORCE++)
    broadcast to the answer tokens, the PPO clipped surrogate (``clip_eps_high``, ``loss_agg``: see
    :class:`PolicyLoss`), plus ``kl_coef`` times the masked mean KL to the reference (GRPO's in-loss KL, k3)."""
    adv = advantages.float()
    adv = adv.unsqueeze(1).expand_as(log_probs) if adv.dim() == 1 else adv
    out = PolicyLoss(clip_eps, entropy_coef, clip_eps_high, loss_agg)(log_probs, old_log_probs, adv, mask, entropy)
    if ref_log_probs is not None and kl_coef:
        out.loss = out.loss + kl_coef * masked_mean(kl_estimate(log_probs.float(), ref_log_probs.float(),
                                                                kl_estimator), mask.float())
    return out


# ----------------------------------------------------------------------------------------------------------------
# Group baselines (critic-free): GRPO and RLOO
# ----------------------------------------------------------------------------------------------------------------


def kl_penalized_scores(scores: torch.Tensor, log_probs: torch.Tensor, ref_log_probs: torch.Tensor,
                        mask: torch.Tensor, kl_coef: float, estimator: str = "k1") -> torch.Tensor:
    """RLOO's sequence reward [B]: ``scores - kl_coef * sum_t KL_t`` over the answer tokens (``mask`` [B, T]; the
    per-token KL estimate between the answer log-probs [B, T] and the reference's). GRPO puts its KL in the loss
    instead, PPO and REINFORCE++ in per-token rewards."""
    kl = kl_estimate(log_probs, ref_log_probs, estimator)
    return scores - kl_coef * (kl * mask).sum(1)


def uniform_groups(scores: torch.Tensor, group_size: int, tol: float = 0.0) -> torch.Tensor:
    """[B*k] bool: samples of groups whose scores are all equal (max - min <= ``tol``). Their group advantages are
    all zero, so they only dilute the batch; DAPO drops them ("dynamic sampling")."""
    s = scores.float().view(-1, group_size)
    same = (s.max(1).values - s.min(1).values) <= tol
    return same.repeat_interleave(group_size)


def reinforce_pp_advantages(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float,
                            gamma: float = 1.0, group_size: int | None = None, eps: float = 1e-8) -> torch.Tensor:
    """REINFORCE++ (Hu 2025) token advantages [B, T] over the answer tokens (``mask`` [B, T], ``kl`` [B, T] the
    per-token KL estimate to the reference, ``scores`` [B]):

    1. reward r_t = -kl_coef * kl_t at every answer token, plus the score at the answer's last token; with
       ``group_size`` (REINFORCE++-baseline) the score is first centred on its group's mean;
    2. return G_t = sum_{t' >= t} gamma^(t'-t) r_t' (no critic);
    3. advantages = G normalised over every answer token of the batch: (G - mean) / (std + eps).
    """
    mask = mask.float()
    s = scores.float()
    if group_size:
        g = s.view(-1, group_size)
        s = (g - g.mean(1, keepdim=True)).reshape(-1)
    r = -kl_coef * kl.float() * mask
    last = (mask * torch.arange(1, mask.shape[1] + 1, device=mask.device)).argmax(1)  # last answer token
    has = mask.sum(1) > 0
    r[has, last[has]] += s[has]
    ret = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])
    for t in reversed(range(r.shape[1])):
        running = r[:, t] + gamma * running * mask[:, t]
        ret[:, t] = running
    ret = ret * mask
    n = mask.sum().clamp(min=1.0)
    mean = ret.sum() / n
    std = (((ret - mean) ** 2 * mask).sum() / n).sqrt()
    return (ret - mean) / (std + eps) * mask


def group_advantages(scores: torch.Tensor, group_size: int, method: str = "grpo", eps: float = 1e-6,
                     scale_by_std: bool = True) -> torch.Tensor:
    """Per-sample advantages from ``scores`` [B*k] laid out group by group (k = group_size consecutive samples of
    the same prompt).

    grpo: (s - mean_group) / (std_group + eps) (unbiased std; ``scale_by_std=False`` keeps only the centring).
    rloo: s - mean of the other k-1 samples of the group (= k/(k-1) (s - mean_group)).
    """
    if scores.numel() % group_size:
        raise ValueError(f"{scores.numel()} scores do not split into groups of {group_size}")
    if group_size < 2:
        raise ValueError("group baselines need at least 2 samples per prompt (num_samples_per_prompt >= 2)")
    s = scores.float().view(-1, group_size)
    if method == "grpo":
        adv = s - s.mean(1, keepdim=True)
        if scale_by_std:
            adv = adv / (s.std(1, keepdim=True) + eps)
    elif method == "rloo":
        loo = (s.sum(1, keepdim=True) - s) / (group_size - 1)
        adv = s - loo
    else:
        raise ValueError(f"unknown group baseline {method!r} (grpo | rloo)")
    return adv.reshape(-1)


# ----------------------------------------------------------------------------------------------------------------
# KL coefficient controllers (Ziegler et al. 2019)
# ----------------------------------------------------------------------------------------------------------------


class FixedKLController:
    """A constant KL coefficient (DeepSpeed-Chat: 0.1)."""

    def __init__(self, kl_coef: float = 0.1):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Ziegler et al.: e = clip(KL / target - 1, -0.2, 0.2); beta <- beta * (1 + e * n_steps / horizon)."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError("adaptive KL needs target > 0 and horizon > 0")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        err = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
        self.target = float(state.get("target", self.target))
        self.horizon = int(state.get("horizon", self.horizon))


# ----------------------------------------------------------------------------------------------------------------
# Running statistics for reward normalization / scaling
# ----------------------------------------------------------------------------------------------------------------


class RunningMoments:
    """Running mean and (unbiased) std over all values seen (Chan et al. parallel update).

    ``normalize(x)``: (x - mean) / std; ``scale(x)``: x / std (keeps the sign of rewards). Updated with the batch
    before it is used, so the first batch is normalized by its own statistics.
    """

    def __init__(self, eps: float = 1e-8):
        self.mean, self.var, self.count, self.eps = 0.0, 1.0, 0.0, eps

    @property
    def std(self) -> float:
        return math.sqrt(max(self.var, 0.0))

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().double().flatten()
        n = x.numel()
        if n == 0:
            return
        b_mean = x.mean().item()
        b_var = x.var(unbiased=False).item() if n > 1 else 0.0
        tot = self.count + n
        delta = b_mean - self.mean
        m2 = self.var * max(self.count - 1, 0) + b_var * n + delta**2 * self.count * n / tot
        self.mean += delta * n / tot
        self.var = m2 / max(tot - 1, 1)
        self.count = tot

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / (self.std + self.eps)

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        return x / (self.std + self.eps)

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), float(state["count"])


# ----------------------------------------------------------------------------------------------------------------
# EMA
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def ema_update_(ema: torch.Tensor, param: torch.Tensor, beta: float = 0.992) -> None:
    """In place: ema = beta * ema + (1 - beta) * param (DeepSpeed-Chat's moving_average)."""
    ema.copy_(beta * ema + (1.0 - beta) * param.to(ema.dtype))
