"""Two epochs of NTP on a tiny model with TrainingDynamicsCallback; run alone, or on several CPU processes with
`accelerate launch` (DDP). The callback writes `<output_dir>/training_dynamics/epoch-<e>.jsonl` from the main process,
with every rank's examples gathered."""

import argparse

from sftmix_helpers import tiny_sft_config
from trl import SFTTrainer

from sftmix_trl.confidence import TrainingDynamicsCallback

import tiny


def train(output_dir: str, per_device_batch_size: int) -> None:
    tokenizer = tiny.build_tokenizer()
    args = tiny_sft_config(output_dir, num_train_epochs=2, per_device_train_batch_size=per_device_batch_size)
    trainer = SFTTrainer(
        tiny.build_llama(tokenizer),
        args=args,
        train_dataset=tiny.prompt_completion_dataset(16),
        processing_class=tokenizer,
    )
    trainer.add_callback(TrainingDynamicsCallback(trainer))
    trainer.train()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--per_device_batch_size", type=int, default=4)
    cli = parser.parse_args()
    train(cli.output_dir, cli.per_device_batch_size)
