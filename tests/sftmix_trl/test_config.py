"""SFTMixConfig: defaults, TRL's documentation conventions, and validation."""

import dataclasses
import math

import pytest
from transformers import HfArgumentParser
from trl import SFTConfig

from sftmix_trl.config import SFTMixConfig

SFTMIX_FIELDS = [
    f for f in dataclasses.fields(SFTMixConfig) if f.name not in {g.name for g in dataclasses.fields(SFTConfig)}
]


def make(**kwargs):
    return SFTMixConfig(output_dir="unused", use_cpu=True, report_to="none", **kwargs)


def test_defaults_are_the_papers():
    config = make()
    assert (config.mixup_alpha, config.mixup_coef) == (0.5, 0.2)
    assert (config.ntp_loss_on, config.loss_impl) == ("all", "auto")
    assert (config.confidence_column, config.id_column, config.confidence_scores_path) == ("confidence", "id", None)
    assert isinstance(config, SFTConfig)


def test_every_field_is_documented_in_the_docstring_and_the_help():
    assert {f.name for f in SFTMIX_FIELDS} == {
        "mixup_alpha",
        "mixup_coef",
        "ntp_loss_on",
        "loss_impl",
        "confidence_column",
        "id_column",
        "confidence_scores_path",
        "split_by",
    }
    for f in SFTMIX_FIELDS:
        assert f"        {f.name} (`" in SFTMixConfig.__doc__, f.name
        assert f.metadata.get("help"), f.name


def test_the_command_line_parser_accepts_the_fields():
    (config,) = HfArgumentParser(SFTMixConfig).parse_args_into_dataclasses(
        [
            "--output_dir",
            "x",
            "--use_cpu",
            "--mixup_alpha",
            "0.3",
            "--ntp_loss_on",
            "confident",
            "--loss_impl",
            "torch",
        ]
    )
    assert (config.mixup_alpha, config.ntp_loss_on, config.loss_impl) == (0.3, "confident", "torch")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mixup_alpha=0.0), "mixup_alpha"),
        (dict(mixup_alpha=-1.0), "mixup_alpha"),
        (dict(mixup_alpha=math.inf), "mixup_alpha"),
        (dict(mixup_coef=-0.1), "mixup_coef"),
        (dict(mixup_coef=math.nan), "mixup_coef"),
        (dict(ntp_loss_on="half"), "ntp_loss_on"),
        (dict(ntp_loss_on="none", mixup_coef=0.0), "leaves no loss"),
        (dict(loss_impl="cuda"), "loss_impl"),
        (dict(packing=True, packing_strategy="wrapped"), "needs `packing_strategy='bfd'`"),
        (dict(packing=True, packing_strategy="bfd_split"), "needs `packing_strategy='bfd'`"),
        (dict(per_device_train_batch_size=1), "`per_device_train_batch_size` of at least 2, got 1"),
        (dict(train_sampling_strategy="group_by_length"), "train_sampling_strategy"),
        (dict(label_smoothing_factor=0.1), "label_smoothing_factor"),
    ],
)
def test_bad_values_are_refused_with_a_clear_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make(**kwargs)


def test_ablation_switches_are_accepted():
    for subset in ("all", "confident", "unconfident", "none"):
        assert make(ntp_loss_on=subset).ntp_loss_on == subset
    assert make(mixup_coef=0.0).mixup_coef == 0.0
    # what SFTTrainer accepts and SFTMix can do: padding-free batches, packed evaluation, odd micro-batches
    assert make(padding_free=True, eval_packing=True, per_device_train_batch_size=3).padding_free
