"""What the two Triton backends share: the interpreter switch, the dtypes they take, and the jit helpers of a pair
tile (its slots and targets, the soft cap, the online statistics of a block of logits and of the mixed logits z~,
the soft-target logit gradient). `triton_sftmix` forms the logits with `tl.dot`, `triton_rowchunk` reads them from
cuBLAS's output; both then run these helpers on a tile of pair slots (`layout.RowLayout`: side a = slot k, side b =
slot P + k for a mixed pair k, two unpaired rows otherwise)."""

import os

import torch
import triton
import triton.language as tl

# set before the kernels are imported: the tests' CPU runs (docs/design.md §6)
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
TRITON_DTYPES = (torch.float32, torch.bfloat16)
# integer arguments of a pair tile that vary from call to call: never specialized (== 1, % 16), so new shapes reuse
# the compiled kernels
VARYING_ARGS = ("num_slots", "num_pairs", "num_pair_slots", "rest_half")


def check_triton_dtype(impl: str, dtype: torch.dtype) -> None:
    """Refuse inputs the Triton backends do not take: fp16 (see `triton_sftmix`) and anything but fp32 / bf16."""
    if dtype == torch.float16:
        raise TypeError(
            f"impl={impl!r} does not take fp16 inputs: its fp16 logit gradient, scaled once for the whole batch, "
            "would lose the softmax tails of rows with small weights and its fp16 dW can overflow. Use bf16, or "
            "impl='torch' (which impl='auto' picks for fp16), which computes fp16 inputs in fp32."
        )
    if dtype not in TRITON_DTYPES:
        raise TypeError(f"impl={impl!r} takes {TRITON_DTYPES} inputs, got {dtype}; use impl='torch'.")


def grad_dtype_for(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype the logit gradient G is stored in: the input dtype; fp32 for CPU tensors under the interpreter,
    whose casts to bf16 truncate instead of rounding (tests/kernels/test_cuda_branches.py forces the GPU's)."""
    return torch.float32 if INTERPRET and device.type == "cpu" else dtype


@triton.jit
def apply_softcap(z, softcap, SOFTCAP: tl.constexpr):
    """c tanh(z / c), with tanh(u) = 1 - 2 / (exp(2u) + 1) (no libdevice)."""
    if SOFTCAP:
        z = softcap * (1.0 - 2.0 / (tl.exp(2.0 * z / softcap) + 1.0))
    return z


@triton.jit
def pair_tile(pid, ntp_targets_ptr, num_slots, num_pairs, num_pair_slots, rest_half, ignore_index, BLOCK_M):
    """Slots and NTP targets of sides a and b of the pair slots of tile ``pid``."""
    k = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    in_range = k < num_pair_slots
    is_pair = k < num_pairs
    # pair k < P: slots k and P + k; unpaired slot k >= P: rest slots 2P + (k - P) and 2P + half + (k - P)
    slot_a = tl.where(is_pair, k, k + num_pairs)
    slot_b = tl.where(is_pair, k + num_pairs, k + num_pairs + rest_half)
    ok_a = in_range
    ok_b = in_range & (slot_b < num_slots)
    target_a = tl.load(ntp_targets_ptr + slot_a, mask=ok_a, other=ignore_index)
    target_b = tl.load(ntp_targets_ptr + slot_b, mask=ok_b, other=ignore_index)
    return k, is_pair & in_range, slot_a, slot_b, ok_a, ok_b, target_a, target_b


@triton.jit
def online_lse_update(z, run_max, run_sum):
    """One block of an online log-sum-exp; z is -inf on masked columns. Returns (max, sum, rescale, exp(z - max))."""
    new_max = tl.maximum(run_max, tl.max(z, 1))
    rescale = tl.exp(run_max - new_max)
    probs = tl.exp(z - new_max[:, None])
    return new_max, run_sum * rescale + tl.sum(probs, 1), rescale, probs


@triton.jit
def ntp_block(z, cols, col_ok, target, run_max, run_sum, run_zsum, run_target, run_arg, vocab_size):
    """Online NTP statistics of one block of capped logits z (masked columns are set to -inf here)."""
    z = tl.where(col_ok[None, :], z, float("-inf"))
    block_max = tl.max(z, 1)
    # first column reaching the block max; a later block wins only when strictly larger
    block_arg = tl.min(tl.where(z == block_max[:, None], cols[None, :], vocab_size), 1)
    run_arg = tl.where(block_max > run_max, block_arg, run_arg)
    new_max, run_sum, rescale, probs = online_lse_update(z, run_max, run_sum)
    # entropy needs sum softmax(z) z: carry sum exp(z - max) z
    run_zsum = run_zsum * rescale + tl.sum(probs * tl.where(col_ok[None, :], z, 0.0), 1)
    run_target += tl.sum(tl.where(cols[None, :] == target[:, None], z, 0.0), 1)
    return new_max, run_sum, run_zsum, run_target, run_arg


@triton.jit
def mixed_block(z_a, z_b, lam, cols, col_ok, target_p, target_q, run_max, run_sum, run_target, softcap, SOFTCAP):
    """Online statistics of one block of the mixed logits of a pair tile, from the raw logits of its two sides."""
    # z~ = lam z_p + (1 - lam) z_q on raw logits; the soft cap comes after mixing
    z_mix = apply_softcap(lam[:, None] * z_a + (1.0 - lam[:, None]) * z_b, softcap, SOFTCAP)
    z_mix = tl.where(col_ok[None, :], z_mix, float("-inf"))
    run_max, run_sum, _, _ = online_lse_update(z_mix, run_max, run_sum)
    # lam z~[t_p] + (1 - lam) z~[t_q]
    soft_target = tl.where(cols[None, :] == target_p[:, None], lam[:, None], 0.0) + tl.where(
        cols[None, :] == target_q[:, None], 1.0 - lam[:, None], 0.0
    )
    run_target += tl.sum(soft_target * tl.where(col_ok[None, :], z_mix, 0.0), 1)
    return run_max, run_sum, run_target


@triton.jit
def soft_ce_grad(
    z_raw, lse, col_weight_1, col_1, col_weight_2, col_2, row_scale, cols, col_ok, softcap, SOFTCAP: tl.constexpr
):
    """row_scale * (softmax(z) - w1 e_{c1} - w2 e_{c2}) * dcap(z) with z = cap(z_raw); 0 on masked columns."""
    z = apply_softcap(z_raw, softcap, SOFTCAP)
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
