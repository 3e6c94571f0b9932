"""Where a training step's time goes: one step of TRL's SFTTrainer and one of SFTMixTrainer under torch.profiler.

    python -m bench.profile_step                  # SmolLM2-135M-sized model, batch 8, sequence 256 (as bench/trainer.py)
    python -m bench.profile_step --model tiny     # a 2-layer model: checks the script in seconds

Same model, data and settings as `bench/trainer.py` (random pre-tokenized sequences, every position trained, gradient
checkpointing on). Each trainer runs in a fresh subprocess: `--warmup` steps, then one step under the profiler. The
profiler's operators are split by their input shapes: those with a dimension larger than any of the backbone's (hidden
and intermediate sizes, tokens in the batch), i.e. the vocabulary or a chunk of it (the LM head's matrix products and
the loss's vocabulary-wide work, however each implementation tiles it), and the rest (the backbone, the optimizer). For each trainer it prints
the step's wall time, the self CPU time in each part, the FLOPs and time of the vocabulary-sized matrix products (in
units of 2 N D V, one N x D by D x V product over the N scored rows), and the top operators; `--json` writes the same
figures. FLOPs do not depend on the machine's load; times do (compare them within one run).
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import ROOT, module_command
from .trainer import MODELS

# matrix products, and where their two factors sit among the inputs (addmm: bias or accumulator first)
MATMULS = {"aten::mm": 0, "aten::addmm": 1, "aten::addmm_": 1}


def matmul_flops(op: str, shapes: list) -> float:
    """2 m k n for a product of an m x k and a k x n matrix (the profiler's own count skips in-place `addmm_`)."""
    (m, k), (_, n) = shapes[MATMULS[op]], shapes[MATMULS[op] + 1]
    return 2.0 * m * k * n


def worker(trainer_name: str, model_name: str, batch: int, seq_len: int, warmup: int, top: int) -> dict:
    import datasets
    from torch.profiler import ProfilerActivity, profile
    from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback
    from transformers.utils import logging
    from trl import SFTConfig, SFTTrainer

    from sftmix_trl import SFTMixConfig, SFTMixTrainer
    from tests import tiny

    logging.set_verbosity_error()
    datasets.disable_progress_bars()
    tokenizer = tiny.build_tokenizer()
    config = LlamaConfig(
        **MODELS[model_name], pad_token_id=tokenizer.pad_token_id, bos_token_id=None, eos_token_id=None
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    num_examples = batch * (warmup + 2)
    generator = torch.Generator().manual_seed(0)
    dataset = datasets.Dataset.from_dict(
        {
            "id": [f"ex-{i:05d}" for i in range(num_examples)],
            "input_ids": torch.randint(1, config.vocab_size, (num_examples, seq_len), generator=generator).tolist(),
            "confidence": torch.rand(num_examples, generator=generator).tolist(),
        }
    )
    common = dict(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch, max_steps=warmup + 1, max_length=seq_len,
        learning_rate=1e-5, logging_steps=10_000, save_strategy="no", report_to="none", disable_tqdm=True,
        use_cpu=True, bf16=False, seed=0,
    )  # fmt: skip
    if trainer_name == "sft":
        trainer = SFTTrainer(model, args=SFTConfig(**common), train_dataset=dataset, processing_class=tokenizer)
    else:
        args = SFTMixConfig(**common, loss_impl="torch")
        trainer = SFTMixTrainer(model, args=args, train_dataset=dataset, processing_class=tokenizer)

    class ProfileLastStep(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                self.profiler = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
                self.profiler.__enter__()
                self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warmup + 1:
                self.wall = time.perf_counter() - self.start
                self.profiler.__exit__(None, None, None)

    callback = ProfileLastStep()
    trainer.add_callback(callback)
    trainer.train()

    vocab = config.vocab_size
    # the backbone's largest dimension: anything larger is the vocabulary or a chunk of it (TRL tiles it by 32,768)
    backbone_max = max(config.hidden_size, config.intermediate_size, batch * seq_len)
    parts = {"vocabulary-sized": 0.0, "other": 0.0}
    vocab_matmuls = {"flops": 0.0, "seconds": 0.0}
    by_op: dict[str, float] = {}
    for event in callback.profiler.key_averages(group_by_input_shape=True):
        seconds = event.self_cpu_time_total / 1e6
        shapes = [shape for shape in event.input_shapes if isinstance(shape, list)]
        is_vocab = any(isinstance(dim, int) and dim > backbone_max for shape in shapes for dim in shape)
        parts["vocabulary-sized" if is_vocab else "other"] += seconds
        if is_vocab and event.key in MATMULS:
            vocab_matmuls["flops"] += event.count * matmul_flops(event.key, shapes)
            vocab_matmuls["seconds"] += seconds
        label = f"{event.key} {shapes}" if is_vocab else event.key
        by_op[label] = by_op.get(label, 0.0) + seconds
    ranked = sorted(by_op.items(), key=lambda item: -item[1])[:top]
    # 2 N D V: one product over the rows scored, batch x (seq_len - 1) here, every position being trained
    vocab_matmuls["units_of_2NDV"] = vocab_matmuls["flops"] / (2 * batch * (seq_len - 1) * config.hidden_size * vocab)
    return dict(
        trainer=trainer_name, wall_seconds=callback.wall, self_cpu_seconds=parts, vocab_matmuls=vocab_matmuls,
        top_ops=[{"op": op, "seconds": seconds} for op, seconds in ranked],
    )  # fmt: skip


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=list(MODELS), default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--top", type=int, default=8, help="operators listed per trainer")
    parser.add_argument("--json", type=Path, default=None, help="write the figures to this file")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    cli = parser.parse_args(argv)
    if cli.worker:
        print(json.dumps(worker(cli.worker, cli.model, cli.batch, cli.seq_len, cli.warmup, cli.top)))
        return
    results = []
    for trainer_name in ("sft", "sftmix"):
        command = [
            *module_command(__spec__.name),
            "--worker",
            trainer_name,
            "--model",
            cli.model,
            "--batch",
            str(cli.batch),
        ]
        command += ["--seq-len", str(cli.seq_len), "--warmup", str(cli.warmup), "--top", str(cli.top)]
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        if done.returncode != 0:
            sys.exit(f"{trainer_name} failed:\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        results.append(result)
        parts, matmuls = result["self_cpu_seconds"], result["vocab_matmuls"]
        print(
            f"{trainer_name}: step {result['wall_seconds']:.2f} s wall; self CPU {parts['vocabulary-sized']:.2f} s in "
            f"vocabulary-sized operators (matrix products {matmuls['seconds']:.2f} s, "
            f"{matmuls['units_of_2NDV']:.2f} x 2NDV FLOPs), "
            f"{parts['other']:.2f} s in the rest"
        )
        for entry in result["top_ops"]:
            print(f"    {entry['seconds']:8.3f} s  {entry['op']}")
    if cli.json:
        cli.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
