"""Two CPU processes through `accelerate launch` (gloo): balanced micro-batches on every rank, ranks in sync, and the
same training as one process that sees both ranks' micro-batches side by side."""

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).parent / "scripts" / "sftmix_ddp_run.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_stay_in_sync_and_match_one_process(tmp_path):
    ddp_dir, single_dir = tmp_path / "ddp", tmp_path / "single"
    ddp_dir.mkdir(), single_dir.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)  # the torch implementation runs here; nothing to interpret
    # `--multi_gpu` makes accelerate start the processes through torchrun; the training config's `use_cpu=True`
    # makes them join a gloo group on the CPU (`--cpu` would start a single process)
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()),
        str(SCRIPT), "--output_dir", str(ddp_dir), "--per_device_batch_size", "4",
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]

    # the reference: one process, micro-batches of 8 = the two ranks' micro-batches of 4 side by side
    spec = importlib.util.spec_from_file_location("sftmix_ddp_run", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.train_and_save(str(single_dir), per_device_batch_size=8)

    rank0, rank1 = (torch.load(ddp_dir / f"rank{k}.pt") for k in (0, 1))
    single = torch.load(single_dir / "rank0.pt")
    assert rank0["num_processes"] == rank1["num_processes"] == 2
    assert len(rank0["seen"]) == len(rank1["seen"]) == len(single["seen"]) == 4
    for (rows0, halves0), (rows1, halves1), (rows, halves) in zip(rank0["seen"], rank1["seen"], single["seen"]):
        assert halves0 == halves1 == [0, 0, 1, 1] and halves == [0] * 4 + [1] * 4
        assert rows == rows0[:2] + rows1[:2] + rows0[2:] + rows1[2:], "same pairs as the two ranks together"
    # Adam's first steps magnify float-rounding differences of near-zero gradients up to ~lr, hence atol 2e-5
    for name, param in rank0["params"].items():
        assert torch.equal(param, rank1["params"][name]), f"ranks disagree on {name}"
        torch.testing.assert_close(
            param, single["params"][name], rtol=1e-4, atol=2e-5, msg=lambda m, name=name: f"{name}: {m}"
        )
    torch.testing.assert_close(torch.tensor(rank0["losses"]), torch.tensor(single["losses"]), rtol=1e-5, atol=1e-6)
