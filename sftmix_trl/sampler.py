"""The balanced pair sampler: every example once per epoch, every micro-batch as balanced between the confident and the
unconfident half as its size allows.

The sampler yields dataset row indices, one micro-batch after another, so that a plain `DataLoader` with
`batch_size=micro_batch_size` cuts them into the intended micro-batches, exactly as many as SFTTrainer's random
sampler gives for the same data and batch size (the last one may be smaller). Inside each micro-batch the confident
rows come first, then the unconfident ones, then the median example of an odd-sized dataset (in the last
micro-batch); the trainer pairs the i-th confident with the i-th unconfident row (`batch_plan`).

Under data parallelism accelerate deals whole micro-batches to the ranks in turn, completing the last round with rows
from the start of the epoch as it does for SFTTrainer (or, with `split_batches`, cuts each DataLoader batch into
per-rank slices; the trainer then uses the per-rank slice size as `micro_batch_size`). Every rank gets the micro-batches
the sampler built, so the same number of optimizer steps as SFTTrainer's.
"""

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from .batch_plan import CONFIDENT, UNCONFIDENT, micro_batch_halves


class BalancedPairSampler(Sampler[int]):
    """Yield every row once per epoch, in micro-batches of `micro_batch_size` rows that hold as many confident as
    unconfident rows (one more of either in a micro-batch of odd size), drawn from independently shuffled halves.

    The order depends only on `seed` and the epoch set with `set_epoch`, so every rank and every resumed run draws
    the same one, and the pairs change from epoch to epoch.

    Args:
        confident (`Sequence[int]`): dataset rows of the confident half.
        unconfident (`Sequence[int]`): dataset rows of the unconfident half: as many as `confident` (examples), or
            not (packed rows, each half packed on its own); once the smaller half runs out, the other fills the
            micro-batches. A half may be empty (a dataset that preparation leaves with one example): the rows
            of the other then train unpaired.
        micro_batch_size (`int`): rows per micro-batch and rank; at least 2.
        remainder (`Sequence[int]`, *optional*): rows in neither half (the median of an odd-sized dataset); they go
            in the last micro-batch.
        seed (`int`, *optional*, defaults to `0`): seed of the shuffle.
    """

    def __init__(
        self,
        confident: Sequence[int],
        unconfident: Sequence[int],
        micro_batch_size: int,
        remainder: Sequence[int] = (),
        seed: int = 0,
    ):
        if micro_batch_size < 2:
            raise ValueError(f"`micro_batch_size` must be at least 2 to hold a pair, got {micro_batch_size}.")
        self.confident = torch.as_tensor(list(confident), dtype=torch.int64)
        self.unconfident = torch.as_tensor(list(unconfident), dtype=torch.int64)
        self.remainder = torch.as_tensor(list(remainder), dtype=torch.int64)
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.epoch = 0
        self.micro_batch_halves = micro_batch_halves(
            micro_batch_size, len(self.confident), len(self.unconfident), len(self.remainder)
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.confident) + len(self.unconfident) + len(self.remainder)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        # independent shuffles of the two halves: pair i of a micro-batch joins two random examples
        shuffled = {
            CONFIDENT: self.confident[torch.randperm(len(self.confident), generator=generator)].tolist(),
            UNCONFIDENT: self.unconfident[torch.randperm(len(self.unconfident), generator=generator)].tolist(),
        }
        remainder = self.remainder.tolist()
        taken = {CONFIDENT: 0, UNCONFIDENT: 0}
        for flags in self.micro_batch_halves:
            for half in flags:
                if half in taken:
                    yield shuffled[half][taken[half]]
                    taken[half] += 1
                else:
                    yield remainder.pop()
