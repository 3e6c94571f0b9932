"""Dataset transforms that bring public instruction datasets into TRL's conversational prompt/completion format.

Every transform gives each output example a stable `id`, so confidence scores join by id across stages (and across
tokenizers, paper §5.1).
"""

from datasets import Dataset

from .data_utils import derive_example_id


def alpaca_to_prompt_completion(dataset: Dataset, id_column: str = "id") -> Dataset:
    """Alpaca-style rows (`instruction`, optional `input`, `output`; also MedAlpaca) as conversational
    prompt/completion rows: the instruction, followed by the input when there is one, is the user turn; the output
    is the assistant turn. Rows without an `id` get one derived from their content."""
    missing = {"instruction", "output"} - set(dataset.column_names)
    if missing:
        raise ValueError(
            f"An Alpaca-style dataset needs the columns 'instruction' and 'output' (and optionally 'input'); "
            f"missing: {sorted(missing)}. Columns found: {dataset.column_names}."
        )

    def convert(example):
        instruction = example["instruction"].strip()
        context = (example.get("input") or "").strip()
        user = f"{instruction}\n\n{context}" if context else instruction
        example_id = example[id_column] if id_column in example else derive_example_id(example)
        return {
            id_column: str(example_id),
            "prompt": [{"role": "user", "content": user}],
            "completion": [{"role": "assistant", "content": example["output"]}],
        }

    return dataset.map(convert, remove_columns=dataset.column_names, desc="Converting Alpaca rows")


def expand_multiturn(dataset: Dataset, messages_column: str = "messages", id_column: str = "id") -> Dataset:
    """Expand each k-turn conversation into k single-turn examples, as the paper does for UltraChat (§4.1).

    Example t (1-based) of a conversation has as its prompt the system message, if any, and the whole history up to
    and including the t-th user turn; its completion is the t-th assistant turn. Its id is `<conversation id>-<t>`,
    where the conversation id comes from `id_column`, else UltraChat's `prompt_id`, else the content.
    """
    if messages_column not in dataset.column_names:
        raise ValueError(
            f"expand_multiturn needs a {messages_column!r} column of chat messages; columns found: "
            f"{dataset.column_names}."
        )

    def expand(batch):
        out = {id_column: [], "prompt": [], "completion": []}
        for row in range(len(batch[messages_column])):
            messages = batch[messages_column][row]
            if id_column in batch:
                conversation_id = str(batch[id_column][row])
            elif "prompt_id" in batch:
                conversation_id = str(batch["prompt_id"][row])
            else:
                conversation_id = derive_example_id({messages_column: messages})
            turn = 0
            for position, message in enumerate(messages):
                if message["role"] != "assistant":
                    continue
                if position == 0 or messages[position - 1]["role"] != "user":
                    raise ValueError(
                        f"Conversation {conversation_id!r}: the assistant message at position {position} does not "
                        "follow a user message; expand_multiturn expects alternating user/assistant turns."
                    )
                turn += 1
                out[id_column].append(f"{conversation_id}-{turn}")
                out["prompt"].append(messages[:position])
                out["completion"].append([message])
        return out

    return dataset.map(
        expand, batched=True, remove_columns=dataset.column_names, desc="Expanding multi-turn conversations"
    )
