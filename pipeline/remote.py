"""A build whose --out is a URL of an object store: its work under URL/.staging/WORK, written by the tasks themselves
(and a `sftgo-prep score URL`: its work under URL/.scoring/WORK, by the same means; pipeline/score.py).

Input: the output URL and its storage options (a `Store`, which travels to the workers with each task).
Output: `StoreWork`, the one thing `build` asks of where its tasks work -- the work folder a task sees, how a task is
called, what the driver reads back -- for a store; `LocalWork` is the same for a local folder and is today's code (the
task called as it is, on the folder).  On a store every task runs in a scratch folder of its worker: it fetches the
staged objects it reads, runs the very function a local build runs, and uploads what it wrote (a partition's .json
last: its presence marks the partition done), so the workers share no folder with the driver or each other.
`start` decides between a fresh start, a resume and "already holds this build"; `publish` copies the finished shards
and artifacts to their final keys, then the record of the inputs, then manifest.json LAST (the commit: readers trust
only what a manifest names, with its checksums), and removes the staging.
--overwrite on a store removes the old build's manifest only when the new build is ready to publish: until then the old
build stays readable; from that moment until the new manifest is written (the copies of the new shards) there is no
build at the URL (a reader is refused: no manifest), never a mix; old shards the new build does not name are removed
before its manifest is written.
A task of a killed build that an external cluster still runs checks, before it uploads, that its build start is still
the one the staging records; one that passes the check just before a new start replaces the staging can still leave
objects under its old work folder (never under the new one, whose name it does not know): the new build's resume
or clean-up removes them if they land before it; later ones stay under URL/.staging/ (which no manifest names) until
the next build into the URL clears its staging.
Cost: per task one download of the staged objects it reads and one upload of what it writes; publishing copies each
shard once inside the store.
"""

from __future__ import annotations

import functools
import json
import os
import re
import secrets
import tempfile
from dataclasses import dataclass, field

from sftgo.core import storage
from sftgo.core.errors import SftgoError
from sftgo.core.shards import MANIFEST, manifest_text

SCRATCH = "\x00scratch"  # what a task's work-folder argument says on a store: its worker's scratch folder
STAGING = ".staging"
SHARD_FILE = re.compile(r"shard-\d{5,}\.parquet")


@dataclass(frozen=True)
class Store:
    """A location in an object store and the options to open it (picklable: tasks carry it to the workers)."""

    url: str
    options: dict = field(default_factory=dict, hash=False)

    def open(self):
        """(filesystem, path of the location inside it), with no listing cached from before (other processes
        write here)."""
        fs, root = storage.filesystem(self.url, self.options)
        fs.invalidate_cache()
        return fs, root.rstrip("/")

    def child(self, *names: str) -> Store:
        return Store(storage.join(self.url, *names), self.options)


class StaleTaskError(SftgoError, RuntimeError):
    """A task of a build start that is no longer the current one: it writes nothing."""


def on_store(fn, work: Store, fetch: list, *args, record: str = "build.json"):
    """Worker task: fn(*args) in a scratch folder holding the objects `fetch` names that exist (an entry `name`:
    the object `work`/name, fetched to scratch/name; an entry (store, name, local): the object store/name from
    elsewhere, e.g. the shard a `score` rewrites, fetched to scratch/local); an argument SCRATCH[/name] stands for
    the scratch folder [/name].  What fn wrote there (names that start with '.' aside) is uploaded to `work`, .json
    files last.  A task whose start is no longer the current one (the object `record` beside its work folder names
    another) uploads nothing."""
    fs, root = work.open()
    with tempfile.TemporaryDirectory(prefix="sftgo-task-") as tmp:
        had = set()
        for item in fetch:
            source, name, local = (None, item, item) if isinstance(item, str) else item
            src_fs, src_root = (fs, root) if source is None else source.open()
            target = os.path.join(tmp, local)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            try:
                src_fs.get_file(f"{src_root}/{name}", target)
                had.add(local)
            except FileNotFoundError:
                pass
        result = fn(*[tmp + a[len(SCRATCH) :] if isinstance(a, str) and a.startswith(SCRATCH) else a for a in args])
        new = sorted((n for n in os.listdir(tmp) if n not in had and not n.startswith(".")), key=_json_last)
        if new:
            _check_current(fs, root, record)
        for name in new:
            fs.put_file(os.path.join(tmp, name), f"{root}/{name}")
    return result


def _json_last(name: str) -> tuple:
    return (name.endswith(".json"), name)


def _check_current(fs, work_root: str, record_name: str = "build.json") -> None:
    """The start whose work folder is `work_root` is still the one the record `record_name` beside that folder
    names (build.json in a build's .staging, score.json in a score's .scoring)."""
    staging, name = work_root.rsplit("/", 1)
    try:
        record = json.loads(fs.cat_file(f"{staging}/{record_name}"))
    except (FileNotFoundError, ValueError):
        record = None
    if not (isinstance(record, dict) and record.get("work") == name):
        raise StaleTaskError(
            f"The start {name} is no longer current (its {staging.rsplit('/', 1)[-1]} was replaced); nothing written."
        )


class LocalWork:
    """Where the tasks of a local build work: the work folder itself (today's code, called as it is)."""

    def __init__(self, work):
        self.dir = str(work)

    def task(self, fn):
        return fn

    def args(self, fetch: list[str], *args) -> tuple:
        return args

    def read(self, name: str) -> bytes | None:
        path = os.path.join(self.dir, name)
        if not os.path.exists(path):
            return None
        with open(path, "rb") as fh:
            return fh.read()

    def names(self) -> list[str]:
        return sorted(os.listdir(self.dir))


class StoreWork(LocalWork):
    """Where the tasks of a build (or a score) on a store work: URL/.staging/WORK (URL/.scoring/WORK), through each
    worker's scratch folder; `record` is the object beside WORK that names the current start."""

    def __init__(self, work: Store, record: str = "build.json"):
        self.dir, self.store, self.record = SCRATCH, work, record

    def task(self, fn):
        call = functools.partial(on_store, fn, record=self.record)
        call.__name__ = getattr(fn, "__name__", "task")  # (what a failure names)
        return call

    def args(self, fetch: list[str], *args) -> tuple:
        return (self.store, list(fetch), *args)

    def read(self, name: str) -> bytes | None:
        fs, root = self.store.open()
        try:
            return fs.cat_file(f"{root}/{name}")
        except FileNotFoundError:
            return None

    def names(self) -> list[str]:
        fs, root = self.store.open()
        try:
            return sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False))
        except FileNotFoundError:
            return []


def check_bucket(store: Store, what: str = "--out") -> None:
    """The bucket (or container) of `store` exists and answers; else one sentence (`what`, e.g. "--out", names the
    setting; "" none)."""
    fs, root = store.open()
    bucket = root.split("/", 1)[0]
    try:
        if fs.exists(bucket):
            return
        fs.ls(bucket, detail=False)  # exists() says False on any failure (s3fs): a listing raises the store's error
        return
    except FileNotFoundError:
        pass
    except Exception as exc:  # the store's own errors: credentials, endpoint, permission
        raise SftgoError(f"{what} {storage.sentence(exc, store.url)}".lstrip()) from None
    where = f"{what} {store.url}".lstrip()
    raise SftgoError(f"{where}: the bucket {bucket} does not exist; create it first (sftgo-prep creates no buckets).")


def read_json(store: Store, name: str):
    """The JSON object `name` under `store`, None when absent, {} when it is not JSON."""
    fs, root = store.open()
    try:
        value = json.loads(fs.cat_file(f"{root}/{name}"))
    except FileNotFoundError:
        return None
    except ValueError:
        return {}
    return value


def has_shards(store: Store) -> bool:
    fs, root = store.open()
    try:
        return any(SHARD_FILE.fullmatch(p.rsplit("/", 1)[-1]) for p in fs.ls(root, detail=False))
    except FileNotFoundError:
        return False


def remove_staging(store: Store) -> None:
    fs, root = store.open()
    if fs.exists(f"{root}/{STAGING}"):
        fs.rm(f"{root}/{STAGING}", recursive=True)


def new_work(store: Store, record: dict) -> str:
    """A fresh staging with a work folder of this start alone; its name."""
    remove_staging(store)
    name = secrets.token_hex(8)
    fs, root = store.open()
    fs.pipe_file(f"{root}/{STAGING}/build.json", json.dumps({**record, "work": name}, sort_keys=True).encode())
    return name


def keep_only(store: Store, work: str) -> None:
    """Remove from the staging what a start other than `work` left (a late task of a killed build)."""
    fs, root = store.open()
    for path in fs.ls(f"{root}/{STAGING}", detail=False):
        if path.rsplit("/", 1)[-1] not in ("build.json", work):
            fs.rm(path, recursive=True)


def publish(store: Store, work: str, names: list[str], built: dict, manifest: dict) -> None:
    """Commit a finished build: the old build's manifest goes (when there is one), the shards and artifacts are
    copied from the work folder to their final keys, old shards not in `names` are removed, then the record of the
    inputs, then manifest.json LAST; the staging is removed at the end."""
    fs, root = store.open()
    if fs.exists(f"{root}/{MANIFEST}"):
        fs.rm_file(f"{root}/{MANIFEST}")
    for name in names:
        fs.copy(f"{root}/{STAGING}/{work}/{name}", f"{root}/{name}")
    for path in fs.ls(root, detail=False):
        base = path.rsplit("/", 1)[-1]
        if SHARD_FILE.fullmatch(base) and base not in names:
            fs.rm_file(path)
    fs.pipe_file(f"{root}/.build.json", json.dumps(built, sort_keys=True).encode())
    fs.pipe_file(f"{root}/{MANIFEST}", manifest_text(manifest).encode())
    remove_staging(store)
