"""The `sftmix` command line: SFTMix step 1 (confidence from training dynamics) without writing Python.

    sftmix score --checkpoints run/checkpoint-100 run/checkpoint-200 --dataset_name data.json \\
        --output_dir scores --max_length 512
    sftmix aggregate --scores scores --output_dir confidence --dataset_name data.json
    sftmix datamap --confidence confidence --dataset_name data.json

Each command takes TRL-style flags, and `--config file.yaml` whose keys set the same fields (flags given on the
command line win). `sftmix score` also takes every `SFTConfig` field (`--max_length`, `--completion_only_loss`,
`--assistant_only_loss`, `--per_device_eval_batch_size`, `--model_init_kwargs`, ...); on a machine without CUDA it
defaults to `--use_cpu true --bf16 false`. Run it under `accelerate launch` to score on several devices.

Data: a `.json`, `.jsonl`, `.parquet` or `.csv` file, a `save_to_disk` folder, or a Hub dataset name. Alpaca-style
rows (`instruction`, `input`, `output`) are turned into conversational prompt/completion rows, and chat messages whose
`content` is a list of text parts into plain text. Rows without an id column get one derived from their content before
any other processing (see `confidence.add_example_ids`); `--drop_duplicates` keeps the first of identical rows.

A row that TRL's preparation drops (no response token left after truncation at `--max_length`) cannot train and needs
no score: `sftmix score` writes no record for it, as the training-time scorer does, so their files hold the same ids
for the same data and aggregate together.
"""

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

ERRORS_SHOWN_WITHOUT_TRACEBACK = (ValueError, TypeError, FileExistsError, FileNotFoundError)


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
    """The examples `args` names, as a `datasets.Dataset`, Alpaca-style rows converted to prompt/completion."""
    from .data_utils import check_sft_examples, drop_duplicate_examples, load_raw_dataset, normalize_content_parts
    from .transforms import alpaca_to_prompt_completion

    if args.dataset_name is None:
        raise ValueError("No data given: pass `--dataset_name` (a data file, a save_to_disk folder or a Hub name).")
    dataset = normalize_content_parts(load_raw_dataset(args.dataset_name, args.dataset_config, args.dataset_split))
    if len(dataset) == 0:
        raise ValueError(f"The data {args.dataset_name!r} (split {args.dataset_split!r}) holds no example.")
    columns = set(dataset.column_names)
    if {"instruction", "output"} <= columns and not columns & {"prompt", "messages", "text"}:
        dataset = alpaca_to_prompt_completion(dataset, id_column=args.id_column)
    check_sft_examples(dataset, f"The data {args.dataset_name!r}")
    if args.drop_duplicates:
        dataset = drop_duplicate_examples(dataset)
    return dataset


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


def parse_arguments(parser, argv: list[str] | None) -> tuple:
    """`parser`'s dataclasses from a YAML config (`--config`) and the command line. An unknown field, in either, is a
    `ValueError` that names it and suggests the closest known fields; a value of the wrong type (a YAML list where a
    number goes, ...) is one that names the field."""
    import difflib

    *parsed, from_config, from_command_line = parser.parse_args_and_config(
        args=argv, return_remaining_strings=True, separate_remaining_strings=True
    )
    # the config's leftovers come as ["--key", "value", ...]; the command line's as argparse left them
    config = argv[argv.index("--config") + 1] if argv and "--config" in argv[:-1] else "the config file"
    unknown = [(config, key) for key in from_config[::2]]
    unknown += [("the command line", item) for item in from_command_line if item.startswith("-")]
    if from_command_line and not unknown:
        unknown = [("the command line", from_command_line[0])]
    if unknown:
        known = sorted({action.dest for action in parser._actions if action.dest != "help"})
        problems = []
        for where, item in unknown:
            name = item.lstrip("-").split("=")[0]
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
            hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
            problems.append(f"{name!r} in {where}{hint}")
        raise ValueError(
            f"Unknown argument(s): {'; '.join(problems)}. `--help` lists the fields {parser.prog or 'it'} takes."
        )
    for instance in parsed:
        check_field_types(instance)
    return tuple(parsed)


def check_field_types(instance) -> None:
    """Every field of a parsed dataclass holds a value of its declared type (a YAML config's values are set as they
    are, not converted, so `learning_rate: [1]` or `per_device_train_batch_size: 2.5` would otherwise fail deep in
    the library that reads them). Fields of other types than str, int, float, bool, their optionals and `list[str]`
    are left to their dataclass."""
    import dataclasses
    import typing

    try:
        hints = typing.get_type_hints(type(instance))
    except Exception:  # an annotation that cannot be resolved: nothing to check against
        return
    for field_ in dataclasses.fields(instance):
        expected = _expected_type(hints.get(field_.name), getattr(instance, field_.name))
        if expected is not None:
            raise TypeError(
                f"`{field_.name}` must be {expected}, got {getattr(instance, field_.name)!r} "
                f"({type(getattr(instance, field_.name)).__name__}): fix its value in the config file or on the "
                "command line."
            )


# declared type -> (the types its values may have, how to name it)
SIMPLE_TYPES = {str: ((str,), "a string"), int: ((int,), "an integer"), float: ((int, float), "a number"),
                bool: ((bool,), "true or false")}  # fmt: skip


def _expected_type(hint, value) -> str | None:
    """What `value` should be, when it is not of the declared type `hint` (None when it is, or cannot be told)."""
    import types
    import typing

    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if value is None or len(rest) != 1:
            return None
        hint = rest[0]
    if hint in SIMPLE_TYPES:
        accepted, name = SIMPLE_TYPES[hint]
        is_bool_as_number = hint is not bool and isinstance(value, bool)
        return name if is_bool_as_number or not isinstance(value, accepted) else None
    # one string stands for a list of one (TRL turns a one-element `lora_target_modules` into its string)
    is_strings = isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))
    if typing.get_origin(hint) is list and typing.get_args(hint) == (str,) and not is_strings:
        return "a list of strings"
    return None


def _commands():
    from trl import SFTConfig

    from .generate import GenerateArguments, run_generate

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
    except ERRORS_SHOWN_WITHOUT_TRACEBACK as error:
        print(f"sftmix {command}: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
