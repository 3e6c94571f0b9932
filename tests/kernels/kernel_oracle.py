"""Independent fp64 evaluations of the SFTMix loss, for the kernel tests.

Written from the formula in docs/design.md §2, position by position in logit space, with PyTorch autograd in fp64 for the
gradients; `h_mix_oracle` instead materializes the interpolated hidden states (the linearity check). Neither shares
code with `sftmix_trl.kernels`.
"""

from dataclasses import dataclass, field

import torch


@dataclass
class Case:
    """Inputs of one loss evaluation (any dtype / device); `grads` of the differentiable inputs."""

    hidden: torch.Tensor
    weight: torch.Tensor
    targets: torch.Tensor
    mix_index: torch.Tensor
    mix_lambda: torch.Tensor
    mix_weight: torch.Tensor
    bias: torch.Tensor | None = None
    ntp_mask: torch.Tensor | None = None
    ntp_normalizer: float | torch.Tensor | None = None
    mixup_coef: float = 0.2
    ignore_index: int = -100
    logit_softcap: float | None = None
    upstream: float = 1.0
    requires_grad: tuple = ("hidden", "weight", "bias")
    kwargs: dict = field(default_factory=dict)


def _capped(logits, softcap):
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def _leaves(case: Case, dtype, device):
    """Fresh leaf copies of hidden, weight and bias in ``dtype``, requiring grad as the case says."""
    out = {}
    for name in ("hidden", "weight", "bias"):
        tensor = getattr(case, name)
        if tensor is not None:
            tensor = tensor.detach().to(device=device, dtype=dtype).requires_grad_(name in case.requires_grad)
        out[name] = tensor
    return out


def _has_ntp(case: Case, targets):
    """The rows with a next-token term: a target, and inside the case's ntp_mask when it has one."""
    has_target = targets != case.ignore_index
    return has_target if case.ntp_mask is None else has_target & case.ntp_mask.cpu()


def _normalizer(case: Case, targets):
    if case.ntp_normalizer is None:
        return max(int(_has_ntp(case, targets).sum()), 1)
    return float(case.ntp_normalizer)


def _finish(case: Case, loss, ntp, mixup, leaves, logits, targets):
    (loss * case.upstream).backward()
    valid = _has_ntp(case, targets)
    with torch.no_grad():
        probs = torch.softmax(logits, dim=-1)
        entropy = -(probs * torch.log_softmax(logits, dim=-1)).sum(-1)
    return {
        "loss": loss.detach(),
        "ntp_loss": ntp.detach(),
        "mixup_loss": mixup.detach(),
        "num_tokens": int(valid.sum()),
        "num_correct": int(((logits.argmax(-1) == targets) & valid).sum()),
        "entropy": float(entropy[valid].mean()) if valid.any() else 0.0,
        **{f"grad_{name}": t.grad for name, t in leaves.items() if t is not None and t.requires_grad},
    }


def fp64_oracle(case: Case):
    """Loss, parts, metrics and gradients (of ``upstream * loss``) in fp64, one mixed position at a time."""
    leaves = _leaves(case, torch.float64, "cpu")
    hidden, weight, bias = leaves["hidden"], leaves["weight"], leaves["bias"]
    targets = case.targets.cpu()
    raw = hidden @ weight.T + (bias if bias is not None else 0)
    logits = _capped(raw, case.logit_softcap)
    # zero, but on the graph: a case with every row ignored and no pair still has (zero) gradients
    ntp = 0.0 * raw.sum()
    for n, (target, has_ntp) in enumerate(zip(targets.tolist(), _has_ntp(case, targets).tolist())):
        if has_ntp:
            ntp = ntp + torch.logsumexp(logits[n], 0) - logits[n, target]
    ntp = ntp / _normalizer(case, targets)
    mixup = 0.0 * raw.sum()
    for (p, q), lam, w in zip(case.mix_index.tolist(), case.mix_lambda.double().tolist(), case.mix_weight.tolist()):
        mixed = _capped(lam * raw[p] + (1 - lam) * raw[q], case.logit_softcap)
        soft_nll = torch.logsumexp(mixed, 0) - lam * mixed[targets[p]] - (1 - lam) * mixed[targets[q]]
        mixup = mixup + w * soft_nll
    return _finish(case, ntp + case.mixup_coef * mixup, ntp, mixup, leaves, logits, targets)


def h_mix_oracle(case: Case):
    """The naive route in fp64: materialize h_mix = lam h_p + (1 - lam) h_q and run the head on it."""
    leaves = _leaves(case, torch.float64, "cpu")
    hidden, weight, bias = leaves["hidden"], leaves["weight"], leaves["bias"]
    targets = case.targets.cpu()
    head = torch.nn.functional.linear
    logits = _capped(head(hidden, weight, bias), case.logit_softcap)
    valid = _has_ntp(case, targets)
    safe = torch.where(valid, targets, 0)
    nll = torch.logsumexp(logits, -1) - logits.gather(1, safe[:, None]).squeeze(1)
    ntp = (nll * valid).sum() / _normalizer(case, targets)
    p, q = case.mix_index.cpu().unbind(1)
    lam = case.mix_lambda.cpu().double()
    mixed_hidden = lam[:, None] * hidden[p] + (1 - lam[:, None]) * hidden[q]
    mixed = _capped(head(mixed_hidden, weight, bias), case.logit_softcap)
    soft_targets = torch.zeros_like(mixed)
    soft_targets[torch.arange(len(p)), targets[p]] += lam
    soft_targets[torch.arange(len(p)), targets[q]] += 1 - lam
    soft_nll = -(soft_targets * torch.log_softmax(mixed, -1)).sum(-1)
    mixup = (case.mix_weight.cpu().double() * soft_nll).sum()
    return _finish(case, ntp + case.mixup_coef * mixup, ntp, mixup, leaves, logits, targets)
