"""Align stage: each source's distributions on the target's positions and vocabulary.

The string/array work is in the top-level :mod:`align` package; this stage reads
extraction shards, applies it per document and writes aligned shards.
"""
