"""What SFTMixTrainer refuses at construction, and why: each check raises an error that says what is wrong and what
to change, before any training. docs/training.md, "Differences from SFTTrainer", lists them."""

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset, IterableDataset
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel

from .kernels.reference import head_logits

# Config attributes of LM heads that scale the logits; the fused loss only knows a soft cap.
LOGIT_SCALE_ATTRIBUTES = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


def logit_softcap(causal_lm) -> float | None:
    """The soft cap `c * tanh(z / c)` the model applies to its logits (Gemma 2 and later), or None."""
    return getattr(causal_lm.config.get_text_config(), "final_logit_softcapping", None)


def check_model(model, peft_config) -> None:
    """What SFTMix refuses in the model, before SFTTrainer loads or wraps it."""
    if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
        raise ValueError(
            f"Prompt-learning PEFT methods ({type(peft_config).__name__}) add virtual tokens that shift the "
            "positions SFTMix pairs; use an adapter on the model's layers (e.g. LoRA) instead."
        )
    if not isinstance(model, str) and is_peft_model(model):
        if model.active_peft_config.is_prompt_learning:
            raise ValueError(
                f"Prompt-learning PEFT methods ({type(model.active_peft_config).__name__}) add virtual tokens "
                "that shift the positions SFTMix pairs; use an adapter on the model's layers (e.g. LoRA) instead."
            )
        check_lm_head(model)
    elif peft_config is not None and isinstance(model, PreTrainedModel):
        from peft.tuners.tuners_utils import check_target_module_exists

        head = model.get_output_embeddings()
        head_name = next(name for name, module in model.named_modules() if module is head)
        # PEFT's own matching; no `target_modules` means the architecture's defaults, which never include the head
        if getattr(peft_config, "target_modules", None) and check_target_module_exists(peft_config, head_name):
            raise ValueError(
                f"The PEFT config targets the LM head ({head_name!r}). SFTMix computes the loss from the head's "
                f"weight directly, so an adapter there would never train: remove {head_name!r} from "
                "`target_modules`."
            )


def check_not_empty(train_dataset) -> None:
    """A training set with no row (SFTTrainer fails on it with a bare `StopIteration` as it peeks at the first)."""
    if isinstance(train_dataset, Dataset) and len(train_dataset) == 0:
        raise ValueError("The training dataset holds no example: there is nothing to train on.")


def check_training_setup(train_dataset, is_vision: bool, compute_loss_func) -> None:
    """What SFTMix refuses in the training data and setup, once SFTTrainer has validated them. `is_vision`: a
    vision-language model or an image dataset, as SFTTrainer detected it."""
    if isinstance(train_dataset, IterableDataset):
        raise TypeError(
            "SFTMixTrainer needs a map-style `datasets.Dataset`: the confidence split is a median over the whole "
            "training set and every micro-batch is drawn from both halves. Materialize the IterableDataset first "
            "(e.g. `Dataset.from_generator`)."
        )
    if is_vision:
        raise ValueError(
            "SFTMixTrainer trains text-only language models: it interpolates the hidden states of response "
            "tokens, and with a vision-language model (a processor, or image columns) the sequences also hold "
            "image tokens whose interpolation the recipe does not define. Use SFTTrainer for vision-language "
            "models, or pass a tokenizer and text-only data."
        )
    if compute_loss_func is not None:
        raise ValueError(
            "SFTMixTrainer computes its own loss (next-token plus Mixup, fused with the LM head), so "
            "`compute_loss_func` cannot be used with it; subclass SFTMixTrainer and override `compute_loss` to "
            "change the loss."
        )


def check_sequences_stay_whole(parallelism_config) -> None:
    """Context and sequence parallelism shard every sequence, so no rank could pair two of them."""
    if parallelism_config is not None and (parallelism_config.cp_enabled or parallelism_config.sp_enabled):
        raise ValueError(
            "SFTMix pairs whole sequences inside each rank's micro-batch, but context and sequence parallelism "
            "shard every sequence across ranks, so no rank holds both sides of a pair: set `cp_size` and "
            "`sp_size` to 1 (data parallelism, FSDP and DeepSpeed shard data or weights, not sequences)."
        )


def check_micro_batch_holds_a_pair(micro_batch_size: int, num_processes: int) -> None:
    """With `split_batches`, each rank's micro-batch is a slice of the DataLoader's batch: it must hold a pair too
    (`SFTMixConfig` already refuses `per_device_train_batch_size=1`)."""
    if micro_batch_size < 2:
        raise ValueError(
            f"With `split_batches`, each of the {num_processes} processes gets {micro_batch_size} row(s) of every "
            "batch, so no rank's micro-batch could ever hold a confident / unconfident pair: make the batch size at "
            "least twice the number of processes."
        )


def check_lm_head(model) -> None:
    """No adapter on the head and no logit scale: the fused loss reads the head's weight and knows only a soft cap."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if isinstance(model.get_output_embeddings(), BaseTunerLayer):
        raise ValueError(
            "The model has a PEFT adapter on its LM head. SFTMix computes the loss from the head's weight "
            "directly, so the adapter would never train: remove the LM head from `target_modules`."
        )
    text_config = model.config.get_text_config()
    scaled = [name for name in LOGIT_SCALE_ATTRIBUTES if getattr(text_config, name, None) not in (None, 1, 1.0)]
    if scaled:
        raise ValueError(
            f"The model's LM head scales its logits ({', '.join(scaled)}), which the fused SFTMix loss does not "
            "support (only a soft cap)."
        )


def check_head_reproduces_logits(model) -> None:
    """The fused loss takes the logits to be `lm_head(last hidden state)`, soft-capped when the config says so.
    Check on a few tokens that the model's own forward returns exactly that, so that a model that transforms its
    logits in some other way (a scale under another name, a bias added outside the head, a hook) is refused rather
    than trained on other logits than its own. Skipped where the head is not materialized on this process (meta
    device, ZeRO-3 partitions)."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    causal_lm = model.get_base_model() if is_peft_model(model) else model
    head = causal_lm.get_output_embeddings()
    if is_deepspeed_zero3_enabled() or head.weight.device.type == "meta" or isinstance(head.weight, DTensor):
        return
    embeddings = causal_lm.get_input_embeddings().weight
    input_ids = (torch.arange(1, 9, device=embeddings.device) % embeddings.shape[0])[None]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(input_ids=input_ids, use_cache=False).logits.float()
            hidden = causal_lm.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
            ours = head_logits(
                hidden.to(head.weight.device, head.weight.dtype), head.weight, head.bias, logit_softcap(causal_lm)
            )
    finally:
        model.train(was_training)
    # same matrix product in the same dtype: equal up to rounding (bf16 / fp16 heads round the logits coarsely)
    tolerance = (1e-4 if head.weight.dtype == torch.float32 else 2e-2) * logits.abs().max().clamp(min=1)
    difference = (ours.to(logits.device) - logits).abs().max()
    if not difference <= tolerance:
        raise ValueError(
            f"{type(causal_lm).__name__}'s logits are not its LM head applied to its last hidden state (largest "
            f"difference {difference.item():.3g} on a test input): its forward transforms them in a way the fused "
            "SFTMix loss, which computes the logits from the head's weight, cannot reproduce. Models that scale or "
            "offset their logits outside the head are not supported; a soft cap (`final_logit_softcapping`) is."
        )


def check_loss_impl_runs(loss_impl: str, device: torch.device) -> None:
    """The fused loss backend `loss_impl` can run on the training device (the Triton backends need CUDA, or Triton's
    CPU interpreter): refused at construction, not at the first training step."""
    from .kernels.functional import resolve_impl

    try:
        # the dtype only picks among the backends for "auto", which always resolves
        resolve_impl(loss_impl, torch.device(device), torch.float32)
    except RuntimeError as error:
        raise ValueError(f"`loss_impl={loss_impl!r}` cannot run on this run's device: {error}") from None
