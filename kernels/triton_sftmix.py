"""Triton implementation of the SFTMix loss: the LM-head projection, the mixing and the (soft-target) cross-entropy
in one kernel family; no N x V tensor exists in forward or backward.

Pair tiles (the crux). A program owns BLOCK_M *pair slots*. Pair slot k < P holds the two rows of mixed position k:
side a = its p row, side b = its q row (`layout.RowLayout` slots k and P + k). The remaining rows fill the later
pair slots two at a time (side a from the first half of the unpaired rows, side b from the second), without mixing.
Each program loads the side-a and side-b hidden tiles and forms both logits tiles with `tl.dot` on the same W tile,
so z~ = lam z_a + (1 - lam) z_b is elementwise in registers: mixing costs no matrix product, and a program whose
tile holds no mixed pair skips the z~ work altogether (a runtime branch on the tile index).

Forward: grid (pair tiles, vocabulary splits). Each program runs over its vocabulary range block by block with an
online max / sum-exp, keeping per row: max, sum exp(z - max), sum exp(z - max) z (entropy), the target logit and
the first argmax; per mixed pair: max, sum-exp and lam z~[t_p] + (1 - lam) z~[t_q] of z~. The few partials of the
splits are combined in PyTorch (O(N) work).

Gradient: grid (pair tiles, vocabulary blocks), launched right after the forward kernel when a gradient is needed
(for an upstream gradient of 1; the autograd Function's backward only scales the result). Each program recomputes
its logits block from the forward's log-sum-exps, forms the logit gradient G in fp32 registers,

    G_a = ntp_scale (softmax(z_a) - e_{t_a}) + lam g,   G_b = ntp_scale (softmax(z_b) - e_{t_b}) + (1 - lam) g,
    g = mix_scale (softmax(z~) - lam e_{t_p} - (1 - lam) e_{t_q})              (mixed pairs only)

(times the soft-cap derivative where one is set), and adds G W to dH, G^T H to dW and sum G to db with fp32
atomics, one BLOCK_D slice at a time.

All exp / log / sum in fp32; `tl.dot` on bf16 / fp16 tiles with fp32 accumulation (IEEE fp32 for fp32 inputs).
Under TRITON_INTERPRET=1 every tile is upcast to fp32 right after its load (the interpreter keeps bf16 as raw bits).
"""

import os

import torch
import triton
import triton.language as tl

from .layout import RowLayout
from .options import SFTMixLossOptions
from .outputs import SlotStats

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _softcap(z, softcap, SOFTCAP: tl.constexpr):
    """c tanh(z / c), with tanh(u) = 1 - 2 / (exp(2u) + 1) (no libdevice)."""
    if SOFTCAP:
        z = softcap * (1.0 - 2.0 / (tl.exp(2.0 * z / softcap) + 1.0))
    return z


@triton.jit
def _pair_tile(
    pid,
    rows_ptr,
    ntp_targets_ptr,
    num_slots,
    num_pairs,
    num_pair_slots,
    rest_half,
    ignore_index,
    BLOCK_M: tl.constexpr,
):
    """Slots, rows and NTP targets of sides a and b of the pair slots of tile ``pid``."""
    k = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    in_range = k < num_pair_slots
    is_pair = k < num_pairs
    # pair k < P: slots k and P + k; unpaired slot k >= P: rest slots 2P + (k - P) and 2P + half + (k - P)
    slot_a = tl.where(is_pair, k, k + num_pairs)
    slot_b = tl.where(is_pair, k + num_pairs, k + num_pairs + rest_half)
    ok_a = in_range
    ok_b = in_range & (slot_b < num_slots)
    row_a = tl.load(rows_ptr + slot_a, mask=ok_a, other=0)
    row_b = tl.load(rows_ptr + slot_b, mask=ok_b, other=0)
    target_a = tl.load(ntp_targets_ptr + slot_a, mask=ok_a, other=ignore_index)
    target_b = tl.load(ntp_targets_ptr + slot_b, mask=ok_b, other=ignore_index)
    return k, is_pair & in_range, slot_a, slot_b, ok_a, ok_b, row_a, row_b, target_a, target_b


@triton.jit
def _pair_logits(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    row_a,
    row_b,
    ok_a,
    ok_b,
    cols,
    col_ok,
    hidden_size,
    stride_h,
    stride_w,
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Raw logits z = h W^T + b of sides a and b on one vocabulary block, fp32 (BLOCK_M, BLOCK_V) each."""
    z_a = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    z_b = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    for d_start in range(0, hidden_size, BLOCK_D):
        dims = d_start + tl.arange(0, BLOCK_D)
        dim_ok = dims < hidden_size
        h_a = tl.load(
            hidden_ptr + row_a[:, None] * stride_h + dims[None, :], mask=ok_a[:, None] & dim_ok[None, :], other=0.0
        )
        h_b = tl.load(
            hidden_ptr + row_b[:, None] * stride_h + dims[None, :], mask=ok_b[:, None] & dim_ok[None, :], other=0.0
        )
        # W^T tile (BLOCK_D, BLOCK_V), shared by both sides
        w_t = tl.load(
            weight_ptr + cols[None, :].to(tl.int64) * stride_w + dims[:, None],
            mask=col_ok[None, :] & dim_ok[:, None],
            other=0.0,
        )
        if UPCAST:
            h_a, h_b, w_t = h_a.to(tl.float32), h_b.to(tl.float32), w_t.to(tl.float32)
        z_a = tl.dot(h_a, w_t, z_a, input_precision=DOT_PRECISION)
        z_b = tl.dot(h_b, w_t, z_b, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        z_a += bias[None, :]
        z_b += bias[None, :]
    return z_a, z_b


@triton.jit
def _online_update(z, run_max, run_sum):
    """One block of an online log-sum-exp; z is -inf on masked columns. Returns (max, sum, rescale, exp(z - max))."""
    new_max = tl.maximum(run_max, tl.max(z, 1))
    rescale = tl.exp(run_max - new_max)
    probs = tl.exp(z - new_max[:, None])
    return new_max, run_sum * rescale + tl.sum(probs, 1), rescale, probs


@triton.jit
def _ntp_block(z, cols, col_ok, target, run_max, run_sum, run_zsum, run_target, run_arg, vocab_size):
    """Online NTP statistics of one block of capped logits z (masked columns are set to -inf here)."""
    z = tl.where(col_ok[None, :], z, float("-inf"))
    block_max = tl.max(z, 1)
    # first column reaching the block max; a later block wins only when strictly larger
    block_arg = tl.min(tl.where(z == block_max[:, None], cols[None, :], vocab_size), 1)
    run_arg = tl.where(block_max > run_max, block_arg, run_arg)
    new_max, run_sum, rescale, probs = _online_update(z, run_max, run_sum)
    # entropy needs sum softmax(z) z: carry sum exp(z - max) z
    run_zsum = run_zsum * rescale + tl.sum(probs * tl.where(col_ok[None, :], z, 0.0), 1)
    run_target += tl.sum(tl.where(cols[None, :] == target[:, None], z, 0.0), 1)
    return new_max, run_sum, run_zsum, run_target, run_arg


@triton.jit
def _sftmix_forward_kernel(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    rows_ptr,
    ntp_targets_ptr,
    lam_ptr,
    mix_targets_ptr,
    part_max_ptr,
    part_sum_ptr,
    part_zsum_ptr,
    part_target_ptr,
    part_arg_ptr,
    mix_max_ptr,
    mix_sum_ptr,
    mix_target_ptr,
    num_slots,
    num_pairs,
    num_pair_slots,
    rest_half,
    hidden_size,
    vocab_size,
    stride_h,
    stride_w,
    ignore_index,
    softcap,
    cols_per_split,
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    k, is_pair, slot_a, slot_b, ok_a, ok_b, row_a, row_b, target_a, target_b = _pair_tile(
        pid, rows_ptr, ntp_targets_ptr, num_slots, num_pairs, num_pair_slots, rest_half, ignore_index, BLOCK_M
    )
    tile_has_pair = pid * BLOCK_M < num_pairs
    lam = tl.load(lam_ptr + k, mask=is_pair, other=1.0)
    target_p = tl.load(mix_targets_ptr + 2 * k, mask=is_pair, other=0)
    target_q = tl.load(mix_targets_ptr + 2 * k + 1, mask=is_pair, other=0)

    zeros = tl.zeros((BLOCK_M,), dtype=tl.float32)
    max_a, sum_a, zsum_a, tgt_a = zeros - float("inf"), zeros, zeros, zeros
    max_b, sum_b, zsum_b, tgt_b = zeros - float("inf"), zeros, zeros, zeros
    arg_a = tl.zeros((BLOCK_M,), dtype=tl.int32)
    arg_b = tl.zeros((BLOCK_M,), dtype=tl.int32)
    max_t, sum_t, tgt_t = zeros - float("inf"), zeros, zeros

    v_start = split * cols_per_split
    v_end = tl.minimum(v_start + cols_per_split, vocab_size)
    for block_start in range(v_start, v_end, BLOCK_V):
        cols = block_start + tl.arange(0, BLOCK_V)
        col_ok = cols < v_end
        z_a, z_b = _pair_logits(
            hidden_ptr, weight_ptr, bias_ptr, row_a, row_b, ok_a, ok_b, cols, col_ok, hidden_size, stride_h,
            stride_w, HAS_BIAS, UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_V, BLOCK_D,
        )  # fmt: skip
        if tile_has_pair:
            # z~ = lam z_p + (1 - lam) z_q on raw logits; the soft cap comes after mixing
            z_t = _softcap(lam[:, None] * z_a + (1.0 - lam[:, None]) * z_b, softcap, SOFTCAP)
            z_t = tl.where(col_ok[None, :], z_t, float("-inf"))
            max_t, sum_t, _, _ = _online_update(z_t, max_t, sum_t)
            # lam z~[t_p] + (1 - lam) z~[t_q]
            soft_target = tl.where(cols[None, :] == target_p[:, None], lam[:, None], 0.0) + tl.where(
                cols[None, :] == target_q[:, None], 1.0 - lam[:, None], 0.0
            )
            tgt_t += tl.sum(soft_target * tl.where(col_ok[None, :], z_t, 0.0), 1)
        z_a = _softcap(z_a, softcap, SOFTCAP)
        z_b = _softcap(z_b, softcap, SOFTCAP)
        max_a, sum_a, zsum_a, tgt_a, arg_a = _ntp_block(
            z_a, cols, col_ok, target_a, max_a, sum_a, zsum_a, tgt_a, arg_a, vocab_size
        )
        max_b, sum_b, zsum_b, tgt_b, arg_b = _ntp_block(
            z_b, cols, col_ok, target_b, max_b, sum_b, zsum_b, tgt_b, arg_b, vocab_size
        )

    base = split * num_slots
    tl.store(part_max_ptr + base + slot_a, max_a, mask=ok_a)
    tl.store(part_sum_ptr + base + slot_a, sum_a, mask=ok_a)
    tl.store(part_zsum_ptr + base + slot_a, zsum_a, mask=ok_a)
    tl.store(part_target_ptr + base + slot_a, tgt_a, mask=ok_a)
    tl.store(part_arg_ptr + base + slot_a, arg_a, mask=ok_a)
    tl.store(part_max_ptr + base + slot_b, max_b, mask=ok_b)
    tl.store(part_sum_ptr + base + slot_b, sum_b, mask=ok_b)
    tl.store(part_zsum_ptr + base + slot_b, zsum_b, mask=ok_b)
    tl.store(part_target_ptr + base + slot_b, tgt_b, mask=ok_b)
    tl.store(part_arg_ptr + base + slot_b, arg_b, mask=ok_b)
    if tile_has_pair:
        mix_base = split * num_pairs
        tl.store(mix_max_ptr + mix_base + k, max_t, mask=is_pair)
        tl.store(mix_sum_ptr + mix_base + k, sum_t, mask=is_pair)
        tl.store(mix_target_ptr + mix_base + k, tgt_t, mask=is_pair)


@triton.jit
def _soft_ce_grad(
    z_raw, lse, col_weight_1, col_1, col_weight_2, col_2, row_scale, cols, col_ok, softcap, SOFTCAP: tl.constexpr
):
    """row_scale * (softmax(z) - w1 e_{c1} - w2 e_{c2}) * dcap(z) with z = cap(z_raw); 0 on masked columns."""
    z = _softcap(z_raw, softcap, SOFTCAP)
    # the target corrections in fp32, before anything is rounded
    grad = (
        tl.exp(z - lse[:, None])
        - tl.where(cols[None, :] == col_1[:, None], col_weight_1[:, None], 0.0)
        - tl.where(cols[None, :] == col_2[:, None], col_weight_2[:, None], 0.0)
    )
    if SOFTCAP:
        # d(c tanh(u / c))/du = 1 - (z / c)^2
        grad = grad * (1.0 - (z / softcap) * (z / softcap))
    return tl.where(col_ok[None, :], grad * row_scale[:, None], 0.0)


@triton.jit
def _sftmix_backward_kernel(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    rows_ptr,
    ntp_targets_ptr,
    lam_ptr,
    mix_targets_ptr,
    lse_ptr,
    mix_lse_ptr,
    mix_scale_ptr,
    ntp_scale_ptr,
    grad_hidden_ptr,
    grad_weight_ptr,
    grad_bias_ptr,
    num_slots,
    num_pairs,
    num_pair_slots,
    rest_half,
    hidden_size,
    vocab_size,
    stride_h,
    stride_w,
    ignore_index,
    softcap,
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    NEED_HIDDEN: tl.constexpr,
    NEED_WEIGHT: tl.constexpr,
    NEED_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < vocab_size
    k, is_pair, slot_a, slot_b, ok_a, ok_b, row_a, row_b, target_a, target_b = _pair_tile(
        pid, rows_ptr, ntp_targets_ptr, num_slots, num_pairs, num_pair_slots, rest_half, ignore_index, BLOCK_M
    )
    z_a, z_b = _pair_logits(
        hidden_ptr, weight_ptr, bias_ptr, row_a, row_b, ok_a, ok_b, cols, col_ok, hidden_size, stride_h, stride_w,
        HAS_BIAS, UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_V, BLOCK_D,
    )  # fmt: skip

    # NTP part: ntp_scale (softmax(z) - e_t) on valid rows (lse = +inf on padding rows makes softmax 0 there)
    ntp_scale = tl.load(ntp_scale_ptr)
    lse_a = tl.load(lse_ptr + slot_a, mask=ok_a, other=float("inf"))
    lse_b = tl.load(lse_ptr + slot_b, mask=ok_b, other=float("inf"))
    scale_a = tl.where(target_a != ignore_index, ntp_scale, 0.0)
    scale_b = tl.where(target_b != ignore_index, ntp_scale, 0.0)
    no_weight = tl.zeros((BLOCK_M,), dtype=tl.float32)
    one_weight = no_weight + 1.0
    grad_a = _soft_ce_grad(z_a, lse_a, one_weight, target_a, no_weight, target_a, scale_a, cols, col_ok, softcap,
                           SOFTCAP)  # fmt: skip
    grad_b = _soft_ce_grad(z_b, lse_b, one_weight, target_b, no_weight, target_b, scale_b, cols, col_ok, softcap,
                           SOFTCAP)  # fmt: skip
    if pid * BLOCK_M < num_pairs:
        # mixup part rides on both rows: dz~/dz_p = lam, dz~/dz_q = 1 - lam
        lam = tl.load(lam_ptr + k, mask=is_pair, other=1.0)
        target_p = tl.load(mix_targets_ptr + 2 * k, mask=is_pair, other=0)
        target_q = tl.load(mix_targets_ptr + 2 * k + 1, mask=is_pair, other=0)
        mix_lse = tl.load(mix_lse_ptr + k, mask=is_pair, other=float("inf"))
        mix_scale = tl.load(mix_scale_ptr + k, mask=is_pair, other=0.0)
        z_t = lam[:, None] * z_a + (1.0 - lam[:, None]) * z_b
        grad_t = _soft_ce_grad(z_t, mix_lse, lam, target_p, 1.0 - lam, target_q, mix_scale, cols, col_ok, softcap,
                               SOFTCAP)  # fmt: skip
        grad_a += lam[:, None] * grad_t
        grad_b += (1.0 - lam[:, None]) * grad_t

    if NEED_BIAS:
        tl.atomic_add(grad_bias_ptr + cols, tl.sum(grad_a, 0) + tl.sum(grad_b, 0), mask=col_ok)
    if NEED_HIDDEN or NEED_WEIGHT:
        for d_start in range(0, hidden_size, BLOCK_D):
            dims = d_start + tl.arange(0, BLOCK_D)
            dim_ok = dims < hidden_size
            w = tl.load(
                weight_ptr + cols[:, None].to(tl.int64) * stride_w + dims[None, :],
                mask=col_ok[:, None] & dim_ok[None, :],
                other=0.0,
            )
            if UPCAST:
                w = w.to(tl.float32)
            # G rounded to the dot's input dtype only now, after the fp32 corrections
            g_a = grad_a.to(w.dtype)
            g_b = grad_b.to(w.dtype)
            if NEED_HIDDEN:
                # dH = G W
                mask_a = ok_a[:, None] & dim_ok[None, :]
                mask_b = ok_b[:, None] & dim_ok[None, :]
                out_a = grad_hidden_ptr + row_a[:, None] * hidden_size + dims[None, :]
                out_b = grad_hidden_ptr + row_b[:, None] * hidden_size + dims[None, :]
                tl.atomic_add(out_a, tl.dot(g_a, w, input_precision=DOT_PRECISION), mask=mask_a)
                tl.atomic_add(out_b, tl.dot(g_b, w, input_precision=DOT_PRECISION), mask=mask_b)
            if NEED_WEIGHT:
                # dW = G^T H
                h_a = tl.load(
                    hidden_ptr + row_a[:, None] * stride_h + dims[None, :],
                    mask=ok_a[:, None] & dim_ok[None, :],
                    other=0.0,
                )
                h_b = tl.load(
                    hidden_ptr + row_b[:, None] * stride_h + dims[None, :],
                    mask=ok_b[:, None] & dim_ok[None, :],
                    other=0.0,
                )
                if UPCAST:
                    h_a, h_b = h_a.to(tl.float32), h_b.to(tl.float32)
                grad_w = tl.dot(tl.trans(g_a), h_a, input_precision=DOT_PRECISION)
                grad_w = tl.dot(tl.trans(g_b), h_b, grad_w, input_precision=DOT_PRECISION)
                out_w = grad_weight_ptr + cols[:, None].to(tl.int64) * hidden_size + dims[None, :]
                tl.atomic_add(out_w, grad_w, mask=col_ok[:, None] & dim_ok[None, :])


def _blocks(options: SFTMixLossOptions, num_pair_slots: int, vocab_size: int, hidden_size: int):
    """(BLOCK_M, BLOCK_V, BLOCK_D): the options' values, else large blocks under the interpreter (each program-loop
    step costs milliseconds there) and a fixed GPU tiling (two 64 x 128 fp32 logits tiles per program)."""
    if INTERPRET:
        block_m = min(max(triton.next_power_of_2(max(num_pair_slots, 1)), 16), 64)
        block_v = min(max(triton.next_power_of_2(vocab_size), 16), 256)
        block_d = min(max(triton.next_power_of_2(hidden_size), 16), 128)
    else:
        block_m, block_v, block_d = 64, 128, 64
    return options.block_pairs or block_m, options.block_v or block_v, options.block_d or block_d


def _tiling(hidden, weight, layout: RowLayout, options: SFTMixLossOptions):
    """Launch arguments common to forward and backward."""
    if hidden.dtype not in TRITON_DTYPES:
        raise TypeError(f"impl='triton' takes {TRITON_DTYPES} inputs, got {hidden.dtype}; use impl='torch'.")
    num_slots, num_pairs = layout.rows.numel(), layout.num_pairs
    rest_half = (num_slots - 2 * num_pairs + 1) // 2
    num_pair_slots = num_pairs + rest_half
    block_m, block_v, block_d = _blocks(options, num_pair_slots, weight.shape[0], weight.shape[1])
    return dict(
        num_slots=num_slots,
        num_pairs=num_pairs,
        num_pair_slots=num_pair_slots,
        rest_half=rest_half,
        hidden_size=hidden.shape[1],
        vocab_size=weight.shape[0],
        stride_h=hidden.stride(0),
        stride_w=weight.stride(0),
        ignore_index=options.ignore_index,
        softcap=float(options.logit_softcap or 1.0),
        SOFTCAP=options.logit_softcap is not None,
        UPCAST=INTERPRET,
        DOT_PRECISION="ieee" if hidden.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m,
        BLOCK_V=block_v,
        BLOCK_D=block_d,
    )


def _num_v_splits(options: SFTMixLossOptions, hidden, num_tiles: int, vocab_blocks: int) -> int:
    """Vocabulary splits of the forward grid: enough programs for about two waves on the GPU, 1 in the interpreter."""
    if options.v_splits is not None:
        return min(options.v_splits, vocab_blocks)
    if INTERPRET or hidden.device.type != "cuda":
        return 1
    num_sms = torch.cuda.get_device_properties(hidden.device).multi_processor_count
    return max(1, min(vocab_blocks, triton.cdiv(2 * num_sms, max(num_tiles, 1))))


def _combine_lse(part_max, part_sum):
    """log-sum-exp from per-split (max, sum exp(z - max)): also returns the rescale of each split to the total."""
    total_max = part_max.max(dim=0).values
    rescale = torch.exp(part_max - total_max)
    total_sum = (part_sum * rescale).sum(dim=0)
    return total_max + torch.log(total_sum), rescale, total_sum


def _forward(hidden, weight, bias, layout: RowLayout, options: SFTMixLossOptions):
    """(SlotStats, per-slot lse, per-pair lse of z~)."""
    tiling = _tiling(hidden, weight, layout, options)
    num_slots, num_pairs, vocab_size = tiling["num_slots"], tiling["num_pairs"], tiling["vocab_size"]
    num_tiles = triton.cdiv(tiling["num_pair_slots"], tiling["BLOCK_M"])
    vocab_blocks = triton.cdiv(vocab_size, tiling["BLOCK_V"])
    splits = _num_v_splits(options, hidden, num_tiles, vocab_blocks)
    cols_per_split = triton.cdiv(vocab_blocks, splits) * tiling["BLOCK_V"]
    splits = triton.cdiv(vocab_size, cols_per_split)  # no empty split

    new = dict(dtype=torch.float32, device=hidden.device)
    part_max, part_sum, part_zsum, part_target = (torch.empty(splits, num_slots, **new) for _ in range(4))
    part_arg = torch.empty(splits, num_slots, dtype=torch.int32, device=hidden.device)
    mix_max, mix_sum, mix_target = (torch.empty(splits, num_pairs, **new) for _ in range(3))
    if num_tiles > 0:
        _sftmix_forward_kernel[(num_tiles, splits)](
            hidden, weight, bias if bias is not None else hidden, layout.rows, layout.ntp_targets,
            layout.mix_lambda.float(), layout.mix_targets, part_max, part_sum, part_zsum, part_target, part_arg,
            mix_max, mix_sum, mix_target, cols_per_split=cols_per_split, HAS_BIAS=bias is not None,
            num_warps=8, **tiling,
        )  # fmt: skip

    lse, rescale, total_sum = _combine_lse(part_max, part_sum)
    valid = layout.ntp_targets != options.ignore_index
    mix_lse, _, _ = _combine_lse(mix_max, mix_sum)
    # the argmax of the split holding the largest max (the first such split on ties)
    arg = part_arg.gather(0, part_max.argmax(dim=0, keepdim=True)).squeeze(0)
    stats = SlotStats(
        nll=torch.where(valid, lse - part_target.sum(dim=0), 0.0),
        correct=arg == layout.ntp_targets,
        # entropy = lse - sum_v softmax(z)_v z_v
        entropy=lse - (part_zsum * rescale).sum(dim=0) / total_sum,
        mix_nll=mix_lse - mix_target.sum(dim=0),
    )
    return stats, lse, mix_lse


def _gradients(hidden, weight, bias, layout, options, lse, mix_lse, ntp_scale, mix_scale, needs_grad):
    tiling = _tiling(hidden, weight, layout, options)
    need_hidden, need_weight, need_bias = needs_grad
    num_tiles = triton.cdiv(tiling["num_pair_slots"], tiling["BLOCK_M"])
    vocab_blocks = triton.cdiv(tiling["vocab_size"], tiling["BLOCK_V"])
    new = dict(dtype=torch.float32, device=hidden.device)
    # fp32 accumulators for the atomics; the dummy one-element buffers are never written
    grad_hidden = torch.zeros(hidden.shape, **new) if need_hidden else torch.empty(1, **new)
    grad_weight = torch.zeros(weight.shape, **new) if need_weight else torch.empty(1, **new)
    grad_bias = torch.zeros(weight.shape[0], **new) if need_bias else torch.empty(1, **new)
    if num_tiles > 0:
        _sftmix_backward_kernel[(num_tiles, vocab_blocks)](
            hidden, weight, bias if bias is not None else hidden, layout.rows, layout.ntp_targets,
            layout.mix_lambda.float(), layout.mix_targets, lse, mix_lse, mix_scale.float().contiguous(),
            ntp_scale.float().reshape(1), grad_hidden, grad_weight, grad_bias, HAS_BIAS=bias is not None,
            NEED_HIDDEN=need_hidden, NEED_WEIGHT=need_weight, NEED_BIAS=need_bias, num_warps=8, **tiling,
        )  # fmt: skip
    return (
        grad_hidden if need_hidden else None,
        grad_weight if need_weight else None,
        grad_bias if need_bias else None,
    )


def loss_and_grads(hidden, weight, bias, layout, options, ntp_scale, mix_scale, needs_grad):
    """(SlotStats, fp32 (dH, dW, db)): the forward kernel, then the gradient kernel when ``needs_grad`` has a flag."""
    if options.dft:
        raise NotImplementedError("dft=True is implemented by impl='torch' and impl='reference', not 'triton'.")
    stats, lse, mix_lse = _forward(hidden, weight, bias, layout, options)
    if not any(needs_grad):
        return stats, (None, None, None)
    return stats, _gradients(hidden, weight, bias, layout, options, lse, mix_lse, ntp_scale, mix_scale, needs_grad)
