"""The training set as SFTMixTrainer prepares it: each example's confidence joined by id, the prepared rows split into
a confident and an unconfident half, each half packed on its own, and the collator that carries each sequence's half
into the batch.

SFTTrainer's preparation (formatting, tokenization, truncation) drops the examples left without a trainable token
(e.g. a prompt that fills `max_length` on its own). Every example therefore carries its row in the dataset as given
(`sftmix_row`) through preparation, and the confidence is joined to the rows that survive it: an example that
preparation drops cannot train, so it needs no score.
"""

import math
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from datasets import Dataset, concatenate_datasets
from trl import pack_dataset

from .batch_plan import CONFIDENT, REMAINDER, UNCONFIDENT
from .config import SFTMixConfig
from .data.ids import SCORE_COLUMNS, check_repeated_ids_share_content, derive_example_id
from .data.preparation import ROW_COLUMN, unscored_examples_error
from .data.split import ConfidenceSplit, split_examples

# Columns added to the training dataset: the row of each example in the dataset as given (`ROW_COLUMN`, carried
# through preparation, to join each example's confidence), and the half each prepared row belongs to (carried through
# the collator), CONFIDENT, UNCONFIDENT or REMAINDER (the median example of an odd-sized dataset).
HALF_COLUMN = "sftmix_half"


def load_confidence_scores(source, id_column: str, confidence_column: str) -> dict[str, float]:
    """Scores keyed by (stringified) example id, from a `Dataset`, a path (JSON Lines, Parquet or a `save_to_disk`
    directory), a mapping of columns `{id_column: [...], confidence_column: [...]}`, or a mapping `{id: score}`."""
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if path.is_dir():
            source = datasets.load_from_disk(str(path))
            if not isinstance(source, Dataset):
                raise ValueError(
                    f"The scores directory {path} holds a {type(source).__name__}; save a single Dataset."
                )
        elif path.suffix in (".jsonl", ".json"):
            source = Dataset.from_json(str(path))
        elif path.suffix == ".parquet":
            source = Dataset.from_parquet(str(path))
        else:
            raise ValueError(
                f"Cannot read confidence scores from {path}: pass a .jsonl/.json or .parquet file, or a directory "
                "written by `Dataset.save_to_disk`."
            )
    if isinstance(source, Mapping) and id_column not in source and confidence_column not in source:
        ids, scores = list(source.keys()), list(source.values())
        if not all(s is None or isinstance(s, int | float) for s in scores):
            raise ValueError(
                "A mapping of confidence scores must map each example id to a number, or hold the columns "
                f"{id_column!r} and {confidence_column!r}."
            )
    elif isinstance(source, Dataset | Mapping):
        columns = source.column_names if isinstance(source, Dataset) else list(source)
        missing = [c for c in (id_column, confidence_column) if c not in columns]
        if missing:
            raise ValueError(
                f"The confidence scores lack the column(s) {missing} (they have {columns}). Set `id_column` and "
                "`confidence_column` in SFTMixConfig to the names the scores use."
            )
        ids, scores = list(source[id_column]), list(source[confidence_column])
    else:
        raise TypeError(
            "`confidence_scores` must be a Dataset, a path, or a mapping (of columns, or of id to score), got "
            f"{type(source).__name__}."
        )
    confidence_by_id: dict[str, float] = {}
    for example_id, score in zip(ids, scores):
        example_id, score = str(example_id), math.nan if score is None else float(score)
        known = confidence_by_id.setdefault(example_id, score)
        # a repeated id is the same example scored twice: fine when the scores agree
        if not (known == score or (math.isnan(known) and math.isnan(score))):
            raise ValueError(
                f"In the confidence scores, the example id {example_id!r} has two different scores ({known} and "
                f"{score}). Scores are joined by id: keep one score per id."
            )
    return confidence_by_id


@dataclass(frozen=True)
class ExampleConfidence:
    """The id and the confidence of each example of the training dataset as given, by row (`confidence[row]` is
    None where the scores have none for its id)."""

    ids: list[str]
    confidence: list[float | None]
    id_column: str

    def of_prepared_rows(self, rows: list[int]) -> tuple[list[float], list[str]]:
        """The confidence and the id of each prepared row (`rows`: each one's row in the dataset as given). A row
        that preparation kept needs a score; one that it dropped needs none."""
        ids = [self.ids[row] for row in rows]
        scored = {self.ids[row] for row in rows if self.confidence[row] is not None}
        error = unscored_examples_error(ids, scored, self.id_column)
        if error is not None:
            raise error
        return [self.confidence[row] for row in rows], ids


def attach_confidence(dataset: Dataset, confidence_scores, args: SFTMixConfig) -> tuple[Dataset, ExampleConfidence]:
    """Give every example an id (the dataset's own `args.id_column`, or one derived from its content) and look up
    its confidence: in `confidence_scores` (or `args.confidence_scores_path`), joined by id, or in the dataset's
    `args.confidence_column`. Returns the dataset with the id column and each example's row (`sftmix_row`), to join
    the confidence to the rows that preparation keeps (`split_into_halves`)."""
    # the stored columns, not what a `with_transform` transform makes of them
    table = dataset.with_format(None)
    exclude = SCORE_COLUMNS | {args.confidence_column}
    new_columns = {}
    if args.id_column in table.column_names:
        ids = [str(example_id) for example_id in table[args.id_column]]
        try:
            check_repeated_ids_share_content(ids, lambda row: derive_example_id(table[row], exclude=exclude))
        except ValueError as error:
            raise ValueError(f"In the training dataset's {args.id_column!r} column: {error}") from None
    else:
        # identical examples get identical ids, so they share a score
        ids = [derive_example_id(example, exclude=exclude) for example in table]
        new_columns[args.id_column] = ids

    if confidence_scores is None:
        confidence_scores = args.confidence_scores_path
    if confidence_scores is not None:
        confidence_by_id = load_confidence_scores(confidence_scores, args.id_column, args.confidence_column)
        confidence = [confidence_by_id.get(example_id) for example_id in ids]
    elif args.confidence_column in table.column_names:
        confidence = [math.nan if c is None else c for c in table[args.confidence_column]]
    elif args.split_by == "random":
        # the random halves are drawn from the ids alone: without scores, every example ranks equal
        confidence = [0.0] * len(ids)
    else:
        raise ValueError(
            f"The training dataset has no {args.confidence_column!r} column and no `confidence_scores` were "
            "given. SFTMix splits the data by confidence: add the column, or pass scores keyed by "
            f"{args.id_column!r} (`confidence_scores=` or `confidence_scores_path`), or pair random halves "
            "(`split_by='random'`, the paper's ablation of the split), which needs no scores."
        )
    new_columns[ROW_COLUMN] = list(range(len(ids)))
    return with_columns(dataset, new_columns), ExampleConfidence(ids, confidence, args.id_column)


def split_into_halves(
    prepared: Dataset, example_confidence: ExampleConfidence, args: SFTMixConfig
) -> tuple[Dataset, ConfidenceSplit]:
    """Split the prepared rows at their median confidence (or at random, `args.split_by`) and record each row's half
    in `sftmix_half`. One warning says how many examples preparation dropped, and when too few are left to pair."""
    table = prepared.with_format(None)
    if ROW_COLUMN not in table.column_names:
        raise ValueError(
            f"The prepared training dataset lost its {ROW_COLUMN!r} column, which SFTMix needs to join the "
            "confidence scores: keep the columns of the dataset when preparing it."
        )
    rows = table[ROW_COLUMN]
    num_given = len(example_confidence.ids)
    if not rows:
        # SFTTrainer fails on such data too (its sampler refuses zero samples): said here, before any work
        raise ValueError(
            f"None of the {num_given} training example(s) has a trainable token left after SFTTrainer's preparation "
            f"(truncation to max_length={args.max_length}, the prompt and completion masks), so there is nothing to "
            "train. Raise `max_length`, or check the data's prompt and completion columns."
        )
    confidence, ids = example_confidence.of_prepared_rows(rows)
    notes = []
    if len(rows) < num_given:
        notes.append(
            f"SFTTrainer's preparation dropped {num_given - len(rows)} of the {num_given} training examples (no "
            f"trainable token left after truncation to max_length={args.max_length}): they need no confidence "
            f"score, and SFTMix trains on the other {len(rows)}."
        )
    if len(rows) >= 2:
        split = split_examples(confidence, ids, args.split_by, args.seed)
    else:
        # nothing to pair: the example trains with the next-token loss alone, as SFTTrainer would train it
        split = ConfidenceSplit(confident=[], unconfident=[], remainder=list(range(len(rows))))
        notes.append(
            f"With {len(rows)} training example(s), SFTMix cannot form a confident / unconfident pair: this run "
            "trains with the next-token loss only (no Mixup term), as SFTTrainer would."
        )
    if notes:
        warnings.warn(" ".join(notes), stacklevel=2)
    halves = [REMAINDER] * len(rows)
    for row in split.confident:
        halves[row] = CONFIDENT
    for row in split.unconfident:
        halves[row] = UNCONFIDENT
    return with_columns(prepared, {HALF_COLUMN: halves}), split


def pack_each_half(halved: Dataset, args: SFTMixConfig) -> Dataset:
    """Confidence-aware packing: the confident examples packed with confident ones, the unconfident with
    unconfident ones (TRL's best-fit-decreasing packing, whole examples truncated to `max_length` as without
    packing), the median example of an odd-sized dataset alone; each packed row flagged with its half. A micro-batch
    then holds packs of both halves, and the trainer pairs the examples inside them."""
    halves = halved.with_format(None)[HALF_COLUMN]
    packs = []
    for half in (CONFIDENT, UNCONFIDENT, REMAINDER):
        rows = [row for row, h in enumerate(halves) if h == half]
        if rows:
            packed = pack_dataset(
                halved.select(rows).select_columns(["input_ids", "labels"]),
                args.max_length,
                "bfd",
                {"num_proc": args.dataset_num_proc},
            )
            packs.append(packed.add_column(HALF_COLUMN, [half] * len(packed)))
    return concatenate_datasets(packs)


@dataclass
class PairedBatchCollator:
    """Wraps a collator so that each batch also carries the confidence-half flag of each of its sequences as
    `sftmix_half`: one per example, or one per packed sequence of a packed row (`seq_lengths`)."""

    collator: Callable

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        if HALF_COLUMN not in examples[0]:
            return self.collator(examples)
        halves = torch.tensor(
            [half for example in examples for half in [example[HALF_COLUMN]] * len(example.get("seq_lengths", [0]))],
            dtype=torch.int64,
        )
        ours = (HALF_COLUMN, ROW_COLUMN)
        batch = self.collator([{k: v for k, v in example.items() if k not in ours} for example in examples])
        batch[HALF_COLUMN] = halves
        return batch


def with_columns(dataset: Dataset, columns: dict[str, list]) -> Dataset:
    """`dataset` with `columns` added (replacing any of the same name). A `with_transform` dataset keeps its
    transform, which receives the stored columns as before; the added ones are passed through beside its output."""
    custom = dataset.format["type"] == "custom"
    table = dataset.with_format(None) if custom else dataset
    for name, values in columns.items():
        if name in table.column_names:
            table = table.remove_columns(name)
        table = table.add_column(name, values)
    if not custom:
        return table
    transform = dataset.format["format_kwargs"]["transform"]
    format_columns = dataset.format["columns"]

    def transform_keeping_columns(batch):
        added = {name: batch.pop(name) for name in columns if name in batch}
        return {**transform(batch), **added}

    table.set_transform(
        transform_keeping_columns,
        columns=None if format_columns is None else [*format_columns, *columns],
        output_all_columns=dataset.format["output_all_columns"],
    )
    return table
