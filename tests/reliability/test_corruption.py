"""A truncated, altered or deleted artifact is named with expected and actual sha256;
`fusellm verify` lists exactly the bad files; a rerun regenerates only those."""

from __future__ import annotations

import json
import shutil

from pipeline import reference, same_outputs, stamps

from fusellm.cli import main
from fusellm.manifest import CHECKPOINT_COMPLETE

__all__ = ["reference"]  # a fixture


def truncate(p):
    p.write_bytes(p.read_bytes()[:-50])


def alter(p):
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, same size
    p.write_bytes(bytes(data))


def delete(p):
    p.unlink()


# one damaged file per stage: (stage unit that may be rewritten to regenerate it, file, how)
DAMAGE = [
    ("corpus/", "corpus/train.jsonl", alter),
    ("extract/neox/train/shard-00002", "extract/neox/train/shard-00002.safetensors", truncate),
    ("align/neox/train/shard-00001", "align/neox/train/shard-00001.safetensors", alter),
    ("fuse/train/shard-00000", "fuse/train/shard-00000.safetensors", delete),
    ("train/model/", "train/model/model.safetensors", truncate),
    ("evolve/", "evolve/model/model.safetensors", alter),
    ("evolve/", "evolve/generations.csv", delete),
    ("bench/", "bench/cache/fused-", alter),
]


def expected_sha(run, rel: str) -> str:
    stage_dir = run / rel.split("/")[0]
    for m in stage_dir.rglob("manifest.json"):
        files = json.loads(m.read_text())["files"]
        if not (run / rel).is_relative_to(m.parent):
            continue
        key = (run / rel).relative_to(m.parent).as_posix()
        if key in files:
            return files[key]["sha256"]
    raise KeyError(rel)


def test_damaged_artifacts_are_listed_then_only_they_are_regenerated(
    reference, tmp_path, capsys, caplog
):
    recipe, ref, _ = reference
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    damaged = {}
    for unit, rel, how in DAMAGE:
        if rel.endswith("-"):  # a cache directory named after the model's identity
            rel = next(p for p in (run / "bench/cache").rglob("lm.json") if "fused-" in str(p))
            rel = rel.relative_to(run).as_posix()
        damaged[rel] = (unit, expected_sha(run, rel), how.__name__)
        how(run / rel)
    before = stamps(run)

    capsys.readouterr()
    assert main(["verify", str(run)]) == 1
    out = capsys.readouterr().out
    listed = [line for line in out.splitlines() if line.startswith(str(run))]
    assert sorted(line.split(":")[0] for line in listed) == sorted(str(run / r) for r in damaged)
    for rel, (_, sha, how) in damaged.items():
        line = next(x for x in listed if x.startswith(f"{run / rel}:"))
        if how == "delete":
            assert line == f"{run / rel}: missing (expected sha256 {sha})"
        else:
            assert f"!= expected {sha}" in line and "sha256 " in line

    with caplog.at_level("WARNING"):
        assert main(["run", str(recipe), f"run_dir={run}"]) == 0
    for rel in damaged:  # the rerun names each bad file too
        assert str(run / rel) in caplog.text, rel
    assert same_outputs(run, ref, {str(ref): str(run)})
    assert main(["verify", str(run)]) == 0
    # the train stage re-saved its model from the final checkpoint and kept its stats
    stats = json.loads((run / "train/manifest.json").read_text())["stats"]
    ref_stats = json.loads((ref / "train/manifest.json").read_text())["stats"]
    assert stats == {**ref_stats, "resaved_from_checkpoint": True}
    units = [u for u, _, _ in DAMAGE]
    bookkeeping = {"manifest.json", "fingerprint.json", "metrics.jsonl", "usage.jsonl"}
    after = stamps(run)
    rewritten = sorted(r for r, st in before.items() if after.get(r) != st)
    outside = [
        r
        for r in rewritten
        if not any(r.startswith(u) for u in units) and r.rsplit("/", 1)[-1] not in bookkeeping
    ]
    assert outside == [], f"files rewritten that were not damaged: {outside}"
    # checkpoints are resume points: the finished train stage re-saves its model from the
    # last one instead of training again
    assert not any(r.startswith("train/checkpoints/") for r in rewritten)


def test_damaged_checkpoint_is_skipped_for_an_earlier_one_and_rewritten(
    reference, tmp_path, caplog
):
    """Killed after the last checkpoint, before the final save; then a bit of that checkpoint
    rots. The resume names the file, falls back to the checkpoint before, and training again
    from there rebuilds the checkpoint and the model byte for byte."""
    recipe, ref, _ = reference
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    shutil.rmtree(run / "train/model")
    (run / "train/manifest.json").unlink()
    for s in ("evolve", "bench"):
        shutil.rmtree(run / s)
    last = run / "train/checkpoints/checkpoint-6"
    marker = json.loads((last / CHECKPOINT_COMPLETE).read_text())
    bad = last / "optimizer.pt"
    alter(bad)
    earlier = stamps(run / "train/checkpoints/checkpoint-4")

    assert main(["verify", str(run)]) == 1
    with caplog.at_level("INFO"):
        assert main(["train", str(recipe), f"run_dir={run}"]) == 0
    assert f"{bad}: sha256 " in caplog.text
    assert f"!= expected {marker['files']['optimizer.pt']['sha256']}" in caplog.text
    assert "resuming from" in caplog.text and "checkpoint-4" in caplog.text
    assert stamps(run / "train/checkpoints/checkpoint-4") == earlier
    # weights, optimizer, scheduler and RNG states equal; trainer_state.json has timings
    # and training_args.bin the output path
    new = json.loads((last / CHECKPOINT_COMPLETE).read_text())["files"]
    tensors = ["model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"]
    sha = {f: new[f]["sha256"] for f in tensors}
    assert sha == {f: marker["files"][f]["sha256"] for f in tensors}
    assert same_outputs(run / "train", ref / "train", {str(ref): str(run)})
    assert main(["verify", str(run)]) == 0


def test_a_damaged_model_without_its_final_checkpoint_is_not_silently_retrained(
    reference, tmp_path, capsys
):
    """Re-saving needs the checkpoint at the final step; anything else would retrain
    (days at 7B): refused, naming the file, and nothing is deleted."""
    recipe, ref, _ = reference
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    shutil.rmtree(run / "train/checkpoints/checkpoint-6")
    bad = run / "train/model/model.safetensors"
    truncate(bad)
    before = stamps(run)
    capsys.readouterr()
    assert main(["train", str(recipe), f"run_dir={run}"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: sha256 " in err and "no intact checkpoint at the final step 6" in err
    assert "--force" in err
    assert stamps(run) == before
