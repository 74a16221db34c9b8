"""Files written and removed safely: atomic writes, checksums, and one remove helper.

Input: paths (a file to write or hash, an entry to remove).
Output: `atomic_write` / `atomic_write_text` put a whole file in place by renaming a finished
temporary (readers never see half a file; the file gets ordinary permissions, 0666 & ~UMASK);
`file_sha256` is a file's hex digest; `remove` takes away a file, a symlink (never what it points
at) or a folder tree, and nothing when the path is absent.  `UMASK` is the process umask, read
once at import.
Cost: a write costs one extra rename; file_sha256 reads the file once (sha256 at disk speed).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

UMASK = os.umask(0)
os.umask(UMASK)


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call write(tmp_path) and rename the file into place, so readers never see half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp creates 0600; give the file ordinary permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
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
