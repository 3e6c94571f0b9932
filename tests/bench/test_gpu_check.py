"""bench/gpu_check.sh's plumbing, without a GPU: its dry run lays the package out without installing it, imports the
kernels, runs the preflight and the per-phase timings (under the interpreter), collects the `gpu` tests with TRL,
datasets and transformers unimportable, and writes the benchmark CSV and the summary under $OUT; one failing
implementation leaves the others' rows; the summary prices the device the rows ran on. The GPU figures themselves
are not checked here (no timing claims in tests)."""

import csv
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from bench import gpu_check_summary
from bench import kernel as kernel_bench

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu_check.sh"


def test_script_parses_and_refuses_unknown_steps():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    result = subprocess.run(["bash", str(SCRIPT), "--steps", "bench,warp"], capture_output=True, text=True)
    assert result.returncode == 2 and "unknown step 'warp'" in result.stderr


@pytest.mark.slow
def test_dry_run_imports_without_trl_collects_gpu_tests_and_writes_results(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", "--steps", "environment,bench,phases,tests"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    summary = (tmp_path / "summary.txt").read_text()
    for step in ("environment", "preflight", "bench-smollm2-135m", "phases-smollm2-135m", "gpu-tests"):
        assert f"step {step}: ok" in summary
    log = (tmp_path / "gpu-check.log").read_text()
    # the kernels came from the temporary layout, not from this checkout's editable install
    assert "without trl, datasets or transformers" in log
    assert "preflight: triton 3" in log and "launch on cpu: ok" in log and "out_dtype=float32) with" in log
    imported_from = next(line for line in log.splitlines() if line.startswith("sftmix_trl.kernels imports from"))
    assert str(REPO / "kernels") not in imported_from and "/site/sftmix_trl/kernels/" in imported_from
    # every gpu-marked kernel test collects without tests/conftest.py and without TRL
    tests = ET.parse(tmp_path / "gpu-tests.xml").getroot().iter("testsuite")
    assert sum(int(suite.get("errors")) for suite in tests) == 0
    collected = re.search(r"(\d+)(?:/\d+)? tests? collected", log)
    assert collected and int(collected.group(1)) >= 10
    with open(tmp_path / "kernel.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    seen = {(row["impl"], row["metric"]) for row in rows}
    assert {("reference", "time"), ("torch", "time"), ("torch", "peak_memory"), ("torch", "rel_err_loss")} <= seen
    assert ("torch", "peak_memory_extra") in seen
    # every phase of a rowchunk chunk, measured and modelled, block_v 128 and 256 (fp32 on CPU)
    for impl in ("Z = H W^T", "dH = G W", "dW += G^T H", "stats + G"):
        assert (impl, "model_time") in seen, impl
    assert {"stats + G m16-v128-w4-s1", "stats + G m16-v256-w4-s1"} <= {impl for impl, _ in seen}
    assert "MEASURED on" in summary and "priced as H200 (device" in summary
    assert "MODEL ESTIMATE, H200, smollm2-135m, N=64, rowchunk" in summary and "PHASES N=16" in summary


def test_summary_reports_the_bars_from_the_medians(tmp_path):
    fields = ("kernel", "impl", "mode", "metric", "unit", "N", "D", "V", "dtype", "median", "p20", "p80", "device")
    medians = {("rowchunk", "time"): 60.0, ("rowchunk_nomix", "time"): 50.0, ("reference", "time"): 120.0}
    medians.update({("rowchunk", "peak_memory"): 1000.0, ("reference", "peak_memory"): 20000.0})
    csv_path = tmp_path / "kernel.csv"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for (impl, metric), median in medians.items():
            row = dict(kernel="k", impl=impl, mode="full", metric=metric, unit="ms", N=8192, D=4096, V=128256)
            writer.writerow({**row, "dtype": "bf16", "median": median, "p20": median, "p80": median, "device": "GPU"})
    text = gpu_check_summary.summarize(str(csv_path), "abc1234")
    floor_ms = 6 * 8192 * 4096 * 128256 / 790e12 * 1e3
    assert f"floor at 790 TFLOP/s = {floor_ms:.2f} ms" in text
    assert "with mixing 1.200x rowchunk_nomix" in text
    assert f"{60.0 / floor_ms:.2f}x the floor (bar <= 1.5)" in text
    assert "triton: no triton rows" in text
    assert "2.00x faster than reference" in text
    assert f"{60.0 / floor_ms:.2f}x the floor" in text
    assert "memory 20.0x below reference" in text
    for impl in ("rowchunk", "triton", "torch", "eager"):
        assert f"MODEL ESTIMATE, H200, llama-3-8b, N=8192, {impl}" in text


def test_summary_prices_the_device_it_ran_on_and_lists_errors(tmp_path):
    fields = ("kernel", "impl", "mode", "metric", "unit", "N", "D", "V", "dtype", "median", "p20", "p80", "device")
    fields += ("note",)
    csv_path = tmp_path / "kernel.csv"
    rows = [("rowchunk", "error", "nan", "RuntimeError: boom"), ("torch", "time", "70", "")]
    rows += [("torch", "peak_memory", "3000", ""), ("torch", "peak_memory_extra", "900", "")]
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for impl, metric, median, note in rows:
            row = dict(kernel="k", impl=impl, mode="full", metric=metric, unit="ms", N=8192, D=4096, V=128256)
            row.update(dtype="bf16", median=median, p20=median, p80=median, device="NVIDIA H100 80GB HBM3", note=note)
            writer.writerow(row)
    text = gpu_check_summary.summarize(str(csv_path))
    floor_ms = 6 * 8192 * 4096 * 128256 / 989e12 * 1e3
    assert "priced as H100" in text and f"floor at 989 TFLOP/s = {floor_ms:.2f} ms" in text
    assert "rowchunk ERROR RuntimeError: boom" in text
    assert f"{'torch':>14} {70.0:9.2f} {70.0 / floor_ms:8.2f} {'3000':>9} {'900':>9}" in text
    assert "MODEL ESTIMATE, H100, llama-3-8b, N=8192, rowchunk" in text


def test_a_failing_implementation_leaves_the_others_rows(tmp_path, monkeypatch):
    real = kernel_bench.loss_function

    def failing_torch(impl, inputs):
        if impl == "torch":
            raise RuntimeError("simulated failure of one backend")
        return real(impl, inputs)

    monkeypatch.setattr(kernel_bench, "loss_function", failing_torch)
    csv_path = tmp_path / "kernel.csv"
    argv = ["--device", "cpu", "--dtype", "fp32", "--shapes", "smollm2-135m", "--tokens", "8", "--repeats", "1"]
    argv += [
        "--warmup",
        "0",
        "--modes",
        "full",
        "--no-memory",
        "--impls",
        "torch",
        "reference",
        "--csv",
        str(csv_path),
    ]
    kernel_bench.main(argv)
    with open(csv_path, newline="") as handle:
        rows = {(row["impl"], row["metric"]): row for row in csv.DictReader(handle)}
    assert rows[("torch", "error")]["note"] == "RuntimeError: simulated failure of one backend"
    assert float(rows[("reference", "time")]["median"]) > 0
