"""The paper's healthcare evaluation through EleutherAI's lm-evaluation-harness (the `lm_eval` extra).

    pip install "sftmix-trl[lm_eval]"
    accelerate launch recipes/alpaca.py --config recipes/llama-3.1-8b/sftmix_medalpaca.yaml --stage evaluate \\
        --lm_eval_tasks medqa_4options pubmedqa medmcqa --lm_eval_num_fewshot 3

The harness scores each multiple-choice option by its log-likelihood after the question (with `num_fewshot` solved
examples before it) and reports accuracy. Its MedQA, PubMedQA and MedMCQA tasks read their data from the Hub
(`GBaker/MedQA-USMLE-4-options-hf`, `bigbio/pubmed_qa`, `openlifescienceai/medmcqa`); the paper's five-option MedQA
has no task in the harness. Local tasks (a YAML file whose `dataset_path` is `json` with local `data_files`) are added
with `include_path`.
"""

import json
import os
from collections.abc import Sequence
from pathlib import Path

HEALTHCARE_TASKS = ("medqa_4options", "pubmedqa", "medmcqa")


def run_lm_eval(
    model: str,
    tasks: Sequence[str],
    output_file: str | Path,
    num_fewshot: int = 3,
    limit: int | None = None,
    include_path: str | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    dtype: str = "auto",
) -> dict:
    """Run lm-evaluation-harness `tasks` on `model` (a `save_pretrained` folder or hub id) and write its results to
    `output_file` as JSON: `{"model", "tasks", "num_fewshot", "limit", "results", "n-shot", "n-samples",
    "versions"}`, `results` holding each task's metrics (`acc,none`, `acc_stderr,none`, ...). A results file already
    there for the same model, tasks, shots and limit is returned as it is (resuming an interrupted evaluate stage)."""
    output_file = Path(output_file)
    settings = {"model": str(model), "tasks": list(tasks), "num_fewshot": num_fewshot, "limit": limit}
    if output_file.is_file():
        previous = json.loads(output_file.read_text())
        if {key: previous.get(key) for key in settings} == settings:
            return previous
    try:
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise ImportError(
            f"lm-evaluation-harness is not installed ({error}): `pip install 'sftmix-trl[lm_eval]'` to run "
            "`lm_eval_tasks`."
        ) from None
    if not tasks:
        raise ValueError("No lm-evaluation-harness tasks given, e.g. medqa_4options pubmedqa medmcqa.")
    task_manager = TaskManager(include_path=include_path)
    unknown = [task for task in tasks if task not in task_manager.all_tasks]
    if unknown:
        raise ValueError(
            f"lm-evaluation-harness has no task(s) {unknown}"
            + (f" (nor {include_path})" if include_path else "")
            + f"; the paper's healthcare suite is {list(HEALTHCARE_TASKS)}."
        )
    evaluation = simple_evaluate(
        model="hf",
        model_args={"pretrained": str(model), "dtype": dtype},
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=limit,
        batch_size=batch_size,
        device=device,
        task_manager=task_manager,
        log_samples=False,
    )
    report = {
        **settings,
        "results": evaluation["results"],
        "n-shot": evaluation.get("n-shot"),
        "n-samples": evaluation.get("n-samples"),
        "versions": evaluation.get("versions"),
    }
    output_file.parent.mkdir(parents=True, exist_ok=True)
    partial = output_file.with_name(output_file.name + ".partial")
    partial.write_text(json.dumps(report, indent=2, default=str) + "\n")
    os.replace(partial, output_file)
    return report
