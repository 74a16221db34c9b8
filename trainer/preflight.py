"""The pre-flight checks of a training run, without torch: `sftgo-train` runs them before importing
torch and loading a model, so that a bad run directory, manifest or shard is refused in a fraction of
a second.

Input: a TrainConfig; optionally the model tokenizer's fingerprint and whether to hash the shards.
Output: `check_run_dir` -> nothing, or a ConfigError; `check_data` -> (manifest, group column or None,
number of groups), or a ShardError / ConfigError; `data_notes` -> notes to print.  Every message is
one sentence.
Cost: reads the manifests and every shard's Parquet footer (the group column's min/max statistics
come from there); with checksums, hashes every shard.

The run directory (--out) is recognised by RUN_MARKER, a small JSON file holding the run's id that
sftgo-train writes when a run starts (or, for runs of older versions, by a config.json that is an
sftgo-train configuration).  sftgo-train writes only into a directory that does not exist, is empty,
or is such a run; and never into, or around, its own inputs (--data, --eval-data, a local --model).
--out is a local folder (a URL is refused for now); --data or --eval-data on a store cannot overlap it.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pyarrow.parquet as pq

from sftgo.core import storage
from sftgo.core.fileio import atomic_write_text, check_output_dir, check_writable, output_target, overlap
from sftgo.core.locks import LOCK
from sftgo.core.shards import ShardError, group_column, member_path, verify_shards
from sftgo.core.storage import is_url
from sftgo.trainer import registry, remote
from sftgo.trainer.config import FIELDS, ConfigError, TrainConfig, cli_flag

RUN_MARKER = "sftgo-run.json"


# what a run writes in RUN_DIR: files replaced whole, and folders of its own (checked before a run starts)
RUN_FILES = (RUN_MARKER, "config.json", "metrics.jsonl", "loss_curves.png", "summary.json", "checkpoints/latest")
RUN_FOLDERS = ("checkpoints", "model", "adapter", "tb")


# ---------------------------------------------------------------- the run directory
def run_id(out) -> str | None:
    """The id in RUN_DIR/RUN_MARKER, or None (no marker, or not one we wrote)."""
    path = Path(out) / RUN_MARKER
    if path.is_symlink() or not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    rid = value.get("run_id") if isinstance(value, dict) else None
    return rid if isinstance(rid, str) and rid else None


def is_run_dir(out) -> bool:
    """Whether `out` is an sftgo-train run directory: it holds our marker, or (older runs) a config.json
    that is an sftgo-train configuration."""
    out = Path(out)
    if run_id(out) is not None:
        return True
    try:
        saved = json.loads((out / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(saved, dict) and {"data", "out", "objective"} <= set(saved) <= set(FIELDS)


def write_run_marker(out) -> str:
    """Start a run in `out`: a fresh run id in RUN_MARKER (checkpoints record it; --resume compares)."""
    rid = uuid.uuid4().hex
    atomic_write_text(Path(out) / RUN_MARKER, json.dumps({"run_id": rid}) + "\n")
    return rid


def read_run_config(out) -> dict:
    """The run's config.json (the settings it was started or last resumed with), or one sentence."""
    path = Path(out) / "config.json"
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"{out} has checkpoints but no config.json, so --resume cannot check its settings; "
            "it was edited or damaged."
        ) from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{path} is not valid JSON ({str(exc).splitlines()[0]}); it was edited or damaged.") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"{path} is not an sftgo-train configuration; it was edited or damaged.")
    return saved


def _local_model(model: str | None) -> str | None:
    """The local path of --model, when it is one (a hub id or the embedded model is not ours to guard)."""
    if not model or model == "embedded":
        return None
    return model if os.path.exists(model) else None


def check_run_dir(cfg: TrainConfig) -> None:
    """Refuse an --out that is a file, that is or holds or lies inside an input (--data, --eval-data, a
    local --model; through symlinks), that sftgo may not write in, that holds a symlink or another node
    sftgo did not make where the run writes (RUN_FILES, RUN_FOLDERS), or that exists with files in it
    without being an sftgo-train run directory."""
    from sftgo.trainer.remote import refuse_url_out

    refuse_url_out(cfg)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is not a directory; choose a new or empty directory for the run.")
    for name, value in (("data", cfg.data), ("eval_data", cfg.eval_data), ("model", _local_model(cfg.model))):
        how = overlap(out, value) if value and not is_url(value) else None  # a URL never overlaps the local --out
        if how in ("is the same as", "lies inside"):
            how = "is the same directory as" if how == "is the same as" else how
            raise ConfigError(
                f"--out {out} {how} {cli_flag(name)} {value}: the run's checkpoints, model and logs "
                f"would be written among its files; choose an --out outside it."
            )
        if how:
            raise ConfigError(
                f"{cli_flag(name)} {value} lies inside --out {out}: the run writes its checkpoints, model "
                f"and logs there and could overwrite it; move it out or choose another --out."
            )
    check_writable(out, "--out")
    for name in RUN_FILES:
        output_target(out / name)
    for name in RUN_FOLDERS:
        check_output_dir(out / name)
    if out.is_dir() and not is_run_dir(out) and any(p.name != LOCK for p in out.iterdir()):
        raise ConfigError(
            f"--out {out} holds files but is not an sftgo-train run directory (it has no {RUN_MARKER}), "
            "so nothing in it is overwritten; choose a new or empty --out."
        )


# ---------------------------------------------------------------- the data
def _groups(cfg: TrainConfig, manifest: dict) -> str | None:
    """The strategy whose groups the run reads: --groups, or None for an objective that needs no groups (sft,
    dft) on data without the default."""
    have = manifest.get("strategies", {})
    if not cfg.groups or cfg.groups in have or registry.get(cfg.objective).groups != "optional":
        return cfg.groups or None  # an objective that needs groups gets verify_shards' refusal
    if cfg.groups == TrainConfig().groups:
        return None  # the default, which this data does not have: plain SFT/DFT without per-group loss (a note)
    raise ConfigError(
        f"--groups {cfg.groups!r} is not a strategy of {cfg.data} (it has: "
        f"{', '.join(sorted(have)) or 'none'}); plain SFT and DFT need no groups: name one of these "
        "to log per-group loss, or leave --groups out."
    )


def num_groups(manifest: dict, groups: str | None) -> int:
    return int(manifest["strategies"][groups].get("num_groups", 2)) if groups else 1


def _min_max(row_group, column: str) -> tuple[int, int] | None:
    """(min, max) of a list column's values in one Parquet row group, from the footer; None without statistics."""
    for j in range(row_group.num_columns):
        chunk = row_group.column(j)
        if chunk.path_in_schema == f"{column}.list.element":
            stats = chunk.statistics
            return (int(stats.min), int(stats.max)) if stats is not None and stats.has_min_max else None
    return None


def _footers(directory, options: dict | None):
    """name -> (how messages name the shard, its Parquet footer), for a local folder or a store URL."""
    if storage.is_remote(directory):
        from sftgo.trainer.remote import build

        b = build(directory, options)
        return lambda name: (b.url_of(name), b.footer(name))

    def local(name):
        path = member_path(directory, name)
        return path, pq.ParquetFile(path)

    return local


def group_id_range(directory, manifest: dict, groups: str | None, options: dict | None = None) -> int | None:
    """The largest group id in the shards, from their Parquet footers' statistics (no data is read); a
    shard whose loss_mask leaves 0..1 or whose ids leave -1..K-1, or that trains tokens (loss_mask 1)
    without any group, is refused naming it.  None without `groups`, or when a shard has no statistics
    (the reader checks every batch anyway)."""
    column = group_column(groups) if groups else None
    k = num_groups(manifest, groups)
    top: int | None = -1 if groups else None
    footer = _footers(directory, options)
    for shard in manifest["shards"]:
        path, pf = footer(shard["path"])
        meta = pf.metadata
        for i in range(meta.num_row_groups):
            rg = meta.row_group(i)
            mask = _min_max(rg, "loss_mask")
            if mask is not None and (mask[0] < 0 or mask[1] > 1):
                raise ShardError(
                    f"Shard {path} has loss_mask value {mask[1] if mask[1] > 1 else mask[0]}; only 0 (not "
                    "trained) and 1 (trained) are valid: the shard was damaged or not written by sftgo-prep."
                )
            if column is None:
                continue
            ids = _min_max(rg, column)
            if ids is None:
                if rg.num_rows:
                    top = None
                continue
            low, high = ids
            if low < -1 or high >= k:
                bad = high if high >= k else low
                raise ShardError(
                    f"Shard {path} has group id {bad} in column '{column}', but the manifest declares "
                    f"{k} groups (ids 0..{k - 1}, -1 for untrained tokens): the shard or the manifest "
                    "was changed."
                )
            if high < 0 and mask is not None and mask[1] >= 1:
                raise ShardError(
                    f"Shard {path} trains tokens (loss_mask 1) but gives none of them a group in column "
                    f"'{column}' (every id is -1): the shard contradicts its own loss_mask."
                )
            if top is not None:
                top = max(top, high)
    return top


def empty_group_message(objective: str, groups: str, data, k: int, top: int) -> str:
    return (
        f"--objective {objective} trains on group {k - 1} of '{groups}' (the important group), but no token of "
        f"{data} is in it: the manifest declares {k} groups and the shards use ids up to {top}; fix the "
        "manifest's num_groups or rebuild the shards."
    )


def check_data(
    cfg: TrainConfig, fingerprint: str | None = None, checksums: bool = True
) -> tuple[dict, str | None, int]:
    """Manifest, the --groups column, every shard's schema, row count, group ids (footer statistics) and
    (with `checksums`) sha256, and with `fingerprint` the tokenizer; for train and eval data."""
    opts = cfg.storage_options
    manifest = remote.manifest(cfg.data, opts)
    groups = _groups(cfg, manifest)
    strategies = (groups,) if groups else ()

    def verify(location, m):
        if storage.is_remote(location):  # footers now; each shard's sha256 as it is downloaded (trainer.remote)
            remote.build(location, opts).verify(strategies, fingerprint)
        else:
            verify_shards(location, m, strategies=strategies, checksums=checksums, tokenizer_fingerprint=fingerprint)

    verify(cfg.data, manifest)
    remote.cache_lanes(cfg)  # a --cache-limit too small for the store's shards: refused now
    eval_manifest = remote.manifest(cfg.eval_data, opts) if cfg.eval_data else None
    if eval_manifest is not None:
        verify(cfg.eval_data, eval_manifest)
    if not manifest["shards"]:
        raise ConfigError(f"{cfg.data} holds no shards (0 records written).")
    k = num_groups(manifest, groups)
    important = registry.get(cfg.objective).groups == "important"  # it trains on the important group, K - 1
    if important and k < 2:
        raise ConfigError(f"--objective {cfg.objective} needs at least 2 groups; '{groups}' has {k}.")
    top = group_id_range(cfg.data, manifest, groups, opts)
    if groups:
        if important and top is not None and top < k - 1:
            raise ConfigError(empty_group_message(cfg.objective, groups, cfg.data, k, top))
        if eval_manifest is not None:
            k_eval = num_groups(eval_manifest, groups)
            if k_eval != k:
                raise ConfigError(
                    f"--eval-data {cfg.eval_data} declares {k_eval} '{groups}' groups and --data {k}: "
                    "their per-group losses would not compare; use shards built with the same groups."
                )
    if eval_manifest is not None:
        group_id_range(cfg.eval_data, eval_manifest, groups, opts)
    return manifest, (group_column(groups) if groups else None), k


def data_notes(cfg: TrainConfig, manifest: dict) -> list[str]:
    """Notes on what the data leaves out of this run (after check_data accepted it)."""
    groups = _groups(cfg, manifest)
    have = ", ".join(sorted(manifest.get("strategies", {}))) or "none"
    if cfg.groups and not groups:
        return [
            f"Note: {cfg.data} has no '{cfg.groups}' groups (it has: {have}), so --objective {cfg.objective} "
            "logs no per-group loss; pass --groups with one of those to log it."
        ]
    if not groups:
        return []
    k = num_groups(manifest, groups)
    top = group_id_range(cfg.data, manifest, groups, cfg.storage_options)
    if top is None or top >= k - 1:
        return []
    empty = list(range(top + 1, k))
    which = (
        f"group {empty[0]} of '{groups}' is"
        if len(empty) == 1
        else f"groups {', '.join(map(str, empty[:-1]))} and {empty[-1]} of '{groups}' are"
    )
    return [
        f"Note: {which} empty in {cfg.data} (the manifest declares {k} groups, the shards use ids up to {top}), "
        f"so no loss is logged for {'it' if len(empty) == 1 else 'them'} and the objective sees only the others."
    ]
