"""The FuseLLM training objective on sparse top-k targets (Wan et al. 2024, Eq. 4-5).

    L = λ · L_CLM + (1 − λ) · L_fusion,    L_fusion = −Σ_t Σ_v p_fused(v | t) log q_θ(v | t)

The fused distribution is stored as its top-k entries, so the fusion term gathers the
student's log-probabilities at those k ids: ``[B, T, k]`` extra memory, never a dense
``[B, T, V]`` target. Both terms gather from the student's log-softmax, which the CLM
term computes anyway.

For large vocabularies even the student's ``[B, T, V]`` logits are too big (15 GB in fp32
at B·T = 4,096 and V = 262,144, three times over with backward):
:func:`chunked_fusion_loss_sums` applies the output head and the same loss to chunks of
positions, recomputing each chunk's logits in backward, so at most one chunk's logits
exist at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint


class GatherLogSoftmax(torch.autograd.Function):
    """``log_softmax(x, -1).gather(-1, idx)`` with a lean backward.

    Autograd's own ``gather`` backward is ``new_zeros`` + an out-of-place ``scatter_add``
    (two ``[B, T, V]`` tensors) before the log-softmax backward (a third). Here the
    gradient ``scatter(g) − softmax(x) · Σ g`` is built in place in the tensor holding
    ``softmax(x)``: one V-sized allocation in backward, fewer than the plain CLM
    cross-entropy needs.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(x, dim=-1)
        ctx.save_for_backward(logp, idx)
        return logp.gather(-1, idx)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logp, idx = ctx.saved_tensors
        g = torch.exp(logp).mul_(-grad.sum(-1, keepdim=True))  # −softmax · Σ g
        return g.scatter_add_(-1, idx, grad), None


@dataclass
class LossSums:
    """Token *sums* of the loss terms (divide by the valid-token count of the window)."""

    total: torch.Tensor
    clm: torch.Tensor
    fusion: torch.Tensor
    n_clm: torch.Tensor  # tokens in the CLM term
    n_fusion: torch.Tensor  # tokens with a fused (non-fallback) distribution


def fusion_loss_sums(
    logits: torch.Tensor,
    shift_labels: torch.Tensor,
    fused_ids: torch.Tensor,
    fused_logprobs: torch.Tensor,
    fused_mask: torch.Tensor,
    lm_weight: float = 0.9,
    temperature: float = 1.0,
    tail: str = "renormalize",
    kind: str = "ce",
) -> LossSums:
    """Sums of ``λ·CE(gold next token) + (1−λ)·H(p_fused, q)`` over valid positions.

    Args:
        logits: ``[B, T, V]`` student logits (any float dtype; reduced in fp32).
        shift_labels: int ``[B, T]`` gold *next* token per position, -100 = ignore.
        fused_ids: int ``[B, T, k]`` target vocabulary ids of the fused top-k.
        fused_logprobs: float ``[B, T, k]`` their log-probs, ``-inf`` for padding entries.
        fused_mask: bool ``[B, T]`` positions whose fused row is a real distribution
            (elsewhere, e.g. unaligned positions, only the CLM term applies).
        temperature: teacher temperature τ (``p ∝ exp(logp / τ)``; with ``tail: bucket``
            only τ = 1 keeps the stored tail mass meaningful).
        tail: ``renormalize`` the k entries to sum to 1, or keep the tail ``1 − Σp`` as one
            bucket matched against the student's mass outside the k ids.
        kind: ``ce`` (cross-entropy) or ``kl`` (CE minus the teacher's entropy; same
            gradient, a loss that reaches 0).
    """
    valid = shift_labels != -100
    # The student's log-softmax is what the CLM cross-entropy computes anyway (one fused
    # kernel forward and backward); both terms gather from it, so the fusion term adds
    # only [B, T, k] tensors.
    # One gather of [gold, k fused ids] from the log-softmax, with a backward that
    # allocates a single V-sized tensor (see GatherLogSoftmax).
    idx = torch.cat([shift_labels.clamp(min=0).unsqueeze(-1), fused_ids.long()], dim=-1)
    picked = GatherLogSoftmax.apply(logits.float(), idx)  # [B, T, 1 + k]
    nll = -picked[..., 0]  # [B, T]
    logq = picked[..., 1:]  # [B, T, k]
    clm = torch.where(valid, nll, 0.0).sum()
    use = fused_mask & valid
    lp = fused_logprobs.float()
    # -inf marks padding entries; a NaN or +inf is a fault upstream and must reach the
    # loss (which then stops training) rather than pass for padding.
    live = lp != -torch.inf
    if tail == "renormalize":
        p = torch.softmax(torch.where(live, lp / temperature, -torch.inf), dim=-1)
        p = torch.where(live.any(-1, keepdim=True), p, 0.0)  # rows with no entry at all
        tail_term = torch.zeros_like(nll)
        tail_ent = torch.zeros_like(nll)
    elif tail == "bucket":
        p = torch.where(live, torch.exp(lp / temperature), 0.0)
        r = (1.0 - p.sum(-1)).clamp(min=0.0)  # teacher mass outside the k ids
        q_in = torch.where(live, logq.exp(), 0.0).sum(-1)
        log_q_tail = torch.log1p(-q_in.clamp(max=1.0 - 1e-6))
        tail_term = -r * log_q_tail
        tail_ent = -torch.where(r > 0, r * torch.log(r.clamp(min=1e-30)), 0.0)
    else:
        raise ValueError(f"unknown tail handling '{tail}' (renormalize, bucket)")
    # Unused rows (padding, unaligned positions) out of the product: 0 · NaN in a row the
    # loss drops would still be NaN in the gradient.
    p = torch.where(use[..., None], p, 0.0)
    ce = -(p * torch.where(live, logq, 0.0)).sum(-1) + tail_term  # [B, T]
    if kind == "kl":
        ent = -(p * torch.where(p > 0, torch.log(p.clamp(min=1e-30)), 0.0)).sum(-1) + tail_ent
        ce = ce - ent
    elif kind != "ce":
        raise ValueError(f"unknown fusion loss '{kind}' (ce, kl)")
    fusion = torch.where(use, ce, 0.0).sum()
    # Positions without a fused distribution count in the fusion term as CLM (the fused
    # target there is the gold one-hot), so λ only reweights where fusion has information.
    fallback = torch.where(valid & ~fused_mask, nll, 0.0).sum()
    total = lm_weight * clm + (1.0 - lm_weight) * (fusion + fallback)
    return LossSums(total, clm, fusion + fallback, valid.sum(), use.sum())


def chunked_fusion_loss_sums(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    shift_labels: torch.Tensor,
    fused_ids: torch.Tensor,
    fused_logprobs: torch.Tensor,
    fused_mask: torch.Tensor,
    chunk_tokens: int,
    **kw,
) -> LossSums:
    """:func:`fusion_loss_sums` of ``head(hidden)``, without ever holding the logits of
    more than ``chunk_tokens`` positions.

    Args:
        hidden: ``[B, T, H]`` the student's final hidden states (any float dtype).
        head: ``[n, H] -> [n, V]`` logits exactly as the model computes them
            (:class:`fusellm.heads.OutputHead`); called as a module, so DeepSpeed ZeRO-3
            gathers its weight for each call like any other layer's.
        chunk_tokens: positions per chunk.
        shift_labels, fused_ids, fused_logprobs, fused_mask, **kw: as for
            :func:`fusion_loss_sums`.

    Every position is projected, labelled or not: the number of head calls is the same on
    every rank of a launch (under DeepSpeed ZeRO-3 each call gathers the head's weight, a
    collective that all ranks must enter alike). Each chunk runs under activation
    checkpointing: its logits are freed after its loss is summed and recomputed in
    backward, one chunk at a time (one more head matmul per chunk than the unchunked loss,
    none of its ``[B, T, V]`` buffers). The sums equal the unchunked ones up to float
    summation order.
    """
    valid = shift_labels != -100
    h = hidden.flatten(0, 1)  # [B·T, H]
    rows = [x.flatten(0, 1) for x in (shift_labels, fused_ids, fused_logprobs, fused_mask)]

    def chunk(h_c, labels, ids, lps, mask):
        s = fusion_loss_sums(head(h_c)[None], labels[None], ids[None], lps[None], mask[None], **kw)
        return torch.stack([s.total, s.clm, s.fusion])

    parts = [
        checkpoint(
            chunk,
            h[a : a + chunk_tokens],
            *(r[a : a + chunk_tokens] for r in rows),
            use_reentrant=False,
            preserve_rng_state=False,  # the head has no dropout
        )
        for a in range(0, h.shape[0], chunk_tokens)
    ]
    total, clm, fusion = torch.stack(parts).sum(0)
    n_fusion = (fused_mask & valid).sum()
    return LossSums(total, clm, fusion, valid.sum(), n_fusion)
