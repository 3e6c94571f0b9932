"""Row-chunked SFTMix loss for CUDA: every matrix product on cuBLAS, one Triton element-wise pass per chunk.

The rows are visited in a few large chunks (`plan_chunks`, `layout.even_chunks`). A chunk holds whole mixed pairs (the p
rows of some pairs, then the q rows of the same pairs) and a share of the unpaired rows, in the slot layout of
`layout.RowLayout` restricted to the chunk, so the pair tiles of `triton_common.pair_tile` apply to it unchanged
and z~ = lam z_p + (1 - lam) z_q never needs another chunk. Per chunk of R rows:

    Z    = H_c W^T               cuBLAS, input dtype in, fp32 out (logits never rounded to bf16)     2 R D V FLOPs
    G   <- _rowchunk_kernel(Z)    Triton, one program per pair tile: pass 1 over the vocabulary, the online
                                  log-sum-exp and metrics of both rows and of z~; pass 2, the logit gradient in fp32
                                  (target corrections before any rounding), stored in the input dtype over Z's own
                                  bytes (row r of G lies inside row r of Z, behind the columns already read; one
                                  warp owns each row, see `gpu_config`)
    dH_c = G W                    cuBLAS, fp32 out                                                    2 R D V
    dW  += G^T H_c                cuBLAS, fp32 accumulation inside the product                         2 R D V
    db  += sum_rows G

so 6 N D V FLOPs, the floor, all at cuBLAS rate; the rest is memory-bound: Z written once in fp32 and read twice,
G written once and read by the two products. As in the other fused backends the gradients come out of the forward
(the loss is a scalar: backward scales them), and the mixup gradient rides on G of both rows of a pair.

dW across chunks (`plan_chunks`): an fp32 V x D accumulator when it fits in the memory budget beside a chunk of at
least MIN_GEMM_ROWS rows (its read-modify-write, 8 V D bytes per chunk, then hides under the chunk's 2 R D V FLOPs);
otherwise the product accumulates in the input-dtype dW itself (cuBLAS beta = 1: each chunk's sum is formed in fp32
and rounded once), over the fewest chunks the budget allows (3 at the Llama-3-8B and Qwen2.5-7B heads at the default
budget, so dW is rounded three times instead of once). fp32 inputs accumulate in the fp32 dW they return. The default budget is the batch's logits in the
input dtype, N V itemsize bytes (a tenth of the eager reference's 20 N V bytes at bf16), for everything the path
allocates beyond the inputs and the returned gradients: the fp32 dH, the chunk's logits and hidden rows, and the
fp32 dW accumulator when there is one.

Z's rows are padded to a multiple of ROW_ALIGN columns (V = 32,001 or 128,257 after `resize_token_embeddings`):
the kernel's loads and stores stay 16-byte vectors (its column masks end at the padded width, which the compiler
knows to be a multiple of 16; a bound of V would make every access scalar) and cuBLAS gets an aligned leading
dimension. The padding columns are never part of a product (the GEMM operands are the [:, :V] views).

bf16 only among the half types: an fp16 G, rounded after one scale for the whole batch, loses the softmax tails of
rows whose scale is far below the largest (every next-token row beside a short pair of large weight), and an fp16 dW
overflows for frequent tokens; fp16 inputs take impl="torch", which computes in fp32 (`chunked.py`).
"""

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .gemm import has_fp32_out_gemm, product_into
from .layout import Chunk, even_chunks
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

# the smallest chunk at which the fp32 dW accumulator's read-modify-write (8 V D bytes) hides under the chunk's
# 2 R D V FLOPs on an H100 (R >= 4 x 790 TFLOP/s / 3 TB/s ~ 1,050); smaller chunks accumulate in the input dtype
MIN_GEMM_ROWS = 1024
LOGIT_BYTES = 4  # Z is fp32
ROW_ALIGN = 16  # Z's row stride, in columns: 64-byte rows, 16-byte vectors for the kernel, aligned cuBLAS operands


@dataclass(frozen=True)
class ElementwiseConfig:
    """Launch configuration of the element-wise kernel: pair slots per side, vocabulary block, warps, stages."""

    block_m: int
    block_v: int
    num_warps: int
    num_stages: int

    def __str__(self) -> str:
        return f"m{self.block_m}-v{self.block_v}-w{self.num_warps}-s{self.num_stages}"


LANE_BYTES = 16  # the compiler gives each lane one 16-byte vector of G per row and step


def warp_columns(dtype: torch.dtype) -> int:
    """Columns of a row one warp spans in one step: 32 lanes x 16 bytes of G (256 bf16, 128 fp32)."""
    return 32 * LANE_BYTES // dtype.itemsize


def gpu_config(dtype: torch.dtype) -> ElementwiseConfig:
    """Memory-bound streaming over two rows' logits: 2 x 8 rows x one warp's columns per load, in 8 warps, the same
    on every architecture. One warp per row (TTGIR layout warpsPerCTA = [8, 1]): pass 2 stores a row's G over the
    bytes of the same row's Z, which then only the warp that stores them reads, in its own instructions' order (a
    warp's store waits for the loads whose values it stores). A block of twice the columns (m8-v512 for bf16) is laid
    out [4, 2]: the other warp of a row can store over columns this one has yet to load, with no barrier between, a
    data race; it also holds 200 registers instead of 128 (`python -m bench.kernel_compile`, sm_90a; a barrier
    between the loads and the stores of each step would keep the 200 and add a block-wide sync to every step).
    tests/bench/test_kernel_compile.py reads the compiled layouts."""
    return ElementwiseConfig(8, warp_columns(dtype), 8, 3)


@triton.jit
def _load_logits(logits_ptr, bias_ptr, slot, ok, cols, col_ok, stride_z, HAS_BIAS: tl.constexpr):
    """fp32 logits (BLOCK_M, BLOCK_V) of the chunk rows ``slot`` (+ bias); the padding columns (col_ok false) hold
    whatever Z's padding holds, and every use masks them."""
    # bounded by the padded row width (a multiple of 16, which the compiler knows): vector loads
    z = tl.load(
        logits_ptr + slot[:, None].to(tl.int64) * stride_z + cols[None, :],
        mask=ok[:, None] & (cols < stride_z)[None, :],
        other=0.0,
    )
    if HAS_BIAS:
        z += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return z


@triton.jit(do_not_specialize=[*VARYING_ARGS, "slot_start", "pair_start"])
def _rowchunk_kernel(
    logits_ptr,
    grad_ptr,
    bias_ptr,
    ntp_targets_ptr,
    ntp_row_scale_ptr,
    lam_ptr,
    mix_targets_ptr,
    mix_scale_ptr,
    lse_ptr,
    target_logit_ptr,
    entropy_ptr,
    argmax_ptr,
    mix_lse_ptr,
    mix_target_ptr,
    num_slots,
    num_pairs,
    num_pair_slots,
    rest_half,
    slot_start,
    pair_start,
    vocab_size,
    stride_z,
    stride_g,
    ignore_index,
    softcap,
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    DFT: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Statistics of the chunk's slots and pairs (at slot_start + slot, pair_start + k) and, with WRITE_GRAD, G."""
    pid = tl.program_id(0)
    ntp_targets_ptr += slot_start
    k, is_pair, slot_a, slot_b, ok_a, ok_b, target_a, target_b = pair_tile(
        pid, ntp_targets_ptr, num_slots, num_pairs, num_pair_slots, rest_half, ignore_index, BLOCK_M
    )
    tile_has_pair = pid * BLOCK_M < num_pairs
    lam = tl.load(lam_ptr + pair_start + k, mask=is_pair, other=1.0)
    target_p = tl.load(mix_targets_ptr + 2 * (pair_start + k), mask=is_pair, other=0)
    target_q = tl.load(mix_targets_ptr + 2 * (pair_start + k) + 1, mask=is_pair, other=0)

    # pass 1: online max / sum exp(z - max) / sum exp(z - max) z / target logit / argmax per row, lse of z~ per pair
    zeros = tl.zeros((BLOCK_M,), dtype=tl.float32)
    max_a, sum_a, zsum_a, tgt_a = zeros - float("inf"), zeros, zeros, zeros
    max_b, sum_b, zsum_b, tgt_b = zeros - float("inf"), zeros, zeros, zeros
    arg_a = tl.zeros((BLOCK_M,), dtype=tl.int32)
    arg_b = tl.zeros((BLOCK_M,), dtype=tl.int32)
    max_mix, sum_mix, tgt_mix = zeros - float("inf"), zeros, zeros
    for block_start in range(0, vocab_size, BLOCK_V):
        cols = block_start + tl.arange(0, BLOCK_V)
        col_ok = cols < vocab_size
        z_a = _load_logits(logits_ptr, bias_ptr, slot_a, ok_a, cols, col_ok, stride_z, HAS_BIAS)
        z_b = _load_logits(logits_ptr, bias_ptr, slot_b, ok_b, cols, col_ok, stride_z, HAS_BIAS)
        if tile_has_pair:
            max_mix, sum_mix, tgt_mix = mixed_block(
                z_a, z_b, lam, cols, col_ok, target_p, target_q, max_mix, sum_mix, tgt_mix, softcap, SOFTCAP
            )
        max_a, sum_a, zsum_a, tgt_a, arg_a = ntp_block(
            apply_softcap(z_a, softcap, SOFTCAP),
            cols,
            col_ok,
            target_a,
            max_a,
            sum_a,
            zsum_a,
            tgt_a,
            arg_a,
            vocab_size,
        )
        max_b, sum_b, zsum_b, tgt_b, arg_b = ntp_block(
            apply_softcap(z_b, softcap, SOFTCAP),
            cols,
            col_ok,
            target_b,
            max_b,
            sum_b,
            zsum_b,
            tgt_b,
            arg_b,
            vocab_size,
        )

    # lse = max + log sum exp(z - max); entropy = lse - sum softmax(z) z; masked rows get lse = +inf (G = 0)
    lse_a = tl.where(ok_a, max_a + tl.log(tl.where(ok_a, sum_a, 1.0)), float("inf"))
    lse_b = tl.where(ok_b, max_b + tl.log(tl.where(ok_b, sum_b, 1.0)), float("inf"))
    tl.store(lse_ptr + slot_start + slot_a, lse_a, mask=ok_a)
    tl.store(lse_ptr + slot_start + slot_b, lse_b, mask=ok_b)
    tl.store(target_logit_ptr + slot_start + slot_a, tgt_a, mask=ok_a)
    tl.store(target_logit_ptr + slot_start + slot_b, tgt_b, mask=ok_b)
    tl.store(entropy_ptr + slot_start + slot_a, lse_a - zsum_a / sum_a, mask=ok_a)
    tl.store(entropy_ptr + slot_start + slot_b, lse_b - zsum_b / sum_b, mask=ok_b)
    tl.store(argmax_ptr + slot_start + slot_a, arg_a, mask=ok_a)
    tl.store(argmax_ptr + slot_start + slot_b, arg_b, mask=ok_b)
    mix_lse = tl.where(is_pair, max_mix + tl.log(tl.where(is_pair, sum_mix, 1.0)), float("inf"))
    if tile_has_pair:
        tl.store(mix_lse_ptr + pair_start + k, mix_lse, mask=is_pair)
        tl.store(mix_target_ptr + pair_start + k, tgt_mix, mask=is_pair)

    if WRITE_GRAD:
        # dL/dNLL of each slot (0 without an NTP term); DFT: times the slot's own p = exp(-nll), held constant
        scale_a = tl.load(ntp_row_scale_ptr + slot_start + slot_a, mask=ok_a, other=0.0)
        scale_b = tl.load(ntp_row_scale_ptr + slot_start + slot_b, mask=ok_b, other=0.0)
        if DFT:
            scale_a = tl.where(scale_a != 0.0, scale_a * tl.exp(tgt_a - lse_a), 0.0)
            scale_b = tl.where(scale_b != 0.0, scale_b * tl.exp(tgt_b - lse_b), 0.0)
        mix_scale = tl.load(mix_scale_ptr + pair_start + k, mask=is_pair, other=0.0)
        no_weight = tl.zeros((BLOCK_M,), dtype=tl.float32)
        one_weight = no_weight + 1.0
        out_dtype = grad_ptr.dtype.element_ty
        # pass 2: G in fp32, rounded only at the store. G's row r lies inside Z's row r, at or before the columns of
        # this block (itemsize(G) <= 4): the warp that owns row r (one warp per row, `gpu_config`) has read
        # all it overwrites, and no other warp or program reads it.
        for block_start in range(0, vocab_size, BLOCK_V):
            cols = block_start + tl.arange(0, BLOCK_V)
            col_ok = cols < vocab_size
            z_a = _load_logits(logits_ptr, bias_ptr, slot_a, ok_a, cols, col_ok, stride_z, HAS_BIAS)
            z_b = _load_logits(logits_ptr, bias_ptr, slot_b, ok_b, cols, col_ok, stride_z, HAS_BIAS)
            grad_a = soft_ce_grad(z_a, lse_a, one_weight, target_a, no_weight, target_a, scale_a, cols, col_ok,
                                   softcap, SOFTCAP)  # fmt: skip
            grad_b = soft_ce_grad(z_b, lse_b, one_weight, target_b, no_weight, target_b, scale_b, cols, col_ok,
                                   softcap, SOFTCAP)  # fmt: skip
            if tile_has_pair:
                # mixup part rides on both rows: dz~/dz_p = lam, dz~/dz_q = 1 - lam
                z_mix = lam[:, None] * z_a + (1.0 - lam[:, None]) * z_b
                grad_mix = soft_ce_grad(z_mix, mix_lse, lam, target_p, 1.0 - lam, target_q, mix_scale, cols, col_ok,
                                       softcap, SOFTCAP)  # fmt: skip
                grad_a += lam[:, None] * grad_mix
                grad_b += (1.0 - lam[:, None]) * grad_mix
            out_a = grad_ptr + slot_a[:, None].to(tl.int64) * stride_g + cols[None, :]
            out_b = grad_ptr + slot_b[:, None].to(tl.int64) * stride_g + cols[None, :]
            # G is 0 on the padding columns; bounded by the padded width, as the loads: vector stores
            tl.store(out_a, grad_a.to(out_dtype), mask=ok_a[:, None] & (cols < stride_z)[None, :])
            tl.store(out_b, grad_b.to(out_dtype), mask=ok_b[:, None] & (cols < stride_z)[None, :])


@dataclass(frozen=True)
class ChunkPlan:
    """How many rows a chunk holds at most, how many chunks, and whether dW accumulates in an fp32 buffer."""

    rows: int
    num_chunks: int
    fp32_weight_grad: bool


def default_memory_budget(num_rows: int, vocab_size: int, dtype: torch.dtype) -> int:
    """The batch's logits in the input dtype, N V itemsize bytes (a tenth of eager's 20 N V at bf16)."""
    return num_rows * vocab_size * dtype.itemsize


def plan_chunks(num_slots, hidden_size, vocab_size, dtype, budget, need_weight) -> ChunkPlan:
    """Chunk rows from the memory budget, which holds the fp32 dH (4 N D bytes), a chunk's fp32 logits and hidden
    rows (4 V' + (itemsize + 4) D bytes a row, V' = V padded to ROW_ALIGN) and, for half inputs needing dW, an
    fp32 V x D dW accumulator when it leaves room for min(N, MIN_GEMM_ROWS) rows; else dW accumulates in the input
    dtype and the chunk gets the room. At least one pair (2 rows) per chunk, at most all rows."""
    row_bytes = LOGIT_BYTES * padded_row(vocab_size) + (dtype.itemsize + 4) * hidden_size
    room = budget - 4 * num_slots * hidden_size
    accumulator = LOGIT_BYTES * vocab_size * hidden_size if need_weight and dtype.itemsize < 4 else 0
    fp32_weight_grad = dtype.itemsize >= 4
    rows = room // row_bytes
    if accumulator and (room - accumulator) // row_bytes >= min(num_slots, MIN_GEMM_ROWS):
        fp32_weight_grad, rows = True, (room - accumulator) // row_bytes
    rows = int(min(max(rows, 2), max(num_slots, 1)))
    return ChunkPlan(rows, math.ceil(num_slots / rows) if num_slots else 0, fp32_weight_grad)


def _launch(kernel_args, config: ElementwiseConfig, num_pair_slots, device):
    if device.type != "meta" and num_pair_slots:
        grid = (triton.cdiv(num_pair_slots, config.block_m),)
        _rowchunk_kernel[grid](**kernel_args, BLOCK_M=config.block_m, BLOCK_V=config.block_v,
                               num_warps=config.num_warps, num_stages=config.num_stages)  # fmt: skip


def elementwise_config(options: SFTMixLossOptions, vocab_size: int, dtype: torch.dtype) -> ElementwiseConfig:
    """`gpu_config` for ``dtype`` inputs (G in their dtype); in the interpreter a block as wide as the vocabulary
    (up to the same width), each program-loop step costing milliseconds there. ``block_pairs`` / ``block_v``
    override; a ``block_v`` wider than one warp's columns is refused (a row would span several warps: the data race
    of `gpu_config`'s docstring)."""
    widest = warp_columns(dtype)
    if options.block_v is not None and options.block_v > widest:
        raise ValueError(
            f"impl='rowchunk' takes block_v <= {widest} for {dtype} inputs (got {options.block_v}): its pass 2 "
            "writes each row's gradient over the row's logits, which is safe only while one warp holds the row."
        )
    config = gpu_config(dtype)
    if INTERPRET:
        config = ElementwiseConfig(16, min(max(triton.next_power_of_2(vocab_size), 16), widest), 4, 1)
    return ElementwiseConfig(options.block_pairs or config.block_m, options.block_v or config.block_v,
                             config.num_warps, config.num_stages)  # fmt: skip


def padded_row(vocab_size: int) -> int:
    """Z's row stride in columns: V rounded up to ROW_ALIGN."""
    return triton.cdiv(vocab_size, ROW_ALIGN) * ROW_ALIGN


def loss_and_grads(hidden, weight, bias, params: LossParams):
    """(SlotStats, (dH, dW, db) / grad_scale, grad_scale), as `triton_sftmix.loss_and_grads`: dH and db in fp32,
    dW in fp32 (fp32 inputs, or the budget's fp32 accumulator) or in the input dtype. Three steps: `_plan` (chunks,
    per-position inputs), `_Workspace` (the buffers), `_run_chunks` (per chunk: GEMM, element-wise pass, GEMMs)."""
    _check_inputs(hidden)
    plan = _plan(hidden, weight, params)
    workspace = _Workspace.allocate(hidden, weight, params, plan)
    _run_chunks(hidden, weight, bias, params, plan, workspace)
    grads, out = (workspace.grad_hidden, workspace.grad_weight, workspace.grad_bias), workspace.out
    del workspace  # frees the chunk buffers

    layout, options, order = params.layout, params.options, plan.order
    lse, target_logit = _to_slots(out["lse_ptr"], order), _to_slots(out["target_logit_ptr"], order)
    valid = layout.ntp_targets != options.ignore_index
    nll = torch.where(valid, lse - target_logit, 0.0)
    if options.dft:
        # DFT: the next-token term weighted by the slot's own p = exp(-nll) (the kernel weighted G the same way)
        nll = nll * torch.exp(-nll)
    stats = SlotStats(
        nll=nll,
        correct=_to_slots(out["argmax_ptr"], order) == layout.ntp_targets,
        entropy=_to_slots(out["entropy_ptr"], order),
        mix_nll=out["mix_lse_ptr"] - out["mix_target_ptr"],
    )
    if not params.any_grad:
        return stats, (None, None, None), None
    return stats, grads, plan.grad_scale


def _check_inputs(hidden):
    """Refuse what rowchunk cannot run as designed: fp16 and other dtypes, a GPU whose torch lacks the fp32-output
    GEMM (rowchunk would have to upcast W)."""
    check_triton_dtype("rowchunk", hidden.dtype)
    device = hidden.device
    on_cpu_interpreter = INTERPRET and device.type == "cpu"
    if hidden.dtype != torch.float32 and not on_cpu_interpreter and not has_fp32_out_gemm(device.type, hidden.dtype):
        raise RuntimeError(
            f"impl='rowchunk' needs torch.mm / torch.addmm with out_dtype=torch.float32 for {hidden.dtype} operands "
            f"on {device.type}, which torch {torch.__version__} lacks there; use impl='auto' (which picks 'triton' "
            "then), impl='triton', or a newer torch."
        )


@dataclass(frozen=True)
class _Plan:
    """One call's chunks and what the kernel reads per position of the chunk order (`layout.even_chunks`): the
    row, the NTP target and dL/dNLL of each position, dL/dl_mix of each pair, both scales divided by
    ``grad_scale`` (None without gradients), and the element-wise launch configuration."""

    chunks: ChunkPlan
    order: torch.Tensor
    spans: list[Chunk]
    rows: torch.Tensor
    ntp_targets: torch.Tensor
    ntp_row_scale: torch.Tensor
    mix_scale: torch.Tensor
    grad_scale: torch.Tensor | None
    config: ElementwiseConfig

    @property
    def max_rows(self) -> int:
        return max((span.stop - span.start for span in self.spans), default=0)


def _plan(hidden, weight, params: LossParams) -> _Plan:
    layout, options = params.layout, params.options
    (vocab_size, hidden_size), num_slots = weight.shape, layout.rows.numel()
    budget = options.memory_budget or default_memory_budget(hidden.shape[0], vocab_size, hidden.dtype)
    chunk_plan = plan_chunks(num_slots, hidden_size, vocab_size, hidden.dtype, budget, params.needs_grad[1])
    order, spans = even_chunks(layout, chunk_plan.num_chunks)
    # the per-slot inputs in chunk order: every chunk a contiguous range
    ntp_targets = layout.ntp_targets[order]
    ntp_row_scale = torch.where(ntp_targets != options.ignore_index, params.ntp_scale.float(), 0.0)
    mix_scale, grad_scale = params.mix_scale, None
    if params.any_grad:
        grad_scale = params.grad_scale(torch.float32)
        ntp_row_scale = ntp_row_scale / grad_scale
        mix_scale = mix_scale.float() / grad_scale
    config = elementwise_config(options, vocab_size, hidden.dtype)
    return _Plan(chunk_plan, order, spans, layout.rows[order], ntp_targets, ntp_row_scale, mix_scale, grad_scale,
                 config)  # fmt: skip


@dataclass
class _Workspace:
    """The call's buffers: the kernel's per-position outputs, one chunk's logits (G written over them), hidden rows
    and dH (reused by every chunk), and the returned gradients."""

    out: dict
    logits_buffer: torch.Tensor
    hidden_buffer: torch.Tensor
    grad_hidden_buffer: torch.Tensor | None
    grad_hidden: torch.Tensor | None
    grad_weight: torch.Tensor | None
    grad_bias: torch.Tensor | None

    @classmethod
    def allocate(cls, hidden, weight, params: LossParams, plan: _Plan) -> "_Workspace":
        (vocab_size, hidden_size), num_slots, device = weight.shape, params.layout.rows.numel(), hidden.device
        need_hidden, need_weight, need_bias = params.needs_grad
        fp32 = dict(dtype=torch.float32, device=device)
        num_pairs, max_rows, row_stride = params.layout.num_pairs, plan.max_rows, padded_row(vocab_size)
        out = dict(
            lse_ptr=torch.empty(num_slots, **fp32),
            target_logit_ptr=torch.empty(num_slots, **fp32),
            entropy_ptr=torch.empty(num_slots, **fp32),
            argmax_ptr=torch.empty(num_slots, dtype=torch.int32, device=device),
            mix_lse_ptr=torch.empty(num_pairs, **fp32),
            mix_target_ptr=torch.empty(num_pairs, **fp32),
        )
        logits_buffer = torch.empty(max_rows * row_stride, **fp32)
        # the padding columns: never written by the GEMMs nor by G (G's row fills half of Z's), masked by every use;
        # zeroed once so that no stale bits (NaN, inf) reach even the masked-out lanes
        logits_buffer.view(max_rows, row_stride)[:, vocab_size:].zero_()
        # a chunk's hidden rows and its dH (fp32), reused; dH in row order (a row in two slots, a repeated
        # self-mixed row, gets both: one is 0)
        hidden_buffer = hidden.new_empty(max_rows * hidden_size)
        grad_hidden_buffer = torch.empty(max_rows * hidden_size, **fp32) if need_hidden else None
        grad_hidden = torch.zeros(hidden.shape, **fp32) if need_hidden else None
        weight_dtype = torch.float32 if plan.chunks.fp32_weight_grad else hidden.dtype
        # the first chunk's product overwrites dW; zeros only when there is no chunk
        new_weight_grad = torch.empty if plan.spans else torch.zeros
        grad_weight = new_weight_grad(weight.shape, dtype=weight_dtype, device=device) if need_weight else None
        grad_bias = torch.zeros(vocab_size, **fp32) if need_bias else None
        return cls(out, logits_buffer, hidden_buffer, grad_hidden_buffer, grad_hidden, grad_weight, grad_bias)


def _run_chunks(hidden, weight, bias, params: LossParams, plan: _Plan, workspace: _Workspace) -> None:
    """Per chunk: Z = H_c W^T (fp32), the element-wise kernel (statistics, G over Z's bytes), dH_c = G W,
    dW += G^T H_c, db += sum G."""
    options, device = params.options, hidden.device
    vocab_size, hidden_size = weight.shape
    need_hidden, need_weight, need_bias = params.needs_grad
    row_stride = padded_row(vocab_size)
    # G over Z's bytes, in the input dtype (fp32 under the interpreter, whose casts to bf16 truncate)
    grad_dtype = grad_dtype_for(device, hidden.dtype)
    per_logit = LOGIT_BYTES // grad_dtype.itemsize
    kernel_args = dict(
        bias_ptr=bias if bias is not None else plan.ntp_targets,
        ntp_targets_ptr=plan.ntp_targets,
        ntp_row_scale_ptr=plan.ntp_row_scale.contiguous(),
        lam_ptr=params.layout.mix_lambda.float().contiguous(),
        mix_targets_ptr=params.layout.mix_targets.contiguous(),
        mix_scale_ptr=plan.mix_scale.float().contiguous(),
        vocab_size=vocab_size,
        stride_z=row_stride,
        stride_g=row_stride * per_logit,
        ignore_index=options.ignore_index,
        softcap=float(options.logit_softcap or 1.0),
        HAS_BIAS=bias is not None,
        SOFTCAP=options.logit_softcap is not None,
        DFT=options.dft,
        WRITE_GRAD=params.any_grad,
        **workspace.out,
    )
    for index, span in enumerate(plan.spans):
        num_rows = span.stop - span.start
        # (R, V) with the padded row stride: the GEMM writes it, the kernel reads it and writes G in its rows
        logits = workspace.logits_buffer[: num_rows * row_stride].view(num_rows, row_stride)[:, :vocab_size]
        chunk_rows = plan.rows[span.start : span.stop]
        chunk_hidden = torch.index_select(
            hidden, 0, chunk_rows, out=workspace.hidden_buffer[: num_rows * hidden_size].view(num_rows, hidden_size)
        )
        # Z = H_c W^T, fp32
        product_into(logits, chunk_hidden, weight.T)
        rest_half = (num_rows - 2 * span.num_pairs + 1) // 2
        grad = logits.view(grad_dtype)[:, :vocab_size]
        kernel_args.update(
            logits_ptr=logits,
            grad_ptr=grad,
            num_slots=num_rows,
            num_pairs=span.num_pairs,
            num_pair_slots=span.num_pairs + rest_half,
            rest_half=rest_half,
            slot_start=span.start,
            pair_start=span.pair_start,
        )
        _launch(kernel_args, plan.config, span.num_pairs + rest_half, device)
        if need_hidden:
            # dH_c = G W, fp32, added into the chunk's rows
            buffer = workspace.grad_hidden_buffer[: num_rows * hidden_size].view(num_rows, hidden_size)
            workspace.grad_hidden.index_add_(0, chunk_rows, product_into(buffer, grad, weight))
        if need_weight:
            # dW += G^T H_c (the first chunk overwrites)
            product_into(workspace.grad_weight, grad.T, chunk_hidden, accumulate=index > 0)
        if need_bias:
            workspace.grad_bias += grad.sum(dim=0, dtype=torch.float32)


def _to_slots(values, order):
    """Per-position values (chunk order) back to slot order."""
    return torch.empty_like(values).index_copy_(0, order, values)
