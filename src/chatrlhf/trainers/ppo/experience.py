"""PPO/GRPO/RLOO experience: generation, scoring, log-probs and values, and the per-micro-batch train steps.

Kept apart from ``trainer.py`` (set-up, loop, checkpoints) so that the loop reads top to bottom. All math comes
from :mod:`chatrlhf.algo.rlhf_math` (``rlm``) and, for the chunked lm-head log-probs, :mod:`chatrlhf.algo.losses`.

Sequence layout (DeepSpeed-Chat's): ``seq = [left-padded prompt (P) | answer, right-padded]``;
``attention_mask`` is 1 on real prompt tokens and on answer tokens up to and including the first EOS;
``action_mask = attention_mask[:, 1:]``; per-token tensors are shifted (length L-1) and the answer starts at
``start = P - 1``.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F

from chatrlhf.algo import rlhf_math as rlm
from chatrlhf.algo.losses import chunked_token_logprobs
from chatrlhf.engine import hybrid
from chatrlhf.engine.device import gathered
from chatrlhf.models.dims import unwrap
from chatrlhf.models.loading import DROPOUT_FIELDS
from chatrlhf.models.lora import has_lora, merged_lora
from chatrlhf.trainers import common as C
from chatrlhf.trainers import lm_head


# ---------------------------------------------------------------------------------------------- experience
@dataclass
class Experience:
    """One batch of rollouts. Tensors [B, L] / [B, L-1]; ``advantages``/``returns`` are [B, L-1-start] for PPO,
    ``advantages`` is [B] (per sequence) for GRPO/RLOO and [B, L-1-start] (per token) for REINFORCE++."""

    seq: torch.Tensor
    attention_mask: torch.Tensor
    action_mask: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    reward_score: torch.Tensor
    prompt_len: int
    values: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    info: dict = field(default_factory=dict)
    # (answer log-probs, entropy, critic values) with their autograd graphs when the experience pass doubles as
    # the training forward (see make_experience's ``train_forward``); consumed by train_micro_batch
    graph: tuple | None = field(default=None, repr=False)

    @property
    def start(self) -> int:
        return self.prompt_len - 1

    def __len__(self) -> int:
        return self.seq.shape[0]

    def select(self, idx: torch.Tensor) -> "Experience":
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            kw[f.name] = v[idx] if isinstance(v, torch.Tensor) else v
        kw["graph"] = None  # a graph belongs to the whole batch's forward
        return Experience(**kw)


# config fields that make a train-mode forward random: dropout, layer drop, MoE router noise
_RANDOM_IN_TRAIN = DROPOUT_FIELDS + ("layerdrop", "router_jitter_noise")


def train_forward_is_deterministic(model) -> bool:
    """True when the model's train-mode forward equals its eval-mode one: no dropout module with p > 0 and no
    dropout-like config field above 0 (llama and OPT apply theirs functionally, from the config)."""
    m = unwrap(model)
    if any(isinstance(x, torch.nn.Dropout) and x.p > 0 for x in m.modules()):
        return False
    configs = [c for c in (getattr(m, "config", None), getattr(getattr(m, "base_model", None), "config", None)) if c]
    for c in configs:
        c = c.get_text_config() if hasattr(c, "get_text_config") else c
        vals = [getattr(c, k, None) for k in _RANDOM_IN_TRAIN]
        if any(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in vals):
            return False
    return True


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens (what ``generate`` uses for left-padded prompts)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _position_kw(model, attention_mask: torch.Tensor) -> dict:
    """Mask-derived ``position_ids`` for models whose forward takes them (left-padded prompts)."""
    return {"position_ids": position_ids_from_mask(attention_mask)} if "position_ids" in C.forward_args(model) else {}


def lm_forward(model, seq: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int = 0):
    """Causal-LM forward with mask-derived position ids when the model takes them; returns logits [B, L, V], or
    only the last ``logits_to_keep`` positions [B, K, V] (the lm head and softmax then skip the prompt)."""
    args = C.forward_args(model)
    kw = _position_kw(model, attention_mask)
    logits = model(input_ids=seq, attention_mask=attention_mask, use_cache=False,
                   **({"logits_to_keep": logits_to_keep} if logits_to_keep and "logits_to_keep" in args else {}),
                   **kw).logits
    return logits[:, -logits_to_keep:] if logits_to_keep else logits


def answer_logprobs(model, seq: torch.Tensor, attention_mask: torch.Tensor, start: int,
                    entropy: bool = False, entropy_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(seq[t+1] | seq[<=t]) for t >= start (the answer part), [B, L-1-start], and optionally the per-token
    entropy there, fp32. Chunked where the model allows it (trainers/lm_head.py): from the lm head's input, a few
    rows of [*, V] logits at a time (chatrlhf.algo.losses.chunked_token_logprobs; backward recomputes them), never
    the [B, K, V] logits and their fp32 log-softmax. Otherwise one fp32 log-softmax of the answer's logits serves
    both (chatrlhf.algo.rlhf_math.logprobs_and_entropy)."""
    keep = seq.shape[1] - start
    head = lm_head.head_inputs(model, seq, attention_mask, keep, **_position_kw(model, attention_mask))
    if head is not None:
        return chunked_token_logprobs(head.hidden[:, :-1], head.weight, seq[:, start + 1:], entropy=entropy,
                                      bias=head.bias, entropy_grad=entropy_grad, transposed=head.transposed)
    logits = lm_forward(model, seq, attention_mask, logits_to_keep=keep)[:, :-1]
    logp = F.log_softmax(logits.float(), dim=-1)
    del logits  # freed before the entropy's [B, K, V] temporaries
    return rlm.logprobs_and_entropy(logp, seq[:, start + 1:], entropy=entropy, entropy_grad=entropy_grad)


def full_width(answer_part: torch.Tensor, start: int) -> torch.Tensor:
    """Pad [B, L-1-start] answer log-probs back to the [B, L-1] layout of the reference (prompt part zero)."""
    return torch.nn.functional.pad(answer_part, (start, 0))


def answer_attention_mask(seq: torch.Tensor, prompt_mask: torch.Tensor, eos_token_id: int | list[int]) -> torch.Tensor:
    """1 on real prompt tokens, and on answer tokens up to and including the first EOS; 0 after it.

    Unlike ``seq != pad`` this keeps the EOS when pad == eos, so the answer's stop token is trained too."""
    p = prompt_mask.shape[1]
    ans = seq[:, p:]
    eos = torch.as_tensor(eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id],
                          device=seq.device)
    is_eos = torch.isin(ans, eos).long()
    after_eos = (is_eos.cumsum(-1) - is_eos) > 0  # strictly after the first EOS
    return torch.cat([prompt_mask.long(), (~after_eos).long()], dim=1)


@contextlib.contextmanager
def generation_context(model, strategy):
    """Full weights for generation: ZeRO-3 params gathered on every rank (so ranks never wait on each other
    inside ``generate``), LoRA merged into the base weights and restored exactly afterwards."""

    module = unwrap(model)
    was_training = module.training
    module.eval()
    with strategy.gathered_params(module):
        with (merged_lora(module) if has_lora(module) else contextlib.nullcontext()):
            yield module
    if was_training:
        module.train()


@dataclass
class GenerationParams:
    max_new_tokens: int
    min_new_tokens: int = 0
    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    num_return_sequences: int = 1
    hybrid: bool = True  # the hybrid engine's decoder where it supports the model (engine/hybrid.py)


@torch.no_grad()
def generate_answers(actor, strategy, tokenizer, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                     params: GenerationParams) -> tuple[torch.Tensor, torch.Tensor]:
    """KV-cache sampling (never forced to full length): returns (seq [B*n, P+A], attention_mask) with the answer
    right-padded by ``pad_token_id`` and the mask from :func:`answer_attention_mask`. The hybrid engine's decoder
    runs when ``params.hybrid`` and it supports the model (same tokens as ``generate``, see engine/hybrid.py)."""

    with generation_context(actor, strategy) as module:
        seq = hybrid.generate(module, prompt_ids, prompt_mask, max_new_tokens=params.max_new_tokens,
                              min_new_tokens=params.min_new_tokens, do_sample=params.do_sample,
                              temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                              num_return_sequences=params.num_return_sequences, hybrid=params.hybrid,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    if params.num_return_sequences > 1:
        prompt_mask = prompt_mask.repeat_interleave(params.num_return_sequences, 0)
    mask = answer_attention_mask(seq, prompt_mask, tokenizer.eos_token_id)
    seq = torch.where(mask.bool() | (torch.arange(seq.shape[1], device=seq.device) < prompt_mask.shape[1]),
                      seq, torch.full_like(seq, tokenizer.pad_token_id))
    return seq, mask


def drop_short_answers(seq: torch.Tensor, mask: torch.Tensor, prompt_len: int, min_tokens: int = 2,
                       group_size: int = 1) -> torch.Tensor:
    """Indices of rows to keep: answers with at most one real token are dropped (DeepSpeed-Chat). With
    ``group_size`` > 1 (GRPO/RLOO) a whole group is dropped when any of its samples is (baselines need k)."""
    n_real = mask[:, prompt_len:].sum(1)
    keep = n_real >= min_tokens
    if group_size > 1:
        keep = keep.view(-1, group_size).all(1, keepdim=True).expand(-1, group_size).reshape(-1)
    return keep.nonzero().flatten()


@torch.no_grad()
def make_experience(actor, ref, critic, scorer, strategy, tokenizer, prompt_ids: torch.Tensor,
                    prompt_mask: torch.Tensor, params: GenerationParams, group_size: int = 1,
                    train_forward: bool = False, entropy_grad: bool = False, prompts: list[str] | None = None,
                    metas: list[dict] | None = None) -> tuple[Experience, dict]:
    """Generate, drop too-short answers, score (``scorer``: the reward model and/or a reward function, see
    rewards.py; ``prompts``/``metas`` are the batch rows' texts and metadata it may need), and collect
    actor/reference log-probs and critic values. Returns (experience, timings); see the placeholder note below.

    ``train_forward`` (on-policy: the batch is trained on once, as one micro-batch, by models whose train-mode
    forward is deterministic): the actor's and critic's forwards run in train mode with autograd and are kept in
    ``exp.graph``; the old log-probs and values are their detached copies, and train_micro_batch backpropagates
    through them instead of repeating both forwards on unchanged weights (the ratio is then exactly 1, as it is
    mathematically at that point). ``entropy_grad``: the entropy is part of the actor loss."""
    t0 = time.time()
    seq, mask = generate_answers(actor, strategy, tokenizer, prompt_ids, prompt_mask, params)
    gen_time = time.time() - t0
    prompt_len = prompt_ids.shape[1]
    keep = drop_short_answers(seq, mask, prompt_len, group_size=group_size)
    n_gen, n_drop = seq.shape[0], seq.shape[0] - keep.numel()
    gen_tokens = seq.shape[1] - prompt_len
    timings = {"generation_s": gen_time, "generated_tokens": gen_tokens, "seq_len": seq.shape[1],
               "generated_rows": n_gen, "dropped": n_drop}
    # for the length guard (trainer.py): every answer's real tokens (EOS included) and how many ran to the limit
    # without ending; such an answer fills the whole width, so its last token tells whether it ended
    n_real = mask[:, prompt_len:].sum(1)
    eos = torch.as_tensor(tokenizer.eos_token_id if isinstance(tokenizer.eos_token_id, (list, tuple))
                          else [tokenizer.eos_token_id], device=seq.device)
    cut = (n_real >= params.max_new_tokens) & ~torch.isin(seq[:, -1], eos)
    timings.update(answer_tokens=n_real.cpu(), truncated=int(cut.sum()))
    # Every rank must take part in the forward passes below (ZeRO-3 gathers weights collectively), even with
    # nothing left to score: a rank whose whole batch was dropped keeps its first group as a placeholder with an
    # all-zero action mask (no loss, no gradient; flagged in info["placeholder"]).
    empty = keep.numel() == 0
    if empty:
        keep = torch.arange(group_size, device=seq.device)
    timings["empty"] = empty
    seq, mask = seq[keep], mask[keep]
    t1 = time.time()
    was = [unwrap(m).training for m in (actor, critic) if m is not None]
    for m in (actor, critic):
        if m is not None:
            unwrap(m).train(train_forward)
    start = prompt_len - 1
    with torch.set_grad_enabled(train_forward):  # (views of graph tensors must be taken inside, too)
        lp, ent = answer_logprobs(actor, seq, mask, start, entropy=train_forward, entropy_grad=entropy_grad)
        v = critic(seq, attention_mask=mask)[:, :-1] if critic is not None else None
        v_answer = v[:, start:] if v is not None else None
    logprobs = full_width(lp.detach(), start)
    values = v.detach().float() if v is not None else None
    ref_logprobs = full_width(answer_logprobs(ref, seq, mask, start)[0], start)
    n = params.num_return_sequences  # row i of seq answers prompt i // n
    rows = keep.tolist()
    score, parts = scorer(seq, mask, prompt_len, [prompts[i // n] for i in rows] if prompts is not None else None,
                          [metas[i // n] for i in rows] if metas is not None else None)
    for m, w in zip([m for m in (actor, critic) if m is not None], was):
        unwrap(m).train(w)
    timings["inference_s"] = time.time() - t1
    action_mask = mask[:, 1:].float()
    if empty:
        action_mask = torch.zeros_like(action_mask)
    exp = Experience(seq=seq, attention_mask=mask, action_mask=action_mask, logprobs=logprobs,
                     ref_logprobs=ref_logprobs, reward_score=score, prompt_len=prompt_len, values=values)
    exp.info["response_length"] = mask[:, prompt_len:].sum(1).float()
    exp.info["placeholder"] = empty
    exp.info.update(parts)  # the reward model's and the reward function's shares of the score, for the logs
    if train_forward:
        exp.graph = (lp, ent, v_answer)
    return exp, timings


def finalize_ppo(exp: Experience, kl_ctl: float, clip_reward_value: float, gamma: float, lam: float,
                 kl_estimator: str = "k1", reward_fn=None, whiten_advantages: bool = False) -> Experience:
    """Per-token rewards (KL penalty + clipped score at the end) and GAE advantages/returns, in place."""
    score = exp.reward_score if reward_fn is None else reward_fn(exp.reward_score)
    exp.rewards = rlm.compute_rewards(exp.logprobs, exp.ref_logprobs, score, exp.action_mask, kl_ctl,
                                      clip_reward_value, exp.start, kl_estimator)
    adv, ret = rlm.gae(exp.values, exp.rewards, exp.action_mask, exp.start, gamma, lam)
    if whiten_advantages:
        adv = rlm.whiten(adv, exp.action_mask[:, exp.start:])
    exp.advantages, exp.returns = adv, ret
    return exp


def finalize_group(exp: Experience, algo: str, group_size: int, kl_ctl: float, clip_reward_value: float,
                   kl_estimator: str = "k1", reward_fn=None, drop_uniform: bool = False) -> Experience:
    """Critic-free advantages: GRPO normalizes the clipped scores by the group's mean/std (KL goes into the loss);
    RLOO uses score - kl_ctl * sum KL minus the leave-one-out mean of the group (both [B]); REINFORCE++ puts the
    KL into per-token rewards and normalizes the returns over the batch ([B, T];
    ``reinforce_pp_baseline`` first centres each score on its group).

    ``drop_uniform`` (DAPO): the samples of groups whose clipped scores are all equal carry no signal; their answer
    tokens leave the loss (the rows stay, so every rank runs the same micro-steps). ``exp.info["uniform_dropped"]``
    counts them."""
    score = exp.reward_score if reward_fn is None else reward_fn(exp.reward_score)
    score = rlm.clip_scores(score, clip_reward_value)
    start, mask = exp.start, exp.action_mask[:, exp.start:]
    lp, ref_lp = exp.logprobs[:, start:], exp.ref_logprobs[:, start:]
    same = rlm.uniform_groups(score, group_size) if drop_uniform and group_size > 1 else None
    if algo in ("reinforce_pp", "reinforce_pp_baseline"):
        exp.rewards = score
        exp.advantages = rlm.reinforce_pp_advantages(score, rlm.kl_estimate(lp, ref_lp, kl_estimator), mask, kl_ctl,
                                                     group_size=group_size if algo.endswith("baseline") else None)
    else:
        if algo == "rloo":
            score = rlm.kl_penalized_scores(score, lp, ref_lp, mask, kl_ctl, kl_estimator)
        exp.rewards = score
        exp.advantages = rlm.group_advantages(score, group_size, algo)
    if same is not None:
        exp.info["uniform_dropped"] = int(same.sum())
        if same.any():
            exp.action_mask = exp.action_mask.clone()
            exp.action_mask[same, exp.start:] = 0
    return exp


# ---------------------------------------------------------------------------------------------- train steps
@dataclass
class MicroStepResult:
    actor_loss: float
    critic_loss: float
    clipfrac: float
    vf_clipfrac: float
    approx_kl: float
    ratio_max: float
    entropy: float
    value_error: float
    skipped: str = ""


OUTPUT_CHECK_TOKENS = 16  # positions whose outputs nonfinite_after_update checks


def _params_finite(model) -> bool:
    """Every weight finite (ZeRO-3: this rank's partition of each), from one sum per weight in its own dtype (fp32
    accumulation inside): a NaN or Inf anywhere makes the total non-finite, and so would weights big enough to
    overflow it (~1e38 / count: blown up just the same; fp16 sums in fp32, its own range ends at 65504). One read of
    each weight: ``isfinite(w).all()`` per weight took 0.43 s per 135 M-parameter model on a 2-core EPYC, the sum
    0.03 s (a PPO step checks actor and critic)."""
    ts = [t for t in (getattr(p, "ds_tensor", p) for p in unwrap(model).parameters()) if t.numel()]
    sums = [t.sum(dtype=torch.float32) if t.dtype == torch.float16 else t.sum() for t in ts]
    return not sums or bool(torch.isfinite(torch.stack([s.float() for s in sums]).sum()))


@torch.no_grad()
def nonfinite_after_update(actor, critic, exp: Experience, strategy) -> str:
    """What the last updates left non-finite ('' when nothing): the actor's and critic's weights, and their outputs
    on one row of the experience just trained on. Outputs matter as much as weights: a learning rate of 1e12 leaves
    finite weights of ~1e12 whose logits overflow to inf/NaN, and the next generation would then sample from NaN
    probabilities. Decided over all ranks; every rank must call it (ZeRO-3 forwards gather weights together).
    The outputs are those of the first row's first ``OUTPUT_CHECK_TOKENS`` positions (causal: the same values as in
    the whole row's forward): weights that overflow do so at any position, and the whole row's two forwards took
    0.7-0.9 s of a 12-16 s PPO step of SmolLM2-135M on a 2-core CPU (its 49,152-wide logits at every position)."""
    seq, mask = exp.seq[:1, :OUTPUT_CHECK_TOKENS], exp.attention_mask[:1, :OUTPUT_CHECK_TOKENS]
    names, bad = [], []
    for who, model in (("actor", actor), ("critic", critic)):
        if model is None:
            continue
        out = lm_forward(model, seq, mask) if who == "actor" else model(seq, attention_mask=mask)
        names += [f"{who} weights", f"{who} {'logits' if who == 'actor' else 'values'}"]
        bad += [not _params_finite(model), not torch.isfinite(out).all()]
    flags = strategy.all_reduce_sum(torch.tensor([float(b) for b in bad])).tolist()
    return ", ".join(n for n, f in zip(names, flags) if f > 0)


def train_micro_batch(exp: Experience, actor, critic, strategy, policy_loss: rlm.PolicyLoss,
                      value_loss: rlm.ValueLoss | None, algo: str = "ppo", kl_coef_in_loss: float = 0.0,
                      max_ratio: float = 0.0) -> MicroStepResult:
    """One actor (and critic) update on a micro-batch of experience (``kl_coef_in_loss``: GRPO's k3 KL to the
    reference in the critic-free loss). The guard (non-finite loss, ratio above ``max_ratio``) is decided jointly
    over all ranks, which then all skip backward and step together."""
    start = exp.start
    mask = exp.action_mask[:, start:]
    graph, exp.graph = exp.graph, None  # the experience pass's own forward, when it was kept (used once)
    if graph is not None:
        logprobs, entropy, values = graph
    else:  # the entropy is only logged unless it is part of the loss: no graph through it then
        logprobs, entropy = answer_logprobs(actor, exp.seq, exp.attention_mask, start, entropy=True,
                                            entropy_grad=policy_loss.entropy_coef != 0)
    if algo == "ppo":
        out = policy_loss(logprobs, exp.logprobs[:, start:], exp.advantages, mask, entropy)
    else:
        out = rlm.sequence_policy_loss(logprobs, exp.logprobs[:, start:], exp.advantages, mask,
                                       policy_loss.clip_eps, exp.ref_logprobs[:, start:], kl_coef_in_loss,
                                       "k3", entropy, policy_loss.entropy_coef,
                                       policy_loss.clip_eps_high, policy_loss.loss_agg)
    v_loss = torch.zeros((), device=logprobs.device)
    vf_clip = torch.zeros(())
    value_error = torch.zeros(())
    if critic is not None:
        if graph is None:
            values = critic(exp.seq, attention_mask=exp.attention_mask)[:, :-1][:, start:]
        v_loss, vf_clip = value_loss(values, exp.values[:, start:], exp.returns, mask)
        value_error = rlm.masked_mean((values.detach().float() - exp.returns) ** 2, mask)
    reason = ""
    if not (torch.isfinite(out.loss).all() and torch.isfinite(v_loss).all()):
        reason = "non-finite loss"
    elif max_ratio and float(out.ratio_max) > max_ratio:
        reason = f"ratio max {float(out.ratio_max):.3g} > {max_ratio:g}"
    bad = strategy.all_reduce_sum(1.0 if reason else 0.0).item()
    if bad > 0:
        reason = reason or "another rank's guard"
    else:
        strategy.backward(out.loss, actor)
        strategy.step(actor)
        if critic is not None:
            strategy.backward(v_loss, critic)
            strategy.step(critic)
    return MicroStepResult(float(out.loss.detach()), float(v_loss.detach()), float(out.clipfrac), float(vf_clip),
                           float(out.approx_kl), float(out.ratio_max),
                           float(out.entropy) if out.entropy is not None else 0.0, float(value_error), reason)


def train_unsupervised(batch: dict, actor, strategy, unsup_coef: float) -> float:
    """ptx: a separate actor step on the language-model loss times ``unsup_coef``."""
    out = actor(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                use_cache=False)
    loss = out.loss
    # every rank takes part in the vote (a rank that returned early would leave the others waiting in it)
    if strategy.all_reduce_sum(0.0 if torch.isfinite(loss).all() else 1.0).item() > 0:
        return float("nan")
    strategy.backward(loss * unsup_coef, actor)
    strategy.step(actor)
    return float(loss.detach())


@torch.no_grad()
def ema_update(actor, ema, strategy, beta: float = 0.992) -> None:
    """ema = beta * ema + (1 - beta) * actor, parameter by parameter; under ZeRO-3 each pair is gathered and the
    result written back (modifier_rank=0: DeepSpeed-Chat's version lost the update under ZeRO-3)."""
    a_params = list(unwrap(actor).parameters())
    e_params = list(unwrap(ema).parameters())
    if len(a_params) != len(e_params):
        raise RuntimeError(f"EMA model has {len(e_params)} parameters, actor {len(a_params)}")
    z3 = strategy.is_zero3(actor) or strategy.is_zero3(ema)
    if not z3:
        for p, e in zip(a_params, e_params):
            rlm.ema_update_(e.data, p.data, beta)
        return
    for p, e in zip(a_params, e_params):
        with gathered((p, e), modifier_rank=0):
            if strategy.is_rank0:
                rlm.ema_update_(e.data, p.data, beta)
