"""Per-example response perplexity of a model under an SFTTrainer: the one scoring routine that the training-time
callback and the offline scorer share.

An example's score is the mean negative log-likelihood over its loss tokens, the tokens whose label is not -100 after
TRL's preparation (the completion, or the assistant turns), so the tokens scored are exactly the tokens trained:

    nll(x, y) = -(1 / |y|) * sum_{t in y} log p(y_t | x, y_<t)        ppl(x, y) = exp(nll(x, y))
    prob(x, y) = (1 / |y|) * sum_{t in y} p(y_t | x, y_<t)            (mean gold-token probability, in [0, 1])
    accuracy(x, y) = (1 / |y|) * #{t in y : y_t is the model's top-1 token}

`ppl` is what SFTMix's confidence is built from; `prob` and `accuracy` are the bounded, dataset-cartography views of
the same predictions that the data map draws.

The log-probabilities come from TRL's fused LM head (`add_fused_lm_head`, the forward SFTTrainer patches onto its
model and calls with `fused_lm_head=True`), which projects through the LM head in tiles and never holds the
(batch, length, vocabulary) logits.

Score files: one JSON Lines file per checkpoint, one record per example, `{"id", "num_tokens", "nll", "ppl", "prob",
"accuracy"}`, in the dataset's order, and beside it a JSON sidecar with the same stem that says what was scored
(checkpoint, step, dataset, number of examples and a hash of their ids).

One rule for rows that cannot train, in every scorer: a row that TRL's preparation drops (no loss token left after
truncation) needs no score and gets no record. The callback scores the trainer's prepared dataset, where such rows are
already gone; the offline scorer (`score_checkpoints`) prepares the data with an `SFTTrainer` too and writes the same
records, listing the rows it left out in its sidecar (`left_out_ids`). So the two write the same ids for the same data
and their files aggregate together. (A row kept by preparation whose only loss token is its first one has nothing to
predict: its record has `num_tokens = 0` and null fields, and aggregation leaves it out as well.)
"""

import hashlib
import json
import math
import os
import socket
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object, is_peft_model
from datasets import Dataset
from tqdm.auto import tqdm
from trl.trainer.utils import add_fused_lm_head

from ..data.ids import check_repeated_ids_share_content, check_unique_ids

SCORES_SUFFIX = ".jsonl"
METADATA_SUFFIX = ".json"
FORMAT_VERSION = 3  # the only format read: no record for a row that TRL's preparation drops
RECORD_FIELDS = frozenset({"id", "num_tokens", "nll", "ppl", "prob", "accuracy"})


def check_scorable(trainer, id_column: str = "id") -> None:
    """Raise, before any work, if the trainer's prepared training set cannot be scored per example by id."""
    dataset = trainer.train_dataset
    if not isinstance(dataset, Dataset):
        raise TypeError(
            f"Confidence scoring needs a map-style `datasets.Dataset` as training set, got {type(dataset).__name__}. "
            "Load the data without `streaming=True`."
        )
    if getattr(trainer.args, "packing", False):
        raise ValueError(
            "Confidence scoring needs one example per sequence, but `packing=True` merges examples and drops their "
            "ids. Train the reference model with `packing=False` (`padding_free=True` is supported)."
        )
    if id_column not in dataset.column_names:
        raise ValueError(
            f"The trainer's training set has no {id_column!r} column, so scores could not be joined to examples. "
            "Give the dataset an id column before building the trainer, e.g. "
            "`dataset = sftmix_trl.add_example_ids(dataset)` (ids derived from each example's content)."
        )
    missing = {"input_ids", "labels"} - set(dataset.column_names)
    if missing:
        raise ValueError(
            f"The trainer's training set lacks {sorted(missing)} after preparation; confidence scoring supports text "
            "datasets that SFTTrainer tokenizes itself (prompt/completion, messages or text)."
        )


@torch.no_grad()
def score_trainer(
    trainer, id_column: str = "id", batch_size: int | None = None, show_progress: bool = True, desc: str = "Scoring"
) -> list[dict[str, Any]] | None:
    """Score every example of `trainer.train_dataset` with `trainer.model` as it is now.

    Data parallel: each process scores a shard, and the main process gets every record (in the dataset's order);
    other processes get None. The model is put in eval mode and given back in its previous mode.

    Args:
        trainer (`trl.SFTTrainer`): a trainer whose training set has been prepared (tokenized) and has an id column.
        id_column (`str`, *optional*, defaults to `"id"`): column with the example ids.
        batch_size (`int`, *optional*): examples per forward; defaults to `args.per_device_eval_batch_size`.
        show_progress (`bool`, *optional*, defaults to `True`): show a progress bar on the main process.
        desc (`str`, *optional*, defaults to `"Scoring"`): the progress bar's label.

    Returns:
        On the main process, a list of `{"id", "num_tokens", "nll", "ppl", "prob", "accuracy"}` records in the
        dataset's order, one per distinct id (a repeated id is an identical example, scored once).
    """
    check_scorable(trainer, id_column)
    dataset = trainer.train_dataset
    if len(dataset) == 0:
        raise ValueError("The trainer's training set is empty after preparation: there is nothing to score.")
    accelerator = trainer.accelerator
    ids = dataset[id_column]
    # a repeated id is the same example repeated (same tokens): scored once
    scored_rows = check_repeated_ids_share_content(
        ids, lambda row: (tuple(dataset[row]["input_ids"]), tuple(dataset[row]["labels"]))
    )
    batch_size = batch_size or trainer.args.per_device_eval_batch_size
    # Exactly what the training dataloader hands to the collator: the columns the model's forward takes
    collator_dataset = trainer._remove_unused_columns(dataset, description="confidence scoring")
    lengths = _sequence_lengths(dataset)

    # Longest examples first, so that batches hold examples of similar lengths (little padding) and the largest batch
    # comes first; dealt round-robin to the processes so each shard is about as long as the others.
    order = sorted(scored_rows, key=lambda i: -lengths[i])
    shard = order[accelerator.process_index :: accelerator.num_processes]
    batches = [shard[start : start + batch_size] for start in range(0, len(shard), batch_size)]
    # Every process runs the same number of forwards, since a sharded model (FSDP, ZeRO-3) gathers its weights in
    # collectives: a process with fewer batches repeats a batch and drops its result.
    num_batches = math.ceil(math.ceil(len(scored_rows) / accelerator.num_processes) / batch_size)

    model = trainer.model_wrapped if (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled) else trainer.model
    was_training = model.training
    model.eval()
    records = []
    # SFTTrainer's fused head also computes the entropy it logs; scoring swaps in one that computes the
    # log-probabilities and top-1 flags only (fewer vocabulary-wide temporaries per tile), and gives the trainer's
    # back after.
    patched = trainer.model.get_base_model() if is_peft_model(trainer.model) else trainer.model
    trainer_forward = patched.__dict__.get("forward")
    add_fused_lm_head(patched, outputs=("log_probs", "is_top1"))
    try:
        progress = tqdm(
            total=num_batches, desc=desc, unit="batch", disable=not (show_progress and accelerator.is_main_process)
        )
        for step in range(num_batches):
            is_padding = step >= len(batches)
            batch_rows = (batches[0] if batches else order[:1]) if is_padding else batches[step]
            inputs = trainer._prepare_inputs(trainer.data_collator(collator_dataset.__getitems__(batch_rows)))
            with trainer.compute_loss_context_manager():
                outputs = model(**inputs, fused_lm_head=True)
            if not is_padding:
                sums, num_tokens = _per_example_sums(outputs, inputs, len(batch_rows))
                for row, (nll_sum, prob_sum, top1_sum), count in zip(batch_rows, sums.tolist(), num_tokens.tolist()):
                    records.append(make_record(ids[row], nll_sum, count, row, prob_sum, top1_sum))
            progress.update(1)
        progress.close()
    finally:
        if trainer_forward is None:
            del patched.forward
        else:
            patched.forward = trainer_forward
        model.train(was_training)

    records = gather_object(records)
    if not accelerator.is_main_process:
        return None
    records.sort(key=lambda record: record.pop("row"))
    return records


def _sequence_lengths(dataset: Dataset) -> list[int]:
    import pyarrow.compute as pc

    # read through the dataset's row mapping (after shuffle/filter) without decoding the token lists into Python
    table = dataset.select_columns(["input_ids"]).with_format("arrow")[:]
    return pc.list_value_length(table.column("input_ids")).to_pylist()


def _per_example_sums(outputs, inputs: dict, num_examples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example, the sums of -log p, of p and of the top-1 flags over its loss tokens (num_examples x 3), and the
    number of loss tokens, from the fused forward's per-token outputs (shifted: position j scores the label at
    j + 1)."""
    log_probs, label_mask = outputs.log_probs, outputs.label_mask
    if "seq_idx" in inputs:
        # padding-free: one row holding every example back to back; `seq_idx` says which example a token belongs to
        example_of = inputs["seq_idx"][:, 1:].to(log_probs.device).long().expand_as(label_mask)
    else:
        example_of = torch.arange(label_mask.size(0), device=log_probs.device)[:, None].expand_as(label_mask)
    example_of = example_of[label_mask]
    # accumulate in fp64: a long response sums hundreds of terms
    token_log_probs = log_probs[label_mask].double()
    per_token = torch.stack([-token_log_probs, token_log_probs.exp(), outputs.is_top1[label_mask].double()], dim=1)
    sums = torch.zeros(num_examples, 3, dtype=torch.float64, device=log_probs.device)
    sums.index_add_(0, example_of, per_token)
    num_tokens = torch.bincount(example_of, minlength=num_examples)
    return sums.cpu(), num_tokens.cpu()


def make_record(
    example_id,
    nll_sum: float,
    num_tokens: int,
    row: int | None = None,
    prob_sum: float | None = None,
    top1_sum: float | None = None,
) -> dict[str, Any]:
    """One example's score from its sums over its loss tokens; `nll`, `ppl`, `prob` and `accuracy` are None when the
    example has no loss token."""
    nll = nll_sum / num_tokens if num_tokens else None
    ppl = None
    if nll is not None:
        try:
            ppl = math.exp(nll)
        except OverflowError:  # nll past ~709: kept as inf, which aggregation reports
            ppl = math.inf
    record = {
        "id": example_id,
        "num_tokens": int(num_tokens),
        "nll": nll,
        "ppl": ppl,
        "prob": prob_sum / num_tokens if num_tokens and prob_sum is not None else None,
        "accuracy": top1_sum / num_tokens if num_tokens and top1_sum is not None else None,
    }
    if row is not None:
        record["row"] = row
    return record


def ids_fingerprint(ids: Sequence) -> str:
    """Order-independent hash of an id set: two score files cover the same examples iff their fingerprints match."""
    digest = hashlib.sha1()
    for example_id in sorted(str(i) for i in ids):
        digest.update(example_id.encode("utf-8") + b"\0")
    return digest.hexdigest()[:16]


def write_scores(records: Sequence[dict], path: str | Path, metadata: dict[str, Any]) -> Path:
    """Write a score file and its sidecar. The records go to a temporary file first; then any older scores file is
    removed, the sidecar written, and the scores file appears last, by rename. So a scores file exists only when it is
    complete and its sidecar is the one written with it (what resuming relies on), and a kill at any moment leaves
    either the old pair, or no scores file at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sidecar = {
        "format_version": FORMAT_VERSION,
        **metadata,
        "num_examples": len(records),
        "ids_fingerprint": ids_fingerprint([r["id"] for r in records]),
        "unscorable_ids": [r["id"] for r in records if r["nll"] is None],
    }
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w", encoding="utf-8") as f:
        for record in records:
            # `allow_nan`: an infinite perplexity is written as Infinity and reported by aggregation
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    path.unlink(missing_ok=True)
    sidecar_partial = path.with_name(path.name + ".sidecar.partial")
    sidecar_partial.write_text(json.dumps(sidecar, indent=2, default=str) + "\n")
    os.replace(sidecar_partial, metadata_path(path))
    os.replace(partial, path)
    return path


def is_complete_score_file(path: str | Path) -> bool:
    """Whether `path` is a score file whose records match its sidecar (what a finished write leaves)."""
    path = Path(path)
    if not (path.is_file() and metadata_path(path).is_file()):
        return False
    try:
        read_scores(path)
    except ValueError:
        return False
    return True


@contextmanager
def exclusive_writer(path: str | Path):
    """Hold `<path>.lock`, created exclusively (`O_EXCL`), while this process writes `path`: a second writer of the same
    score file fails at once, naming the first, instead of both reporting success with one result lost. A lock left
    by a process that no longer runs on this host (killed) is taken over."""
    lock = Path(path).with_name(Path(path).name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    owner = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _lock_holder(lock)
            if holder is not None and not _is_alive(holder):
                lock.unlink(missing_ok=True)  # its writer was killed: take the lock over
                continue
            raise FileExistsError(
                f"{path} is being written by another process ({holder or 'unknown'}; lock file {lock}). Wait for it to "
                "finish, or write to another output folder; if no such process runs, delete the lock file."
            ) from None
        with os.fdopen(fd, "w") as f:
            json.dump(owner, f)
        break
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _lock_holder(lock: Path) -> dict | None:
    try:
        holder = json.loads(lock.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _is_alive(holder: dict) -> bool:
    """Whether the process that wrote a lock still runs; one on another host is taken to."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder.get("pid", -1)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):
        return True
    return True


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what a tokenizer makes of text: its vocabulary and merges, special tokens and chat template (two
    tokenizers with the same fingerprint prepare the same tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocabulary = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    digest = hashlib.sha1(vocabulary.encode())
    digest.update(
        json.dumps([str(tokenizer.chat_template), str(tokenizer.eos_token), str(tokenizer.pad_token)]).encode()
    )
    return digest.hexdigest()[:16]


def metadata_path(scores_path: str | Path) -> Path:
    scores_path = Path(scores_path)
    return scores_path.with_name(scores_path.name.removesuffix(SCORES_SUFFIX) + METADATA_SUFFIX)


def read_scores(path: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A score file's records and its sidecar metadata (empty when the sidecar is missing)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Score file {str(path)!r} does not exist.")
    records = []
    rescore = "rescore it (`sftmix score ... --overwrite`, or rerun the stage that wrote it)"
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{path}:{line_number} is not valid JSON ({error}): the file is damaged or cut short, or is not "
                    f"a score file; {rescore}."
                ) from None
            if not isinstance(record, dict) or not record.keys() >= RECORD_FIELDS:
                raise ValueError(
                    f"{path}:{line_number} is not a score record (needs {sorted(RECORD_FIELDS)}): {line[:80]!r}; "
                    f"{rescore}."
                )
            records.append(record)
    if not records:
        raise ValueError(f"Score file {path} holds no record (an empty file): {rescore}.")
    sidecar = metadata_path(path)
    try:
        metadata = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    except ValueError:
        raise ValueError(
            f"The sidecar {sidecar} of {path} is not valid JSON (damaged or cut short): {rescore}."
        ) from None
    if metadata.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
        raise ValueError(
            f"{path} is in score format {metadata['format_version']}, which this sftmix-trl does not read (it reads "
            f"format {FORMAT_VERSION}): {rescore}."
        )
    ids = [record["id"] for record in records]
    try:
        check_unique_ids(ids)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    # the records are what the sidecar says was written: as many, with the same ids
    expected = (metadata.get("num_examples"), metadata.get("ids_fingerprint"))
    if metadata and expected != (len(records), ids_fingerprint(ids)):
        raise ValueError(
            f"{path} holds {len(records)} record(s) that do not match its sidecar {sidecar.name} "
            f"({metadata.get('num_examples')} record(s), ids fingerprint {metadata.get('ids_fingerprint')} vs "
            f"{ids_fingerprint(ids)}): the pair was damaged or mixed up; {rescore}."
        )
    return records, metadata
