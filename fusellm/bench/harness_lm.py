"""An lm-eval ``LM`` over fusellm's models and bench scoring core.

:class:`HarnessLM` answers lm-eval's three request types with the same code the other bench
tasks use, so a harness task scores a model exactly as ``lm`` and the OLMES tasks do:

- ``loglikelihood(context, continuation)``: :func:`~fusellm.bench.score.request_unit`
  (continuation tokens are those after the context's, a BOS/EOS prefix first, context cut
  on the left to ``bench.max_length``) → (summed log-prob, greedy match);
- ``loglikelihood_rolling(text)``: :func:`~fusellm.bench.score.document_units` (every token
  scored once in disjoint windows) → summed log-prob;
- ``generate_until(context, gen_kwargs)``: greedy decoding
  (:class:`~fusellm.bench.generate.Generator`) after the same prefix, ``max_gen_toks`` new
  tokens at most (default 256), stopped at EOS or the first ``until`` string and cut
  before it (lm-eval's convention); the context keeps its last ``bench.max_length -
  max_gen_toks`` tokens (as lm-eval's HF backend).

Batches are those of a one-process run; with several ranks each runs its share and all
ranks get every result (:mod:`fusellm.bench.parallel`). lm-eval itself sees one process.
"""

from __future__ import annotations

import numpy as np
from lm_eval.api.model import LM

from fusellm.bench.generate import Generator, generation_pad
from fusellm.bench.parallel import score_units
from fusellm.bench.score import LogProbModel, document_units, prefix_id, request_unit
from fusellm.distributed import Rank
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
        self.pad = generation_pad(lpm, tok)

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
        return Generator(self.lpm, self.tok, self.pad, self.batch_tokens, self.process, self.desc)(
            prompts
        )
