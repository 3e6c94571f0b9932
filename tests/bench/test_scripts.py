"""The benchmark scripts run end to end at tiny sizes and write the CSV rows they promise (figures are not checked
here: timing claims live in bench/results, never in tests)."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run(module: str, args: list[str]) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", f"bench.{module}", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    csv_path = Path(args[args.index("--csv") + 1])
    with open(csv_path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_kernel_bench_writes_time_memory_and_error_rows(tmp_path):
    rows = _run(
        "kernel",
        ["--shapes", "smollm2-135m", "--tokens", "64", "--impls", "reference", "torch", "--repeats", "1",
         "--warmup", "0", "--check", "--csv", str(tmp_path / "kernel.csv")],
    )  # fmt: skip
    seen = {(row["impl"], row["mode"], row["metric"]) for row in rows}
    for impl in ("reference", "torch"):
        assert {(impl, mode, "time") for mode in ("fwd", "bwd", "full")} <= seen
        assert (impl, "full", "peak_memory") in seen
    # the torch implementation agrees with the reference it is checked against
    errors = [float(row["median"]) for row in rows if row["impl"] == "torch" and row["metric"].startswith("rel_err")]
    assert len(errors) == 3 and max(errors) < 1e-4
    assert all(row["N"] == "64" and row["V"] == "49152" and row["device"] for row in rows)


@pytest.mark.slow
def test_trainer_bench_writes_step_time_memory_and_ratio_rows(tmp_path):
    rows = _run(
        "trainer",
        ["--model", "tiny", "--impls", "torch", "--steps", "1", "--warmup", "0", "--threads", "1",
         "--csv", str(tmp_path / "trainer.csv")],
    )  # fmt: skip
    seen = {(row["trainer"], row["impl"], row["metric"]) for row in rows}
    assert {("sft", "trl", "step_time"), ("sft", "trl", "peak_memory")} <= seen
    assert {
        ("sftmix", "torch", metric) for metric in ("step_time", "peak_memory", "time_ratio", "memory_ratio")
    } <= seen
    assert all(float(row["median"]) > 0 for row in rows)


@pytest.mark.slow
def test_profile_step_counts_the_head_flops_of_each_trainer(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "bench.profile_step", "--model", "tiny", "--batch", "2", "--seq-len", "64"]
    result = subprocess.run(
        [*command, "--json", str(tmp_path / "profile.json")],
        env=env, capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    sft, sftmix = json.loads((tmp_path / "profile.json").read_text())
    # FLOPs, not times, so exact: TRL's chunked head recomputes its logits in backward (logits twice, dH, dW), the
    # fused SFTMix loss computes its gradients with the logits (logits, dH, dW), mixing included
    assert sft["vocab_matmuls"]["units_of_2NDV"] == pytest.approx(4.0)
    assert sftmix["vocab_matmuls"]["units_of_2NDV"] == pytest.approx(3.0)
    assert "step" in result.stdout and sft["wall_seconds"] > 0
