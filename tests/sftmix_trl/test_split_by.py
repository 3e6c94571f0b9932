"""The paper's ablation of the split: `split_by="random"` pairs two random halves of the same sizes as the confidence
split, the same for a seed whatever the row order, and the trainer's micro-batches follow it."""

import random

import pytest
from sftmix_helpers import tiny_config, with_confidence

from sftmix_trl.config import SFTMixConfig
from sftmix_trl.data.split import split_by_confidence, split_examples
from sftmix_trl.trainer import HALF_COLUMN, SFTMixTrainer

import tiny


def _scores(n, seed=0):
    rng = random.Random(seed)
    return [rng.uniform(-10, -1) for _ in range(n)], [f"ex-{i:03d}" for i in range(n)]


def test_the_confidence_split_is_the_default():
    confidence, ids = _scores(21)
    assert split_examples(confidence, ids) == split_by_confidence(confidence, ids)


@pytest.mark.parametrize("n", [20, 21])
def test_random_halves_have_the_confidence_split_sizes_and_cover_every_row(n):
    confidence, ids = _scores(n)
    by_confidence = split_by_confidence(confidence, ids)
    at_random = split_examples(confidence, ids, "random", seed=7)
    sizes = lambda s: (len(s.confident), len(s.unconfident), len(s.remainder))  # noqa: E731
    assert sizes(at_random) == sizes(by_confidence)
    assert sorted(at_random.confident + at_random.unconfident + at_random.remainder) == list(range(n))
    # not the confidence ranking: the random "confident" half holds some of the least confident rows
    assert set(at_random.confident) & set(by_confidence.unconfident)


def test_random_halves_depend_on_the_seed_and_the_ids_not_the_row_order():
    confidence, ids = _scores(40)
    first = split_examples(confidence, ids, "random", seed=1)
    again = split_examples(confidence, ids, "random", seed=1)
    assert first == again
    assert set(first.confident) != set(split_examples(confidence, ids, "random", seed=2).confident)
    order = list(range(40))
    random.Random(5).shuffle(order)
    shuffled = split_examples([confidence[i] for i in order], [ids[i] for i in order], "random", seed=1)
    assert {ids[order[row]] for row in shuffled.confident} == {ids[row] for row in first.confident}


def test_random_halves_are_balanced_in_confidence_on_average():
    # over many seeds, a row lands in the "confident" half about half the time, whatever its confidence
    confidence, ids = _scores(20)
    top = split_by_confidence(confidence, ids).confident[0]
    hits = sum(top in split_examples(confidence, ids, "random", seed=s).confident for s in range(400))
    assert 160 < hits < 240


def test_bad_split_methods_are_refused(tmp_path):
    confidence, ids = _scores(8)
    with pytest.raises(ValueError, match="`split_by` must be one of"):
        split_examples(confidence, ids, "entropy")
    with pytest.raises(ValueError, match="`split_by` must be 'confidence' or 'random'"):
        SFTMixConfig(str(tmp_path), split_by="entropy", use_cpu=True, bf16=False)
    # the scores are validated for a random split too: both arms train on the same examples
    with pytest.raises(ValueError, match="NaN or infinite"):
        split_examples([float("nan"), *confidence[1:]], ids, "random")


def test_the_trainer_pairs_the_random_halves(tokenizer, tmp_path):
    dataset = with_confidence(tiny.prompt_completion_dataset(16))
    args = tiny_config(tmp_path, split_by="random", seed=3)
    trainer = SFTMixTrainer(tiny.build_llama(tokenizer), args=args, train_dataset=dataset, processing_class=tokenizer)
    ids = list(dataset["id"])
    expected = split_examples(list(dataset["confidence"]), ids, "random", seed=3)
    halves = dict(zip(trainer.train_dataset["id"], trainer.train_dataset[HALF_COLUMN]))
    assert {i for i, h in halves.items() if h == 0} == {ids[row] for row in expected.confident}
    assert {i for i, h in halves.items() if h == 1} == {ids[row] for row in expected.unconfident}
    # and every micro-batch holds two examples of each random half, confident side first
    for batch in trainer.get_train_dataloader():
        assert batch[HALF_COLUMN].tolist() == [0, 0, 1, 1]


def test_a_random_split_needs_no_scores(tokenizer, tmp_path):
    # the halves depend on the ids and the seed alone: the same halves as from any scores of the same examples
    dataset = tiny.prompt_completion_dataset(16)
    args = tiny_config(tmp_path, split_by="random", seed=3)
    trainer = SFTMixTrainer(tiny.build_llama(tokenizer), args=args, train_dataset=dataset, processing_class=tokenizer)
    scored = SFTMixTrainer(
        tiny.build_llama(tokenizer), args=args, train_dataset=with_confidence(dataset), processing_class=tokenizer
    )
    assert trainer.train_dataset[HALF_COLUMN] == scored.train_dataset[HALF_COLUMN]
    assert sorted(trainer.train_dataset[HALF_COLUMN]) == [0] * 8 + [1] * 8
    trainer.train()
    assert trainer.state.global_step == 12 and trainer.state.log_history[0]["mixup_loss"] > 0  # 3 epochs of 4 steps
    # the confidence split still needs them, and says how to do without
    with pytest.raises(ValueError, match=r"no `confidence_scores` were given.*`split_by='random'`.*needs no scores"):
        SFTMixTrainer(
            tiny.build_llama(tokenizer), args=tiny_config(tmp_path), train_dataset=dataset, processing_class=tokenizer
        )
