"""Chunked PyTorch implementation of the SFTMix loss, with a hand-written backward.

Rows are visited in the slots of `layout.RowLayout`: first chunks of mixed pairs (the p rows and the q rows of the
same pairs together), then chunks of unpaired rows. Only one chunk of logits is alive at a time. Forward keeps
per slot the log-sum-exp (and per pair that of z~); backward recomputes each chunk's logits from them, forms the
logit gradient G of the chunk, in which the mixup gradient of pair k rides on its p and q rows by linearity,

    G_p = ntp_scale * (softmax(z_p) - e_{t_p}) + lam * g_k,   G_q = ntp_scale * (...) + (1 - lam) * g_k,
    g_k = mixup_coef * w_k * (softmax(z~_k) - y~_k),

and accumulates dH = G W, dW = G^T H (fp32) and db = sum G (fp32). Math in fp32 (fp64 for fp64 inputs); the
matrix products run in the input dtype, except dW's, which runs in fp32 on the chunk's hidden rows.
"""

from dataclasses import dataclass

import torch

from .layout import RowLayout
from .options import SFTMixLossOptions

LOGITS_PER_CHUNK = 1 << 24


@dataclass
class SlotStats:
    """What forward computes per slot and per pair, and backward reuses.

    Args:
        nll (`torch.Tensor`): (S,) NTP loss of each slot, 0 where the slot has no NTP term.
        correct (`torch.Tensor`): (S,) bool, argmax == target.
        entropy (`torch.Tensor`): (S,) entropy of softmax(z).
        lse (`torch.Tensor`): (S,) log-sum-exp of each slot's logits.
        mix_lse (`torch.Tensor`): (P,) log-sum-exp of z~.
        mix_nll (`torch.Tensor`): (P,) l_mix of each pair.
    """

    nll: torch.Tensor
    correct: torch.Tensor
    entropy: torch.Tensor
    lse: torch.Tensor
    mix_lse: torch.Tensor
    mix_nll: torch.Tensor


def default_chunk_rows(vocab_size: int) -> int:
    """The largest power of two >= 2 rows whose logits fit in LOGITS_PER_CHUNK."""
    return 1 << max(1, (LOGITS_PER_CHUNK // max(vocab_size, 1)).bit_length() - 1)


def _chunks(layout: RowLayout, chunk_rows: int):
    """(slots, pairs) per chunk: pair chunks hold pairs[i] at slots i (side a) and i + c (side b); then rest chunks."""
    num_pairs, num_slots = layout.num_pairs, layout.rows.numel()
    device = layout.rows.device
    pairs_per_chunk = max(chunk_rows // 2, 1)
    for start in range(0, num_pairs, pairs_per_chunk):
        pairs = torch.arange(start, min(start + pairs_per_chunk, num_pairs), device=device)
        yield torch.cat([pairs, pairs + num_pairs]), pairs
    for start in range(2 * num_pairs, num_slots, chunk_rows):
        yield torch.arange(start, min(start + chunk_rows, num_slots), device=device), None


def _raw_logits(hidden, weight, bias, rows, acc_dtype):
    """z = h W^T + b for the given rows, in the accumulation dtype (the product itself in the input dtype)."""
    return torch.nn.functional.linear(hidden[rows], weight, bias).to(acc_dtype)


def _softcap_(logits, softcap):
    """In place: z -> c tanh(z / c)."""
    if softcap is not None:
        logits.div_(softcap).tanh_().mul_(softcap)
    return logits


def _mix(raw, pairs, lam):
    """z~ = lam z_p + (1 - lam) z_q on raw (uncapped) logits: side a is the first half of the chunk, b the second."""
    half = pairs.numel()
    lam = lam[pairs].to(raw.dtype)[:, None]
    return torch.lerp(raw[half:], raw[:half], lam)


def _targets_and_weights(layout: RowLayout, pairs):
    """Two-sparse soft targets of z~: columns (t_p, t_q) with weights (lam, 1 - lam)."""
    lam = layout.mix_lambda[pairs]
    return layout.mix_targets[pairs], torch.stack([lam, 1 - lam], dim=1)


def _soft_ce(logits, columns, col_weights):
    """lse(z) and lse(z) - sum_j w_j z[c_j] per row."""
    lse = torch.logsumexp(logits, dim=-1)
    return lse, lse - (col_weights.to(logits.dtype) * logits.gather(1, columns)).sum(1)


def _soft_ce_grad_(logits, lse, columns, col_weights, row_scale, softcap):
    """In place: capped logits z -> row_scale * (softmax(z) - y) * dcap(z), y = sum_j w_j e_{c_j}."""
    # d(c tanh(u / c))/du = 1 - tanh^2 = 1 - (z / c)^2
    dcap = 1 - (logits / softcap).square_() if softcap is not None else None
    grad = logits.sub_(lse[:, None]).exp_()
    grad.scatter_add_(1, columns, -col_weights.to(grad.dtype))
    if dcap is not None:
        grad.mul_(dcap)
    return grad.mul_(row_scale.to(grad.dtype)[:, None])


def _ntp_columns(ntp_targets, ignore_index):
    valid = ntp_targets != ignore_index
    return valid, torch.where(valid, ntp_targets, 0)[:, None], valid[:, None].float()


def forward(hidden, weight, bias, layout: RowLayout, options: SFTMixLossOptions) -> SlotStats:
    acc_dtype = torch.promote_types(hidden.dtype, torch.float32)
    num_slots, num_pairs = layout.rows.numel(), layout.num_pairs
    softcap, ignore_index = options.logit_softcap, options.ignore_index
    chunk_rows = options.chunk_rows or default_chunk_rows(weight.shape[0])
    stats = SlotStats(
        nll=hidden.new_empty(num_slots, dtype=acc_dtype),
        correct=hidden.new_empty(num_slots, dtype=torch.bool),
        entropy=hidden.new_empty(num_slots, dtype=acc_dtype),
        lse=hidden.new_empty(num_slots, dtype=acc_dtype),
        mix_lse=hidden.new_empty(num_pairs, dtype=acc_dtype),
        mix_nll=hidden.new_empty(num_pairs, dtype=acc_dtype),
    )
    for slots, pairs in _chunks(layout, chunk_rows):
        raw = _raw_logits(hidden, weight, bias, layout.rows[slots], acc_dtype)
        if pairs is not None:
            mixed = _softcap_(_mix(raw, pairs, layout.mix_lambda), softcap)
            columns, col_weights = _targets_and_weights(layout, pairs)
            stats.mix_lse[pairs], stats.mix_nll[pairs] = _soft_ce(mixed, columns, col_weights)
            del mixed
        logits = _softcap_(raw, softcap)
        ntp_targets = layout.ntp_targets[slots]
        valid, columns, col_weights = _ntp_columns(ntp_targets, ignore_index)
        lse, nll = _soft_ce(logits, columns, col_weights)
        stats.lse[slots] = lse
        stats.nll[slots] = torch.where(valid, nll, 0.0)
        stats.correct[slots] = logits.argmax(dim=-1) == ntp_targets
        # entropy = lse - sum_v softmax(z)_v z_v
        probs = (logits - lse[:, None]).exp_()
        stats.entropy[slots] = lse - probs.mul_(logits).sum(dim=-1)
        del raw, logits, probs
    return stats


def backward(
    hidden,
    weight,
    bias,
    layout: RowLayout,
    options: SFTMixLossOptions,
    stats: SlotStats,
    ntp_scale,
    mix_scale,
    needs_grad,
):
    """(dH, dW, db); ``ntp_scale`` (0-dim) = upstream / normalizer, ``mix_scale`` (P,) = upstream * mu * w_k."""
    acc_dtype = torch.promote_types(hidden.dtype, torch.float32)
    need_hidden, need_weight, need_bias = needs_grad
    softcap, ignore_index = options.logit_softcap, options.ignore_index
    chunk_rows = options.chunk_rows or default_chunk_rows(weight.shape[0])
    grad_hidden = torch.zeros_like(hidden) if need_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_weight else None
    grad_bias = torch.zeros(weight.shape[0], dtype=acc_dtype, device=weight.device) if need_bias else None
    for slots, pairs in _chunks(layout, chunk_rows):
        rows = layout.rows[slots]
        raw = _raw_logits(hidden, weight, bias, rows, acc_dtype)
        mixed_grad = None
        if pairs is not None:
            mixed = _softcap_(_mix(raw, pairs, layout.mix_lambda), softcap)
            columns, col_weights = _targets_and_weights(layout, pairs)
            mixed_grad = _soft_ce_grad_(mixed, stats.mix_lse[pairs], columns, col_weights, mix_scale[pairs], softcap)
        valid, columns, col_weights = _ntp_columns(layout.ntp_targets[slots], ignore_index)
        row_scale = valid.to(acc_dtype) * ntp_scale
        grad = _soft_ce_grad_(_softcap_(raw, softcap), stats.lse[slots], columns, col_weights, row_scale, softcap)
        if mixed_grad is not None:
            # dz~/dz_p = lam, dz~/dz_q = 1 - lam
            half = pairs.numel()
            lam = layout.mix_lambda[pairs].to(acc_dtype)[:, None]
            grad[:half].addcmul_(lam, mixed_grad)
            grad[half:].addcmul_(1 - lam, mixed_grad)
            del mixed_grad
        if need_hidden:
            grad_hidden.index_add_(0, rows, grad.to(weight.dtype) @ weight)
        if need_weight:
            grad_weight.addmm_(grad.T, hidden[rows].to(acc_dtype))
        if need_bias:
            grad_bias += grad.sum(0)
        del raw, grad
    return (
        grad_hidden,
        grad_weight.to(weight.dtype) if need_weight else None,
        grad_bias.to(bias.dtype) if need_bias else None,
    )
