"""`train_one_run` on two CPU processes (gloo, DDP through `accelerate launch`), stopped after the switch (step 3 of
4: one SFTMix step done) and resumed by a second launch, ends with the parameters of one uninterrupted process that
sees both ranks' micro-batches side by side (micro-batches of 8 = two ranks of 4)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sftmix_helpers import CONFIGS, CPU_OVERRIDES, free_port, launch_env

SCRIPT = Path(__file__).parent / "scripts" / "one_run_distributed_run.py"

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("distributed")]


def launch(output_dir: Path, *extra: str) -> None:
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "ddp.yaml"), *CPU_OVERRIDES,
        "--main_process_port", str(free_port()),
        str(SCRIPT), "--output_dir", str(output_dir), "--per_device_batch_size", "4", *extra,
    ]  # fmt: skip
    result = subprocess.run(command, env=launch_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-6000:]


def test_two_ranks_stopped_after_the_switch_and_resumed_train_as_one_process(tmp_path):
    launch(tmp_path / "ddp", "--stop_at", "3")
    assert (tmp_path / "ddp" / "confidence" / "switch.json").is_file()
    assert not (tmp_path / "ddp" / "params.pt").exists()
    launch(tmp_path / "ddp")

    spec = importlib.util.spec_from_file_location("one_run_distributed_run", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.train(str(tmp_path / "single"), per_device_batch_size=8)

    ddp, single = (torch.load(tmp_path / name / "params.pt") for name in ("ddp", "single"))
    assert ddp["global_step"] == single["global_step"] == 4
    for name, param in ddp["params"].items():
        # Adam's first steps magnify float-rounding differences of near-zero gradients up to ~lr (as in
        # test_trainer_distributed)
        torch.testing.assert_close(param, single["params"][name], rtol=1e-4, atol=2e-5, msg=name)
