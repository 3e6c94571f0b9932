"""Bad input gets a clear error before any work; options are validated; impl resolution."""

import pytest
import torch
from kernel_cases import make_case

from sftmix_trl.kernels import SFTMixLossOptions, functional, sftmix_linear_cross_entropy
from sftmix_trl.kernels.functional import resolve_impl


def _args(case):
    return dict(
        hidden=case.hidden,
        weight=case.weight,
        targets=case.targets,
        mix_index=case.mix_index,
        mix_lambda=case.mix_lambda,
        mix_weight=case.mix_weight,
        bias=case.bias,
    )


def _first_ignored_row(case):
    return int(torch.nonzero(case.targets == -100)[0])


BAD_INPUTS = {
    "hidden_3d": (lambda c, a: a.update(hidden=a["hidden"][None]), ValueError, "flatten"),
    "hidden_size_mismatch": (lambda c, a: a.update(weight=a["weight"][:, :-1]), ValueError, "on D"),
    "dtype_mismatch": (lambda c, a: a.update(weight=a["weight"].bfloat16()), TypeError, "differs from hidden"),
    "integer_hidden": (lambda c, a: a.update(hidden=a["hidden"].long()), TypeError, "floating point"),
    "float_targets": (lambda c, a: a.update(targets=a["targets"].float()), TypeError, "integer"),
    "targets_length": (lambda c, a: a.update(targets=a["targets"][:-1]), ValueError, r"targets must be \(N,\)"),
    "target_past_vocab": (
        lambda c, a: a["targets"].__setitem__(int(c.mix_index[0, 0]), c.weight.shape[0]),
        ValueError,
        r"targets must be in \[0, 123\)",
    ),
    "negative_target": (lambda c, a: a["targets"].__setitem__(0, -5), ValueError, "or ignore_index=-100"),
    "mix_index_shape": (lambda c, a: a.update(mix_index=a["mix_index"][:, :1]), ValueError, r"\(P, 2\)"),
    "float_mix_index": (lambda c, a: a.update(mix_index=a["mix_index"].float()), TypeError, "integer"),
    "mix_row_out_of_range": (
        lambda c, a: a["mix_index"].__setitem__((0, 1), c.hidden.shape[0]),
        ValueError,
        r"mix_index rows must be in \[0, N=47\)",
    ),
    "mix_row_ignored": (
        lambda c, a: a["mix_index"].__setitem__((1, 0), _first_ignored_row(c)),
        ValueError,
        "touch ignored rows",
    ),
    "row_in_two_positions": (
        lambda c, a: a["mix_index"].__setitem__((2, 1), c.mix_index[0, 0]),
        ValueError,
        "at most one mixed position",
    ),
    "nan_lambda": (lambda c, a: a["mix_lambda"].__setitem__(3, float("nan")), ValueError, "mix_lambda must be finite"),
    "lambda_above_one": (lambda c, a: a["mix_lambda"].__setitem__(0, 1.5), ValueError, r"in \[0, 1\]"),
    "inf_weight": (lambda c, a: a["mix_weight"].__setitem__(0, float("inf")), ValueError, "mix_weight must be finite"),
    "lambda_length": (
        lambda c, a: a.update(mix_lambda=a["mix_lambda"][:-1]),
        ValueError,
        r"mix_lambda must be \(P,\)",
    ),
    "bias_shape": (lambda c, a: a.update(bias=a["bias"][:-1]), ValueError, r"bias must be \(V,\)"),
    "zero_normalizer": (lambda c, a: a.update(ntp_normalizer=0), ValueError, "ntp_normalizer must be finite and > 0"),
    "zero_tensor_normalizer": (
        lambda c, a: a.update(ntp_normalizer=torch.tensor(0.0)),
        ValueError,
        "ntp_normalizer must be finite and > 0",
    ),
    "ntp_mask_length": (
        lambda c, a: a.update(ntp_mask=torch.ones(c.hidden.shape[0] - 1, dtype=torch.bool)),
        ValueError,
        r"ntp_mask must be \(N,\)",
    ),
    "integer_ntp_mask": (
        lambda c, a: a.update(ntp_mask=torch.ones(c.hidden.shape[0], dtype=torch.long)),
        TypeError,
        "ntp_mask must be a bool tensor",
    ),
    "vector_normalizer": (
        lambda c, a: a.update(ntp_normalizer=torch.ones(2)),
        ValueError,
        "ntp_normalizer must be a 0-dim tensor",
    ),
}


@pytest.mark.parametrize("impl", ["torch", "reference"])
@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_raises_clear_error(name, impl):
    case = make_case(seed=1)
    args = _args(case)
    args = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    mutate, error, message = BAD_INPUTS[name]
    mutate(case, args)
    with pytest.raises(error, match=message):
        sftmix_linear_cross_entropy(**args, impl=impl)


def test_validate_false_skips_the_data_checks():
    """The trainer may switch the (host-syncing) data checks off; shape checks still run."""
    case = make_case(seed=1)
    args = _args(case)
    args["mix_lambda"] = args["mix_lambda"].clone()
    args["mix_lambda"][0] = float("nan")
    out = sftmix_linear_cross_entropy(**args, impl="torch", validate=False)
    assert torch.isnan(out.mixup_loss)
    with pytest.raises(ValueError, match="on D"):
        sftmix_linear_cross_entropy(**{**args, "weight": args["weight"][:, :-1]}, validate=False)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(impl="cuda"), "impl must be one of"),
        (dict(mixup_coef=-0.1), "mixup_coef"),
        (dict(mixup_coef=float("nan")), "mixup_coef"),
        (dict(logit_softcap=0.0), "logit_softcap"),
        (dict(chunk_rows=1), "chunk_rows"),
        (dict(block_v=24), "block_v must be"),
        (dict(block_d=8), "block_d must be"),
        (dict(v_splits=0), "v_splits"),
    ],
)
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SFTMixLossOptions(**kwargs)


def test_triton_refuses_fp64_and_names_the_alternative():
    case = make_case(seed=1)
    args = {
        k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in _args(case).items()
    }
    with pytest.raises(TypeError, match="use impl='torch'"):
        sftmix_linear_cross_entropy(**args, impl="triton")


def test_impl_resolution(monkeypatch):
    assert resolve_impl("auto", torch.device("cpu"), torch.bfloat16) == "torch"
    assert resolve_impl("reference", torch.device("cpu"), torch.float32) == "reference"
    # on CUDA, the cost model's choice for half inputs, the tf32x3 kernels for fp32 (resolution only: no GPU needed;
    # the probe of torch's fp32-output GEMM answered as a GPU's torch would)
    monkeypatch.setattr(functional, "has_fp32_out_gemm", lambda device_type, dtype: True)
    assert resolve_impl("auto", torch.device("cuda"), torch.bfloat16) == "rowchunk"
    # fp16: the Triton backends refuse it (an fp16 G scaled once per batch loses small rows' tails), torch runs it
    assert resolve_impl("auto", torch.device("cuda"), torch.float16) == "torch"
    assert resolve_impl("auto", torch.device("cuda"), torch.float32) == "triton"
    # a torch without that GEMM: rowchunk's products would fail, so the fused kernels
    monkeypatch.setattr(functional, "has_fp32_out_gemm", lambda device_type, dtype: False)
    assert resolve_impl("auto", torch.device("cuda"), torch.bfloat16) == "triton"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for impl in ("triton", "rowchunk"):
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            resolve_impl(impl, torch.device("cpu"), torch.float32)


@pytest.mark.gpu
def test_device_mismatch():
    case = make_case(seed=1)
    args = _args(case)
    args["hidden"] = args["hidden"].cuda()
    with pytest.raises(ValueError, match="move it"):
        sftmix_linear_cross_entropy(**args)
