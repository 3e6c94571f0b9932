"""TrainingDynamicsCallback: each example's NLL from the forward of the step that trains it, against an independent
scoring of the model as it is before that step; one file per finished epoch; resuming mid-epoch; rows that cannot
train get no record; the files aggregate like checkpoint scores."""

import math

import pytest
from datasets import Dataset
from sftmix_helpers import StopAt, tiny_config, tiny_sft_config, with_confidence
from transformers import TrainerCallback
from trl import SFTTrainer

from sftmix_trl import SFTMixTrainer
from sftmix_trl.confidence import TrainingDynamicsCallback, aggregate_scores, read_scores, score_trainer

import tiny


class ScoreBeforeEveryStep(TrainerCallback):
    """The reference: every example scored (an extra, eval-mode forward) with the model as each step begins."""

    def __init__(self, trainer):
        self.trainer, self.before_step = trainer, {}

    def on_step_begin(self, args, state, control, **kwargs):
        records = score_trainer(self.trainer, show_progress=False)
        self.before_step[state.global_step + 1] = {r["id"]: r for r in records}


def make_trainer(tokenizer, output_dir, dataset, **overrides):
    args = tiny_sft_config(output_dir, **{"num_train_epochs": 2, "per_device_train_batch_size": 4, **overrides})
    trainer = SFTTrainer(tiny.build_llama(tokenizer), args=args, train_dataset=dataset, processing_class=tokenizer)
    dynamics = TrainingDynamicsCallback(trainer, dataset_name="tiny")
    trainer.add_callback(dynamics)
    return trainer, dynamics


@pytest.mark.parametrize("padding_free", [False, True])
def test_each_record_is_the_nll_of_the_step_that_trains_the_example(tokenizer, tmp_path, padding_free):
    dataset = tiny.prompt_completion_dataset(12)
    # (padding-free without packing wants `max_length=None`: TRL does not truncate then)
    extra = {"padding_free": True, "max_length": None} if padding_free else {}
    trainer, dynamics = make_trainer(tokenizer, tmp_path, dataset, **extra)
    reference = ScoreBeforeEveryStep(trainer)
    trainer.add_callback(reference)
    trainer.train()

    files = [tmp_path / "training_dynamics" / f"epoch-00{e}.jsonl" for e in (1, 2)]
    assert dynamics.written == files
    for epoch, path in enumerate(files, start=1):
        records, metadata = read_scores(path)
        assert metadata["epoch"] == epoch and metadata["global_step"] == 3 * epoch
        assert [r["id"] for r in records] == dataset["id"]  # every example once, in the dataset's order
        steps = {r["step"] for r in records}
        assert steps == {3 * epoch - 2, 3 * epoch - 1, 3 * epoch}  # 4 examples per step
        for record in records:
            expected = reference.before_step[record["step"]][record["id"]]
            assert record["num_tokens"] == expected["num_tokens"] > 0
            for key in ("nll", "ppl", "prob", "accuracy"):
                assert record[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key
    # the model changed between the epochs, so the records did
    first, second = (read_scores(p)[0] for p in files)
    assert all(a["nll"] != b["nll"] for a, b in zip(first, second))

    table = aggregate_scores([tmp_path / "training_dynamics"])
    assert table.checkpoints == ["epoch-001", "epoch-002"]
    by_id = {r["id"]: r for r in table.dataset}
    record = first[0]
    assert by_id[record["id"]]["confidence"] == pytest.approx(-(record["ppl"] + second[0]["ppl"]) / 2)
    assert sorted(table.dataset["half"]).count("confident") == 6


@pytest.mark.parametrize("stop_at", [2, 4])  # two steps into the first epoch; one into the second
def test_resuming_mid_epoch_writes_the_same_files(tokenizer, tmp_path, stop_at):
    dataset = tiny.prompt_completion_dataset(12)
    full, _ = make_trainer(tokenizer, tmp_path / "full", dataset)
    full.train()
    interrupted, _ = make_trainer(tokenizer, tmp_path / "run", dataset, save_strategy="steps", save_steps=1)
    interrupted.add_callback(StopAt(stop_at))
    interrupted.train()
    assert (tmp_path / "run" / "training_dynamics" / f"partial-step-{stop_at}.pt").is_file()
    resumed, _ = make_trainer(tokenizer, tmp_path / "run", dataset, save_strategy="steps", save_steps=1)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / f"checkpoint-{stop_at}"))
    assert not list((tmp_path / "run" / "training_dynamics").glob("partial-*"))  # finished: gone
    for name in ("epoch-001.jsonl", "epoch-002.jsonl"):
        got, _ = read_scores(tmp_path / "run" / "training_dynamics" / name)
        want, _ = read_scores(tmp_path / "full" / "training_dynamics" / name)
        assert [r["id"] for r in got] == [r["id"] for r in want]
        for a, b in zip(got, want):
            assert a["step"] == b["step"] and a["nll"] == pytest.approx(b["nll"], rel=1e-5)


def test_resuming_mid_epoch_without_the_recorded_sums_is_refused(tokenizer, tmp_path):
    dataset = tiny.prompt_completion_dataset(12)
    full, _ = make_trainer(tokenizer, tmp_path / "full", dataset, save_strategy="steps", save_steps=2)
    full.train()  # finished: its recorded sums are gone
    resumed, _ = make_trainer(tokenizer, tmp_path / "other", dataset)
    with pytest.raises(FileNotFoundError, match="in the middle of an epoch"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))


def test_rows_that_cannot_train_get_no_record_and_a_partial_epoch_no_file(tokenizer, tmp_path):
    rows = tiny.prompt_completion_dataset(8).to_list()
    rows.append({"id": "too-long", "prompt": "Instruction: " + "red " * 200 + "\nResponse:", "completion": " x"})
    trainer, dynamics = make_trainer(tokenizer, tmp_path, Dataset.from_list(rows), max_length=48, num_train_epochs=1.5)
    assert "too-long" not in trainer.train_dataset["id"]  # TRL's preparation dropped it
    trainer.train()
    assert len(dynamics.written) == 1  # the second epoch stopped halfway: no file
    records, _ = read_scores(dynamics.written[0])
    assert [r["id"] for r in records] == [r["id"] for r in rows[:8]]
    assert all(r["num_tokens"] > 0 and math.isfinite(r["ppl"]) for r in records)


def test_a_loss_other_than_the_fused_forward_is_refused(tokenizer, tmp_path):
    args = tiny_sft_config(tmp_path)
    trainer = SFTTrainer(
        tiny.build_llama(tokenizer),
        args=args,
        train_dataset=tiny.prompt_completion_dataset(8),
        processing_class=tokenizer,
        compute_loss_func=lambda outputs, labels, num_items_in_batch=None: outputs.logits.sum() * 0,
    )
    with pytest.raises(ValueError, match="fused LM head"):
        TrainingDynamicsCallback(trainer)


def test_an_sftmix_trainer_is_refused(tokenizer, tmp_path):
    trainer = SFTMixTrainer(
        tiny.build_llama(tokenizer),
        args=tiny_config(tmp_path),
        train_dataset=with_confidence(tiny.prompt_completion_dataset(8)),
        processing_class=tokenizer,
    )
    with pytest.raises(TypeError, match="records an NTP run's forwards"):
        TrainingDynamicsCallback(trainer)
