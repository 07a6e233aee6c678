"""``fusellm evolve``: evolutionary merge searches (Akiba et al. 2024) with CMA-ES.

The ``evolve:`` section is one search (``run_dir/evolve``, referred to as ``evolve``) or a
mapping of named searches run in order (``run_dir/evolve/NAME``, ``evolve:NAME``); a later
search may take an earlier one's result as a model (PS+DFS: a data-flow search over the
parameter-space merge and the sources).

Two search spaces, one loop (:func:`fusellm.merge.search.search`):

* ``ps`` (parameter space): per-model weights (and densities) of a mergekit merge method;
  the best merge is saved with its ``mergekit.yaml``;
* ``dfs`` (data-flow space, :mod:`fusellm.merge.dfs`): the layers of the inference path and
  the scales where it crosses models; the best path is saved as an ordinary model with the
  scales folded in, and ``path.json``.

Fitness (:mod:`fusellm.merge.fitness`): bits per byte on the corpus dev ``split`` and/or
accuracy on validation items of OLMES tasks, a weighted sum to minimise. Candidates are
built and scored in memory. Every generation goes to ``generations.csv`` (each objective's
value for the best candidate so far), ``fitness.png``, W&B and the log; the search state is
checkpointed as JSON after each, and a killed search resumes to the result an
uninterrupted one gives.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from fusellm.manifest import StageDir
from fusellm.merge import methods
from fusellm.merge.config import EvolveConfig, evolve_searches
from fusellm.merge.core import merge, mergekit_yaml
from fusellm.merge.fitness import (
    FITNESS_PNG,
    GENERATIONS_CSV,
    Fitness,
    generations_csv,
    plot_fitness,
    read_curves,
)
from fusellm.merge.runner import (
    SEARCH_STATE,
    Inputs,
    mergekit_location,
    output_files,
    resolve_inputs,
)
from fusellm.models import load_model, load_tokenizer, tokenizer_fingerprint
from fusellm.recipe import Recipe
from fusellm.stages import EVOLVE
from fusellm.storage import atomic_dir, atomic_write_bytes, atomic_write_json
from fusellm.tracking import start_run

log = logging.getLogger(__name__)


def run(recipe: Recipe, force: bool = False) -> dict[str, dict | None]:
    section = recipe.evolve
    if section is None:
        raise ValueError("the recipe has no 'evolve:' section")
    return {
        name or EVOLVE: _search(recipe, name, cfg, force) for name, cfg in evolve_searches(section)
    }


def search_dir(recipe: Recipe, name: str | None) -> Path:
    """Where a search writes: ``run_dir/evolve`` (one search) or ``run_dir/evolve/NAME``."""
    return recipe.stage_dir(EVOLVE) / name if name else recipe.stage_dir(EVOLVE)


class PsSpace:
    """Parameter space: x ↔ per-model weights (``layer_groups`` of them) then densities."""

    def __init__(self, cfg: EvolveConfig, found: dict, device: str):
        self.cfg = cfg
        self.found = found
        self.base = cfg.base
        self.inp = Inputs(found, device=device)
        self.tokenizer = self.inp.tokenizer
        self.dens = cfg.search_density and "density" in methods.get(cfg.method).per_model
        self.per = cfg.layer_groups * (2 if self.dens else 1)
        self.dim = self.per * len(cfg.models)
        self.reference = self.base or cfg.models[0]
        self.start_is_reference = False  # the reference model is no point of this space

    def x0_bounds(self) -> tuple[list[float], tuple[list[float], list[float]]]:
        g, (wl, wh), (dl, dh) = (
            self.cfg.layer_groups,
            self.cfg.weight_bounds,
            self.cfg.density_bounds,
        )
        n = len(self.cfg.models)
        x0 = ([0.5 * (wl + wh)] * g + ([0.5 * (dl + dh)] * g if self.dens else [])) * n
        lo = ([wl] * g + ([dl] * g if self.dens else [])) * n
        hi = ([wh] * g + ([dh] * g if self.dens else [])) * n
        return x0, (lo, hi)

    def describe(self, x) -> dict[str, dict]:
        """x as per-model merge parameters: {"models": {model: {"weight": w, "density": d}}}."""
        g = self.cfg.layer_groups
        out = {}
        for i, m in enumerate(self.cfg.models):
            chunk = [float(v) for v in x[i * self.per : (i + 1) * self.per]]
            out[m] = {"weight": chunk[:g] if g > 1 else chunk[0]}
            if self.dens:
                out[m]["density"] = chunk[g:] if g > 1 else chunk[g]
        return {"models": out}

    def _merged(self, x) -> dict[str, torch.Tensor]:
        return merge(
            self.inp.states,
            self.cfg.method,
            self.describe(x)["models"],
            self.base,
            layer_groups=self.cfg.layer_groups,
            num_layers=self.inp.num_layers,
            seed=self.cfg.seed,
            dtype=torch.float32,
        )

    def candidate(self, x) -> torch.nn.Module:
        self.inp.work.load_state_dict(self._merged(x))
        return self.inp.work

    def reference_model(self) -> torch.nn.Module:
        self.inp.work.load_state_dict(self.inp.states[self.reference])
        return self.inp.work

    def save(self, x, sd_path: Path) -> None:
        self.inp.save(self._merged(x), sd_path / "model", torch.float32)
        base = self.base
        yaml_text = mergekit_yaml(
            self.cfg.method,
            self.describe(x)["models"],
            mergekit_location(*reversed(self.found[base])) if base else None,
            {r: mergekit_location(s, n) for r, (n, s) in self.found.items()},
            {},
            "float32",
        )
        atomic_write_bytes(sd_path / "mergekit.yaml", yaml_text.encode())


class DfsSpace:
    """Data-flow space: x ↔ a path of the sources' layers and its scales."""

    def __init__(self, cfg: EvolveConfig, found: dict, device: str):
        from fusellm.merge.dfs import DfsGenome, PathModel, check_composable, decoder_layers

        self.cfg = cfg
        self.models = {r: load_model(s, n, device) for r, (n, s) in found.items()}
        toks = {r: load_tokenizer(s, n) for r, (n, s) in found.items()}
        fps = {r: tokenizer_fingerprint(t) for r, t in toks.items()}
        if len(set(fps.values())) > 1:
            raise ValueError(
                f"evolve.models: {list(fps)} use different tokenizers; a data-flow path feeds "
                "one model's embeddings through another's layers: they must share one"
            )
        check_composable({r: m.config.to_dict() for r, m in self.models.items()})
        self.tokenizer = toks[cfg.embeddings]
        from fusellm.merge.dfs import foldable

        self.fold = foldable(self.models[cfg.embeddings].config)
        if cfg.scales != "none" and not self.fold:
            kind = self.models[cfg.embeddings].config.model_type
            raise ValueError(
                f"evolve.scales: {cfg.scales}: a {kind} model's layers cannot absorb a scale of "
                "the residual stream into their weights (only pre-norm RMSNorm decoders can: "
                "llama, mistral, qwen2), so a scaled path could not be saved as an ordinary "
                "model; set evolve.scales: none"
            )
        sizes = {r: len(decoder_layers(m)) for r, m in self.models.items()}
        self.genome = DfsGenome(
            sizes, cfg.repeats, cfg.scales, cfg.embeddings, tuple(cfg.scale_bounds)
        )
        self.paths = PathModel(self.models, cfg.embeddings)
        self.dim = self.genome.dim
        self.reference = cfg.embeddings
        self.start_is_reference = True  # x0 decodes to the reference's own layers

    def x0_bounds(self):
        return self.genome.x0_bounds()

    def describe(self, x) -> dict:
        """x as its path: [{"model", "layer", "scale"}, ...]."""
        return {"path": [vars(s).copy() for s in self.genome.decode(x)]}

    def candidate(self, x) -> torch.nn.Module:
        return self.paths.build(self.genome.decode(x))

    def reference_model(self) -> torch.nn.Module:
        return self.models[self.reference]

    def save(self, x, sd_path: Path) -> None:
        from transformers import AutoModelForCausalLM

        from fusellm.merge.dfs import path_config, path_state_dict

        steps = self.genome.decode(x)
        configs = {r: m.config for r, m in self.models.items()}
        cfg = path_config(configs[self.cfg.embeddings], steps, configs)
        model = AutoModelForCausalLM.from_config(cfg)
        model.load_state_dict(path_state_dict(self.models, self.cfg.embeddings, steps, self.fold))
        with atomic_dir(sd_path / "model") as tmp:
            model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
        atomic_write_json(
            sd_path / "path.json",
            {
                "embeddings_from": self.cfg.embeddings,
                "scales_folded": self.fold and any(s.scale != 1.0 for s in steps),
                **self.describe(x),
            },
        )


def _search(recipe: Recipe, name: str | None, cfg: EvolveConfig, force: bool) -> dict | None:
    from fusellm.bench.score import best_device
    from fusellm.merge.search import search

    label = f"evolve:{name}" if name else "evolve"
    where = f"evolve.{name}" if name else "evolve"
    base = cfg.base if cfg.space == "ps" else None
    refs = ([base] if base else []) + list(cfg.models)
    found, ids = resolve_inputs(recipe, refs, f"{where}.models")
    fp = {"config": cfg.model_dump(mode="json"), "inputs": ids}
    # generations may grow without invalidating finished ones: a longer search continues
    fp["config"].pop("generations")
    sd = StageDir(label, search_dir(recipe, name), fp)
    state_path = sd.path / SEARCH_STATE
    if not sd.prepare(force):
        from fusellm.storage import read_json

        if read_json(sd.path / "manifest.json")["stats"]["generations"] >= cfg.generations:
            log.info("%s: complete and unchanged (skipped)", label)
            return None
    (sd.path / "manifest.json").unlink(missing_ok=True)
    device = best_device()
    space = (PsSpace if cfg.space == "ps" else DfsSpace)(cfg, found, device)
    fit = Fitness.for_evolve(recipe, cfg, space.tokenizer)
    scored: dict[tuple[float, ...], dict[str, float]] = {}  # x -> its objectives' values

    def fitness(x: np.ndarray) -> float:
        f, scored[tuple(float(v) for v in x)] = fit.score(space.candidate(x))
        return f

    def objectives(x: list[float]) -> dict[str, float]:
        """Each objective's value at ``x``; the checkpoint keeps only the combined fitness,
        so a best candidate of a generation replayed on resume is scored again."""
        if tuple(x) not in scored:
            fitness(np.asarray(x))
        return scored[tuple(x)]

    csv_path = sd.path / GENERATIONS_CSV

    def write_curves(history: list[dict]) -> None:
        extra = [
            {"sigma": r["sigma"], "best_params": json.dumps(space.describe(r["best_x"]))}
            for r in history
        ]
        text = generations_csv(history, [objectives(r["best_x"]) for r in history], extra)
        atomic_write_bytes(csv_path, text.encode())
        plot_fitness(read_curves(csv_path), sd.path / FITNESS_PNG, label)

    x0, bounds = space.x0_bounds()
    with start_run(recipe, label.replace(":", "/"), fp) as tracker:

        def on_generation(history: list[dict]) -> None:
            rec = history[-1]
            write_curves(history)
            keys = ("evaluations", "gen_best", "gen_mean", "gen_median", "best", "sigma")
            best_objectives = {f"best_{k}": v for k, v in objectives(rec["best_x"]).items()}
            tracker.log({**{k: rec[k] for k in keys}, **best_objectives}, step=rec["generation"])
            log.info(
                "%s: generation %d/%d, %d evaluations, best fitness %.5f %s (σ %.3f)",
                label,
                rec["generation"],
                cfg.generations,
                rec["evaluations"],
                rec["best"],
                objectives(rec["best_x"]),
                rec["sigma"],
            )

        ref_fitness, ref_objectives = fit.score(space.reference_model())
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
        best_x, best_f, best_objectives = st.best_x, st.best_f, objectives(st.best_x)
        # A data-flow search starts at a point of its space (the embeddings source's own
        # path), scored above as the reference: if no candidate beat it, it is the result.
        start = space.start_is_reference and ref_fitness <= best_f
        if start:
            log.info("%s: no candidate beat the starting point; keeping it", label)
            best_x, best_f, best_objectives = list(x0), ref_fitness, ref_objectives
        space.save(best_x, sd.path)
        best = {
            **space.describe(best_x),
            "fitness": best_f,
            "objectives": best_objectives,
            "x": best_x,
            "is_start": start,
        }
        atomic_write_json(sd.path / "best.json", best)
        stats = {
            "space": cfg.space,
            "generations": st.generation,
            "evaluations": st.evaluations,
            "best_fitness": best_f,
            "best_is_start": start,
            "best_candidate_fitness": st.best_f,
            "best_objectives": best_objectives,
            "reference": space.reference,
            "reference_fitness": ref_fitness,
            "reference_objectives": ref_objectives,
            "dev_items": fit.items,
            "dim": space.dim,
        }
        tracker.summary(stats)
    return sd.finish(output_files(sd), stats, fp["config"])
