"""The README's Python snippets run as written: the own-script example on the tiny fixtures (the asset functions it
calls are pointed at them, so nothing is fetched), the functional-API example on random tensors."""

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch

import sftmix_trl.assets

import tiny

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_own_script_snippet_runs(tmp_path, monkeypatch, llama_dir):
    snippet = next(block for block in _python_blocks() if "SFTMixTrainer(" in block)
    pairs = tiny.make_pairs(64)
    rows = [
        {"instruction": prompt, "input": f"#{i}", "output": response} for i, (prompt, response) in enumerate(pairs)
    ]
    alpaca_json = tmp_path / "alpaca.json"
    alpaca_json.write_text(json.dumps(rows))
    monkeypatch.setattr(sftmix_trl.assets, "smollm2_path", lambda: llama_dir)
    monkeypatch.setattr(sftmix_trl.assets, "alpaca_demo_path", lambda: alpaca_json)
    monkeypatch.chdir(tmp_path)

    namespace = {}
    exec(compile(snippet, str(README), "exec"), namespace)

    assert namespace["trainer"].state.global_step == 4
    assert len(namespace["table"].dataset) == 64
    assert sorted(p.name for p in (tmp_path / "runs/reference/confidence_scores").glob("*.jsonl")) == [
        "checkpoint-2.jsonl",
        "checkpoint-4.jsonl",
    ]
    assert (tmp_path / "runs/confidence/confidence.jsonl").is_file()


@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_functional_snippet_runs(impl):
    snippet = next(block for block in _python_blocks() if "sftmix_linear_cross_entropy(" in block)
    snippet = snippet.replace("mixup_coef=0.2)", f"mixup_coef=0.2, impl={impl!r})")
    torch.manual_seed(0)
    lm_head = torch.nn.Linear(16, 40, bias=False)
    hidden = torch.randn(10, 16, requires_grad=True)
    namespace = {
        "hidden": hidden,
        "lm_head": lm_head,
        "targets": torch.randint(0, 40, (10,)),
        "mix_index": torch.tensor([[0, 5], [1, 6]]),
        "mix_lambda": torch.tensor([0.3, 0.8]),
        "mix_weight": torch.tensor([0.5, 0.5]),
    }
    exec(compile(snippet, str(README), "exec"), namespace)
    assert torch.isfinite(namespace["out"].loss)
    assert hidden.grad is not None and lm_head.weight.grad is not None


REPOSITORY = README.parent


def _tracked_text_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files"], cwd=REPOSITORY, capture_output=True, text=True, check=True).stdout
    suffixes = {".py", ".md", ".toml", ".yaml", ".sh", ".txt", ""}
    return [REPOSITORY / name for name in listed.splitlines() if Path(name).suffix in suffixes]


def test_the_repository_cites_only_design_notes_it_holds():
    """Every `docs/design.md §N` citation names a section of the design notes in the repository, and nothing cites a
    design document kept outside it."""
    sections = set(re.findall(r"^## (\d+)\. ", (REPOSITORY / "docs" / "design.md").read_text(), flags=re.MULTILINE))
    assert sections, "docs/design.md has numbered sections"
    for path in _tracked_text_files():
        text = path.read_text(errors="replace")
        for outside in (r"DESIGN\.md", r"\.\./shared/"):  # patterns, so this file does not cite them itself
            assert not re.search(outside, text), f"{path} cites {outside}, which is not in the repository"
        for first, last in re.findall(r"docs/design\.md §(\d+)(?:-(\d+))?", text):
            cited = {str(n) for n in range(int(first), int(last or first) + 1)}
            assert cited <= sections, f"{path} cites docs/design.md §{first}{'-' + last if last else ''}"


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_readme_stays_an_entry_point_and_its_links_resolve():
    """The README stays short, and every relative link of the README and docs/ names a file (and heading) that
    exists, so no section moved to docs/ is lost to a reader."""
    assert len(README.read_text().splitlines()) < 300
    pages = [README, *sorted((REPOSITORY / "docs").glob("*.md"))]
    linked = set()
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", page.read_text()):
            path, anchor = target
            if re.match(r"\w+://", path):
                continue
            resolved = (page.parent / path).resolve() if path else page
            assert resolved.is_file(), f"{page.name} links to {path}, which does not exist"
            linked.add(resolved)
            if anchor and resolved.suffix == ".md":
                headings = re.findall(r"^#+ (.*)$", resolved.read_text(), flags=re.MULTILINE)
                assert anchor in {_anchor(h) for h in headings}, f"{page.name} links to {path}#{anchor}"
    assert set(pages[1:]) <= linked, "every page of docs/ is reachable from a link"


def test_the_layout_table_names_every_module_of_the_packages():
    """The README's Layout table matches the tree: every module and subpackage of `sftmix_trl/` and `kernels/` is
    named in its row, and every first-level folder of the repository it names exists."""
    layout = README.read_text().split("## Layout", 1)[1].split("\n## ", 1)[0]
    rows = {match[0]: match[1] for match in re.findall(r"^\| `([^`]+)` \| (.*) \|$", layout, flags=re.MULTILINE)}
    for package in ("sftmix_trl/", "kernels/"):
        entries = sorted((REPOSITORY / package).iterdir())
        names = [p.name + "/" if p.is_dir() else p.name for p in entries if p.name != "__init__.py"]
        names = [n for n in names if n.endswith((".py", "/")) and n != "__pycache__/"]
        missing = [name for name in names if f"`{name}`" not in rows[package]]
        assert not missing, f"the Layout row of {package} does not name {missing}"
    for path in rows:
        assert (REPOSITORY / path).exists(), f"the Layout table names {path}, which does not exist"


def test_the_cost_table_is_rendered_from_the_committed_rows():
    """The cost table of the README and docs/cost.md is what `python -m bench.cost_table` prints from the committed
    CSV rows."""
    from bench.cost_table import AGREEMENT, HELD_OUT, read, render

    table = render(read(AGREEMENT), read(HELD_OUT))
    assert table in README.read_text() and table in (REPOSITORY / "docs" / "cost.md").read_text()
