"""Per-document alignment of one source onto the target (uses the ``align`` package)."""

from __future__ import annotations

import numpy as np
import torch

from align import Alignment, align_dp, align_offsets, project
from fusellm.shards import DocDist


def vocab_strings(tok, vocab_size: int) -> list[str | None]:
    """Token string of every id up to the model's vocabulary size (None: no token)."""
    inv = {i: t for t, i in tok.get_vocab().items()}
    return [inv.get(i) for i in range(vocab_size)]


def align_doc(
    src: DocDist,
    tgt: DocDist,
    id_map: np.ndarray,
    seq_method: str = "offsets",
    strict: bool = False,
    k_out: int | None = None,
    src_strings: list[str] | None = None,
    tgt_strings: list[str] | None = None,
    src_nbytes: np.ndarray | None = None,
    tgt_nbytes: np.ndarray | None = None,
) -> tuple[DocDist, Alignment]:
    """The source's distributions of one document on the target's positions and ids.

    Both ``DocDist`` come from extraction over the same text. ``src_strings`` /
    ``tgt_strings`` (canonical token strings indexed by id) are needed for ``dp`` only.
    Output rows follow :func:`align.project`; ``ce`` is the source's token CE at the
    aligned position (NaN elsewhere) and ``doc_ce`` its sequence CE.
    """
    if seq_method == "offsets":
        sb = src_nbytes[src.input_ids] if src_nbytes is not None else None
        tb = tgt_nbytes[tgt.input_ids] if tgt_nbytes is not None else None
        a = align_offsets(src.offsets, tgt.offsets, strict, sb, tb)
    else:
        a = align_dp(
            [src_strings[i] for i in src.input_ids], [tgt_strings[i] for i in tgt.input_ids]
        )
    nxt = np.append(tgt.input_ids[1:], -1).astype(np.int64)
    lps_in = src.topk_logprobs.float().numpy()
    ids, lps, aligned = project(src.topk_ids, lps_in, id_map, a.src_pos, nxt, k_out)
    ce = np.full(len(tgt.input_ids), np.nan, dtype=np.float32)
    hit = a.src_pos >= 0
    ce[hit] = src.ce[a.src_pos[hit]]
    out = DocDist(
        tgt.doc_id,
        tgt.input_ids,
        tgt.offsets,
        ids,
        torch.from_numpy(lps).to(src.topk_logprobs.dtype),
        ce,
        aligned,
        src.seq_ce,
    )
    return out, a


def byte_lengths(canon: list[bytes | None]) -> np.ndarray:
    """int64 ``[V]``: bytes each vocabulary id contributes to the text (0 for specials)."""
    from align.vocab import SPECIAL

    return np.array(
        [len(c) if c is not None and not c.startswith(SPECIAL) else 0 for c in canon],
        dtype=np.int64,
    )
