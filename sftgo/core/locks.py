"""The directory lock that builds, scores and training runs hold, and that readers of a build share.

Input: a directory: an output directory of `sftgo-prep build` (or one being built), or a training
run directory.
Output: context managers: `exclusive` holds DIR/.lock for a writer (a build, a score, a training
run into its run directory), `shared` for a reader (a training run, inspect, load_shards); a lock
that cannot be taken is a LockedError whose one-sentence message says who holds it (the writer's
pid) and what to do.  The lock is never opened through a symlink or a hard link (it is written).
Cost: instant (one flock; released by the kernel if the process dies).
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from contextlib import contextmanager
from pathlib import Path

from sftgo.core.errors import SftgoError
from sftgo.core.fileio import check_writable, local_only

LOCK = ".lock"


class LockedError(SftgoError, RuntimeError):
    """The directory's lock cannot be taken: another process holds it, or its .lock is no plain file."""


def _open_lock(out: Path):
    """out/.lock opened for reading and writing (created if absent), never through a symlink: the lock is
    truncated and written, so a link (or a hard link) to a file elsewhere would damage that file."""
    path = out / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        if not os.path.lexists(path):
            check_writable(out)  # no lock to blame: a folder sftgo may not write in says so
        what = "a symlink" if exc.errno == errno.ELOOP else f"not a file sftgo can lock ({exc.strerror})"
        raise LockedError(f"{path} is {what}; remove it and run again (sftgo keeps its lock there).") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:
        os.close(fd)
        what = "a hard link to another file" if stat.S_ISREG(info.st_mode) else "not a regular file"
        raise LockedError(f"{path} is {what}; remove it and run again (sftgo keeps its lock there).")
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    return os.fdopen(fd, "r+")


def _read_only_lock(folder: Path):
    """folder/.lock opened read-only (a shared lock needs no more), when it is a plain file; else None."""
    try:
        fd = os.open(folder / LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:
        os.close(fd)
        return None
    return os.fdopen(fd, "r")


def _holder(fh) -> str:
    """The pid the writer holding the lock wrote into it (closes the lock file)."""
    fh.seek(0)
    holder = fh.read().strip() or "another process"
    fh.close()
    return holder


@contextmanager
def exclusive(out: Path, what: str = "build"):
    """Hold an exclusive lock on out/.lock for the whole job (released if the process dies).
    A second build (or training run) into the same directory is refused with one sentence, and so is a
    build or score while a training run reads the directory's shards (`shared`)."""
    out = local_only(out)  # (a URL's lock is a lease: core/lease.py)
    out.mkdir(parents=True, exist_ok=True)
    fh = _open_lock(out)
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:  # a shared lock is granted only when readers, not a writer, hold it
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fh.close()
            raise LockedError(
                f"{out} is being read by another sftgo process (a training run, a report or "
                "load_shards); wait for it to finish or choose another --out."
            ) from None
        except BlockingIOError:
            pass
        raise LockedError(
            f"Another {what} (pid {_holder(fh)}) is writing to {out}; wait for it or choose another --out."
        ) from None
    fh.seek(0)
    fh.truncate()
    fh.write(str(os.getpid()))
    fh.flush()
    try:
        yield
    finally:
        fh.seek(0)
        fh.truncate()
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


@contextmanager
def shared(folder: Path, what: str = "training run"):
    """Hold a shared lock on folder/.lock while reading its shards (released if the process dies).  While
    any reader holds it, a build or score into the folder (`exclusive`) is refused, so the shards cannot
    change under a run that reads them; and a reader is refused while a writer is at work.  A folder where
    no lock can be made (read-only) cannot be rewritten either: it is read without one."""
    folder = local_only(folder)
    try:
        fh = _open_lock(folder)
    except LockedError:
        fh = _read_only_lock(folder)  # a lock this user may not write (another's build): reading it is enough
        if fh is None:
            if (folder / LOCK).exists() or (folder / LOCK).is_symlink() or os.access(folder, os.W_OK):
                raise
            yield
            return
    try:
        fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise LockedError(
            f"{folder} is being written by another sftgo process (pid {_holder(fh)}); wait for it to finish "
            f"before the {what} reads it."
        ) from None
    try:
        yield
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()
