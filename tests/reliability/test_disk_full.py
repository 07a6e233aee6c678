"""A write that fails (disk full) stops the stage with an error naming the path; every
artifact completed before it stays intact and is reused."""

from __future__ import annotations

import errno
import os
import resource
import shutil
import signal
import subprocess
import sys

import pytest
from pipeline import copy_upstream, reference, same_outputs, stamps, temp_files

from fusellm.cli import main
from fusellm.storage import atomic_dir, atomic_open

__all__ = ["reference"]  # a fixture


def _small_files(limit: int):
    def set_limit():  # in the child: the kernel fails writes past `limit` bytes (EFBIG)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return set_limit


def test_a_real_failed_write_names_the_path_and_keeps_finished_work(reference, tmp_path):
    """The kernel refuses to write past 100 kB (RLIMIT_FSIZE): the first checkpoint's
    weights (166 kB) cannot be written. Shards stay valid; a rerun with room finishes."""
    recipe, ref, _ = reference
    run = tmp_path / "run"
    copy_upstream(ref, run, "train")
    before = stamps(run)
    p = subprocess.run(
        [sys.executable, "-m", "fusellm.cli", "train", str(recipe), f"run_dir={run}"],
        capture_output=True,
        text=True,
        preexec_fn=_small_files(100_000),
    )
    assert p.returncode == 2, p.stderr[-3000:]
    err = next(x for x in p.stderr.splitlines() if x.startswith("fusellm: error:"))
    assert err.startswith(f"fusellm: error: cannot write {run}/train/checkpoints/checkpoint-2")
    assert "File too large" in err or "too large" in err.lower(), err
    assert {k: v for k, v in stamps(run).items() if k in before} == before
    assert main(["verify", str(run)]) == 0
    assert main(["train", str(recipe), f"run_dir={run}"]) == 0
    assert temp_files(run) == []
    assert same_outputs(run / "train", ref / "train", {str(ref): str(run)})


@pytest.mark.parametrize("at", [1, 5])
def test_no_space_left_mid_stage_names_the_file_and_completed_shards_are_kept(
    reference, tmp_path, monkeypatch, capsys, at
):
    """ENOSPC injected at the ``at``-th flush of the fuse stage."""
    recipe, ref, _ = reference
    run = tmp_path / "run"
    copy_upstream(ref, run, "fuse")
    real_fsync, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == at:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    capsys.readouterr()
    assert main(["fuse", str(recipe), f"run_dir={run}"]) == 2
    err = capsys.readouterr().err
    assert f"fusellm: error: cannot write {run}/fuse/" in err and "No space left" in err, err
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert temp_files(run) == []
    kept = {
        r: st
        for r, st in stamps(run / "fuse").items()
        if r.endswith(".safetensors") and (run / "fuse" / (r + ".json")).exists()
    }
    assert main(["fuse", str(recipe), f"run_dir={run}"]) == 0
    after = stamps(run / "fuse")
    assert {r: after[r] for r in kept} == kept  # finished shards were not rewritten
    assert same_outputs(run / "fuse", ref / "fuse", {})


def test_a_failed_replacement_leaves_the_previous_file_and_directory_intact(tmp_path, monkeypatch):
    f, d = tmp_path / "results.json", tmp_path / "model"
    f.write_text("old")
    with atomic_dir(d) as tmp:
        (tmp / "w.bin").write_bytes(b"old weights")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match=f"cannot write {f}: No space left"):
        with atomic_open(f, "w") as out:
            out.write("new")
    with pytest.raises(OSError, match=f"cannot write {d}: No space left"):
        with atomic_dir(d) as tmp:
            (tmp / "w.bin").write_bytes(b"new weights")
    assert f.read_text() == "old" and (d / "w.bin").read_bytes() == b"old weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "results.json"]
    shutil.rmtree(d)
