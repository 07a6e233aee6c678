"""``fusellm bench``: score every listed model on every task; write tables and a chart.

Per (model, task) scores are cached under ``run_dir/bench/cache`` keyed by the model's
identity and the task's items, so an interrupted bench resumes and adding a model scores
only that model. Results: ``results.{md,csv,json,png}`` under ``run_dir/bench`` and a W&B
table.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from fusellm.bench.config import BenchConfig, EnsembleRef
from fusellm.bench.decontam import open_index
from fusellm.bench.report import plot, to_csv, to_markdown
from fusellm.bench.score import (
    LogProbModel,
    batches,
    best_device,
    document_units,
    prefix_id,
    request_unit,
)
from fusellm.bench.stats import HIGHER_IS_BETTER, compare, item_metrics, perplexity
from fusellm.bench.tasks import LM, Task, load_lm, load_task
from fusellm.manifest import StageDir
from fusellm.models import (
    load_model,
    load_tokenizer,
    locate,
    resolve_dtype,
    tokenizer_fingerprint,
)
from fusellm.recipe import ModelSpec, Recipe, config_hash
from fusellm.refs import output_dir, resolve
from fusellm.storage import atomic_write_bytes, atomic_write_json, read_json
from fusellm.tracking import start_run

log = logging.getLogger(__name__)
STAGE = "bench"
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


def score_task(lpm: LogProbModel, tok, task: Task, cfg: BenchConfig, desc: str) -> dict[str, Any]:
    """Per-item scores of one model on one task (see :mod:`fusellm.bench.stats`)."""
    units, owner = [], []  # owner[u] = (item index, request index)
    for i, it in enumerate(task.items):
        for j, (ctx, cont) in enumerate(it.requests):
            try:
                us = (
                    document_units(tok, cont, cfg.max_length)
                    if task.kind == "lm"
                    else [request_unit(tok, ctx, cont, cfg.max_length)]
                )
            except ValueError as e:
                raise ValueError(f"{desc}: item {it.id} request {j}: {e}") from None
            units += us
            owner += [(i, j)] * len(us)
    lp, n, greedy = np.zeros(len(units)), np.zeros(len(units), np.int64), np.zeros(len(units), bool)
    pad = tok.pad_token_id if tok.pad_token_id is not None else prefix_id(tok)
    with tqdm(total=sum(len(u.ids) for u in units), desc=desc, unit="tok", leave=False) as bar:
        for b in batches(units, cfg.batch_tokens):
            lp[b], n[b], greedy[b] = lpm.score([units[k] for k in b], pad)
            bar.update(sum(len(units[k].ids) for k in b))
    # Sum the units of each (item, request).
    keys = {}
    for k, ij in enumerate(owner):
        acc = keys.setdefault(ij, [0.0, 0, True])
        acc[0] += lp[k]
        acc[1] += int(n[k])
        acc[2] = acc[2] and bool(greedy[k])
    ids = [it.id for it in task.items]
    if task.kind == "lm":
        return {
            "ids": ids,
            "group": [it.group or it.id for it in task.items],
            "domain": [it.domain for it in task.items],
            "nll": [-keys.get((i, 0), [0.0])[0] for i in range(len(ids))],
            "bytes": [len(it.requests[0][1].encode("utf-8")) for it in task.items],
            "tokens": [keys.get((i, 0), [0.0, 0])[1] for i in range(len(ids))],
        }
    per = [[keys[(i, j)] for j in range(len(it.requests))] for i, it in enumerate(task.items)]
    return {
        "ids": ids,
        "gold": [it.gold for it in task.items],
        "ll": [[a[0] for a in p] for p in per],
        "tokens": [[a[1] for a in p] for p in per],
        "chars": [[len(c) for _, c in it.requests] for it in task.items],
        "greedy": [bool(p[it.gold][2]) for p, it in zip(per, task.items, strict=True)],
    }


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s)[:80]


def load_tasks(recipe: Recipe, cfg: BenchConfig) -> list[Task]:
    corpus_dir = recipe.stage_dir("corpus")
    index = None
    if cfg.decontaminate and any(t != LM for t in cfg.tasks):
        index = open_index(corpus_dir)
        if index is None:
            log.warning(
                "bench: no training split at %s; task items are not decontaminated",
                corpus_dir / "train.jsonl",
            )
    tasks = []
    for name in cfg.tasks:
        if name == LM:
            tasks.append(load_lm(corpus_dir, cfg.split, None, recipe.seed))
        else:
            t = load_task(name, cfg.limit, recipe.seed, index)
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
    out_dir = recipe.stage_dir(STAGE)
    models = resolve_models(recipe, cfg)
    tasks = load_tasks(recipe, cfg)
    t0 = time.time()
    device = best_device()
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
    sd = StageDir(STAGE, out_dir, {**config, "scores": config_hash(sorted(keys.values()))})
    # A changed model list or task set is not refused: the cache is keyed per model and
    # task, so a rerun scores only what is new.
    if not sd.prepare(force, keep_changed=True):
        log.info("bench: complete and unchanged at %s (skipped)", out_dir)
        return read_json(out_dir / "results.json")
    records: dict[tuple[str, str], dict] = {}
    tok_ids: dict[str, str] = {}
    with start_run(recipe, STAGE, config) as tracker:
        for bm in models:
            todo = []
            for t in tasks:
                p = out_dir / cache[(bm.label, t.name)]
                rec = read_json(p) if p.is_file() else {}
                if rec.get("key") == keys[(bm.label, t.name)]:
                    records[(bm.label, t.name)] = rec["scores"]
                    tok_ids[bm.label] = rec["tokenizer"]
                else:
                    todo.append(t)
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
                scores = score_task(lpm, toks[0], t, cfg, f"bench {bm.label} {t.name}")
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
        rows = build_rows(models, tasks, records, tok_ids, cfg.bootstrap)
        labels = [m.label for m in models]
        write_results(out_dir, rows, labels, tasks)
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
                        "higher_is_better": HIGHER_IS_BETTER[metric],
                        "primary": metric == t.primary,
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


def write_results(out_dir: Path, rows: list[dict], labels: list[str], tasks: list[Task]) -> None:
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
    plot(rows, labels, out_dir / "results.png")
