"""Functional entry point of the fused SFTMix loss, and the module that wraps it."""

import dataclasses
import os

import torch

from .function import fused_sftmix_loss
from .gemm import has_fp32_out_gemm
from .options import SFTMixLossOptions
from .outputs import SFTMixLossOutput
from .reference import sftmix_loss_reference
from .validation import check_data, check_metadata


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_impl(impl: str, device: torch.device, dtype: torch.dtype) -> str:
    """``auto`` -> for CUDA tensors with Triton installed, rowchunk for bf16 (the cost model's fastest) where torch
    has a GEMM with fp32 output for it, triton otherwise and for fp32 (tf32x3 tensor cores; cuBLAS would run fp32
    without them); torch for fp16 (computed in fp32: the Triton backends refuse fp16, see `triton_sftmix`) and
    without CUDA or Triton. Checks that the Triton backends can run."""
    if impl == "auto":
        if device.type == "cuda" and triton_available() and dtype != torch.float16:
            # rowchunk's products need torch's fp32-output GEMM of bf16 operands (``out_dtype``); without it, triton
            bf16 = dtype == torch.bfloat16
            return "rowchunk" if bf16 and has_fp32_out_gemm(device.type, dtype) else "triton"
        return "torch"
    if impl in ("triton", "rowchunk"):
        if not triton_available():
            raise RuntimeError(f"impl={impl!r} needs the triton package; install it or use impl='torch'.")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                f"impl={impl!r} needs CUDA tensors (got {device.type}); use impl='torch', or set TRITON_INTERPRET=1 "
                "before importing sftmix_trl.kernels to run the kernels under Triton's CPU interpreter."
            )
    return impl


def resolve_normalizer(ntp_normalizer, targets: torch.Tensor, ignore_index: int, ntp_mask=None) -> torch.Tensor:
    """The NTP normalizer as a 0-dim fp32 tensor on the targets' device, without a host sync.

    None -> the number of rows with an NTP term (a target, and inside ``ntp_mask``; at least 1); a number -> that
    number; a tensor (TRL's ``num_items_in_batch``) -> its value.
    """
    if ntp_normalizer is None:
        has_ntp = targets != ignore_index if ntp_mask is None else (targets != ignore_index) & ntp_mask
        return has_ntp.sum().clamp(min=1).to(torch.float32)
    if isinstance(ntp_normalizer, torch.Tensor):
        return ntp_normalizer.detach().reshape(()).to(device=targets.device, dtype=torch.float32)
    return torch.full((), float(ntp_normalizer), dtype=torch.float32, device=targets.device)


def sftmix_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mix_index: torch.Tensor,
    mix_lambda: torch.Tensor,
    mix_weight: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ntp_mask: torch.Tensor | None = None,
    ntp_normalizer: float | int | torch.Tensor | None = None,
    mixup_coef: float = 0.2,
    ignore_index: int = -100,
    impl: str = "auto",
    logit_softcap: float | None = None,
    dft: bool = False,
    validate: bool = True,
    options: SFTMixLossOptions | None = None,
) -> SFTMixLossOutput:
    r"""SFTMix loss of an LM head, fused with its projection.

    ``loss = sum_{valid n} w_n [lse(z_n) - z_n[t_n]] / ntp_normalizer
           + mixup_coef * sum_k mix_weight_k * [lse(z~_k) - lam_k z~_k[t_p] - (1 - lam_k) z~_k[t_q]]``
    with ``z_n = W h_n + b``, ``z~_k = W (lam_k h_p + (1 - lam_k) h_q) + b = lam_k z_p + (1 - lam_k) z_q``, and
    ``w_n = 1``, or with ``dft`` the row's own probability of its target ``exp(z_n[t_n] - lse(z_n))``, detached.

    Args:
        hidden: (N, D) last hidden states (the input of the LM head); fp32, bf16, fp16 (fp64: torch / reference).
        weight: (V, D) LM-head weight, same dtype as ``hidden``.
        targets: (N,) integer next-token targets; ``ignore_index`` where a row has no NTP loss.
        mix_index: (P, 2) integer rows (p, q) mixed together; each must be a valid row, and a row sits in at most
            one mixed position ((n, n) is allowed). Shape (0, 2) for no mixing.
        mix_lambda: (P,) lambda of each mixed position, in [0, 1].
        mix_weight: (P,) weight of each mixed position inside the mixup term.
        bias: optional (V,) LM-head bias.
        ntp_mask: optional (N,) bool: the rows whose NTP term counts. A row outside it keeps its target for the
            mixup term but adds no NTP loss and no metrics (the paper's NTP ablations: NTP on one half only, or
            none). None: every row with a target.
        ntp_normalizer: None (the number of rows with an NTP term), a number, or a 0-dim tensor such as TRL's
            ``num_items_in_batch`` (used on the device, no host sync).
        mixup_coef, ignore_index, impl, logit_softcap, dft, validate: see `SFTMixLossOptions`.
        options: an `SFTMixLossOptions` that replaces the six keyword arguments above when given.

    Returns:
        `SFTMixLossOutput`: the differentiable ``loss`` and detached parts and metrics, all tensors on the device.
    """
    if options is None:
        options = SFTMixLossOptions(
            mixup_coef=mixup_coef,
            ignore_index=ignore_index,
            logit_softcap=logit_softcap,
            dft=dft,
            impl=impl,
            validate=validate,
        )
    check_metadata(hidden, weight, targets, mix_index, mix_lambda, mix_weight, bias, ntp_normalizer, ntp_mask)
    resolved = resolve_impl(options.impl, hidden.device, hidden.dtype)
    if options.validate:
        check_data(hidden, weight, targets, mix_index, mix_lambda, mix_weight, ntp_normalizer, options.ignore_index)
    normalizer = resolve_normalizer(ntp_normalizer, targets, options.ignore_index, ntp_mask)
    targets, mix_index = targets.long(), mix_index.long()
    if resolved == "reference":
        return sftmix_loss_reference(
            hidden,
            weight,
            targets,
            mix_index,
            mix_lambda,
            mix_weight,
            bias=bias,
            ntp_mask=ntp_mask,
            ntp_normalizer=normalizer,
            mixup_coef=options.mixup_coef,
            ignore_index=options.ignore_index,
            logit_softcap=options.logit_softcap,
            dft=options.dft,
        )
    loss, *parts = fused_sftmix_loss(
        hidden,
        weight,
        bias,
        targets,
        ntp_mask,
        mix_index,
        mix_lambda,
        mix_weight,
        normalizer,
        dataclasses.replace(options, impl=resolved),
    )
    return SFTMixLossOutput(loss, *(part.detach() for part in parts))


class SFTMixLinearCrossEntropy(torch.nn.Module):
    """`sftmix_linear_cross_entropy` as a module holding its `SFTMixLossOptions`.

    ``SFTMixLinearCrossEntropy(mixup_coef=0.2)(hidden, weight, targets, mix_index, mix_lambda, mix_weight)``
    """

    def __init__(self, options: SFTMixLossOptions | None = None, **option_kwargs):
        super().__init__()
        if options is not None and option_kwargs:
            raise TypeError("pass either an SFTMixLossOptions or keyword options, not both.")
        self.options = options if options is not None else SFTMixLossOptions(**option_kwargs)

    def forward(
        self, hidden, weight, targets, mix_index, mix_lambda, mix_weight, bias=None, ntp_mask=None, ntp_normalizer=None
    ) -> SFTMixLossOutput:
        return sftmix_linear_cross_entropy(
            hidden,
            weight,
            targets,
            mix_index,
            mix_lambda,
            mix_weight,
            bias=bias,
            ntp_mask=ntp_mask,
            ntp_normalizer=ntp_normalizer,
            options=self.options,
        )

    def extra_repr(self) -> str:
        return repr(self.options)
