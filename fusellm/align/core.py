"""Per-document alignment of one source onto the target, and the tokenizer side of the
vocabulary map (what a tokenizer emits for given bytes), over the ``align`` package."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch

from align import (
    Alignment,
    Spans,
    Vocab,
    align_dp,
    align_spans,
    byte_spans,
    canonicalize,
    match_keys,
    project,
)
from align.sequence import char_to_byte
from align.vocab import ROLES, is_text
from fusellm.fuse.core import cumulative_nll
from fusellm.models import encode
from fusellm.shards import DocDist

# Texts put before a query so that it starts after a hard boundary (a line break), as a
# token inside running text does; the second is for queries that merge with the first.
_PREFIXES = ("\n", ".")


def vocab_strings(tok, vocab_size: int) -> list[str | None]:
    """Token string of every id up to the model's vocabulary size (None: no token)."""
    inv = {i: t for t, i in tok.get_vocab().items()}
    return [inv.get(i) for i in range(vocab_size)]


def tokenizer_vocab(tok, vocab_size: int) -> Vocab:
    """A tokenizer's :class:`~align.Vocab` over the model's ``vocab_size`` rows: specials
    by role, added tokens as literal text, and for bytes several ids share, the id the
    tokenizer emits for them."""
    strings = vocab_strings(tok, vocab_size)
    special = set(tok.all_special_ids)
    added = {i for i, a in tok.added_tokens_decoder.items() if not a.special} - special
    roles: dict[int, str] = {}
    for role in reversed(ROLES):  # the first role wins for an id holding several
        i = getattr(tok, f"{role}_token_id", None)
        if isinstance(i, int) and 0 <= i < vocab_size:
            roles[i] = role
    canon = canonicalize(strings, special, added=added, roles=roles)
    groups: dict[bytes, list[int]] = defaultdict(list)
    for j, c in enumerate(canon):
        if is_text(c):
            groups[c].append(j)
    shared = [c for c, js in groups.items() if len(js) > 1]
    first = first_tokens(tok, canon, shared) if shared else []
    emitted = {c: int(j) for c, j in zip(shared, first, strict=True) if j >= 0 and canon[j] == c}
    return Vocab(strings, canon, emitted)


def first_tokens(tok, canon: Sequence[bytes | None], queries: Sequence[bytes | None]) -> np.ndarray:
    """int64 ``[len(queries)]``: the id ``tok`` emits first for each query's bytes inside
    running text (-1 where that cannot be told).

    A query is encoded after a prefix that ends at a hard boundary (``\\n``, else ``.``):
    where the prefix's own tokens come out unchanged, the next token is the query's first.
    It must stand for the start of the query's bytes (``canon``: the canonical bytes of
    ``tok``'s ids), which rules out
    normalised text, unknown tokens and tokens merged across the prefix. Bytes that are
    not UTF-8 on their own (a piece of a character) cannot be encoded: -1.
    """
    out = np.full(len(queries), -1, dtype=np.int64)
    texts: dict[int, str] = {}
    for n, q in enumerate(queries):
        if is_text(q):
            try:
                texts[n] = q.decode("utf-8")
            except UnicodeDecodeError:
                pass
    todo = list(texts)
    for prefix in _PREFIXES:
        if not todo:
            break
        head = encode(tok, [prefix])["input_ids"][0]
        ids = encode(tok, [prefix + texts[n] for n in todo])["input_ids"]
        left = []
        for n, seq in zip(todo, ids, strict=True):
            j = seq[len(head)] if len(seq) > len(head) and seq[: len(head)] == head else -1
            c = canon[j] if 0 <= j < len(canon) else None
            if is_text(c) and queries[n].startswith(c):
                out[n] = j
            else:
                left.append(n)
        todo = left
    return out


def align_doc(
    src: DocDist,
    tgt: DocDist,
    text: str,
    id_map: np.ndarray,
    src_vocab: Vocab,
    tgt_vocab: Vocab,
    seq_method: str = "offsets",
    strict: bool = False,
    k_out: int | None = None,
    gold_span_on: bool = True,
) -> tuple[DocDist, Alignment, float]:
    """The source's distributions of one document on the target's positions and ids.

    Both ``DocDist`` come from extraction over ``text``. Output rows follow
    :func:`align.project`; ``ce`` is the source's token CE at the aligned position (NaN
    elsewhere), ``doc_ce`` its sequence CE over its own tokens (the paper's criterion),
    ``cum_nll`` the source's NLL of the text from its first prediction up to the target
    position's context end (NaN where not aligned: differences between two aligned
    positions are the source's NLL of the bytes between them), ``byte_end`` where each
    target context ends. Also returns the probability mass lost to unmapped ids.
    """
    ss = byte_spans(text, [src_vocab.canon[i] for i in src.input_ids], src.offsets)
    ts = byte_spans(text, [tgt_vocab.canon[i] for i in tgt.input_ids], tgt.offsets)
    if seq_method == "offsets":
        a = align_spans(ss, ts, strict)
    else:
        strings = [_latin1(src_vocab, src.input_ids), _latin1(tgt_vocab, tgt.input_ids)]
        a = align_dp(*strings, ss, ts)
    out, lost = _projected(src, tgt, ss, ts, a.src_pos, id_map, k_out, gold_span_on, src.seq_ce)
    return out, a, lost


def _projected(
    src: DocDist,
    tgt: DocDist,
    ss: Spans,
    ts: Spans,
    src_pos: np.ndarray,
    id_map: np.ndarray,
    k_out: int | None,
    gold_span_on: bool,
    doc_ce: float,
) -> tuple[DocDist, float]:
    """The source's rows at the target positions ``src_pos`` names (see :func:`align_doc`),
    and the probability mass lost to unmapped ids."""
    nxt = np.append(tgt.input_ids[1:], -1).astype(np.int64)
    lps_in = src.topk_logprobs.float().numpy()
    src_cum = cumulative_nll(src.ce, ss.end - ss.start)
    gold = gold_span(src, ss, ts, src_pos, src_cum) if gold_span_on else (None, None)
    ids, lps, aligned, lost = project(src.topk_ids, lps_in, id_map, src_pos, nxt, k_out, *gold)
    hit = src_pos >= 0
    ce = np.full(len(tgt.input_ids), np.nan, dtype=np.float32)
    ce[hit] = src.ce[src_pos[hit]]
    cum = np.full(len(tgt.input_ids), np.nan, dtype=np.float32)
    cum[hit] = src_cum[src_pos[hit]]
    out = DocDist(
        tgt.doc_id,
        tgt.input_ids,
        tgt.offsets,
        ids,
        torch.from_numpy(lps).to(src.topk_logprobs.dtype),
        ce,
        aligned,
        doc_ce,
        cum,
        ts.end.astype(np.int32),
        tgt.labels,
    )
    return out, float(lost[hit].sum())


def response_coordinates(
    text: str, spans: Sequence[tuple[int, int]], sp: Spans
) -> tuple[Spans, np.ndarray]:
    """A rendering's token spans in *response coordinates*, and each position's key.

    ``text``: one model's rendering of a conversation; ``spans``: its responses' character
    spans (:func:`fusellm.chat.render`); ``sp``: its tokens' byte spans over ``text``.
    A coordinate counts response bytes only (the bytes of earlier responses, then the
    offset into this one), so it is the same in every rendering of the conversation. A
    response token (verified, non-empty, inside the response) keeps its width there; every
    other token gets width 0 at the coordinate reached so far (it adds no bytes, and
    :func:`cumulative_nll` scores no prediction of it).

    Keys (int64 ``[T]``, -1: none): a position whose context ends at response byte ``c``
    after a response token gets ``2·c``; the position just before a response (a template
    token ending where the response starts) gets ``2·c + 1``, so the end of one response
    and the start of the next never share a key, and keys increase along the rendering
    (as :func:`align.match_keys` needs). Nothing else is keyed: a template or prompt
    context never receives a distribution.
    """
    cb = char_to_byte(text)
    n = len(sp)
    start, end = np.zeros(n, np.int64), np.full(n, -1, np.int64)
    key = np.full(n, -1, np.int64)
    done = 0  # response bytes before this response
    for a, b in spans:
        bs, be = int(cb[a]), int(cb[b])
        body = sp.verified & (sp.start >= bs) & (sp.end <= be) & (sp.end > sp.start)
        start[body] = done + sp.start[body] - bs
        end[body] = done + sp.end[body] - bs
        key[body] = 2 * end[body]
        before = np.flatnonzero(sp.verified & (sp.end == bs) & (sp.start < bs))
        if len(before):
            p = before[-1]
            start[p] = end[p] = done
            key[p] = 2 * done + 1
        done += be - bs
    # every other token: zero width where the last response token before it ended
    reached = np.maximum.accumulate(np.where(end >= 0, end, 0)) if n else end
    unset = end < 0
    start[unset] = end[unset] = reached[unset]
    body_w = (end - start) > 0
    return Spans(start, end, sp.verified & (body_w | (key >= 0))), key


def align_chat_doc(
    src: DocDist,
    tgt: DocDist,
    src_text: tuple[str, Sequence[tuple[int, int]]],
    tgt_text: tuple[str, Sequence[tuple[int, int]]],
    id_map: np.ndarray,
    src_vocab: Vocab,
    tgt_vocab: Vocab,
    k_out: int | None = None,
    gold_span_on: bool = True,
) -> tuple[DocDist, Alignment, float]:
    """:func:`align_doc` for a conversation, which each model extracted over its own
    rendering: ``src_text``/``tgt_text`` = (rendering, response character spans). A
    source distribution lands at the target position whose context ends at the same
    byte of the same response (:func:`response_coordinates`); template and prompt
    positions get none. ``byte_end`` and ``cum_nll`` are in response coordinates, so the
    per-byte criterion compares the sources on response bytes only."""
    (s_txt, s_spans), (t_txt, t_spans) = src_text, tgt_text
    ss0 = byte_spans(s_txt, [src_vocab.canon[i] for i in src.input_ids], src.offsets)
    ts0 = byte_spans(t_txt, [tgt_vocab.canon[i] for i in tgt.input_ids], tgt.offsets)
    ss, s_key = response_coordinates(s_txt, s_spans, ss0)
    ts, t_key = response_coordinates(t_txt, t_spans, ts0)
    src_pos = match_keys(s_key, t_key)
    a = Alignment(src_pos, np.zeros(len(t_key), np.int8), ts.end.copy())
    # the source's sequence CE over its predictions of response tokens
    response = (ss.end - ss.start > 0)[1:]
    doc_ce = float(np.nanmean(src.ce[:-1][response])) if response.any() else float("nan")
    out, lost = _projected(src, tgt, ss, ts, src_pos, id_map, k_out, gold_span_on, doc_ce)
    return out, a, lost


def gold_span(
    src: DocDist, ss: Spans, ts: Spans, src_pos: np.ndarray, src_cum: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The source's next token at each aligned target position, and the log-probability
    the source gives the text of the *target's* next token there (see
    :func:`align.project`): int64 / float64 ``[T]``.

    Both next tokens start where the two contexts end. If the source's reaches at least
    as far, the target tokenizer writes the start of that text as its own next token:
    the source's probability of its token goes there (``-ce``). If it is shorter (``'``
    of ``'d``), the target token's probability is the product of the source's
    probabilities of the tokens that spell it (the chain rule over its CE), known where
    the target token ends at a source context end; elsewhere NaN (the mass is dropped).
    A zero-width next token on one side only (EOS) is left to the vocabulary map (-1).
    """
    T, S = len(src_pos), len(src.input_ids)
    nxt = np.full(T, -1, dtype=np.int64)
    lp = np.full(T, np.nan)
    j = np.flatnonzero((src_pos >= 0) & (src_pos + 1 < S) & (np.arange(T) + 1 < T))
    if not len(j):
        return nxt, lp
    i = src_pos[j]
    s_w = ss.end[i + 1] - ss.end[i]
    t_w = ts.end[j + 1] - ts.end[j]
    s_reach, t_reach = ss.end[i + 1], ts.end[j + 1]
    both = (s_w > 0) == (t_w > 0)
    nxt[j[both]] = src.input_ids[i[both] + 1]
    far = both & (s_reach >= t_reach)
    lp[j[far]] = -src.ce[i[far]].astype(np.float64)
    short = both & ~far
    i2 = src_pos[j[short] + 1]  # where the target's next token ends, in the source
    known = i2 >= 0
    lp[j[short][known]] = -(src_cum[i2[known]] - src_cum[i[short][known]])
    return nxt, lp


def _latin1(vocab: Vocab, ids: np.ndarray) -> list[str]:
    """Canonical token strings (bytes as Latin-1) for the DP's edit distances."""
    return [c.decode("latin-1") if is_text(c := vocab.canon[i]) else "" for i in ids]
