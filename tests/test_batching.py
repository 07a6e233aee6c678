"""Length-bucketed batches and padding shared by extract, bench and evolve."""

from __future__ import annotations

import numpy as np
import torch

from fusellm.batching import pad_batch, plan_batches


def test_batches_cover_every_sequence_within_the_budget():
    lengths = np.random.default_rng(0).integers(1, 60, 200).tolist() + [150]  # one too long
    plan = plan_batches(lengths, 256, max_batch_size=8)
    assert sorted(i for b in plan for i in b) == list(range(len(lengths)))
    for b in plan:
        widest = max(lengths[i] for i in b)
        assert len(b) <= 8 and (len(b) == 1 or widest * len(b) <= 256)
        assert lengths[b[0]] == widest  # longest first
    assert plan[0] == [200]  # the too-long one alone, first
    assert plan == plan_batches(lengths, 256, max_batch_size=8)  # deterministic


def test_right_and_left_padding():
    ids, mask = pad_batch([[5, 6, 7], [8]], 0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad_batch([[5, 6, 7], [8]], 9, left=True)
    assert ids.tolist() == [[5, 6, 7], [9, 9, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ids.dtype == mask.dtype == torch.long
