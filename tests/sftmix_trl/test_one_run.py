"""One run: NTP warm-up recording training dynamics, the split, then SFTMix, in one model and one series of
checkpoints; the warm-up is plain NTP on the full schedule, the split is the warm-up's, and a run stopped anywhere
(before or after the switch) and resumed ends with the weights of an uninterrupted one."""

import json

import pytest
import torch
from sftmix_helpers import StopAt, tiny_config, tiny_sft_config
from transformers import AutoModelForCausalLM
from trl import SFTTrainer

from sftmix_trl.confidence import aggregate_scores, load_confidence
from sftmix_trl.one_run import train_one_run

import tiny


def one_run(tokenizer, output_dir, callbacks=None, **overrides):
    # 16 rows, 4 per step: 4 steps per epoch; epoch 1 NTP, epoch 2 SFTMix
    kwargs = {"num_train_epochs": 2, "logging_steps": 1, "lr_scheduler_type": "cosine", **overrides}
    args = tiny_config(output_dir, **kwargs)
    return train_one_run(
        tiny.build_llama(tokenizer),
        args,
        tiny.prompt_completion_dataset(16),
        self_reference_epochs=1,
        processing_class=tokenizer,
        callbacks=callbacks,
        dataset_name="tiny",
    )


def test_warm_up_is_ntp_on_the_full_schedule_then_sftmix_on_its_split(tokenizer, tmp_path):
    trainer = one_run(tokenizer, tmp_path / "one")
    assert trainer.state.global_step == 8
    # the switch checkpoint is an NTP run of the same two-epoch schedule, stopped after its first epoch
    ntp_args = tiny_sft_config(tmp_path / "ntp", num_train_epochs=2, logging_steps=1, lr_scheduler_type="cosine")
    ntp = SFTTrainer(
        tiny.build_llama(tokenizer), args=ntp_args, train_dataset=tiny.prompt_completion_dataset(16),
        processing_class=tokenizer, callbacks=[StopAt(4)],
    )  # fmt: skip
    ntp.train()
    switch = json.loads((tmp_path / "one" / "confidence" / "switch.json").read_text())
    assert switch["global_step"] == 4 and switch["max_steps"] == 8
    at_switch = AutoModelForCausalLM.from_pretrained(switch["checkpoint"])
    for name, param in ntp.model.state_dict().items():
        torch.testing.assert_close(at_switch.state_dict()[name], param, msg=name)
    # the learning rate goes on along the same cosine across the switch
    lrs = [log["learning_rate"] for log in trainer.state.log_history if "learning_rate" in log]
    ntp_lrs = [log["learning_rate"] for log in ntp.state.log_history if "learning_rate" in log]
    assert lrs[:4] == pytest.approx(ntp_lrs[:4]) and len(lrs) == 8 and lrs[4] < lrs[3]
    # the SFTMix phase trained with the Mixup term, on the split made from the first epoch's dynamics
    assert any(log.get("mixup_loss", 0) > 0 for log in trainer.state.log_history[4:])
    expected = aggregate_scores([tmp_path / "one" / "training_dynamics" / "epoch-001.jsonl"])
    table = load_confidence(tmp_path / "one" / "confidence")
    assert table["id"] == expected.dataset["id"] and table["half"] == expected.dataset["half"]
    assert (tmp_path / "one" / "confidence" / "datamap.png").is_file()
    assert trainer.confidence_split is not None


@pytest.mark.parametrize("stop_at", [2, 6])  # mid-warm-up (NTP); mid-SFTMix
def test_stopped_and_resumed_across_the_switch_matches_an_uninterrupted_run(tokenizer, tmp_path, stop_at):
    full = one_run(tokenizer, tmp_path / "full", save_strategy="steps", save_steps=1)
    one_run(tokenizer, tmp_path / "run", callbacks=[StopAt(stop_at)], save_strategy="steps", save_steps=1)
    resumed = one_run(tokenizer, tmp_path / "run", save_strategy="steps", save_steps=1)
    assert resumed.state.global_step == 8
    for name in ("epoch-001.jsonl",):
        got = (tmp_path / "run" / "training_dynamics" / name).read_text().splitlines()
        want = (tmp_path / "full" / "training_dynamics" / name).read_text().splitlines()
        assert [json.loads(line)["id"] for line in got] == [json.loads(line)["id"] for line in want]
    for (name, param), param_full in zip(resumed.model.named_parameters(), full.model.parameters()):
        torch.testing.assert_close(param, param_full, msg=name)


def test_a_run_too_short_for_the_warm_up_is_refused(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="needs `num_train_epochs` above that"):
        one_run(tokenizer, tmp_path, num_train_epochs=1)
