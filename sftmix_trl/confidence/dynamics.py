"""Confidence from training dynamics: each example's response NLL recorded from the forward passes that its training
steps make anyway, so that scoring costs no extra forward pass (SFTMix step 1 without the K scoring passes).

    trainer = SFTTrainer(model, args=SFTConfig(...), train_dataset=add_example_ids(dataset))
    trainer.add_callback(TrainingDynamicsCallback(trainer))
    trainer.train()                      # -> <output_dir>/training_dynamics/epoch-001.jsonl, ...
    table = aggregate_scores([f"{output_dir}/training_dynamics"])

Definition. The paper scores every example at K checkpoints, each time with the same model. Here an example's score
for epoch e is the mean NLL of its loss tokens in the forward of the training step that trains it in epoch e, i.e.
under the model as it is just before that step's update:

    nll_e(x, y) = -(1 / |y|) * sum_{t in y} log p_{theta_s(x, e)}(y_t | x, y_<t)      ppl_e = exp(nll_e)

where s(x, e) is the step at which x is trained in epoch e. Within an epoch the model changes from step to step, so
examples trained late in an epoch are scored by a better-trained model than those trained early. The order is
reshuffled every epoch independently of the examples, so this drift is noise uncorrelated with the example, and the
mean over epochs (K = the number of epochs) averages it; each record also keeps its `step`, so that the drift can be
studied (bench/confidence_sources.py measures what it costs in agreement with the checkpoint confidence). The records,
their sidecars, the aggregation, the split and the data map are `scoring`'s and `aggregate`'s, unchanged, and so is
the rule for rows that cannot train: a row that TRL's preparation drops is never trained and gets no record. An epoch
that training leaves unfinished (fractional `num_train_epochs`, `max_steps`) saw only some rows: no file is written for
it. The forward is the training forward: with dropout active, its NLL is the noisy one the loss uses.

How it hooks in, without touching the loss: the callback gives the prepared training set a row-index column, wraps the
collator so that each batch carries the rows it holds, and registers a forward pre-hook on the model that takes the
rows out of the forward's arguments, and a forward hook that reads the per-token log-probabilities which SFTTrainer's
fused LM head returns (`outputs.log_probs`, `label_mask`, `is_top1`) and sums them per example on the device. The sums
are gathered across ranks once per epoch. Resuming: every checkpoint save writes the current epoch's sums so far
beside the score files (`partial-step-<N>.pt`, deleted when training finishes), and a run resumed from step N starts
from them.
"""

import json
import logging
import math
from pathlib import Path

import torch
from accelerate.utils import gather_object
from transformers import TrainerCallback
from trl.trainer.utils import get_config_model_id

from ..data.ids import check_repeated_ids_share_content
from ..data.preparation import ROW_COLUMN
from .scoring import SCORES_SUFFIX, _per_example_sums, check_scorable, make_record, metadata_path, write_scores

logger = logging.getLogger(__name__)

DYNAMICS_DIRNAME = "training_dynamics"
PARTIAL_PREFIX = "partial-step-"


def epoch_scores_name(epoch: int) -> str:
    return f"epoch-{epoch:03d}{SCORES_SUFFIX}"


class _RowCarryingCollator:
    """The trainer's collator, with each batch's dataset rows as one more tensor (`ROW_COLUMN`)."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples):
        rows = [example.pop(ROW_COLUMN) for example in examples]
        batch = self.collator(examples)
        batch[ROW_COLUMN] = torch.tensor(rows, dtype=torch.long)
        return batch

    def __getattr__(self, name):  # the wrapped collator's settings (padding_free, ...)
        return getattr(self.collator, name)


class TrainingDynamicsCallback(TrainerCallback):
    """Records, for every training example and every epoch, its response NLL in the forward of the step that trains
    it, and writes one score file per finished epoch (`<scores_dir>/epoch-<e>.jsonl` and its sidecar), in the format
    of `ConfidenceCallback`'s files: `aggregate_scores` turns them into the confidence, split and data map.

    Bind it to the `SFTTrainer` (or subclass) it records, before `train()`:

    ```python
    trainer.add_callback(TrainingDynamicsCallback(trainer))
    ```

    Needs SFTTrainer's default loss path (the fused LM head; no `compute_loss_func`, no label smoothing), a map-style
    training set with an id column (see `add_example_ids`) and `packing=False`, like `ConfidenceCallback`.

    Args:
        trainer (`trl.SFTTrainer`): the trainer to record.
        scores_dir (`str`, *optional*): where score files go; defaults to `<args.output_dir>/training_dynamics`.
        id_column (`str`, *optional*, defaults to `"id"`): column with the example ids.
        dataset_name (`str`, *optional*): a label for the data, written to the sidecars.
    """

    def __init__(self, trainer, scores_dir=None, id_column: str = "id", dataset_name: str | None = None):
        from ..trainer import SFTMixTrainer  # here: the trainer's modules import from this package

        if isinstance(trainer, SFTMixTrainer):
            raise TypeError(
                "TrainingDynamicsCallback records an NTP run's forwards (the reference run, or the NTP warm-up of "
                "`train_one_run`); SFTMixTrainer's fused loss does not return per-token log-probabilities."
            )
        check_scorable(trainer, id_column)
        if trainer.compute_loss_func is not None or trainer.label_smoother is not None:
            raise ValueError(
                "Training dynamics are read from SFTTrainer's own next-token forward (the fused LM head); with a "
                "`compute_loss_func` or label smoothing that forward is not the one trained. Use ConfidenceCallback."
            )
        self.trainer = trainer
        self.scores_dir = (
            Path(scores_dir) if scores_dir is not None else Path(trainer.args.output_dir) / DYNAMICS_DIRNAME
        )
        self.id_column = id_column
        self.dataset_name = dataset_name
        dataset = trainer.train_dataset
        self.ids = dataset[id_column]
        # a repeated id is the same example repeated: its occurrences are summed into one record
        check_repeated_ids_share_content(
            self.ids, lambda row: (tuple(dataset[row]["input_ids"]), tuple(dataset[row]["labels"]))
        )
        self.num_distinct = len(set(self.ids))
        # the prepared dataset's row of each example, carried through the collator to the forward
        trainer.train_dataset = dataset.add_column(ROW_COLUMN, list(range(len(dataset))))
        trainer._set_signature_columns_if_needed()
        if ROW_COLUMN not in trainer._signature_columns:
            trainer._signature_columns = [*trainer._signature_columns, ROW_COLUMN]
        trainer.data_collator = _RowCarryingCollator(trainer.data_collator)
        model = trainer.model
        model.register_forward_pre_hook(self._take_rows, with_kwargs=True)
        model.register_forward_hook(self._record, with_kwargs=True)
        self._pending_rows = None
        self._steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]] = []  # (rows, sums, counts, step)
        self._carried: dict | None = None  # the epoch's sums so far, from a checkpoint
        self.written: list[Path] = []

    # ---- the hooks: the rows in, the per-example sums out ----

    def _take_rows(self, module, args, kwargs):
        rows = kwargs.pop(ROW_COLUMN, None)
        self._pending_rows = rows if module.training else None
        return args, kwargs

    @torch.no_grad()
    def _record(self, module, args, kwargs, outputs):
        rows, self._pending_rows = self._pending_rows, None
        if rows is None or getattr(outputs, "log_probs", None) is None:
            return
        sums, counts = _per_example_sums(outputs, kwargs, rows.numel())
        # the step that this forward trains (global_step counts the optimizer steps done before it)
        # kept on the device: read once per epoch (`_local_sums`), so no step waits on a copy to the host
        self._steps.append((rows, sums, counts, self.trainer.state.global_step + 1))

    # ---- per epoch: gather, write; per save: keep the epoch so far ----

    def _local_sums(self) -> dict:
        """This rank's sums of the current epoch, {row: [nll_sum, prob_sum, top1_sum, tokens, step_sum, times]}."""
        sums = {} if self._carried is None else {row: list(v) for row, v in self._carried.items()}
        for rows, step_sums, counts, step in self._steps:
            for row, (nll, prob, top1), count in zip(rows.tolist(), step_sums.tolist(), counts.tolist()):
                entry = sums.setdefault(row, [0.0, 0.0, 0.0, 0, 0, 0])
                for i, value in enumerate((nll, prob, top1, count, step, 1)):
                    entry[i] += value
        return sums

    def _gathered_by_id(self) -> dict:
        merged = {}
        for rank_sums in gather_object([self._local_sums()]):
            for row, values in rank_sums.items():
                entry = merged.setdefault(self.ids[row], [0.0, 0.0, 0.0, 0, 0, 0])
                for i, value in enumerate(values):
                    entry[i] += value
        return merged

    def _reset(self):
        self._steps, self._carried = [], None

    def on_train_begin(self, args, state, control, **kwargs):
        self._reset()
        if state.global_step == 0:
            return
        partial = self.scores_dir / f"{PARTIAL_PREFIX}{state.global_step}.pt"
        finished = list(self.scores_dir.glob(f"epoch-*{SCORES_SUFFIX}"))
        at_epoch_end = any(_global_step(p) == state.global_step for p in finished)
        if partial.is_file():
            # every rank's sums were gathered to the main process at the save: it carries them on
            if self.trainer.accelerator.is_main_process:
                self._carried = torch.load(partial, weights_only=True)
        elif not at_epoch_end:
            raise FileNotFoundError(
                f"Resuming at step {state.global_step} in the middle of an epoch, but the training dynamics recorded "
                f"so far in that epoch are not in {partial}. Resume from a checkpoint saved with "
                "TrainingDynamicsCallback, or delete the checkpoints and score files to record from the start."
            )

    def on_save(self, args, state, control, **kwargs):
        merged = gather_object([self._local_sums()])
        if self.trainer.accelerator.is_main_process:
            carried = {}
            for rank_sums in merged:
                for row, values in rank_sums.items():
                    entry = carried.setdefault(row, [0.0, 0.0, 0.0, 0, 0, 0])
                    for i, value in enumerate(values):
                        entry[i] += value
            self.scores_dir.mkdir(parents=True, exist_ok=True)
            path = self.scores_dir / f"{PARTIAL_PREFIX}{state.global_step}.pt"
            torch.save(carried, path.with_suffix(".tmp"))
            path.with_suffix(".tmp").replace(path)

    def on_epoch_end(self, args, state, control, **kwargs):
        by_id = self._gathered_by_id()
        epoch = math.ceil(state.epoch - 1e-6)  # 1-based: the epoch just finished
        accelerator = self.trainer.accelerator
        if accelerator.is_main_process:
            if len(by_id) < self.num_distinct:
                logger.info(
                    "Epoch %d ended after %d of %d examples were trained: no training-dynamics file for it.",
                    epoch,
                    len(by_id),
                    self.num_distinct,
                )
            else:
                records = []
                for example_id in dict.fromkeys(self.ids):  # the dataset's order, each id once
                    nll, prob, top1, tokens, step_sum, times = by_id[example_id]
                    record = make_record(example_id, nll, tokens, prob_sum=prob, top1_sum=top1)
                    record["step"] = step_sum / times  # when it was trained (mean over its copies)
                    records.append(record)
                metadata = {
                    "source": type(self).__name__,
                    "epoch": epoch,
                    "global_step": state.global_step,
                    "model": get_config_model_id(self.trainer.model.config),
                    "dataset": self.dataset_name,
                    "max_length": getattr(args, "max_length", None),
                }
                self.written.append(write_scores(records, self.scores_dir / epoch_scores_name(epoch), metadata))
        self._reset()
        accelerator.wait_for_everyone()

    def on_train_end(self, args, state, control, **kwargs):
        # finished: nothing resumes any more, so the sums kept for resuming go (an interrupted run keeps them)
        if state.global_step >= state.max_steps and self.trainer.accelerator.is_main_process:
            for partial in self.scores_dir.glob(f"{PARTIAL_PREFIX}*.pt"):
                partial.unlink()


def _global_step(scores_path: Path) -> int | None:
    sidecar = metadata_path(scores_path)
    return json.loads(sidecar.read_text()).get("global_step") if sidecar.is_file() else None
