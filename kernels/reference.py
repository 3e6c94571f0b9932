"""Dense eager reference of the SFTMix loss: the test oracle's twin in PyTorch and the "eager" row of the benchmark.

It is the naive implementation on purpose: it materializes the N x V logits of every row and, for the mixed
positions, interpolates the hidden states and runs the head a third time (``z~ = W h_mix + b``), with PyTorch's
autograd for the gradients. Math in fp32 (fp64 for fp64 inputs); matrix products in the input dtype.
"""

import torch

from .outputs import SFTMixLossOutput, reduce_metrics


def head_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, logit_softcap: float | None):
    """Logits of the LM head in the accumulation dtype: ``cap * tanh((h W^T + b) / cap)`` when soft-capped."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if logit_softcap is not None:
        logits = logit_softcap * torch.tanh(logits / logit_softcap)
    return logits


def sftmix_loss_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mix_index: torch.Tensor,
    mix_lambda: torch.Tensor,
    mix_weight: torch.Tensor,
    *,
    bias: torch.Tensor | None,
    ntp_mask: torch.Tensor | None,
    ntp_normalizer: torch.Tensor,
    mixup_coef: float,
    ignore_index: int,
    logit_softcap: float | None,
    dft: bool = False,
) -> SFTMixLossOutput:
    """Dense SFTMix loss; arguments as in `sftmix_linear_cross_entropy`, with ``ntp_normalizer`` a 0-dim tensor."""
    logits = head_logits(hidden, weight, bias, logit_softcap)  # (N, V)
    # the rows with an NTP term: a target, and inside ntp_mask when given
    valid = targets != ignore_index if ntp_mask is None else (targets != ignore_index) & ntp_mask
    safe_targets = torch.where(valid, targets, 0)
    lse = torch.logsumexp(logits, dim=-1)
    # L_NTP = sum_{n valid} [lse(z_n) - z_n[t_n]] / normalizer (times p_n with DFT)
    nll = torch.where(valid, lse - logits.gather(1, safe_targets[:, None]).squeeze(1), 0.0)
    if dft:
        # DFT: each term weighted by the row's own probability of its target, p_n = exp(-nll_n), held constant
        nll = nll * torch.exp(-nll).detach()
    ntp_loss = nll.sum() / ntp_normalizer.to(nll.dtype)

    p_rows, q_rows = mix_index[:, 0], mix_index[:, 1]
    lam = mix_lambda.to(logits.dtype)
    # The naive mixup: h_mix = lam h_p + (1 - lam) h_q, then the head a third time.
    lam_h = lam.to(hidden.dtype)[:, None]
    mixed_hidden = lam_h * hidden[p_rows] + (1 - lam_h) * hidden[q_rows]
    mixed_logits = head_logits(mixed_hidden, weight, bias, logit_softcap)  # (P, V)
    # l_mix = lse(z~) - lam z~[t_p] - (1 - lam) z~[t_q]
    mixed_nll = (
        torch.logsumexp(mixed_logits, dim=-1)
        - lam * mixed_logits.gather(1, targets[p_rows, None]).squeeze(1)
        - (1 - lam) * mixed_logits.gather(1, targets[q_rows, None]).squeeze(1)
    )
    mixup_loss = (mix_weight.to(mixed_nll.dtype) * mixed_nll).sum()
    loss = ntp_loss + mixup_coef * mixup_loss

    with torch.no_grad():
        correct = logits.argmax(dim=-1) == targets
        # entropy of softmax(z) = lse(z) - sum_v softmax(z)_v z_v
        entropy = lse - (torch.softmax(logits, dim=-1) * logits).sum(dim=-1)
    num_tokens, num_correct, mean_entropy = reduce_metrics(valid, correct, entropy)
    return SFTMixLossOutput(loss, ntp_loss.detach(), mixup_loss.detach(), num_tokens, num_correct, mean_entropy)
