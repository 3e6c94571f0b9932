"""The balanced pair sampler: every micro-batch holds half confident and half unconfident examples, paired at random.

The sampler yields dataset row indices, one micro-batch after another, so that a plain `DataLoader` with
`batch_size=micro_batch_size` cuts them into the intended micro-batches. Inside each micro-batch the first half are
confident examples and the second half unconfident ones, and pair `i` is `(i, i + micro_batch_size // 2)`.

Under data parallelism accelerate wraps the DataLoader's batch sampler in a `BatchSamplerShard`, which hands whole
micro-batches to the ranks in turn (or, with `split_batches`, cuts each DataLoader batch into per-rank slices; the
trainer then uses the per-rank slice size as `micro_batch_size`). Either way every rank gets whole, balanced
micro-batches, as long as their number is a multiple of the number of ranks, which the sampler ensures.
"""

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class BalancedPairSampler(Sampler[int]):
    """Yield micro-batches of `micro_batch_size` row indices: `micro_batch_size // 2` confident rows, then as many
    unconfident ones, drawn without replacement from independently shuffled halves.

    One epoch yields `num_micro_batches` micro-batches: as many as the smaller half fills, rounded down to a multiple
    of `num_replicas`. The remainder left out of an epoch is the rows of each half past that count (at most
    `micro_batch_size // 2 * num_replicas - 1` per half, plus any surplus of the larger half); the shuffle changes
    with the epoch, so a different remainder is left out each time. The order depends only on `seed` and the epoch
    set with `set_epoch`, so every rank and every resumed run draws the same one.

    Args:
        confident (`Sequence[int]`): dataset rows of the confident half.
        unconfident (`Sequence[int]`): dataset rows of the unconfident half.
        micro_batch_size (`int`): examples per micro-batch and rank; even, at least 2.
        num_replicas (`int`, *optional*, defaults to `1`): data-parallel ranks the micro-batches are dealt to.
        seed (`int`, *optional*, defaults to `0`): seed of the shuffle.
    """

    def __init__(
        self,
        confident: Sequence[int],
        unconfident: Sequence[int],
        micro_batch_size: int,
        num_replicas: int = 1,
        seed: int = 0,
    ):
        if micro_batch_size < 2 or micro_batch_size % 2:
            raise ValueError(f"`micro_batch_size` must be even and at least 2, got {micro_batch_size}.")
        if num_replicas < 1:
            raise ValueError(f"`num_replicas` must be at least 1, got {num_replicas}.")
        self.confident = torch.as_tensor(list(confident), dtype=torch.int64)
        self.unconfident = torch.as_tensor(list(unconfident), dtype=torch.int64)
        self.micro_batch_size = micro_batch_size
        self.num_replicas = num_replicas
        self.seed = seed
        self.epoch = 0
        per_half = micro_batch_size // 2
        smaller_half = min(len(self.confident), len(self.unconfident))
        self.num_micro_batches = smaller_half // per_half // num_replicas * num_replicas
        if self.num_micro_batches == 0:
            raise ValueError(
                f"The confidence halves hold {len(self.confident)} and {len(self.unconfident)} examples, too few for "
                f"one micro-batch of {per_half} + {per_half} examples on each of {num_replicas} rank(s). Lower "
                "`per_device_train_batch_size` or train on more examples."
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_micro_batches * self.micro_batch_size

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        per_half = self.micro_batch_size // 2
        count = self.num_micro_batches * per_half
        # independent shuffles of the two halves: position i of each micro-batch pairs two random examples
        confident = self.confident[torch.randperm(len(self.confident), generator=generator)[:count]]
        unconfident = self.unconfident[torch.randperm(len(self.unconfident), generator=generator)[:count]]
        # (micro-batches, 2, per_half) -> each micro-batch is [confident..., unconfident...]
        batches = torch.stack([confident.view(-1, per_half), unconfident.view(-1, per_half)], dim=1)
        yield from batches.reshape(-1).tolist()
