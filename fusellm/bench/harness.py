"""lm-evaluation-harness tasks in ``fusellm bench``: ``harness:TASK`` in ``bench.tasks``.

lm-eval (the ``eval`` extra) renders a task's requests — prompts, few-shot examples,
choices, stop strings — and computes its metrics; fusellm's models score them through
:class:`~fusellm.bench.harness_lm.HarnessLM` (the bench scoring core), so every
``bench.models`` entry runs, ensembles and pipeline outputs included, and the results join
the same table with bootstrap standard errors and paired differences.

- Names: ``harness:TASK`` with lm-eval's task, group or tag name and the task's own
  few-shot count, or ``harness:TASK:Nshot``. Names are checked at recipe load against
  lm-eval's index of task YAMLs (no data is loaded, no network); ``bench.harness.
  include_path`` adds directories of local task YAMLs (``dataset_path: json`` with
  ``dataset_kwargs.data_files`` runs offline).
- A group (``bbh``) is one bench task over the union of its tasks' items: its value is
  the mean over all items (lm-eval's ``weight_by_size``); each task also gets its rows.
- Items: ``bench.limit`` per lm-eval task, a seeded subsample (lm-eval's ``samples``);
  the few-shot examples are drawn with the recipe's seed.
- Per-item metrics come from lm-eval's logged samples: metrics aggregated by a mean
  (``acc``, ``acc_norm``, ``exact_match``, ...) and ``bits_per_byte``. Corpus-level metrics
  (F1, MCC, BLEU, perplexities) have no per-item form and are left out, named in the log.
  A metric of a filtered output is ``METRIC,FILTER`` as lm-eval reports it. The table
  shows ``acc_norm`` where a task has it (length-normalised, as leaderboards report
  ARC/HellaSwag/PIQA/OpenBookQA), else the task's first metric.
- Data parallel: lm-eval sees one process on every rank (so all ranks render the same
  requests — lm-eval's own split would draw other few-shot examples per rank) and
  :class:`HarnessLM` splits the scoring over the ranks.
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fusellm.bench.tasks import Item, Task

if TYPE_CHECKING:
    from fusellm.bench.config import BenchConfig
    from fusellm.bench.score import LogProbModel
    from fusellm.distributed import Rank

log = logging.getLogger(__name__)
PREFIX = "harness:"
_SHOTS = re.compile(r"(\d+)shot")
INSTALL = "pip install 'fusellm[eval]'"


def is_harness(name: str) -> bool:
    return name.startswith(PREFIX)


def parse(name: str) -> tuple[str, int | None]:
    """``harness:TASK[:Nshot]`` → (lm-eval name, few-shot count or None for the task's own)."""
    task, sep, shots = name[len(PREFIX) :].partition(":")
    if not task or (sep and not _SHOTS.fullmatch(shots)):
        raise ValueError(
            f"'{name}': expected harness:TASK or harness:TASK:Nshot "
            "(e.g. harness:arc_easy, harness:arc_challenge:25shot)"
        )
    return task, int(shots[: -len("shot")]) if sep else None


def _lm_eval_version() -> str:
    return importlib.metadata.version("lm_eval")


def _local_names(include_path: list[str]) -> set[str]:
    if not include_path:
        return set()
    from lm_eval.tasks import TaskManager

    return set(TaskManager(include_path=include_path, include_defaults=False).all_tasks)


def _default_names() -> set[str]:
    """Names of lm-eval's own tasks, groups and tags. Indexing its ~15k task YAMLs takes
    seconds, so the list is kept under the cache per lm-eval version and install."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from fusellm.recipe import config_hash
    from fusellm.storage import atomic_write_json, cache_root, read_json

    root = Path(lm_eval.__file__).parent / "tasks"
    key = config_hash([_lm_eval_version(), str(root), root.stat().st_mtime_ns])[:16]
    memo = cache_root() / "lm-eval" / f"task-names-{key}.json"
    if memo.is_file():
        return set(read_json(memo))
    names = TaskManager().all_tasks
    atomic_write_json(memo, names)
    return set(names)


def check_names(tasks: list[str], include_path: list[str]) -> None:
    """Refuse a harness task lm-eval does not know, naming its key (``tasks.I``). Without
    lm-eval installed the names are checked when bench runs."""
    named = [(i, parse(t)[0]) for i, t in enumerate(tasks) if is_harness(t)]
    if not named:
        return
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return
    local = _local_names(include_path)
    missing = [(i, n) for i, n in named if n not in local]
    if not missing:
        return
    known = local | _default_names()
    for i, n in missing:
        if n not in known:
            import difflib

            close = difflib.get_close_matches(n, sorted(known), n=5)
            where = f" nor of bench.harness.include_path {include_path}" if include_path else ""
            raise ValueError(
                f"tasks.{i}: unknown lm-eval task '{n}': not a task, group or tag of lm-eval "
                f"{_lm_eval_version()}{where}" + (f"; close: {', '.join(close)}" if close else "")
            )


@dataclass
class HarnessTask(Task):
    """A bench task rendered by lm-eval. ``items`` hold the exact requests of each document
    (what the score cache is keyed by); ``metrics`` maps each reported metric to its
    per-item form (see :func:`item_values`)."""

    leaves: dict[str, Any] = field(default_factory=dict)  # lm-eval Task objects by name
    samples: dict[str, list[int]] = field(default_factory=dict)  # subsampled docs per leaf
    metrics: dict[str, str] = field(default_factory=dict)  # "acc" -> "mean"
    higher_is_better: dict[str, bool] = field(default_factory=dict)
    seed: int = 0
    version: str = ""


def _task_manager(include_path: list[str], names: list[str]):
    """lm-eval's TaskManager; without its built-in index when every name resolves within
    ``include_path`` (seconds saved: lm-eval's own YAMLs need no indexing)."""
    from lm_eval.tasks import TaskManager

    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)

        def within(name: str) -> bool:  # a local task, or a local group of such
            if name in local.all_subtasks:
                return True
            entry = local.task_index.get(name) if name in local.all_groups else None
            children = (entry.cfg or {}).get("task", []) if entry else []
            return bool(children) and all(isinstance(c, str) and within(c) for c in children)

        if all(within(n) for n in names):
            return local
    return TaskManager(include_path=include_path or None)


def load_tasks(
    names: list[str], where: list[str], cfg: BenchConfig, seed: int
) -> list[HarnessTask]:
    """The harness tasks ``names`` (recipe keys ``where``, names checked at recipe load)
    with their items rendered."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ValueError(f"{where[0]}: '{names[0]}' needs lm-eval: {INSTALL}") from None
    tm = _task_manager(cfg.harness.include_path, [parse(n)[0] for n in names])
    return [_load(tm, n, w, cfg, seed) for n, w in zip(names, where, strict=True)]


def _load(tm, name: str, where: str, cfg: BenchConfig, seed: int) -> HarnessTask:
    task_name, shots = parse(name)
    try:
        leaves = tm.load([task_name])["tasks"]
    except Exception as e:  # a dataset the hub cannot give offline, a broken task YAML
        raise ValueError(
            f"{where}: lm-eval cannot load task '{task_name}': {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}. Offline, point a local task YAML "
            "at local files (dataset_path: json, dataset_kwargs.data_files) in "
            "bench.harness.include_path"
        ) from None
    items: list[Item] = []
    samples: dict[str, list[int]] = {}
    metrics: dict[str, str] | None = None
    higher: dict[str, bool] = {}
    available = 0
    for leaf_name, leaf in leaves.items():
        if shots is not None:
            leaf.set_config(key="num_fewshot", value=shots)
        if cfg.harness.max_gen_toks and leaf.get_config("output_type") == "generate_until":
            leaf.set_config(
                key="generation_kwargs",
                value={"max_gen_toks": cfg.harness.max_gen_toks},
                update=True,
            )
        n = len(leaf.eval_docs)
        available += n
        if cfg.limit is not None and cfg.limit < n:
            pick = np.random.default_rng(seed).permutation(n)[: cfg.limit]
            samples[leaf_name] = sorted(int(i) for i in pick)
        items += _render(leaf, leaf_name, samples.get(leaf_name), seed)
        forms, hib = _metric_forms(leaf, f"{where} ({leaf_name})")
        higher.update(hib)
        # a group reports the metrics all its tasks have
        metrics = forms if metrics is None else {k: v for k, v in metrics.items() if k in forms}
    if not metrics:
        raise ValueError(f"{where}: task '{task_name}' has no metric with a per-item form")
    first = next(iter(leaves.values()))
    primary = "acc_norm" if "acc_norm" in metrics else next(iter(metrics))
    entry = tm.task_index.get(task_name)
    source = f"lm-eval {_lm_eval_version()}" + (
        f" {entry.yaml_path}" if entry is not None and entry.yaml_path else ""
    )
    return HarnessTask(
        name,
        "harness",
        items,
        shots=int(first.get_config("num_fewshot") or 0),
        source=source,
        available=available,
        contaminated=None,  # not checked against the training corpus
        primary=primary,
        leaves=leaves,
        samples=samples,
        metrics=metrics,
        higher_is_better=higher,
        seed=seed,
        version=_lm_eval_version(),
    )


def _render(leaf, leaf_name: str, samples: list[int] | None, seed: int) -> list[Item]:
    """One item per document: its requests exactly as lm-eval will send them."""
    leaf.set_fewshot_seed(seed=seed)
    leaf.build_all_requests(samples=samples, rank=0, world_size=1)
    by_doc = defaultdict(list)
    for inst in leaf.instances:
        by_doc[inst.doc_id].append(inst)
    items = []
    for doc_id in sorted(by_doc):  # doc_id counts the selected documents
        insts = sorted(by_doc[doc_id], key=lambda x: x.idx)
        doc = samples[doc_id] if samples else doc_id
        items.append(Item(f"{leaf_name}:{doc}", [tuple(x.args) for x in insts]))
    return items


def _metric_forms(leaf, where: str) -> tuple[dict[str, str], dict[str, bool]]:
    """The leaf's reported metrics (``METRIC`` or ``METRIC,FILTER``) → aggregation name,
    and their directions."""
    from lm_eval.api import metrics as agg

    known = {agg.mean: "mean", agg.bits_per_byte: "bits_per_byte"}
    filters = [f["name"] for f in (leaf.config.filter_list or [])] or ["none"]
    hib = leaf.higher_is_better()
    forms, higher = {}, {}
    for m, fn in leaf.aggregation().items():
        if fn not in known:
            log.warning(
                "bench %s: metric '%s' (aggregation %s) has no per-item form; not reported",
                where,
                m,
                getattr(fn, "__name__", fn),
            )
            continue
        for f in filters:
            key = m if f == "none" else f"{m},{f}"
            forms[key] = known[fn]
            higher[key] = bool(hib.get(m, True))
    return forms, higher


def item_values(form: str, value: Any) -> tuple[float, float]:
    """One logged per-item metric value as (numerator, denominator) of a ratio of sums
    (see :mod:`fusellm.bench.stats`): a mean's value over 1; bits per byte's
    (log-likelihood, bytes) as (−log-likelihood / ln 2, bytes)."""
    if form == "mean":
        return float(value), 1.0
    ll, weight = value
    return -float(ll) / math.log(2), float(weight)


def score_task(
    lpm: LogProbModel, tok, task: HarnessTask, cfg: BenchConfig, rank: Rank, desc: str
) -> dict[str, Any]:
    """Per-item scores of one model on a harness task: lm-eval's ``evaluate`` with its
    logged samples, over :class:`HarnessLM`."""
    from lm_eval.evaluator import evaluate

    from fusellm.bench.harness_lm import HarnessLM

    lm = HarnessLM(lpm, tok, cfg.max_length, cfg.batch_tokens, rank, desc)
    for leaf in task.leaves.values():  # the same few-shot draws as when the items were made
        leaf.set_fewshot_seed(seed=task.seed)
    res = evaluate(
        lm,
        {"tasks": task.leaves, "groups": {}},
        samples=task.samples or None,
        bootstrap_iters=0,  # fusellm's own bootstrap, paired across models
        log_samples=True,
    )
    per_doc: dict[str, dict[int, dict]] = {}
    for leaf_name in task.leaves:
        docs = per_doc.setdefault(leaf_name, {})
        for s in res["samples"][leaf_name]:  # one per document and filter
            d = docs.setdefault(s["doc_id"], {"args": s["arguments"], "resps": s["resps"]})
            for m in s["metrics"]:
                d[m if s["filter"] == "none" else f"{m},{s['filter']}"] = s[m]
    num: dict[str, list[float]] = {m: [] for m in task.metrics}
    den: dict[str, list[float]] = {m: [] for m in task.metrics}
    responses, groups = [], []
    for it in task.items:
        leaf_name, doc = it.id.rsplit(":", 1)
        d = per_doc[leaf_name][int(doc)]
        if [tuple(a) for a in d["args"]] != it.requests:  # the cache key names these requests
            raise RuntimeError(f"{desc}: lm-eval sent other requests for {it.id} than rendered")
        for m, form in task.metrics.items():
            a, b = item_values(form, d[m])
            num[m].append(a)
            den[m].append(b)
        responses.append(d["resps"])
        groups.append(leaf_name)
    return {
        "ids": [it.id for it in task.items],
        "group": groups,
        "num": num,
        "den": den,
        "responses": responses,
    }
