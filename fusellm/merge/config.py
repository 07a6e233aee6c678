"""The ``merge:`` and ``evolve:`` recipe sections."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

from fusellm.merge.fitness import Objectives

Method = Literal["linear", "task_arithmetic", "ties", "dare_ties", "dare_linear"]
#: Methods that merge task vectors (model − base) and therefore need a base model.
NEEDS_BASE = {"task_arithmetic", "ties", "dare_ties", "dare_linear"}
#: Methods with a density (fraction of each task vector kept).
HAS_DENSITY = {"ties", "dare_ties", "dare_linear"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class MergeInput(_Strict):
    """One merged model. A list gives one value per layer group (see ``layer_groups``)."""

    model: str = Field(description="a name in models:, or target / fused / clm_only")
    weight: float | list[float] = 1.0
    density: float | list[float] = 1.0


class MergeSpec(_Strict):
    """One merge: ``method`` over ``models`` relative to ``base``, via mergekit.

    Formulas (δ_i = θ_i − θ_base): linear θ = Σ w_i θ_i / Σ w_i; task_arithmetic
    θ = θ_base + λ Σ w_i δ_i; ties keeps the top-``density`` |δ_i| entries, elects a sign
    per entry and averages the agreeing ones; dare_* drop entries at random with
    probability 1 − density and rescale the rest so that each task vector keeps its L1
    norm (mergekit's rescale; 1/density in expectation).
    """

    method: Method
    base: str | None = Field(None, description="base model (required by task-vector methods)")
    models: list[MergeInput] = Field(min_length=1)
    normalize: bool | None = Field(None, description="divide by Σ weights (method default)")
    lambda_: float | None = Field(None, alias="lambda", description="scale of the merged delta")
    layer_groups: int = Field(1, ge=1, description="contiguous layer groups for list values")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    seed: int = Field(0, description="seeds DARE's random drops")

    @model_validator(mode="after")
    def _check(self) -> MergeSpec:
        if self.method in NEEDS_BASE and self.base is None:
            raise ValueError(f"method '{self.method}' merges task vectors: it needs a base model")
        for i, m in enumerate(self.models):
            for key in ("weight", "density"):
                v = getattr(m, key)
                if isinstance(v, list) and len(v) != self.layer_groups:
                    raise ValueError(
                        f"models.{i}.{key}: {len(v)} values for layer_groups={self.layer_groups}"
                    )
            dens = m.density if isinstance(m.density, list) else [m.density]
            if any(not 0.0 < d <= 1.0 for d in dens):
                raise ValueError(f"models.{i}.density: must be in (0, 1], got {m.density}")
            if m.density != 1.0 and self.method not in HAS_DENSITY:
                raise ValueError(f"models.{i}.density: method '{self.method}' has no density")
        if self.method == "linear":
            if self.lambda_ is not None:
                raise ValueError("lambda: method 'linear' has no lambda (task-vector methods do)")
            if self.normalize is not False:
                for g in range(self.layer_groups):
                    total = sum(
                        m.weight[g] if isinstance(m.weight, list) else m.weight for m in self.models
                    )
                    if abs(total) < 1e-12:
                        raise ValueError(
                            f"models.*.weight: the weights of layer group {g} sum to 0, which "
                            "a normalised linear merge divides by"
                        )
        return self


MergeSection = dict[str, MergeSpec]
"""The ``merge:`` section: merge name -> one merge."""


class EvolveConfig(_Strict):
    """An evolutionary merge search (Akiba et al. 2024) with CMA-ES.

    ``space: ps`` (parameter space): per-model weights (and densities) of a mergekit merge
    method. ``space: dfs`` (data-flow space, :mod:`fusellm.merge.dfs`): which layers of
    which models form the inference path (``repeats`` passes over the sources' layers)
    and the scales where it crosses models (``scales``); the sources must share their
    architecture. Fitness (minimised): ``fitness`` weighs bits per byte on the corpus
    ``split`` (``lm``; never the test split) and accuracies on OLMES tasks' validation
    items (see :mod:`fusellm.merge.fitness`). Each candidate is built in memory and scored; nothing
    is written per candidate. Every generation is logged and checkpointed; a killed search
    resumes.
    """

    space: Literal["ps", "dfs"] = "ps"
    method: Method = "ties"
    base: str | None = None
    models: list[str] = Field(min_length=1)
    search_density: bool = Field(True, description="also search densities (methods that have one)")
    layer_groups: int = Field(1, ge=1)
    weight_bounds: list[float] = Field([0.0, 1.0], min_length=2, max_length=2)
    density_bounds: list[float] = Field([0.1, 1.0], min_length=2, max_length=2)
    repeats: int = Field(2, ge=1, description="dfs: passes over the sources' layers (r)")
    scales: Literal["pairs", "layers", "none"] = Field(
        "pairs",
        description="dfs: one scale per ordered pair of models, per layer, or none, applied "
        "where the path enters a layer from another model's",
    )
    scale_bounds: list[float] = Field([0.5, 2.0], min_length=2, max_length=2)
    embeddings_from: str | None = Field(
        None, description="dfs: the model whose embeddings, final norm and head the path uses"
    )
    sigma0: float = Field(0.2, gt=0.0)
    popsize: int | None = Field(None, ge=2, description="default: CMA-ES's 4 + 3 ln(dim)")
    generations: int = Field(10, ge=1)
    fitness: Objectives = Field(
        default_factory=lambda: {"lm": 1.0},
        description="objective (lm or TASK:VARIANT) -> weight; minimised: Σ w·bpb − Σ w·accuracy",
    )
    task_items: int = Field(64, ge=1, description="items per task objective (a seeded subsample)")
    split: Literal["valid", "train"] = "valid"
    max_docs: int | None = Field(64, ge=1, description="dev documents scored per candidate")
    max_length: int = Field(1024, ge=8)
    batch_tokens: int = Field(2048, ge=64)
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> EvolveConfig:
        if self.space == "ps" and self.method in NEEDS_BASE and self.base is None:
            raise ValueError(f"method '{self.method}' merges task vectors: it needs a base model")
        if self.space == "dfs":
            if len(set(self.models)) != len(self.models):
                raise ValueError(f"models: a model appears twice in {self.models}")
            if self.embeddings_from is not None and self.embeddings_from not in self.models:
                raise ValueError(
                    f"embeddings_from: '{self.embeddings_from}' is not one of models {self.models}"
                )
        return self

    @property
    def embeddings(self) -> str:
        """dfs: the source of the embeddings, final norm and head (default: the first)."""
        return self.embeddings_from or self.models[0]


def EvolveSection(section: Any) -> EvolveConfig | dict[str, EvolveConfig]:  # noqa: N802
    """The ``evolve:`` section: one search (``run_dir/evolve``, referred to as ``evolve``),
    or a mapping of named searches run in order (``run_dir/evolve/NAME``, referred to as
    ``evolve:NAME``; a later search may use an earlier one's result as a model, e.g. a
    data-flow search over a parameter-space merge: PS+DFS)."""
    fields = set(EvolveConfig.model_fields)
    if isinstance(section, dict) and section and not (set(section) & fields):
        return TypeAdapter(dict[str, EvolveConfig]).validate_python(section, strict=True)
    return EvolveConfig.model_validate(section, strict=True)


def evolve_searches(section) -> list[tuple[str | None, EvolveConfig]]:
    """The ``evolve:`` section's searches in order: ``[(None, cfg)]`` for one search,
    ``[(name, cfg), ...]`` for named ones."""
    if section is None:
        return []
    return [(None, section)] if isinstance(section, EvolveConfig) else list(section.items())
