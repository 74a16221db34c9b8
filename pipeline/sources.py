"""Inputs given as URLs of an object store (s3://, gs://, abfs://, hf://, memory://, file://): list, identify, open.

Input: an input URL as the user gave it (an object, a folder -- a prefix --, or a glob such as s3://b/data/*.jsonl)
and the storage options (BuildConfig.storage_options: credentials, endpoint; {} = the backend's standard
environment).
Output: `expand()` turns a glob into the URLs of the objects it matches, as a shell turns a local glob into paths;
`files()` gives the data files of one input URL with the same rules as a local folder (readers._folder_files);
`open_binary()` gives a task a seekable binary file of one object; `identity()` gives the (URL, size, version) of
every object of an input, which a resumed build compares as it compares local sizes and mtimes; `overlap()` says
whether an output and an input URL meet.  Every error a store raises comes out as an InputError of one sentence
(storage.sentence: a missing object or bucket, missing credentials, a refused permission, an unreachable endpoint).
Cost: one listing or metadata request per input on the driver; a task reads only the bytes (JSONL) or row groups
(Parquet) of its own pieces, through fsspec's read-ahead buffer.
"""

from __future__ import annotations

import contextlib
import io
import posixpath
import re
from collections.abc import Iterator

from sftgo.core import storage
from sftgo.core.errors import SftgoError
from sftgo.core.fileio import overlap as local_overlap

_GLOB = re.compile(r"[*?\[]")
_BUFFER = 2**20  # bytes of a request and of the read buffer over an object (readline at C speed)


@contextlib.contextmanager
def errors(location: str) -> Iterator[None]:
    """Turn an error of the store into an InputError of one sentence naming `location`."""
    from sftgo.pipeline.readers import InputError

    try:
        yield
    except SftgoError:
        raise
    except Exception as exc:  # backends raise their own types (botocore, aiohttp, google.auth, azure)
        raise InputError(storage.sentence(exc, location)) from None


def filesystem(url: str, options: dict | None):
    """(fsspec filesystem, path inside it) of `url`; an unknown scheme or missing backend is one sentence."""
    with errors(url):
        return storage.filesystem(url, options)


def is_glob(url: str) -> bool:
    """Whether the path of `url` holds a glob character (* ? [)."""
    return bool(_GLOB.search(url.split("://", 1)[-1]))


def expand(url: str, options: dict | None) -> list[str]:
    """The inputs a URL stands for: a glob's matching objects in sorted order (each then an input of its own, as
    a shell glob of local files gives them), else the URL itself.  A glob that matches nothing is an error."""
    from sftgo.pipeline.readers import InputError

    if not is_glob(url):
        return [url]
    fs, path = filesystem(url, options)
    with errors(url):
        found = fs.glob(path, detail=True)
    matched = sorted(p for p, info in found.items() if info.get("type") != "directory")
    if not matched:
        raise InputError(f"Input {url} matches no object.")
    return [_url_of(url, fs, path, p) for p in matched]


def _url_of(url: str, fs, path: str, found: str) -> str:
    """The URL of object `found` (a path of `fs`) written as the user wrote `url` (whose path in fs is `path`)."""
    static = _GLOB.split(path, 1)[0].rsplit("/", 1)[0]  # the folder part before the first glob character
    prefix = url[: url.find(static) + len(static)] if static and static in url else None
    if prefix is not None and found.startswith(static + "/"):
        return prefix + found[len(static) :]
    return fs.unstrip_protocol(found)


def files(url: str, options: dict | None) -> tuple[list[tuple[str, str]], list[str], list[str], bool]:
    """(found [(URL, name relative to the input)], unknown relative names, hidden relative names, whether `url`
    is a folder) of one input URL: the object itself, or every object under the folder in the order a local
    folder is walked (by path components); names starting with "." hide what is under them.  A datasets
    save_to_disk folder is refused (sftgo reads those from a local disk)."""
    from sftgo.pipeline.readers import InputError

    fs, path = filesystem(url, options)
    with errors(url):
        info = fs.info(path)
        if info.get("type") != "directory":
            return [(url, posixpath.basename(path))], [], [], False
        listing = fs.find(path, detail=True)
    root = path.rstrip("/")
    found: list[tuple[str, str]] = []
    unknown: list[str] = []
    hidden: list[str] = []
    for name in sorted(listing, key=lambda p: p[len(root) :].strip("/").split("/")):
        if listing[name].get("type") == "directory":
            continue
        rel = name[len(root) :].strip("/")
        parts = rel.split("/")
        dot = next((i for i, part in enumerate(parts) if part.startswith(".")), None)
        if dot is not None:
            top = "/".join(parts[: dot + 1])
            if top not in hidden:
                hidden.append(top)
        elif parts[-1] in ("dataset_info.json", "dataset_dict.json"):
            where = "/".join(parts[:-1]) or "."
            raise InputError(
                f"Input {url} holds a datasets save_to_disk folder ({where}), which sftgo reads only from a "
                "local disk: copy it there, or store its data as .parquet or .jsonl files."
            )
        elif posixpath.splitext(rel)[1].lower() in _suffixes():
            found.append((storage.join(url, rel), rel))
        else:
            unknown.append(rel)
    return found, unknown, hidden, True


def _suffixes() -> dict:
    from sftgo.pipeline.readers import DATA_SUFFIXES

    return DATA_SUFFIXES


def open_binary(url: str, options: dict | None):
    """A seekable binary file of the object at `url`, buffered for fast readline (close it when done)."""
    from fsspec.spec import AbstractBufferedFile

    fs, path = filesystem(url, options)
    with errors(url):
        fh = fs.open(path, "rb", block_size=_BUFFER)  # a task reads its range, not a backend's default block
    return io.BufferedReader(fh, _BUFFER) if isinstance(fh, AbstractBufferedFile) else fh


def read_all(url: str, options: dict | None) -> bytes:
    """The whole object at `url` (JSON arrays and CSV files, which are parsed whole)."""
    fs, path = filesystem(url, options)
    with errors(url):
        return fs.cat_file(path)


def identity(url: str, options: dict | None) -> list[tuple[str, int, str]]:
    """(URL, size, version) of every object of one input (an object, a folder's objects, a glob's matches) as
    the store reports them: the version is the ETag where the store keeps one, else the modification time, so
    an object written again after a build started is a changed input."""
    out = []
    for each in expand(url, options):
        fs, path = filesystem(each, options)
        with errors(each):
            info = fs.info(path)
            listing = fs.find(path, detail=True) if info.get("type") == "directory" else {path: info}
        for name in sorted(listing):
            entry = listing[name]
            if entry.get("type") == "directory":
                continue
            out.append((fs.unstrip_protocol(name), int(entry.get("size") or 0), _version(entry)))
    return out


def _version(info: dict) -> str:
    for key in ("ETag", "etag", "md5Hash", "content_settings", "LastModified", "last_modified", "mtime", "created"):
        if info.get(key) is not None:
            return f"{key}={info[key]}"
    return ""


def overlap(out: str, inp: str) -> str | None:
    """How an output location and an input meet ("is the same as", "lies inside", "holds", or None) when either
    is a URL: the same store and bucket, one path inside the other (a glob counts from its folder part); a
    file:// URL meets local paths as its path does; a store never meets a local path."""
    a, b = _where(out), _where(inp)
    if a[0] != b[0]:
        return None
    if a[0] == "file":
        return local_overlap(a[1], b[1])
    x, y = a[1].rstrip("/"), b[1].rstrip("/")
    if x == y:
        return "is the same as"
    if x.startswith(y + "/"):
        return "lies inside"
    if y.startswith(x + "/"):
        return "holds"
    return None


def _where(location: str) -> tuple[str, str]:
    """(store, path) of a location: ("file", local path) for local paths and file:// URLs, else (scheme, the path
    after ://, a glob cut to its folder part)."""
    name = storage.scheme(location)
    rest = location.split("://", 1)[-1]
    if is_glob(location):
        rest = _GLOB.split(rest, 1)[0].rsplit("/", 1)[0]
    if name in (None, "file", "local"):
        return "file", rest if name else location
    return {"s3a": "s3", "gcs": "gs", "abfss": "abfs", "az": "abfs"}.get(name, name), rest
