import math

import pytest
from datasets import Dataset

from sftmix_trl.data_utils import (
    derive_example_id,
    drop_duplicate_examples,
    normalize_content_parts,
    split_by_confidence,
)

import tiny


def test_derived_id_is_stable_and_ignores_scores():
    example = {"prompt": "Add 1 and 2.", "completion": "3"}
    assert derive_example_id(example) == derive_example_id({"completion": "3", "prompt": "Add 1 and 2."})
    assert derive_example_id(example) == derive_example_id({**example, "confidence": -3.5})
    assert derive_example_id(example) != derive_example_id({**example, "completion": "4"})


def test_split_is_equal_sized_ranked_and_deterministic():
    ids = [f"e{i}" for i in range(7)]
    confidence = [0.0, 5.0, 1.0, 5.0, -2.0, 3.0, 1.0]
    split = split_by_confidence(confidence, ids)
    # ranking: e1 (5), e3 (5, tie -> id order), e5 (3), e2 (1), e6 (1), e0 (0), e4 (-2)
    assert split.confident == [1, 3, 5]
    assert split.remainder == [2]
    assert split.unconfident == [6, 0, 4]


def test_duplicated_examples_share_an_id_and_are_split_by_row():
    split = split_by_confidence([2.0, 1.0, 2.0, 1.0, 0.5], ["a", "b", "a", "b", "c"])
    assert (split.confident, split.remainder, split.unconfident) == ([0, 2], [1], [3, 4])
    two = split_by_confidence([0.0, 1.0], ["x", "y"])
    assert (two.confident, two.unconfident, two.remainder) == ([1], [0], [])


@pytest.mark.parametrize(
    "confidence, ids, message",
    [
        ([1.0, math.nan, 2.0, 3.0], ["a", "b", "c", "d"], "NaN or infinite"),
        ([1.0, math.inf, 2.0, 3.0], ["a", "b", "c", "d"], "NaN or infinite"),
        ([1.0], ["a"], "needs at least two training examples"),
    ],
)
def test_split_rejects_bad_scores(confidence, ids, message):
    with pytest.raises(ValueError, match=message):
        split_by_confidence(confidence, ids)


def _as_parts(dataset: Dataset, key: str) -> Dataset:
    """The messages of `dataset` with each content split into two text parts under `key` ("text" or "value")."""

    def split(example):
        return {
            "messages": [
                {**m, "content": [{"type": "text", key: m["content"][:3]}, {"type": "text", key: m["content"][3:]}]}
                for m in example["messages"]
            ]
        }

    return dataset.map(split)


@pytest.mark.parametrize("key", ["text", "value"])  # OpenAI style; LlamaFactory's v1 files
def test_content_parts_become_the_text_they_hold(key):
    dataset = tiny.messages_dataset(6)
    normalized = normalize_content_parts(_as_parts(dataset, key))
    assert normalized["messages"] == dataset["messages"]
    assert normalize_content_parts(dataset) is dataset  # plain text: untouched, not even mapped
    evaluation = normalize_content_parts({"a": _as_parts(dataset, key), "b": dataset})
    assert evaluation["a"]["messages"] == dataset["messages"]


def test_content_parts_that_are_not_text_are_refused():
    rows = [{"messages": [{"role": "user", "content": [{"type": "image", "text": None}]}]}]
    with pytest.raises(ValueError) as error:
        normalize_content_parts(Dataset.from_list(rows))
    assert str(error.value).startswith("Row 0, 'messages' message 0: content part 0 is 'image', not text")
    assert "SFTMix trains text-only language models" in str(error.value)


def test_duplicates_are_dropped_keeping_the_first():
    dataset = Dataset.from_list([{"prompt": p, "completion": "x"} for p in ("a", "b", "a", "c", "b")])
    assert drop_duplicate_examples(dataset)["prompt"] == ["a", "b", "c"]


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

    from sftmix_trl.data_utils import rows_surviving_preparation

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
    from sftmix_trl.data_utils import unscored_examples_error

    assert unscored_examples_error(["a", "b"], {"a", "b", "c"}) is None
    error = unscored_examples_error(["a", "b", "b", "c"], {"a"}, id_column="uid")
    assert str(error) == (
        "3 of 4 training example(s) have no confidence score, e.g. 'b', 'c' (joined on 'uid'). Score every training "
        "example, or drop the unscored ones."
    )


def test_an_empty_or_malformed_data_file_is_named(tmp_path):
    from sftmix_trl.data_utils import load_raw_dataset

    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"The data file .*empty.jsonl is empty: it holds no example"):
        load_raw_dataset(str(tmp_path / "empty.jsonl"))
    (tmp_path / "cut.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "compl\n')
    with pytest.raises(
        ValueError, match=r"Cannot read .*cut.jsonl as a .jsonl data file \(.*\). Check that every line"
    ):
        load_raw_dataset(str(tmp_path / "cut.jsonl"))
