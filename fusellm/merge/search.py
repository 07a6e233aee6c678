"""CMA-ES search with a checkpoint per generation (the pure part of ``evolve``).

Ask/tell with the ``cma`` package (Hansen's CMA-ES). After every generation the search
is checkpointed atomically as JSON (``search.json``): the settings and, per generation,
the candidates ``ask()`` returned and their fitness values. No pickle: a checkpoint is
data, so a tampered file cannot run code when a search resumes.

Resuming rebuilds the strategy with the same options and seed and *replays* the recorded
generations: ``ask()`` (checked to return exactly the recorded candidates) and ``tell()``
with the recorded fitness values, without evaluating anything. CMA-ES is deterministic
given its seed and the fitness values, so the replayed strategy is identical to the one
that was killed, and the resumed search ends exactly where an uninterrupted one would.
``cma`` samples from numpy's global RNG; the search keeps that RNG state to itself
(swapped in around ``ask``/``tell``), so a fitness function that uses numpy's global RNG
cannot make a replay diverge.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fusellm.manifest import CorruptArtifact
from fusellm.storage import atomic_write_json, read_json

log = logging.getLogger(__name__)
FORMAT = "fusellm-cma-search/1"


@dataclass
class SearchState:
    es: Any
    rng: Any  # cma's own numpy RNG state (see _own_rng)
    generation: int = 0
    evaluations: int = 0
    best_x: list[float] | None = None
    best_f: float = float("inf")
    history: list[dict[str, Any]] = field(default_factory=list)
    # what the checkpoint records: per generation the asked candidates and their fitness
    asked: list[dict[str, list]] = field(default_factory=list)


@contextlib.contextmanager
def _own_rng(st: SearchState) -> Iterator[None]:
    """Run with cma's RNG state as numpy's global one; keep the caller's state apart."""
    outer = np.random.get_state()
    np.random.set_state(st.rng)
    try:
        yield
    finally:
        st.rng = np.random.get_state()
        np.random.set_state(outer)


def _record(st: SearchState, xs: list[np.ndarray], fs: list[float], pad: bool) -> None:
    """Book-keeping after ``tell``: the same code for live and replayed generations."""
    st.generation += 1
    st.evaluations += len(xs)
    i = int(np.argmin(fs))
    if fs[i] < st.best_f:
        st.best_f, st.best_x = fs[i], [float(v) for v in xs[i]][: 1 if pad else None]
    st.history.append(
        {
            "generation": st.generation,
            "evaluations": st.evaluations,
            "gen_best": fs[i],
            "gen_mean": float(np.mean(fs)),
            "gen_median": float(np.median(fs)),
            "best": st.best_f,
            "sigma": float(st.es.sigma),
            "best_x": st.best_x,
        }
    )
    st.asked.append({"xs": [[float(v) for v in x] for x in xs], "fs": list(fs)})


def _replay(st: SearchState, saved: dict, path: Path, pad: bool) -> None:
    """Re-run the recorded generations through ``ask``/``tell`` without evaluating."""
    for g, rec in enumerate(saved["generations"], start=1):
        with _own_rng(st):
            xs = st.es.ask()
        asked = np.asarray([np.asarray(x, dtype=float) for x in xs])
        if asked.shape != np.shape(rec["xs"]) or not np.array_equal(asked, rec["xs"]):
            raise CorruptArtifact(
                f"{path}: generation {g}: the recorded candidates differ from the ones CMA-ES "
                "asks for on replay (the file was altered, or written by another cma/numpy "
                "version); delete it to restart the search"
            )
        fs = [float(f) for f in rec["fs"]]
        with _own_rng(st):
            st.es.tell(xs, fs)
        _record(st, xs, fs, pad)


def search(
    fitness: Callable[[np.ndarray], float],
    x0: list[float],
    bounds: tuple[list[float], list[float]],
    sigma0: float,
    generations: int,
    seed: int,
    popsize: int | None = None,
    state_path: Path | None = None,
    on_generation: Callable[[list[dict[str, Any]]], None] | None = None,
) -> SearchState:
    """Minimise ``fitness`` over the box ``bounds`` for ``generations`` generations.

    ``on_generation`` receives ``history`` after each generation; its last record is the
    new one: generation, evaluations, the generation's best/mean/median fitness, the best
    so far, σ, the best x so far. With ``state_path`` every generation is checkpointed
    there (JSON) and a search whose file exists resumes from it; a file written with other
    settings is refused.
    """
    try:
        import cma
    except ImportError as e:
        raise ValueError(f"evolve needs cma: pip install -e '.[merge]' ({e})") from None

    settings = {
        "x0": [float(v) for v in x0],
        "bounds": [[float(v) for v in bounds[0]], [float(v) for v in bounds[1]]],
        "sigma0": float(sigma0),
        "seed": int(seed),
        "popsize": popsize,
    }
    # cma needs at least two dimensions: a 1-D search carries an ignored second coordinate
    pad = len(x0) == 1
    if pad:
        inner, x0 = fitness, [*x0, 0.5]
        bounds = ([*bounds[0], 0.0], [*bounds[1], 1.0])

        def fitness(x: np.ndarray) -> float:
            return inner(x[:1])

    # cma takes seed 0 as "seed from the clock": shift so every seed is reproducible
    opts = {"seed": seed + 1, "bounds": [list(bounds[0]), list(bounds[1])], "verbose": -9}
    if popsize:
        opts["popsize"] = popsize
    outer = np.random.get_state()
    es = cma.CMAEvolutionStrategy(list(x0), sigma0, opts)  # seeds numpy's global RNG
    st = SearchState(es, np.random.get_state())
    np.random.set_state(outer)

    if state_path is not None and state_path.exists():
        try:
            saved = read_json(state_path)
        except ValueError as e:  # JSON syntax or UTF-8 errors (a pickle is neither)
            raise CorruptArtifact(
                f"{state_path}: not a JSON search checkpoint ({e}); delete it to restart"
            ) from None
        if not isinstance(saved, dict):
            saved = {}
        if saved.get("format") != FORMAT or saved.get("settings") != settings:
            raise CorruptArtifact(
                f"{state_path}: not a checkpoint of this search (format {saved.get('format')!r}, "
                f"settings {saved.get('settings')} != {settings}); delete it to restart"
            )
        _replay(st, saved, state_path, pad)
        log.info("search: resumed after generation %d (replayed %s)", st.generation, state_path)
    while st.generation < generations:
        with _own_rng(st):
            xs = st.es.ask()
        fs = [float(fitness(np.asarray(x))) for x in xs]
        with _own_rng(st):
            st.es.tell(xs, fs)
        _record(st, xs, fs, pad)
        if state_path is not None:
            atomic_write_json(
                state_path, {"format": FORMAT, "settings": settings, "generations": st.asked}
            )
        if on_generation is not None:
            on_generation(st.history)
    return st
