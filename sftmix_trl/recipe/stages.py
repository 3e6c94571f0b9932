"""The recipe's stages, in the order `--stage all` runs them: what each one runs, the folder it writes, and what its
outputs are made from (`run_state` compares that record before reusing a folder).

    reference  NTP training of the reference model, scoring every example at K evenly spaced checkpoints
               (or recording its training dynamics)                          -> reference/
    score      confidence = -mean_k ppl_k, the equal split, the data map      -> confidence/
    sftmix     SFTMixTrainer on the scored data (one run: its own reference;
               `split_by: random`: random halves, no scores, no reference)   -> sftmix/
    baseline   an NTP-only twin with the same data and budget (optional)      -> ntp/
    evaluate   held-out response NLL, benchmark answers, lm-eval tasks         -> evaluation/
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from trl import SFTConfig, SFTTrainer

from .. import run_state
from ..confidence import ConfidenceCallback, TrainingDynamicsCallback, aggregate_scores, score_checkpoints
from ..confidence.callback import SCORES_DIRNAME
from ..confidence.datamap import write_data_map
from ..confidence.dynamics import DYNAMICS_DIRNAME
from ..confidence.scoring import SCORES_SUFFIX, is_complete_score_file
from ..config import SFTMixConfig, sft_config_from
from ..data.preparation import unscored_examples_error
from ..one_run import train_one_run
from ..trainer import SFTMixTrainer
from .checkpoints import EvenlySpacedCheckpoints, KeepResumeStateOfNewestCheckpoint, drop_resume_state
from .evaluate import evaluate_generation, evaluate_lm_eval, evaluate_nll

if TYPE_CHECKING:
    from .pipeline import Recipe

# the fields SFTMixConfig adds to SFTConfig: inputs of the sftmix stage only
SFTMIX_ONLY_FIELDS = frozenset(f.name for f in dataclasses.fields(SFTMixConfig)) - frozenset(
    f.name for f in dataclasses.fields(SFTConfig)
)


# ---- reference ----


def reference_inputs(recipe: Recipe) -> dict:
    return {
        "data": recipe.data_fingerprint,
        "model": run_state.model_fingerprint(recipe.reference_model),
        "training": run_state.training_fields(recipe.args, exclude=SFTMIX_ONLY_FIELDS | {"num_train_epochs"}),
        "num_train_epochs": recipe.reference_epochs,
        "confidence_source": recipe.arguments.confidence_source,
        "reference_num_checkpoints": recipe.arguments.reference_num_checkpoints,
        "peft": recipe.peft_fingerprint,
    }


def run_reference(recipe: Recipe) -> None:
    check_reference_scores_what_sftmix_trains(recipe)
    output_dir = recipe.stage_dir("reference")
    by_dynamics = recipe.arguments.confidence_source == "training_dynamics"
    # only the SFTMix model goes to the Hub (`push_to_hub`): the reference run is a means to its scores; scored at
    # checkpoints, it saves exactly those (the last one is the final model: no second copy of the weights); by its
    # training dynamics, no scoring pass needs a checkpoint, so it saves the ones its save_strategy makes (to resume)
    args = sft_config_from(
        recipe.args,
        output_dir=str(output_dir),
        save_strategy=recipe.args.save_strategy if by_dynamics else "no",
        num_train_epochs=recipe.reference_epochs,
        push_to_hub=False,
    )
    trainer = SFTTrainer(
        model=recipe.reference_model, args=args, train_dataset=recipe.train_dataset, peft_config=recipe.peft_config
    )
    if by_dynamics:
        trainer.add_callback(TrainingDynamicsCallback(trainer, dataset_name=recipe.arguments.dataset_name))
        recipe.train(trainer, "reference", save_model=False)
        return
    trainer.add_callback(EvenlySpacedCheckpoints(recipe.arguments.reference_num_checkpoints))
    trainer.add_callback(ConfidenceCallback(trainer, dataset_name=recipe.arguments.dataset_name))
    recipe.train(trainer, "reference", save_model=False, check_outputs=complete_reference_scores)


def check_reference_scores_what_sftmix_trains(recipe: Recipe) -> None:
    """Before the reference run: with a reference model of its own (another tokenizer), every row the sftmix stage
    trains must be one the reference run scores, i.e. one that the reference model's preparation keeps."""
    if recipe.reference_model == recipe.model:  # the same tokenizer and settings: the same rows
        return
    trained = recipe.trained_rows(recipe.model)
    scored = recipe.trained_rows(recipe.reference_model)
    if trained is None or scored is None:
        return
    error = unscored_examples_error(
        recipe.example_ids(trained), set(recipe.example_ids(scored)), recipe.args.id_column
    )
    if error is not None:
        raise ValueError(
            f"The reference model {recipe.reference_model} would leave training examples without a score: TRL's "
            f"preparation with its tokenizer drops them (no response token left after truncation at max_length="
            f"{recipe.args.max_length}), while the sftmix stage's, with {recipe.model}'s, keeps them. {error} (Raise "
            "`max_length`, or drop those examples.)"
        )


def complete_reference_scores(recipe: Recipe) -> None:
    """Every checkpoint of the reference run has a complete score file (its records match its sidecar), and there
    are K of them. A checkpoint without one (its file damaged or deleted after the run) is rescored from its weights
    by the offline scorer, which writes the records the training-time scorer writes."""
    reference_dir = recipe.stage_dir("reference")
    scores_dir = reference_dir / SCORES_DIRNAME
    unscored = [
        checkpoint
        for checkpoint in run_state.checkpoints(reference_dir)
        if not is_complete_score_file(scores_dir / f"{checkpoint.name}{SCORES_SUFFIX}")
    ]
    if unscored:
        recipe.state.print(
            f"[sftmix] stage reference: scoring {[c.name for c in unscored]}, which have no complete score file"
        )
        args = sft_config_from(recipe.args, output_dir=str(reference_dir), report_to="none", push_to_hub=False)
        score_checkpoints(
            unscored, recipe.train_dataset, scores_dir, args=args, dataset_name=recipe.arguments.dataset_name,
            overwrite=True,
        )  # fmt: skip
    complete = [path for path in sorted(scores_dir.glob(f"*{SCORES_SUFFIX}")) if is_complete_score_file(path)]
    expected = recipe.arguments.reference_num_checkpoints
    if len(complete) != expected:
        raise ValueError(
            f"The reference stage in {reference_dir} holds {len(complete)} complete score file(s) where it makes "
            f"{expected} (one per checkpoint), and the checkpoints of the others are gone (`save_total_limit`). "
            f"Use a new output_dir, or remove {reference_dir} to redo the reference stage."
        )


# ---- score ----


def score_inputs(recipe: Recipe) -> dict:
    # the table is the reference scores'; its check of the sftmix stage's rows reads the target's tokenizer
    return {"reference": recipe.stage_inputs("reference"), "model": run_state.model_fingerprint(recipe.model)}


def run_score(recipe: Recipe) -> None:
    output_dir = recipe.stage_dir("score")
    scores, expected = recipe.stage_dir("reference"), recipe.arguments.reference_num_checkpoints
    if recipe.arguments.confidence_source == "checkpoints":
        complete_reference_scores(recipe)
    else:  # training dynamics: one file per whole epoch of the reference run
        scores, expected = scores / DYNAMICS_DIRNAME, math.floor(recipe.reference_epochs)
    # every process aggregates and checks (a few files read; TRL's preparation in the check synchronizes the
    # processes), so that a bad input stops every one of them with the same message; the main process writes
    table = aggregate_scores([scores])
    if len(table.checkpoints) != expected:
        raise ValueError(
            f"Expected {expected} reference score files, found "
            f"{len(table.checkpoints)} in {recipe.stage_dir('reference')}: rerun the reference stage."
        )
    check_every_trained_example_scored(recipe, table.dataset["id"])
    if recipe.state.is_main_process:
        table.save(output_dir, overwrite=True)
        write_data_map(
            table.dataset,
            output_dir,
            examples=recipe.train_dataset,
            models=table.models,
            checkpoints=table.checkpoints,
            dataset_name=recipe.arguments.dataset_name,
        )
    recipe.mark_done("score", scores=str(output_dir / "confidence.jsonl"))


def check_every_trained_example_scored(recipe: Recipe, scored_ids) -> None:
    """The score stage's check of the sftmix stage's input, before its long work: every training row that TRL's
    preparation keeps for the target model has a score (the message is the trainer's). The rows it drops (no response
    token left after truncation) cannot train and need none; how many there are is printed. Every process of a launch
    calls it (TRL's preparation waits for the main process)."""
    rows = recipe.trained_rows(recipe.model)
    if rows is None:
        return
    error = unscored_examples_error(recipe.example_ids(rows), set(scored_ids), recipe.args.id_column)
    if error is not None:
        raise error
    left_out = len(recipe.train_dataset) - len(rows)
    if left_out:
        recipe.state.print(
            f"[sftmix] stage score: {left_out} of {len(recipe.train_dataset)} training example(s) have no response "
            f"token left after truncation at max_length={recipe.args.max_length} and will not train; the "
            f"{len(rows)} that train all have a score."
        )


# ---- sftmix ----


def sftmix_inputs(recipe: Recipe) -> dict:
    if not recipe.reads_reference_scores:  # one run (its own reference), or random halves (no scores)
        return {
            "data": recipe.data_fingerprint,
            "model": run_state.model_fingerprint(recipe.model),
            "training": run_state.training_fields(recipe.args),
            "self_reference_epochs": recipe.arguments.self_reference_epochs,
            "peft": recipe.peft_fingerprint,
        }
    return {
        "score": recipe.stage_inputs("score"),
        "training": run_state.training_fields(recipe.args),
        "peft": recipe.peft_fingerprint,
    }


def sftmix_args(recipe: Recipe, **overrides) -> SFTMixConfig:
    """The sftmix stage's config: the run's, writing to sftmix/ and pushed as the run's name (not as the stage
    folder's, "sftmix") unless `hub_model_id` says otherwise."""
    return dataclasses.replace(
        recipe.args,
        output_dir=str(recipe.stage_dir("sftmix")),
        hub_model_id=recipe.args.hub_model_id or recipe.run_dir.name,
        **overrides,
    )


def run_sftmix(recipe: Recipe) -> None:
    if recipe.arguments.self_reference_epochs:
        run_one_run(recipe)
        return
    scores = recipe.stage_dir("score") / "confidence.jsonl" if recipe.reads_reference_scores else None
    args = sftmix_args(recipe, confidence_scores_path=None if scores is None else str(scores))
    trainer = SFTMixTrainer(
        model=recipe.model, args=args, train_dataset=recipe.train_dataset, peft_config=recipe.peft_config
    )
    recipe.train(trainer, "sftmix")


def run_one_run(recipe: Recipe) -> None:
    """The sftmix stage as its own reference: NTP warm-up with training dynamics, the split (-> confidence/), SFTMix
    for the remaining epochs; resumable on either side of the switch (`train_one_run` finds the checkpoint)."""
    output_dir = recipe.stage_dir("sftmix")
    recipe.remove_incomplete_checkpoints("sftmix")
    trainer = train_one_run(
        recipe.model,
        sftmix_args(recipe),
        recipe.train_dataset,
        self_reference_epochs=recipe.arguments.self_reference_epochs,
        peft_config=recipe.peft_config,
        callbacks=[KeepResumeStateOfNewestCheckpoint()],
        dataset_name=recipe.arguments.dataset_name,
        confidence_dir=recipe.stage_dir("score"),
    )
    trainer.save_model(str(output_dir))
    recipe.mark_done("sftmix", global_step=trainer.state.global_step)
    if recipe.state.is_main_process:
        for checkpoint in run_state.checkpoints(output_dir):
            drop_resume_state(checkpoint)


# ---- baseline ----


def baseline_inputs(recipe: Recipe) -> dict:
    return {
        "data": recipe.data_fingerprint,
        "model": run_state.model_fingerprint(recipe.model),
        "training": run_state.training_fields(recipe.args, exclude=SFTMIX_ONLY_FIELDS),
        "peft": recipe.peft_fingerprint,
    }


def run_baseline(recipe: Recipe) -> None:
    args = sft_config_from(recipe.args, output_dir=str(recipe.stage_dir("baseline")), push_to_hub=False)
    trainer = SFTTrainer(
        model=recipe.model, args=args, train_dataset=recipe.train_dataset, peft_config=recipe.peft_config
    )
    recipe.train(trainer, "baseline")


# ---- evaluate ----


def evaluate_inputs(recipe: Recipe) -> dict:
    arguments = recipe.arguments
    return {
        "sftmix": recipe.stage_inputs("sftmix"),
        # the NTP twin is evaluated when it is trained in this run or was before
        "baseline": (
            recipe.stage_inputs("baseline") if arguments.train_ntp_baseline or recipe.is_done("baseline") else None
        ),
        "held_out": [arguments.eval_dataset_name, arguments.eval_dataset_config, arguments.eval_dataset_split,
                     arguments.eval_dataset_format, arguments.max_eval_examples, arguments.subset_seed,
                     arguments.drop_duplicates],
        "generate": [arguments.generate_benchmarks, arguments.generate_max_prompts, arguments.generate_max_new_tokens],
        "lm_eval": [arguments.lm_eval_tasks, arguments.lm_eval_num_fewshot, arguments.lm_eval_limit,
                    arguments.lm_eval_include_path],
        "scoring": run_state.training_fields(recipe.args, exclude=SFTMIX_ONLY_FIELDS),
    }  # fmt: skip


def run_evaluate(recipe: Recipe) -> None:
    """The base model and every trained model on what the recipe asks for: the held-out response NLL, answers to the
    instruction-following benchmarks for their judges, the lm-evaluation-harness tasks."""
    models = {"base": recipe.model, "sftmix": str(recipe.stage_dir("sftmix"))}
    if recipe.is_done("baseline"):
        models["ntp"] = str(recipe.stage_dir("baseline"))
    output_dir = recipe.stage_dir("evaluate")
    output_dir.mkdir(parents=True, exist_ok=True)
    arguments = recipe.arguments
    if arguments.eval_dataset_name:
        evaluate_nll(models, recipe.load_eval_dataset(), output_dir, recipe.args, arguments.eval_dataset_name)
    if recipe.state.is_main_process and arguments.generate_benchmarks:
        evaluate_generation(models, output_dir, arguments, device=str(recipe.args.device))
    if recipe.state.is_main_process and arguments.lm_eval_tasks:
        evaluate_lm_eval(models, output_dir, arguments, device=str(recipe.args.device))
    recipe.mark_done("evaluate")


@dataclass(frozen=True)
class Stage:
    """One stage of the recipe: the folder it writes under the run folder, what runs it, what its outputs are made
    from, and the stages whose outputs it reads."""

    folder: str
    run: Callable[[Recipe], None]
    inputs: Callable[[Recipe], dict]
    upstream: tuple[str, ...] = ()


# in the order `--stage all` runs them
STAGES: dict[str, Stage] = {
    "reference": Stage("reference", run_reference, reference_inputs),
    "score": Stage("confidence", run_score, score_inputs, upstream=("reference",)),
    "sftmix": Stage("sftmix", run_sftmix, sftmix_inputs, upstream=("score",)),
    "baseline": Stage("ntp", run_baseline, baseline_inputs),
    "evaluate": Stage("evaluation", run_evaluate, evaluate_inputs, upstream=("sftmix",)),
}
STAGE_NAMES = tuple(STAGES)
