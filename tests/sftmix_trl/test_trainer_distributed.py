"""Two CPU processes (gloo) through `accelerate launch` with the recipes' own launch configs: DDP, FSDP2 (default
wrapping, and the LM head in an FSDP unit of its own), DeepSpeed ZeRO-3, and two nodes on one host. Each run must
train as one process that sees both ranks' micro-batches side by side: every step's loss and the final parameters."""

import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sftmix_helpers import CONFIGS, CPU_OVERRIDES, free_port, launch_env

SCRIPT = Path(__file__).parent / "scripts" / "sftmix_distributed_run.py"

# every test here starts processes that each want a core: one at a time on a pytest-xdist worker
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("distributed")]


def launch_command(config: str, output_dir: Path, *launch_args: str, model: str = "llama") -> list[str]:
    """`accelerate launch --config_file recipes/accelerate_configs/<config>` of the training script, on CPU."""
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config), *CPU_OVERRIDES,
        *launch_args,
        str(SCRIPT), "--output_dir", str(output_dir), "--per_device_batch_size", "4", "--model", model,
    ]  # fmt: skip


def launch(config: str, output_dir: Path, *launch_args: str, model: str = "llama") -> list[dict]:
    """Two CPU processes on this host; their records."""
    output_dir.mkdir()
    command = launch_command(config, output_dir, "--main_process_port", str(free_port()), *launch_args, model=model)
    result = subprocess.run(command, env=launch_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-6000:]
    return [torch.load(output_dir / f"rank{k}.pt") for k in (0, 1)]


_single_process_runs: dict[str, dict] = {}


def single_process(model: str, tmp_path: Path) -> dict:
    """The reference: one process, micro-batches of 8 = the two ranks' micro-batches of 4 side by side."""
    if model not in _single_process_runs:
        spec = importlib.util.spec_from_file_location("sftmix_distributed_run", SCRIPT)
        script = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(script)
        (tmp_path / "single").mkdir()
        script.train_and_save(str(tmp_path / "single"), per_device_batch_size=8, model=model)
        _single_process_runs[model] = torch.load(tmp_path / "single" / "rank0.pt")
    return _single_process_runs[model]


def assert_trains_as_one_process(ranks: list[dict], single: dict) -> None:
    rank0, rank1 = ranks
    assert rank0["num_processes"] == rank1["num_processes"] == 2
    assert len(rank0["seen"]) == len(rank1["seen"]) == len(single["seen"]) == 4
    for (rows0, halves0), (rows1, halves1), (rows, halves) in zip(rank0["seen"], rank1["seen"], single["seen"]):
        assert halves0 == halves1 == [0, 0, 1, 1] and halves == [0] * 4 + [1] * 4
        assert rows == rows0[:2] + rows1[:2] + rows0[2:] + rows1[2:], "same pairs as the two ranks together"
    loss_difference = (torch.tensor(rank0["losses"]) - torch.tensor(single["losses"])).abs().max().item()
    param_difference = max((p - single["params"][n]).abs().max().item() for n, p in rank0["params"].items())
    print(f"largest difference from one process: loss {loss_difference:.2e}, parameter {param_difference:.2e}")
    torch.testing.assert_close(torch.tensor(rank0["losses"]), torch.tensor(single["losses"]), rtol=1e-4, atol=1e-6)
    # Adam's first steps magnify float-rounding differences of near-zero gradients up to ~lr, hence atol 2e-5
    for name, param in rank0["params"].items():
        assert torch.equal(param, rank1["params"][name]), f"ranks disagree on {name}"
        torch.testing.assert_close(
            param, single["params"][name], rtol=1e-4, atol=2e-5, msg=lambda m, name=name: f"{name}: {m}"
        )


def test_ddp_matches_one_process(tmp_path):
    ranks = launch("cpu.yaml", tmp_path / "ddp")
    assert ranks[0]["distributed_type"] == "DistributedType.MULTI_CPU" and not ranks[0]["sharded"]
    assert_trains_as_one_process(ranks, single_process("llama", tmp_path))


@pytest.mark.parametrize("model", ["llama", "qwen2"], ids=["untied", "tied"])
def test_fsdp2_default_wrapping_matches_one_process(tmp_path, model):
    ranks = launch("fsdp2.yaml", tmp_path / "fsdp2", model=model)
    head = "model.embed_tokens.weight" if model == "qwen2" else "lm_head.weight"
    for rank in ranks:
        assert rank["distributed_type"] == "DistributedType.FSDP"
        # really sharded: every parameter a DTensor of which each rank holds a part, the head included
        assert set(rank["sharded"]) == set(rank["params"]) and head in rank["sharded"]
        # accelerate puts the head with the final norm in a unit that stays unsharded from the norm's forward on:
        # the loss reads a plain tensor and gathers nothing itself
        assert rank["head_gathers"] == 0
    assert_trains_as_one_process(ranks, single_process(model, tmp_path))


def test_fsdp2_lm_head_in_its_own_unit_matches_one_process(tmp_path):
    # every nn.Linear in a unit of its own, the head included: the head's unit is never unsharded, since the loss
    # reads its weight without calling it
    ranks = launch("fsdp2.yaml", tmp_path / "fsdp2_own_unit", "--fsdp_transformer_layer_cls_to_wrap", "Linear")
    for rank in ranks:
        assert rank["distributed_type"] == "DistributedType.FSDP"
        assert set(rank["sharded"]) == set(rank["params"])
        # the loss reads the sharded DTensor head and gathers it once in each of the 4 steps; the head's own forward,
        # where FSDP would gather it too, never runs
        assert rank["head_gathers"] == 4 and rank["head_forwards"] == 0
    assert_trains_as_one_process(ranks, single_process("llama", tmp_path))


def test_deepspeed_zero3_matches_one_process(tmp_path):
    # the first run on a machine compiles DeepSpeed's CPU communication op (cached under TORCH_EXTENSIONS_DIR)
    ranks = launch("deepspeed_zero3.yaml", tmp_path / "zero3")
    for rank in ranks:
        assert rank["distributed_type"] == "DistributedType.DEEPSPEED"
        # really partitioned: each rank holds a part of every parameter, so the loss had to gather the head
        assert set(rank["sharded"]) == set(rank["params"])
    assert_trains_as_one_process(ranks, single_process("llama", tmp_path))


def test_two_nodes_on_one_host_match_one_process(tmp_path):
    # the multi-node path: two machines of one process each, machine ranks 0 and 1, the main one on 127.0.0.1
    output_dir = tmp_path / "two_nodes"
    output_dir.mkdir()
    main_node = ["--num_machines", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port())]
    nodes = [
        subprocess.Popen(
            launch_command("fsdp2.yaml", output_dir, *main_node, "--machine_rank", str(machine_rank)),
            env=launch_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group, the launcher and the workers it starts
        )
        for machine_rank in (0, 1)
    ]
    try:
        for node in nodes:
            stdout, stderr = node.communicate(timeout=600)
            assert node.returncode == 0, stdout[-2000:] + stderr[-6000:]
    finally:
        for node in nodes:  # a node left waiting for the other one
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
    ranks = [torch.load(output_dir / f"rank{k}.pt") for k in (0, 1)]
    # one process on each machine
    assert [(rank["node_rank"], rank["local_world_size"]) for rank in ranks] == [(0, 1), (1, 1)]
    for rank in ranks:
        assert rank["distributed_type"] == "DistributedType.FSDP" and set(rank["sharded"]) == set(rank["params"])
    assert_trains_as_one_process(ranks, single_process("llama", tmp_path))
