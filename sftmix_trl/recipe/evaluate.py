"""The evaluate stage's three evaluations of the base and the trained models: the held-out response NLL (a table),
answers to the instruction-following benchmarks for their judges, and lm-evaluation-harness tasks."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from accelerate import PartialState
from datasets import Dataset

from ..assets import resolve_asset
from ..confidence import read_scores, score_checkpoints
from ..confidence.offline import adapter_base
from ..config import SFTMixConfig, sft_config_from

if TYPE_CHECKING:
    from .arguments import RecipeArguments


def evaluate_nll(
    models: dict[str, str], eval_dataset: Dataset, output_dir: Path, args: SFTMixConfig, dataset_name: str
) -> None:
    """Held-out response NLL (token-weighted mean over the response tokens) of each model, printed side by side and
    written to evaluation/evaluation.{json,md}. Every process of a launch scores its share."""
    state = PartialState()
    args = sft_config_from(args, output_dir=str(output_dir), report_to="none", push_to_hub=False)
    for label, path in models.items():
        if adapter_base(path) is not None:
            state.print(
                f"[sftmix] stage evaluate: {label} ({path}) is a PEFT adapter; scoring it merged into its base model "
                f"{adapter_base(path)}"
            )
    files = score_checkpoints(list(models.values()), eval_dataset, output_dir, args=args, dataset_name=dataset_name)
    if not state.is_main_process:
        return
    rows = []
    for label, path in zip(models, files):
        records, _ = read_scores(path)
        scored = [r for r in records if r["num_tokens"] > 0]
        tokens = sum(r["num_tokens"] for r in scored)
        # NLL = sum over examples of nll_i * n_i / sum n_i: each response token counts once
        nll = sum(r["nll"] * r["num_tokens"] for r in scored) / tokens
        rows.append({"model": label, "examples": len(scored), "tokens": tokens, "nll": nll, "ppl": math.exp(nll)})
    (output_dir / "evaluation.md").write_text(format_evaluation(rows, dataset_name) + "\n")
    (output_dir / "evaluation.json").write_text(json.dumps(rows, indent=2) + "\n")


def format_evaluation(rows: list[dict], dataset_name: str | None) -> str:
    lines = [
        f"Held-out response NLL on {dataset_name} (lower is better)",
        "",
        "| model | examples | response tokens | NLL | perplexity |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['model']} | {r['examples']} | {r['tokens']} | {r['nll']:.4f} | {r['ppl']:.3f} |" for r in rows]
    return "\n".join(lines)


def evaluate_generation(models: dict[str, str], output_dir: Path, arguments: RecipeArguments, device: str) -> None:
    """Each model's answers to `arguments.generate_benchmarks` (the recipe's arguments), resumable, in the judges'
    formats under evaluation/ (judge commands: docs/evaluation.md)."""
    from ..evaluation.answers import (
        ChatGenerator,
        generate_alpacaeval,
        generate_mtbench,
        load_alpacaeval,
        load_mtbench,
    )

    benchmarks = arguments.generate_benchmarks
    limit = arguments.generate_max_prompts
    questions = load_mtbench(resolve_asset("mt_bench", arguments.asset_cache_dir))[:limit]
    instructions = load_alpacaeval(resolve_asset("alpacaeval", arguments.asset_cache_dir))[:limit]
    for label, path in models.items():
        chat = ChatGenerator(
            path,
            batch_size=arguments.generate_batch_size,
            max_new_tokens=arguments.generate_max_new_tokens,
            device=device,
        )
        if "mt_bench" in benchmarks:
            generate_mtbench(
                chat, questions, output_dir / "mt_bench" / "model_answer" / f"{label}.jsonl", model_id=label
            )
        if "alpaca_eval" in benchmarks:
            generate_alpacaeval(chat, instructions, output_dir / "alpaca_eval" / f"{label}.json", generator=label)


def evaluate_lm_eval(models: dict[str, str], output_dir: Path, arguments: RecipeArguments, device: str) -> None:
    """lm-evaluation-harness on each model, one results file per model (a finished one is kept)."""
    from ..evaluation.lm_eval_tasks import run_lm_eval

    for label, path in models.items():
        run_lm_eval(
            path,
            arguments.lm_eval_tasks,
            output_dir / "lm_eval" / f"{label}.json",
            num_fewshot=arguments.lm_eval_num_fewshot,
            limit=arguments.lm_eval_limit,
            include_path=arguments.lm_eval_include_path,
            device=device,
        )
