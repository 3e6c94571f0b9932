"""A few SFTMix training steps on a tiny model; run alone, or on several CPU processes with `accelerate launch`
(DDP, FSDP2 or DeepSpeed ZeRO-3, as the launch config says).

Each process saves to `<output_dir>/rank<k>.pt` the final parameters (whole, gathered from their shards), the logged
losses, the micro-batches it trained on, and how the model was distributed: which parameters were sharded, how
often the loss gathered a DTensor head itself, and how often the head module's own forward ran.
"""

import argparse
import os
from pathlib import Path

import torch
from sftmix_helpers import tiny_config, with_confidence
from torch.distributed.tensor import DTensor

from sftmix_trl import lm_head as lm_head_module
from sftmix_trl.trainer import HALF_COLUMN, SFTMixTrainer

import tiny

USE_FSDP = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
USE_DEEPSPEED = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def run_fsdp_on_cpu_processes() -> None:
    """accelerate (1.15) upgrades a multi-process state to FSDP on accelerators only: on CPU processes (gloo) it keeps
    `MULTI_CPU` and silently trains with DDP. Make it take the FSDP plugin the launcher configured, as it does on
    GPUs; everything after that (fully_shard, DTensor parameters) is accelerate's and torch's own CPU code."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original_init = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = init


class RecordingTrainer(SFTMixTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        rows = [ids[mask.bool()].tolist() for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"])]
        self.seen.append((rows, inputs[HALF_COLUMN].tolist()))
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def count_calls(counter: list, function):
    def counted(*args, **kwargs):
        counter.append(1)
        return function(*args, **kwargs)

    return counted


def whole_parameters(trainer) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Every parameter as a whole tensor, and the names of those this rank holds only a shard of."""
    named = list(trainer.model.named_parameters())
    if USE_DEEPSPEED:
        import deepspeed

        sharded = [name for name, p in named if p.ds_tensor.numel() < p.ds_numel]
        with deepspeed.zero.GatheredParameters([p for _, p in named]):
            return {name: p.detach().clone() for name, p in named}, sharded
    sharded = [name for name, p in named if isinstance(p, DTensor) and p.to_local().numel() < p.numel()]
    whole = {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for name, p in named}
    return whole, sharded


def train_and_save(output_dir: str, per_device_batch_size: int, max_steps: int = 4, model: str = "llama") -> None:
    if USE_FSDP:
        run_fsdp_on_cpu_processes()
    # gloo processes on the CPU; DeepSpeed's CPU accelerator needs `use_cpu=False` and the backend named
    device_args = dict(use_cpu=False, ddp_backend="gloo") if USE_DEEPSPEED else {}
    tokenizer = tiny.build_tokenizer()
    args = tiny_config(
        output_dir,
        per_device_train_batch_size=per_device_batch_size,
        max_steps=max_steps,
        logging_steps=1,
        **device_args,
    )
    build = {"llama": tiny.build_llama, "qwen2": tiny.build_qwen2}[model]
    trainer = RecordingTrainer(
        build(tokenizer),
        args=args,
        train_dataset=with_confidence(tiny.prompt_completion_dataset(32)),
        processing_class=tokenizer,
    )
    if USE_DEEPSPEED:
        # DeepSpeed keeps parameters under 100k elements whole on every rank: all of a tiny model's
        zero_config = trainer.accelerator.state.deepspeed_plugin.deepspeed_config["zero_optimization"]
        zero_config["stage3_param_persistence_threshold"] = 0
    trainer.seen = []
    head_gathers, head_forwards = [], []
    trainer.model.get_output_embeddings().register_forward_pre_hook(lambda *_: head_forwards.append(1))
    gather = lm_head_module._gather_data_parallel
    lm_head_module._gather_data_parallel = count_calls(head_gathers, gather)
    try:
        trainer.train()
    finally:
        lm_head_module._gather_data_parallel = gather
    params, sharded = whole_parameters(trainer)
    state = {
        "params": params,
        "sharded": sharded,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "head_gathers": len(head_gathers),
        "head_forwards": len(head_forwards),
        "seen": trainer.seen,
        "num_processes": trainer.accelerator.num_processes,
        # torchrun's: the machine this process runs on, and the number of processes on it
        "node_rank": int(os.environ.get("GROUP_RANK", 0)),
        "local_world_size": int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
        "losses": [log["loss"] for log in trainer.state.log_history if "loss" in log],
    }
    torch.save(state, Path(output_dir) / f"rank{trainer.accelerator.process_index}.pt")
    # Tear the process group down while every rank is still here: left to the interpreter's exit, rank 0 (the host of
    # the rendezvous store) can destroy gloo's and the store's threads while the other rank still talks to them.
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--per_device_batch_size", type=int, default=4)
    parser.add_argument("--max_steps", type=int, default=4)
    parser.add_argument("--model", choices=["llama", "qwen2"], default="llama")
    cli = parser.parse_args()
    train_and_save(cli.output_dir, cli.per_device_batch_size, cli.max_steps, cli.model)
