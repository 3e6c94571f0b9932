"""The recipe: every shipped config parses, and the whole pipeline runs end to end on the tiny fixtures, as a
two-process data-parallel run through `accelerate launch`, and resumes instead of redoing work."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sftmix_helpers import launch_env

from sftmix_trl.assets import resolve_asset
from sftmix_trl.config import SFTMixConfig
from sftmix_trl.recipe import STAGES, RecipeArguments, load_train_dataset, parse_recipe_args

import tiny

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted(p for p in (REPO / "recipes").rglob("*.yaml") if "accelerate_configs" not in p.parts)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_shipped_config_parses(config):
    # the GPU configs ask for bf16, which TrainingArguments refuses on a machine without a GPU unless told use_cpu
    overrides = [] if torch.cuda.is_available() else ["--use_cpu", "true"]
    recipe, args, model_args = parse_recipe_args(["--config", str(config), *overrides])
    assert isinstance(recipe, RecipeArguments) and isinstance(args, SFTMixConfig)
    assert recipe.dataset_name and model_args.model_name_or_path
    assert args.mixup_alpha == 0.5 and args.mixup_coef == 0.2


def test_unknown_fields_are_named_with_the_closest_known_ones(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text((REPO / "recipes/smollm2-135m/demo_cpu.yaml").read_text() + "\nmixup_alhpa: 0.3\n")
    with pytest.raises(ValueError) as error:
        parse_recipe_args(["--config", str(config), "--learnin_rate", "1e-5", "--use_cpu", "true"])
    assert str(error.value).startswith(
        f"Unknown recipe argument(s): 'mixup_alhpa' in {config} (did you mean 'mixup_alpha'?); 'learnin_rate' in the "
        "command line (did you mean 'learning_rate'?)."
    )


def _launch(args: list[str], cwd: Path) -> str:
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO / "recipes/accelerate_configs/cpu.yaml"),
        "--num_processes", "2",
        str(REPO / "recipes/alpaca.py"),
        *args,
    ]  # fmt: skip
    result = subprocess.run(command, cwd=cwd, env=launch_env(), capture_output=True, text=True, timeout=600)
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
    for stage in STAGES:
        assert (run / STAGES[stage].folder / "stage_done.json").is_file(), stage
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
    assert out.count("already done") == len(STAGES)
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


def _recipe_args(model_dir: Path, run: Path, **fields) -> list[str]:
    """Command-line arguments of a small single-process CPU recipe run; `fields` add or override flags."""
    values = {
        "model_name_or_path": str(model_dir),
        "reference_num_checkpoints": "2",
        "output_dir": str(run),
        "use_cpu": "true",
        "per_device_train_batch_size": "4",
        "per_device_eval_batch_size": "8",
        "num_train_epochs": "1",
        "learning_rate": "3e-3",
        "max_length": "64",
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": "true",
        **fields,
    }
    return [item for key, value in values.items() for item in (f"--{key}", str(value))]


def test_a_random_split_trains_without_a_reference_run(tmp_path, llama_dir, capsys):
    """`split_by: random` at the price of NTP: the sftmix stage is the only training stage, with no scores."""
    from sftmix_trl.recipe import main

    tiny.prompt_completion_dataset(16).to_json(tmp_path / "train.jsonl")
    run = tmp_path / "run"
    fields = {"dataset_name": tmp_path / "train.jsonl", "split_by": "random", "logging_steps": "1"}
    main(_recipe_args(llama_dir, run, **fields))
    assert sorted(p.name for p in run.iterdir()) == ["sftmix"]
    assert (run / "sftmix/stage_done.json").is_file() and (run / "sftmix/model.safetensors").is_file()
    # every one of the 4 steps paired the random halves and mixed them
    assert capsys.readouterr().out.count("'mixup_loss'") == 4


def _response_nll(records: list[dict]) -> float:
    scored = [r for r in records if r["num_tokens"] > 0]
    return sum(r["nll"] * r["num_tokens"] for r in scored) / sum(r["num_tokens"] for r in scored)


@pytest.mark.slow
def test_lora_runs_every_stage_and_adapters_are_evaluated_on_their_base(tmp_path, llama_dir, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from sftmix_trl.confidence.scoring import score_trainer
    from sftmix_trl.recipe import main

    tiny.prompt_completion_dataset(24).to_json(tmp_path / "train.jsonl")
    heldout = tiny.prompt_completion_dataset(8, seed=7)
    heldout.to_json(tmp_path / "heldout.jsonl")
    run = tmp_path / "run"
    main(
        _recipe_args(
            llama_dir, run, dataset_name=tmp_path / "train.jsonl", eval_dataset_name=tmp_path / "heldout.jsonl",
            eval_dataset_format="auto", train_ntp_baseline="true", use_peft="true", lora_r="8", lora_alpha="16",
        )
    )  # fmt: skip
    assert (
        f"[sftmix] stage evaluate: sftmix ({run / 'sftmix'}) is a PEFT adapter; scoring it merged into its base model "
        f"{llama_dir}"
    ) in capsys.readouterr().out
    for stage in STAGES:
        assert (run / STAGES[stage].folder / "stage_done.json").is_file(), stage
    # every trained stage holds an adapter, not a full model; the reference checkpoints keep no optimizer state
    for folder in ("sftmix", "ntp"):
        assert (run / folder / "adapter_model.safetensors").is_file() and not (run / folder / "config.json").exists()
    checkpoints = sorted((run / "reference").glob("checkpoint-*"))
    assert len(checkpoints) == 2 and all((c / "adapter_model.safetensors").is_file() for c in checkpoints)
    assert not any((c / "optimizer.pt").exists() or (c / "scheduler.pt").exists() for c in checkpoints)

    # the evaluation scored each adapter on its base: the same NLL as an independent, unmerged PeftModel gives
    evaluation = {row["model"]: row["nll"] for row in json.loads((run / "evaluation/evaluation.json").read_text())}
    assert set(evaluation) == {"base", "sftmix", "ntp"}
    tokenizer = AutoTokenizer.from_pretrained(run / "sftmix")
    for name in ("sftmix", "ntp"):
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), run / name)
        args = SFTConfig(str(tmp_path / "check"), use_cpu=True, max_length=64, report_to="none", bf16=False)
        trainer = SFTTrainer(model=adapted, args=args, train_dataset=heldout, processing_class=tokenizer)
        assert evaluation[name] == pytest.approx(_response_nll(score_trainer(trainer, show_progress=False)), rel=1e-5)
        assert evaluation[name] < evaluation["base"]  # the adapter was applied, and trained


@pytest.mark.slow
def test_ultrachat_recipe_runs_offline_on_llamafactory_messages(tmp_path, llama_dir):
    from sftmix_trl.recipe import main

    run = tmp_path / "run"
    # the shipped offline config, at tiny scale: LlamaFactory's `messages` file, its content a list of text parts
    config = REPO / "recipes/smollm2-135m/ultrachat_offline_cpu.yaml"
    main(["--config", str(config), *_recipe_args(llama_dir, run, max_train_examples="16", max_length="512")])
    for stage in ("reference", "score", "sftmix"):
        assert (run / STAGES[stage].folder / "stage_done.json").is_file(), stage
    table = [json.loads(line) for line in (run / "confidence/confidence.jsonl").read_text().splitlines()]
    assert len(table) == 16 and all(row["id"].endswith("-1") for row in table)  # one example per assistant turn
    report = (run / "confidence/confidence_report.md").read_text()
    rows = [json.loads(line) for line in Path(resolve_asset("asset:v1_sft_demo")).read_text().splitlines()]
    user_turns = {row["messages"][0]["content"][0]["value"] for row in rows}
    # the report shows the instructions as text, taken from the file's content parts
    shown = [line.split("|")[8].strip() for line in report.splitlines() if line.startswith("| 1 |")]
    assert shown and all(any(text.rstrip("…") in turn for turn in user_turns) for text in shown)


def test_max_train_examples_draws_a_seeded_random_subset(tmp_path):
    rows = [{"instruction": f"Say {n}.", "input": "", "output": str(n)} for n in range(40)]
    (tmp_path / "alpaca.json").write_text(json.dumps(rows))

    def drawn(seed: int) -> list[str]:
        recipe = RecipeArguments(
            dataset_name=str(tmp_path / "alpaca.json"), dataset_format="alpaca", max_train_examples=8, subset_seed=seed
        )
        return [int(row["completion"][0]["content"]) for row in load_train_dataset(recipe)]

    first = drawn(42)
    assert first == drawn(42) and first != drawn(7)  # seeded: the same draw every time, another seed another one
    assert len(set(first)) == 8 and first == sorted(first) and first != list(range(8))  # in file order, not the head


def test_missing_local_dataset_is_named_without_a_hub_call(tmp_path, monkeypatch, capsys):
    import datasets

    from sftmix_trl.recipe import main

    def no_hub(*args, **kwargs):
        raise AssertionError("load_dataset was called")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"Dataset 'data/my_data.jsonl' does not exist \(looked for /"):
        load_train_dataset(RecipeArguments(dataset_name="data/my_data.jsonl"))
    # the recipe's entry point: one message, no traceback, exit status 1
    with pytest.raises(SystemExit) as exit_info:
        main(["--model_name_or_path", "m", "--dataset_name", "data/my_data.jsonl", "--use_cpu", "true"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "Traceback" not in err
    assert err.startswith("[sftmix] error: FileNotFoundError: Dataset 'data/my_data.jsonl' does not exist")
    with pytest.raises(FileNotFoundError):  # --debug: the exception itself, with its traceback
        main(["--model_name_or_path", "m", "--dataset_name", "data/my_data.jsonl", "--use_cpu", "true", "--debug"])


def test_checkpoints_keep_resume_state_only_while_needed(tmp_path):
    from transformers import TrainerState

    from sftmix_trl.recipe.checkpoints import KeepResumeStateOfNewestCheckpoint

    resume_files = ("optimizer.pt", "scheduler.pt", "rng_state.pth")
    for step in (2, 4):
        checkpoint = tmp_path / f"checkpoint-{step}"
        checkpoint.mkdir()
        for name in ("model.safetensors", "config.json", *resume_files):
            (checkpoint / name).write_bytes(b"x")
    args = SFTMixConfig(str(tmp_path), use_cpu=True, report_to="none")
    KeepResumeStateOfNewestCheckpoint().on_save(args, TrainerState(global_step=4), None)
    # the older checkpoint keeps its model only; the newest everything a resumed run needs
    assert sorted(p.name for p in (tmp_path / "checkpoint-2").iterdir()) == ["config.json", "model.safetensors"]
    assert all((tmp_path / "checkpoint-4" / name).is_file() for name in resume_files)


def _truncating_recipe(tmp_path: Path, model_dir: Path, **fields):
    """A recipe on 12 tiny prompt/completion rows at max_length=30, where TRL drops the rows whose prompt fills it."""
    from sftmix_trl.recipe import Recipe

    tiny.prompt_completion_dataset(12).to_json(tmp_path / "train.jsonl")
    fields = {"dataset_name": str(tmp_path / "train.jsonl"), "max_length": "30", **fields}
    return Recipe(*parse_recipe_args(_recipe_args(model_dir, tmp_path / "run", **fields)))


def test_score_stage_checks_that_every_row_the_sftmix_stage_trains_has_a_score(tmp_path, llama_dir, capsys):
    from sftmix_trl.confidence.scoring import make_record, write_scores

    recipe = _truncating_recipe(tmp_path, llama_dir, reference_num_checkpoints="1")
    dataset = recipe.train_dataset
    rows = recipe.trained_rows(recipe.model)
    assert 0 < len(rows) < len(dataset)  # some rows cannot train
    trained_ids = [dataset["id"][row] for row in rows]
    scores = recipe.stage_dir("reference") / "confidence_scores" / "checkpoint-3.jsonl"

    # a reference run that scored every row that trains: the rows TRL drops need no score
    write_scores(
        [make_record(i, float(n + 1), 2, prob_sum=1.0, top1_sum=1) for n, i in enumerate(trained_ids)], scores, {}
    )
    STAGES["score"].run(recipe)
    out = capsys.readouterr().out
    left_out = len(dataset) - len(rows)
    assert (
        f"{left_out} of 12 training example(s) have no response token left after truncation at max_length=30 and "
        f"will not train; the {len(rows)} that train all have a score."
    ) in out
    assert recipe.is_done("score")

    # a row that could train and has no score fails the score stage, with the trainer's message, before any output
    shutil.rmtree(recipe.stage_dir("score"))
    write_scores(
        [make_record(i, float(n + 1), 2, prob_sum=1.0, top1_sum=1) for n, i in enumerate(trained_ids[1:])], scores, {}
    )
    with pytest.raises(ValueError) as error:
        STAGES["score"].run(recipe)
    assert str(error.value) == (
        f"1 of {len(rows)} training example(s) have no confidence score, e.g. {trained_ids[0]!r} (joined on 'id'). "
        "Score every training example, or drop the unscored ones."
    )
    assert not recipe.stage_dir("score").exists()


def test_a_reference_model_that_drops_rows_the_target_trains_is_refused_before_training(tmp_path, llama_dir):
    # a reference model with a coarser tokenizer (smaller vocabulary, longer prompts) than the target's
    target_dir = tmp_path / "target"
    target_tokenizer = tiny.build_tokenizer(vocab_size=400)
    tiny.build_qwen2(target_tokenizer, hidden_size=32, num_layers=1).save_pretrained(target_dir)
    target_tokenizer.save_pretrained(target_dir)
    recipe = _truncating_recipe(tmp_path, target_dir, reference_model_name_or_path=str(llama_dir))
    trained, scored = recipe.trained_rows(recipe.model), recipe.trained_rows(recipe.reference_model)
    assert set(trained) > set(scored)
    with pytest.raises(ValueError, match=r"reference model .* would leave training examples without a score") as error:
        STAGES["reference"].run(recipe)
    assert f"{len(trained) - len(scored)} of {len(trained)} training example(s) have no confidence score" in str(
        error.value
    )
    assert not recipe.stage_dir("reference").exists()  # refused before any training


# ---- interrupted and rerun: kill -9 at chosen moments, stale folders, inputs refused before the long work ----

# Runs the recipe in this process after arranging to SIGKILL itself at one moment: `<stage> <moment> <step>`, where
# moment is "scoring" (a checkpoint saved, its scoring under way) or "save" (a checkpoint's weights written, its
# optimizer and trainer state not yet), then the recipe's arguments.
KILLER = """
import os, signal, sys
from pathlib import Path

stage, moment, step = sys.argv[1], sys.argv[2], int(sys.argv[3])

def here(trainer):
    return Path(trainer.args.output_dir).name == stage and trainer.state.global_step == step

if moment == "scoring":
    from sftmix_trl.confidence import callback
    score_trainer = callback.score_trainer
    def killing_score_trainer(trainer, *args, **kwargs):
        if here(trainer):
            os.kill(os.getpid(), signal.SIGKILL)
        return score_trainer(trainer, *args, **kwargs)
    callback.score_trainer = killing_score_trainer
elif moment == "save":
    from transformers import Trainer
    save = Trainer._save_optimizer_and_scheduler
    def killing_save(self, output_dir):
        if here(self):
            os.kill(os.getpid(), signal.SIGKILL)
        return save(self, output_dir)
    Trainer._save_optimizer_and_scheduler = killing_save

from sftmix_trl.recipe import main
main(sys.argv[4:])
"""


def _run_recipe(args: list[str], cwd: Path, kill_at: tuple[str, str, int] | None = None):
    script = cwd / "killer.py"
    script.write_text(KILLER)
    command = [sys.executable, str(script), *map(str, kill_at or ("none", "none", -1)), *args]
    return subprocess.run(command, cwd=cwd, env=launch_env(), capture_output=True, text=True, timeout=600)


def _results(run: Path) -> dict[str, bytes]:
    """What a run computes, byte for byte: the reference scores, the confidence table, the SFTMix model."""
    files = sorted((run / "reference/confidence_scores").glob("*.jsonl"))
    files += [run / "confidence/confidence.jsonl", run / "sftmix/model.safetensors"]
    return {str(path.relative_to(run)): path.read_bytes() for path in files}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, llama_dir):
    """An uninterrupted run (24 rows, 6 steps a stage; reference checkpoints at steps 3 and 6, SFTMix checkpoints every
    2 steps) and the arguments that made it."""
    base = tmp_path_factory.mktemp("finished")
    tiny.prompt_completion_dataset(24).to_json(base / "train.jsonl")

    def arguments(run: Path, **fields) -> list[str]:
        fields = {"dataset_name": base / "train.jsonl", "save_strategy": "steps", "save_steps": "2", **fields}
        return _recipe_args(llama_dir, run, **fields)

    result = _run_recipe(arguments(base / "run"), base)
    assert result.returncode == 0, result.stderr[-5000:]
    return base / "run", arguments


@pytest.mark.slow
def test_a_run_killed_at_every_moment_finishes_bit_identical_to_an_uninterrupted_one(tmp_path, finished_run):
    reference_run, arguments = finished_run
    run = tmp_path / "run"
    args = arguments(run)
    kills = [
        # a reference checkpoint saved, its scoring under way: the rerun resumes from it and scores it first
        ("reference", "scoring", 3),
        # the last reference checkpoint half saved: the rerun removes it and resumes from the one before
        ("reference", "save", 6),
        # the last reference checkpoint saved, its scoring under way: the rerun resumes with no step left, scores it
        ("reference", "scoring", 6),
        # an SFTMix checkpoint half saved: the rerun resumes from the complete one before it
        ("sftmix", "save", 4),
    ]
    for kill_at in kills:
        result = _run_recipe(args, tmp_path, kill_at)
        assert result.returncode == -9, (kill_at, result.stderr[-3000:])  # killed where it was meant to be
    assert (run / "sftmix/checkpoint-4").is_dir() and not (run / "sftmix/checkpoint-4/trainer_state.json").exists()
    result = _run_recipe(args, tmp_path)
    assert result.returncode == 0, result.stderr[-5000:]
    assert f"removed {run / 'sftmix/checkpoint-4'}, cut short while saving" in result.stdout
    assert f"resuming from {run / 'sftmix/checkpoint-2'}" in result.stdout
    assert _results(run) == _results(reference_run)


def _refusal(args: list[str], capsys) -> str:
    """The one-line error with which the recipe's entry point refuses `args` (exit status 1, no traceback)."""
    from sftmix_trl.recipe import main

    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "Traceback" not in err, err
    return err


@pytest.mark.slow
@pytest.mark.parametrize(
    "change, stage, named",
    [
        ("dataset", "reference", "data: "),
        ("model", "reference", "model.files.config.json: "),
        ("max_length", "reference", "training.max_length: 64 -> 48"),
        ("mixup_coef", "sftmix", "training.mixup_coef: 0.2 -> 0.3"),
        ("older_folder", "reference", "without a record of the inputs"),
    ],
)
def test_a_finished_run_rerun_with_other_inputs_is_refused_naming_what_changed(
    tmp_path, finished_run, llama_dir, capsys, change, stage, named
):
    finished, arguments = finished_run
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = _results(run)
    fields = {}
    if change == "dataset":  # the same ids (an id column of the data's own), other content
        other = tiny.prompt_completion_dataset(24, seed=3)
        other = other.remove_columns("id").add_column("id", tiny.prompt_completion_dataset(24)["id"])
        other.to_json(tmp_path / "other.jsonl")
        fields["dataset_name"] = tmp_path / "other.jsonl"
    elif change == "model":
        shutil.copytree(llama_dir, tmp_path / "other-model")
        (tmp_path / "other-model/config.json").write_text(
            (tmp_path / "other-model/config.json")
            .read_text()
            .replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e-05')
        )
        fields["model_name_or_path"] = tmp_path / "other-model"
    elif change == "max_length":
        fields["max_length"] = "48"
    elif change == "mixup_coef":
        fields["mixup_coef"] = "0.3"
    else:  # a run folder of an older sftmix-trl: done files, no record of the inputs
        for record in run.glob("*/stage_inputs.json"):
            record.unlink()
    err = _refusal(arguments(run, **fields), capsys)
    assert f"{run / STAGES[stage].folder} holds" in err and named in err
    assert f"Use a new output_dir, or remove {run / STAGES[stage].folder} to redo the {stage} stage" in err
    assert _results(run) == before  # nothing was touched


def test_rerun_refusals_name_the_changed_field(tmp_path):
    from sftmix_trl import run_state

    stage_dir = tmp_path / "sftmix"
    inputs = {"training": {"max_length": 64, "seed": 1}, "data": "abc"}
    assert not run_state.check_stage_inputs("sftmix", stage_dir, inputs)  # nothing there: a fresh start
    run_state.record_stage_inputs("sftmix", stage_dir, inputs)
    assert not run_state.check_stage_inputs("sftmix", stage_dir, {"other": 1})  # a record but no work: afresh
    (stage_dir / "checkpoint-2").mkdir()
    assert run_state.check_stage_inputs("sftmix", stage_dir, inputs)  # the same inputs: resumed
    with pytest.raises(run_state.StageInputsMismatch) as error:
        run_state.check_stage_inputs("sftmix", stage_dir, {**inputs, "training": {"max_length": 128, "seed": 1}})
    assert "training.max_length: 64 -> 128" in str(error.value) and "seed" not in str(error.value)


def test_incomplete_checkpoints_are_never_resumed_from(tmp_path):
    from sftmix_trl import run_state

    for step, complete in ((2, True), (4, True), (6, False)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}/model.safetensors").write_bytes(b"w")
        if complete:
            (tmp_path / f"checkpoint-{step}/trainer_state.json").write_text(json.dumps({"global_step": step}))
    (tmp_path / "checkpoint-4/trainer_state.json").write_text('{"global_st')  # cut short while written
    assert run_state.last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    assert run_state.remove_incomplete_checkpoints(tmp_path) == [tmp_path / "checkpoint-4", tmp_path / "checkpoint-6"]
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-2"]


def test_data_fingerprint_follows_the_content():
    from sftmix_trl.run_state import dataset_fingerprint

    data = tiny.prompt_completion_dataset(12)
    assert dataset_fingerprint(data) == dataset_fingerprint(tiny.prompt_completion_dataset(12))
    edited = data.map(lambda row, i: {"completion": row["completion"] + ("!" if i == 5 else "")}, with_indices=True)
    assert dataset_fingerprint(edited) != dataset_fingerprint(data)
    assert dataset_fingerprint(data.select(range(11))) != dataset_fingerprint(data)


@pytest.mark.parametrize(
    "fields, message",
    [
        # more checkpoints than the reference run's 6 optimizer steps: refused before the first step
        ({"reference_num_checkpoints": "7"}, "`reference_num_checkpoints` is 7, but the reference run takes only 6"),
        # truncation leaves no row a response token
        ({"max_length": "6"}, "None of the 24 training examples of .* has a response token left"),
        ({"loss_impl": "triton"}, r"`loss_impl='triton'` cannot run on this run's device: impl='triton' needs CUDA"),
    ],
    ids=["K>steps", "no-example-left", "triton-without-cuda"],
)
def test_inputs_that_cannot_work_are_refused_before_the_reference_run(
    tmp_path, llama_dir, monkeypatch, capsys, fields, message
):
    import re

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # as on a machine without CUDA, outside the test suite
    tiny.prompt_completion_dataset(24).to_json(tmp_path / "train.jsonl")
    run = tmp_path / "run"
    err = _refusal(_recipe_args(llama_dir, run, dataset_name=tmp_path / "train.jsonl", **fields), capsys)
    assert re.search(message, err), err
    assert not list(run.glob("reference/checkpoint-*"))  # no step was trained
    # nothing there holds a rerun back: with the input fixed it starts afresh
    from sftmix_trl import run_state

    assert not run_state.has_work(run / "reference")


@pytest.mark.parametrize("where", ["file", "under-a-file"])
def test_an_output_dir_that_cannot_be_written_is_named(tmp_path, llama_dir, capsys, where):
    tiny.prompt_completion_dataset(8).to_json(tmp_path / "train.jsonl")
    (tmp_path / "a-file").write_text("")
    run = tmp_path / "a-file" if where == "file" else tmp_path / "a-file" / "run"
    expected = "is a file, not a folder" if where == "file" else "cannot be written (Not a directory)"
    err = _refusal(_recipe_args(llama_dir, run, dataset_name=tmp_path / "train.jsonl"), capsys)
    assert f"`output_dir` {str(run)!r}" in err and expected in err


@pytest.mark.slow
def test_one_training_example_trains_in_the_recipe_as_in_the_trainer(tmp_path, llama_dir):
    from sftmix_trl.recipe import main

    tiny.prompt_completion_dataset(1).to_json(tmp_path / "train.jsonl")
    run = tmp_path / "run"
    args = _recipe_args(llama_dir, run, dataset_name=tmp_path / "train.jsonl", reference_num_checkpoints="1")
    # nothing to pair it with: next-token loss alone, with the trainer's one warning
    with pytest.warns(
        UserWarning, match="With 1 training example\\(s\\), SFTMix cannot form a confident / unconfident"
    ):
        main(args)
    table = [json.loads(line) for line in (run / "confidence/confidence.jsonl").read_text().splitlines()]
    assert [row["half"] for row in table] == ["remainder"]
    assert (run / "sftmix/model.safetensors").is_file() and (run / "sftmix/stage_done.json").is_file()


@pytest.mark.slow
def test_a_damaged_reference_score_file_is_rescored_from_its_checkpoint(tmp_path, finished_run, capsys):
    from sftmix_trl.confidence import read_scores
    from sftmix_trl.recipe import main

    finished, arguments = finished_run
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    scores = run / "reference/confidence_scores/checkpoint-3.jsonl"
    scores.write_text(scores.read_text()[:-30])  # cut short
    shutil.rmtree(run / "confidence")  # the score stage runs again, and reads it
    main(arguments(run, stage="score"))
    assert "stage reference: scoring ['checkpoint-3'], which have no complete score file" in capsys.readouterr().out
    rescored, _ = read_scores(scores)
    original, _ = read_scores(finished / "reference/confidence_scores/checkpoint-3.jsonl")
    assert [r["id"] for r in rescored] == [r["id"] for r in original]
    assert [r["ppl"] for r in rescored] == pytest.approx([r["ppl"] for r in original], rel=1e-5)
    assert (run / "confidence/stage_done.json").is_file()
