"""`sftgo-prep score DIR --strategy S`: add (or, with overwrite, recompute) a strategy's columns in
an existing build without re-reading the inputs.

Input: a finished build directory and the new strategies' parameters.
Output: every shard rewritten with importance_<S> / group_<S> added (other columns kept as they
are), the strategy's artifacts, and manifest.json updated.
Flow: per shard on the cluster, decode the tokens back to text (re-encoding must give the same
ids, else the shard is refused) and stage the strategy's columns (pass A), then the same fit +
score + group + write as a build (pipeline/finalize.py), into DIR/.scoring (pass B).  The tasks
write only into a work folder of this request's start (.scoring/WORK, named in .scoring/score.json),
from which the driver moves the shards and artifacts into .scoring: a task of a killed `score` that an
external cluster still runs cannot write into a later one.
Commit: the new manifest is written to .scoring first, then the shards and
artifacts are renamed into place and the manifest last, so a killed `score` resumes (or
finishes its commit) when run again, and readers never see a half-written file.  A pending
commit is finished only when it is this request's (.scoring/score.json), for this build, and
complete and intact (its manifest checked like the build's, its records and settings the build's,
every file it lists matching its checksum); anything else there is discarded with a note.
Trust: the build is read like every reader reads one (core.shards.verify_build), and its params
must hold every BuildConfig setting, each valid, before anything is computed from them.
On an object store (DIR a URL: s3://..., opened with the storage options): the lock is the store's lease
(core/lease.py) instead of DIR/.lock; the tasks run as a store build's do (pipeline/remote.py, StoreWork): each in
its worker's scratch folder, fetching the objects it reads (the shard it rewrites, the staged files) and uploading
what it writes into URL/.scoring/WORK, so the workers share no folder with the driver; a task whose start is no
longer the one .scoring/score.json names uploads nothing.  A store has no rename: a move is a copy then a delete,
in the same order as locally (the pending manifest in .scoring first, then the shards and artifacts to their final
keys, then manifest.json LAST, then .scoring removed), and the same code decides what a killed run left (`_Folder`
and `_Store` give both the same file operations).  What a reader sees during the commit window (locally too):
the shards are rewritten in place while manifest.json still names the old checksums, so a reader that verifies
checksums (verify_build, inspect, sftgo-train, load_shards) is refused until the new manifest is written, never
silently served a mix of old and new shards; one that reads without checksums would see a mix, as locally.
Cost: one read and one write of every shard plus the strategy's own scoring work; on a store each shard is
downloaded twice (pass A and pass B), its rewrite uploaded once and copied twice inside the store (into .scoring,
then to its key).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sftgo.core import lease, models, storage
from sftgo.core.errors import ConfigError, SftgoError
from sftgo.core.fileio import atomic_write_text, check_writable, file_sha256, output_target, remove, stream_sha256
from sftgo.core.locks import exclusive
from sftgo.core.shards import (
    MANIFEST,
    Location,
    ShardError,
    check_member_name,
    check_tokenizer,
    expected_columns,
    manifest_text,
    member_path,
    read_manifest,
    strategy_order,
    verify_build,
    verify_shard,
)
from sftgo.core.storage import parse_options
from sftgo.core.text import safe_text
from sftgo.grouping import registry
from sftgo.pipeline import executor, gpus, remote
from sftgo.pipeline.build import WORK_NAME, BuildError
from sftgo.pipeline.config import BuildConfig, check_strategies, ignored_settings
from sftgo.pipeline.finalize import fit_all, manifest_entry, write_partition
from sftgo.pipeline.prepare import (
    STAGED,
    part_name,
    stage_columns,
    stage_path,
    staged_table,
    worker_tokenizer,
    write_stage,
)

SCORING = ".scoring"
MARKER = "score.json"  # in SCORING: the key of the request it holds the work of


def _rows(col: pa.ChunkedArray, dtype) -> list[np.ndarray]:
    arr = col.combine_chunks()
    offsets = arr.offsets.to_numpy()
    values = arr.values.to_numpy().astype(dtype, copy=False)
    return [values[a:b] for a, b in zip(offsets[:-1] - offsets[0], offsets[1:] - offsets[0])]


def reconstruct(table: pa.Table, tok, shard: str) -> dict:
    """Rendered text, token character offsets and assistant content spans of shard rows."""
    ids = _rows(table["input_ids"], np.int32)
    masks = _rows(table["loss_mask"], np.int8)
    texts = tok.batch_decode([i.tolist() for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    encodings = tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
    offsets, spans = [], []
    for row, (i, m, enc) in enumerate(zip(ids, masks, encodings)):
        if enc.ids != i.tolist():
            raise ShardError(
                f"Shard {shard} row {row}: decoding its tokens and encoding them again does not give the same ids; "
                "build with this strategy instead of adding it with `score`."
            )
        off = np.asarray(enc.offsets, dtype=np.int32).reshape(-1, 2)
        runs, start = [], None
        for t, flag in enumerate(np.append(m, 0)):
            if flag and start is None:
                start = t
            elif not flag and start is not None:
                last = t - 1
                end = off[last, 0] if int(i[last]) in special else off[last, 1]  # end-of-turn is not content
                runs.append((int(off[start, 0]), int(end)))
                start = None
        offsets.append(off)
        spans.append(runs)
    return {
        "id": table["id"].to_pylist(),
        "input_ids": ids,
        "loss_mask": masks,
        "text": texts,
        "offsets": offsets,
        "spans": spans,
    }


def stage_shard(index: int, shard: str, cfg: BuildConfig, new: list, tokenizer: str, scoring: str, light: bool) -> dict:
    done = stage_path(scoring, index, "json")
    if done.exists():
        return json.loads(done.read_text())
    table = pq.read_table(shard, columns=["id", "input_ids", "loss_mask"])
    with executor.gc_paused():
        cols = reconstruct(table, worker_tokenizer(tokenizer, cfg.trust_remote_code, light), shard)
        staged = staged_table(cols, stage_columns(new, cols, cfg, tokenizer))
    return write_stage(scoring, index, staged, [], {"index": index, "written": len(cols["id"])}, new)


def _commit(place: _Folder, manifest: dict, new: list[str]) -> dict:
    """Move the rewritten shards and the artifacts of the strategies `new` of the checked pending
    `manifest` into place, then the manifest (last)."""
    place.check_held()
    for name in [s["path"] for s in manifest["shards"]] + registry.artifacts_of(new):
        if place.exists(place.scoring / name):
            place.replace(member_path(place.scoring, name), member_path(place.out, name))
    place.write_text(place.out / MANIFEST, manifest_text(manifest))
    place.remove(place.scoring)
    return manifest


def build_params(out: Path, manifest: dict) -> dict:
    """The build's own settings (manifest params): every BuildConfig setting present, nothing else,
    and each valid as if given on the command line; else one sentence naming the manifest."""
    params, known = manifest["params"], BuildConfig().params()
    odd = [f"no 'params.{k}'" for k in known if k not in params] + [
        f"an unknown 'params.{k}'" for k in params if k not in known
    ]
    if odd:
        raise ShardError(f"{out / MANIFEST} has {odd[0]} entry: it was edited or damaged.")
    try:
        BuildConfig(**params, out=str(out)).validate()
    except ValueError as exc:
        raise ShardError(
            f"{out / MANIFEST} has params sftgo would refuse ({str(exc).rstrip('.')}): it was edited or damaged."
        ) from None
    return params


def scoring_config(
    out: Path, manifest: dict, options: dict, workers: int, scheduler: str | None, progress: bool
) -> BuildConfig:
    """The build's own settings, with the options given for the new strategies (typed, validated)."""
    values = dict(build_params(out, manifest))
    values.update(options)
    values.update(out=str(out), workers=workers, scheduler=scheduler, progress=progress)
    return BuildConfig(**values).validate()


def request(
    out: Path,
    manifest: dict,
    new: list[str],
    options: dict,
    workers: int = 1,
    scheduler: str | None = None,
    progress: bool = False,
) -> tuple[BuildConfig, dict]:
    """(config, key) of adding `new` with `options` to the build whose manifest is `manifest`; the key
    (written to .scoring/score.json) names this request for this build: a .scoring with another is stale."""
    cfg = scoring_config(out, manifest, options, workers, scheduler, progress)
    have = strategy_order(manifest)
    cfg.strategies = have + [s for s in new if s not in have]
    key = {"new": new, "params": cfg.params(), "manifest_shards": manifest["shards"]}
    return cfg, json.loads(json.dumps(key))


def _request_of(marker):
    """The request a .scoring marker names (the name of its work folder aside)."""
    return {k: v for k, v in marker.items() if k != "work"} if isinstance(marker, dict) else marker


# ---------------------------------------------------------------- where the build lives: a folder or a store
class _Folder:
    """What `score` does to the files of a build in a local folder: `out` the build, `scoring` its DIR/.scoring;
    every path is `out / name` or below `scoring` (`_Store` does the same on an object store)."""

    options: dict | None = None

    def __init__(self, out: Path):
        self.out, self.scoring = out, out / SCORING

    @contextlib.contextmanager
    def lock(self):
        """Hold the build's lock (DIR/.lock) for the whole request."""
        if self.out.is_dir():
            check_writable(self.out)  # score rewrites the build in place
        with exclusive(self.out):
            _check_work_folder(self.out, self.scoring)
            yield

    def check_held(self) -> None:
        """The lock is still this request's (a local lock cannot be lost)."""

    def check_targets(self, names: list[str]) -> None:
        for name in names:
            output_target(self.out / name)  # what the commit replaces is a regular file (never a link of the user's)

    def work(self, name: str) -> remote.LocalWork:
        return remote.LocalWork(self.scoring / name)

    def base(self, name: str) -> tuple[list, str]:
        """(what a task fetches, the argument naming the file) for the build's shard `name` that a task rewrites."""
        return [], str(member_path(self.out, name))

    def exists(self, path) -> bool:
        return Path(path).exists()

    def children(self, folder) -> list[tuple[str, bool]]:
        """(name, is a folder of ours) of what `folder` holds."""
        return [(p.name, p.is_dir() and not p.is_symlink()) for p in Path(folder).iterdir()]

    def mkdir(self, path) -> None:
        Path(path).mkdir(exist_ok=True)

    def replace(self, src, dst) -> None:
        os.replace(src, dst)

    def remove(self, path) -> None:
        remove(path)

    def read_json(self, path):
        """The JSON in `path`, or None when it is missing or unreadable (a work file of ours, cut short or
        damaged)."""
        try:
            return json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            return None

    def write_text(self, path, text: str) -> None:
        atomic_write_text(path, text)

    def sha256(self, path) -> str | None:
        return file_sha256(path) if Path(path).is_file() else None

    def verify_shard(self, path, entry: dict, columns: dict) -> None:
        verify_shard(path, entry, columns)


class _Store(_Folder):
    """A build on an object store (URL): the same operations on its objects.  A store has no rename: a move is a
    copy and a delete (a kill between the two leaves both copies, the same bytes); the lock is the store's lease."""

    def __init__(self, url: str, options: dict):
        self.options, self.url = options, url
        self.out = Location(url)
        self.scoring = self.out / SCORING
        self.fs = storage.filesystem(url, options)[0]
        self.held = None

    @contextlib.contextmanager
    def lock(self):
        try:
            remote.check_bucket(remote.Store(self.url, self.options), "")
        except SftgoError as exc:
            raise ShardError(str(exc)) from None
        read_manifest(self.out, self.options)  # not a build: refused before the lease object is written
        with lease.held(self.url, self.options, "score") as held:
            self.held = held
            yield

    def check_held(self) -> None:
        if self.held is not None and self.held.lost():
            raise BuildError(
                f"Another writer took over {self.url} while this score ran (its lease changed); nothing was committed."
            )

    def check_targets(self, names: list[str]) -> None:
        """(Objects are no links: nothing to check.)"""

    def work(self, name: str) -> remote.StoreWork:
        return remote.StoreWork(remote.Store(self.scoring / name, self.options), MARKER)

    def base(self, name: str) -> tuple[list, str]:
        local = f".base/{check_member_name(self.out, name)}"  # (a dot name: fetched, never uploaded)
        return [(remote.Store(self.url, self.options), name, local)], f"{remote.SCRATCH}/{local}"

    def _key(self, path) -> str:
        return self.fs._strip_protocol(str(path)).rstrip("/")

    def exists(self, path) -> bool:
        self.fs.invalidate_cache()  # (tasks of other processes write here)
        return self.fs.exists(self._key(path))

    def children(self, folder) -> list[tuple[str, bool]]:
        self.fs.invalidate_cache()
        try:
            found = self.fs.ls(self._key(folder), detail=True)
        except FileNotFoundError:
            return []
        return [(e["name"].rstrip("/").rsplit("/", 1)[-1], e["type"] == "directory") for e in found]

    def mkdir(self, path) -> None:
        """(A store has no folders: a key's prefix is one.)"""

    def replace(self, src, dst) -> None:
        self.fs.copy(self._key(src), self._key(dst))
        self.fs.rm_file(self._key(src))

    def remove(self, path) -> None:
        if self.exists(path):
            self.fs.rm(self._key(path), recursive=True)

    def read_json(self, path):
        try:
            return json.loads(self.fs.cat_file(self._key(path)))
        except (OSError, UnicodeDecodeError, ValueError):
            return None

    def write_text(self, path, text: str) -> None:
        self.fs.pipe_file(self._key(path), text.encode("utf-8"))

    def sha256(self, path) -> str | None:
        try:
            with self.fs.open(self._key(path), "rb") as fh:
                return stream_sha256(fh)
        except (FileNotFoundError, IsADirectoryError):
            return None

    def verify_shard(self, path, entry: dict, columns: dict) -> None:
        verify_shard(path, entry, columns, fs=self.fs)


def _place(directory: str, options: dict) -> _Folder:
    """The build `directory` names: a local folder (a file:// URL is one), or a build on an object store."""
    if storage.is_remote(directory):
        return _Store(directory, options)
    if options:
        raise ConfigError(f"--storage-options is given, but {directory} is a local folder, not a store URL.")
    return _Folder(storage.local_path(directory, "DIR"))


def _work_folder(place: _Folder, marker) -> str:
    """The tasks' folder in .scoring: the one the marker of this same request names (resumed), else a new one;
    everything else in .scoring goes (a folder of an earlier start that a late task wrote into again, files
    moved out of the work folder by a run killed before its pending manifest was written).  Its name."""
    name = marker.get("work") if isinstance(marker, dict) else None
    if not (isinstance(name, str) and WORK_NAME.fullmatch(name)):
        name = secrets.token_hex(8)
    for child, is_folder in place.children(place.scoring):
        if child != MARKER and not (child == name and is_folder):
            place.remove(place.scoring / child)
    place.mkdir(place.scoring / name)
    return name


def _check_work_folder(out: Path, scoring: Path) -> None:
    """DIR/.scoring, where it exists, is a folder of ours: not a symlink (nothing is read or moved from
    elsewhere) nor a file."""
    if scoring.is_symlink() or (scoring.exists() and not scoring.is_dir()):
        raise ShardError(
            f"{scoring} is a symlink or a file, not the work folder `sftgo-prep score` keeps in {out}; "
            "remove it and run again."
        )


def _clash(out, manifest: dict, new: list[str], overwrite: bool) -> None:
    clash = [s for s in new if s in strategy_order(manifest)]
    if clash and not overwrite:
        raise BuildError(f"{out} already has '{clash[0]}' groups; pass --overwrite to compute them again.")


def run(
    directory: str,
    new: list[str],
    options: dict,
    workers: int = 2,
    scheduler: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    storage_options: dict | None = None,
) -> dict:
    """Add strategies `new` to the build in `directory` (a folder, or a URL of an object store opened with
    `storage_options`); `options` overrides BuildConfig fields (eta, models)."""
    check_strategies(new)
    place = _place(directory, parse_options(storage_options))
    out, scoring = place.out, place.scoring
    with place.lock():
        manifest = read_manifest(out, place.options)
        if place.exists(scoring / MANIFEST):  # a previous run was killed while committing, or a stale folder
            done = _resume_commit(place, manifest, new, options, overwrite)
            if done is not None:
                return done
        _clash(out, manifest, new, overwrite)
        cfg, key = request(out, manifest, new, options, workers, scheduler, progress)
        for note in ignored_settings(BuildConfig(**options, workers=workers, scheduler=scheduler), new):  # given here
            print(f"Note: {note}", file=sys.stderr)
        marker = scoring / MARKER  # what an unfinished run was computing; anything else is stale
        if place.exists(scoring) and _request_of(place.read_json(marker)) != key:
            place.remove(scoring)
        verify_build(out, manifest, options=place.options)  # counts, paths, checksums, schemas: before a model loads
        place.check_targets([s["path"] for s in manifest["shards"]] + registry.artifacts_of(new) + [MANIFEST])
        tok, light = models.load_build_tokenizer(manifest["tokenizer"]["name"], cfg.trust_remote_code)
        check_tokenizer(out, manifest, models.tokenizer_fingerprint(tok))
        place.mkdir(scoring)
        work = _work_folder(place, place.read_json(marker))
        place.write_text(marker, json.dumps({**key, "work": work}, sort_keys=True))
        updated = _score(cfg, manifest, [registry.get(s) for s in new], place, work, light)
        place.check_held()
        place.write_text(scoring / MANIFEST, manifest_text(updated))
        return _commit(place, updated, new)


# ---------------------------------------------------------------- a commit left by a killed run
def _resume_commit(place: _Folder, manifest: dict, new: list[str], options: dict, overwrite: bool) -> dict | None:
    """Finish the commit a killed `score` left in .scoring if it is this request's, for this build
    (`manifest`), complete and intact: the committed manifest.  Anything else is discarded with a note
    (None: score as usual), or refused in one sentence where discarding would lose a half-done commit."""
    marker = place.read_json(place.scoring / MARKER)
    try:
        staged = read_manifest(place.scoring, place.options)
    except ShardError as exc:
        return _discard(place, f"its manifest is damaged ({str(exc).rstrip('.')})")
    if staged == manifest:
        return _finished(place, manifest, new, options, marker)
    cfg, key = request(place.out, manifest, new, options)
    if _request_of(marker) != key:
        return _not_this_request(place, manifest, staged, marker)
    problem = _pending_problem(place, manifest, staged, cfg, new)
    if problem:
        return _discard(place, problem)
    _clash(place.out, manifest, new, overwrite)
    return _commit(place, staged, new)


def _discard(place: _Folder, why: str) -> None:
    place.remove(place.scoring)
    print(
        f"Note: discarded {safe_text(str(place.scoring))}, left by an earlier `sftgo-prep score`: {why}.",
        file=sys.stderr,
    )
    return None


def _finished(place: _Folder, manifest: dict, new: list[str], options: dict, marker) -> dict | None:
    """The manifest in .scoring is already the build's: only the clean-up was left.  The manifest when
    that run was this request (its groups are in place), else None (score as usual)."""
    _, key = request(place.out, manifest, new, options)  # the params an earlier run of this request recorded
    place.remove(place.scoring)
    if isinstance(marker, dict) and marker.get("new") == new and marker.get("params") == key["params"]:
        return verify_build(place.out, manifest, options=place.options)
    print(
        f"Note: removed {safe_text(str(place.scoring))}, left by an earlier `sftgo-prep score`: what it held is "
        "already in place.",
        file=sys.stderr,
    )
    return None


def _not_this_request(place: _Folder, manifest: dict, staged: dict, marker) -> None:
    """A pending commit of another request (or build, or none we know): discarded, unless it is this
    build's and already half moved into place (discarding it would leave the build half rewritten)."""
    names = marker.get("new") if isinstance(marker, dict) else None
    ours = (
        isinstance(names, list)
        and all(isinstance(n, str) for n in names)
        and marker.get("manifest_shards") == manifest["shards"]
    )
    if ours and any(not place.exists(place.scoring / s["path"]) for s in staged["shards"]):
        raise ShardError(
            f"{place.out} is half-way through committing an earlier `sftgo-prep score --strategy "
            f"{','.join(names)}` with other settings; run that command again to finish it first."
        )
    return _discard(place, "it holds the commit of another request or of another build")


def _pending_problem(place: _Folder, manifest: dict, staged: dict, cfg: BuildConfig, new: list[str]) -> str | None:
    """Why the pending manifest `staged` is not the complete, intact result of this request on this
    build, or None: the same records and settings, the new strategies' entries, every file it lists."""
    added = {s: staged["strategies"].get(s) for s in new}
    if not all(isinstance(e, dict) and e for e in added.values()):
        return "it lacks an entry of the strategies it adds"
    same = json.loads(json.dumps(updated_manifest(manifest, cfg, added, staged["shards"])))
    shape = lambda m: [(s["path"], s["rows"], s["tokens"], s["loss_tokens"]) for s in m["shards"]]  # noqa: E731
    if staged != same or shape(staged) != shape(manifest):
        return "it does not describe this build's records and settings"
    for s in new:
        if not _entry_matches(added[s], registry.get(s), cfg):
            return f"its '{s}' entry has other settings than this request"
    return _files_problem(place, staged, cfg, new)


def _entry_matches(entry: dict, strategy, cfg: BuildConfig) -> bool:
    """A new strategy's manifest entry holds this request's settings and exactly its artifact files."""
    want = json.loads(
        json.dumps({"eta": cfg.eta, "num_groups": cfg.num_groups, "threshold": cfg.threshold, **strategy.params(cfg)})
    )
    files = [a.get("path") for a in entry.values() if isinstance(a, dict) and "path" in a]
    return all(entry.get(k) == v for k, v in want.items()) and sorted(files) == sorted(
        registry.artifact_files(strategy)
    )


def _files_problem(place: _Folder, staged: dict, cfg: BuildConfig, new: list[str]) -> str | None:
    """Every shard and new artifact the pending manifest lists, in .scoring or (already moved) in the
    build, matches its entry: checksum, and for shards the columns of every strategy and the rows."""
    columns = expected_columns(cfg.strategies)
    try:
        for entry in staged["shards"]:
            place.verify_shard(_pending_file(place, entry["path"]), entry, columns)
        for s in new:
            for artifact in staged["strategies"][s].values():
                if isinstance(artifact, dict) and "path" in artifact:
                    path = _pending_file(place, artifact["path"])
                    if place.sha256(path) != artifact.get("sha256"):
                        raise ShardError(f"{path} is missing or does not match its checksum")
    except ShardError as exc:
        return f"a file it lists is missing or damaged ({str(exc).rstrip('.')})"
    return None


def _pending_file(place: _Folder, name: str):
    """Where pending file `name` is: still in .scoring, or already moved into the build."""
    path = member_path(place.scoring, name)
    return path if place.exists(path) else member_path(place.out, name)


def updated_manifest(manifest: dict, cfg: BuildConfig, added: dict, entries: list) -> dict:
    """The manifest after scoring: `added` strategy entries and the rewritten shards' `entries`; the
    build's own grouping settings stay (each strategy's entry has its own)."""
    params = cfg.params()
    for key in ("eta", "threshold", "num_groups"):
        params[key] = manifest["params"].get(key, params[key])
    old = manifest["strategies"]
    return {
        **manifest,
        "params": params,
        "shards": entries,
        "strategies": {s: added.get(s) or old[s] for s in cfg.strategies},
    }


def _score(cfg: BuildConfig, manifest: dict, new: list, place: _Folder, work_name: str, light: bool) -> dict:
    """Pass A, fit, pass B on the cluster, the tasks writing into the work folder `work_name` (on a store, each in
    its worker's scratch folder, fetching what it reads and uploading what it writes); the rewritten shards and
    the new artifacts moved into .scoring; the updated manifest (not yet written)."""
    tok_location = models.tokenizer_dir(manifest["tokenizer"]["name"])
    shards = manifest["shards"]
    indices = list(range(len(shards)))
    work = place.work(work_name)
    w = work.dir
    arts = registry.artifacts_of([s.name for s in new])
    bases = [place.base(s["path"]) for s in shards]
    with executor.client(cfg.workers, cfg.scheduler, cfg.gpu_workers == "cuda") as c:
        model_resources = gpus.model_task_resources(c, cfg.gpu_workers, new)  # pass A runs the models
        executor.map_tasks(
            c,
            work.task(stage_shard),
            [
                work.args([part_name(i, "json"), *fetch], i, base, cfg, new, tok_location, w, light)
                for i, (fetch, base) in enumerate(bases)
            ],
            "score",
            cfg.progress,
            model_resources,
        )
        artifacts, thresholds = fit_all(c, cfg, new, w, indices, manifest["totals"]["records_written"], w, work)
        entries = executor.map_tasks(
            c,
            work.task(write_partition),
            [
                work.args(
                    [part_name(i, STAGED), part_name(i, "scores.parquet"), s["path"], *arts, *fetch],
                    i,
                    cfg,
                    new,
                    w,
                    base,
                    os.path.join(w, s["path"]),
                    artifacts,
                    w,
                    thresholds,
                )
                for i, (s, (fetch, base)) in enumerate(zip(shards, bases))
            ],
            "write",
            cfg.progress,
        )
    folder = place.scoring / work_name
    for name in [s["path"] for s in shards] + arts:
        if place.exists(folder / name):
            place.replace(member_path(folder, name), member_path(place.scoring, name))
    added = {s.name: manifest_entry(s, cfg, artifacts, thresholds) for s in new}
    return updated_manifest(manifest, cfg, added, entries)
