"""`sftmix score | aggregate | datamap` end to end on the tiny fixtures, through the installed console script, and
the messages a user sees for bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sftmix_trl.cli import main
from sftmix_trl.confidence import load_confidence
from sftmix_trl.data.ids import derive_example_id

import tiny

SFTMIX = Path(sys.executable).parent / "sftmix"


def alpaca_rows(num_examples: int = 12) -> list[dict]:
    """Alpaca-style rows without ids; the last two have instructions too long to leave room for a response."""
    rows = [
        {"instruction": f"{i}. {prompt}", "input": "", "output": response}
        for i, (prompt, response) in enumerate(tiny.make_pairs(num_examples))
    ]
    for row in rows[-2:]:
        row["instruction"] += " please" * 60
    return rows


def sftmix(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([str(SFTMIX), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def data_file(tmp_path) -> Path:
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(alpaca_rows()))
    return path


def test_score_aggregate_datamap_end_to_end(tmp_path, llama_dir, tokenizer, data_file):
    second = tmp_path / "run" / "checkpoint-2"
    tiny.build_llama(tokenizer, seed=1).save_pretrained(second)
    tokenizer.save_pretrained(second)

    scored = sftmix(
        "score",
        *("--checkpoints", str(llama_dir), str(second)),
        *("--dataset_name", str(data_file), "--output_dir", "scores"),
        *("--max_length", "64", "--per_device_eval_batch_size", "4"),
        cwd=tmp_path,
    )
    assert scored.returncode == 0, scored.stderr
    assert len(list((tmp_path / "scores").glob("*.jsonl"))) == 2
    # the two examples truncation leaves without a response cannot train: TRL drops them, they get no record (as in
    # the training-time scorer's files), and the sidecar names them
    raw_ids = [derive_example_id(row) for row in alpaca_rows()]
    for path in (tmp_path / "scores").glob("*.jsonl"):
        records = [json.loads(line) for line in path.read_text().splitlines()]
        assert [r["id"] for r in records] == raw_ids[:-2]
        assert json.loads(path.with_suffix(".json").read_text())["left_out_ids"] == raw_ids[-2:]
    assert "2 of 12 example(s) left out: no response token after truncation at max_length=64" in scored.stderr

    aggregated = sftmix(
        "aggregate",
        *("--scores", "scores", "--output_dir", "confidence"),
        *("--dataset_name", str(data_file)),
        cwd=tmp_path,
    )
    assert aggregated.returncode == 0, aggregated.stderr
    assert "10 examples over 2 checkpoint(s): 5 confident, 5 unconfident" in aggregated.stdout
    table = load_confidence(tmp_path / "confidence")
    assert sorted(table["id"]) == sorted(raw_ids[:-2])  # ids derived from the raw rows, before any processing
    report = (tmp_path / "confidence" / "confidence_report.md").read_text()
    most_confident = max(zip(table["confidence"], table["id"]))[1]
    assert f"| 1 | {most_confident} |" in report
    assert alpaca_rows()[raw_ids.index(most_confident)]["instruction"] in report  # joined by id to the raw data
    assert (tmp_path / "confidence" / "datamap.png").stat().st_size > 10_000

    # `--config` sets the fields, the command line overrides them
    (tmp_path / "datamap.yaml").write_text("confidence: confidence\ntop_n: 2\noutput_dir: elsewhere\n")
    drawn = sftmix("datamap", "--config", "datamap.yaml", "--output_dir", "map", cwd=tmp_path)
    assert drawn.returncode == 0, drawn.stderr
    assert "Most confident 2" in (tmp_path / "map" / "confidence_report.md").read_text()
    assert (tmp_path / "map" / "datamap.png").is_file() and not (tmp_path / "elsewhere").exists()


def test_bad_input_messages(tmp_path, llama_dir, data_file, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def run(*argv: str) -> tuple[int, str]:
        code = main(list(argv))
        return code, capsys.readouterr().err

    code, err = run("score", "--checkpoints", str(tmp_path / "no-such-checkpoint"), "--dataset_name", str(data_file))
    assert code == 1 and "cannot be loaded" in err and "no-such-checkpoint" in err
    code, err = run("score", "--checkpoints", str(llama_dir))
    assert code == 1 and "pass `--dataset_name`" in err
    code, err = run("aggregate", "--scores", str(tmp_path), "--output_dir", "out")
    assert code == 1 and "K = 0" in err
    code, err = run("aggregate", "--scores", "missing-folder", "--output_dir", "out")
    assert code == 1 and "does not exist" in err

    code, _ = run("score", "--checkpoints", str(llama_dir), "--dataset_name", str(data_file), "--output_dir", "s")
    assert code == 0
    # `--drop_unscorable` is still accepted (it has no effect: such examples are always left out)
    args = ("aggregate", "--scores", "s", "--output_dir", "out", "--drop_unscorable", "--data_map", "false")
    assert run(*args)[0] == 0
    code, err = run(*args)
    assert code == 1 and "already holds confidence results" in err and "--overwrite" in err
    assert run(*args, "--overwrite")[0] == 0
    code, err = run("datamap", "--confidence", "out", "--top_n", "0")
    assert code == 1 and "`top_n` must be at least 1" in err
    assert main(["frobnicate"]) == 2 and "unknown command 'frobnicate'" in capsys.readouterr().err


def test_missing_data_file_duplicates_and_content_parts(tmp_path, llama_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # a missing local file is named as such, before any Hub call (HF_HUB_OFFLINE is not needed for this)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert main(["score", "--checkpoints", str(llama_dir), "--dataset_name", "data/my_data.jsonl"]) == 1
    assert capsys.readouterr().err.startswith(
        "sftmix score: error: Dataset 'data/my_data.jsonl' does not exist (looked for "
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    # chat messages with content parts and one duplicate conversation: the two copies share a derived id and are
    # scored once; --drop_duplicates drops the copy first and gives the same records
    pairs = list(dict.fromkeys(tiny.make_pairs(20)))[:6]  # six distinct conversations
    rows = [
        {"messages": [{"role": role, "content": [{"type": "text", "text": text}]} for role, text in zip(roles, pair)]}
        for roles, pair in zip([("user", "assistant")] * 7, [*pairs, pairs[0]])
    ]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    score = ["score", "--checkpoints", str(llama_dir), "--dataset_name", "chat.jsonl"]
    assert main([*score, "--output_dir", "s"]) == 0
    assert main([*score, "--output_dir", "dropped", "--drop_duplicates"]) == 0
    records = [json.loads(line) for line in (tmp_path / "s" / f"{llama_dir.name}.jsonl").read_text().splitlines()]
    dropped = (tmp_path / "dropped" / f"{llama_dir.name}.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in dropped] == [r["id"] for r in records]
    # ids derived from the messages as text: the same as the plain-text rows would get
    plain = [{"messages": [{"role": r, "content": t} for r, t in zip(("user", "assistant"), p)]} for p in pairs]
    assert [r["id"] for r in records] == [derive_example_id(row) for row in plain]
    assert all(r["num_tokens"] > 0 and 0 < r["prob"] < 1 and 0 <= r["accuracy"] <= 1 for r in records)


def test_a_rerun_with_other_settings_weights_or_writers_never_keeps_a_stale_file(
    tmp_path, llama_dir, tokenizer, data_file, capsys, monkeypatch
):
    import shutil

    monkeypatch.chdir(tmp_path)
    checkpoint = tmp_path / "checkpoint-2"
    shutil.copytree(llama_dir, checkpoint)
    score = ["score", "--checkpoints", str(checkpoint), "--dataset_name", str(data_file), "--output_dir", "s"]
    path = tmp_path / "s" / "checkpoint-2.jsonl"

    def run(*extra: str) -> tuple[int, str]:
        code = main([*score, *extra])
        return code, capsys.readouterr().err

    assert run("--max_length", "64")[0] == 0
    first = path.read_bytes()
    assert run("--max_length", "64") == (0, "")  # the same inputs: kept, as a resumed run keeps it
    code, err = run("--max_length", "48")
    assert code == 1 and "s/checkpoint-2.jsonl already holds scores made from other settings than these" in err
    # retrained weights in the same folder (same size, another modification time)
    tiny.build_llama(tokenizer, seed=5).save_pretrained(checkpoint)
    code, err = run("--max_length", "64")
    assert code == 1 and "made from other weights" in err and "--overwrite" in err
    assert path.read_bytes() == first  # refused, untouched
    assert run("--max_length", "64", "--overwrite")[0] == 0 and path.read_bytes() != first
    # a second writer of the same file while the first is at work is refused, naming the lock
    (tmp_path / "s" / "checkpoint-2.jsonl.lock").write_text(json.dumps({"pid": 1, "host": "another-host"}))
    code, err = run("--max_length", "64", "--overwrite")
    assert code == 1 and "is being written by another process ({'pid': 1, 'host': 'another-host'}" in err


def test_unknown_arguments_are_named_with_the_closest_known_ones(tmp_path, capsys):
    (tmp_path / "score.yaml").write_text("checkpoints: [m]\nmax_lenght: 64\n")
    code = main(["score", "--config", str(tmp_path / "score.yaml"), "--dataset_nmae", "d.json"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert (
        f"sftmix score: error: Unknown argument(s): 'max_lenght' in {tmp_path / 'score.yaml'} (did you mean "
        "'max_length'?); 'dataset_nmae' in the command line (did you mean 'dataset_name' or"
    ) in err
