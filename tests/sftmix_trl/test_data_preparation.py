import pytest

import tiny

# With the tiny tokenizer, prompts are 25 to 37 tokens long: at max_length=30 TRL drops the examples whose prompt fills
# the sequence (completion-only loss, keep_start), and keeps the others.
SHORT = 30


@pytest.mark.parametrize(
    "make_dataset, overrides",
    [
        (tiny.prompt_completion_dataset, {"max_length": SHORT}),
        (tiny.prompt_completion_dataset, {"max_length": SHORT, "shuffle_dataset": True}),
        (tiny.prompt_completion_dataset, {"max_length": SHORT, "completion_only_loss": False}),
        (tiny.conversational_prompt_completion_dataset, {"max_length": 36}),
        (tiny.messages_dataset, {"max_length": 36, "assistant_only_loss": True}),
        (tiny.prompt_completion_dataset, {"max_length": SHORT, "dataset_kwargs": {"skip_prepare_dataset": True}}),
    ],
    ids=["completion", "shuffled", "full-loss", "conversational", "assistant-only", "skip-prepare"],
)
def test_rows_surviving_preparation_are_the_rows_sftrainer_keeps(tokenizer, llama, tmp_path, make_dataset, overrides):
    from trl import SFTConfig, SFTTrainer

    from sftmix_trl.data.preparation import rows_surviving_preparation

    dataset = make_dataset(16)
    dataset = dataset.map(lambda _, row: {"id": f"row-{row}"}, with_indices=True)  # one id per row
    args = SFTConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, **overrides)
    if overrides.get("dataset_kwargs"):
        dataset = dataset.map(lambda example: tokenizer(example["prompt"] + example["completion"]))
        dataset = dataset.map(lambda example: {"labels": example["input_ids"]})
    rows = rows_surviving_preparation(dataset, tokenizer, args)
    trainer = SFTTrainer(model=llama, args=args, train_dataset=dataset, processing_class=tokenizer)
    assert sorted(trainer.train_dataset["id"]) == sorted(dataset["id"][row] for row in rows)
    assert rows == sorted(rows)
    if overrides == {"max_length": SHORT}:
        assert 0 < len(rows) < len(dataset)  # the case this is for: some rows dropped, some kept
    if "completion_only_loss" in overrides or "dataset_kwargs" in overrides:
        assert rows == list(range(len(dataset)))


def test_unscored_examples_error_is_the_trainers_message():
    from sftmix_trl.data.preparation import unscored_examples_error

    assert unscored_examples_error(["a", "b"], {"a", "b", "c"}) is None
    error = unscored_examples_error(["a", "b", "b", "c"], {"a"}, id_column="uid")
    assert str(error) == (
        "3 of 4 training example(s) have no confidence score, e.g. 'b', 'c' (joined on 'uid'). Score every training "
        "example, or drop the unscored ones."
    )
