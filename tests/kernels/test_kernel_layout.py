"""The row layout: pair k at slots k and P + k, every row's NTP term exactly once, self-mixed rows handled."""

import pytest
import torch

from sftmix_trl.kernels.layout import build_row_layout


@pytest.mark.parametrize(
    "num_rows, pairs",
    [
        (10, [(0, 9), (4, 2)]),
        (10, [(3, 3), (5, 1), (7, 7)]),  # self pairs borrow unpaired rows: still a permutation
        (5, [(0, 0), (1, 1), (2, 2), (3, 4)]),  # 2P > N: some self pairs repeat their row
        (4, []),
    ],
)
def test_layout_pairs_rows_and_counts_each_ntp_term_once(num_rows, pairs):
    targets = torch.arange(num_rows) + 100
    targets[num_rows - 1] = -100 if num_rows - 1 not in sum(pairs, ()) else targets[num_rows - 1]
    mix_index = torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)
    lam = torch.linspace(0.1, 0.9, len(pairs))
    layout = build_row_layout(targets, mix_index, lam, ignore_index=-100)
    num_pairs = len(pairs)
    assert layout.rows.numel() == max(num_rows, 2 * num_pairs)
    # every row appears, and owns exactly one NTP slot when it is valid
    assert set(layout.rows.tolist()) == set(range(num_rows))
    owned = layout.rows[layout.ntp_targets != -100]
    assert sorted(owned.tolist()) == sorted(torch.nonzero(targets != -100).flatten().tolist())
    torch.testing.assert_close(layout.ntp_targets[layout.ntp_targets != -100], targets[owned])
    for k, (p, q) in enumerate(pairs):
        assert int(layout.rows[k]) == p
        assert layout.mix_targets[k].tolist() == [int(targets[p]), int(targets[q])]
        if p == q:
            assert float(layout.mix_lambda[k]) == 1.0  # z~ = z_p whatever side b holds
        else:
            assert int(layout.rows[num_pairs + k]) == q
            assert float(layout.mix_lambda[k]) == pytest.approx(float(lam[k]))
