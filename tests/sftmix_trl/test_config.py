"""SFTMixConfig: defaults, TRL's documentation conventions, and validation."""

import dataclasses
import math

import pytest
import torch
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
        # torch's float32 Beta sampler draws lam = 0.5 for some pairs below alpha = 0.01
        (dict(mixup_alpha=1e-3), r"`mixup_alpha` .* at least 0.01, got 0.001: below it torch's float32 Beta sampler"),
        # finite in Python, infinite in float32; or large enough to overflow half precision
        (dict(mixup_coef=1e39), r"`mixup_coef` must be a number between 0 and 10000, got 1e\+39"),
        (dict(mixup_coef=1e5), r"between 0 and 10000, got 100000.0"),
        (dict(gradient_accumulation_steps=0), r"`gradient_accumulation_steps` must be at least 1"),
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


def test_the_mixup_alpha_bound_is_where_the_sampler_stops_drawing_half():
    # at the bound no draw comes out exactly 0.5 (the sampler's failure below it) and the draws sit near 0 or 1
    torch.manual_seed(0)
    alpha = torch.tensor(make(mixup_alpha=0.01).mixup_alpha, dtype=torch.float32)
    lam = torch.distributions.Beta(alpha, alpha).sample((20_000,))
    assert (lam == 0.5).sum() == 0 and ((lam < 0.01) | (lam > 0.99)).float().mean() > 0.9
    lam = torch.distributions.Beta(torch.tensor(1e-3), torch.tensor(1e-3)).sample((20_000,))
    assert (lam == 0.5).float().mean() > 0.1  # what the bound keeps out


@pytest.mark.parametrize(
    "line, message",
    [
        ("mixup_alpha: [0.3]", r"`mixup_alpha` must be a number, got \[0.3\] \(list\)"),
        ("per_device_train_batch_size: 2.5", r"`per_device_train_batch_size` must be an integer, got 2.5 \(float\)"),
        ("lm_eval_tasks: [pubmedqa, 3]", r"`lm_eval_tasks` must be a list of strings, got \['pubmedqa', 3\]"),
    ],
)
def test_wrongly_typed_config_values_are_named(tmp_path, line, message):
    from sftmix_trl.recipe import parse_recipe_args

    config = tmp_path / "config.yaml"
    config.write_text(f"model_name_or_path: m\ndataset_name: d\nuse_cpu: true\n{line}\n")
    with pytest.raises(TypeError, match=message):
        parse_recipe_args(["--config", str(config)])


def test_a_list_field_given_one_string_in_a_config_is_a_list_of_one(tmp_path):
    from sftmix_trl.recipe import parse_recipe_args

    config = tmp_path / "config.yaml"
    config.write_text("model_name_or_path: m\ndataset_name: d\nuse_cpu: true\nlm_eval_tasks: pubmedqa\n")
    config.write_text(config.read_text() + "use_peft: true\nlora_target_modules: all-linear\n")
    recipe, _, model_args = parse_recipe_args(["--config", str(config)])
    assert recipe.lm_eval_tasks == ["pubmedqa"] and model_args.lora_target_modules == "all-linear"
