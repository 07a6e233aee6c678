"""Names for models in recipe sections that compare or combine models (bench, merge,
evolve): a name in ``models:``, or a pipeline output.

``target`` the base target · ``sources`` each source · ``fused`` ``run_dir/train/model`` ·
``clm_only`` ``run_dir/clm_only/model`` · ``pairwise:SOURCE``
``run_dir/pairwise/SOURCE/train/model`` (the target fused with that source alone) · ``merge:NAME`` ``run_dir/merge/NAME/model`` ·
``evolve`` ``run_dir/evolve/model`` · ``evolve:NAME`` ``run_dir/evolve/NAME/model`` (a named
search). Pipeline outputs must be complete (their manifest
says so) before anything reads them.
"""

from __future__ import annotations

from pathlib import Path

from fusellm.manifest import load_manifest
from fusellm.recipe import ModelSpec, Recipe
from fusellm.stages import CLM_ONLY, EVOLVE, MERGE, PAIRWISE, TRAIN

REFS = "target, sources, fused, clm_only, pairwise:SOURCE, merge:NAME, evolve, evolve:NAME"


def output_dir(recipe: Recipe, ref: str) -> tuple[Path, str] | None:
    """(stage directory, stage label) of a pipeline-output reference, else None."""
    if ref == "fused":
        return recipe.stage_dir(TRAIN), TRAIN
    if ref == "clm_only":
        return recipe.stage_dir(CLM_ONLY), CLM_ONLY
    if ref.startswith("pairwise:"):
        src = ref[len("pairwise:") :]
        return recipe.stage_dir(PAIRWISE) / src / TRAIN, PAIRWISE
    if ref.startswith("merge:"):
        return recipe.stage_dir(MERGE) / ref[len("merge:") :], f"merge '{ref[6:]}'"
    if ref == "evolve":
        return recipe.stage_dir(EVOLVE), EVOLVE
    if ref.startswith("evolve:"):
        return recipe.stage_dir(EVOLVE) / ref[len("evolve:") :], f"evolve search '{ref[7:]}'"
    return None


def resolve(recipe: Recipe, ref: str, where: str) -> list[tuple[str, ModelSpec]]:
    """``ref`` as (label, spec) pairs (``sources`` gives several). ``where`` names the
    recipe key for error messages."""
    if ref == "target":
        return [(recipe.target, recipe.models[recipe.target])]
    if ref == "sources":
        return [(s, recipe.models[s]) for s in recipe.sources]
    out = output_dir(recipe, ref)
    if out is not None:
        d, stage = out
        try:
            load_manifest(d, stage)
        except FileNotFoundError as e:
            raise ValueError(f"{where}: '{ref}' needs the {stage} stage's output: {e}") from None
        return [(ref, ModelSpec(path=str((d / "model").resolve())))]
    if ref in recipe.models:
        return [(ref, recipe.models[ref])]
    raise ValueError(
        f"{where}: '{ref}' is neither a name in models: {sorted(recipe.models)} nor one of {REFS}"
    )
