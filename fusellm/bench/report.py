"""Bench results as files: long-format CSV/JSON rows, a markdown table and a PNG chart."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fusellm.storage import atomic_write_bytes

if TYPE_CHECKING:
    from fusellm.merge.fitness import Curves

FIELDS = [
    "model",
    "task",
    "group",
    "metric",
    "value",
    "se",
    "n",
    "shots",
    "diff",
    "diff_lo",
    "diff_hi",
    "significant",
    "higher_is_better",
]


def column(r: dict[str, Any]) -> str:
    return (
        f"{r['task']}/{r['group']} {r['metric']}"
        if r["task"] == "lm"
        else f"{r['task']} {r['metric']}"
    )


def to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def to_markdown(rows: list[dict[str, Any]], models: list[str], reference: str) -> str:
    """Models × primary metrics; each cell ``value ± SE (Δ vs reference)``."""
    main = [r for r in rows if r.get("primary")]
    cols = list(dict.fromkeys(column(r) for r in main))
    cell = {(r["model"], column(r)): r for r in main}
    arrows = {column(r): "↑" if r["higher_is_better"] else "↓" for r in main}
    ns = {
        column(r): f"n={r['n']}" + (f", {r['shots']}-shot" if r["task"] != "lm" else "")
        for r in main
    }
    lines = [
        "| model | " + " | ".join(f"{c} {arrows[c]}" for c in cols) + " |",
        "|---|" + "---|" * len(cols),
        "| *items* | " + " | ".join(ns[c] for c in cols) + " |",
    ]
    for m in models:
        cells = []
        for c in cols:
            r = cell.get((m, c))
            if r is None:
                cells.append("–")
                continue
            s = f"{r['value']:.4f}" + (f" ± {r['se']:.4f}" if r["se"] is not None else " (n=1)")
            if "diff" in r:
                s += f" ({r['diff']:+.4f}{'*' if r['significant'] else ''})"
            cells.append(s)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"± is the bootstrap standard error over items; (Δ) is the difference from "
        f"**{reference}**, marked * when its 95% paired-bootstrap interval excludes 0 — "
        "unmarked differences are within noise. bpb = bits per UTF-8 byte (lower is better)."
    )
    ppl = [r for r in rows if r["metric"] == "ppl" and r["group"] == "all"]
    if ppl:
        lines += ["", "Token perplexity on lm/all (comparable only within a tokenizer):", ""]
        lines += ["| model | tokenizer | ppl |", "|---|---|---|"]
        lines += [f"| {r['model']} | {r['tokenizer'][:12]} | {r['value']:.3f} |" for r in ppl]
    return "\n".join(lines) + "\n"


def plot(
    rows: list[dict[str, Any]],
    models: list[str],
    path: Path,
    curves: dict[str, Curves] | None = None,
) -> None:
    """One panel per primary metric, a bar per model with ±1 SE error bars; then one panel
    per searched merge among the models (``curves``: label -> its fitness per generation,
    see :func:`fusellm.merge.fitness.draw_fitness`)."""
    plt = pyplot()
    main = [r for r in rows if r.get("primary")]
    cols = list(dict.fromkeys(column(r) for r in main))
    cell = {(r["model"], column(r)): r for r in main}
    curves = curves or {}
    fig, axes = plt.subplots(
        1,
        len(cols) + len(curves),
        figsize=(2.2 + 2.0 * len(cols) + 3.0 * len(curves), 3.6),
        squeeze=False,
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, c in zip(axes[0][: len(cols)], cols, strict=True):
        vals = [cell[(m, c)]["value"] if (m, c) in cell else float("nan") for m in models]
        errs = [(cell[(m, c)]["se"] or 0.0) if (m, c) in cell else 0.0 for m in models]
        ax.bar(
            range(len(models)),
            vals,
            yerr=errs,
            capsize=3,
            color=[colors[i % len(colors)] for i in range(len(models))],
        )
        ax.set_title(c, fontsize=8)
        ax.set_xticks(range(len(models)), models, rotation=45, ha="right", fontsize=7)
        finite = [v for v in vals if v == v]
        if finite:  # zoom in: differences between models are small next to the values
            lo, hi = min(finite), max(finite)
            pad = max((hi - lo) * 0.6, max(errs) * 2, 1e-3)
            ax.set_ylim(max(lo - pad, 0.0), hi + pad)
        ax.tick_params(axis="y", labelsize=7)
    if curves:
        from fusellm.merge.fitness import draw_fitness

        for ax, (label, c) in zip(axes[0][len(cols) :], curves.items(), strict=True):
            draw_fitness(ax, c, f"{label}: search fitness ↓")
    fig.tight_layout()
    save_png(fig, path)


def pyplot():
    """matplotlib's pyplot drawing off-screen (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: Path) -> None:
    """``fig`` as a PNG at ``path``, written atomically; the figure is closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    pyplot().close(fig)
    atomic_write_bytes(path, buf.getvalue())
