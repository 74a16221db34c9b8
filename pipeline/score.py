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
Cost: one read and one write of every shard plus the strategy's own scoring work.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sftgo.core import models
from sftgo.core.fileio import atomic_write_text, check_writable, file_sha256, output_target, remove
from sftgo.core.locks import exclusive
from sftgo.core.shards import (
    MANIFEST,
    ShardError,
    check_tokenizer,
    expected_columns,
    member_path,
    read_manifest,
    strategy_order,
    verify_build,
    verify_shard,
    write_manifest,
)
from sftgo.core.text import safe_text
from sftgo.grouping import registry
from sftgo.pipeline import executor, gpus
from sftgo.pipeline.build import WORK_NAME, BuildError
from sftgo.pipeline.config import BuildConfig, check_strategies, ignored_settings
from sftgo.pipeline.finalize import fit_all, manifest_entry, write_partition
from sftgo.pipeline.prepare import stage_columns, stage_path, staged_table, worker_tokenizer, write_stage

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


def _commit(out: Path, scoring: Path, manifest: dict, new: list[str]) -> dict:
    """Move the rewritten shards and the artifacts of the strategies `new` of the checked pending
    `manifest` into place, then the manifest (last)."""
    for name in [s["path"] for s in manifest["shards"]] + registry.artifacts_of(new):
        if (scoring / name).exists():
            os.replace(member_path(scoring, name), member_path(out, name))
    write_manifest(out, manifest)
    shutil.rmtree(scoring, ignore_errors=True)
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


def _work_folder(scoring: Path, marker) -> Path:
    """The tasks' folder in .scoring: the one the marker of this same request names (resumed), else a new one;
    everything else in .scoring goes (a folder of an earlier start that a late task wrote into again, files
    moved out of the work folder by a run killed before its pending manifest was written)."""
    name = marker.get("work") if isinstance(marker, dict) else None
    if not (isinstance(name, str) and WORK_NAME.fullmatch(name)):
        name = secrets.token_hex(8)
    for p in scoring.iterdir():
        if p.name != MARKER and not (p.name == name and p.is_dir() and not p.is_symlink()):
            remove(p)
    (scoring / name).mkdir(exist_ok=True)
    return scoring / name


def _read_json(path: Path):
    """The JSON in `path`, or None when it is missing or unreadable (a work file of ours, cut short or damaged)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def _check_work_folder(out: Path, scoring: Path) -> None:
    """DIR/.scoring, where it exists, is a folder of ours: not a symlink (nothing is read or moved from
    elsewhere) nor a file."""
    if scoring.is_symlink() or (scoring.exists() and not scoring.is_dir()):
        raise ShardError(
            f"{scoring} is a symlink or a file, not the work folder `sftgo-prep score` keeps in {out}; "
            "remove it and run again."
        )


def _clash(out: Path, manifest: dict, new: list[str], overwrite: bool) -> None:
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
) -> dict:
    """Add strategies `new` to the build in `directory`; `options` overrides BuildConfig fields (eta, models)."""
    check_strategies(new)
    out = Path(directory)
    if out.is_dir():
        check_writable(out)  # score rewrites the build in place
    with exclusive(out):
        scoring = out / SCORING
        _check_work_folder(out, scoring)
        manifest = read_manifest(out)
        if (scoring / MANIFEST).exists():  # a previous run was killed while committing, or a stale folder
            done = _resume_commit(out, scoring, manifest, new, options, overwrite)
            if done is not None:
                return done
        _clash(out, manifest, new, overwrite)
        cfg, key = request(out, manifest, new, options, workers, scheduler, progress)
        for note in ignored_settings(BuildConfig(**options, workers=workers, scheduler=scheduler), new):  # given here
            print(f"Note: {note}", file=sys.stderr)
        marker = scoring / MARKER  # what an unfinished run was computing; anything else is stale
        if scoring.exists() and _request_of(_read_json(marker)) != key:
            remove(scoring)
        verify_build(out, manifest)  # counts, paths, checksums, schemas: refused before a tokenizer or model loads
        for name in [s["path"] for s in manifest["shards"]] + registry.artifacts_of(new) + [MANIFEST]:
            output_target(out / name)  # what the commit replaces is a regular file (never a link of the user's)
        tok, light = models.load_build_tokenizer(manifest["tokenizer"]["name"], cfg.trust_remote_code)
        check_tokenizer(out, manifest, models.tokenizer_fingerprint(tok))
        scoring.mkdir(exist_ok=True)
        work = _work_folder(scoring, _read_json(marker))
        atomic_write_text(marker, json.dumps({**key, "work": work.name}, sort_keys=True))
        updated = _score(cfg, manifest, [registry.get(s) for s in new], out, scoring, work, light)
        write_manifest(scoring, updated)
        return _commit(out, scoring, updated, new)


# ---------------------------------------------------------------- a commit left by a killed run
def _resume_commit(
    out: Path, scoring: Path, manifest: dict, new: list[str], options: dict, overwrite: bool
) -> dict | None:
    """Finish the commit a killed `score` left in .scoring if it is this request's, for this build
    (`manifest`), complete and intact: the committed manifest.  Anything else is discarded with a note
    (None: score as usual), or refused in one sentence where discarding would lose a half-done commit."""
    marker = _read_json(scoring / MARKER)
    try:
        staged = read_manifest(scoring)
    except ShardError as exc:
        return _discard(scoring, f"its manifest is damaged ({str(exc).rstrip('.')})")
    if staged == manifest:
        return _finished(out, scoring, manifest, new, options, marker)
    cfg, key = request(out, manifest, new, options)
    if _request_of(marker) != key:
        return _not_this_request(out, scoring, manifest, staged, marker)
    problem = _pending_problem(out, scoring, manifest, staged, cfg, new)
    if problem:
        return _discard(scoring, problem)
    _clash(out, manifest, new, overwrite)
    return _commit(out, scoring, staged, new)


def _discard(scoring: Path, why: str) -> None:
    remove(scoring)
    print(f"Note: discarded {safe_text(str(scoring))}, left by an earlier `sftgo-prep score`: {why}.", file=sys.stderr)
    return None


def _finished(out: Path, scoring: Path, manifest: dict, new: list[str], options: dict, marker) -> dict | None:
    """The manifest in .scoring is already the build's: only the clean-up was left.  The manifest when
    that run was this request (its groups are in place), else None (score as usual)."""
    _, key = request(out, manifest, new, options)  # the params an earlier run of this request recorded
    remove(scoring)
    if isinstance(marker, dict) and marker.get("new") == new and marker.get("params") == key["params"]:
        return verify_build(out, manifest)
    print(
        f"Note: removed {safe_text(str(scoring))}, left by an earlier `sftgo-prep score`: what it held is "
        "already in place.",
        file=sys.stderr,
    )
    return None


def _not_this_request(out: Path, scoring: Path, manifest: dict, staged: dict, marker) -> None:
    """A pending commit of another request (or build, or none we know): discarded, unless it is this
    build's and already half moved into place (discarding it would leave the build half rewritten)."""
    names = marker.get("new") if isinstance(marker, dict) else None
    ours = (
        isinstance(names, list)
        and all(isinstance(n, str) for n in names)
        and marker.get("manifest_shards") == manifest["shards"]
    )
    if ours and any(not (scoring / s["path"]).exists() for s in staged["shards"]):
        raise ShardError(
            f"{out} is half-way through committing an earlier `sftgo-prep score --strategy "
            f"{','.join(names)}` with other settings; run that command again to finish it first."
        )
    return _discard(scoring, "it holds the commit of another request or of another build")


def _pending_problem(
    out: Path, scoring: Path, manifest: dict, staged: dict, cfg: BuildConfig, new: list[str]
) -> str | None:
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
    return _files_problem(out, scoring, staged, cfg, new)


def _entry_matches(entry: dict, strategy, cfg: BuildConfig) -> bool:
    """A new strategy's manifest entry holds this request's settings and exactly its artifact files."""
    want = json.loads(
        json.dumps({"eta": cfg.eta, "num_groups": cfg.num_groups, "threshold": cfg.threshold, **strategy.params(cfg)})
    )
    files = [a.get("path") for a in entry.values() if isinstance(a, dict) and "path" in a]
    return all(entry.get(k) == v for k, v in want.items()) and sorted(files) == sorted(
        registry.artifact_files(strategy)
    )


def _files_problem(out: Path, scoring: Path, staged: dict, cfg: BuildConfig, new: list[str]) -> str | None:
    """Every shard and new artifact the pending manifest lists, in .scoring or (already moved) in the
    build, matches its entry: checksum, and for shards the columns of every strategy and the rows."""
    columns = expected_columns(cfg.strategies)
    try:
        for entry in staged["shards"]:
            verify_shard(_pending_file(out, scoring, entry["path"]), entry, columns)
        for s in new:
            for artifact in staged["strategies"][s].values():
                if isinstance(artifact, dict) and "path" in artifact:
                    path = _pending_file(out, scoring, artifact["path"])
                    if not path.is_file() or file_sha256(path) != artifact.get("sha256"):
                        raise ShardError(f"{path} is missing or does not match its checksum")
    except ShardError as exc:
        return f"a file it lists is missing or damaged ({str(exc).rstrip('.')})"
    return None


def _pending_file(out: Path, scoring: Path, name: str) -> Path:
    """Where pending file `name` is: still in .scoring, or already moved into the build."""
    path = member_path(scoring, name)
    return path if path.exists() else member_path(out, name)


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


def _score(cfg: BuildConfig, manifest: dict, new: list, out: Path, scoring: Path, work: Path, light: bool) -> dict:
    """Pass A, fit, pass B on the cluster, the tasks writing into `work`; the rewritten shards and the new
    artifacts moved into `scoring`; the updated manifest (not yet written)."""
    tok_location = models.tokenizer_dir(manifest["tokenizer"]["name"])
    shards = manifest["shards"]
    indices = list(range(len(shards)))
    with executor.client(cfg.workers, cfg.scheduler, cfg.gpu_workers == "cuda") as c:
        model_resources = gpus.model_task_resources(c, cfg.gpu_workers, new)  # pass A runs the models
        executor.map_tasks(
            c,
            stage_shard,
            [
                (i, str(member_path(out, s["path"])), cfg, new, tok_location, str(work), light)
                for i, s in enumerate(shards)
            ],
            "score",
            cfg.progress,
            model_resources,
        )
        artifacts, thresholds = fit_all(
            c, cfg, new, str(work), indices, manifest["totals"]["records_written"], str(work)
        )
        entries = executor.map_tasks(
            c,
            write_partition,
            [
                (
                    i,
                    cfg,
                    new,
                    str(work),
                    str(member_path(out, s["path"])),
                    str(member_path(work, s["path"])),
                    artifacts,
                    str(work),
                    thresholds,
                )
                for i, s in enumerate(shards)
            ],
            "write",
            cfg.progress,
        )
    for name in [s["path"] for s in shards] + registry.artifacts_of(new):
        if member_path(work, name).exists():
            os.replace(member_path(work, name), member_path(scoring, name))
    added = {s.name: manifest_entry(s, cfg, artifacts, thresholds) for s in new}
    return updated_manifest(manifest, cfg, added, entries)
