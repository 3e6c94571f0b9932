"""Confidence scoring against a plain `SFTTrainer.evaluate` on the same data: throughput and peak memory.

    python -m bench.confidence                        # 999 Alpaca rows, SmolLM2-135M-Instruct, max_length 512
    python -m bench.confidence --num_examples 64      # a quick look

Each measurement runs in a fresh Python process, so that peak RSS (`ru_maxrss`) belongs to it alone. Both load the
same model and prepare the same data the same way (SFTTrainer, conversational prompt/completion, completion-only
loss), then time one pass over every example: `score_trainer` (per-example response NLL, what ConfidenceCallback and
`sftmix score` run) or `trainer.evaluate` (the mean loss only). The model and data come from PyPI packages
(`sftmix_trl.assets`), cached in ~/.cache/sftmix-trl.

A table goes to stdout and CSV rows (bench, pass, metric, unit, model, examples, max_length, batch, value, device,
date, version) to `--csv` (default bench/results/confidence-cpu-<date>.csv).
"""

import argparse
import csv
import datetime
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import ROOT, module_command
from .kernel import device_label, version_label

RESULTS = Path(__file__).resolve().parent / "results"
FIELDS = [
    "bench",
    "pass",
    "metric",
    "unit",
    "model",
    "examples",
    "max_length",
    "batch",
    "value",
    "device",
    "date",
    "version",
]
# (result key, metric, unit) written to the CSV for each pass
METRICS = [
    ("examples_per_s", "throughput", "examples/s"),
    ("seconds", "pass_time", "s"),
    ("peak_rss_mib", "peak_memory", "MiB"),
    ("rss_before_pass_mib", "memory_before_pass", "MiB"),
]


def worker(mode: str, num_examples: int, max_length: int, batch_size: int) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from sftmix_trl.assets import alpaca_demo_path, smollm2_path
    from sftmix_trl.confidence import score_trainer
    from sftmix_trl.data.formats import alpaca_to_prompt_completion

    rows = Dataset.from_json(str(alpaca_demo_path()))
    # the demo file repeats some rows verbatim, so content-derived ids would collide: number the rows instead
    rows = rows.map(lambda _, i: {"id": f"alpaca_en_demo-{i}"}, with_indices=True)
    dataset = alpaca_to_prompt_completion(rows)
    dataset = dataset.select(range(min(num_examples, len(dataset))))
    with tempfile.TemporaryDirectory() as output_dir:
        args = SFTConfig(
            output_dir=output_dir,
            max_length=max_length,
            per_device_eval_batch_size=batch_size,
            use_cpu=True,
            bf16=False,
            report_to="none",
            disable_tqdm=True,
        )
        trainer = SFTTrainer(model=str(smollm2_path()), args=args, train_dataset=dataset)
        prepared = trainer.train_dataset
        rss_before_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        start = time.perf_counter()
        if mode == "score":
            records = score_trainer(trainer, show_progress=False)
            result = {"mean_nll": sum(r["nll"] for r in records) / len(records)}
        else:
            metrics = trainer.evaluate(eval_dataset=prepared)
            result = {"eval_loss": metrics["eval_loss"]}
        seconds = time.perf_counter() - start
    return {
        "mode": mode,
        "examples": len(prepared),
        "loss_tokens": sum(sum(label != -100 for label in labels) for labels in prepared["labels"]),
        "seconds": seconds,
        "examples_per_s": len(prepared) / seconds,
        "rss_before_pass_mib": rss_before_mib,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch_threads": torch.get_num_threads(),
        **result,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_examples", type=int, default=999)
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--modes", nargs="+", default=["score", "evaluate"], choices=["score", "evaluate"])
    parser.add_argument("--csv", type=Path, default=None)
    parser.add_argument("--worker", choices=["score", "evaluate"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.num_examples, args.max_length, args.batch_size)))
        return

    results = []
    for mode in args.modes:
        command = [*module_command(__spec__.name), "--worker", mode]
        command += ["--num_examples", str(args.num_examples), "--max_length", str(args.max_length)]
        command += ["--batch_size", str(args.batch_size)]
        out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        if out.returncode != 0:
            sys.exit(f"The {mode} worker failed:\n{out.stderr[-3000:]}")
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)

    print(f"\nSmolLM2-135M-Instruct, max_length {args.max_length}, batch {args.batch_size}, CPU float32")
    print(f"{'pass':<10}{'examples':>9}{'seconds':>9}{'examples/s':>12}{'peak RSS MiB':>14}{'RSS before MiB':>16}")
    for r in results:
        print(
            f"{r['mode']:<10}{r['examples']:>9}{r['seconds']:>9.1f}{r['examples_per_s']:>12.2f}"
            f"{r['peak_rss_mib']:>14.0f}{r['rss_before_pass_mib']:>16.0f}"
        )
    csv_path = args.csv or RESULTS / f"confidence-cpu-{datetime.date.today().isoformat()}.csv"
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    new_file = not csv_path.exists()
    common = {"bench": "confidence_pass", "model": "smollm2-135m-instruct", "max_length": args.max_length}
    common |= {"batch": args.batch_size, "device": device_label(torch.device("cpu"))}
    common |= {"date": datetime.date.today().isoformat(), "version": version_label()}
    with open(csv_path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        if new_file:
            writer.writeheader()
        for r in results:
            for key, metric, unit in METRICS:
                row = {"pass": r["mode"], "metric": metric, "unit": unit, "examples": r["examples"], "value": r[key]}
                writer.writerow(common | row)
    print(f"-> {csv_path}")

    if len(results) == 2:
        score, evaluate = results
        nll_check = abs(score["mean_nll"] - evaluate["eval_loss"])
        print(
            f"\nscoring / evaluate: {score['examples_per_s'] / evaluate['examples_per_s']:.2f}x throughput, "
            f"{score['peak_rss_mib'] / evaluate['peak_rss_mib']:.2f}x peak RSS "
            f"(mean per-example NLL {score['mean_nll']:.4f} vs eval_loss {evaluate['eval_loss']:.4f}, a token mean, "
            f"differ by {nll_check:.4f})"
        )


if __name__ == "__main__":
    main()
