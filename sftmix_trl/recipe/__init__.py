"""The whole SFTMix pipeline as one recipe, stage by stage, resumable.

    accelerate launch recipes/ultrachat.py --config recipes/llama-3.1-8b/sftmix_ultrachat.yaml [--stage all]

The stages (`stages.STAGES`), each writing under the run folder (`output_dir`):

    reference  NTP training of the reference model, scoring every example at K evenly spaced checkpoints
               -> reference/ (checkpoints, confidence_scores/checkpoint-<step>.jsonl)
    score      confidence = -mean_k ppl_k, the equal split, the data map      -> confidence/
    sftmix     SFTMixTrainer on the scored data                                -> sftmix/
               (with `self_reference_epochs` or `split_by: random`, the only training stage: no reference, no score)
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

Modules: `arguments` (RecipeArguments and the parser), `pipeline` (the `Recipe` that runs the stages), `stages` (each
stage: its folder, its run, its inputs), `checkpoints` (which checkpoints are saved and what they keep), `evaluate`
(the evaluate stage's evaluations).
"""

import os
import sys

from ..arguments import INPUT_ERRORS
from .arguments import RecipeArguments, make_parser, parse_recipe_args
from .pipeline import Recipe, load_train_dataset
from .stages import STAGE_NAMES, STAGES

__all__ = [
    "STAGES",
    "STAGE_NAMES",
    "Recipe",
    "RecipeArguments",
    "load_train_dataset",
    "main",
    "make_parser",
    "parse_recipe_args",
]


def main(argv: list[str] | None = None) -> None:
    """`recipes/<dataset>.py`: parse the arguments, run the stages; an input error is one message (see above)."""
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
