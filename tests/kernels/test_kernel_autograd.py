"""The fused loss under autograd: its gradients are computed in forward (for an upstream gradient of 1) and scaled in
backward, so they must follow any upstream gradient, survive a retained graph, and be skipped without grad mode."""

import os

import pytest
import torch
from kernel_cases import make_case
from kernel_oracle import fp64_oracle

from sftmix_trl.kernels import SFTMixLossOptions, sftmix_linear_cross_entropy

FUSED = ["torch", "triton", "rowchunk"]
OUTPUTS = ("loss", "ntp_loss", "mixup_loss", "num_tokens", "num_correct", "entropy")


def _skip_unavailable(impl):
    if impl in ("triton", "rowchunk") and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton on CPU needs TRITON_INTERPRET=1 (set by conftest only when there is no CUDA)")


def _leaves(case, requires_grad=True):
    return {
        name: getattr(case, name).detach().clone().requires_grad_(requires_grad)
        for name in ("hidden", "weight", "bias")
    }


def _loss(case, leaves, impl):
    return sftmix_linear_cross_entropy(
        leaves["hidden"],
        leaves["weight"],
        case.targets,
        case.mix_index,
        case.mix_lambda,
        case.mix_weight,
        bias=leaves["bias"],
        impl=impl,
    )


def _rel_error(actual, expected):
    return float((actual.double() - expected).abs().max() / expected.abs().max())


@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize("use", ["negative_scale", "used_twice", "squared"])
def test_gradients_follow_the_upstream_gradient(impl, use):
    """d f(L) / dx = f'(L) dL/dx, whatever reaches the loss: a scale, two uses summed, a value-dependent factor."""
    _skip_unavailable(impl)
    case = make_case(seed=13, peaked=True)
    oracle = fp64_oracle(case)  # gradients of L itself
    leaves = _leaves(case)
    loss = _loss(case, leaves, impl).loss
    if use == "negative_scale":
        total, factor = -0.7 * loss, -0.7
    elif use == "used_twice":
        total, factor = loss + 3 * loss, 4.0
    else:
        total, factor = loss.square(), 2 * float(oracle["loss"])
    total.backward()
    for name, leaf in leaves.items():
        assert _rel_error(leaf.grad, factor * oracle[f"grad_{name}"]) < 2e-5, name


@pytest.mark.parametrize("impl", FUSED)
def test_a_second_backward_through_a_retained_graph_is_refused(impl):
    """Backward scales the gradients computed in forward in place (no second V x D tensor): the first backward gets
    the right gradients, a second one through the retained graph raises instead of returning scaled-twice ones."""
    _skip_unavailable(impl)
    case = make_case(seed=15)
    oracle = fp64_oracle(case)
    leaves = _leaves(case)
    loss = _loss(case, leaves, impl).loss
    first = torch.autograd.grad(3 * loss, list(leaves.values()), retain_graph=True)
    for name, grad in zip(leaves, first):
        assert _rel_error(grad, 3 * oracle[f"grad_{name}"]) < 2e-5, name
    with pytest.raises(RuntimeError, match="second backward through the same graph"):
        loss.backward()


@pytest.mark.parametrize("impl", ["reference", *FUSED])
def test_forward_without_gradients(impl):
    """Under torch.no_grad, and with inputs that need no grad, the outputs are those of a training forward."""
    _skip_unavailable(impl)
    case = make_case(seed=16)
    oracle = fp64_oracle(case)
    trained = _loss(case, _leaves(case), impl)
    with torch.no_grad():
        no_grad = _loss(case, _leaves(case), impl)
    frozen = _loss(case, _leaves(case, requires_grad=False), impl)
    for out in (no_grad, frozen):
        assert not out.loss.requires_grad and out.loss.grad_fn is None
        for name in OUTPUTS:
            torch.testing.assert_close(getattr(out, name), getattr(trained, name), rtol=0, atol=0, msg=name)
    assert _rel_error(no_grad.loss, oracle["loss"]) < 2e-5
    assert int(no_grad.num_tokens) == oracle["num_tokens"] and int(no_grad.num_correct) == oracle["num_correct"]


@pytest.mark.parametrize("requires_grad, passes", [(False, 1), (True, 3)])
def test_torch_impl_multiplies_by_the_head_once_per_pass(requires_grad, passes):
    """Chunked torch: one product with W per chunk for the loss alone; with gradients three (logits, dH, dW), all in
    forward, and none in backward."""
    case = make_case(seed=17, num_rows=40, num_pairs=6, ignore_fraction=0.1)
    leaves = _leaves(case, requires_grad)
    # 6 pairs at 4 per chunk, then 28 unpaired rows at 8 per chunk: 6 chunks
    options = SFTMixLossOptions(impl="torch", chunk_rows=8)
    args = (leaves["hidden"], leaves["weight"], case.targets, case.mix_index, case.mix_lambda, case.mix_weight)
    with torch.profiler.profile() as forward_profile:
        out = sftmix_linear_cross_entropy(*args, bias=leaves["bias"], options=options)
    with torch.profiler.profile() as backward_profile:
        if requires_grad:
            out.loss.backward()
    for profile, expected in ((forward_profile, 6 * passes), (backward_profile, 0)):
        events = profile.key_averages()
        assert sum(e.count for e in events if e.key in ("aten::mm", "aten::addmm", "aten::addmm_")) == expected
