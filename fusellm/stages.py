"""The pipeline's stages, in order: the one table that the CLI, ``fusellm run`` and recipe
loading read.

A stage's name is also its directory under ``run_dir``. Its runner and the type that
validates its recipe section are named as ``"module:attribute"`` and imported only when
used, so ``fusellm --help`` imports neither torch nor any stage, and this module sits at
the bottom of the import graph (every stage may import the names below).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

CORPUS, EXTRACT, ALIGN, FUSE, TRAIN = "corpus", "extract", "align", "fuse", "train"
CLM_ONLY, PAIRWISE, MERGE, EVOLVE, BENCH = "clm_only", "pairwise", "merge", "evolve", "bench"


def load_attr(ref: str) -> Any:
    """The object named by ``"package.module:attribute"``."""
    module, attr = ref.split(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class Stage:
    name: str
    help: str
    runner: str  # "module:function" taking (recipe, force)
    config: str  # "module:attribute": the type its recipe section validates into
    section: str = ""  # the recipe section it reads (default: its name)
    # Run by `fusellm run` only when `bench.models` lists it (a baseline nobody compares
    # against is wasted compute); asking for the stage by name always runs it.
    on_demand: bool = False
    # Under several processes: "all" ranks share the work; "first": rank 0 alone runs it
    # (single-process work such as reading the corpus or merging weights) while the
    # others wait for it to finish.
    ranks: str = "all"

    @property
    def section_name(self) -> str:
        return self.section or self.name

    def wanted(self, recipe) -> bool:
        if not self.on_demand:
            return True
        bench = getattr(recipe, "bench", None)
        return bench is not None and self.name in bench.models

    def load(self):
        return load_attr(self.runner)


STAGES: dict[str, Stage] = {
    s.name: s
    for s in [
        Stage(
            CORPUS,
            "read text, split train/valid/test by document id, cut to fit every model's block",
            "fusellm.corpus.runner:run",
            "fusellm.corpus.config:CorpusConfig",
            ranks="first",
        ),
        Stage(
            EXTRACT,
            "run each source model over the corpus and store top-k next-token log-probs",
            "fusellm.extract.runner:run",
            "fusellm.extract.config:ExtractConfig",
        ),
        Stage(
            ALIGN,
            "map source distributions onto the target's tokens and vocabulary (MinED/EM)",
            "fusellm.align.runner:run",
            "fusellm.align.config:AlignConfig",
        ),
        Stage(
            FUSE,
            "fuse aligned distributions per sequence/token (MinCE, AvgCE)",
            "fusellm.fuse.runner:run",
            "fusellm.fuse.config:FuseConfig",
        ),
        Stage(
            TRAIN,
            "continue training the target on λ·CLM + (1−λ)·fusion loss",
            "fusellm.train.runner:run",
            "fusellm.train.config:TrainSection",
        ),
        Stage(
            CLM_ONLY,
            "the CLM-only baseline: the same training run with λ = 1 on the same tokens",
            "fusellm.train.runner:run_clm_only",
            "fusellm.train.config:TrainSection",
            section=TRAIN,
            on_demand=True,
        ),
        Stage(
            PAIRWISE,
            "fuse each source separately into its own copy of the target (FuseChat-2), "
            "to merge them with merge:",
            "fusellm.train.pairwise:run",
            "fusellm.train.pairwise:PairwiseConfig",
        ),
        Stage(
            MERGE,
            "weight-merge same-architecture models with mergekit (baseline)",
            "fusellm.merge.runner:run",
            "fusellm.merge.config:MergeSection",
            ranks="first",
        ),
        Stage(
            EVOLVE,
            "CMA-ES search over merge weights (parameter space) or layer paths (data-flow "
            "space) on a dev split (baseline)",
            "fusellm.merge.evolve:run",
            "fusellm.merge.config:EvolveSection",
            ranks="first",
        ),
        Stage(
            BENCH,
            "compare fused, CLM-only, merged models and sources (bits per byte, tasks)",
            "fusellm.bench.runner:run",
            "fusellm.bench.config:BenchConfig",
        ),
    ]
}


def sections() -> dict[str, str]:
    """Recipe section name -> the ``"module:attribute"`` type that validates it."""
    return {st.section_name: st.config for st in STAGES.values()}
