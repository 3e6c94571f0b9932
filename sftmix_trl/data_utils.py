"""Example ids and the confidence split, shared by the confidence scorer and the trainer.

Scores are produced by one model and consumed by another, possibly with another tokenizer (paper §5.1), so they are
keyed by a stable example id, never by row position or token ids.
"""

import hashlib
import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

# Columns that describe an example's score rather than its content; never part of a derived id.
SCORE_COLUMNS = frozenset({"confidence", "variability", "half", "ppl", "nll", "num_tokens"})


def derive_example_id(example: Mapping, exclude: Iterable[str] = SCORE_COLUMNS) -> str:
    """A stable id from an example's content: the first 16 hex digits of the SHA-1 of its columns (all but `exclude`)
    serialized as canonical JSON (sorted keys, UTF-8). Identical examples get identical ids, so a dataset with exact
    duplicates needs an id column of its own."""
    content = {key: value for key, value in example.items() if key not in set(exclude)}
    payload = json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha1(payload.encode("utf-8")).hexdigest()[:16]


def check_unique_ids(ids: Sequence) -> None:
    counts = Counter(ids)
    duplicates = [example_id for example_id, count in counts.items() if count > 1]
    if duplicates:
        shown = ", ".join(f"{d!r} ({counts[d]}x)" for d in duplicates[:5])
        raise ValueError(
            f"{len(duplicates)} duplicate example id(s), e.g. {shown}. Scores are joined by id, so every example needs "
            "a unique one: deduplicate the data (identical rows get identical derived ids) or give it an id column of "
            "its own."
        )


@dataclass(frozen=True)
class ConfidenceSplit:
    """Row indices of the confident half (most confident first), the unconfident half (least confident last), and
    the middle example left out when the number of rows is odd."""

    confident: list[int]
    unconfident: list[int]
    remainder: list[int]


def split_by_confidence(confidence: Sequence[float], ids: Sequence) -> ConfidenceSplit:
    """Split rows into two equal halves by confidence (higher is more confident).

    Rows are ranked by descending confidence, ties broken by ascending id, so the split is deterministic and the
    same wherever it is computed. With an odd number of rows the median row belongs to neither half.
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
    check_unique_ids(ids)
    if len(ids) < 4:
        raise ValueError(
            f"SFTMix needs at least two examples in each confidence half, but the dataset has {len(ids)} example(s)."
        )
    order = sorted(range(len(ids)), key=lambda i: (-confidence[i], str(ids[i])))
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
