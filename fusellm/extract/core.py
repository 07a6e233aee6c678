"""Pure core of extraction: top-k scoring of real tokens (batches: :mod:`fusellm.batching`).

The hot path avoids the two costs that made the reference code slow and memory-bound:

* it never materialises ``log_softmax`` over ``[B, L, V]``: the output head runs over
  chunks of *real* token positions (padding is dropped before the head), and each chunk
  keeps only ``logsumexp``, the top-k logits and the gold next-token logit;
* the V-sized working set is ``head_chunk_tokens × V`` floats, independent of batch size,
  which matters for Gemma's 262k vocabulary (a full fp32 log-softmax of 4k tokens is 4 GB).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fusellm.heads import OutputHead, head_error


@dataclass
class Scored:
    """Per-sequence outputs for the real tokens of one sequence (``T`` = its length)."""

    topk_ids: torch.Tensor  # int32 [T, k]
    topk_logprobs: torch.Tensor  # float32 [T, k]
    ce: torch.Tensor  # float32 [T]; NaN at the last position


class TopKScorer:
    """Runs a causal LM and reduces its next-token distributions to top-k.

    When the model's base (``base_model``, its final hidden states) followed by its output
    head (:class:`fusellm.heads.OutputHead`) reproduces ``model(...).logits`` (checked
    once on a probe input), the head runs only over real positions, in chunks, and in
    float32 whatever the model's dtype: logits rounded to bf16 would move stored log-probs
    and CE by up to ~0.06 nats. Otherwise (a model that transforms its logits in a way the
    head does not reproduce) the model's full logits are reduced the same way, chunk by
    chunk, in their own precision.
    """

    def __init__(self, model: torch.nn.Module, k: int, head_chunk_tokens: int = 1024):
        self.model = model
        self.k = k
        self.chunk = head_chunk_tokens
        head = OutputHead.of(model)
        self.vocab_size = head.rows
        self.device = head.proj.weight.device
        self.base = getattr(model, "base_model", None)
        if k > self.vocab_size:
            raise ValueError(f"top_k {k} exceeds the vocabulary size {self.vocab_size}")
        self.split_head = self.base is not None and self.base is not model and self._probe(head)
        self.head = head.fp32() if self.split_head else None

    @torch.inference_mode()
    def _probe(self, head: OutputHead) -> bool:
        dev = head.proj.weight.device
        ids = torch.arange(1, 9, device=dev).remainder(self.vocab_size).unsqueeze(0)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        try:
            err = head_error(self.model, head, inputs, lambda x: self.base(**x).last_hidden_state)
        except Exception:
            return False
        return err <= (1e-5 if head.proj.weight.dtype == torch.float32 else 2e-2)

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[Scored]:
        """Score a right-padded batch: ``input_ids``/``attention_mask`` int ``[B, L]``.

        Returns one :class:`Scored` per row with that row's real length.
        """
        lengths = attention_mask.sum(1).tolist()
        real = attention_mask.bool()
        # Gold next token for each real position (the last real position has none).
        nxt = torch.full_like(input_ids, -1)
        nxt[:, :-1] = input_ids[:, 1:]
        nxt = torch.where(torch.roll(real, -1, 1) & real, nxt, -1)
        nxt[:, -1] = -1
        if self.split_head:
            hidden = self.base(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            flat = hidden[real]  # [N, H], real positions only
            project = self.head  # float32
        else:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
            flat = logits[real]  # [N, V]
            project = None
        gold = nxt[real]
        n = flat.shape[0]
        ids = torch.empty(n, self.k, dtype=torch.int32, device=flat.device)
        lps = torch.empty(n, self.k, dtype=torch.float32, device=flat.device)
        ce = torch.empty(n, dtype=torch.float32, device=flat.device)
        for a in range(0, n, self.chunk):
            b = min(a + self.chunk, n)
            lg = (
                project(flat[a:b].float()) if project is not None else flat[a:b]
            ).float()  # [c, V]
            lse = torch.logsumexp(lg, dim=-1)
            vals, idx = lg.topk(self.k, dim=-1)
            ids[a:b] = idx.to(torch.int32)
            lps[a:b] = vals - lse[:, None]
            g = gold[a:b]
            has = g >= 0
            ce[a:b] = torch.where(
                has, lse - lg.gather(1, g.clamp(min=0)[:, None])[:, 0], float("nan")
            )
        # One device->host copy per batch, not one per sequence (each a sync point).
        ids, lps, ce = ids.cpu(), lps.cpu(), ce.cpu()
        return [
            Scored(*parts)
            for parts in zip(ids.split(lengths), lps.split(lengths), ce.split(lengths), strict=True)
        ]
