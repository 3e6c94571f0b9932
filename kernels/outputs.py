"""What every implementation of the SFTMix loss returns, and what the fused backends hand to the autograd Function."""

from dataclasses import dataclass

import torch


@dataclass
class SFTMixLossOutput:
    """Result of `sftmix_linear_cross_entropy`; every field is a tensor on the inputs' device. The valid rows are
    the rows with a next-token term: target != ignore_index, and inside ``ntp_mask`` when one is given.

    Args:
        loss (`torch.Tensor`):
            Differentiable scalar ``ntp_loss + mixup_coef * mixup_loss``.
        ntp_loss (`torch.Tensor`):
            Detached ``sum_{valid n} NLL_n / ntp_normalizer``.
        mixup_loss (`torch.Tensor`):
            Detached ``sum_k mix_weight_k * l_mix_k``, before ``mixup_coef``.
        num_tokens (`torch.Tensor`):
            int64 count of valid rows.
        num_correct (`torch.Tensor`):
            int64 count of valid rows whose argmax logit is the target.
        entropy (`torch.Tensor`):
            Mean entropy of softmax(z) over valid rows (0 when there are none).
    """

    loss: torch.Tensor
    ntp_loss: torch.Tensor
    mixup_loss: torch.Tensor
    num_tokens: torch.Tensor
    num_correct: torch.Tensor
    entropy: torch.Tensor


@dataclass
class SlotStats:
    """Per-slot and per-pair results of a fused backend (slots and pairs of `layout.RowLayout`).

    Args:
        nll (`torch.Tensor`): (S,) NTP loss of each slot, 0 where the slot has no NTP term.
        correct (`torch.Tensor`): (S,) bool, argmax == target.
        entropy (`torch.Tensor`): (S,) entropy of softmax(z).
        mix_nll (`torch.Tensor`): (P,) l_mix of each pair.
    """

    nll: torch.Tensor
    correct: torch.Tensor
    entropy: torch.Tensor
    mix_nll: torch.Tensor


def reduce_metrics(valid, correct, entropy):
    """(num_tokens, num_correct, mean entropy) over the rows flagged ``valid``."""
    num_tokens = valid.sum()
    num_correct = (correct & valid).sum()
    entropy_sum = torch.where(valid, entropy, 0.0).sum(dtype=torch.float32)
    return num_tokens, num_correct, entropy_sum / num_tokens.clamp(min=1)
