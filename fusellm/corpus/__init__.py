"""Corpus stage: documents with stable ids, split by id hash, cut to fit every model's block."""
