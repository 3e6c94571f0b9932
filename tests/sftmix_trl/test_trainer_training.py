"""Real, short SFTMix training runs on the tiny model: learning, checkpoints, resuming, LoRA."""

import pytest
import torch
from peft import LoraConfig
from sftmix_helpers import tiny_config, with_confidence
from transformers import AutoModelForCausalLM

from sftmix_trl.trainer import HALF_COLUMN, SFTMixTrainer

import tiny


class RecordingTrainer(SFTMixTrainer):
    """Keeps the micro-batches it trains on, to compare runs batch by batch."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.model.training:
            self.seen.append((inputs["input_ids"].clone(), inputs[HALF_COLUMN].clone()))
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def test_training_lowers_the_loss_and_the_checkpoint_reloads(tokenizer, tmp_path):
    # SFTConfig's defaults on this CPU: gradient checkpointing on, bf16 autocast
    args = tiny_config(
        tmp_path,
        per_device_train_batch_size=8,
        max_steps=24,
        logging_steps=4,
        save_strategy="steps",
        save_steps=24,
        bf16=True,
        gradient_checkpointing=True,
    )
    trainer = SFTMixTrainer(
        tiny.build_llama(tokenizer),
        args=args,
        train_dataset=with_confidence(tiny.prompt_completion_dataset(64)),
        processing_class=tokenizer,
    )
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 6
    assert logs[-1]["loss"] < 0.75 * logs[0]["loss"], [log["loss"] for log in logs]
    for key in ("entropy", "mean_token_accuracy", "num_tokens", "ntp_loss", "mixup_loss", "mixup_lambda"):
        assert all(isinstance(log[key], float) for log in logs), key
    assert 0 < logs[-1]["mixup_lambda"] < 1 and logs[-1]["mixed_tokens"] > 0
    assert logs[-1]["mean_token_accuracy"] > logs[0]["mean_token_accuracy"]

    checkpoint = tmp_path / "checkpoint-24"
    reloaded = AutoModelForCausalLM.from_pretrained(checkpoint)
    for name, param in trainer.model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], param, msg=name)
    assert "SFTMix" in (tmp_path / "README.md").read_text()


def run(tokenizer, output_dir, resume_from_checkpoint=None):
    args = tiny_config(
        output_dir,
        gradient_accumulation_steps=2,
        max_steps=6,
        save_strategy="steps",
        save_steps=5,
        logging_steps=1,
        mixup_alpha=1.0,
    )
    trainer = RecordingTrainer(
        tiny.build_llama(tokenizer),
        args=args,
        train_dataset=with_confidence(tiny.prompt_completion_dataset(32)),
        processing_class=tokenizer,
    )
    trainer.seen = []
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return trainer


def test_resuming_mid_epoch_replays_the_same_batches_and_reaches_the_same_weights(tokenizer, tmp_path):
    """32 examples, 4 per micro-batch: 8 micro-batches (4 optimizer steps) per epoch. The checkpoint at step 5 sits
    in the second epoch, after 2 of its micro-batches."""
    full = run(tokenizer, tmp_path / "full")
    assert len(full.seen) == 12
    epoch0, epoch1 = full.seen[:8], full.seen[8:]
    assert [ids.shape[0] for ids, _ in full.seen] == [4] * 12
    assert all(halves.tolist() == [0, 0, 1, 1] for _, halves in full.seen)
    first_rows = lambda batches: {tuple(ids[0].tolist()) for ids, _ in batches}  # noqa: E731
    assert first_rows(epoch0[:4]) != first_rows(epoch1), "the second epoch is reshuffled"

    resumed = run(tokenizer, tmp_path / "resumed", resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-5"))
    assert len(resumed.seen) == 2
    for (ids, halves), (ids_full, halves_full) in zip(resumed.seen, full.seen[10:]):
        assert torch.equal(ids, ids_full) and torch.equal(halves, halves_full)
    for (name, param), param_full in zip(resumed.model.named_parameters(), full.model.parameters()):
        torch.testing.assert_close(param, param_full, msg=name)


@pytest.mark.parametrize("gradient_checkpointing", [True, False])
def test_lora_adapters_train_and_the_base_stays_frozen(tokenizer, tmp_path, gradient_checkpointing):
    model = tiny.build_llama(tokenizer)
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = SFTMixTrainer(
        model,
        args=tiny_config(tmp_path, max_steps=6, bf16=True, gradient_checkpointing=gradient_checkpointing),
        train_dataset=with_confidence(tiny.prompt_completion_dataset(16)),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]),
    )
    trainer.train()
    named = dict(trainer.model.named_parameters())
    lora_b = [p for name, p in named.items() if "lora_B" in name]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b), "LoRA B starts at zero and must have moved"
    for name, param in named.items():
        if "lora_" not in name:
            original = name.replace("base_model.model.", "").replace(".base_layer", "")
            torch.testing.assert_close(param, base[original], msg=name)
    assert all(torch.isfinite(torch.tensor(log["loss"])) for log in trainer.state.log_history if "loss" in log)
