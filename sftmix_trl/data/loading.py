"""The one example loader of the recipe and the `sftmix` commands: the same file, format and flags give the same
examples with the same ids in every stage and command."""

import random
from collections.abc import Iterable
from pathlib import Path

from .formats import alpaca_to_prompt_completion, check_sft_examples, expand_multiturn, normalize_content_parts
from .ids import SCORE_COLUMNS, add_example_ids, derive_example_id


def drop_duplicate_examples(dataset, exclude: Iterable[str] = SCORE_COLUMNS):
    """Keep the first of each group of examples with the same content (the same derived id)."""
    first = {}
    for row, example in enumerate(dataset):
        first.setdefault(derive_example_id(example, exclude), row)
    return dataset.select(sorted(first.values())) if len(first) < len(dataset) else dataset


def random_subset(dataset, num_examples: int | None, seed: int):
    """`num_examples` examples drawn at random without replacement (seeded, so the same on every process and every
    rerun), in their original order; all of them when `num_examples` is None or not smaller than the dataset."""
    if num_examples is None or num_examples >= len(dataset):
        return dataset
    if num_examples < 1:
        raise ValueError(f"The number of examples to keep must be at least 1, got {num_examples}.")
    rows = random.Random(seed).sample(range(len(dataset)), num_examples)
    return dataset.select(sorted(rows))


DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def looks_local(name: str) -> bool:
    """Whether a dataset name can only be a local path: a data file suffix, an explicit relative or absolute path, or
    more than one `/` (a Hub id is `name` or `org/name`)."""
    return (
        Path(name).suffix in DATA_FILE_BUILDERS
        or name.startswith(("/", "./", "../", "~"))
        or name.count("/") > 1
        or Path(name).expanduser().exists()
    )


def load_raw_dataset(name: str, config: str | None = None, split: str = "train"):
    """A `datasets.Dataset` from a `.json`, `.jsonl`, `.parquet` or `.csv` file, a `save_to_disk` folder, a data
    folder, or a Hub dataset id. A name that can only be a local path (see `looks_local`) and does not exist is a
    `FileNotFoundError` naming it, raised before any Hub call."""
    from datasets import DatasetDict, load_dataset, load_from_disk

    path = Path(name).expanduser()
    if looks_local(name) and not path.exists():
        raise FileNotFoundError(
            f"Dataset {name!r} does not exist (looked for {path.absolute()}). Pass an existing "
            f"{'/'.join(DATA_FILE_BUILDERS)} file or data folder, a Hub dataset id (`org/name`), or `asset:<name>`."
        )
    if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
        dataset = load_from_disk(str(path))
        return dataset[split] if isinstance(dataset, DatasetDict) else dataset
    if path.is_file():
        if path.suffix not in DATA_FILE_BUILDERS:
            raise ValueError(f"Cannot read {path}: expected one of {sorted(DATA_FILE_BUILDERS)}.")
        if path.stat().st_size == 0:
            raise ValueError(f"The data file {path} is empty: it holds no example.")
        try:
            return load_dataset(DATA_FILE_BUILDERS[path.suffix], data_files=str(path), split="train")
        except Exception as error:  # the file's content, as the `datasets` builder for its suffix reads it
            cause = error
            while cause.__cause__ is not None or cause.__context__ is not None:  # the parser's own words
                cause = cause.__cause__ or cause.__context__
            raise ValueError(
                f"Cannot read {path} as a {path.suffix} data file ({type(cause).__name__}: {str(cause)[:300]}). Check "
                "that every line or record is well formed and that each column holds one type."
            ) from error
    return load_dataset(str(path) if path.is_dir() else name, name=config, split=split)


# How `load_examples` brings rows into TRL's format (see its docstring).
DATASET_FORMATS = ("auto", "alpaca", "multiturn")


def load_examples(
    name: str,
    *,
    config: str | None = None,
    split: str = "train",
    data_format: str = "auto",
    id_column: str = "id",
    drop_duplicates: bool = False,
    max_examples: int | None = None,
    seed: int = 42,
    asset_cache_dir: str | None = None,
):
    """The examples `name` holds, in TRL's format, each with an id: what every stage of the recipe and every `sftmix`
    command trains on or scores, so that the same data and flags give the same examples with the same ids.

    In order: the raw rows (`load_raw_dataset`; `asset:<name>` fetched by `sftmix_trl.assets`), chat content parts to
    text, the format (`data_format`: `"alpaca"` converts instruction/input/output rows, `"multiturn"` expands each
    conversation into one example per assistant turn, `"auto"` converts rows with Alpaca's columns and none of TRL's
    and keeps the rest as they are), the rows SFTTrainer would crash on refused, exact duplicates dropped
    (`drop_duplicates`), `max_examples` drawn at random (seeded by `seed`), and ids derived from the content where the
    data has no `id_column`.
    """
    if data_format not in DATASET_FORMATS:
        raise ValueError(f"The dataset format must be one of {DATASET_FORMATS}, got {data_format!r}.")
    if name.startswith("asset:"):
        from ..assets import resolve_asset

        path = str(resolve_asset(name, asset_cache_dir))
    else:
        path = name
    # content parts to text first, so that ids derived from the content do not depend on how the parts were written
    dataset = normalize_content_parts(load_raw_dataset(path, config, split))
    if len(dataset) == 0:
        raise ValueError(f"The data {name!r} (split {split!r}) holds no example: nothing to train on or score.")
    columns = set(dataset.column_names)
    if data_format == "auto" and {"instruction", "output"} <= columns and not columns & {"prompt", "messages", "text"}:
        data_format = "alpaca"
    if data_format == "alpaca":
        dataset = alpaca_to_prompt_completion(dataset, id_column=id_column)
    elif data_format == "multiturn":
        dataset = expand_multiturn(dataset, id_column=id_column)
    check_sft_examples(dataset, f"The data {name!r}")
    if drop_duplicates:
        dataset = drop_duplicate_examples(dataset)
    return add_example_ids(random_subset(dataset, max_examples, seed), id_column)
