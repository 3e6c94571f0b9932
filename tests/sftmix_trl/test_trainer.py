"""SFTMixTrainer's loss: the drop-in claim against SFTTrainer, the formula and its gradients, gradient accumulation,
the balance check, metrics and evaluation."""

import pytest
import torch
from sftmix_helpers import (
    loss_and_grads,
    peaked_llama,
    sftmix_loss_from_the_formula,
    tiny_config,
    tiny_sft_config,
    with_confidence,
)
from trl import SFTTrainer

from sftmix_trl.trainer import HALF_COLUMN, SFTMixTrainer

import tiny

FORMATS = {
    "text": (tiny.text_dataset, {}),
    "prompt_completion": (tiny.prompt_completion_dataset, {}),
    "conversational_prompt_completion": (tiny.conversational_prompt_completion_dataset, {}),
    "messages_assistant_only": (tiny.messages_dataset, {"assistant_only_loss": True}),
}


def first_batch(trainer):
    return next(iter(trainer.get_train_dataloader()))


@pytest.mark.parametrize("dataset_format", list(FORMATS))
def test_without_mixup_loss_gradients_and_metrics_are_sfttrainers(tokenizer, tmp_path, dataset_format):
    make_dataset, extra = FORMATS[dataset_format]
    dataset = with_confidence(make_dataset(12))
    sft = SFTTrainer(
        model=peaked_llama(tokenizer),
        args=tiny_sft_config(tmp_path, **extra),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    mix = SFTMixTrainer(
        model=peaked_llama(tokenizer),
        args=tiny_config(tmp_path, mixup_coef=0.0, **extra),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    # same preparation, row by row (joined by id)
    sft_rows = {row["id"]: (row["input_ids"], row["labels"]) for row in sft.train_dataset}
    assert {row["id"]: (row["input_ids"], row["labels"]) for row in mix.train_dataset} == sft_rows

    batch = first_batch(mix)
    assert batch[HALF_COLUMN].tolist() == [0, 0, 1, 1]
    sft_batch = {k: v for k, v in batch.items() if k != HALF_COLUMN}
    num_items = (batch["labels"][:, 1:] != -100).sum() + 5  # as if other micro-batches shared the normalizer
    for normalizer in (None, num_items):
        mix_loss, mix_grads = loss_and_grads(mix, batch, normalizer)
        sft_loss, sft_grads = loss_and_grads(sft, sft_batch, normalizer)
        torch.testing.assert_close(mix_loss, sft_loss, rtol=1e-6, atol=1e-6)
        assert mix_grads.keys() == sft_grads.keys()
        for name in sft_grads:
            torch.testing.assert_close(
                mix_grads[name], sft_grads[name], rtol=1e-5, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}"
            )
    for metric in ("entropy", "mean_token_accuracy"):
        assert mix._metrics["train"][metric][-1].item() == pytest.approx(sft._metrics["train"][metric][-1], rel=1e-5)
    assert mix._metrics["train"]["num_tokens"][-1].item() == sft._metrics["train"]["num_tokens"][-1]


def test_soft_capped_logits_are_sfttrainers(tokenizer, tmp_path):
    """Gemma 2 soft-caps its logits (c tanh(z / c)); the fused loss applies the same cap."""
    dataset = with_confidence(tiny.prompt_completion_dataset(8))
    sft = SFTTrainer(tiny.build_gemma2(tokenizer), args=tiny_sft_config(tmp_path), train_dataset=dataset,
                     processing_class=tokenizer)  # fmt: skip
    mix = SFTMixTrainer(tiny.build_gemma2(tokenizer), args=tiny_config(tmp_path, mixup_coef=0.0),
                        train_dataset=dataset, processing_class=tokenizer)  # fmt: skip
    batch = first_batch(mix)
    mix_loss, mix_grads = loss_and_grads(mix, batch)
    sft_loss, sft_grads = loss_and_grads(sft, {k: v for k, v in batch.items() if k != HALF_COLUMN})
    torch.testing.assert_close(mix_loss, sft_loss, rtol=1e-5, atol=1e-6)
    for name in sft_grads:
        torch.testing.assert_close(mix_grads[name], sft_grads[name], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(
    "ntp_loss_on, impl",
    [
        ("all", "torch"),
        ("all", "reference"),
        ("all", "rowchunk"),
        ("confident", "torch"),
        ("unconfident", "torch"),
        ("none", "torch"),
    ],
)
def test_mixed_loss_and_gradients_match_the_formula(tokenizer, tmp_path, ntp_loss_on, impl):
    dataset = with_confidence(tiny.prompt_completion_dataset(18))
    args = tiny_config(
        tmp_path,
        per_device_train_batch_size=6,
        mixup_coef=0.7,
        mixup_alpha=1.3,
        ntp_loss_on=ntp_loss_on,
        loss_impl=impl,
    )
    trainer = SFTMixTrainer(peaked_llama(tokenizer), args=args, train_dataset=dataset, processing_class=tokenizer)
    batch = first_batch(trainer)
    # the trainer draws lam ~ Beta(alpha, alpha) per pair from the global generator, before anything else random
    torch.manual_seed(11)
    loss, grads = loss_and_grads(trainer, batch)
    torch.manual_seed(11)
    lambdas = torch.distributions.Beta(torch.tensor(1.3), torch.tensor(1.3)).sample((3,))

    trainer.model.zero_grad(set_to_none=True)
    expected = sftmix_loss_from_the_formula(trainer.model, batch, lambdas, 0.7, ntp_loss_on)
    expected.backward()
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    for name, param in trainer.model.named_parameters():
        torch.testing.assert_close(
            grads[name], param.grad, rtol=2e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}"
        )

    metrics = {key: values[-1].item() for key, values in trainer._metrics["train"].items()}
    assert metrics["mixup_lambda"] == pytest.approx(lambdas.mean().item(), rel=1e-5)
    # the next-token metrics are logged where a next-token term is trained
    assert ("mean_token_accuracy" in metrics and "ntp_loss" in metrics) == (ntp_loss_on != "none")
    labels = batch["labels"][:, 1:] != -100
    assert metrics["mixed_tokens"] == torch.minimum(labels[:3].sum(1), labels[3:].sum(1)).sum().item()


def test_accumulated_micro_batches_give_the_gradient_of_one_big_batch(tokenizer, tmp_path, monkeypatch):
    """Two balanced micro-batches of 4 with 2 accumulation steps = one balanced batch of 8 with the same pairs."""
    dataset = with_confidence(tiny.prompt_completion_dataset(16))
    trainer = SFTMixTrainer(
        peaked_llama(tokenizer),
        args=tiny_config(tmp_path, per_device_train_batch_size=8, mixup_coef=0.5),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    batch = first_batch(trainer)
    lambdas = torch.tensor([0.2, 0.9, 0.5, 0.35])
    num_items = (batch["labels"][:, 1:] != -100).sum()  # what Trainer counts over the accumulated batch

    draws = iter([lambdas, lambdas[:2], lambdas[2:]])
    monkeypatch.setattr(trainer._pair_lambdas, "sample", lambda num_pairs, device: next(draws))
    big_loss, big_grads = loss_and_grads(trainer, batch, num_items, accumulation_steps=1)
    # pairs (0, 4), (1, 5) then (2, 6), (3, 7): each micro-batch stays half confident, half unconfident
    halves = [{k: v[rows] for k, v in batch.items()} for rows in ([0, 1, 4, 5], [2, 3, 6, 7])]
    losses, summed = [], {}
    for micro_batch in halves:
        loss, grads = loss_and_grads(trainer, micro_batch, num_items, accumulation_steps=2)
        losses.append(loss)
        for name, grad in grads.items():
            summed[name] = summed.get(name, 0) + grad
    torch.testing.assert_close(sum(losses), big_loss, rtol=1e-5, atol=1e-6)
    for name in big_grads:
        torch.testing.assert_close(
            summed[name], big_grads[name], rtol=1e-4, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}"
        )


def test_pairs_follow_the_half_flags_whatever_the_row_order(tokenizer, tmp_path):
    """Pair i is the i-th confident and the i-th unconfident row of the micro-batch, wherever they sit: interleaving
    the rows gives the same pairs, so the same loss and gradients (same lambdas)."""
    trainer = SFTMixTrainer(
        peaked_llama(tokenizer),
        args=tiny_config(tmp_path),
        train_dataset=with_confidence(tiny.prompt_completion_dataset(8)),
        processing_class=tokenizer,
    )
    batch = first_batch(trainer)
    assert batch[HALF_COLUMN].tolist() == [0, 0, 1, 1]
    torch.manual_seed(0)
    loss, grads = loss_and_grads(trainer, batch)
    torch.manual_seed(0)
    interleaved_loss, interleaved_grads = loss_and_grads(trainer, {k: v[[0, 2, 1, 3]] for k, v in batch.items()})
    torch.testing.assert_close(interleaved_loss, loss)
    for name in grads:
        torch.testing.assert_close(interleaved_grads[name], grads[name], rtol=1e-4, atol=1e-6)
    without_flags = {k: v for k, v in batch.items() if k != HALF_COLUMN}
    with pytest.raises(ValueError, match="carries no 'sftmix_half' flags"):
        loss_and_grads(trainer, without_flags)


def test_normalizer_of_a_one_half_ablation_counts_that_half_only(tokenizer, tmp_path):
    trainer = SFTMixTrainer(
        peaked_llama(tokenizer),
        args=tiny_config(tmp_path, ntp_loss_on="unconfident"),
        train_dataset=with_confidence(tiny.prompt_completion_dataset(8)),
        processing_class=tokenizer,
    )
    batch = first_batch(trainer)
    counted = trainer._get_num_items_in_batch([batch, batch], torch.device("cpu"))
    assert counted.item() == 2 * (batch["labels"][2:, 1:] != -100).sum().item()


def test_a_micro_batch_without_next_token_targets_gives_a_zero_loss(tokenizer, tmp_path):
    """9 examples in micro-batches of 4: the last holds the median alone, which a one-half ablation does not train
    on; its step must give a finite zero (as SFTTrainer's does for an all-masked batch), not 0 / 0."""
    trainer = SFTMixTrainer(
        peaked_llama(tokenizer),
        args=tiny_config(tmp_path, ntp_loss_on="unconfident"),
        train_dataset=with_confidence(tiny.prompt_completion_dataset(9)),
        processing_class=tokenizer,
    )
    *_, last = trainer.get_train_dataloader()
    assert last[HALF_COLUMN].tolist() == [-1]
    num_items = trainer._get_num_items_in_batch([last], torch.device("cpu"))
    assert num_items == 0
    loss, grads = loss_and_grads(trainer, last, num_items)
    assert loss.item() == 0.0 and all(torch.isfinite(g).all() for g in grads.values())


def test_evaluation_is_sfttrainers_plain_next_token_loss(tokenizer, tmp_path):
    train, held_out = with_confidence(tiny.prompt_completion_dataset(8)), tiny.prompt_completion_dataset(6, seed=1)
    sft_args = tiny_sft_config(tmp_path, per_device_eval_batch_size=4)
    sft = SFTTrainer(peaked_llama(tokenizer), args=sft_args, train_dataset=train, processing_class=tokenizer)
    mix = SFTMixTrainer(
        peaked_llama(tokenizer),
        args=tiny_config(tmp_path, per_device_eval_batch_size=4),
        train_dataset=train,
        processing_class=tokenizer,
    )
    sft_metrics, mix_metrics = sft.evaluate(held_out), mix.evaluate(held_out)
    assert mix_metrics["eval_loss"] == pytest.approx(sft_metrics["eval_loss"], rel=1e-6)
    assert mix_metrics["eval_mean_token_accuracy"] == pytest.approx(sft_metrics["eval_mean_token_accuracy"], rel=1e-6)


def test_model_card_and_tags_name_sftmix_and_cite_the_paper(tokenizer, tmp_path):
    trainer = SFTMixTrainer(
        peaked_llama(tokenizer),
        args=tiny_config(tmp_path),
        train_dataset=with_confidence(tiny.prompt_completion_dataset(8)),
        processing_class=tokenizer,
    )
    assert "sftmix" in trainer.model.model_tags
    trainer.create_model_card(model_name="tiny-sftmix")
    card = (tmp_path / "README.md").read_text()
    assert "SFTMix" in card and "2410.05248" in card and "xiao2024sftmix" in card
