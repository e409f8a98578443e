"""File-system helpers: atomic writes and a run-directory lock.

Every file the suite writes appears complete or not at all: it is written to a temporary name in the same
directory, flushed and fsynced, then renamed over the target (``os.replace`` is atomic on POSIX), and the
directory entry is fsynced too.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import tempfile
import time
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


def check_inside(root: str | os.PathLike, path: str | os.PathLike, what: str = "") -> Path:
    """Refuse (one line) to let the suite write at ``path`` unless it stays inside the results root ``root``: no
    part of it below the (resolved) root may be a symbolic link, and what exists of it must resolve inside the root.
    Everything that already exists below ``path`` is checked too (a run directory's ``ckpt/`` linked elsewhere).
    The root itself may be a link (``--results`` is the user's choice; it is resolved once). Returns ``path``."""
    root, path = Path(root), Path(path)
    real_root = root.resolve()
    try:
        rel = path.relative_to(root)
    except ValueError:
        raise BenchError(f"{path} is not inside the results root {root}") from None
    cur = root
    for part in rel.parts:
        cur = cur / part
        if cur.is_symlink():
            raise BenchError(f"{what or 'the path'} {cur} is a symbolic link (to {os.readlink(cur)}); the suite "
                             f"writes only inside the results root {real_root}: accepted: a real directory there "
                             "(remove the link)")
    if path.is_dir():
        for dirpath, dirnames, filenames in os.walk(path):  # never follows links
            for n in dirnames + filenames:
                p = Path(dirpath) / n
                if p.is_symlink():
                    raise BenchError(f"{p} is a symbolic link (to {os.readlink(p)}); the suite writes only inside "
                                     f"the results root {real_root}: accepted: plain files and directories (remove "
                                     "the link)")
    if path.exists() and not path.resolve().is_relative_to(real_root):  # (a bind mount, say)
        raise BenchError(f"{path} resolves to {path.resolve()}, outside the results root {real_root}")
    return path


def check_writable_dir(path: str | os.PathLike, option: str, write: bool = True) -> Path:
    """A one-line error for a directory option (``--results``, ``--out``, a cache) that names no usable directory:
    empty, a file, under a file, or — with ``write`` — in a place this process cannot write (read-only, no
    permission). It need not exist yet: its first existing ancestor must then be a writable directory."""
    if str(path).strip() == "":
        raise BenchError(f"{option} is empty; accepted: a directory path (e.g. results)")
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise BenchError(f"{option} {path} is a file; accepted: a directory (created if missing)")
    anc = p
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if anc.exists() and not anc.is_dir():
        raise BenchError(f"{option} {path} lies under {anc}, which is a file; accepted: a directory path")
    if write and anc.exists() and not os.access(anc, os.W_OK | os.X_OK):
        raise BenchError(f"{option} {path}: {anc} is not writable (read-only or no permission); accepted: a "
                         "directory this user can write")
    return p


_HELD: dict[str, "RunLock"] = {}  # the run locks this process holds, by path (flock is per open file, not process)


class RunLock:
    """An exclusive lock on a run directory: the OS's advisory lock (``fcntl.flock``) on ``.lock``, which the
    kernel releases when the holder exits, however it dies — so there are no stale locks to take over and no pid to
    trust (a dead, a zombie or a recycled pid holds nothing). The file names the holder (``host pid``, and inside a
    Slurm job its id: ``host pid job``) for messages only; it is never deleted (deleting a lock file that another
    process has just opened would give two holders).

    At most one process holds it, also when many ask in the same instant. A second process asking gets a one-line
    error naming the holder (or, for a starting model several runs need, waits: see ``Runner.execute``). On NFS,
    ``flock`` is a lock held by the file server; a lock whose host died clears when the server's lease expires.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self.held = False
        self._fd: int | None = None

    @staticmethod
    def _alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def _key(self) -> str:
        return os.path.abspath(self.path)

    def _fields(self) -> list[str]:
        try:
            return self.path.read_text().split()
        except OSError:
            return []

    def holder(self) -> tuple[str, int] | None:
        """(host, pid) named in the lock file, when the lock is held; None when it is free."""
        f = self._fields()
        try:
            return (f[0], int(f[1])) if len(f) in (2, 3) else None
        except ValueError:
            return None

    def holder_job(self) -> str | None:
        """The Slurm job id of the holder, if it took the lock inside a Slurm job."""
        f = self._fields()
        return f[2] if len(f) == 3 else None

    def _open(self, create: bool) -> int | None:
        flags = os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        if create:
            flags |= os.O_CREAT
        try:
            return os.open(self.path, flags, 0o644)
        except FileNotFoundError:
            if create:
                raise
            return None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise BenchError(f"{self.path} is a symbolic link; a run's lock must be a plain file inside the "
                                 "results root (remove the link)") from None
            if not create and e.errno in (errno.EACCES, errno.EROFS):
                return None
            raise BenchError(f"cannot open the lock {self.path}: {e.strerror}") from None

    def is_held_by_other(self) -> bool:
        """Another process holds the lock now (a probe: it takes and drops a shared lock, never blocking)."""
        if self._key() in _HELD:
            return False
        fd = self._open(create=False)
        if fd is None:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return False
        finally:
            os.close(fd)  # closing drops the probe's shared lock
        return False

    def _busy(self) -> BenchError:
        h = self.holder()
        who = f"process {h[1]} on {h[0]}" if h else "another process"
        return BenchError(f"run directory {self.path.parent} is in use by {who}; wait for it to finish or stop it "
                          f"(the lock is released when that process ends; if its host died, when the file "
                          f"server's lease on {self.path} expires)")

    def try_acquire(self, patience_s: float = 1.0) -> bool:
        """Take the lock if no other process holds it. A moment's contention (another process probing it, or
        releasing it) is retried for ``patience_s``; False if it is held."""
        if self.held:
            return True
        if self._key() in _HELD:
            raise BenchError(f"run directory {self.path.parent} is already in use by this process")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BenchError(f"cannot create the run directory {self.path.parent}: {e.strerror}") from None
        fd = self._open(create=True)
        deadline = time.monotonic() + patience_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    return False
                time.sleep(0.02)
            except OSError as e:
                os.close(fd)
                raise BenchError(f"cannot lock {self.path}: {e.strerror} (the file system must support "
                                 "flock)") from None
        job = os.environ.get("SLURM_JOB_ID")
        me = f"{socket.gethostname()} {os.getpid()}{f' {job}' if job else ''}\n".encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, me, 0)
        self._fd, self.held = fd, True
        _HELD[self._key()] = self
        return True

    def acquire(self) -> None:
        if not self.try_acquire():
            raise self._busy()

    def release(self) -> None:
        if self.held and self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)  # a free lock names nobody
            os.close(self._fd)  # closing releases the flock
            _HELD.pop(self._key(), None)
            self._fd, self.held = None, False

    @contextlib.contextmanager
    def hold(self, patience_s: float = 1.0) -> Iterator["RunLock"]:
        if not self.try_acquire(patience_s):
            raise self._busy()
        try:
            yield self
        finally:
            self.release()
