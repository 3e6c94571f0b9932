"""The torch implementation's two schedules (kernels/chunked.py): the recompute schedule that CUDA runs, forced on CPU
against the fp64 formula; chunk sizes from the memory budget; one product per pass; its memory by accounting."""

import dataclasses

import pytest
import torch
from kernel_cases import CASES, assert_metrics, make_case, oracle_errors, run_impl
from kernel_memory import LLAMA_3_8B_HEAD, step_memory
from kernel_oracle import fp64_oracle

from sftmix_trl.kernels import SFTMixLossOptions, chunked, sftmix_linear_cross_entropy

# a budget of 4 bytes x 47 slots x 20 columns: 7 vocabulary chunks of the 123-column case, the last one narrower
SMALL_BUDGET = 4 * 47 * 20


@pytest.fixture
def recompute(monkeypatch):
    """The CUDA schedule on CPU: products of upcast operands stand in for the fp32-output GEMMs."""
    monkeypatch.setattr(chunked, "recomputes_by_vocabulary", lambda device, dtype: True)


def test_budget_sets_the_chunks():
    # CPU's default budget keeps the former 2**24 logits per chunk: 256 rows of a 49k vocabulary
    assert chunked.chunk_rows_for(chunked.CPU_CHUNK_BYTES, 49152) == 256
    assert chunked.chunk_rows_for(chunked.DEVICE_CHUNK_BYTES, LLAMA_3_8B_HEAD["vocab_size"]) == 1024
    assert chunked.chunk_rows_for(100, 10**6) == 2
    assert chunked.chunk_columns_for(chunked.DEVICE_CHUNK_BYTES, 8192, 128256) == 16384
    # whole 128-column tiles where the budget allows, at least one column, at most the vocabulary
    assert chunked.chunk_columns_for(4 * 10 * 300, 10, 1000) == 256
    assert chunked.chunk_columns_for(4 * 10 * 20, 10, 1000) == 20
    assert chunked.chunk_columns_for(1, 10, 1000) == 1
    assert chunked.chunk_columns_for(1 << 40, 10, 1000) == 1000


def test_schedule_by_device():
    assert not chunked.recomputes_by_vocabulary(torch.device("cpu"), torch.bfloat16)
    assert not chunked.recomputes_by_vocabulary(torch.device("cpu"), torch.float32)
    # the meta device has the fp32-output GEMMs, as CUDA does: the accounting below sees the CUDA schedule
    assert chunked.recomputes_by_vocabulary(torch.device("meta"), torch.bfloat16)


@pytest.mark.parametrize("case_name", list(CASES))
def test_recompute_fp32_matches_fp64_formula(case_name, recompute):
    case = make_case(seed=list(CASES).index(case_name), upstream=1.7, **CASES[case_name])
    oracle = fp64_oracle(case)
    result = run_impl(case, "torch", torch.float32, "cpu", chunk_rows=6, chunk_bytes=SMALL_BUDGET)
    assert_metrics(result, oracle)
    errors = oracle_errors(result, oracle)
    assert max(errors.values()) < 2e-5, errors


@pytest.mark.parametrize("dft", [False, True])
def test_recompute_equals_one_pass(dft, recompute, monkeypatch):
    """Both schedules give the same numbers, DFT included (its per-row weights saved by the forward)."""
    case = make_case(seed=5, peaked=True, logit_softcap=5.0)
    recomputed = run_impl(case, "torch", torch.float32, "cpu", dft=dft, chunk_bytes=SMALL_BUDGET)
    monkeypatch.undo()
    one_pass = run_impl(case, "torch", torch.float32, "cpu", dft=dft)
    for key, value in one_pass.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(recomputed[key], value, rtol=1e-5, atol=1e-7, msg=key)
        else:
            assert recomputed[key] == value, key


@pytest.mark.parametrize("case_name", ["odd_shapes", "peaked", "softcap"])
def test_recompute_bf16_no_worse_than_pytorch_bf16(case_name, recompute):
    """bf16 inputs, G rounded to bf16 for the products as on CUDA: each error against fp64 at most 1.5x the dense
    PyTorch bf16 one, plus a little (the bound the other fused paths meet)."""
    case = make_case(seed=7, upstream=0.6, **CASES[case_name])
    case = dataclasses.replace(case, **{n: getattr(case, n).bfloat16() for n in ("hidden", "weight", "bias")})
    oracle = fp64_oracle(case)
    baseline = oracle_errors(run_impl(case, "reference", torch.bfloat16, "cpu"), oracle)
    result = run_impl(case, "torch", torch.bfloat16, "cpu", chunk_bytes=SMALL_BUDGET)
    for key, error in oracle_errors(result, oracle).items():
        assert error <= 1.5 * baseline[key] + 5e-4, (key, error, baseline)


@pytest.mark.parametrize("requires_grad, products", [(False, 2), (True, 2 + 7 * 3)])
def test_recompute_products(requires_grad, products, recompute):
    """One product with W per row chunk in forward; with gradients three per vocabulary chunk (recomputed logits,
    dW[chunk], dH), none in backward."""
    case = make_case(seed=17, num_rows=40, num_pairs=6, ignore_fraction=0.1, vocab_size=123)
    leaves = {n: getattr(case, n).detach().clone().requires_grad_(requires_grad) for n in ("hidden", "weight")}
    # 40 slots: 6 pairs in one chunk of 32 rows, then 28 unpaired rows in one more; 123 columns in chunks of 20: 7
    options = SFTMixLossOptions(impl="torch", chunk_rows=32, chunk_bytes=4 * 40 * 20)
    args = (leaves["hidden"], leaves["weight"], case.targets, case.mix_index, case.mix_lambda, case.mix_weight)
    with torch.profiler.profile() as profile:
        out = sftmix_linear_cross_entropy(*args, options=options)
        if requires_grad:
            out.loss.backward()
    events = profile.key_averages()
    assert sum(e.count for e in events if e.key in ("aten::mm", "aten::addmm", "aten::addmm_")) == products


def test_torch_extra_memory_falls_at_the_llama_3_8b_head(monkeypatch):
    """bf16, N = 8,192, Llama-3-8B head, on the meta device (the CUDA schedule): no V x D buffer beyond the
    returned dW, so the extra memory is the chunk buffers (about 2.5x the budget) and a few N x D tensors, well
    under the one-pass schedule's (fp32 copies of W and of dW, 4.2 GB) and a tenth of the eager reference's."""
    num_rows, hidden_size, vocab_size = 8192, LLAMA_3_8B_HEAD["hidden_size"], LLAMA_3_8B_HEAD["vocab_size"]
    peak, grads = step_memory("torch", num_rows, **LLAMA_3_8B_HEAD)
    eager_peak, eager_grads = step_memory("reference", num_rows, **LLAMA_3_8B_HEAD)
    monkeypatch.setattr(chunked, "recomputes_by_vocabulary", lambda device, dtype: False)
    one_pass_peak, one_pass_grads = step_memory("torch", num_rows, **LLAMA_3_8B_HEAD)
    assert grads == eager_grads == one_pass_grads == (num_rows + vocab_size) * hidden_size * 2
    extra, eager_extra, one_pass_extra = peak - grads, eager_peak - eager_grads, one_pass_peak - one_pass_grads
    # forward: 2.5 x 1,024 rows x V fp32; the N x D tensors: H in slot order (bf16), dH (fp32, two while a GEMM
    # writes the next, one more in row order), per-slot vectors
    assert extra <= 2.5 * chunked.DEVICE_CHUNK_BYTES + num_rows * hidden_size * (2 * 2 + 3 * 4) + 2**22, extra
    assert extra < one_pass_extra - 4 * vocab_size * hidden_size, (extra / 2**20, one_pass_extra / 2**20)
    assert extra <= 0.1 * eager_extra, (extra / 2**20, eager_extra / 2**20)
