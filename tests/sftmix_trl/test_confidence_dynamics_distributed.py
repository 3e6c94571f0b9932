"""TrainingDynamicsCallback on two CPU processes (gloo, DDP through `accelerate launch`): the main process writes one
file per epoch with every rank's examples, and each record equals one process's run with both ranks' micro-batches
side by side (micro-batches of 8 = two ranks of 4: the same examples at the same step, the same model before it)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from sftmix_helpers import CONFIGS, CPU_OVERRIDES, free_port, launch_env

from sftmix_trl.confidence import read_scores

SCRIPT = Path(__file__).parent / "scripts" / "dynamics_distributed_run.py"

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("distributed")]


def test_two_ranks_record_what_one_process_records(tmp_path):
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "ddp.yaml"), *CPU_OVERRIDES,
        "--main_process_port", str(free_port()),
        str(SCRIPT), "--output_dir", str(tmp_path / "ddp"), "--per_device_batch_size", "4",
    ]  # fmt: skip
    result = subprocess.run(command, env=launch_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-6000:]

    spec = importlib.util.spec_from_file_location("dynamics_distributed_run", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.train(str(tmp_path / "single"), per_device_batch_size=8)

    for name in ("epoch-001.jsonl", "epoch-002.jsonl"):
        ddp, _ = read_scores(tmp_path / "ddp" / "training_dynamics" / name)
        single, _ = read_scores(tmp_path / "single" / "training_dynamics" / name)
        assert len(ddp) == 16 and [r["id"] for r in ddp] == [r["id"] for r in single]
        for a, b in zip(ddp, single):
            assert a["step"] == b["step"] and a["num_tokens"] == b["num_tokens"]
            assert a["nll"] == pytest.approx(b["nll"], rel=1e-4), a["id"]
