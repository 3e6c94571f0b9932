"""The data map (variability against confidence, one point per example, coloured by half) and a short report of the
most and least confident examples, as in the paper's case study."""

import re
from pathlib import Path

from datasets import Dataset

HALF_COLORS = {"confident": "tab:blue", "unconfident": "tab:red", "remainder": "tab:gray"}


def draw_data_map(table: Dataset, path: str | Path, title: str | None = None) -> Path:
    """Scatter confidence (y) against variability (x), one point per example of an aggregated table, and save a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    confidence, variability, halves = table["confidence"], table["variability"], table["half"]
    fig, ax = plt.subplots(figsize=(7, 5.5), dpi=120)
    # few points: large markers; tens of thousands: small, translucent ones
    size = max(2.0, min(30.0, 6000.0 / max(len(table), 1)))
    for half, color in HALF_COLORS.items():
        rows = [n for n, h in enumerate(halves) if h == half]
        if rows:
            ax.scatter(
                [variability[n] for n in rows],
                [confidence[n] for n in rows],
                s=size,
                c=color,
                alpha=0.6,
                linewidths=0,
                label=f"{half} ({len(rows)})",
            )
    ax.set_xlabel("variability: std of perplexity across checkpoints")
    ax.set_ylabel("confidence: - mean perplexity across checkpoints")
    ax.set_title(title or f"Data map ({len(table)} examples)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def instruction_of(example: dict) -> str:
    """The instruction of an example in any of the usual formats: Alpaca `instruction`, a `prompt` (text or chat:
    its last user turn), `messages` (the first user turn), or `text`."""
    if example.get("instruction"):
        return str(example["instruction"])
    for column, pick in (("prompt", -1), ("messages", 0)):
        value = example.get(column)
        if isinstance(value, str):
            return value
        if isinstance(value, list):
            user_turns = [m.get("content", "") for m in value if isinstance(m, dict) and m.get("role") == "user"]
            if user_turns:
                return str(user_turns[pick])
    return str(example.get("text", ""))


def _truncate(text: str, width: int) -> str:
    text = re.sub(r"\s+", " ", text).strip().replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


def confidence_report(
    table: Dataset, examples: Dataset | None = None, top_n: int = 10, width: int = 100, id_column: str = "id"
) -> str:
    """A Markdown report: counts per half, then the `top_n` most and least confident examples with their
    instructions (from `examples`, joined by id; truncated to `width` characters)."""
    by_id = {}
    if examples is not None:
        by_id = {example[id_column]: example for example in examples if id_column in example}
    confidence, ids, halves = table["confidence"], table["id"], table["half"]
    order = sorted(range(len(table)), key=lambda n: (-confidence[n], str(ids[n])))
    rank = {row: position + 1 for position, row in enumerate(order)}
    lines = [
        "# Confidence report",
        "",
        f"{len(table)} examples: "
        + ", ".join(f"{halves.count(h)} {h}" for h in ("confident", "unconfident", "remainder")),
        "",
    ]
    for heading, rows in (
        (f"Most confident {min(top_n, len(order))}", order[:top_n]),
        (f"Least confident {min(top_n, len(order))}", order[::-1][:top_n]),
    ):
        lines += [
            f"## {heading}",
            "",
            "| rank | id | confidence | variability | instruction |",
            "|---|---|---|---|---|",
        ]
        for row in rows:
            record = table[row]
            instruction = _truncate(instruction_of(by_id[record["id"]]), width) if record["id"] in by_id else ""
            lines.append(
                f"| {rank[row]} | {record['id']} | {record['confidence']:.3f} | {record['variability']:.3f} | "
                f"{instruction} |"
            )
        lines.append("")
    return "\n".join(lines)


def write_data_map(
    table: Dataset,
    output_dir: str | Path,
    examples: Dataset | None = None,
    top_n: int = 10,
    title: str | None = None,
    id_column: str = "id",
) -> tuple[Path, Path]:
    """Write `datamap.png` and `confidence_report.md` into `output_dir`."""
    output_dir = Path(output_dir)
    png = draw_data_map(table, output_dir / "datamap.png", title=title)
    report = output_dir / "confidence_report.md"
    report.write_text(confidence_report(table, examples, top_n=top_n, id_column=id_column))
    return png, report
