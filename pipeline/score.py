"""`sftgo-prep score DIR --strategy S`: add (or, with overwrite, recompute) a strategy's columns in
an existing build without re-reading the inputs.

Input: a finished build directory and the new strategies' parameters.
Output: every shard rewritten with importance_<S> / group_<S> added (other columns kept as they
are), the strategy's artifacts, and manifest.json updated.
Flow: per shard on the cluster, decode the tokens back to text (re-encoding must give the same
ids, else the shard is refused) and stage the strategy's columns (pass A), then the same fit +
score + group + write as a build (pipeline/finalize.py), into DIR/.scoring (pass B).
Commit: the new manifest is written to .scoring first, then the shards and
artifacts are renamed into place and the manifest last, so a killed `score` resumes (or
finishes its commit) when run again, and readers never see a half-written file.
Cost: one read and one write of every shard plus the strategy's own scoring work.
"""
from __future__ import annotations

import json
import os
import sys
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sftgo.core import models
from sftgo.core.shards import (
    MANIFEST, ShardError, atomic_write_text, check_tokenizer, exclusive, member_path, read_manifest, strategy_order,
    verify_shards, write_manifest,
)
from sftgo.grouping import registry
from sftgo.pipeline import executor
from sftgo.pipeline.build import BuildError
from sftgo.pipeline.config import BuildConfig, check_strategies, ignored_settings
from sftgo.pipeline.finalize import fit_all, manifest_entry, write_partition
from sftgo.pipeline.prepare import stage_columns, stage_path, staged_table, worker_tokenizer, write_stage

SCORING = ".scoring"


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
    return {"id": table["id"].to_pylist(), "input_ids": ids, "loss_mask": masks, "text": texts, "offsets": offsets, "spans": spans}


def stage_shard(index: int, shard: str, cfg: BuildConfig, new: list, tokenizer: str, scoring: str, light: bool) -> dict:
    done = stage_path(scoring, index, "json")
    if done.exists():
        return json.loads(done.read_text())
    table = pq.read_table(shard, columns=["id", "input_ids", "loss_mask"])
    with executor.gc_paused():
        cols = reconstruct(table, worker_tokenizer(tokenizer, cfg.trust_remote_code, light), shard)
        staged = staged_table(cols, stage_columns(new, cols, cfg, tokenizer))
    return write_stage(scoring, index, staged, [], {"index": index, "written": len(cols["id"])}, new)


def _commit(out: Path, scoring: Path) -> dict:
    """Move the rewritten shards and artifacts into place, then the manifest (last)."""
    manifest = json.loads((scoring / MANIFEST).read_text())
    for name in [s["path"] for s in manifest["shards"]] + registry.artifacts_of(manifest["strategies"]):
        if (scoring / name).exists():
            os.replace(member_path(scoring, name), member_path(out, name))
    write_manifest(out, manifest)
    shutil.rmtree(scoring, ignore_errors=True)
    return manifest


def scoring_config(manifest: dict, options: dict, directory: str, workers: int, scheduler: str | None,
                   progress: bool) -> BuildConfig:
    """The build's own settings, with the options given for the new strategies (typed, validated)."""
    fields = set(BuildConfig.__dataclass_fields__)
    values = {k: v for k, v in manifest["params"].items() if k in fields}
    values.update(options)
    values.update(out=directory, workers=workers, scheduler=scheduler, progress=progress)
    return BuildConfig(**values).validate()


def run(directory: str, new: list[str], options: dict, workers: int = 2, scheduler: str | None = None,
        overwrite: bool = False, progress: bool = True) -> dict:
    """Add strategies `new` to the build in `directory`; `options` overrides BuildConfig fields (eta, models)."""
    check_strategies(new)
    out = Path(directory)
    with exclusive(out):
        scoring = out / SCORING
        if (scoring / MANIFEST).exists():  # a previous run was killed while committing
            return _commit(out, scoring)
        manifest = read_manifest(out)
        have = strategy_order(manifest)
        clash = [s for s in new if s in have]
        if clash and not overwrite:
            raise BuildError(f"{out} already has '{clash[0]}' groups; pass --overwrite to compute them again.")
        cfg = scoring_config(manifest, options, directory, workers, scheduler, progress)
        for note in ignored_settings(BuildConfig(**options, workers=workers, scheduler=scheduler), new):  # given here
            print(f"Note: {note}", file=sys.stderr)
        cfg.strategies = have + [s for s in new if s not in have]
        key = {"new": new, "params": cfg.params(), "manifest_shards": manifest["shards"]}
        marker = scoring / "score.json"  # what an unfinished run was computing; anything else is stale
        if scoring.exists() and (not marker.exists() or json.loads(marker.read_text()) != json.loads(json.dumps(key))):
            shutil.rmtree(scoring)
        verify_shards(out, manifest)  # paths, checksums, schemas: refused before a tokenizer or model loads
        tok, light = models.load_build_tokenizer(manifest["tokenizer"]["name"], cfg.trust_remote_code)
        check_tokenizer(out, manifest, models.tokenizer_fingerprint(tok))
        scoring.mkdir(exist_ok=True)
        atomic_write_text(marker, json.dumps(key, sort_keys=True))
        updated = _score(cfg, manifest, [registry.get(s) for s in new], out, scoring, light)
        write_manifest(scoring, updated)
        return _commit(out, scoring)


def _score(cfg: BuildConfig, manifest: dict, new: list, out: Path, scoring: Path, light: bool) -> dict:
    """Pass A, fit, pass B on the cluster; the updated manifest (not yet written)."""
    tok_location = models.tokenizer_dir(manifest["tokenizer"]["name"])
    shards = manifest["shards"]
    indices = list(range(len(shards)))
    with executor.client(cfg.workers, cfg.scheduler) as c:
        executor.map_tasks(c, stage_shard, [(i, str(member_path(out, s["path"])), cfg, new, tok_location, str(scoring),
                                             light) for i, s in enumerate(shards)], "score", cfg.progress)
        artifacts, thresholds = fit_all(c, cfg, new, str(scoring), indices, manifest["totals"]["records_written"],
                                        str(scoring))
        entries = executor.map_tasks(
            c, write_partition,
            [(i, cfg, new, str(scoring), str(member_path(out, s["path"])), str(scoring / s["path"]), artifacts,
              str(scoring), thresholds) for i, s in enumerate(shards)],
            "write", cfg.progress,
        )
    params = cfg.params()
    for key in ("eta", "threshold", "num_groups"):  # the build's own; each strategy's entry has its own
        params[key] = manifest["params"].get(key, params[key])
    old = manifest["strategies"]
    added = {s.name: manifest_entry(s, cfg, artifacts, thresholds) for s in new}
    return {**manifest, "params": params, "shards": entries,
            "strategies": {s: added.get(s) or old[s] for s in cfg.strategies}}
