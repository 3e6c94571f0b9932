"""Chunked PyTorch implementation of the SFTMix loss, with the gradients computed in the same pass.

Rows are visited chunk by chunk in the slots of `layout.RowLayout`, reordered so that every chunk is a contiguous
range (`_chunk_plan`): first chunks of mixed pairs (the p rows of some pairs, then the q rows of the same pairs),
then chunks of unpaired rows. Only one chunk of logits is alive at a time, in buffers reused from chunk to chunk.
Each chunk's logits are computed once; from them come the loss terms, the metrics and, when a gradient is needed,
the logit gradient G for an upstream gradient of 1, in which the mixup gradient of pair k rides on its p and q rows
by linearity,

    G_p = ntp_scale * (softmax(z_p) - e_{t_p}) + lam * g_k,   G_q = ntp_scale * (...) + (1 - lam) * g_k,
    g_k = mix_scale_k * (softmax(z~_k) - y~_k),

which gives dH = G W, dW += G^T H and db += sum G: three passes over the head (logits, dH, dW) and nothing left for
backward but scaling by the upstream gradient. All math in fp32 (fp64 for fp64 inputs), the matrix products included:
bf16 / fp16 inputs are upcast once per call (an fp32 copy of W, 4 V D bytes), so that the logits are not rounded to
the input dtype (as the Triton kernels' fp32 accumulators are not), and the gradients are returned in fp32, to be
cast once after that scaling.
"""

import torch

from .layout import RowLayout
from .options import SFTMixLossOptions
from .outputs import SlotStats

LOGITS_PER_CHUNK = 1 << 24


def default_chunk_rows(vocab_size: int) -> int:
    """The largest power of two >= 2 rows whose logits fit in LOGITS_PER_CHUNK."""
    return 1 << max(1, (LOGITS_PER_CHUNK // max(vocab_size, 1)).bit_length() - 1)


def _chunk_plan(layout: RowLayout, chunk_rows: int):
    """(order, chunks): slot ``order[i]`` sits at position i, and each chunk is positions [start, stop).

    A pair chunk holds pairs [k0, k1): their p slots (k0..k1 - 1) then their q slots (P + k0..P + k1 - 1), at
    positions [2 k0, 2 k1); its third element is ``slice(k0, k1)``. The unpaired slots keep their positions, in
    chunks of ``chunk_rows`` with None as third element. Built from device aranges: no host-to-device copy.
    """
    num_pairs, num_slots, device = layout.num_pairs, layout.rows.numel(), layout.rows.device
    pairs_per_chunk = chunk_rows // 2
    order, chunks = [], []
    for first in range(0, num_pairs, pairs_per_chunk):
        last = min(first + pairs_per_chunk, num_pairs)
        pairs = torch.arange(first, last, device=device)
        order += [pairs, pairs + num_pairs]
        chunks.append((2 * first, 2 * last, slice(first, last)))
    order.append(torch.arange(2 * num_pairs, num_slots, device=device))
    chunks += [
        (start, min(start + chunk_rows, num_slots), None) for start in range(2 * num_pairs, num_slots, chunk_rows)
    ]
    return torch.cat(order), chunks


def _logits_into(out, hidden_rows, weight, bias):
    """out <- h W^T + b."""
    if bias is None:
        return torch.mm(hidden_rows, weight.T, out=out)
    return torch.addmm(bias, hidden_rows, weight.T, out=out)


def _softcap_(logits, softcap):
    """In place: z -> c tanh(z / c); returns the derivative 1 - tanh^2 = 1 - (z_capped / c)^2 (None without cap)."""
    if softcap is None:
        return None
    logits.div_(softcap).tanh_()
    dcap = 1 - logits.square()
    logits.mul_(softcap)
    return dcap


def _soft_ce(logits, exps, columns, col_weights, softcap):
    """Cross-entropy of each row of z (C, V) against the sparse soft target y = sum_j w_j e_{c_j}.

    Caps ``logits`` in place when ``softcap`` is set and otherwise keeps them; ``exps`` (a buffer of their shape)
    receives exp(z - max z). Returns (loss = lse(z) - sum_j w_j z[c_j], lse(z), argmax z, sum_v exp(z_v - max z),
    soft-cap derivative or None).
    """
    dcap = _softcap_(logits, softcap)
    row_max, argmax = logits.max(dim=-1)
    sum_exp = torch.sub(logits, row_max[:, None], out=exps).exp_().sum(dim=-1)
    lse = row_max + sum_exp.log()
    return lse - (col_weights * logits.gather(1, columns)).sum(1), lse, argmax, sum_exp, dcap


def _soft_ce_grad_(logits, lse, columns, col_weights, row_scale, dcap):
    """In place: z -> row_scale * (softmax(z) - y) * dcap, the gradient of row_scale * loss in the raw logits.

    softmax(z) = exp(z - lse(z)), as PyTorch's cross-entropy gradient forms it, and y subtracted before scaling.
    Dividing `_soft_ce`'s exp(z - max z) by their sum would save this pass over the chunk, but it rounds differently
    enough to move the trainer's gradients off SFTTrainer's by more than its parity tests allow (1e-7).
    """
    grad = logits.sub_(lse[:, None]).exp_()
    # the target columns' p - w_j, in fp32 before any scaling (p - 1 keeps its small difference)
    grad.scatter_add_(1, columns, -col_weights)
    if dcap is not None:
        grad.mul_(dcap)
    return grad.mul_(row_scale[:, None])


def loss_and_grads(
    hidden,
    weight,
    bias,
    layout: RowLayout,
    options: SFTMixLossOptions,
    ntp_scale,
    mix_scale,
    needs_grad,
):
    """(SlotStats, (dH, dW, db), None) for an upstream gradient of 1: ``ntp_scale`` (0-dim) = 1 / normalizer,
    ``mix_scale`` (P,) = mu * w_k. The gradients are in the accumulation dtype; each is None unless its flag in
    ``needs_grad`` (hidden, weight, bias) is set. The last element is the backends' ``grad_scale`` (none here)."""
    acc_dtype = torch.promote_types(hidden.dtype, torch.float32)
    need_hidden, need_weight, need_bias = needs_grad
    need_logit_grad = any(needs_grad)
    softcap, ignore_index = options.logit_softcap, options.ignore_index
    num_slots, num_pairs, vocab_size = layout.rows.numel(), layout.num_pairs, weight.shape[0]
    chunk_rows = min(options.chunk_rows or default_chunk_rows(vocab_size), max(num_slots, 2))

    order, chunks = _chunk_plan(layout, chunk_rows)
    rows = layout.rows[order]
    # fp32 copies of bf16 / fp16 inputs (no copy for fp32 / fp64 ones)
    hidden_rows = hidden[rows].to(acc_dtype)
    weight, bias = weight.to(acc_dtype), bias.to(acc_dtype) if bias is not None else None
    ntp_targets = layout.ntp_targets[order]
    valid = ntp_targets != ignore_index
    ntp_columns = torch.where(valid, ntp_targets, 0)[:, None]
    ntp_weights = valid.to(acc_dtype)[:, None]
    mix_lambda = layout.mix_lambda.to(acc_dtype)[:, None]
    mix_weights = torch.cat([mix_lambda, 1 - mix_lambda], dim=1)

    new = dict(dtype=acc_dtype, device=hidden.device)
    stats = SlotStats(
        nll=torch.empty(num_slots, **new),
        correct=torch.empty(num_slots, dtype=torch.bool, device=hidden.device),
        entropy=torch.empty(num_slots, **new),
        mix_nll=torch.empty(num_pairs, **new),
    )
    logits_buffer = torch.empty(chunk_rows, vocab_size, **new)
    exps_buffer = torch.empty(chunk_rows, vocab_size, **new)
    mixed_buffer = torch.empty(min(chunk_rows // 2, num_pairs), vocab_size, **new)
    if need_logit_grad:
        ntp_row_scale = ntp_weights[:, 0] * ntp_scale
        grad_hidden_rows = torch.empty(hidden_rows.shape, **new) if need_hidden else None
        # dW: the first chunk's product overwrites the uninitialized buffer (addmm with beta = 0 ignores it)
        grad_weight = (torch.empty if chunks else torch.zeros)(weight.shape, **new) if need_weight else None
        grad_bias = torch.zeros(vocab_size, **new) if need_bias else None

    for start, stop, pairs in chunks:
        logits = _logits_into(logits_buffer[: stop - start], hidden_rows[start:stop], weight, bias)
        if pairs is not None:
            # z~ = lam z_p + (1 - lam) z_q, on the raw logits: any soft cap comes after mixing
            half, lam = (stop - start) // 2, mix_lambda[pairs]
            mixed = torch.lerp(logits[half:], logits[:half], lam, out=mixed_buffer[:half])
        exps = exps_buffer[: stop - start]
        columns, col_weights = ntp_columns[start:stop], ntp_weights[start:stop]
        nll, lse, argmax, sum_exp, dcap = _soft_ce(logits, exps, columns, col_weights, softcap)
        slots = order[start:stop]
        ntp_scale_rows = ntp_row_scale[start:stop] if need_logit_grad else None
        if options.dft:
            # DFT: each next-token term times the row's own target probability p_n = exp(-nll_n), held constant,
            # so its loss is p_n nll_n and its logit gradient p_n (softmax(z_n) - e_t) / normalizer
            dft_weight = torch.where(valid[start:stop], torch.exp(-nll), 0.0)
            nll = nll * dft_weight
            ntp_scale_rows = ntp_scale_rows * dft_weight if need_logit_grad else None
        stats.nll[slots] = torch.where(valid[start:stop], nll, 0.0)
        stats.correct[slots] = argmax == ntp_targets[start:stop]
        # entropy = lse(z) - sum_v softmax(z)_v z_v, softmax(z)_v = exp(z_v - max z) / sum_exp
        stats.entropy[slots] = lse - torch.bmm(exps[:, None, :], logits[:, :, None]).flatten() / sum_exp
        if need_logit_grad:
            grad = _soft_ce_grad_(logits, lse, columns, col_weights, ntp_scale_rows, dcap)
        if pairs is not None:
            mix_columns, mix_col_weights = layout.mix_targets[pairs], mix_weights[pairs]
            stats.mix_nll[pairs], mix_lse, _, _, mix_dcap = _soft_ce(
                mixed, exps[:half], mix_columns, mix_col_weights, softcap
            )
            if need_logit_grad:
                mixed_grad = _soft_ce_grad_(mixed, mix_lse, mix_columns, mix_col_weights, mix_scale[pairs], mix_dcap)
                # dz~/dz_p = lam, dz~/dz_q = 1 - lam
                grad[:half].addcmul_(mixed_grad, lam)
                grad[half:].addcmul_(mixed_grad, 1 - lam)
        if need_hidden:
            torch.mm(grad, weight, out=grad_hidden_rows[start:stop])
        if need_weight:
            grad_weight.addmm_(grad.T, hidden_rows[start:stop], beta=float(start > 0))
        if need_bias:
            grad_bias += grad.sum(0)

    if not need_logit_grad:
        return stats, (None, None, None), None
    # rows[i] may repeat only for a self-mixed row whose second slot carries no gradient: adding is exact
    grad_hidden = torch.zeros(hidden.shape, **new).index_add_(0, rows, grad_hidden_rows) if need_hidden else None
    return stats, (grad_hidden, grad_weight, grad_bias), None
