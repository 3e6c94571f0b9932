"""The LM head's weight and bias, whole, for the fused loss, however the model is distributed.

The fused SFTMix loss reads the head's parameters directly and never calls the head module, so the hooks that gather
a sharded module's parameters for its own forward do not fire for it. `whole_lm_head` gathers them for the call:

- DeepSpeed ZeRO-3: the partitioned parameters are gathered for the duration of the block (TRL's
  `maybe_gather_lm_head_ctx`). The fused loss computes its gradients in its forward, so its backward never reads the
  weight again and nothing has to be registered with DeepSpeed for the backward.
- FSDP2 with the head in a unit that is sharded at this point (a unit of its own, say): the DTensor is all-gathered
  once. Each rank's gradient of the gathered weight covers its own tokens only; it is the mean over the ranks that
  one process with every rank's batch computes (each rank's loss is normalized as its share of the global mean), so
  the backward reduce-scatters the ranks' mean into each rank's shard, as FSDP2 does for the parameters it gathers.
- anything else (one process, DDP, FSDP2 with the head in a unit its own hooks have already unsharded): the
  parameters as they are.
"""

import contextlib
from collections.abc import Iterator

import torch
from torch.distributed.tensor import DTensor, Partial
from trl.trainer.utils import maybe_gather_lm_head_ctx


@contextlib.contextmanager
def whole_lm_head(lm_head: torch.nn.Module) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """`(weight, bias)` of `lm_head` as whole tensors for the block, with gradients that flow back to the parameters
    (bias None when the head has none). Call it inside the wrapped model's forward, where ZeRO-3 and FSDP2 hooks are
    armed, and run the loss inside the block."""
    weight, bias = lm_head.weight, lm_head.bias
    with maybe_gather_lm_head_ctx(weight, bias):
        if isinstance(weight, DTensor):
            weight = _gather_data_parallel(weight)
            bias = _gather_data_parallel(bias) if bias is not None else None
        yield weight, bias


def _gather_data_parallel(parameter: DTensor) -> torch.Tensor:
    """The whole tensor of a parameter sharded over data-parallel ranks (one all-gather); its gradient, the mean of the
    ranks' gradients, is reduce-scattered back onto the parameter's placements."""
    mesh = parameter.device_mesh
    if mesh.mesh_dim_names is not None and "tp" in mesh.mesh_dim_names:
        # on a tensor-parallel dimension every rank holds the same tokens: its gradient is not a per-rank partial
        raise ValueError(
            "The LM head is sharded over a tensor-parallel mesh dimension ('tp'), which the fused SFTMix loss does not "
            "support: it gathers the head as a data-parallel (FSDP) parameter. Leave the LM head out of the tensor-"
            "parallel plan."
        )
    return parameter.full_tensor(grad_placements=[Partial("avg")] * mesh.ndim)
