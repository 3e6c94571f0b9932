"""Inputs for the kernel tests, and running one implementation on them in the oracle's output format."""

import torch
from kernel_oracle import Case

from sftmix_trl.kernels import SFTMixLossOptions, sftmix_linear_cross_entropy


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
    """Random inputs in fp32 on CPU.

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
    ignored = torch.rand(num_rows, generator=gen) < ignore_fraction
    valid_rows = torch.nonzero(~ignored).flatten()
    valid_rows = valid_rows[torch.randperm(valid_rows.numel(), generator=gen)]
    if pair_fraction is not None:
        num_pairs = int(pair_fraction * valid_rows.numel()) // 2
    num_distinct = 2 * num_pairs - self_pairs
    assert valid_rows.numel() >= num_distinct, "not enough valid rows for the requested pairs"
    p_rows = valid_rows[:num_pairs]
    q_rows = torch.cat([p_rows[:self_pairs], valid_rows[num_pairs:num_distinct]])
    if same_targets:
        targets[q_rows] = targets[p_rows]
    targets[ignored] = -100
    if lam == "beta":
        # Beta(0.5, 0.5) is the arcsine law: sin^2(pi U / 2), U uniform (seeded, unlike torch.distributions)
        mix_lambda = torch.sin(torch.rand(num_pairs, generator=gen) * torch.pi / 2).square()
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
        mix_index=torch.stack([p_rows, q_rows], dim=1),
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
