"""An lm-eval ``LM`` over fusellm's models and bench scoring core.

:class:`HarnessLM` answers lm-eval's three request types with the same code the other bench
tasks use, so a harness task scores a model exactly as ``lm`` and the OLMES tasks do:

- ``loglikelihood(context, continuation)``: :func:`~fusellm.bench.score.request_unit`
  (continuation tokens are those after the context's, a BOS/EOS prefix first, context cut
  on the left to ``bench.max_length``) → (summed log-prob, greedy match);
- ``loglikelihood_rolling(text)``: :func:`~fusellm.bench.score.document_units` (every token
  scored once in disjoint windows) → summed log-prob;
- ``generate_until(context, gen_kwargs)``: greedy decoding with a KV cache after the same
  prefix, ``max_gen_toks`` new tokens at most (default 256), stopped at EOS or the first
  ``until`` string and cut before it (lm-eval's convention); the context keeps its last
  ``bench.max_length - max_gen_toks`` tokens (as lm-eval's HF backend). A single model
  decodes batches with ``model.generate``; an ensemble decodes one request at a time on
  its members' mean probability (with one KV cache per member).

Batches are those of a one-process run; with several ranks each runs its share and all
ranks get every result (:mod:`fusellm.bench.parallel`). lm-eval itself sees one process.
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from typing import Any

import numpy as np
import torch
from lm_eval.api.model import LM
from transformers import StoppingCriteria, StoppingCriteriaList

from fusellm.batching import pad_batch, plan_batches
from fusellm.bench.parallel import my_share, score_units
from fusellm.bench.score import LogProbModel, document_units, prefix_id, request_unit
from fusellm.distributed import Rank, all_gather
from fusellm.models import encode

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's HF backend's default


class HarnessLM(LM):
    """lm-eval's view of one bench model (``lpm``: a model or a same-tokenizer ensemble)."""

    def __init__(
        self,
        lpm: LogProbModel,
        tok,
        max_length: int,
        batch_tokens: int,
        rank: Rank | None = None,
        desc: str = "bench",
    ):
        super().__init__()
        self.lpm, self.tok = lpm, tok
        self.max_length, self.batch_tokens = max_length, batch_tokens
        self.process = rank or Rank(0, 1, 0)  # not `rank`: lm-eval must see one process
        self.desc = desc
        pad = tok.pad_token_id if tok.pad_token_id is not None else prefix_id(tok)
        # a pad id beyond some member's embedding: masked anyway, any valid id will do
        self.pad = pad if 0 <= pad < min(lpm.rows) else 0

    def _each(self, requests, fn) -> list:
        """``fn(*request.args)`` for every request; bad input names the task and document."""
        out = []
        for r in requests:
            try:
                out.append(fn(*r.args))
            except ValueError as e:
                raise ValueError(f"{self.desc}: {r.task_name} doc {r.doc_id}: {e}") from None
        return out

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        units = self._each(
            requests, lambda ctx, cont: request_unit(self.tok, ctx, cont, self.max_length)
        )
        lp, _, greedy = score_units(
            self.lpm, units, self.pad, self.batch_tokens, self.process, self.desc
        )
        return [(float(a), bool(g)) for a, g in zip(lp, greedy, strict=True)]

    def loglikelihood_rolling(self, requests) -> list[float]:
        per = self._each(requests, lambda text: document_units(self.tok, text, self.max_length))
        units = [u for us in per for u in us]
        owner = np.repeat(np.arange(len(per)), [len(us) for us in per])
        lp, _, _ = score_units(
            self.lpm, units, self.pad, self.batch_tokens, self.process, self.desc
        )
        total = np.zeros(len(requests))
        np.add.at(total, owner, lp)
        return [float(x) for x in total]

    def _prompt(self, ctx: str, kw: dict | None) -> tuple[list[int], int, tuple[str, ...]]:
        """A generation request as (context ids, max new tokens, stop strings)."""
        kw = dict(kw or {})
        if kw.get("do_sample"):
            raise ValueError("do_sample is set; bench decodes greedily")
        until = kw.get("until") or []
        until = [s for s in ([until] if isinstance(until, str) else until) if s]
        max_new = int(kw.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
        if max_new >= self.max_length:
            raise ValueError(
                f"max_gen_toks {max_new} leaves no room for the context in bench.max_length "
                f"{self.max_length} (raise it, or lower bench.harness.max_gen_toks)"
            )
        ids = [prefix_id(self.tok), *encode(self.tok, [ctx])["input_ids"][0]]
        return ids[-(self.max_length - max_new) :], max_new, tuple(until)

    def generate_until(self, requests) -> list[str]:
        prompts = self._each(requests, self._prompt)
        if prompts:
            self.lpm.check(max(len(p[0]) + p[1] for p in prompts), max(max(p[0]) for p in prompts))
        # one generate call per batch: requests with the same settings, similar lengths
        same = defaultdict(list)
        for i, (_, max_new, until) in enumerate(prompts):
            same[(max_new, until)].append(i)
        plan = [
            [group[k] for k in b]
            for group in same.values()
            for b in plan_batches(
                [len(prompts[i][0]) + prompts[i][1] for i in group], self.batch_tokens, len(group)
            )
        ]
        done = [
            (b, self._generate([prompts[i] for i in b]))
            for b in my_share(plan, self.process, self.desc)
        ]
        out: list[str] = [""] * len(prompts)
        for part in all_gather(done):
            for b, texts in part:
                for i, t in zip(b, texts, strict=True):
                    out[i] = t
        return out

    def _generate(self, prompts: list[tuple[list[int], int, tuple[str, ...]]]) -> list[str]:
        """Greedy continuations of prompts sharing ``max_new`` and ``until``."""
        _, max_new, until = prompts[0]
        if len(self.lpm.models) > 1:
            return [
                self._cut(self._greedy_ensemble(ids, max_new, until), until) for ids, *_ in prompts
            ]
        model = self.lpm.models[0]
        dev = next(model.parameters()).device
        # left padding: generation continues at column T for every prompt
        ids, mask = pad_batch([p for p, _, _ in prompts], self.pad, left=True)
        T = ids.shape[1]
        eos = self.tok.eos_token_id
        with torch.no_grad():
            gen = model.generate(
                input_ids=ids.to(dev),
                attention_mask=mask.to(dev),
                max_new_tokens=max_new,
                do_sample=False,
                num_beams=1,
                eos_token_id=eos,
                pad_token_id=self.pad,
                stopping_criteria=StoppingCriteriaList([_Until(self.tok, T, until)])
                if until
                else None,
            )
        return [self._cut(row[T:].tolist(), until) for row in gen]

    @torch.no_grad()
    def _greedy_ensemble(self, ids: list[int], max_new: int, until: tuple[str, ...]) -> list[int]:
        """Greedy tokens from the members' mean next-token probability (batch of one, so
        each member's positions follow from its own KV cache)."""
        dev = next(self.lpm.models[0].parameters()).device
        x = torch.tensor([ids], device=dev)
        # transformers renamed `past_key_values` (argument and output) to `cache` in 5.x
        names = [
            "cache" if "cache" in inspect.signature(m.forward).parameters else "past_key_values"
            for m in self.lpm.models
        ]
        caches: list[Any] = [None] * len(self.lpm.models)
        out: list[int] = []
        for _ in range(max_new):
            res = [
                m(input_ids=x, use_cache=True, **{k: c})
                for m, k, c in zip(self.lpm.models, names, caches, strict=True)
            ]
            caches = [getattr(r, k) for r, k in zip(res, names, strict=True)]
            nxt = int(
                self.lpm.combine([r.logits[0, -1].float().log_softmax(-1) for r in res]).argmax()
            )
            out.append(nxt)
            if nxt == self.tok.eos_token_id or (
                until and any(s in self.tok.decode(out, skip_special_tokens=True) for s in until)
            ):
                break
            x = torch.tensor([[nxt]], device=dev)
        return out

    def _cut(self, new: list[int], until: tuple[str, ...]) -> str:
        """Generated ids → text before EOS and before the first stop string."""
        eos = self.tok.eos_token_id
        if eos is not None and eos in new:
            new = new[: new.index(eos)]
        text = self.tok.decode(new, skip_special_tokens=True)
        for s in until:
            text = text.split(s)[0]
        return text


class _Until(StoppingCriteria):
    """Stop a row once its generated text (from position ``start``) holds a stop string."""

    def __init__(self, tok, start: int, until: tuple[str, ...]):
        self.tok, self.start, self.until = tok, start, until

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        texts = self.tok.batch_decode(input_ids[:, self.start :], skip_special_tokens=True)
        return torch.tensor(
            [any(s in t for s in self.until) for t in texts], device=input_ids.device
        )
