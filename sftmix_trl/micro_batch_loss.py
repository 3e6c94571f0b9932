"""The loss of one training micro-batch as SFTMixTrainer computes it: the interpolation weights of its pairs, the
backbone forward, and the fused SFTMix loss on the LM head (`sftmix_trl.kernels`), with no logits tensor.

    L = L_NTP + mixup_coef * L_Mixup    (+ router_aux_loss_coef * the router loss, for Mixture-of-Experts models)
"""

import contextlib

import torch
import torch.nn.functional as F
from accelerate.utils import is_peft_model

from .batch_plan import BatchPlan
from .checks import logit_softcap
from .kernels import sftmix_linear_cross_entropy
from .lm_head import whole_lm_head


class PairLambdas:
    """lam ~ Beta(alpha, alpha) per pair of this rank's micro-batch.

    Drawn from the device's global generator, which the Trainer seeds and checkpoints, so runs are reproducible and a
    resumed run continues the same draws. Every rank starts from the same seed, so each draws the lambdas of all
    ranks' pairs (the generators stay in step) and keeps its own row: pairs on different ranks get different lambdas,
    and a data-parallel run draws what one process with the ranks' micro-batches side by side would. Every
    micro-batch draws `most_pairs` (as many as a micro-batch can have pairs), so that micro-batches with fewer (the
    last one, packed rows) do not move the generators of the ranks apart.
    """

    def __init__(self, alpha: float, most_pairs: int, num_processes: int, process_index: int):
        self.alpha, self.most_pairs = alpha, most_pairs
        self.num_processes, self.process_index = num_processes, process_index
        self._distribution: torch.distributions.Beta | None = None

    def sample(self, num_pairs: int, device: torch.device) -> torch.Tensor:
        if self._distribution is None or self._distribution.concentration1.device != device:
            alpha = torch.tensor(self.alpha, dtype=torch.float32, device=device)
            self._distribution = torch.distributions.Beta(alpha, alpha)
        every_rank = self._distribution.sample((self.num_processes, max(self.most_pairs, num_pairs)))
        return every_rank[self.process_index, :num_pairs]


def loss_inputs(labels, plan: BatchPlan, lambdas, accumulation: int, ntp_normalizer) -> dict:
    """The fused loss's per-row inputs, on the labels' device: the scored rows, their next tokens, the mixed pairs
    with their lambdas and weights (`w / accumulation`: L_Mixup is a per-micro-batch mean)."""
    device = labels.device
    shifted_targets = F.pad(labels[:, 1:], (0, 1), value=-100).reshape(-1)
    rows = plan.rows.to(device, non_blocking=True)
    return dict(
        rows=rows,
        targets=shifted_targets.index_select(0, rows),
        mix_index=plan.mix_index.to(device, non_blocking=True),
        mix_lambda=lambdas.index_select(0, plan.mix_pair.to(device, non_blocking=True)),
        mix_weight=(plan.mix_weight / accumulation).to(device, torch.float32, non_blocking=True),
        ntp_mask=plan.ntp_mask.to(device, non_blocking=True) if plan.ntp_mask is not None else None,
        ntp_normalizer=ntp_normalizer,
    )


def backbone_and_fused_loss(
    unwrapped_model, model_inputs: dict, inputs: dict, mixup_coef: float, impl: str, dft: bool
) -> dict[str, torch.Tensor]:
    """The backbone's last hidden states and the fused SFTMix loss on them (DFT on the next-token term when `dft`);
    with `output_router_logits`, the router loss as `aux_loss`. Runs inside the wrapped model's forward, so that
    DDP arms its gradient sync and ZeRO-3 / FSDP gather the weights, and under the accelerator's autocast, which
    the redirected forward bypasses. Returns a plain dict of tensors, so that DDP finds the outputs it needs to
    track."""
    causal_lm = unwrapped_model.get_base_model() if is_peft_model(unwrapped_model) else unwrapped_model
    backbone_outputs = causal_lm.base_model(**model_inputs)
    hidden_states = backbone_outputs.last_hidden_state
    hidden_states = hidden_states.reshape(-1, hidden_states.size(-1))
    # ZeRO-3 / FSDP2: the sharded head gathered once for the call (see `lm_head.py`)
    with whole_lm_head(causal_lm.get_output_embeddings()) as (weight, bias):
        # Mixed precision (fp32 weights under autocast): the head's product runs in the autocast dtype, as the
        # model's own `nn.Linear` head would (autograd casts dW back to the weight's dtype); the fused loss then runs
        # with autocast off, so that it keeps its own precision rules (fp32 statistics and accumulation).
        device_type = weight.device.type
        autocast_known = torch.amp.is_autocast_available(device_type)  # not on every device type (`meta`)
        autocast_on = autocast_known and torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if autocast_on else weight.dtype
        weight, bias = weight.to(dtype), bias.to(dtype) if bias is not None else None
        # every per-row input on the head's device: with `device_map="auto"` over several GPUs the backbone's last
        # layer and the head may sit on different ones (the copies are asynchronous device-to-device ones)
        head_device = weight.device
        rows = _to_device(inputs["rows"], hidden_states.device)  # the backbone's last layer may sit elsewhere too
        hidden = hidden_states.index_select(0, rows).to(head_device, dtype)
        on_head = {name: _to_device(inputs[name], head_device) for name in HEAD_INPUTS}
        with torch.autocast(device_type, enabled=False) if autocast_known else contextlib.nullcontext():
            result = sftmix_linear_cross_entropy(
                hidden,
                weight,
                on_head["targets"],
                on_head["mix_index"],
                on_head["mix_lambda"],
                on_head["mix_weight"],
                bias=bias,
                ntp_mask=on_head["ntp_mask"],
                ntp_normalizer=on_head["ntp_normalizer"],
                mixup_coef=mixup_coef,
                impl=impl,
                logit_softcap=logit_softcap(causal_lm),
                dft=dft,
                validate=False,  # the plan is built and checked by `batch_plan`
            )
    outputs = dict(vars(result))
    if model_inputs.get("output_router_logits"):
        outputs["aux_loss"] = router_aux_loss(causal_lm, backbone_outputs, model_inputs.get("attention_mask"))
    return outputs


# the loss inputs that `loss_inputs` builds on the labels' device and the loss reads on the head's
HEAD_INPUTS = ("targets", "mix_index", "mix_lambda", "mix_weight", "ntp_mask", "ntp_normalizer")


def _to_device(value, device: torch.device):
    """``value`` on ``device`` when it is a tensor (None, numbers: as they are)."""
    if not isinstance(value, torch.Tensor):
        return value
    # asynchronous except into host memory, which the host may read before the copy lands
    return value.to(device, non_blocking=device.type != "cpu")


def router_aux_loss(causal_lm, backbone_outputs, attention_mask) -> torch.Tensor:
    """The Mixture-of-Experts load-balancing loss of the backbone's router logits, as the model's own forward (and
    SFTTrainer's fused one) computes it: Mixtral's, which every MoE family in transformers shares. Padding-free
    batches carry no attention mask: every token counts."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    text_config = causal_lm.config.get_text_config()
    return load_balancing_loss_func(
        backbone_outputs.router_logits, text_config.num_experts, text_config.num_experts_per_tok, attention_mask
    )
