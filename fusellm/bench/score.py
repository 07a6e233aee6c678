"""Log-likelihood scoring: the pure core of ``bench``.

Every request becomes a *unit*: token ids whose last ``n`` tokens are scored, each given
everything before it in the unit. A unit's score is the summed log-prob of those tokens
(nats) and whether greedy decoding would have produced them (exact match).

- Task requests follow lm-eval: context and continuation are tokenized together, the
  continuation's tokens are what follows the context's own tokenization, trailing spaces
  of the context move to the continuation, and over-long inputs lose context on the left.
- A language-modelling document is scored in full: a prefix token (BOS, else EOS) first so
  that the first text token is predicted too; documents longer than the window are cut
  into disjoint windows, each seeing the previous window's last token.
- An ensemble averages its members' next-token *probabilities* over the full vocabulary
  (members must share a tokenizer).

Bad model input (rules for every stage in :mod:`fusellm.models`): a tokenizer with
neither BOS nor EOS cannot give the prefix, which is an error naming it (the bench
runner prefixes the model's name); a batch whose units are longer than a model's maximum
positions, or that holds a token id beyond a model's embedding rows, is refused before
its forward pass, naming the model, its maximum or the token. Padding is masked, so the
pad id (the tokenizer's, BOS or EOS) never changes a score.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fusellm.batching import pad_batch, plan_batches
from fusellm.models import (
    ModelInputError,
    check_positions,
    encode,
    max_positions,
    model_vocab_size,
)

if TYPE_CHECKING:
    from fusellm.bench.tasks import Task


@dataclass
class Unit:
    ids: list[int]
    n: int  # the last n ids are scored


def prefix_id(tok) -> int:
    """The token every scored sequence starts with: BOS, else EOS (lm-eval's choice)."""
    pid = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if pid is None:
        raise ModelInputError(
            f"tokenizer {tok.name_or_path!r} has no BOS and no EOS token, so the first token "
            "of a text has nothing to be predicted from; set bos_token (or eos_token) in its "
            "tokenizer_config.json"
        )
    return int(pid)


def pad_id(tok) -> int:
    """The id batches are padded with (masked, so it never changes a score): the
    tokenizer's pad token, else the prefix token."""
    return tok.pad_token_id if tok.pad_token_id is not None else prefix_id(tok)


def _ids(tok, text: str) -> list[int]:
    return encode(tok, [text])["input_ids"][0]


def request_unit(tok, context: str, continuation: str, max_length: int) -> Unit:
    """lm-eval's split: continuation tokens are those after the context's tokens."""
    n_sp = len(context) - len(context.rstrip(" "))
    if n_sp:
        context, continuation = context[:-n_sp], context[-n_sp:] + continuation
    whole = _ids(tok, context + continuation)
    ctx = _ids(tok, context) if context else []
    if whole[: len(ctx)] == ctx:
        cont = whole[len(ctx) :]
    else:  # a token merged across the boundary: keep the two tokenizations apart
        cont = _ids(tok, continuation)
        whole = ctx + cont
    if not cont:
        raise ValueError(f"empty continuation {continuation!r} after tokenization")
    if len(cont) >= max_length:
        raise ValueError(f"continuation of {len(cont)} tokens does not fit max_length {max_length}")
    ids = [prefix_id(tok), *whole][-max_length:]
    return Unit(ids, len(cont))


def document_units(tok, text: str, max_length: int) -> list[Unit]:
    """Disjoint windows covering every token of ``text`` (each scored exactly once)."""
    full = [prefix_id(tok), *_ids(tok, text)]
    w = max_length - 1
    return [Unit(full[s - 1 : s + w], len(full[s : s + w])) for s in range(1, len(full), w)]


def task_units(
    tok, task: Task, max_length: int, desc: str
) -> tuple[list[Unit], list[tuple[int, int]]]:
    """The units of every request of ``task`` and each unit's (item index, request index):
    an LM document may span several units, a task request is one. Errors name ``desc``."""
    units, owner = [], []
    for i, it in enumerate(task.items):
        for j, (ctx, cont) in enumerate(it.requests):
            try:
                us = (
                    document_units(tok, cont, max_length)
                    if task.kind == "lm"
                    else [request_unit(tok, ctx, cont, max_length)]
                )
            except ValueError as e:
                raise ValueError(f"{desc}: item {it.id} request {j}: {e}") from None
            units += us
            owner += [(i, j)] * len(us)
    return units, owner


def task_record(
    task: Task,
    owner: Sequence[tuple[int, int]],
    lp: np.ndarray,
    n: np.ndarray,
    greedy: np.ndarray,
) -> dict[str, Any]:
    """Per-item scores of one model on ``task`` (the records of :mod:`fusellm.bench.stats`)
    from its units' scores (:meth:`LogProbModel.score`, in :func:`task_units`' order)."""
    keys = {}  # (item, request) -> [summed log-prob, scored tokens, greedy match]
    for k, ij in enumerate(owner):
        acc = keys.setdefault(ij, [0.0, 0, True])
        acc[0] += lp[k]
        acc[1] += int(n[k])
        acc[2] = acc[2] and bool(greedy[k])
    ids = [it.id for it in task.items]
    if task.kind == "lm":
        return {
            "ids": ids,
            "group": [it.group or it.id for it in task.items],
            "domain": [it.domain for it in task.items],
            "nll": [-keys.get((i, 0), [0.0])[0] for i in range(len(ids))],
            "bytes": [len(it.requests[0][1].encode("utf-8")) for it in task.items],
            "tokens": [keys.get((i, 0), [0.0, 0])[1] for i in range(len(ids))],
        }
    per = [[keys[(i, j)] for j in range(len(it.requests))] for i, it in enumerate(task.items)]
    return {
        "ids": ids,
        "gold": [it.gold for it in task.items],
        "ll": [[a[0] for a in p] for p in per],
        "tokens": [[a[1] for a in p] for p in per],
        "chars": [[len(c) for _, c in it.requests] for it in task.items],
        "greedy": [bool(p[it.gold][2]) for p, it in zip(per, task.items, strict=True)],
    }


class LogProbModel:
    """Next-token log-probs of one causal LM, or of an ensemble sharing one tokenizer."""

    def __init__(self, models: Sequence[torch.nn.Module], names: Sequence[str] | None = None):
        self.models = list(models)
        self.names = list(names) if names is not None else [_model_name(m) for m in models]
        self.limits = [max_positions(m.config) for m in self.models]
        self.rows = [model_vocab_size(m) for m in self.models]

    def check(self, width: int, max_id: int) -> None:
        """Refuse a batch ``width`` tokens wide or holding id ``max_id`` that some member
        cannot take (before the forward pass, instead of an index error inside it)."""
        for name, limit, rows in zip(self.names, self.limits, self.rows, strict=True):
            check_positions(
                name, limit, width, "a bench window", "lower bench.max_length (or evolve's)"
            )
            if max_id >= rows:
                raise ModelInputError(
                    f"model '{name}': token id {max_id} is beyond its {rows} embedding rows: "
                    "the tokenizer does not belong to this model"
                )

    @staticmethod
    def combine(lps: list[torch.Tensor]) -> torch.Tensor:
        """Members' log-probs ``[..., V_i]`` → log of their mean probability ``[..., V]``."""
        if len(lps) == 1:
            return lps[0]
        v = min(x.shape[-1] for x in lps)  # members may pad their embeddings differently
        return torch.logsumexp(torch.stack([x[..., :v] for x in lps]), 0) - math.log(len(lps))

    @torch.no_grad()
    def logprobs(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``ids``/``mask`` int64 ``[B, T]`` → next-token log-probs float32 ``[B, T, V]``."""
        return self.combine(
            [
                m(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
                for m in self.models
            ]
        )

    @torch.no_grad()
    def score(
        self, units: Sequence[Unit], pad_id: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One forward for a batch of units → (summed log-prob float64 ``[N]``, scored token
        count int64 ``[N]``, greedy match bool ``[N]``). Only the scored rows of the logits are
        normalised (no second ``[B, T, V]`` tensor: V is 262k for Gemma)."""
        T = max(len(u.ids) for u in units)
        self.check(T, max(max(u.ids) for u in units))
        if not 0 <= pad_id < min(self.rows):  # e.g. a pad token added beyond the embedding
            pad_id = 0  # masked anyway: any valid id will do
        ids, mask = pad_batch([u.ids for u in units], pad_id)  # positions stay 0..len-1
        dev = next(self.models[0].parameters()).device
        ids, mask = ids.to(dev), mask.to(dev)
        logits = [m(input_ids=ids, attention_mask=mask).logits for m in self.models]
        lps, ns, greedy = (
            np.zeros(len(units)),
            np.zeros(len(units), np.int64),
            np.zeros(len(units), bool),
        )
        for i, u in enumerate(units):
            L = len(u.ids)
            # rows L-n-1 .. L-2 predict ids[L-n:L]
            pred = self.combine([x[i, L - 1 - u.n : L - 1].float().log_softmax(-1) for x in logits])
            tgt = torch.tensor(u.ids[L - u.n :], device=pred.device)
            lps[i] = float(pred.gather(-1, tgt[:, None]).double().sum())
            ns[i] = u.n
            greedy[i] = bool((pred.argmax(-1) == tgt).all())
        return lps, ns, greedy


def _model_name(model: torch.nn.Module) -> str:
    return str(getattr(model.config, "name_or_path", "") or type(model).__name__)


def best_device() -> str:
    """Where scoring runs: the first GPU when there is one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def batches(units: Sequence[Unit], batch_tokens: int) -> list[list[int]]:
    """Indices of ``units`` in batches of at most ``batch_tokens`` padded tokens, longest
    first (:func:`fusellm.batching.plan_batches`)."""
    return plan_batches([len(u.ids) for u in units], batch_tokens)
