"""SFTMixTrainer construction: confidence from a column or joined by id from every supported source, and every bad
input refused with its message before training starts."""

import json

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PromptTuningConfig, get_peft_model
from sftmix_helpers import tiny_config, with_confidence
from trl import SFTConfig

from sftmix_trl.data.ids import derive_example_id
from sftmix_trl.trainer import HALF_COLUMN, SFTMixTrainer

import tiny


def build(tokenizer, tmp_path, dataset, model=None, **kwargs):
    args = kwargs.pop("args", None) or tiny_config(tmp_path, **kwargs.pop("config", {}))
    model = model if model is not None else tiny.build_llama(tokenizer)
    return SFTMixTrainer(model, args=args, train_dataset=dataset, processing_class=tokenizer, **kwargs)


def expected_halves(scores: dict[str, float]) -> dict[str, int]:
    """The median split written out: rank by descending score (ties by id), top half 0, bottom half 1."""
    ranked = sorted(scores, key=lambda i: (-scores[i], i))
    half = len(ranked) // 2
    return {i: 0 if r < half else 1 if r >= len(ranked) - half else -1 for r, i in enumerate(ranked)}


def halves_by_id(trainer) -> dict[str, int]:
    return dict(zip(trainer.train_dataset["id"], trainer.train_dataset[HALF_COLUMN]))


def scores_for(dataset, seed=3) -> dict[str, float]:
    return dict(zip(dataset["id"], with_confidence(dataset, seed=seed)["confidence"]))


def test_confidence_column_splits_at_the_median(tokenizer, tmp_path):
    dataset = with_confidence(tiny.prompt_completion_dataset(11))
    trainer = build(tokenizer, tmp_path, dataset)
    assert halves_by_id(trainer) == expected_halves(dict(zip(dataset["id"], dataset["confidence"])))
    assert (len(trainer.confidence_split.confident), len(trainer.confidence_split.remainder)) == (5, 1)


@pytest.mark.parametrize(
    "source", ["dataset", "jsonl", "parquet", "save_to_disk", "mapping", "columns", "config_path"]
)
def test_scores_are_joined_by_id_from_every_source(tokenizer, tmp_path, source):
    dataset = tiny.prompt_completion_dataset(12)
    scores = scores_for(dataset)
    # the scores come in another order and cover extra examples
    rows = [{"id": i, "confidence": c} for i, c in reversed(list(scores.items()))] + [
        {"id": "other", "confidence": 0.0}
    ]
    table = Dataset.from_list(rows)
    kwargs, config = {}, {}
    if source == "dataset":
        kwargs["confidence_scores"] = table
    elif source == "jsonl":
        path = tmp_path / "scores.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        kwargs["confidence_scores"] = str(path)
    elif source == "parquet":
        table.to_parquet(tmp_path / "scores.parquet")
        kwargs["confidence_scores"] = tmp_path / "scores.parquet"
    elif source == "save_to_disk":
        table.save_to_disk(tmp_path / "scores")
        kwargs["confidence_scores"] = tmp_path / "scores"
    elif source == "mapping":
        kwargs["confidence_scores"] = {row["id"]: row["confidence"] for row in rows}
    elif source == "columns":
        kwargs["confidence_scores"] = table.to_dict()
    else:
        table.to_json(tmp_path / "scores.jsonl")
        config["confidence_scores_path"] = str(tmp_path / "scores.jsonl")
    trainer = build(tokenizer, tmp_path, dataset, config=config, **kwargs)
    assert halves_by_id(trainer) == expected_halves(scores)


def test_ids_are_derived_from_content_when_the_dataset_has_none(tokenizer, tmp_path):
    dataset = tiny.prompt_completion_dataset(8).remove_columns("id")
    dataset = dataset.map(lambda row, i: {"prompt": f"{row['prompt']} (#{i})"}, with_indices=True)  # no duplicates
    scores = {derive_example_id(example): float(i) for i, example in enumerate(dataset)}
    trainer = build(tokenizer, tmp_path, dataset, confidence_scores=scores)
    assert halves_by_id(trainer) == expected_halves(scores)


def test_the_join_survives_rows_that_preparation_drops(tokenizer, tmp_path):
    """TRL drops examples whose labels are all masked after truncation; the split is made on the rows it keeps,
    matched by id, not by position."""
    dataset = tiny.prompt_completion_dataset(12)
    long_prompt = "Instruction: " + " ".join(["Describe a red cat."] * 20)
    dataset = dataset.map(lambda row, i: {"prompt": long_prompt} if i in (1, 4) else {}, with_indices=True)
    scores = scores_for(dataset)
    trainer = build(tokenizer, tmp_path, dataset, confidence_scores=scores, config=dict(max_length=48))
    kept = set(trainer.train_dataset["id"])
    assert kept == set(dataset["id"]) - {"ex-0001", "ex-0004"}
    assert halves_by_id(trainer) == expected_halves({i: scores[i] for i in kept})


def test_rows_that_preparation_drops_need_no_score_and_are_reported_once(tokenizer, tmp_path):
    """An example that cannot train needs no score (the scorers write none for it); one warning says how many were
    left out and why. An example that preparation keeps still needs its score."""
    dataset = tiny.prompt_completion_dataset(12)
    long_prompt = "Instruction: " + " ".join(["Describe a red cat."] * 20)
    dataset = dataset.map(lambda row, i: {"prompt": long_prompt} if i in (1, 4) else {}, with_indices=True)
    scores = {i: s for i, s in scores_for(dataset).items() if i not in ("ex-0001", "ex-0004")}
    with pytest.warns(UserWarning, match="dropped 2 of the 12 training examples") as warned:
        trainer = build(tokenizer, tmp_path, dataset, confidence_scores=scores, config=dict(max_length=48))
    assert sum("dropped" in str(w.message) for w in warned) == 1
    assert set(trainer.train_dataset["id"]) == set(scores)
    assert halves_by_id(trainer) == expected_halves(scores)

    del scores["ex-0002"]
    with pytest.raises(ValueError, match="1 of 10 training example\\(s\\) have no confidence score, e.g. 'ex-0002'"):
        build(tokenizer, tmp_path, dataset, confidence_scores=scores, config=dict(max_length=48))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.remove_columns("confidence"), "no 'confidence' column and no `confidence_scores`"),
        (
            lambda d: d.map(
                lambda r, i: {"confidence": float("nan") if i == 2 else r["confidence"]}, with_indices=True
            ),
            "NaN or infinite",
        ),
        (
            lambda d: d.map(
                lambda r, i: {"confidence": float("inf") if i == 2 else r["confidence"]}, with_indices=True
            ),
            "NaN or infinite",
        ),
        (
            lambda d: d.map(lambda r, i: {"confidence": None if i == 2 else r["confidence"]}, with_indices=True),
            "NaN or infinite",
        ),
        (
            lambda d: d.map(lambda r, i: {"id": "ex-0000" if i == 3 else r["id"]}, with_indices=True),
            "'id' column: The examples at rows \\[0, 3\\] share the id 'ex-0000' but differ in content",
        ),
        (lambda d: d.to_iterable_dataset(), "map-style"),
    ],
    ids=["no-confidence", "nan", "inf", "none", "duplicate-ids", "iterable"],
)
def test_bad_datasets_are_refused(tokenizer, tmp_path, change, message):
    dataset = change(with_confidence(tiny.prompt_completion_dataset(8)))
    with pytest.raises((ValueError, TypeError), match=message):
        build(tokenizer, tmp_path, dataset)


@pytest.mark.parametrize(
    "scores, message",
    [
        ({"ex-0000": 1.0}, "7 of 8 training example\\(s\\) have no confidence score"),
        (
            {"id": ["ex-0000", "ex-0000"], "confidence": [1.0, 2.0]},
            "the example id 'ex-0000' has two different scores",
        ),
        ({"key": ["a"], "score": [1.0]}, "must map each example id to a number"),
        ({"id": ["ex-0000"]}, "lack the column\\(s\\) \\['confidence'\\]"),
        (Dataset.from_dict({"key": ["a"], "confidence": [1.0]}), "lack the column\\(s\\) \\['id'\\]"),
        ("scores.csv", "pass a .jsonl/.json or .parquet file"),
        (42, "must be a Dataset, a path, or a mapping"),
    ],
)
def test_bad_scores_are_refused(tokenizer, tmp_path, scores, message):
    dataset = tiny.prompt_completion_dataset(8)
    with pytest.raises((ValueError, TypeError), match=message):
        build(tokenizer, tmp_path, dataset, confidence_scores=scores)


def test_a_dataset_smaller_than_one_micro_batch_makes_one_balanced_micro_batch(tokenizer, tmp_path):
    dataset = with_confidence(tiny.prompt_completion_dataset(7))
    trainer = build(tokenizer, tmp_path, dataset, config=dict(per_device_train_batch_size=8))
    (batch,) = list(trainer.get_train_dataloader())
    assert batch[HALF_COLUMN].tolist() == [0, 0, 0, 1, 1, 1, -1]


def test_an_sftconfig_is_converted_and_still_validated(tokenizer, tmp_path):
    dataset = with_confidence(tiny.prompt_completion_dataset(8))
    common = dict(output_dir=str(tmp_path), use_cpu=True, report_to="none", eos_token="<|im_end|>")
    trainer = build(tokenizer, tmp_path, dataset, args=SFTConfig(per_device_train_batch_size=4, **common))
    assert (trainer.args.mixup_alpha, trainer.args.eos_token) == (0.5, "<|im_end|>")
    with pytest.raises(ValueError, match="needs `packing_strategy='bfd'`"):
        packed = SFTConfig(per_device_train_batch_size=4, packing=True, packing_strategy="wrapped", **common)
        build(tokenizer, tmp_path, dataset, args=packed)
    with pytest.raises(ValueError, match="`per_device_train_batch_size` of at least 2, got 1"):
        build(tokenizer, tmp_path, dataset, args=SFTConfig(per_device_train_batch_size=1, **common))


def test_lora_on_the_lm_head_and_prompt_learning_are_refused(tokenizer, tmp_path):
    dataset = with_confidence(tiny.prompt_completion_dataset(8))
    with pytest.raises(ValueError, match="targets the LM head \\('lm_head'\\)"):
        build(tokenizer, tmp_path, dataset, peft_config=LoraConfig(target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="targets the LM head"):
        build(tokenizer, tmp_path, dataset, peft_config=LoraConfig(target_modules=r".*(q_proj|lm_head)"))
    peft_model = get_peft_model(tiny.build_llama(tokenizer), LoraConfig(target_modules=["lm_head"]))
    with pytest.raises(ValueError, match="adapter on its LM head"):
        build(tokenizer, tmp_path, dataset, model=peft_model)
    prompt_tuning = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    with pytest.raises(ValueError, match="Prompt-learning PEFT methods"):
        build(tokenizer, tmp_path, dataset, peft_config=prompt_tuning)
    with pytest.raises(ValueError, match="Prompt-learning PEFT methods"):
        build(tokenizer, tmp_path, dataset, model=get_peft_model(tiny.build_llama(tokenizer), prompt_tuning))


def test_other_unsupported_setups_are_refused(tokenizer, tmp_path):
    dataset = with_confidence(tiny.prompt_completion_dataset(8))
    with pytest.raises(ValueError, match="`compute_loss_func` cannot be used"):
        build(tokenizer, tmp_path, dataset, compute_loss_func=lambda outputs, labels, num_items_in_batch: 0)
    scaled = tiny.build_llama(tokenizer)
    scaled.config.logit_scale = 0.5
    with pytest.raises(ValueError, match="scales its logits \\(logit_scale\\)"):
        build(tokenizer, tmp_path, dataset, model=scaled)
    # a transform of the logits that no config attribute announces: the forward's logits are compared with the head's
    hooked = tiny.build_llama(tokenizer)
    hooked.lm_head.register_forward_hook(lambda module, inputs, logits: 0.5 * logits)
    with pytest.raises(ValueError, match="logits are not its LM head applied to its last hidden state"):
        build(tokenizer, tmp_path, dataset, model=hooked)
    # SFTTrainer's own refusal comes first: image columns with a tokenizer
    with pytest.raises(ValueError, match="The dataset appears to be vision-related"):
        build(tokenizer, tmp_path, dataset.add_column("images", [[]] * len(dataset)))


def test_the_half_flags_reach_the_batches_and_never_the_model(tokenizer, tmp_path):
    trainer = build(tokenizer, tmp_path, with_confidence(tiny.prompt_completion_dataset(8)))
    batch = next(iter(trainer.get_train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels", HALF_COLUMN}
    assert batch[HALF_COLUMN].dtype == torch.int64


def test_a_model_path_is_loaded_as_sfttrainer_does(llama_dir, tmp_path):
    trainer = SFTMixTrainer(
        str(llama_dir), args=tiny_config(tmp_path), train_dataset=with_confidence(tiny.prompt_completion_dataset(8))
    )
    assert trainer.model.config.vocab_size == len(trainer.processing_class)
    assert "sftmix" in trainer.model.model_tags


def test_content_part_messages_train_as_their_text(tokenizer, tmp_path):
    dataset = with_confidence(tiny.messages_dataset(8))
    parts = dataset.map(
        lambda example: {
            "messages": [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in example["messages"]]
        }
    )
    # SFTTrainer's chat template would fail on a list ("can only concatenate str"); SFTMixTrainer reads the text
    with_parts, as_text = build(tokenizer, tmp_path, parts), build(tokenizer, tmp_path, dataset)
    assert with_parts.train_dataset["input_ids"] == as_text.train_dataset["input_ids"]
    assert with_parts.train_dataset["id"] == as_text.train_dataset["id"]


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_no_example_left_after_truncation_is_refused_as_sfttrainer_refuses_it(tokenizer, tmp_path, packing):
    from trl import SFTTrainer

    dataset = with_confidence(tiny.prompt_completion_dataset(6))
    config = dict(max_length=4, packing=packing)
    with pytest.raises(ValueError, match=r"None of the 6 training example\(s\) has a trainable token left .*"
                       r"max_length=4.* nothing to train"):  # fmt: skip
        build(tokenizer, tmp_path, dataset, config=config)
    if packing:
        return
    # SFTTrainer fails on the same data too (where, and how, is TRL's and torch's business)
    from sftmix_helpers import tiny_sft_config

    with pytest.raises(Exception):  # noqa: B017
        SFTTrainer(
            tiny.build_llama(tokenizer), args=tiny_sft_config(tmp_path, **config), train_dataset=dataset,
            processing_class=tokenizer,
        ).train()  # fmt: skip


def test_an_empty_training_dataset_is_named(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="The training dataset holds no example"):
        build(tokenizer, tmp_path, with_confidence(tiny.prompt_completion_dataset(6)).select([]))


def _rows(dataset) -> list[dict]:
    return [dict(row) for row in dataset]


@pytest.mark.parametrize(
    "edit, message",
    [
        ("none_completion", r"row 3 has a prompt but no completion"),
        ("int_completion", r"row 0: the prompt is str and the completion int"),
        ("mixed_formats", r"row 2 mixes formats: it has \['completion', 'messages', 'prompt'\]"),
        ("empty_conversational_completion", r"row 1, 'completion' is an empty list of messages"),
        ("formats_across_rows", r"row 4 is messages while row 0 is prompt/completion \(text\)"),
    ],
)
def test_rows_that_would_crash_inside_trl_are_named(tokenizer, tmp_path, edit, message):
    rows = _rows(tiny.prompt_completion_dataset(6))
    if edit == "none_completion":
        rows[3]["completion"] = None
    elif edit == "int_completion":
        rows = [{**row, "completion": n} for n, row in enumerate(rows)]
    elif edit == "mixed_formats":
        rows = [{**row, "messages": None} for row in rows]
        rows[2]["messages"] = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    elif edit == "empty_conversational_completion":
        rows = _rows(tiny.conversational_prompt_completion_dataset(6))
        rows[1]["completion"] = []
    else:
        rows = [{**row, "messages": None} for row in rows]
        rows[4] = {"id": rows[4]["id"], "prompt": None, "completion": None, "messages": [
            {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}  # fmt: skip
    dataset = with_confidence(Dataset.from_list(rows))
    with pytest.raises(ValueError, match=f"The training dataset, {message}"):
        build(tokenizer, tmp_path, dataset)
