"""The data map and a report of the confidence split, as in the paper's case study and in dataset cartography
(Swayamdipta et al., 2020).

The map puts each example at its variability (x: the spread of its mean gold-token probability across the K
checkpoints) and confidence (y: that probability's mean), both bounded, coloured by correctness (the share of its
response tokens the checkpoints predict top-1), with the easy-to-learn, ambiguous and hard-to-learn regions labelled
and marginal histograms. SFTMix splits on another confidence, minus the mean perplexity (unbounded): its split is drawn
in a panel of its own, with the threshold, and its halves are the marker shapes and the colours of the right margin."""

import re
import statistics
from pathlib import Path

from datasets import Dataset

from .aggregate import split_threshold

HALF_COLORS = {"confident": "tab:blue", "unconfident": "tab:red", "remainder": "tab:gray"}
HALF_MARKERS = {"confident": "o", "unconfident": "^", "remainder": "s"}
CARTOGRAPHY_COLUMNS = ("gold_prob", "gold_prob_std", "correctness")


def model_label(models) -> str:
    """Short model names for a title: the last path component of each."""
    return ", ".join(Path(str(model)).name or str(model) for model in models) if models else "model not recorded"


def data_map_title(table: Dataset, models=(), dataset_name: str | None = None) -> str:
    return (
        f"Data map of {dataset_name or 'the training data'} ({len(table)} examples): {model_label(models)}, "
        f"K = {len(table[0]['ppl'])} checkpoint(s)"
    )


def _require_cartography(table: Dataset) -> None:
    missing = [column for column in CARTOGRAPHY_COLUMNS if column not in table.column_names]
    if missing:
        raise ValueError(
            f"The confidence table lacks {missing}: it is not a table that `aggregate_scores` (`sftmix aggregate`) "
            "writes. Aggregate the score files again."
        )


def draw_data_map(table: Dataset, path: str | Path, title: str | None = None) -> Path:
    """Draw the data map of an aggregated table (see the module docstring) and save it as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    _require_cartography(table)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prob, spread = np.array(table["gold_prob"]), np.array(table["gold_prob_std"])
    correctness, halves = np.array(table["correctness"]), np.array(table["half"])
    mean_ppl = -np.array(table["confidence"])

    fig = plt.figure(figsize=(11, 9), dpi=110)
    # rows: top margin, scatter, a gap for the scatter's x labels, the split panel
    grid = fig.add_gridspec(
        4, 3, width_ratios=(5, 1.2, 0.2), height_ratios=(1.1, 5, 0.75, 2.2), hspace=0.08, wspace=0.05
    )
    scatter_ax = fig.add_subplot(grid[1, 0])
    top_ax = fig.add_subplot(grid[0, 0], sharex=scatter_ax)
    right_ax = fig.add_subplot(grid[1, 1], sharey=scatter_ax)
    colorbar_ax = fig.add_subplot(grid[1, 2])
    split_ax = fig.add_subplot(grid[3, :2])

    # few points: large markers; tens of thousands: small, translucent ones
    size = max(3.0, min(40.0, 8000.0 / max(len(table), 1)))
    points = None
    for half, marker in HALF_MARKERS.items():
        rows = halves == half
        if rows.any():
            points = scatter_ax.scatter(
                spread[rows], prob[rows], c=correctness[rows], cmap="viridis", vmin=0, vmax=1, marker=marker,
                s=size, alpha=0.75, linewidths=0, label=f"SFTMix {half} ({int(rows.sum())})",
            )  # fmt: skip
    fig.colorbar(points, cax=colorbar_ax, label="correctness: share of response tokens predicted top-1")
    x_max = max(float(spread.max()) * 1.15, 0.02)
    scatter_ax.set_xlim(0, x_max)
    scatter_ax.set_ylim(0, 1)
    scatter_ax.set_xlabel("variability: std across checkpoints of the mean gold-token probability")
    scatter_ax.set_ylabel("confidence:\nmean gold-token probability across checkpoints")
    scatter_ax.grid(alpha=0.3)
    legend = scatter_ax.legend(loc="lower right", fontsize=8, markerscale=max(1.0, 30 / size) ** 0.5)
    for handle in legend.legend_handles:
        handle.set_color("0.35")
    box = dict(boxstyle="round", facecolor="white", alpha=0.8, edgecolor="0.6")
    for text, (x, y) in {
        "easy-to-learn\n(confident, stable)": (0.03, 0.95),
        "hard-to-learn\n(unconfident, stable)": (0.03, 0.05),
        "ambiguous\n(variable)": (0.97, 0.55),
    }.items():
        scatter_ax.text(
            x, y, text, transform=scatter_ax.transAxes, fontsize=9, bbox=box,
            ha="left" if x < 0.5 else "right", va="top" if y > 0.5 else ("bottom" if y < 0.5 else "center"),
        )  # fmt: skip

    top_ax.hist(spread, bins=40, range=(0, x_max), color="0.5")
    top_ax.set_ylabel("examples")
    top_ax.tick_params(labelbottom=False)
    top_ax.set_title(title or data_map_title(table), fontsize=11)
    present = [half for half in HALF_COLORS if (halves == half).any()]
    right_ax.hist(
        [prob[halves == half] for half in present], bins=40, range=(0, 1), orientation="horizontal", stacked=True,
        color=[HALF_COLORS[half] for half in present], label=present,
    )  # fmt: skip
    right_ax.tick_params(labelleft=False)
    right_ax.set_xlabel("examples")
    right_ax.legend(fontsize=7, loc="lower right", title="SFTMix half", title_fontsize=7)

    # SFTMix's own split: minus the mean perplexity, shown as the mean perplexity on a log axis
    bins = np.geomspace(max(float(mean_ppl.min()), 1.0), max(float(mean_ppl.max()), 1.0) * 1.0001 + 1e-9, 50)
    split_ax.hist(
        [mean_ppl[halves == half] for half in present], bins=bins, stacked=True,
        color=[HALF_COLORS[half] for half in present], label=[f"{half} ({int((halves == half).sum())})" for half in present],
    )  # fmt: skip
    split_ax.set_xscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}")
    split_ax.xaxis.set_major_formatter(plain)
    # a narrow range has at most one power of ten: label the minor ticks too
    narrow = bins[-1] / bins[0] < 20
    split_ax.xaxis.set_minor_formatter(plain if narrow else matplotlib.ticker.NullFormatter())
    threshold = split_threshold(table)
    if threshold is not None:
        split_ax.axvline(-threshold, color="black", linestyle="--", linewidth=1.2)
        split_ax.annotate(
            f"split: mean ppl {-threshold:.3g}\n(confidence {threshold:.3g})", xy=(-threshold, 0.95),
            xycoords=("data", "axes fraction"), xytext=(6, 0), textcoords="offset points", va="top", fontsize=9,
        )  # fmt: skip
    split_ax.set_xlabel("SFTMix confidence = - mean perplexity across checkpoints (shown: mean perplexity, log scale)")
    split_ax.set_ylabel("examples")
    split_ax.legend(fontsize=8, loc="upper right")
    split_ax.grid(alpha=0.3)
    fig.savefig(path, bbox_inches="tight")
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


def _mean(values) -> float:
    return statistics.fmean(values) if values else float("nan")


def confidence_report(
    table: Dataset,
    examples: Dataset | None = None,
    top_n: int = 10,
    width: int = 100,
    id_column: str = "id",
    models=(),
    checkpoints=(),
    dataset_name: str | None = None,
) -> str:
    """A Markdown report: the model, data and checkpoints, the split threshold, per-half and per-checkpoint figures
    (perplexity, gold-token probability, correctness, response lengths), then the `top_n` most and least confident
    examples with their per-checkpoint perplexities and instructions (from `examples`, joined by id; truncated to
    `width` characters)."""
    _require_cartography(table)
    by_id = {}
    if examples is not None:
        by_id = {example[id_column]: example for example in examples if id_column in example}
    columns = table.to_dict()
    confidence, ids, halves = columns["confidence"], columns["id"], columns["half"]
    num_checkpoints = len(columns["ppl"][0])
    checkpoints = list(checkpoints) or [f"checkpoint {k + 1}" for k in range(num_checkpoints)]
    order = sorted(range(len(table)), key=lambda n: (-confidence[n], str(ids[n])))
    rank = {row: position + 1 for position, row in enumerate(order)}
    threshold = split_threshold(table)
    lines = [
        "# Confidence report",
        "",
        f"Model: {model_label(models)}. Data: {dataset_name or 'not recorded'}. K = {num_checkpoints} checkpoint(s): "
        f"{', '.join(checkpoints)}.",
        "",
        f"{len(table)} examples: "
        + ", ".join(f"{halves.count(h)} {h}" for h in ("confident", "unconfident", "remainder"))
        + ". SFTMix confidence is minus the mean response perplexity over the checkpoints; "
        + (
            f"the split threshold is {threshold:.4g} (mean perplexity {-threshold:.4g}): examples above it are confident."
            if threshold is not None
            else "no split (a half is empty)."
        ),
        "",
        "## Halves",
        "",
        "| half | examples | confidence | mean ppl range | gold-token prob | correctness | response tokens (mean / median) |",
        "|---|---:|---:|---|---:|---:|---|",
    ]
    for half in ("confident", "unconfident", "remainder"):
        rows = [n for n, h in enumerate(halves) if h == half]
        if not rows:
            continue
        mean_ppl = [-confidence[n] for n in rows]
        tokens = [columns["num_tokens"][n] for n in rows]
        lines.append(
            f"| {half} | {len(rows)} | {_mean([confidence[n] for n in rows]):.3f} | "
            f"{min(mean_ppl):.3f} to {max(mean_ppl):.3f} | {_mean([columns['gold_prob'][n] for n in rows]):.3f} | "
            f"{_mean([columns['correctness'][n] for n in rows]):.3f} | {_mean(tokens):.1f} / {statistics.median(tokens):g} |"
        )
    lines += [
        "",
        "## Per checkpoint",
        "",
        "| checkpoint | mean ppl | mean ppl, confident | mean ppl, unconfident | gold-token prob | correctness |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for k, name in enumerate(checkpoints):
        ppl_k = [row[k] for row in columns["ppl"]]
        by_half = {h: [ppl_k[n] for n, half in enumerate(halves) if half == h] for h in ("confident", "unconfident")}
        lines.append(
            f"| {name} | {_mean(ppl_k):.3f} | {_mean(by_half['confident']):.3f} | {_mean(by_half['unconfident']):.3f} | "
            f"{_mean([row[k] for row in columns['prob']]):.3f} | {_mean([row[k] for row in columns['accuracy']]):.3f} |"
        )
    lines.append("")
    for heading, rows in (
        (f"Most confident {min(top_n, len(order))}", order[:top_n]),
        (f"Least confident {min(top_n, len(order))}", order[::-1][:top_n]),
    ):
        lines += [
            f"## {heading}",
            "",
            "| rank | id | confidence | ppl per checkpoint | gold-token prob | correctness | tokens | instruction |",
            "|---|---|---:|---|---:|---:|---:|---|",
        ]
        for row in rows:
            example_id = ids[row]
            instruction = _truncate(instruction_of(by_id[example_id]), width) if example_id in by_id else ""
            per_checkpoint = ", ".join(f"{value:.3g}" for value in columns["ppl"][row])
            lines.append(
                f"| {rank[row]} | {example_id} | {confidence[row]:.3f} | {per_checkpoint} | "
                f"{columns['gold_prob'][row]:.3f} | {columns['correctness'][row]:.3f} | {columns['num_tokens'][row]} | "
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
    models=(),
    checkpoints=(),
    dataset_name: str | None = None,
) -> tuple[Path, Path]:
    """Write `datamap.png` and `confidence_report.md` into `output_dir`; the title defaults to one naming the model,
    K and the data."""
    output_dir = Path(output_dir)
    title = title or data_map_title(table, models, dataset_name)
    png = draw_data_map(table, output_dir / "datamap.png", title=title)
    report = output_dir / "confidence_report.md"
    text = confidence_report(table, examples, top_n, id_column=id_column, models=models, checkpoints=checkpoints,
                             dataset_name=dataset_name)  # fmt: skip
    report.write_text(text)
    return png, report
