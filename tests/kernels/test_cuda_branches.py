"""The CUDA-only branches of the Triton backends, run on the CPU where they can be (forced under the interpreter),
and the refusals that keep the others from running another way than designed.

- The logit gradient G stored in bf16 (over rowchunk's fp32 logits, or in triton's gradient chunk): on a GPU always;
  under the interpreter G is fp32 unless `grad_dtype_for` is forced to the GPU's answer, as here. The interpreter's
  fp32 -> bf16 cast truncates (a GPU rounds to nearest), so G may be off by one bf16 ulp (2**-7 of |G|) instead of
  half of one: the bound below allows one ulp of the largest G on top of the bf16 reference's own error.
- The vocabulary here (40, 123) is not a multiple of 16, so rowchunk's padded row stride is in every case.
- What only a GPU runs (docs/performance.md, "GPU check"): the `out_dtype` products of `gemm.product_into` / `gemm.add_product`
  (torch has no CPU kernel for them), the compiled kernels' memory ordering (bench/kernel_compile.py reads their
  layouts instead), several devices.
"""

import dataclasses
import os

import pytest
import torch
from kernel_cases import make_case, run_impl
from kernel_oracle import fp64_oracle

from sftmix_trl.kernels import functional
from sftmix_trl.kernels.function import device_guard

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="forces the interpreter's branches")
rowchunk = pytest.importorskip("sftmix_trl.kernels.triton_rowchunk")
triton_sftmix = pytest.importorskip("sftmix_trl.kernels.triton_sftmix")
BF16_ULP = 2**-7


def _rel_error(actual, expected):
    return float((actual - expected).abs().max() / expected.abs().max())


def _bf16(case):
    return dataclasses.replace(case, **{n: getattr(case, n).bfloat16() for n in ("hidden", "weight", "bias")})


@pytest.mark.parametrize(
    "impl, module, extra",
    [("rowchunk", rowchunk, {}), ("rowchunk", rowchunk, {"fp32_dw": True}), ("triton", triton_sftmix, {})],
    ids=["rowchunk-bf16-dw", "rowchunk-fp32-dw", "triton"],
)
def test_bf16_logit_gradient_as_on_a_gpu_matches_the_fp64_oracle(impl, module, extra, monkeypatch):
    # G in the input dtype, as on a GPU: for rowchunk, bf16 over the bytes of the fp32 logits of a padded row
    monkeypatch.setattr(module, "grad_dtype_for", lambda device, dtype: dtype)
    options = {}
    case = _bf16(make_case(seed=5, num_rows=40, hidden_size=24, vocab_size=40, num_pairs=8, peaked=True))
    if impl == "rowchunk":
        # two chunks, so that dW accumulates across them: in bf16, or in the fp32 accumulator
        monkeypatch.setattr(rowchunk, "MIN_GEMM_ROWS", 16)
        budget = 4 * 40 * 24 + 20 * (4 * 48 + 6 * 24) + 4 * 40 * 24 * extra.get("fp32_dw", False)
        plan = rowchunk.plan_chunks(40, 24, 40, torch.bfloat16, budget, need_weight=True)
        assert (plan.num_chunks, plan.fp32_weight_grad) == (2, extra.get("fp32_dw", False))
        options["memory_budget"] = budget
    oracle = fp64_oracle(case)
    result = run_impl(case, impl, torch.bfloat16, "cpu", **options)
    reference = run_impl(case, "reference", torch.bfloat16, "cpu")
    for key in ("loss", "grad_hidden", "grad_weight", "grad_bias"):
        error, baseline = _rel_error(result[key], oracle[key]), _rel_error(reference[key], oracle[key])
        # one bf16 ulp for the truncating cast; dW accumulated in bf16 over 2 chunks: one more rounding
        allowance = BF16_ULP * (2 if key == "grad_weight" and impl == "rowchunk" else 1)
        assert error <= 1.5 * baseline + allowance, (key, error, baseline)


def test_fp16_is_refused_by_the_triton_backends_and_computed_in_fp32_by_torch():
    """An fp16 G scaled once per batch would lose the tails of the rows with small weights: a short pair with a large
    weight beside next-token rows puts those at 1e-3 of the largest scale. The Triton backends refuse fp16; impl
    'auto' resolves to torch on CUDA, whose fp16 path on a GPU is the fp32 one pass run here."""
    case = make_case(seed=3, num_rows=24, hidden_size=16, vocab_size=40, num_pairs=1)
    case = dataclasses.replace(case, mix_weight=torch.tensor([50.0]), ntp_normalizer=1000.0)
    for impl in ("rowchunk", "triton"):
        with pytest.raises(TypeError, match="fp16 inputs.*impl='torch'"):
            run_impl(case, impl, torch.float16, "cpu")
    assert functional.resolve_impl("auto", torch.device("cuda"), torch.float16) == "torch"
    from sftmix_trl.kernels import chunked

    assert not chunked.recomputes_by_vocabulary(torch.device("cuda"), torch.float16)
    assert chunked.recomputes_by_vocabulary(torch.device("cuda"), torch.float32)
    half = dataclasses.replace(case, **{n: getattr(case, n).half() for n in ("hidden", "weight", "bias")})
    oracle, result = fp64_oracle(half), run_impl(half, "torch", torch.float16, "cpu")
    for key in ("loss", "grad_hidden", "grad_weight", "grad_bias"):
        # fp32 math on the fp16 inputs, each gradient rounded once to fp16 (2**-11)
        assert _rel_error(result[key], oracle[key]) <= 2**-10, key


def test_rowchunk_without_torchs_fp32_output_gemm_refuses_instead_of_upcasting(monkeypatch):
    # as on a GPU whose torch lacks mm / addmm with out_dtype (CPU tensors have none: only the interpreter's
    # fp32 fallback hides that, so pretend there is no interpreter)
    monkeypatch.setattr(rowchunk, "INTERPRET", False)
    case = _bf16(make_case(seed=1, num_rows=8, hidden_size=16, vocab_size=32, num_pairs=2, ignore_fraction=0.0))
    with pytest.raises(RuntimeError, match="out_dtype=torch.float32.*impl='triton'"):
        run_impl(case, "rowchunk", torch.bfloat16, "cpu")


def test_rowchunk_refuses_a_block_wider_than_one_warp():
    case = make_case(seed=1, num_rows=8, hidden_size=16, vocab_size=32, num_pairs=2, ignore_fraction=0.0)
    with pytest.raises(ValueError, match="block_v <= 128 for torch.float32"):
        run_impl(case, "rowchunk", torch.float32, "cpu", block_v=256)
    with pytest.raises(ValueError, match="block_v <= 256 for torch.bfloat16"):
        run_impl(_bf16(case), "rowchunk", torch.bfloat16, "cpu", block_v=512)


def test_the_probe_makes_the_calls_the_backends_make():
    from sftmix_trl.kernels.gemm import has_fp32_out_gemm

    # torch has no CPU kernel for them (the interpreter's tests take the fp32 fallback); the meta device has them
    assert not has_fp32_out_gemm("cpu", torch.bfloat16)
    assert has_fp32_out_gemm("meta", torch.bfloat16)


def test_launches_run_under_the_tensors_cuda_device():
    guard = device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(device_guard(torch.device("cpu")), torch.cuda.device)
