"""Every implementation of the SFTMix loss against an fp64 evaluation of the formula: loss, parts, metrics, grads."""

import dataclasses
import os

import pytest
import torch
from kernel_cases import CASES, FUSED, IMPLS, assert_metrics, make_case, oracle_errors, rel_error, run_impl
from kernel_oracle import fp64_oracle, h_mix_oracle

from sftmix_trl.kernels import SFTMixLinearCrossEntropy, sftmix_linear_cross_entropy

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _skip_unavailable(impl, device):
    if impl in ("triton", "rowchunk") and device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton on CPU needs TRITON_INTERPRET=1 (set by conftest only when there is no CUDA)")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case_name", list(CASES))
def test_fp32_matches_fp64_formula(case_name, impl, device):
    _skip_unavailable(impl, device)
    case = make_case(seed=list(CASES).index(case_name), upstream=1.7, **CASES[case_name])
    oracle = fp64_oracle(case)
    result = run_impl(case, impl, torch.float32, device)
    assert_metrics(result, oracle)
    errors = oracle_errors(result, oracle)
    assert max(errors.values()) < 2e-5, errors


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize("case_name", ["odd_shapes", "peaked", "softcap"])
def test_bf16_no_worse_than_pytorch_bf16(case_name, impl, device):
    """bf16 inputs: each error against fp64 at most 1.5x the dense PyTorch bf16 one, plus a little."""
    _skip_unavailable(impl, device)
    case = make_case(seed=7, upstream=0.6, **CASES[case_name])
    # the oracle sees exactly the bf16 inputs
    case = dataclasses.replace(case, **{n: getattr(case, n).bfloat16() for n in ("hidden", "weight", "bias")})
    oracle = fp64_oracle(case)
    baseline = oracle_errors(run_impl(case, "reference", torch.bfloat16, device), oracle)
    errors = oracle_errors(run_impl(case, impl, torch.bfloat16, device), oracle)
    for key, error in errors.items():
        assert error <= 1.5 * baseline[key] + 5e-4, (key, errors, baseline)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", FUSED)
def test_logit_space_mixing_equals_autograd_through_h_mix(impl, device):
    """z~ = lam z_p + (1 - lam) z_q is exact: loss and grads equal the naive route through materialized h_mix."""
    _skip_unavailable(impl, device)
    case = make_case(seed=3, num_pairs=15, upstream=-2.0)
    naive = h_mix_oracle(case)
    result = run_impl(case, impl, torch.float32, device)
    assert_metrics(result, naive)
    errors = oracle_errors(result, naive)
    assert max(errors.values()) < 2e-5, errors


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", FUSED)
def test_chunking_and_tiling_do_not_change_the_result(impl, device):
    """Small chunks / blocks, several vocabulary splits and backward chunks (many programs, partial tiles, a partial
    last chunk) give the same numbers."""
    _skip_unavailable(impl, device)
    case = make_case(seed=11, num_rows=70, num_pairs=20, vocab_size=75)
    oracle = fp64_oracle(case)
    options = {
        "torch": dict(chunk_rows=6),
        "triton": dict(block_pairs=16, block_v=16, block_d=16, v_splits=3, vocab_chunk=32),
        # 6 rows of fp32 logits a chunk: 12 chunks, the pairs spread over them, partial vocabulary blocks
        "rowchunk": dict(memory_budget=6 * 75 * 4, block_pairs=16, block_v=16),
    }[impl]
    result = run_impl(case, impl, torch.float32, device, **options)
    assert_metrics(result, oracle)
    errors = oracle_errors(result, oracle)
    assert max(errors.values()) < 2e-5, errors


def test_module_and_auto_match_the_functional_torch_impl():
    case = make_case(seed=5)
    args = (case.hidden, case.weight, case.targets, case.mix_index, case.mix_lambda, case.mix_weight)
    module = SFTMixLinearCrossEntropy(mixup_coef=0.3)
    by_module = module(*args, bias=case.bias)
    by_auto = sftmix_linear_cross_entropy(*args, bias=case.bias, mixup_coef=0.3)
    by_torch = sftmix_linear_cross_entropy(*args, bias=case.bias, mixup_coef=0.3, impl="torch")
    assert "mixup_coef=0.3" in repr(module)
    for name in ("loss", "ntp_loss", "mixup_loss", "num_tokens", "num_correct", "entropy"):
        torch.testing.assert_close(getattr(by_module, name), getattr(by_torch, name), rtol=0, atol=0)
        torch.testing.assert_close(getattr(by_auto, name), getattr(by_torch, name), rtol=0, atol=0)


def test_no_valid_rows_gives_zero_loss_and_zero_grads():
    case = make_case(seed=2, num_pairs=0, ignore_fraction=1.0)
    for impl in IMPLS:
        _skip_unavailable(impl, "cpu")
        result = run_impl(case, impl)
        assert result["num_tokens"] == 0 and result["entropy"] == 0.0
        assert float(result["loss"]) == 0.0 and float(result["grad_hidden"].abs().max()) == 0.0


@pytest.mark.gpu
@pytest.mark.parametrize("impl", FUSED)
def test_no_host_sync_in_the_loss_path(impl):
    """With validate=False (the trainer's setting) forward and backward never synchronize with the host."""
    case = make_case(seed=4)
    hidden = case.hidden.cuda().requires_grad_()
    weight = case.weight.cuda().requires_grad_()
    tensors = [t.cuda() for t in (case.targets, case.mix_index, case.mix_lambda, case.mix_weight)]
    normalizer = torch.tensor(31.0, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = sftmix_linear_cross_entropy(
            hidden, weight, *tensors, ntp_normalizer=normalizer, impl=impl, validate=False
        )
        out.loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert hidden.grad is not None and weight.grad is not None


def _dft_formula(case):
    """DFT's next-token term (each row's NLL times its own detached target probability) plus the unchanged mixup
    term, in fp64 with autograd, position by position."""
    hidden = case.hidden.double().requires_grad_()
    weight = case.weight.double().requires_grad_()
    bias = case.bias.double().requires_grad_()
    logits = hidden @ weight.T + bias
    valid = case.targets != case.ignore_index
    targets = case.targets.clamp(min=0)
    nll = logits.logsumexp(-1) - logits.gather(1, targets[:, None]).squeeze(1)
    ntp = (torch.exp(-nll).detach() * nll)[valid].sum() / valid.sum()
    p, q = case.mix_index.T
    lam = case.mix_lambda.double()
    mixed = lam[:, None] * logits[p] + (1 - lam[:, None]) * logits[q]
    mixed_nll = (
        mixed.logsumexp(-1)
        - lam * mixed.gather(1, targets[p, None]).squeeze(1)
        - (1 - lam) * mixed.gather(1, targets[q, None]).squeeze(1)
    )
    loss = ntp + case.mixup_coef * (case.mix_weight.double() * mixed_nll).sum()
    loss.backward()
    return {"loss": loss.detach(), "grad_hidden": hidden.grad, "grad_weight": weight.grad, "grad_bias": bias.grad}


@pytest.mark.parametrize("impl", ["reference", *FUSED, "auto"])
@pytest.mark.parametrize("peaked", [False, True])
def test_dft_weights_each_next_token_term_by_its_detached_probability(impl, peaked):
    _skip_unavailable(impl, "cpu")
    case = make_case(seed=3, peaked=peaked, mixup_coef=0.5)
    expected = _dft_formula(case)
    result = run_impl(case, impl, torch.float32, "cpu", dft=True)
    for key, value in expected.items():
        assert rel_error(result[key], value) < 2e-5, key
    plain = run_impl(case, impl, torch.float32, "cpu")
    assert plain["ntp_loss"] > result["ntp_loss"], "the weights p_n < 1 lower the next-token term"
    torch.testing.assert_close(plain["mixup_loss"], result["mixup_loss"])
