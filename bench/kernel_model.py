"""Analytic cost model of the fused SFTMix loss on an H100 and an H200: a MODEL ESTIMATE, not a measurement.

    python -m bench.kernel_model                          # every benchmark head, N = 1k..16k, H100 and H200
    python -m bench.kernel_model --heads llama-3-8b --tokens 8192 --breakdown
    python -m bench.kernel_model --json                   # the rows as one JSON list
    python -m bench.kernel_model --csv model.csv          # the rows as CSV

It prices one training step of the loss (forward + backward, bf16 inputs, no bias) for each implementation
(`COSTS`): `rowchunk` (`rowchunk_cost`: what impl="auto" runs for bf16 CUDA inputs, `AUTO_IMPL`), `triton`
(`triton_cost`), `torch` (`torch_cost`), `eager` (`eager_cost`), and `filter@density` rows (`filter_cost`, gradient
filtering priced on the triton backend, not shipped). The chunk sizes are the kernels' own planners, imported:
`triton_rowchunk.plan_chunks`, `triton_sftmix.grad_chunk_columns`, `chunked.chunk_rows_for` / `chunk_columns_for`.
`rowchunk` and `torch`: their cost functions' docstrings.

`triton`: the fused Triton backend. Rows sit in slots (`kernels/layout.py`); a pair tile holds BLOCK_M pair slots,
    side a and side b, so 2 * BLOCK_M rows whose logits are computed once per pass.
    1. forward: one fused Triton kernel, grid (pair tiles, S vocabulary splits); each program walks its vocabulary
       range in BLOCK_V blocks and D in BLOCK_D slices, two `tl.dot`s (sides a and b) sharing the W tile, an online
       log-sum-exp, z~ = lam z_a + (1 - lam) z_b in registers. 2 N D V FLOPs; no logits tensor; O(S N) partials.
    2. H gathered into slot order (the GEMMs below need G and H rows in the same order).
    3. per vocabulary chunk of C columns (`triton_sftmix.grad_chunk_columns`: the largest multiple of BLOCK_V with
       N C <= 2**26, at least BLOCK_V, at most V): a Triton kernel recomputes the chunk's logits (2 N D C FLOPs)
       and writes the logit gradient G (N x C) once in bf16; cuBLAS `dW[chunk] = G^T H` (2 N D C, straight into
       the bf16 dW output) and `G W[chunk]` (2 N D C, a bf16 N x D result) added into an fp32 N x D accumulator.
       No atomics.
    4. dH scattered back to row order and cast to bf16; the autograd Function's backward scales both gradients
       into new tensors (kernels/function.py's `_scale`).
    FLOPs 8 N D V against the 6 N D V floor of any implementation (logits once, dH once, dW once).
`eager`: `kernels/reference.py` under autograd: the N x V logits in bf16 then fp32, a third product for the P mixed
    rows (z~ = W h_mix), log-sum-exp, gathers, the no-grad softmax for the entropy, and autograd's backward of all
    of it. FLOPs 6 (N + P) D V. Its peak extra memory, read off the allocations of that code (and checked against
    them by tests/bench/test_kernel_model.py): forward keeps the fp32 logits (4 N V bytes; 8 with a soft cap, which
    also keeps tanh's output); backward's peak is the log-sum-exp backward of the N rows, where the saved logits,
    the gather's gradient, z - lse, its exp and the product are alive at once: 20 N V bytes (24 with a soft cap).

Assumptions (each printed with the table):
- Rates: dense bf16 tensor-core peak 989 TFLOP/s on both chips (the H200 has the H100's SMs and clocks); HBM
  3.35 TB/s (H100 SXM) and 4.8 TB/s (H200; a device copy measured 4.3 TB/s on the lent H200s); L2 50 MB and 60 MB;
  132 SMs at 1.98 GHz; per SM and clock 16 exp (MUFU) and 128 fp32 ALU operations.
- The 6 N D V floor is priced at 989 TFLOP/s on the H100 and at 790 TFLOP/s on the H200 (the bf16 rate measured by
  cuBLAS on 8192^3 random data on the lent H200s), as issue #11 states its bars.
- cuBLAS GEMMs run at 80% of peak (790 / 989: the measured rate); their DRAM traffic is each operand read once and
  the output written once (cuBLAS tiles re-read from L2).
- The fused Triton kernels' matrix products run at 60% of peak: each program's output tile is 2 BLOCK_M x BLOCK_V =
  128 x 128 with BLOCK_D = 64 slices (64 FLOP per byte loaded, which at peak needs ~15 TB/s from L2), its loads are
  pointer gathers (row indices) rather than TMA, with no warp specialization or multicast; Triton GEMMs of that
  shape reach about 60-70% of peak on Hopper. Their element-wise epilogue (per logit: 1 exp and ~10 fp32 ALU
  operations forward, ~8 in the gradient kernel; z~ of a mixed pair: 1 exp and ~8 more; the soft cap: 1 exp and ~4
  more) is serialized with the products in the same warps (no overlap assumed).
- One Triton program per SM (two 64 x 128 fp32 accumulators in 8 warps); program ids run tile-fastest (Triton's
  order), so the resident programs hold min(tiles, 132) distinct H panels (2 BLOCK_M x D) and a few W blocks. The
  fraction of the H-panel re-reads (one per vocabulary block) that L2 serves is min(1, L2 / working set) (random
  replacement); the rest come from DRAM. W blocks are shared by the resident tiles (read once per tile wave).
  `--no-l2-reuse` prices the bound where no re-read hits L2.
- The gradient kernel of a chunk has the forward's grid structure (tiles x splits over the chunk's columns).
- Element-wise PyTorch kernels and every DRAM term run at 90% of the HBM bandwidth; each kernel launch adds 2 us.
- Each phase (kernel) costs max(compute, memory); phases run one after another on one stream.
- Extra memory is what an implementation allocates beyond its inputs and the gradients every implementation returns
  (dH, dW in bf16), at its peak.
- Shapes: P = N / 4 mixed pairs (half the rows mixed, as bench/kernel.py), N a multiple of 2 BLOCK_M.

Flags (`--help`): `--heads`, `--tokens`, `--densities` (the filter rows' live-tile shares) choose the rows; `--json`,
`--csv`, `--breakdown` (a per-phase table of each cost) the output. The knobs price alternatives to the shipped
kernels: `--triton-efficiency` / `--gemm-efficiency` (fractions of peak); `--no-l2-reuse` (every H-panel re-read
from DRAM); `--tile-fastest` (Triton's plain program order, tile index fastest over all tiles, instead of the
kernels' groups of tiles, `_program_cell`: the resident programs then hold up to 132 distinct H panels instead of a
few); `--bf16-accumulate` (dH via a bf16 G W result added in fp32, as torch without `addmm(out_dtype=)` would,
instead of one GEMM with fp32 output). The printed lines give, at N = 8192, auto's pick (rowchunk) at each head
against issue #21's bar, and the triton backend at the Llama-3-8B head against issue #11's 2.2x with the lowest
fused-kernel efficiency at which it stays within it.
"""

import argparse
import csv
import dataclasses
import json
import math
import sys
from dataclasses import dataclass

import torch

from sftmix_trl.kernels.chunked import DEVICE_CHUNK_BYTES, chunk_columns_for, chunk_rows_for
from sftmix_trl.kernels.triton_rowchunk import default_memory_budget, plan_chunks
from sftmix_trl.kernels.triton_sftmix import grad_chunk_columns

# the benchmark's heads (bench/kernel.py): (hidden size D, vocabulary V, logit soft cap)
HEADS = {
    "smollm2-135m": (576, 49152, None),
    "llama-3-8b": (4096, 128256, None),
    "qwen2.5-7b": (3584, 152064, None),
    "gemma-2-2b": (2304, 256000, 30.0),
}
TOKENS = (1024, 2048, 4096, 8192, 16384)
BAR = 2.2  # issue #11: the Llama-3-8B head at N = 8192 within 2.2x of the 6 N D V floor
CCE_BAR = 1.5  # issue #21: auto's pick (rowchunk) within 1.5x of the floor at <= 0.1x eager's extra memory
DENSITIES = (0.05, 0.25, 0.5)  # live-tile shares the filtering row is priced at (bench/grad_density.py measures)
BF16 = 2  # bytes per element of the inputs
FP32 = 4
GB = 1e9
TERA = 1e12
# what impl="auto" runs for bf16 CUDA inputs where torch has the fp32-output GEMM (kernels/functional.py's
# `resolve_impl`; tests/bench/test_kernel_model.py checks the two agree)
AUTO_IMPL = "rowchunk"


@dataclass(frozen=True)
class Device:
    name: str
    peak_flops: float  # dense bf16 tensor-core FLOP/s
    floor_flops: float  # the rate the 6 N D V floor is priced at
    bandwidth: float  # HBM bytes/s
    l2_bytes: float
    memory_bytes: float
    fp32_flops: float = 67 * TERA  # fp32 without tensor cores (torch's default: no TF32 in matmuls)
    sms: int = 132
    clock_hz: float = 1.98e9
    exp_per_sm_clock: int = 16
    alu_per_sm_clock: int = 128

    @property
    def exp_rate(self):
        return self.sms * self.clock_hz * self.exp_per_sm_clock

    @property
    def alu_rate(self):
        return self.sms * self.clock_hz * self.alu_per_sm_clock


DEVICES = {
    "H100": Device("H100 SXM", 989 * TERA, 989 * TERA, 3.35 * TERA, 50e6, 80e9),
    "H200": Device("H200 SXM", 989 * TERA, 790 * TERA, 4.8 * TERA, 60e6, 141e9),
}


@dataclass(frozen=True)
class Assumptions:
    """The model's knobs; the defaults are the ones the module docstring states."""

    block_m: int = 64  # pair slots per side of a pair tile
    block_v: int = 128
    block_d: int = 64
    programs_per_sm: int = 1
    gemm_efficiency: float = 0.80  # cuBLAS, fraction of peak
    triton_mma_efficiency: float = 0.60  # the fused kernels' tl.dot, fraction of peak
    memory_efficiency: float = 0.90  # fraction of HBM bandwidth every DRAM term reaches
    launch_s: float = 2e-6
    # element-wise epilogue per logit (ALU operations; each also costs one exp)
    forward_ops: int = 10
    gradient_ops: int = 8
    mixed_ops: int = 8  # per z~ element of a mixed pair, in either kernel
    softcap_ops: int = 4  # per capped element (plus one exp)
    l2_reuse: bool = True
    # program order (kernels/triton_sftmix.py's `_program_cell`): tiles per group, the tile index fastest inside a
    # group; None = all tiles in one group (Triton's plain tile-fastest order)
    forward_group: int | None = 1  # the splits of a tile side by side
    gradient_group: int | None = 8  # GRAD_TILE_GROUP
    fused_accumulate: bool = True  # dH + G W[chunk] by one GEMM with fp32 output (addmm out_dtype, CUDA)
    mix_fraction: float = 0.5  # fraction of the rows in mixed pairs: P = mix_fraction N / 2


@dataclass
class Phase:
    """One kernel (or a group of like kernels): its work and its roofline time."""

    name: str
    flops: float  # matrix-product FLOPs executed (padding included)
    dram_bytes: float
    compute_s: float  # matrix products at their efficiency plus the serialized epilogue
    memory_s: float
    launches: int = 1
    l2_bytes: float = 0.0  # bytes the programs load from L2 (informational)

    def time_s(self, assumptions: Assumptions):
        return max(self.compute_s, self.memory_s) + self.launches * assumptions.launch_s

    @property
    def bound(self):
        return "compute" if self.compute_s >= self.memory_s else "memory"


@dataclass
class Cost:
    impl: str
    head: str
    device: str
    N: int
    D: int
    V: int
    P: int
    phases: list
    extra_bytes: float
    extra_parts: dict
    atomics: int
    assumptions: Assumptions

    @property
    def flops(self):
        return sum(phase.flops for phase in self.phases)

    @property
    def dram_bytes(self):
        return sum(phase.dram_bytes for phase in self.phases)

    @property
    def time_s(self):
        return sum(phase.time_s(self.assumptions) for phase in self.phases)

    @property
    def floor_flops(self):
        return 6 * self.N * self.D * self.V

    def floor_s(self, device: Device):
        return self.floor_flops / device.floor_flops

    def row(self):
        device = DEVICES[self.device]
        compute = sum(p.time_s(self.assumptions) for p in self.phases if p.bound == "compute")
        return {
            "estimate": "MODEL ESTIMATE",
            "device": self.device,
            "head": self.head,
            "impl": self.impl,
            "N": self.N,
            "D": self.D,
            "V": self.V,
            "P": self.P,
            "flops_ndv": round(self.flops / (self.N * self.D * self.V), 4),
            "tflop": round(self.flops / TERA, 3),
            "hbm_gb": round(self.dram_bytes / GB, 3),
            "atomics": self.atomics,
            "extra_gb": round(self.extra_bytes / GB, 4),
            "time_ms": round(1e3 * self.time_s, 3),
            "floor_ms": round(1e3 * self.floor_s(device), 3),
            "x_floor": round(self.time_s / self.floor_s(device), 3),
            "compute_bound_share": round(compute / self.time_s, 3),
            "fits": self.fits(device),
        }

    def fits(self, device: Device):
        """Inputs, the returned gradients and the extra memory within the device's memory."""
        inputs = (self.N * self.D + self.V * self.D) * BF16
        return bool(2 * inputs + self.extra_bytes <= device.memory_bytes)


def num_pairs(num_rows: int, assumptions: Assumptions) -> int:
    return int(assumptions.mix_fraction * num_rows) // 2


def grid(N, P, columns, device, assumptions):
    """(pair tiles, vocabulary splits) of a fused pass: P pairs plus the unpaired rows two to a pair slot."""
    pair_slots = P + math.ceil((N - 2 * P) / 2)
    tiles = math.ceil(pair_slots / assumptions.block_m)
    blocks = math.ceil(columns / assumptions.block_v)
    return tiles, max(1, min(blocks, math.ceil(2 * device.sms / max(tiles, 1))))


def _dram_s(num_bytes, device: Device, assumptions: Assumptions):
    return num_bytes / (device.bandwidth * assumptions.memory_efficiency)


def triton_pass(name, N, P, D, columns, softcap, device, assumptions, ops, writes_gradient):
    """A fused pass over ``columns`` vocabulary columns: logits of every slot by `tl.dot`, then an epilogue.

    Programs as `kernels/triton_sftmix.py`: the forward has (pair tiles x splits), splits = max(1, min(blocks,
    ceil(2 SMs / tiles))), each program walking its split's blocks; the gradient kernel one program per (pair tile,
    vocabulary block). Program ids run in groups of tiles, the tile index fastest inside a group.
    """
    a = assumptions
    if writes_gradient:
        tiles, _ = grid(N, P, columns, device, a)
        splits, group = math.ceil(columns / a.block_v), a.gradient_group
    else:
        (tiles, splits), group = grid(N, P, columns, device, a), a.forward_group
    rows = 2 * a.block_m * tiles  # rows the tiles compute, padding included
    blocks = math.ceil(columns / a.block_v)
    programs = tiles * splits
    resident = min(programs, device.sms * a.programs_per_sm)
    h_panel = 2 * a.block_m * D * BF16
    w_block = a.block_v * D * BF16
    # the resident programs of a group order: up to `group` tiles side by side, more when a group's programs are
    # fewer than the resident ones
    group = tiles if group is None else min(group, tiles)
    resident_tiles = min(tiles, max(min(group, resident), math.ceil(resident / splits)))
    resident_blocks = min(splits, math.ceil(resident / group))
    working_set = resident_tiles * h_panel + resident_blocks * w_block
    hit = min(1.0, device.l2_bytes / working_set) if a.l2_reuse else 0.0
    # each tile's H panel is loaded once per vocabulary block: the first load from DRAM, the rest from L2 at `hit`
    h_bytes = tiles * h_panel * (1 + (blocks - 1) * (1 - hit))
    # W blocks are shared by the resident tiles: one DRAM read per wave of tiles
    w_bytes = columns * D * BF16 * math.ceil(tiles / resident_tiles)
    if writes_gradient:
        out_bytes = N * columns * BF16  # G, once, in the input dtype
        stat_bytes = (N + P) * FP32 * 2  # lse of every slot and pair
    else:
        out_bytes = splits * (5 * N + 3 * P) * FP32  # per-split partials
        stat_bytes = 0
    flops = 2 * rows * D * columns
    elements = rows * columns
    mixed = P * columns
    cap_elements = (elements + mixed) if softcap else 0
    epilogue_s = (elements + mixed + cap_elements) / device.exp_rate + (
        elements * ops + mixed * a.mixed_ops + cap_elements * a.softcap_ops
    ) / device.alu_rate
    dram = h_bytes + w_bytes + out_bytes + stat_bytes
    return Phase(
        name,
        flops,
        dram,
        flops / (device.peak_flops * a.triton_mma_efficiency) + epilogue_s,
        _dram_s(dram, device, a),
        l2_bytes=tiles * blocks * (h_panel + w_block),
    )


def gemm(name, m, n, k, dram_bytes, device, assumptions, launches=1):
    flops = 2 * m * n * k
    return Phase(
        name,
        flops,
        dram_bytes,
        flops / (device.peak_flops * assumptions.gemm_efficiency),
        _dram_s(dram_bytes, device, assumptions),
        launches,
    )


def elementwise(name, dram_bytes, device, assumptions, launches=1):
    return Phase(name, 0.0, dram_bytes, 0.0, _dram_s(dram_bytes, device, assumptions), launches)


def triton_cost(head, N, device_name, assumptions=Assumptions()):
    """`kernels/triton_sftmix.py` (impl="triton"): its phases, extra memory and atomics for one step at ``N`` rows."""
    D, V, softcap = HEADS[head]
    device, a = DEVICES[device_name], assumptions
    P = num_pairs(N, a)
    C = grad_chunk_columns(N, V, a.block_v)
    chunks = math.ceil(V / C)
    phases = [triton_pass("forward (Triton)", N, P, D, V, softcap, device, a, a.forward_ops, False)]
    _, splits = grid(N, P, V, device, a)
    partial_bytes = splits * (5 * N + 3 * P) * FP32
    phases.append(elementwise("combine partials (torch)", 2 * partial_bytes, device, a, launches=12))
    phases.append(elementwise("gather H to slot order", 2 * N * D * BF16, device, a))
    per_chunk = []
    for index in range(chunks):
        columns = min(C, V - index * C)
        per_chunk.append(triton_pass("G kernel (Triton)", N, P, D, columns, softcap, device, a, a.gradient_ops, True))
        # dW[chunk] = G^T H: read G and H, write the chunk of the bf16 dW output
        per_chunk.append(
            gemm("dW = G^T H (cuBLAS)", columns, D, N, (N * columns + N * D + columns * D) * BF16, device, a)
        )
        # G W[chunk]: read G and the W chunk; with fp32 output, read the fp32 accumulator and write the next one
        # (else a bf16 N x D result, added in fp32 by torch)
        result_bytes = 2 * N * D * FP32 if a.fused_accumulate else N * D * BF16
        per_chunk.append(
            gemm("dH += G W (cuBLAS)", N, D, columns, (N * columns + columns * D) * BF16 + result_bytes, device, a)
        )
        if not a.fused_accumulate:
            per_chunk.append(elementwise("dH accumulate (torch)", N * D * (BF16 + 2 * FP32), device, a))
    phases += _merge(per_chunk)
    # zeros, then index_add of the slot-order accumulator
    phases.append(elementwise("dH to row order (fp32)", 4 * N * D * FP32, device, a, launches=2))
    # the Function's backward: dW scaled in place (bf16), dH cast from fp32
    phases.append(
        elementwise(
            "backward: scale dW in place, cast dH", 2 * V * D * BF16 + N * D * (FP32 + BF16), device, a, launches=2
        )
    )
    forward_extra = {
        "H in slot order": N * D * BF16,
        "dH fp32 accumulator": N * D * FP32,
        "the GEMM's next fp32 accumulator" if a.fused_accumulate else "G W[chunk] bf16 result": N
        * D
        * (FP32 if a.fused_accumulate else BF16),
        "one G chunk": N * C * BF16,
        "stats and partials": partial_bytes + (N + P) * FP32 * 4,
    }
    # afterwards: the slot-order accumulator and the row-order fp32 dH; in backward the fp32 dH beside its bf16 cast
    backward_extra = {"fp32 dH, slot and row order": 2 * N * D * FP32}
    extra = max(sum(forward_extra.values()), sum(backward_extra.values()))
    parts = {f"{name} (forward)": value for name, value in forward_extra.items()}
    parts.update({f"{name} (backward)": value for name, value in backward_extra.items()})
    return Cost("triton", head, device_name, N, D, V, P, phases, extra, parts, 0, a)


def _merge(phases):
    """Phases of the same name (the per-chunk kernels) summed into one row each."""
    merged = {}
    for phase in phases:
        if phase.name not in merged:
            merged[phase.name] = dataclasses.replace(phase)
            continue
        into = merged[phase.name]
        into.flops += phase.flops
        into.dram_bytes += phase.dram_bytes
        into.compute_s += phase.compute_s
        into.memory_s += phase.memory_s
        into.launches += phase.launches
        into.l2_bytes += phase.l2_bytes
    return list(merged.values())


def rowchunk_plan(N, D, V, dtype=torch.bfloat16):
    """(rows per chunk, chunks, fp32 dW accumulator): `triton_rowchunk.plan_chunks` at its default budget, the
    batch's logits in the input dtype (N V itemsize bytes), for a head that needs dW."""
    plan = plan_chunks(N, D, V, dtype, default_memory_budget(N, V, dtype), need_weight=True)
    return plan.rows, plan.num_chunks, plan.fp32_weight_grad


def rowchunk_cost(head, N, device_name, assumptions=Assumptions()):
    """`kernels/triton_rowchunk.py`: per row chunk cuBLAS Z = H W^T (fp32 out), one Triton element-wise pass (two
    reads of Z, G written once in bf16 over Z's bytes), cuBLAS dH = G W (fp32 out) and dW += G^T H."""
    D, V, softcap = HEADS[head]
    device, a = DEVICES[device_name], assumptions
    P = num_pairs(N, a)
    rows, chunks, fp32_dw = rowchunk_plan(N, D, V)
    rows = math.ceil(N / chunks)  # the rows spread evenly over the chunks (`layout.even_chunks`)
    # per chunk: its hidden rows gathered, its fp32 dH added into row order (index_add)
    phases = [elementwise("gather H, scatter dH (torch)", 2 * N * D * BF16 + 3 * N * D * FP32, device, a,
                          launches=2 * chunks)]  # fmt: skip
    per_chunk = []
    for index in range(chunks):
        R = min(rows, N - index * rows)
        P_c = P * R // N  # pairs spread evenly over the chunks
        per_chunk.append(gemm("Z = H W^T (cuBLAS, fp32 out)", R, V, D, (R * D + V * D) * BF16 + R * V * FP32,
                              device, a))  # fmt: skip
        # pass 1: exp per logit and per z~ element, online statistics; pass 2: exp again, G, mixup part
        elements, mixed = R * V, P_c * V
        cap = (elements + mixed) if softcap else 0
        exps = 2 * (elements + mixed + cap)
        ops = elements * (a.forward_ops + a.gradient_ops) + 2 * mixed * a.mixed_ops + 2 * cap * a.softcap_ops
        compute_s = exps / device.exp_rate + ops / device.alu_rate
        dram = R * V * (2 * FP32 + BF16) + (R + P_c) * 6 * FP32
        per_chunk.append(Phase("stats + G (Triton, element-wise)", 0.0, dram, compute_s, _dram_s(dram, device, a)))
        per_chunk.append(gemm("dH = G W (cuBLAS, fp32 out)", R, D, V, (R * V + V * D) * BF16 + R * D * FP32,
                              device, a))  # fmt: skip
        # dW: read-modify-write of the accumulator after the first chunk (fp32, or bf16 in the output itself)
        acc = FP32 if fp32_dw else BF16
        dw_bytes = (R * V + R * D) * BF16 + V * D * acc * (1 if index == 0 else 2)
        per_chunk.append(gemm("dW += G^T H (cuBLAS)", V, D, R, dw_bytes, device, a))
    phases += _merge(per_chunk)
    dw_finish = V * D * (FP32 + BF16) if fp32_dw else 2 * V * D * BF16
    phases.append(elementwise("backward: dW scale/cast, dH cast", dw_finish + N * D * (FP32 + BF16), device, a,
                              launches=2))  # fmt: skip
    forward_extra = {
        "one chunk of fp32 logits (G over them)": rows * V * FP32,
        "the chunk's hidden rows and fp32 dH": rows * D * (BF16 + FP32),
        "fp32 dW accumulator": V * D * FP32 if fp32_dw else 0,
        "fp32 dH": N * D * FP32,
        "stats": (N + P) * FP32 * 6,
    }
    backward_extra = {"fp32 dH": N * D * FP32, "fp32 dW beside its cast": V * D * FP32 * fp32_dw}
    extra = max(sum(forward_extra.values()), sum(backward_extra.values()))
    parts = {f"{name} (forward)": value for name, value in forward_extra.items()}
    parts.update({f"{name} (backward)": value for name, value in backward_extra.items()})
    return Cost("rowchunk", head, device_name, N, D, V, P, phases, extra, parts, 0, a)


def filter_cost(head, N, device_name, assumptions=Assumptions(), density=0.25):
    """Gradient filtering on the triton backend: the gradient kernel also writes a (64-row x 128-column) tile mask
    (a tile is live when any |G| >= the threshold) and only live tiles of G; dW and dH become block-sparse Triton
    products (each output block owned by one program walking the live tiles of its column / row, no atomics) at the
    fused kernels' efficiency, their FLOPs and G reads times ``density`` (the live-tile share). Load imbalance
    between programs and the mask's own cost are not priced (optimistic)."""
    a = assumptions
    D, V, softcap = HEADS[head]
    device = DEVICES[device_name]
    base = triton_cost(head, N, device_name, a)
    keep = [p for p in base.phases if not p.name.startswith(("dW", "dH +=", "dH accumulate"))]
    for index, phase in enumerate(keep):
        if phase.name == "G kernel (Triton)":
            # only the live tiles of G are written
            written = N * V * BF16 * (1 - density)
            keep[index] = dataclasses.replace(phase, dram_bytes=phase.dram_bytes - written,
                                              memory_s=_dram_s(phase.dram_bytes - written, device, a))  # fmt: skip
    flops = 2 * N * D * V * density
    rate = device.peak_flops * a.triton_mma_efficiency
    dw_bytes = N * V * BF16 * density + N * D * BF16 * math.ceil(V / a.block_v) * density + V * D * BF16
    dh_bytes = N * V * BF16 * density + V * D * BF16 + N * D * FP32
    for name, dram in (("dW = G^T H (block-sparse Triton)", dw_bytes), ("dH = G W (block-sparse Triton)", dh_bytes)):
        keep.insert(-2, Phase(name, flops, dram, flops / rate, _dram_s(dram, device, a)))
    return Cost(f"filter@{density:g}", head, device_name, N, D, V, base.P, keep, base.extra_bytes,
                base.extra_parts, 0, a)  # fmt: skip


def torch_cost(head, N, device_name, assumptions=Assumptions()):
    """`kernels/chunked.py`'s CUDA ("recompute") schedule, as its docstring states it: forward over row chunks of
    C = 2**29 / (4 V) rows (a power of two), products in bf16 with fp32 output; backward over vocabulary chunks of
    Vc = 2**29 / (4 N) columns, the logits recomputed, G formed and rounded to bf16, dW[chunk] written once, dH an
    fp32 read-modify-write per vocabulary chunk. 8 N D V FLOPs on cuBLAS; its eager element-wise passes read or
    write ~(11.25 N + 14.25 P) x 4 bytes per vocabulary column (the module's count), each its own kernel."""
    D, V, softcap = HEADS[head]
    device, a = DEVICES[device_name], assumptions
    P = num_pairs(N, a)
    rows = chunk_rows_for(DEVICE_CHUNK_BYTES, V)
    columns = chunk_columns_for(DEVICE_CHUNK_BYTES, N, V)
    row_chunks, vocab_chunks = math.ceil(N / rows), math.ceil(V / columns)
    dram = row_chunks * 2 * V * D + 4 * V * D + vocab_chunks * 4 * N * D + 2 * V * D + vocab_chunks * 8 * N * D
    dram += 2 * N * V * FP32  # the GEMMs' fp32 logits, forward and recomputed
    phases = [gemm("logits, recompute, dW, dH (cuBLAS)", 4 * N, D, V, dram, device, a,
                   launches=row_chunks + 3 * vocab_chunks)]  # fmt: skip
    passes = (11.25 * N + 14.25 * P) * 4 * V * (1.25 if softcap else 1.0)
    phases.append(elementwise("logit passes (torch)", passes, device, a, launches=12 * (row_chunks + vocab_chunks)))
    phases.append(elementwise("casts of dH, scale of dW", N * D * (FP32 + BF16) + 2 * V * D * BF16, device, a))
    forward = 2.5 * rows * V * FP32
    backward = (N + P) * columns * FP32 + N * columns * BF16 + 2 * N * D * FP32 + N * D * BF16
    parts = {"forward chunk buffers": forward, "backward chunk buffers, dH, H": backward}
    return Cost("torch", head, device_name, N, D, V, P, phases, max(forward, backward), parts, 0, a)


def eager_peak_bytes(N, D, V, P, softcap):
    """Peak extra bytes of `kernels/reference.py` under autograd (bf16 inputs), read off its allocations.

    At the log-sum-exp backward of the N rows five fp32 N x V tensors are alive: the saved logits, the gather's
    gradient (zeros + scatter_add), z - lse, exp(z - lse) and the product with the upstream gradient; a soft cap
    adds its saved tanh output. The P mixed rows' backward runs first and has freed its tensors by then; the
    O(N D + P D) rest (the mixed hidden states, the gradient of the mixed branch) is added.
    """
    nv = (6 if softcap else 5) * N * V * FP32
    return nv + (2 * P * D + N * D) * BF16


def eager_cost(head, N, device_name, assumptions=Assumptions()):
    """`kernels/reference.py` under autograd: its GEMMs and its element-wise passes over the logits."""
    D, V, softcap = HEADS[head]
    device, a = DEVICES[device_name], assumptions
    P = num_pairs(N, a)
    phases = []
    for rows, label in ((N, "rows"), (P, "mixed")):
        nv = rows * V
        # forward: z = h W^T (bf16 out), the fp32 copy, log-sum-exp (two reads), the soft cap (div, tanh, mul)
        phases.append(gemm(f"{label}: logits GEMM", rows, V, D, (rows * D + V * D + nv) * BF16, device, a))
        cap = 3 * 2 * FP32 if softcap else 0
        forward = (BF16 + FP32) + 2 * FP32 + cap
        # the no-grad softmax, its product with z, the sum and the argmax (rows only)
        forward += (3 + 3 + 1 + 1) * FP32 if label == "rows" else 0
        # backward: gather grad (zeros + scatter_add copy), lse backward (sub, exp, mul), the sum of the two,
        # the cast to bf16 (and tanh_backward, the div's backward with a cap)
        backward = 3 * FP32 + 3 * 2 * FP32 + 3 * FP32 + (FP32 + BF16) + (2 * 3 * FP32 if softcap else 0)
        phases.append(elementwise(f"{label}: element-wise", nv * (forward + backward), device, a, launches=14))
        phases.append(gemm(f"{label}: dH = G W", rows, D, V, (nv + V * D + rows * D) * BF16, device, a))
        phases.append(gemm(f"{label}: dW = G^T H", V, D, rows, (nv + rows * D + V * D) * BF16, device, a))
    phases.append(elementwise("dW, dH accumulation", 3 * (V * D + N * D) * BF16, device, a, launches=4))
    extra = eager_peak_bytes(N, D, V, P, softcap)
    return Cost("eager", head, device_name, N, D, V, P, phases, extra, {"logits-sized fp32 tensors": extra}, 0, a)


def assumption_lines(a: Assumptions):
    lines = [
        "MODEL ESTIMATE (analytic, bench/kernel_model.py), not a measurement; no GPU has timed this design yet.",
        "bf16 inputs, one forward + backward step, P = N/4 mixed pairs; FLOPs in units of N*D*V; floor = 6*N*D*V.",
        "H100 SXM: 989 TFLOP/s bf16, 3.35 TB/s, 50 MB L2; H200: 989 TFLOP/s, 4.8 TB/s, 60 MB L2; 132 SMs, 1.98 GHz.",
        "floor priced at 989 TFLOP/s (H100) and 790 TFLOP/s (H200, measured cuBLAS bf16 on the lent H200s).",
        f"cuBLAS GEMMs at {a.gemm_efficiency:.0%} of peak; fused Triton tl.dot at {a.triton_mma_efficiency:.0%} "
        "(128x128 tiles, 64 FLOP/B from L2, pointer gathers, no TMA / warp specialization), epilogue serialized.",
        f"tiling BLOCK_M={a.block_m} (per side), BLOCK_V={a.block_v}, BLOCK_D={a.block_d}; "
        f"{a.programs_per_sm} program/SM; program order in groups of {a.forward_group or 'all'} (forward) / "
        f"{a.gradient_group or 'all'} (gradient) tiles, tile-fastest inside a group; "
        f"H-panel re-reads hit L2 at min(1, L2 / working set){'' if a.l2_reuse else ' -> DISABLED (no L2 reuse)'}.",
        f"every DRAM term at {a.memory_efficiency:.0%} of HBM bandwidth; {a.launch_s * 1e6:.0f} us per launch; "
        "each phase max(compute, memory), phases serial.",
        f"extra memory beyond inputs and returned gradients; triton: dW scaled in place, dH accumulation "
        f"{'by a GEMM with fp32 output' if a.fused_accumulate else 'via a bf16 N x D result'}; "
        "eager: 20 N V bytes (24 with a soft cap).",
    ]
    return lines


COLUMNS = ("device", "head", "N", "impl", "flops_ndv", "tflop", "hbm_gb", "atomics", "extra_gb", "time_ms")
COLUMNS += ("floor_ms", "x_floor", "compute_bound_share", "fits", "extra_vs_eager", "mix_vs_nomix")
# the priced implementations: (label, cost function); "filter" is priced once per density
COSTS = {"triton": triton_cost, "rowchunk": rowchunk_cost, "torch": torch_cost, "eager": eager_cost}


def model_rows(heads, tokens, assumptions=Assumptions(), densities=DENSITIES):
    """Every priced implementation at every device, head and N, with its extra memory over eager's and its time
    with mixing (P = N/4) over its time without (P = 0)."""
    nomix = dataclasses.replace(assumptions, mix_fraction=0.0)
    rows = []
    for device in DEVICES:
        for head in heads:
            for N in tokens:
                costs = {name: (cost(head, N, device, assumptions), cost(head, N, device, nomix))
                         for name, cost in COSTS.items()}  # fmt: skip
                for density in densities:
                    costs[f"filter@{density:g}"] = tuple(
                        filter_cost(head, N, device, a, density) for a in (assumptions, nomix)
                    )
                eager_extra = costs["eager"][0].extra_bytes
                for cost, without_mixing in costs.values():
                    row = cost.row()
                    row["extra_vs_eager"] = round(cost.extra_bytes / eager_extra, 4)
                    row["mix_vs_nomix"] = round(cost.time_s / without_mixing.time_s, 3)
                    rows.append(row)
    return rows


def print_table(rows, assumptions):
    for line in assumption_lines(assumptions):
        print("# " + line)
    header = f"{'device':>6} {'head':>13} {'N':>6} {'impl':>12} {'FLOPs/NDV':>9} {'TFLOP':>7} {'HBM GB':>8} "
    header += f"{'atomics':>7} {'extra GB':>9} {'x eager':>7} {'est ms':>8} {'floor ms':>8} {'x floor':>7} "
    header += f"{'mix/nomix':>9} {'fits':>5}"
    print(header)
    for row in rows:
        print(
            f"{row['device']:>6} {row['head']:>13} {row['N']:>6} {row['impl']:>12} {row['flops_ndv']:>9.3f} "
            f"{row['tflop']:>7.2f} {row['hbm_gb']:>8.2f} {row['atomics']:>7} {row['extra_gb']:>9.3f} "
            f"{row['extra_vs_eager']:>7.3f} {row['time_ms']:>8.2f} {row['floor_ms']:>8.2f} {row['x_floor']:>7.2f} "
            f"{row['mix_vs_nomix']:>9.3f} {'yes' if row['fits'] else 'NO':>5}"
        )


def print_breakdown(cost: Cost):
    device = DEVICES[cost.device]
    print(f"# MODEL ESTIMATE per phase: {cost.impl}, {cost.head}, N={cost.N}, {device.name}")
    print(f"{'phase':>26} {'TFLOP':>7} {'HBM GB':>8} {'L2 GB':>7} {'compute ms':>10} {'memory ms':>9} {'ms':>7}")
    for phase in cost.phases:
        print(
            f"{phase.name:>26} {phase.flops / TERA:>7.2f} {phase.dram_bytes / GB:>8.2f} {phase.l2_bytes / GB:>7.1f} "
            f"{1e3 * phase.compute_s:>10.2f} {1e3 * phase.memory_s:>9.2f} {1e3 * phase.time_s(cost.assumptions):>7.2f}"
        )
    print(f"{'total':>26} {cost.flops / TERA:>7.2f} {cost.dram_bytes / GB:>8.2f} {'':>7} {'':>10} {'':>9} "
          f"{1e3 * cost.time_s:>7.2f}  (floor {1e3 * cost.floor_s(device):.2f} ms)")  # fmt: skip
    parts = ", ".join(f"{name} {value / GB:.3f}" for name, value in cost.extra_parts.items() if value)
    print(f"# extra memory at its peak {cost.extra_bytes / GB:.3f} GB; parts (GB): {parts}")


def break_even_efficiency(head, N, device_name, bar, assumptions=Assumptions()):
    """The lowest Triton tl.dot efficiency at which the triton backend stays within ``bar`` x the floor (bisection)."""
    low, high = 0.05, 1.0
    for _ in range(40):
        middle = (low + high) / 2
        cost = triton_cost(head, N, device_name, dataclasses.replace(assumptions, triton_mma_efficiency=middle))
        if cost.time_s <= bar * cost.floor_s(DEVICES[device_name]):
            high = middle
        else:
            low = middle
    return high


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", nargs="+", choices=list(HEADS), default=list(HEADS))
    parser.add_argument(
        "--densities", nargs="*", type=float, default=list(DENSITIES), help="live-tile shares for the filtering rows"
    )
    parser.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS))
    parser.add_argument("--json", action="store_true", help="print the rows as one JSON list instead of a table")
    parser.add_argument("--csv", default=None, help="also write the rows as CSV to this path")
    parser.add_argument("--breakdown", action="store_true", help="also a per-phase table of each head and N")
    parser.add_argument("--triton-efficiency", type=float, default=Assumptions.triton_mma_efficiency)
    parser.add_argument("--gemm-efficiency", type=float, default=Assumptions.gemm_efficiency)
    parser.add_argument("--no-l2-reuse", action="store_true", help="price every H-panel re-read from DRAM")
    parser.add_argument(
        "--tile-fastest", action="store_true", help="Triton's plain program order (tile index fastest over all tiles)"
    )
    parser.add_argument(
        "--bf16-accumulate", action="store_true", help="dH via a bf16 G W result (torch without addmm out_dtype)"
    )
    args = parser.parse_args(argv)
    for N in args.tokens:
        if N < 2 or N % 2:
            parser.error(f"--tokens must be even numbers >= 2, got {N}")
    assumptions = Assumptions(
        triton_mma_efficiency=args.triton_efficiency,
        gemm_efficiency=args.gemm_efficiency,
        l2_reuse=not args.no_l2_reuse,
        forward_group=None if args.tile_fastest else Assumptions.forward_group,
        gradient_group=None if args.tile_fastest else Assumptions.gradient_group,
        fused_accumulate=not args.bf16_accumulate,
    )
    rows = model_rows(args.heads, args.tokens, assumptions, args.densities)
    if args.csv:
        with open(args.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    if args.json:
        json.dump({"assumptions": assumption_lines(assumptions), "rows": rows}, sys.stdout, indent=1)
        print()
        return
    print_table(rows, assumptions)
    for row in rows:
        if row["impl"] == AUTO_IMPL and row["N"] == 8192:
            ok = row["x_floor"] <= CCE_BAR and row["extra_vs_eager"] <= 0.1
            print(
                f"# {row['device']}, {row['head']}, N=8192: {AUTO_IMPL} (auto, bf16) {row['time_ms']:.1f} ms = "
                f"{row['x_floor']:.2f}x the floor at {row['extra_vs_eager']:.3f}x eager's extra memory, mixing {row['mix_vs_nomix']:.3f}x "
                f"no mixing ({'within' if ok else 'OUTSIDE'} issue #21's {CCE_BAR}x / 0.1x bar)"
            )
    for device in DEVICES:
        cost = triton_cost("llama-3-8b", 8192, device, assumptions)
        ratio = cost.time_s / cost.floor_s(DEVICES[device])
        needed = break_even_efficiency("llama-3-8b", 8192, device, BAR, assumptions)
        print(
            f"# {device}, llama-3-8b, N=8192: triton {1e3 * cost.time_s:.1f} ms = {ratio:.2f}x the 6NDV floor "
            f"({'within' if ratio <= BAR else 'OUTSIDE'} issue #11's {BAR}x bar); it holds while the fused kernels "
            f"reach >= {needed:.0%} of peak"
        )
    if args.breakdown:
        for device in DEVICES:
            for head in args.heads:
                for N in args.tokens:
                    for cost in COSTS.values():
                        print_breakdown(cost(head, N, device, assumptions))


if __name__ == "__main__":
    main()
