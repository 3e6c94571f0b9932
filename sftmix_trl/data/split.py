"""The two halves SFTMix pairs: the confident and the unconfident half of the training examples (or, for the
paper's ablation of the split, two random halves of the same sizes)."""

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ConfidenceSplit:
    """Row indices of the confident half (most confident first), the unconfident half (least confident last), and
    the middle example left out when the number of rows is odd."""

    confident: list[int]
    unconfident: list[int]
    remainder: list[int]


def split_by_confidence(confidence: Sequence[float], ids: Sequence) -> ConfidenceSplit:
    """Split rows into two equal halves by confidence (higher is more confident).

    Rows are ranked by descending confidence, ties broken by ascending id, then by row (duplicated examples share an
    id and a score), so the split is deterministic and the same wherever it is computed. With an odd number of rows
    the median row belongs to neither half.
    """
    if len(confidence) != len(ids):
        raise ValueError(f"Got {len(confidence)} confidences for {len(ids)} ids.")
    bad = [ids[i] for i, c in enumerate(confidence) if c is None or not math.isfinite(c)]
    if bad:
        shown = ", ".join(repr(b) for b in bad[:5])
        raise ValueError(
            f"{len(bad)} example(s) have a missing, NaN or infinite confidence, e.g. {shown}. Rescore them or drop "
            "them from the dataset before training."
        )
    if len(ids) < 2:
        raise ValueError(
            "SFTMix pairs a confident with an unconfident example, so it needs at least two training examples, but "
            f"the dataset has {len(ids)}."
        )
    order = sorted(range(len(ids)), key=lambda i: (-confidence[i], str(ids[i]), i))
    half = len(order) // 2
    return ConfidenceSplit(
        confident=order[:half], unconfident=order[len(order) - half :], remainder=order[half : len(order) - half]
    )


SPLIT_METHODS = ("confidence", "random")


def split_examples(confidence: Sequence[float], ids: Sequence, split_by: str = "confidence", seed: int = 0):
    """The two halves SFTMix pairs: by confidence (`split_by_confidence`), or, for the paper's ablation of the split,
    at random with the same sizes (`split_by="random"`). The random halves rank rows by the SHA-1 of `seed` and the
    row's id, so they are the same on every rank and for any row order, and change with the seed only. The scores are
    validated either way, so that both splits cover the same examples."""
    split = split_by_confidence(confidence, ids)
    if split_by == "confidence":
        return split
    if split_by != "random":
        raise ValueError(f"`split_by` must be one of {SPLIT_METHODS}, got {split_by!r}.")
    order = sorted(range(len(ids)), key=lambda i: hashlib.sha1(f"{seed}\0{ids[i]}".encode()).hexdigest())
    half = len(split.confident)
    return ConfidenceSplit(confident=order[:half], unconfident=order[half : 2 * half], remainder=order[2 * half :])
