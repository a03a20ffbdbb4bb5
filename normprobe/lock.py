"""One writer per results folder: an exclusive file lock held for a whole analysis.

Two ``normprobe analyze`` processes on one output folder would both train
every run and remove each other's temporary files. The first takes an
exclusive lock (``filelock``, an operating-system lock released when the
process ends, even on ``kill -9``) on ``<folder>/.normprobe.lock`` and
writes who it is next to it; the second fails at once with
:class:`FolderLockedError`, naming the holder.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from normprobe.errors import NormprobeError

__all__ = ["FolderLockedError", "LOCK_NAME", "OWNER_NAME", "folder_lock"]

#: The lock file inside a results folder.
LOCK_NAME = ".normprobe.lock"
#: Who holds the lock (pid, host, since): read by the process that is refused.
OWNER_NAME = ".normprobe.lock.owner"


class FolderLockedError(NormprobeError, RuntimeError):
    """Another process is writing to the same results folder."""


def _holder(folder: Path) -> str:
    try:
        owner = json.loads((folder / OWNER_NAME).read_text())
        return f"process {owner['pid']} on {owner['host']} since {owner['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextlib.contextmanager
def folder_lock(folder: Path, what: str = "output") -> Iterator[None]:
    """Hold the exclusive lock on ``folder`` (which must exist) for the ``with`` block.

    Raises :class:`FolderLockedError` at once when another process holds it.
    """
    lock = FileLock(str(folder / LOCK_NAME), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise FolderLockedError(
            f"{what}: {str(folder)!r} is in use by {_holder(folder)}; wait for it to finish, "
            "or write somewhere else with --out"
        ) from None
    owner = folder / OWNER_NAME
    try:
        owner.write_text(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
                }
            )
        )
        yield
    finally:
        owner.unlink(missing_ok=True)
        lock.release()
