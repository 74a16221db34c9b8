"""The shard directory contract: column names, manifest.json, manifest paths, verification.

Input: an output directory of `sftgo-prep build`.
Output: the parsed manifest (a dict, see README "Shard schema"), or a ShardError whose
one-sentence message names the shard or option at fault.
Trust: a manifest is untrusted input.  read_manifest checks the types of what sftgo reads (a
bool is no int) and the totals against the shard list; verify_build (every reader of a whole
build: score, inspect) then holds every shard to its entry.  Atomic writes and checksums are in
core.fileio, the directory lock in core.locks.
Cost: reading the manifest is instant; verify_shards with checksums reads every shard
once (sha256 at disk speed), without it only the Parquet footers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sftgo.core import storage
from sftgo.core.errors import SftgoError
from sftgo.core.fileio import atomic_write_text, file_sha256, stream_sha256

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
BASE_COLUMNS = {
    "id": "string",
    "input_ids": "list<element: int32>",
    "loss_mask": "list<element: int8>",
    "num_tokens": "int32",
    "num_loss_tokens": "int32",
}


class ShardError(SftgoError, ValueError):
    """A shard directory is incomplete, corrupted, foreign or lacks what was asked for."""


def manifest_text(manifest: dict) -> str:
    """manifest.json as every build writes it (local folder or store): the same bytes for the same build."""
    return json.dumps(manifest, indent=2, sort_keys=True) + "\n"


def write_manifest(out_dir: str | os.PathLike, manifest: dict) -> None:
    atomic_write_text(Path(out_dir) / MANIFEST, manifest_text(manifest))


class Location(str):
    """The URL of a build on an object store; `location / name` joins as a Path does (for messages and keys)."""

    def __truediv__(self, name: str) -> Location:
        return Location(storage.join(self, name))


def _location(out_dir):
    return Location(str(out_dir)) if storage.is_remote(out_dir) else Path(out_dir)


def _store(out_dir: Location, options: dict | None):
    """(filesystem, path inside it) of a build on a store, with no listing cached from before."""
    fs, root = storage.filesystem(out_dir, options)
    fs.invalidate_cache()
    return fs, root.rstrip("/")


def _manifest_bytes(out_dir, options: dict | None) -> bytes:
    missing = f"{out_dir} has no {MANIFEST}: the build did not complete or this is not an sftgo-prep output."
    if isinstance(out_dir, Location):
        fs, root = _store(out_dir, options)
        try:
            return fs.cat_file(f"{root}/{MANIFEST}")
        except FileNotFoundError:
            raise ShardError(missing) from None
        except Exception as exc:  # the store's own errors: credentials, endpoint, a missing bucket
            raise ShardError(storage.sentence(exc, str(out_dir))) from None
    if not out_dir.is_dir():
        raise ShardError(f"{out_dir} is not a directory.")
    if not (out_dir / MANIFEST).is_file():
        raise ShardError(missing)
    return (out_dir / MANIFEST).read_bytes()


def read_manifest(out_dir: str | os.PathLike, options: dict | None = None) -> dict:
    """The checked manifest of the build in `out_dir` (a folder, or a URL opened with storage `options`)."""
    out_dir = _location(out_dir)
    return parse_manifest(out_dir, _manifest_bytes(out_dir, options))


def parse_manifest(out_dir, data: bytes) -> dict:
    """The manifest of build `out_dir` (a folder or a store URL) from the bytes of its manifest.json, checked
    like read_manifest checks a local one."""
    path = manifest_location(out_dir)
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ShardError(f"{path} is not valid JSON ({exc}).") from None
    found = manifest.get("format_version") if isinstance(manifest, dict) else None
    if type(found) is not int or found != FORMAT_VERSION:  # an int: not true, not 1.0
        raise ShardError(f"{path} has format version {found!r}; this sftgo reads version {FORMAT_VERSION}.")
    return check_manifest(out_dir, manifest)


def manifest_location(out_dir) -> str | Path:
    """Where the manifest of build `out_dir` (a folder or a store URL) lies, as messages name it."""
    return storage.join(str(out_dir), MANIFEST) if storage.is_url(out_dir) else Path(out_dir) / MANIFEST


def _is_count(value) -> bool:
    return type(value) is int and value >= 0  # a bool is no count


def _is_shard(entry) -> bool:
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("path"), str)
        and isinstance(entry.get("sha256"), str)
        and all(_is_count(entry.get(k)) for k in ("rows", "tokens", "loss_tokens"))
    )


def _listed_strategies(params: dict, strategies) -> bool:
    """params.strategies, where given, names each strategy of the manifest once, and no other."""
    listed = params.get("strategies", list(strategies) if isinstance(strategies, dict) else [])
    return (
        isinstance(listed, list)
        and all(isinstance(s, str) for s in listed)
        and len(set(listed)) == len(listed)
        and isinstance(strategies, dict)
        and set(listed) == set(strategies)
    )


def check_manifest(path: Path, manifest: dict) -> dict:
    """The manifest fields sftgo reads, checked for type, and its counts against its shard list: a
    hand-edited or damaged manifest is untrusted input, refused in one sentence instead of failing
    later with a KeyError or being believed (every reader of a build comes through here)."""
    shards, totals, tok = manifest.get("shards"), manifest.get("totals"), manifest.get("tokenizer")
    strategies, rejected, params = manifest.get("strategies"), manifest.get("rejected"), manifest.get("params")
    checks = {
        "shards": isinstance(shards, list) and all(_is_shard(s) for s in shards),
        "totals": isinstance(totals, dict)
        and all(
            _is_count(totals.get(k))
            for k in ("records_in", "records_written", "records_rejected", "tokens", "loss_tokens")
        )
        and _is_count(totals.get("truncated", 0)),
        "tokenizer": isinstance(tok, dict)
        and isinstance(tok.get("name"), str)
        and isinstance(tok.get("fingerprint"), str),
        "strategies": isinstance(strategies, dict)
        and all(
            isinstance(v, dict) and _is_count(v.get("num_groups", 2)) and v.get("num_groups", 2) >= 2
            for v in strategies.values()
        ),
        "rejected": isinstance(rejected, dict) and all(_is_count(n) for n in rejected.values()),
        "params": isinstance(params, dict) and _listed_strategies(params, strategies),
    }
    for key, ok in checks.items():
        if not ok:
            raise ShardError(
                f"{manifest_location(path)} has a missing or malformed '{key}' entry: it was edited or damaged."
            )
    return _check_counts(path, manifest)


def _check_counts(path: Path, manifest: dict) -> dict:
    """Each shard listed once; records read = written + rejected (= the rejections by reason);
    totals.records_written, tokens and loss_tokens are the sums over the shard list (verify_shards
    then holds every shard to its entry): a count nothing backs is refused, not believed."""
    totals = manifest["totals"]
    paths = [s["path"] for s in manifest["shards"]]
    if len(set(paths)) != len(paths):
        twice = next(p for i, p in enumerate(paths) if p in paths[:i])
        raise ShardError(f"{manifest_location(path)} lists the shard {twice!r} twice: it was edited or damaged.")
    rows = sum(s["rows"] for s in manifest["shards"])
    if rows != totals["records_written"]:
        raise ShardError(
            f"{manifest_location(path)} counts {totals['records_written']} records written "
            f"but its shards hold {rows} rows: it was edited or damaged."
        )
    for key in ("tokens", "loss_tokens"):
        listed = sum(s[key] for s in manifest["shards"])
        if listed != totals[key]:
            raise ShardError(
                f"{manifest_location(path)} counts {totals[key]} {key.replace('_', ' ')} in total but its "
                f"shards hold {listed}: it was edited or damaged."
            )
    if (
        totals["records_in"] != totals["records_written"] + totals["records_rejected"]
        or sum(manifest["rejected"].values()) != totals["records_rejected"]
    ):
        raise ShardError(
            f"{manifest_location(path)} has records read, written and rejected that do not add up: it was edited or "
            "damaged."
        )
    return manifest


def member_path(directory: str | os.PathLike, name) -> Path:
    """The path of manifest entry `name` inside `directory`, refusing anything but a plain file name
    there: no folders, `..`, absolute paths, or symlinks that lead out."""
    check_member_name(directory, name)
    if isinstance(directory, Location):
        return directory / name
    directory = Path(directory)
    path = directory / name
    if path.is_symlink() and path.resolve().parent != directory.resolve():
        raise ShardError(f"{path} is a symlink that leads out of {directory}; refusing to read or write it.")
    return path


def check_member_name(directory, name) -> str:
    """Refuse a manifest entry `name` that is not a plain file name inside build `directory` (a folder or URL)."""
    plain = (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and "\x00" not in name
        and not os.path.isabs(name)
    )
    if not plain:
        raise ShardError(
            f"The manifest in {directory} names {name!r}, which is not a plain file name inside "
            "the build directory; refusing to read or write it."
        )
    return name


def strategy_order(manifest: dict) -> list[str]:
    """The build's strategies in the order they were asked for (manifest keys are stored sorted)."""
    have = manifest.get("strategies", {})
    return [s for s in manifest.get("params", {}).get("strategies", []) if s in have] or list(have)


IMPORTANCE_PREFIX = "importance_"
GROUP_PREFIX = "group_"


def importance_column(strategy: str) -> str:
    """Name of the float32 per-token importance column of `strategy` (the one place it is spelled)."""
    return IMPORTANCE_PREFIX + strategy


def group_column(strategy: str) -> str:
    """Name of the int8 per-token group column of `strategy` (-1 where not supervised)."""
    return GROUP_PREFIX + strategy


def column_strategy(column: str) -> str | None:
    """The strategy a column belongs to, or None for a base column."""
    for prefix in (IMPORTANCE_PREFIX, GROUP_PREFIX):
        if column.startswith(prefix):
            return column[len(prefix) :]
    return None


def strategy_columns(strategy: str) -> dict[str, str]:
    return {importance_column(strategy): "list<element: float>", group_column(strategy): "list<element: int8>"}


def list_column(arrays: list, type_: pa.DataType) -> pa.ListArray:
    """A list<type_> column from per-row NumPy arrays in one copy."""
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate(arrays) if arrays else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=type_))


def check_tokenizer(out_dir: str | os.PathLike, manifest: dict, tokenizer_fingerprint: str) -> None:
    """Refuse shards tokenized with another vocabulary than the one whose fingerprint is given."""
    if manifest["tokenizer"]["fingerprint"] != tokenizer_fingerprint:
        raise ShardError(
            f"The shards in {out_dir} were tokenized with {manifest['tokenizer']['name']!r}, whose vocabulary "
            "differs from this model's tokenizer; rebuild them with --tokenizer set to this model."
        )


def verify_shards(
    out_dir: str | os.PathLike,
    manifest: dict | None = None,
    strategies: tuple[str, ...] = (),
    checksums: bool = True,
    tokenizer_fingerprint: str | None = None,
    options: dict | None = None,
) -> dict:
    """Check that every shard listed exists, matches its checksum and row count, and has the
    schema (base columns plus those of `strategies`); optionally that the tokenizer matches.
    `out_dir` may be a URL (opened with storage `options`).  Returns the manifest."""
    out_dir = _location(out_dir)
    manifest = manifest or read_manifest(out_dir, options)
    fs = _store(out_dir, options)[0] if isinstance(out_dir, Location) else None
    if tokenizer_fingerprint is not None:
        check_tokenizer(out_dir, manifest, tokenizer_fingerprint)
    for strategy in strategies:
        if strategy not in manifest.get("strategies", {}):
            have = ", ".join(sorted(manifest.get("strategies", {}))) or "none"
            raise ShardError(
                f"{out_dir} has no '{strategy}' groups (it has: {have}); add them with `sftgo-prep score`."
            )
    expected = expected_columns(strategies)
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        raise ShardError(f"{out_dir / MANIFEST} has no list of shards.")
    for entry in manifest.get("strategies", {}).values():
        for artifact in entry.values() if isinstance(entry, dict) else ():
            if isinstance(artifact, dict) and "path" in artifact:
                member_path(out_dir, artifact["path"])
    for shard in shards:
        verify_shard(
            member_path(out_dir, shard.get("path") if isinstance(shard, dict) else shard),
            shard,
            expected,
            checksums,
            fs,
        )
    return manifest


def verify_shard(path, shard: dict, expected: dict[str, str], checksums: bool = True, fs=None) -> None:
    """One shard file against its manifest entry: present, its sha256 (with `checksums`), a readable
    Parquet file with the `expected` columns (name -> type) and the entry's row count.  With `fs` (an fsspec
    filesystem), `path` is a URL in it."""
    where = fs._strip_protocol(str(path)) if fs is not None else path
    if not (fs.isfile(where) if fs is not None else path.is_file()):
        raise ShardError(f"Shard {path} listed in the manifest is missing.")
    if checksums:
        if fs is not None:
            with fs.open(where, "rb") as fh:
                digest = stream_sha256(fh)
        else:
            digest = file_sha256(path)
        if digest != shard["sha256"]:
            raise ShardError(checksum_message(path))
    try:
        meta = pq.ParquetFile(fs.open(where, "rb") if fs is not None else path)
    except Exception as exc:  # pyarrow raises several types for garbage files
        raise ShardError(f"Shard {path} is not a readable Parquet file ({exc}).") from None
    check_footer(path, meta, shard, expected)


def checksum_message(path) -> str:
    return f"Shard {path} does not match its checksum in the manifest: it is corrupted or was replaced."


def check_footer(path, meta, shard: dict, expected: dict[str, str]) -> None:
    """A shard's Parquet footer (`meta`: a pq.ParquetFile or anything with .schema_arrow and .metadata) against its
    manifest entry: the `expected` columns (name -> type) and the entry's row count; `path` names it."""
    schema = meta.schema_arrow
    for column, type_name in expected.items():
        if column not in schema.names:
            raise ShardError(f"Shard {path} has no column '{column}': it is not an sftgo shard of this build.")
        if str(schema.field(column).type) != type_name:
            raise ShardError(
                f"Shard {path} column '{column}' has type {schema.field(column).type}, expected {type_name}."
            )
    if meta.metadata.num_rows != shard["rows"]:
        raise ShardError(f"Shard {path} has {meta.metadata.num_rows} rows, the manifest says {shard['rows']}.")


def expected_columns(strategies) -> dict[str, str]:
    """Column name -> Arrow type name of a shard holding the groups of `strategies`."""
    expected = dict(BASE_COLUMNS)
    for strategy in strategies:
        expected.update(strategy_columns(strategy))
    return expected


def verify_build(
    out_dir: str | os.PathLike, manifest: dict | None = None, checksums: bool = True, options: dict | None = None
) -> dict:
    """What every reader of a whole build checks: its manifest (read_manifest: typed, counts consistent
    with its shard list) and every shard against its entry, with the columns of every strategy listed.
    `out_dir` may be a URL of an object store (opened with storage `options`)."""
    manifest = manifest if manifest is not None else read_manifest(out_dir, options)
    return verify_shards(
        out_dir, manifest, strategies=tuple(manifest["strategies"]), checksums=checksums, options=options
    )
