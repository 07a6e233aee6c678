"""The multi-rank resume protocol: ranks never delete each other's live work, and no rank
takes a stale shard for a finished one."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

from fusellm.distributed import Rank
from fusellm.sharded import prepare_dir
from fusellm.storage import _HOST, TMP_MARK, atomic_write_json, remove_temp_files


def _shard(path, i):
    p = path / "train" / f"shard-{i:05d}.safetensors"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"x")
    (p.parent / (p.name + ".json")).write_text("{}")
    return p


def test_temp_files_of_live_writers_survive_cleanup(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        live = tmp_path / f"a.safetensors{TMP_MARK}{_HOST}-{sleeper.pid}"
        mine = tmp_path / f"b.json{TMP_MARK}{_HOST}-{__import__('os').getpid()}"
        other_host = tmp_path / f"c.json{TMP_MARK}elsewhere-1"
        for p in (live, mine, other_host):
            p.write_bytes(b"partial")
        assert remove_temp_files(tmp_path) == []
    finally:
        sleeper.kill()
        sleeper.wait()
    assert remove_temp_files(tmp_path) == [live]  # its writer is gone now
    assert mine.exists() and other_host.exists()


def test_other_ranks_wait_for_rank0_to_clear_stale_shards(tmp_path):
    old, new = {"v": 1}, {"v": 2}
    atomic_write_json(tmp_path / "fingerprint.json", old)
    s0, s1 = _shard(tmp_path, 0), _shard(tmp_path, 1)  # made from the old inputs
    done = []
    r1 = threading.Thread(
        target=lambda: done.append(prepare_dir(tmp_path, new, False, Rank(1, 2, 1), "t", 10))
    )
    r1.start()
    time.sleep(0.6)
    assert r1.is_alive() and s1.exists()  # rank 1 waits; it deletes nothing itself
    try:
        prepare_dir(tmp_path, new, False, Rank(0, 2, 0), "t")
        raise AssertionError("stale shards must be refused without --force")
    except Exception as e:  # noqa: BLE001
        assert "different inputs" in str(e)
    prepare_dir(tmp_path, new, True, Rank(0, 2, 0), "t")  # forced: rank 0 clears its own
    assert not s0.exists() and s1.exists()
    r1.join(5)
    assert done == [None] and s1.exists()  # rank 1 was not forced: it kept its shard


def test_a_rank_proceeds_at_once_when_rank0_recorded_the_same_inputs(tmp_path):
    atomic_write_json(tmp_path / "fingerprint.json", {"v": 2})
    t0 = time.monotonic()
    prepare_dir(tmp_path, {"v": 2}, False, Rank(1, 2, 1), "t", 5)
    assert time.monotonic() - t0 < 1.0
    try:
        prepare_dir(tmp_path, {"v": 3}, False, Rank(1, 2, 1), "t", 1)
        raise AssertionError("must time out")
    except TimeoutError as e:
        assert "rank 0" in str(e)
