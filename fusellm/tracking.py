"""Experiment tracking: one W&B run per stage, offline unless an API key is present.

``tracking.mode: auto`` (the default) runs online only when ``WANDB_API_KEY`` is set and
offline otherwise, so a laptop or CI box without network still gets complete local runs
under ``run_dir/wandb/`` (``wandb sync`` uploads them later). An explicit ``WANDB_MODE``
in the environment wins over ``auto``. The config is passed through
:func:`fusellm.recipe.redact` first and console capture is off, so secret values never
reach W&B files. Every metric is also appended to ``run_dir/<stage>/metrics.jsonl``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fusellm.recipe import Recipe, redact

log = logging.getLogger(__name__)


def resolve_mode(mode: str) -> str:
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class Tracker:
    """Logs metrics and tables of one stage to W&B (when enabled) and a local jsonl."""

    def __init__(self, recipe: Recipe, stage: str, config: dict[str, Any]):
        self.stage = stage
        self.local = Path(recipe.run_dir) / stage / "metrics.jsonl"
        self.local.parent.mkdir(parents=True, exist_ok=True)
        self.run = None
        cfg = recipe.tracking
        mode = resolve_mode(cfg.mode)
        if cfg.backend == "wandb" and mode != "disabled":
            import wandb

            wandb_dir = Path(recipe.run_dir)
            wandb_dir.mkdir(parents=True, exist_ok=True)
            self.run = wandb.init(
                project=cfg.project,
                entity=cfg.entity,
                group=recipe.name,
                job_type=stage,
                name=f"{recipe.name}/{stage}",
                tags=list(cfg.tags),
                dir=str(wandb_dir),
                mode=mode,
                config=redact({"stage": stage, **config}),
                # Stages run one after another; the stage's run is the global wandb.run,
                # so integrations (the HF Trainer's callback) log into it instead of
                # starting a run of their own with settings wandb read at its first init.
                reinit="finish_previous",
                settings=wandb.Settings(console="off", silent=True, x_disable_stats=True),
            )

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        rec = {
            "time": round(time.time(), 3),
            **({"step": step} if step is not None else {}),
            **metrics,
        }
        with open(self.local, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec, default=float) + "\n")
        if self.run is not None:
            self.run.log({f"{self.stage}/{k}": v for k, v in metrics.items()}, step=step)

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        if self.run is not None:
            import wandb

            self.run.log({f"{self.stage}/{name}": wandb.Table(columns=columns, data=rows)})

    def summary(self, values: dict[str, Any]) -> None:
        self.log(values)
        if self.run is not None:
            for k, v in values.items():
                self.run.summary[f"{self.stage}/{k}"] = v

    def finish(self, failed: bool = False) -> None:
        if self.run is not None:
            self.run.finish(exit_code=1 if failed else 0)
            self.run = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(failed=exc_type is not None)


class NullTracker:
    """Stands in for :class:`Tracker` on ranks other than 0 (one W&B run per stage)."""

    def log(self, *args: Any, **kwargs: Any) -> None: ...
    def log_table(self, *args: Any, **kwargs: Any) -> None: ...
    def summary(self, *args: Any, **kwargs: Any) -> None: ...
    def finish(self, failed: bool = False) -> None: ...

    def __enter__(self) -> NullTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None: ...


@contextlib.contextmanager
def wandb_env(recipe: Recipe, stage: str) -> Iterator[bool]:
    """Environment for integrations that start their own W&B run (the HF Trainer's
    callback): same mode, directory, project and group as :class:`Tracker`; console
    capture off. Yields whether W&B is enabled; restores the environment afterwards."""
    cfg = recipe.tracking
    mode = resolve_mode(cfg.mode)
    enabled = cfg.backend == "wandb" and mode != "disabled"
    env = {
        "WANDB_MODE": mode,
        "WANDB_DIR": str(Path(recipe.run_dir).resolve()),
        "WANDB_PROJECT": cfg.project,
        "WANDB_RUN_GROUP": recipe.name,
        "WANDB_JOB_TYPE": stage,
        "WANDB_CONSOLE": "off",
        "WANDB_SILENT": "true",
        **({"WANDB_ENTITY": cfg.entity} if cfg.entity else {}),
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield enabled
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def start_run(
    recipe: Recipe, stage: str, config: dict[str, Any], enabled: bool = True
) -> Tracker | NullTracker:
    """Start tracking ``stage``; use as a context manager so the run always finishes.

    ``enabled=False`` (e.g. ranks other than 0) returns a tracker that records nothing."""
    return Tracker(recipe, stage, config) if enabled else NullTracker()
