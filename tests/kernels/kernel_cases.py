"""Inputs for the kernel tests (`make_case`, the named `CASES`), running one implementation on them in the oracle's
output format (`run_impl`), and comparing the two (`oracle_errors`, `assert_metrics`)."""

import pytest
import torch
from kernel_oracle import Case

from bench.inputs import beta_half_lambdas, ignored_and_valid_rows, pairs_of
from sftmix_trl.kernels import SFTMixLossOptions, sftmix_linear_cross_entropy

IMPLS = ["reference", "torch", "triton", "rowchunk"]
FUSED = ["torch", "triton", "rowchunk"]
TENSOR_KEYS = ("loss", "ntp_loss", "mixup_loss", "grad_hidden", "grad_weight", "grad_bias")

CASES = {
    "odd_shapes": dict(),
    "lam_zero_one": dict(lam="zero_one", num_pairs=12),
    "same_targets": dict(same_targets=True),
    "no_pairs": dict(num_pairs=0),
    "self_mixed_rows": dict(self_pairs=3, num_pairs=10),
    # 2P > N: the self-mixed rows cannot all borrow an unpaired row
    "self_mixed_crowded": dict(num_rows=9, ignore_fraction=0.0, num_pairs=6, self_pairs=4),
    "peaked": dict(peaked=True),
    "softcap": dict(peaked=True, logit_softcap=5.0),
    "frozen_head_no_bias": dict(bias=False, requires_grad=("hidden",), ntp_normalizer=57.0),
    "tensor_normalizer": dict(ntp_normalizer=torch.tensor(80.0), mixup_coef=0.7, ignore_fraction=0.6, num_pairs=5),
    # the NTP ablations: mixed rows outside ntp_mask keep their targets for the mixup term only
    "ntp_mask": dict(ntp_mask_fraction=0.5, num_pairs=12),
    "ntp_mask_none": dict(ntp_mask_fraction=0.0, num_pairs=12),
    "ntp_mask_self_mixed_crowded": dict(
        num_rows=9, ignore_fraction=0.0, num_pairs=6, self_pairs=4, ntp_mask_fraction=0.5
    ),
}


def make_case(
    seed=0,
    num_rows=47,
    hidden_size=31,
    vocab_size=123,
    num_pairs=9,
    ignore_fraction=0.3,
    lam="beta",
    bias=True,
    same_targets=False,
    self_pairs=0,
    peaked=False,
    pair_fraction=None,
    ntp_mask_fraction=None,
    **case_kwargs,
) -> Case:
    """Random inputs in fp32 on CPU, drawn with the benchmarks' generator pieces (`bench.inputs`).

    ``lam``: "beta" (Beta(0.5, 0.5) samples), "zero_one" (alternating exact 0 and 1) or a number.
    ``peaked``: some rows of W are scaled copies of some hidden rows, so those rows' softmax is nearly one-hot.
    ``self_pairs``: the first ``self_pairs`` mixed positions mix a row with itself.
    ``pair_fraction``: when given, overrides ``num_pairs`` with this fraction of the valid rows in pairs.
    ``ntp_mask_fraction``: when given, a random ``ntp_mask`` keeps the NTP term of about this fraction of the rows.
    """
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_rows, hidden_size, generator=gen)
    weight = torch.randn(vocab_size, hidden_size, generator=gen) / hidden_size**0.5
    targets = torch.randint(0, vocab_size, (num_rows,), generator=gen)
    if peaked:
        # W[t_n] = 4 h_n / |h_n|: logit z_n[t_n] ~ 4 sqrt(D) dominates; the gradient's p - 1 nearly cancels
        hot = torch.arange(0, num_rows, 2)
        weight[targets[hot]] = 4 * hidden[hot] / hidden[hot].norm(dim=1, keepdim=True)
    ignored, valid_rows = ignored_and_valid_rows(num_rows, ignore_fraction, gen)
    if pair_fraction is not None:
        num_pairs = int(pair_fraction * valid_rows.numel()) // 2
    num_distinct = 2 * num_pairs - self_pairs
    assert valid_rows.numel() >= num_distinct, "not enough valid rows for the requested pairs"
    mix_index = pairs_of(valid_rows, num_pairs, self_pairs)
    if same_targets:
        targets[mix_index[:, 1]] = targets[mix_index[:, 0]]
    targets[ignored] = -100
    if lam == "beta":
        mix_lambda = beta_half_lambdas(num_pairs, gen)
    elif lam == "zero_one":
        mix_lambda = (torch.arange(num_pairs) % 2).float()
    else:
        mix_lambda = torch.full((num_pairs,), float(lam))
    if ntp_mask_fraction is not None:
        case_kwargs["ntp_mask"] = torch.rand(num_rows, generator=gen) < ntp_mask_fraction
    return Case(
        hidden=hidden,
        weight=weight,
        targets=targets,
        mix_index=mix_index,
        mix_lambda=mix_lambda,
        mix_weight=torch.rand(num_pairs, generator=gen) / max(num_pairs, 1),
        bias=torch.randn(vocab_size, generator=gen) if bias else None,
        **case_kwargs,
    )


def run_impl(case: Case, impl: str, dtype=torch.float32, device="cpu", **option_kwargs):
    """Run ``impl`` on the case (inputs cast to ``dtype`` on ``device``); same keys as the oracles' output."""
    leaves = {}
    for name in ("hidden", "weight", "bias"):
        tensor = getattr(case, name)
        if tensor is not None:
            tensor = tensor.detach().to(device=device, dtype=dtype).requires_grad_(name in case.requires_grad)
        leaves[name] = tensor
    normalizer = case.ntp_normalizer
    if isinstance(normalizer, torch.Tensor):
        normalizer = normalizer.to(device)
    options = SFTMixLossOptions(
        mixup_coef=case.mixup_coef,
        ignore_index=case.ignore_index,
        logit_softcap=case.logit_softcap,
        impl=impl,
        **option_kwargs,
    )
    out = sftmix_linear_cross_entropy(
        leaves["hidden"],
        leaves["weight"],
        case.targets.to(device),
        case.mix_index.to(device),
        case.mix_lambda.to(device),
        case.mix_weight.to(device),
        bias=leaves["bias"],
        ntp_mask=case.ntp_mask.to(device) if case.ntp_mask is not None else None,
        ntp_normalizer=normalizer,
        options=options,
    )
    for name in ("loss", "ntp_loss", "mixup_loss", "num_tokens", "num_correct", "entropy"):
        value = getattr(out, name)
        assert isinstance(value, torch.Tensor) and value.device.type == torch.device(device).type, name
        assert name == "loss" or not value.requires_grad, f"{name} must be detached"
    (out.loss * case.upstream).backward()
    return {
        "loss": out.loss.detach().cpu().double(),
        "ntp_loss": out.ntp_loss.cpu().double(),
        "mixup_loss": out.mixup_loss.cpu().double(),
        "num_tokens": int(out.num_tokens),
        "num_correct": int(out.num_correct),
        "entropy": float(out.entropy),
        **{f"grad_{name}": t.grad.cpu().double() for name, t in leaves.items() if t is not None and t.requires_grad},
    }


def rel_error(actual, expected):
    """max |actual - expected| / max |expected| (its denominator at least 1e-12)."""
    return float((actual - expected).abs().max() / expected.abs().max().clamp(min=1e-12))


def oracle_errors(result, oracle):
    """`rel_error` of each tensor of ``result`` (a `run_impl` output) against the oracle's."""
    return {key: rel_error(result[key], oracle[key]) for key in TENSOR_KEYS if key in oracle}


def assert_metrics(result, oracle):
    """The metrics equal the oracle's (the entropy to 1e-4), and the same inputs have gradients."""
    assert result["num_tokens"] == oracle["num_tokens"]
    assert result["num_correct"] == oracle["num_correct"]
    assert result["entropy"] == pytest.approx(oracle["entropy"], rel=1e-4, abs=1e-5)
    assert {k for k in result if k.startswith("grad_")} == {k for k in oracle if k.startswith("grad_")}
