"""The resume protocol shared by the sharded stages (extract, align, fuse).

A sharded output directory holds ``fingerprint.json`` (what it is made from),
``<split>/shard-NNNNN.safetensors`` + sidecars (see :mod:`fusellm.shards`) and, once every
shard is valid, ``manifest.json``. Shard ``i`` belongs to rank ``i % WORLD_SIZE``: ranks
never coordinate beyond these files, and the rank that finds every shard done writes the
manifest.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from fusellm.distributed import Rank
from fusellm.manifest import (
    FINGERPRINT,
    MANIFEST,
    StageInputsChanged,
    diff_fields,
    package_versions,
)
from fusellm.recipe import redact
from fusellm.shards import shard_name, shard_problem, sidecar
from fusellm.storage import atomic_write_json, read_json, remove_temp_files

log = logging.getLogger(__name__)


def prepare_dir(
    path: Path, fingerprint: dict, force: bool, rank: Rank, label: str, wait_s: float = 1800.0
) -> None:
    """Check the recorded fingerprint; clear stale shards (or this rank's, when forced).

    Raises :class:`StageInputsChanged` (naming the differing fields) when shards made from
    other inputs exist and ``force`` is not set. With several ranks, rank 0 alone judges
    staleness and records the fingerprint; unforced ranks wait for that record, so none of
    them can take a stale shard for a finished one.
    """
    path.mkdir(parents=True, exist_ok=True)
    fp_file = path / FINGERPRINT
    if rank.rank != 0 and not force:
        _wait_for(fp_file, fingerprint, wait_s, label)
        remove_temp_files(path)
        return
    old = read_json(fp_file) if fp_file.exists() else None
    stale = old is not None and old != fingerprint
    if stale and not force and any(path.glob("*/shard-*")):
        fields = ", ".join(diff_fields(old, fingerprint)[:5])
        raise StageInputsChanged(
            f"{label}: {path} holds shards made from different inputs or config "
            f"(differs: {fields}). Pass --force to recompute, or use another run_dir."
        )
    if force or stale:  # (stale here means no shards exist: nothing of value to keep)
        for p in path.glob("*/shard-*.safetensors"):
            if rank.owns(int(p.name[6:11])):  # each forced rank clears only its own
                p.unlink(missing_ok=True)
                sidecar(p).unlink(missing_ok=True)
        if rank.rank == 0:
            (path / MANIFEST).unlink(missing_ok=True)
    remove_temp_files(path)
    if rank.rank == 0 and old != fingerprint:
        atomic_write_json(fp_file, fingerprint)


def _wait_for(fp_file: Path, fingerprint: dict, wait_s: float, label: str) -> None:
    import time

    deadline = time.monotonic() + wait_s
    while True:
        try:
            if read_json(fp_file) == fingerprint:
                return
        except (FileNotFoundError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{label}: rank 0 has not recorded this run's fingerprint in {fp_file} after "
                f"{wait_s:.0f}s; see rank 0's log"
            )
        time.sleep(0.5)


def pending_shards(
    path: Path, plan: dict[str, int], rank: Rank, label: str
) -> dict[str, list[int]]:
    """This rank's shards that are missing, unfinished or corrupt (corrupt ones logged)."""
    todo: dict[str, list[int]] = {}
    for split, n in plan.items():
        for i in range(n):
            if not rank.owns(i):
                continue
            p = path / split / shard_name(i)
            problem = shard_problem(p)
            if problem and sidecar(p).exists():  # was finished: truncated, altered or deleted
                log.warning("%s: %s; recomputing it", label, problem)
            if problem:
                todo.setdefault(split, []).append(i)
    if todo:
        (path / MANIFEST).unlink(missing_ok=True)
    return todo


def finish_if_complete(
    path: Path,
    plan: dict[str, int],
    fingerprint: dict,
    config: dict,
    label: str,
    extra_stats: Callable[[], dict] | None = None,
) -> dict | None:
    """Write the manifest when every shard of every split is done; None otherwise.

    Each rank has verified its own shards' sha256 already; a size check against the
    sidecars tells whether the other ranks are done.
    """
    files, tokens, docs, nbytes = {}, 0, 0, 0
    for split, n in plan.items():
        for i in range(n):
            p = path / split / shard_name(i)
            sc = sidecar(p)
            rec = read_json(sc) if sc.exists() else None
            if rec is None or not p.exists() or p.stat().st_size != rec["bytes"]:
                log.info("%s: %s not finished yet (another rank's share?)", label, p)
                return None
            files[f"{split}/{shard_name(i)}"] = {
                "sha256": rec["sha256"],
                "bytes": rec["bytes"],
                "mtime_ns": rec.get("mtime_ns"),
                "rows": rec["docs"],
                "tokens": rec["tokens"],
                **{k: v for k, v in rec.items() if k.startswith("x_")},
            }
            tokens, docs, nbytes = tokens + rec["tokens"], docs + rec["docs"], nbytes + rec["bytes"]
    man_path = path / MANIFEST
    if man_path.exists():
        old = read_json(man_path)
        if old.get("fingerprint") == fingerprint and old.get("files") == files:
            return old
    stats = {
        "tokens": tokens,
        "documents": docs,
        "bytes": nbytes,
        "bytes_per_token": nbytes / max(tokens, 1),
        "shards": dict(plan),
        **(extra_stats() if extra_stats else {}),
    }
    manifest = {
        "stage": label,
        "fingerprint": fingerprint,
        "config": redact(config),
        "files": files,
        "stats": stats,
        "versions": package_versions(),
        "complete": True,
    }
    atomic_write_json(man_path, manifest)
    log.info(
        "%s: complete: %d tokens in %d documents, %.1f B/token",
        label,
        tokens,
        docs,
        nbytes / max(tokens, 1),
    )
    return manifest


def sidecar_records(path: Path, plan: dict[str, int]) -> list[dict]:
    """The sidecar records of every finished shard (per-shard counts and ``x_`` stats)."""
    return [
        read_json(p)
        for split in plan
        for p in sorted((path / split).glob("shard-*.safetensors.json"))
    ]


def shard_paths(path: Path, manifest: dict, split: str, label: str) -> list[Path]:
    """Shard paths of a complete sharded output for ``split``, in order."""
    n = manifest["stats"]["shards"].get(split)
    if n is None:
        raise FileNotFoundError(f"{label}: split '{split}' is not in {path}")
    return [path / split / shard_name(i) for i in range(n)]
