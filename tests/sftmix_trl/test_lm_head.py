"""`whole_lm_head` on a DTensor head, in a one-process gloo group (its own subprocess, so that no process group
outlives the test): the head comes back whole with its gradient on the shard, and a head sharded over a
tensor-parallel mesh dimension is refused. The two-process gradients are checked in test_trainer_distributed.py."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import pytest, torch, torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from sftmix_trl.lm_head import whole_lm_head

    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    for dim_name in ("dp_shard", "tp"):
        head = torch.nn.Linear(4, 6, bias=False)
        expected = head.weight.detach().clone()
        mesh = init_device_mesh("cpu", (1,), mesh_dim_names=(dim_name,))
        head.weight = torch.nn.Parameter(distribute_tensor(head.weight.detach(), mesh, [Shard(0)]))
        if dim_name == "tp":
            with pytest.raises(ValueError, match="tensor-parallel mesh dimension"), whole_lm_head(head):
                pass
            continue
        with whole_lm_head(head) as (weight, bias):
            assert bias is None and type(weight) is torch.Tensor and torch.equal(weight, expected)
            (weight * torch.arange(6.0)[:, None]).sum().backward()
        assert torch.equal(head.weight.grad.full_tensor(), torch.arange(6.0)[:, None].expand(6, 4))
    dist.destroy_process_group()
    print("ok")
""")


def test_whole_lm_head_on_a_dtensor_head():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-4000:]
