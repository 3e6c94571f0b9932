"""Example ids and the confidence split, shared by the confidence scorer and the trainer.

Scores are produced by one model and consumed by another, possibly with another tokenizer (paper §5.1), so they are
keyed by a stable example id, never by row position or token ids.
"""

import hashlib
import json
import math
import random
from collections import Counter
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

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


# Columns that hold chat messages in TRL's conversational formats.
CHAT_COLUMNS = ("messages", "prompt", "completion")


def content_to_text(content, where: str = "a message"):
    """A message's `content` as text. A list of content parts (OpenAI style `{"type": "text", "text": ...}`, or
    LlamaFactory's `{"type": "text", "value": ...}`) becomes its text parts concatenated in order, as a chat template
    that accepts parts renders them. A string (or None) is returned as it is; any part that is not text is refused."""
    if content is None or isinstance(content, str):
        return content
    texts = []
    for position, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
        text = None
        if isinstance(part, Mapping) and kind == "text":
            text = part.get("text") if part.get("text") is not None else part.get("value")
        if not isinstance(text, str):
            raise ValueError(
                f"{where}: content part {position} is {kind!r}, not text ({str(part)[:80]}). SFTMix trains text-only "
                "language models: keep only `{'type': 'text', 'text': ...}` parts, or drop the examples that carry "
                "images, audio or other media."
            )
        texts.append(text)
    return "".join(texts)


def _holds_content_parts(feature) -> bool:
    """Whether a column's feature is a list of messages whose `content` is a list (of parts)."""
    message = getattr(feature, "feature", None)
    return isinstance(message, Mapping) and "content" in message and hasattr(message["content"], "feature")


def normalize_content_parts(dataset):
    """`dataset` with every chat message's list-of-parts `content` (in `messages`, `prompt`, `completion`) turned into
    text by `content_to_text`; returned as it is when no column holds content parts (read from its features, without
    scanning rows). Accepts None, a `Dataset`, or a dict of them (`eval_dataset`)."""
    if dataset is None:
        return None
    if isinstance(dataset, Mapping):
        return {name: normalize_content_parts(split) for name, split in dataset.items()}
    features = getattr(dataset, "features", None) or {}
    columns = [column for column in CHAT_COLUMNS if column in features and _holds_content_parts(features[column])]
    if not columns:
        return dataset

    def normalize(example, row):
        return {
            column: [
                {**message, "content": content_to_text(message["content"], f"Row {row}, {column!r} message {turn}")}
                for turn, message in enumerate(example[column])
            ]
            for column in columns
        }

    return dataset.map(normalize, with_indices=True, desc="Content parts to text")


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


# The column that carries each raw row's position through TRL's preparation (which drops rows and may shuffle them).
RAW_ROW_COLUMN = "__sftmix_raw_row"


def rows_surviving_preparation(
    dataset, processing_class, args, formatting_func=None, dataset_name: str = "train"
) -> list[int]:
    """The rows of the raw `dataset` that TRL's `SFTTrainer` keeps when it prepares the data for training with
    `processing_class` and `args` (an `SFTConfig` or `SFTMixConfig`), in ascending order.

    TRL's preparation drops the rows that have no loss token left after truncation at `args.max_length` (a prompt that
    fills the whole sequence, with completion-only or assistant-only loss). Such a row cannot train, so it needs no
    confidence score: scorers write no record for it, and the SFTMix trainer does not ask for its score. This runs
    TRL's own preparation code, `SFTTrainer._prepare_dataset` (formatting, chat template, EOS, tokenization, labels,
    truncation, the drop), without building a model or a trainer: only what `SFTTrainer.__init__` derives from the
    tokenizer and `args` for it is set up here (the EOS token, a chat template file, the training chat template of
    `assistant_only_loss`, the completion-only default). SFTMix prepares without TRL's packing (it packs each
    confidence half itself), so the rows are those kept before packing.

    `processing_class` is changed as `SFTTrainer` changes it (`args.eos_token`, `args.chat_template_path`): pass the
    tokenizer freshly loaded, as the trainer would load it. A `chat_template_path` naming a tokenizer (whose template
    TRL clones with `clone_chat_template`, resizing the model) needs the model and is refused here.
    """
    import os

    from transformers import ProcessorMixin
    from trl import SFTTrainer
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if args.dataset_kwargs is not None and args.dataset_kwargs.get("skip_prepare_dataset", False):
        return list(range(len(dataset)))  # the trainer takes the rows as they are
    if len(dataset) == 0:
        return []
    if RAW_ROW_COLUMN in dataset.column_names:
        raise ValueError(f"The dataset already has a {RAW_ROW_COLUMN!r} column; rename it.")
    tokenizer = processing_class.tokenizer if isinstance(processing_class, ProcessorMixin) else processing_class
    if args.eos_token is not None:
        if args.eos_token not in tokenizer.get_vocab():
            raise ValueError(f"The specified `eos_token` ({args.eos_token!r}) is not in the tokenizer's vocabulary.")
        tokenizer.eos_token = args.eos_token
    if args.chat_template_path is not None:
        path = args.chat_template_path
        if not (os.path.isfile(path) and path.endswith((".jinja", ".j2"))):
            raise ValueError(
                f"`chat_template_path={path!r}` names a tokenizer whose template TRL clones onto the model (it adds "
                "tokens and resizes the embeddings), so which rows survive preparation cannot be told without the "
                "model."
            )
        with open(path, encoding="utf-8") as template:
            processing_class.chat_template = template.read()

    sample = next(iter(dataset))
    preparer = SFTTrainer.__new__(SFTTrainer)  # no model, no accelerator: only what `_prepare_dataset` reads
    preparer._tokenizer = tokenizer
    preparer.chat_template = None
    if args.assistant_only_loss and not has_generation_markers(processing_class.chat_template):
        preparer.chat_template = get_training_chat_template(processing_class)
    preparer.completion_only_loss = args.completion_only_loss
    if args.completion_only_loss is None:
        preparer.completion_only_loss = "prompt" in sample and "completion" in sample
    indexed = dataset.add_column(RAW_ROW_COLUMN, list(range(len(dataset))))
    prepared = SFTTrainer._prepare_dataset(
        preparer, indexed, processing_class, args, False, formatting_func, dataset_name
    )
    return sorted(prepared[RAW_ROW_COLUMN])


def unscored_examples_error(ids: Sequence, scored: Container, id_column: str = "id") -> ValueError | None:
    """The error for training examples (`ids`, one per row that trains) whose id is not in `scored`, or None when
    every one has a score: the message the SFTMix trainer and the recipe's score stage both give."""
    missing = [example_id for example_id in ids if example_id not in scored]
    if not missing:
        return None
    shown = ", ".join(repr(m) for m in dict.fromkeys(missing[:5]))
    return ValueError(
        f"{len(missing)} of {len(ids)} training example(s) have no confidence score, e.g. {shown} (joined on "
        f"{id_column!r}). Score every training example, or drop the unscored ones."
    )


def _example_format(values: Mapping, row: int, where: str, text_field: str) -> str:
    """The SFTTrainer format of one row (`values`: its non-null fields among the format columns), or a ValueError
    naming the row and what is wrong with it."""
    at = f"{where}, row {row}"
    if "prompt" in values or "completion" in values:
        if set(values) - {"prompt", "completion"}:
            raise ValueError(
                f"{at} mixes formats: it has {sorted(values)}. SFTTrainer reads one format per dataset (`messages`, "
                f"prompt/completion, or `{text_field}`): give every row the same fields."
            )
        if "completion" not in values:
            raise ValueError(f"{at} has a prompt but no completion (null or missing): give it one, or drop the row.")
        prompt, completion = values.get("prompt", ""), values["completion"]
        if isinstance(completion, str) and isinstance(prompt, str):
            return "prompt/completion (text)"
        if isinstance(completion, list) and isinstance(prompt, list):
            for field, messages in (("prompt", prompt), ("completion", completion)):
                _check_messages(messages, f"{at}, {field!r}", allow_empty=field == "prompt")
            return "prompt/completion (conversational)"
        raise ValueError(
            f"{at}: the prompt is {type(prompt).__name__} and the completion {type(completion).__name__}; both must "
            "be text (str), or both lists of chat messages."
        )
    if "messages" in values:
        if text_field in values:
            raise ValueError(f"{at} mixes formats: it has both `messages` and `{text_field}`; keep one of them.")
        if not isinstance(values["messages"], list):
            raise ValueError(f"{at}: `messages` is {type(values['messages']).__name__}, not a list of chat messages.")
        _check_messages(values["messages"], f"{at}, 'messages'", allow_empty=False)
        return "messages"
    if text_field in values:
        if not isinstance(values[text_field], str):
            raise ValueError(f"{at}: `{text_field}` is {type(values[text_field]).__name__}, not text.")
        return "text"
    raise ValueError(
        f"{at} has none of `messages`, prompt/completion or `{text_field}` (all null or missing): fill it in, or drop "
        "the row."
    )


def _check_messages(messages: list, where: str, allow_empty: bool) -> None:
    if not messages and not allow_empty:
        raise ValueError(f"{where} is an empty list of messages: there is nothing to train on; drop the row.")
    for turn, message in enumerate(messages):
        if not (isinstance(message, Mapping) and isinstance(message.get("role"), str)):
            raise ValueError(f"{where}, message {turn} is not a chat message with a `role`: {str(message)[:80]}")
        if not isinstance(message.get("content"), str) and not message.get("tool_calls"):
            raise ValueError(
                f"{where}, message {turn} ({message['role']}) has {type(message.get('content')).__name__} content, "
                "not text: fill it in, or drop the row."
            )


def check_sft_examples(dataset, where: str = "the training data", text_field: str = "text") -> None:
    """Refuse, naming the row, the examples that would crash inside SFTTrainer's preparation: rows of different
    formats, a null or non-text prompt, completion or text, chat messages without a role or text content, an empty
    conversation or conversational completion. Pre-tokenized data (`input_ids`) and data without any of the format
    columns (left to SFTTrainer and a `formatting_func`) are not checked."""
    from datasets import Dataset

    if not isinstance(dataset, Dataset) or "input_ids" in dataset.column_names:
        return
    columns = [c for c in ("messages", "prompt", "completion", text_field) if c in dataset.column_names]
    if not columns:
        return
    table = dataset.with_format(None).select_columns(columns)
    first = None
    for row, example in enumerate(table):
        values = {name: value for name, value in example.items() if value is not None}
        kind = _example_format(values, row, where, text_field)
        if first is None:
            first = kind
        elif kind != first:
            raise ValueError(
                f"{where}, row {row} is {kind} while row 0 is {first}: SFTTrainer reads one format per dataset; "
                "convert the rows to one format."
            )
