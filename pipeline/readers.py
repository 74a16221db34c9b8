"""Split inputs into partitions and read one partition's raw records.

Input: paths of JSONL, JSON (array), Parquet, CSV files, folders of them, `datasets`
save_to_disk folders, or hub dataset names (`hf:NAME`, loaded through `datasets`).
Output: `plan()` returns Partition descriptors (deterministic: they depend on the
inputs and `rows_per_shard` only); `read()` yields (row_number, record dict or None,
(reason, detail, raw text) or None) for every record of one partition -- malformed lines are
yielded as rejections, never dropped.
Cost: planning scans JSONL files once for line offsets (disk speed) and opens the
metadata of the others; a hub dataset is downloaded (or read from the datasets cache)
once by the driver.  Reading a partition touches only its bytes/rows, except JSON
arrays and CSV files, which are parsed whole (cached per worker process).
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

DATA_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class InputError(ValueError):
    """An input cannot be read at all (one sentence naming it)."""


@dataclass(frozen=True)
class Partition:
    index: int  # global partition number = output shard number
    source: str  # input as the user gave it (recorded in record ids / rejects)
    path: str  # file actually read
    kind: str  # jsonl | json | parquet | csv | arrow
    start: int  # first row (jsonl: first byte)
    stop: int  # end row, exclusive (jsonl: end byte)
    first_row: int  # row number of the first record in `path`


def _expand(inp: str, split: str) -> list[tuple[str, str, str]]:
    """One user input -> [(source, path, kind)]."""
    if inp.startswith("hf:"):
        return [(inp, f, "arrow") for f in _hub_files(inp[3:], split)]
    path = Path(inp)
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            return [(inp, f, "arrow") for f in _arrow_dir_files(str(path), split)]
        files = sorted(p for p in path.iterdir() if p.suffix in DATA_SUFFIXES and not p.name.startswith("."))
        if not files:
            raise InputError(f"Folder {inp} holds no .jsonl, .json, .parquet or .csv files.")
        return [(inp, str(f), _kind(f)) for f in files]
    if path.is_file():
        if path.suffix not in DATA_SUFFIXES:
            raise InputError(f"Input {inp} has an unsupported extension; use .jsonl, .json, .parquet or .csv.")
        return [(inp, str(path), _kind(path))]
    if inp.count("/") == 1 and not inp.startswith((".", "/")) and not Path(inp).suffix:
        return [(inp, f, "arrow") for f in _hub_files(inp, split)]
    raise InputError(f"Input {inp} does not exist (for a hub dataset write hf:NAME).")


def _kind(path: Path) -> str:
    kind = DATA_SUFFIXES[path.suffix]
    if kind == "json":  # a .json file may hold one array or one object per line
        with open(path, "rb") as fh:
            head = fh.read(4096).lstrip()
        if not head.startswith(b"["):
            kind = "jsonl"
    return kind


def _arrow_dir_files(path: str, split: str) -> list[str]:
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except Exception as exc:
        raise InputError(f"Cannot open the datasets folder {path} ({exc}).") from None
    return _dataset_files(ds, path, split)


def _hub_files(name: str, split: str) -> list[str]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:
        raise InputError(f"Cannot load dataset {name!r} split {split!r} through datasets ({str(exc).splitlines()[0]}).") from None
    return _dataset_files(ds, name, split)


def _dataset_files(ds, name: str, split: str) -> list[str]:
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise InputError(f"Dataset {name} has no split {split!r} (it has: {', '.join(ds)}); pass --split.")
        ds = ds[split]
    if ds._indices is not None:
        raise InputError(f"Dataset {name} has an indices mapping; save it with flatten_indices() first.")
    return [f["filename"] for f in ds.cache_files]


def _jsonl_offsets(path: str, rows_per_shard: int) -> list[tuple[int, int, int]]:
    """[(start_byte, end_byte, first_row)] cutting the file every rows_per_shard non-blank lines."""
    cuts, row, pos, start, first = [], 0, 0, 0, 0
    with open(path, "rb") as fh:
        for line in fh:
            if line.strip():
                if row - first == rows_per_shard:
                    cuts.append((start, pos, first))
                    start, first = pos, row
                row += 1
            pos += len(line)
    if row > first:
        cuts.append((start, pos, first))
    return cuts


def _row_count(path: str, kind: str) -> int:
    if kind == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    if kind == "arrow":
        return _arrow_table(path).num_rows
    return len(_whole_file(path, kind))


def plan(inputs: list[str], rows_per_shard: int, split: str = "train") -> list[Partition]:
    parts: list[Partition] = []
    for inp in inputs:
        for source, path, kind in _expand(inp, split):
            if kind == "jsonl":
                ranges = _jsonl_offsets(path, rows_per_shard)
            else:
                n = _row_count(path, kind)
                ranges = [(s, min(s + rows_per_shard, n), s) for s in range(0, n, rows_per_shard)]
            for start, stop, first in ranges:
                parts.append(Partition(len(parts), source, path, kind, start, stop, first))
    if not parts:
        raise InputError("The inputs hold no records.")
    return parts


@functools.lru_cache(maxsize=1)
def _whole_file(path: str, kind: str) -> list:
    """Records of a JSON array or CSV file (parsed once per worker process)."""
    if kind == "json":
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except UnicodeDecodeError:
            raise InputError(f"{path} is not valid UTF-8 text.") from None
        except json.JSONDecodeError as exc:
            raise InputError(f"{path} is not valid JSON ({exc}); use JSONL for one record per line.") from None
        if not isinstance(data, list):
            raise InputError(f"{path} holds a JSON {type(data).__name__}, expected an array of records.")
        return data
    import csv

    try:  # stdlib csv keeps every field a string (pyarrow would turn numeric answers into ints)
        with open(path, encoding="utf-8", newline="") as fh:
            return list(csv.DictReader(fh))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{path} is not a readable UTF-8 CSV file ({exc}).") from None


@functools.lru_cache(maxsize=4)
def _arrow_table(path: str):
    import pyarrow as pa

    try:
        return pa.ipc.open_stream(pa.memory_map(path)).read_all()
    except pa.ArrowInvalid:
        return pa.ipc.open_file(pa.memory_map(path)).read_all()


def read(part: Partition) -> Iterator[tuple[int, dict | None, tuple[str, str, str] | None]]:
    """Yield (row, record, None) or (row, None, (reason, detail, raw_text)) for each record of `part`."""
    if part.kind == "jsonl":
        yield from _read_jsonl(part)
        return
    if part.kind == "parquet":
        rows = _parquet_rows(part)
    elif part.kind == "arrow":
        rows = _arrow_table(part.path).slice(part.start, part.stop - part.start).to_pylist()
    else:
        rows = _whole_file(part.path, part.kind)[part.start : part.stop]
    for i, rec in enumerate(rows):
        yield part.first_row + i, rec, None


def _read_jsonl(part: Partition):
    with open(part.path, "rb") as fh:
        fh.seek(part.start)
        data = fh.read(part.stop - part.start)
    row = part.first_row
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raw = line.decode("utf-8", errors="replace")
            yield row, None, ("invalid_utf8", f"line has bytes that are not UTF-8 at position {exc.start}", raw)
        else:
            try:
                yield row, json.loads(text), None
            except json.JSONDecodeError as exc:
                yield row, None, ("malformed_json", f"line is not valid JSON ({exc.msg} at column {exc.colno})", text)
        row += 1


def _parquet_rows(part: Partition) -> list[dict]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(part.path)
    out, row0 = [], 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        lo, hi = max(part.start, row0), min(part.stop, row0 + n)
        if lo < hi:
            out.extend(pf.read_row_group(g).slice(lo - row0, hi - lo).to_pylist())
        row0 += n
    return out
