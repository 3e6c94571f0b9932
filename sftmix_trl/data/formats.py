"""TRL's data formats: public instruction datasets brought into them (Alpaca rows, multi-turn conversations), chat
content parts turned into text, and the rows SFTTrainer's preparation would crash on refused, naming the row.

Every transform gives each output example a stable `id`, so confidence scores join by id across stages (and across
tokenizers, paper §5.1).
"""

from collections.abc import Mapping

from datasets import Dataset

from .ids import derive_example_id


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


# Columns that hold chat messages in TRL's conversational formats.
CHAT_COLUMNS = ("messages", "prompt", "completion")


def content_to_text(content, where: str = "a message"):
    """A message's `content` as text. A list of content parts (OpenAI style `{"type": "text", "text": ...}`, or
    LlamaFactory's `{"type": "text", "value": ...}`) becomes its text parts concatenated in order, as a chat template
    that accepts parts renders them. A string (or None) is returned as it is; any part that is not text is refused."""
    if content is None or isinstance(content, str):
        return content
    texts = []
    for position, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
        text = None
        if isinstance(part, Mapping) and kind == "text":
            text = part.get("text") if part.get("text") is not None else part.get("value")
        if not isinstance(text, str):
            raise ValueError(
                f"{where}: content part {position} is {kind!r}, not text ({str(part)[:80]}). SFTMix trains text-only "
                "language models: keep only `{'type': 'text', 'text': ...}` parts, or drop the examples that carry "
                "images, audio or other media."
            )
        texts.append(text)
    return "".join(texts)


def _holds_content_parts(feature) -> bool:
    """Whether a column's feature is a list of messages whose `content` is a list (of parts)."""
    message = getattr(feature, "feature", None)
    return isinstance(message, Mapping) and "content" in message and hasattr(message["content"], "feature")


def normalize_content_parts(dataset):
    """`dataset` with every chat message's list-of-parts `content` (in `messages`, `prompt`, `completion`) turned into
    text by `content_to_text`; returned as it is when no column holds content parts (read from its features, without
    scanning rows). Accepts None, a `Dataset`, or a dict of them (`eval_dataset`)."""
    if dataset is None:
        return None
    if isinstance(dataset, Mapping):
        return {name: normalize_content_parts(split) for name, split in dataset.items()}
    features = getattr(dataset, "features", None) or {}
    columns = [column for column in CHAT_COLUMNS if column in features and _holds_content_parts(features[column])]
    if not columns:
        return dataset

    def normalize(example, row):
        return {
            column: [
                {**message, "content": content_to_text(message["content"], f"Row {row}, {column!r} message {turn}")}
                for turn, message in enumerate(example[column])
            ]
            for column in columns
        }

    return dataset.map(normalize, with_indices=True, desc="Content parts to text")


def _example_format(values: Mapping, row: int, where: str, text_field: str) -> str:
    """The SFTTrainer format of one row (`values`: its non-null fields among the format columns), or a ValueError
    naming the row and what is wrong with it."""
    at = f"{where}, row {row}"
    if "prompt" in values or "completion" in values:
        if set(values) - {"prompt", "completion"}:
            raise ValueError(
                f"{at} mixes formats: it has {sorted(values)}. SFTTrainer reads one format per dataset (`messages`, "
                f"prompt/completion, or `{text_field}`): give every row the same fields."
            )
        if "completion" not in values:
            raise ValueError(f"{at} has a prompt but no completion (null or missing): give it one, or drop the row.")
        prompt, completion = values.get("prompt", ""), values["completion"]
        if isinstance(completion, str) and isinstance(prompt, str):
            return "prompt/completion (text)"
        if isinstance(completion, list) and isinstance(prompt, list):
            for field, messages in (("prompt", prompt), ("completion", completion)):
                _check_messages(messages, f"{at}, {field!r}", allow_empty=field == "prompt")
            return "prompt/completion (conversational)"
        raise ValueError(
            f"{at}: the prompt is {type(prompt).__name__} and the completion {type(completion).__name__}; both must "
            "be text (str), or both lists of chat messages."
        )
    if "messages" in values:
        if text_field in values:
            raise ValueError(f"{at} mixes formats: it has both `messages` and `{text_field}`; keep one of them.")
        if not isinstance(values["messages"], list):
            raise ValueError(f"{at}: `messages` is {type(values['messages']).__name__}, not a list of chat messages.")
        _check_messages(values["messages"], f"{at}, 'messages'", allow_empty=False)
        return "messages"
    if text_field in values:
        if not isinstance(values[text_field], str):
            raise ValueError(f"{at}: `{text_field}` is {type(values[text_field]).__name__}, not text.")
        return "text"
    raise ValueError(
        f"{at} has none of `messages`, prompt/completion or `{text_field}` (all null or missing): fill it in, or drop "
        "the row."
    )


def _check_messages(messages: list, where: str, allow_empty: bool) -> None:
    if not messages and not allow_empty:
        raise ValueError(f"{where} is an empty list of messages: there is nothing to train on; drop the row.")
    for turn, message in enumerate(messages):
        if not (isinstance(message, Mapping) and isinstance(message.get("role"), str)):
            raise ValueError(f"{where}, message {turn} is not a chat message with a `role`: {str(message)[:80]}")
        if not isinstance(message.get("content"), str) and not message.get("tool_calls"):
            raise ValueError(
                f"{where}, message {turn} ({message['role']}) has {type(message.get('content')).__name__} content, "
                "not text: fill it in, or drop the row."
            )


def check_sft_examples(dataset, where: str = "the training data", text_field: str = "text") -> None:
    """Refuse, naming the row, the examples that would crash inside SFTTrainer's preparation: rows of different
    formats, a null or non-text prompt, completion or text, chat messages without a role or text content, an empty
    conversation or conversational completion. Pre-tokenized data (`input_ids`) and data without any of the format
    columns (left to SFTTrainer and a `formatting_func`) are not checked."""
    from datasets import Dataset

    if not isinstance(dataset, Dataset) or "input_ids" in dataset.column_names:
        return
    columns = [c for c in ("messages", "prompt", "completion", text_field) if c in dataset.column_names]
    if not columns:
        return
    table = dataset.with_format(None).select_columns(columns)
    first = None
    for row, example in enumerate(table):
        values = {name: value for name, value in example.items() if value is not None}
        kind = _example_format(values, row, where, text_field)
        if first is None:
            first = kind
        elif kind != first:
            raise ValueError(
                f"{where}, row {row} is {kind} while row 0 is {first}: SFTTrainer reads one format per dataset; "
                "convert the rows to one format."
            )
