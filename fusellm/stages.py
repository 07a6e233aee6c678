"""The pipeline's stages, in order, by name. The CLI and ``fusellm run`` read this table.

A stage's runner is imported lazily (``module:function``) so that ``fusellm --help`` does
not import torch. A stage without a runner is not built yet: asking for it exits with
:data:`NOT_BUILT_EXIT` and a message naming the issue that tracks it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

NOT_BUILT_EXIT = 3


@dataclass(frozen=True)
class Stage:
    name: str
    help: str
    runner: str | None  # "module:function" taking (recipe, force) ; None = not built yet
    issue: int
    section: str = ""  # the recipe section it reads (default: its name)
    # Run by `fusellm run` only when `bench.models` lists it (a baseline nobody compares
    # against is wasted compute); asking for the stage by name always runs it.
    on_demand: bool = False

    @property
    def section_name(self) -> str:
        return self.section or self.name

    def wanted(self, recipe) -> bool:
        if not self.on_demand:
            return True
        bench = getattr(recipe, "bench", None)
        return bench is not None and self.name in bench.models

    @property
    def built(self) -> bool:
        return self.runner is not None

    def load(self):
        module, fn = self.runner.split(":")
        return getattr(importlib.import_module(module), fn)


STAGES: dict[str, Stage] = {
    s.name: s
    for s in [
        Stage(
            "corpus",
            "read text, split train/valid/test by document id, cut to fit every model's block",
            "fusellm.corpus.runner:run",
            2,
        ),
        Stage(
            "extract",
            "run each source model over the corpus and store top-k next-token log-probs",
            "fusellm.extract.runner:run",
            3,
        ),
        Stage(
            "align",
            "map source distributions onto the target's tokens and vocabulary (MinED/EM)",
            "fusellm.align.runner:run",
            4,
        ),
        Stage(
            "fuse",
            "fuse aligned distributions per sequence/token (MinCE, AvgCE)",
            "fusellm.fuse.runner:run",
            4,
        ),
        Stage(
            "train",
            "continue training the target on λ·CLM + (1−λ)·fusion loss",
            "fusellm.train.runner:run",
            5,
        ),
        Stage(
            "clm_only",
            "the CLM-only baseline: the same training run with λ = 1 on the same tokens",
            "fusellm.train.runner:run_clm_only",
            7,
            section="train",
            on_demand=True,
        ),
        Stage(
            "merge",
            "weight-merge same-architecture models with mergekit (baseline)",
            "fusellm.merge.runner:run",
            6,
        ),
        Stage(
            "evolve",
            "CMA-ES search over merge weights/densities on dev bits per byte (baseline)",
            "fusellm.merge.runner:run_evolve",
            6,
        ),
        Stage(
            "bench",
            "compare fused, CLM-only, merged models and sources (bits per byte, tasks)",
            "fusellm.bench.runner:run",
            7,
        ),
    ]
}


class StageNotBuilt(RuntimeError):
    def __init__(self, stage: Stage):
        super().__init__(
            f"stage '{stage.name}' is not built yet (tracked in issue #{stage.issue}); "
            "nothing was run for it"
        )
        self.stage = stage
