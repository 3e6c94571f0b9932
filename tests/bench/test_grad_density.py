"""bench/grad_density.py's core on tiny constructed logits: the gradient it measures is the loss's, uniform logits
leave every tile live, sorting by mean logit clusters live columns, pairs are formed as the trainer forms them."""

import pytest
import torch

from bench import grad_density


def _density(grad, threshold=2.0**-12, row_scale=None, columns=None):
    live = grad_density.live_entries(grad if columns is None else grad[:, columns], threshold, row_scale)
    tiles = grad_density.live_tiles(live)
    return float(tiles.float().mean())


def test_logit_gradient_is_the_loss_gradient():
    """G equals autograd's dL/dz for L = ntp_scale sum_n CE(z_n, t_n) + sum_k mix_scale_k CE(z~_k, y~_k)."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(10, 37, generator=gen, dtype=torch.float64).requires_grad_()
    targets = torch.randint(0, 37, (10,), generator=gen)
    mix_index = torch.tensor([[0, 5], [1, 6], [3, 9]])
    mix_lambda = torch.tensor([0.2, 0.9, 0.5], dtype=torch.float64)
    mix_scale = torch.tensor([0.05, 0.05, 0.1], dtype=torch.float64)
    lam = mix_lambda[:, None]
    mixed = lam * logits[mix_index[:, 0]] + (1 - lam) * logits[mix_index[:, 1]]
    log_p = torch.log_softmax(mixed, dim=-1)
    mix_loss = -(lam[:, 0] * log_p.gather(1, targets[mix_index[:, 0], None])[:, 0])
    mix_loss = mix_loss - (1 - lam[:, 0]) * log_p.gather(1, targets[mix_index[:, 1], None])[:, 0]
    loss = torch.nn.functional.cross_entropy(logits, targets, reduction="sum") / 10 + (mix_scale * mix_loss).sum()
    (expected,) = torch.autograd.grad(loss, logits)
    grad = grad_density.logit_gradient(logits.detach(), targets, mix_index, mix_lambda, 1 / 10, mix_scale)
    torch.testing.assert_close(grad, expected)
    bound = grad_density.gradient_bound(10, mix_index, mix_lambda, 1 / 10, mix_scale)
    assert (grad.abs() <= bound[:, None] + 1e-12).all()


@pytest.mark.parametrize("row_scale", ["max", "bound"])
def test_uniform_logits_leave_every_tile_live(row_scale):
    """softmax = 1 / V everywhere, far above 2**-12 of the row's scale at V = 1,000: density 1 in either order,
    the partial edge tiles (100 rows, 1,000 columns) included."""
    logits, targets = torch.zeros(100, 1000), torch.randint(0, 1000, (100,))
    grad = grad_density.logit_gradient(logits, targets, torch.zeros(0, 2, dtype=torch.long), torch.zeros(0), 1.0, None)
    scale = None if row_scale == "max" else torch.ones(100)
    assert grad_density.live_tiles(torch.ones(100, 1000, dtype=torch.bool)).shape == (2, 8)
    assert _density(grad, row_scale=scale) == 1.0
    assert _density(grad, row_scale=scale, columns=grad_density.mean_logit_order(logits)) == 1.0


def test_sorting_by_mean_logit_clusters_the_live_columns():
    """Every row puts its mass on the same 100 columns scattered over 1,024: in the vocabulary's order they touch
    most column tiles, sorted by mean logit they fill the first one only."""
    gen = torch.Generator().manual_seed(1)
    popular = torch.randperm(1024, generator=gen)[:100]
    logits = torch.full((128, 1024), -30.0)
    logits[:, popular] = torch.randn(128, 100, generator=gen)
    targets = popular[torch.randint(0, 100, (128,), generator=gen)]
    grad = grad_density.logit_gradient(logits, targets, torch.zeros(0, 2, dtype=torch.long), torch.zeros(0), 1.0, None)
    in_vocab_order = _density(grad)
    sorted_order = _density(grad, columns=grad_density.mean_logit_order(logits))
    assert sorted_order == 1 / 8  # 2 row tiles x 1 of 8 column tiles
    assert in_vocab_order > 0.9
    # the projection to a 4x vocabulary: clustered entries fill a quarter of the share, scattered ones leave each
    # tile dead with the 4th root of the probability (saturated, 1 stays 1)
    assert grad_density.project_density(sorted_order, 1024, 4096, "sorted") == pytest.approx(1 / 32)
    assert grad_density.project_density(0.5, 1024, 4096, "vocab") == pytest.approx(1 - 0.5**0.25)
    assert grad_density.project_density(in_vocab_order, 1024, 4096, "vocab") <= in_vocab_order


def test_pairs_align_response_positions_over_the_shorter_response():
    torch.manual_seed(0)
    lengths = [5, 3, 4, 2]
    mix_index, mix_lambda, ntp_scale, mix_scale = grad_density.micro_batch_rows(
        lengths, True, 0.2, 0.5, torch.Generator().manual_seed(0)
    )
    starts = [0, 5, 8, 12]
    assert ntp_scale == 1 / 14
    # every row in at most one mixed position; each pair's rows at the same response position of its sequences
    assert mix_index.flatten().unique().numel() == mix_index.numel()
    sequence = torch.bucketize(mix_index, torch.tensor(starts[1:]), right=True)
    position = mix_index - torch.tensor(starts)[sequence]
    assert (position[:, 0] == position[:, 1]).all() and (sequence[:, 0] != sequence[:, 1]).all()
    for pair in sequence.unique(dim=0):
        rows = (sequence == pair).all(dim=1)
        length = min(lengths[pair[0]], lengths[pair[1]])
        assert int(rows.sum()) == length
        # w = mu / (L_ij * number of pairs), one lam per pair
        assert torch.allclose(mix_scale[rows], torch.tensor(0.2 / (length * 2)))
        assert mix_lambda[rows].unique().numel() == 1
    no_mix = grad_density.micro_batch_rows(lengths, False, 0.2, 0.5, torch.Generator())
    assert no_mix[0].shape == (0, 2)
