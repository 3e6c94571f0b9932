"""The balanced pair sampler, alone and behind accelerate's real data-parallel sharding."""

import pytest
import torch
from accelerate.data_loader import BatchSamplerShard, SkipBatchSampler
from torch.utils.data import BatchSampler, DataLoader

from sftmix_trl.sampler import BalancedPairSampler

CONFIDENT = list(range(0, 40, 2))  # even rows: 20 confident
UNCONFIDENT = list(range(1, 45, 2))  # odd rows: 22 unconfident (one extra)


def micro_batches(sampler, batch_size):
    return [list(b) for b in BatchSampler(sampler, batch_size, drop_last=False)]


def check_balanced(batch, batch_size):
    half = batch_size // 2
    assert len(batch) == batch_size
    assert all(i in CONFIDENT for i in batch[:half]), batch
    assert all(i in UNCONFIDENT for i in batch[half:]), batch


@pytest.mark.parametrize("batch_size", [2, 4, 6])
def test_every_micro_batch_is_half_confident_then_half_unconfident(batch_size):
    sampler = BalancedPairSampler(CONFIDENT, UNCONFIDENT, batch_size, seed=3)
    batches = micro_batches(sampler, batch_size)
    assert len(batches) == len(sampler) // batch_size == len(CONFIDENT) // (batch_size // 2)
    for batch in batches:
        check_balanced(batch, batch_size)
    seen = [i for batch in batches for i in batch]
    assert len(seen) == len(set(seen)), "an example was drawn twice in one epoch"
    # documented remainder: fewer than batch_size // 2 rows of the smaller half, plus the larger half's surplus
    assert len(CONFIDENT) - len(set(seen) & set(CONFIDENT)) < batch_size // 2
    assert len(UNCONFIDENT) - len(set(seen) & set(UNCONFIDENT)) < batch_size // 2 + len(UNCONFIDENT) - len(CONFIDENT)


def test_pairs_are_random_and_change_with_the_epoch_and_seed():
    sampler = BalancedPairSampler(CONFIDENT, UNCONFIDENT, 4, seed=0)
    epoch0 = list(sampler)
    assert epoch0 == list(BalancedPairSampler(CONFIDENT, UNCONFIDENT, 4, seed=0)), "same seed, same order"
    assert epoch0 == list(sampler), "iterating again without set_epoch repeats the epoch"
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert epoch1 != epoch0
    pairs = lambda order: {(order[i], order[i + 2]) for b in range(0, len(order), 4) for i in (b, b + 1)}  # noqa: E731
    assert pairs(epoch1) != pairs(epoch0), "the pairing is reshuffled, not only the batch order"
    assert list(BalancedPairSampler(CONFIDENT, UNCONFIDENT, 4, seed=1)) != epoch0
    sampler.set_epoch(0)
    assert list(sampler) == epoch0


@pytest.mark.parametrize("num_processes", [2, 3])
@pytest.mark.parametrize("split_batches", [False, True])
def test_every_rank_gets_balanced_disjoint_micro_batches_through_accelerate_sharding(num_processes, split_batches):
    """Accelerate's `BatchSamplerShard` deals whole DataLoader batches to the ranks in turn, or (split_batches) cuts
    each into per-rank slices; the trainer then samples per-rank micro-batches and a DataLoader batch of
    `micro * num_processes`. Every rank's micro-batch must stay balanced and correctly paired."""
    micro = 4
    sampler = BalancedPairSampler(CONFIDENT, UNCONFIDENT, micro, num_replicas=num_processes, seed=7)
    loader_batch = micro * num_processes if split_batches else micro
    per_rank = []
    for rank in range(num_processes):
        loader = DataLoader(range(50), sampler=sampler, batch_size=loader_batch)
        shard = BatchSamplerShard(
            loader.batch_sampler, num_processes=num_processes, process_index=rank, split_batches=split_batches
        )
        batches = [list(b) for b in shard]
        for batch in batches:
            check_balanced(batch, micro)
        per_rank.append(batches)
    assert len({len(batches) for batches in per_rank}) == 1, "every rank takes the same number of steps"
    seen = [i for batches in per_rank for batch in batches for i in batch]
    assert len(seen) == len(set(seen)) == len(sampler), "the ranks split the epoch without overlap or repeats"


def test_resuming_mid_epoch_skips_to_the_same_batches():
    sampler = BalancedPairSampler(CONFIDENT, UNCONFIDENT, 4, seed=5)
    sampler.set_epoch(2)
    full = micro_batches(sampler, 4)
    resumed = BalancedPairSampler(CONFIDENT, UNCONFIDENT, 4, seed=5)
    resumed.set_epoch(2)
    assert [list(b) for b in SkipBatchSampler(BatchSampler(resumed, 4, drop_last=False), skip_batches=3)] == full[3:]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(micro_batch_size=3), "even and at least 2"),
        (dict(micro_batch_size=0), "even and at least 2"),
        (dict(micro_batch_size=4, num_replicas=0), "at least 1"),
        (dict(micro_batch_size=44), "too few for one micro-batch"),
        (dict(micro_batch_size=16, num_replicas=3), "too few for one micro-batch"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BalancedPairSampler(CONFIDENT, UNCONFIDENT, **kwargs)


def test_indices_are_python_ints_for_datasets():
    assert all(type(i) is int for i in BalancedPairSampler(CONFIDENT, UNCONFIDENT, 2))
    assert torch.tensor(list(BalancedPairSampler(CONFIDENT, UNCONFIDENT, 2))).dtype == torch.int64
