"""`train_one_run` on a tiny model (16 rows, 2 epochs: epoch 1 NTP with training dynamics, epoch 2 SFTMix); run
alone, or on several CPU processes with `accelerate launch` (DDP). The main process saves the final parameters to
`<output_dir>/params.pt`; a `--stop_at` step stops the run there (to resume it with a second launch)."""

import argparse
from pathlib import Path

import torch
from sftmix_helpers import StopAt, tiny_config

from sftmix_trl.one_run import train_one_run

import tiny


def train(output_dir: str, per_device_batch_size: int, stop_at: int | None = None) -> None:
    tokenizer = tiny.build_tokenizer()
    args = tiny_config(
        output_dir,
        num_train_epochs=2,
        per_device_train_batch_size=per_device_batch_size,
        save_strategy="steps",
        save_steps=1,
        lr_scheduler_type="cosine",
    )
    trainer = train_one_run(
        tiny.build_llama(tokenizer),
        args,
        tiny.prompt_completion_dataset(16),
        processing_class=tokenizer,
        callbacks=[StopAt(stop_at)] if stop_at else None,
    )
    if trainer.accelerator.is_main_process and stop_at is None:
        params = {
            name: p.detach().clone() for name, p in trainer.accelerator.unwrap_model(trainer.model).named_parameters()
        }
        torch.save({"params": params, "global_step": trainer.state.global_step}, Path(output_dir) / "params.pt")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--per_device_batch_size", type=int, default=4)
    parser.add_argument("--stop_at", type=int, default=None)
    cli = parser.parse_args()
    train(cli.output_dir, cli.per_device_batch_size, cli.stop_at)
