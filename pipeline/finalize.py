"""The second half of `build` and `score`, one orchestration for both: fit the strategies'
corpus artifacts, optionally corpus-wide thresholds, then score, group and write every shard.

Input: a Dask client, the typed BuildConfig, the strategy objects (grouping/registry.py), the
staging folder of pass 1 (part-NNNNN.staged.arrow and part-NNNNN.stats-<strategy>.parquet per
partition) and a writer task per shard.
Output: the artifacts (e.g. idf.parquet) in `folder`, and `shard-NNNNN.parquet` files (zstd;
columns of README "Shard schema") written atomically, with their manifest entries (path, rows,
tokens, loss tokens, sha256).  A shard already present is not rewritten (its entry is recomputed
from the file), so a killed build or score resumes.
Cost: fit reads each partition's small stats once; `--threshold corpus` adds one pass that
scores every partition (kept in staging, not recomputed) and holds every supervised score on
one worker (4 bytes per token) for the exact quantile; the write pass is vectorised Arrow/NumPy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sftgo.core.fileio import atomic_write, file_sha256
from sftgo.core.shards import column_strategy, group_column, importance_column
from sftgo.grouping import registry
from sftgo.grouping.assign import assign_by_thresholds, assign_groups, corpus_thresholds
from sftgo.pipeline import executor
from sftgo.pipeline.prepare import STAGED, part_name, read_staged, stage_path, stats_suffix

SHARD_COMPRESSION = "zstd"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


# ---------------------------------------------------------------- fit (driver side orchestration)
def fit_strategy(strategy, staging: str, indices: list[int], documents: int, folder: str) -> dict:
    """Worker task: reduce the partitions' stats into the strategy's artifacts in `folder`."""
    tables = [pq.read_table(stage_path(staging, i, stats_suffix(strategy.name))) for i in indices]
    return strategy.fit(tables, documents, folder)


def fit_all(
    c, cfg, strategies: list, staging: str, indices: list[int], documents: int, folder: str, work=None
) -> tuple[dict, dict]:
    """(artifacts, thresholds) by strategy name: corpus fits first, then corpus-wide cut-offs.  `work`
    (pipeline/remote.py) says how tasks reach the staging of a build into an object store; None: a local folder."""
    task = work.task if work is not None else (lambda fn: fn)
    args = work.args if work is not None else (lambda fetch, *a: a)
    arts = registry.artifacts_of([s.name for s in strategies])
    artifacts = {
        s.name: executor.run_one(
            c,
            task(fit_strategy),
            *args([part_name(i, stats_suffix(s.name)) for i in indices], s, staging, indices, documents, folder),
        )
        for s in strategies
        if registry.fitted(s)
    }
    thresholds: dict[str, list[float]] = {}
    if cfg.threshold == "corpus":
        executor.map_tasks(
            c,
            task(score_partition),
            [
                args(
                    [part_name(i, STAGED), part_name(i, "scores.parquet"), *arts],
                    i,
                    strategies,
                    staging,
                    artifacts,
                    folder,
                )
                for i in indices
            ],
            "score",
            cfg.progress,
        )
        fetch = [part_name(i, suffix) for i in indices for suffix in (STAGED, "scores.parquet")]
        thresholds = executor.run_one(
            c, task(fit_thresholds), *args(fetch, strategies, staging, indices, cfg.eta, cfg.num_groups)
        )
    return artifacts, thresholds


def score_partition(index: int, strategies: list, staging: str, artifacts: dict, folder: str) -> int:
    """Worker task (corpus thresholds only): the importance columns of one partition, staged."""
    path = stage_path(staging, index, "scores.parquet")
    if not path.exists():
        staged = read_staged(staging, index)
        table = pa.table(
            {importance_column(s.name): s.importance(staged, artifacts.get(s.name, {}), folder) for s in strategies}
        )
        atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="lz4"))
    return index


def fit_thresholds(strategies: list, staging: str, indices: list[int], eta: float, num_groups: int) -> dict:
    """Worker task: exact corpus quantiles of every supervised token's score, per strategy."""
    values: dict[str, list[np.ndarray]] = {s.name: [] for s in strategies}
    for i in indices:
        mask = read_staged(staging, i, ["loss_mask"])["loss_mask"]
        sup = mask.combine_chunks().flatten().to_numpy() == 1
        scores = pq.read_table(stage_path(staging, i, "scores.parquet"))
        for s in strategies:
            values[s.name].append(scores[importance_column(s.name)].combine_chunks().flatten().to_numpy()[sup])
    return {
        name: corpus_thresholds(np.concatenate(v) if v else np.zeros(0), eta, num_groups) for name, v in values.items()
    }


# ---------------------------------------------------------------- score + group + write (worker side)
def group_values(
    scores: pa.ListArray, loss_mask: pa.ListArray, eta: float, num_groups: int, thresholds: list[float] | None
) -> pa.ListArray:
    """int8 group ids aligned with `scores` (same list offsets): per-sample ranks, or the corpus cut-offs."""
    offsets = loss_mask.offsets.to_numpy()
    flat_scores, flat_mask = scores.flatten().to_numpy(), loss_mask.flatten().to_numpy()
    if thresholds is None:
        groups = assign_groups(flat_scores, flat_mask, offsets - offsets[0], eta, num_groups)
    else:
        groups = assign_by_thresholds(flat_scores, flat_mask, thresholds)
    return pa.ListArray.from_arrays(pa.array(offsets - offsets[0], pa.int32()), pa.array(groups, pa.int8()))


def shard_entry(path, name: str) -> dict:
    meta = pq.ParquetFile(path).metadata
    table = pq.read_table(path, columns=["num_tokens", "num_loss_tokens"])
    return {
        "path": name,
        "rows": meta.num_rows,
        "tokens": int(np.sum(table["num_tokens"].to_numpy())),
        "loss_tokens": int(np.sum(table["num_loss_tokens"].to_numpy())),
        "sha256": file_sha256(path),
    }


def write_shard(table: pa.Table, path) -> None:
    atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression=SHARD_COMPRESSION))


def shard_table(
    base: pa.Table,
    staged: pa.Table,
    strategies: list,
    cfg,
    artifacts: dict,
    folder: str,
    thresholds: dict,
    scores: pa.Table | None = None,
) -> pa.Table:
    """The shard: base columns, then importance_/group_ for each strategy, then the lengths.

    `base` holds id, input_ids, loss_mask, num_tokens, num_loss_tokens and may already hold
    other strategies' columns (when `sftgo-prep score` adds one), which are kept in place.
    `scores`: importance columns already computed (corpus thresholds), else computed here."""
    names = [s.name for s in strategies]
    columns = {name: base[name] for name in ("id", "input_ids", "loss_mask")}
    for name in base.column_names:
        if column_strategy(name) is not None and column_strategy(name) not in names:
            columns[name] = base[name]
    loss_mask = base["loss_mask"].combine_chunks()
    for s in strategies:
        if scores is not None:
            values = scores[importance_column(s.name)].combine_chunks()
        else:
            values = s.importance(staged, artifacts.get(s.name, {}), folder)
        columns[importance_column(s.name)] = values
        columns[group_column(s.name)] = group_values(values, loss_mask, cfg.eta, cfg.num_groups, thresholds.get(s.name))
    columns["num_tokens"] = base["num_tokens"]
    columns["num_loss_tokens"] = base["num_loss_tokens"]
    return pa.table(columns)


def write_partition(
    index: int,
    cfg,
    strategies: list,
    staging: str,
    base_path: str | None,
    target: str,
    artifacts: dict,
    folder: str,
    thresholds: dict,
) -> dict:
    """Worker task: score + group + write the shard of partition `index` to `target` (a build reads its
    base columns from the staged file, `score` from the existing shard at `base_path`)."""
    name = Path(target).name
    if not Path(target).exists():
        staged = read_staged(staging, index)
        base = pq.read_table(base_path) if base_path else staged
        scores_path = stage_path(staging, index, "scores.parquet")
        scores = pq.read_table(scores_path) if thresholds and scores_path.exists() else None
        write_shard(shard_table(base, staged, strategies, cfg, artifacts, folder, thresholds, scores), target)
    return shard_entry(target, name)


def manifest_entry(strategy, cfg, artifacts: dict, thresholds: dict) -> dict:
    """The strategy's entry in manifest.json: grouping settings, its parameters, its artifacts."""
    entry = {"eta": cfg.eta, "num_groups": cfg.num_groups, "threshold": cfg.threshold}
    if strategy.name in thresholds:
        entry["thresholds"] = thresholds[strategy.name]
    entry.update(strategy.params(cfg))
    entry.update(artifacts.get(strategy.name, {}))
    return entry
