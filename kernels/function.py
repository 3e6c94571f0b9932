"""One autograd Function over the fused implementations (rowchunk, triton, torch; `reference` is plain autograd).

The loss is a scalar, so its gradients for any upstream gradient g are g times those for g = 1. Forward therefore
computes, for the inputs that require grad, the gradients for g = 1 together with the loss (the chunked torch
implementation in the same pass over the head as the logits; rowchunk per row chunk; triton with its chunked
backward right after the forward kernel) and saves them: fp32 accumulators, or, for the Triton backends' dW (rowchunk's
when its budget has no fp32 accumulator), the input dtype (an fp32 V x D copy would cost 2 GB at a 128k vocabulary),
each divided by a backend's ``grad_scale``. Backward multiplies them by
g * grad_scale, in one rounding: into new tensors of the inputs' dtype for the fp32 ones, in place for the others
(no second V x D tensor). No N x V tensor is kept, and without a gradient to compute (`torch.no_grad`, or no input
requiring grad) `fused_sftmix_loss` skips the Function and the gradients.
"""

import contextlib
import importlib

import torch
from torch.autograd.function import once_differentiable

from .layout import build_row_layout
from .outputs import reduce_metrics
from .params import LossParams

BACKENDS = {"torch": ".chunked", "triton": ".triton_sftmix", "rowchunk": ".triton_rowchunk"}


def device_guard(device: torch.device):
    """The context in which the backends run on ``device``: Triton launches on the current CUDA device and its
    stream, which need not be the tensors' (several GPUs in one process, ``device_map="auto"``)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def backend_module(impl: str):
    """The module that implements ``loss_and_grads`` for ``impl`` (imported on first use: triton is optional)."""
    return importlib.import_module(BACKENDS[impl], __package__)


def sftmix_loss_and_grads(
    hidden, weight, bias, targets, ntp_mask, mix_index, mix_lambda, mix_weight, normalizer, options, needs_grad
):
    """((loss, ntp_loss, mixup_loss, num_tokens, num_correct, entropy), (dL/dH, dL/dW, dL/db) / grad_scale,
    grad_scale).

    Arguments as in `SFTMixLinearCrossEntropyFunction`; ``needs_grad`` flags (hidden, weight, bias), and each
    gradient is None unless flagged. The gradients are in the accumulation dtype (fp32; fp64 for fp64 inputs), but
    dW, which the triton backend, the torch backend's recompute schedule (CUDA) and the rowchunk backend (unless its
    memory budget holds an fp32 accumulator) return in the input dtype; ``grad_scale`` is a 0-dim tensor or None (1).
    """
    hidden, weight = hidden.contiguous(), weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    layout = build_row_layout(targets, mix_index, mix_lambda, options.ignore_index, ntp_mask)
    acc_dtype = torch.promote_types(hidden.dtype, torch.float32)
    normalizer = normalizer.to(acc_dtype)
    # upstream gradient 1: dL/dNLL_n = 1 / normalizer, dL/dl_mix_k = mu w_k
    params = LossParams(
        layout, options, ntp_scale=1 / normalizer, mix_scale=options.mixup_coef * mix_weight.to(acc_dtype),
        needs_grad=needs_grad,
    )  # fmt: skip
    # Triton launches on the current CUDA device: make it the tensors' (cuBLAS and torch follow the tensors anyway)
    with device_guard(hidden.device):
        stats, grads, grad_scale = backend_module(options.impl).loss_and_grads(hidden, weight, bias, params)
    # L = sum NLL / normalizer + mu * sum_k w_k l_mix_k
    ntp_loss = stats.nll.sum() / normalizer
    mixup_loss = (mix_weight.to(stats.mix_nll.dtype) * stats.mix_nll).sum()
    loss = ntp_loss + options.mixup_coef * mixup_loss
    valid = layout.ntp_targets != options.ignore_index
    return (loss, ntp_loss, mixup_loss, *reduce_metrics(valid, stats.correct, stats.entropy)), grads, grad_scale


class SFTMixLinearCrossEntropyFunction(torch.autograd.Function):
    """``apply(hidden, weight, bias, targets, ntp_mask, mix_index, mix_lambda, mix_weight, normalizer, options)``.

    ``ntp_mask`` is None or an (N,) bool tensor, ``normalizer`` a 0-dim tensor, and ``options.impl`` "rowchunk",
    "triton" or "torch" (already resolved).
    Returns ``(loss, ntp_loss, mixup_loss, num_tokens, num_correct, entropy)``; only
    ``loss`` is differentiable. Forward computes the gradients of the inputs that require grad (even under
    `torch.no_grad`: use `fused_sftmix_loss` to skip them there); backward returns them times the upstream gradient.
    A gradient already in the inputs' dtype is scaled in place and handed out, so the graph supports one backward:
    a second one (``retain_graph=True``) raises, and needs a new forward.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ntp_mask, mix_index, mix_lambda, mix_weight, normalizer, options):
        needs_grad = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        outputs, grads, grad_scale = sftmix_loss_and_grads(
            hidden, weight, bias, targets, ntp_mask, mix_index, mix_lambda, mix_weight, normalizer, options, needs_grad
        )
        ctx.grads = grads
        ctx.grad_scale = grad_scale
        ctx.input_dtype = hidden.dtype
        ctx.mark_non_differentiable(*outputs[1:])
        return outputs

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, *_unused_grads):
        if ctx.grads is None:
            raise RuntimeError(
                "The fused SFTMix loss computes its gradients in forward and hands them to the first backward; a "
                "second backward through the same graph (retain_graph=True) needs the loss computed again."
            )
        multiplier = grad_loss if ctx.grad_scale is None else grad_loss * ctx.grad_scale
        grads = tuple(_scale(grad, multiplier, ctx.input_dtype) if grad is not None else None for grad in ctx.grads)
        ctx.grads = None
        return *grads, None, None, None, None, None, None, None


def _scale(grad, multiplier, dtype):
    """dL'/dx = g dL/dx for L' = g L (a scalar loss), rounded once after the product: in place when ``grad`` is
    already of ``dtype``, else into a new tensor of ``dtype``."""
    if grad.dtype == dtype:
        return grad.mul_(multiplier)
    return torch.mul(grad, multiplier, out=torch.empty(grad.shape, dtype=dtype, device=grad.device))


def fused_sftmix_loss(hidden, weight, bias, targets, ntp_mask, mix_index, mix_lambda, mix_weight, normalizer, options):
    """The Function's outputs; without a gradient to compute, the same outputs from the forward work alone."""
    inputs = (hidden, weight, bias, targets, ntp_mask, mix_index, mix_lambda, mix_weight, normalizer, options)
    differentiable = (hidden, weight) if bias is None else (hidden, weight, bias)
    if torch.is_grad_enabled() and any(tensor.requires_grad for tensor in differentiable):
        return SFTMixLinearCrossEntropyFunction.apply(*inputs)
    outputs, _, _ = sftmix_loss_and_grads(*inputs, (False, False, False))
    return outputs
