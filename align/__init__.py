"""Vocabulary and sequence alignment between tokenizers (numpy + rapidfuzz only).

This package imports neither torch nor fusellm: alignment is pure string/array work.

* :mod:`align.vocab`: canonical token bytes for byte-level BPE, SentencePiece (with byte
  fallback), WordPiece, added-token and plain vocabularies; EM, MinED and next-token
  vocabulary maps, cached.
* :mod:`align.sequence`: byte spans of tokens over their text, byte-exact context
  alignment, and the paper's MinED DTW.
* :mod:`align.project`: source top-k -> target positions and ids (duplicates merged,
  one-hot fallback on the gold next token).
"""

from align.project import merge_topk, project
from align.sequence import (
    Alignment,
    Spans,
    align_dp,
    align_spans,
    byte_spans,
    context_keys,
    match_keys,
)
from align.vocab import (
    Vocab,
    canonicalize,
    detect_kind,
    exact_map,
    min_ed_map,
    next_token_map,
    vocab_map,
)

__all__ = [
    "Alignment",
    "Spans",
    "Vocab",
    "align_dp",
    "align_spans",
    "byte_spans",
    "canonicalize",
    "context_keys",
    "match_keys",
    "detect_kind",
    "exact_map",
    "merge_topk",
    "min_ed_map",
    "next_token_map",
    "project",
    "vocab_map",
]
