"""The micro-batch plan, checked against the pairs written out by hand for each layout."""

import pytest
import torch

from sftmix_trl.batch_plan import (
    micro_batch_halves,
    padded_bounds,
    padding_free_bounds,
    plan_micro_batch,
    token_halves,
)


def expected_plan(sequences, halves, mixing=True):
    """Pairs written out: the i-th confident with the i-th unconfident sequence, the first min(|r_c|, |r_u|)
    response positions of each, weight 1 / (L * mixed pairs). `sequences` lists each sequence's valid flattened
    positions; returns the mixed (position_c, position_u) and their weights."""
    confident = [s for s, h in zip(sequences, halves) if h == 0]
    unconfident = [s for s, h in zip(sequences, halves) if h == 1]
    pairs = [(c, u) for c, u in zip(confident, unconfident) if mixing and min(len(c), len(u)) > 0]
    mixed, weights = [], []
    for c, u in pairs:
        length = min(len(c), len(u))
        mixed += list(zip(c[:length], u[:length]))
        weights += [1 / (length * len(pairs))] * length
    return mixed, weights


def check(plan, valid, sequences, halves, mixing=True):
    rows = plan.rows.tolist()
    assert rows == sorted(p for s in sequences for p in s)
    assert all(valid[r] for r in rows)
    mixed, weights = expected_plan(sequences, halves, mixing)
    assert [(rows[p], rows[q]) for p, q in plan.mix_index.tolist()] == mixed
    torch.testing.assert_close(plan.mix_weight, torch.tensor(weights, dtype=torch.float64))
    assert plan.num_pairs == min(list(halves).count(0), list(halves).count(1))


def padded_case():
    # 5 rows of 6 tokens; row b's valid positions are where labels[b, t + 1] != -100
    labels = torch.full((5, 6), -100)
    spans = {0: (2, 6), 1: (1, 4), 2: (3, 6), 3: (1, 6), 4: (4, 6)}
    for b, (start, stop) in spans.items():
        labels[b, start:stop] = 7
    valid = torch.nn.functional.pad(labels[:, 1:] != -100, (0, 1)).reshape(-1)
    sequences = [[b * 6 + t for t in range(start - 1, stop - 1)] for b, (start, stop) in spans.items()]
    return valid, padded_bounds(5, 6), sequences


@pytest.mark.parametrize(
    "halves",
    [[0, 0, 1, 1, -1], [0, 1, 0, 1, -1], [1, 0, 0, -1, 1], [0, 0, 0, 1, 1]],
    ids=["grouped", "interleaved", "shuffled", "more-confident"],
)
def test_padded_pairs_follow_the_flags(halves):
    valid, bounds, sequences = padded_case()
    plan = plan_micro_batch(valid, bounds, torch.tensor(halves), mixing=True)
    check(plan, valid, sequences, halves)


def test_without_mixing_nothing_is_mixed_and_every_response_row_stays():
    valid, bounds, sequences = padded_case()
    plan = plan_micro_batch(valid, bounds, torch.tensor([0, 0, 1, 1, -1]), mixing=False)
    check(plan, valid, sequences, [0, 0, 1, 1, -1], mixing=False)
    assert plan.mix_index.shape == (0, 2)


@pytest.mark.parametrize("ntp_loss_on, kept", [("all", None), ("confident", 0), ("unconfident", 1), ("none", 2)])
def test_ntp_mask_keeps_the_rows_of_the_chosen_half(ntp_loss_on, kept):
    valid, bounds, _ = padded_case()
    halves = torch.tensor([0, 1, 0, 1, -1])
    plan = plan_micro_batch(valid, bounds, halves, mixing=True, ntp_loss_on=ntp_loss_on)
    if kept is None:
        assert plan.ntp_mask is None
    else:
        assert plan.ntp_mask.tolist() == [halves[r // 6].item() == kept for r in plan.rows.tolist()]


def test_padding_free_plan_is_the_padded_plan_on_the_concatenated_sequences():
    """The same five sequences concatenated (positions restarting at 0, padding at the end): the same pairs."""
    lengths = [6, 4, 6, 6, 5]
    labels_rows = [[-100, -100, 7, 7, 7, 7], [-100, 7, 7, 7], [-100, -100, -100, 7, 7, 7], [-100] + [7] * 5]
    labels_rows.append([-100, -100, -100, -100, 7])
    labels = torch.tensor([label for row in labels_rows for label in row] + [-100] * 3)  # 3 pad tokens
    position_ids = torch.cat([torch.arange(n) for n in lengths] + [torch.zeros(3, dtype=torch.int64)])[None]
    bounds = padding_free_bounds(position_ids, len(lengths))
    assert bounds.tolist() == [0, 6, 10, 16, 22, 27]
    valid = torch.nn.functional.pad(labels[1:] != -100, (0, 1))
    starts = bounds[:-1].tolist()
    sequences = [
        [start + t for t in range(n - 1) if labels_rows[s][t + 1] != -100]
        for s, (start, n) in enumerate(zip(starts, lengths))
    ]
    halves = [1, 0, -1, 0, 1]
    plan = plan_micro_batch(valid, bounds, torch.tensor(halves), mixing=True)
    check(plan, valid, sequences, halves)
    assert (
        token_halves(torch.tensor(halves), bounds, len(labels)).tolist()
        == [h for h, n in zip(halves, lengths) for _ in range(n)] + [-2] * 3
    )


def test_flags_that_do_not_match_the_sequences_are_refused():
    with pytest.raises(ValueError, match="start 2 sequence\\(s\\), but the batch carries 3 confidence flags"):
        padding_free_bounds(torch.tensor([[0, 1, 2, 0, 1]]), 3)
    valid, bounds, _ = padded_case()
    with pytest.raises(ValueError, match="5 sequences for 4 confidence flags"):
        plan_micro_batch(valid, bounds, torch.tensor([0, 1, 0, 1]), mixing=True)


@pytest.mark.parametrize("num_rows, size", [(2, 8), (3, 2), (7, 8), (10, 4), (11, 4), (9, 3), (21, 5)])
def test_micro_batch_halves_are_balanced_and_cover_the_epoch(num_rows, size):
    plan = micro_batch_halves(size, num_rows // 2, num_rows // 2, num_rows % 2)
    assert [len(flags) for flags in plan] == [min(size, num_rows - start) for start in range(0, num_rows, size)]
    flat = [h for flags in plan for h in flags]
    assert (flat.count(0), flat.count(1), flat.count(-1)) == (num_rows // 2, num_rows // 2, num_rows % 2)
    for flags in plan:
        assert abs(flags.count(0) - flags.count(1)) <= 1


def test_unequal_halves_stay_balanced_until_the_smaller_runs_out():
    plan = micro_batch_halves(4, 7, 3, 1)
    assert plan == [[0, 0, 1, 1], [0, 0, 0, 1], [0, 0, -1]]
