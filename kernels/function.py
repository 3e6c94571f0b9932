"""One autograd Function over the fused implementations (chunked torch, Triton).

Forward returns the loss and its detached parts and metrics; it keeps the inputs, the row layout and the per-slot
log-sum-exps (O(N) floats). Backward recomputes logits block by block from them: no N x V tensor is kept.
"""

import importlib

import torch
from torch.autograd.function import once_differentiable

from .layout import build_row_layout
from .outputs import reduce_metrics

BACKENDS = {"torch": ".chunked", "triton": ".triton_sftmix"}


def backend_module(impl: str):
    """The module that implements ``forward`` / ``backward`` for ``impl`` (imported on first use: triton is optional)."""
    return importlib.import_module(BACKENDS[impl], __package__)


class SFTMixLinearCrossEntropyFunction(torch.autograd.Function):
    """``apply(hidden, weight, bias, targets, mix_index, mix_lambda, mix_weight, normalizer, options)``.

    ``normalizer`` is a 0-dim tensor and ``options.impl`` is "torch" or "triton" (already resolved). Returns
    ``(loss, ntp_loss, mixup_loss, num_tokens, num_correct, entropy)``; only ``loss`` is differentiable.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, mix_index, mix_lambda, mix_weight, normalizer, options):
        backend = backend_module(options.impl)
        hidden, weight = hidden.contiguous(), weight.contiguous()
        bias = bias.contiguous() if bias is not None else None
        layout = build_row_layout(targets, mix_index, mix_lambda, options.ignore_index)
        stats = backend.forward(hidden, weight, bias, layout, options)
        # L = sum NLL / normalizer + mu * sum_k w_k l_mix_k
        ntp_loss = stats.nll.sum() / normalizer
        mixup_loss = (mix_weight.to(stats.mix_nll.dtype) * stats.mix_nll).sum()
        loss = ntp_loss + options.mixup_coef * mixup_loss
        valid = layout.ntp_targets != options.ignore_index
        num_tokens, num_correct, entropy = reduce_metrics(valid, stats.correct, stats.entropy)

        ctx.save_for_backward(hidden, weight, bias, mix_weight, normalizer)
        ctx.layout, ctx.stats, ctx.options = layout, stats, options
        ctx.mark_non_differentiable(ntp_loss, mixup_loss, num_tokens, num_correct, entropy)
        return loss, ntp_loss.detach(), mixup_loss.detach(), num_tokens, num_correct, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, *_unused_grads):
        hidden, weight, bias, mix_weight, normalizer = ctx.saved_tensors
        options = ctx.options
        grad_loss = grad_loss.to(ctx.stats.lse.dtype)
        ntp_scale = grad_loss / normalizer.to(grad_loss.dtype)
        mix_scale = grad_loss * options.mixup_coef * mix_weight.to(grad_loss.dtype)
        needs_grad = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        grad_hidden, grad_weight, grad_bias = backend_module(options.impl).backward(
            hidden, weight, bias, ctx.layout, options, ctx.stats, ntp_scale, mix_scale, needs_grad
        )
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None


def fused_sftmix_loss(hidden, weight, bias, targets, mix_index, mix_lambda, mix_weight, normalizer, options):
    """Apply the Function; arguments as in its docstring."""
    return SFTMixLinearCrossEntropyFunction.apply(
        hidden, weight, bias, targets, mix_index, mix_lambda, mix_weight, normalizer, options
    )
