"""The README's table "What SFTMix costs and how to pay less", rendered from committed CSV rows.

    python -m bench.cost_table            # prints the Markdown table

Agreement and compute come from `bench.confidence_sources` (one reference run on the demo's data recording every
confidence source; `--agreement`), the held-out effect from `bench.fidelity` (every arm at the same epochs, paired by
seed; `--held_out`). tests/test_readme.py checks that the README shows what this prints.
"""

import argparse
import csv
import math
from pathlib import Path

from bench.fidelity import interval

RESULTS = Path(__file__).resolve().parent / "results"
AGREEMENT = RESULTS / "confidence-sources-cpu-2026-12-06.csv"
HELD_OUT = RESULTS / "fidelity-cpu-2026-12-06-2ep.csv"

# pipeline -> (its row in the agreement CSV, its arm in the held-out CSV, compute x NTP when the agreement CSV has no
# row: the arms that train once, on the same schedule as NTP)
PIPELINES = {
    "NTP alone": (None, "ntp", 1.0),
    "the paper's: a reference run, K checkpoints scored": ("checkpoints (paper)", "sftmix", None),
    "training dynamics: the reference run's own steps": ("dynamics", "dynamics", None),
    "one run: its first epoch is its own reference": ("dynamics, epoch 1 (one run)", "onerun", None),
    "a shorter reference: its first checkpoint, scored once": (
        "short reference: its first checkpoint only",
        None,
        None,
    ),
    "no reference: the base model, scored once": ("base model, no reference training", None, None),
    "a random split (the paper's ablation)": (None, "random", 1.0),
    "NTP at the learning rate x (1 + mu)": (None, "ntp_lr", 1.0),
}


def read(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def held_out_difference(nll: dict, method: str) -> str:
    """The mean over seeds of `method`'s held-out NLL minus NTP's, paired by seed, with its 95% t interval."""
    seeds = sorted({s for m, s in nll if m == method} & {s for m, s in nll if m == "ntp"})
    if not seeds:
        return "not measured"
    mean, half = interval([nll[method, s] - nll["ntp", s] for s in seeds])
    if not math.isfinite(half):
        return f"{mean:+.4f} (1 seed)"
    return f"{mean:+.4f} [{mean - half:+.4f}, {mean + half:+.4f}] ({len(seeds)} seeds)"


def render(agreement_rows: list[dict], held_out_rows: list[dict]) -> str:
    agreement = {row["source"]: row for row in agreement_rows}
    nll = {(row["method"], row["seed"]): float(row["nll"]) for row in held_out_rows}
    ntp_seeds = [v for (m, _), v in nll.items() if m == "ntp"]
    lines = [
        "| pipeline: confidence from | compute x NTP (passes) | x NTP (timed) | Spearman | same half "
        "| held-out NLL - NTP [95%] |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for pipeline, (source, method, compute) in PIPELINES.items():
        row = agreement.get(source, {})
        passes = row.get("passes_x_ntp") or f"{compute:.2f}"
        timed = row.get("timed_x_ntp") or f"{compute:.2f}"
        spearman = row.get("spearman", "")
        same_half = row.get("same_half", "0.5 (chance)" if method == "random" else "")
        if method == "ntp":
            effect = f"0 (NLL {sum(ntp_seeds) / len(ntp_seeds):.4f}, {len(ntp_seeds)} seeds)"
        else:
            effect = held_out_difference(nll, method) if method else "not measured"
        lines.append(f"| {pipeline} | {passes} | {timed} | {spearman} | {same_half} | {effect} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agreement", type=Path, default=AGREEMENT, help="rows of bench.confidence_sources")
    parser.add_argument("--held_out", type=Path, default=HELD_OUT, help="rows of bench.fidelity")
    args = parser.parse_args(argv)
    print(render(read(args.agreement), read(args.held_out)))


if __name__ == "__main__":
    main()
