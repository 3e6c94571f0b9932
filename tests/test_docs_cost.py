"""The snippet of docs/cost.md ("What SFTMix costs") runs as written, on the tiny fixtures (the asset functions it calls are
pointed at them): training dynamics per epoch aggregate into the confidence table, and the one run ends after both
epochs with its split made from the first."""

import json
import re
from pathlib import Path

import sftmix_trl.assets

import tiny

COST_DOC = Path(__file__).resolve().parents[1] / "docs" / "cost.md"


def test_cost_snippet_runs(tmp_path, monkeypatch, llama_dir):
    blocks = re.findall(r"```python\n(.*?)```", COST_DOC.read_text(), flags=re.DOTALL)
    snippet = next(block for block in blocks if "train_one_run(" in block)
    rows = [{"instruction": p, "input": f"#{i}", "output": r} for i, (p, r) in enumerate(tiny.make_pairs(64))]
    (tmp_path / "alpaca.json").write_text(json.dumps(rows))
    monkeypatch.setattr(sftmix_trl.assets, "smollm2_path", lambda: llama_dir)
    monkeypatch.setattr(sftmix_trl.assets, "alpaca_demo_path", lambda: tmp_path / "alpaca.json")
    monkeypatch.chdir(tmp_path)

    namespace = {}
    exec(compile(snippet, str(COST_DOC), "exec"), namespace)

    assert namespace["table"].checkpoints == ["epoch-001", "epoch-002"] and len(namespace["table"].dataset) == 64
    assert namespace["one_run"].state.global_step == 16
    assert (tmp_path / "runs/one-run/confidence/confidence.jsonl").is_file()
