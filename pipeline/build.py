"""`sftgo-prep build`: inputs -> tokenized, scored, grouped Parquet shards + manifest.

Input: a BuildConfig.
Output: in config.out, shard-NNNNN.parquet (one per input partition), idf.parquet for
tfidf, and manifest.json written last; the manifest dict is also returned.
Flow: plan partitions (driver) -> pass 1 on the cluster (prepare.py: tokenize, count
document frequencies, stage) -> fit the IDF on a worker -> pass 2 on the cluster
(finalize.py: score, group, write shards) -> manifest (driver).
Reliability: an exclusive lock on out/.lock refuses a second concurrent build; every
file is written atomically; a build run again after being killed reuses every staged
partition and finished shard, so only unfinished work is redone and the result is
byte-identical to an uninterrupted build.
Cost: two reads of the data on the driver for planning JSONL (line offsets); the
rest runs on the workers, linear in tokens.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

from sftgo.grouping import tfidf
from sftgo.core import models
from sftgo.pipeline import executor, readers, strategies
from sftgo.pipeline.config import BuildConfig
from sftgo.pipeline.finalize import finalize_partition
from sftgo.core.shards import FORMAT_VERSION, MANIFEST, atomic_write, atomic_write_text, file_sha256, read_manifest, write_manifest
from sftgo.pipeline.prepare import prepare_partition, stage_path, warm_up

STAGING = ".staging"
LOCK = ".lock"
VERSION = "0.1.0"


class BuildError(RuntimeError):
    """A build cannot start or finish; the message is one sentence for the user."""


@contextmanager
def exclusive(out: Path):
    """Hold an exclusive lock on out/.lock for the whole build (released if the process dies)."""
    out.mkdir(parents=True, exist_ok=True)
    fh = open(out / LOCK, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        raise BuildError(f"Another build (pid {holder}) is writing to {out}; wait for it or choose another --out.") from None
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


def _input_identity(cfg: BuildConfig) -> list:
    """Sizes and mtimes of local inputs: a resumed build must read the same files."""
    ident = []
    for inp in cfg.inputs:
        p = Path(inp)
        files = sorted(p.rglob("*")) if p.is_dir() else [p]
        ident.append([inp, [(str(f), f.stat().st_size, int(f.stat().st_mtime)) for f in files if f.is_file()]])
    return ident


def _clear(out: Path) -> None:
    """Remove what a build writes (and nothing else)."""
    for p in out.glob("shard-*.parquet"):
        p.unlink()
    for name in (MANIFEST, tfidf.IDF_FILE):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / STAGING, ignore_errors=True)


def _start(cfg: BuildConfig, out: Path) -> tuple[Path, bool]:
    """Decide between fresh start, resume and refusal. Returns (staging dir, already_complete)."""
    staging = out / STAGING
    key = {"params": cfg.params(), "inputs": _input_identity(cfg)}
    for folder in (out, staging):  # temporaries of atomic writes cut short by a kill (we hold the lock)
        for tmp in folder.glob(".*.tmp"):
            tmp.unlink()
    if cfg.overwrite:
        _clear(out)
    elif (out / MANIFEST).exists():
        manifest = read_manifest(out)
        if manifest.get("params") == cfg.params() and not staging.exists():
            return staging, True
        raise BuildError(f"{out} already holds a finished build with other parameters; pass --overwrite to replace it.")
    elif (staging / "build.json").exists():
        if json.loads((staging / "build.json").read_text()) != json.loads(json.dumps(key)):
            raise BuildError(
                f"{out} holds an unfinished build with other parameters or inputs; pass --overwrite to start again."
            )
        return staging, False
    elif any(out.glob("shard-*.parquet")):
        raise BuildError(f"{out} holds shards but no manifest or staging; pass --overwrite to replace them.")
    staging.mkdir(parents=True, exist_ok=True)
    atomic_write_text(staging / "build.json", json.dumps(key, sort_keys=True))
    return staging, False


def fit_idf_from_staging(staging: str, indices: list[int], n_docs: int, out: str) -> str:
    """Reduce the partitions' document frequencies into idf.parquet; returns its sha256."""
    import pyarrow.parquet as pq

    tables = [pq.read_table(stage_path(staging, i, "df.parquet")) for i in indices]
    path = Path(out) / tfidf.IDF_FILE
    atomic_write(path, lambda tmp: tfidf.save_idf(tfidf.fit_idf(tables, n_docs), tmp))
    return file_sha256(path)


def tokenizer_info(name: str | None, tok) -> dict:
    return {
        "name": name or models.EMBEDDED,
        "fingerprint": models.tokenizer_fingerprint(tok),
        "chat_template_sha256": models.chat_template_sha256(tok),
        "vocab_size": len(tok),
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }


def _log(cfg: BuildConfig, msg: str) -> None:
    if cfg.progress:
        print(msg, file=sys.stderr)


def run(cfg: BuildConfig) -> dict:
    cfg.validate()
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise BuildError(f"--out {out} exists and is not a directory.")
    clock = _Clock()
    tok_location = models.tokenizer_dir(cfg.tokenizer)  # converts a GGUF tokenizer once (cached)
    params = cfg.params()
    with executor.client(cfg.workers, cfg.scheduler) as c:
        # Workers load the tokenizer while the driver does the same and plans: start-up cost paid
        # once, in parallel, instead of inside the first tasks. They load it the light way (without
        # torch); the driver says in the tasks whether that gives the same tokenizer (checked once
        # per tokenizer, see models.load_build_tokenizer), else the tasks load it in full.
        light = not cfg.trust_remote_code
        warm = executor.on_every_worker(c, warm_up, tok_location, cfg.max_length, cfg.overflow, cfg.trust_remote_code, light)
        clock.lap("cluster start")
        # Fail on unreadable inputs or tokenizers before touching the output directory.
        tok, light = models.load_build_tokenizer(cfg.tokenizer, cfg.trust_remote_code)
        parts = readers.plan(cfg.inputs, cfg.rows_per_shard, cfg.split)
        clock.lap("plan")
        with exclusive(out):
            staging, complete = _start(cfg, out)
            if complete:
                _log(cfg, f"{out} already holds this build; nothing to do.")
                return read_manifest(out)
            done = sum(stage_path(str(staging), p.index, "json").exists() for p in parts)
            resumed = f" (resuming: {done} of {len(parts)} partition(s) already tokenized)" if done else ""
            _log(cfg, f"{len(parts)} partition(s) from {len(cfg.inputs)} input(s) -> {out}{resumed}")
            stats = executor.map_tasks(
                c, prepare_partition, [(p, params, tok_location, str(staging), light) for p in parts], "tokenize", cfg.progress
            )
            clock.lap("tokenize")
            n_docs = sum(s["written"] for s in stats)
            artifacts = {}
            if "tfidf" in cfg.strategies:
                sha = executor.run_one(c, fit_idf_from_staging, str(staging), [p.index for p in parts], n_docs, str(out))
                artifacts["tfidf"] = {"path": str(out / tfidf.IDF_FILE), "sha256": sha}
            clock.lap("fit")
            shards = executor.map_tasks(
                c,
                finalize_partition,
                [(p.index, params, str(staging), str(out), artifacts) for p in parts],
                "score+write",
                cfg.progress,
            )
            clock.lap("score+write")
            del warm
            manifest = _manifest(cfg, tok, stats, shards, artifacts)
            if cfg.rejects:
                _write_rejects(cfg.rejects, staging, parts)
            write_manifest(out, manifest)
            shutil.rmtree(staging, ignore_errors=True)
            clock.lap("manifest")
    clock.lap("cluster stop")
    _log(cfg, f"Time: {clock}")
    return manifest


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


def _write_rejects(path: str, staging: Path, parts) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as fh:
            for p in parts:
                fh.write(stage_path(str(staging), p.index, "rejects.jsonl").read_text(encoding="utf-8"))

    atomic_write(path, write)


def _manifest(cfg: BuildConfig, tok, stats: list[dict], shards: list[dict], artifacts: dict) -> dict:
    rejected: Counter = Counter()
    inputs: dict[str, dict] = {}
    for s in stats:
        rejected.update(s["rejected"])
        entry = inputs.setdefault(s["source"], {"input": s["source"], "records_in": 0, "written": 0, "rejected": 0})
        entry["records_in"] += s["records_in"]
        entry["written"] += s["written"]
        entry["rejected"] += sum(s["rejected"].values())
    totals = {
        "records_in": sum(s["records_in"] for s in stats),
        "records_written": sum(s["written"] for s in stats),
        "records_rejected": sum(rejected.values()),
        "truncated": sum(s["truncated"] for s in stats),
        "tokens": sum(s["tokens"] for s in stats),
        "loss_tokens": sum(s["loss_tokens"] for s in stats),
    }
    assert totals["records_in"] == totals["records_written"] + totals["records_rejected"], "records were lost"
    assert totals["records_written"] == sum(s["rows"] for s in shards), "shard rows disagree with the counts"
    params = cfg.params()
    entries = {s: strategies.manifest_entry(s, params, artifacts, totals["records_written"]) for s in cfg.strategies}
    return {
        "format_version": FORMAT_VERSION,
        "sftgo_version": VERSION,
        "tokenizer": tokenizer_info(cfg.tokenizer, tok),
        "params": params,
        "strategies": entries,
        "inputs": list(inputs.values()),
        "shards": shards,
        "totals": totals,
        "rejected": dict(sorted(rejected.items())),
    }
