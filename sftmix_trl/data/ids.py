"""Example ids: scores are produced by one model and consumed by another, possibly with another tokenizer (paper
§5.1), so they are keyed by a stable id derived from an example's content, never by row position or token ids."""

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence

from datasets import Dataset

# Columns that describe an example's score rather than its content; never part of a derived id.
SCORE_COLUMNS = frozenset(
    {"confidence", "variability", "half", "ppl", "nll", "num_tokens", "gold_prob", "gold_prob_std", "correctness"}
)


def derive_example_id(example: Mapping, exclude: Iterable[str] = SCORE_COLUMNS) -> str:
    """A stable id from an example's content: the first 16 hex digits of the SHA-1 of its columns (all but `exclude`)
    serialized as canonical JSON (sorted keys, UTF-8). Identical examples get identical ids, and so share a score."""
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
            "a unique one: deduplicate the data (identical rows get identical derived ids; `--drop_duplicates` in the "
            "recipes and the `sftmix` commands) or give it an id column of its own."
        )


def check_repeated_ids_share_content(ids: Sequence, content: Callable[[int], object]) -> list[int]:
    """Check that every id repeated in `ids` is the same example repeated: `content(row)` equal for all its rows.
    Returns the first row of each distinct id, in order (what to score once per id)."""
    rows_by_id: dict = {}
    for row, example_id in enumerate(ids):
        rows_by_id.setdefault(example_id, []).append(row)
    for example_id, rows in rows_by_id.items():
        if len(rows) > 1 and len({content(row) for row in rows}) > 1:
            raise ValueError(
                f"The examples at rows {rows[:5]} share the id {example_id!r} but differ in content, so a score "
                "joined by id cannot tell them apart. Give each distinct example its own id (identical examples may "
                "share one)."
            )
    return [rows[0] for rows in rows_by_id.values()]


def add_example_ids(dataset: Dataset, id_column: str = "id") -> Dataset:
    """`dataset` with an id column: left as it is when it has one, else derived from each example's content with
    `derive_example_id` (the first 16 hex digits of the SHA-1 of the example's columns as canonical JSON).

    Call it on the raw data, before SFTTrainer prepares it: preparation rewrites columns (it appends the EOS token to
    completions and texts, and that token depends on the tokenizer), so ids derived afterwards would differ between
    a reference model and the target model. Exact duplicate examples get the same id, and so share a score; an id
    column of the data's own whose repeated ids carry different content is refused.
    """
    if id_column not in dataset.column_names:
        return dataset.map(
            lambda example: {id_column: derive_example_id(example)}, desc="Deriving example ids from content"
        )
    check_repeated_ids_share_content(dataset[id_column], lambda row: derive_example_id(dataset[row]))
    return dataset
