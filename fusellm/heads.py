"""A causal LM's output head, applied apart from the rest of the model.

Extraction and the chunked training loss apply the output layer themselves to chunks of
positions, so that ``[B, T, V]`` logits never exist at once. The head is the model's output
embedding plus what its forward does to the logits after it: Gemma's final-logit
soft-capping (``c·tanh(z / c)``), Cohere's ``logit_scale``, Granite's ``1 / logits_scaling``.
Whether it reproduces ``model(...).logits`` is checked on the real model
(:func:`head_error`) before anything relies on it, so a model that post-processes its
logits in another way is refused (or, in extraction, scored from its full logits), never
trained or stored wrong.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class OutputHead:
    """``logits = softcap(scale · proj(hidden))``, as the model's forward computes them."""

    proj: torch.nn.Module  # the output embedding (an nn.Linear, possibly tied)
    scale: float = 1.0
    softcap: float | None = None

    @classmethod
    def of(cls, model: torch.nn.Module) -> OutputHead:
        """The head of ``model`` (a DDP/DeepSpeed wrapper is looked through)."""
        m = getattr(model, "module", model)
        cfg = m.config.get_text_config() if hasattr(m.config, "get_text_config") else m.config
        scale = float(getattr(cfg, "logit_scale", None) or 1.0)
        if getattr(cfg, "logits_scaling", None):
            scale /= float(cfg.logits_scaling)
        return cls(m.get_output_embeddings(), scale, getattr(cfg, "final_logit_softcapping", None))

    @property
    def rows(self) -> int:
        """Output rows (the vocabulary size), also of a ZeRO-3-partitioned weight."""
        w = self.proj.weight
        return int(getattr(w, "ds_shape", w.shape)[0])

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` ``[..., H]`` -> logits ``[..., V]`` in the head's compute dtype."""
        logits = self.proj(hidden)
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def fp32(self) -> OutputHead:
        """A float32 copy for inference: logits of bf16/fp16 models are then not rounded to
        8 (or 11) mantissa bits before the log-softmax (bf16 logits of magnitude ~16 are
        off by up to 0.06). Costs ``V × H`` floats once."""
        w = self.proj.weight
        if w.dtype == torch.float32:
            return self
        bias = getattr(self.proj, "bias", None)
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")
        lin.weight = torch.nn.Parameter(w.detach().float(), requires_grad=False)
        if bias is not None:
            lin.bias = torch.nn.Parameter(bias.detach().float(), requires_grad=False)
        return OutputHead(lin, self.scale, self.softcap)


def last_hidden(outputs) -> torch.Tensor:
    """The final (normed) hidden states ``[B, T, H]`` of a forward called with
    ``output_hidden_states=True``."""
    return outputs.hidden_states[-1]


def no_logits(input_ids: torch.Tensor) -> torch.Tensor:
    """A ``logits_to_keep`` value that keeps no position (bool ``[B, T]``, all False): the
    model runs its body and returns ``[0, V]`` logits, so the head costs nothing there."""
    return torch.zeros(input_ids.shape, dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def head_error(model: torch.nn.Module, head: OutputHead, inputs: dict, hidden_fn) -> float:
    """Largest difference of ``head(hidden_fn(inputs))`` from ``model(**inputs).logits``,
    relative to the largest logit (~1e-7 in fp32 where the head reproduces the model).
    ``hidden_fn`` runs the model's body to its final hidden states ``[B, T, H]``."""
    full = model(**inputs).logits.float()
    split = head(hidden_fn(inputs)).float()
    if full.shape != split.shape:
        return float("inf")
    return float((full - split).abs().max() / full.abs().max().clamp(min=1e-6))
