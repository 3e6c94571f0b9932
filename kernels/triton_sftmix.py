"""Triton implementation of the SFTMix loss: the LM-head projection, the mixing and the (soft-target) cross-entropy
fused in Triton kernels; no N x V tensor exists in forward or backward.

Pair tiles (the crux). A program owns BLOCK_M *pair slots*. Pair slot k < P holds the two rows of mixed position k:
side a = its p row, side b = its q row (`layout.RowLayout` slots k and P + k). The remaining rows fill the later
pair slots two at a time (side a from the first half of the unpaired rows, side b from the second), without mixing.
The hidden states are gathered into slot order once per call, so a tile's rows are contiguous. Each program loads
the side-a and side-b hidden tiles and forms both logits tiles with `tl.dot` on the same W tile, so
z~ = lam z_a + (1 - lam) z_b is elementwise in registers: mixing costs no matrix product, and a program whose tile
holds no mixed pair skips the z~ work altogether (a runtime branch on the tile index).

Forward (`_sftmix_forward_kernel`): one program per (pair tile, vocabulary split), the splits of a tile adjacent. Each program runs over its vocabulary range
block by block with an online max / sum-exp, keeping per row: max, sum exp(z - max), sum exp(z - max) z (entropy),
the target logit and the first argmax; per mixed pair: max, sum-exp and lam z~[t_p] + (1 - lam) z~[t_q] of z~. The
few partials of the splits are combined in PyTorch (O(N) work). FLOPs: 2 N D V.

Gradient (launched right after the forward when an input needs one: the loss is a scalar, so the autograd
Function's backward only scales the result). The vocabulary is walked in chunks of C columns. For each chunk,
`_logit_grad_kernel` (one program per pair tile and vocabulary block of the chunk, in groups of tiles) recomputes the chunk's logits from the
forward's log-sum-exps, forms the logit gradient in fp32 registers,

    G_a = ntp_scale (softmax(z_a) - e_{t_a}) + lam g,   G_b = ntp_scale (softmax(z_b) - e_{t_b}) + (1 - lam) g,
    g = mix_scale (softmax(z~) - lam e_{t_p} - (1 - lam) e_{t_q})              (mixed pairs only)

(times the soft-cap derivative where one is set), and writes it once in the input dtype. Both scales are divided by
``grad_scale`` = max(ntp_scale, mix_scale) first, so |G| <= 2; the target corrections are made in fp32 before the
cast. bf16 keeps fp32's exponent range, so one scale for the whole batch loses nothing; fp16 does not (a row whose
scale is far below the largest loses its softmax tails below 6e-8, and dW overflows past 65,504 for frequent
tokens), so both Triton backends refuse fp16 (`check_triton_dtype`) and fp16 takes impl="torch", in fp32. Then two GEMMs (cuBLAS on CUDA, deterministic)

    dW[chunk] = G^T H   (written straight into the dW output, in the input dtype)
    dH       += G W[chunk]   (an fp32 N x D accumulator)

finish the chunk: 8 N D V FLOPs in all against the 6 N D V floor, no atomics, no V x D fp32 buffer. The returned
gradients are those of the loss divided by ``grad_scale``; the Function multiplies ``grad_scale`` back in with the
upstream gradient, in one rounding.

All exp / log / sum in fp32; `tl.dot` on bf16 tiles with fp32 accumulation; fp32 inputs use "tf32x3" (three
TF32 tensor-core products, close to fp32 accuracy). Integer arguments that change from call to call (row and pair
counts, chunk bounds) are not specialized, so new shapes reuse the compiled kernels. Under TRITON_INTERPRET=1 every
tile is upcast to fp32 right after its load (the interpreter keeps bf16 as raw bits).
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .gemm import add_product, product_into
from .layout import RowLayout
from .options import SFTMixLossOptions
from .outputs import SlotStats
from .params import LossParams
from .triton_common import (
    INTERPRET,
    VARYING_ARGS,
    apply_softcap,
    check_triton_dtype,
    grad_dtype_for,
    mixed_block,
    ntp_block,
    pair_tile,
    soft_ce_grad,
)

# the backward's logit-gradient chunk holds at most this many elements (N x C): 128 MiB in bf16
GRAD_CHUNK_ELEMENTS = 1 << 26
# pair tiles per group of the gradient kernel's program order (see `_program_cell`): at the Llama-3-8B head the 132
# programs resident on an H100 then touch 8 H panels (8 MiB) and ~17 W blocks (17 MiB), which fit in its 50 MB L2
GRAD_TILE_GROUP = 8


@dataclass(frozen=True)
class TileConfig:
    """Launch configuration of one kernel: pair slots per side, vocabulary and hidden blocks, warps, stages."""

    block_m: int
    block_v: int
    block_d: int
    num_warps: int
    num_stages: int

    def __str__(self) -> str:
        return f"m{self.block_m}-v{self.block_v}-d{self.block_d}-w{self.num_warps}-s{self.num_stages}"


# Chosen from `python -m bench.kernel_compile` with triton 3.9 and 3.6: no spills with either, shared memory within the
# architecture's per-block limit (at most 96 KiB: Ada's 99 KiB too). Keys: (architecture, input kind); sm_90 also
# serves newer GPUs, sm_80 every Ampere / Ada GPU.
TILE_CONFIGS = {
    ("sm_90", "half"): {
        "forward": TileConfig(64, 128, 64, 8, 3),
        "logit_grad": TileConfig(64, 128, 64, 8, 3),
    },
    ("sm_80", "half"): {
        "forward": TileConfig(64, 32, 64, 8, 3),
        "logit_grad": TileConfig(64, 64, 64, 8, 3),
    },
    ("sm_90", "fp32"): {
        "forward": TileConfig(32, 32, 16, 8, 3),
        "logit_grad": TileConfig(32, 64, 32, 8, 3),
    },
    ("sm_80", "fp32"): {
        "forward": TileConfig(32, 32, 16, 8, 3),
        "logit_grad": TileConfig(32, 64, 32, 8, 3),
    },
}
KERNEL_NAMES = ("forward", "logit_grad")


def tile_config(kernel: str, arch: str, dtype: torch.dtype) -> TileConfig:
    """The launch configuration of ``kernel`` ("forward" | "logit_grad") for ``arch`` ("sm_80" | "sm_90")."""
    return TILE_CONFIGS[(arch, "fp32" if dtype == torch.float32 else "half")][kernel]


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot` input precision: tensor cores at fp32-level accuracy for fp32 inputs, plain MMA for bf16 / fp16."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


def device_arch(device: torch.device) -> str:
    major, _ = torch.cuda.get_device_capability(device)
    return "sm_90" if major >= 9 else "sm_80"


@triton.jit
def _program_cell(num_tiles, num_columns, GROUP: tl.constexpr):
    """(pair tile, vocabulary column) of this program in a 1-D grid of num_tiles x num_columns programs: groups of
    GROUP tiles, the tile index fastest inside a group. The programs resident at once then share a few H panels and
    a few W blocks, which stay in L2 (tile-fastest over all tiles would re-read every H panel from HBM for each
    vocabulary block once they exceed L2)."""
    pid = tl.program_id(0)
    per_group = GROUP * num_columns
    first_tile = (pid // per_group) * GROUP
    group_size = tl.minimum(num_tiles - first_tile, GROUP)
    local = pid % per_group
    return first_tile + local % group_size, local // group_size


@triton.jit
def _pair_logits(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    slot_a,
    slot_b,
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
    h_a_ptrs = hidden_ptr + slot_a[:, None].to(tl.int64) * stride_h
    h_b_ptrs = hidden_ptr + slot_b[:, None].to(tl.int64) * stride_h
    w_ptrs = weight_ptr + cols[None, :].to(tl.int64) * stride_w
    for d_start in range(0, hidden_size, BLOCK_D):
        dims = d_start + tl.arange(0, BLOCK_D)
        dim_ok = dims < hidden_size
        h_a = tl.load(h_a_ptrs + dims[None, :], mask=ok_a[:, None] & dim_ok[None, :], other=0.0)
        h_b = tl.load(h_b_ptrs + dims[None, :], mask=ok_b[:, None] & dim_ok[None, :], other=0.0)
        # W^T tile (BLOCK_D, BLOCK_V), shared by both sides
        w_tile = tl.load(w_ptrs + dims[:, None], mask=col_ok[None, :] & dim_ok[:, None], other=0.0)
        if UPCAST:
            h_a, h_b, w_tile = h_a.to(tl.float32), h_b.to(tl.float32), w_tile.to(tl.float32)
        z_a = tl.dot(h_a, w_tile, z_a, input_precision=DOT_PRECISION)
        z_b = tl.dot(h_b, w_tile, z_b, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        z_a += bias[None, :]
        z_b += bias[None, :]
    return z_a, z_b


@triton.jit(do_not_specialize=[*VARYING_ARGS, "cols_per_split", "num_tiles", "num_splits"])
def _sftmix_forward_kernel(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
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
    num_tiles,
    num_splits,
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # GROUP = 1: the splits of a tile run side by side and share its H panel
    pid, split = _program_cell(num_tiles, num_splits, 1)
    k, is_pair, slot_a, slot_b, ok_a, ok_b, target_a, target_b = pair_tile(
        pid, ntp_targets_ptr, num_slots, num_pairs, num_pair_slots, rest_half, ignore_index, BLOCK_M
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
    max_mix, sum_mix, tgt_mix = zeros - float("inf"), zeros, zeros

    v_start = split * cols_per_split
    v_end = tl.minimum(v_start + cols_per_split, vocab_size)
    for block_start in range(v_start, v_end, BLOCK_V):
        cols = block_start + tl.arange(0, BLOCK_V)
        col_ok = cols < v_end
        z_a, z_b = _pair_logits(
            hidden_ptr, weight_ptr, bias_ptr, slot_a, slot_b, ok_a, ok_b, cols, col_ok, hidden_size, stride_h,
            stride_w, HAS_BIAS, UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_V, BLOCK_D,
        )  # fmt: skip
        if tile_has_pair:
            max_mix, sum_mix, tgt_mix = mixed_block(
                z_a, z_b, lam, cols, col_ok, target_p, target_q, max_mix, sum_mix, tgt_mix, softcap, SOFTCAP
            )
        z_a = apply_softcap(z_a, softcap, SOFTCAP)
        z_b = apply_softcap(z_b, softcap, SOFTCAP)
        max_a, sum_a, zsum_a, tgt_a, arg_a = ntp_block(
            z_a, cols, col_ok, target_a, max_a, sum_a, zsum_a, tgt_a, arg_a, vocab_size
        )
        max_b, sum_b, zsum_b, tgt_b, arg_b = ntp_block(
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
        tl.store(mix_max_ptr + mix_base + k, max_mix, mask=is_pair)
        tl.store(mix_sum_ptr + mix_base + k, sum_mix, mask=is_pair)
        tl.store(mix_target_ptr + mix_base + k, tgt_mix, mask=is_pair)


@triton.jit(do_not_specialize=[*VARYING_ARGS, "chunk_start", "chunk_end", "num_tiles", "num_column_blocks"])
def _logit_grad_kernel(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    ntp_targets_ptr,
    lam_ptr,
    mix_targets_ptr,
    lse_ptr,
    mix_lse_ptr,
    mix_scale_ptr,
    ntp_row_scale_ptr,
    grad_logits_ptr,
    num_slots,
    num_pairs,
    num_pair_slots,
    rest_half,
    hidden_size,
    chunk_start,
    chunk_end,
    stride_h,
    stride_w,
    stride_g,
    ignore_index,
    softcap,
    num_tiles,
    num_column_blocks,
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GRAD_GROUP: tl.constexpr,
):
    """G[slot, v - chunk_start] for the columns v in [chunk_start, chunk_end), in grad_logits' dtype."""
    pid, column_block = _program_cell(num_tiles, num_column_blocks, GRAD_GROUP)
    chunk_cols = column_block * BLOCK_V + tl.arange(0, BLOCK_V)
    cols = chunk_start + chunk_cols
    col_ok = cols < chunk_end
    k, is_pair, slot_a, slot_b, ok_a, ok_b, target_a, target_b = pair_tile(
        pid, ntp_targets_ptr, num_slots, num_pairs, num_pair_slots, rest_half, ignore_index, BLOCK_M
    )
    z_a, z_b = _pair_logits(
        hidden_ptr, weight_ptr, bias_ptr, slot_a, slot_b, ok_a, ok_b, cols, col_ok, hidden_size, stride_h, stride_w,
        HAS_BIAS, UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_V, BLOCK_D,
    )  # fmt: skip

    # NTP part: each slot's scale times (softmax(z) - e_t); the scale is 0 on slots without an NTP term
    lse_a = tl.load(lse_ptr + slot_a, mask=ok_a, other=float("inf"))
    lse_b = tl.load(lse_ptr + slot_b, mask=ok_b, other=float("inf"))
    scale_a = tl.load(ntp_row_scale_ptr + slot_a, mask=ok_a, other=0.0)
    scale_b = tl.load(ntp_row_scale_ptr + slot_b, mask=ok_b, other=0.0)
    no_weight = tl.zeros((BLOCK_M,), dtype=tl.float32)
    one_weight = no_weight + 1.0
    grad_a = soft_ce_grad(z_a, lse_a, one_weight, target_a, no_weight, target_a, scale_a, cols, col_ok, softcap,
                           SOFTCAP)  # fmt: skip
    grad_b = soft_ce_grad(z_b, lse_b, one_weight, target_b, no_weight, target_b, scale_b, cols, col_ok, softcap,
                           SOFTCAP)  # fmt: skip
    if pid * BLOCK_M < num_pairs:
        # mixup part rides on both rows: dz~/dz_p = lam, dz~/dz_q = 1 - lam
        lam = tl.load(lam_ptr + k, mask=is_pair, other=1.0)
        target_p = tl.load(mix_targets_ptr + 2 * k, mask=is_pair, other=0)
        target_q = tl.load(mix_targets_ptr + 2 * k + 1, mask=is_pair, other=0)
        mix_lse = tl.load(mix_lse_ptr + k, mask=is_pair, other=float("inf"))
        mix_scale = tl.load(mix_scale_ptr + k, mask=is_pair, other=0.0)
        z_mix = lam[:, None] * z_a + (1.0 - lam[:, None]) * z_b
        grad_mix = soft_ce_grad(z_mix, mix_lse, lam, target_p, 1.0 - lam, target_q, mix_scale, cols, col_ok, softcap,
                               SOFTCAP)  # fmt: skip
        grad_a += lam[:, None] * grad_mix
        grad_b += (1.0 - lam[:, None]) * grad_mix

    # G rounded to the output dtype only now, after the fp32 corrections
    out_dtype = grad_logits_ptr.dtype.element_ty
    out_a = grad_logits_ptr + slot_a[:, None].to(tl.int64) * stride_g + chunk_cols[None, :]
    out_b = grad_logits_ptr + slot_b[:, None].to(tl.int64) * stride_g + chunk_cols[None, :]
    tl.store(out_a, grad_a.to(out_dtype), mask=ok_a[:, None] & col_ok[None, :])
    tl.store(out_b, grad_b.to(out_dtype), mask=ok_b[:, None] & col_ok[None, :])


def _config(kernel: str, hidden: torch.Tensor, options: SFTMixLossOptions, num_pair_slots: int, weight) -> TileConfig:
    """The launch configuration: the options' blocks over the architecture's `TILE_CONFIGS` entry; off CUDA (the
    interpreter, the meta device), large blocks (each program-loop step costs milliseconds in the interpreter)."""
    if INTERPRET or hidden.device.type != "cuda":
        vocab_size, hidden_size = weight.shape
        config = TileConfig(
            block_m=min(max(triton.next_power_of_2(max(num_pair_slots, 1)), 16), 64),
            block_v=min(max(triton.next_power_of_2(vocab_size), 16), 256),
            block_d=min(max(triton.next_power_of_2(hidden_size), 16), 128),
            num_warps=8,
            num_stages=1,
        )
    else:
        config = tile_config(kernel, device_arch(hidden.device), hidden.dtype)
    return TileConfig(
        block_m=options.block_pairs or config.block_m,
        block_v=options.block_v or config.block_v,
        block_d=options.block_d or config.block_d,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )


def _common_args(hidden_slots, weight, bias, layout: RowLayout, options: SFTMixLossOptions):
    """Launch arguments both kernels take: the inputs, the row layout and the pair-tile bounds."""
    check_triton_dtype("triton", hidden_slots.dtype)
    num_slots, num_pairs = layout.rows.numel(), layout.num_pairs
    rest_half = (num_slots - 2 * num_pairs + 1) // 2
    return dict(
        hidden_ptr=hidden_slots,
        weight_ptr=weight,
        bias_ptr=bias if bias is not None else weight,
        ntp_targets_ptr=layout.ntp_targets,
        lam_ptr=layout.mix_lambda.float(),
        mix_targets_ptr=layout.mix_targets,
        num_slots=num_slots,
        num_pairs=num_pairs,
        num_pair_slots=num_pairs + rest_half,
        rest_half=rest_half,
        hidden_size=hidden_slots.shape[1],
        stride_h=hidden_slots.stride(0),
        stride_w=weight.stride(0),
        ignore_index=options.ignore_index,
        softcap=float(options.logit_softcap or 1.0),
        SOFTCAP=options.logit_softcap is not None,
        UPCAST=INTERPRET,
        DOT_PRECISION=dot_precision(hidden_slots.dtype),
        HAS_BIAS=bias is not None,
    )


@dataclass
class KernelLaunch:
    """One kernel launch: the kernel, its grid and its arguments (tile sizes and warps included)."""

    kernel: triton.runtime.JITFunction
    grid: tuple[int, ...]
    config: TileConfig
    args: dict

    def kwargs(self) -> dict:
        """The launch's keyword arguments, as Triton's launcher binds them."""
        return dict(
            **self.args,
            BLOCK_M=self.config.block_m,
            BLOCK_V=self.config.block_v,
            BLOCK_D=self.config.block_d,
            num_warps=self.config.num_warps,
            num_stages=self.config.num_stages,
        )

    def __call__(self) -> None:
        """Launch; nothing on the meta device (allocation accounting) or with an empty grid."""
        if all(self.grid) and self.args["hidden_ptr"].device.type != "meta":
            self.kernel[self.grid](**self.kwargs())


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


def forward_launch(hidden_slots, weight, bias, layout: RowLayout, options: SFTMixLossOptions):
    """(KernelLaunch of the forward kernel, its output buffers): per-split partials of every slot and pair."""
    args = _common_args(hidden_slots, weight, bias, layout, options)
    config = _config("forward", hidden_slots, options, args["num_pair_slots"], weight)
    num_slots, num_pairs, vocab_size = args["num_slots"], args["num_pairs"], weight.shape[0]
    num_tiles = triton.cdiv(args["num_pair_slots"], config.block_m)
    vocab_blocks = triton.cdiv(vocab_size, config.block_v)
    splits = _num_v_splits(options, hidden_slots, num_tiles, vocab_blocks)
    cols_per_split = triton.cdiv(vocab_blocks, splits) * config.block_v
    splits = triton.cdiv(vocab_size, cols_per_split)  # no empty split

    fp32 = dict(dtype=torch.float32, device=hidden_slots.device)
    buffers = dict(
        part_max_ptr=torch.empty(splits, num_slots, **fp32),
        part_sum_ptr=torch.empty(splits, num_slots, **fp32),
        part_zsum_ptr=torch.empty(splits, num_slots, **fp32),
        part_target_ptr=torch.empty(splits, num_slots, **fp32),
        part_arg_ptr=torch.empty(splits, num_slots, dtype=torch.int32, device=hidden_slots.device),
        mix_max_ptr=torch.empty(splits, num_pairs, **fp32),
        mix_sum_ptr=torch.empty(splits, num_pairs, **fp32),
        mix_target_ptr=torch.empty(splits, num_pairs, **fp32),
    )
    args.update(
        vocab_size=vocab_size, cols_per_split=cols_per_split, num_tiles=num_tiles, num_splits=splits, **buffers
    )
    return KernelLaunch(_sftmix_forward_kernel, (num_tiles * splits,), config, args), buffers


def _forward(hidden_slots, weight, bias, layout: RowLayout, options: SFTMixLossOptions):
    """(SlotStats, per-slot lse, per-pair lse of z~)."""
    launch, out = forward_launch(hidden_slots, weight, bias, layout, options)
    launch()
    part_max, part_sum, part_zsum, part_target, part_arg = (
        out[f"part_{name}_ptr"] for name in ("max", "sum", "zsum", "target", "arg")
    )
    lse, rescale, total_sum = _combine_lse(part_max, part_sum)
    valid = layout.ntp_targets != options.ignore_index
    mix_lse, _, _ = _combine_lse(out["mix_max_ptr"], out["mix_sum_ptr"])
    # the argmax of the split holding the largest max (the first such split on ties)
    arg = part_arg.gather(0, part_max.argmax(dim=0, keepdim=True)).squeeze(0)
    stats = SlotStats(
        nll=torch.where(valid, lse - part_target.sum(dim=0), 0.0),
        correct=arg == layout.ntp_targets,
        # entropy = lse - sum_v softmax(z)_v z_v
        entropy=lse - (part_zsum * rescale).sum(dim=0) / total_sum,
        mix_nll=mix_lse - out["mix_target_ptr"].sum(dim=0),
    )
    return stats, lse, mix_lse


def grad_chunk_columns(num_slots: int, vocab_size: int, block_v: int, chunk: int | None = None) -> int:
    """Vocabulary columns per backward chunk: ``chunk`` or the most whose G (num_slots x C) fits in
    GRAD_CHUNK_ELEMENTS; a multiple of ``block_v``, at least one block, at most the vocabulary (rounded up)."""
    if chunk is None:
        chunk = GRAD_CHUNK_ELEMENTS // max(num_slots, 1)
    whole_vocab = triton.cdiv(vocab_size, block_v) * block_v
    return min(max(chunk // block_v, 1) * block_v, whole_vocab)


@dataclass
class LogitGradInputs:
    """What the gradient kernel reads beyond the inputs and the layout, all fp32: per slot the log-sum-exp and
    dL/dNLL, per pair the log-sum-exp of z~ and dL/dl_mix, both scales divided by the call's ``grad_scale``."""

    lse: torch.Tensor
    mix_lse: torch.Tensor
    ntp_row_scale: torch.Tensor
    mix_scale: torch.Tensor


def logit_grad_launch(hidden_slots, weight, bias, layout, options, inputs: LogitGradInputs, grad_logits, chunk_start):
    """KernelLaunch of the logit-gradient kernel for the columns [chunk_start, chunk_start + grad_logits.shape[1])."""
    args = _common_args(hidden_slots, weight, bias, layout, options)
    config = _config("logit_grad", hidden_slots, options, args["num_pair_slots"], weight)
    chunk_end = chunk_start + grad_logits.shape[1]
    num_tiles = triton.cdiv(args["num_pair_slots"], config.block_m)
    num_column_blocks = triton.cdiv(grad_logits.shape[1], config.block_v)
    args.update(
        lse_ptr=inputs.lse,
        mix_lse_ptr=inputs.mix_lse,
        mix_scale_ptr=inputs.mix_scale,
        ntp_row_scale_ptr=inputs.ntp_row_scale,
        grad_logits_ptr=grad_logits,
        chunk_start=chunk_start,
        chunk_end=chunk_end,
        stride_g=grad_logits.stride(0),
        num_tiles=num_tiles,
        num_column_blocks=num_column_blocks,
        GRAD_GROUP=GRAD_TILE_GROUP,
    )
    return KernelLaunch(_logit_grad_kernel, (num_tiles * num_column_blocks,), config, args)


def _gradients(hidden_slots, weight, bias, params: LossParams, inputs: LogitGradInputs, num_rows: int):
    """(dH, dW, db) / grad_scale: dH (rows in input order) and db in fp32, dW in the input dtype."""
    layout, options = params.layout, params.options
    need_hidden, need_weight, need_bias = params.needs_grad
    (vocab_size, hidden_size), num_slots = weight.shape, hidden_slots.shape[0]
    device, fp32 = hidden_slots.device, dict(dtype=torch.float32, device=hidden_slots.device)
    block_v = _config("logit_grad", hidden_slots, options, num_slots, weight).block_v
    chunk = grad_chunk_columns(num_slots, vocab_size, block_v, options.vocab_chunk)
    # G in the input dtype; fp32 under the interpreter, whose casts to bf16 truncate instead of rounding
    grad_dtype = grad_dtype_for(device, hidden_slots.dtype)
    grad_logits_buffer = torch.empty(num_slots * chunk, dtype=grad_dtype, device=device)
    grad_hidden_slots = torch.zeros(num_slots, hidden_size, **fp32) if need_hidden else None
    grad_weight = torch.empty_like(weight) if need_weight else None
    grad_bias = torch.empty(vocab_size, **fp32) if need_bias else None
    for chunk_start in range(0, vocab_size, chunk):
        chunk_end = min(chunk_start + chunk, vocab_size)
        width = chunk_end - chunk_start
        # a contiguous (S, width) view of the buffer, also for a narrower last chunk: plain GEMM operands
        grad_logits = grad_logits_buffer[: num_slots * width].view(num_slots, width)
        logit_grad_launch(hidden_slots, weight, bias, layout, options, inputs, grad_logits, chunk_start)()
        if need_weight:
            # dW[chunk] = G^T H
            product_into(grad_weight[chunk_start:chunk_end], grad_logits.T, hidden_slots)
        if need_hidden:
            # dH += G W[chunk]
            grad_hidden_slots = add_product(grad_hidden_slots, grad_logits, weight[chunk_start:chunk_end])
        if need_bias:
            # db[chunk] = sum_n G
            torch.sum(grad_logits, dim=0, dtype=torch.float32, out=grad_bias[chunk_start:chunk_end])
    del grad_logits_buffer
    grad_hidden = None
    if need_hidden:
        # back from slot order to row order; a row in two slots (a repeated self-mixed row) gets both (one is 0)
        grad_hidden = torch.zeros(num_rows, hidden_size, **fp32).index_add_(0, layout.rows, grad_hidden_slots)
    return grad_hidden, grad_weight, grad_bias


def loss_and_grads(hidden, weight, bias, params: LossParams):
    """(SlotStats, (dH, dW, db) / grad_scale, grad_scale): the forward kernel, then, when ``params.needs_grad`` has
    a flag, the chunked backward (gradients None unless flagged; grad_scale None without gradients)."""
    layout, options, mix_scale = params.layout, params.options, params.mix_scale
    # the hidden states in slot order, so that every tile reads contiguous rows
    hidden_slots = hidden.index_select(0, layout.rows)
    stats, lse, mix_lse = _forward(hidden_slots, weight, bias, layout, options)
    # dL/dNLL of each slot: 1 / normalizer where the slot has an NTP term
    ntp_row_scale = torch.where(layout.ntp_targets != options.ignore_index, params.ntp_scale.float(), 0.0)
    if options.dft:
        # DFT: each next-token term times the slot's own target probability p = exp(-nll), held constant: the loss
        # is p nll and the logit gradient p (softmax(z) - e_t) / normalizer (nll = 0 off the NTP slots)
        dft_weight = torch.exp(-stats.nll)
        stats.nll = stats.nll * dft_weight
        ntp_row_scale = ntp_row_scale * dft_weight
    if not params.any_grad:
        return stats, (None, None, None), None
    grad_scale = params.grad_scale(torch.float32)
    inputs = LogitGradInputs(
        lse=lse,
        mix_lse=mix_lse,
        ntp_row_scale=(ntp_row_scale / grad_scale).contiguous(),
        mix_scale=(mix_scale.float() / grad_scale).contiguous(),
    )
    grads = _gradients(hidden_slots, weight, bias, params, inputs, hidden.shape[0])
    return stats, grads, grad_scale
