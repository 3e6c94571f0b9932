"""The recipe's checkpoints: the reference run's K evenly spaced ones, and the resume state (optimizer, scheduler,
RNG) kept only where a run may still resume from it."""

import shutil
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .. import run_state


class EvenlySpacedCheckpoints(TrainerCallback):
    """Save exactly `num_checkpoints` checkpoints, at steps round(k * max_steps / K) for k = 1..K (the last one at
    the end of training), whatever the run's length."""

    def __init__(self, num_checkpoints: int):
        self.num_checkpoints = num_checkpoints
        self.save_steps: set[int] = set()

    def on_train_begin(self, args, state, control, **kwargs):
        if state.max_steps < self.num_checkpoints:
            raise ValueError(
                f"`reference_num_checkpoints` is {self.num_checkpoints}, but the reference run takes only "
                f"{state.max_steps} optimizer step(s), so it cannot save {self.num_checkpoints} distinct checkpoints "
                "to score. Lower `reference_num_checkpoints`, or raise `reference_num_train_epochs` (or train on more "
                "data, or with a smaller batch)."
            )
        self.save_steps = {
            max(1, round(k * state.max_steps / self.num_checkpoints)) for k in range(1, self.num_checkpoints + 1)
        }

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.save_steps:
            control.should_save = True


# What a checkpoint holds besides the model: needed to resume training from it, not to score or use the model.
RESUME_STATE_FILES = ("optimizer.pt", "optimizer.bin", "scheduler.pt", "scaler.pt", "rng_state*.pth")
RESUME_STATE_DIRS = ("optimizer_*", "global_step*")  # FSDP sharded optimizer state; DeepSpeed's engine state
MODEL_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")


def drop_resume_state(checkpoint: Path) -> None:
    """Delete a checkpoint's optimizer, scheduler and RNG state, keeping its model weights and config. DeepSpeed's
    `global_step*` folder also holds the engine's weight shards: it goes only when the checkpoint has weights of its
    own (ZeRO-3 with `stage3_gather_16bit_weights_on_model_save`, the shipped config)."""
    for pattern in RESUME_STATE_FILES:
        for path in checkpoint.glob(pattern):
            path.unlink()
    has_weights = any((checkpoint / name).is_file() for name in MODEL_WEIGHT_FILES)
    for pattern in RESUME_STATE_DIRS:
        for path in checkpoint.glob(pattern):
            if path.is_dir() and (has_weights or pattern != "global_step*"):
                shutil.rmtree(path)


class KeepResumeStateOfNewestCheckpoint(TrainerCallback):
    """After every save, drop the resume state (optimizer, scheduler, RNG) of every checkpoint but the newest, so
    that an interrupted run still resumes from its last checkpoint while the others keep their model weights only.
    Added after `ConfidenceCallback`, it runs once the new checkpoint is scored."""

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        # the checkpoint this save just completed
        newest = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        for checkpoint in run_state.checkpoints(Path(args.output_dir)):
            if checkpoint != newest:
                drop_resume_state(checkpoint)
