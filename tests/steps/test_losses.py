"""Loss functions against hand-computed values."""

import math

import torch
import torch.nn.functional as F

from chatrlhf.algo.losses import DPOLoss, KWiseLoss, LastTokenPairLoss, PairWiseLoss, end_positions, sequence_logprobs


def ls(x):
    return math.log(1 / (1 + math.exp(-x)))


def test_pairwise_divergent_span_by_hand():
    # pair 0 diverges at position 2; chosen ends at 3, rejected at 2 -> span [2, 3]
    # pair 1 diverges at 1; both end at 2 -> span [1, 2]
    c_ids = torch.tensor([[5, 6, 7, 8, 0, 0], [5, 6, 7, 0, 0, 0]])
    r_ids = torch.tensor([[5, 6, 9, 0, 0, 0], [5, 9, 9, 0, 0, 0]])
    c_mask, r_mask = (c_ids != 0).long(), (r_ids != 0).long()
    cv = torch.tensor([[9.0, 9.0, 1.0, 2.0, 7.0, 7.0], [9.0, 0.0, 1.0, 7.0, 7.0, 7.0]])
    rv = torch.tensor([[-9.0, -9.0, 0.5, -1.0, 7.0, 7.0], [-9.0, 1.0, 1.0, 7.0, 7.0, 7.0]])
    loss, ce, re = PairWiseLoss()(cv, rv, c_ids, r_ids, c_mask, r_mask)
    want = (-(ls(0.5) + ls(3.0)) / 2 + -(ls(-1.0) + ls(0.0)) / 2) / 2
    assert abs(loss.item() - want) < 1e-6
    assert ce.tolist() == [2.0, 1.0] and re.tolist() == [0.5, 1.0]
    # positions before the divergence (the shared prompt) carry no gradient
    cv.requires_grad_(True)
    PairWiseLoss()(cv, rv, c_ids, r_ids, c_mask, r_mask)[0].backward()
    assert cv.grad[0, :2].abs().sum() == 0 and cv.grad[0, 2:4].abs().min() > 0 and cv.grad[0, 4:].abs().sum() == 0


def test_end_positions_with_leading_pad_like_opt():
    ids = torch.tensor([[1, 5, 6, 7, 1, 1], [1, 5, 6, 7, 8, 9]])  # OPT: BOS == pad == 1 at the start
    assert end_positions(ids, None, pad_token_id=1, num_padding_at_beginning=1).tolist() == [3, 5]
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    assert end_positions(ids, mask, pad_token_id=1).tolist() == [3, 5]


def test_last_token_loss():
    loss = LastTokenPairLoss()(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]))
    assert abs(loss.item() - (-(ls(1.0) + ls(-1.0)) / 2)) < 1e-6


def test_kwise_k3_all_ordered_pairs():
    scores = torch.tensor([[3.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
    want = (-(ls(2) + ls(3) + ls(1)) / 3 + -(ls(0) + ls(-2) + ls(-2)) / 3) / 2
    assert abs(KWiseLoss()(scores).item() - want) < 1e-6
    assert abs(KWiseLoss()(scores.flatten(), k=3).item() - want) < 1e-6
    # k = 2 is the pairwise Bradley-Terry loss
    assert abs(KWiseLoss()(torch.tensor([[2.0, 1.0]])).item() + ls(1.0)) < 1e-6


def test_dpo_with_label_smoothing():
    loss, cr, rr = DPOLoss(beta=0.5, label_smoothing=0.1)(torch.tensor([-1.0]), torch.tensor([-3.0]),
                                                          torch.tensor([-2.0]), torch.tensor([-2.0]))
    assert abs(loss.item() - (-0.9 * ls(1.0) - 0.1 * ls(-1.0))) < 1e-6
    assert abs(cr.item() - 0.5) < 1e-6 and abs(rr.item() + 0.5) < 1e-6
    loss0, _, _ = DPOLoss(beta=0.5)(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]),
                                    torch.tensor([-2.0]))
    assert abs(loss0.item() + ls(1.0)) < 1e-6


def test_sequence_logprobs_skips_ignored():
    logits = torch.randn(1, 4, 5)
    labels = torch.tensor([[-100, 2, -100, 4]])
    lp = F.log_softmax(logits, -1)
    want = lp[0, 0, 2] + lp[0, 2, 4]
    assert abs(sequence_logprobs(logits, labels).item() - want.item()) < 1e-5
