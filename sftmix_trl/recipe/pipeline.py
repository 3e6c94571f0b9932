"""One SFTMix run: its folder, its data and models, and the stages of `stages.STAGES` run in order, each skipped when
done from the inputs asked for now, refused when its folder holds other work, resumed when it was cut short."""

import os
import shutil
from functools import cached_property
from pathlib import Path

from accelerate import PartialState
from datasets import Dataset
from trl import ModelConfig, get_peft_config

from .. import checks, run_state
from ..assets import resolve_asset
from ..config import SFTMixConfig
from ..data import load_examples
from ..data.preparation import rows_surviving_preparation
from .arguments import RecipeArguments
from .checkpoints import KeepResumeStateOfNewestCheckpoint, drop_resume_state
from .stages import STAGES


def load_train_dataset(arguments: RecipeArguments) -> Dataset:
    """The training examples the recipe's arguments name (`sftmix_trl.data.load_examples`)."""
    if arguments.dataset_name is None:
        raise ValueError("The recipe needs `dataset_name`: a hub id, a local file or folder, or `asset:<name>`.")
    return load_examples(
        arguments.dataset_name,
        config=arguments.dataset_config,
        split=arguments.dataset_train_split,
        data_format=arguments.dataset_format,
        drop_duplicates=arguments.drop_duplicates,
        max_examples=arguments.max_train_examples,
        seed=arguments.subset_seed,
        asset_cache_dir=arguments.asset_cache_dir,
    )


def load_eval_dataset(arguments: RecipeArguments) -> Dataset:
    """The held-out examples of the evaluate stage, drawn and deduplicated as the training examples are."""
    return load_examples(
        arguments.eval_dataset_name,
        config=arguments.eval_dataset_config,
        split=arguments.eval_dataset_split,
        data_format=arguments.eval_dataset_format,
        drop_duplicates=arguments.drop_duplicates,
        max_examples=arguments.max_eval_examples,
        seed=arguments.subset_seed,
        asset_cache_dir=arguments.asset_cache_dir,
    )


class Recipe:
    """Runs the stages of one SFTMix run; every process of a data-parallel launch runs the same code."""

    def __init__(self, arguments: RecipeArguments, args: SFTMixConfig, model_args: ModelConfig):
        self.arguments = arguments
        self.args = args
        self.model_args = model_args
        self.state = PartialState()
        self.run_dir = Path(args.output_dir)
        self.model = self._model_path(model_args.model_name_or_path)
        self.reference_model = self._model_path(
            arguments.reference_model_name_or_path or model_args.model_name_or_path
        )
        self.reference_epochs = arguments.reference_num_train_epochs or args.num_train_epochs
        self.peft_config = get_peft_config(model_args)
        if arguments.self_reference_epochs and args.split_by == "random":
            raise ValueError(
                "`self_reference_epochs` makes the sftmix stage its own reference for a confidence split, and "
                "`split_by: random` pairs random halves, which need no confidence: drop one of the two."
            )
        # the sftmix stage reads the reference stage's scores, unless it is its own reference or needs none
        self.reads_reference_scores = not arguments.self_reference_epochs and args.split_by != "random"
        # like TRL's sft script: the model is loaded by the trainer with these kwargs
        self.args.model_init_kwargs = {
            "revision": model_args.model_revision,
            "attn_implementation": model_args.attn_implementation,
            "dtype": model_args.dtype,
            **(args.model_init_kwargs or {}),
        }
        self._stage_inputs: dict[str, dict] = {}

    def _model_path(self, name: str | None) -> str:
        if name is None:
            raise ValueError("The recipe needs `model_name_or_path`: a hub id, a local folder or `asset:<name>`.")
        if not name.startswith("asset:"):
            return name
        with self.state.main_process_first():
            return str(resolve_asset(name, self.arguments.asset_cache_dir))

    # ---- the data ----

    @cached_property
    def train_dataset(self) -> Dataset:
        with self.state.main_process_first():
            return load_train_dataset(self.arguments)

    def load_eval_dataset(self) -> Dataset:
        with self.state.main_process_first():
            return load_eval_dataset(self.arguments)

    def trained_rows(self, model: str) -> list[int] | None:
        """The rows of the training set that TRL's preparation keeps for `model` (its tokenizer) with the run's
        settings (`max_length`, the loss masks, ...): the rows a stage training `model` trains and a reference run
        of `model` scores. None when that cannot be told without loading the model (a `chat_template_path` that
        names a tokenizer): the trainer checks then."""
        from transformers import AutoProcessor

        processing_class = AutoProcessor.from_pretrained(
            model,
            revision=(self.args.model_init_kwargs or {}).get("revision"),
            trust_remote_code=self.args.trust_remote_code,
        )
        try:
            return rows_surviving_preparation(self.train_dataset, processing_class, self.args)
        except ValueError as error:
            if "chat_template_path" not in str(error):
                raise
            self.state.print(f"[sftmix] which rows train is checked by the trainer: {error}")
            return None

    def example_ids(self, rows: list[int]) -> list:
        """The ids of training rows, as the trainers join scores on them."""
        id_column = self.args.id_column if self.args.id_column in self.train_dataset.column_names else "id"
        ids = self.train_dataset[id_column]
        return [ids[row] for row in rows]

    # ---- the stages' folders and what each was made from (`run_state`) ----

    def stage_dir(self, stage: str) -> Path:
        return self.run_dir / STAGES[stage].folder

    def is_done(self, stage: str) -> bool:
        return run_state.is_done(self.stage_dir(stage))

    def mark_done(self, stage: str, **info) -> None:
        self.state.wait_for_everyone()
        if self.state.is_main_process:
            run_state.mark_done(stage, self.stage_dir(stage), self.stage_inputs(stage), **info)
        # every process sees the stage done before the next one checks it
        self.state.wait_for_everyone()

    def stage_inputs(self, stage: str) -> dict:
        """Everything the outputs of `stage` depend on, including the inputs of the stages whose outputs it reads."""
        if stage not in self._stage_inputs:
            self._stage_inputs[stage] = run_state.jsonable(STAGES[stage].inputs(self))
        return self._stage_inputs[stage]

    @cached_property
    def data_fingerprint(self) -> str:
        return run_state.dataset_fingerprint(self.train_dataset)

    @cached_property
    def peft_fingerprint(self):
        return run_state.jsonable(self.peft_config.to_dict() if self.peft_config is not None else None)

    def reusable(self, stage: str) -> bool:
        """Whether the stage's folder holds work made from this run's inputs (raises when it holds other work). The
        score stage, cheap and made from the reference stage's files alone, is redone instead of refused."""
        try:
            return run_state.check_stage_inputs(stage, self.stage_dir(stage), self.stage_inputs(stage))
        except run_state.StageInputsMismatch as error:
            if stage != "score":
                raise
            self.state.print(f"[sftmix] stage score: redoing it. {str(error).split(' Use a new output_dir')[0]}")
            self.state.wait_for_everyone()
            if self.state.is_main_process:
                shutil.rmtree(self.stage_dir(stage))
            self.state.wait_for_everyone()
            return False

    def upstream(self, stage: str) -> tuple[str, ...]:
        """The stages whose outputs `stage` reads in this run."""
        if stage == "sftmix" and not self.reads_reference_scores:
            return ()
        if stage == "evaluate" and self.arguments.train_ntp_baseline:
            return (*STAGES[stage].upstream, "baseline")
        return STAGES[stage].upstream

    # ---- checks before any work ----

    def check_upstream_done(self, stage: str) -> None:
        """The stages whose outputs `stage` reads are done, from this run's inputs."""
        for upstream in self.upstream(stage):
            if not (self.reusable(upstream) and self.is_done(upstream)):
                raise ValueError(
                    f"The {stage} stage reads the outputs of the {upstream} stage, which is not done in "
                    f"{self.stage_dir(upstream)}: run `--stage {upstream}` (or `--stage all`) first."
                )

    def check_run_dir(self) -> None:
        """The run folder is a folder this process can write to."""
        run_dir = self.run_dir
        if run_dir.exists() and not run_dir.is_dir():
            raise ValueError(f"`output_dir` {str(run_dir)!r} is a file, not a folder: choose another `output_dir`.")
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            probe = run_dir / f".write-test-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as error:
            raise ValueError(
                f"`output_dir` {str(run_dir)!r} cannot be written ({error.strerror or error}): choose a folder you "
                "can write to, or fix its permissions."
            ) from None

    def check_before_training(self, stages: list[str]) -> None:
        """What cannot work, found before the first long step: the loss backend on this device, and data that leaves
        no example to train after truncation."""
        if "sftmix" in stages:
            checks.check_loss_impl_runs(self.args.loss_impl, self.args.device)
        by_dynamics = self.arguments.confidence_source == "training_dynamics"
        if "reference" in stages and by_dynamics and self.reference_epochs < 1:
            raise ValueError(
                f"`confidence_source: training_dynamics` records one score file per whole epoch of the reference run, "
                f"which trains {self.reference_epochs} epoch(s): raise `reference_num_train_epochs` to at least 1."
            )
        if any(stage in stages for stage in ("reference", "sftmix", "baseline")):
            for model in dict.fromkeys((self.model, self.reference_model)):
                rows = self.trained_rows(model)
                if rows is not None and not rows:
                    raise ValueError(
                        f"None of the {len(self.train_dataset)} training examples of {self.arguments.dataset_name} has a "
                        f"response token left after truncation at max_length={self.args.max_length} with "
                        f"{model}'s tokenizer, so there is nothing to train. Raise `max_length`, or check the data's "
                        "prompt and completion columns."
                    )

    # ---- running ----

    def stages_to_run(self) -> list[str]:
        if self.arguments.stage != "all":
            return [self.arguments.stage]
        stages = ["reference", "score", "sftmix"] if self.reads_reference_scores else ["sftmix"]
        if self.arguments.train_ntp_baseline:
            stages.append("baseline")
        if self.arguments.eval_dataset_name or self.arguments.generate_benchmarks or self.arguments.lm_eval_tasks:
            stages.append("evaluate")
        return stages

    def run(self) -> None:
        self.check_run_dir()
        if len(self.train_dataset) == 0:
            raise ValueError(f"The training data {self.arguments.dataset_name} holds no example: nothing to train on.")
        to_run = []
        for stage in self.stages_to_run():
            # every stage's folder is checked before any work, so that a stale one stops the run at once
            if self.reusable(stage) and self.is_done(stage):
                self.state.print(f"[sftmix] stage {stage}: already done in {self.stage_dir(stage)}, skipping.")
            else:
                to_run.append(stage)
        if to_run:
            self.check_before_training(to_run)
        for stage in to_run:
            self.check_upstream_done(stage)
            self.state.print(f"[sftmix] stage {stage} -> {self.stage_dir(stage)}")
            self.state.wait_for_everyone()
            if self.state.is_main_process:
                run_state.record_stage_inputs(stage, self.stage_dir(stage), self.stage_inputs(stage))
            STAGES[stage].run(self)
        if self.state.is_main_process:
            self.print_outputs()
        # Tear the process group down while every process is still here: left to the interpreter's exit, the
        # rendezvous host can destroy gloo's and the store's threads while another process still uses them (seen as
        # "terminate called without an active exception", SIGABRT, after a finished multi-process run).
        self.state.wait_for_everyone()
        self.state.destroy_process_group()

    def remove_incomplete_checkpoints(self, stage: str) -> None:
        """Delete the stage's checkpoints that a kill cut short while saving (their steps are redone)."""
        if self.state.is_main_process:
            for removed in run_state.remove_incomplete_checkpoints(self.stage_dir(stage)):
                print(f"[sftmix] stage {stage}: removed {removed}, cut short while saving; its steps are redone.")
        self.state.wait_for_everyone()

    def train(self, trainer, stage: str, save_model: bool = True, check_outputs=None) -> None:
        """Train `stage`'s trainer, resuming from its last complete checkpoint; then `check_outputs(self)`, if given,
        before the stage is marked done, and every checkpoint loses its resume state."""
        output_dir = self.stage_dir(stage)
        self.remove_incomplete_checkpoints(stage)
        last = run_state.last_complete_checkpoint(output_dir)
        if last is not None:
            self.state.print(f"[sftmix] stage {stage}: resuming from {last}")
        trainer.add_callback(KeepResumeStateOfNewestCheckpoint())
        trainer.train(resume_from_checkpoint=None if last is None else str(last))
        if save_model:
            trainer.save_model(str(output_dir))
        if check_outputs is not None:
            check_outputs(self)
        self.mark_done(stage, global_step=trainer.state.global_step)
        if self.state.is_main_process:  # done: nothing will resume from its checkpoints
            for checkpoint in run_state.checkpoints(output_dir):
                drop_resume_state(checkpoint)

    def print_outputs(self) -> None:
        """The run folder's contents, then the evaluation table: last, so that it is what a run (or a re-run that
        finds every stage done) leaves on screen."""
        print(f"[sftmix] run folder {self.run_dir}:")
        for stage in STAGES:
            directory = self.stage_dir(stage)
            if directory.is_dir():
                shown = sorted(p.name for p in directory.iterdir() if not p.name.startswith("checkpoint-"))
                print(f"  {directory.relative_to(self.run_dir)}/: {', '.join(shown)}")
        evaluation = self.stage_dir("evaluate") / "evaluation.md"
        if evaluation.is_file():
            print(f"\n{evaluation.read_text()}", end="")
