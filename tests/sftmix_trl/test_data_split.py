import math

import pytest

from sftmix_trl.data.split import split_by_confidence


def test_split_is_equal_sized_ranked_and_deterministic():
    ids = [f"e{i}" for i in range(7)]
    confidence = [0.0, 5.0, 1.0, 5.0, -2.0, 3.0, 1.0]
    split = split_by_confidence(confidence, ids)
    # ranking: e1 (5), e3 (5, tie -> id order), e5 (3), e2 (1), e6 (1), e0 (0), e4 (-2)
    assert split.confident == [1, 3, 5]
    assert split.remainder == [2]
    assert split.unconfident == [6, 0, 4]


def test_duplicated_examples_share_an_id_and_are_split_by_row():
    split = split_by_confidence([2.0, 1.0, 2.0, 1.0, 0.5], ["a", "b", "a", "b", "c"])
    assert (split.confident, split.remainder, split.unconfident) == ([0, 2], [1], [3, 4])
    two = split_by_confidence([0.0, 1.0], ["x", "y"])
    assert (two.confident, two.unconfident, two.remainder) == ([1], [0], [])


@pytest.mark.parametrize(
    "confidence, ids, message",
    [
        ([1.0, math.nan, 2.0, 3.0], ["a", "b", "c", "d"], "NaN or infinite"),
        ([1.0, math.inf, 2.0, 3.0], ["a", "b", "c", "d"], "NaN or infinite"),
        ([1.0], ["a"], "needs at least two training examples"),
    ],
)
def test_split_rejects_bad_scores(confidence, ids, message):
    with pytest.raises(ValueError, match=message):
        split_by_confidence(confidence, ids)
