"""The recipe's two new options parse and are checked before any work: `confidence_source` names a known source, a
one run's warm-up is a positive number of epochs, and a one run skips the reference and score stages."""

from pathlib import Path

import pytest

from sftmix_trl.recipe import Recipe, parse_recipe_args

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = str(REPO / "recipes/smollm2-135m/demo_cpu.yaml")


def test_the_confidence_source_defaults_to_the_papers_checkpoints_and_takes_training_dynamics():
    recipe, _, _ = parse_recipe_args(["--config", DEMO_CONFIG])
    assert recipe.confidence_source == "checkpoints" and recipe.self_reference_epochs is None
    recipe, _, _ = parse_recipe_args(["--config", DEMO_CONFIG, "--confidence_source", "training_dynamics"])
    assert recipe.confidence_source == "training_dynamics"


def test_an_unknown_confidence_source_or_an_empty_warm_up_is_refused():
    with pytest.raises((ValueError, SystemExit)):
        parse_recipe_args(["--config", DEMO_CONFIG, "--confidence_source", "dynamics"])
    with pytest.raises(ValueError, match="`self_reference_epochs` must be at least 1, got 0"):
        parse_recipe_args(["--config", DEMO_CONFIG, "--self_reference_epochs", "0"])


def test_a_one_run_skips_the_reference_and_score_stages(tmp_path):
    argv = ["--config", DEMO_CONFIG, "--output_dir", str(tmp_path), "--self_reference_epochs", "1"]
    assert Recipe(*parse_recipe_args(argv)).stages_to_run() == ["sftmix", "baseline", "evaluate"]
    argv = ["--config", DEMO_CONFIG, "--output_dir", str(tmp_path)]
    assert Recipe(*parse_recipe_args(argv)).stages_to_run()[:3] == ["reference", "score", "sftmix"]


def test_a_random_split_skips_the_reference_and_score_stages_and_cannot_be_a_one_run(tmp_path):
    argv = ["--config", DEMO_CONFIG, "--output_dir", str(tmp_path), "--split_by", "random"]
    assert Recipe(*parse_recipe_args(argv)).stages_to_run() == ["sftmix", "baseline", "evaluate"]
    with pytest.raises(ValueError, match="`split_by: random` pairs random halves, which need no confidence"):
        Recipe(*parse_recipe_args([*argv, "--self_reference_epochs", "1"]))
