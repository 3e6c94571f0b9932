"""Offline confidence scoring: checkpoints or models that already exist, on a dataset, with each model's own tokenizer.

The reference model may be a different, weaker model than the target (paper §5.1), with its own tokenizer. Each model
gets the tokens SFTTrainer would train it on, because the scorer builds an `SFTTrainer` for it and scores its
prepared training set (same chat template, EOS, completion/assistant masks, truncation and filtering). Scores are
keyed by the raw examples' ids, which every tokenizer shares.

A PEFT adapter folder (what a LoRA run's `save_model` and checkpoints hold: `adapter_config.json`, no `config.json`) is
scored as its base model with the adapter merged in, so the scores are those of the model that was trained.
"""

import gc
import json
import logging
import re
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from datasets import Dataset
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from trl import SFTConfig, SFTTrainer
from trl.trainer.utils import create_model_from_path

from ..data.ids import add_example_ids
from ..run_state import jsonable, model_fingerprint
from .scoring import (
    SCORES_SUFFIX,
    exclusive_writer,
    ids_fingerprint,
    read_scores,
    score_trainer,
    tokenizer_fingerprint,
    write_scores,
)

# The SFTConfig fields that change which tokens are scored, and how: a score file made with other values is stale.
SCORING_FIELDS = (
    "max_length", "truncation_mode", "completion_only_loss", "assistant_only_loss", "dataset_text_field",
    "dataset_kwargs", "chat_template_path", "eos_token", "pad_token", "padding_free", "pad_to_multiple_of", "bf16",
    "fp16", "model_init_kwargs",
)  # fmt: skip

logger = logging.getLogger(__name__)


def checkpoint_name(checkpoint: str | Path) -> str:
    """The stem of a checkpoint's score file: the folder name (`checkpoint-500`), or a hub id with `/` as `--`."""
    path = Path(checkpoint)
    return path.name if path.exists() else str(checkpoint).strip("/").replace("/", "--")


def adapter_base(checkpoint: str | Path) -> str | None:
    """The base model of a PEFT adapter folder (from its `adapter_config.json`), or None for a plain model."""
    adapter_config = Path(checkpoint) / "adapter_config.json"
    if not adapter_config.is_file():
        return None
    base = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(
            f"{adapter_config} names no `base_model_name_or_path`, so the adapter cannot be scored: add the base model "
            "it was trained on."
        )
    return base


def load_merged_adapter(checkpoint: str | Path, model_init_kwargs: dict | None = None) -> PreTrainedModel:
    """The base model of a PEFT adapter folder (loaded as TRL loads models, with `model_init_kwargs`) with the adapter
    merged into its weights: the same function as the adapter on the base, at the cost of one plain forward."""
    from peft import PeftModel

    base = create_model_from_path(adapter_base(checkpoint), **dict(model_init_kwargs or {}))
    return PeftModel.from_pretrained(base, str(checkpoint)).merge_and_unload()


def _global_step(name: str) -> int | None:
    match = re.fullmatch(r"checkpoint-(\d+)", name)
    return int(match.group(1)) if match else None


def score_checkpoints(
    checkpoints: Sequence[str | Path],
    dataset: Dataset,
    output_dir: str | Path,
    args: SFTConfig | None = None,
    tokenizer: str | PreTrainedTokenizerBase | None = None,
    id_column: str = "id",
    dataset_name: str | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Score every example of `dataset` with each checkpoint, one score file per checkpoint in `output_dir`
    (`<checkpoint name>.jsonl` and its `.json` sidecar; see `scoring`).

    Examples that SFTTrainer's preparation drops for a model (no loss token left after truncation at
    `args.max_length`) cannot train, so they need no score: they get no record, as with `ConfidenceCallback`, whose
    files on the same data hold the same ids; the sidecar lists them (`left_out_ids`).

    Every checkpoint's config is loaded before any scoring, so a bad path fails at once. A score file that already
    exists, complete, for the same examples, checkpoint (its weights' files), tokenizer and settings is kept (resuming
    an interrupted run); one made from anything else is refused unless `overwrite`. Each file is written under an
    exclusive lock (`<file>.lock`): a second scorer of the same file fails instead of overwriting the first's.

    Args:
        checkpoints (`Sequence[str | Path]`): checkpoint folders or model ids, e.g. a reference run's `checkpoint-*`.
        dataset (`datasets.Dataset`): the raw training data in a format SFTTrainer accepts; without an id column,
            ids are derived from each example's content (`add_example_ids`).
        output_dir (`str | Path`): where the score files go.
        args (`trl.SFTConfig`, *optional*): how SFTTrainer prepares the data (`max_length`, `completion_only_loss`,
            `assistant_only_loss`, ...), the batch size (`per_device_eval_batch_size`) and the model loading
            (`model_init_kwargs`); defaults to `SFTConfig(output_dir=output_dir, report_to="none", bf16=False)`.
        tokenizer (`str` or tokenizer, *optional*): one tokenizer for every checkpoint; by default each checkpoint's own.
        id_column (`str`, *optional*, defaults to `"id"`): column with the example ids.
        dataset_name (`str`, *optional*): a label for the data, written to the sidecars.
        overwrite (`bool`, *optional*, defaults to `False`): rescore checkpoints whose score file exists.

    Returns:
        The score files, one per checkpoint, in the order given.
    """
    if not checkpoints:
        raise ValueError("No checkpoints to score: pass at least one checkpoint folder or model id.")
    output_dir = Path(output_dir)
    names = [checkpoint_name(c) for c in checkpoints]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(
            f"Several checkpoints would write the same score file in {output_dir}: {duplicates}. Score checkpoints "
            "of different runs into different output folders."
        )
    for checkpoint in checkpoints:
        try:
            AutoConfig.from_pretrained(adapter_base(checkpoint) or str(checkpoint))
        except Exception as error:
            raise ValueError(
                f"Checkpoint {str(checkpoint)!r} cannot be loaded ({type(error).__name__}: {error}). Pass a folder "
                "written by `save_pretrained` (config.json and weights, or a PEFT adapter whose base model loads) or "
                "a model id."
            ) from error

    dataset = add_example_ids(dataset, id_column)
    ids = dataset[id_column]
    fingerprint = ids_fingerprint(ids)
    # float32 by default: perplexities are compared across checkpoints, and bf16 needs a GPU
    args = args if args is not None else SFTConfig(output_dir=str(output_dir), report_to="none", bf16=False)
    if isinstance(tokenizer, str):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)

    paths = [output_dir / f"{name}{SCORES_SUFFIX}" for name in names]
    settings = jsonable({name: getattr(args, name, None) for name in SCORING_FIELDS})

    # what each score file is made from besides the examples: the checkpoint's files, its tokenizer, the settings
    def made_from(checkpoint) -> dict:
        """What a score file is made from besides the examples: the checkpoint's files, its tokenizer, the settings."""
        return {
            "weights": jsonable(model_fingerprint(str(checkpoint), modification_times=True)),
            "tokenizer_source": tokenizer_fingerprint(tokenizer or _own_tokenizer(checkpoint)),
            "settings": settings,
        }

    # one writer per score file: the main process holds the lock of every file it may write from before it looks at
    # them until they are written, so a second scorer of the same files fails at once instead of both succeeding
    state = PartialState()
    with ExitStack() as locks:
        refusal = None
        if state.is_main_process:
            try:
                for path in paths:
                    locks.enter_context(exclusive_writer(path))
            except FileExistsError as error:
                refusal = str(error)
        if state.num_processes > 1:  # every process stops, with the main process's message
            refusal = broadcast_object_list([refusal])[0]
        if refusal is not None:
            raise FileExistsError(refusal)
        to_score = []
        for checkpoint, path in zip(checkpoints, paths):
            if path.is_file() and not overwrite:
                try:
                    _, metadata = read_scores(path)
                except ValueError as error:
                    raise FileExistsError(
                        f"{error} (Or pass `overwrite=True`, `--overwrite`, to replace it.)"
                    ) from None
                # the raw data's ids (a file holds records only for the rows TRL's preparation kept)
                stale = [] if metadata.get("raw_ids_fingerprint") == fingerprint else ["examples"]
                stale += [key for key, value in made_from(checkpoint).items() if metadata.get(key) != value]
                if stale:
                    raise FileExistsError(
                        f"{path} already holds scores made from other {', '.join(stale)} than these (weights: the "
                        f"checkpoint's files; settings: {', '.join(SCORING_FIELDS)}). Pass `overwrite=True` "
                        "(`--overwrite`) to replace them, or choose another output folder."
                    )
                logger.info("%s already scored on these examples (%s): skipping.", checkpoint, path)
                continue
            to_score.append((checkpoint, path))

        for checkpoint, path in to_score:
            name = path.name.removesuffix(SCORES_SUFFIX)
            try:
                # SFTTrainer loads the model as TRL does (`model_init_kwargs`, device placement) and prepares the data
                model = str(checkpoint)
                if adapter_base(checkpoint) is not None:
                    model = load_merged_adapter(checkpoint, args.model_init_kwargs)
                processing_class = tokenizer
                if processing_class is None and isinstance(model, PreTrainedModel):
                    processing_class = _own_tokenizer(checkpoint)
                trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=processing_class)
            except (OSError, ValueError, RuntimeError) as error:
                raise ValueError(
                    f"Checkpoint {str(checkpoint)!r} cannot be loaded for scoring, or its tokenizer cannot prepare the "
                    f"data ({type(error).__name__}: {error}). Score files written so far are kept in {output_dir}."
                ) from error
            scored = score_trainer(trainer, id_column=id_column, desc=f"Scoring {name}")
            if trainer.accelerator.is_main_process:
                by_id = {record["id"]: record for record in scored}
                # every distinct example of the raw data that TRL's preparation kept, in the raw order (identical rows
                # share an id and one record); those it dropped cannot train and get no record, as in the callback's
                records = [by_id[example_id] for example_id in dict.fromkeys(ids) if example_id in by_id]
                left_out = [example_id for example_id in dict.fromkeys(ids) if example_id not in by_id]
                metadata = {
                    "source": "score_checkpoints",
                    "checkpoint": str(checkpoint),
                    "global_step": _global_step(name),
                    "model": adapter_base(checkpoint) or str(checkpoint),
                    "dataset": dataset_name,
                    "max_length": args.max_length,
                    "tokenizer": trainer.processing_class.name_or_path,
                    "tokenizer_fingerprint": tokenizer_fingerprint(trainer.processing_class),
                    "raw_ids_fingerprint": fingerprint,
                    **made_from(checkpoint),
                    "left_out_ids": left_out,
                }
                write_scores(records, path, metadata)
                if left_out:
                    logger.warning(
                        "%s: %d of %d example(s) left out: no response token after truncation at max_length=%s "
                        "(TRL's preparation drops them, so they cannot train and need no score).",
                        name,
                        len(left_out),
                        len(left_out) + len(records),
                        args.max_length,
                    )
            trainer.accelerator.wait_for_everyone()
            del trainer
            gc.collect()
    return paths


def _own_tokenizer(checkpoint: str | Path) -> PreTrainedTokenizerBase:
    """A checkpoint's tokenizer: its own, or for a PEFT adapter folder without one, its base model's."""
    base = adapter_base(checkpoint)
    if base is not None and not (Path(checkpoint) / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(base)
    return AutoTokenizer.from_pretrained(str(checkpoint))
