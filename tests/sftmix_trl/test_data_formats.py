import pytest
from datasets import Dataset

from sftmix_trl.data.formats import alpaca_to_prompt_completion, expand_multiturn, normalize_content_parts

import tiny


def _conversation(k):
    messages = [{"role": "system", "content": "Be brief."}]
    for t in range(1, k + 1):
        messages += [{"role": "user", "content": f"question {t}"}, {"role": "assistant", "content": f"answer {t}"}]
    return messages


def test_k_turn_conversation_becomes_k_examples_with_history():
    dataset = Dataset.from_list(
        [
            {"prompt_id": "c1", "messages": _conversation(3)},
            {"prompt_id": "c2", "messages": _conversation(1)},
        ]
    )
    expanded = expand_multiturn(dataset)
    assert expanded["id"] == ["c1-1", "c1-2", "c1-3", "c2-1"]
    third = expanded[2]
    assert [m["content"] for m in third["prompt"]] == [
        "Be brief.",
        "question 1",
        "answer 1",
        "question 2",
        "answer 2",
        "question 3",
    ]
    assert third["completion"] == [{"role": "assistant", "content": "answer 3"}]
    assert [m["role"] for m in expanded[3]["prompt"]] == ["system", "user"]


def test_expansion_rejects_assistant_without_user_turn():
    dataset = Dataset.from_list([{"messages": [{"role": "assistant", "content": "hi"}]}])
    with pytest.raises(ValueError, match="does not follow a user message"):
        expand_multiturn(dataset)


def test_alpaca_rows_become_conversational_prompt_completion_with_stable_ids():
    rows = [
        {"instruction": "Translate.", "input": "Bonjour", "output": "Hello"},
        {"instruction": "Say hi.", "input": "", "output": "Hi"},
    ]
    converted = alpaca_to_prompt_completion(Dataset.from_list(rows))
    assert converted[0]["prompt"] == [{"role": "user", "content": "Translate.\n\nBonjour"}]
    assert converted[1]["prompt"] == [{"role": "user", "content": "Say hi."}]
    assert converted[1]["completion"] == [{"role": "assistant", "content": "Hi"}]
    again = alpaca_to_prompt_completion(Dataset.from_list(rows[::-1]))
    assert again["id"] == converted["id"][::-1]


def test_alpaca_needs_its_columns():
    with pytest.raises(ValueError, match="'instruction' and 'output'"):
        alpaca_to_prompt_completion(Dataset.from_list([{"question": "q", "answer": "a"}]))


def _as_parts(dataset: Dataset, key: str) -> Dataset:
    """The messages of `dataset` with each content split into two text parts under `key` ("text" or "value")."""

    def split(example):
        return {
            "messages": [
                {**m, "content": [{"type": "text", key: m["content"][:3]}, {"type": "text", key: m["content"][3:]}]}
                for m in example["messages"]
            ]
        }

    return dataset.map(split)


@pytest.mark.parametrize("key", ["text", "value"])  # OpenAI style; LlamaFactory's v1 files
def test_content_parts_become_the_text_they_hold(key):
    dataset = tiny.messages_dataset(6)
    normalized = normalize_content_parts(_as_parts(dataset, key))
    assert normalized["messages"] == dataset["messages"]
    assert normalize_content_parts(dataset) is dataset  # plain text: untouched, not even mapped
    evaluation = normalize_content_parts({"a": _as_parts(dataset, key), "b": dataset})
    assert evaluation["a"]["messages"] == dataset["messages"]


def test_content_parts_that_are_not_text_are_refused():
    rows = [{"messages": [{"role": "user", "content": [{"type": "image", "text": None}]}]}]
    with pytest.raises(ValueError) as error:
        normalize_content_parts(Dataset.from_list(rows))
    assert str(error.value).startswith("Row 0, 'messages' message 0: content part 0 is 'image', not text")
    assert "SFTMix trains text-only language models" in str(error.value)
