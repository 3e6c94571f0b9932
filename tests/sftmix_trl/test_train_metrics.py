"""The per-micro-batch metric sums add no host sync to the loss path. On the meta device (a stand-in for a GPU:
nothing there can be read back) every op `micro_batch_sums` dispatches is recorded: no scalar read back
(`_local_scalar_dense`: `.item()`, `float(tensor)`), no host tensor made from data (`lift_fresh`: `torch.tensor`), no
copy into host memory; host-to-device copies must be asynchronous."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sftmix_trl.batch_plan import BatchPlan
from sftmix_trl.train_metrics import SUMS, micro_batch_sums


class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)


def _blocking(func, args, kwargs) -> str | None:
    name = func.overloadpacket.__name__
    if name in ("_local_scalar_dense", "lift_fresh", "lift_fresh_copy", "item"):
        return name
    if name == "_to_copy":
        source, target = args[0].device, kwargs.get("device", args[0].device)
        if torch.device(target).type == "cpu" and source.type != "cpu":
            return f"copy {source} -> cpu"
        if source.type == "cpu" and torch.device(target).type != "cpu" and not kwargs.get("non_blocking", False):
            return f"blocking copy cpu -> {target}"
    return None


def test_micro_batch_sums_never_wait_for_the_device():
    device = torch.device("meta")
    plan = BatchPlan(
        rows=torch.arange(2, 8),
        mix_index=torch.tensor([[0, 3], [1, 4]]),
        mix_pair=torch.tensor([0, 0]),
        mix_weight=torch.tensor([0.5, 0.5], dtype=torch.float64),
        ntp_mask=None,
        num_pairs=1,
    )
    outputs = {name: torch.ones((), device=device) for name in ("ntp_loss", "num_tokens", "entropy", "num_correct")}
    outputs["mixup_loss"] = torch.ones((), device=device)
    lambdas = torch.rand(3, device=device)
    for inputs, normalizer in (
        ({"attention_mask": torch.ones(2, 9, device=device)}, torch.tensor(6.0, device=device)),
        ({"position_ids": torch.zeros(1, 18, dtype=torch.long, device=device)}, 6),
        ({"position_ids": torch.zeros(1, 18, dtype=torch.long, device=device)}, None),
    ):
        with RecordOps() as recorded:
            sums = micro_batch_sums(inputs, plan, normalizer, outputs, lambdas, accumulation=2)
        assert sums.shape == (len(SUMS),) and sums.device == device
        blocking = [found for call in recorded.calls if (found := _blocking(*call))]
        assert not blocking, blocking
