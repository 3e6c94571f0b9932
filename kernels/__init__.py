"""Fused SFTMix loss kernels, installed as ``sftmix_trl.kernels``.

This package depends on torch and triton only; it never imports TRL or transformers.

    from sftmix_trl.kernels import sftmix_linear_cross_entropy
    out = sftmix_linear_cross_entropy(hidden, weight, targets, mix_index, mix_lambda, mix_weight)
    out.loss.backward()
"""

from .function import SFTMixLinearCrossEntropyFunction
from .functional import SFTMixLinearCrossEntropy, sftmix_linear_cross_entropy
from .options import SFTMixLossOptions
from .outputs import SFTMixLossOutput

__all__ = [
    "SFTMixLinearCrossEntropy",
    "SFTMixLinearCrossEntropyFunction",
    "SFTMixLossOptions",
    "SFTMixLossOutput",
    "sftmix_linear_cross_entropy",
]
