"""The `sftmix` command line: SFTMix step 1 (confidence from training dynamics) without writing Python.

    sftmix score --checkpoints run/checkpoint-100 run/checkpoint-200 --dataset_name data.json \\
        --output_dir scores --max_length 512
    sftmix aggregate --scores scores --output_dir confidence --dataset_name data.json
    sftmix datamap --confidence confidence --dataset_name data.json

Each command takes TRL-style flags, and `--config file.yaml` whose keys set the same fields (flags given on the
command line win). `sftmix score` also takes every `SFTConfig` field (`--max_length`, `--completion_only_loss`,
`--assistant_only_loss`, `--per_device_eval_batch_size`, `--model_init_kwargs`, ...); on a machine without CUDA it
defaults to `--use_cpu true --bf16 false`. Run it under `accelerate launch` to score on several devices.

Data: a `.json`, `.jsonl`, `.parquet` or `.csv` file, a `save_to_disk` folder, or a Hub dataset name, loaded by the
recipe's loader (`sftmix_trl.data.load_examples`), so that the same data and flags give the same examples and ids:
Alpaca-style rows (`instruction`, `input`, `output`) become conversational prompt/completion rows (`--dataset_format
multiturn` expands conversations, one example per assistant turn), chat content parts become plain text, and rows
without an id column get one derived from their content; `--drop_duplicates` keeps the first of identical rows.

A row that TRL's preparation drops (no response token left after truncation at `--max_length`) cannot train and needs
no score: `sftmix score` writes no record for it, as the training-time scorer does, so their files hold the same ids
for the same data and aggregate together.
"""

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .arguments import INPUT_ERRORS, parse_arguments
from .data.loading import DATASET_FORMATS


@dataclass
class DatasetArguments:
    """
    Where the examples come from.

    Args:
        dataset_name (`str`, *optional*):
            A `.json`, `.jsonl`, `.parquet` or `.csv` file, a `save_to_disk` folder, or a Hub dataset name. Required by
            `sftmix score`; for the other commands it supplies the instructions shown in the report.
        dataset_config (`str`, *optional*):
            Configuration name of a Hub dataset.
        dataset_split (`str`, *optional*, defaults to `"train"`):
            Split to use.
        dataset_format (`str`, *optional*, defaults to `"auto"`):
            How to bring the data into TRL's format, as the recipe's `dataset_format`: `"alpaca"`, `"multiturn"`
            (one example per assistant turn), or `"auto"` (rows with Alpaca's columns converted, others as they are).
        id_column (`str`, *optional*, defaults to `"id"`):
            Column with the example ids; derived from each example's content when the data has none.
        drop_duplicates (`bool`, *optional*, defaults to `False`):
            Drop exact duplicate examples (same content, hence the same derived id), keeping the first. Scores are
            joined by id, so data with duplicates and no id column of its own is refused unless this is set; pass the
            same flag to every command (and the recipe's `drop_duplicates`) so that they see the same examples.
    """

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "A .json/.jsonl/.parquet/.csv file, a save_to_disk folder, or a Hub dataset name."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Configuration name of a Hub dataset."})
    dataset_split: str = field(default="train", metadata={"help": "Split to use."})
    dataset_format: str = field(
        default="auto",
        metadata={
            "help": "How to bring the data into TRL's format, as the recipe's.",
            "choices": list(DATASET_FORMATS),
        },
    )
    id_column: str = field(
        default="id", metadata={"help": "Column with the example ids; derived from the content when missing."}
    )
    drop_duplicates: bool = field(
        default=False, metadata={"help": "Drop exact duplicate examples (same content), keeping the first."}
    )

    def __post_init__(self):
        if not self.id_column:
            raise ValueError("`id_column` must be a column name.")


@dataclass
class ScoreArguments:
    """
    `sftmix score`: score every example with each checkpoint; one score file per checkpoint in `--output_dir`.

    Args:
        checkpoints (`list[str]`):
            Checkpoint folders or model ids to score, e.g. the `checkpoint-*` folders of a reference run, or a weaker
            reference model (paper §5.1).
        tokenizer_name_or_path (`str`, *optional*):
            One tokenizer for every checkpoint; by default each checkpoint's own.
        dataset_label (`str`, *optional*):
            A label for the data, written beside the scores; `sftmix aggregate` refuses score files with different
            labels.
        overwrite (`bool`, *optional*, defaults to `False`):
            Rescore checkpoints whose score file exists (by default they are skipped when they cover the same examples,
            and refused otherwise).
    """

    checkpoints: list[str] = field(metadata={"help": "Checkpoint folders or model ids to score."})
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "One tokenizer for every checkpoint; by default each checkpoint's own."}
    )
    dataset_label: str | None = field(
        default=None, metadata={"help": "A label for the data; aggregation refuses scores with different labels."}
    )
    overwrite: bool = field(default=False, metadata={"help": "Rescore checkpoints whose score file exists."})

    def __post_init__(self):
        if not self.checkpoints:
            raise ValueError("No checkpoints to score: pass at least one with `--checkpoints`.")


@dataclass
class AggregateArguments:
    """
    `sftmix aggregate`: per-example confidence (-mean perplexity over the checkpoints), variability and the split.

    Args:
        scores (`list[str]`):
            Score files, or folders of them (a reference run's `output_dir` stands for its `confidence_scores/`).
        output_dir (`str`):
            Folder for the table (a `save_to_disk` Dataset, `confidence.jsonl`, `confidence.parquet`), `summary.json`
            and the data map; `SFTMixTrainer(confidence_scores=<output_dir>)` reads it as it is.
        drop_unscorable (`bool`, *optional*, defaults to `False`):
            No effect, kept so that existing commands run: examples with no response token after truncation cannot
            train and are always left out (their ids in `summary.json`).
        overwrite (`bool`, *optional*, defaults to `False`):
            Replace results already in `output_dir`.
        data_map (`bool`, *optional*, defaults to `True`):
            Also write `datamap.png` and `confidence_report.md`.
        top_n (`int`, *optional*, defaults to `10`):
            Number of most and least confident examples in the report.
    """

    scores: list[str] = field(metadata={"help": "Score files, or folders of them."})
    output_dir: str = field(metadata={"help": "Folder for the aggregated table and the data map."})
    drop_unscorable: bool = field(
        default=False, metadata={"help": "No effect: examples with no response token are always left out."}
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace results already in `output_dir`."})
    data_map: bool = field(default=True, metadata={"help": "Also write datamap.png and confidence_report.md."})
    top_n: int = field(default=10, metadata={"help": "Most and least confident examples in the report."})

    def __post_init__(self):
        if self.top_n < 1:
            raise ValueError(f"`top_n` must be at least 1, got {self.top_n}.")


@dataclass
class DataMapArguments:
    """
    `sftmix datamap`: the data map picture and the report of the most and least confident examples.

    Args:
        confidence (`str`):
            An `sftmix aggregate` output folder, or its `confidence.jsonl` / `confidence.parquet`.
        output_dir (`str`, *optional*):
            Folder for `datamap.png` and `confidence_report.md`; defaults to the aggregate folder.
        top_n (`int`, *optional*, defaults to `10`):
            Number of most and least confident examples in the report.
        title (`str`, *optional*):
            Title of the picture.
        overwrite (`bool`, *optional*, defaults to `False`):
            Replace a data map already in `output_dir`.
    """

    confidence: str = field(metadata={"help": "An `sftmix aggregate` output folder, or its .jsonl / .parquet."})
    output_dir: str | None = field(
        default=None, metadata={"help": "Folder for datamap.png and confidence_report.md; default: the aggregate's."}
    )
    top_n: int = field(default=10, metadata={"help": "Most and least confident examples in the report."})
    title: str | None = field(default=None, metadata={"help": "Title of the picture."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a data map already in `output_dir`."})

    def __post_init__(self):
        if self.top_n < 1:
            raise ValueError(f"`top_n` must be at least 1, got {self.top_n}.")


def load_examples(args: DatasetArguments):
    """The examples `args` names, loaded as the recipe loads them (`sftmix_trl.data.load_examples`)."""
    from .data import load_examples

    if args.dataset_name is None:
        raise ValueError("No data given: pass `--dataset_name` (a data file, a save_to_disk folder or a Hub name).")
    return load_examples(
        args.dataset_name,
        config=args.dataset_config,
        split=args.dataset_split,
        data_format=args.dataset_format,
        id_column=args.id_column,
        drop_duplicates=args.drop_duplicates,
    )


def run_score(score_args: ScoreArguments, data_args: DatasetArguments, training_args) -> None:
    from .confidence import score_checkpoints

    paths = score_checkpoints(
        score_args.checkpoints,
        load_examples(data_args),
        training_args.output_dir,
        args=training_args,
        tokenizer=score_args.tokenizer_name_or_path,
        id_column=data_args.id_column,
        dataset_name=score_args.dataset_label,
        overwrite=score_args.overwrite,
    )
    for path in paths:
        print(path)


def run_aggregate(aggregate_args: AggregateArguments, data_args: DatasetArguments) -> None:
    from .confidence import aggregate_scores, write_data_map

    table = aggregate_scores(aggregate_args.scores)
    output_dir = table.save(aggregate_args.output_dir, overwrite=aggregate_args.overwrite)
    summary = table.summary()
    print(
        f"{summary['num_examples']} examples over {len(table.checkpoints)} checkpoint(s): "
        f"{summary['num_confident']} confident, {summary['num_unconfident']} unconfident, "
        f"{summary['num_remainder']} left out of the split, {len(table.excluded_ids)} without a response token left "
        f"out -> {output_dir}"
    )
    if aggregate_args.data_map:
        examples = load_examples(data_args) if data_args.dataset_name else None
        for path in write_data_map(
            table.dataset,
            output_dir,
            examples,
            aggregate_args.top_n,
            id_column=data_args.id_column,
            models=table.models,
            checkpoints=table.checkpoints,
            dataset_name=_dataset_label(table.score_files, data_args),
        ):
            print(path)


def _dataset_label(score_files, data_args: DatasetArguments) -> str | None:
    """The data's label for the title: the one the score files record, else `--dataset_name`."""
    from .confidence.scoring import metadata_path

    sidecars = [metadata_path(path) for path in score_files]
    labels = {json.loads(p.read_text()).get("dataset") for p in sidecars if p.is_file()} - {None}
    return ", ".join(sorted(labels)) if labels else data_args.dataset_name


def run_datamap(datamap_args: DataMapArguments, data_args: DatasetArguments) -> None:
    from .confidence import load_confidence, write_data_map

    table = load_confidence(datamap_args.confidence)
    confidence_path = Path(datamap_args.confidence)
    default_dir = confidence_path if confidence_path.is_dir() else confidence_path.parent
    output_dir = Path(datamap_args.output_dir) if datamap_args.output_dir else default_dir
    existing = [name for name in ("datamap.png", "confidence_report.md") if (output_dir / name).exists()]
    if existing and not datamap_args.overwrite:
        raise FileExistsError(
            f"{output_dir} already holds {', '.join(existing)}. Pass `--overwrite` to replace them, or choose another "
            "`--output_dir`."
        )
    examples = load_examples(data_args) if data_args.dataset_name else None
    summary_path = default_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    for path in write_data_map(
        table,
        output_dir,
        examples,
        datamap_args.top_n,
        title=datamap_args.title,
        id_column=data_args.id_column,
        models=summary.get("models", ()),
        checkpoints=summary.get("checkpoints", ()),
        dataset_name=_dataset_label(summary.get("score_files", ()), data_args),
    ):
        print(path)


def _commands():
    from trl import SFTConfig

    from .evaluation.answers import GenerateArguments, run_generate

    return {
        "score": ((ScoreArguments, DatasetArguments, SFTConfig), run_score),
        "aggregate": ((AggregateArguments, DatasetArguments), run_aggregate),
        "datamap": ((DataMapArguments, DatasetArguments), run_datamap),
        "generate": ((GenerateArguments,), run_generate),
    }


USAGE = """usage: sftmix {score,aggregate,datamap,generate} [--config FILE.yaml] [options]

SFTMix step 1, confidence from training dynamics:
  score      score every example with each checkpoint (response perplexity), one file per checkpoint
  aggregate  confidence = -mean perplexity over checkpoints, variability, the confident/unconfident split
  datamap    the data map picture and a report of the most and least confident examples

Evaluation:
  generate   a model's answers to MT-Bench or AlpacaEval, in the format the benchmark's judge reads

`sftmix COMMAND --help` lists a command's options."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    commands = _commands()
    if command not in commands:
        print(f"sftmix: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2

    import torch
    from trl import TrlParser

    dataclass_types, run = commands[command]
    parser = TrlParser(dataclass_types, prog=f"sftmix {command}")
    if not torch.cuda.is_available() and any("bf16" in t.__dataclass_fields__ for t in dataclass_types):
        # SFTConfig defaults to bf16, which a machine without CUDA refuses: score there in float32 on the CPU
        parser.set_defaults(bf16=False, use_cpu=True)
    try:
        run(*parse_arguments(parser, rest))
    except INPUT_ERRORS as error:
        print(f"sftmix {command}: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
