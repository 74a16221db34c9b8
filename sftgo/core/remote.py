"""Read an sftgo build from an object store (s3://, gs://, ...): its manifest, its shards' footers, and its shards
downloaded one at a time through a bounded local cache.

Input: a build URL (what `sftgo-prep build` wrote: manifest.json, shard-*.parquet, strategy artifacts) and storage
options (sftgo.core.storage).  Output: `RemoteBuild` (the manifest, read once; footers; `download` of one member
with its sha256 checked as it arrives), `ShardCache` (a bounded folder that streams a list of shards: downloaded a
few ahead on a background thread, each deleted once read) and `fetch_build` (the whole build into a local folder,
for readers that need every shard at once: inspect, load_shards).
Cost: one listing and one manifest read per build and process; a few small range reads per shard footer; each
shard's bytes once per pass, hashed while they are written.

Trust: a store has no lock, so a reader of a store trusts only what the manifest names: a member it does not name is
never read, a file name that is not plain is refused, and every shard is held to the manifest's sha256 (a shard
replaced or damaged on the store is refused naming it).  What the manifest itself says is checked as for a local
build (core.shards.check_manifest).
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
import types
from pathlib import Path

from sftgo.core import storage
from sftgo.core.errors import SftgoError
from sftgo.core.shards import (
    MANIFEST,
    ShardError,
    check_footer,
    check_member_name,
    check_tokenizer,
    checksum_message,
    expected_columns,
    parse_manifest,
)

CHUNK = 1 << 20  # bytes per read from the store


def _store_error(exc: BaseException, location: str) -> SftgoError:
    """One sentence for what a store raised (core.storage.sentence); sftgo's own errors pass unchanged."""
    if isinstance(exc, SftgoError):
        return exc
    return storage.StorageError(storage.sentence(exc, location))


class RemoteBuild:
    """A build on a store, read-only.  The manifest and the listing of sizes are read once."""

    def __init__(self, url: str, options: dict | None = None):
        self.url = str(url).rstrip("/")
        self.fs, self.root = storage.filesystem(self.url, options)
        self.root = self.root.rstrip("/")
        self._manifest: dict | None = None
        self._sizes: dict[str, int] | None = None
        self._footers: dict[str, object] = {}

    def url_of(self, name: str) -> str:
        """The URL of manifest member `name` (a plain file name; anything else is refused)."""
        return storage.join(self.url, check_member_name(self.url, name))

    def _path(self, name: str) -> str:
        return f"{self.root}/{check_member_name(self.url, name)}"

    @property
    def manifest(self) -> dict:
        if self._manifest is None:
            try:
                data = self.fs.cat_file(f"{self.root}/{MANIFEST}")
            except FileNotFoundError:
                if not self.fs.exists(self.root.split("/")[0]):
                    missing = FileNotFoundError("no such bucket")
                    raise storage.StorageError(storage.sentence(missing, self.url)) from None
                raise ShardError(
                    f"{self.url} has no {MANIFEST}: the build did not complete or this is not an sftgo-prep output."
                ) from None
            except Exception as exc:
                raise _store_error(exc, self.url) from None
            self._manifest = parse_manifest(self.url, data)
        return self._manifest

    def size(self, name: str) -> int:
        """The bytes of member `name` on the store (from one listing of the build); a member the manifest names
        but the store lacks is refused naming it."""
        if self._sizes is None:
            try:
                listing = self.fs.ls(self.root, detail=True)
            except Exception as exc:
                raise _store_error(exc, self.url) from None
            self._sizes = {e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0) for e in listing}
        check_member_name(self.url, name)
        if name not in self._sizes:
            raise ShardError(f"{self.url_of(name)}, listed in the manifest, is missing on the store.")
        return self._sizes[name]

    def footer(self, name: str):
        """The Parquet footer of member `name` (read with a few range requests, kept): .metadata, .schema_arrow."""
        if name not in self._footers:
            import pyarrow.parquet as pq

            self.size(name)
            try:
                with self.fs.open(self._path(name), "rb") as fh:
                    meta = pq.ParquetFile(fh).metadata
            except (OSError, ValueError) as exc:
                if isinstance(exc, (FileNotFoundError, PermissionError)):
                    raise _store_error(exc, self.url_of(name)) from None
                raise ShardError(f"Shard {self.url_of(name)} is not a readable Parquet file ({exc}).") from None
            except Exception as exc:
                raise _store_error(exc, self.url_of(name)) from None
            self._footers[name] = types.SimpleNamespace(metadata=meta, schema_arrow=meta.schema.to_arrow_schema())
        return self._footers[name]

    def verify(self, strategies: tuple[str, ...] = (), tokenizer_fingerprint: str | None = None) -> dict:
        """core.shards.verify_shards for a store: the tokenizer, the strategies, every member name, and every shard's
        presence, columns and row count from its footer.  Checksums are checked as each shard is downloaded."""
        manifest = self.manifest
        if tokenizer_fingerprint is not None:
            check_tokenizer(self.url, manifest, tokenizer_fingerprint)
        for strategy in strategies:
            if strategy not in manifest.get("strategies", {}):
                have = ", ".join(sorted(manifest.get("strategies", {}))) or "none"
                raise ShardError(
                    f"{self.url} has no '{strategy}' groups (it has: {have}); add them with `sftgo-prep score`."
                )
        for name in members(manifest):
            check_member_name(self.url, name)
        expected = expected_columns(strategies)
        for shard in manifest["shards"]:
            check_footer(self.url_of(shard["path"]), self.footer(shard["path"]), shard, expected)
        return manifest

    def download(self, name: str, dest: Path, sha256: str | None = None, cancel=None) -> bool:
        """Member `name` written to `dest`, hashed as it arrives: a shard whose sha256 is not `sha256`, or that holds
        more bytes than the listing said, is refused naming it (and `dest` removed).  False (and `dest` removed) when
        the event `cancel` is set before it is complete."""
        size, where = self.size(name), self.url_of(name)
        digest, written = hashlib.sha256(), 0
        try:
            with self.fs.open(self._path(name), "rb") as src, open(dest, "wb") as out:
                while chunk := src.read(CHUNK):
                    if cancel is not None and cancel.is_set():
                        raise _Cancelled
                    written += len(chunk)
                    if written > size:
                        raise ShardError(f"Shard {where} changed on the store while it was read; run again.")
                    digest.update(chunk)
                    out.write(chunk)
            if sha256 is not None and digest.hexdigest() != sha256:
                raise ShardError(checksum_message(where))
        except _Cancelled:
            dest.unlink(missing_ok=True)
            return False
        except SftgoError:
            dest.unlink(missing_ok=True)
            raise
        except Exception as exc:
            dest.unlink(missing_ok=True)
            local = isinstance(exc, OSError) and getattr(exc, "filename", None) == str(dest)
            if local:  # the cache folder, not the store: the caller's os_error_sentence names it
                raise
            raise _store_error(exc, where) from None
        return True


class _Cancelled(Exception):
    """The reader stopped while a download was under way."""


def members(manifest: dict) -> list[str]:
    """Every file a build's manifest names: its shards, then its strategies' artifacts (e.g. idf.parquet)."""
    names = [s["path"] for s in manifest["shards"]]
    for entry in manifest.get("strategies", {}).values():
        for artifact in entry.values() if isinstance(entry, dict) else ():
            if isinstance(artifact, dict) and isinstance(artifact.get("path"), str):
                names.append(artifact["path"])
    return list(dict.fromkeys(names))


def fetch_build(url: str, dest: Path, options: dict | None = None) -> Path:
    """The whole build at `url` copied into the local folder `dest` (manifest and every member it names, each shard
    checked against its sha256 as it arrives); returns `dest`.  For readers that need all shards at once."""
    build = RemoteBuild(url, options)
    manifest = build.manifest
    dest.mkdir(parents=True, exist_ok=True)
    sums = {s["path"]: s["sha256"] for s in manifest["shards"]}
    for name in members(manifest):
        build.download(name, dest / name, sums.get(name))
    (dest / MANIFEST).write_bytes(build.fs.cat_file(f"{build.root}/{MANIFEST}"))
    return dest


class ShardCache:
    """A local folder through which one process streams shards of one build, within `limit` bytes.

    `local_paths(names)` yields the local path of each shard in turn: a background thread downloads up to `ahead`
    shards beyond the one being read (while their bytes fit the limit beside what the folder holds), each checked
    against its sha256 as it arrives; a shard is deleted when the reader asks for the next one (or stops).  So the
    folder never holds more than `limit` bytes, whatever the size of the build, provided the limit holds its largest
    shard (the caller checks).  `peak_bytes` is the most the folder held, measured on disk after each download;
    `passes` the shards downloaded by each call of local_paths (one list per pass, e.g. an epoch), in order.
    """

    def __init__(self, build: RemoteBuild, folder: Path, limit: int, ahead: int = 2):
        self.build, self.folder, self.limit, self.ahead = build, Path(folder), int(limit), max(0, int(ahead))
        self.folder.mkdir(parents=True, exist_ok=True)
        self.held = 0  # bytes reserved by downloaded or downloading shards
        self.peak_bytes = 0
        self.passes: list[list[str]] = []
        self._cond = threading.Condition()
        self._sums = {s["path"]: s["sha256"] for s in build.manifest["shards"]}

    def largest(self) -> int:
        return max((self.build.size(n) for n in self._sums), default=0)

    def disk_bytes(self) -> int:
        """What the folder holds on disk now.  The reader releases (deletes) shards while the download thread measures:
        a file listed but gone before its size is read holds nothing."""
        total = 0
        with os.scandir(self.folder) as entries:
            for e in entries:
                try:
                    total += e.stat().st_size if e.is_file() else 0
                except FileNotFoundError:
                    continue
        return total

    def _reserve(self, size: int, files: list, stop: threading.Event) -> bool:
        """Wait until a shard of `size` bytes fits beside what is held (at most 1 + ahead files of this reader) and
        reserve its bytes; False when the reader has gone."""
        with self._cond:
            while files and (len(files) > self.ahead or self.held + size > self.limit):
                if stop.is_set():
                    return False
                self._cond.wait(0.1)
            if stop.is_set():
                return False
            self.held += size
            return True

    def _release(self, path: Path, size: int) -> None:
        path.unlink(missing_ok=True)
        with self._cond:
            self.held -= size
            self._cond.notify_all()

    def local_paths(self, names):
        """Local paths of the shards `names`, in order (see the class)."""
        names = list(names)
        fetched: list[str] = []
        with self._cond:
            self.passes.append(fetched)
            pass_no = len(self.passes)  # in the file names: a pass being closed never removes another's files
        q: queue.Queue = queue.Queue()
        stop = threading.Event()
        files: list = []  # (path, size) downloaded or downloading and not yet released, oldest first
        lock = threading.Lock()

        def work():
            try:
                for i, name in enumerate(names):
                    size = self.build.size(name)
                    if not self._reserve(size, files, stop):
                        return
                    path = self.folder / f"{pass_no:04d}-{i:06d}-{name}"
                    with lock:
                        files.append((path, size))
                    if not self.build.download(name, path, self._sums.get(name), cancel=stop):
                        return
                    with self._cond:
                        fetched.append(name)
                        self.peak_bytes = max(self.peak_bytes, self.disk_bytes())
                    q.put(path)
            except BaseException as exc:  # handed to the reader
                q.put(exc)

        thread = threading.Thread(target=work, daemon=True, name="sftgo-shard-cache")
        thread.start()
        try:
            for _ in names:
                item = q.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                with lock:  # the reader asks for the next shard: this one is done with
                    done = files.pop(0)
                self._release(*done)
        finally:
            stop.set()
            thread.join(timeout=60)  # it sees `stop` within one chunk of the download it is in
            with lock:
                left, files[:] = list(files), []
            for path, size in left:
                self._release(path, size)
