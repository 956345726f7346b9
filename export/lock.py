"""One writer per output folder: an advisory lock (flock) on `<folder>/.lock`, which holds who took
it. The kernel drops the lock when its holder dies, however it dies, so a lock left by a dead
process is simply taken over; the file itself stays (removing it would let two writers lock two
different files)."""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_FILE = ".lock"


class FolderLocked(RuntimeError):
    """Another process is writing into the folder."""


class FolderLock:
    """`with FolderLock(folder, "export"):` -- raises FolderLocked naming the holder."""

    def __init__(self, folder: str | Path, what: str):
        self.path, self.what = Path(folder) / LOCK_FILE, what
        self._fd: int | None = None

    def __enter__(self) -> "FolderLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise FolderLocked(f"{self.path.parent} is being written by another {holder.get('what', 'process')}: "
                               f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started "
                               f"{holder.get('started', '?')}; wait for it to finish, or stop it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"what": self.what, "pid": os.getpid(), "host": socket.gethostname(),
                                  "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None


def _holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}  # the holder has not written itself yet
