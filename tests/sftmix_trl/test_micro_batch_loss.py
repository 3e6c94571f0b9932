"""`backbone_and_fused_loss` with the LM head on another device than the backbone (`device_map="auto"` over several
GPUs): every tensor the fused loss reads arrives on the head's device. The second device here is `meta`, a real torch
device with torch's own device checks (a loss input left on the CPU fails them), on which the torch backend runs."""

import torch

import sftmix_trl.micro_batch_loss as micro_batch_loss
from sftmix_trl.batch_plan import BatchPlan
from sftmix_trl.micro_batch_loss import HEAD_INPUTS, backbone_and_fused_loss, loss_inputs


def test_every_loss_input_reaches_the_head_device(llama, monkeypatch):
    # the backbone on the CPU, the (untied) head on the meta device
    llama.lm_head.weight = torch.nn.Parameter(torch.empty_like(llama.lm_head.weight, device="meta"))
    input_ids = torch.randint(3, llama.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    labels = input_ids.clone()
    labels[:, :3] = -100
    plan = BatchPlan(
        rows=torch.arange(2, 8),
        mix_index=torch.tensor([[0, 3], [1, 4]]),
        mix_pair=torch.tensor([0, 0]),
        mix_weight=torch.tensor([0.5, 0.5], dtype=torch.float64),
        ntp_mask=torch.tensor([True, True, True, False, False, False]),
        num_pairs=1,
    )
    inputs = loss_inputs(labels, plan, torch.tensor([0.3]), 1, torch.tensor(6.0))
    assert all(inputs[name].device.type == "cpu" for name in HEAD_INPUTS)
    seen = {}

    def recording(hidden, weight, *args, **kwargs):
        seen.update(
            hidden=hidden, weight=weight, **dict(zip(("targets", "mix_index", "mix_lambda", "mix_weight"), args))
        )
        seen.update({name: kwargs[name] for name in ("bias", "ntp_mask", "ntp_normalizer")})
        return real(hidden, weight, *args, **kwargs)

    real = micro_batch_loss.sftmix_linear_cross_entropy
    monkeypatch.setattr(micro_batch_loss, "sftmix_linear_cross_entropy", recording)
    outputs = backbone_and_fused_loss(llama, {"input_ids": input_ids}, inputs, 0.2, "auto", False)
    tensors = {name: value for name, value in seen.items() if value is not None}
    assert set(tensors) == {"hidden", "weight", *HEAD_INPUTS}
    assert {name: value.device.type for name, value in tensors.items()} == dict.fromkeys(tensors, "meta")
    assert outputs["loss"].device.type == "meta" and outputs["loss"].requires_grad
