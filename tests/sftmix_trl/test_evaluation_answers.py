"""The benchmark answer writers on the tiny model: the fields each judge reads, turn 2 seeing turn 1, batched answers
equal to one-by-one answers, and resuming."""

import json

import pytest

from sftmix_trl.cli import main as cli_main
from sftmix_trl.evaluation.answers import (
    ChatGenerator,
    GenerateArguments,
    generate_alpacaeval,
    generate_mtbench,
    load_alpacaeval,
    load_mtbench,
)

QUESTIONS = [
    {"question_id": 81, "category": "writing", "turns": ["Add 1 and 2.", "Now spell the number 3."]},
    {"question_id": 82, "category": "reasoning", "turns": ["Describe a red cat.", "Reverse the words: cat dog"]},
    {"question_id": 83, "category": "math", "turns": ["Add 4 and 5.", "And 6 and 7?"]},
]
INSTRUCTIONS = [
    {"instruction": "Spell the number 7.", "dataset": "helpful_base"},
    {"instruction": "Describe a blue horse in one short sentence, please.", "dataset": "koala"},
    {"instruction": "Add 2 and 2.", "dataset": "oasst"},
]


@pytest.fixture(scope="module")
def chat(llama_dir):
    return ChatGenerator(str(llama_dir), batch_size=2, max_new_tokens=6, do_sample=False, dtype="float32")


class RecordingChat(ChatGenerator):
    """The real generator, also keeping every conversation it was asked to continue."""

    def __init__(self, chat):
        self.__dict__.update(chat.__dict__)
        self.seen = []

    def answer(self, conversations):
        self.seen += [list(c) for c in conversations]
        return super().answer(conversations)


def test_mtbench_answers_have_fastchats_fields_and_turn_two_sees_turn_one(chat, tmp_path):
    recording = RecordingChat(chat)
    path = generate_mtbench(recording, QUESTIONS, tmp_path / "model_answer" / "tiny.jsonl", model_id="tiny")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["question_id"] for r in records] == [81, 82, 83]
    for record, question in zip(records, QUESTIONS):
        # what FastChat's gen_judgment / show_result read
        assert {"question_id", "answer_id", "model_id", "choices", "tstamp"} <= record.keys()
        assert record["model_id"] == "tiny"
        assert isinstance(record["answer_id"], str) and isinstance(record["tstamp"], float)
        (choice,) = record["choices"]
        assert choice["index"] == 0 and len(choice["turns"]) == len(question["turns"])
        assert all(isinstance(turn, str) for turn in choice["turns"])
        # the second turn was asked with the first question and the model's own first answer before it
        second = next(c for c in recording.seen if len(c) == 3 and c[0]["content"] == question["turns"][0])
        assert second[1] == {"role": "assistant", "content": choice["turns"][0]}
        assert second[2] == {"role": "user", "content": question["turns"][1]}
    assert len({r["answer_id"] for r in records}) == 3


def test_alpacaeval_outputs_have_the_annotators_fields_in_order(chat, tmp_path):
    path = generate_alpacaeval(chat, INSTRUCTIONS, tmp_path / "outputs.json", generator="tiny-sftmix")
    outputs = json.loads(path.read_text())
    assert isinstance(outputs, list)
    assert [o["instruction"] for o in outputs] == [i["instruction"] for i in INSTRUCTIONS]
    for output, row in zip(outputs, INSTRUCTIONS):
        assert {"instruction", "output", "generator"} <= output.keys()
        assert output["generator"] == "tiny-sftmix" and output["dataset"] == row["dataset"]
        assert isinstance(output["output"], str)


def test_batched_answers_equal_one_by_one_answers(chat, llama_dir):
    # left padding and the attention mask must not change greedy decoding
    conversations = [[{"role": "user", "content": row["instruction"]}] for row in INSTRUCTIONS]
    one_by_one = ChatGenerator(str(llama_dir), batch_size=1, max_new_tokens=6, do_sample=False, dtype="float32")
    assert chat.answer(conversations) == [one_by_one.answer([c])[0] for c in conversations]
    # the answer is the decoded new tokens only, not the prompt
    assert not any(answer.startswith("<|im_start|>") for answer in chat.answer(conversations))


def test_an_interrupted_run_resumes_without_redoing_answers(chat, tmp_path):
    answers = tmp_path / "tiny.jsonl"
    generate_mtbench(chat, QUESTIONS[:2], answers, model_id="tiny")
    first = {json.loads(line)["question_id"]: json.loads(line) for line in answers.read_text().splitlines()}
    recording = RecordingChat(chat)
    generate_mtbench(recording, QUESTIONS, answers, model_id="tiny")
    resumed = {json.loads(line)["question_id"]: json.loads(line) for line in answers.read_text().splitlines()}
    assert resumed[81] == first[81] and resumed[82] == first[82]
    assert {c[0]["content"] for c in recording.seen} == {QUESTIONS[2]["turns"][0]}

    outputs = tmp_path / "outputs.json"
    generate_alpacaeval(chat, INSTRUCTIONS[:1], outputs, generator="tiny")
    recording = RecordingChat(chat)
    generate_alpacaeval(recording, INSTRUCTIONS, outputs, generator="tiny")
    assert len(json.loads(outputs.read_text())) == 3
    assert {c[0]["content"] for c in recording.seen} == {row["instruction"] for row in INSTRUCTIONS[1:]}


def test_sftmix_generate_command(llama_dir, tmp_path, capsys):
    questions = tmp_path / "question.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    output = tmp_path / "answers" / "tiny.jsonl"
    argv = [
        "generate",
        "--model_name_or_path",
        str(llama_dir),
        "--benchmark",
        "mt_bench",
        "--output_file",
        str(output),
    ]
    argv += ["--prompts_file", str(questions), "--max_prompts", "2", "--max_new_tokens", "4", "--dtype", "float32"]
    assert cli_main(argv) == 0
    assert [json.loads(line)["model_id"] for line in output.read_text().splitlines()] == [llama_dir.name] * 2
    assert str(output) in capsys.readouterr().out
    assert load_mtbench(questions) == QUESTIONS


def test_bad_inputs_are_refused(tmp_path, tokenizer, llama_dir):
    with pytest.raises(ValueError, match="`benchmark` must be one of"):
        GenerateArguments(model_name_or_path="m", benchmark="arena_hard", output_file="x")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": 1, "text": "hi"}) + "\n")
    with pytest.raises(ValueError, match="needs 'question_id' and 'turns'"):
        load_mtbench(bad)
    bad_alpaca = tmp_path / "bad.json"
    bad_alpaca.write_text(json.dumps([{"prompt": "hi"}]))
    with pytest.raises(ValueError, match="needs an 'instruction'"):
        load_alpacaeval(bad_alpaca)
    no_template = tmp_path / "no-template"
    tokenizer_copy = type(tokenizer).from_pretrained(llama_dir)
    tokenizer_copy.chat_template = None
    tokenizer_copy.save_pretrained(no_template)
    with pytest.raises(ValueError, match="has no chat template"):
        ChatGenerator(str(no_template))


def test_a_trainer_checkpoint_decodes_with_the_kv_cache(llama_dir, tmp_path, chat):
    # trainers save `use_cache=False`; without the cache every new token would recompute the whole sequence
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    model.config.use_cache = False
    model.save_pretrained(tmp_path / "trained")
    AutoTokenizer.from_pretrained(llama_dir).save_pretrained(tmp_path / "trained")
    trained = ChatGenerator(
        str(tmp_path / "trained"), batch_size=2, max_new_tokens=6, do_sample=False, dtype="float32"
    )
    assert trained.model.config.use_cache and trained.generation_config.use_cache
    conversations = [[{"role": "user", "content": row["instruction"]}] for row in INSTRUCTIONS]
    assert trained.answer(conversations) == chat.answer(conversations)
