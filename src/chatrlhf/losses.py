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
