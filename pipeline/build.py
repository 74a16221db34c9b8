"""`sftgo-prep build`: inputs -> tokenized, scored, grouped Parquet shards + manifest.

Input: a BuildConfig.
Output: in config.out, shard-NNNNN.parquet (one per partition: rows_per_shard rows of one input), idf.parquet for
tfidf, and manifest.json written last; the manifest dict is also returned.  config.out may be the URL of an object
store (s3://...): the tasks then write their work there themselves and the driver publishes it (pipeline/remote.py),
under a lease instead of the directory lock (core/lease.py).
Flow: plan partitions (driver) -> pass 1 on the cluster (prepare.py: tokenize, stage each
strategy's columns and corpus statistics) -> fit the strategies' artifacts (e.g. the IDF) and,
with --threshold corpus, the corpus cut-offs -> pass 2 on the cluster (finalize.py: score,
group, write shards; the same code `sftgo-prep score` runs) -> manifest (driver).
Reliability: an exclusive lock on out/.lock refuses a second concurrent build; every
file is written atomically; a build run again after being killed reuses every staged
partition and finished shard, so only unfinished work is redone and the result is
byte-identical to an uninterrupted build.  The tasks write only into a work folder of their
own build start (.staging/WORK, WORK a random name recorded in .staging/build.json), and the
driver moves the finished shards and artifacts into out/: a task of a killed build that an
external cluster still runs cannot write into a later build (its folder is gone, so it fails).
Cost: two reads of the data on the driver for planning JSONL (line offsets); the
rest runs on the workers, linear in tokens.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from sftgo import __version__ as VERSION
from sftgo.core import lease, models, storage
from sftgo.core.errors import SftgoError
from sftgo.core.fileio import atomic_write, atomic_write_text, check_writable, output_target, overlap, remove
from sftgo.core.locks import exclusive
from sftgo.core.shards import FORMAT_VERSION, MANIFEST, ShardError, read_manifest, verify_shards, write_manifest
from sftgo.core.storage import is_url
from sftgo.core.text import safe_text
from sftgo.grouping import registry
from sftgo.pipeline import executor, gpus, readers, remote, sources
from sftgo.pipeline.config import BuildConfig, ignored_settings
from sftgo.pipeline.finalize import fit_all, manifest_entry, shard_name, write_partition
from sftgo.pipeline.prepare import (
    STAGED,
    part_name,
    prepare_partition,
    read_staged,
    tokenizer_facts,
    warm_up,
)

STAGING = ".staging"
BUILT = ".build.json"  # the parameters and input files (sizes, mtimes) of the finished build
SCORING = ".scoring"  # the staging folder of `sftgo-prep score` (pipeline/score.py)
SHARD_FILE = re.compile(r"shard-\d{5,}\.parquet")
WORK_NAME = re.compile(r"[0-9a-f]{16}")  # .staging/WORK: the tasks' folder of one build start


class BuildError(SftgoError, RuntimeError):
    """A build cannot start or finish; the message is one sentence for the user."""


def _input_identity(cfg: BuildConfig) -> list:
    """Sizes and mtimes of local inputs, sizes and ETags (or modification times) of objects in a store: a resumed
    build must read the same files."""
    ident = []
    for inp in cfg.inputs:
        if is_url(inp):
            ident.append([inp, sources.identity(inp, cfg.storage_options)])
            continue
        p = Path(inp)
        files = sorted(p.rglob("*")) if p.is_dir() else [p]
        ident.append([inp, [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]])
    return ident


def _clear(out: Path) -> None:
    """Remove what a build writes (and nothing else): shard-NNNNN.parquet, the artifacts, the manifest
    (an sftgo one: _check_ours refused the folder otherwise), the record of the inputs and the staging
    folders of build and score."""
    for p in out.glob("shard-*.parquet"):
        if SHARD_FILE.fullmatch(p.name):
            p.unlink()
    for name in (MANIFEST, BUILT, *registry.artifacts_of(registry.names())):
        (out / name).unlink(missing_ok=True)
    for folder in (STAGING, SCORING):
        shutil.rmtree(out / folder, ignore_errors=True)


def _check_ours(out: Path) -> None:
    """Refuse an --out folder whose manifest.json sftgo did not write (its files are not ours to replace)."""
    path = out / MANIFEST
    if not path.exists():
        return
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        manifest = None
    _refuse_foreign(out, manifest)


def _refuse_foreign(out, manifest) -> None:
    """Refuse an --out whose manifest (None: unreadable) sftgo did not write."""
    if not (isinstance(manifest, dict) and "sftgo_version" in manifest and "format_version" in manifest):
        raise BuildError(
            f"--out {out} holds a {MANIFEST} that sftgo-prep did not write; choose another --out "
            "(sftgo-prep replaces only its own builds)."
        )


def _check_complete(out, manifest: dict, key: dict, built=None, options: dict | None = None) -> None:
    """A finished build of the same parameters is current only if its inputs are unchanged (the record
    BUILT that the build left; on a store `built` is its JSON, None when absent) and its shards are whole."""
    if not isinstance(out, Path):
        record = built
    elif (out / BUILT).is_file():
        try:
            record = json.loads((out / BUILT).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            record = {}
    else:
        record = None
    if record is not None:
        inputs = record.get("inputs") if isinstance(record, dict) else None
        if inputs != json.loads(json.dumps(key["inputs"])):
            raise BuildError(
                f"{out} holds a finished build with these parameters, but its inputs changed since "
                "(or its record of them is damaged); pass --overwrite to rebuild it."
            )
    else:
        print(
            f"Note: {out} was built by an older sftgo, which kept no record of its input files; whether they "
            "changed since is not checked.",
            file=sys.stderr,
        )
    try:
        verify_shards(out, manifest, tuple(manifest.get("strategies", {})), options=options)
    except ShardError as exc:
        raise BuildError(
            f"{out} holds a finished build with these parameters that is not whole: "
            f"{str(exc).rstrip('.')}; pass --overwrite to rebuild it."
        ) from None


def _start(cfg: BuildConfig, out: Path, parts: list) -> tuple[Path, Path, bool]:
    """Decide between fresh start, resume and refusal. Returns (staging dir, the tasks' work folder in it,
    already_complete).  The record of a start holds the plan's digest: a resumed build must cut the inputs
    into the same partitions (else its staged partitions would be other records)."""
    staging = out / STAGING
    key = {"params": cfg.params(), "inputs": _input_identity(cfg), "staged": STAGED, "plan": readers.plan_digest(parts)}
    if not cfg.overwrite and (staging.is_symlink() or staging.is_file()):
        raise BuildError(
            f"{staging} is a symlink or a file, not the staging folder sftgo-prep keeps in {out}; remove "
            "it or pass --overwrite."
        )
    for tmp in out.glob(".*.tmp"):  # temporaries of atomic writes cut short by a kill (we hold the lock)
        tmp.unlink()
    _check_ours(out)
    if cfg.overwrite:
        _clear(out)
    elif (out / MANIFEST).exists():
        manifest = read_manifest(out)
        if manifest.get("params") != cfg.params():
            raise BuildError(
                f"{out} already holds a finished build with other parameters; pass --overwrite to replace it."
            )
        _check_complete(out, manifest, key)
        shutil.rmtree(staging, ignore_errors=True)  # a kill between the manifest and the clean-up
        return staging, staging, True
    elif (staging / "build.json").exists():
        return staging, _resumed_work(out, staging, key), False
    elif any(SHARD_FILE.fullmatch(p.name) for p in out.glob("shard-*.parquet")):
        raise BuildError(f"{out} holds shards but no manifest or staging; pass --overwrite to replace them.")
    remove(staging)  # what a build killed before it recorded itself left
    staging.mkdir(parents=True)
    work = staging / secrets.token_hex(8)  # this start's own: no task of an earlier build writes into it
    work.mkdir()
    atomic_write_text(staging / "build.json", json.dumps({**key, "work": work.name}, sort_keys=True))
    return staging, work, False


def _resumed_work(out: Path, staging: Path, key: dict) -> Path:
    """The work folder of the unfinished build in `staging` when it is this one (same parameters, inputs and
    staged format), else one sentence; what else is in `staging` (a folder of an earlier start that a late
    task of a killed build wrote into again) is removed."""
    try:
        found = json.loads((staging / "build.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        found = None
    work = _recorded_work(out, found, key)
    for p in staging.iterdir():
        if p.name not in ("build.json", work):
            remove(p)
    if (staging / work).is_symlink() or (staging / work).is_file():
        remove(staging / work)
    (staging / work).mkdir(exist_ok=True)
    return staging / work


def _recorded_work(out, found, key: dict) -> str:
    """The work folder's name that the record `found` of an unfinished build names when that build is this one
    (same parameters, inputs and staged format), else one sentence."""
    if not isinstance(found, dict):
        raise BuildError(
            f"{out} holds an unfinished build whose record ({STAGING}/build.json) is damaged; pass "
            "--overwrite to start again."
        )
    expected = json.loads(json.dumps(key))
    rest = {k: v for k, v in found.items() if k != "work"}
    work = found.get("work")
    if rest != expected:
        if {**rest, "staged": STAGED, "plan": expected["plan"]} == expected:  # sftgo's own formats differ
            raise BuildError(
                f"{out} holds an unfinished build staged by another version of sftgo; pass --overwrite to start again."
            )
        raise BuildError(
            f"{out} holds an unfinished build with other parameters or inputs; pass --overwrite to start again."
        )
    if not (isinstance(work, str) and WORK_NAME.fullmatch(work)):
        raise BuildError(
            f"{out} holds an unfinished build staged by another version of sftgo; pass --overwrite to start again."
        )
    return work


def _start_store(cfg: BuildConfig, store: remote.Store, parts: list) -> tuple[str | None, bool]:
    """_start for an --out on an object store: (the work folder's name, already_complete).  --overwrite keeps the
    old build until the new one publishes (remote.publish)."""
    key = {"params": cfg.params(), "inputs": _input_identity(cfg), "staged": STAGED, "plan": readers.plan_digest(parts)}
    found = remote.read_json(store, MANIFEST)
    if found is not None:
        _refuse_foreign(cfg.out, found)
        if not cfg.overwrite:
            manifest = read_manifest(cfg.out, cfg.storage_options)
            if manifest.get("params") != cfg.params():
                raise BuildError(
                    f"{cfg.out} already holds a finished build with other parameters; pass --overwrite to replace it."
                )
            _check_complete(cfg.out, manifest, key, remote.read_json(store, BUILT), cfg.storage_options)
            remote.remove_staging(store)  # a kill between the manifest and the clean-up
            return None, True
    if not cfg.overwrite:
        record = remote.read_json(store, f"{STAGING}/build.json")
        if record is not None:
            work = _recorded_work(cfg.out, record, key)
            remote.keep_only(store, work)
            return work, False
        if found is None and remote.has_shards(store):
            raise BuildError(f"{cfg.out} holds shards but no manifest or staging; pass --overwrite to replace them.")
    return remote.new_work(store, key), False


def _tokenizer(c, cfg: BuildConfig, tok_location: str) -> tuple[Callable[[], dict], bool]:
    """(a function giving the manifest's tokenizer entry, whether workers may load the tokenizer the light
    way).  Once an earlier build found the light load equal to AutoTokenizer's, the driver loads no tokenizer:
    one worker computes the entry while the other starts on the partitions, and the driver collects it for
    the manifest.  (The driver's own load would take CPU time from the workers while they start.)"""
    name = cfg.tokenizer or models.EMBEDDED
    if c.scheduler_info()["workers"] and models.light_load_known(cfg.tokenizer, cfg.trust_remote_code):
        fut = c.submit(tokenizer_facts, tok_location, False, True, pure=False)
        return lambda: {"name": name, **executor.result(fut, "reading the tokenizer")}, True
    tok, light = models.load_build_tokenizer(cfg.tokenizer, cfg.trust_remote_code)
    entry = {"name": name, **models.tokenizer_facts(tok)}
    return lambda: entry, light


def _log(cfg: BuildConfig, msg: str) -> None:
    if cfg.progress:
        print(msg, file=sys.stderr)


def run(cfg: BuildConfig) -> tuple[dict, bool]:
    """Build, resume or recognise the build of `cfg`: (its manifest, whether this call wrote it; False
    when cfg.out already held this very build)."""
    cfg.validate()
    if cfg.rejects and not storage.is_remote(cfg.rejects):
        cfg.rejects = str(storage.local_path(cfg.rejects, "--rejects"))  # (a file:// URL: its path)
    on_store = storage.is_remote(cfg.out)
    out = cfg.out if on_store else storage.local_path(cfg.out, "--out")  # (a file:// URL: its path)
    if on_store:
        _check_store_outputs(cfg)
    elif out.exists() and not out.is_dir():
        raise BuildError(f"--out {out} exists and is not a directory.")
    else:
        _check_outputs(cfg, out)  # before anything is read, written or (with --overwrite) removed
    clock = _Clock()
    strategies = cfg.strategy_objects()
    # Fail on unreadable inputs, tokenizers or models before starting a cluster or touching the output.
    tok_location = models.tokenizer_dir(cfg.tokenizer)  # converts a GGUF tokenizer once (cached)
    _check_models(cfg)
    parts = readers.plan(cfg.inputs, cfg.rows_per_shard, cfg.split, cfg.storage_options)
    _warn_repeated_inputs(cfg)
    for note in ignored_settings(cfg, cfg.strategies):
        print(f"Note: {note}", file=sys.stderr)
    if cfg.split != BuildConfig.split and not any("arrow" in p.kinds for p in parts):
        print(
            f"Note: --split {cfg.split} is ignored: it picks the split of hf: datasets and saved datasets folders, "
            "and no input is one.",
            file=sys.stderr,
        )
    clock.lap("plan")
    # a second build into `out`, or one already finished, needs no cluster
    with lease.held(cfg.out, cfg.storage_options) if on_store else exclusive(out) as held:
        if on_store:
            store = remote.Store(cfg.out, cfg.storage_options)
            name, complete = _start_store(cfg, store, parts)
            target = None if complete else _StoreOut(store, name, held)
        else:
            staging, work, complete = _start(cfg, out, parts)
            target = _LocalOut(out, staging, work)
        if complete:
            if cfg.rejects:
                raise BuildError(
                    f"--rejects {cfg.rejects}: {out} already holds this build, and a finished build keeps "
                    "no rejected records; pass --overwrite to rebuild it and write them."
                )
            _log(cfg, f"{out} already holds this build; nothing to do.")
            return read_manifest(out, cfg.storage_options), False
        with executor.client(cfg.workers, cfg.scheduler, cfg.gpu_workers == "cuda") as c:
            # Workers load the tokenizer before their first task: start-up cost paid once, in parallel.
            # They load it the light way (without torch); whether that gives the same tokenizer is checked
            # once per tokenizer (models.load_build_tokenizer, in the driver, which then also loads it; see
            # _tokenizer), else the tasks load it in full.  (The driver does not load its own in a thread
            # while the cluster starts: that shortens "cluster start" but not the build.)
            warm = executor.on_every_worker(
                c, warm_up, tok_location, cfg.max_length, cfg.overflow, cfg.trust_remote_code, not cfg.trust_remote_code
            )
            tok_entry, light = _tokenizer(c, cfg, tok_location)
            clock.lap("cluster start")
            manifest = _build(c, cfg, strategies, parts, target, tok_entry, tok_location, light, clock)
            del warm
        clock.lap("cluster stop")
    _log(cfg, f"Time: {clock}")
    return manifest, True


def _build(
    c,
    cfg: BuildConfig,
    strategies: list,
    parts: list,
    target: _LocalOut | _StoreOut,
    tok_entry: Callable[[], dict],
    tok_location: str,
    light: bool,
    clock: _Clock,
) -> dict:
    """Pass 1, fit, pass 2 (the tasks write into the work folder of `target`), then the shards and artifacts
    published in out/ and the manifest last; the caller holds the lock."""
    work = target.work
    w, names = work.dir, set(work.names())
    model_resources = gpus.model_task_resources(c, cfg.gpu_workers, strategies)  # pass 1 runs the models
    done = sum(part_name(p.index, "json") in names for p in parts)
    resumed = f" (resuming: {done} of {len(parts)} partition(s) already tokenized)" if done else ""
    _log(cfg, f"{len(parts)} partition(s) from {len(cfg.inputs)} input(s) -> {cfg.out}{resumed}")
    stats = executor.map_tasks(
        c,
        work.task(prepare_partition),
        [work.args([part_name(p.index, "json")], p, cfg, strategies, tok_location, w, light) for p in parts],
        "tokenize",
        cfg.progress,
        model_resources,
    )
    clock.lap("tokenize")
    if cfg.rejects:
        _write_rejects(cfg.rejects, work, parts, cfg.storage_options)
    try:
        _check_outcome(cfg, stats, work, parts)
    except BuildError:
        target.clear()  # nothing worth resuming: the same command fails the same way
        raise
    indices = [p.index for p in parts]
    n_docs = sum(s["written"] for s in stats)
    artifacts, thresholds = fit_all(c, cfg, strategies, w, indices, n_docs, w, work)
    clock.lap("fit")
    arts = registry.artifacts_of([s.name for s in strategies])
    shards = executor.map_tasks(
        c,
        work.task(write_partition),
        [
            work.args(
                [part_name(p.index, STAGED), part_name(p.index, "scores.parquet"), shard_name(p.index), *arts],
                p.index,
                cfg,
                strategies,
                w,
                None,
                os.path.join(w, shard_name(p.index)),
                artifacts,
                w,
                thresholds,
            )
            for p in parts
        ],
        "score+write",
        cfg.progress,
    )
    clock.lap("score+write")
    duplicates = executor.run_one(
        c, work.task(count_duplicate_ids), *work.args([part_name(i, STAGED) for i in indices], w, indices)
    )
    manifest = _manifest(cfg, tok_entry(), stats, shards, strategies, artifacts, thresholds, duplicates)
    target.publish([s["path"] for s in shards] + arts, manifest)
    clock.lap("manifest")
    if manifest["totals"]["blank_lines_skipped"]:
        _log(
            cfg,
            f"Skipped {manifest['totals']['blank_lines_skipped']} blank line(s) (not records; counted in the "
            "manifest as totals.blank_lines_skipped).",
        )
    if duplicates:
        _log(
            cfg,
            f"Warning: {duplicates} record(s) repeat an id already used by another record "
            "(counted in the manifest as totals.duplicate_ids).",
        )
    return manifest


class _LocalOut:
    """A build into a local folder: its tasks work in out/.staging/WORK; publishing moves the files into out/."""

    def __init__(self, out: Path, staging: Path, work: Path):
        self.out, self.staging, self.work = out, staging, remote.LocalWork(work)

    def clear(self) -> None:
        _clear(self.out)

    def publish(self, names: list[str], manifest: dict) -> None:
        work = Path(self.work.dir)
        for name in names:
            if (work / name).exists():  # (a shard already moved by a start killed while moving is written again)
                os.replace(work / name, self.out / name)
        record = json.loads((self.staging / "build.json").read_text(encoding="utf-8"))
        record.pop("work", None)  # (a name of this start alone: the record of a build is the same every time)
        atomic_write_text(
            self.out / BUILT, json.dumps(record, sort_keys=True)
        )  # what it was built from: a rerun checks its inputs
        write_manifest(self.out, manifest)
        shutil.rmtree(self.staging, ignore_errors=True)


class _StoreOut:
    """A build into an object store (pipeline/remote.py): tasks work in URL/.staging/WORK; publishing copies the
    files to their final keys and writes the manifest last, while this build still holds the lease."""

    def __init__(self, store: remote.Store, name: str, held: lease.Lease):
        self.store, self.name, self.lease = store, name, held
        self.work = remote.StoreWork(store.child(STAGING, name))

    def clear(self) -> None:
        remote.remove_staging(self.store)

    def publish(self, names: list[str], manifest: dict) -> None:
        record = remote.read_json(self.store, f"{STAGING}/build.json")
        if not (isinstance(record, dict) and record.pop("work", None) == self.name) or self.lease.lost():
            raise BuildError(
                f"Another build took over {self.store.url} while this one ran (its lease or staging changed); "
                "nothing was published."
            )
        remote.publish(self.store, self.name, names, record, manifest)


def _check_models(cfg: BuildConfig) -> None:
    """The models the chosen strategies load name something that exists (a worker would find out only
    after the cluster started, in a longer message)."""
    used = {
        "reference_model": "reference" in cfg.strategies,
        "base_model": "reference" in cfg.strategies and cfg.reference_mode == "excess",
        "compressor_model": "semantic" in cfg.strategies and bool(cfg.compressor_model),
        "semantic_encoder": "semantic" in cfg.strategies and bool(cfg.semantic_encoder),
    }
    for setting, wanted in used.items():
        name = getattr(cfg, setting)
        if wanted and name:
            try:
                models.resolve(name)
            except models.ModelNotFound as exc:
                raise BuildError(f"--{setting.replace('_', '-')}: {exc}") from None


def _warn_repeated_inputs(cfg: BuildConfig) -> None:
    """The same file given twice is read twice: say so (users rarely mean it)."""
    seen: dict[str, str] = {}
    for inp in cfg.inputs:
        key = str(Path(inp).resolve()) if Path(inp).exists() else inp
        if key in seen:
            print(
                f"Warning: input {safe_text(inp)} is the same as {safe_text(seen[key])}; its records are read twice.",
                file=sys.stderr,
            )
        seen.setdefault(key, inp)


def _check_outcome(cfg: BuildConfig, stats: list[dict], work: remote.LocalWork, parts: list) -> None:
    """A build that writes nothing fails; one whose rejections dominate says why and how to fix it;
    a --field-map entry that matched no record is an error."""
    records_in = sum(s["records_in"] for s in stats)
    written = sum(s["written"] for s in stats)
    rejected: Counter = Counter()
    hits: Counter = Counter()
    for s in stats:
        rejected.update(s["rejected"])
        hits.update(s["field_map_hits"])
    unused = [k for k in cfg.field_map if records_in and not hits.get(k)]
    if unused:
        k = unused[0]
        raise BuildError(
            f"--field-map {k}={safe_text(cfg.field_map[k])}: no record has a field "
            f"{safe_text(cfg.field_map[k])!r}; check the field names of your data."
        )
    if written and sum(rejected.values()) <= written:
        return
    reason, count = rejected.most_common(1)[0] if rejected else ("none", 0)
    hint = rejection_hint(reason, work, parts)
    summary = f"{count} of {records_in} record(s) were rejected as {reason}"
    if not written:
        raise BuildError(f"Wrote 0 records: {summary}{hint}")
    _log(cfg, f"Warning: most records were rejected: {summary}{hint}")


def rejection_hint(reason: str, work: remote.LocalWork, parts: list) -> str:
    """The usual fix of a rejection reason, with the fields the first such record has (read from the staged
    rejects of the work folder `work`)."""
    fields = ""
    for p in parts:
        for line in (work.read(part_name(p.index, "rejects.jsonl")) or b"").decode("utf-8").splitlines():
            rec = json.loads(line)
            if rec.get("reason") == reason:
                fields = ", ".join(safe_text(str(k)) for k in list(_as_object(rec.get("raw")))[:8])
                break
        if fields:
            break
    if reason in ("unknown_format", "missing_field"):
        seen = f" (the records have: {fields})" if fields else ""
        return (
            f"; name your fields with --field-map, e.g. --field-map instruction=question,output=answer{seen}, "
            "or pick the format with --format."
        )
    if reason in ("too_long", "no_loss_tokens"):
        return "; raise --max-length (or use --overflow truncate)."
    if reason == "too_large":
        return "; raise --max-record-bytes (0: no limit) or split the records."
    if reason in ("malformed_json", "invalid_utf8", "invalid_unicode", "malformed_csv", "invalid_number", "too_deep"):
        return "; check the input files' encoding and syntax (--rejects FILE lists every record)."
    return "; --rejects FILE lists every rejected record with its reason."


def _as_object(raw) -> dict:
    try:
        value = json.loads(raw) if isinstance(raw, str) else raw
    except (ValueError, RecursionError):  # (a record rejected as too deep is too deep for json too)
        return {}
    return value if isinstance(value, dict) else {}


def count_duplicate_ids(staging: str, indices: list[int]) -> int:
    """Worker task: records whose id another record already has (ids stay as given; this only counts)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    ids = [read_staged(staging, i, ["id"])["id"] for i in indices]
    if not ids:
        return 0
    column = pa.chunked_array([c for col in ids for c in col.chunks], pa.string())
    return int(len(column) - len(pc.unique(column)))


class _Clock:
    """Wall time per build phase, for the log line users read (not for the manifest: it must be reproducible)."""

    def __init__(self):
        self.last, self.laps = time.perf_counter(), []

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps.append((name, now - self.last))
        self.last = now

    def __str__(self) -> str:
        total = sum(t for _, t in self.laps)
        return ", ".join(f"{n} {t:.1f}s" for n, t in self.laps) + f" (total {total:.1f}s)"


def _check_outputs(cfg: BuildConfig, out: Path) -> None:
    """The outputs can be written and are apart from the inputs: --out is not an input, inside one or around
    one (a later build would read the shards, the manifest and idf.parquet back as records); the files the
    build replaces in it are regular files (sftgo replaces no link or other node it did not make); --rejects
    passes the same tests (_check_rejects_path)."""
    _check_apart(cfg, out)
    check_writable(out, "--out")
    owned = [MANIFEST, BUILT, *registry.artifacts_of(registry.names())]
    shards = [p.name for p in out.glob("shard-*.parquet") if SHARD_FILE.fullmatch(p.name)] if out.is_dir() else []
    for name in owned + shards:
        output_target(out / name)
    _check_rejects(cfg, out)


def _check_apart(cfg: BuildConfig, out) -> None:
    """--out is not an input, inside one or around one (a later build would read the shards, the manifest and
    idf.parquet back as records), for local paths and URLs alike."""
    for inp in cfg.inputs:
        how = None if inp.startswith("hf:") else _overlap(out, inp)
        if how:
            raise BuildError(
                f"--out {out} {how} the input {inp}: the build would write among the files it reads, and a "
                "later build would read its shards back as records; keep --out and the inputs apart."
            )


def _check_store_outputs(cfg: BuildConfig) -> None:
    """An --out (and a --rejects) on an object store: its bucket exists; a local --rejects passes the local
    checks (_check_rejects_path); --out is apart from the inputs."""
    _check_apart(cfg, cfg.out)
    try:
        remote.check_bucket(remote.Store(cfg.out, cfg.storage_options), "--out")
    except SftgoError as exc:
        raise BuildError(str(exc)) from None
    _check_rejects(cfg, Path(os.devnull))


def _check_rejects(cfg: BuildConfig, out) -> None:
    """--rejects, where given: on a store, its bucket exists; a local path passes _check_rejects_path (`out`: the
    local --out folder it may not land in)."""
    if not cfg.rejects:
        return
    if storage.is_remote(cfg.rejects):
        try:
            remote.check_bucket(remote.Store(cfg.rejects, cfg.storage_options), "--rejects")
        except SftgoError as exc:
            raise BuildError(str(exc)) from None
    else:
        _check_rejects_path(cfg.rejects, cfg.inputs, out)


def _check_rejects_path(rejects: str, inputs: list[str], out: Path) -> None:
    """--rejects may not replace an input, land in an input folder (the next build would read it) or
    replace a file the build owns; it is a file, a FIFO or a character device (written into), or a symlink
    to one of them (written through: the link stays), and its folder takes new files."""
    where, direct = output_target(rejects, "--rejects", stream=True, follow=True)
    if not direct:
        check_writable(where, "--rejects")
    target = Path(rejects).resolve()
    for inp in inputs:
        if not inp.startswith("hf:") and _overlap(rejects, inp):
            raise BuildError(f"--rejects {rejects} would overwrite the input {inp} or land in it; write it elsewhere.")
    home = out.resolve()
    owned = target.parent == home and (
        target.name in (MANIFEST, BUILT, ".lock", *registry.artifacts_of(registry.names()))
        or SHARD_FILE.fullmatch(target.name)
    )
    if owned or any(home / folder in target.parents for folder in (STAGING, SCORING)):
        raise BuildError(f"--rejects {rejects} names a file that the build in {out} writes; give another name.")


def _overlap(out, inp: str) -> str | None:
    """fileio.overlap, or sources.overlap when either is a URL."""
    return sources.overlap(str(out), inp) if is_url(inp) or is_url(out) else overlap(out, inp)


def _write_rejects(path: str, work: remote.LocalWork, parts, options: dict) -> None:
    """--rejects: the staged rejects of every partition, in order, written whole (to a file or a store URL)."""

    def write(fh):
        for p in parts:
            fh.write(work.read(part_name(p.index, "rejects.jsonl")) or b"")

    if storage.is_remote(path):
        fs, key = storage.filesystem(path, options)
        with fs.open(key, "wb") as fh:
            write(fh)
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)

    def write_file(tmp):
        with open(tmp, "wb") as fh:
            write(fh)

    atomic_write(path, write_file, "--rejects", stream=True, follow=True)


def _manifest(
    cfg: BuildConfig,
    tok_info: dict,
    stats: list[dict],
    shards: list[dict],
    strategies: list,
    artifacts: dict,
    thresholds: dict,
    duplicates: int,
) -> dict:
    rejected: Counter = Counter()
    inputs: dict[str, dict] = {}
    for s in stats:
        rejected.update(s["rejected"])
        for counted in s["sources"]:  # a partition may pack several small inputs: each keeps its own counts
            source = counted["source"]
            entry = inputs.setdefault(source, {"input": source, "records_in": 0, "written": 0, "rejected": 0})
            for key in ("records_in", "written", "rejected"):
                entry[key] += counted[key]
    totals = {
        "records_in": sum(s["records_in"] for s in stats),
        "records_written": sum(s["written"] for s in stats),
        "records_rejected": sum(rejected.values()),
        "truncated": sum(s["truncated"] for s in stats),
        "unsupervised_by_weight": sum(s["weight_zero_turns"] for s in stats),
        "tokens": sum(s["tokens"] for s in stats),
        "loss_tokens": sum(s["loss_tokens"] for s in stats),
        "duplicate_ids": duplicates,
        "blank_lines_skipped": sum(s.get("blank_lines", 0) for s in stats),
    }
    # real checks, not asserts (those vanish under python -O): these protect the data
    if totals["records_in"] != totals["records_written"] + totals["records_rejected"]:
        raise BuildError(
            f"Records were lost: {totals['records_in']} read, {totals['records_written']} written, "
            f"{totals['records_rejected']} rejected; please report this."
        )
    if totals["records_written"] != sum(s["rows"] for s in shards):
        raise BuildError("The shards' row counts disagree with the records written; please report this.")
    return {
        "format_version": FORMAT_VERSION,
        "sftgo_version": VERSION,
        "tokenizer": tok_info,
        "params": cfg.params(),
        "strategies": {s.name: manifest_entry(s, cfg, artifacts, thresholds) for s in strategies},
        "inputs": list(inputs.values()),
        "shards": shards,
        "totals": totals,
        "rejected": dict(sorted(rejected.items())),
    }
