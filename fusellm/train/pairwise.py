"""``fusellm pairwise``: pairwise fusion, then a merge (FuseChat-2, Wan et al. 2024).

Instead of fusing every source into the target at once, each source is fused separately
into its own copy of the target (the pivot): for source ``S``, the ``fuse`` stage runs
over ``[target, S]`` (MinCE/AvgCE between the pivot's own distributions and S's aligned
ones; ``with_target: false``: S's alone) and the ``train`` stage trains the target on it.
The results, ``run_dir/pairwise/S/{fuse,train}``, are referred to as ``pairwise:S``; a
``merge:`` entry combines them in parameter space (FuseChat-2 uses ``sce``):

    pairwise: {sources: [gemma3, qwen]}
    merge:
      fusechat: {method: sce, base: target,
                 models: [{model: "pairwise:gemma3"}, {model: "pairwise:qwen"}]}

Each pair is its own fingerprinted stage directory that depends on nothing but the
corpus, the pivot's and S's extractions and S's alignment, so adding a source later costs
its extraction, its alignment, its pairwise run and the re-merge: nothing else reruns.
"""

from __future__ import annotations

import logging

from pydantic import Field

from fusellm import distributed
from fusellm.recipe import Recipe, StrictModel
from fusellm.stages import FUSE, PAIRWISE, TRAIN

log = logging.getLogger(__name__)


class PairwiseConfig(StrictModel):
    """The ``pairwise:`` section."""

    sources: list[str] | None = Field(
        None, description="sources to fuse one at a time (default: every source but the target)"
    )
    with_target: bool = Field(
        True, description="each pair compares the target's own distributions with the source's"
    )


def pair_sources(recipe: Recipe) -> list[str]:
    cfg = recipe.pairwise
    sources = cfg.sources or [s for s in recipe.sources if s != recipe.target]
    for i, s in enumerate(sources):
        if s == recipe.target:
            raise ValueError(f"pairwise.sources.{i}: '{s}' is the target, which is the pivot")
        if s not in recipe.sources:
            raise ValueError(
                f"pairwise.sources.{i}: '{s}' is not one of sources {recipe.sources} "
                "(a source must be extracted and aligned)"
            )
    if not sources:
        raise ValueError("pairwise: no source besides the target to fuse")
    return sources


def pair_recipe(recipe: Recipe, source: str) -> Recipe:
    """The recipe whose ``fuse`` and ``train`` stages are those of ``source``'s pair:
    fuse over [target, source] (or [source]) into ``run_dir/pairwise/SOURCE``."""
    if recipe.fuse is None or recipe.train is None:
        raise ValueError("pairwise: needs the recipe's fuse: and train: sections (used per pair)")
    pair = ([recipe.target] if recipe.pairwise.with_target else []) + [source]
    sub = recipe.model_copy(
        update={
            "name": f"{recipe.name}/{PAIRWISE}-{source}",
            "fuse": recipe.fuse.model_copy(update={"sources": pair}),
        }
    )
    root = recipe.stage_dir(PAIRWISE) / source
    sub._dirs = {**recipe._dirs, FUSE: root / FUSE, TRAIN: root / TRAIN}
    return sub


def run(recipe: Recipe, force: bool = False) -> dict[str, dict | None]:
    from fusellm.fuse import runner as fuse
    from fusellm.train import runner as train

    if recipe.pairwise is None:
        raise ValueError("the recipe has no 'pairwise:' section")
    out = {}
    for source in pair_sources(recipe):
        sub = pair_recipe(recipe, source)
        log.info("pairwise %s: fuse %s, then train", source, sub.fuse.sources)
        fuse.run(sub, force=force)
        distributed.barrier()  # every rank's fused shards exist before any rank trains
        out[source] = train.run(sub, force=force)
        distributed.barrier()
    return out
