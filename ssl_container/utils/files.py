"""Atomic file writes: a reader, or a run restarted after a crash, sees the old file or the new one,
never a torn one. The one helper every writer of the project goes through."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "file_problem", "fsync_dir",
           "sha256_file"]


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def file_problem(path: str | os.PathLike, size: int | None = None, sha256: str | None = None,
                 name: str | None = None) -> str | None:
    """What is wrong with ``path`` against the size and sha256 recorded when it was written (None when it
    matches, or when nothing was recorded), naming it ``name`` (default: the file's name). The size is
    compared first: it costs no read."""
    path = Path(path)
    name = name or path.name
    if not path.is_file():
        return f"{name} is missing"
    if size is not None and path.stat().st_size != size:
        return f"{name} has {path.stat().st_size} bytes, {size} were written"
    if sha256 is not None and sha256_file(path) != sha256:
        return f"{name} does not match the sha256 recorded when it was written"
    return None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside ``path`` durable (POSIX: the directory entry is data of the directory)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary path beside ``path``; when the block succeeds, fsync it and rename it
    onto ``path``; when it fails, remove it and leave ``path`` as it was.

        with atomic_path(out / "model.safetensors") as tmp:
            save_file(tensors, str(tmp))
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the final file gets what open() would give it
    try:
        yield tmp
        # Again after the writer: some recreate the file (safetensors' save_file makes it 0600), and a
        # colleague's eval or export on a shared cluster must be able to read what the run wrote.
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 1, **kwargs: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, **kwargs) + "\n")
