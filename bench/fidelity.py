"""A repeated comparison of SFTMix with NTP on SmolLM2-135M-Instruct: several seeds of each, and a random split.

    nice -n 19 .venv/bin/python -m bench.fidelity > runs/fidelity.log 2>&1 &
    nice -n 19 .venv/bin/python -m bench.fidelity --generate --generate_prompts 80

What runs, all on CPU in fp32, under `--output_dir` (default runs/fidelity):

    reference/   one NTP run of the base model on the training rows, every row scored at K checkpoints (shared by
                 every seed: the confidence split does not depend on the target run's seed)
    confidence/  confidence = -mean_k ppl_k and the equal split
    <method>-seed<s>/  for each seed s and method: `sftmix` (confidence split), `ntp` (SFTTrainer, the same rows,
                 batch, epochs, learning rate and schedule), `random` (SFTMix with a random split of the same sizes),
                 `dynamics` (SFTMix split by the reference run's training dynamics, no scoring pass: the reference
                 run records them beside its checkpoint scores), `onerun` (`train_one_run`: the first epoch NTP,
                 recording training dynamics, then SFTMix on their split; no reference run), `ntp_lr` (NTP at the
                 learning rate times 1 + mixup_coef: the Mixup term adds gradient, so SFTMix takes larger steps at
                 the same learning rate; this arm tells a learning-rate effect from SFTMix's); the trained model and
                 the held-out scores of each
    base/        the held-out scores of the untrained model

Training data: the Alpaca rows of `alpaca_en_demo` (llamafactory sdist), exact duplicates dropped, the first
`--train_rows`. Held-out data: the first `--eval_rows` of AlpacaEval's 805 instructions with their reference outputs
(alpaca-eval sdist). The metric is each model's mean NLL per response token of the reference outputs (token-weighted
over the examples, truncated at `--max_length` like training); lower is better.

One CSV row per finished run is appended to `--csv` as it lands (so a partial run is usable and a rerun skips what is
done), and after each the summary table (the mean NLL of each method, and the mean over seeds of each paired
difference with a 95% t interval) is rewritten to the `.md` beside it. `--generate` afterwards writes the answers of
the best seed of each method (lowest NLL) to a handful of MT-Bench and AlpacaEval prompts, in the judges' formats
(MT-Bench's to bench/results/fidelity-answers/mt_bench, AlpacaEval's to <output_dir>/answers/alpaca_eval: they quote
AlpacaEval's non-commercial instructions, so they stay out of the repository).
"""

import argparse
import csv
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("sftmix", "ntp", "random", "dynamics", "onerun", "ntp_lr")
NEED_REFERENCE = ("sftmix", "random", "dynamics")  # the arms split by the shared reference run's confidence
FIELDS = [
    "method",
    "seed",
    "train_rows",
    "steps",
    "train_seconds",
    "train_loss",
    "eval_examples",
    "eval_tokens",
    "nll",
    "ppl",
    "device",
    "date",
]
MIN_RESPONSE_TOKENS = 16
# two-sided 95% quantiles of Student's t by degrees of freedom (an interval over a handful of seeds)
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="runs/fidelity")
    parser.add_argument("--csv", default=str(RESULTS / f"fidelity-cpu-{datetime.date.today()}.csv"))
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..S-1 of each method")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {','.join(METHODS)}")
    parser.add_argument("--train_rows", type=int, default=160, help="a multiple of --batch_size: equal step counts")
    parser.add_argument("--eval_rows", type=int, default=400)
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--learning_rate", type=float, default=5e-5)
    parser.add_argument("--reference_checkpoints", type=int, default=3, help="K")
    parser.add_argument("--mixup_coef", type=float, default=0.2, help="SFTMix's; also sets ntp_lr's learning rate")
    parser.add_argument("--generate", action="store_true", help="write the best seeds' answers and stop")
    parser.add_argument("--summarize", action="store_true", help="rewrite the summary table from the CSV and stop")
    parser.add_argument("--generate_prompts", type=int, default=8, help="MT-Bench and AlpacaEval prompts each")
    parser.add_argument("--generate_batch_size", type=int, default=8, help="prompts decoded together")
    parser.add_argument("--max_new_tokens", type=int, default=256)
    return parser.parse_args(argv)


def device_label() -> str:
    import torch

    cores = len(os.sched_getaffinity(0))
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {cores} cores, torch {torch.__version__}, {gpu}"


def load_data(args, model: str):
    """The first `train_rows` distinct Alpaca rows and the first `eval_rows` AlpacaEval rows whose chat-templated
    prompt leaves at least `MIN_RESPONSE_TOKENS` response tokens within `max_length` (a row without any would be
    dropped by SFTTrainer, and the methods' step counts would differ)."""
    from datasets import load_dataset
    from transformers import AutoTokenizer

    from sftmix_trl.assets import alpaca_demo_path, alpacaeval_path
    from sftmix_trl.data import add_example_ids
    from sftmix_trl.data.formats import alpaca_to_prompt_completion
    from sftmix_trl.data.loading import drop_duplicate_examples

    tokenizer = AutoTokenizer.from_pretrained(model)

    def fits(row):
        prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=True, add_generation_prompt=True)["input_ids"]
        return len(prompt) <= args.max_length - MIN_RESPONSE_TOKENS

    def first(dataset, count, name):
        dataset = drop_duplicate_examples(dataset).filter(fits)
        if len(dataset) < count:
            raise ValueError(f"Only {len(dataset)} {name} rows fit max_length {args.max_length}, fewer than {count}.")
        return add_example_ids(dataset.select(range(count)))

    train = alpaca_to_prompt_completion(load_dataset("json", data_files=str(alpaca_demo_path()), split="train"))
    held_out = load_dataset("json", data_files=str(alpacaeval_path()), split="train")
    held_out = alpaca_to_prompt_completion(held_out.select_columns(["instruction", "output"]))
    return first(train, args.train_rows, "Alpaca"), first(held_out, args.eval_rows, "AlpacaEval")


def training_config(args, output_dir: Path, seed: int, **overrides):
    """fp32 everywhere; on CPU unless a GPU is there (then the Triton loss)."""
    import torch

    from sftmix_trl import SFTMixConfig

    return SFTMixConfig(
        output_dir=str(output_dir),
        seed=seed,
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        max_length=args.max_length,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=16,
        num_train_epochs=args.epochs,
        learning_rate=overrides.pop("learning_rate", args.learning_rate),
        lr_scheduler_type="cosine",
        warmup_steps=0.1,
        logging_steps=4,
        save_strategy="no",
        report_to="none",
        loss_impl="auto",
        activation_checkpointing=False,
        mixup_coef=args.mixup_coef,
        **overrides,
    )


def run_reference(args, model: str, train, run_dir: Path) -> Path:
    """The shared NTP reference run, scored at K evenly spaced checkpoints (and its training dynamics recorded), and
    the confidence tables of both."""
    from trl import SFTTrainer

    from sftmix_trl import ConfidenceCallback, TrainingDynamicsCallback, aggregate_scores
    from sftmix_trl.config import sft_config_from
    from sftmix_trl.recipe.checkpoints import EvenlySpacedCheckpoints

    confidence_file = run_dir / "confidence" / "confidence.jsonl"
    if confidence_file.is_file() and (run_dir / "confidence-dynamics" / "confidence.jsonl").is_file():
        return confidence_file
    reference_dir = run_dir / "reference"
    config = sft_config_from(training_config(args, reference_dir, seed=0))
    trainer = SFTTrainer(model=model, args=config, train_dataset=train)
    trainer.add_callback(EvenlySpacedCheckpoints(args.reference_checkpoints))
    trainer.add_callback(ConfidenceCallback(trainer, dataset_name="alpaca_en_demo"))
    trainer.add_callback(TrainingDynamicsCallback(trainer, dataset_name="alpaca_en_demo"))
    trainer.train()
    aggregate_scores([reference_dir]).save(run_dir / "confidence", overwrite=True)
    epoch_files = sorted((reference_dir / "training_dynamics").glob("epoch-*.jsonl"))
    aggregate_scores(epoch_files).save(run_dir / "confidence-dynamics", overwrite=True)
    return confidence_file


def held_out_nll(model_dir: str, held_out, scores_dir: Path, args) -> tuple[int, int, float]:
    """(examples, response tokens, token-weighted mean NLL) of the held-out reference outputs under a model."""
    from sftmix_trl.confidence import read_scores, score_checkpoints
    from sftmix_trl.config import sft_config_from

    config = sft_config_from(training_config(args, scores_dir, seed=0))
    (path,) = score_checkpoints([model_dir], held_out, scores_dir, args=config, dataset_name="alpacaeval")
    records = [r for r in read_scores(path)[0] if r["num_tokens"] > 0]
    tokens = sum(r["num_tokens"] for r in records)
    return len(records), tokens, sum(r["nll"] * r["num_tokens"] for r in records) / tokens


def learning_rate(args, method: str) -> float:
    """The arm's learning rate: `ntp_lr`'s is raised by 1 + mixup_coef, the factor by which L = L_NTP + mu * L_Mixup
    scales the gradient where the two terms point the same way (an upper estimate of SFTMix's larger steps)."""
    return args.learning_rate * (1 + args.mixup_coef) if method == "ntp_lr" else args.learning_rate


def train_one(args, method: str, seed: int, model: str, train, confidence_file: Path, run_dir: Path):
    from trl import SFTTrainer

    from sftmix_trl import SFTMixTrainer
    from sftmix_trl.config import sft_config_from

    output_dir = run_dir / f"{method}-seed{seed}"
    if method in ("ntp", "ntp_lr"):
        config = sft_config_from(training_config(args, output_dir, seed, learning_rate=learning_rate(args, method)))
        trainer = SFTTrainer(model=model, args=config, train_dataset=train)
    elif method == "onerun":
        from sftmix_trl.one_run import train_one_run

        start = time.perf_counter()
        trainer = train_one_run(model, training_config(args, output_dir, seed), train, self_reference_epochs=1)
        seconds = time.perf_counter() - start
        trainer.save_model(str(output_dir / "model"))
        loss = [log["loss"] for log in trainer.state.log_history if "loss" in log]
        return output_dir / "model", trainer.state.global_step, seconds, sum(loss) / max(len(loss), 1)
    else:
        if method == "dynamics":
            confidence_file = run_dir / "confidence-dynamics" / "confidence.jsonl"
        config = training_config(
            args,
            output_dir,
            seed,
            confidence_scores_path=str(confidence_file),
            split_by="random" if method == "random" else "confidence",
        )
        trainer = SFTMixTrainer(model=model, args=config, train_dataset=train)
    start = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - start
    trainer.save_model(str(output_dir / "model"))
    return output_dir / "model", trainer.state.global_step, seconds, result.training_loss


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def append_row(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.is_file()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(row)


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t interval (nan with fewer than two values)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, T_975.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))


def summarize(rows: list[dict]) -> str:
    """The per-method means and the paired (by seed) differences, as a Markdown table."""
    nll = {(r["method"], r["seed"]): float(r["nll"]) for r in rows}
    lines = ["| method | seeds | mean NLL | 95% interval | per seed |", "|---|---:|---:|---:|---|"]
    for method in ("base", *METHODS):
        values = [v for (m, _), v in sorted(nll.items()) if m == method]
        if values:
            mean, half = interval(values)
            shown = ", ".join(f"{v:.4f}" for v in values)
            shown_half = f"±{half:.4f}" if math.isfinite(half) else "n/a (one run)"
            lines.append(f"| {method} | {len(values)} | {mean:.4f} | {shown_half} | {shown} |")
    lines += ["", "| difference (paired by seed) | seeds | mean | 95% interval |", "|---|---:|---:|---:|"]
    pairs = [("sftmix", "ntp"), ("random", "ntp"), ("sftmix", "random"), ("dynamics", "ntp"), ("onerun", "ntp")]
    pairs += [("ntp_lr", "ntp"), ("sftmix", "ntp_lr"), ("dynamics", "sftmix"), ("onerun", "sftmix")]
    for a, b in pairs:
        seeds = sorted({s for m, s in nll if m == a} & {s for m, s in nll if m == b})
        if seeds:
            mean, half = interval([nll[a, s] - nll[b, s] for s in seeds])
            shown = f"[{mean - half:+.4f}, {mean + half:+.4f}]" if math.isfinite(half) else "n/a (one seed)"
            lines.append(f"| {a} - {b} | {len(seeds)} | {mean:+.4f} | {shown} |")
    return "\n".join(lines)


def write_summary(csv_path: Path, args, wall_seconds: float) -> None:
    rows = read_rows(csv_path)
    arguments = " ".join(a for a in sys.argv[1:] if a != "--summarize")
    header = [
        "# SFTMix vs NTP, repeated (bench/fidelity.py)",
        "",
        f"Command: `nice -n 19 .venv/bin/python -m bench.fidelity {arguments}`",
        f"Machine: {rows[0]['device'] if rows else device_label()}"
        + (
            f"; wall time of this invocation {wall_seconds / 60:.1f} min (it skips the rows already in the CSV)"
            if wall_seconds is not None
            else ""
        ),
        f"SmolLM2-135M-Instruct, {args.train_rows} distinct Alpaca rows, {args.epochs:g} epoch(s), batch "
        f"{args.batch_size}, lr {args.learning_rate:g} cosine, max_length {args.max_length}, K = "
        f"{args.reference_checkpoints}; held-out: response NLL of {args.eval_rows} AlpacaEval reference outputs "
        "(lower is better).",
        "",
    ]
    csv_path.with_suffix(".md").write_text("\n".join(header) + "\n" + summarize(rows) + "\n")


def generate_best(args, run_dir: Path, csv_path: Path) -> None:
    """The answers of each method's best seed (and the base model) to the first MT-Bench and AlpacaEval prompts: the
    MT-Bench answers beside the results (its questions are FastChat's, Apache-2.0), the AlpacaEval outputs under the
    run directory (they repeat AlpacaEval's instructions, whose licence is non-commercial: never committed)."""
    from sftmix_trl.assets import smollm2_path
    from sftmix_trl.evaluation.answers import (
        ChatGenerator,
        generate_alpacaeval,
        generate_mtbench,
        load_alpacaeval,
        load_mtbench,
    )

    rows = read_rows(csv_path)
    models = {"smollm2-135m-base": str(smollm2_path())}
    for method in args.methods.split(","):
        candidates = [r for r in rows if r["method"] == method]
        if candidates:
            best = min(candidates, key=lambda r: float(r["nll"]))
            models[f"smollm2-135m-{method}-seed{best['seed']}"] = str(
                run_dir / f"{method}-seed{best['seed']}" / "model"
            )
    questions = load_mtbench()[: args.generate_prompts]
    instructions = load_alpacaeval()[: args.generate_prompts]
    for name, path in models.items():
        chat = ChatGenerator(path, batch_size=args.generate_batch_size, max_new_tokens=args.max_new_tokens)
        generate_mtbench(chat, questions, RESULTS / "fidelity-answers" / "mt_bench" / f"{name}.jsonl", model_id=name)
        generate_alpacaeval(chat, instructions, run_dir / "answers" / "alpaca_eval" / f"{name}.json", generator=name)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.train_rows % args.batch_size:
        raise ValueError(
            "--train_rows must be a multiple of --batch_size, so that SFTMix (whole paired micro-batches) "
            "and NTP take the same number of steps."
        )
    run_dir = Path(args.output_dir)
    csv_path = Path(args.csv)
    if args.generate:
        generate_best(args, run_dir, csv_path)
        return
    if args.summarize:
        write_summary(csv_path, args, wall_seconds=None)
        return
    from sftmix_trl.assets import smollm2_path

    start = time.perf_counter()
    model = str(smollm2_path())
    train, held_out = load_data(args, model)
    device = device_label()
    done = {(r["method"], r["seed"]) for r in read_rows(csv_path)}

    def record(method, seed, model_dir, steps="", seconds="", loss=""):
        examples, tokens, nll = held_out_nll(str(model_dir), held_out, run_dir / f"{method}-seed{seed}" / "eval", args)
        row = {
            "method": method,
            "seed": seed,
            "train_rows": len(train),
            "steps": steps,
            "train_seconds": f"{seconds:.1f}" if seconds != "" else "",
            "train_loss": f"{loss:.4f}" if loss != "" else "",
            "eval_examples": examples,
            "eval_tokens": tokens,
            "nll": f"{nll:.5f}",
            "ppl": f"{math.exp(nll):.4f}",
            "device": device,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        append_row(csv_path, row)
        write_summary(csv_path, args, time.perf_counter() - start)
        print(f"[fidelity] {method} seed {seed}: NLL {nll:.5f} ({time.perf_counter() - start:.0f} s)", flush=True)

    confidence_file = None
    methods = args.methods.split(",")
    for seed in range(args.seeds):
        for method in methods:
            if (method, str(seed)) in done:
                continue
            if confidence_file is None and method in NEED_REFERENCE:
                # run when an arm first needs it (ntp, ntp_lr and onerun do not), so that those rows land first
                confidence_file = run_reference(args, model, train, run_dir)
                scored = {json.loads(line)["id"] for line in confidence_file.read_text().splitlines()}
                # every arm trains the same rows: load_data keeps only rows with room for a response, which TRL's
                # preparation keeps and the reference scores
                if len(scored) != len(train):
                    raise RuntimeError(f"The reference scored {len(scored)} of {len(train)} training rows.")
                print(f"[fidelity] reference and confidence done ({time.perf_counter() - start:.0f} s)", flush=True)
            model_dir, steps, seconds, loss = train_one(args, method, seed, model, train, confidence_file, run_dir)
            record(method, seed, model_dir, steps, seconds, loss)
    if ("base", "-") not in done:  # last: the differences between the methods come first
        record("base", "-", model)
    write_summary(csv_path, args, time.perf_counter() - start)
    print(csv_path.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
