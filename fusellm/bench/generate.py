"""Greedy generation for the bench (lm-eval's ``generate_until`` and the chat tasks).

A prompt is (context ids, max new tokens, stop strings). Prompts with the same settings
and similar lengths share one ``model.generate`` call (left padding); with several ranks
each runs its share of the batches of a one-process run and every rank gets every text
(:mod:`fusellm.bench.parallel`). An ensemble decodes one prompt at a time on its members'
mean probability, with one KV cache per member. A text stops at EOS or before the first
stop string.
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from fusellm.batching import pad_batch, plan_batches
from fusellm.bench.parallel import my_share
from fusellm.bench.score import LogProbModel, pad_id
from fusellm.distributed import Rank, all_gather

Prompt = tuple[list[int], int, tuple[str, ...]]


def generation_pad(lpm: LogProbModel, tok) -> int:
    """The id left padding uses: the tokenizer's pad (else prefix) id; any valid id where
    that lies beyond some member's embedding (it is masked anyway)."""
    pad = pad_id(tok)
    return pad if 0 <= pad < min(lpm.rows) else 0


class Generator:
    """Greedy continuations of prompts by one bench model (``lpm``: a model or an ensemble)."""

    def __init__(
        self,
        lpm: LogProbModel,
        tok,
        pad: int,
        batch_tokens: int,
        rank: Rank,
        desc: str,
        eos_ids: tuple[int, ...] | None = None,
    ):
        self.lpm, self.tok, self.pad = lpm, tok, pad
        self.batch_tokens, self.rank, self.desc = batch_tokens, rank, desc
        # ids that end a text: the tokenizer's EOS, or e.g. a chat model's end of turn too
        eos = eos_ids if eos_ids is not None else (tok.eos_token_id,)
        self.eos = frozenset(i for i in eos if i is not None)

    def __call__(self, prompts: list[Prompt]) -> list[str]:
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
            for b in my_share(plan, self.rank, self.desc)
        ]
        out: list[str] = [""] * len(prompts)
        for part in all_gather(done):
            for b, texts in part:
                for i, t in zip(b, texts, strict=True):
                    out[i] = t
        return out

    def _generate(self, prompts: list[Prompt]) -> list[str]:
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
        with torch.no_grad():
            gen = model.generate(
                input_ids=ids.to(dev),
                attention_mask=mask.to(dev),
                max_new_tokens=max_new,
                do_sample=False,
                num_beams=1,
                eos_token_id=sorted(self.eos) or None,
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
            if nxt in self.eos or (
                until and any(s in self.tok.decode(out, skip_special_tokens=True) for s in until)
            ):
                break
            x = torch.tensor([[nxt]], device=dev)
        return out

    def _cut(self, new: list[int], until: tuple[str, ...]) -> str:
        """Generated ids → text before EOS and before the first stop string."""
        ends = [k for k, i in enumerate(new) if i in self.eos]
        new = new[: ends[0]] if ends else new
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
