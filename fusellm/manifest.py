"""Stage manifests: what a stage read, with which config, and what it wrote.

Layout of ``run_dir/<stage>/``::

    fingerprint.json   written when the stage starts: config hash + input hashes
    ...outputs...      each written atomically (see fusellm.storage)
    manifest.json      written last: fingerprint, per-file sha256/rows/bytes, stats,
                       package versions, and ``"complete": true``

A stage whose manifest is complete, whose fingerprint equals the current one and whose
recorded files still match their records is skipped; a complete stage with a missing or
altered file is reported (path, expected and actual sha256) and regenerated. A stage
whose recorded fingerprint differs refuses to run, naming the first differing field,
unless forced (then its directory is cleared first).
"""

from __future__ import annotations

import importlib.metadata
import logging
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fusellm.recipe import redact
from fusellm.storage import (
    TMP_MARK,
    atomic_write_json,
    file_record,
    read_json,
    record_problem,
    remove_temp_files,
)

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
FINGERPRINT = "fingerprint.json"
CHECKPOINT_COMPLETE = "fusellm-complete.json"  # a train checkpoint's marker + file hashes
_VERSIONED = ("fusellm", "torch", "transformers", "tokenizers", "accelerate", "datasets", "numpy")


class StageInputsChanged(RuntimeError):
    """A stage's inputs or config differ from the ones its existing outputs were made from."""


class CorruptArtifact(RuntimeError):
    """A file whose sha256 differs from the one recorded when it was written."""


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def diff_fields(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two JSON-like trees differ (sorted, at most the leaves)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new), key=str):
            p = f"{prefix}.{k}" if prefix else str(k)
            if k not in old or k not in new:
                out.append(p)
            else:
                out.extend(diff_fields(old[k], new[k], p))
        return out
    return [] if old == new else [prefix or "<root>"]


@dataclass
class StageDir:
    """The output directory of one stage and its resume decisions."""

    stage: str
    path: Path
    fingerprint: dict[str, Any]
    started: float = field(default_factory=time.time)
    # set by prepare() when a complete stage is being regenerated: its old manifest
    previous: dict | None = None

    def __post_init__(self) -> None:
        # A recipe value may hold a secret (a literal token): never write one to disk.
        self.fingerprint = redact(self.fingerprint)

    def is_complete(self) -> bool:
        m = self.path / MANIFEST
        if not m.exists():
            return False
        man = read_json(m)
        return bool(man.get("complete")) and man.get("fingerprint") == self.fingerprint

    def prepare(
        self,
        force: bool = False,
        keep_changed: bool = False,
        can_regenerate: Callable[[dict], str | None] | None = None,
    ) -> bool:
        """Get ready to (re)run. Returns False when the stage is complete and can be skipped.

        Raises :class:`StageInputsChanged` when earlier outputs came from other inputs,
        unless ``keep_changed`` (a stage whose outputs are keyed caches: bench; files its
        old manifest lists are still checked). A complete stage with damaged files is
        regenerated; ``can_regenerate(old_manifest)`` may refuse that with a reason
        (:class:`CorruptArtifact`, nothing touched), e.g. when it would mean retraining.
        """
        old_fp = self._recorded_fingerprint()
        if keep_changed and old_fp is not None and old_fp != self.fingerprint and not force:
            if (self.path / MANIFEST).exists():
                self._drop_damaged()
                (self.path / MANIFEST).unlink()
        elif old_fp is not None and old_fp != self.fingerprint:
            # Nothing but bookkeeping there (e.g. the last run failed on bad input that
            # the user has since fixed): nothing to protect, start afresh.
            if not force and self._has_work():
                fields = diff_fields(old_fp, self.fingerprint)
                shown = ", ".join(fields[:5]) + (" ..." if len(fields) > 5 else "")
                raise StageInputsChanged(
                    f"{self.stage}: {self.path} was made from different inputs or config "
                    f"(differs: {shown}). Pass --force to recompute it, or use another run_dir."
                )
            shutil.rmtree(self.path)
        elif force and self.path.exists():
            shutil.rmtree(self.path)
        elif self.is_complete():
            bad = verify_files(self.path)
            if not bad:
                return False
            old = read_json(self.path / MANIFEST)
            if can_regenerate and (why := can_regenerate(old)):
                raise CorruptArtifact(
                    "; ".join(p for p, _ in bad) + f". {why}; pass --force to recompute it"
                )
            # Regenerate: drop the bad files and the completion marker; the stage's own
            # resume logic (checkpoints, caches) keeps the rest of its work.
            self._drop_damaged(bad)
            self.previous = old
            (self.path / MANIFEST).unlink()
        self.path.mkdir(parents=True, exist_ok=True)
        remove_temp_files(self.path)
        atomic_write_json(self.path / FINGERPRINT, self.fingerprint)
        return True

    def _drop_damaged(self, bad: list[tuple[str, Path]] | None = None) -> None:
        for problem, p in verify_files(self.path) if bad is None else bad:
            log.warning("%s: %s; regenerating it", self.stage, problem)
            p.unlink(missing_ok=True)

    def _has_work(self) -> bool:
        bookkeeping = {FINGERPRINT, "metrics.jsonl"}
        return any(
            p.is_file() and p.name not in bookkeeping and TMP_MARK not in p.name
            for p in self.path.rglob("*")
        )

    def _recorded_fingerprint(self) -> dict | None:
        for name in (MANIFEST, FINGERPRINT):
            p = self.path / name
            if p.exists():
                rec = read_json(p)
                return rec.get("fingerprint") if name == MANIFEST else rec
        return None

    def file_record(self, rel: str, rows: int | None = None, **extra: Any) -> dict[str, Any]:
        rec = {**file_record(self.path / rel), **extra}
        if rows is not None:
            rec["rows"] = rows
        return rec

    def finish(self, files: dict[str, dict], stats: dict[str, Any], config: dict) -> dict:
        """Write manifest.json last; its ``complete`` flag is the completion marker."""
        manifest = {
            "stage": self.stage,
            "fingerprint": self.fingerprint,
            "config": redact(config),
            "files": files,
            "stats": stats,
            "versions": package_versions(),
            "seconds": round(time.time() - self.started, 3),
            "complete": True,
        }
        atomic_write_json(self.path / MANIFEST, manifest)
        return manifest


def verify_files(
    stage_path: Path, record: str = MANIFEST, full: bool = False
) -> list[tuple[str, Path]]:
    """(problem, path) for each file listed in ``stage_path/record`` (a manifest or a
    checkpoint's completion marker) that is missing or altered. ``full`` re-hashes every
    file; otherwise files with their recorded size and mtime are trusted (see
    :func:`fusellm.storage.record_problem`)."""
    files = read_json(stage_path / record).get("files", {})
    return [
        (problem, stage_path / rel)
        for rel, rec in sorted(files.items())
        if (problem := record_problem(stage_path / rel, rec, full))
    ]


def outputs_hash(manifest: dict) -> str:
    """Identity of a stage's outputs for the stages that read them: their names and
    sha256 only (not sizes or timestamps), so an output regenerated bit for bit does not
    invalidate what was built from it."""
    from fusellm.recipe import config_hash

    return config_hash({rel: rec["sha256"] for rel, rec in manifest["files"].items()})


def complete_manifest(stage_path: Path) -> dict | None:
    """The manifest in ``stage_path`` if it is complete; None if the stage has not run or
    did not finish."""
    p = stage_path / MANIFEST
    if not p.exists():
        return None
    man = read_json(p)
    return man if man.get("complete") else None


def load_manifest(stage_path: Path, stage: str) -> dict:
    """The complete manifest of an upstream stage, or a clear error telling what to run."""
    man = complete_manifest(stage_path)
    if man is None:
        raise FileNotFoundError(
            f"{stage}: no complete output at {stage_path}; run `fusellm {stage}` first"
        )
    return man
