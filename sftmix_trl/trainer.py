"""SFTMixTrainer: TRL's SFTTrainer with SFTMix's confidence-balanced micro-batches and Mixup regularization."""

import dataclasses
import math
import os
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
import torch.nn.functional as F
from accelerate.utils import is_peft_model
from datasets import Dataset, IterableDataset, concatenate_datasets
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel, TrainingArguments
from trl import SFTTrainer, pack_dataset
from trl.models.utils import _ForwardRedirection
from trl.trainer.utils import get_config_model_id

from .batch_plan import (
    CONFIDENT,
    REMAINDER,
    UNCONFIDENT,
    BatchPlan,
    padded_bounds,
    padding_free_bounds,
    plan_micro_batch,
    token_halves,
)
from .config import SFTMixConfig
from .data_utils import (
    SCORE_COLUMNS,
    check_repeated_ids_share_content,
    derive_example_id,
    normalize_content_parts,
    split_by_confidence,
    split_examples,
)
from .kernels import sftmix_linear_cross_entropy
from .kernels.reference import head_logits
from .lm_head import whole_lm_head
from .sampler import BalancedPairSampler

# Columns added to the training dataset: the row of each example in the dataset as given (carried through TRL's
# preparation, which may drop rows, to join each example's confidence), and the half each prepared row belongs to
# (carried through the collator), CONFIDENT, UNCONFIDENT or REMAINDER (the median example of an odd-sized dataset).
ROW_COLUMN = "sftmix_row"
HALF_COLUMN = "sftmix_half"

# Config attributes of LM heads that scale the logits; the fused loss only knows a soft cap.
_LOGIT_SCALE_ATTRIBUTES = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


@dataclass
class PairedBatchCollator:
    """Wraps a collator so that each batch also carries the confidence-half flag of each of its sequences as
    `sftmix_half`: one per example, or one per packed sequence of a packed row (`seq_lengths`)."""

    collator: Callable

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        if HALF_COLUMN not in examples[0]:
            return self.collator(examples)
        halves = torch.tensor(
            [half for example in examples for half in [example[HALF_COLUMN]] * len(example.get("seq_lengths", [0]))],
            dtype=torch.int64,
        )
        ours = (HALF_COLUMN, ROW_COLUMN)
        batch = self.collator([{k: v for k, v in example.items() if k not in ours} for example in examples])
        batch[HALF_COLUMN] = halves
        return batch


def load_confidence_scores(source, id_column: str, confidence_column: str) -> dict[str, float]:
    """Scores keyed by (stringified) example id, from a `Dataset`, a path (JSON Lines, Parquet or a `save_to_disk`
    directory), a mapping of columns `{id_column: [...], confidence_column: [...]}`, or a mapping `{id: score}`."""
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if path.is_dir():
            source = datasets.load_from_disk(str(path))
            if not isinstance(source, Dataset):
                raise ValueError(
                    f"The scores directory {path} holds a {type(source).__name__}; save a single Dataset."
                )
        elif path.suffix in (".jsonl", ".json"):
            source = Dataset.from_json(str(path))
        elif path.suffix == ".parquet":
            source = Dataset.from_parquet(str(path))
        else:
            raise ValueError(
                f"Cannot read confidence scores from {path}: pass a .jsonl/.json or .parquet file, or a directory "
                "written by `Dataset.save_to_disk`."
            )
    if isinstance(source, Mapping) and id_column not in source and confidence_column not in source:
        ids, scores = list(source.keys()), list(source.values())
        if not all(s is None or isinstance(s, int | float) for s in scores):
            raise ValueError(
                "A mapping of confidence scores must map each example id to a number, or hold the columns "
                f"{id_column!r} and {confidence_column!r}."
            )
    elif isinstance(source, Dataset | Mapping):
        columns = source.column_names if isinstance(source, Dataset) else list(source)
        missing = [c for c in (id_column, confidence_column) if c not in columns]
        if missing:
            raise ValueError(
                f"The confidence scores lack the column(s) {missing} (they have {columns}). Set `id_column` and "
                "`confidence_column` in SFTMixConfig to the names the scores use."
            )
        ids, scores = list(source[id_column]), list(source[confidence_column])
    else:
        raise TypeError(
            "`confidence_scores` must be a Dataset, a path, or a mapping (of columns, or of id to score), got "
            f"{type(source).__name__}."
        )
    confidence_by_id: dict[str, float] = {}
    for example_id, score in zip(ids, scores):
        example_id, score = str(example_id), math.nan if score is None else float(score)
        known = confidence_by_id.setdefault(example_id, score)
        # a repeated id is the same example scored twice: fine when the scores agree
        if not (known == score or (math.isnan(known) and math.isnan(score))):
            raise ValueError(
                f"In the confidence scores, the example id {example_id!r} has two different scores ({known} and "
                f"{score}). Scores are joined by id: keep one score per id."
            )
    return confidence_by_id


class SFTMixTrainer(SFTTrainer):
    """
    Trainer for SFTMix instruction tuning ([arXiv 2410.05248](https://huggingface.co/papers/2410.05248)), a drop-in
    replacement for [`~trl.SFTTrainer`].

    The training set is split at its median confidence into a confident and an unconfident half. An epoch is
    SFTTrainer's (every example once, as many micro-batches), and every micro-batch of every rank holds as many
    examples of each half as its size allows: pair `i` is the `i`-th confident and the `i`-th unconfident example of
    the micro-batch, paired at random and reshuffled every epoch (`sftmix_trl.batch_plan`, padded or padding-free).
    For each pair the last hidden states (the LM head's input) of the first `min(|r_c|, |r_u|)` response positions
    of each side are interpolated with `lam ~ Beta(mixup_alpha, mixup_alpha)`, and the loss is

        L = L_NTP + mixup_coef * L_Mixup,
        L_Mixup = mean over pairs of (1 / L_ij) sum_l CE(z~_l, lam e_t_c + (1 - lam) e_t_u)

    computed by the fused loss of `sftmix_trl.kernels` without materializing the logits (with `loss_type="dft"`,
    DFT's weights on the next-token term; for Mixture-of-Experts models, plus SFTTrainer's router loss). Evaluation
    is SFTTrainer's plain next-token loss.

    Example:

    ```python
    >>> from sftmix_trl import SFTMixConfig, SFTMixTrainer

    >>> # `dataset` has a "confidence" column, or pass `confidence_scores=` keyed by its "id" column
    >>> trainer = SFTMixTrainer(model="Qwen/Qwen2.5-0.5B", args=SFTMixConfig("out"), train_dataset=dataset)
    >>> trainer.train()
    ```

    Args:
        model, args, data_collator, train_dataset, eval_dataset, processing_class, compute_loss_func,
        compute_metrics, callbacks, optimizers, optimizer_cls_and_kwargs, preprocess_logits_for_metrics,
        quantization_config, peft_config, formatting_func:
            As in [`~trl.SFTTrainer`], with these restrictions (see the README's "Differences from SFTTrainer"):
            `args` is an [`SFTMixConfig`] (any other `TrainingArguments` is converted, with the SFTMix defaults);
            `train_dataset` is a map-style text [`~datasets.Dataset`] in any SFTTrainer format (language modeling
            or prompt-completion, standard or conversational, pre-tokenized) with a confidence per example;
            `compute_loss_func`, vision-language models, prompt-learning PEFT methods and adapters on the LM head
            are refused.
        confidence_scores ([`~datasets.Dataset`], `str`, `os.PathLike` or `Mapping`, *optional*):
            Confidence of the training examples, joined to `train_dataset` by `args.id_column`: a Dataset, a JSON
            Lines / Parquet file or `save_to_disk` directory with `args.id_column` and `args.confidence_column`
            columns, or a mapping `{id: confidence}`. Defaults to `args.confidence_scores_path`, then to the
            dataset's own `args.confidence_column`. Every training example needs a finite score; ids are compared as
            strings, and identical examples may share one.
    """

    _tag_names = ["trl", "sft", "sftmix"]
    _name = "SFTMix"
    _paper = {
        "title": "SFTMix: Elevating Language Model Instruction Tuning with Mixup Recipe",
        "id": "2410.05248",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{xiao2024sftmix,
                title        = {{SFTMix: Elevating Language Model Instruction Tuning with Mixup Recipe}},
                author       = {Yuxin Xiao and Shujian Zhang and Wenxuan Zhou and Marzyeh Ghassemi and Sanqiang Zhao},
                year         = 2024,
                journal      = {arXiv preprint arXiv:2410.05248},
            }"""),
    }

    def __init__(
        self,
        model,
        args: SFTMixConfig | TrainingArguments | None = None,
        data_collator=None,
        train_dataset: Dataset | None = None,
        eval_dataset=None,
        processing_class=None,
        compute_loss_func=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        optimizer_cls_and_kwargs=None,
        preprocess_logits_for_metrics=None,
        quantization_config=None,
        peft_config=None,
        formatting_func=None,
        confidence_scores=None,
    ):
        if args is None:
            model_name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = SFTMixConfig(f"{model_name.split('/')[-1]}-SFTMix")
        elif not isinstance(args, SFTMixConfig):
            # field by field: `to_dict` masks every `*_token` field (hub_token, but also eos_token and pad_token)
            args = SFTMixConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init})

        # messages whose content is a list of text parts, as plain text (before ids are derived from the content)
        train_dataset, eval_dataset = normalize_content_parts(train_dataset), normalize_content_parts(eval_dataset)
        # SFTTrainer validates its inputs first, with its own errors; SFTMix's checks of the training data run where
        # SFTTrainer prepares it (`_prepare_dataset`), or right after its construction when preparation is skipped.
        self._raw_train_dataset = train_dataset
        self._confidence_scores = confidence_scores
        self._sftmix_compute_loss_func = compute_loss_func
        # each example's confidence and id, by its row in the dataset as given (set by `_attach_confidence`)
        self._row_confidence: list[float] | None = None
        self._row_ids: list[str] | None = None
        if isinstance(train_dataset, Dataset | IterableDataset):
            self._check_model(model, peft_config)

        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_loss_func=compute_loss_func,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            quantization_config=quantization_config,
            peft_config=peft_config,
            formatting_func=formatting_func,
        )
        if self._row_confidence is None:  # preparation skipped
            self.train_dataset = self._attach_confidence(self.train_dataset, self.args)
        self._check_lm_head(self.model)
        self._check_head_reproduces_logits(self.model)
        parallelism = self.accelerator.parallelism_config
        if parallelism is not None and (parallelism.cp_enabled or parallelism.sp_enabled):
            raise ValueError(
                "SFTMix pairs whole sequences inside each rank's micro-batch, but context and sequence parallelism "
                "shard every sequence across ranks, so no rank holds both sides of a pair: set `cp_size` and "
                "`sp_size` to 1 (data parallelism, FSDP and DeepSpeed shard data or weights, not sequences)."
            )

        if not self.args.packing:  # packed rows got their halves when packed
            self.train_dataset, self.confidence_split = self._split_prepared_dataset(self.train_dataset)
        self.data_collator = PairedBatchCollator(self.data_collator)
        self._forward_redirection = _ForwardRedirection()
        # built now so that a micro-batch too small to hold a pair fails at construction
        self._pair_sampler: BalancedPairSampler | None = self._get_train_sampler()
        self._lambda_distribution: torch.distributions.Beta | None = None

    # ---- construction checks and the confidence split ----

    @staticmethod
    def _check_model(model, peft_config) -> None:
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
            SFTMixTrainer._check_lm_head(model)
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

    def _check_training_setup(self, train_dataset) -> None:
        """What SFTMix refuses in the training data and setup, once SFTTrainer has validated them."""
        if isinstance(train_dataset, IterableDataset):
            raise TypeError(
                "SFTMixTrainer needs a map-style `datasets.Dataset`: the confidence split is a median over the whole "
                "training set and every micro-batch is drawn from both halves. Materialize the IterableDataset first "
                "(e.g. `Dataset.from_generator`)."
            )
        if self._is_vlm or self._is_vision_dataset:
            raise ValueError(
                "SFTMixTrainer trains text-only language models: it interpolates the hidden states of response "
                "tokens, and with a vision-language model (a processor, or image columns) the sequences also hold "
                "image tokens whose interpolation the recipe does not define. Use SFTTrainer for vision-language "
                "models, or pass a tokenizer and text-only data."
            )
        if self._sftmix_compute_loss_func is not None:
            raise ValueError(
                "SFTMixTrainer computes its own loss (next-token plus Mixup, fused with the LM head), so "
                "`compute_loss_func` cannot be used with it; subclass SFTMixTrainer and override `compute_loss` to "
                "change the loss."
            )

    @staticmethod
    def _check_lm_head(model) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        if isinstance(model.get_output_embeddings(), BaseTunerLayer):
            raise ValueError(
                "The model has a PEFT adapter on its LM head. SFTMix computes the loss from the head's weight "
                "directly, so the adapter would never train: remove the LM head from `target_modules`."
            )
        text_config = model.config.get_text_config()
        scaled = [name for name in _LOGIT_SCALE_ATTRIBUTES if getattr(text_config, name, None) not in (None, 1, 1.0)]
        if scaled:
            raise ValueError(
                f"The model's LM head scales its logits ({', '.join(scaled)}), which the fused SFTMix loss does not "
                "support (only a soft cap)."
            )

    @staticmethod
    def _check_head_reproduces_logits(model) -> None:
        """The fused loss takes the logits to be `lm_head(last hidden state)`, soft-capped when the config says so.
        Check on a few tokens that the model's own forward returns exactly that, so that a model that transforms its
        logits in some other way (a scale under another name, a bias added outside the head, a hook) is refused
        rather than trained on other logits than its own. Skipped where the head is not materialized on this process
        (meta device, ZeRO-3 partitions)."""
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
                    hidden.to(head.weight.device, head.weight.dtype), head.weight, head.bias, _softcap(causal_lm)
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

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        # SFTTrainer refuses a `with_transform` dataset first thing here; let it
        custom_format = isinstance(dataset, Dataset) and dataset.format["type"] == "custom"
        if dataset is not self._raw_train_dataset or custom_format:
            return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        # validate every score before the (possibly long) preparation; the split itself is made afterwards, on the
        # rows that preparation keeps (it drops examples left without trainable tokens)
        dataset = self._attach_confidence(dataset, args)
        prepared = super()._prepare_dataset(dataset, processing_class, args, False, formatting_func, dataset_name)
        return self._pack_each_half(prepared, args) if packing else prepared

    def _pack_each_half(self, prepared: Dataset, args: SFTMixConfig) -> Dataset:
        """Confidence-aware packing: the confident examples packed with confident ones, the unconfident with
        unconfident ones (TRL's best-fit-decreasing packing, whole examples truncated to `max_length` as without
        packing), the median example of an odd-sized dataset alone; each packed row flagged with its half. A
        micro-batch then holds packs of both halves, and the trainer pairs the examples inside them."""
        if args.max_length is None:
            raise ValueError("When packing is enabled, `max_length` can't be `None`.")  # SFTTrainer's own check
        halved, self.confidence_split = self._split_prepared_dataset(prepared)
        halves = halved.with_format(None)[HALF_COLUMN]
        packs = []
        for half in (CONFIDENT, UNCONFIDENT, REMAINDER):
            rows = [row for row, h in enumerate(halves) if h == half]
            if rows:
                packed = pack_dataset(
                    halved.select(rows).select_columns(["input_ids", "labels"]),
                    args.max_length,
                    "bfd",
                    {"num_proc": args.dataset_num_proc},
                )
                packs.append(packed.add_column(HALF_COLUMN, [half] * len(packed)))
        return concatenate_datasets(packs)

    def _attach_confidence(self, dataset, args: SFTMixConfig):
        """Check the training setup and give every example a finite confidence, from the scores (joined by id: the
        dataset's own id column, or ids derived from content) or the dataset's confidence column; returns the dataset
        with the id column and each example's row (`sftmix_row`), to join the confidence after preparation."""
        self._check_training_setup(dataset)
        # the stored columns, not what a `with_transform` transform makes of them
        table = dataset.with_format(None)
        exclude = SCORE_COLUMNS | {args.confidence_column}
        new_columns = {}
        if args.id_column in table.column_names:
            ids = [str(example_id) for example_id in table[args.id_column]]
            try:
                check_repeated_ids_share_content(ids, lambda row: derive_example_id(table[row], exclude=exclude))
            except ValueError as error:
                raise ValueError(f"In the training dataset's {args.id_column!r} column: {error}") from None
        else:
            # identical examples get identical ids, so they share a score
            ids = [derive_example_id(example, exclude=exclude) for example in table]
            new_columns[args.id_column] = ids

        confidence_scores = self._confidence_scores
        if confidence_scores is None:
            confidence_scores = args.confidence_scores_path
        if confidence_scores is not None:
            confidence_by_id = load_confidence_scores(confidence_scores, args.id_column, args.confidence_column)
            missing = [example_id for example_id in ids if example_id not in confidence_by_id]
            if missing:
                shown = ", ".join(repr(m) for m in dict.fromkeys(missing[:5]))
                raise ValueError(
                    f"{len(missing)} of {len(ids)} training example(s) have no confidence score, e.g. {shown} (joined "
                    f"on {args.id_column!r}). Score every training example, or drop the unscored ones."
                )
            confidence = [confidence_by_id[example_id] for example_id in ids]
        elif args.confidence_column in table.column_names:
            confidence = [math.nan if c is None else c for c in table[args.confidence_column]]
        else:
            raise ValueError(
                f"The training dataset has no {args.confidence_column!r} column and no `confidence_scores` were "
                "given. SFTMix splits the data by confidence: add the column, or pass scores keyed by "
                f"{args.id_column!r} (`confidence_scores=` or `confidence_scores_path`)."
            )
        # validates the scores (finite, at least two examples) before any tokenization
        split_by_confidence(confidence, ids)
        self._row_confidence, self._row_ids = confidence, ids
        new_columns[ROW_COLUMN] = list(range(len(ids)))
        return _with_columns(dataset, new_columns)

    def _split_prepared_dataset(self, dataset: Dataset):
        """Split the prepared rows at the median confidence and record each row's half in `sftmix_half`."""
        table = dataset.with_format(None)
        if ROW_COLUMN not in table.column_names:
            raise ValueError(
                f"The prepared training dataset lost its {ROW_COLUMN!r} column, which SFTMix needs to join the "
                "confidence scores: keep the columns of the dataset when preparing it."
            )
        rows = table[ROW_COLUMN]
        # the halves: by confidence, or at random with the same sizes (`split_by`, the paper's ablation)
        split = split_examples(
            [self._row_confidence[r] for r in rows],
            [self._row_ids[r] for r in rows],
            self.args.split_by,
            self.args.seed,
        )
        halves = [REMAINDER] * len(rows)
        for row in split.confident:
            halves[row] = CONFIDENT
        for row in split.unconfident:
            halves[row] = UNCONFIDENT
        return _with_columns(dataset, {HALF_COLUMN: halves}), split

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if HALF_COLUMN not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, HALF_COLUMN]

    # ---- balanced micro-batches ----

    def _get_train_sampler(self, train_dataset: Dataset | None = None) -> BalancedPairSampler:
        dataset = self.train_dataset if train_dataset is None else train_dataset
        table = dataset.with_format(None)
        if HALF_COLUMN not in table.column_names:
            raise ValueError(f"The training dataset has no {HALF_COLUMN!r} column; build it with SFTMixTrainer.")
        halves = torch.tensor(table[HALF_COLUMN])
        num_processes = self.accelerator.num_processes
        micro_batch_size = self._train_batch_size
        if self.accelerator.split_batches:
            # accelerate cuts each DataLoader batch into one contiguous slice per rank
            if micro_batch_size % num_processes:
                raise ValueError(
                    f"With `split_batches`, the batch size ({micro_batch_size}) must be a multiple of the number of "
                    f"processes ({num_processes})."
                )
            micro_batch_size //= num_processes
        if micro_batch_size < 2:
            raise ValueError(
                f"SFTMix pairs a confident with an unconfident example inside each micro-batch, so it needs at least "
                f"2 examples per micro-batch and rank, got {micro_batch_size}. Raise `per_device_train_batch_size` "
                "(and lower `gradient_accumulation_steps` to keep the effective batch size)."
            )
        self._pair_sampler = BalancedPairSampler(
            confident=(halves == CONFIDENT).nonzero().flatten().tolist(),
            unconfident=(halves == UNCONFIDENT).nonzero().flatten().tolist(),
            remainder=(halves == REMAINDER).nonzero().flatten().tolist(),
            micro_batch_size=micro_batch_size,
            seed=self.args.seed if self.args.data_seed is None else self.args.data_seed,
        )
        return self._pair_sampler

    def _run_epoch(self, model, epoch, *args, **kwargs):
        # accelerate does not forward `set_epoch` through every wrapper (e.g. a skipped, sharded batch sampler when
        # resuming mid-epoch under data parallelism), so set it here, where the epoch is known for certain
        if self._pair_sampler is not None:
            self._pair_sampler.set_epoch(epoch)
        return super()._run_epoch(model, epoch, *args, **kwargs)

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device):
        # With the next-token loss on one half only, normalize it by that half's tokens.
        if self.args.ntp_loss_on in ("confident", "unconfident") and batch_samples and HALF_COLUMN in batch_samples[0]:
            kept_half = CONFIDENT if self.args.ntp_loss_on == "confident" else UNCONFIDENT
            batch_samples = [
                {
                    **batch,
                    "labels": batch["labels"].masked_fill(
                        self._token_halves(batch).view_as(batch["labels"]) != kept_half, -100
                    ),
                }
                for batch in batch_samples
            ]
        return super()._get_num_items_in_batch(batch_samples, device)

    # ---- the loss ----

    @staticmethod
    def _sequence_bounds(inputs: dict, halves: torch.Tensor) -> torch.Tensor:
        """Where each sequence of the micro-batch lies in its flattened tokens: one per row of a padded batch, or
        the concatenated sequences of a padding-free one (one row, one confidence flag per sequence)."""
        labels = inputs["labels"]
        if labels.shape[0] == halves.numel():
            return padded_bounds(*labels.shape)
        if labels.shape[0] != 1 or "position_ids" not in inputs:
            raise ValueError(
                f"The training batch has {labels.shape[0]} rows but {halves.numel()} confidence flags; train batches "
                "must come from SFTMixTrainer's own dataloader and collator."
            )
        return padding_free_bounds(inputs["position_ids"].cpu(), halves.numel())

    def _token_halves(self, inputs: dict) -> torch.Tensor:
        """(L,) the confidence half of each flattened token of a collated training batch."""
        halves = inputs[HALF_COLUMN].cpu()
        return token_halves(halves, self._sequence_bounds(inputs, halves), inputs["labels"].numel())

    def _plan_loss(self, inputs: dict, halves: torch.Tensor) -> BatchPlan:
        """Plan the fused-loss call of the micro-batch on the host (one device-to-host copy of the label mask, the
        sync TRL's own compaction of the valid positions also costs)."""
        labels = inputs["labels"]
        # valid[t]: the next token of position t (labels[t + 1]) is a response token; the last position has none
        valid = F.pad(labels[:, 1:] != -100, (0, 1), value=False).reshape(-1).cpu()
        halves = halves.cpu()
        return plan_micro_batch(
            valid, self._sequence_bounds(inputs, halves), halves, self.args.mixup_coef > 0, self.args.ntp_loss_on
        )

    def _sample_lambdas(self, num_pairs: int, device: torch.device) -> torch.Tensor:
        """lam ~ Beta(alpha, alpha) per pair of this rank's micro-batch.

        Drawn from the device's global generator, which the Trainer seeds and checkpoints, so runs are reproducible
        and a resumed run continues the same draws. Every rank starts from the same seed, so each draws the lambdas
        of all ranks' pairs (the generators stay in step) and keeps its own row: pairs on different ranks get
        different lambdas, and a data-parallel run draws what one process with the ranks' micro-batches side by
        side would. Every micro-batch draws as many as a micro-batch can have pairs, so that micro-batches with
        fewer (the last one, packed rows) do not move the generators of the ranks apart.
        """
        if self._lambda_distribution is None or self._lambda_distribution.concentration1.device != device:
            alpha = torch.tensor(self.args.mixup_alpha, dtype=torch.float32, device=device)
            self._lambda_distribution = torch.distributions.Beta(alpha, alpha)
        # a packed row holds up to max_length sequences, so a micro-batch up to B/2 * max_length pairs
        most_pairs = self.args.per_device_train_batch_size // 2 * (self.args.max_length if self.args.packing else 1)
        per_rank = max(most_pairs, num_pairs)
        every_rank = self._lambda_distribution.sample((self.accelerator.num_processes, per_rank))
        return every_rank[self.accelerator.process_index, :num_pairs]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        halves = inputs.pop(HALF_COLUMN, None)
        if not self.model.training:
            # evaluation is SFTTrainer's plain next-token loss
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        if halves is None:
            raise ValueError(
                f"The training batch carries no {HALF_COLUMN!r} flags, so its pairs cannot be formed. Train batches "
                "must come from SFTMixTrainer's own dataloader and collator."
            )

        labels = inputs["labels"]
        device = labels.device
        plan = self._plan_loss(inputs, halves)
        lambdas = self._sample_lambdas(plan.num_pairs, device)
        # Trainer leaves gradient accumulation to the loss when it passes `num_items_in_batch` (TRL divides the
        # next-token sum by it); L_Mixup and the router loss are per-micro-batch means, so they are divided by the
        # accumulation steps here. Outside the training loop (no accumulation under way) there is one micro-batch.
        accumulation = getattr(self, "current_gradient_accumulation_steps", 1) if num_items_in_batch is not None else 1
        # Like TRL: `num_items_in_batch` counts the tokens of every rank and DDP averages the gradients across ranks;
        # clamped so that a step without next-token targets (the median example alone under a one-half ablation)
        # gives a finite zero rather than 0 / 0
        ntp_normalizer = num_items_in_batch
        if num_items_in_batch is not None:
            ntp_normalizer = torch.as_tensor(num_items_in_batch, device=device).clamp(min=1)
            if self.args.average_tokens_across_devices:
                ntp_normalizer = ntp_normalizer / (self.accelerator.num_processes // self.get_tp_size())

        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        model_inputs["use_cache"] = False
        if self.aux_loss_enabled:
            model_inputs["output_router_logits"] = True
        shifted_targets = F.pad(labels[:, 1:], (0, 1), value=-100).reshape(-1)
        rows = plan.rows.to(device, non_blocking=True)
        loss_inputs = dict(
            rows=rows,
            targets=shifted_targets.index_select(0, rows),
            mix_index=plan.mix_index.to(device, non_blocking=True),
            mix_lambda=lambdas.index_select(0, plan.mix_pair.to(device, non_blocking=True)),
            mix_weight=(plan.mix_weight / accumulation).to(device, torch.float32, non_blocking=True),
            ntp_mask=plan.ntp_mask.to(device, non_blocking=True) if plan.ntp_mask is not None else None,
            ntp_normalizer=ntp_normalizer,
        )
        # The whole loss runs inside the (DDP / FSDP / DeepSpeed) wrapper's forward, so gradient sync is armed and
        # sharded weights are gathered, as in TRL's DistillationTrainer.
        unwrapped_model = self.accelerator.unwrap_model(model)
        outputs = self._forward_redirection(
            model, unwrapped_model, self._fused_loss, unwrapped_model, model_inputs, loss_inputs
        )
        loss = outputs["loss"]
        if self.aux_loss_enabled:
            # SFTTrainer's: the router's load-balancing loss times its coefficient, averaged over accumulation steps
            loss = loss + self.router_aux_loss_coef * outputs["aux_loss"] / accumulation
        self._log_train_metrics(inputs, plan, ntp_normalizer, outputs, lambdas, accumulation)
        return (loss, outputs) if return_outputs else loss

    def _fused_loss(self, unwrapped_model, model_inputs: dict, loss_inputs: dict) -> dict[str, torch.Tensor]:
        """Backbone forward and the fused SFTMix loss; runs inside the wrapped model's forward."""
        causal_lm = unwrapped_model.get_base_model() if is_peft_model(unwrapped_model) else unwrapped_model
        backbone_outputs = causal_lm.base_model(**model_inputs)
        hidden_states = backbone_outputs.last_hidden_state
        hidden_states = hidden_states.reshape(-1, hidden_states.size(-1))
        lm_head = causal_lm.get_output_embeddings()
        softcap = _softcap(causal_lm)
        # ZeRO-3 / FSDP2: the sharded head gathered once for the call (see `lm_head.py`)
        with whole_lm_head(lm_head) as (weight, bias):
            hidden = hidden_states.index_select(0, loss_inputs["rows"]).to(weight.device, weight.dtype)
            result = sftmix_linear_cross_entropy(
                hidden,
                weight,
                loss_inputs["targets"].to(weight.device),
                loss_inputs["mix_index"],
                loss_inputs["mix_lambda"],
                loss_inputs["mix_weight"],
                bias=bias,
                ntp_mask=loss_inputs["ntp_mask"],
                ntp_normalizer=loss_inputs["ntp_normalizer"],
                mixup_coef=self.args.mixup_coef,
                impl=self.args.loss_impl,
                logit_softcap=softcap,
                dft=self.args.loss_type == "dft",  # DFT on the next-token term; the Mixup term unchanged
                validate=False,  # the plan is built and checked by `_plan_loss`
            )
        # a plain dict of tensors, so that DDP finds the outputs it needs to track
        outputs = dict(vars(result))
        if model_inputs.get("output_router_logits"):
            outputs["aux_loss"] = _router_aux_loss(causal_lm, backbone_outputs, model_inputs.get("attention_mask"))
        return outputs

    def _log_train_metrics(self, inputs, plan: BatchPlan, ntp_normalizer, outputs, lambdas, accumulation) -> None:
        """SFTTrainer's metrics plus SFTMix's, kept as tensors until `log` (no host sync per step). The next-token
        metrics cover the rows whose next-token term counts (none with ntp_loss_on="none": not logged then)."""
        num_tokens = outputs["num_tokens"].float()
        device = num_tokens.device
        # the kernel divides the next-token sum by the normalizer (the valid-row count when None): undo it
        normalizer = (
            num_tokens.clamp(min=1) if ntp_normalizer is None else torch.as_tensor(ntp_normalizer, device=device)
        )
        ntp_sum = outputs["ntp_loss"].double() * normalizer.double()
        mixup_loss = outputs["mixup_loss"] * accumulation  # back to the micro-batch's L_Mixup
        mixed = torch.zeros(len(lambdas), dtype=torch.bool)
        mixed[plan.mix_pair] = True
        mixed = mixed.to(device, non_blocking=True)
        lambda_sum, mixed_pairs = (lambdas * mixed).sum(), mixed.sum().float()
        mixed_tokens = torch.tensor(float(len(plan.mix_pair)), device=device)
        local = torch.stack(
            [
                ntp_sum.float(),
                num_tokens,
                outputs["entropy"].float() * num_tokens,
                outputs["num_correct"].float(),
                mixup_loss.float(),
                lambda_sum.float(),
                mixed_pairs,
                mixed_tokens,
                # the batch's tokens, as SFTTrainer counts them: padding-free batches have no attention mask
                (
                    inputs["attention_mask"].sum().float().to(device)
                    if "attention_mask" in inputs
                    else torch.tensor(float(inputs["position_ids"].size(1)), device=device)
                ),
                outputs["aux_loss"].detach().float() if "aux_loss" in outputs else torch.zeros((), device=device),
                torch.tensor(float(len(plan.rows)), device=device),
            ]
        )
        # one collective for every metric: (processes, 11) summed over the processes
        totals = self.accelerator.gather(local[None]).view(-1, local.numel()).sum(0)
        ntp_sum, num_tokens, entropy_sum, num_correct, mixup_sum, lambda_sum, mixed_pairs, mixed_tokens = totals[:8]
        seen, aux_sum, response_tokens = totals[8:]
        metrics = self._metrics["train"]
        if "aux_loss" in outputs:
            metrics["aux_loss"].append(aux_sum / self.accelerator.num_processes)
        if self.args.ntp_loss_on != "none":
            valid = num_tokens.clamp(min=1)
            metrics["entropy"].append(entropy_sum / valid)
            metrics["mean_token_accuracy"].append(num_correct / valid)
            metrics["ntp_loss"].append(ntp_sum / valid)
        metrics["mixup_loss"].append(mixup_sum / self.accelerator.num_processes)
        metrics["mixup_lambda"].append(lambda_sum / mixed_pairs.clamp(min=1))
        metrics["mixed_tokens"].append(mixed_tokens)
        # each mixed position interpolates one response token of each side of its pair
        metrics["mixed_fraction"].append(2 * mixed_tokens / response_tokens.clamp(min=1))
        self._total_train_tokens = self._total_train_tokens + seen.long() // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # the training metrics are device tensors until now: read them back once per log
        mode = "train" if self.model.training else "eval"
        for key, values in self._metrics[mode].items():
            self._metrics[mode][key] = [v.item() if isinstance(v, torch.Tensor) else v for v in values]
        super().log(logs, start_time)


def _router_aux_loss(causal_lm, backbone_outputs, attention_mask) -> torch.Tensor:
    """The Mixture-of-Experts load-balancing loss of the backbone's router logits, as the model's own forward (and
    SFTTrainer's fused one) computes it: Mixtral's, which every MoE family in transformers shares. Padding-free
    batches carry no attention mask: every token counts."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    text_config = causal_lm.config.get_text_config()
    return load_balancing_loss_func(
        backbone_outputs.router_logits, text_config.num_experts, text_config.num_experts_per_tok, attention_mask
    )


def _softcap(causal_lm) -> float | None:
    """The soft cap `c * tanh(z / c)` the model applies to its logits (Gemma 2 and later), or None."""
    return getattr(causal_lm.config.get_text_config(), "final_logit_softcapping", None)


def _with_columns(dataset: Dataset, columns: dict[str, list]) -> Dataset:
    """`dataset` with `columns` added (replacing any of the same name). A `with_transform` dataset keeps its
    transform, which receives the stored columns as before; the added ones are passed through beside its output."""
    custom = dataset.format["type"] == "custom"
    table = dataset.with_format(None) if custom else dataset
    for name, values in columns.items():
        if name in table.column_names:
            table = table.remove_columns(name)
        table = table.add_column(name, values)
    if not custom:
        return table
    transform = dataset.format["format_kwargs"]["transform"]
    format_columns = dataset.format["columns"]

    def transform_keeping_columns(batch):
        added = {name: batch.pop(name) for name in columns if name in batch}
        return {**transform(batch), **added}

    table.set_transform(
        transform_keeping_columns,
        columns=None if format_columns is None else [*format_columns, *columns],
        output_all_columns=dataset.format["output_all_columns"],
    )
    return table
