"""Crash-safe file writes and content hashes.

Every artifact is written to a temporary name in its final directory, flushed, fsynced
and renamed: a reader sees either the complete old file or the complete new one, never a
torn one, and a killed writer leaves only a ``*.tmp-*`` file that the next run removes.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

TMP_MARK = ".tmp-"


class WriteFailed(OSError):
    """A write that failed (disk full, quota, file size limit, permissions); the message
    names the destination path."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


# Temp names carry host and pid, so that a process cleaning up after killed writers can
# tell them from live ones (other ranks writing into the same directory right now).
_HOST = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())[:64]


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temp file beside ``path``; on success fsync + rename onto ``path``.

    On any exception the temp file is removed and ``path`` is untouched. ``OSError``
    (disk full, permissions) is re-raised with the destination path in the message.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}{TMP_MARK}{_HOST}-{os.getpid()}")
    try:
        with write_failure_names(path):
            with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise


@contextlib.contextmanager
def write_failure_names(path: str | os.PathLike) -> Iterator[None]:
    """Re-raise a failed write inside the block as ``OSError`` naming ``path``: torch.save
    and safetensors report a full disk as RuntimeError / SafetensorError with the OS error
    only in their text, and no path."""
    try:
        yield
    except OSError as e:
        if isinstance(e, WriteFailed):
            raise
        raise WriteFailed(e.errno, f"cannot write {path}: {e.strerror or e}") from e
    except Exception as e:
        text = str(e).lower()
        if any(s in text for s in _IO_FAILURES):
            raise WriteFailed(errno.EIO, f"cannot write {path}: {e}") from e
        raise


_IO_FAILURES = ("no space left", "file too large", "disk quota", "write failed", "ioerror")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """A temp directory beside ``path`` to fill (e.g. by ``save_pretrained``); on success it
    replaces ``path``. A failed or killed writer never leaves a half-written ``path``, and
    an earlier complete directory stays until the new one is whole. Write failures are
    raised as ``OSError`` naming ``path``. Single-writer only (the temp name has the pid).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}{TMP_MARK}{_HOST}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with write_failure_names(path):
            yield tmp
            for p in tmp.rglob("*"):
                if p.is_file():
                    with open(p, "rb") as f:
                        os.fsync(f.fileno())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.with_name(f"{path.name}.old{TMP_MARK}{_HOST}-{os.getpid()}")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def _unlink(p: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        p.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(
        path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode()
    )


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _writer_dead(p: Path) -> bool:
    """Whether the process that named temp file ``p`` is gone. Only decidable on its own
    host: another host's temp files are left alone (readers never look at them)."""
    host, _, pid = p.name.rpartition(TMP_MARK)[2].rpartition("-")
    if not pid.isdigit():
        return True  # not a name atomic_open makes: a stray leftover
    if host and host != _HOST:
        return False
    if int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, owned by someone else
        return False
    return False


def remove_temp_files(directory: str | os.PathLike) -> list[Path]:
    """Delete leftovers of killed writers under ``directory``; returns what was removed.

    Temp files of live processes (other ranks writing now) are kept."""
    directory = Path(directory)
    if not directory.exists():
        return []
    gone = [p for p in directory.rglob(f"*{TMP_MARK}*") if _writer_dead(p)]
    for p in gone:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            _unlink(p)
    return gone


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_record(path: str | os.PathLike) -> dict[str, Any]:
    """What a written file must still be: sha256, size and modification time."""
    st = os.stat(path)
    return {"sha256": sha256_file(path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def record_problem(path: str | os.PathLike, rec: dict[str, Any], full: bool = False) -> str | None:
    """Why ``path`` no longer matches ``rec`` (see :func:`file_record`), or None.

    Unless ``full``, a file with the recorded size and mtime is trusted without reading
    it: a rerun of a finished 7B pipeline would otherwise re-hash hundreds of GB. Any
    rewrite, truncation or copy without timestamps changes one of them and gets the full
    sha256 comparison; silent bit rot is what ``fusellm verify`` (``full``) is for.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return f"{path}: missing (expected sha256 {rec['sha256']})"
    if not full and st.st_size == rec.get("bytes") and st.st_mtime_ns == rec.get("mtime_ns"):
        return None
    actual = sha256_file(path)
    if actual != rec["sha256"]:
        return f"{path}: sha256 {actual} != expected {rec['sha256']} (truncated or altered)"
    return None


def cache_root() -> Path:
    """Where fusellm keeps what it computes once per machine (``$FUSELLM_CACHE``, default
    ``~/.cache/fusellm``): converted models and tokenizers, memoised hashes."""
    return Path(os.environ.get("FUSELLM_CACHE", "~/.cache/fusellm")).expanduser()


def cached_sha256(path: str | os.PathLike) -> str:
    """sha256 of a (large) file, memoised under the cache by path, inode, size, mtime and
    ctime (a file copied over it with its times kept still gets a new ctime): a model's
    weights or a corpus input are hashed once, not on every run that checks them."""
    path = Path(path)
    st = path.stat()
    key = f"{path.resolve()}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}"
    memo = cache_root() / "sha256" / hashlib.sha256(key.encode()).hexdigest()[:32]
    if memo.exists():
        return memo.read_text().strip()
    memo.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: no lock, at worst two processes hash the same file
        fcntl = None
    # Ranks starting together would each hash the same 14 GB: one does, the rest wait.
    with open(memo.with_suffix(".lock"), "w") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        if memo.exists():
            return memo.read_text().strip()
        digest = sha256_file(path)
        atomic_write_bytes(memo, digest.encode())
    return digest


def sha256_tree(path: str | os.PathLike) -> str:
    """Hash of a file, or of every file under a directory (relative names included), each
    file's hash memoised (:func:`cached_sha256`)."""
    path = Path(path)
    if path.is_file():
        return cached_sha256(path)
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(path)).encode() + b"\0" + cached_sha256(p).encode())
    return h.hexdigest()
