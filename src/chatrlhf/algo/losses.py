"""Preference losses as small pure classes (no DeepSpeed, no model): each is unit-tested against hand values.

Conventions: reward-model ``values`` are per-token scalars [N, L]; pair batches put all chosen rows first, then all
rejected rows (the PairCollator layout); k-wise batches are [B*k, L] grouped per example, ranked best to worst.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def end_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, pad_token_id: int | None,
                  num_padding_at_beginning: int = 0) -> torch.Tensor:
    """Index of the last real token of each (right-padded) row.

    With an attention mask this is the last position whose mask is 1. Without one, DeepSpeed-Chat's rule applies:
    the first pad after ``num_padding_at_beginning`` leading pads (OPT puts a BOS == pad at the start) ends the row.
    """
    n, length = input_ids.shape
    if attention_mask is not None:
        pos = torch.arange(length, device=input_ids.device).expand(n, length)
        return (pos * attention_mask.long()).max(dim=1).values
    out = []
    for row in input_ids:
        pads = (row == pad_token_id).nonzero().flatten() if pad_token_id is not None else row.new_zeros(0)
        pads = pads[pads >= num_padding_at_beginning] if num_padding_at_beginning else pads
        out.append(int(pads[0]) - 1 if len(pads) > 0 else length - 1)
    return torch.tensor(out, device=input_ids.device)


def gather_end(values: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    return values.gather(1, ends.long().unsqueeze(1)).squeeze(1)


class PairWiseLoss(nn.Module):
    """DeepSpeed-Chat's RM loss: for each pair, -mean logsigmoid(r_c - r_r) over the span from the first position
    where chosen and rejected differ to the end of the longer of the two; then the mean over pairs.

    Identical pairs (no divergence) fall back to the last token of the chosen answer so they still contribute.
    Returns (loss, chosen_end_scores, rejected_end_scores).
    """

    def forward(self, chosen_values: torch.Tensor, rejected_values: torch.Tensor, chosen_ids: torch.Tensor,
                rejected_ids: torch.Tensor, chosen_mask: torch.Tensor | None = None,
                rejected_mask: torch.Tensor | None = None, pad_token_id: int | None = None,
                num_padding_at_beginning: int = 0):
        c_end = end_positions(chosen_ids, chosen_mask, pad_token_id, num_padding_at_beginning)
        r_end = end_positions(rejected_ids, rejected_mask, pad_token_id, num_padding_at_beginning)
        losses = []
        for i in range(chosen_ids.shape[0]):
            diff = (chosen_ids[i] != rejected_ids[i]).nonzero().flatten()
            end = int(max(c_end[i], r_end[i])) + 1  # exclusive end of the longer sequence
            start = int(diff[0]) if len(diff) > 0 else int(c_end[i])
            start = min(start, end - 1)
            d = chosen_values[i, start:end] - rejected_values[i, start:end]
            losses.append(-F.logsigmoid(d.float()).mean())
        loss = torch.stack(losses).mean()
        return loss, gather_end(chosen_values, c_end), gather_end(rejected_values, r_end)


class LastTokenPairLoss(nn.Module):
    """-mean logsigmoid(end_chosen - end_rejected): the Bradley-Terry loss on end scores only."""

    def forward(self, chosen_end: torch.Tensor, rejected_end: torch.Tensor) -> torch.Tensor:
        return -F.logsigmoid((chosen_end - rejected_end).float()).mean()


LastTokenLoss = LastTokenPairLoss  # name used in ARCHITECTURE.md


class KWiseLoss(nn.Module):
    """k answers per prompt ranked best to worst: -mean over all ordered pairs i<j of logsigmoid(s_i - s_j).

    ``scores`` is [B, k] (or [B*k] with ``k`` given), end scores grouped per example.
    """

    def forward(self, scores: torch.Tensor, k: int | None = None) -> torch.Tensor:
        if scores.dim() == 1:
            scores = scores.view(-1, int(k))
        k = scores.shape[1]
        i, j = torch.triu_indices(k, k, offset=1, device=scores.device)
        d = scores[:, i] - scores[:, j]  # [B, k(k-1)/2]
        return -F.logsigmoid(d.float()).mean()


class DPOLoss(nn.Module):
    """Direct preference optimization with conservative label smoothing (eps):
    logits = beta((pi_c - ref_c) - (pi_r - ref_r)); loss = -(1-eps) logsigmoid(logits) - eps logsigmoid(-logits).

    Inputs are summed sequence log-probs [B]. Returns (loss, chosen_rewards, rejected_rewards) with
    rewards = beta * (pi - ref), detached.
    """

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0):
        super().__init__()
        self.beta, self.label_smoothing = beta, label_smoothing

    def forward(self, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                ref_rejected: torch.Tensor):
        pi_logratio = policy_chosen - policy_rejected
        ref_logratio = ref_chosen - ref_rejected
        logits = self.beta * (pi_logratio - ref_logratio).float()
        eps = self.label_smoothing
        loss = (-F.logsigmoid(logits) * (1 - eps) - F.logsigmoid(-logits) * eps).mean()
        chosen_rewards = self.beta * (policy_chosen - ref_chosen).detach()
        rejected_rewards = self.beta * (policy_rejected - ref_rejected).detach()
        return loss, chosen_rewards, rejected_rewards


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Sum over tokens of log p(label_t | <t), with labels shifted inside (left, the last position skipped: no
    copy of the logits); positions == ignore_index are skipped."""
    logits = logits.float()
    labels = F.pad(labels[:, 1:], (0, 1), value=ignore_index)
    mask = labels != ignore_index
    safe = labels.masked_fill(~mask, 0)
    lp = torch.log_softmax(logits, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return (lp * mask).sum(-1)


# ------------------------------------------------------------------------------------ chunked lm-head log-probs
# The lm head of a small model with a large vocabulary (SmolLM2-135M: 49,152 tokens x 576) turns [B, K, H] hidden
# states into [B, K, V] logits, ~85 times their size; the plain path then keeps an fp32 copy, an fp32
# log-softmax for backward and two more [B, K, V] tensors in backward. The functions below take the hidden states and
# the head's weight instead and work on ``chunk`` rows at a time: logits -> fp32 log-sum-exp -> target logit (and
# entropy), so at most a few [chunk, V] tensors exist at once. Gradients:
# - scalar cross entropy: its upstream gradient is one number, so forward computes d loss / d hidden and
#   d loss / d weight chunk by chunk and backward scales them (the plain path's FLOPs);
# - per-token log-probs / entropy, trained head: the upstream gradient is per row and only known in backward, which
#   recomputes each chunk's logits (one more head matmul than the plain path);
# - per-token, frozen head (LoRA, reference model): forward keeps the [N, H] row gradients, backward scales rows.
# Libraries: Liger-Kernel's fused linear cross entropy is Triton (GPU) only; DeepSpeed's chunked_cross_entropy still
# takes full logits; transformers' loss path materialises the logits; torch's ``F.linear_cross_entropy`` with
# ``LinearCrossEntropyOptions`` (torch 2.13 here, not in the torch >= 2.4 we support) chunks cross entropy on the CPU
# but has no entropy and no per-token log-probs for PPO, and measured here at 2048 x 49,152 rows it was as fast in
# fp32 only with a hand-set chunk (its auto chunk of 8 rows: 4x slower) and 2.5x slower in bf16 (fp32 matmuls).

DEFAULT_LOGPROB_CHUNK = 512  # rows per chunk (100 MB of fp32 logits at V = 49,152): on a 2-core AVX-512 Xeon at H = 576
# 512 was as fast as the plain path for cross entropy (256: 3-8% slower), peak 0.41 GB against 1.16 GB at 2048 rows


def _chunk_rows(chunk: int | None, n: int) -> int:
    """Rows per chunk: at most ``chunk``, and balanced (264 rows at 256 are two chunks of 132, not 256 + 8: every
    chunk costs a pass over the [V, H] weight gradient whatever its rows)."""
    n = max(n, 1)
    most = max(1, min(int(chunk or DEFAULT_LOGPROB_CHUNK), n))
    pieces = -(-n // most)
    return -(-n // pieces)


def _weight_grad_buffer(weight: torch.Tensor, need: bool, rows: int) -> torch.Tensor | None:
    """The [V, H] weight gradient's buffer: uninitialised when a chunk will write it (the first one assigns, the
    others add: no 113 MB zero fill per backward at SmolLM2's head), zeros when there are no rows."""
    if not need:
        return None
    return torch.empty_like(weight) if rows else torch.zeros_like(weight)


def _add_weight_grad(dw: torch.Tensor, gz: torch.Tensor, h: torch.Tensor, first: bool) -> None:
    """dw += gz^T h (``first``: dw = gz^T h) in the weights' dtype (one bf16 GEMM accumulating into bf16 on bf16
    weights: 3x faster than upcasting here, and no [V, H] temporaries; the plain path's bf16 weight gradient is
    rounded once, this one once per chunk)."""
    if first:
        torch.mm(gz.t(), h, out=dw)
    else:
        dw.addmm_(gz.t(), h)


def _chunk_grads(gz: torch.Tensor, weight: torch.Tensor, h: torch.Tensor, dh: torch.Tensor | None,
                 dw: torch.Tensor | None, db: torch.Tensor | None, a: int, b: int) -> None:
    """Rows a:b's gradient w.r.t. their logits (``gz``) into the hidden states', the weight's and the bias's."""
    if dh is not None:
        torch.mm(gz, weight, out=dh[a:b])
    if dw is not None:
        _add_weight_grad(dw, gz, h, first=a == 0)
    if db is not None:
        db.add_(gz.float().sum(0))


def chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 transposed: bool = False) -> torch.Tensor:
    """fp32 logits [c, V] of one chunk: the matmul in the weights' dtype (as the plain lm head does), then upcast.
    ``transposed``: computed as (W h^T)^T, a [V, c] product viewed as [c, V] (the same sums; MKL on a 2-core AVX2
    EPYC ran it 1.2x faster at c = 256-512, H = 576, V = 49,152, the log-softmax and the gradients' matmuls taking
    the transposed layout as it is). Which one runs is measured per machine and shape by the trainers."""
    if not transposed:
        return F.linear(h, weight, bias).float()
    z = torch.mm(weight, h.t()) if bias is None else torch.addmm(bias[:, None], weight, h.t())
    return z.t().float()


def _lse_stats(z: torch.Tensor, entropy: bool):
    """(log-sum-exp [c], sum_j p_j z_j [c] or None) of fp32 logits z [c, V]; one exp buffer."""
    m = z.amax(-1, keepdim=True)
    e = (z - m).exp_()
    s = e.sum(-1)
    lse = m.squeeze(-1) + s.log()
    pz = (e.mul_(z)).sum(-1) / s if entropy else None
    return lse, pz


class _TokenLogprobs(torch.autograd.Function):
    """Per-row log p(target) and entropy of softmax(hidden @ W^T + b) over [N, H] rows, chunk by chunk. Saves
    hidden, W, b (references) and three [N] fp32 vectors; backward recomputes each chunk's logits (their upstream
    gradient is per row and only known then), as many FLOPs as the plain path plus one logits matmul.

    ``frozen`` (only hidden needs a gradient: a frozen or LoRA'd body's head, or a reference model): forward also
    computes d logp / d hidden (and d entropy / d hidden when ``ent_grad``), [N, H] each, so that backward only
    scales rows and nothing is recomputed: the plain path's FLOPs."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk, transposed, want_entropy, frozen, ent_grad):
        n = hidden.shape[0]
        lp = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(lp)
        ent = torch.empty_like(lp) if want_entropy else None
        d_lp = torch.empty_like(hidden) if frozen else None
        d_ent = torch.empty_like(hidden) if frozen and want_entropy and ent_grad else None
        for a in range(0, n, chunk):
            b = min(a + chunk, n)
            t = targets[a:b, None]
            z = chunk_logits(hidden[a:b], weight, bias, transposed)
            lse_c, pz = _lse_stats(z, want_entropy)
            lse[a:b] = lse_c
            lp[a:b] = z.gather(1, t).squeeze(1) - lse_c
            if want_entropy:
                ent[a:b] = lse_c - pz
            if frozen:
                logp = z.sub_(lse_c[:, None])
                p = logp.exp()
                if d_ent is not None:  # d H / d z_j = -p_j (log p_j + H)
                    torch.mm(logp.add_(ent[a:b, None]).mul_(p).neg_().to(weight.dtype), weight, out=d_ent[a:b])
                gz = p.neg_()  # d log p_t / d z_j = [j == t] - p_j
                gz.scatter_add_(1, t, gz.new_ones(t.shape))
                torch.mm(gz.to(weight.dtype), weight, out=d_lp[a:b])
                del logp, p, gz
            del z
        ctx.save_for_backward(hidden, weight, bias, targets, lse, ent, d_lp, d_ent)
        ctx.chunk, ctx.transposed = chunk, transposed
        ctx.set_materialize_grads(False)
        if want_entropy:
            return lp, ent
        return lp, lp.new_zeros(0)

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        hidden, weight, bias, targets, lse, ent, d_lp, d_ent = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if g_ent is not None and ent is None:
            g_ent = None
        if g_lp is None and g_ent is None:
            return (None,) * 9
        if d_lp is not None:  # frozen head: the row gradients were computed in forward
            if g_ent is not None and d_ent is None:
                raise RuntimeError("chunked_token_logprobs(entropy_grad=False): its entropy has no gradient")
            dh = None
            for g, d in ((g_lp, d_lp), (g_ent, d_ent)):
                if g is not None:
                    part = d * g.to(d.dtype)[:, None]
                    dh = part if dh is None else dh.add_(part)
            return dh, None, None, None, None, None, None, None, None
        n, chunk = hidden.shape[0], ctx.chunk
        dh = torch.empty_like(hidden) if need_h else None
        dw = _weight_grad_buffer(weight, need_w, n)
        db = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        for a in range(0, n, chunk):
            b = min(a + chunk, n)
            h = hidden[a:b]
            logp = chunk_logits(h, weight, bias, ctx.transposed).sub_(lse[a:b, None])  # log-softmax of the chunk
            p = logp.exp()
            if g_ent is not None:  # d H / d z_j = -p_j (log p_j + H)
                logp.add_(ent[a:b, None]).mul_(p).mul_(-g_ent[a:b, None])
            else:
                logp = None
            if g_lp is not None:  # d log p_t / d z_j = [j == t] - p_j
                gl = g_lp[a:b].float()
                gz = p.mul_(-gl[:, None])
                gz.scatter_add_(1, targets[a:b, None], gl[:, None])
                if logp is not None:
                    gz.add_(logp)
            else:
                gz = logp
            del p, logp
            _chunk_grads(gz.to(weight.dtype), weight, h, dh, dw, db, a, b)
        return dh, dw, (db.to(bias.dtype) if db is not None else None), None, None, None, None, None, None


class _CrossEntropySum(torch.autograd.Function):
    """Sum over rows of -log p(target) (rows are all labelled); the gradients are computed chunk by chunk in
    forward when asked (``grads``) and scaled by the scalar upstream gradient in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk, transposed, grads):
        need_h, need_w, need_b = grads
        n = hidden.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        dh = torch.empty_like(hidden) if need_h else None
        dw = _weight_grad_buffer(weight, need_w, n)
        db = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        any_grad = need_h or need_w or need_b
        for a in range(0, n, chunk):
            b = min(a + chunk, n)
            h, t = hidden[a:b], targets[a:b, None]
            z = chunk_logits(h, weight, bias, transposed)
            lse = torch.logsumexp(z, -1)
            total += (lse - z.gather(1, t).squeeze(1)).sum()
            if any_grad:  # d / d z_j = p_j - [j == t]
                gz = z.sub_(lse[:, None]).exp_()
                gz.scatter_add_(1, t, gz.new_full(t.shape, -1.0))
                _chunk_grads(gz.to(weight.dtype), weight, h, dh, dw, db, a, b)
            del z
        ctx.grads = (dh, dw, db.to(bias.dtype) if db is not None else None)
        return total

    @staticmethod
    def backward(ctx, g):
        if ctx.grads is None:
            raise RuntimeError("chunked_cross_entropy: backward runs once (its gradients were computed in forward and "
                               "are released by it; no retain_graph / double backward)")
        dh, dw, db = ctx.grads
        ctx.grads = None  # released now: the loss tensor (and this node) may live on after backward
        if not bool(g == 1):  # scaled in place (these are ours alone): no second [V, H] tensor
            for x in (dh, dw, db):
                if x is not None:
                    x.mul_(g.to(x.dtype))
        return dh, dw, db, None, None, None, None


def _rows(hidden: torch.Tensor, targets: torch.Tensor):
    h = hidden.reshape(-1, hidden.shape[-1])
    return (h if h.is_contiguous() else h.contiguous()), targets.reshape(-1).long()


def chunked_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int | None = None,
                           entropy: bool = False, bias: torch.Tensor | None = None, ignore_index: int | None = None,
                           entropy_grad: bool = True,
                           transposed: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(hidden @ weight^T + bias)[target] for every row, and optionally the softmax's entropy, without
    the [..., V] logits: ``hidden`` [..., H], ``weight`` [V, H], ``targets`` [...] -> (logp [...], entropy [...] or
    None), fp32, differentiable in hidden, weight and bias (the entropy too unless ``entropy_grad`` is False: then
    it comes back detached). Peak extra memory is a few [chunk, V] fp32 tensors. Rows whose target is
    ``ignore_index`` are skipped: logp 0 and entropy 0 there, no gradient. ``transposed``: see :func:`chunk_logits`."""
    shape = targets.shape
    h, t = _rows(hidden, targets)
    keep = None
    if ignore_index is not None:
        valid = t != ignore_index
        if not bool(valid.all()):
            keep = valid.nonzero().squeeze(1)
            h, t = h.index_select(0, keep), t.index_select(0, keep)
    if h.shape[0] == 0:  # nothing labelled: zeros, still on the autograd graph of hidden
        lp = ent = h.sum(-1, dtype=torch.float32) * 0
    else:
        grad = torch.is_grad_enabled()
        frozen = grad and h.requires_grad and not weight.requires_grad and not (bias is not None and bias.requires_grad)
        lp, ent = _TokenLogprobs.apply(h, weight, bias, t, _chunk_rows(chunk, h.shape[0]), bool(transposed),
                                       bool(entropy), frozen, bool(entropy_grad))
        if entropy and not entropy_grad:
            ent = ent.detach()
    if keep is not None:
        n = shape.numel()
        lp = lp.new_zeros(n).index_copy(0, keep, lp)
        ent = ent.new_zeros(n).index_copy(0, keep, ent) if entropy else ent
    return lp.view(shape), (ent.view(shape) if entropy else None)


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                          reduction: str = "mean", chunk: int | None = None,
                          bias: torch.Tensor | None = None, transposed: bool = False) -> torch.Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias).float().view(-1, V), labels.view(-1), ignore_index,
    reduction=...)`` without the logits (fp32 maths; labelled rows only go through the head). ``reduction``:
    "mean" (over labelled rows; NaN when there are none, as cross_entropy), "sum", or "none" (``labels``' shape).
    ``transposed``: see :func:`chunk_logits`."""
    if reduction == "none":
        lp, _ = chunked_token_logprobs(hidden, weight, labels, chunk=chunk, bias=bias, ignore_index=ignore_index,
                                       transposed=transposed)
        return -lp
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be mean, sum or none, got {reduction!r}")
    h, t = _rows(hidden, labels)
    keep = (t != ignore_index).nonzero().squeeze(1)
    count = keep.numel()
    if count < t.numel():
        h, t = h.index_select(0, keep), t.index_select(0, keep)
    grad = torch.is_grad_enabled()
    flags = (grad and h.requires_grad, grad and weight.requires_grad, grad and bias is not None and bias.requires_grad)
    if count == 0:  # as cross_entropy: 0 for "sum", NaN for "mean"; on the autograd graph of hidden
        total = h.sum(dtype=torch.float32) * 0
    else:
        total = _CrossEntropySum.apply(h, weight, bias, t, _chunk_rows(chunk, count), bool(transposed), flags)
    return total / count if reduction == "mean" else total
