"""Extra memory of the fused loss by accounting: the implementations run on the meta device (shapes, no data; the
Triton launches are skipped there, every allocation of the wrapper and of the GEMMs happens), and a dispatch mode
adds up the bytes of the storages alive at each moment. At the Llama-3-8B head no GPU is needed to know what the
triton path allocates."""

import pytest
import torch
from kernel_memory import LLAMA_3_8B_HEAD, LiveStorageBytes, step_memory


def test_accounting_sees_a_dense_logits_tensor():
    """The tracker itself: the reference's peak holds at least its N x V fp32 logits and the bf16 ones."""
    peak, _ = step_memory("reference", 64, 32, 1000)
    assert peak >= 64 * 1000 * (4 + 2)


@pytest.mark.parametrize("num_rows", [8192])
def test_triton_extra_memory_is_a_tenth_of_eager_at_the_llama_3_8b_head(num_rows):
    """bf16, N = 8,192, D = 4,096, V = 128,256: what the triton path allocates beyond the gradients it returns is at
    most a tenth of the eager reference's (the gradients themselves, 1.1 GB, are the same for both)."""
    triton_peak, triton_grads = step_memory("triton", num_rows, **LLAMA_3_8B_HEAD)
    eager_peak, eager_grads = step_memory("reference", num_rows, **LLAMA_3_8B_HEAD)
    assert triton_grads == eager_grads == (num_rows + LLAMA_3_8B_HEAD["vocab_size"]) * 4096 * 2
    triton_extra, eager_extra = triton_peak - triton_grads, eager_peak - eager_grads
    # hidden states in slot order (N D bf16), the fp32 dH accumulator and the GEMM's next one, one G chunk (N x 8192)
    assert triton_extra <= num_rows * 4096 * (2 + 4 + 4) + num_rows * 8192 * 2 + 2**20
    assert triton_extra <= 0.1 * eager_extra, (triton_extra / 2**20, eager_extra / 2**20)


@pytest.mark.parametrize("num_rows", [8192])
def test_rowchunk_extra_memory_stays_within_its_budget_and_a_tenth_of_eager_at_the_llama_3_8b_head(num_rows):
    """bf16, N = 8,192, Llama-3-8B head: the row-chunked path allocates, beyond the gradients it returns, at most its
    default budget (the batch's logits in bf16, N V 2 bytes: chunks of fp32 logits, the fp32 dH; dW accumulated in
    bf16 over 3 chunks), which is under a tenth of the eager reference's."""
    peak, grads = step_memory("rowchunk", num_rows, **LLAMA_3_8B_HEAD)
    eager_peak, eager_grads = step_memory("reference", num_rows, **LLAMA_3_8B_HEAD)
    assert grads == eager_grads
    extra = peak - grads
    # the budget, plus the per-slot statistics and layout (a few int64 / fp32 vectors of N)
    assert extra <= num_rows * LLAMA_3_8B_HEAD["vocab_size"] * 2 + 64 * num_rows
    assert extra <= 0.1 * (eager_peak - eager_grads), (extra / 2**20, (eager_peak - eager_grads) / 2**20)


def test_accounting_counts_views_once():
    """A view (the backward's dW chunks are slices of one dW) adds no bytes; a new tensor does."""
    with LiveStorageBytes() as tracker:
        base = torch.empty(1000, device="meta")
        halves = base[:500], base[500:]
        fresh = halves[0] * 2
    assert tracker.peak == 1000 * 4 + 500 * 4 and fresh.shape == (500,)
