"""Training-time confidence scoring for the reference run (SFTMix step 1)."""

import logging
from pathlib import Path

from accelerate.utils import broadcast_object_list
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl.trainer.utils import get_config_model_id

from .scoring import (
    SCORES_SUFFIX,
    check_scorable,
    is_complete_score_file,
    score_trainer,
    tokenizer_fingerprint,
    write_scores,
)

logger = logging.getLogger(__name__)

SCORES_DIRNAME = "confidence_scores"


class ConfidenceCallback(TrainerCallback):
    """Scores every training example at every checkpoint save of an `SFTTrainer`, with the model as it is at that
    checkpoint: the mean NLL of the example's loss tokens, their number, and the perplexity `exp(mean NLL)`.

    Bind it to the trainer it scores (a callback is not given the trainer, and scoring needs the trainer's prepared
    dataset, collator and accelerator):

    ```python
    trainer = SFTTrainer(model, args=SFTConfig(..., save_steps=100), train_dataset=add_example_ids(dataset))
    trainer.add_callback(ConfidenceCallback(trainer))
    trainer.train()
    ```

    Each save writes `<scores_dir>/checkpoint-<step>.jsonl` and its `.json` sidecar (see `scoring`). The scores live
    outside the checkpoint folders, so that `save_total_limit` deleting old checkpoints does not delete their scores.
    A checkpoint whose score file already exists, complete (its records match its sidecar), is skipped (a resumed run
    does not score it twice); a run resumed from a checkpoint that has no complete score file (a kill cut its scoring
    short) scores it first, with the weights it resumed from, which are that checkpoint's. In a data-parallel run
    each process scores a shard and the main process writes the file.

    Args:
        trainer (`trl.SFTTrainer`): the trainer to score; its training set needs an id column (see `add_example_ids`).
        scores_dir (`str`, *optional*): where score files go; defaults to `<args.output_dir>/confidence_scores`.
        id_column (`str`, *optional*, defaults to `"id"`): column with the example ids.
        batch_size (`int`, *optional*): examples per forward; defaults to `args.per_device_eval_batch_size`.
        dataset_name (`str`, *optional*): a label for the data, written to the sidecars; aggregation refuses score
            files with different labels.
    """

    def __init__(
        self,
        trainer,
        scores_dir: str | Path | None = None,
        id_column: str = "id",
        batch_size: int | None = None,
        dataset_name: str | None = None,
    ):
        check_scorable(trainer, id_column)  # fail now, not at the first save
        self.trainer = trainer
        self.scores_dir = Path(scores_dir) if scores_dir is not None else None
        self.id_column = id_column
        self.batch_size = batch_size
        self.dataset_name = dataset_name
        self.written: list[Path] = []

    def scores_path(self, args, global_step: int) -> Path:
        scores_dir = self.scores_dir if self.scores_dir is not None else Path(args.output_dir) / SCORES_DIRNAME
        return scores_dir / f"{PREFIX_CHECKPOINT_DIR}-{global_step}{SCORES_SUFFIX}"

    def on_train_begin(self, args, state, control, **kwargs):
        # resumed from a checkpoint (the model holds its weights now): score it if a kill cut its scoring short
        checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if state.global_step > 0 and broadcast_object_list([checkpoint.is_dir()])[0]:
            self.on_save(args, state, control)

    def on_save(self, args, state, control, **kwargs):
        path = self.scores_path(args, state.global_step)
        accelerator = self.trainer.accelerator
        # the main process decides, so that every process takes the same branch
        already_scored = broadcast_object_list([is_complete_score_file(path)])[0]
        if already_scored:
            logger.info("Checkpoint at step %d already scored (%s): skipping.", state.global_step, path)
            return
        records = score_trainer(
            self.trainer,
            id_column=self.id_column,
            batch_size=self.batch_size,
            desc=f"Confidence at step {state.global_step}",
        )
        if accelerator.is_main_process:
            metadata = {
                "source": type(self).__name__,
                "checkpoint": str(Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"),
                "global_step": state.global_step,
                "model": get_config_model_id(self.trainer.model.config),
                "dataset": self.dataset_name,
                "max_length": getattr(args, "max_length", None),
                "tokenizer_fingerprint": tokenizer_fingerprint(self.trainer.processing_class),
            }
            self.written.append(write_scores(records, path, metadata))
        accelerator.wait_for_everyone()
