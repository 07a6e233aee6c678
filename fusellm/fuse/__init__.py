"""Fuse stage: combine the aligned distributions of several sources per sequence or token."""
