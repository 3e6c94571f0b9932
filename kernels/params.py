"""The per-call state the autograd Function hands to a fused backend beside the head's tensors (as cut-cross-entropy's
``CCEParams``), and the gradient scale the backends divide by."""

from dataclasses import dataclass

import torch

from .layout import RowLayout
from .options import SFTMixLossOptions


@dataclass(frozen=True)
class LossParams:
    """One call of the loss, as a backend's ``loss_and_grads(hidden, weight, bias, params)`` reads it.

    Args:
        layout (`RowLayout`): the rows in slots (`kernels/layout.py`).
        options (`SFTMixLossOptions`): the call's options, ``impl`` resolved.
        ntp_scale (`torch.Tensor`): 0-dim dL/dNLL_n for an upstream gradient of 1: 1 / normalizer, in the
            accumulation dtype (fp32; fp64 for fp64 inputs).
        mix_scale (`torch.Tensor`): (P,) dL/dl_mix_k for an upstream gradient of 1: mu * w_k, same dtype.
        needs_grad (`tuple[bool, bool, bool]`): whether hidden, weight and bias need a gradient.
    """

    layout: RowLayout
    options: SFTMixLossOptions
    ntp_scale: torch.Tensor
    mix_scale: torch.Tensor
    needs_grad: tuple[bool, bool, bool]

    @property
    def any_grad(self) -> bool:
        return any(self.needs_grad)

    def grad_scale(self, dtype: torch.dtype) -> torch.Tensor:
        """max(ntp_scale, max_k mix_scale_k), 0-dim in ``dtype``: a backend divides both scales by it, so that the
        logit gradient stays within |G| <= 2 whatever the normalizer, and the Function multiplies it back in."""
        scale = self.ntp_scale.to(dtype).reshape(())
        if self.mix_scale.numel():
            scale = torch.maximum(scale, self.mix_scale.to(dtype).max())
        return scale
