"""Chunked PyTorch implementation of the SFTMix loss (``impl="torch"``): CPU, and CUDA / other devices without Triton.

Never more than one chunk of logits is alive. A chunk's size is set by a memory budget, ``options.chunk_bytes``
(bytes of one chunk of logits in the accumulation dtype; default 2**26 on CPU, 2**29 elsewhere), not by a cache.
Two schedules share the forward over row chunks (`_row_chunks`) and differ in where the gradients come from.

Forward (both). Rows are visited in row chunks of the slots of `layout.RowLayout`, reordered so that every chunk is a
contiguous range (`layout.pair_chunks_first`): first chunks of mixed pairs (the p rows of some pairs, then the q
rows of the same pairs), then chunks of unpaired rows, C = budget / (4 V) rows each (a power of two). Each chunk's
logits give the loss terms, the metrics and the per-row log-sum-exps; z~_k = lam z_p + (1 - lam) z_q mixes the
raw logits.

The logit gradient G for an upstream gradient of 1, in which the mixup gradient of pair k rides on its p and q rows
by linearity,

    G_p = ntp_scale * (softmax(z_p) - e_{t_p}) + lam * g_k,   G_q = ntp_scale * (...) + (1 - lam) * g_k,
    g_k = mix_scale_k * (softmax(z~_k) - y~_k),

gives dH = G W, dW = G^T H and db = sum_n G, so backward only scales by the upstream gradient.

"one pass" (CPU; any device without an fp32-output GEMM for low-precision inputs). G of each row chunk comes from
its logits in the same pass: dH[chunk] = G W, dW += G^T H[chunk], db += sum G. All math in fp32: bf16 / fp16
inputs are upcast once per call (an fp32 copy of W, 4 V D bytes), which is what is fast on CPU; the gradients are
fp32, cast once after the upstream scaling. 6 N D V FLOPs, but the whole fp32 dW is read and written per chunk.

"recompute" (CUDA and other accelerators). Products in the input dtype with fp32 output (``torch.mm(...,
out_dtype=torch.float32)``): no fp32 copy of W. Forward keeps, per slot, lse(z) and dL/dNLL, per pair lse(z~).
The gradients follow in vocabulary chunks of Vc = budget / (4 S) columns over all S slots: recompute
Z = H W[chunk]^T (S x Vc, fp32), form G from the saved log-sum-exps (fp32, divided by grad_scale = max of the row
scales), round it once to the input dtype (bf16: fp16 takes the one pass, `recomputes_by_vocabulary`), then

    dW[chunk] = G^T H     written once, in the input dtype (fp32 accumulation inside the GEMM)
    dH       += G W[chunk] fp32 output: an S x D read-modify-write per vocabulary chunk (D / V of dW's)
    db[chunk] = sum_n G   fp32.

Cost at the Llama-3-8B head (N = 8,192, D = 4,096, V = 128,256, bf16, P = N / 4, default budget 2**29 bytes:
C = 1,024 rows, Vc = 16,384 columns, V / Vc = 8 vocabulary chunks), products at an estimated 80% of an H100's
989 TFLOP/s, memory at 3.35 TB/s (estimates, no GPU measurement):

    FLOPs: 2 N D V forward + 6 N D V backward (recompute, dW, dH) = 8 N D V = 34.4 TFLOP         ~43 ms
    HBM, products: W read once per row chunk in forward ((N / C) 2 V D = 8.4 GB) and twice in backward
        (4 V D = 2.1 GB); H twice per vocabulary chunk ((V / Vc) 4 N D = 1.1 GB); dW written once
        (2 V D = 1.05 GB); dH's read-modify-write ((V / Vc) 8 N D = 2.1 GB)
    HBM, eager elementwise passes over fp32 logits (each pass reads and / or writes 4 bytes per logit): forward
        ~9 per row plus ~9 per mixed pair, backward ~10.5 per row plus ~15 per pair (GEMM output, z - lse, exp,
        scale, the cast to bf16, db, the products' reads of G; lerp, exp, scale and two addcmul for z~):
        ~(11.25 + 14.25) 4 N V = ~102 N V bytes = ~107 GB                                            ~32 ms
    extra memory: forward 2.5 C V fp32 (logits, their exps, the mixed half) = 1.3 GB; backward S Vc fp32 + P Vc
        fp32 + S Vc bf16 (G) = 0.9 GB, plus dH (S D fp32, twice while a GEMM writes the next) 0.27 GB and H in
        slot order (S D bf16) 67 MB. No V x D buffer beyond the returned dW. By accounting on the meta device
        (tests/kernels/test_chunked.py): 1.62 GiB at the peak, against 3.40 GiB for the former torch path (fp32
        copies of W and dW) and 19.6 GiB for the eager reference.

The alternative, the one-pass schedule with input-dtype products and few large row chunks, costs 6 N D V (~33 ms)
but an fp32 dW (4 V D = 2.1 GB extra) read and written once per row chunk after the first, and cast at the end:
(N / C - 1) 8 V D + 4 V D + 6 V D bytes = 34.6 GB (~10 ms) at this budget, 17.8 GB (~5 ms) at 2**30 bytes, 68 GB
(~20 ms) at 2**28. The recompute costs 2 N D V (~11 ms) plus ~7 N V bytes (the logits written again, z~ mixed
again: ~2 ms) whatever the budget, since its per-chunk traffic (dH) is D / V of dW's. Their times are within ~5% of
each other at the default budget (~75 ms in all); recompute holds 2.1 GB less and can take a smaller budget at no
cost, so it is the CUDA schedule. On CPU, where the products dominate and the extra product would cost a third
more, the one-pass schedule stays.
"""

from dataclasses import dataclass

import torch

from .gemm import add_product, has_fp32_out_gemm, product_into
from .layout import Chunk, pair_chunks_first
from .outputs import SlotStats
from .params import LossParams

CPU_CHUNK_BYTES = 1 << 26  # 2**24 fp32 logits: 256 rows of a 49k vocabulary (128 is markedly slower, 512 no faster)
DEVICE_CHUNK_BYTES = 1 << 29  # 512 MiB: 1,024 rows of a 128k vocabulary, 16,384 columns of 8,192 rows
COLUMN_ALIGN = 128  # vocabulary chunks of whole 128-column GEMM tiles


def default_chunk_bytes(device: torch.device) -> int:
    return CPU_CHUNK_BYTES if device.type == "cpu" else DEVICE_CHUNK_BYTES


def chunk_rows_for(budget: int, vocab_size: int, itemsize: int = 4) -> int:
    """The largest power of two >= 2 rows whose logits (``itemsize`` bytes each) fit in ``budget`` bytes."""
    return 1 << max(1, (budget // (itemsize * max(vocab_size, 1))).bit_length() - 1)


def chunk_columns_for(budget: int, num_slots: int, vocab_size: int, itemsize: int = 4) -> int:
    """Vocabulary columns whose logits over ``num_slots`` rows fit in ``budget`` bytes: a multiple of COLUMN_ALIGN
    where the budget allows, at least 1, at most the vocabulary."""
    columns = budget // (itemsize * max(num_slots, 1))
    if columns >= COLUMN_ALIGN:
        columns -= columns % COLUMN_ALIGN
    return min(max(columns, 1), vocab_size)


def recomputes_by_vocabulary(device: torch.device, dtype: torch.dtype) -> bool:
    """The schedule: "recompute" off the CPU where the products can stay in the input dtype, else "one pass". fp16
    takes the one pass (fp32 math): the recompute's fp16 G, scaled once for the batch, would lose the softmax tails
    of rows with small weights, and its fp16 dW, formed before the upstream (loss-scaler) gradient, can overflow."""
    if device.type == "cpu" or dtype == torch.float16:
        return False
    return dtype == torch.promote_types(dtype, torch.float32) or has_fp32_out_gemm(device.type, dtype)


def _logits_into(out, hidden_rows, weight, bias):
    """out <- h W^T + b."""
    if bias is None:
        return product_into(out, hidden_rows, weight.T)
    if hidden_rows.dtype == out.dtype:
        return torch.addmm(bias, hidden_rows, weight.T, out=out)
    return product_into(out, hidden_rows, weight.T).add_(bias)


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


@dataclass(frozen=True)
class _RowPlan:
    """The forward's row chunks (`layout.pair_chunks_first`): slot ``order[i]`` sits at position i, ``chunks`` cover
    the positions, and a chunk holds at most ``chunk_rows`` rows."""

    order: torch.Tensor
    chunks: list[Chunk]
    chunk_rows: int


@dataclass
class _RowChunk:
    """One forward row chunk, ``span`` of the row plan: per row lse(z) and dL/dNLL (None without gradients), per pair
    lse(z~), and, when the forward was asked for it, G."""

    span: Chunk
    lse: torch.Tensor
    ntp_row_scale: torch.Tensor | None
    mix_lse: torch.Tensor | None
    grad: torch.Tensor | None


def _row_chunks(hidden_rows, weight, bias, params: LossParams, plan: _RowPlan, stats, form_grad: bool):
    """The forward: fills ``stats`` chunk by chunk and yields each chunk (`_RowChunk`; its buffers are reused by the
    next one). ``hidden_rows`` are in the plan's order; the per-row dL/dNLL only when an input needs a gradient;
    ``form_grad`` (the one-pass schedule) also forms each chunk's G, in place of its logits."""
    layout, options, order = params.layout, params.options, plan.order
    acc_dtype, device = stats.nll.dtype, stats.nll.device
    softcap, ignore_index = options.logit_softcap, options.ignore_index
    num_pairs, vocab_size = layout.num_pairs, weight.shape[0]
    ntp_targets = layout.ntp_targets[order]
    valid = ntp_targets != ignore_index
    ntp_columns = torch.where(valid, ntp_targets, 0)[:, None]
    ntp_weights = valid.to(acc_dtype)[:, None]
    ntp_row_scale = ntp_weights[:, 0] * params.ntp_scale if params.any_grad else None
    mix_lambda = layout.mix_lambda.to(acc_dtype)[:, None]
    mix_weights = torch.cat([mix_lambda, 1 - mix_lambda], dim=1)

    acc = dict(dtype=acc_dtype, device=device)
    logits_buffer = torch.empty(plan.chunk_rows, vocab_size, **acc)
    exps_buffer = torch.empty(plan.chunk_rows, vocab_size, **acc)
    mixed_logits_buffer = torch.empty(min(plan.chunk_rows // 2, num_pairs), vocab_size, **acc)
    for span in plan.chunks:
        start, stop, pairs = span.start, span.stop, span.pairs if span.num_pairs else None
        logits = _logits_into(logits_buffer[: stop - start], hidden_rows[start:stop], weight, bias)
        if pairs is not None:
            # z~ = lam z_p + (1 - lam) z_q, on the raw logits: any soft cap comes after mixing
            half, lam = (stop - start) // 2, mix_lambda[pairs]
            mixed_logits = torch.lerp(logits[half:], logits[:half], lam, out=mixed_logits_buffer[:half])
        exps = exps_buffer[: stop - start]
        columns, col_weights = ntp_columns[start:stop], ntp_weights[start:stop]
        nll, lse, argmax, sum_exp, dcap = _soft_ce(logits, exps, columns, col_weights, softcap)
        slots = order[start:stop]
        row_scale = ntp_row_scale[start:stop] if ntp_row_scale is not None else None
        if options.dft:
            # DFT: each next-token term times the row's own target probability p_n = exp(-nll_n), held constant,
            # so its loss is p_n nll_n and its logit gradient p_n (softmax(z_n) - e_t) / normalizer
            dft_weight = torch.where(valid[start:stop], torch.exp(-nll), 0.0)
            nll = nll * dft_weight
            row_scale = row_scale * dft_weight if row_scale is not None else None
        stats.nll[slots] = torch.where(valid[start:stop], nll, 0.0)
        stats.correct[slots] = argmax == ntp_targets[start:stop]
        # entropy = lse(z) - sum_v softmax(z)_v z_v, softmax(z)_v = exp(z_v - max z) / sum_exp
        stats.entropy[slots] = lse - torch.bmm(exps[:, None, :], logits[:, :, None]).flatten() / sum_exp
        chunk = _RowChunk(span, lse, row_scale, None, None)
        if form_grad:
            chunk.grad = _soft_ce_grad_(logits, lse, columns, col_weights, row_scale, dcap)
        if pairs is not None:
            mix_columns, mix_col_weights = layout.mix_targets[pairs], mix_weights[pairs]
            stats.mix_nll[pairs], chunk.mix_lse, _, _, mix_dcap = _soft_ce(
                mixed_logits, exps[:half], mix_columns, mix_col_weights, softcap
            )
            if form_grad:
                mixed_logits_grad = _soft_ce_grad_(
                    mixed_logits, chunk.mix_lse, mix_columns, mix_col_weights, params.mix_scale[pairs], mix_dcap
                )
                # dz~/dz_p = lam, dz~/dz_q = 1 - lam
                chunk.grad[:half].addcmul_(mixed_logits_grad, lam)
                chunk.grad[half:].addcmul_(mixed_logits_grad, 1 - lam)
        yield chunk


def _new_stats(num_slots, num_pairs, dtype, device):
    return SlotStats(
        nll=torch.empty(num_slots, dtype=dtype, device=device),
        correct=torch.empty(num_slots, dtype=torch.bool, device=device),
        entropy=torch.empty(num_slots, dtype=dtype, device=device),
        mix_nll=torch.empty(num_pairs, dtype=dtype, device=device),
    )


def loss_and_grads(hidden, weight, bias, params: LossParams):
    """(SlotStats, (dH, dW, db) / grad_scale, grad_scale) for an upstream gradient of 1 (`params.LossParams`). Each
    gradient is None unless its flag in ``params.needs_grad`` (hidden, weight, bias) is set. One pass: gradients in
    the accumulation dtype, grad_scale None (1). Recompute: dW in the input dtype, dH and db in fp32, grad_scale a
    0-dim tensor (None without gradients)."""
    acc_dtype = torch.promote_types(hidden.dtype, torch.float32)
    options = params.options
    budget = options.chunk_bytes or default_chunk_bytes(hidden.device)
    num_slots = params.layout.rows.numel()
    chunk_rows = options.chunk_rows or chunk_rows_for(budget, weight.shape[0], acc_dtype.itemsize)
    chunk_rows = min(chunk_rows, max(num_slots, 2))
    plan = _RowPlan(*pair_chunks_first(params.layout, chunk_rows), chunk_rows)
    if recomputes_by_vocabulary(hidden.device, hidden.dtype):
        return _recompute(hidden, weight, bias, params, plan, budget)
    return _one_pass(hidden, weight, bias, params, plan)


def _one_pass(hidden, weight, bias, params: LossParams, plan: _RowPlan):
    """The one-pass schedule (module docstring): fp32 copies of low-precision inputs, G per row chunk."""
    acc_dtype = torch.promote_types(hidden.dtype, torch.float32)
    layout = params.layout
    need_hidden, need_weight, need_bias = params.needs_grad
    need_logit_grad = params.any_grad
    num_slots, num_pairs, vocab_size = layout.rows.numel(), layout.num_pairs, weight.shape[0]
    rows = layout.rows[plan.order]
    # fp32 copies of bf16 / fp16 inputs (no copy for fp32 / fp64 ones)
    hidden_rows = hidden[rows].to(acc_dtype)
    weight, bias = weight.to(acc_dtype), bias.to(acc_dtype) if bias is not None else None
    stats = _new_stats(num_slots, num_pairs, acc_dtype, hidden.device)
    acc = dict(dtype=acc_dtype, device=hidden.device)
    if need_logit_grad:
        grad_hidden_rows = torch.empty(hidden_rows.shape, **acc) if need_hidden else None
        # dW: the first chunk's product overwrites the uninitialized buffer (addmm with beta = 0 ignores it)
        grad_weight = (torch.empty if plan.chunks else torch.zeros)(weight.shape, **acc) if need_weight else None
        grad_bias = torch.zeros(vocab_size, **acc) if need_bias else None

    for chunk in _row_chunks(hidden_rows, weight, bias, params, plan, stats, form_grad=need_logit_grad):
        if not need_logit_grad:
            continue
        grad, start, stop = chunk.grad, chunk.span.start, chunk.span.stop
        if need_hidden:
            torch.mm(grad, weight, out=grad_hidden_rows[start:stop])
        if need_weight:
            grad_weight.addmm_(grad.T, hidden_rows[start:stop], beta=float(start > 0))
        if need_bias:
            grad_bias += grad.sum(0)

    if not need_logit_grad:
        return stats, (None, None, None), None
    # rows[i] may repeat only for a self-mixed row whose second slot carries no gradient: adding is exact
    grad_hidden = torch.zeros(hidden.shape, **acc).index_add_(0, rows, grad_hidden_rows) if need_hidden else None
    return stats, (grad_hidden, grad_weight, grad_bias), None


def _recompute(hidden, weight, bias, params: LossParams, plan: _RowPlan, budget: int):
    """The recompute schedule (module docstring): products in the input dtype, G per vocabulary chunk."""
    acc_dtype = torch.promote_types(hidden.dtype, torch.float32)
    layout = params.layout
    num_slots, num_pairs, device = layout.rows.numel(), layout.num_pairs, hidden.device
    stats = _new_stats(num_slots, num_pairs, acc_dtype, device)
    bias_acc = bias.to(acc_dtype) if bias is not None else None
    need_logit_grad = params.any_grad
    # what the backward reads, in slot order: lse(z) and dL/dNLL per slot, lse(z~) per pair
    lse, ntp_row_scale, mix_lse = (
        torch.empty(n, dtype=acc_dtype, device=device) for n in (num_slots, num_slots, num_pairs)
    )
    hidden_rows = hidden.index_select(0, layout.rows[plan.order])
    row_chunks = _row_chunks(hidden_rows, weight, bias_acc, params, plan, stats, form_grad=False)
    for chunk in row_chunks:
        if need_logit_grad:
            slots = plan.order[chunk.span.start : chunk.span.stop]
            lse[slots], ntp_row_scale[slots] = chunk.lse, chunk.ntp_row_scale
            if chunk.span.num_pairs:
                mix_lse[chunk.span.pairs] = chunk.mix_lse
    del row_chunks, hidden_rows  # frees the forward's buffers
    if not need_logit_grad:
        return stats, (None, None, None), None
    grad_scale = params.grad_scale(acc_dtype)
    saved = _SavedForward(lse, ntp_row_scale / grad_scale, mix_lse, params.mix_scale / grad_scale)
    grads = _vocabulary_backward(hidden, weight, bias_acc, params, saved, budget)
    return stats, grads, grad_scale


@dataclass
class _SavedForward:
    """Per slot lse(z) and dL/dNLL, per pair lse(z~) and dL/dl_mix (both scales divided by grad_scale)."""

    lse: torch.Tensor
    ntp_row_scale: torch.Tensor
    mix_lse: torch.Tensor
    mix_scale: torch.Tensor


def _vocabulary_backward(hidden, weight, bias, params: LossParams, saved: _SavedForward, budget: int):
    """(dH, dW, db) / grad_scale by vocabulary chunks over all slots: dW[chunk] written once in the input dtype."""
    layout, options = params.layout, params.options
    need_hidden, need_weight, need_bias = params.needs_grad
    acc_dtype, input_dtype, device = saved.lse.dtype, hidden.dtype, hidden.device
    (vocab_size, hidden_size), num_slots, num_pairs = weight.shape, layout.rows.numel(), layout.num_pairs
    columns = chunk_columns_for(budget, num_slots, vocab_size, acc_dtype.itemsize)
    acc = dict(dtype=acc_dtype, device=device)
    hidden_slots = hidden.index_select(0, layout.rows)
    valid = layout.ntp_targets != options.ignore_index
    mix_lambda = layout.mix_lambda.to(acc_dtype)[:, None]
    mix_weights = torch.cat([mix_lambda, 1 - mix_lambda], dim=1)
    # flat buffers: a narrower last chunk is a contiguous prefix, plain GEMM operands
    logits_buffer = torch.empty(num_slots * columns, **acc)
    mixed_logits_buffer = torch.empty(num_pairs * columns, **acc)
    low_grad_buffer = torch.empty(num_slots * columns, dtype=input_dtype, device=device)
    grad_hidden_slots = torch.zeros(num_slots, hidden_size, **acc) if need_hidden else None
    grad_weight = torch.empty_like(weight) if need_weight else None
    grad_bias = torch.empty(vocab_size, **acc) if need_bias else None

    for first in range(0, vocab_size, columns):
        last = min(first + columns, vocab_size)
        width = last - first
        logits = logits_buffer[: num_slots * width].view(num_slots, width)
        _logits_into(logits, hidden_slots, weight[first:last], bias[first:last] if bias is not None else None)
        # each row's target columns, relative to the chunk, with weight 0 where the target lies outside it
        ntp_columns, ntp_weights = _columns_in_chunk(layout.ntp_targets[:, None], valid[:, None], first, last)
        if num_pairs:
            mixed_logits = mixed_logits_buffer[: num_pairs * width].view(num_pairs, width)
            # z~ = lam z_p + (1 - lam) z_q (slots k and P + k), before any soft cap
            torch.lerp(logits[num_pairs : 2 * num_pairs], logits[:num_pairs], mix_lambda, out=mixed_logits)
        dcap = _softcap_(logits, options.logit_softcap)
        grad = _soft_ce_grad_(logits, saved.lse, ntp_columns, ntp_weights.to(acc_dtype), saved.ntp_row_scale, dcap)
        if num_pairs:
            mix_columns, in_chunk = _columns_in_chunk(layout.mix_targets, True, first, last)
            mix_dcap = _softcap_(mixed_logits, options.logit_softcap)
            mixed_logits_grad = _soft_ce_grad_(
                mixed_logits, saved.mix_lse, mix_columns, mix_weights * in_chunk, saved.mix_scale, mix_dcap
            )
            # dz~/dz_p = lam, dz~/dz_q = 1 - lam
            grad[:num_pairs].addcmul_(mixed_logits_grad, mix_lambda)
            grad[num_pairs : 2 * num_pairs].addcmul_(mixed_logits_grad, 1 - mix_lambda)
        if need_bias:
            # db[chunk] = sum_n G, from the fp32 G
            torch.sum(grad, dim=0, out=grad_bias[first:last])
        if input_dtype != acc_dtype:
            # G rounded once to the input dtype, the products' operand
            grad = low_grad_buffer[: num_slots * width].view(num_slots, width).copy_(grad)
        if need_weight:
            # dW[chunk] = G^T H, written once
            torch.mm(grad.T, hidden_slots, out=grad_weight[first:last])
        if need_hidden:
            # dH += G W[chunk], fp32 output
            grad_hidden_slots = add_product(grad_hidden_slots, grad, weight[first:last])
    del logits_buffer, mixed_logits_buffer, low_grad_buffer
    grad_hidden = None
    if need_hidden:
        # back from slot order to row order; a row in two slots (a repeated self-mixed row) gets both (one is 0)
        grad_hidden = torch.zeros(hidden.shape, **acc).index_add_(0, layout.rows, grad_hidden_slots)
    return grad_hidden, grad_weight, grad_bias


def _columns_in_chunk(targets, valid, first, last):
    """(columns relative to the chunk [first, last), 0 where outside, and whether each target lies inside)."""
    inside = (targets >= first) & (targets < last) & valid
    return torch.where(inside, targets - first, 0), inside
