"""Configuration of the SFTMix trainer: TRL's `SFTConfig` plus the Mixup recipe's own knobs."""

import dataclasses
import math
from dataclasses import dataclass, field

from trl import SFTConfig

from .batch_plan import NTP_LOSS_SUBSETS
from .data.split import SPLIT_METHODS
from .kernels.options import IMPLS as LOSS_IMPLS

# Below this concentration torch's float32 Beta sampler no longer draws what Beta(alpha, alpha) means (lam at 0 or 1
# almost always): from alpha = 5e-3 some draws come out exactly 0.5 (0.06% at 5e-3, 6% at 2e-3, 25% at 1e-3, 48% at
# 5e-4; 20,000 draws on CPU), while at 1e-2 and above none do.
MIN_MIXUP_ALPHA = 1e-2
# Above this weight the Mixup term outweighs the next-token loss ten-thousandfold and its gradients overflow half
# precision (float16's largest value is 65504), or the weight itself float32 (beyond ~3.4e38).
MAX_MIXUP_COEF = 1e4


@dataclass
class SFTMixConfig(SFTConfig):
    r"""
    Configuration class for the [`SFTMixTrainer`], SFTMix instruction tuning
    ([arXiv 2410.05248](https://huggingface.co/papers/2410.05248)).

    Every micro-batch pairs confident with unconfident examples, interpolates their last hidden states over the
    responses with `lam ~ Beta(mixup_alpha, mixup_alpha)`, and adds `mixup_coef` times the soft-target cross-entropy
    of the mixed positions to the next-token loss. All the parameters of [`~trl.SFTConfig`] apply; packing packs each
    confidence half on its own (`packing_strategy="bfd"` only: whole examples).

    Parameters:
        > Parameters that control the Mixup regularization

        mixup_alpha (`float`, *optional*, defaults to `0.5`):
            Concentration of the symmetric Beta distribution the interpolation weight of each pair is drawn from.
            At least `0.01` (below it torch's float32 sampler draws `lam = 0.5` instead of values near 0 or 1). The
            paper's choice after its sweep (§B.1).
        mixup_coef (`float`, *optional*, defaults to `0.2`):
            Weight `mu` of the Mixup loss in `L = L_NTP + mu * L_Mixup`. Between `0.0` and `1e4`; `0.0` trains with
            the next-token loss alone (the batches are still balanced and paired).
        ntp_loss_on (`str`, *optional*, defaults to `"all"`):
            Which examples the next-token loss applies to: `"all"` (the paper's recipe), `"confident"` or
            `"unconfident"` (one half only), or `"none"` (Mixup loss alone), the ablations of the paper's §5.3-5.4.
            The Mixup loss always interpolates both halves. The logged `ntp_loss`, `entropy` and
            `mean_token_accuracy` cover the examples the next-token loss applies to (not logged with `"none"`).
        loss_impl (`str`, *optional*, defaults to `"auto"`):
            Implementation of the fused loss: `"rowchunk"` (CUDA: cuBLAS products and one Triton element-wise pass
            per chunk of rows), `"triton"` (CUDA: fused Triton kernels, no logits tensor), `"torch"` (chunked
            PyTorch, any device), `"reference"` (dense eager PyTorch, for checks) or `"auto"` (rowchunk for bf16 /
            fp16 and triton for fp32 on CUDA, torch elsewhere).

        > Parameters that control the confidence split

        confidence_column (`str`, *optional*, defaults to `"confidence"`):
            Column of the training dataset holding each example's confidence; higher means more confident (SFTMix
            uses minus the mean response perplexity over reference checkpoints). Used when the trainer gets no
            separate scores.
        id_column (`str`, *optional*, defaults to `"id"`):
            Column holding each example's id, used to join scores computed elsewhere; identical examples may share
            an id (and so a score), different ones may not. When the dataset has no such column, ids are derived
            from each example's content with [`~sftmix_trl.data.ids.derive_example_id`].
        confidence_scores_path (`str`, *optional*):
            Scores to join to the training dataset by id: a JSON Lines or Parquet file, or a directory written by
            `Dataset.save_to_disk`, with `id_column` and `confidence_column` columns. The trainer's
            `confidence_scores` argument takes precedence. If neither is set, the training dataset must carry
            `confidence_column`.
        split_by (`str`, *optional*, defaults to `"confidence"`):
            How the two halves that every micro-batch pairs are chosen: `"confidence"` (the confident and the
            unconfident half, the paper's recipe) or `"random"` (two halves of the same sizes drawn at random with
            `seed`, the paper's ablation of the split). A random split needs no scores (no reference run: the
            price of NTP); given scores, it validates them as the confidence split does, so both cover the same
            examples.
    """

    mixup_alpha: float = field(
        default=0.5,
        metadata={
            "help": "Concentration of the symmetric Beta distribution the interpolation weight of each pair is drawn "
            "from. At least 0.01."
        },
    )
    mixup_coef: float = field(
        default=0.2,
        metadata={
            "help": "Weight `mu` of the Mixup loss in `L = L_NTP + mu * L_Mixup`. Between 0.0 and 1e4; 0.0 trains with "
            "the next-token loss alone."
        },
    )
    ntp_loss_on: str = field(
        default="all",
        metadata={
            "help": "Which examples the next-token loss applies to: 'all' (the paper's recipe), 'confident' or "
            "'unconfident' (one half only), or 'none' (Mixup loss alone). The Mixup loss always interpolates both "
            "halves.",
            "choices": list(NTP_LOSS_SUBSETS),
        },
    )
    loss_impl: str = field(
        default="auto",
        metadata={
            "help": "Implementation of the fused loss: 'rowchunk' (CUDA, cuBLAS products per chunk of rows), 'triton' "
            "(CUDA, fused Triton kernels), 'torch' (chunked PyTorch), 'reference' (dense eager PyTorch) or 'auto' "
            "(rowchunk for bf16 / fp16 and triton for fp32 on CUDA, torch elsewhere).",
            "choices": list(LOSS_IMPLS),
        },
    )
    confidence_column: str = field(
        default="confidence",
        metadata={
            "help": "Column holding each example's confidence (higher means more confident). Used when the trainer "
            "gets no separate scores."
        },
    )
    id_column: str = field(
        default="id",
        metadata={
            "help": "Column holding each example's id, used to join scores computed elsewhere (identical examples may "
            "share one). Derived from the example's content when the dataset has no such column."
        },
    )
    confidence_scores_path: str | None = field(
        default=None,
        metadata={
            "help": "Scores to join to the training dataset by id: a JSON Lines or Parquet file, or a `save_to_disk` "
            "directory, with `id_column` and `confidence_column` columns."
        },
    )

    split_by: str = field(
        default="confidence",
        metadata={
            "help": "How the two paired halves are chosen: 'confidence' (the paper's recipe) or 'random' (halves of the "
            "same sizes drawn with `seed`, the paper's ablation of the split; it needs no scores).",
            "choices": list(SPLIT_METHODS),
        },
    )

    def __post_init__(self):
        super().__post_init__()
        for name in ("mixup_alpha", "mixup_coef"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"`{name}` must be a number, got {value!r} ({type(value).__name__}).")
        if not (math.isfinite(self.mixup_alpha) and self.mixup_alpha >= MIN_MIXUP_ALPHA):
            raise ValueError(
                f"`mixup_alpha` (the Beta concentration) must be a number of at least {MIN_MIXUP_ALPHA}, got "
                f"{self.mixup_alpha}: below it torch's float32 Beta sampler draws lam = 0.5 for many pairs instead of "
                f"values near 0 or 1. For almost no interpolation, use mixup_alpha={MIN_MIXUP_ALPHA}, or mixup_coef=0."
            )
        if not (math.isfinite(self.mixup_coef) and 0 <= self.mixup_coef <= MAX_MIXUP_COEF):
            raise ValueError(
                f"`mixup_coef` must be a number between 0 and {MAX_MIXUP_COEF:g}, got {self.mixup_coef}: a larger "
                "weight drowns the next-token loss and overflows in half precision (or is infinite in float32)."
            )
        if self.ntp_loss_on not in NTP_LOSS_SUBSETS:
            raise ValueError(f"`ntp_loss_on` must be one of {NTP_LOSS_SUBSETS}, got {self.ntp_loss_on!r}.")
        if self.ntp_loss_on == "none" and self.mixup_coef == 0:
            raise ValueError(
                "`ntp_loss_on='none'` with `mixup_coef=0` leaves no loss to train on: set `mixup_coef > 0` or apply the "
                "next-token loss to some examples."
            )
        if self.split_by not in SPLIT_METHODS:
            raise ValueError(f"`split_by` must be {' or '.join(map(repr, SPLIT_METHODS))}, got {self.split_by!r}.")
        if self.loss_impl not in LOSS_IMPLS:
            raise ValueError(f"`loss_impl` must be one of {LOSS_IMPLS}, got {self.loss_impl!r}.")
        if self.packing and self.packing_strategy != "bfd":
            raise ValueError(
                f"SFTMix packs each confidence half on its own and pairs whole examples, so it needs "
                f"`packing_strategy='bfd'` (whole examples, truncated to `max_length`), got "
                f"{self.packing_strategy!r}, which cuts examples apart. Use 'bfd', or `packing=False`."
            )
        if self.gradient_accumulation_steps < 1:
            raise ValueError(
                f"`gradient_accumulation_steps` must be at least 1 (1: no accumulation), got "
                f"{self.gradient_accumulation_steps}."
            )
        batch_size = self.per_device_train_batch_size
        if batch_size < 2:
            raise ValueError(
                f"SFTMix pairs a confident with an unconfident example inside each micro-batch, so it needs a "
                f"`per_device_train_batch_size` of at least 2, got {batch_size}: one row per micro-batch is one "
                "example, or with packing one packed row whose sequences all come from one confidence half, so no "
                "micro-batch could ever hold a pair. Raise it (and lower `gradient_accumulation_steps` to keep the "
                "effective batch size)."
            )
        if self.train_sampling_strategy != "random":
            raise ValueError(
                "SFTMix builds its own balanced, shuffled micro-batches, so `train_sampling_strategy` must stay "
                f"'random', got {self.train_sampling_strategy!r}."
            )
        if self.label_smoothing_factor != 0:
            raise ValueError("SFTMix does not support `label_smoothing_factor`: leave it at 0.")


def sft_config_from(args: SFTConfig, **overrides) -> SFTConfig:
    """A plain `SFTConfig` with the SFT fields of `args` (an `SFTMixConfig`), some of them overridden: the config of
    an NTP run (a reference, a warm-up, a baseline) beside an SFTMix one."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(SFTConfig) if f.init}
    # the deprecated aliases mirror their new names after __post_init__; passing both would warn
    values.pop("gradient_checkpointing", None)
    values.pop("gradient_checkpointing_kwargs", None)
    return SFTConfig(**{**values, **overrides})
