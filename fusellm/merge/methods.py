"""mergekit's merge methods by name, and the checks a recipe's merge gets before any model
is loaded.

Every method in mergekit's registry (``mergekit.merge_methods.registered_methods()``; 20
in mergekit 0.1.5: linear, task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs,
breadcrumbs_ties, della, della_linear, sce, slerp, nuslerp, multislerp, karcher,
model_stock, nearswap, arcee_fusion, ram, ramplus_tl, passthrough) declares its
parameters (name, type, default, shared or per model) and its inputs (whether a base model
is required, optional, forbidden or ignored; how many models). A merge in a recipe is
checked against that declaration, so that a misspelt or missing parameter, a missing
base or a wrong number of models fails at load, naming the field, instead of minutes
into the merge. mergekit is imported on first use (it is the optional ``merge`` extra).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Value = float | int | bool | str | list[float] | None


@dataclass(frozen=True)
class Method:
    """One mergekit method's declaration, as fusellm checks it."""

    name: str
    base: str  # "required" | "optional" | "forbidden" | "ignored"
    min_inputs: int
    max_inputs: int | None
    min_non_base: int | None
    max_non_base: int | None
    shared: Mapping[str, Any]  # name -> mergekit ParameterSpec
    per_model: Mapping[str, Any]

    def uses_base(self) -> bool:
        return self.base in ("required", "optional")


@functools.cache
def registry() -> dict[str, Method]:
    """Name -> :class:`Method` for every method mergekit registers."""
    try:
        from mergekit.merge_methods import registered_methods
    except ImportError as e:
        raise ValueError(f"merging needs mergekit: pip install -e '.[merge]' ({e})") from None
    out = {}
    for m in registered_methods():
        s, c = m.spec, m.spec.contract
        out[s.name] = Method(
            name=s.name,
            base=c.base.value,
            min_inputs=c.min_inputs,
            max_inputs=c.max_inputs,
            min_non_base=c.min_non_base,
            max_non_base=c.max_non_base,
            shared={p.name: p for p in s.shared_parameters},
            per_model={p.name: p for p in s.input_parameters},
        )
    return out


def get(name: str) -> Method:
    methods = registry()
    if name not in methods:
        raise ValueError(f"'{name}' is not a mergekit merge method; known: {sorted(methods)}")
    return methods[name]


def _check_value(spec, value: Value, groups: int, where: str) -> None:
    values = value if isinstance(value, list) else [value]
    if isinstance(value, list) and len(value) != groups:
        raise ValueError(f"{where}: {len(value)} values for layer_groups={groups}")
    for v in values:
        try:
            spec.validate(v)
        except Exception as e:  # pydantic's ValidationError: keep its first line only
            raise ValueError(
                f"{where}: {v!r} is not a valid {spec.value_type!r} ({str(e).splitlines()[-1]})"
            ) from None
        if isinstance(v, bool) and spec.value_type is not bool:
            raise ValueError(f"{where}: {v!r} is a boolean; the parameter is a number")


def check(
    method: str,
    base: str | None,
    models: Sequence[tuple[str, Mapping[str, Value]]],
    shared: Mapping[str, Value],
    groups: int = 1,
) -> Method:
    """Check a merge against ``method``'s declaration; raise ``ValueError`` naming the
    recipe field (``base``, ``models.I.NAME``, ``parameters.NAME``) otherwise.

    ``models``: (model name, its per-model parameters) for the non-base models;
    ``shared``: the merge-wide parameters; ``groups``: the number of layer groups a list
    value must have.
    """
    m = get(method)
    if m.base == "required" and base is None:
        raise ValueError(f"base: method '{method}' needs a base model")
    if m.base in ("forbidden", "ignored") and base is not None:
        raise ValueError(f"base: method '{method}' takes no base model (got '{base}')")
    n_inputs = len(models) + (1 if base is not None else 0)
    for what, n, lo, hi in (
        ("models (with the base)", n_inputs, m.min_inputs, m.max_inputs),
        ("models (besides the base)", len(models), m.min_non_base, m.max_non_base),
    ):
        if (lo is not None and n < lo) or (hi is not None and n > hi):
            want = (
                f"exactly {lo}"
                if lo == hi
                else f"at least {lo or 0}" + (f" and at most {hi}" if hi is not None else "")
            )
            raise ValueError(f"models: method '{method}' merges {want} {what}, got {n}")
    for i, (name, params) in enumerate(models):
        for key, value in params.items():
            where = f"models.{i}.{key}"
            if key not in m.per_model:
                hint = (
                    " (a merge-wide parameter: set it under parameters:)" if key in m.shared else ""
                )
                raise ValueError(
                    f"{where}: method '{method}' has no per-model parameter '{key}'{hint}; "
                    f"it has {sorted(m.per_model) or 'none'}"
                )
            _check_value(m.per_model[key], value, groups, where)
        missing = [k for k, p in m.per_model.items() if p.required and k not in params]
        if missing:
            raise ValueError(f"models.{i}: method '{method}' needs {missing} for '{name}'")
    for key, value in shared.items():
        if key not in m.shared:
            hint = " (a per-model parameter: set it on each model)" if key in m.per_model else ""
            raise ValueError(
                f"parameters.{key}: method '{method}' has no merge-wide parameter '{key}'{hint}; "
                f"it has {sorted(m.shared) or 'none'}"
            )
        _check_value(m.shared[key], value, groups, f"parameters.{key}")
    missing = [k for k, p in m.shared.items() if p.required and k not in shared]
    if missing:
        raise ValueError(f"parameters: method '{method}' needs {missing}")
    return m
