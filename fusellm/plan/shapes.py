"""Model shapes without weights: a recipe model's config, read where it is, and the model
instantiated from it on the meta device (no memory, no weights) to count its parameters
exactly and measure its layers.

Where the config comes from: a local directory's ``config.json``; for a GGUF model the
directory fusellm converted it into, else the GGUF header (transformers reads it through
the ``gguf`` package without the tensors); for a hub id the HF cache or the hub at the
pinned commit; failing that, for the paper's three models, the bundled copy of their
public config (:mod:`fusellm.plan.bundled`), which the plan then says it used.
"""

from __future__ import annotations

import json
from pathlib import Path

from fusellm.models import PARTS_PREFIX, ModelLoadError, converted_dir, locate, max_positions
from fusellm.packages import resolve_pkg_path
from fusellm.plan.bundled import BUNDLED_CONFIGS
from fusellm.plan.core import ModelShape
from fusellm.recipe import ModelSpec, Recipe


def model_shapes(recipe: Recipe) -> dict[str, ModelShape]:
    """The shape of every model of the recipe; :class:`ModelLoadError` naming the model
    whose shape cannot be built."""
    out = {}
    for name in recipe.all_models:
        spec = recipe.models[name]
        cfg, where = model_config(spec, name)
        try:
            out[name] = shape_of(cfg, where, spec.trust_remote_code)
        except Exception as e:
            raise ModelLoadError(
                f"model '{name}': cannot build its shapes from {where}: {e}"
            ) from e
    return out


def model_config(spec: ModelSpec, name: str):
    """(config, where it came from) for a recipe model; :class:`ModelLoadError` naming
    the model when no config can be found."""
    from transformers import AutoConfig

    trust = spec.trust_remote_code
    if not spec.path.startswith(PARTS_PREFIX):
        try:
            path = resolve_pkg_path(spec.path)
        except (ImportError, FileNotFoundError, ValueError) as e:
            raise ModelLoadError(
                f"model '{name}': cannot resolve path '{spec.path}': {e}"
            ) from None
        if spec.gguf_file:
            path = path / spec.gguf_file
        if path.is_dir():  # (locate() would hash the weights: not needed to plan)
            return _load(AutoConfig.from_pretrained, name, str(path), trust), f"{path}/config.json"
    try:
        loc = locate(spec, name)
    except ModelLoadError:
        if spec.path in BUNDLED_CONFIGS:
            return _bundled(spec.path), "bundled public config.json (hub unreachable)"
        raise
    if loc.kind == "gguf":
        conv = converted_dir(loc, "model")
        if (conv / "config.json").exists():
            return _load(AutoConfig.from_pretrained, name, str(conv), trust), f"{conv}/config.json"
        gguf = Path(loc.location)
        cfg = _load(
            lambda src, **kw: AutoConfig.from_pretrained(src, gguf_file=gguf.name, **kw),
            name,
            str(gguf.parent),
            trust,
        )
        return cfg, f"GGUF header of {gguf.name}"
    try:
        cfg = AutoConfig.from_pretrained(
            loc.location, revision=loc.revision, trust_remote_code=trust
        )
    except Exception as e:
        if spec.path in BUNDLED_CONFIGS:
            return _bundled(spec.path), "bundled public config.json (hub unreachable)"
        raise ModelLoadError(f"model '{name}': cannot read the config of '{spec.path}': {e}") from e
    return cfg, f"{spec.path}@{loc.revision[:12]} config.json"


def _load(fn, name: str, src: str, trust: bool):
    try:
        return fn(src, trust_remote_code=trust)
    except Exception as e:
        raise ModelLoadError(f"model '{name}': cannot read its config from {src}: {e}") from e


def _bundled(hub_id: str):
    from transformers import AutoConfig

    d = dict(BUNDLED_CONFIGS[hub_id])
    return AutoConfig.for_model(d.pop("model_type"), **d)


def shape_of(cfg, config_from: str, trust_remote_code: bool = False) -> ModelShape:
    """The shapes of the causal LM ``cfg`` describes, measured on a meta-device instance."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    hidden = int(text.hidden_size)
    heads = int(text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    layer = _first_layer(model, int(text.num_hidden_layers))
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    widest = max(
        (m.out_features for m in layer.modules() if isinstance(m, torch.nn.Linear)), default=hidden
    )
    gated = any("gate" in n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear))
    intermediate = int(getattr(text, "intermediate_size", None) or widest)
    norm_width, rms_width = _norm_widths(layer, hidden, heads, _kv_heads(text, heads), head_dim)
    state = model.state_dict()
    header = {
        k: {"dtype": "F32", "shape": list(v.shape), "data_offsets": [0, v.numel() * 4]}
        for k, v in state.items()
    }
    limit = max_positions(cfg)
    return ModelShape(
        params=sum(p.numel() for p in model.parameters()),
        hidden=hidden,
        layers=int(text.num_hidden_layers),
        heads=heads,
        kv_heads=_kv_heads(text, heads),
        head_dim=head_dim,
        intermediate=intermediate,
        gated=gated,
        vocab_rows=int(out_emb.weight.shape[0]),
        tied=out_emb.weight is in_emb.weight,
        largest_layer_params=max(
            sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()
        ),
        linear_params=sum(m.weight.numel() for m in linear),
        norm_width=norm_width,
        rms_norm_width=rms_width,
        weights_header=8
        + len(json.dumps({"__metadata__": {"format": "pt"}, **header}, separators=(",", ":"))),
        config_bytes=len(cfg.to_json_string()),
        max_positions=limit[0] if limit else None,
        config_from=config_from,
    )


def _kv_heads(text, heads: int) -> int:
    return int(getattr(text, "num_key_value_heads", None) or heads)


def _first_layer(model, n_layers: int):
    """The first decoder layer: the first module list of ``num_hidden_layers`` entries."""
    import torch

    for m in model.modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) == n_layers:
            return m[0]
    raise ValueError(f"{type(model).__name__}: no list of {n_layers} decoder layers found")


def _norm_widths(layer, hidden: int, heads: int, kv_heads: int, head_dim: int) -> tuple[int, int]:
    """(Σ widths of a layer's norms per token, Σ of those that are RMSNorms computing in
    float32). Q/K norms are per head: their width is all heads' (or KV heads')."""
    total = rms = 0
    for name, m in layer.named_modules():
        cls = type(m).__name__
        if not cls.endswith(("Norm", "LayerNorm", "RMSNorm")) or name == "":
            continue
        leaf = name.rsplit(".", 1)[-1]
        width = (
            heads * head_dim
            if leaf.startswith("q_")
            else kv_heads * head_dim
            if leaf.startswith("k_")
            else hidden
        )
        total += width
        if "RMS" in cls:
            rms += width
    return total, rms
