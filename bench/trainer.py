"""Training-step benchmark: TRL's SFTTrainer against SFTMixTrainer with each loss implementation.

    python -m bench.trainer                               # SmolLM2-135M-sized model, batch 8, sequence 256
    python -m bench.trainer --impls torch --steps 5       # SFTTrainer and SFTMixTrainer(loss_impl="torch") only
    python -m bench.trainer --model tiny --steps 3        # a 2-layer model: checks the script in seconds

The model is built from SmolLM2-135M's configuration (hidden 576, 30 layers, 9 heads / 3 key-value heads,
intermediate 1536, vocabulary 49,152, tied embeddings) with random weights: no download. The data are pre-tokenized
random sequences of exactly `--seq-len` tokens, all of them trained on (language-modeling loss): every pair then
mixes every position, the most the Mixup term can cost, and both trainers score the same rows. Both trainers get
the same model, data, batch, sequence length, precision and gradient checkpointing (SFTConfig's default, on).

Each configuration runs in a fresh subprocess: `--warmup` optimizer steps, then `--steps` timed ones (wall time
of each step, from a callback), `--rounds` times, in alternating order. Peak memory: on CPU the peak resident set
size (VmHWM) of that subprocess, whole (`peak_memory`) and above its size once the trainer is built
(`train_peak_memory`: activations, gradients, optimizer states and the loss's buffers); on CUDA
`torch.cuda.max_memory_allocated` over the training steps.

A table goes to stdout and CSV rows (bench, trainer, impl, metric, unit, model, batch, seq_len, dtype, median, p20,
p80, device, date, version) to `--csv` (default bench/results/trainer-<device>-<date>.csv); `time_ratio` and
`memory_ratio` rows compare each SFTMix row with SFTTrainer's.
"""

import argparse
import csv
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import ROOT, module_command
from .kernel import device_label, percentiles, reset_peak_rss, rss_bytes, version_label

RESULTS = Path(__file__).resolve().parent / "results"
# "<impl>_nomix": the same loss implementation with mixup_coef=0 (balanced batches, next-token loss only): what
# the Mixup term itself costs
IMPLS = ("torch", "torch_nomix", "reference", "triton", "triton_nomix")
FIELDS = ("bench", "trainer", "impl", "metric", "unit", "model", "batch", "seq_len", "dtype", "median", "p20", "p80")
FIELDS += ("device", "date", "version")

# SmolLM2-135M's configuration (HuggingFaceTB/SmolLM2-135M, config.json)
MODELS = {
    "smollm2-135m": dict(
        hidden_size=576,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        intermediate_size=1536,
        vocab_size=49152,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
    ),
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=4096,
        tie_word_embeddings=True,
        max_position_embeddings=1024,
    ),
}


def worker(trainer_name, impl, model_name, batch, seq_len, steps, warmup, bf16, gradient_checkpointing, device):
    """One configuration in this (fresh) process; prints a JSON line with the step times and peak memory."""
    import datasets
    from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback
    from transformers.utils import logging
    from trl import SFTConfig, SFTTrainer

    from sftmix_trl import SFTMixConfig, SFTMixTrainer
    from tests import tiny

    logging.set_verbosity_error()
    datasets.disable_progress_bars()
    on_gpu = device == "cuda"
    tokenizer = tiny.build_tokenizer()  # only its pad token is used: the data are pre-tokenized
    config = LlamaConfig(
        **MODELS[model_name], pad_token_id=tokenizer.pad_token_id, bos_token_id=None, eos_token_id=None
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)

    num_examples = batch * (steps + warmup) + batch
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1, config.vocab_size, (num_examples, seq_len), generator=generator)
    dataset = datasets.Dataset.from_dict(
        {
            "id": [f"ex-{i:05d}" for i in range(num_examples)],
            "input_ids": input_ids.tolist(),
            "confidence": torch.rand(num_examples, generator=generator).tolist(),
        }
    )
    common = dict(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=batch,
        max_steps=steps + warmup,
        max_length=seq_len,
        learning_rate=1e-5,
        logging_steps=10_000,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=not on_gpu,
        bf16=bf16,
        gradient_checkpointing=gradient_checkpointing,
        seed=0,
    )
    if trainer_name == "sft":
        trainer = SFTTrainer(model, args=SFTConfig(**common), train_dataset=dataset, processing_class=tokenizer)
    else:
        loss_impl, _, nomix = impl.partition("_")
        args = SFTMixConfig(**common, loss_impl=loss_impl, mixup_coef=0.0 if nomix else 0.2)
        trainer = SFTMixTrainer(model, args=args, train_dataset=dataset, processing_class=tokenizer)

    class StepTimer(TrainerCallback):
        times: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            if on_gpu:
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if on_gpu:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.start)

    timer = StepTimer()
    trainer.add_callback(timer)
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        reset_peak_rss()
        base = rss_bytes()
    trainer.train()
    if on_gpu:
        peak = torch.cuda.max_memory_allocated()
        train_peak = peak - base
    else:
        peak = rss_bytes("VmHWM")
        train_peak = peak - base
    losses = [log["train_loss"] for log in trainer.state.log_history if "train_loss" in log]
    print(json.dumps(dict(step_times=timer.times[warmup:], peak=peak, train_peak=train_peak, train_loss=losses)))


def run_config(trainer_name, impl, cli):
    command = [*module_command(__spec__.name), "--worker", trainer_name, impl, "--model", cli.model]
    command += ["--batch", str(cli.batch), "--seq-len", str(cli.seq_len), "--steps", str(cli.steps)]
    command += ["--warmup", str(cli.warmup), "--device", cli.device]
    command += ["--threads", str(cli.threads)] if cli.threads else []
    command += ["--bf16"] if cli.bf16 else []
    command += ["--no-gradient-checkpointing"] if not cli.gradient_checkpointing else []
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        print(result.stderr[-3000:], file=sys.stderr)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--impls",
        nargs="+",
        choices=IMPLS,
        default=None,
        help="default: torch torch_nomix reference (+ triton triton_nomix on CUDA)",
    )
    parser.add_argument("--model", choices=list(MODELS), default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps first")
    parser.add_argument("--rounds", type=int, default=1, help="repeat every configuration, alternating the order")
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (default: on CUDA)")
    parser.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per run (default: torch's)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--machine", default=None, help="device name written to the CSV (default: detected)")
    parser.add_argument("--csv", type=Path, default=None)
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    cli = parser.parse_args(argv)
    on_gpu = cli.device == "cuda"
    cli.bf16 = cli.bf16 or on_gpu
    if cli.worker:
        if cli.threads:
            torch.set_num_threads(cli.threads)
        worker(*cli.worker, cli.model, cli.batch, cli.seq_len, cli.steps, cli.warmup, cli.bf16,
               cli.gradient_checkpointing, cli.device)  # fmt: skip
        return
    impls = cli.impls or (
        ["triton", "triton_nomix", "torch", "reference"] if on_gpu else ["torch", "torch_nomix", "reference"]
    )

    date = datetime.date.today().isoformat()
    label, version = device_label(torch.device(cli.device), cli.machine), version_label()
    dtype = "bf16" if cli.bf16 else "fp32"
    csv_path = cli.csv or RESULTS / f"trainer-{cli.device}-{date}.csv"
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    new_file = not csv_path.exists()
    memory_kind = "max_memory_allocated" if on_gpu else "peak RSS"
    threads = torch.get_num_threads() if cli.threads is None else cli.threads
    print(f"# {label}; {version}; {cli.model}, batch {cli.batch}, seq {cli.seq_len}, {dtype}, "
          f"gradient checkpointing {cli.gradient_checkpointing}; {threads} threads; memory = {memory_kind}; "
          f"-> {csv_path}")  # fmt: skip
    print(f"{'trainer':>8} {'impl':>10} {'metric':>22} {'median':>10} {'p20':>10} {'p80':>10}")

    with open(csv_path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        if new_file:
            writer.writeheader()

        def emit(trainer_name, impl, metric, unit, values):
            median, p20, p80 = percentiles(values)
            row = dict(bench="trainer_step", trainer=trainer_name, impl=impl, metric=metric, unit=unit)
            row.update(model=cli.model, batch=cli.batch, seq_len=cli.seq_len, dtype=dtype, device=label, date=date)
            row.update(median=f"{median:.6g}", p20=f"{p20:.6g}", p80=f"{p80:.6g}", version=version)
            writer.writerow(row)
            handle.flush()
            print(f"{trainer_name:>8} {impl:>10} {metric + ' ' + unit:>22} {median:>10.4g} {p20:>10.4g} {p80:>10.4g}")

        # Rounds alternate the order of the configurations, so that a load that drifts on a shared machine weighs
        # on all of them alike; each configuration's rows pool its steps over the rounds.
        configs = [("sft", "trl"), *[("sftmix", impl) for impl in impls]]
        measured = {config: [] for config in configs}
        for round_index in range(cli.rounds):
            for trainer_name, impl in configs if round_index % 2 == 0 else configs[::-1]:
                result = run_config(trainer_name, "auto" if impl == "trl" else impl, cli)
                if result is None:
                    print(f"{trainer_name:>8} {impl:>10} failed (see stderr)")
                    continue
                measured[(trainer_name, impl)].append(result)

        baseline = None
        for (trainer_name, impl), results in measured.items():
            if not results:
                continue
            times = [t for result in results for t in result["step_times"]]
            peak = statistics.median(result["peak"] for result in results)
            train_peak = statistics.median(result["train_peak"] for result in results)
            emit(trainer_name, impl, "step_time", "s", times)
            emit(trainer_name, impl, "steps_per_second", "1/s", [1 / t for t in times])
            emit(trainer_name, impl, "peak_memory", "MiB", [peak / 2**20])
            emit(trainer_name, impl, "train_peak_memory", "MiB", [train_peak / 2**20])
            if baseline is None:
                baseline = statistics.median(times), peak, train_peak
                continue
            emit(trainer_name, impl, "time_ratio", "x", [statistics.median(times) / baseline[0]])
            emit(trainer_name, impl, "memory_ratio", "x", [peak / baseline[1]])
            emit(trainer_name, impl, "train_memory_ratio", "x", [train_peak / baseline[2]])


if __name__ == "__main__":
    main()
