"""``fusellm plan RECIPE``: what a recipe will cost, before it runs.

Gathers what is known without running anything heavy: model shapes from their configs
(:mod:`~fusellm.plan.shapes`), the corpus and token counts from whatever the run has
already written (:mod:`~fusellm.plan.counts`), the recipe's settings, and for a CPU run
the measured memory of the framework itself (:mod:`~fusellm.plan.machine`). Each section
(:mod:`~fusellm.plan.tokens`, :mod:`~fusellm.plan.disk`, :mod:`~fusellm.plan.memory`,
:mod:`~fusellm.plan.duration`) makes its rows from the shared :class:`Context`; the
arithmetic is :mod:`~fusellm.plan.core`. Prints one table per section
(:mod:`~fusellm.plan.render`), or with ``--json`` one JSON object.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import asdict, dataclass

from fusellm.plan.context import Context
from fusellm.plan.counts import corpus_facts, token_counts, tokenizers
from fusellm.plan.disk import disk_rows
from fusellm.plan.duration import time_rows
from fusellm.plan.memory import memory_rows
from fusellm.plan.render import render
from fusellm.plan.shapes import model_shapes
from fusellm.plan.tokens import token_rows
from fusellm.recipe import Recipe


@dataclass
class Settings:
    gpus: int
    device: str | None  # a key of core.DEVICES, or None
    corpus_tokens: float | None
    recipe_args: list[str]  # the recipe file and overrides (a subprocess loads it again)


def build(recipe: Recipe, settings: Settings) -> dict:
    """The plan as one JSON-able dict: ``notes``, ``models``, ``tokens``, ``disk``,
    ``memory``, ``time`` (each a list of rows), ``totals``."""
    notes: list[str] = []
    shapes = model_shapes(recipe)
    bundled = [
        f"{n} ({recipe.models[n].path})"
        for n, s in shapes.items()
        if s.config_from.startswith("bundled")
    ]
    if bundled:
        notes.append(
            f"the hub is unreachable: shapes of {', '.join(bundled)} from bundled copies of "
            "their public config.json"
        )
    toks = tokenizers(recipe)
    corpus = corpus_facts(recipe)
    if corpus is None and settings.corpus_tokens is None:
        notes.append(
            "the corpus inputs are not on disk: token counts unknown (pass --corpus-tokens N)"
        )
    elif corpus is None:
        notes.append(
            f"tokens from --corpus-tokens {settings.corpus_tokens:.3g} (the target's train split; "
            "the corpus inputs are not on disk)"
        )
    tokens = token_counts(recipe, corpus, toks, settings.corpus_tokens)
    if recipe.train is None:
        notes.append("no train: section: training, checkpoints and training memory left out")
    ctx = Context(recipe, settings, shapes, toks, corpus, tokens)
    rows = token_rows(ctx)
    disk, disk_totals = disk_rows(ctx)
    memory, memory_totals = memory_rows(ctx)
    time, time_totals = time_rows(ctx)
    return {
        "recipe": recipe.name,
        "run_dir": recipe.run_dir,
        "gpus": settings.gpus,
        "device": settings.device,
        "notes": notes,
        "models": {n: asdict(s) for n, s in shapes.items()},
        "tokens": [asdict(r) for r in rows],
        "disk": [asdict(r) for r in disk],
        "memory": [asdict(r) for r in memory],
        "time": [asdict(r) for r in time],
        "totals": {**disk_totals, **memory_totals, **time_totals},
    }


def run(
    recipe: Recipe,
    source: list[str],
    gpus: int | None,
    device: str | None,
    corpus_tokens: float | None,
    as_json: bool,
) -> int:
    """Print the plan of ``recipe`` (loaded from ``source``: its file and overrides)."""
    world = gpus or int(os.environ.get("WORLD_SIZE", "1"))
    # stdout carries only the plan (DeepSpeed prints notices when its estimators load)
    with contextlib.redirect_stdout(sys.stderr):
        plan = build(recipe, Settings(world, device, corpus_tokens, source))
    print(json.dumps(plan) if as_json else render(plan))
    return 0
