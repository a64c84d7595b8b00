"""One writer per directory: an advisory lock next to a run (or an export) while a command writes it.

``PARENT/.NAME.lock`` is locked with ``fcntl.flock`` and holds the holder's host, PID, command
and start time, so a second ``grow train`` (or ``grow export``) into the same directory stops
at once with one line naming the holder instead of racing it. The lock file lives beside the
directory, not in it: ``--overwrite`` swaps the whole directory, and a run that does not exist
yet can be locked before it is created.

The kernel drops a ``flock`` when its holder dies, so a lock left by a killed process is stale by
construction and is simply taken over. Where ``flock`` is not supported (some network file
systems), the recorded holder decides: a live process on this host holds the lock, a dead one
(or a record older than a day from another host) does not.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from grow.errors import UserError

STALE_FOREIGN_SECONDS = 24 * 3600


def lock_path(directory: Path) -> Path:
    """``PARENT/.NAME.lock`` of the resolved directory (two spellings of one run share a lock)."""
    directory = Path(directory).resolve()
    if not directory.name:
        raise UserError(f"{directory}: a run or export needs a directory of its own, not the file system root")
    return directory.with_name(f".{directory.name}.lock")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "another process"
    return (f"{holder.get('command', 'grow')} (pid {holder.get('pid')} on {holder.get('host')}, "
            f"since {holder.get('since')})")


def holder(directory: Path) -> str | None:
    """Who is writing ``directory`` now, as a phrase, or None. Only reads the record (a reader
    must never take the lock, even briefly: a writer starting at that moment would be refused)."""
    try:
        path = lock_path(directory)
    except UserError:
        return None
    record = _holder(path) if path.is_file() else {}
    if not record or (record.get("host") == socket.gethostname() and not _alive(int(record.get("pid", 0)))):
        return None
    return _describe(record)


class DirLock:
    """``with DirLock(run, "grow train", flag="--out"):`` -- raises ``UserError`` when held elsewhere."""

    def __init__(self, directory: Path, command: str, flag: str = "RUN") -> None:
        self.directory = Path(directory)
        self.command = command
        self.flag = flag
        self.fd: int | None = None
        self.path = self.directory  # until acquire() resolves it (a bad path is the command's one-line error)
        self.created: list[Path] = []  # parent directories this lock created (removed again if left empty)

    def acquire(self) -> DirLock:
        try:
            self.path = lock_path(self.directory)
        except UserError as exc:
            raise UserError(f"{self.flag}: {exc}") from None
        missing = self.path.parent
        while not missing.exists():
            self.created.append(missing)
            missing = missing.parent
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    self._refuse(_holder(self.path))
                if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                # No flock here: trust the record unless its holder is gone.
                holder = _holder(self.path)
                if holder and not self._stale(holder):
                    self._refuse(holder)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            # A releasing holder unlinks the file after unlocking it: make sure we locked the
            # file that is still at the path, not an orphan, or try again.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        record = {"host": socket.gethostname(), "pid": os.getpid(), "command": self.command,
                  "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "time": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        return self

    def _stale(self, holder: dict) -> bool:
        if holder.get("host") == socket.gethostname():
            return not _alive(int(holder.get("pid", 0)))
        return time.time() - float(holder.get("time", 0)) > STALE_FOREIGN_SECONDS

    def _refuse(self, holder: dict) -> None:
        raise UserError(f"{self.flag}: {self.directory} is being written by {_describe(holder)}; wait for it to "
                        f"finish or stop it (lock file {self.path})")

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)  # while still locked: nobody else can be between unlink and unlock
        except FileNotFoundError:
            pass
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None
        for directory in self.created:  # deepest first: a failed start leaves no empty parents behind
            try:
                directory.rmdir()
            except OSError:
                break

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
