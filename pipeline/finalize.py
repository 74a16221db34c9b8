"""Pass 2 of a build, one partition: staged tokens + fitted artifacts -> scores -> groups -> shard.

Input: the partition's staged Parquet file, the build parameters and the fitted artifacts.
Output: `shard-NNNNN.parquet` (zstd; columns of README "Shard schema"), written
atomically, and its entry for the manifest (path, rows, tokens, loss tokens, sha256).
A shard already present is not rewritten (its entry is recomputed from the file).
Cost: vectorised Arrow/NumPy work, one read and one write of the partition.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sftgo.grouping.assign import assign_groups
from sftgo.pipeline import strategies
from sftgo.core.shards import atomic_write, file_sha256
from sftgo.pipeline.prepare import stage_path

SHARD_COMPRESSION = "zstd"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def group_column(scores: pa.ListArray, loss_mask: pa.ListArray, params: dict) -> pa.ListArray:
    """int8 group ids aligned with `scores` (same list offsets)."""
    offsets = loss_mask.offsets.to_numpy()
    groups = assign_groups(
        scores.flatten().to_numpy(), loss_mask.flatten().to_numpy(), offsets - offsets[0], params["eta"], params["num_groups"]
    )
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


def shard_table(base: pa.Table, staged: pa.Table, strategies_: list[str], params: dict, artifacts: dict,
                etas: dict | None = None) -> pa.Table:
    """The shard: base columns, then importance_/group_ for each strategy, then the lengths.

    `base` holds id, input_ids, loss_mask, num_tokens, num_loss_tokens and may already hold
    other strategies' columns (when `sftgo-prep score` adds one), which are kept in place."""
    columns = {name: base[name] for name in ("id", "input_ids", "loss_mask")}
    for name in base.column_names:
        if name.startswith(("importance_", "group_")) and name.split("_", 1)[1] not in strategies_:
            columns[name] = base[name]
    loss_mask = base["loss_mask"].combine_chunks()
    for strategy in strategies_:
        scores = strategies.importance(strategy, staged, artifacts)
        eta = (etas or {}).get(strategy, params["eta"])
        columns[f"importance_{strategy}"] = scores
        columns[f"group_{strategy}"] = group_column(scores, loss_mask, {**params, "eta": eta})
    columns["num_tokens"] = base["num_tokens"]
    columns["num_loss_tokens"] = base["num_loss_tokens"]
    return pa.table(columns)


def finalize_partition(index: int, params: dict, staging: str, out: str, artifacts: dict) -> dict:
    name = shard_name(index)
    path = f"{out}/{name}"
    try:
        return shard_entry(path, name)
    except FileNotFoundError:
        pass
    staged = pq.read_table(stage_path(staging, index, "staged.parquet"))
    write_shard(shard_table(staged, staged, params["strategies"], params, artifacts), path)
    return shard_entry(path, name)
