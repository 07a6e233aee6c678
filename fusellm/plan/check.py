"""A plan set against what a run wrote and used: per stage, the bytes its manifests record
(checkpoints and caches as found on disk) and the peak RSS in ``run_dir/usage.jsonl``,
each as a ratio estimate / actual with a verdict at the stated tolerance
(``scripts/check_plan.py``; the tiny pipeline's test)."""

from __future__ import annotations

import json
from pathlib import Path

from fusellm.manifest import complete_manifest
from fusellm.stages import (
    ALIGN,
    BENCH,
    CLM_ONLY,
    CORPUS,
    EVOLVE,
    EXTRACT,
    FUSE,
    MERGE,
    PAIRWISE,
    TRAIN,
)

USAGE = "usage.jsonl"  # written by fusellm.cli after each stage that did work

DISK_TOLERANCE = 0.20
RSS_TOLERANCE = 0.30


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _files_bytes(man: dict, prefix: str = "") -> int:
    return sum(f["bytes"] for rel, f in man["files"].items() if rel.startswith(prefix))


def written(run_dir: Path) -> dict[str, int]:
    """Bytes a run wrote, keyed as the plan's disk rows (``stage/item``)."""
    out: dict[str, int] = {}
    if man := complete_manifest(run_dir / CORPUS):
        out[f"{CORPUS}/train/valid/test.jsonl"] = _files_bytes(man)
    index = [d for d in (run_dir / CORPUS).glob("decontam-*") if d.is_dir()]
    if index:
        out[f"{BENCH}/corpus/decontam-* (n-gram index)"] = sum(map(_tree_bytes, index))
    for stage in (EXTRACT, ALIGN):
        for d in sorted((run_dir / stage).glob("*")):
            if man := complete_manifest(d):
                out[f"{stage}/{d.name}"] = man["stats"]["bytes"]
    maps = run_dir / ALIGN / "maps"
    if maps.is_dir():
        out[f"{ALIGN}/maps"] = _tree_bytes(maps)
    if man := complete_manifest(run_dir / FUSE):
        out[f"{FUSE}/shards"] = man["stats"]["bytes"]
    trained = [(f"{s}/", run_dir / s) for s in (TRAIN, CLM_ONLY)]
    for pair in sorted((run_dir / PAIRWISE).glob("*")):  # pairwise/SOURCE/{fuse,train}
        if man := complete_manifest(pair / FUSE):
            out[f"{PAIRWISE}/{pair.name}/fuse"] = man["stats"]["bytes"]
        trained.append((f"{PAIRWISE}/{pair.name}/train/", pair / TRAIN))
    for key, d in trained:
        if man := complete_manifest(d):
            out[f"{key}model"] = _files_bytes(man, "model/")
            ckpts = d / "checkpoints"
            out[f"{key}checkpoints"] = (
                sum(_tree_bytes(p) for p in ckpts.glob("checkpoint-*")) if ckpts.is_dir() else 0
            )
    for d in sorted((run_dir / MERGE).glob("*")):
        if man := complete_manifest(d):
            out[f"{MERGE}/{d.name}"] = _files_bytes(man, "model/")
    if man := complete_manifest(run_dir / EVOLVE):
        out[f"{EVOLVE}/model"] = _files_bytes(man, "model/")
    for d in sorted((run_dir / EVOLVE).glob("*")):  # named searches
        if man := complete_manifest(d):
            out[f"{EVOLVE}/{d.name}/model"] = _files_bytes(man, "model/")
    return out


def peak_rss(run_dir: Path) -> dict[str, int]:
    """The largest peak RSS recorded per stage (any rank) in ``usage.jsonl``."""
    out: dict[str, int] = {}
    p = run_dir / USAGE
    if not p.exists():
        return out
    for line in p.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("peak_rss_bytes") is not None:
            out[rec["stage"]] = max(out.get(rec["stage"], 0), rec["peak_rss_bytes"])
    return out


def _verdict(estimate: float | None, actual: float, tolerance: float) -> dict:
    if estimate is None:
        return {"estimate": None, "actual": actual, "ratio": None, "ok": False}
    if actual == 0:
        return {"estimate": estimate, "actual": 0, "ratio": None, "ok": estimate == 0}
    ratio = estimate / actual
    return {
        "estimate": round(estimate),
        "actual": actual,
        "ratio": round(ratio, 4),
        "ok": abs(ratio - 1) <= tolerance,
    }


def compare(plan: dict, run_dir: Path) -> dict:
    """``{"disk": {key: verdict}, "rss": {stage: verdict}, "ok": bool}``: every disk row
    the run has a counterpart for, the vocabulary maps summed, and the peak RSS of
    extract (the plan's largest per-model process), train and clm_only."""
    actual = written(run_dir)
    est: dict[str, float | None] = {}
    for r in plan["disk"]:
        key = f"{r['stage']}/{r['item']}"
        if key.startswith(f"{ALIGN}/maps/"):
            key = f"{ALIGN}/maps"
            est[key] = (est.get(key) or 0) + (r["value"] or 0)
        else:
            est[key] = r["value"]
    disk = {k: _verdict(est[k], v, DISK_TOLERANCE) for k, v in actual.items() if k in est}
    rss = {}
    measured = peak_rss(run_dir)
    totals = plan["totals"]
    train_key = next(
        (k for k in totals if k.startswith("train_") and k.endswith("_per_rank")), None
    )
    planned = {EXTRACT: totals.get("extract_peak_per_process")}
    if train_key:
        planned[TRAIN] = planned[CLM_ONLY] = totals[train_key]
    for stage, value in planned.items():
        if stage in measured:
            rss[stage] = _verdict(value, measured[stage], RSS_TOLERANCE)
    ok = all(v["ok"] for v in [*disk.values(), *rss.values()])
    return {"disk": disk, "rss": rss, "ok": ok}
