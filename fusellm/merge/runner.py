"""``fusellm merge`` and ``fusellm evolve``: weight-merge baselines for fused models.

``merge``: each named merge in the ``merge:`` section → ``run_dir/merge/NAME/model`` (an HF
directory) plus ``mergekit.yaml``. ``evolve``: CMA-ES over a merge's weights/densities with
dev-split bits per byte and/or task accuracy as fitness (:mod:`fusellm.merge.fitness`) →
``run_dir/evolve/model``, ``mergekit.yaml``, ``generations.csv``, ``fitness.png``. Both hold
the input models in memory (fine up to a few B parameters on one machine); for 7B-scale
merges run the written ``mergekit.yaml`` with ``mergekit-yaml``, which streams tensors
lazily.
"""

from __future__ import annotations

import copy
import json
import logging
from typing import Any

import numpy as np
import torch

from fusellm.manifest import StageDir
from fusellm.merge.config import HAS_DENSITY, NEEDS_BASE, EvolveConfig, MergeSpec
from fusellm.merge.core import check_compatible, merge, mergekit_yaml
from fusellm.merge.fitness import (
    FITNESS_PNG,
    GENERATIONS_CSV,
    Fitness,
    generations_csv,
    plot_fitness,
    read_curves,
)
from fusellm.models import (
    converted_dir,
    load_model,
    load_tokenizer,
    locate,
    tokenizer_fingerprint,
)
from fusellm.recipe import ModelSpec, Recipe
from fusellm.refs import resolve
from fusellm.stages import EVOLVE, MERGE
from fusellm.storage import atomic_dir, atomic_write_bytes, atomic_write_json
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


def _resolve_inputs(
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


def _location(spec: ModelSpec, name: str) -> str:
    """Where mergekit can read a model: its HF directory (for a GGUF file, the directory
    fusellm converts it into when loading it), or a hub id at its pinned commit."""
    loc = locate(spec, name)
    if loc.kind == "hub":
        return f"{loc.location}@{loc.revision}"  # mergekit's `path@revision`
    return str(converted_dir(loc, "model")) if loc.kind == "gguf" else loc.location


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _files(sd: StageDir) -> dict[str, dict]:
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
    base = spec.base if spec.method in NEEDS_BASE else None
    refs = ([base] if base else []) + [m.model for m in spec.models]
    found, ids = _resolve_inputs(recipe, refs, f"{where}.models")
    fp = {"spec": spec.model_dump(mode="json", by_alias=True), "inputs": ids}
    sd = StageDir(f"merge '{name}'", recipe.stage_dir(MERGE) / name, fp)
    if not sd.prepare(force):
        log.info("merge %s: complete and unchanged (skipped)", name)
        return None
    weights = {m.model: m.weight for m in spec.models}
    dens = {m.model: m.density for m in spec.models} if spec.method in HAS_DENSITY else None
    # The mergekit config first: it needs no model in memory, and at a scale where this
    # in-memory merge does not fit, `mergekit-yaml` can run it (streaming tensors).
    params = {
        m.model: {"weight": m.weight, **({"density": m.density} if dens else {})}
        for m in spec.models
    }
    extra = {
        k: v for k, v in (("normalize", spec.normalize), ("lambda", spec.lambda_)) if v is not None
    }
    yaml_text = mergekit_yaml(
        spec.method,
        params,
        _location(*reversed(found[base])) if base else None,
        {r: _location(s, n) for r, (n, s) in found.items()},
        extra,
        spec.dtype,
    )
    atomic_write_bytes(sd.path / "mergekit.yaml", yaml_text.encode())
    inp = Inputs(found)
    with start_run(recipe, "merge", {"name": name, **fp}) as tracker:
        merged = merge(
            inp.states,
            spec.method,
            weights,
            dens,
            base,
            spec.normalize,
            spec.lambda_,
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
    return sd.finish(_files(sd), stats, fp["spec"])


# ---------------------------------------------------------------------------- evolve


class Genome:
    """x ↔ merge parameters: per model, ``layer_groups`` weights then (optionally) as many
    densities."""

    def __init__(self, cfg: EvolveConfig):
        self.cfg = cfg
        self.dens = cfg.search_density and cfg.method in HAS_DENSITY
        self.per = cfg.layer_groups * (2 if self.dens else 1)

    @property
    def dim(self) -> int:
        return self.per * len(self.cfg.models)

    def x0_bounds(self) -> tuple[list[float], tuple[list[float], list[float]]]:
        g, (wl, wh), (dl, dh) = (
            self.cfg.layer_groups,
            self.cfg.weight_bounds,
            self.cfg.density_bounds,
        )
        x0 = ([0.5 * (wl + wh)] * g + ([0.5 * (dl + dh)] * g if self.dens else [])) * len(
            self.cfg.models
        )
        lo = ([wl] * g + ([dl] * g if self.dens else [])) * len(self.cfg.models)
        hi = ([wh] * g + ([dh] * g if self.dens else [])) * len(self.cfg.models)
        return x0, (lo, hi)

    def decode(self, x) -> tuple[dict, dict | None]:
        g = self.cfg.layer_groups
        w, d = {}, {} if self.dens else None
        for i, m in enumerate(self.cfg.models):
            chunk = [float(v) for v in x[i * self.per : (i + 1) * self.per]]
            w[m] = chunk[:g] if g > 1 else chunk[0]
            if self.dens:
                d[m] = chunk[g:] if g > 1 else chunk[g]
        return w, d


def run_evolve(recipe: Recipe, force: bool = False) -> dict | None:
    from fusellm.merge.search import search

    cfg: EvolveConfig | None = recipe.evolve
    if cfg is None:
        raise ValueError("the recipe has no 'evolve:' section")
    base = cfg.base if cfg.method in NEEDS_BASE else None
    refs = ([base] if base else []) + list(cfg.models)
    found, ids = _resolve_inputs(recipe, refs, "evolve.models")
    fp = {"config": cfg.model_dump(mode="json"), "inputs": ids}
    # generations may grow without invalidating finished ones: a longer search continues
    fp["config"].pop("generations")
    sd = StageDir("evolve", recipe.stage_dir(EVOLVE), fp)
    state_path = sd.path / SEARCH_STATE
    if not sd.prepare(force):
        from fusellm.storage import read_json

        if read_json(sd.path / "manifest.json")["stats"]["generations"] >= cfg.generations:
            log.info("evolve: complete and unchanged (skipped)")
            return None
    (sd.path / "manifest.json").unlink(missing_ok=True)
    from fusellm.bench.score import best_device

    inp = Inputs(found, device=best_device())
    genome = Genome(cfg)
    fit = Fitness.for_evolve(recipe, cfg, inp.tokenizer)
    work = inp.work
    dtype = torch.float32

    def merged_at(x) -> dict[str, torch.Tensor]:
        w, d = genome.decode(x)
        return merge(
            inp.states,
            cfg.method,
            w,
            d,
            base,
            layer_groups=cfg.layer_groups,
            num_layers=inp.num_layers,
            seed=cfg.seed,
            dtype=dtype,
        )

    scored: dict[tuple[float, ...], dict[str, float]] = {}  # x -> its objectives' values

    def fitness(x: np.ndarray) -> float:
        work.load_state_dict(merged_at(x))
        f, scored[tuple(float(v) for v in x)] = fit.score(work)
        return f

    def objectives(x: list[float]) -> dict[str, float]:
        """Each objective's value at ``x``; the checkpoint keeps only the combined fitness,
        so a best candidate of a generation replayed on resume is scored again."""
        if tuple(x) not in scored:
            fitness(np.asarray(x))
        return scored[tuple(x)]

    def write_curves(history: list[dict]) -> None:
        text = _csv(history, genome, [objectives(r["best_x"]) for r in history])
        atomic_write_bytes(csv_path, text.encode())
        plot_fitness(read_curves(csv_path), sd.path / FITNESS_PNG)

    x0, bounds = genome.x0_bounds()
    csv_path = sd.path / GENERATIONS_CSV
    with start_run(recipe, "evolve", fp) as tracker:

        def on_generation(history: list[dict]) -> None:
            rec = history[-1]
            write_curves(history)
            keys = ("evaluations", "gen_best", "gen_mean", "gen_median", "best", "sigma")
            best_objectives = {f"best_{k}": v for k, v in objectives(rec["best_x"]).items()}
            tracker.log({**{k: rec[k] for k in keys}, **best_objectives}, step=rec["generation"])
            log.info(
                "evolve: generation %d/%d, %d evaluations, best fitness %.5f %s (σ %.3f)",
                rec["generation"],
                cfg.generations,
                rec["evaluations"],
                rec["best"],
                objectives(rec["best_x"]),
                rec["sigma"],
            )

        reference = base or refs[0]
        work.load_state_dict(inp.states[reference])
        ref_fitness, ref_objectives = fit.score(work)
        st = search(
            fitness,
            x0,
            bounds,
            cfg.sigma0,
            cfg.generations,
            cfg.seed,
            cfg.popsize,
            state_path,
            on_generation,
        )
        # Also after a resume that only replayed finished generations (the last CSV write
        # may be what a kill interrupted).
        write_curves(st.history)
        w, d = genome.decode(st.best_x)
        inp.save(merged_at(st.best_x), sd.path / "model", torch.float32)
        params = {m: {"weight": w[m], **({"density": d[m]} if d else {})} for m in cfg.models}
        yaml_text = mergekit_yaml(
            cfg.method,
            params,
            _location(*reversed(found[base])) if base else None,
            {r: _location(s, n) for r, (n, s) in found.items()},
            {},
            "float32",
        )
        atomic_write_bytes(sd.path / "mergekit.yaml", yaml_text.encode())
        best_objectives = objectives(st.best_x)
        best = {
            "weight": w,
            "density": d,
            "fitness": st.best_f,
            "objectives": best_objectives,
            "x": st.best_x,
        }
        atomic_write_json(sd.path / "best.json", best)
        stats = {
            "generations": st.generation,
            "evaluations": st.evaluations,
            "best_fitness": st.best_f,
            "best_objectives": best_objectives,
            "reference": reference,
            "reference_fitness": ref_fitness,
            "reference_objectives": ref_objectives,
            "dev_items": fit.items,
            "dim": genome.dim,
        }
        tracker.summary(stats)
    return sd.finish(_files(sd), stats, fp["config"])


def _csv(history: list[dict], genome: Genome, objectives: list[dict[str, float]]) -> str:
    """generations.csv (:func:`fusellm.merge.fitness.generations_csv`) with σ and the best
    parameters so far as JSON."""
    extra = []
    for r in history:
        weight, density = genome.decode(r["best_x"])
        params = json.dumps({"weight": weight, "density": density})
        extra.append({"sigma": r["sigma"], "best_params": params})
    return generations_csv(history, objectives, extra)
