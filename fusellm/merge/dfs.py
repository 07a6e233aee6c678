"""Merging in data-flow space (DFS), Akiba et al. 2024 ("Evolutionary Optimization of Model
Merging Recipes", Sec. 3.2): which layers of which models form the inference path, and how
the hidden state is scaled where the path moves from one model's layers to another's.

The sources' layers are laid out in sequence (all of model A's, then model B's, ...: ``M``
layers) and repeated ``r`` times: ``T = M·r`` slots. A genome is

* an indicator per slot: the slot's layer is on the path when its value is > 0 (the path
  keeps slot order, so a layer can occur up to ``r`` times);
* scales (the paper's matrix ``W``, in a reduced form): ``pairs`` — one scale per ordered
  pair of distinct source models, applied to the hidden state entering a layer of model
  ``b`` from one of model ``a`` (``S·(S−1)`` values for ``S`` sources); ``layers`` — one
  per layer of the concatenation, applied entering that layer from another model's layer
  (``M`` values: the paper's ``W_ij`` with ``i`` collapsed); ``none``.

The embeddings, final norm and output head come from one source (``embeddings_from``).
Sources must share the architecture (every config key but the layer count): layers of
different hidden sizes, head layouts or rotary settings do not compose.

A candidate is built in memory from references to the sources' layers (no weights are
copied per candidate): a skeleton of the embeddings source without its layers gets the
path's layers, each wrapped in a scaling step where the path crosses models. The best path
is saved as an ordinary ``transformers`` directory (``num_hidden_layers`` = path length) that
``AutoModelForCausalLM`` loads without remote code. Scales are folded into the weights:
with pre-norm RMSNorm layers (Llama, Mistral, Qwen2) scaling the residual stream by ``c``
before a layer equals dividing its two residual projections (``o_proj``, ``down_proj``)
by the cumulative scale and leaving the stream unscaled — the norms do not see a scale,
the output head sees none after the final norm. Exact up to RMSNorm's epsilon (a relative
1e-6 at unit-size hidden states). Other architectures (post-norms, as Gemma's) cannot
absorb a scale: ``scales: none`` there.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass

import torch
from torch import nn

# Pre-norm RMSNorm decoders whose layers add o_proj and down_proj outputs to the residual
# stream (nothing else): a scale of the stream folds into those two projections.
FOLDABLE = ("llama", "mistral", "qwen2")
SCALES = ("pairs", "layers", "none")
# config keys that may differ between sources whose layers compose: the layer count, and
# settings of how a model runs or is labelled, not of what its layers compute (the path
# takes its embeddings, head and their tying from one source; the tokenizer, and so the
# special token ids, is checked to be the same)
_FREE_KEYS = {
    "num_hidden_layers",
    "layer_types",
    "_name_or_path",
    "name_or_path",
    "transformers_version",
    "dtype",
    "torch_dtype",
    "architectures",
    "use_cache",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "torchscript",
    "_attn_implementation",
    "_attn_implementation_autoset",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "problem_type",
    "id2label",
    "label2id",
    "task_specific_params",
    "_commit_hash",
}


@dataclass(frozen=True)
class Step:
    """One layer of a path: ``layer`` of source ``model``, its input scaled by ``scale``."""

    model: str
    layer: int
    scale: float = 1.0


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's layer list of a causal LM (``model.model.layers`` in transformers)."""
    layers = getattr(getattr(model, "base_model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(
            f"evolve: {type(model).__name__} has no decoder layer list (base_model.layers): "
            "data-flow merging needs one"
        )
    return layers


def check_composable(configs: dict[str, dict]) -> None:
    """Refuse sources whose layers cannot form one path: every config key but the layer
    count must agree (hidden size, heads, rotary settings, norms, vocabulary)."""
    names = list(configs)
    first = configs[names[0]]
    for n in names[1:]:
        keys = sorted((set(first) | set(configs[n])) - _FREE_KEYS)
        bad = [k for k in keys if first.get(k) != configs[n].get(k)]
        if bad:
            k = bad[0]
            raise ValueError(
                f"evolve.models: '{n}' and '{names[0]}' differ in config.{k} "
                f"({configs[n].get(k)!r} vs {first.get(k)!r}): data-flow merging stacks layers "
                "of one architecture (the same hidden size, heads, rotary and norm settings)"
            )


class DfsGenome:
    """x ↔ path. ``x`` = ``T`` indicator values, then the scales (see the module doc)."""

    def __init__(
        self,
        layers: dict[str, int],
        repeats: int,
        scales: str,
        embeddings_from: str,
        scale_bounds: tuple[float, float] = (0.5, 2.0),
    ):
        if scales not in SCALES:
            raise ValueError(f"evolve.scales: '{scales}' is not one of {SCALES}")
        self.models = list(layers)
        self.slots = [(m, i) for m in self.models for i in range(layers[m])] * repeats
        self.M = sum(layers.values())
        starts = [0, *itertools.accumulate(layers.values())]
        self.first = dict(zip(self.models, starts, strict=False))  # a model's first slot
        self.scales = scales
        self.embeddings_from = embeddings_from
        self.scale_bounds = scale_bounds
        self.pairs = [(a, b) for a in self.models for b in self.models if a != b]
        self.n_scales = {"pairs": len(self.pairs), "layers": self.M, "none": 0}[scales]

    @property
    def dim(self) -> int:
        return len(self.slots) + self.n_scales

    def x0_bounds(self) -> tuple[list[float], tuple[list[float], list[float]]]:
        """Start at the embeddings source itself: its layers in order on the path (0.5),
        every other slot off (−0.5), every scale 1."""
        on = [
            0.5 if (m == self.embeddings_from and t < self.M) else -0.5
            for t, (m, _) in enumerate(self.slots)
        ]
        lo, hi = self.scale_bounds
        n, k = len(self.slots), self.n_scales
        return on + [1.0] * k, ([-1.0] * n + [lo] * k, [1.0] * n + [hi] * k)

    def decode(self, x) -> list[Step]:
        x = [float(v) for v in x]
        on, scale_x = x[: len(self.slots)], x[len(self.slots) :]
        steps, prev = [], self.embeddings_from
        for (m, i), v in zip(self.slots, on, strict=True):
            if v <= 0:
                continue
            s = 1.0
            if m != prev and self.scales == "pairs":
                s = scale_x[self.pairs.index((prev, m))]
            elif m != prev and self.scales == "layers":
                s = scale_x[self.first[m] + i]
            steps.append(Step(m, i, s))
            prev = m
        return steps


class Scaled(nn.Module):
    """A decoder layer whose input hidden state is multiplied by ``scale``."""

    def __init__(self, layer: nn.Module, scale: float):
        super().__init__()
        self.layer = layer
        self.scale = scale
        if hasattr(layer, "attention_type"):  # read by models with several mask kinds
            self.attention_type = layer.attention_type

    def forward(self, hidden_states, *args, **kwargs):
        return self.layer(hidden_states * self.scale, *args, **kwargs)


class PathModel:
    """Candidates of one search built in memory: a skeleton of the embeddings source (its
    embeddings, rotary tables, final norm and head; copied once, without its layers) and
    the sources' layers by reference. :meth:`build` returns the skeleton set to a path."""

    def __init__(self, sources: dict[str, nn.Module], embeddings_from: str):
        self.layers = {n: list(decoder_layers(m)) for n, m in sources.items()}
        base = sources[embeddings_from]
        own = decoder_layers(base)
        base.base_model.layers = nn.ModuleList()  # so that the copy does not copy them
        try:
            self.skeleton = copy.deepcopy(base)
        finally:
            base.base_model.layers = own

    def build(self, steps: list[Step]) -> nn.Module:
        """The skeleton with ``steps`` as its layers (no weights copied)."""
        mods = [
            self.layers[s.model][s.layer]
            if s.scale == 1.0
            else Scaled(self.layers[s.model][s.layer], s.scale)
            for s in steps
        ]
        self.skeleton.base_model.layers = nn.ModuleList(mods)
        self.skeleton.config.num_hidden_layers = len(steps)
        # Layers keep their own layer_idx (two can share one): a KV cache would mix them.
        self.skeleton.config.use_cache = False
        return self.skeleton


def path_state_dict(
    sources: dict[str, nn.Module], embeddings_from: str, steps: list[Step], fold: bool
) -> dict[str, torch.Tensor]:
    """The weights of a path as one ordinary model: the embeddings source's non-layer
    tensors and, as layer ``p``, the step's source layer; with ``fold``, its ``o_proj`` and
    ``down_proj`` divided by the cumulative scale up to and including step ``p``."""
    base = sources[embeddings_from].state_dict()
    prefix = _layers_prefix(sources[embeddings_from])
    out = {k: v for k, v in base.items() if not k.startswith(prefix)}
    c = 1.0
    for p, s in enumerate(steps):
        c *= s.scale
        layer = decoder_layers(sources[s.model])[s.layer]
        for k, v in layer.state_dict().items():
            if fold and c != 1.0 and k.split(".")[-2] in ("o_proj", "down_proj"):
                v = v / c
            out[f"{prefix}{p}.{k}"] = v.detach().clone()
    return out


def _layers_prefix(model: nn.Module) -> str:
    """``model.layers.`` (the state-dict prefix of the decoder layers)."""
    layers = decoder_layers(model)
    for name, mod in model.named_modules():
        if mod is layers:
            return f"{name}."
    raise ValueError(f"evolve: cannot find the decoder layers of {type(model).__name__}")


def path_config(config, steps: list[Step], sources_configs: dict[str, object]):
    """The embeddings source's config with the path's layer count (and per-layer lists,
    e.g. ``layer_types``, taken from each step's own source)."""
    cfg = copy.deepcopy(config)
    cfg.num_hidden_layers = len(steps)
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = [sources_configs[s.model].layer_types[s.layer] for s in steps]
    return cfg


def foldable(config) -> bool:
    return getattr(config, "model_type", None) in FOLDABLE
