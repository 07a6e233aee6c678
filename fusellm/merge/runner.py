"""``fusellm merge``: weight-merge baselines for fused models.

Each named merge in the ``merge:`` section → ``run_dir/merge/NAME/model`` (an HF directory)
plus ``mergekit.yaml``. The input models are held in memory (fine up to a few B parameters
on one machine); for 7B-scale merges run the written ``mergekit.yaml`` with
``mergekit-yaml``, which streams tensors lazily. ``fusellm evolve`` (evolutionary merge
searches) is :mod:`fusellm.merge.evolve`; it shares the loading helpers here.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch

from fusellm.manifest import StageDir
from fusellm.merge.config import MergeSpec
from fusellm.merge.core import check_compatible, merge, mergekit_yaml
from fusellm.models import (
    converted_dir,
    load_model,
    load_tokenizer,
    locate,
    tokenizer_fingerprint,
)
from fusellm.recipe import ModelSpec, Recipe
from fusellm.refs import resolve
from fusellm.stages import MERGE
from fusellm.storage import atomic_dir, atomic_write_bytes
from fusellm.tracking import start_run

log = logging.getLogger(__name__)
SEARCH_STATE = "search.json"  # evolve: per-generation CMA-ES checkpoint (JSON, no pickle)


class Inputs:
    """The models of one merge, loaded once: state dicts, configs, tokenizer."""

    def __init__(self, specs: dict[str, tuple[str, ModelSpec]], device: str = "cpu"):
        self.specs = specs
        self.models = {r: load_model(s, n) for r, (n, s) in specs.items()}
        toks = {r: load_tokenizer(s, n) for r, (n, s) in specs.items()}
        self.tokenizer = next(iter(toks.values()))
        tok_fp = {r: tokenizer_fingerprint(t) for r, t in toks.items()}
        self.states = {r: m.state_dict() for r, m in self.models.items()}
        check_compatible(
            {r: m.config for r, m in self.models.items()},
            tok_fp,
            {r: {k: tuple(v.shape) for k, v in sd.items()} for r, sd in self.states.items()},
        )
        first = next(iter(self.models.values()))
        self.num_layers = _num_layers(first)
        # Merges are loaded into a separate model: the state dicts above share storage
        # with the inputs' parameters, which must stay intact across candidates.
        self.work = copy.deepcopy(first).to(device)

    def save(self, merged: dict[str, torch.Tensor], out_dir, dtype: torch.dtype) -> None:
        """Write ``merged`` in ``dtype`` with the first model's config and the tokenizer."""
        self.work.to(dtype).load_state_dict(merged)
        with atomic_dir(out_dir) as tmp:
            self.work.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)


def resolve_inputs(
    recipe: Recipe, refs: list[str], where: str
) -> tuple[dict[str, tuple[str, ModelSpec]], dict[str, str]]:
    """Each ref as exactly one (name, spec), and its identity: cheap (nothing is loaded),
    so that a complete stage is skipped before any model is read."""
    if len(set(refs)) != len(refs):
        raise ValueError(f"{where}: a model appears twice in {refs}")
    found = {}
    for i, ref in enumerate(refs):
        hits = resolve(recipe, ref, f"{where}.{i}")
        if len(hits) != 1:
            raise ValueError(f"{where}.{i}: '{ref}' names {len(hits)} models; list them")
        found[ref] = hits[0]
    return found, {r: locate(s, n).identity for r, (n, s) in found.items()}


def _num_layers(model) -> int:
    """Transformer layers of the (text) model: multimodal configs nest them."""
    cfg = model.config
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    n = getattr(text, "num_hidden_layers", None)
    if not n:
        from fusellm.merge.core import layer_of

        found = [layer_of(k) for k in model.state_dict()]
        n = 1 + max((i for i in found if i is not None), default=0)
    return int(n)


def mergekit_location(spec: ModelSpec, name: str) -> str:
    """Where mergekit can read a model: its HF directory (for a GGUF file, the directory
    fusellm converts it into when loading it), or a hub id at its pinned commit."""
    loc = locate(spec, name)
    if loc.kind == "hub":
        return f"{loc.location}@{loc.revision}"  # mergekit's `path@revision`
    return str(converted_dir(loc, "model")) if loc.kind == "gguf" else loc.location


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def output_files(sd: StageDir) -> dict[str, dict]:
    return {
        str(p.relative_to(sd.path)): sd.file_record(str(p.relative_to(sd.path)))
        for p in sorted(sd.path.rglob("*"))
        if p.is_file()
        and p.name not in ("manifest.json", "fingerprint.json", "metrics.jsonl")
        and p.name != SEARCH_STATE  # the search's working checkpoint, not an output
    }


def run(recipe: Recipe, force: bool = False) -> dict[str, Any]:
    if not recipe.merge:
        raise ValueError("the recipe has no 'merge:' section")
    return {name: merge_one(recipe, name, spec, force) for name, spec in recipe.merge.items()}


def merge_one(recipe: Recipe, name: str, spec: MergeSpec, force: bool) -> dict | None:
    where = f"merge.{name}"
    base = spec.base
    inputs = dict(spec.inputs())
    refs = ([base] if base else []) + list(inputs)
    found, ids = resolve_inputs(recipe, refs, f"{where}.models")
    fp = {"spec": spec.model_dump(mode="json", by_alias=True), "inputs": ids}
    sd = StageDir(f"merge '{name}'", recipe.stage_dir(MERGE) / name, fp)
    if not sd.prepare(force):
        log.info("merge %s: complete and unchanged (skipped)", name)
        return None
    # The mergekit config first: it needs no model in memory, and at a scale where this
    # in-memory merge does not fit, `mergekit-yaml` can run it (streaming tensors).
    yaml_text = mergekit_yaml(
        spec.method,
        inputs,
        mergekit_location(*reversed(found[base])) if base else None,
        {r: mergekit_location(s, n) for r, (n, s) in found.items()},
        spec.parameters,
        spec.dtype,
    )
    atomic_write_bytes(sd.path / "mergekit.yaml", yaml_text.encode())
    inp = Inputs(found)
    with start_run(recipe, "merge", {"name": name, **fp}) as tracker:
        merged = merge(
            inp.states,
            spec.method,
            inputs,
            base,
            spec.parameters,
            spec.layer_groups,
            inp.num_layers,
            spec.seed,
            _dtype(spec.dtype),
        )
        inp.save(merged, sd.path / "model", _dtype(spec.dtype))
        stats = {"method": spec.method, "models": len(spec.models), "tensors": len(merged)}
        tracker.summary(stats)
    log.info(
        "merge %s: %s of %s -> %s",
        name,
        spec.method,
        [m.model for m in spec.models],
        sd.path / "model",
    )
    return sd.finish(output_files(sd), stats, fp["spec"])
