"""Issue #11's bars on the rows bench/kernel.py measured, beside the cost model's estimate for the same shapes.

    python -m bench.gpu_check_summary RESULTS.csv [--commit SHA]

Priced for the device the rows were measured on (bench/kernel_model.py's H100 or H200, by the device name; any
other device as an H200, and said so). For each measured shape: every implementation's full-step time (median), its
ratio to the 6 N D V floor at that device's floor rate (H100 989, H200 790 TFLOP/s, the bf16 rate measured on the
lent H200s), its peak memory with and without the `.grad` tensors (the second is docs/performance.md's accounting) and
relative errors against the reference, or the error it raised; then rowchunk and triton against the bars (with mixing
within 1.15x of without, faster than the reference, within 1.5x / 2x of the floor, memory at least 10x below the
reference), the MODEL ESTIMATE of bench/kernel_model.py for that device, and the per-phase times of `--phases` beside
the model's. Only the Python standard library and the model: it runs wherever the benchmark ran.
"""

import argparse
import csv
import os
import sys
from collections import defaultdict

from . import kernel_model

IMPLS = ("rowchunk", "rowchunk_nomix", "triton", "triton_nomix", "torch", "liger", "compile", "reference")


def read_medians(csv_path):
    """({(N, D, V): {(impl, metric): median, or the note of an error row}}, device, phase rows) of a
    bench/kernel.py CSV (empty when it does not exist)."""
    shapes, device, phases = defaultdict(dict), "no rows", defaultdict(list)
    if not os.path.exists(csv_path):
        return shapes, device, phases
    with open(csv_path, newline="") as handle:
        for row in csv.DictReader(handle):
            shape = (int(row["N"]), int(row["D"]), int(row["V"]))
            device = row["device"]
            if row["mode"] == "phase":
                phases[shape].append(row)
            elif row["metric"] == "error":
                shapes[shape][(row["impl"], "error")] = row.get("note") or "error"
            else:
                shapes[shape][(row["impl"], row["metric"])] = float(row["median"])
    return shapes, device, phases


def model_device(device: str):
    """(the cost model's device for a measured device name, a note when it is not one of the model's)."""
    for name in kernel_model.DEVICES:
        if name in device:
            return name, ""
    return "H200", f" (device {device!r} is not in the cost model: priced as an H200)"


def bar_checks(got, floor_ms, impl="rowchunk", floor_bar=1.5):
    """The bars for ``impl`` as text (issue #21 for rowchunk: 1.5x the floor; issue #11 for triton: 2x): mixing
    within 1.15x of no mixing, faster than the reference, the floor, 10x less memory; only the measured ones."""
    t, t_nomix, t_ref = (got.get((name, "time")) for name in (impl, f"{impl}_nomix", "reference"))
    m, m_ref = got.get((impl, "peak_memory")), got.get(("reference", "peak_memory"))
    checks = []
    if t and t_nomix:
        checks.append(f"with mixing {t / t_nomix:.3f}x {impl}_nomix (bar <= 1.15)")
    if t and t_ref:
        checks.append(f"{t_ref / t:.2f}x faster than reference (bar > 1)")
    if t:
        checks.append(f"{t / floor_ms:.2f}x the floor (bar <= {floor_bar:g})")
    if m is not None and m_ref:
        checks.append(f"memory {m_ref / max(m, 1e-9):.1f}x below reference (bar >= 10)")
    return "; ".join(checks) if checks else f"no {impl} rows"


def summarize(csv_path, commit="unknown"):
    shapes, device, phases = read_medians(csv_path)
    priced_as, note = model_device(device)
    floor_flops = kernel_model.DEVICES[priced_as].floor_flops
    lines = [
        f"MEASURED on {device} (commit {commit}): medians of the timed repeats, python -m bench.kernel --modes full"
    ]
    lines.append(f"priced as {priced_as}{note}")
    for (n, d, v), got in shapes.items():
        floor_ms = 6 * n * d * v / floor_flops * 1e3
        lines.append(f"N={n} D={d} V={v}: 6NDV floor at {floor_flops / 1e12:.0f} TFLOP/s = {floor_ms:.2f} ms")
        header = (
            f"{'impl':>14} {'full ms':>9} {'x floor':>8} {'peak MiB':>9} {'w/o .grad':>9} {'rel err loss/dH/dW':>26}"
        )
        lines.append(header)
        for impl in IMPLS:
            time_ms, peak = got.get((impl, "time")), got.get((impl, "peak_memory"))
            extra, error = got.get((impl, "peak_memory_extra")), got.get((impl, "error"))
            if error is not None:
                lines.append(f"{impl:>14} ERROR {error}")
            if time_ms is None and peak is None:
                continue
            errors = [got.get((impl, f"rel_err_{name}")) for name in ("loss", "grad_hidden", "grad_weight")]
            errors = "/".join("-" if error is None else f"{error:.1e}" for error in errors)
            timing = f"{time_ms:9.2f} {time_ms / floor_ms:8.2f}" if time_ms is not None else f"{'-':>9} {'-':>8}"
            memory = "-" if peak is None else f"{peak:.0f}"
            memory_extra = "-" if extra is None else f"{extra:.0f}"
            lines.append(f"{impl:>14} {timing} {memory:>9} {memory_extra:>9} {errors:>26}")
        lines.append("rowchunk: " + bar_checks(got, floor_ms))
        lines.append("triton: " + bar_checks(got, floor_ms, "triton", 2.0))
        for head, (hidden_size, vocab_size, _) in kernel_model.HEADS.items():
            if (hidden_size, vocab_size) != (d, v) or n % 2:
                continue
            for impl, cost in kernel_model.COSTS.items():
                row = cost(head, n, priced_as).row()
                lines.append(
                    f"MODEL ESTIMATE, {priced_as}, {head}, N={n}, {impl}: {row['time_ms']:.1f} ms, "
                    f"{row['x_floor']:.2f}x the floor, extra memory {row['extra_gb']:.2f} GB"
                )
    for (n, d, v), rows in phases.items():
        lines.append(
            f"PHASES N={n} D={d} V={v} (python -m bench.kernel --phases; model: bench.kernel_model, {priced_as})"
        )
        for row in rows:
            value = "-" if row["median"] == "nan" else f"{float(row['median']):.4g} {row['unit']}"
            lines.append(f"  {row['impl']:>30} {row['metric']:>10} {value:>14}  {row.get('note') or ''}".rstrip())
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", help="a CSV written by bench/kernel.py")
    parser.add_argument("--commit", default="unknown")
    args = parser.parse_args(argv)
    print(summarize(args.csv, args.commit))


if __name__ == "__main__":
    sys.exit(main())
