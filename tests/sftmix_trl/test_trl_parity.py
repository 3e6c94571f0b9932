"""The same scenarios with TRL's SFTTrainer and SFTMixTrainer: SFTMixTrainer trains wherever SFTTrainer does, with the
same loss at `mixup_coef=0` and the same number of optimizer steps per epoch; where SFTTrainer refuses an input,
SFTMixTrainer refuses it first, with SFTTrainer's error."""

import math
import re

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from sftmix_helpers import loss_and_grads, tiny_config, tiny_sft_config, with_confidence
from trl import SFTTrainer

from sftmix_trl.data.ids import derive_example_id
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


def one_left_after_truncation(tokenizer):
    """TRL's own case: the first example's trainable tokens all lie beyond `max_length=3`, so truncation leaves it
    fully masked and preparation drops it; the second keeps its tokens. One example is left: nothing to pair."""
    rows = [
        {"input_ids": [11, 12, 13, 14, 15], "assistant_masks": [0, 0, 0, 1, 1]},
        {"input_ids": [16, 17, 18], "assistant_masks": [1, 1, 1]},
    ]
    return with_confidence(Dataset.from_list(rows))


SCENARIOS |= {
    "lora": (
        lambda t: with_confidence(tiny.prompt_completion_dataset(10)),
        tiny.build_llama,
        {"learning_rate": 1e-2},
    ),
    "one_left_after_truncation": (one_left_after_truncation, tiny.build_llama, {"max_length": 3}),
}
# trainer arguments beside the config, by scenario
TRAINER_KWARGS = {"lora": lambda: {"peft_config": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])}}


def build_pair(tokenizer, tmp_path, scenario, mixup_coef, **extra):
    make_dataset, make_model, overrides = SCENARIOS[scenario]
    config = {"num_train_epochs": 1, "logging_steps": 1, **overrides, **extra}
    trainer_kwargs = TRAINER_KWARGS.get(scenario, dict)
    sft = SFTTrainer(
        make_model(tokenizer),
        args=tiny_sft_config(tmp_path / "sft", **config),
        train_dataset=make_dataset(tokenizer),
        processing_class=tokenizer,
        **trainer_kwargs(),
    )
    mix = SFTMixTrainer(
        make_model(tokenizer),
        args=tiny_config(tmp_path / "mix", mixup_coef=mixup_coef, **config),
        train_dataset=make_dataset(tokenizer),
        processing_class=tokenizer,
        **trainer_kwargs(),
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


def test_one_example_left_after_truncation_trains_with_the_next_token_loss_and_one_warning(tokenizer, tmp_path):
    with pytest.warns(UserWarning) as warned:
        sft, mix = build_pair(tokenizer, tmp_path, "one_left_after_truncation", mixup_coef=0.2, max_steps=3)
    (warning,) = [str(w.message) for w in warned if "SFTMix" in str(w.message)]
    assert "dropped 1 of the 2 training examples" in warning and "next-token loss only" in warning
    assert sft.train_dataset["labels"] == mix.train_dataset["labels"] == [[16, 17, 18]]
    sft.train()
    mix.train()
    assert mix.state.global_step == sft.state.global_step == 3
    logs = [log for log in mix.state.log_history if "loss" in log]
    assert logs and all(log["mixup_loss"] == 0 and log["mixed_tokens"] == 0 for log in logs)
    sft_losses = [log["loss"] for log in sft.state.log_history if "loss" in log]
    assert [log["loss"] for log in logs] == pytest.approx(sft_losses, rel=1e-5)


PACKED = dict(packing=True, max_length=160, per_device_train_batch_size=2)


def test_confidence_aware_packing_pairs_examples_inside_packs_of_both_halves(tokenizer, tmp_path):
    """Each half packed on its own; a micro-batch holds packs of both, its sequences paired across them; the loss
    at mixup_coef=0 is SFTTrainer's on the same packed batch; with mixing on, several optimizer steps train."""
    dataset = with_confidence(tiny.prompt_completion_dataset(16))
    sft = SFTTrainer(tiny.build_llama(tokenizer), args=tiny_sft_config(tmp_path / "sft", **PACKED),
                     train_dataset=dataset, processing_class=tokenizer)  # fmt: skip
    mix = SFTMixTrainer(tiny.build_llama(tokenizer), args=tiny_config(tmp_path / "mix", mixup_coef=0.0, **PACKED),
                        train_dataset=dataset, processing_class=tokenizer)  # fmt: skip
    packed = mix.train_dataset.with_format(None)
    assert sum(len(lengths) for lengths in packed["seq_lengths"]) == 16 and max(map(sum, packed["seq_lengths"])) <= 160
    assert len(packed) <= len(sft.train_dataset) + 1, "each half's packs are as full as packing all examples"
    batches = list(mix.get_train_dataloader())
    assert len(batches) == math.ceil(len(packed) / 2)
    # the same optimizer steps per epoch as SFTTrainer here (6 packs against its 5, in 3 micro-batches of 2 each);
    # in general each half's last, partly filled pack may add a micro-batch (README)
    assert len(batches) == len(sft.get_train_dataloader())
    for batch in batches:
        halves = batch[HALF_COLUMN].tolist()
        assert halves == sorted(halves) and 0 in halves and 1 in halves, "one pack of each half"
    # the micro-batch with the most pairs: several sequences in each pack
    batch = max(batches, key=lambda b: min(b[HALF_COLUMN].tolist().count(h) for h in (0, 1)))
    assert min(batch[HALF_COLUMN].tolist().count(h) for h in (0, 1)) > 1
    num_items = (batch["labels"][:, 1:] != -100).sum()
    mix_loss, mix_grads = loss_and_grads(mix, batch, num_items)
    sft_loss, sft_grads = loss_and_grads(sft, sft_inputs(batch), num_items)
    torch.testing.assert_close(mix_loss, sft_loss, rtol=1e-5, atol=1e-6)
    for name in sft_grads:
        torch.testing.assert_close(mix_grads[name], sft_grads[name], rtol=1e-4, atol=1e-6)

    # mixing on, as a user trains: several optimizer steps, every one of them mixing
    config = dict(max_steps=3, logging_steps=1, gradient_accumulation_steps=2, split_by="random", **PACKED)
    mixing = SFTMixTrainer(tiny.build_llama(tokenizer), args=tiny_config(tmp_path / "mixing", **config),
                           train_dataset=dataset, processing_class=tokenizer)  # fmt: skip
    mixing.train()
    logs = [log for log in mixing.state.log_history if "loss" in log]
    assert mixing.state.global_step == 3 and len(logs) == 3
    assert all(
        math.isfinite(log["loss"]) and log["mixed_tokens"] > 0 and 0 < log["mixed_fraction"] <= 1 for log in logs
    )


def test_packing_carries_the_completion_only_labels_of_every_example(tokenizer, tmp_path):
    """The packed rows hold exactly the examples SFTTrainer prepares, each with its own labels (prompt masked)."""
    dataset = with_confidence(tiny.prompt_completion_dataset(10))
    unpacked = SFTMixTrainer(tiny.build_llama(tokenizer), args=tiny_config(tmp_path / "a", max_length=160),
                             train_dataset=dataset, processing_class=tokenizer)  # fmt: skip
    packed = SFTMixTrainer(tiny.build_llama(tokenizer), args=tiny_config(tmp_path / "b", **PACKED),
                           train_dataset=dataset, processing_class=tokenizer)  # fmt: skip
    examples = {}
    for row in packed.train_dataset.with_format(None):
        start = 0
        for length in row["seq_lengths"]:
            sequence = (tuple(row["input_ids"][start : start + length]), tuple(row["labels"][start : start + length]))
            examples[sequence] = row[HALF_COLUMN]
            start += length
    table = unpacked.train_dataset.with_format(None)
    expected = {
        (tuple(i), tuple(lab)): h for i, lab, h in zip(table["input_ids"], table["labels"], table[HALF_COLUMN])
    }
    assert examples == expected, "every example once, with its labels, in a pack of its own half"
    assert all(-100 in labels and set(labels) != {-100} for _, labels in expected)
    batch = next(iter(packed.get_train_dataloader()))
    assert (batch["labels"] == -100).any() and (batch["labels"] != -100).any()


@pytest.mark.parametrize("eval_packing", [None, False], ids=["eval_packed", "only_train_packed"])
def test_packing_trains_and_evaluates_as_sfttrainer_does(tokenizer, tmp_path, eval_packing):
    """`packing=True` with an eval set: the eval set is packed too (`eval_packing` defaults to `packing`), or not
    with `eval_packing=False`, as SFTTrainer does, and evaluated with SFTTrainer's plain loss."""
    held_out = tiny.prompt_completion_dataset(6, seed=1)
    dataset = with_confidence(tiny.prompt_completion_dataset(8))
    config = dict(per_device_eval_batch_size=2, eval_packing=eval_packing, **PACKED)
    sft = SFTTrainer(tiny.build_llama(tokenizer), args=tiny_sft_config(tmp_path / "sft", **config),
                     train_dataset=dataset, eval_dataset=held_out, processing_class=tokenizer)  # fmt: skip
    mix = SFTMixTrainer(tiny.build_llama(tokenizer), args=tiny_config(tmp_path / "mix", **config),
                        train_dataset=dataset, eval_dataset=held_out, processing_class=tokenizer)  # fmt: skip
    if eval_packing is False:
        assert "seq_lengths" not in mix.eval_dataset.column_names and len(mix.eval_dataset) == 6
    else:
        assert "seq_lengths" in mix.eval_dataset.column_names and len(mix.eval_dataset) == len(sft.eval_dataset) < 6
    assert mix.evaluate()["eval_loss"] == pytest.approx(sft.evaluate()["eval_loss"], rel=1e-6)


class ArgsSetByTrainerInit(SFTMixTrainer):
    """SFTMixTrainer whose `args` attribute fails if read before `Trainer.__init__` sets it."""

    @property
    def args(self):
        if "_args" not in self.__dict__:
            raise AssertionError("`self.args` read before `Trainer.__init__` set it: pass the config in instead")
        return self.__dict__["_args"]

    @args.setter
    def args(self, value):
        self.__dict__["_args"] = value


@pytest.mark.parametrize(
    "config",
    [{}, dict(PACKED, split_by="random"), {"max_length": None, "padding_free": True}],
    ids=["padded", "packed", "padding_free"],
)
def test_nothing_during_sfttrainer_init_reads_self_args(tokenizer, tmp_path, config):
    """SFTTrainer prepares the datasets before `Trainer.__init__` sets `self.args`: SFTMix's preparation (the join,
    the halves, packing each half) must use the config it is passed (a packing crash once came from this)."""
    dataset = with_confidence(tiny.prompt_completion_dataset(8))
    trainer = ArgsSetByTrainerInit(tiny.build_llama(tokenizer), args=tiny_config(tmp_path, **config),
                                   train_dataset=dataset, processing_class=tokenizer)  # fmt: skip
    assert sorted(trainer._pair_sampler) == list(range(len(trainer.train_dataset)))


def test_mixed_precision_runs_the_backbone_and_the_head_under_autocast_as_sfttrainer_does(
    tokenizer, tmp_path, monkeypatch
):
    """`bf16=True` with fp32 weights: accelerate's autocast wraps the model's forward, which SFTMix's loss reaches by
    redirection; the backbone and the head's product still run in bf16, as in SFTTrainer, the weights stay fp32, and
    the losses follow SFTTrainer's."""
    import sftmix_trl.micro_batch_loss

    head_dtypes = set()
    fused_loss = sftmix_trl.micro_batch_loss.sftmix_linear_cross_entropy

    def recording_fused_loss(hidden, weight, *args, **kwargs):
        head_dtypes.add((hidden.dtype, weight.dtype, torch.is_autocast_enabled("cpu")))
        return fused_loss(hidden, weight, *args, **kwargs)

    monkeypatch.setattr(sftmix_trl.micro_batch_loss, "sftmix_linear_cross_entropy", recording_fused_loss)
    sft, mix = build_pair(tokenizer, tmp_path, "prompt_completion", mixup_coef=0.0, bf16=True, max_steps=2)
    backbone_dtypes = {"sft": set(), "mix": set()}
    for name, trainer in (("sft", sft), ("mix", mix)):
        layer = trainer.model.model.layers[0].mlp.down_proj
        layer.register_forward_hook(lambda module, args, output, name=name: backbone_dtypes[name].add(output.dtype))
    sft.train()
    mix.train()
    assert backbone_dtypes == {"sft": {torch.bfloat16}, "mix": {torch.bfloat16}}
    # the product in bf16, and the fused loss's own precision rules with autocast off
    assert head_dtypes == {(torch.bfloat16, torch.bfloat16, False)}
    assert all(p.dtype == torch.float32 for p in mix.model.parameters())
    sft_losses = [log["loss"] for log in sft.state.log_history if "loss" in log]
    mix_losses = [log["loss"] for log in mix.state.log_history if "loss" in log]
    assert len(mix_losses) == len(sft_losses) == 2
    assert mix_losses == pytest.approx(sft_losses, rel=2e-2)
