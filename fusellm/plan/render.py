"""The plan as text: the models' shapes, then one table per section (tokens, disk,
memory, time) with its totals."""

from __future__ import annotations

import textwrap

from fusellm.plan import core


def render(plan: dict) -> str:
    """The plan of :func:`fusellm.plan.runner.build` as the tables ``fusellm plan`` prints."""
    out = [
        f"fusellm plan: {plan['recipe']} (run_dir {plan['run_dir']}, {plan['gpus']} rank(s)"
        + (f", device {plan['device']})" if plan["device"] else ")")
    ]
    for n in plan["notes"]:
        out += textwrap.wrap(
            n, 96, initial_indent="  note: ", subsequent_indent=" " * 8, break_on_hyphens=False
        )
    out.append("")
    out.append("models")
    head = ["", "params", "hidden", "layers", "heads/kv", "vocab rows", "tied", "config"]
    rows = [
        [
            n,
            f"{m['params']:,}",
            str(m["hidden"]),
            str(m["layers"]),
            f"{m['heads']}/{m['kv_heads']}",
            f"{m['vocab_rows']:,}",
            "yes" if m["tied"] else "no",
            m["config_from"],
        ]
        for n, m in plan["models"].items()
    ]
    out += _table(head, rows)
    sections = [
        ("tokens", core.human_count, None),
        (
            "disk",
            core.human_bytes,
            ("disk_after_run", "after the run", "disk_peak", "peak while running"),
        ),
        ("memory", core.human_bytes, None),
        ("time", core.human_seconds, ("seconds", "these stages", None, None)),
    ]
    for key, fmt, total in sections:
        if not plan[key]:
            continue
        out.append("")
        out.append(key)
        rows = [[r["stage"], r["item"], fmt(r["value"]), r["basis"]] for r in plan[key]]
        if total:
            a, label_a, b, label_b = total
            rows.append(["total", label_a, fmt(plan["totals"].get(a)), ""])
            if b:
                rows.append(["", label_b, fmt(plan["totals"].get(b)), ""])
        out += _table(["stage", "item", key, "how"], rows)
    return "\n".join(out)


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head) - 1)]

    def line(r: list[str]) -> str:
        return (
            "  " + "  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1]
        ).rstrip()

    return [line(head), *map(line, rows)]
