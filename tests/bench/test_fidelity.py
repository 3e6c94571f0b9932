"""bench/fidelity.py's statistics: the per-method means and the paired differences with their 95% t intervals,
against the formulas worked by hand; a partial CSV (a run still going) is summarized from what has landed. Its data:
distinct training rows, and only rows whose prompt leaves room for a response."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

import sftmix_trl.assets

import tiny

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "fidelity.py"
spec = importlib.util.spec_from_file_location("fidelity", SCRIPT)
fidelity = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fidelity)


def rows(values: dict[tuple[str, str], float]) -> list[dict]:
    return [{"method": m, "seed": s, "nll": str(v)} for (m, s), v in values.items()]


def test_interval_is_the_t_interval_of_the_mean():
    mean, half = fidelity.interval([1.0, 2.0, 4.0])
    # mean 7/3, sample sd sqrt(((−4/3)^2 + (−1/3)^2 + (5/3)^2) / 2) = sqrt(7/3), t(0.975, 2) = 4.303
    assert mean == pytest.approx(7 / 3)
    assert half == pytest.approx(4.303 * math.sqrt(7 / 3) / math.sqrt(3))
    assert math.isnan(fidelity.interval([1.0])[1])


def test_differences_are_paired_by_seed():
    values = {("sftmix", "0"): 1.80, ("sftmix", "1"): 1.90, ("sftmix", "2"): 1.70}
    values |= {("ntp", "0"): 1.85, ("ntp", "1"): 1.92, ("ntp", "2"): 1.78}
    values |= {("random", "0"): 1.83, ("base", "-"): 2.00}
    table = fidelity.summarize(rows(values))
    # sftmix - ntp per seed: -0.05, -0.02, -0.08: mean -0.05, sd 0.03, half-width 4.303 * 0.03 / sqrt(3)
    half = 4.303 * 0.03 / math.sqrt(3)
    assert f"| sftmix - ntp | 3 | -0.0500 | [{-0.05 - half:+.4f}, {-0.05 + half:+.4f}] |" in table
    # one seed of random so far: its differences have no interval yet, but are shown
    assert "| random - ntp | 1 | -0.0200 | n/a (one seed) |" in table
    assert "| sftmix - random | 1 | -0.0300 |" in table
    assert "| base | 1 | 2.0000 | n/a (one run) | 2.0000 |" in table
    assert "| ntp | 3 | 1.8500 |" in table


def test_load_data_keeps_distinct_rows_that_leave_room_for_a_response(tmp_path, monkeypatch, llama_dir):
    pairs = list(dict.fromkeys(tiny.make_pairs(64)))[:12]  # distinct
    alpaca = [{"instruction": p, "input": "", "output": r} for p, r in pairs]
    alpaca.insert(1, dict(alpaca[0]))  # an exact duplicate: dropped
    alpaca.insert(2, {"instruction": "long " * 200, "input": "", "output": "x"})  # no room for a response: dropped
    held_out = [{"instruction": p, "output": r, "generator": "ref", "dataset": "tiny"} for p, r in pairs]
    for name, data in (("alpaca.json", alpaca), ("alpacaeval.json", held_out)):
        (tmp_path / name).write_text(json.dumps(data))
    monkeypatch.setattr(sftmix_trl.assets, "alpaca_demo_path", lambda: tmp_path / "alpaca.json")
    monkeypatch.setattr(sftmix_trl.assets, "alpacaeval_path", lambda: tmp_path / "alpacaeval.json")
    args = fidelity.parse_args(["--train_rows", "8", "--eval_rows", "4", "--max_length", "64"])

    train, evaluation = fidelity.load_data(args, str(llama_dir))

    assert [row["prompt"][0]["content"] for row in train] == [p for p, _ in pairs[:8]]
    assert len(set(train["id"])) == 8
    assert [row["completion"][0]["content"] for row in evaluation] == [r for _, r in pairs[:4]]
    with pytest.raises(ValueError, match="Only 12 Alpaca rows fit max_length 64, fewer than 16"):
        fidelity.load_data(fidelity.parse_args(["--train_rows", "16", "--max_length", "64"]), str(llama_dir))


def test_the_cheap_confidence_arms_and_the_raised_learning_rate_arm_are_compared_with_ntp_and_sftmix():
    values = {("ntp", "0"): 1.80, ("ntp", "1"): 1.90, ("sftmix", "0"): 1.78, ("sftmix", "1"): 1.86}
    values |= {("onerun", "0"): 1.79, ("onerun", "1"): 1.87, ("ntp_lr", "0"): 1.79, ("ntp_lr", "1"): 1.88}
    values |= {("dynamics", "0"): 1.77}
    table = fidelity.summarize(rows(values))
    # onerun - ntp per seed: -0.01, -0.03; mean -0.02, sd sqrt(2) * 0.01, half-width 12.706 * 0.01
    half = 12.706 * math.sqrt(2) * 0.01 / math.sqrt(2)
    assert f"| onerun - ntp | 2 | -0.0200 | [{-0.02 - half:+.4f}, {-0.02 + half:+.4f}] |" in table
    assert "| ntp_lr - ntp | 2 | -0.0150 |" in table
    assert "| sftmix - ntp_lr | 2 | -0.0150 |" in table  # -0.01, -0.02
    assert "| onerun - sftmix | 2 | +0.0100 |" in table
    assert "| dynamics - ntp | 1 | -0.0300 | n/a (one seed) |" in table
    assert "| ntp_lr | 2 | 1.8350 |" in table and "| onerun | 2 | 1.8300 |" in table


def test_the_raised_learning_rate_arm_scales_the_learning_rate_by_one_plus_mixup_coef():
    args = fidelity.parse_args(["--learning_rate", "5e-5", "--mixup_coef", "0.2"])
    assert fidelity.learning_rate(args, "ntp_lr") == pytest.approx(6e-5)
    assert [fidelity.learning_rate(args, m) for m in ("ntp", "sftmix", "onerun", "dynamics")] == [5e-5] * 4
    config = fidelity.training_config(args, "out", seed=0, learning_rate=fidelity.learning_rate(args, "ntp_lr"))
    assert config.learning_rate == pytest.approx(6e-5) and config.mixup_coef == 0.2
