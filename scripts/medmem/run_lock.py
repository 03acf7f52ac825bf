"""One run at a time per results folder: a lock file that dies with the run that holds it.

Snakemake locks the outputs it is about to write, but in ``.snakemake/`` of the working directory: two
checkouts (or two working directories) whose configs name one results folder would both run, and write the
same stage folders at once. The main Snakemake process of a run therefore takes an exclusive ``flock`` on
``<results>/.medmem/lock`` before its first job and keeps it until it exits. The kernel releases the lock
when that process ends, however it ends (SIGKILL, a lost login node): no stale lock is left to remove by
hand. The file itself records who holds it (pid, host, checkout, start time), for the message of a run that
is refused, and is emptied again when the holder exits normally.

Standard library only: the workflow calls this while planning.
"""

from __future__ import annotations

import atexit
import datetime
import errno
import fcntl
import json
import os
import socket
from pathlib import Path

LOCK_FILE = Path(".medmem") / "lock"

# results folder (resolved) → the open lock file descriptor, kept open for the life of the process.
_held: dict[str, int] = {}


class ResultsFolderLocked(RuntimeError):
    """Another run holds the results folder."""


def acquire(results: str | os.PathLike, checkout: str | os.PathLike) -> Path:
    """Lock ``results`` for the rest of this process's life; returns the lock file.

    Raises ResultsFolderLocked, naming the run that holds it, when another process does.
    """
    results = Path(os.path.realpath(results))
    path = results / LOCK_FILE
    if str(results) in _held:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not inherited by the jobs' processes (os.open is close-on-exec): the lock is the main process's.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        os.close(fd)
        if error.errno in (errno.EAGAIN, errno.EACCES):
            raise ResultsFolderLocked(
                f"results folder {results} is in use by another run: {holder(path)}. Two runs on one results "
                "folder would write the same stage folders at once. Wait for that run to finish (or stop it), "
                "or set `results:` to another folder. The lock is released when that process ends; there is "
                f"nothing to remove by hand (lock file: {path})") from None
        raise ResultsFolderLocked(
            f"cannot lock the results folder {results} ({path}: {error.strerror}): its file system does not "
            "support file locks (flock). Put `results:` on a file system that does (a local disk, or NFS with "
            "locking enabled)") from None
    record = {"pid": os.getpid(), "host": socket.gethostname(), "checkout": str(Path(checkout).resolve()),
              "working_directory": os.getcwd(),
              "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.write(fd, (json.dumps(record, sort_keys=True) + "\n").encode())
    if not _held:
        atexit.register(release_all)
    _held[str(results)] = fd
    return path


def holder(path: str | os.PathLike) -> str:
    """Who holds the lock at ``path``, as its lock file records it."""
    try:
        record = json.loads(Path(path).read_text())
        return (f"pid {record['pid']} on host {record['host']}, checkout {record['checkout']} (working directory "
                f"{record['working_directory']}), started {record['started']}")
    except (OSError, ValueError, KeyError, TypeError):
        return "a run that has not yet recorded who it is"


def release(results: str | os.PathLike) -> None:
    """Give the lock up, emptying the record first (nobody holds it now)."""
    fd = _held.pop(os.path.realpath(results), None)
    if fd is not None:
        os.ftruncate(fd, 0)  # while still holding it: a new holder's record is never erased
        os.close(fd)


def release_all() -> None:
    """At exit: every lock this process holds (a killed process's locks end without this)."""
    for results in list(_held):
        release(results)
