"""`sftgo-prep score DIR --strategy S`: add (or, with overwrite, recompute) a strategy's columns in
an existing build without re-reading the inputs.

Input: a finished build directory and the new strategies' parameters.
Output: every shard rewritten with importance_<S> / group_<S> added (other columns kept as they
are), the strategy's artifacts, and manifest.json updated.
Flow: per shard on the cluster, decode the tokens back to text (re-encoding must give the same
ids, else the shard is refused) and stage the strategy's columns (pass A), fit artifacts
(tfidf: IDF over all shards), then score + group + write the new shards into DIR/.scoring
(pass B).  Commit: the new manifest is written to .scoring first, then the shards and
artifacts are renamed into place and the manifest last, so a killed `score` resumes (or
finishes its commit) when run again, and readers never see a half-written file.
Cost: one read and one write of every shard plus the strategy's own scoring work.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sftgo.grouping import tfidf
from sftgo.core import models
from sftgo.pipeline import executor, strategies
from sftgo.pipeline.build import BuildError, exclusive, fit_idf_from_staging
from sftgo.pipeline.finalize import shard_entry, shard_table, write_shard
from sftgo.core.shards import (
    MANIFEST, ShardError, atomic_write_text, read_manifest, strategy_order, verify_shards, write_manifest,
)
from sftgo.pipeline.prepare import stage_path, staged_table, write_stage

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


def stage_shard(index: int, shard: str, params: dict, new: list[str], tokenizer: str, scoring: str) -> dict:
    done = stage_path(scoring, index, "json")
    if done.exists():
        return json.loads(done.read_text())
    table = pq.read_table(shard, columns=["id", "input_ids", "loss_mask"])
    cols = reconstruct(table, models.load_tokenizer(tokenizer, params["trust_remote_code"]), shard)
    staged: dict[str, pa.Array] = {}
    for strategy in new:
        staged.update(strategies.stage(strategy, cols, params, tokenizer))
    return write_stage(scoring, index, staged_table(cols, staged), [], {"index": index, "written": len(cols["id"])})


def rewrite_shard(index: int, name: str, out: str, params: dict, new: list[str], scoring: str, artifacts: dict, etas: dict) -> dict:
    target = Path(scoring) / name
    if not target.exists():
        base = pq.read_table(Path(out) / name)
        staged = pq.read_table(stage_path(scoring, index, "staged.parquet"))
        write_shard(shard_table(base, staged, new, params, artifacts, etas), target)
    return shard_entry(target, name)


def _commit(out: Path, scoring: Path) -> dict:
    """Move the rewritten shards and artifacts into place, then the manifest (last)."""
    manifest = json.loads((scoring / MANIFEST).read_text())
    for shard in manifest["shards"]:
        if (scoring / shard["path"]).exists():
            os.replace(scoring / shard["path"], out / shard["path"])
    if (scoring / tfidf.IDF_FILE).exists():
        os.replace(scoring / tfidf.IDF_FILE, out / tfidf.IDF_FILE)
    write_manifest(out, manifest)
    shutil.rmtree(scoring, ignore_errors=True)
    return manifest


def run(directory: str, new: list[str], options: dict, workers: int = 2, scheduler: str | None = None,
        overwrite: bool = False, progress: bool = True) -> dict:
    """Add strategies `new` to the build in `directory`; `options` overrides BuildConfig fields (eta, models)."""
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
        params = {**manifest["params"], **{k: v for k, v in options.items() if k != "eta"}}
        params["strategies"] = have + [s for s in new if s not in have]
        etas = {s: options.get("eta", manifest["params"]["eta"]) for s in new}
        key = {"new": new, "params": params, "etas": etas, "manifest_shards": manifest["shards"]}
        marker = scoring / "score.json"  # what an unfinished run was computing; anything else is stale
        if scoring.exists() and (not marker.exists() or json.loads(marker.read_text()) != json.loads(json.dumps(key))):
            shutil.rmtree(scoring)
        tok = models.load_tokenizer(manifest["tokenizer"]["name"], params["trust_remote_code"])
        verify_shards(out, manifest, tokenizer_fingerprint=models.tokenizer_fingerprint(tok))
        scoring.mkdir(exist_ok=True)
        atomic_write_text(marker, json.dumps(key, sort_keys=True))
        tok_location = models.tokenizer_dir(manifest["tokenizer"]["name"])
        shards = manifest["shards"]
        with executor.client(workers, scheduler) as c:
            executor.map_tasks(
                c, stage_shard, [(i, str(out / s["path"]), params, new, tok_location, str(scoring)) for i, s in enumerate(shards)],
                "score", progress,
            )
            artifacts = {}
            if "tfidf" in new:
                docs = manifest["totals"]["records_written"]
                sha = executor.run_one(c, fit_idf_from_staging, str(scoring), list(range(len(shards))), docs, str(scoring))
                artifacts["tfidf"] = {"path": str(scoring / tfidf.IDF_FILE), "sha256": sha}
            entries = executor.map_tasks(
                c, rewrite_shard,
                [(i, s["path"], str(out), params, new, str(scoring), artifacts, etas) for i, s in enumerate(shards)],
                "write", progress,
            )
        updated = dict(manifest)
        updated["params"] = params
        updated["shards"] = entries
        updated["strategies"] = {
            **{s: manifest["strategies"][s] for s in have if s not in new},
            **{s: strategies.manifest_entry(s, {**params, "eta": etas[s]}, artifacts, manifest["totals"]["records_written"]) for s in new},
        }
        updated["strategies"] = {s: updated["strategies"][s] for s in params["strategies"]}
        write_manifest(scoring, updated)
        return _commit(out, scoring)
