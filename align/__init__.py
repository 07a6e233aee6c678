"""Vocabulary and sequence alignment between tokenizers (numpy + rapidfuzz only).

This package must not import torch or fusellm: alignment is pure string/array work that
other tools can reuse. Its contents (canonicalisation, EM/MinED vocabulary maps, offset
and DP sequence alignment, projection) arrive with the align stage (issue #4).
"""
