"""File-system helpers: atomic writes and a run-directory lock.

Every file the suite writes appears complete or not at all: it is written to a temporary name in the same
directory, flushed and fsynced, then renamed over the target (``os.replace`` is atomic on POSIX), and the
directory entry is fsynced too.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from . import faults
from .errors import BenchError


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, writer: Callable[[Any], None], mode: str = "wb") -> None:
    """Call ``writer(fileobj)`` on a temporary file next to ``path`` and rename it into place."""
    path = Path(path)
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise BenchError(f"cannot write {path}: {parent} exists and is not a directory") from None
    except OSError as e:
        raise BenchError(f"cannot create directory {parent}: {e.strerror}") from None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    except OSError as e:
        raise BenchError(f"cannot write in {parent}: {e.strerror}") from None
    try:
        with os.fdopen(fd, mode) as f:
            writer(f)
            f.flush()
            os.fsync(f.fileno())
        faults.point("write")
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise BenchError(f"cannot write {path}: {e.strerror}; nothing was changed") from None
        raise
    _fsync_dir(parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), mode="w")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):  # numpy / torch scalars
        return o.item()
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as f:
        return json.load(f)


class RunLock:
    """An exclusive lock on a run directory, held as ``.lock`` holding ``host pid`` (and, inside a Slurm job, its
    job id: ``host pid job``).

    A second process asking for the lock gets a one-line error naming the holder. A lock left by a process that no
    longer exists on this host is taken over, and so is one left by this very Slurm job (a requeued job may start
    on another node after its first run was killed).
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self.held = False

    @staticmethod
    def _alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def _fields(self) -> list[str]:
        try:
            return self.path.read_text().split()
        except OSError:
            return []

    def holder(self) -> tuple[str, int] | None:
        f = self._fields()
        try:
            return (f[0], int(f[1])) if len(f) in (2, 3) else None
        except ValueError:
            return None

    def holder_job(self) -> str | None:
        """The Slurm job id of the holder, if it took the lock inside a Slurm job."""
        f = self._fields()
        return f[2] if len(f) == 3 else None

    def is_held_by_other(self) -> bool:
        h = self.holder()
        if h is None:
            return False
        host, pid = h
        if pid == os.getpid() and host == socket.gethostname():
            return False
        job = self.holder_job()
        if job is not None and job == os.environ.get("SLURM_JOB_ID"):
            return False  # this job, requeued: its earlier run was killed
        return host != socket.gethostname() or self._alive(pid)

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        job = os.environ.get("SLURM_JOB_ID")
        me = f"{socket.gethostname()} {os.getpid()}{f' {job}' if job else ''}\n"
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                h = self.holder()
                if h is not None and self.is_held_by_other():
                    raise BenchError(
                        f"run directory {self.path.parent} is in use by process {h[1]} on {h[0]}; "
                        "wait for it to finish or stop it") from None
                # stale (dead process or unreadable): take it over
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(me)
            self.held = True
            return
        raise BenchError(f"could not take the lock {self.path}")

    def release(self) -> None:
        if self.held:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            self.held = False

    @contextlib.contextmanager
    def hold(self) -> Iterator["RunLock"]:
        self.acquire()
        try:
            yield self
        finally:
            self.release()
