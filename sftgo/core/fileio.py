"""Files written and removed safely: one rule for where an output may go, atomic writes, checksums, OS
errors as sentences, and one remove helper.

Input: paths (an output to write, a file to hash, an entry to remove, two paths to compare) and OSErrors.
Output: `output_target` decides, once for every writer, what may happen at an output path: absent or a
regular file -> written whole by renaming a finished temporary over it; a FIFO or character device
(/dev/null, a pipe) given for a streamed output -> written into directly; anything else (a symlink inside
sftgo's own folders, a folder where a file is expected, a socket, a block device, a FIFO for a file that
must be whole) -> a PathError naming the path and what to do.  A path the user named for a streamed
output (`follow`) may be a symlink: what it points at is judged by the same rule and written, and the
link stays a link.  `atomic_write` / `atomic_write_text` write by that rule (readers never see half a
file; the file gets ordinary permissions, 0666 & ~UMASK); `check_output_dir` is the rule for a folder
sftgo fills (absent or a real folder).  `os_error_sentence` turns an OSError into one sentence with the
path and the fix (`PathError` carries it); `overlap` says whether two paths are the same, or one lies in
the other, after resolving symlinks.  `file_sha256` is a file's hex digest; `remove` takes away a file, a
symlink (never what it points at) or a folder tree, and nothing when the path is absent.  `UMASK` is the
process umask, read once at import.
Cost: one lstat (and a realpath when following) per output; a write costs one extra rename; file_sha256
reads the file once (sha256 at disk speed).
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
import tempfile
from pathlib import Path

from sftgo.core.errors import SftgoError
from sftgo.core.storage import is_url

UMASK = os.umask(0)
os.umask(UMASK)


class PathError(SftgoError, OSError):
    """A file or folder cannot be read or written where the user pointed sftgo; one sentence with the fix."""


KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISLNK, "a symlink"),
)


def _kind(mode: int) -> str:
    return next((name for test, name in KINDS if test(mode)), "not a regular file")


def _named(path, what: str) -> str:
    return f"{what} {path}" if what else str(path)


def local_only(path: str | os.PathLike, what: str = "") -> Path:
    """`path` as a Path, or a PathError when it is a URL (s3://...): a URL never becomes a local path (Path would
    make `s3://b/x` the folder s3:/b/x)."""
    if is_url(path):
        raise PathError(f"{_named(path, what)} is a URL, but sftgo writes this only to a local path; give one.")
    return Path(path)


def output_target(
    path: str | os.PathLike, what: str = "", stream: bool = False, follow: bool = False
) -> tuple[Path, bool]:
    """(where to write the output `path`, whether to write into it directly) or a PathError.  `what` names the
    output in the sentence (e.g. "--rejects"); `stream`: a text written front to back, which a FIFO or a
    character device may take; `follow`: a path the user named, which may be a symlink to where it goes."""
    path = local_only(path, what)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return path, False
    except OSError as exc:
        raise PathError(os_error_sentence(exc, what)) from None
    if stat.S_ISLNK(info.st_mode):
        if not follow:
            raise PathError(
                f"{_named(path, what)} is a symlink, which sftgo does not replace (it writes only its own files "
                "there); remove the link and run again."
            )
        target = Path(os.path.realpath(path))
        if not target.exists():
            raise PathError(
                f"{_named(path, what)} is a symlink to {target}, which does not exist; give {target} itself or "
                "another path."
            )
        path = target  # written through: the link stays a link
    return path, _direct(path, what, stream)


def _direct(path: Path, what: str, stream: bool) -> bool:
    """Whether the existing or absent non-link `path` is written into directly (FIFO or character device of a
    streamed output), False for a regular file or nothing; anything else is a PathError."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise PathError(os_error_sentence(exc, what)) from None
    if stat.S_ISREG(mode):
        return False
    if stream and (stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)):
        return True
    kind = _kind(mode)
    if stat.S_ISFIFO(mode) or stat.S_ISCHR(mode):
        fix = "sftgo writes this file whole, by renaming a finished copy into place; give the path of a file"
    elif stat.S_ISDIR(mode):
        fix = "give a file name (sftgo never replaces a folder with a file)"
    else:
        fix = "give the path of a regular file or of one that does not exist"
    raise PathError(f"{_named(path, what)} is {kind}, not a regular file; {fix}.")


def check_output_dir(path: str | os.PathLike, what: str = "") -> None:
    """A folder sftgo fills or replaces (a checkpoint, an exported model) must be absent or a real folder."""
    path = local_only(path, what)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        kind = "a symlink" if path.is_symlink() else _kind(os.lstat(path).st_mode)
        raise PathError(
            f"{_named(path, what)} is {kind} where sftgo keeps a folder of its own; remove it and run again."
        )


def check_writable(path: str | os.PathLike, what: str = "") -> None:
    """Refuse, before any work, an output sftgo could not create: the folder `path` is (when it is one) or
    the nearest existing folder above it must take new files."""
    path = Path(os.path.abspath(local_only(path, what)))
    folder = path if path.is_dir() else path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if os.access(folder, os.W_OK | os.X_OK):
        return
    if os.statvfs(folder).f_flag & os.ST_RDONLY:
        why, fix = "on a read-only file system", "choose a path on a writable one"
    else:
        why, fix = "not writable for sftgo", "give it write permission or choose another path"
    where = "it" if folder == path else f"its folder {folder}"
    raise PathError(f"Cannot write {_named(path, what)}: {where} is {why}; {fix}.")


def atomic_write(path: str | os.PathLike, write, what: str = "", stream: bool = False, follow: bool = False) -> None:
    """Call write(p) and put the file in place by the rule of `output_target`: p is a temporary beside the
    target renamed over it (readers never see half a file), or the FIFO / device itself."""
    target, direct = output_target(path, what, stream, follow)
    if direct:
        write(str(target))
        return
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        exc.filename = str(target.parent)
        raise PathError(os_error_sentence(exc, what)) from None
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp creates 0600; give the file ordinary permissions
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(
    path: str | os.PathLike, text: str, what: str = "", stream: bool = False, follow: bool = False
) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), what, stream, follow)


FIXES = {
    errno.EACCES: "permission denied; give sftgo access to it (its permissions, or those of its folder) or choose "
    "another path",
    errno.EROFS: "it is on a read-only file system; choose a path on a writable one",
    errno.ENOSPC: "the device holding it is full; free some space or choose another path",
    errno.ENOENT: "it, or a folder on the way to it, does not exist; check the path",
    errno.EISDIR: "it is a folder where a file is expected; give a file name",
    errno.ENOTDIR: "a part of it is a file where a folder is expected; check the path",
}
FIXES[errno.EPERM] = FIXES[errno.EACCES]
FIXES[errno.EDQUOT] = "the disk quota is used up; free some space or choose another path"


def os_error_sentence(exc: OSError, what: str = "") -> str:
    """One sentence for an OSError: the path it concerns (`what`, e.g. "--out", names the setting) and the fix."""
    where = exc.filename2 if exc.filename is None else exc.filename
    fix = FIXES.get(exc.errno)
    reason = exc.strerror or (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if fix is None:
        fix = f"{reason[:1].lower()}{reason[1:]}; check the path"
    if where is None:
        return f"Cannot use {what or 'a file'}: {fix}."
    name = os.fsdecode(where) if isinstance(where, bytes) else str(where)
    return f"Cannot use {_named(name, what)}: {fix}."


def overlap(path: str | os.PathLike, other: str | os.PathLike) -> str | None:
    """How `path` and `other` meet once symlinks are resolved: "is the same as", "lies inside", "holds", or None."""
    a, b = Path(os.path.realpath(os.path.abspath(path))), Path(os.path.realpath(os.path.abspath(other)))
    if a == b:
        return "is the same as"
    if b in a.parents:
        return "lies inside"
    if a in b.parents:
        return "holds"
    return None


def file_sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as fh:
        return stream_sha256(fh)


def stream_sha256(fh) -> str:
    """The hex sha256 of what the binary file object `fh` reads from where it stands to its end."""
    digest = hashlib.sha256()
    for block in iter(lambda: fh.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()


def remove(path: str | os.PathLike) -> None:
    """Remove `path` whatever it is: a symlink goes, never what it points at; a folder goes with its
    tree (shutil.rmtree, which follows no link inside it); nothing happens when there is nothing."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)
