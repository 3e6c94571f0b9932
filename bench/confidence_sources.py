"""How well the cheap confidences agree with the paper's checkpoint confidence, and what each costs, on the demo's data.

    nice -n 10 .venv/bin/python -m bench.confidence_sources > runs/confidence_sources.log 2>&1 &

One NTP reference run of SmolLM2-135M-Instruct on the demo's training rows (recipes/smollm2-135m/demo_cpu.yaml through
the recipe's own loader: Alpaca rows, duplicates dropped, `--max_train_examples` of them, max_length 160), over
`--epochs` epochs, records at once:

    checkpoints        the paper's recipe: every row scored at K evenly spaced checkpoints (ConfidenceCallback), an
                       extra forward pass over the data at each
    dynamics           TrainingDynamicsCallback: each row's NLL in the forward of the step that trains it, K = epochs
    dynamics (epoch 1) the same, first epoch only: what the one-run variant (`self_reference_epochs: 1`) splits by
    *, detrended       the dynamics with the drift within an epoch taken out: each NLL minus the mean NLL of the rows
                       trained within +-`--detrend_steps` steps of it (the model is better later in an epoch)
    base model         the untrained model scored once (no reference training at all: the cheapest reference)
    short reference    the reference run's first checkpoint alone: a reference trained for a share of the epochs
                       and scored once (a weaker reference model, in the sense of the paper's §5.1)

and then compares each confidence with the checkpoint one: Spearman's rank correlation, and the share of rows that land
in the same half of the equal split (0.5 is chance). The wall time of the training steps and of the scoring passes is
measured in the same run, so the compute of each pipeline is given both counted (token passes: a training step is a
forward and a backward, about 3 forwards) and timed, relative to NTP training alone (the SFTMix target run is taken to
cost what an NTP run costs; bench/results/trainer-cpu-*.csv has the per-step times of both).

Resumable: the score files of a finished reference run are reused. CSV rows go to `--csv` (one per confidence source,
rewritten at each run).
"""

import argparse
import csv
import datetime
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np

from bench.fidelity import device_label

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
FIELDS = [
    "source",
    "scores_from",
    "k",
    "spearman",
    "same_half",
    "passes_x_ntp",
    "timed_x_ntp",
    "examples",
    "epochs",
    "train_seconds",
    "scoring_seconds",
    "device",
    "date",
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="runs/confidence_sources")
    parser.add_argument("--csv", default=str(RESULTS / f"confidence-sources-cpu-{datetime.date.today()}.csv"))
    parser.add_argument("--max_train_examples", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--checkpoints", type=int, default=5, help="K of the paper's recipe")
    parser.add_argument("--detrend_steps", type=int, default=2)
    parser.add_argument(
        "--agreement_of",
        help="only print the agreement of the training dynamics with the checkpoint scores of a finished reference "
        "run folder holding both (e.g. bench/fidelity.py's runs/fidelity-2ep/reference), and stop",
    )
    return parser.parse_args(argv)


def agreement_of(reference_dir: Path) -> None:
    from sftmix_trl.confidence import aggregate_scores
    from sftmix_trl.data.split import split_by_confidence

    def confidence_of(files) -> dict:
        table = aggregate_scores(files)
        return dict(zip(table.dataset["id"], table.dataset["confidence"]))

    def halves(confidence, ids):
        split = split_by_confidence([confidence[i] for i in ids], ids)
        return {ids[r]: h for h, rows in (("c", split.confident), ("u", split.unconfident)) for r in rows}

    paper = confidence_of([reference_dir / "confidence_scores"])
    ids = list(paper)
    epoch_files = sorted((reference_dir / "training_dynamics").glob("epoch-*.jsonl"))
    for name, files in (("dynamics", epoch_files), ("dynamics, epoch 1 (one run)", epoch_files[:1])):
        confidence = confidence_of(files)
        a, b = halves(paper, ids), halves(confidence, ids)
        same = np.mean([a[i] == b[i] for i in ids if i in a and i in b])
        rho = spearman([paper[i] for i in ids], [confidence[i] for i in ids])
        print(f"{name}: Spearman {rho:.3f}, same half {same:.3f} ({len(ids)} rows)")


def spearman(a, b) -> float:
    ranks = [np.argsort(np.argsort(np.asarray(x, dtype=np.float64), kind="stable"), kind="stable") for x in (a, b)]
    return float(np.corrcoef(ranks[0], ranks[1])[0, 1])


def detrended_ppl(records: list[dict], window: int) -> dict:
    """exp(nll - mean nll of the records trained within +-window steps): the drift within the epoch taken out."""
    steps = np.array([r["step"] for r in records])
    nll = np.array([r["nll"] for r in records])
    trend = np.array([nll[np.abs(steps - s) <= window].mean() for s in steps])
    return {r["id"]: math.exp(n - t) for r, n, t in zip(records, nll, trend)}


def reference_run(args, run_dir: Path) -> dict:
    """The NTP reference run with both recorders, timed; reused when its files are there."""
    timings_file = run_dir / "timings.json"
    if timings_file.is_file():
        return json.loads(timings_file.read_text())
    from trl import SFTTrainer

    from sftmix_trl.assets import resolve_asset
    from sftmix_trl.confidence import ConfidenceCallback, TrainingDynamicsCallback, score_trainer, write_scores
    from sftmix_trl.config import sft_config_from
    from sftmix_trl.recipe import load_train_dataset, parse_recipe_args
    from sftmix_trl.recipe.checkpoints import EvenlySpacedCheckpoints

    recipe, config, model_args = parse_recipe_args(
        [
            "--config", str(REPO / "recipes/smollm2-135m/demo_cpu.yaml"),
            "--output_dir", str(run_dir), "--max_train_examples", str(args.max_train_examples),
            "--num_train_epochs", str(args.epochs),
        ]
    )  # fmt: skip
    model = str(resolve_asset(model_args.model_name_or_path))
    dataset = load_train_dataset(recipe)
    sft = sft_config_from(config, save_strategy="no", disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=sft, train_dataset=dataset)
    timed = {"scoring_seconds": 0.0}

    class TimedConfidence(ConfidenceCallback):
        def on_save(self, *a, **k):
            start = time.perf_counter()
            super().on_save(*a, **k)
            timed["scoring_seconds"] += time.perf_counter() - start

    # the untrained model, scored once, before the dynamics recorder joins (its forwards are eval-mode anyway)
    start = time.perf_counter()
    records = score_trainer(trainer, show_progress=False)
    timed["base_scoring_seconds"] = time.perf_counter() - start
    write_scores(records, run_dir / "base" / "base.jsonl", {"model": model, "dataset": recipe.dataset_name})
    trainer.add_callback(EvenlySpacedCheckpoints(args.checkpoints))
    trainer.add_callback(TimedConfidence(trainer, dataset_name=recipe.dataset_name))
    trainer.add_callback(TrainingDynamicsCallback(trainer, dataset_name=recipe.dataset_name))
    start = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - start
    # the checkpoints themselves are not needed: only their scores
    for checkpoint in run_dir.glob("checkpoint-*"):
        shutil.rmtree(checkpoint)
    timed |= {"train_seconds": total - timed["scoring_seconds"], "examples": len(trainer.train_dataset)}
    timings_file.write_text(json.dumps(timed, indent=2) + "\n")
    return timed


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.agreement_of:
        agreement_of(Path(args.agreement_of))
        return
    run_dir = Path(args.output_dir)
    timed = reference_run(args, run_dir)
    from sftmix_trl.confidence import aggregate_scores, read_scores
    from sftmix_trl.data.split import split_by_confidence

    def confidence_of(files) -> dict:
        table = aggregate_scores(files)
        return dict(zip(table.dataset["id"], table.dataset["confidence"]))

    paper = confidence_of([run_dir / "confidence_scores"])
    epoch_files = sorted((run_dir / "training_dynamics").glob("epoch-*.jsonl"))
    checkpoint_files = sorted(
        (run_dir / "confidence_scores").glob("checkpoint-*.jsonl"), key=lambda p: int(p.stem.split("-")[1])
    )
    first_step = int(checkpoint_files[0].stem.split("-")[1])
    short = "short reference: its first checkpoint only"
    SCORED_BY = {short: "ConfidenceCallback", "base model, no reference training": "score_trainer"}
    sources = {
        short: (confidence_of(checkpoint_files[:1]), 1),
        "dynamics": (confidence_of(epoch_files), len(epoch_files)),
        "dynamics, epoch 1 (one run)": (confidence_of(epoch_files[:1]), 1),
        "base model, no reference training": (confidence_of([run_dir / "base" / "base.jsonl"]), 1),
    }
    detrended = [detrended_ppl(read_scores(p)[0], args.detrend_steps) for p in epoch_files]
    sources["dynamics, detrended"] = ({i: -np.mean([d[i] for d in detrended]) for i in detrended[0]}, len(detrended))
    sources["dynamics, epoch 1, detrended"] = ({i: -v for i, v in detrended[0].items()}, 1)

    ids = list(paper)
    paper_split = split_by_confidence([paper[i] for i in ids], ids)
    paper_half = {
        ids[r]: h for h, rows in (("c", paper_split.confident), ("u", paper_split.unconfident)) for r in rows
    }
    epochs, k = args.epochs, args.checkpoints
    t_epoch = timed["train_seconds"] / epochs  # one NTP epoch
    t_score = timed["scoring_seconds"] / k  # one scoring pass
    # compute relative to NTP alone (E epochs): reference E + scoring passes (1/3 epoch each) + target E
    costs = {
        "checkpoints (paper)": (
            (2 * epochs + k / 3) / epochs,
            (2 * timed["train_seconds"] + timed["scoring_seconds"]),
        ),
        "dynamics": (2.0, 2 * timed["train_seconds"]),
        "dynamics, epoch 1 (one run)": (1.0, timed["train_seconds"]),
        "base model, no reference training": ((epochs + 1 / 3) / epochs, timed["train_seconds"] + t_score),
    }
    # a reference run stopped at the first checkpoint (a share of the epochs), scored there once
    share = first_step / int(checkpoint_files[-1].stem.split("-")[1])  # the last checkpoint ends the run
    costs[short] = (
        (share * epochs + 1 / 3 + epochs) / epochs,
        share * timed["train_seconds"] + t_score + timed["train_seconds"],
    )
    costs["dynamics, detrended"] = costs["dynamics"]
    costs["dynamics, epoch 1, detrended"] = costs["dynamics, epoch 1 (one run)"]
    device = device_label()
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    rows = [
        {
            "source": "checkpoints (paper)",
            "scores_from": "ConfidenceCallback",
            "k": k,
            "spearman": "1.000",
            "same_half": "1.000",
            "passes_x_ntp": f"{costs['checkpoints (paper)'][0]:.2f}",
            "timed_x_ntp": f"{costs['checkpoints (paper)'][1] / timed['train_seconds']:.2f}",
        }
    ]
    for name, (confidence, count) in sources.items():
        split = split_by_confidence([confidence[i] for i in ids], ids)
        half = {ids[r]: h for h, rows_ in (("c", split.confident), ("u", split.unconfident)) for r in rows_}
        shared = [i for i in ids if i in half and i in paper_half]
        passes, seconds = costs[name]
        rows.append(
            {
                "source": name,
                "scores_from": SCORED_BY.get(name, "TrainingDynamicsCallback"),
                "k": count,
                "spearman": f"{spearman([paper[i] for i in ids], [confidence[i] for i in ids]):.3f}",
                "same_half": f"{np.mean([half[i] == paper_half[i] for i in shared]):.3f}",
                "passes_x_ntp": f"{passes:.2f}",
                "timed_x_ntp": f"{seconds / timed['train_seconds']:.2f}",
            }
        )
    for row in rows:
        row |= {
            "examples": timed["examples"],
            "epochs": epochs,
            "train_seconds": f"{timed['train_seconds']:.0f}",
            "scoring_seconds": f"{timed['scoring_seconds']:.0f}",
            "device": device,
            "date": date,
        }
    Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    print(f"one NTP epoch {t_epoch:.0f} s, one scoring pass {t_score:.0f} s")
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
