"""The ``merge:`` and ``evolve:`` recipe sections."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

from fusellm.merge import methods
from fusellm.merge.fitness import Objectives

Value = float | int | bool | str | list[float] | None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class MergeInput(BaseModel):
    """One merged model and its per-model parameters (``weight``, ``density``, ``gamma``,
    ``epsilon``, ... as the method declares them; a list gives one value per layer group,
    see ``layer_groups``). ``weight`` defaults to 1 for methods that need one."""

    model_config = ConfigDict(extra="allow", strict=True)
    model: str = Field(description="a name in models:, or target / fused / clm_only / merge:NAME")

    @property
    def params(self) -> dict[str, Value]:
        return dict(self.model_extra or {})


class MergeSpec(_Strict):
    """One merge: any method of mergekit's registry (:mod:`fusellm.merge.methods`) over
    ``models``, relative to ``base`` where the method takes one, via mergekit's in-memory
    API. Parameters are checked against the method's own declaration at load.

    Formulas of the common ones (δ_i = θ_i − θ_base): linear θ = Σ w_i θ_i / Σ w_i;
    task_arithmetic θ = θ_base + λ Σ w_i δ_i; ties keeps the top-``density`` |δ_i| entries,
    elects a sign per entry and averages the agreeing ones; dare_* drop entries at random
    with probability 1 − density and rescale the rest; slerp interpolates two models on
    the sphere at ``t``; sce (FuseChat 2.0) selects the entries of highest variance across
    the task vectors, weights them by their squared magnitude and keeps the elected sign.
    """

    method: str
    base: str | None = Field(None, description="base model (methods with a base)")
    models: list[MergeInput] = Field(min_length=1)
    parameters: dict[str, Value] = Field(
        default_factory=dict, description="merge-wide parameters (normalize, lambda, t, ...)"
    )
    layer_groups: int = Field(1, ge=1, description="contiguous layer groups for list values")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    seed: int = Field(0, description="seeds random drops (dare_*, della*)")

    def inputs(self) -> list[tuple[str, dict[str, Value]]]:
        """(model, per-model parameters) in order, with ``weight`` 1 where the method has a
        per-model weight and none is given."""
        m = methods.get(self.method)
        default = {"weight": 1.0} if "weight" in m.per_model else {}
        return [(i.model, {**default, **i.params}) for i in self.models]

    @model_validator(mode="after")
    def _check(self) -> MergeSpec:
        inputs = self.inputs()
        m = methods.check(self.method, self.base, inputs, self.parameters, self.layer_groups)
        for i, (_, p) in enumerate(inputs):
            d = p.get("density", 1.0)
            if any(not 0.0 < x <= 1.0 for x in (d if isinstance(d, list) else [d])):
                raise ValueError(f"models.{i}.density: must be in (0, 1], got {d}")
        spec = m.shared.get("normalize")
        normalize = self.parameters.get("normalize", spec.default if spec else None)
        if self.method == "linear" and normalize is not False:
            weights = [p["weight"] for _, p in inputs]
            for g in range(self.layer_groups):
                total = sum(w[g] if isinstance(w, list) else w for w in weights)
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
    method: str = Field("ties", description="ps: a mergekit method with per-model weights")
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
        if self.space == "ps":
            if "weight" not in methods.get(self.method).per_model:
                ok = sorted(n for n, x in methods.registry().items() if "weight" in x.per_model)
                raise ValueError(
                    f"method: '{self.method}' has no per-model weight to search; "
                    f"methods that have one: {ok}"
                )
            methods.check(self.method, self.base, [(n, {"weight": 1.0}) for n in self.models], {})
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
