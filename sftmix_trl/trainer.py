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
from datasets import Dataset, IterableDataset
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel, ProcessorMixin, TrainingArguments
from trl import SFTTrainer
from trl.models.utils import _ForwardRedirection
from trl.trainer.utils import get_config_model_id, maybe_gather_lm_head_ctx

from .config import SFTMixConfig
from .data_utils import SCORE_COLUMNS, check_unique_ids, derive_example_id, split_by_confidence, split_examples
from .kernels import sftmix_linear_cross_entropy
from .kernels.reference import head_logits
from .sampler import BalancedPairSampler

# Column added to the prepared training dataset and carried through the collator: 0 for the confident half, 1 for
# the unconfident half, -1 for the median example that belongs to neither (odd dataset sizes).
HALF_COLUMN = "sftmix_half"
CONFIDENT, UNCONFIDENT, REMAINDER = 0, 1, -1

# Config attributes of LM heads that scale the logits; the fused loss only knows a soft cap.
_LOGIT_SCALE_ATTRIBUTES = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


@dataclass
class PairedBatchCollator:
    """Wraps a collator so that each batch also carries the examples' confidence-half flags as `sftmix_half`."""

    collator: Callable

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        if HALF_COLUMN not in examples[0]:
            return self.collator(examples)
        halves = torch.tensor([example[HALF_COLUMN] for example in examples], dtype=torch.int64)
        batch = self.collator([{k: v for k, v in example.items() if k != HALF_COLUMN} for example in examples])
        batch[HALF_COLUMN] = halves
        return batch


@dataclass
class _LossPlan:
    """The fused-loss call of a micro-batch, on the host: which flattened (batch x sequence) positions it scores,
    how they mix, and which of them carry the next-token term."""

    rows: torch.Tensor  # (N,) positions b * T + t whose next token is a response token
    mix_index: torch.Tensor  # (P, 2) indices into `rows`: (confident side, unconfident side)
    mix_pair: torch.Tensor  # (P,) micro-batch pair of each mixed position
    mix_weight: torch.Tensor  # (P,) 1 / (L_ij * number of mixed pairs)
    ntp_mask: torch.Tensor | None  # (N,) rows whose next-token term counts (the ablations); None: all of them


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
    ids = [str(example_id) for example_id in ids]
    try:
        check_unique_ids(ids)
    except ValueError as error:
        raise ValueError(f"In the confidence scores: {error}") from None
    return {example_id: (math.nan if s is None else float(s)) for example_id, s in zip(ids, scores)}


class SFTMixTrainer(SFTTrainer):
    """
    Trainer for SFTMix instruction tuning ([arXiv 2410.05248](https://huggingface.co/papers/2410.05248)), a drop-in
    replacement for [`~trl.SFTTrainer`].

    The training set is split at its median confidence into a confident and an unconfident half. Every micro-batch of
    every rank holds `per_device_train_batch_size // 2` examples of each half: pair `i` is the `i`-th confident and
    the `i`-th unconfident example of the micro-batch, paired at random and reshuffled every epoch. For each pair the
    last hidden states (the LM head's input) of the first `min(|r_c|, |r_u|)` response positions of each side are
    interpolated with `lam ~ Beta(mixup_alpha, mixup_alpha)`, and the loss is

        L = L_NTP + mixup_coef * L_Mixup,
        L_Mixup = mean over pairs of (1 / L_ij) sum_l CE(z~_l, lam e_t_c + (1 - lam) e_t_u)

    computed by the fused loss of `sftmix_trl.kernels` without materializing the logits. Evaluation is SFTTrainer's
    plain next-token loss.

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
            As in [`~trl.SFTTrainer`], with these restrictions: `args` is an [`SFTMixConfig`] (any other
            `TrainingArguments` is converted, with the SFTMix defaults); `train_dataset` is a map-style text
            [`~datasets.Dataset`] in any SFTTrainer format (language modeling or prompt-completion, standard or
            conversational, pre-tokenized) with a confidence per example; prompt-learning PEFT methods and adapters
            on the LM head are refused.
        confidence_scores ([`~datasets.Dataset`], `str`, `os.PathLike` or `Mapping`, *optional*):
            Confidence of the training examples, joined to `train_dataset` by `args.id_column`: a Dataset, a JSON
            Lines / Parquet file or `save_to_disk` directory with `args.id_column` and `args.confidence_column`
            columns, or a mapping `{id: confidence}`. Defaults to `args.confidence_scores_path`, then to the
            dataset's own `args.confidence_column`. Every training example needs a finite score; ids are compared as
            strings.
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

        self._check_model_and_data(model, train_dataset, processing_class, peft_config, compute_loss_func)
        # Validate every score before the (possibly long) dataset preparation; the split itself is made afterwards,
        # on the rows that preparation keeps (it drops examples left without trainable tokens).
        train_dataset, confidence_by_id = self._attach_confidence(train_dataset, args, confidence_scores)

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
        self._check_lm_head(self.model)
        self._check_head_reproduces_logits(self.model)
        if self.aux_loss_enabled:
            raise ValueError(
                "SFTMix does not add the Mixture-of-Experts load-balancing loss: set `router_aux_loss_coef=0.0`."
            )

        self.train_dataset, self.confidence_split = self._split_prepared_dataset(self.train_dataset, confidence_by_id)
        self.data_collator = PairedBatchCollator(self.data_collator)
        self._forward_redirection = _ForwardRedirection()
        # built now so that a dataset too small for one balanced micro-batch per rank fails at construction
        self._pair_sampler: BalancedPairSampler | None = self._get_train_sampler()
        self._lambda_distribution: torch.distributions.Beta | None = None
        self._zero3_head_checked = False

    # ---- construction checks and the confidence split ----

    @staticmethod
    def _check_model_and_data(model, train_dataset, processing_class, peft_config, compute_loss_func) -> None:
        if isinstance(train_dataset, IterableDataset):
            raise TypeError(
                "SFTMixTrainer needs a map-style `datasets.Dataset`: the confidence split is a median over the whole "
                "training set and every micro-batch is drawn from both halves. Materialize the IterableDataset first "
                "(e.g. `Dataset.from_generator`)."
            )
        if train_dataset is None or not isinstance(train_dataset, Dataset):
            raise TypeError(f"`train_dataset` must be a `datasets.Dataset`, got {type(train_dataset).__name__}.")
        if isinstance(processing_class, ProcessorMixin) or {"image", "images"} & set(train_dataset.column_names):
            raise ValueError("SFTMixTrainer trains text-only models; vision-language datasets are not supported.")
        if compute_loss_func is not None:
            raise ValueError("SFTMixTrainer computes its own loss; `compute_loss_func` cannot be used with it.")
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

    @staticmethod
    def _attach_confidence(train_dataset: Dataset, args: SFTMixConfig, confidence_scores):
        """Give every example an id (its own column, or one derived from its content) and check that each has a
        finite confidence, from `confidence_scores` or the dataset's confidence column. Returns the dataset (with
        the id column) and the scores keyed by id."""
        if args.id_column not in train_dataset.column_names:
            exclude = SCORE_COLUMNS | {args.confidence_column}
            ids = [derive_example_id(example, exclude=exclude) for example in train_dataset]
            train_dataset = train_dataset.add_column(args.id_column, ids)
        ids = [str(example_id) for example_id in list(train_dataset[args.id_column])]

        if confidence_scores is None:
            confidence_scores = args.confidence_scores_path
        if confidence_scores is not None:
            confidence_by_id = load_confidence_scores(confidence_scores, args.id_column, args.confidence_column)
            missing = [example_id for example_id in ids if example_id not in confidence_by_id]
            if missing:
                shown = ", ".join(repr(m) for m in missing[:5])
                raise ValueError(
                    f"{len(missing)} of {len(ids)} training example(s) have no confidence score, e.g. {shown} (joined "
                    f"on {args.id_column!r}). Score every training example, or drop the unscored ones."
                )
        elif args.confidence_column in train_dataset.column_names:
            confidences = [math.nan if c is None else c for c in list(train_dataset[args.confidence_column])]
            confidence_by_id = dict(zip(ids, confidences))
        else:
            raise ValueError(
                f"The training dataset has no {args.confidence_column!r} column and no `confidence_scores` were "
                "given. SFTMix splits the data by confidence: add the column, or pass scores keyed by "
                f"{args.id_column!r} (`confidence_scores=` or `confidence_scores_path`)."
            )
        # validates the scores (finite, unique ids, at least two examples per half) before any tokenization
        split_by_confidence([confidence_by_id[example_id] for example_id in ids], ids)
        return train_dataset, confidence_by_id

    def _split_prepared_dataset(self, dataset: Dataset, confidence_by_id: dict[str, float]):
        """Split the prepared rows at the median confidence and record each row's half in `sftmix_half`."""
        if self.args.id_column not in dataset.column_names:
            raise ValueError(
                f"The prepared training dataset lost its {self.args.id_column!r} column, which SFTMix needs to join "
                "the confidence scores."
            )
        ids = [str(example_id) for example_id in list(dataset[self.args.id_column])]
        confidences = [confidence_by_id[example_id] for example_id in ids]
        split = split_examples(confidences, ids, self.args.split_by, self.args.seed)  # halves by confidence or random
        halves = [REMAINDER] * len(ids)
        for row in split.confident:
            halves[row] = CONFIDENT
        for row in split.unconfident:
            halves[row] = UNCONFIDENT
        if HALF_COLUMN in dataset.column_names:
            dataset = dataset.remove_columns(HALF_COLUMN)
        return dataset.add_column(HALF_COLUMN, halves), split

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if HALF_COLUMN not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, HALF_COLUMN]

    # ---- balanced micro-batches ----

    def _get_train_sampler(self, train_dataset: Dataset | None = None) -> BalancedPairSampler:
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if HALF_COLUMN not in dataset.column_names:
            raise ValueError(f"The training dataset has no {HALF_COLUMN!r} column; build it with SFTMixTrainer.")
        halves = torch.tensor(list(dataset[HALF_COLUMN]))
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
        self._pair_sampler = BalancedPairSampler(
            confident=(halves == CONFIDENT).nonzero().flatten().tolist(),
            unconfident=(halves == UNCONFIDENT).nonzero().flatten().tolist(),
            micro_batch_size=micro_batch_size,
            num_replicas=num_processes,
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
                {**batch, "labels": batch["labels"].masked_fill((batch[HALF_COLUMN] != kept_half)[:, None], -100)}
                for batch in batch_samples
            ]
        return super()._get_num_items_in_batch(batch_samples, device)

    # ---- the loss ----

    def _plan_loss(self, labels: torch.Tensor, halves: torch.Tensor) -> _LossPlan:
        """Check the micro-batch layout and plan the fused-loss call, on the host (one device-to-host copy of the
        label mask, the sync TRL's own compaction of the valid positions also costs)."""
        batch_size, seq_len = labels.shape
        host = torch.cat([halves.view(-1, 1), (labels[:, 1:] != -100).long()], dim=1).cpu()
        halves = host[:, 0]
        # valid[b, t]: the next token of position t (labels[b, t + 1]) is a response token; the last position has none
        valid = torch.zeros(batch_size, seq_len, dtype=torch.bool)
        valid[:, :-1] = host[:, 1:].bool()
        num_pairs = batch_size // 2
        expected = torch.tensor([CONFIDENT] * num_pairs + [UNCONFIDENT] * num_pairs)
        if batch_size % 2 or not torch.equal(halves, expected):
            raise ValueError(
                f"compute_loss got a micro-batch with confidence halves {halves.tolist()}, but SFTMix pairs example i "
                f"with example i + B/2 and needs the first half confident ({CONFIDENT}) and the second unconfident "
                f"({UNCONFIDENT}). Train batches must come from SFTMixTrainer's own sampler: do not override "
                "`get_train_dataloader`, change the batch size after construction, or use accelerate's "
                "`dispatch_batches`."
            )
        # rows: the flattened positions b * T + t of the valid entries, in order
        rows = valid.reshape(-1).nonzero().flatten()
        counts = valid.sum(dim=1)
        offsets = counts.cumsum(0) - counts  # where each sequence's valid rows start in `rows`

        mixing = self.args.mixup_coef > 0
        # L_ij = min(|r_c|, |r_u|): the first L_ij response positions of each side of pair i are mixed
        mixed_lengths = (
            torch.minimum(counts[:num_pairs], counts[num_pairs:]) if mixing else torch.zeros(0, dtype=torch.int64)
        )
        mix_pair = torch.repeat_interleave(torch.arange(len(mixed_lengths)), mixed_lengths)
        position = torch.arange(len(mix_pair)) - (mixed_lengths.cumsum(0) - mixed_lengths)[mix_pair]
        confident_side = offsets[mix_pair] + position
        unconfident_side = offsets[num_pairs + mix_pair] + position
        # w = 1 / (L_ij * number of pairs with something to mix): L_Mixup is a mean over pairs of per-pair means
        num_mixed_pairs = (mixed_lengths > 0).sum().clamp(min=1)
        mix_weight = 1.0 / (mixed_lengths[mix_pair] * num_mixed_pairs).double()

        # Ablations (paper §5.3-5.4): every response row stays in the call, so mixed rows keep their targets for
        # the Mixup term, but the next-token term counts on the kept half only, or nowhere
        ntp_mask = None
        if self.args.ntp_loss_on == "none":
            ntp_mask = torch.zeros(len(rows), dtype=torch.bool)
        elif self.args.ntp_loss_on != "all":
            kept_half = CONFIDENT if self.args.ntp_loss_on == "confident" else UNCONFIDENT
            ntp_mask = halves[rows // seq_len] == kept_half
        mix_index = torch.stack([confident_side, unconfident_side], 1)
        return _LossPlan(rows, mix_index, mix_pair, mix_weight, ntp_mask)

    def _sample_lambdas(self, num_pairs: int, device: torch.device) -> torch.Tensor:
        """lam ~ Beta(alpha, alpha) per pair of this rank's micro-batch.

        Drawn from the device's global generator, which the Trainer seeds and checkpoints, so runs are reproducible
        and a resumed run continues the same draws. Every rank starts from the same seed, so each draws the lambdas
        of all ranks' pairs (the generators stay in step) and keeps its own row: pairs on different ranks get
        different lambdas, and a data-parallel run draws what one process with the ranks' micro-batches side by
        side would.
        """
        if self._lambda_distribution is None or self._lambda_distribution.concentration1.device != device:
            alpha = torch.tensor(self.args.mixup_alpha, dtype=torch.float32, device=device)
            self._lambda_distribution = torch.distributions.Beta(alpha, alpha)
        every_rank = self._lambda_distribution.sample((self.accelerator.num_processes, num_pairs))
        return every_rank[self.accelerator.process_index]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        halves = inputs.pop(HALF_COLUMN, None)
        if not self.model.training:
            # evaluation is SFTTrainer's plain next-token loss
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        if halves is None:
            raise ValueError(
                f"The training batch carries no {HALF_COLUMN!r} flags, so its pairs cannot be checked. Train batches "
                "must come from SFTMixTrainer's own dataloader and collator."
            )

        labels = inputs["labels"]
        device = labels.device
        num_pairs = labels.shape[0] // 2
        plan = self._plan_loss(labels, halves)
        lambdas = self._sample_lambdas(num_pairs, device)
        # Trainer leaves gradient accumulation to the loss when it passes `num_items_in_batch` (TRL divides the
        # next-token sum by it); L_Mixup is a per-micro-batch mean, so it is divided by the accumulation steps here.
        accumulation = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
        # Like TRL: `num_items_in_batch` counts the tokens of every rank and DDP averages the gradients across ranks
        ntp_normalizer = num_items_in_batch
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            ntp_normalizer = torch.as_tensor(num_items_in_batch, device=device) / (
                self.accelerator.num_processes // self.get_tp_size()
            )

        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        model_inputs["use_cache"] = False
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
        if not self._zero3_head_checked:
            self._register_head_with_zero3(unwrapped_model)
        outputs = self._forward_redirection(
            model, unwrapped_model, self._fused_loss, unwrapped_model, model_inputs, loss_inputs
        )
        self._log_train_metrics(inputs, plan, ntp_normalizer, outputs, lambdas, accumulation)
        return (outputs["loss"], outputs) if return_outputs else outputs["loss"]

    def _register_head_with_zero3(self, unwrapped_model) -> None:
        """DeepSpeed ZeRO-3 (not testable here): the fused loss reads the LM head's weight outside the head's own
        forward, and its backward recomputes the logits from it. Registered as an external parameter of the module
        whose forward runs the loss, the weight is gathered for that forward and again for its backward."""
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():
            import deepspeed

            head = unwrapped_model.get_output_embeddings()
            for parameter in (head.weight, head.bias):
                if parameter is not None:
                    deepspeed.zero.register_external_parameter(unwrapped_model, parameter)
        self._zero3_head_checked = True

    def _fused_loss(self, unwrapped_model, model_inputs: dict, loss_inputs: dict) -> dict[str, torch.Tensor]:
        """Backbone forward and the fused SFTMix loss; runs inside the wrapped model's forward."""
        causal_lm = unwrapped_model.get_base_model() if is_peft_model(unwrapped_model) else unwrapped_model
        hidden_states = causal_lm.base_model(**model_inputs).last_hidden_state
        hidden_states = hidden_states.reshape(-1, hidden_states.size(-1))
        lm_head = causal_lm.get_output_embeddings()
        softcap = _softcap(causal_lm)
        # ZeRO-3: gather the partitioned head for the call; FSDP2: one all-gather of the DTensor head per step
        with maybe_gather_lm_head_ctx(lm_head.weight, lm_head.bias):
            weight, bias = lm_head.weight, lm_head.bias
            if isinstance(weight, DTensor):
                weight = weight.full_tensor()
                bias = bias.full_tensor() if bias is not None else None
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
                validate=False,  # the plan is built and checked by `_plan_loss`
            )
        # a plain dict of tensors, so that DDP finds the outputs it needs to track
        return dict(vars(result))

    def _log_train_metrics(self, inputs, plan: _LossPlan, ntp_normalizer, outputs, lambdas, accumulation) -> None:
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
                inputs["attention_mask"].sum().float().to(device),
            ]
        )
        # one collective for every metric: (processes, 9) summed over the processes
        totals = self.accelerator.gather(local[None]).view(-1, local.numel()).sum(0)
        ntp_sum, num_tokens, entropy_sum, num_correct, mixup_sum, lambda_sum, mixed_pairs, mixed_tokens, seen = totals
        metrics = self._metrics["train"]
        if self.args.ntp_loss_on != "none":
            valid = num_tokens.clamp(min=1)
            metrics["entropy"].append(entropy_sum / valid)
            metrics["mean_token_accuracy"].append(num_correct / valid)
            metrics["ntp_loss"].append(ntp_sum / valid)
        metrics["mixup_loss"].append(mixup_sum / self.accelerator.num_processes)
        metrics["mixup_lambda"].append(lambda_sum / mixed_pairs.clamp(min=1))
        metrics["mixed_tokens"].append(mixed_tokens)
        self._total_train_tokens = self._total_train_tokens + seen.long() // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # the training metrics are device tensors until now: read them back once per log
        mode = "train" if self.model.training else "eval"
        for key, values in self._metrics[mode].items():
            self._metrics[mode][key] = [v.item() if isinstance(v, torch.Tensor) else v for v in values]
        super().log(logs, start_time)


def _softcap(causal_lm) -> float | None:
    """The soft cap `c * tanh(z / c)` the model applies to its logits (Gemma 2 and later), or None."""
    return getattr(causal_lm.config.get_text_config(), "final_logit_softcapping", None)
