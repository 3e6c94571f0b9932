"""The training metrics SFTMixTrainer logs: SFTTrainer's (next-token loss, entropy, mean token accuracy, tokens
seen, router loss) and SFTMix's own (`mixup_loss`, `mixup_lambda`, `mixed_tokens`, `mixed_fraction`).

Each micro-batch contributes sums, gathered across ranks in one collective and kept as device tensors until the
trainer logs them, so the metrics add no host sync to the loss path: host numbers reach the device by fill kernels,
host tensors by asynchronous copies.
"""

import torch

from .batch_plan import BatchPlan

# what each micro-batch sums, in order
SUMS = (
    "ntp_sum",
    "num_tokens",
    "entropy_sum",
    "num_correct",
    "mixup_loss",
    "lambda_sum",
    "mixed_pairs",
    "mixed_tokens",
    "tokens_seen",
    "aux_loss",
    "response_tokens",
)


def micro_batch_sums(
    inputs: dict, plan: BatchPlan, ntp_normalizer, outputs: dict, lambdas: torch.Tensor, accumulation: int
) -> torch.Tensor:
    """(len(SUMS),) this rank's sums for one micro-batch, from the fused loss's `outputs` and its `plan`."""
    num_tokens = outputs["num_tokens"].float()
    device = num_tokens.device

    def count(value) -> torch.Tensor:
        # a host number on the device by a fill kernel: no blocking host-to-device copy (`torch.tensor(x, device=)`
        # waits for the queue to drain, so the host could not queue the backward ahead of the forward)
        return torch.full((), float(value), device=device)

    # the kernel divides the next-token sum by the normalizer (the valid-row count when None): undo it
    if ntp_normalizer is None:
        normalizer = num_tokens.clamp(min=1)
    elif isinstance(ntp_normalizer, torch.Tensor):
        normalizer = ntp_normalizer.to(device, non_blocking=True)
    else:
        normalizer = count(ntp_normalizer)
    # the pairs with a mixed position (the lambdas of the others are drawn but unused)
    mixed = torch.zeros(len(lambdas), dtype=torch.bool, device=device)
    mixed.index_fill_(0, plan.mix_pair.to(device, non_blocking=True), True)
    sums = {
        "ntp_sum": outputs["ntp_loss"].double() * normalizer.double(),
        "num_tokens": num_tokens,
        "entropy_sum": outputs["entropy"].float() * num_tokens,
        "num_correct": outputs["num_correct"].float(),
        "mixup_loss": outputs["mixup_loss"] * accumulation,  # back to the micro-batch's L_Mixup
        "lambda_sum": (lambdas * mixed).sum(),
        "mixed_pairs": mixed.sum(),
        "mixed_tokens": count(len(plan.mix_pair)),
        # the batch's tokens, as SFTTrainer counts them: padding-free batches have no attention mask
        "tokens_seen": (
            inputs["attention_mask"].sum().to(device)
            if "attention_mask" in inputs
            else count(inputs["position_ids"].size(1))
        ),
        "aux_loss": outputs["aux_loss"].detach() if "aux_loss" in outputs else torch.zeros((), device=device),
        "response_tokens": count(len(plan.rows)),
    }
    return torch.stack([sums[name].float() for name in SUMS])


def record(metrics: dict[str, list], totals: torch.Tensor, num_processes: int, ntp_loss_on: str, has_aux: bool):
    """Append the metrics of one micro-batch, from the sums of every rank (`totals`), to the trainer's `metrics`;
    returns the tokens seen. The next-token metrics cover the rows whose next-token term counts (none with
    `ntp_loss_on="none"`: not logged then)."""
    sums = dict(zip(SUMS, totals))
    if has_aux:
        metrics["aux_loss"].append(sums["aux_loss"] / num_processes)
    if ntp_loss_on != "none":
        valid = sums["num_tokens"].clamp(min=1)
        metrics["entropy"].append(sums["entropy_sum"] / valid)
        metrics["mean_token_accuracy"].append(sums["num_correct"] / valid)
        metrics["ntp_loss"].append(sums["ntp_sum"] / valid)
    metrics["mixup_loss"].append(sums["mixup_loss"] / num_processes)
    metrics["mixup_lambda"].append(sums["lambda_sum"] / sums["mixed_pairs"].clamp(min=1))
    metrics["mixed_tokens"].append(sums["mixed_tokens"])
    # each mixed position interpolates one response token of each side of its pair
    metrics["mixed_fraction"].append(2 * sums["mixed_tokens"] / sums["response_tokens"].clamp(min=1))
    return sums["tokens_seen"]
