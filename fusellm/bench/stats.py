"""Metrics from per-item scores, with bootstrap standard errors and paired differences.

Every metric is a ratio of sums over items, ``Σ num / Σ den``: bits per byte is
``Σ NLL / (ln 2 · Σ UTF-8 bytes)`` over documents; accuracy is ``Σ correct / Σ 1``. The
same resampled item sets serve every model, so a difference from the reference model
comes with a paired 95% interval; one that contains 0 is *within noise*.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np

HIGHER_IS_BETTER = {
    "bpb": False,
    "ppl": False,
    "acc_raw": True,
    "acc_per_char": True,
    "acc_per_token": True,
    "em": True,
}


def item_metrics(
    kind: str, rec: dict[str, Any]
) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]:
    """``{(group, metric): (num [N], den [N])}`` from one model's records of one task."""
    if kind == "lm":
        # Chunks cut from one document are not independent: sum them per document, which
        # is the unit the bootstrap resamples.
        groups = rec.get("group") or rec["ids"]
        order = list(dict.fromkeys(groups))
        at = {g: i for i, g in enumerate(order)}
        idx = np.array([at[g] for g in groups], dtype=np.int64)
        nll = np.bincount(idx, weights=np.asarray(rec["nll"], float), minlength=len(order))
        nbytes = np.bincount(idx, weights=np.asarray(rec["bytes"], float), minlength=len(order))
        dom_of = dict(zip(groups, rec["domain"], strict=True))
        domains = np.asarray([dom_of[g] for g in order])
        out = {}
        for g in ["all", *sorted(set(domains.tolist()))]:
            sel = np.ones(len(nll), bool) if g == "all" else domains == g
            out[(g, "bpb")] = (nll[sel] / math.log(2), nbytes[sel])
        return out
    if kind == "harness":
        # lm-eval metrics as logged per item (see fusellm.bench.harness.item_values); the
        # tasks of a group also get their own rows
        groups = np.asarray(rec["group"])
        order = list(dict.fromkeys(rec["group"]))
        out = {}
        for g in ["all", *(order if len(order) > 1 else [])]:
            sel = np.ones(len(groups), bool) if g == "all" else groups == g
            for m in rec["num"]:
                out[(g, m)] = (
                    np.asarray(rec["num"][m], float)[sel],
                    np.asarray(rec["den"][m], float)[sel],
                )
        return out
    if kind in ("em", "chat"):  # greedy continuation = the answer / final number = the answer
        ok = np.asarray(rec["greedy"], float)
        return {("all", "em"): (ok, np.ones_like(ok))}
    gold = np.asarray(rec["gold"])
    out = {}
    for metric, norm in (("acc_raw", None), ("acc_per_char", "chars"), ("acc_per_token", "tokens")):
        pick = np.array(
            [
                int(np.argmax(np.asarray(ll) / (np.asarray(d) if norm else 1)))
                for ll, d in zip(rec["ll"], rec[norm] if norm else rec["ll"], strict=True)
            ]
        )
        ok = (pick == gold).astype(float)
        out[("all", metric)] = (ok, np.ones_like(ok))
    return out


def perplexity(rec: dict[str, Any], group: str = "all") -> float:
    """Token perplexity ``exp(Σ NLL / Σ tokens)``: comparable only between models that share
    a tokenizer (bits per byte is the cross-tokenizer measure)."""
    nll, tok = np.asarray(rec["nll"]), np.asarray(rec["tokens"], float)
    if group != "all":
        sel = np.asarray(rec["domain"]) == group
        nll, tok = nll[sel], tok[sel]
    return float(math.exp(nll.sum() / max(tok.sum(), 1.0)))


def resamples(key: str, n: int, count: int) -> np.ndarray:
    """int64 ``[count, n]`` bootstrap item indices, the same for every model of a metric."""
    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    return np.random.default_rng(seed).integers(0, n, size=(count, n))


def _ratios(num: np.ndarray, den: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return num[idx].sum(1) / np.maximum(den[idx].sum(1), 1e-12)


def compare(
    per_model: dict[str, tuple[np.ndarray, np.ndarray]], reference: str, key: str, count: int
) -> dict[str, dict[str, float]]:
    """Value, bootstrap SE and paired difference from ``reference`` for each model.

    ``per_model``: ``{model: (num [N], den [N])}`` over the same N items in the same order.
    """
    n = len(next(iter(per_model.values()))[0])
    idx = resamples(key, n, count) if n else np.zeros((count, 0), np.int64)
    boots = {m: _ratios(num, den, idx) for m, (num, den) in per_model.items()}
    out = {}
    for m, (num, den) in per_model.items():
        value = float(num.sum() / max(den.sum(), 1e-12))
        # One unit (e.g. every chunk from a single document) says nothing about noise.
        row = {"value": value, "se": float(boots[m].std(ddof=1)) if n > 1 else None, "n": n}
        if m != reference and reference in boots:
            d = boots[m] - boots[reference]
            ref = per_model[reference]
            row["diff"] = value - float(ref[0].sum() / max(ref[1].sum(), 1e-12))
            if n > 1:
                row["diff_lo"], row["diff_hi"] = (float(x) for x in np.percentile(d, [2.5, 97.5]))
            row["significant"] = n > 1 and not (row["diff_lo"] <= 0.0 <= row["diff_hi"])
        out[m] = row
    return out
