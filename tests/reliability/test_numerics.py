"""A NaN/Inf in the loss or a gradient stops training before the optimizer step, naming the
step and the micro-batch; nothing after the last good checkpoint is kept as done."""

from __future__ import annotations

import json

import numpy as np
from pipeline import copy_upstream, reference

from fusellm.cli import main
from fusellm.shards import decode_shard, encode_shard, write_shard

__all__ = ["reference"]  # a fixture


def test_a_nan_in_the_fused_targets_stops_training_naming_step_and_batch(
    reference, tmp_path, capsys
):
    """A fused shard whose numbers are NaN but whose sha256 is consistent (bad numerics
    upstream, not a damaged file): training must stop at the first step that reads it."""
    recipe, ref, _ = reference
    run = tmp_path / "run"
    copy_upstream(ref, run, "train")
    for shard in sorted((run / "fuse/train").glob("shard-*.safetensors"))[8:]:
        docs, meta = decode_shard(shard.read_bytes())
        for d in docs:
            d.topk_logprobs[:] = np.nan
        sc = json.loads((shard.with_name(shard.name + ".json")).read_text())
        data = encode_shard(docs, int(meta["vocab_size"]), meta)
        write_shard(shard, data, sc["docs"], sc["tokens"])

    capsys.readouterr()
    # a checkpoint every step: the ones before the poisoned step must stay, none after
    assert main(["train", str(recipe), f"run_dir={run}", "train.save_steps=1"]) == 2
    err = capsys.readouterr().err
    assert "fusellm: error: non-finite loss (nan) at step " in err, err
    assert "micro-batch 0 of the accumulation window; no optimizer step was taken" in err
    step = int(err.split(" at step ")[1].split(",")[0])
    ckpts = sorted(
        int(p.name.split("-")[1]) for p in (run / "train/checkpoints").glob("checkpoint-*")
    )
    print(f"stopped at step {step}; checkpoints {ckpts}")
    assert ckpts == list(range(1, step)) and ckpts, (
        ckpts,
        step,
    )  # no checkpoint of a poisoned step
    assert not (run / "train/manifest.json").exists() and not (run / "train/model").exists()
