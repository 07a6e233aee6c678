"""``fusellm bench``: score every listed model on every task; write tables and a chart.

Per (model, task) scores are cached under ``run_dir/bench/cache`` keyed by the model's
identity and the task's items, so an interrupted bench resumes and adding a model scores
only that model. Results: ``results.{md,csv,json,png}`` under ``run_dir/bench`` and a W&B
table. Tasks: ``lm`` and OLMES tasks (:mod:`fusellm.bench.tasks`), lm-eval tasks
(:mod:`fusellm.bench.harness`). Under ``torchrun`` every rank scores a share of each task
(:mod:`fusellm.bench.parallel`) and rank 0 alone reads and writes the stage directory.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fusellm import distributed
from fusellm.bench.chat import is_chat, load_chat_task, score_chat_task
from fusellm.bench.config import BenchConfig, EnsembleRef
from fusellm.bench.decontam import open_index
from fusellm.bench.harness import is_harness
from fusellm.bench.harness import load_tasks as load_harness_tasks
from fusellm.bench.harness import score_task as score_harness_task
from fusellm.bench.parallel import score_units
from fusellm.bench.report import plot, to_csv, to_markdown
from fusellm.bench.score import LogProbModel, best_device, pad_id, task_record, task_units
from fusellm.bench.stats import HIGHER_IS_BETTER, compare, item_metrics, perplexity
from fusellm.bench.tasks import LM, Task, load_lm, load_task
from fusellm.distributed import Rank, on_rank0
from fusellm.manifest import StageDir
from fusellm.merge.fitness import GENERATIONS_CSV, read_curves
from fusellm.models import (
    load_model,
    load_tokenizer,
    locate,
    resolve_dtype,
    tokenizer_fingerprint,
)
from fusellm.recipe import ModelSpec, Recipe, config_hash
from fusellm.refs import output_dir, resolve
from fusellm.stages import BENCH, CORPUS
from fusellm.storage import atomic_write_bytes, atomic_write_json, read_json
from fusellm.tracking import start_run

log = logging.getLogger(__name__)
STAGE = BENCH
RESULTS = ["results.json", "results.csv", "results.md", "results.png"]


@dataclass
class BenchModel:
    label: str
    members: list[tuple[str, ModelSpec]]  # one, or an ensemble's members
    identity: str


def resolve_models(recipe: Recipe, cfg: BenchConfig) -> list[BenchModel]:
    """The ``bench.models`` entries as loadable models (deduplicated by identity)."""
    out: dict[str, BenchModel] = {}

    def one(entry: str, where: str) -> list[tuple[str, ModelSpec]]:
        return resolve(recipe, entry, where)

    for i, entry in enumerate(cfg.models):
        where = f"bench.models.{i}"
        if isinstance(entry, EnsembleRef):
            members = [m for name in entry.ensemble for m in one(name, where)]
            ident = "ensemble:" + "+".join(locate(s, n).identity for n, s in members)
            out.setdefault(ident, BenchModel(entry.label, members, ident))
            continue
        for name, spec in one(entry, where):
            ident = locate(spec, name).identity
            label = "target" if entry == "target" else name
            # A model listed twice (``target`` and its name) is scored once; two pipeline
            # outputs that happen to be byte-identical (a no-op training run) both stay:
            # that they score the same is the finding.
            key = label if output_dir(recipe, entry) is not None else ident
            out.setdefault(key, BenchModel(label, [(name, spec)], ident))
    return list(out.values())


def score_task(
    lpm: LogProbModel, tok, task: Task, cfg: BenchConfig, desc: str, rank: Rank | None = None
) -> dict[str, Any]:
    """Per-item scores of one model on one task (see :mod:`fusellm.bench.stats`)."""
    units, owner = task_units(tok, task, cfg.max_length, desc)
    lp, n, greedy = score_units(
        lpm, units, pad_id(tok), cfg.batch_tokens, rank or Rank(0, 1, 0), desc
    )
    return task_record(task, owner, lp, n, greedy)


def _chat_key(cfg: BenchConfig, bm: BenchModel) -> dict:
    """What a chat task's replies depend on beyond the model: the reply length and a chat
    template the recipe gives (the model's own is part of its identity)."""
    given = [s.chat_template for _, s in bm.members if s.chat_template]
    return {
        "max_new_tokens": cfg.chat.max_new_tokens,
        "templates": [config_hash(Path(p).read_text(encoding="utf-8")) for p in given],
    }


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s)[:80]


def load_tasks(recipe: Recipe, cfg: BenchConfig) -> list[Task]:
    corpus_dir = recipe.stage_dir(CORPUS)
    index = None
    if cfg.decontaminate and any(t != LM and not is_harness(t) for t in cfg.tasks):
        on_rank0(lambda: open_index(corpus_dir) and None)  # one rank builds it, once
        index = open_index(corpus_dir)
        if index is None:
            log.warning(
                "bench: no training split at %s; task items are not decontaminated",
                corpus_dir / "train.jsonl",
            )
    harness = [(n, f"bench.tasks.{i}") for i, n in enumerate(cfg.tasks) if is_harness(n)]
    if harness and cfg.decontaminate:
        log.info("bench: harness tasks are not checked against the training corpus")
    rendered = iter(
        load_harness_tasks([n for n, _ in harness], [w for _, w in harness], cfg, recipe.seed)
        if harness
        else []
    )
    tasks = []
    for name in cfg.tasks:
        if name == LM:
            tasks.append(load_lm(corpus_dir, cfg.split, None, recipe.seed))
        elif is_harness(name):
            tasks.append(next(rendered))
        else:
            load = load_chat_task if is_chat(name) else load_task
            t = load(name, cfg.limit, recipe.seed, index)
            if t.contaminated:
                log.info(
                    "bench: %s: %d item(s) dropped, found in the training corpus",
                    name,
                    t.contaminated,
                )
            tasks.append(t)
    return tasks


def run(recipe: Recipe, force: bool = False) -> dict[str, Any]:
    if recipe.bench is None:
        raise ValueError("the recipe has no 'bench:' section")
    cfg = (
        BenchConfig.model_validate(recipe.bench) if isinstance(recipe.bench, dict) else recipe.bench
    )
    distributed.setup()  # joins the launch's processes, if any (the CLI has already)
    return _run(recipe, cfg, best_device(), Rank.from_env(), force)


def _run(recipe: Recipe, cfg: BenchConfig, device: str, rank: Rank, force: bool) -> dict:
    """The bench on every rank of the launch: all score, rank 0 decides and writes."""
    out_dir = recipe.stage_dir(STAGE)
    models = resolve_models(recipe, cfg)
    tasks = load_tasks(recipe, cfg)
    t0 = time.time()
    # What each score depends on: the model and how it runs, the items' exact texts.
    keys = {
        (bm.label, t.name): config_hash(
            {
                "model": bm.identity,
                "task": t.name,
                "items": config_hash([[it.id, it.requests, it.gold] for it in t.items]),
                "max_length": cfg.max_length,
                "numerics": [
                    device.split(":")[0],
                    *(str(resolve_dtype(spec, device)) for _, spec in bm.members),
                ],
                # lm-eval computes a harness task's metrics
                **({"lm_eval": t.version} if t.kind == "harness" else {}),
                **({"chat": _chat_key(cfg, bm)} if t.kind == "chat" else {}),
            }
        )
        for bm in models
        for t in tasks
    }
    # one cached score file per model and task (relative to out_dir, as the manifest lists it)
    cache = {
        (bm.label, t.name): f"cache/{_slug(bm.label)}-{config_hash(bm.identity)[:12]}/"
        f"{_slug(t.name)}.json"
        for bm in models
        for t in tasks
    }
    config = {"bench": cfg.model_dump(mode="json"), "models": {m.label: m.identity for m in models}}
    searches = search_csvs(recipe, [m.label for m in models])
    # a longer search may keep its best model: its curves alone then change the chart
    curves_fp = {k: config_hash(p.read_text(encoding="utf-8")) for k, p in searches.items()}
    fp = {**config, "scores": config_hash(sorted(keys.values()))}
    sd = StageDir(STAGE, out_dir, {**fp, "curves": curves_fp} if curves_fp else fp)

    records: dict[tuple[str, str], dict] = {}
    tok_ids: dict[str, str] = {}

    def prepare() -> list[tuple[str, str]] | None:
        """(model, task) pairs with valid cached scores; None when the stage is complete."""
        # A changed model list or task set is not refused: the cache is keyed per model and
        # task, so a rerun scores only what is new.
        if not sd.prepare(force, keep_changed=True):
            return None
        for bm in models:
            for t in tasks:
                p = out_dir / cache[(bm.label, t.name)]
                rec = read_json(p) if p.is_file() else {}
                if rec.get("key") == keys[(bm.label, t.name)]:
                    records[(bm.label, t.name)] = rec["scores"]
                    tok_ids[bm.label] = rec["tokenizer"]
        return sorted(records)

    # rank 0 alone prepares the stage directory and reads the cache; all learn what is left
    done = on_rank0(prepare)
    if done is None:
        log.info("bench: complete and unchanged at %s (skipped)", out_dir)
        return on_rank0(lambda: read_json(out_dir / "results.json"))
    done = {tuple(k) for k in done}
    with start_run(recipe, STAGE, config, enabled=rank.rank == 0) as tracker:
        for bm in models:
            todo = [t for t in tasks if (bm.label, t.name) not in done]
            if not todo:
                log.info("bench: %s: all %d task(s) cached", bm.label, len(tasks))
                continue
            toks = [load_tokenizer(spec, name) for name, spec in bm.members]
            fps = {tokenizer_fingerprint(t) for t in toks}
            if len(fps) > 1:
                raise ValueError(
                    f"bench: ensemble {bm.label}: members {[n for n, _ in bm.members]} use different "
                    "tokenizers; probability averaging needs one vocabulary (that is what fusion "
                    "is for: align + fuse)"
                )
            tok_ids[bm.label] = fps.pop()
            lpm = LogProbModel(
                [load_model(spec, name, device) for name, spec in bm.members],
                [name for name, _ in bm.members],
            )
            for t in todo:
                s0 = time.time()
                desc = f"bench {bm.label} {t.name}"
                if t.kind == "harness":
                    scores = score_harness_task(lpm, toks[0], t, cfg, rank, desc)
                elif t.kind == "chat":
                    scores = score_chat_task(
                        lpm, toks[0], t, cfg.chat.max_new_tokens, cfg.batch_tokens, rank, bm.label
                    )
                else:
                    scores = score_task(lpm, toks[0], t, cfg, desc, rank)
                if rank.rank == 0:
                    atomic_write_json(
                        out_dir / cache[(bm.label, t.name)],
                        {
                            "key": keys[(bm.label, t.name)],
                            "tokenizer": tok_ids[bm.label],
                            "scores": scores,
                        },
                    )
                records[(bm.label, t.name)] = scores
                log.info(
                    "bench: %s on %s: %d items in %.1fs",
                    bm.label,
                    t.name,
                    len(t.items),
                    time.time() - s0,
                )
            del lpm
        if rank.rank != 0:
            return {}
        rows = build_rows(models, tasks, records, tok_ids, cfg.bootstrap)
        labels = [m.label for m in models]
        write_results(out_dir, rows, labels, tasks, searches)
        tracker.log_table(
            "results",
            ["model", "task", "group", "metric", "value", "se", "n"],
            [
                [r["model"], r["task"], r["group"], r["metric"], r["value"], r["se"], r["n"]]
                for r in rows
            ],
        )
        tracker.summary(
            {
                f"{r['model']}/{r['task']}/{r['group']}/{r['metric']}": r["value"]
                for r in rows
                if r.get("primary")
            }
        )
    log.info(
        "bench: %d model(s) × %d task(s) in %.1fs; table at %s",
        len(models),
        len(tasks),
        time.time() - t0,
        out_dir / "results.md",
    )
    rels = [*cache.values(), *RESULTS]
    sd.finish({r: sd.file_record(r) for r in rels}, {"models": labels, "tasks": len(tasks)}, config)
    return {"rows": rows, "models": labels}


def build_rows(models, tasks, records, tok_ids, bootstrap: int) -> list[dict[str, Any]]:
    rows = []
    ref = models[0].label
    for t in tasks:
        per_model = {m.label: item_metrics(t.kind, records[(m.label, t.name)]) for m in models}
        for gm in per_model[ref]:
            group, metric = gm
            res = compare(
                {m: v[gm] for m, v in per_model.items()},
                ref,
                f"{t.name}/{group}/{metric}",
                bootstrap,
            )
            for m, r in res.items():
                rows.append(
                    {
                        "model": m,
                        "task": t.name,
                        "group": group,
                        "metric": metric,
                        "shots": t.shots,
                        "higher_is_better": (
                            t.higher_is_better if t.kind == "harness" else HIGHER_IS_BETTER
                        )[metric],
                        # a harness group's own tasks have rows too; the table shows the group
                        "primary": metric == t.primary and (t.kind == "lm" or group == "all"),
                        **r,
                    }
                )
        if t.kind == "lm":
            for m in models:
                rec = records[(m.label, t.name)]
                for group in ["all", *sorted(set(rec["domain"]))]:
                    rows.append(
                        {
                            "model": m.label,
                            "task": t.name,
                            "group": group,
                            "metric": "ppl",
                            "value": perplexity(rec, group),
                            "se": float("nan"),
                            "n": len(rec["ids"]),
                            "shots": 0,
                            "higher_is_better": False,
                            "primary": False,
                            "tokenizer": tok_ids[m.label],
                        }
                    )
    return rows


def search_csvs(recipe: Recipe, labels: list[str]) -> dict[str, Path]:
    """``generations.csv`` of each searched merge (``evolve``) among the bench's models."""
    found = {label: output_dir(recipe, label) for label in labels}
    return {
        label: out[0] / GENERATIONS_CSV
        for label, out in found.items()
        if out is not None and (out[0] / GENERATIONS_CSV).is_file()
    }


def write_results(
    out_dir: Path,
    rows: list[dict],
    labels: list[str],
    tasks: list[Task],
    searches: dict[str, Path] | None = None,
) -> None:
    """results.{json,csv,md,png}; the chart also shows the fitness curves of ``searches``
    (label -> its ``generations.csv``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        t.name: {
            "kind": t.kind,
            "items": len(t.items),
            "available": t.available,
            "shots": t.shots,
            "contaminated_dropped": t.contaminated,
            "source": t.source,
            "primary": t.primary,
        }
        for t in tasks
    }
    atomic_write_json(out_dir / "results.json", {"models": labels, "tasks": meta, "rows": rows})
    atomic_write_bytes(out_dir / "results.csv", to_csv(rows).encode())
    atomic_write_bytes(out_dir / "results.md", to_markdown(rows, labels, labels[0]).encode())
    curves = {}
    for label, path in (searches or {}).items():
        try:
            curves[label] = read_curves(path)
        except ValueError as e:
            log.warning("bench: the chart has no fitness panel for %s: %s", label, e)
    plot(rows, labels, out_dir / "results.png", curves)
