"""The recipe: every shipped config parses, and the whole pipeline runs end to end on the tiny fixtures, as a
two-process data-parallel run through `accelerate launch`, and resumes instead of redoing work."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sftmix_trl.config import SFTMixConfig
from sftmix_trl.recipe import STAGE_DIRS, RecipeArguments, load_train_dataset, make_parser

import tiny

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted(p for p in (REPO / "recipes").rglob("*.yaml") if "accelerate_configs" not in p.parts)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_shipped_config_parses(config):
    # the GPU configs ask for bf16, which TrainingArguments refuses on a machine without a GPU unless told use_cpu
    overrides = [] if torch.cuda.is_available() else ["--use_cpu", "true"]
    recipe, args, model_args = make_parser().parse_args_and_config(args=["--config", str(config), *overrides])
    assert isinstance(recipe, RecipeArguments) and isinstance(args, SFTMixConfig)
    assert recipe.dataset_name and model_args.model_name_or_path
    assert args.mixup_alpha == 0.5 and args.mixup_coef == 0.2


def test_unknown_config_field_fails(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text((REPO / "recipes/smollm2-135m/demo_cpu.yaml").read_text() + "\nwarmup_ratio: 0.1\n")
    with pytest.raises(ValueError, match="warmup_ratio"):
        make_parser().parse_args_and_config(args=["--config", str(config)])


def _launch(args: list[str], cwd: Path) -> str:
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO / "recipes/accelerate_configs/cpu.yaml"),
        "--num_processes", "2",
        str(REPO / "recipes/alpaca.py"),
        *args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-12000:]
    return result.stdout


@pytest.mark.slow
def test_pipeline_runs_end_to_end_on_two_processes_and_resumes(tmp_path, llama_dir):
    tiny.prompt_completion_dataset(48).to_json(tmp_path / "train.jsonl")
    tiny.prompt_completion_dataset(12, seed=7).to_json(tmp_path / "heldout.jsonl")
    run = tmp_path / "run"
    args = [
        "--model_name_or_path", str(llama_dir),
        "--dataset_name", str(tmp_path / "train.jsonl"),
        "--eval_dataset_name", str(tmp_path / "heldout.jsonl"),
        "--eval_dataset_format", "auto",
        "--reference_num_checkpoints", "2",
        "--train_ntp_baseline", "true",
        "--output_dir", str(run),
        "--use_cpu", "true",
        "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "8",
        "--num_train_epochs", "2",
        "--learning_rate", "3e-3",
        "--max_length", "64",
        "--logging_steps", "1",
        "--save_strategy", "no",
        "--report_to", "none",
    ]  # fmt: skip
    out = _launch(args, tmp_path)
    for stage, folder in STAGE_DIRS.items():
        assert (run / folder / "stage_done.json").is_file(), stage
    # 48 examples / (2 ranks x 4) = 6 steps an epoch, 2 epochs: K = 2 evenly spaced checkpoints, each scored once
    assert sorted(p.name for p in (run / "reference/confidence_scores").glob("*.jsonl")) == [
        "checkpoint-12.jsonl",
        "checkpoint-6.jsonl",
    ]
    table = [json.loads(line) for line in (run / "confidence/confidence.jsonl").read_text().splitlines()]
    assert len(table) == 48 and sum(row["half"] == "confident" for row in table) == 24
    assert (run / "confidence/datamap.png").stat().st_size > 10_000
    assert (run / "sftmix/model.safetensors").is_file() and (run / "ntp/model.safetensors").is_file()
    evaluation = json.loads((run / "evaluation/evaluation.json").read_text())
    assert [row["model"] for row in evaluation] == ["base", "sftmix", "ntp"]
    # training on the task lowers the held-out NLL of both trained models below the untrained base
    assert evaluation[1]["nll"] < evaluation[0]["nll"] and evaluation[2]["nll"] < evaluation[0]["nll"]
    assert "| sftmix |" in out

    # a second launch finds every stage done and redoes nothing
    stamp = (run / "sftmix/model.safetensors").stat().st_mtime_ns
    out = _launch(args, tmp_path)
    assert out.count("already done") == len(STAGE_DIRS)
    assert (run / "sftmix/model.safetensors").stat().st_mtime_ns == stamp
    assert "| sftmix |" in out  # the stored evaluation table is shown again


def test_duplicate_rows_share_an_id_unless_dropped(tmp_path):
    rows = [{"instruction": f"Say {w}.", "input": "", "output": w} for w in ("a", "b", "a", "c")]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(rows))
    recipe = RecipeArguments(dataset_name=str(path), dataset_format="alpaca")
    ids = load_train_dataset(recipe)["id"]
    assert len(ids) == 4 and ids[0] == ids[2] and len(set(ids)) == 3
    recipe.drop_duplicates = True
    dataset = load_train_dataset(recipe)
    assert [row["completion"][0]["content"] for row in dataset] == ["a", "b", "c"]
