"""Row layout shared by the three fused backends (rowchunk, triton, torch), and the two chunk orders over it.

The mixup term of pair k needs the full logits of both of its rows at once, z~_k = lam z_p + (1 - lam) z_q, so
both rows must sit in the same chunk / program. The layout orders the N rows into slots

    slots [0, P)       the p row of each mixed position k        (side a of pair k)
    slots [P, 2P)      the q row of each mixed position k        (side b of pair k)
    slots [2P, 2P + R) every row that is in no mixed position    (R = N - 2P)

so slot k and slot P + k form pair k, and every row has exactly one slot: the NTP term runs once per slot, the
mixup term once per pair, and the mixup gradient rides on the two rows' NTP logit gradients (no extra product).

A row mixed with itself, (n, n), has z~ = z_n; it equals the pair (n, m) with lam = 1 for any m, since then
z~ = z_n, y~ = e_{t_n} and the whole gradient lands on n. Its side b is therefore given one of the unpaired
rows (which keeps its own NTP term there) and lam becomes 1, so the slots stay a permutation of the rows. Only when
no unpaired row is left (N < 2P, which needs self pairs) does side b repeat n, with its NTP term switched off.

An ``ntp_mask`` switches the NTP term off in the same way for the rows it excludes: they keep their targets for the
mixup term (``mix_targets``) and lose only their NTP target (``ntp_targets``).

Everything is built with static shapes on the device: no host sync.
"""

from dataclasses import dataclass

import torch


@dataclass
class RowLayout:
    """Slots of the rows (see the module docstring).

    Args:
        rows (`torch.Tensor`): (2P + R,) int64 row of each slot.
        ntp_targets (`torch.Tensor`): (2P + R,) int64 NTP target of each slot; ``ignore_index`` where the slot
            has no NTP term (an ignored row, a row outside ``ntp_mask``, or a repeated self-mixed row).
        num_pairs (`int`): P, the number of mixed positions.
        mix_lambda (`torch.Tensor`): (P,) fp32 lam of each pair, 1 for self-mixed rows.
        mix_targets (`torch.Tensor`): (P, 2) int64 targets (t_p, t_q) of each pair.
    """

    rows: torch.Tensor
    ntp_targets: torch.Tensor
    num_pairs: int
    mix_lambda: torch.Tensor
    mix_targets: torch.Tensor


def build_row_layout(targets, mix_index, mix_lambda, ignore_index: int, ntp_mask=None) -> RowLayout:
    num_rows, num_pairs = targets.shape[0], mix_index.shape[0]
    device = targets.device
    p_rows, q_rows = mix_index[:, 0], mix_index[:, 1]
    is_self = p_rows == q_rows
    in_pair = torch.zeros(num_rows, dtype=torch.int8, device=device)
    in_pair[mix_index.flatten()] = 1
    # unpaired rows first, in ascending order; there are N - 2P + (number of self pairs) of them
    free_rows = torch.sort(in_pair, stable=True).indices
    num_self = is_self.sum()
    self_rank = torch.cumsum(is_self, 0) - 1
    gets_free_row = is_self & (self_rank < num_rows - 2 * num_pairs + num_self)
    side_b = torch.where(gets_free_row, free_rows[self_rank.clamp(0, max(num_rows - 1, 0))], q_rows)
    # the unpaired rows not lent to a self pair
    num_rest = max(num_rows - 2 * num_pairs, 0)
    rest = free_rows[num_self + torch.arange(num_rest, device=device)]
    rows = torch.cat([p_rows, side_b, rest])
    ntp_targets = targets[rows] if ntp_mask is None else targets[rows].masked_fill(~ntp_mask[rows], ignore_index)
    ntp_targets[num_pairs : 2 * num_pairs].masked_fill_(is_self & ~gets_free_row, ignore_index)
    lam = torch.where(is_self, 1.0, mix_lambda.to(torch.promote_types(mix_lambda.dtype, torch.float32)))
    return RowLayout(
        rows=rows,
        ntp_targets=ntp_targets,
        num_pairs=num_pairs,
        mix_lambda=lam,
        mix_targets=targets[mix_index],
    )


@dataclass(frozen=True)
class Chunk:
    """Positions [start, stop) of a chunk order: pairs [pair_start, pair_start + num_pairs), their p slots then
    their q slots, then unpaired slots."""

    start: int
    stop: int
    pair_start: int
    num_pairs: int

    @property
    def pairs(self) -> slice:
        return slice(self.pair_start, self.pair_start + self.num_pairs)


def pair_chunks_first(layout: RowLayout, chunk_rows: int):
    """(order, chunks): slot ``order[i]`` sits at position i. Chunks of ``chunk_rows // 2`` pairs (their p slots,
    then their q slots), then chunks of ``chunk_rows`` unpaired slots in their own positions (the torch backend's
    row chunks). Built from device aranges: no host-to-device copy."""
    num_pairs, num_slots, device = layout.num_pairs, layout.rows.numel(), layout.rows.device
    pairs_per_chunk = chunk_rows // 2
    order, chunks = [], []
    for first in range(0, num_pairs, pairs_per_chunk):
        last = min(first + pairs_per_chunk, num_pairs)
        pairs = torch.arange(first, last, device=device)
        order += [pairs, pairs + num_pairs]
        chunks.append(Chunk(2 * first, 2 * last, first, last - first))
    order.append(torch.arange(2 * num_pairs, num_slots, device=device))
    chunks += [
        Chunk(start, min(start + chunk_rows, num_slots), num_pairs, 0)
        for start in range(2 * num_pairs, num_slots, chunk_rows)
    ]
    return torch.cat(order), chunks


def even_chunks(layout: RowLayout, num_chunks: int):
    """(order, chunks): slot ``order[i]`` sits at position i; the pairs and the unpaired slots spread evenly over
    ``num_chunks`` chunks, each holding some pairs' p slots, their q slots, then its share of the unpaired slots (the
    rowchunk backend's chunks, a slot layout of their own). Built from device aranges (no host-to-device copy)."""
    num_pairs, num_slots, device = layout.num_pairs, layout.rows.numel(), layout.rows.device
    num_rest = num_slots - 2 * num_pairs
    order, chunks, start = [], [], 0
    for index in range(num_chunks):
        k0, k1 = num_pairs * index // num_chunks, num_pairs * (index + 1) // num_chunks
        r0, r1 = num_rest * index // num_chunks, num_rest * (index + 1) // num_chunks
        pairs = torch.arange(k0, k1, device=device)
        order += [pairs, pairs + num_pairs, torch.arange(2 * num_pairs + r0, 2 * num_pairs + r1, device=device)]
        stop = start + 2 * (k1 - k0) + r1 - r0
        chunks.append(Chunk(start, stop, k0, k1 - k0))
        start = stop
    return torch.cat(order) if order else layout.rows.new_empty(0), chunks
