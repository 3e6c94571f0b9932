"""SFTMixTrainer: TRL's SFTTrainer with SFTMix's confidence-balanced micro-batches and Mixup regularization.

The trainer orchestrates; each concern lives in a module named for it: `checks` (what is refused at construction),
`training_data` (the confidence join, the halves, packing each half, the collator), `sampler` (balanced
micro-batches), `batch_plan` (which rows each micro-batch scores and mixes), `micro_batch_loss` (the lambdas, the
backbone forward and the fused loss of `kernels`), `lm_head` (the sharded head gathered for it) and `train_metrics`.
"""

import dataclasses
import textwrap

import torch
from datasets import Dataset, IterableDataset
from transformers import TrainingArguments
from trl import SFTTrainer
from trl.models.utils import _ForwardRedirection
from trl.trainer.utils import get_config_model_id

from . import checks, train_metrics
from .batch_plan import (
    CONFIDENT,
    REMAINDER,
    UNCONFIDENT,
    BatchPlan,
    plan_collated_batch,
    sequence_bounds,
    token_halves,
)
from .config import SFTMixConfig
from .data.formats import check_sft_examples, normalize_content_parts
from .micro_batch_loss import PairLambdas, backbone_and_fused_loss, loss_inputs
from .sampler import BalancedPairSampler
from .training_data import (
    HALF_COLUMN,
    PairedBatchCollator,
    attach_confidence,
    pack_each_half,
    split_into_halves,
)


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
            As in [`~trl.SFTTrainer`], with these restrictions (see "Differences from SFTTrainer" in docs/training.md):
            `args` is an [`SFTMixConfig`] (any other `TrainingArguments` is converted, with the SFTMix defaults);
            `train_dataset` is a map-style text [`~datasets.Dataset`] in any SFTTrainer format (language modeling
            or prompt-completion, standard or conversational, pre-tokenized) with a confidence per example (none
            with `split_by="random"`);
            `compute_loss_func`, vision-language models, prompt-learning PEFT methods and adapters on the LM head
            are refused.
        confidence_scores ([`~datasets.Dataset`], `str`, `os.PathLike` or `Mapping`, *optional*):
            Confidence of the training examples, joined to `train_dataset` by `args.id_column`: a Dataset, a JSON
            Lines / Parquet file or `save_to_disk` directory with `args.id_column` and `args.confidence_column`
            columns, or a mapping `{id: confidence}`. Defaults to `args.confidence_scores_path`, then to the
            dataset's own `args.confidence_column`. Every example that SFTTrainer's preparation keeps needs a finite
            score (one it drops, e.g. left without a trainable token by truncation, needs none); ids are compared as
            strings, and identical examples may share one. With `args.split_by="random"` no score is needed.
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
        # SFTTrainer prepares it (`_prepare_dataset`, which runs before `Trainer.__init__` sets `self.args`: it reads
        # the config it is passed), or right after its construction when preparation is skipped.
        self._raw_train_dataset = train_dataset
        self._confidence_scores = confidence_scores
        self._sftmix_compute_loss_func = compute_loss_func
        self.confidence_split = None  # set when the training set is split into halves
        checks.check_not_empty(train_dataset)
        if isinstance(train_dataset, Dataset | IterableDataset):
            checks.check_model(model, peft_config)

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
        if self.confidence_split is None:  # preparation skipped: the rows are trained as given
            self.train_dataset = self._attach_and_split(self.train_dataset, self.args)
        checks.check_lm_head(self.model)
        checks.check_head_reproduces_logits(self.model)
        checks.check_sequences_stay_whole(self.accelerator.parallelism_config)
        checks.check_loss_impl_runs(self.args.loss_impl, self.args.device)

        self.data_collator = PairedBatchCollator(self.data_collator)
        self._forward_redirection = _ForwardRedirection()
        # built now so that a micro-batch too small to hold a pair fails at construction
        self._pair_sampler: BalancedPairSampler | None = self._get_train_sampler()
        # a packed row holds up to max_length sequences, so a micro-batch up to B/2 * max_length pairs
        most_pairs = self.args.per_device_train_batch_size // 2 * (self.args.max_length if self.args.packing else 1)
        self._pair_lambdas = PairLambdas(
            self.args.mixup_alpha, most_pairs, self.accelerator.num_processes, self.accelerator.process_index
        )

    # ---- the training set: confidence joined by id, split into halves, each half packed on its own ----

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        # SFTTrainer refuses a `with_transform` dataset first thing here; let it
        custom_format = isinstance(dataset, Dataset) and dataset.format["type"] == "custom"
        if dataset is not self._raw_train_dataset or custom_format:
            return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        if packing and args.max_length is None:
            raise ValueError("When packing is enabled, `max_length` can't be `None`.")  # SFTTrainer's own check
        # prepared without TRL's packing, so that examples are truncated and dropped as without packing, and each
        # confidence half is packed on its own afterwards
        if formatting_func is None:
            check_sft_examples(dataset, "The training dataset", args.dataset_text_field)
        dataset = self._attach_confidence(dataset, args)
        prepared = super()._prepare_dataset(dataset, processing_class, args, False, formatting_func, dataset_name)
        halved = self._split(prepared, args)
        return pack_each_half(halved, args) if packing else halved

    def _attach_and_split(self, dataset, args: SFTMixConfig):
        return self._split(self._attach_confidence(dataset, args), args)

    def _attach_confidence(self, dataset, args: SFTMixConfig):
        checks.check_training_setup(dataset, self._is_vlm or self._is_vision_dataset, self._sftmix_compute_loss_func)
        dataset, self._example_confidence = attach_confidence(dataset, self._confidence_scores, args)
        return dataset

    def _split(self, prepared: Dataset, args: SFTMixConfig) -> Dataset:
        halved, self.confidence_split = split_into_halves(prepared, self._example_confidence, args)
        return halved

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
        micro_batch_size = self._train_batch_size
        if self.accelerator.split_batches:
            # accelerate cuts each DataLoader batch into one contiguous slice per rank
            num_processes = self.accelerator.num_processes
            if micro_batch_size % num_processes:
                raise ValueError(
                    f"With `split_batches`, the batch size ({micro_batch_size}) must be a multiple of the number of "
                    f"processes ({num_processes})."
                )
            micro_batch_size //= num_processes
            checks.check_micro_batch_holds_a_pair(micro_batch_size, num_processes)
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
                {**batch, "labels": batch["labels"].masked_fill(self._token_halves(batch) != kept_half, -100)}
                for batch in batch_samples
            ]
        return super()._get_num_items_in_batch(batch_samples, device)

    # ---- the loss ----

    @staticmethod
    def _token_halves(inputs: dict) -> torch.Tensor:
        """The confidence half of each token of a collated training batch, shaped like its labels."""
        halves = inputs[HALF_COLUMN].cpu()
        labels = inputs["labels"]
        return token_halves(halves, sequence_bounds(inputs, halves), labels.numel()).view_as(labels)

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
        plan = plan_collated_batch(inputs, halves, self.args.mixup_coef > 0, self.args.ntp_loss_on)
        lambdas = self._pair_lambdas.sample(plan.num_pairs, labels.device)
        # Trainer leaves gradient accumulation to the loss when it passes `num_items_in_batch` (TRL divides the
        # next-token sum by it); L_Mixup and the router loss are per-micro-batch means, so they are divided by the
        # accumulation steps here. Outside the training loop (no accumulation under way) there is one micro-batch.
        accumulation = getattr(self, "current_gradient_accumulation_steps", 1) if num_items_in_batch is not None else 1
        # Like TRL: `num_items_in_batch` counts the tokens of every rank and DDP averages the gradients across ranks;
        # clamped so that a step without next-token targets (the median example alone under a one-half ablation)
        # gives a finite zero rather than 0 / 0
        ntp_normalizer = num_items_in_batch
        if num_items_in_batch is not None:
            ntp_normalizer = torch.as_tensor(num_items_in_batch, device=labels.device).clamp(min=1)
            if self.args.average_tokens_across_devices:
                ntp_normalizer = ntp_normalizer / (self.accelerator.num_processes // self.get_tp_size())

        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        model_inputs["use_cache"] = False
        if self.aux_loss_enabled:
            model_inputs["output_router_logits"] = True
        # The whole loss runs inside the (DDP / FSDP / DeepSpeed) wrapper's forward, so gradient sync is armed and
        # sharded weights are gathered, as in TRL's DistillationTrainer. The redirection replaces the forward that
        # accelerate wrapped in autocast, so mixed precision is entered here, as the model's own forward would.
        unwrapped_model = self.accelerator.unwrap_model(model)
        with self.accelerator.autocast():
            outputs = self._forward_redirection(
                model,
                unwrapped_model,
                backbone_and_fused_loss,
                unwrapped_model,
                model_inputs,
                loss_inputs(labels, plan, lambdas, accumulation, ntp_normalizer),
                self.args.mixup_coef,
                self.args.loss_impl,
                self.args.loss_type == "dft",  # DFT on the next-token term; the Mixup term unchanged
            )
        loss = outputs["loss"]
        if self.aux_loss_enabled:
            # SFTTrainer's: the router's load-balancing loss times its coefficient, averaged over accumulation steps
            loss = loss + self.router_aux_loss_coef * outputs["aux_loss"] / accumulation
        self._log_train_metrics(inputs, plan, ntp_normalizer, outputs, lambdas, accumulation)
        return (loss, outputs) if return_outputs else loss

    def _log_train_metrics(self, inputs, plan: BatchPlan, ntp_normalizer, outputs, lambdas, accumulation) -> None:
        """SFTTrainer's metrics plus SFTMix's, kept as tensors until `log` (no host sync per step)."""
        local = train_metrics.micro_batch_sums(inputs, plan, ntp_normalizer, outputs, lambdas, accumulation)
        # one collective for every metric: (processes, sums) summed over the processes
        totals = self.accelerator.gather(local[None]).view(-1, local.numel()).sum(0)
        num_processes, has_aux = self.accelerator.num_processes, "aux_loss" in outputs
        seen = train_metrics.record(self._metrics["train"], totals, num_processes, self.args.ntp_loss_on, has_aux)
        self._total_train_tokens = self._total_train_tokens + seen.long() // self._tp_size
        self._metrics["train"]["num_tokens"] = [self._total_train_tokens]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # the training metrics are device tensors until now: read them back once per log
        mode = "train" if self.model.training else "eval"
        for key, values in self._metrics[mode].items():
            self._metrics[mode][key] = [v.item() if isinstance(v, torch.Tensor) else v for v in values]
        super().log(logs, start_time)
