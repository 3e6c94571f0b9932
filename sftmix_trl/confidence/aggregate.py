"""From K score files to per-example confidence, its spread, and the confident / unconfident split.

    confidence(x, y)  = -(1/K) * sum_k ppl_k(x, y)                         (paper §3, docs/design.md §1)
    variability(x, y) = sqrt((1/K) * sum_k (ppl_k(x, y) - mean_k ppl_k)^2)  (population std, ddof = 0, over checkpoints,
                                                                            as dataset cartography's variability)

and the dataset-cartography view (Swayamdipta et al., 2020) that the data map draws, bounded in [0, 1]:

    gold_prob(x, y)     = (1/K) * sum_k prob_k(x, y)     (prob_k: mean gold-token probability at checkpoint k)
    gold_prob_std(x, y) = population std of prob_k over the checkpoints (at most 0.5)
    correctness(x, y)   = (1/K) * sum_k accuracy_k(x, y) (accuracy_k: share of response tokens predicted top-1)

The split is `sftmix_trl.data.split.split_by_confidence`: two equal halves, ties broken by id, the median example
left out when the count is odd.

Output folder of `ConfidenceTable.save`, which `SFTMixTrainer(confidence_scores=<folder>)` reads as it is:

    the table as a `datasets.Dataset` (`save_to_disk`: data-*.arrow, dataset_info.json, state.json)
    confidence.jsonl   the same, one example a line
    confidence.parquet the same, as Parquet
    summary.json       checkpoints, counts, excluded ids, definitions

Columns: `id`, `confidence`, `variability`, `half` (`"confident"`, `"unconfident"` or `"remainder"`), `ppl` (the K
perplexities, in the order of `summary.json`'s `checkpoints`), `gold_prob`, `gold_prob_std`, `correctness`, `prob` and
`accuracy` (the K values each), `num_tokens` (response tokens scored). SFTMixTrainer reads `id` and `confidence`.
"""

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from datasets import Dataset, load_from_disk

from ..data.split import ConfidenceSplit, split_by_confidence
from .scoring import SCORES_SUFFIX, read_scores

OUTPUT_FILES = ("state.json", "dataset_info.json", "confidence.jsonl", "confidence.parquet", "summary.json")
HALVES = ("confident", "unconfident", "remainder")


@dataclass
class ConfidenceTable:
    """Aggregated confidence: the per-example `dataset`, the `checkpoints` its `ppl` columns follow, and the ids of
    the examples whose records had no response token to score (left out: they cannot train)."""

    dataset: Dataset
    checkpoints: list[str]
    score_files: list[str]
    excluded_ids: list = field(default_factory=list)
    models: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        halves = self.dataset["half"]
        return {
            "models": self.models,
            "checkpoints": self.checkpoints,
            "score_files": self.score_files,
            "num_examples": len(self.dataset),
            **{f"num_{half}": halves.count(half) for half in HALVES},
            "confidence_threshold": split_threshold(self.dataset),
            "excluded_unscorable_ids": self.excluded_ids,
            "excluded_unscorable": "examples with no response token to score (truncated away): they cannot train",
            "confidence": "-mean_k ppl_k over the K checkpoints",
            "variability": "population standard deviation (ddof=0) of ppl_k over the K checkpoints",
            "gold_prob": "mean_k of the mean gold-token probability at checkpoint k",
            "gold_prob_std": "population standard deviation (ddof=0) of that probability over the K checkpoints",
            "correctness": "mean_k of the share of response tokens predicted top-1 at checkpoint k",
        }

    def save(self, output_dir: str | Path, overwrite: bool = False) -> Path:
        """Write the table (see the module docstring). Refuses a folder that already holds results unless
        `overwrite`, and checks that before writing anything."""
        output_dir = Path(output_dir)
        existing = [name for name in OUTPUT_FILES if (output_dir / name).exists()]
        if existing and not overwrite:
            raise FileExistsError(
                f"{output_dir} already holds confidence results ({', '.join(existing)}). Pass `overwrite=True` "
                "(`--overwrite`) to replace them, or choose another output folder."
            )
        output_dir.mkdir(parents=True, exist_ok=True)
        for old_shard in output_dir.glob("data-*.arrow"):
            old_shard.unlink()
        self.dataset.save_to_disk(str(output_dir))
        self.dataset.to_json(str(output_dir / "confidence.jsonl"), lines=True, force_ascii=False)
        self.dataset.to_parquet(str(output_dir / "confidence.parquet"))
        (output_dir / "summary.json").write_text(json.dumps(self.summary(), indent=2, default=str) + "\n")
        return output_dir


def split_threshold(table: Dataset) -> float | None:
    """The confidence between the halves: midway between the least confident confident example and the most confident
    unconfident one (None when a half is empty)."""
    confident = [c for c, h in zip(table["confidence"], table["half"]) if h == "confident"]
    unconfident = [c for c, h in zip(table["confidence"], table["half"]) if h == "unconfident"]
    return (min(confident) + max(unconfident)) / 2 if confident and unconfident else None


def resolve_score_files(paths: Sequence[str | Path]) -> list[Path]:
    """Score files from files and folders: a folder stands for its `*.jsonl` files (a run's `output_dir` for its
    `confidence_scores/` folder), ordered by checkpoint step, then by name."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            if (path / "confidence_scores").is_dir() and not any(path.glob(f"*{SCORES_SUFFIX}")):
                path = path / "confidence_scores"
            files.extend(sorted(path.glob(f"*{SCORES_SUFFIX}"), key=_checkpoint_order))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"Score file or folder {str(path)!r} does not exist.")
    return files


def _checkpoint_order(path: Path) -> tuple[int, str]:
    match = re.search(r"checkpoint-(\d+)", path.name)
    return (int(match.group(1)) if match else math.inf, path.name)


def _shown(ids: Sequence, limit: int = 5) -> str:
    ids = list(ids)
    return ", ".join(repr(i) for i in ids[:limit]) + (f" (and {len(ids) - limit} more)" if len(ids) > limit else "")


def aggregate_scores(score_files: Sequence[str | Path]) -> ConfidenceTable:
    """Aggregate K score files (or folders of them) into per-example confidence and the split.

    Everything is checked before anything is computed or written: at least one file; no duplicate ids; every file
    from the same dataset and with the same ids; no NaN or infinite perplexity.

    A row that cannot train needs no score (`scoring`'s rule): the scorers write no record for a row TRL's preparation
    drops, and a record with no response token to predict (`num_tokens = 0`, null perplexity) is left out the same
    way, its id in `excluded_ids`. So files from the callback and from `sftmix score` aggregate together. Whether
    every example the target trains has a score is checked where the scores are used (the SFTMix trainer, and the
    recipe's score stage before it).
    """
    files = resolve_score_files(score_files)
    if not files:
        raise ValueError(
            "No score files to aggregate (K = 0): pass the `.jsonl` files written by `sftmix score` or "
            f"ConfidenceCallback, or the folders holding them; got {[str(p) for p in score_files]}."
        )
    loaded = [read_scores(path) for path in files]

    datasets_named = {metadata.get("dataset") for _, metadata in loaded} - {None}
    if len(datasets_named) > 1:
        raise ValueError(
            f"The score files come from different datasets ({sorted(datasets_named)}). Aggregate the scores of one "
            "dataset at a time."
        )
    tables = []
    unscorable = {}  # ids of records with no response token, in the order first seen
    # what the scores were made with: one data preparation for every file
    for setting, what in (("max_length", "`max_length`s"), ("tokenizer_fingerprint", "tokenizers")):
        values = {
            json.dumps(metadata[setting]): path for path, (_, metadata) in zip(files, loaded) if setting in metadata
        }
        if len(values) > 1:
            shown = "; ".join(f"{path}: {value}" for value, path in values.items())
            raise ValueError(
                f"The score files were made with different {what} ({shown}), so they score different tokens. Score "
                f"every checkpoint with the same {setting.removesuffix('_fingerprint')}."
            )
    for records, _ in loaded:
        unscorable.update((r["id"], None) for r in records if r["ppl"] is None)
        tables.append({record["id"]: record for record in records if record["ppl"] is not None})

    ids = [record["id"] for record in loaded[0][0] if record["id"] in tables[0]]
    for path, table in zip(files[1:], tables[1:]):
        missing = [i for i in ids if i not in table]
        extra = [i for i in table if i not in tables[0]]
        if missing or extra:
            raise ValueError(
                f"The score files cover different examples: {path} lacks {len(missing)} id(s) of {files[0]} "
                f"({_shown(missing)}) and has {len(extra)} it lacks ({_shown(extra)}). They come from different "
                "datasets or id derivations, or from tokenizers or `max_length`s under which TRL's preparation drops "
                "different rows (a row it drops gets no score); score every checkpoint on the same data, prepared the "
                "same way."
            )

    if not ids:
        raise ValueError(
            f"The score files hold no scored example: every one of {files[0]}'s {len(unscorable)} record(s) has no "
            "response token (truncated away). Raise `max_length`, or check the data's prompt and completion columns."
        )
    ppl = np.array([[table[i]["ppl"] for table in tables] for i in ids], dtype=np.float64).reshape(
        len(ids), len(files)
    )

    not_finite = ~np.isfinite(ppl)
    if not_finite.any():
        rows, columns = np.nonzero(not_finite)
        where = sorted({str(files[c]) for c in columns})
        raise ValueError(
            f"{len(set(rows.tolist()))} example(s) have a NaN or infinite perplexity ({_shown([ids[r] for r in rows])}) "
            f"in {where}. The checkpoint diverged or scored in too low a precision; rescore it in float32."
        )

    # per checkpoint (columns) and example (rows), like ppl; defined wherever ppl is
    prob = np.array([[table[ids[n]]["prob"] for table in tables] for n in range(len(ids))], dtype=np.float64)
    accuracy = np.array([[table[ids[n]]["accuracy"] for table in tables] for n in range(len(ids))], dtype=np.float64)
    prob, accuracy = prob.reshape(ppl.shape), accuracy.reshape(ppl.shape)
    num_tokens = [tables[0][example_id]["num_tokens"] for example_id in ids]
    confidence = -ppl.mean(axis=1)
    variability = ppl.std(axis=1, ddof=0)
    # one example has nothing to pair with: it trains with the next-token loss alone, as SFTMixTrainer trains it
    split = split_by_confidence(confidence.tolist(), ids) if len(ids) >= 2 else ConfidenceSplit([], [], [0])
    half = [""] * len(ids)
    for name, rows in zip(HALVES, (split.confident, split.unconfident, split.remainder)):
        for row in rows:
            half[row] = name
    dataset = Dataset.from_dict(
        {
            "id": ids,
            "confidence": confidence.tolist(),
            "variability": variability.tolist(),
            "half": half,
            "ppl": ppl.tolist(),
            "gold_prob": prob.mean(axis=1).tolist(),
            "gold_prob_std": prob.std(axis=1, ddof=0).tolist(),
            "correctness": accuracy.mean(axis=1).tolist(),
            "prob": prob.tolist(),
            "accuracy": accuracy.tolist(),
            "num_tokens": num_tokens,
        }
    )
    models = sorted({str(metadata.get("model")) for _, metadata in loaded if metadata.get("model")})
    return ConfidenceTable(
        dataset=dataset,
        checkpoints=[path.name.removesuffix(SCORES_SUFFIX) for path in files],
        score_files=[str(path) for path in files],
        excluded_ids=list(unscorable),
        models=models,
    )


def load_confidence(path: str | Path) -> Dataset:
    """An aggregated table from `ConfidenceTable.save`'s folder, or its JSONL / Parquet file."""
    path = Path(path)
    if path.is_dir():
        return load_from_disk(str(path))
    if path.suffix == ".parquet":
        return Dataset.from_parquet(str(path))
    if path.suffix in (".jsonl", ".json"):
        return Dataset.from_json(str(path))
    raise ValueError(
        f"Cannot read a confidence table from {str(path)!r}: pass an aggregate folder, .jsonl or .parquet."
    )
