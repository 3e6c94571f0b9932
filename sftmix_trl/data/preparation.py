"""Which raw rows TRL's preparation keeps for a tokenizer and settings (a row with no loss token left after truncation
cannot train and needs no score), and the one error for training rows without a score."""

from collections.abc import Container, Sequence

# The column that carries each example's row in the dataset it is added to through TRL's preparation (which drops
# rows and may shuffle them) and the collator: here, the raw rows that survive; in the SFTMix trainer, the row whose
# confidence each example joins; in the training-dynamics recorder, the prepared row each loss belongs to.
ROW_COLUMN = "sftmix_row"


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
    if ROW_COLUMN in dataset.column_names:
        raise ValueError(f"The dataset already has a {ROW_COLUMN!r} column; rename it.")
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
    indexed = dataset.add_column(ROW_COLUMN, list(range(len(dataset))))
    prepared = SFTTrainer._prepare_dataset(
        preparer, indexed, processing_class, args, False, formatting_func, dataset_name
    )
    return sorted(prepared[ROW_COLUMN])


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
