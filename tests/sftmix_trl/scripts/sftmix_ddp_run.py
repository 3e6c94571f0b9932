"""A few SFTMix training steps on the tiny model; run alone, or on several CPU processes with `accelerate launch`.

Each process saves its final parameters and the micro-batches it trained on to `<output_dir>/rank<k>.pt`.
"""

import argparse
import sys
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(TESTS), str(TESTS / "sftmix_trl")]

from sftmix_helpers import tiny_config, with_confidence  # noqa: E402

from sftmix_trl.trainer import HALF_COLUMN, SFTMixTrainer  # noqa: E402

import tiny  # noqa: E402


class RecordingTrainer(SFTMixTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        rows = [ids[mask.bool()].tolist() for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"])]
        self.seen.append((rows, inputs[HALF_COLUMN].tolist()))
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def train_and_save(output_dir: str, per_device_batch_size: int, max_steps: int = 4) -> None:
    tokenizer = tiny.build_tokenizer()
    args = tiny_config(
        output_dir, per_device_train_batch_size=per_device_batch_size, max_steps=max_steps, logging_steps=1
    )
    trainer = RecordingTrainer(
        tiny.build_llama(tokenizer),
        args=args,
        train_dataset=with_confidence(tiny.prompt_completion_dataset(32)),
        processing_class=tokenizer,
    )
    trainer.seen = []
    trainer.train()
    state = {
        "params": {name: p.detach().clone() for name, p in trainer.model.named_parameters()},
        "seen": trainer.seen,
        "num_processes": trainer.accelerator.num_processes,
        "losses": [log["loss"] for log in trainer.state.log_history if "loss" in log],
    }
    torch.save(state, Path(output_dir) / f"rank{trainer.accelerator.process_index}.pt")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--per_device_batch_size", type=int, default=4)
    parser.add_argument("--max_steps", type=int, default=4)
    cli = parser.parse_args()
    train_and_save(cli.output_dir, cli.per_device_batch_size, cli.max_steps)
