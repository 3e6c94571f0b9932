"""SFTMix in one run: the target run is its own reference. Its first `self_reference_epochs` epochs train with NTP and
record training dynamics (`TrainingDynamicsCallback`), the split is made from them, and the remaining epochs train
with SFTMix, continuing the same model, optimizer, learning-rate schedule and data order:

    trainer = train_one_run(model, SFTMixConfig("out", num_train_epochs=3), dataset, self_reference_epochs=1)

Under `args.output_dir`:

    training_dynamics/   epoch-<e>.jsonl, the warm-up epochs' records
    confidence/          the aggregated confidence, the split and the data map (as the recipe's score stage)
    checkpoint-<step>/   one series of checkpoints for both phases; the switch is always one (its step ends the
                         warm-up), so the SFTMix phase starts as a resume of it

Resuming: call it again with the same arguments. Before the switch the NTP phase resumes from its last checkpoint
(with its dynamics recorded so far, see `TrainingDynamicsCallback`); after it, the SFTMix phase resumes from its last
checkpoint, or from the switch. Since the SFTMix phase always starts as Trainer's resume of a checkpoint (model,
optimizer, scheduler and RNG states, epoch count), an interrupted run and an uninterrupted one train the same steps.
It needs the two trainers to count the same steps per epoch (true without packing: SFTMix's epoch is SFTTrainer's,
every example once in as many micro-batches); that is checked before the SFTMix phase trains.

Compute: one training run (the warm-up's NTP steps replace as many SFTMix steps), against two runs plus K scoring
passes for the paper's recipe.
"""

import json
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint
from trl import SFTTrainer

from .confidence import TrainingDynamicsCallback, aggregate_scores
from .confidence.datamap import write_data_map
from .config import SFTMixConfig, sft_config_from
from .trainer import SFTMixTrainer

CONFIDENCE_DIRNAME = "confidence"
SWITCH_FILE = "switch.json"


class StopAfterEpochs(TrainerCallback):
    """Save a checkpoint and stop when `epochs` epochs are done (the end of the warm-up)."""

    def __init__(self, epochs: int):
        self.epochs = epochs

    def on_epoch_end(self, args, state, control, **kwargs):
        if state.epoch >= self.epochs - 1e-6:
            control.should_save = True
            control.should_training_stop = True


class CheckStepsPerEpoch(TrainerCallback):
    """The SFTMix phase must count the warm-up's steps per epoch, or the resumed epoch count and schedule would
    shift."""

    def __init__(self, max_steps: int):
        self.max_steps = max_steps

    def on_train_begin(self, args, state, control, **kwargs):
        if state.max_steps != self.max_steps:
            raise ValueError(
                f"The SFTMix phase counts {state.max_steps} steps in all where the NTP warm-up counted "
                f"{self.max_steps}: the two trainers batch the data differently (packing?), so the run cannot switch "
                "at an epoch boundary. Train without packing."
            )


def _trainer_state(checkpoint: str | None) -> dict | None:
    if checkpoint is None:
        return None
    return json.loads((Path(checkpoint) / "trainer_state.json").read_text())


def train_one_run(
    model,
    args: SFTMixConfig,
    train_dataset,
    self_reference_epochs: int = 1,
    processing_class=None,
    peft_config=None,
    callbacks=None,
    dataset_name: str | None = None,
    confidence_dir: str | Path | None = None,
) -> SFTMixTrainer | SFTTrainer:
    """Train `model` on `train_dataset` (with an id column, see `add_example_ids`) for `args.num_train_epochs`
        epochs: the first `self_reference_epochs` with NTP, recording training dynamics, the rest with SFTMix, split by
        the confidence from those dynamics (K = `self_reference_epochs`). Returns the SFTMix trainer, trained (or, when a
    callback stopped the NTP warm-up early, its `SFTTrainer`: call again to resume).

        Args:
            model, args, train_dataset, processing_class, peft_config: as for `SFTMixTrainer` (the NTP phase uses the SFT
                fields of `args`). `args.num_train_epochs` must exceed `self_reference_epochs`.
            self_reference_epochs (`int`, *optional*, defaults to `1`): the NTP warm-up, in whole epochs.
            callbacks (`list`, *optional*): extra callbacks, given to both phases.
            dataset_name (`str`, *optional*): a label for the data, written to the score files.
            confidence_dir (`str`, *optional*): where the confidence table and data map go; defaults to
                `<args.output_dir>/confidence`.
    """
    if not isinstance(self_reference_epochs, int) or self_reference_epochs < 1:
        raise ValueError(
            f"`self_reference_epochs` must be a whole number of epochs >= 1, got {self_reference_epochs}."
        )
    if args.num_train_epochs <= self_reference_epochs or args.max_steps > 0:
        raise ValueError(
            f"One run trains {self_reference_epochs} epoch(s) of NTP warm-up, then SFTMix: it needs "
            f"`num_train_epochs` above that (got {args.num_train_epochs}) and no `max_steps` (got {args.max_steps})."
        )
    if args.packing:
        raise ValueError("One run records each example's NLL during the warm-up, which needs `packing=False`.")
    output_dir = Path(args.output_dir)
    confidence_dir = Path(confidence_dir) if confidence_dir is not None else output_dir / CONFIDENCE_DIRNAME
    scores = confidence_dir / "confidence.jsonl"
    switch_file = confidence_dir / SWITCH_FILE

    if not switch_file.is_file():
        ntp = SFTTrainer(
            model=model,
            args=sft_config_from(args, push_to_hub=False),
            train_dataset=train_dataset,
            processing_class=processing_class,
            peft_config=peft_config,
            callbacks=callbacks,
        )
        dynamics = TrainingDynamicsCallback(ntp, dataset_name=dataset_name)
        ntp.add_callback(dynamics)
        ntp.add_callback(StopAfterEpochs(self_reference_epochs))
        last = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
        state = _trainer_state(last)
        if state is None or state["epoch"] < self_reference_epochs - 1e-6:
            ntp.train(resume_from_checkpoint=last)
            if ntp.state.epoch < self_reference_epochs - 1e-6:  # stopped before the switch: rerun to resume
                return ntp
            last = get_last_checkpoint(str(output_dir))
            state = _trainer_state(last)
        # the switch checkpoint ends the warm-up (a rerun that finds it skips the NTP phase)
        epoch_files = [dynamics.scores_dir / f"epoch-{e:03d}.jsonl" for e in range(1, self_reference_epochs + 1)]
        table = aggregate_scores(epoch_files)
        if ntp.accelerator.is_main_process:
            table.save(confidence_dir, overwrite=True)
            write_data_map(
                table.dataset,
                confidence_dir,
                examples=train_dataset,
                models=table.models,
                checkpoints=table.checkpoints,
                dataset_name=dataset_name,
            )
            switch = {"checkpoint": last, "global_step": state["global_step"], "max_steps": state["max_steps"]}
            switch_file.write_text(json.dumps(switch, indent=2) + "\n")
        ntp.accelerator.wait_for_everyone()
        del ntp

    switch = json.loads(switch_file.read_text())
    sftmix = SFTMixTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        processing_class=processing_class,
        peft_config=peft_config,
        callbacks=callbacks,
        confidence_scores=str(scores),
    )
    sftmix.add_callback(CheckStepsPerEpoch(switch["max_steps"]))
    last = get_last_checkpoint(str(output_dir))
    if _trainer_state(last)["global_step"] < switch["global_step"]:
        raise FileNotFoundError(
            f"The switch checkpoint {switch['checkpoint']} is gone: the SFTMix phase starts there."
        )
    sftmix.train(resume_from_checkpoint=last)
    return sftmix
