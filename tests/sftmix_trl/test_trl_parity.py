"""The same scenarios with TRL's SFTTrainer and SFTMixTrainer: SFTMixTrainer trains wherever SFTTrainer does, with the
same loss at `mixup_coef=0` and the same number of optimizer steps per epoch; where SFTTrainer refuses an input,
SFTMixTrainer refuses it first, with SFTTrainer's error."""

import math
import re

import pytest
import torch
from datasets import Dataset
from sftmix_helpers import loss_and_grads, tiny_config, tiny_sft_config, with_confidence
from trl import SFTTrainer

from sftmix_trl.data_utils import derive_example_id
from sftmix_trl.trainer import HALF_COLUMN, SFTMixTrainer

import tiny


def tokenized(tokenizer, num_examples):
    """Pre-tokenized rows (input_ids, labels with the prompt masked) for `skip_prepare_dataset`."""
    rows = []
    for i, (prompt, response) in enumerate(tiny.make_pairs(num_examples, seed=5)):
        prompt_ids = tokenizer(f"Instruction: {prompt}\nResponse:")["input_ids"]
        completion_ids = tokenizer(f" {response}<|im_end|>")["input_ids"]
        rows.append(
            {
                "id": f"tok-{i}",
                "input_ids": prompt_ids + completion_ids,
                "labels": [-100] * len(prompt_ids) + completion_ids,
            }
        )
    return with_confidence(Dataset.from_list(rows))


def duplicated(num_distinct=6, repeats=(0, 1, 2)):
    """Rows without an id column, some repeated: identical rows, identical derived ids."""
    dataset = tiny.prompt_completion_dataset(num_distinct).remove_columns("id")
    return Dataset.from_list(list(dataset) + [dataset[i] for i in repeats])


def via_transform(dataset):
    """The same pre-tokenized rows served through `with_transform` (the transform returns its own columns only)."""

    def transform(batch):
        return {"input_ids": batch["input_ids"], "labels": batch["labels"]}

    return dataset.with_transform(transform)


# name: (dataset builder (tokenizer) -> Dataset, model builder, config overrides)
SCENARIOS = {
    "prompt_completion": (lambda t: with_confidence(tiny.prompt_completion_dataset(10)), tiny.build_llama, {}),
    "conversational": (
        lambda t: with_confidence(tiny.conversational_prompt_completion_dataset(10)),
        tiny.build_llama,
        {},
    ),
    "messages_assistant_only": (
        lambda t: with_confidence(tiny.messages_dataset(10)),
        tiny.build_llama,
        {"assistant_only_loss": True},
    ),
    "text": (lambda t: with_confidence(tiny.text_dataset(10)), tiny.build_llama, {}),
    "two_rows": (lambda t: with_confidence(tiny.prompt_completion_dataset(2)), tiny.build_llama, {}),
    "odd_rows_accumulation": (
        lambda t: with_confidence(tiny.prompt_completion_dataset(11)),
        tiny.build_llama,
        {"gradient_accumulation_steps": 2, "num_train_epochs": 2},
    ),
    "odd_micro_batch": (
        lambda t: with_confidence(tiny.prompt_completion_dataset(10)),
        tiny.build_llama,
        {"per_device_train_batch_size": 3},
    ),
    "duplicated_rows": (lambda t: with_confidence(duplicated()), tiny.build_llama, {}),
    "padding_free": (
        lambda t: with_confidence(tiny.prompt_completion_dataset(10)),
        tiny.build_llama,
        {"padding_free": True, "max_length": None},
    ),
    "moe_accumulation": (
        lambda t: with_confidence(tiny.prompt_completion_dataset(10)),
        tiny.build_qwen3_moe,
        {"gradient_accumulation_steps": 2},
    ),
    "dft": (lambda t: with_confidence(tiny.prompt_completion_dataset(10)), tiny.build_llama, {"loss_type": "dft"}),
    "skip_prepare_dataset": (
        lambda t: tokenized(t, 10),
        tiny.build_llama,
        {"dataset_kwargs": {"skip_prepare_dataset": True}},
    ),
    "with_transform_skip_prepare": (
        lambda t: via_transform(tokenized(t, 10)),
        tiny.build_llama,
        {"dataset_kwargs": {"skip_prepare_dataset": True}, "remove_unused_columns": False},
    ),
}


def build_pair(tokenizer, tmp_path, scenario, mixup_coef, **extra):
    make_dataset, make_model, overrides = SCENARIOS[scenario]
    config = {"num_train_epochs": 1, "logging_steps": 1, **overrides, **extra}
    sft = SFTTrainer(
        make_model(tokenizer),
        args=tiny_sft_config(tmp_path / "sft", **config),
        train_dataset=make_dataset(tokenizer),
        processing_class=tokenizer,
        eval_dataset=extra.get("eval_dataset"),
    )
    mix = SFTMixTrainer(
        make_model(tokenizer),
        args=tiny_config(tmp_path / "mix", mixup_coef=mixup_coef, **config),
        train_dataset=make_dataset(tokenizer),
        processing_class=tokenizer,
    )
    return sft, mix


def sft_inputs(batch):
    return {k: v for k, v in batch.items() if k != HALF_COLUMN}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_sftmix_trains_wherever_sfttrainer_does_with_its_loss_and_steps(tokenizer, tmp_path, scenario):
    sft, mix = build_pair(tokenizer, tmp_path, scenario, mixup_coef=0.0)
    # the same loss and gradients at mixup_coef=0, on SFTMix's first micro-batch, with accumulation under way
    batch = next(iter(mix.get_train_dataloader()))
    accumulation = mix.args.gradient_accumulation_steps
    num_items = (batch["labels"][:, 1:] != -100).sum() * accumulation
    mix_loss, mix_grads = loss_and_grads(mix, batch, num_items, accumulation)
    sft_loss, sft_grads = loss_and_grads(sft, sft_inputs(batch), num_items, accumulation)
    torch.testing.assert_close(mix_loss, sft_loss, rtol=1e-5, atol=1e-6)
    for name in sft_grads:
        torch.testing.assert_close(mix_grads[name], sft_grads[name], rtol=1e-4, atol=1e-6)

    # SFTMix as a user runs it (mixing on) trains the same number of steps per epoch, every example once an epoch
    sft.train()
    _, mixing = build_pair(tokenizer, tmp_path, scenario, mixup_coef=0.2)
    mixing.train()
    assert mixing.state.global_step == sft.state.global_step > 0
    assert len(mixing.get_train_dataloader()) == len(sft.get_train_dataloader())
    assert sorted(mixing._pair_sampler) == list(range(len(mixing.train_dataset)))
    logs = [log for log in mixing.state.log_history if "loss" in log]
    assert all(math.isfinite(log["loss"]) and "ntp_loss" in log and "mixup_loss" in log for log in logs)
    if mix.aux_loss_enabled:
        assert all("aux_loss" in log for log in logs)


def test_moe_router_loss_is_added_as_sfttrainer_adds_it(tokenizer, tmp_path):
    """The router's load-balancing loss, times its coefficient and over the accumulation steps, in the loss."""
    sft, mix = build_pair(tokenizer, tmp_path, "moe_accumulation", mixup_coef=0.0)
    assert mix.aux_loss_enabled and mix.router_aux_loss_coef == 0.5
    batch = next(iter(mix.get_train_dataloader()))
    num_items = (batch["labels"][:, 1:] != -100).sum()
    with_router, _ = loss_and_grads(mix, batch, num_items, accumulation_steps=2)
    aux_loss = mix._metrics["train"]["aux_loss"][-1]
    mix.aux_loss_enabled = False
    without_router, _ = loss_and_grads(mix, batch, num_items, accumulation_steps=2)
    torch.testing.assert_close(with_router - without_router, 0.5 * aux_loss / 2)
    assert aux_loss > 0.9, "the load-balancing loss of 4 experts, 2 per token, is at least about 1"


def test_compute_loss_works_outside_the_training_loop(tokenizer, tmp_path):
    sft, mix = build_pair(tokenizer, tmp_path, "prompt_completion", mixup_coef=0.0)
    batch = next(iter(mix.get_train_dataloader()))
    num_items = (batch["labels"][:, 1:] != -100).sum()
    assert not hasattr(mix, "current_gradient_accumulation_steps")
    mix_loss = mix.compute_loss(mix.model, dict(batch), num_items_in_batch=num_items)
    sft_loss = sft.compute_loss(sft.model, sft_inputs(batch), num_items_in_batch=num_items)
    torch.testing.assert_close(mix_loss, sft_loss, rtol=1e-5, atol=1e-6)


def test_eval_packing_evaluates_as_sfttrainer_does(tokenizer, tmp_path):
    held_out = tiny.prompt_completion_dataset(6, seed=1)
    config = dict(eval_packing=True, max_length=64, per_device_eval_batch_size=2)
    sft, mix = build_pair(tokenizer, tmp_path, "prompt_completion", mixup_coef=0.2, **config)
    mix_metrics = mix.evaluate(held_out)
    assert mix_metrics["eval_loss"] == pytest.approx(sft.evaluate(held_out)["eval_loss"], rel=1e-6)


def test_padding_free_gives_the_padded_loss_and_gradients_with_mixing(tokenizer, tmp_path):
    """The same examples, padded or concatenated: the same pairs by sequence boundaries, the same loss."""
    _, padded = build_pair(tokenizer, tmp_path, "prompt_completion", mixup_coef=0.5)
    _, free = build_pair(tokenizer, tmp_path, "padding_free", mixup_coef=0.5)
    rows = list(padded._pair_sampler)[:4]
    examples = [{k: padded.train_dataset[r][k] for k in ("input_ids", "labels", HALF_COLUMN)} for r in rows]
    padded_batch, free_batch = padded.data_collator(examples), free.data_collator(examples)
    assert free_batch["input_ids"].shape[0] == 1 and "attention_mask" not in free_batch
    num_items = (padded_batch["labels"][:, 1:] != -100).sum()
    torch.manual_seed(0)
    padded_loss, padded_grads = loss_and_grads(padded, padded_batch, num_items)
    torch.manual_seed(0)
    free_loss, free_grads = loss_and_grads(free, free_batch, num_items)
    assert padded._metrics["train"]["mixed_tokens"][-1] == free._metrics["train"]["mixed_tokens"][-1] > 0
    torch.testing.assert_close(free_loss, padded_loss, rtol=1e-5, atol=1e-6)
    for name in padded_grads:
        torch.testing.assert_close(free_grads[name], padded_grads[name], rtol=1e-4, atol=1e-6)


def test_duplicated_examples_all_train_and_share_their_score(tokenizer, tmp_path):
    dataset = duplicated()
    ids = [derive_example_id(example) for example in dataset]
    scores = {example_id: float(i) for i, example_id in enumerate(dict.fromkeys(ids))}
    trainer = SFTMixTrainer(
        tiny.build_llama(tokenizer),
        args=tiny_config(tmp_path),
        train_dataset=dataset,
        processing_class=tokenizer,
        confidence_scores=scores,
    )
    assert trainer.train_dataset["id"] == ids and len(ids) == 9
    assert sorted(trainer._pair_sampler) == list(range(9))
    by_id = {}
    for example_id, half in zip(ids, trainer.train_dataset[HALF_COLUMN]):
        by_id.setdefault(example_id, set()).add(half)
    # ranked by score, duplicates side by side: the two copies of a score fall in the same half
    assert all(len(halves) == 1 for halves in by_id.values() if -1 not in halves)


def _transform_own_columns(batch):
    return {"input_ids": [[1, 2, 3]] * len(batch["prompt"]), "labels": [[-100, 2, 3]] * len(batch["prompt"])}


SKIP_PREPARE = {"dataset_kwargs": {"skip_prepare_dataset": True}}
# name: (dataset builder, config overrides)
REFUSED_BY_SFTTRAINER = {
    "no_train_dataset": (lambda: None, {}),
    "not_a_dataset": (lambda: [{"prompt": "a", "completion": "b"}], {}),
    "with_transform": (
        lambda: with_confidence(tiny.prompt_completion_dataset(4)).with_transform(_transform_own_columns),
        {},
    ),
    "skip_prepare_mask_without_labels": (
        lambda: Dataset.from_dict(
            {"input_ids": [[1, 2, 3]] * 2, "completion_mask": [[0, 1, 1]] * 2, "confidence": [1.0, 1.0]}
        ),
        SKIP_PREPARE,
    ),
    "packing_without_max_length": (
        lambda: with_confidence(tiny.prompt_completion_dataset(4)),
        {"packing": True, "max_length": None},
    ),
    "unknown_loss_type": (lambda: with_confidence(tiny.prompt_completion_dataset(4)), {"loss_type": "focal"}),
}


@pytest.mark.parametrize("case", list(REFUSED_BY_SFTTRAINER))
def test_what_sfttrainer_refuses_is_refused_with_its_error(tokenizer, tmp_path, case):
    make_dataset, config = REFUSED_BY_SFTTRAINER[case]
    with pytest.raises(Exception) as sft_error:
        SFTTrainer(
            tiny.build_llama(tokenizer),
            args=tiny_sft_config(tmp_path, **config),
            train_dataset=make_dataset(),
            processing_class=tokenizer,
        )
    with pytest.raises(type(sft_error.value), match=re.escape(str(sft_error.value))):
        SFTMixTrainer(
            tiny.build_llama(tokenizer),
            args=tiny_config(tmp_path, **config),
            train_dataset=make_dataset(),
            processing_class=tokenizer,
        )
