"""What each stage of a recipe run was made from, and which of its checkpoints can be resumed from.

A stage folder holds `stage_inputs.json`, written when the stage starts: everything its outputs depend on (a
fingerprint of the training data's content, the models and their weights' files, the config fields that change what
the stage computes, the records of the stages it reads). A rerun compares it with what it is asked for now:

    the same inputs        a done stage is reused, an interrupted one resumes from its last complete checkpoint
    other inputs           refused, naming what changed: "use a new output_dir or remove <stage folder>"
    no record, some work   refused the same way (a folder from another tool or an older sftmix-trl)
    no record, no work     started afresh

`stage_done.json` is written last, when every output is complete; a stage without it is not done, whatever else its
folder holds.

A checkpoint is complete once the Trainer has written its `trainer_state.json`, the last file of a save; a checkpoint
without one (a run killed while saving) is never resumed from.
"""

import hashlib
import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from datasets import Dataset
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

INPUTS_FILE = "stage_inputs.json"
DONE_FILE = "stage_done.json"
TRAINER_STATE_FILE = "trainer_state.json"  # the last file the Trainer writes into a checkpoint
# what a stage folder may hold before any work is done: its record, and the loggers' folders
NOT_WORK = (INPUTS_FILE, "runs")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def digest(value: Any) -> str:
    """A short hash of a JSON-able value (keys sorted)."""
    return hashlib.sha1(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def dataset_fingerprint(dataset: Dataset) -> str:
    """A hash of a dataset's content: its columns' names, types and values, in row order (through any row selection).
    The same data loaded twice hashes the same; one changed value, row or column changes it."""
    import pyarrow as pa

    table = dataset.with_format("arrow")[:].combine_chunks()
    hasher = hashlib.sha1(str(table.schema.remove_metadata()).encode())
    for column in table.columns:
        for chunk in column.chunks:
            sink = pa.BufferOutputStream()
            batch = pa.record_batch([chunk], names=["c"])
            with pa.ipc.new_stream(sink, batch.schema) as writer:
                writer.write_batch(batch)
            hasher.update(sink.getvalue().to_pybytes())
    return hasher.hexdigest()[:16]


def model_fingerprint(name: str, modification_times: bool = False) -> dict[str, Any]:
    """What identifies a model: its name (a Hub id), or for a local folder, wherever it lies, a hash of its config,
    tokenizer and training state files and the sizes of its weight files (with `modification_times`, their
    modification times too: weights retrained in place in a folder without `trainer_state.json`)."""
    path = Path(name)
    if not path.is_dir():
        return {"name": name}
    small, weights = {}, {}
    for file in sorted(p for p in path.iterdir() if p.is_file()):
        if file.suffix in WEIGHT_SUFFIXES:
            stat = file.stat()
            weights[file.name] = [stat.st_size, stat.st_mtime_ns] if modification_times else stat.st_size
        elif file.suffix in (".json", ".jinja", ".model", ".txt") and file.stat().st_size < 50_000_000:
            small[file.name] = hashlib.sha1(file.read_bytes()).hexdigest()[:16]
    return {"files": small, "weights": weights}


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            out.update(_flat(item, f"{prefix}{key}."))
        return out or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): value}


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def differences(recorded: Mapping, wanted: Mapping, limit: int = 6) -> list[str]:
    """`field: recorded -> wanted` for each leaf that differs, the first `limit` of them."""
    old, new = _flat(json.loads(json.dumps(recorded, default=str))), _flat(json.loads(json.dumps(wanted, default=str)))
    changed = [key for key in sorted(old.keys() | new.keys()) if old.get(key, "<unset>") != new.get(key, "<unset>")]
    shown = [f"{key}: {_short(old.get(key, '<unset>'))} -> {_short(new.get(key, '<unset>'))}" for key in changed]
    return shown[:limit] + ([f"(and {len(shown) - limit} more)"] if len(shown) > limit else [])


def has_work(stage_dir: Path) -> bool:
    """Whether a stage folder holds anything besides its inputs record (or one cut short while written) and the
    loggers' folders."""
    return stage_dir.is_dir() and any(
        entry.name not in NOT_WORK and not entry.name.startswith(f"{INPUTS_FILE}.") for entry in stage_dir.iterdir()
    )


def read_json(path: Path) -> dict | None:
    """A JSON object file, or None when it is missing or unreadable (e.g. cut short by a kill)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


class StageInputsMismatch(ValueError):
    """A stage folder holds work made from other inputs than the ones asked for now."""


def check_stage_inputs(stage: str, stage_dir: Path, inputs: Mapping) -> bool:
    """Whether the stage's folder may be reused (done, or resumed from) for `inputs`. True when its record matches;
    False when there is nothing to reuse (no folder, or no work in it). Raises `StageInputsMismatch` when it holds
    work from other inputs, or work without a record."""
    if not has_work(stage_dir):
        return False
    recorded = read_json(stage_dir / INPUTS_FILE)
    remedy = f"Use a new output_dir, or remove {stage_dir} to redo the {stage} stage (and the stages after it)."
    if recorded is None:
        raise StageInputsMismatch(
            f"{stage_dir} holds outputs of the {stage} stage without a record of the inputs they were made from "
            f"({INPUTS_FILE}: written by another tool or an older sftmix-trl), so they cannot be checked against "
            f"this run's. {remedy}"
        )
    if recorded.get("inputs") != json.loads(json.dumps(inputs, default=str)):
        changed = "; ".join(differences(recorded.get("inputs") or {}, inputs))
        raise StageInputsMismatch(
            f"{stage_dir} holds the {stage} stage of a run with other inputs than this one: {changed}. Its outputs "
            f"do not apply to this run. {remedy}"
        )
    return True


def record_stage_inputs(stage: str, stage_dir: Path, inputs: Mapping) -> None:
    stage_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomically(stage_dir / INPUTS_FILE, {"stage": stage, "fingerprint": digest(inputs), "inputs": inputs})


def is_done(stage_dir: Path) -> bool:
    return read_json(stage_dir / DONE_FILE) is not None


def mark_done(stage: str, stage_dir: Path, inputs: Mapping, **info) -> None:
    write_json_atomically(stage_dir / DONE_FILE, {"stage": stage, "fingerprint": digest(inputs), **info})


def write_json_atomically(path: Path, value: Any) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(value, indent=2, default=str) + "\n")
    partial.replace(path)


def checkpoint_step(path: Path) -> int | None:
    prefix = f"{PREFIX_CHECKPOINT_DIR}-"
    name = path.name
    return int(name[len(prefix) :]) if name.startswith(prefix) and name[len(prefix) :].isdigit() else None


def is_complete_checkpoint(checkpoint: Path) -> bool:
    return read_json(checkpoint / TRAINER_STATE_FILE) is not None


def checkpoints(output_dir: Path) -> list[Path]:
    """The `checkpoint-<step>` folders of a training output folder, by step."""
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def last_complete_checkpoint(output_dir: Path) -> Path | None:
    complete = [c for c in checkpoints(output_dir) if is_complete_checkpoint(c)]
    return complete[-1] if complete else None


def remove_incomplete_checkpoints(output_dir: Path) -> list[Path]:
    """Delete the checkpoints that a kill cut short while saving (no `trainer_state.json`): a rerun trains those
    steps again and saves them anew. Returns what was removed."""
    removed = [c for c in checkpoints(output_dir) if not is_complete_checkpoint(c)]
    for checkpoint in removed:
        shutil.rmtree(checkpoint)
    return removed


# Config fields that do not change what a training stage computes: where and how it logs, saves, reports, pushes,
# evaluates, distributes and loads data, and what memory it trades for time. Every other field of the stage's config
# is one of its inputs.
RESULT_NEUTRAL_FIELDS = frozenset(
    {
        "output_dir", "run_name", "project", "report_to", "disable_tqdm", "log_level", "log_level_replica",
        "log_on_each_node", "logging_strategy", "logging_steps", "logging_first_step", "logging_nan_inf_filter",
        "include_num_input_tokens_seen", "trackio_space_id", "trackio_bucket_id", "trackio_static_space_id",
        "eval_strategy", "eval_steps", "eval_delay", "prediction_loss_only", "eval_on_start", "eval_do_concat_batches",
        "eval_use_gather_object", "eval_accumulation_steps", "include_for_metrics", "batch_eval_metrics",
        "bf16_full_eval", "fp16_full_eval", "eval_packing", "load_best_model_at_end", "metric_for_best_model",
        "greater_is_better", "save_only_model", "save_strategy", "save_steps", "save_on_each_node",
        "save_total_limit", "enable_jit_checkpoint", "push_to_hub", "hub_token", "hub_private_repo", "hub_model_id",
        "hub_strategy", "hub_always_push", "hub_revision", "ignore_data_skip", "restore_callback_states_from_checkpoint",
        "resume_from_checkpoint", "use_cpu", "accelerator_config", "parallelism_config", "dataloader_num_workers",
        "dataloader_pin_memory", "dataloader_persistent_workers", "dataloader_prefetch_factor",
        "dataloader_multiprocessing_context", "ddp_find_unused_parameters", "ddp_bucket_cap_mb",
        "ddp_broadcast_buffers", "ddp_static_graph", "ddp_backend", "ddp_timeout", "fsdp", "fsdp_config",
        "deepspeed", "debug", "skip_memory_metrics", "do_train", "do_eval", "do_predict", "local_rank",
        "trust_remote_code", "dataset_num_proc", "torch_empty_cache_steps", "activation_offloading",
        "activation_checkpointing", "activation_checkpointing_kwargs", "gradient_checkpointing",
        "gradient_checkpointing_kwargs", "torch_compile", "torch_compile_backend", "torch_compile_mode",
        "confidence_scores_path",
    }
)  # fmt: skip


def jsonable(value: Any) -> Any:
    """`value` as plain JSON values, sets sorted, anything else by its `str`, so that equal settings compare equal."""
    return json.loads(json.dumps(value, sort_keys=True, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))


def training_fields(args, exclude: frozenset[str] | set[str] = frozenset()) -> dict[str, Any]:
    """The fields of a training config that change what a stage computes (all but `RESULT_NEUTRAL_FIELDS` and
    `exclude`), read field by field (`to_dict` masks every `*_token` field, `eos_token` included)."""
    import dataclasses

    return jsonable(
        {
            f.name: getattr(args, f.name)
            for f in dataclasses.fields(args)
            if f.init and f.name not in RESULT_NEUTRAL_FIELDS and f.name not in exclude
        }
    )
