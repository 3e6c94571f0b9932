"""The row layout: pair k at slots k and P + k, every row's NTP term exactly once, self-mixed rows handled; the two
chunk orders over it keep both rows of every pair in one chunk."""

import pytest
import torch
from kernel_cases import make_case

from sftmix_trl.kernels.layout import build_row_layout, even_chunks, pair_chunks_first


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


@pytest.mark.parametrize(
    "chunk_order, size",
    [
        (even_chunks, 1),
        (even_chunks, 3),
        (even_chunks, 7),
        (pair_chunks_first, 2),
        (pair_chunks_first, 6),
        (pair_chunks_first, 64),
    ],
)
def test_both_rows_of_every_pair_sit_in_one_chunk(chunk_order, size):
    """Both chunk orders (rowchunk's even spread over a number of chunks, torch's pair chunks first at a number of
    rows): a permutation of the slots in contiguous chunks, each laid out as its pairs' p slots, their q slots, then
    unpaired slots."""
    case = make_case(seed=1, num_rows=40, num_pairs=9, self_pairs=2)
    layout = build_row_layout(case.targets, case.mix_index, case.mix_lambda, -100)
    order, chunks = chunk_order(layout, size)
    num_pairs = layout.num_pairs
    assert sorted(order.tolist()) == list(range(layout.rows.numel()))
    assert [chunk.start for chunk in chunks[1:]] == [chunk.stop for chunk in chunks[:-1]]
    for chunk in chunks:
        slots = order[chunk.start : chunk.stop].tolist()
        pairs = range(chunk.pair_start, chunk.pair_start + chunk.num_pairs)
        # the chunk's slot layout: its pairs' p slots, their q slots, then unpaired slots
        assert slots[: 2 * chunk.num_pairs] == [*pairs, *(k + num_pairs for k in pairs)]
        assert all(slot >= 2 * num_pairs for slot in slots[2 * chunk.num_pairs :])
    assert sum(chunk.num_pairs for chunk in chunks) == num_pairs
