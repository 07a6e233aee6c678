"""Vocabulary and sequence alignment between tokenizers (numpy + rapidfuzz only).

This package imports neither torch nor fusellm: alignment is pure string/array work.

* :mod:`align.vocab`: canonical token bytes for byte-level BPE, SentencePiece (with byte
  fallback), WordPiece and plain vocabularies; EM and MinED vocabulary maps, cached.
* :mod:`align.sequence`: offset-based O(S+T) alignment and the paper's MinED DTW.
* :mod:`align.project`: source top-k -> target positions and ids (duplicates merged,
  one-hot fallback on the gold next token).
"""

from align.project import merge_topk, project
from align.sequence import Alignment, align_dp, align_offsets
from align.vocab import canonicalize, detect_kind, exact_map, min_ed_map, vocab_map

__all__ = [
    "Alignment",
    "align_dp",
    "align_offsets",
    "canonicalize",
    "detect_kind",
    "exact_map",
    "merge_topk",
    "min_ed_map",
    "project",
    "vocab_map",
]
