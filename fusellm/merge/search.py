"""CMA-ES search with a checkpoint per generation (the pure part of ``evolve``).

Ask/tell with the ``cma`` package (Hansen's CMA-ES). After every generation the whole
search state — the pickled strategy, numpy's global RNG state (``cma`` samples from it)
and the history — is written atomically, so a killed search resumes at its last finished
generation and ends exactly where an uninterrupted one would.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fusellm.storage import atomic_write_bytes

log = logging.getLogger(__name__)


@dataclass
class SearchState:
    es: Any
    rng: dict
    generation: int = 0
    evaluations: int = 0
    best_x: list[float] | None = None
    best_f: float = float("inf")
    history: list[dict[str, Any]] = field(default_factory=list)


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
    new one: generation, evaluations, best/mean fitness, σ, the best x so far.
    """
    try:
        import cma
    except ImportError as e:
        raise ValueError(f"evolve needs cma: pip install -e '.[merge]' ({e})") from None

    # cma needs at least two dimensions: a 1-D search carries an ignored second coordinate
    pad = len(x0) == 1
    if pad:
        inner, x0 = fitness, [*x0, 0.5]
        bounds = ([*bounds[0], 0.0], [*bounds[1], 1.0])

        def fitness(x: np.ndarray) -> float:
            return inner(x[:1])

    st: SearchState | None = None
    if state_path is not None and state_path.exists():
        st = pickle.loads(state_path.read_bytes())
        log.info("search: resuming after generation %d", st.generation)
    if st is None:
        # cma takes seed 0 as "seed from the clock": shift so every seed is reproducible
        opts = {"seed": seed + 1, "bounds": [list(bounds[0]), list(bounds[1])], "verbose": -9}
        if popsize:
            opts["popsize"] = popsize
        es = cma.CMAEvolutionStrategy(list(x0), sigma0, opts)  # seeds numpy's global RNG
        st = SearchState(es, np.random.get_state(legacy=False))
    np.random.set_state(st.rng)
    while st.generation < generations:
        xs = st.es.ask()
        fs = [float(fitness(np.asarray(x))) for x in xs]
        st.es.tell(xs, fs)
        st.generation += 1
        st.evaluations += len(xs)
        i = int(np.argmin(fs))
        if fs[i] < st.best_f:
            st.best_f, st.best_x = fs[i], [float(v) for v in xs[i]][: 1 if pad else None]
        rec = {
            "generation": st.generation,
            "evaluations": st.evaluations,
            "gen_best": fs[i],
            "gen_mean": float(np.mean(fs)),
            "best": st.best_f,
            "sigma": float(st.es.sigma),
            "best_x": st.best_x,
        }
        st.history.append(rec)
        st.rng = np.random.get_state(legacy=False)
        if state_path is not None:
            atomic_write_bytes(state_path, pickle.dumps(st))
        if on_generation is not None:
            on_generation(st.history)
    return st
