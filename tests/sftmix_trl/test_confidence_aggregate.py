"""Aggregation: confidence = -mean_k ppl_k, variability = population std over checkpoints, the equal-size split,
the saved table, the data map, and a clear error for every bad input before anything is written."""

import json
import math
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from datasets import Dataset

from sftmix_trl.confidence import aggregate_scores, confidence_report, load_confidence, write_data_map
from sftmix_trl.confidence.scoring import make_record, write_scores

import tiny


def write_run(directory, ppl_by_checkpoint: dict[str, dict], dataset: str | None = None):
    """Score files as the scorer writes them, from {checkpoint name: {id: ppl or None}}."""
    paths = []
    for name, ppl in ppl_by_checkpoint.items():
        records = []
        for example_id, value in ppl.items():
            # a record whose nll gives back this ppl (over 3 tokens, 1 / ppl the probability of each, 2 of them
            # top-1); None: no loss token
            record = (
                make_record(example_id, 0.0, 0)
                if value is None
                else make_record(example_id, 3 * math.log(value), 3, prob_sum=3 / value, top1_sum=2)
            )
            if value is not None and not math.isfinite(value):
                record["ppl"] = value
            records.append(record)
        paths.append(write_scores(records, directory / f"{name}.jsonl", {"dataset": dataset}))
    return paths


PPL = {
    "checkpoint-10": {"a": 2.0, "b": 8.0, "c": 4.0, "d": 1.5, "e": 3.0},
    "checkpoint-20": {"a": 4.0, "b": 6.0, "c": 2.0, "d": 1.5, "e": 3.0},
}


def test_confidence_is_minus_mean_ppl_and_halves_are_equal(tmp_path):
    # files given in the wrong order are read in checkpoint order (10 before 20, not by name: 20 < 100)
    write_run(tmp_path, {"checkpoint-100": {k: v + 1 for k, v in PPL["checkpoint-20"].items()}, **PPL})
    table = aggregate_scores([tmp_path])
    assert table.checkpoints == ["checkpoint-10", "checkpoint-20", "checkpoint-100"]
    data = table.dataset
    assert data.column_names == [
        "id", "confidence", "variability", "half", "ppl",
        "gold_prob", "gold_prob_std", "correctness", "prob", "accuracy", "num_tokens",
    ]  # fmt: skip
    for row in data:
        ppl = np.array([PPL["checkpoint-10"][row["id"]], PPL["checkpoint-20"][row["id"]]])
        ppl = np.append(ppl, PPL["checkpoint-20"][row["id"]] + 1)
        assert row["ppl"] == pytest.approx(ppl.tolist())
        assert row["confidence"] == pytest.approx(-ppl.mean())
        assert row["variability"] == pytest.approx(math.sqrt(((ppl - ppl.mean()) ** 2).mean()))  # ddof = 0
        # the cartography view: write_run's records have gold-token probability 1 / ppl, 2 of 3 tokens top-1
        prob = 1 / ppl
        assert row["prob"] == pytest.approx(prob.tolist()) and row["gold_prob"] == pytest.approx(prob.mean())
        assert row["gold_prob_std"] == pytest.approx(math.sqrt(((prob - prob.mean()) ** 2).mean()))
        assert row["correctness"] == pytest.approx(2 / 3) and row["num_tokens"] == 3
    half = dict(zip(data["id"], data["half"]))
    # mean ppl: d 1.83, c 3.0, e 3.33, a 3.67, b 7.33 -> d, c confident; a, b unconfident; e the median
    assert half == {"d": "confident", "c": "confident", "e": "remainder", "a": "unconfident", "b": "unconfident"}
    # the threshold lies between the least confident confident example (c, -3.0) and the most confident unconfident
    # one (a, -11 / 3)
    assert table.summary()["confidence_threshold"] == pytest.approx((-3.0 - 11 / 3) / 2)


def test_single_checkpoint_has_zero_variability_and_ties_split_by_id(tmp_path):
    write_run(tmp_path, {"checkpoint-1": {"x3": 2.0, "x1": 2.0, "x2": 2.0, "x0": 2.0}})
    data = aggregate_scores([tmp_path / "checkpoint-1.jsonl"]).dataset
    assert data["variability"] == [0.0] * 4
    assert dict(zip(data["id"], data["half"])) == {
        "x0": "confident",
        "x1": "confident",
        "x2": "unconfident",
        "x3": "unconfident",
    }


def test_saved_table_round_trips_and_refuses_to_overwrite(tmp_path):
    write_run(tmp_path / "scores", PPL)
    table = aggregate_scores([tmp_path / "scores"])
    out = table.save(tmp_path / "out")
    for reader in (out, out / "confidence.jsonl", out / "confidence.parquet"):
        loaded = load_confidence(reader)
        assert loaded["id"] == table.dataset["id"]
        assert loaded["confidence"] == pytest.approx(table.dataset["confidence"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["checkpoints"] == ["checkpoint-10", "checkpoint-20"]
    assert summary["num_confident"] == summary["num_unconfident"] == 2 and summary["num_remainder"] == 1
    before = (out / "confidence.jsonl").read_bytes()
    with pytest.raises(FileExistsError, match="already holds confidence results.*overwrite"):
        table.save(out)
    assert (out / "confidence.jsonl").read_bytes() == before
    table.save(out, overwrite=True)


def test_examples_without_a_response_token_are_left_out_as_rows_without_a_record_are(tmp_path):
    # a record with no response token to predict (`num_tokens = 0`, null perplexity) is a row that cannot train: left
    # out, as a row that TRL's preparation drops is left out by having no record
    with_empty = tmp_path / "old"
    write_run(
        with_empty,
        {
            "checkpoint-1": {**PPL["checkpoint-10"], "empty": None},
            "checkpoint-2": {**PPL["checkpoint-20"], "empty": None},
        },
    )
    table = aggregate_scores([with_empty])
    assert "empty" not in table.dataset["id"] and table.excluded_ids == ["empty"]
    assert table.summary()["excluded_unscorable_ids"] == ["empty"]
    callback = tmp_path / "callback"
    write_run(callback, {"checkpoint-1": PPL["checkpoint-10"], "checkpoint-2": PPL["checkpoint-20"]})
    assert table.dataset["id"] == aggregate_scores([callback]).dataset["id"]
    # both kinds of file aggregate together
    mixed = aggregate_scores([with_empty / "checkpoint-1.jsonl", callback / "checkpoint-2.jsonl"])
    assert mixed.dataset["id"] == table.dataset["id"] and mixed.excluded_ids == ["empty"]
    # a row scored by one checkpoint and unscorable at another is data prepared two ways: refused
    write_run(tmp_path / "other", {"checkpoint-3": {**PPL["checkpoint-10"], "empty": 2.5}})
    with pytest.raises(ValueError, match=r"cover different examples.*'empty'.*tokenizers or `max_length`s"):
        aggregate_scores([with_empty / "checkpoint-1.jsonl", tmp_path / "other"])
    with pytest.raises(ValueError, match="hold no scored example"):
        write_run(tmp_path / "none", {"checkpoint-1": {"a": None}})
        aggregate_scores([tmp_path / "none"])


@pytest.mark.parametrize(
    "runs, message",
    [
        ({}, r"No score files to aggregate \(K = 0\)"),
        (
            {
                "checkpoint-1": {"a": 2.0, "b": 3.0, "c": 1.0, "d": 4.0},
                "checkpoint-2": {"a": 2.0, "b": 3.0, "c": 1.0, "z": 4.0},
            },
            r"cover different examples.*lacks 1 id.*'d'.*'z'",
        ),
        ({"checkpoint-1": {"a": 2.0, "b": math.nan, "c": 1.0, "d": 4.0}}, r"NaN or infinite perplexity \('b'\)"),
        ({"checkpoint-1": {"a": 2.0, "b": 3.0, "c": math.inf, "d": 4.0}}, r"NaN or infinite perplexity \('c'\)"),
    ],
    ids=["no-files", "different-ids", "nan", "inf"],
)
def test_bad_score_files_are_refused(tmp_path, runs, message):
    write_run(tmp_path, runs)
    with pytest.raises(ValueError, match=message):
        aggregate_scores([tmp_path])


def test_duplicate_ids_and_different_datasets_are_refused(tmp_path):
    (path,) = write_run(tmp_path / "dup", {"checkpoint-1": {"a": 2.0, "b": 3.0}})
    path.write_text(path.read_text() + path.read_text().splitlines()[0] + "\n")
    with pytest.raises(ValueError, match=r"checkpoint-1.jsonl: 1 duplicate example id\(s\), e.g. 'a'"):
        aggregate_scores([path])
    write_run(tmp_path / "alpaca", {"checkpoint-1": PPL["checkpoint-10"]}, dataset="alpaca")
    write_run(tmp_path / "dolly", {"checkpoint-2": PPL["checkpoint-20"]}, dataset="dolly")
    with pytest.raises(ValueError, match=r"different datasets \(\['alpaca', 'dolly'\]\)"):
        aggregate_scores([tmp_path / "alpaca", tmp_path / "dolly"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        aggregate_scores([tmp_path / "nowhere"])


def test_data_map_png_and_report(tmp_path):
    rng = np.random.default_rng(0)
    examples = tiny.prompt_completion_dataset(40)
    runs = {f"checkpoint-{k}": {i: float(rng.lognormal(1.0, 0.6)) for i in examples["id"]} for k in (1, 2, 3)}
    write_run(tmp_path / "scores", runs)
    table = aggregate_scores([tmp_path / "scores"])
    png, report = write_data_map(
        table.dataset, tmp_path / "out", examples=examples, top_n=3, models=["/models/Tiny-LM"],
        checkpoints=table.checkpoints, dataset_name="tiny-tasks",
    )  # fmt: skip
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    text = report.read_text()
    # what the report states besides the examples: model, data, K, the threshold, per-half and per-checkpoint values
    assert "Model: Tiny-LM. Data: tiny-tasks. K = 3 checkpoint(s): checkpoint-1, checkpoint-2, checkpoint-3." in text
    threshold = table.summary()["confidence_threshold"]
    assert f"the split threshold is {threshold:.4g} (mean perplexity {-threshold:.4g})" in text
    ppl = np.array(table.dataset["ppl"])
    assert f"| checkpoint-2 | {ppl[:, 1].mean():.3f} |" in text
    assert f"| {(1 / ppl[:, 1]).mean():.3f} | 0.667 |" in text  # gold-token probability and correctness at k = 2
    assert "| confident | 20 |" in text and "| 3.0 / 3 |" in text  # response tokens: mean / median
    order = sorted(zip(table.dataset["confidence"], table.dataset["id"]), key=lambda pair: -pair[0])
    most, least = order[0][1], order[-1][1]
    prompt_of = dict(zip(examples["id"], examples["prompt"]))
    assert text.index("Most confident 3") < text.index(most) < text.index("Least confident 3") < text.index(least)
    assert " ".join(prompt_of[most].split()) in text
    assert "20 confident, 20 unconfident, 0 remainder" in text


def test_report_truncates_long_instructions():
    table = Dataset.from_dict(
        {
            "id": ["a"], "confidence": [-1.0], "variability": [0.0], "half": ["remainder"], "ppl": [[1.0]],
            "gold_prob": [1.0], "gold_prob_std": [0.0], "correctness": [1.0], "prob": [[1.0]], "accuracy": [[1.0]],
            "num_tokens": [4],
        }
    )  # fmt: skip
    examples = Dataset.from_dict({"id": ["a"], "messages": [[{"role": "user", "content": "word " * 100}]]})
    line = next(line for line in confidence_report(table, examples, width=40).splitlines() if line.startswith("| 1 |"))
    instruction = line.split("|")[8].strip()
    assert len(instruction) == 40 and instruction.endswith("…") and instruction.startswith("word word")


@pytest.mark.parametrize(
    "damage, message",
    [
        ("line_dropped", r"holds 4 record\(s\) that do not match its sidecar checkpoint-10.json \(5 record\(s\)"),
        ("id_changed", r"holds 5 record\(s\) that do not match its sidecar .*ids fingerprint"),
        ("emptied", r"holds no record \(an empty file\): rescore it"),
        ("cut_short", r"checkpoint-10.jsonl:5 is not valid JSON .*damaged or cut short"),
        ("sidecar_cut_short", r"The sidecar .*checkpoint-10.json of .* is not valid JSON"),
    ],
)
def test_a_score_file_is_used_only_when_its_records_match_its_sidecar(tmp_path, damage, message):
    from sftmix_trl.confidence.scoring import is_complete_score_file, metadata_path

    path, _ = write_run(tmp_path, PPL)
    assert is_complete_score_file(path)
    text = path.read_text()
    if damage == "line_dropped":
        path.write_text("".join(text.splitlines(keepends=True)[:-1]))
    elif damage == "id_changed":
        path.write_text(text.replace('"id": "e"', '"id": "f"'))
    elif damage == "emptied":
        path.write_text("")
    elif damage == "cut_short":
        path.write_text(text[: len(text) - 20])
    else:
        metadata_path(path).write_text(metadata_path(path).read_text()[:30])
    with pytest.raises(ValueError, match=message):
        aggregate_scores([tmp_path])
    assert not is_complete_score_file(path)  # what a resumed reference run rescores


def test_score_files_made_at_different_max_lengths_or_with_different_tokenizers_are_refused(tmp_path):
    from sftmix_trl.confidence.scoring import metadata_path

    first, second = write_run(tmp_path, PPL)
    for path, (max_length, tokenizer) in zip((first, second), ((64, "aaa"), (128, "aaa"))):
        sidecar = json.loads(metadata_path(path).read_text())
        metadata_path(path).write_text(
            json.dumps({**sidecar, "max_length": max_length, "tokenizer_fingerprint": tokenizer})
        )
    with pytest.raises(ValueError, match=r"different `max_length`s \(.*checkpoint-10.jsonl: 64; .*: 128\)"):
        aggregate_scores([tmp_path])
    sidecar = json.loads(metadata_path(second).read_text())
    metadata_path(second).write_text(json.dumps({**sidecar, "max_length": 64, "tokenizer_fingerprint": "bbb"}))
    with pytest.raises(ValueError, match=r"different tokenizers"):
        aggregate_scores([tmp_path])


def test_a_score_file_has_one_writer_at_a_time(tmp_path):
    from sftmix_trl.confidence.scoring import exclusive_writer

    path = tmp_path / "checkpoint-1.jsonl"
    # a second writer, in this process or another, fails at once, naming the first
    held = rf"is being written by another process \({{'pid': {os.getpid()}"
    with exclusive_writer(path), pytest.raises(FileExistsError, match=held), exclusive_writer(path):
        pass
    assert not (tmp_path / "checkpoint-1.jsonl.lock").exists()
    # a lock left by a writer that was killed (its process is gone) is taken over
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "checkpoint-1.jsonl.lock").write_text(
        json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()})
    )
    with exclusive_writer(path):
        assert json.loads((tmp_path / "checkpoint-1.jsonl.lock").read_text())["pid"] == os.getpid()


def test_a_rewrite_cut_short_leaves_no_scores_file_beside_a_foreign_sidecar(tmp_path, monkeypatch):
    from sftmix_trl.confidence import scoring

    (path,) = write_run(tmp_path, {"checkpoint-1": PPL["checkpoint-10"]})
    real_replace = scoring.os.replace

    def killed_before_the_records_land(source, target):
        real_replace(source, target)
        if str(target).endswith(".json"):
            raise KeyboardInterrupt  # the sidecar is in place, the records not yet

    monkeypatch.setattr(scoring.os, "replace", killed_before_the_records_land)
    with pytest.raises(KeyboardInterrupt):
        write_run(tmp_path, {"checkpoint-1": PPL["checkpoint-20"]})
    # the old records are gone with their sidecar: no pair that does not belong together
    assert not path.exists() and not scoring.is_complete_score_file(path)
