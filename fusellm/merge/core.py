"""Merging state dicts through mergekit's in-memory API (the pure part of ``merge``).

mergekit does the arithmetic (``mergekit.merge_methods.api.merge_state_dicts``); this
module adds what a recipe needs around it: per-layer-group values (tensors are split into
``layer_groups`` contiguous groups of transformer layers, each merged with its own
weights/densities), seeded DARE drops, compatibility checks that explain themselves, and
the equivalent mergekit YAML.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from fusellm.merge import methods

_LAYER = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")


class MergeRefused(ValueError):
    """Models that weight merging cannot combine (the message says why)."""


def layer_of(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def group_of(name: str, num_layers: int, groups: int) -> int:
    """Layer ``i`` → group ``i·groups // num_layers``; embeddings go with the first group,
    everything else outside the layers (final norm, LM head) with the last."""
    i = layer_of(name)
    if i is not None:
        return min(i * groups // max(num_layers, 1), groups - 1)
    return 0 if "embed" in name or "wte" in name or "wpe" in name else groups - 1


def check_compatible(
    configs: Mapping[str, Any],
    tokenizers: Mapping[str, str],
    shapes: Mapping[str, Mapping[str, tuple]],
) -> None:
    """Refuse models of different architectures, tokenizers or tensor shapes."""
    names = list(configs)
    first = names[0]
    advice = (
        "weight merging needs one architecture and one vocabulary; "
        "combine heterogeneous models with fusion instead (extract → align → fuse → train)"
    )
    for n in names[1:]:
        a, b = configs[first], configs[n]
        if getattr(a, "model_type", None) != getattr(b, "model_type", None):
            raise MergeRefused(f"'{n}' is {b.model_type} but '{first}' is {a.model_type}: {advice}")
        if tokenizers[n] != tokenizers[first]:
            raise MergeRefused(f"'{n}' and '{first}' have different tokenizers: {advice}")
        sa, sb = shapes[first], shapes[n]
        if set(sa) != set(sb):
            diff = sorted(set(sa) ^ set(sb))[:3]
            raise MergeRefused(
                f"'{n}' and '{first}' have different tensors (e.g. {diff}): {advice}"
            )
        bad = [k for k in sa if sa[k] != sb[k]]
        if bad:
            raise MergeRefused(
                f"'{n}' and '{first}' differ in shape at {bad[0]} ({sb[bad[0]]} vs {sa[bad[0]]}): {advice}"
            )


def _at(v, g: int):
    return v[g] if isinstance(v, list) else v


def merge(
    states: Mapping[str, Mapping[str, torch.Tensor]],
    method: str,
    per_model: Mapping[str, Mapping[str, Any]] | None = None,
    base: str | None = None,
    shared: Mapping[str, Any] | None = None,
    layer_groups: int = 1,
    num_layers: int = 1,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Merge ``states`` (name → state dict, the base among them when given) with mergekit's
    ``method``.

    ``per_model``: non-base model → its parameters (``weight``, ``density``, ...), each a
    scalar or one value per layer group; ``shared``: merge-wide parameters, likewise.
    Returns a new state dict in ``dtype`` (float tensors), in the first state's key order.
    """
    try:
        from mergekit.merge_methods.api import merge_state_dicts
    except ImportError as e:
        raise ValueError(f"merging needs mergekit: pip install -e '.[merge]' ({e})") from None

    per_model, shared = per_model or {}, shared or {}
    first = next(iter(states.values()))
    names = list(first)
    # Tied weights (embed_tokens / lm_head) are one tensor under two keys: merge it once,
    # under its first key (embeddings: the first layer group), and alias the others.
    alias: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for n in names:
        t = first[n]
        key = (t.data_ptr(), t.shape, t.stride()) if t.numel() else (id(t),)
        if key in seen and t.numel():
            alias[n] = seen[key]
        else:
            seen[key] = n
    by_group: dict[int, list[str]] = {}
    for n in names:
        if n not in alias:
            by_group.setdefault(group_of(n, num_layers, layer_groups), []).append(n)
    out: dict[str, torch.Tensor] = {}
    gen = torch.Generator().manual_seed(seed)
    for g, keys in sorted(by_group.items()):
        # mergekit's form: a per-model parameter is a mapping model → value
        params: dict[str, Any] = {k: _at(v, g) for k, v in shared.items()}
        for m, p in per_model.items():
            for k, v in p.items():
                params.setdefault(k, {})[m] = _at(v, g)
        for k, given in params.items():  # mergekit wants a value for every model, or none
            if isinstance(given, dict) and len(given) < len(per_model):
                default = methods.get(method).per_model[k].default
                params[k] = {m: given.get(m, default) for m in per_model}
        sub = {m: {k: sd[k] for k in keys} for m, sd in states.items()}
        # Random drops (DARE, DELLA) come from torch's global generator: seed it per group
        # so that a merge is a function of its config (CMA-ES compares candidates, resumes
        # reproduce).
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
        with torch.no_grad():
            res = merge_state_dicts(sub, method, parameters=params, base=base, dtype=torch.float32)
        for k, v in res.items():
            out[k] = v.to(dtype) if v.is_floating_point() else v
    return {k: out[alias.get(k, k)] for k in names}


def mergekit_yaml(
    method: str,
    models: Mapping[str, dict[str, Any]],
    base_path: str | None,
    paths: Mapping[str, str],
    extra: Mapping[str, Any],
    dtype: str,
) -> str:
    """The merge as a mergekit config (``mergekit-yaml`` reproduces it; list values are a
    mergekit *gradient*, interpolated over layers, where fusellm uses piecewise groups)."""
    import yaml

    doc: dict[str, Any] = {
        "merge_method": method,
        "models": [{"model": paths[m], "parameters": p} for m, p in models.items()],
        "dtype": dtype,
    }
    if base_path:
        doc["base_model"] = base_path
    if extra:
        doc["parameters"] = dict(extra)
    return yaml.safe_dump(doc, sort_keys=False)
