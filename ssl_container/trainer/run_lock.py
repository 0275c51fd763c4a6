"""One trainer per run folder: ``RUN/.lock``, held for the life of the run.

Two trainers writing one run folder replace each other's checkpoints and interleave their metrics,
and both exit 0. The lock is a POSIX record lock (``lockf``) on ``RUN/.lock``, which records who holds
it (host, PID, Slurm job, start time) so the refusal can say so. The kernel drops it when its holder
dies, however it dies, so a lock left by a crashed or killed run is free: it is taken over with a line
naming the old holder. A record lock, unlike ``flock``, is not shared with forked children: a loader
worker that outlives its killed trainer for a few seconds does not keep the folder locked (and NFS
serves record locks across nodes). For file systems where a dead client's lock can linger (NFS after
a node failure), a holder that is certainly gone is also replaced: the same host with its PID no
longer running (or a zombie), or the same Slurm job id (a requeued job taking over from its dead
former self).

A record lock is dropped when its process closes *any* descriptor of the file, so the holder reads
the file only through the descriptor it locked. The file is removed when the run ends; a holder that
re-checks the path after locking (it must name the inode it locked) makes that safe against a starter
racing the removal.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("ssl_container.train")

__all__ = ["RunFolderBusy", "RunLock"]

LOCK_NAME = ".lock"


class RunFolderBusy(RuntimeError):
    """Another live trainer holds the run folder."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie answers kill(0) but holds nothing: its parent just has not reaped it yet
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2:].split()[0] not in ("Z", "X")
    except (OSError, ValueError, IndexError):
        return True


def _describe(holder: dict[str, Any]) -> str:
    job = f", Slurm job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["started"])) if holder.get("started") else "?"
    return f"PID {holder.get('pid', '?')} on {holder.get('host', '?')}{job}, since {started}"


class RunLock:
    """``acquire()`` returns None when this process holds ``RUN/.lock``, else the refusal line."""

    def __init__(self, run_dir: str | os.PathLike, environ: dict[str, str] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        from ssl_container.distributed import slurm_job_id

        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": slurm_job_id(environ),
                   "started": time.time()}
        self._fd: int | None = None
        self.created_dir = False

    @staticmethod
    def _read(fd: int) -> dict[str, Any]:
        try:
            data = json.loads(os.pread(fd, 1 << 16, 0).decode() or "{}")
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _gone(self, holder: dict[str, Any]) -> bool:
        """Certainly dead although its lock is held (a lingering network-file-system lock)."""
        if holder.get("slurm_job_id") and holder.get("slurm_job_id") == self.me["slurm_job_id"]:
            return True  # a requeued job: its former self was killed before this one was started
        if holder.get("host") == self.me["host"] and isinstance(holder.get("pid"), int):
            return not _alive(holder["pid"])
        return False

    def acquire(self) -> str | None:
        try:
            return self._acquire()
        except OSError as err:  # read-only file system, no permission, a file where the folder should be
            return (f"cannot write in the run folder {self.run_dir} ({err.strerror or err}): pick a writable "
                    "run_dir=... (or fix the folder's permissions)")

    def _acquire(self) -> str | None:
        if not self.run_dir.exists():
            self.run_dir.mkdir(parents=True)
            self.created_dir = True
        for _ in range(5):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                holder = self._read(fd)
                os.close(fd)
                if err.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if self._gone(holder):
                    log.warning("taking over the lock of %s (%s), which is gone", self.run_dir, _describe(holder))
                    self.path.unlink(missing_ok=True)  # its lock stays on the old inode
                    continue
                return (f"{self.run_dir} is in use by another trainer ({_describe(holder)}): two runs in one folder "
                        "would overwrite each other's checkpoints. Wait for it to end or stop it, or train in another "
                        f"run_dir. (If that process is certainly gone, delete {self.path}.)")
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # removed or replaced between open and lock: lock the file that is there now
                os.close(fd)
                continue
            previous = self._read(fd)
            if previous.get("pid") is not None:
                log.info("the lock of %s was left by %s, which has ended; taking it", self.run_dir, _describe(previous))
            os.ftruncate(fd, 0)
            os.write(fd, (json.dumps(self.me) + "\n").encode())
            self._fd = fd
            return None
        return f"could not lock {self.path}: it kept changing under this process; try again"

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            if os.fstat(self._fd).st_ino == os.stat(self.path).st_ino:
                self.path.unlink()
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    def remove_created_dir(self) -> None:
        """After a refusal: the folder this process created for the lock, if it is still empty."""
        if self.created_dir:
            try:
                self.run_dir.rmdir()
            except OSError:
                pass
