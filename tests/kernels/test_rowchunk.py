"""The row-chunked backend's own contracts: the chunk plan from the memory budget and
dW accumulated in fp32 or, when the budget has no room for that, in the input dtype with a bounded error."""

import dataclasses
import os

import pytest
import torch
from kernel_cases import make_case, run_impl
from kernel_oracle import fp64_oracle

from bench import kernel_model

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(), reason="needs triton"
)
rowchunk = pytest.importorskip("sftmix_trl.kernels.triton_rowchunk")


@pytest.mark.parametrize("head", list(kernel_model.HEADS))
@pytest.mark.parametrize("num_rows", [1024, 8192, 16384])
def test_plan_fits_the_default_budget_and_matches_the_cost_model(head, num_rows):
    hidden_size, vocab_size, _ = kernel_model.HEADS[head]
    budget = rowchunk.default_memory_budget(num_rows, vocab_size, torch.bfloat16)
    plan = rowchunk.plan_chunks(num_rows, hidden_size, vocab_size, torch.bfloat16, budget, need_weight=True)
    assert (plan.rows, plan.num_chunks, plan.fp32_weight_grad) == kernel_model.rowchunk_plan(
        num_rows, hidden_size, vocab_size
    )
    used = 4 * num_rows * hidden_size + plan.rows * (4 * vocab_size + 6 * hidden_size)
    used += 4 * vocab_size * hidden_size * plan.fp32_weight_grad
    assert used <= budget
    assert plan.num_chunks * plan.rows >= num_rows


def test_plan_at_the_llama_head_accumulates_dw_in_bf16_over_three_chunks_and_in_fp32_for_smollm2():
    llama = rowchunk.plan_chunks(8192, 4096, 128256, torch.bfloat16, 8192 * 128256 * 2, need_weight=True)
    assert (llama.num_chunks, llama.fp32_weight_grad) == (3, False)
    smol = rowchunk.plan_chunks(8192, 576, 49152, torch.bfloat16, 8192 * 49152 * 2, need_weight=True)
    assert smol.fp32_weight_grad and smol.num_chunks == 3
    # fp32 inputs accumulate in the fp32 dW they return; a frozen head needs no accumulator
    assert rowchunk.plan_chunks(8192, 4096, 128256, torch.float32, 2**31, need_weight=True).fp32_weight_grad
    frozen = rowchunk.plan_chunks(8192, 4096, 128256, torch.bfloat16, 8192 * 128256 * 2, need_weight=False)
    assert frozen.rows == llama.rows
    # a tiny budget still takes one pair a chunk
    assert rowchunk.plan_chunks(10, 4, 100, torch.bfloat16, 1, need_weight=True).rows == 2


def _rel_error(actual, expected):
    return float((actual - expected).abs().max() / expected.abs().max())


@pytest.mark.parametrize("fp32_weight_grad", [True, False])
def test_bf16_weight_gradient_error_is_bounded_by_its_roundings(fp32_weight_grad, monkeypatch):
    """bf16 inputs in 4 chunks: with the fp32 accumulator dW is rounded once (as the reference's); accumulated in
    bf16 it is rounded once per chunk, each rounding at most half a bf16 ulp (2**-9) of the running sum."""
    # 16-row chunks count as GEMM-sized here, so the accumulator's branch is reachable at test sizes
    monkeypatch.setattr(rowchunk, "MIN_GEMM_ROWS", 16)
    case = make_case(seed=9, num_rows=64, hidden_size=24, vocab_size=40, num_pairs=12, peaked=True)
    case = dataclasses.replace(case, **{n: getattr(case, n).bfloat16() for n in ("hidden", "weight", "bias")})
    oracle = fp64_oracle(case)
    vocab_size, hidden_size = case.weight.shape
    # the fp32 dH, 16-row chunks of logits and hidden rows, and the fp32 dW accumulator or not
    budget = 4 * 64 * hidden_size + 16 * (4 * rowchunk.padded_row(vocab_size) + 6 * hidden_size)
    budget += 4 * vocab_size * hidden_size * fp32_weight_grad
    plan = rowchunk.plan_chunks(64, hidden_size, vocab_size, torch.bfloat16, budget, need_weight=True)
    assert (plan.num_chunks, plan.fp32_weight_grad) == (4, fp32_weight_grad)
    result = run_impl(case, "rowchunk", torch.bfloat16, "cpu", memory_budget=budget)
    reference = run_impl(case, "reference", torch.bfloat16, "cpu")
    error = _rel_error(result["grad_weight"], oracle["grad_weight"])
    baseline = _rel_error(reference["grad_weight"], oracle["grad_weight"])
    # the reference rounds dW once; each extra rounding of a running sum adds at most 2**-9 of its magnitude,
    # which stays within twice max |dW| here
    extra_roundings = 0 if fp32_weight_grad else plan.num_chunks - 1
    assert error <= 1.5 * baseline + extra_roundings * 2 * 2**-9 + 5e-4, (error, baseline)
    for key in ("loss", "grad_hidden", "grad_bias"):
        assert _rel_error(result[key], oracle[key]) <= 1.5 * _rel_error(reference[key], oracle[key]) + 5e-4, key
