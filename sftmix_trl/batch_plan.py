"""The micro-batch plan: which token rows the fused loss scores, which of them are mixed with which, and with what
weight, for each batch layout SFTTrainer's collator produces.

A micro-batch holds S sequences, each flagged confident (0), unconfident (1) or neither (-1, the median example of
an odd-sized dataset). Its tokens are flattened to L positions, and each sequence occupies one contiguous range of
them, `bounds[s]:bounds[s + 1]`:

- padded (the default): B rows of T tokens, sequence b is row b, `bounds = [0, T, 2T, ..., BT]`;
- padding-free: one row, the sequences concatenated and their positions restarting at 0 (`position_ids`), any
  `pad_to_multiple_of` padding after the last one;
- packed: the padding-free layout of packed rows, each holding several sequences of one half (one flag per
  sequence, from the collator).

Pair i is the i-th confident and the i-th unconfident sequence of the micro-batch, in batch order; sequences left
without a partner (the median, or a micro-batch with more of one half) get the next-token loss only. For a pair with
response positions r_c, r_u, the first L_i = min(|r_c|, |r_u|) of each side are mixed, each with weight
1 / (L_i * number of pairs with L_i > 0), so that L_Mixup is the mean over pairs of each pair's mean.
"""

from dataclasses import dataclass

import torch

CONFIDENT, UNCONFIDENT, REMAINDER = 0, 1, -1
NTP_LOSS_SUBSETS = ("all", "confident", "unconfident", "none")


@dataclass
class BatchPlan:
    """The fused-loss call of one micro-batch, on the host."""

    rows: torch.Tensor  # (N,) flattened positions whose next token is a response token, in order
    mix_index: torch.Tensor  # (P, 2) indices into `rows`: (confident side, unconfident side)
    mix_pair: torch.Tensor  # (P,) pair of each mixed position, in [0, num_pairs)
    mix_weight: torch.Tensor  # (P,) float64, 1 / (L_i * number of mixed pairs)
    ntp_mask: torch.Tensor | None  # (N,) rows whose next-token term counts; None: all of them
    num_pairs: int  # pairs of the micro-batch (some may have nothing to mix)


def padded_bounds(batch_size: int, seq_len: int) -> torch.Tensor:
    """Sequence bounds of a padded (B, T) batch: row b is sequence b."""
    return torch.arange(batch_size + 1) * seq_len


def padding_free_bounds(position_ids: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """Sequence bounds of a padding-free (1, L) batch of `num_sequences` sequences, from its position ids (each
    sequence starts at position 0). Padding after the last sequence has position 0 too; it starts no sequence."""
    starts = (position_ids.reshape(-1) == 0).nonzero().flatten()
    if len(starts) < num_sequences or (num_sequences and starts[0] != 0):
        raise ValueError(
            f"The padding-free batch's position ids start {len(starts)} sequence(s), but the batch carries "
            f"{num_sequences} confidence flags: the flags and the sequences do not match."
        )
    end = starts[num_sequences] if len(starts) > num_sequences else torch.tensor(position_ids.numel())
    return torch.cat([starts[:num_sequences], end.view(1)])


def sequence_bounds(inputs: dict, halves: torch.Tensor) -> torch.Tensor:
    """Where each sequence of a collated micro-batch lies in its flattened tokens: one per row of a padded batch, or
    the concatenated sequences of a padding-free or packed one (one row, one confidence flag per sequence)."""
    labels = inputs["labels"]
    if labels.shape[0] == halves.numel():
        return padded_bounds(*labels.shape)
    if labels.shape[0] != 1 or "position_ids" not in inputs:
        raise ValueError(
            f"The training batch has {labels.shape[0]} rows but {halves.numel()} confidence flags; train batches "
            "must come from SFTMixTrainer's own dataloader and collator."
        )
    return padding_free_bounds(inputs["position_ids"].cpu(), halves.numel())


def token_halves(halves: torch.Tensor, bounds: torch.Tensor, length: int) -> torch.Tensor:
    """(L,) the half flag of each flattened position's sequence; -2 for positions outside every sequence."""
    lengths = bounds.diff()
    flags = torch.full((length,), -2, dtype=torch.int64)
    flags[bounds[0] : bounds[-1]] = torch.repeat_interleave(halves.to(torch.int64), lengths)
    return flags


def plan_micro_batch(
    valid: torch.Tensor, bounds: torch.Tensor, halves: torch.Tensor, mixing: bool, ntp_loss_on: str = "all"
) -> BatchPlan:
    """Plan the fused-loss call of a micro-batch.

    Args:
        valid: (L,) bool, flattened: position t's next token is a response token (its shifted label is not ignored).
        bounds: (S + 1,) sequence s occupies positions `bounds[s]:bounds[s + 1]`.
        halves: (S,) each sequence's flag: `CONFIDENT`, `UNCONFIDENT` or `REMAINDER`.
        mixing: whether the Mixup term is on (`mixup_coef > 0`); without it no position is mixed.
        ntp_loss_on: which sequences the next-token term counts on: "all", "confident", "unconfident" or "none".
    """
    halves = halves.reshape(-1).to(torch.int64)
    if len(bounds) != len(halves) + 1:
        raise ValueError(f"Got {len(bounds) - 1} sequences for {len(halves)} confidence flags.")
    inside = torch.zeros_like(valid)
    inside[bounds[0] : bounds[-1]] = True
    rows = (valid & inside).nonzero().flatten()
    # the sequence of each row, and where each sequence's rows start in `rows` (sequences are contiguous, in order)
    row_sequence = torch.bucketize(rows, bounds[1:], right=True)
    counts = torch.bincount(row_sequence, minlength=len(halves))
    offsets = counts.cumsum(0) - counts

    confident = (halves == CONFIDENT).nonzero().flatten()
    unconfident = (halves == UNCONFIDENT).nonzero().flatten()
    num_pairs = min(len(confident), len(unconfident))
    confident, unconfident = confident[:num_pairs], unconfident[:num_pairs]
    # L_i = min(|r_c|, |r_u|): the first L_i response positions of each side of pair i are mixed
    if mixing:
        mixed_lengths = torch.minimum(counts[confident], counts[unconfident])
    else:
        mixed_lengths = torch.zeros(num_pairs, dtype=torch.int64)
    mix_pair = torch.repeat_interleave(torch.arange(num_pairs), mixed_lengths)
    position = torch.arange(len(mix_pair)) - (mixed_lengths.cumsum(0) - mixed_lengths)[mix_pair]
    mix_index = torch.stack([offsets[confident[mix_pair]] + position, offsets[unconfident[mix_pair]] + position], 1)
    # w = 1 / (L_i * number of pairs with something to mix): L_Mixup is a mean over pairs of per-pair means
    num_mixed_pairs = (mixed_lengths > 0).sum().clamp(min=1)
    mix_weight = 1.0 / (mixed_lengths[mix_pair] * num_mixed_pairs).double()

    # The paper's ablations (§5.3-5.4): every response row stays in the call, so mixed rows keep their targets for
    # the Mixup term, but the next-token term counts on the kept half only, or nowhere
    if ntp_loss_on not in NTP_LOSS_SUBSETS:
        raise ValueError(f"`ntp_loss_on` must be one of {NTP_LOSS_SUBSETS}, got {ntp_loss_on!r}.")
    ntp_mask = None
    if ntp_loss_on == "none":
        ntp_mask = torch.zeros(len(rows), dtype=torch.bool)
    elif ntp_loss_on != "all":
        ntp_mask = halves[row_sequence] == (CONFIDENT if ntp_loss_on == "confident" else UNCONFIDENT)
    return BatchPlan(rows, mix_index, mix_pair, mix_weight, ntp_mask, num_pairs)


def plan_collated_batch(inputs: dict, halves: torch.Tensor, mixing: bool, ntp_loss_on: str = "all") -> BatchPlan:
    """`plan_micro_batch` for a batch of SFTTrainer's collator (`labels`, and `position_ids` when padding-free) and
    the confidence flags of its sequences. Costs one device-to-host copy of the label mask, the sync TRL's own
    compaction of the valid positions also costs."""
    labels = inputs["labels"]
    # valid[t]: the next token of position t (labels[t + 1]) is a response token; the last position has none
    valid = torch.nn.functional.pad(labels[:, 1:] != -100, (0, 1), value=False).reshape(-1).cpu()
    halves = halves.cpu()
    return plan_micro_batch(valid, sequence_bounds(inputs, halves), halves, mixing, ntp_loss_on)


def micro_batch_halves(
    micro_batch_size: int, num_confident: int, num_unconfident: int, num_remainder: int = 0
) -> list[list[int]]:
    """The half flags of each micro-batch of an epoch of `num_confident` + `num_unconfident` + `num_remainder` rows
    cut into micro-batches of `micro_batch_size` (the last may be smaller): as balanced as the counts allow.

    Each micro-batch lists its confident rows, then its unconfident ones, then any remainder rows (the median of an
    odd-sized dataset, in the last). A micro-batch of odd size takes the extra row from the half with more rows left,
    so the halves alternate; once a half runs out (unequal halves: packed rows), the other fills the micro-batches.
    """
    left = {CONFIDENT: num_confident, UNCONFIDENT: num_unconfident, REMAINDER: num_remainder}
    num_rows = sum(left.values())
    plan = []
    for start in range(0, num_rows, micro_batch_size):
        size = min(micro_batch_size, num_rows - start)
        first = CONFIDENT if left[CONFIDENT] >= left[UNCONFIDENT] else UNCONFIDENT
        second = UNCONFIDENT if first == CONFIDENT else CONFIDENT
        take = {first: min(left[first], size - size // 2)}
        take[second] = min(left[second], size - take[first])
        take[first] += min(left[first] - take[first], size - take[first] - take[second])
        take[REMAINDER] = size - take[first] - take[second]
        for half in left:
            left[half] -= take[half]
        plan.append([CONFIDENT] * take[CONFIDENT] + [UNCONFIDENT] * take[UNCONFIDENT] + [REMAINDER] * take[REMAINDER])
    return plan
