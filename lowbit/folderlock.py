"""One writer per checkpoint folder: an exclusive, non-blocking ``flock`` on a lock file inside it.

Two saves into one folder would each remove the other's unfinished shards as leftovers; with the lock the second
is refused at once, with the first one's pid. The lock file lives only while its save runs: it is removed when the
lock is released, and a stale one (its process killed) is taken over, since the kernel drops a dead process's flock.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from lowbit.manifest import CheckpointError

try:
    import fcntl
except ImportError:  # not POSIX (Windows): no flock, so folders are not locked there
    fcntl = None

LOCK_NAME = ".lowbit-write.lock"
# check_target probes the lock by holding it shared for a moment; a writer retries through such a moment this many
# times, 10 ms apart, before it reports the folder busy. A real writer holds it for seconds to hours.
_TRIES = 5


def busy_error(directory: Path, pid: int | None) -> CheckpointError:
    """The one-line error of a folder another process is writing."""
    who = f"another process (pid {pid})" if pid else "another process"
    return CheckpointError(f"{directory} is being written by {who}: wait for it to finish or write elsewhere")


def _pid_in(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


def writer_pid(directory: str | os.PathLike) -> int | None:
    """The pid of the process writing ``directory`` now (0 where it cannot be read), or None if none is."""
    if fcntl is None:
        return None
    try:
        fd = os.open(Path(directory) / LOCK_NAME, os.O_RDONLY)
    except OSError:  # no lock file (nobody writes), or one this process may not read
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # shared: it fails only while a writer holds it
        except BlockingIOError:
            return _pid_in(fd) or 0
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class FolderLock:
    """The write lock of ``directory`` (which must exist): ``acquire`` or CheckpointError naming the holder,
    ``release`` removes the lock file and unlocks."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> None:
        if fcntl is None:
            return
        busy = 0
        for _ in range(100):  # each pass but the busy ones follows a writer that finished meanwhile
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _pid_in(fd)
                os.close(fd)
                busy += 1
                if busy >= _TRIES:
                    raise busy_error(self.directory, pid) from None
                time.sleep(0.01)
                continue
            # The writer before us may have removed the file between our open and our lock: a lock on a removed
            # file excludes nobody, so lock the file now at the path instead.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, str(os.getpid()).encode("ascii"), 0)
                self.fd = fd
                return
            os.close(fd)
        raise busy_error(self.directory, None)

    def release(self) -> None:
        """Remove the lock file (while still holding it, so nobody locks a file about to vanish) and unlock."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass  # a folder gone read-only: the file stays, and the next writer takes it over
        os.close(fd)


__all__ = ["FolderLock", "LOCK_NAME", "busy_error", "writer_pid"]
