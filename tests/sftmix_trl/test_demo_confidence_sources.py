"""The two cheap confidence sources through the recipe on the demo's real assets, at a reduced size (as
test_demo_pipeline): `confidence_source: training_dynamics` (the reference run's own forwards, no scoring pass) and
`self_reference_epochs: 1` (one run, its first epoch NTP and its own reference). Both write the same confidence table
and data map as the paper's pipeline, with a record for every row that trains and none for the rows TRL drops."""

import json
import math

import pytest
from sftmix_helpers import DEMO_CONFIG, run_demo_recipe
from transformers import AutoTokenizer

from sftmix_trl.assets import resolve_asset
from sftmix_trl.confidence import read_scores
from sftmix_trl.data.preparation import rows_surviving_preparation
from sftmix_trl.recipe import load_train_dataset, parse_recipe_args

# 24 Alpaca rows of which 3 have prompts longer than 64 tokens (TRL drops them): 3 steps of 8 per epoch, 2 epochs;
# no NTP twin and no evaluation (test_demo_pipeline runs those)
REDUCED = [
    "--max_train_examples", "24",
    "--max_length", "64",
    "--num_train_epochs", "2",
    "--train_ntp_baseline", "false",
    "--eval_dataset_name", "",
    "--per_device_eval_batch_size", "8",
]  # fmt: skip

pytestmark = pytest.mark.slow


def run_recipe(tmp_path, run, *extra):
    resolve_asset("asset:alpaca_en_demo")
    return run_demo_recipe(tmp_path, run, *REDUCED, *extra)


def trained_ids(run):
    recipe, args, _ = parse_recipe_args(["--config", str(DEMO_CONFIG), "--output_dir", str(run), *REDUCED])
    dataset = load_train_dataset(recipe)
    tokenizer = AutoTokenizer.from_pretrained(resolve_asset("asset:smollm2-135m-instruct"))
    rows = rows_surviving_preparation(dataset, tokenizer, args)
    assert len(dataset) == 24 and len(rows) == 21
    return [dataset["id"][row] for row in rows]


def check_confidence(run, ids, k):
    summary = json.loads((run / "confidence" / "summary.json").read_text())
    assert summary["num_examples"] == len(ids) and len(summary["checkpoints"]) == k
    assert summary["num_confident"] == summary["num_unconfident"] == len(ids) // 2
    assert (run / "confidence" / "datamap.png").is_file() and (run / "confidence" / "confidence_report.md").is_file()


def test_training_dynamics_source_runs_through_the_recipe(tmp_path):
    run = tmp_path / "dynamics"
    run_recipe(tmp_path, run, "--confidence_source", "training_dynamics")
    ids = trained_ids(run)
    files = sorted((run / "reference" / "training_dynamics").glob("epoch-*.jsonl"))
    assert [f.name for f in files] == ["epoch-001.jsonl", "epoch-002.jsonl"]
    for path in files:
        records, _ = read_scores(path)
        assert [r["id"] for r in records] == ids  # every row that trains, none of the 3 dropped
        assert all(r["num_tokens"] > 0 and math.isfinite(r["ppl"]) for r in records)
    assert not (run / "reference" / "confidence_scores").exists()  # no scoring pass
    check_confidence(run, ids, k=2)
    assert json.loads((run / "sftmix" / "stage_done.json").read_text())["global_step"] == 6


def test_one_run_source_runs_through_the_recipe(tmp_path):
    run = tmp_path / "one-run"
    result = run_recipe(tmp_path, run, "--self_reference_epochs", "1")
    ids = trained_ids(run)
    assert not (run / "reference").exists()  # no reference run
    records, _ = read_scores(run / "sftmix" / "training_dynamics" / "epoch-001.jsonl")
    assert [r["id"] for r in records] == ids
    check_confidence(run, ids, k=1)
    switch = json.loads((run / "confidence" / "switch.json").read_text())
    assert switch["global_step"] == 3 and switch["max_steps"] == 6
    assert json.loads((run / "sftmix" / "stage_done.json").read_text())["global_step"] == 6
    assert (run / "sftmix" / "model.safetensors").is_file()
    # a rerun finds the stage done
    again = run_recipe(tmp_path, run, "--self_reference_epochs", "1")
    assert "stage sftmix: already done" in again.stdout and "stage reference" not in result.stdout
