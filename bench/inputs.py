"""Random inputs of the fused SFTMix loss, written once for the benchmarks (`make_inputs`, device-side head tensors)
and the kernel tests (tests/kernels/kernel_cases.py builds its CPU cases from the same pieces): which rows are
ignored, which valid rows are mixed with which, and their lambdas."""

import torch


def ignored_and_valid_rows(num_rows: int, ignore_fraction: float, generator: torch.Generator):
    """(ignored mask, the other rows in a random order): about ``ignore_fraction`` of the rows have no target."""
    ignored = torch.rand(num_rows, generator=generator) < ignore_fraction
    valid_rows = torch.nonzero(~ignored).flatten()
    return ignored, valid_rows[torch.randperm(valid_rows.numel(), generator=generator)]


def pairs_of(valid_rows: torch.Tensor, num_pairs: int, self_pairs: int = 0) -> torch.Tensor:
    """(num_pairs, 2) mixed positions from shuffled valid rows: the p rows first, the q rows after them; the first
    ``self_pairs`` positions mix a row with itself. Needs 2 num_pairs - self_pairs valid rows."""
    p_rows = valid_rows[:num_pairs]
    q_rows = torch.cat([p_rows[:self_pairs], valid_rows[num_pairs : 2 * num_pairs - self_pairs]])
    return torch.stack([p_rows, q_rows], dim=1)


def beta_half_lambdas(num_pairs: int, generator: torch.Generator) -> torch.Tensor:
    """Beta(0.5, 0.5) samples (the paper's mixup lambdas): the arcsine law, sin^2(pi U / 2) for U uniform (seeded,
    unlike torch.distributions)."""
    return torch.sin(torch.rand(num_pairs, generator=generator) * torch.pi / 2).square()


def make_inputs(num_rows, hidden_size, vocab_size, dtype, device, mix_fraction, seed=0, logit_softcap=None):
    """Random head inputs for a benchmark; a tenth of the rows ignored (prompt); ``mix_fraction`` of the rows in
    mixed pairs; ``logit_softcap`` the head's soft cap (None: none), which every implementation applies.

    The two large tensors are drawn on the device (no multi-GB host tensor, no host-to-device copy of the weight),
    before any measurement starts; the small ones on the host.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    device_gen = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(num_rows, hidden_size, generator=device_gen, device=device).to(dtype)
    weight = torch.randn(vocab_size, hidden_size, generator=device_gen, device=device).div_(hidden_size**0.5).to(dtype)
    targets = torch.randint(0, vocab_size, (num_rows,), generator=gen)
    ignored, valid_rows = ignored_and_valid_rows(num_rows, 0.1, gen)
    targets[ignored] = -100
    num_pairs = min(int(mix_fraction * num_rows) // 2, valid_rows.numel() // 2)
    return {
        "hidden": hidden.requires_grad_(),
        "weight": weight.requires_grad_(),
        "targets": targets.to(device),
        "mix_index": pairs_of(valid_rows, num_pairs).to(device),
        "mix_lambda": beta_half_lambdas(num_pairs, gen).to(device),
        "mix_weight": torch.full((num_pairs,), 1.0 / max(num_pairs, 1), device=device),
        "ntp_normalizer": (targets != -100).sum().to(device),
        "logit_softcap": logit_softcap,
    }
