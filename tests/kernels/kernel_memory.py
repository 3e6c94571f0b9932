"""Memory of one step of the fused loss by accounting: `LiveStorageBytes` adds up the bytes of the storages alive at
each moment while an implementation runs on the meta device (shapes, no data; the Triton launches are skipped
there, every allocation of the wrapper and of the GEMMs happens)."""

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from sftmix_trl.kernels import sftmix_linear_cross_entropy

LLAMA_3_8B_HEAD = dict(hidden_size=4096, vocab_size=128256)


class LiveStorageBytes(TorchDispatchMode):
    """Peak bytes of the storages created while the mode is active and alive at the same time."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes = {}

    def _release(self, key):
        self.live -= self._sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # views, in-place and out= results alias an input's storage: nothing new
        if any(result.alias_info is not None for result in func._schema.returns):
            return out
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = storage._cdata
                if key not in self._sizes:
                    self._sizes[key] = storage.nbytes()
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._release, key)
        return out


def step_memory(impl: str, num_rows: int, hidden_size: int, vocab_size: int, dtype=torch.bfloat16):
    """(peak bytes of one forward + backward above the inputs, bytes of the gradients it leaves)."""
    meta = dict(device="meta")
    hidden = torch.empty(num_rows, hidden_size, dtype=dtype, requires_grad=True, **meta)
    weight = torch.empty(vocab_size, hidden_size, dtype=dtype, requires_grad=True, **meta)
    targets = torch.empty(num_rows, dtype=torch.long, **meta)
    num_pairs = num_rows // 4
    mix_index = torch.empty(num_pairs, 2, dtype=torch.long, **meta)
    mix_lambda = torch.empty(num_pairs, **meta)
    mix_weight = torch.empty(num_pairs, **meta)
    with LiveStorageBytes() as tracker:
        out = sftmix_linear_cross_entropy(
            hidden, weight, targets, mix_index, mix_lambda, mix_weight, impl=impl, validate=False
        )
        out.loss.backward()
        del out
    return tracker.peak, hidden.grad.nbytes + weight.grad.nbytes
