"""The balanced pair sampler, alone and behind accelerate's real data-parallel sharding."""

import pytest
import torch
from accelerate.data_loader import BatchSamplerShard, SkipBatchSampler
from torch.utils.data import BatchSampler, DataLoader, RandomSampler

from sftmix_trl.sampler import BalancedPairSampler

CONFIDENT = list(range(0, 42, 2))  # even rows: 21 confident
UNCONFIDENT = list(range(1, 42, 2))  # odd rows: 21 unconfident
MEDIAN = [42]  # an odd-sized dataset's median row


def micro_batches(sampler, batch_size):
    return [list(b) for b in BatchSampler(sampler, batch_size, drop_last=False)]


def halves_of(batch):
    return [0 if i in CONFIDENT else 1 if i in UNCONFIDENT else -1 for i in batch]


@pytest.mark.parametrize("batch_size", [2, 3, 4, 8, 43, 64])
@pytest.mark.parametrize("remainder", [[], MEDIAN])
def test_every_row_once_per_epoch_in_as_many_micro_batches_as_sfttrainers(batch_size, remainder):
    sampler = BalancedPairSampler(CONFIDENT, UNCONFIDENT, batch_size, remainder=remainder, seed=3)
    batches = micro_batches(sampler, batch_size)
    rows = CONFIDENT + UNCONFIDENT + remainder
    # SFTTrainer: a random sampler over the same rows, the same DataLoader batch size
    assert len(batches) == len(list(BatchSampler(RandomSampler(rows), batch_size, drop_last=False)))
    seen = [i for batch in batches for i in batch]
    assert sorted(seen) == sorted(rows), "every example, the median included, exactly once"
    for batch in batches:
        halves = halves_of(batch)
        # confident first, then unconfident, then the median; as balanced as the size allows
        assert halves == sorted(halves, key=lambda h: (h == -1, h)), halves
        assert abs(halves.count(0) - halves.count(1)) <= 1
        if len(batch) % 2 == 0 and -1 not in halves:
            assert halves.count(0) == halves.count(1)
    assert all(-1 not in halves_of(batch) for batch in batches[:-1]), "the median sits in the last micro-batch"


def test_odd_micro_batches_alternate_the_extra_row():
    batches = micro_batches(BalancedPairSampler(CONFIDENT, UNCONFIDENT, 3), 3)
    assert [halves_of(b).count(0) for b in batches[:4]] == [2, 1, 2, 1]


def test_pairs_are_random_and_change_with_the_epoch_and_seed():
    sampler = BalancedPairSampler(CONFIDENT, UNCONFIDENT, 4, seed=0)
    epoch0 = list(sampler)
    assert epoch0 == list(BalancedPairSampler(CONFIDENT, UNCONFIDENT, 4, seed=0)), "same seed, same order"
    assert epoch0 == list(sampler), "iterating again without set_epoch repeats the epoch"
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert epoch1 != epoch0
    pairs = lambda order: {(order[i], order[i + 2]) for b in range(0, 40, 4) for i in (b, b + 1)}  # noqa: E731
    assert pairs(epoch1) != pairs(epoch0), "the pairing is reshuffled, not only the batch order"
    assert list(BalancedPairSampler(CONFIDENT, UNCONFIDENT, 4, seed=1)) != epoch0
    sampler.set_epoch(0)
    assert list(sampler) == epoch0


@pytest.mark.parametrize("num_processes", [2, 3])
@pytest.mark.parametrize("split_batches", [False, True])
def test_ranks_get_the_sampler_micro_batches_through_accelerate_sharding(num_processes, split_batches):
    """Accelerate's `BatchSamplerShard` deals whole DataLoader batches to the ranks in turn, or (split_batches) cuts
    each into per-rank slices; the trainer then samples per-rank micro-batches and a DataLoader batch of
    `micro * num_processes`. Each rank's micro-batch is one of the sampler's; the last round is completed from the
    start of the epoch, as for SFTTrainer."""
    micro = 4
    sampler = BalancedPairSampler(CONFIDENT, UNCONFIDENT, micro, remainder=MEDIAN, seed=7)
    built = [tuple(b) for b in micro_batches(sampler, micro)]
    loader_batch = micro * num_processes if split_batches else micro
    per_rank = []
    for rank in range(num_processes):
        loader = DataLoader(range(43), sampler=sampler, batch_size=loader_batch)
        shard = BatchSamplerShard(
            loader.batch_sampler, num_processes=num_processes, process_index=rank, split_batches=split_batches
        )
        per_rank.append([list(b) for b in shard])
    assert len({len(batches) for batches in per_rank}) == 1, "every rank takes the same number of steps"
    seen = {i for batches in per_rank for batch in batches for i in batch}
    assert seen == set(range(43)), "the ranks cover the whole epoch"
    for batches in per_rank:
        for batch in batches[:-1]:
            assert tuple(batch) in built
        assert abs(halves_of(batches[-1]).count(0) - halves_of(batches[-1]).count(1)) <= 1


def test_resuming_mid_epoch_skips_to_the_same_batches():
    sampler = BalancedPairSampler(CONFIDENT, UNCONFIDENT, 4, seed=5)
    sampler.set_epoch(2)
    full = micro_batches(sampler, 4)
    resumed = BalancedPairSampler(CONFIDENT, UNCONFIDENT, 4, seed=5)
    resumed.set_epoch(2)
    assert [list(b) for b in SkipBatchSampler(BatchSampler(resumed, 4, drop_last=False), skip_batches=3)] == full[3:]


@pytest.mark.parametrize(
    "args, message",
    [
        ((CONFIDENT, UNCONFIDENT, 1), "at least 2 to hold a pair"),
    ],
)
def test_bad_arguments_are_refused(args, message):
    with pytest.raises(ValueError, match=message):
        BalancedPairSampler(*args)


@pytest.mark.parametrize("confident, unconfident, remainder", [([], [], [7]), (CONFIDENT, [], [])])
def test_an_empty_half_leaves_the_other_rows_unpaired_but_every_row_trains(confident, unconfident, remainder):
    """A dataset that preparation leaves with one example (or a half with no rows): nothing to pair, every row still
    once per epoch, in as many micro-batches as SFTTrainer's sampler would cut."""
    sampler = BalancedPairSampler(confident, unconfident, 4, remainder=remainder)
    rows = [*confident, *unconfident, *remainder]
    batches = micro_batches(sampler, 4)
    assert sorted(r for batch in batches for r in batch) == sorted(rows)
    assert len(batches) == -(-len(rows) // 4)


def test_indices_are_python_ints_for_datasets():
    assert all(type(i) is int for i in BalancedPairSampler(CONFIDENT, UNCONFIDENT, 2, remainder=MEDIAN))
    assert torch.tensor(list(BalancedPairSampler(CONFIDENT, UNCONFIDENT, 2))).dtype == torch.int64
