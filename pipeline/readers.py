"""Split inputs into partitions and read one partition's raw records.

Input: paths of JSONL, JSON (array), Parquet, CSV files (extensions in any case), folders of them
(subfolders included: every file is read, in the sorted order of its path, or the folder is refused
or refused naming compressed files; other files and names starting with "." are skipped, with a note), `datasets`
save_to_disk folders, or hub dataset names (`hf:NAME`, loaded through `datasets`; a path that does not
exist is an error, never a hub request).
Output: `plan()` returns Partitions, each a list of Pieces packed to rows_per_shard rows: the files of one
input, or small inputs given one after another (a shell glob), each Piece naming its input (deterministic:
they depend on the inputs and `rows_per_shard` only); `read()` yields one Item per record of a partition:
the parsed record, or a rejection (reason, detail) for a record that cannot be read --
bad UTF-8 or Unicode (unpaired surrogates, in values and in field names), malformed
JSON, NaN/Infinity or over-long numbers, a JSON object with a field name twice, nesting
deeper than MAX_DEPTH, CSV rows whose field count disagrees with the header, Parquet rows
that do not convert, records larger than the caller's byte limit (too_large) -- never an
exception for one record.  A fault in one record never costs the others.  Each Item keeps
the record's original text when there is one (the JSONL line, a JSON array element
that could not be parsed); `raw_text()` renders the others as JSON, with
surrogates escaped so the text is always valid UTF-8.  Blank lines of JSONL and CSV
are not records: they are skipped and counted in Partition.blank_lines.  A UTF-8 BOM
is ignored (start of any JSONL line, start of JSON and CSV files).  A whole file that
cannot be read is an InputError with one sentence (also a CSV, Parquet or Arrow file with a column
name twice, nested struct fields included: reading would keep only one of them).
Cost: planning scans JSONL files once for line offsets (disk speed) and opens the
metadata of the others; a hub dataset is downloaded (or read from the datasets cache)
once by the driver.  Reading a partition touches only its bytes/rows, except JSON
arrays and CSV files, which are parsed whole (cached per worker process).  Memory per JSONL line is
bounded by the byte limit (a longer line is read past in chunks, never held whole).  The
per-record check is two C-speed scans of a JSONL line plus a size check per JSON object
(duplicate names), linear in the record's size; records from other formats are walked once.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import functools
import io
import json
import os
import re
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from sftgo.core import storage
from sftgo.core.errors import SftgoError
from sftgo.pipeline import sources

DATA_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
MAX_DEPTH = 100  # containers inside containers; real records nest < 10 deep (tool schemas ~20)
MAX_RECORD_BYTES = 16 * 2**20  # a record's size limit when the caller gives none (--max-record-bytes)
RAW_PREFIX = 256  # bytes of a too_large record's text kept as its "raw"
_CHUNK = 2**20  # bytes read at a time from a JSONL line that has no limit to respect (planning)
_BOM = codecs.BOM_UTF8
_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # how a surrogate can get into a JSON string
_WS = re.compile(r"[ \t\n\r]*")
_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.S)  # strings and brackets, to skip a value
_SCALAR = re.compile(r"[^,\]\s]*")


class InputError(SftgoError, ValueError):
    """An input cannot be read at all (one sentence naming it)."""


@dataclass(frozen=True)
class Piece:
    """One stretch of one file inside a partition."""

    source: str  # input as the user gave it (recorded in record ids / rejects / the manifest's per-input counts)
    path: str  # file actually read
    kind: str  # jsonl | json | parquet | csv | arrow | csv_bytes (a CSV object in a store, cut by bytes)
    start: int  # first row (jsonl, csv_bytes: first byte)
    stop: int  # end row, exclusive (jsonl, csv_bytes: end byte)
    first_row: int  # row number of the first record in `path`
    blank_lines: int = 0  # blank lines inside this piece: skipped, not records, counted here
    rows: int = 0  # rows it counts against --rows-per-shard (JSONL: non-blank lines; others: stop - start)
    line: int = 0  # csv_bytes (a CSV object in a store, start/stop in bytes): the file's lines before the piece


@dataclass(frozen=True)
class Partition:
    """The unit of work and of output: one shard.  Its pieces are stretches of files, in input and file order:
    one file's rows cut every rows_per_shard rows, or many small files (of one input or of small inputs) packed
    together."""

    index: int  # global partition number = output shard number
    pieces: tuple[Piece, ...]

    @property
    def sources(self) -> tuple[str, ...]:
        """The inputs its pieces come from, in order, each once."""
        return tuple(dict.fromkeys(p.source for p in self.pieces))

    @property
    def blank_lines(self) -> int:
        return sum(p.blank_lines for p in self.pieces)

    @property
    def kinds(self) -> set[str]:
        return {p.kind for p in self.pieces}


class Item(NamedTuple):
    """One record of a partition."""

    row: int  # record number in its file (JSONL: non-blank lines; CSV: data rows, blank ones included)
    record: object  # the parsed value (any JSON type; also kept for rejects that parsed), else None
    reject: tuple[str, str] | None  # (reason, detail) when the record cannot be read
    raw: str | None  # original text when there is one (JSONL line, unparsable element); see raw_text()


@dataclass(frozen=True)
class _Bad:
    """A record of a whole-file input that could not be read (kept in place: row numbers stay)."""

    reason: str
    detail: str
    raw: str


_BLANK = object()  # a blank CSV line


class _BadNumber(ValueError):
    pass


def _no_constant(name: str):
    raise _BadNumber(f"{name} is not a JSON number")


class _DuplicateKey(ValueError):
    pass


def _object(pairs: list) -> dict:
    """A JSON object's dict; _DuplicateKey when a name occurs twice (json would keep the last silently)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _DuplicateKey(key)
    return obj


_DECODER = json.JSONDecoder(parse_constant=_no_constant, object_pairs_hook=_object)
COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".zstd", ".zip", ".lz4", ".7z", ".tar", ".tgz")
_NAMES_SHOWN = 3  # entries of a folder named in a message (skipped or unreadable ones)


def _expand(inp: str, split: str, options: dict | None = None) -> list[tuple[str, str, str]]:
    """One user input -> [(source, path, kind)].  Only `hf:NAME` reaches the hub; a URL is read from its store
    (an object, or a folder read as a local one is); any other input is a local path, and one that does not
    exist is an InputError at once."""
    if inp.startswith("hf:"):
        return [(inp, f, "arrow") for f in _hub_files(inp[3:], split)]
    if storage.is_url(inp):
        found, unknown, hidden, folder = sources.files(inp, options)
        if folder:
            _folder_report(inp, len(found), unknown, hidden)
        else:
            _check_suffix(inp, found[0][1])
        return [(inp, url, _kind(url, options)) for url, _ in found]
    path = Path(inp)
    if path.is_dir():
        if _is_datasets_dir(path):
            return [(inp, f, "arrow") for f in _arrow_dir_files(str(path), split)]
        return _folder_files(inp, path, split)
    if path.is_file():
        _check_suffix(inp, path.name)
        return [(inp, str(path), _kind(str(path)))]
    raise InputError(f"Input {inp} does not exist (for a hub dataset write hf:NAME).")


def _check_suffix(inp: str, name: str) -> None:
    if os.path.splitext(name)[1].lower() not in DATA_SUFFIXES:
        raise InputError(
            f"Input {inp} has an unsupported extension; use .jsonl, .ndjson, .json, .parquet or .csv "
            "(decompress compressed files first)."
        )


def _is_datasets_dir(path: Path) -> bool:
    return (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()


def _folder_files(inp: str, path: Path, split: str) -> list[tuple[str, str, str]]:
    """[(inp, path, kind)] of every data file in the folder tree of `path` (a `datasets` folder inside it
    read as one), depth first in sorted name order (a flat folder: sorted file names).  A compressed file is
    an InputError naming it; other files of no data format and entries whose name starts with "." are
    skipped, with a note naming them."""
    found: list[tuple[Path, str]] = []
    unknown: list[Path] = []
    hidden: list[Path] = []
    _walk(path, found, unknown, hidden, set())
    relative = lambda paths: [str(p.relative_to(path)) for p in paths]  # noqa: E731
    _folder_report(inp, len(found), relative(unknown), relative(hidden))
    out = []
    for f, kind in found:
        if kind == "datasets":
            out += [(inp, a, "arrow") for a in _arrow_dir_files(str(f), split)]
        else:
            out.append((inp, str(f), _kind(str(f))))
    return out


def _folder_report(inp: str, found: int, unknown: list[str], hidden: list[str]) -> None:
    """The verdict on a folder's entries that are not read (names relative to the folder), local or in a store:
    a compressed file is an InputError naming it, and so is a folder of no data file; other files of no data
    format and names starting with "." are skipped with a note naming them."""
    compressed = [n for n in unknown if os.path.splitext(n)[1].lower() in COMPRESSED]
    if compressed:  # data the user meant to give, in a form sftgo cannot read: not skippable
        raise InputError(
            f"Folder {inp} holds {len(compressed)} compressed file(s) ({_listed(compressed)}), which "
            "sftgo does not read: decompress them (.jsonl, .ndjson, .json, .parquet or .csv)."
        )
    if not found:
        why = f" (it skips {_listed(hidden + unknown)})" if hidden or unknown else ""
        raise InputError(f"Folder {inp} holds no .jsonl, .json, .parquet or .csv files{why}.")
    if hidden:
        print(
            f"Note: folder {escape_surrogates(inp)}: skipped {_listed(hidden)} (names starting with '.' are not read).",
            file=sys.stderr,
        )
    if unknown:  # a README, a licence, a script beside the data
        print(
            f"Note: folder {escape_surrogates(inp)}: skipped {len(unknown)} file(s) of no data format "
            f"({_listed(unknown)}); sftgo reads .jsonl, .ndjson, .json, .parquet and .csv.",
            file=sys.stderr,
        )


def _listed(names: list[str]) -> str:
    """'a, sub/b, c and 2 more': the first _NAMES_SHOWN names."""
    shown = ", ".join(escape_surrogates(n) for n in names[:_NAMES_SHOWN])
    return shown + (f" and {len(names) - _NAMES_SHOWN} more" if len(names) > _NAMES_SHOWN else "")


def _walk(folder: Path, found: list, unknown: list, hidden: list, seen: set) -> None:
    """Sort the entries of `folder`, recursively, into found [(path, kind or "datasets")], unknown and hidden.
    A folder reached twice (a symbolic link back up the tree) is walked once."""
    real = folder.resolve()
    if real in seen:
        return
    seen.add(real)
    for p in sorted(folder.iterdir(), key=lambda p: p.name):
        if p.name.startswith("."):
            hidden.append(p)
        elif p.is_dir():
            if _is_datasets_dir(p):
                found.append((p, "datasets"))
            else:
                _walk(p, found, unknown, hidden, seen)
        elif p.suffix.lower() in DATA_SUFFIXES and p.is_file():
            found.append((p, "file"))
        else:
            unknown.append(p)


def _kind(path: str, options: dict | None = None) -> str:
    kind = DATA_SUFFIXES[os.path.splitext(path)[1].lower()]
    if kind == "json":  # a .json file may hold one array or one object per line
        with _open(path, options) as fh:
            head = fh.read(4096).removeprefix(_BOM).lstrip()
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
        raise InputError(
            f"Cannot load dataset {name!r} split {split!r} through datasets ({str(exc).splitlines()[0]})."
        ) from None
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


def _open(path: str, options: dict | None):
    """A binary file of a local path or of an object at a URL (sources.open_binary)."""
    return sources.open_binary(path, options) if storage.is_url(path) else open(path, "rb")  # noqa: SIM115


def _store_errors(path: str):
    """Errors of a store while reading `path` as one sentence (sources.errors); nothing for a local path."""
    return sources.errors(path) if storage.is_url(path) else contextlib.nullcontext()


def _jsonl_pieces(source: str, path: str, room: int, rows_per_shard: int, options: dict | None = None) -> list[Piece]:
    """Pieces of a JSONL file: the first holds up to `room` non-blank lines, the others rows_per_shard each.
    A file of blank lines only is one piece of no rows (its blank lines are counted).  An object in a store is
    streamed once, never held whole."""
    cuts, row, pos, start, first, blank, cap = [], 0, 0, 0, 0, 0, room
    with _open(path, options) as fh, _store_errors(path):
        for size, _, line, whole in _lines(fh, 0, None, _CHUNK):
            if not whole or line.strip():
                if row - first == cap:
                    cuts.append(Piece(source, path, "jsonl", start, pos, first, blank, cap))
                    start, first, blank, cap = pos, row, 0, rows_per_shard
                row += 1
            else:
                blank += 1
            pos += size
    if row > first or blank:
        cuts.append(Piece(source, path, "jsonl", start, pos, first, blank, row - first))
    return cuts


def _lines(fh, pos: int, stop: int | None, cap: int | None) -> Iterator[tuple[int, int, bytes, bool]]:
    """(bytes in the file, length without the line ending, data, whole) of each line of the binary file `fh`
    (positioned at byte `pos`) up to byte `stop` (None: its end).  A line of more than `cap` bytes (None: no
    cap) is never held whole: it is read on in chunks to its end, and comes as its first `cap` bytes with
    whole False -- or, when it is whitespace only (a blank line), as b"" with whole True."""
    while stop is None or pos < stop:
        line = fh.readline(cap or -1)
        if not line:
            return
        if cap is None or len(line) < cap or line.endswith(b"\n"):
            pos += len(line)
            yield len(line), len(line) - _ending(line), line, True
            continue
        size, blank, tail = len(line), not line.strip(), line[-2:]
        while not tail.endswith(b"\n"):
            chunk = fh.readline(_CHUNK)
            if not chunk:
                break
            size, blank, tail = size + len(chunk), blank and not chunk.strip(), (tail + chunk)[-2:]
        pos += size
        yield size, size - _ending(tail), b"" if blank else line, blank


def _ending(line: bytes) -> int:
    """Bytes of the line ending that `line` ends with (\\n or \\r\\n)."""
    return 2 if line.endswith(b"\r\n") else 1 if line.endswith(b"\n") else 0


def _row_pieces(
    source: str, path: str, kind: str, room: int, rows_per_shard: int, options: dict | None = None
) -> list[Piece]:
    """Pieces of a file read by rows: the first of up to `room` rows, the others rows_per_shard each."""
    if kind == "parquet":
        pf = _parquet_file(path, options)
        _check_columns(path, "Parquet", pf.schema_arrow)
        n, rows = pf.metadata.num_rows, None
    elif kind == "arrow":
        table = _arrow_table(path)
        _check_columns(path, "Arrow", table.schema)
        n, rows = table.num_rows, None
    else:
        rows = _whole_file(path, kind, options)
        n = len(rows)
    pieces, s, cap = [], 0, room
    while s < n:
        stop = min(s + cap, n)
        blank = 0 if rows is None else sum(r is _BLANK for r in rows[s:stop])
        pieces.append(Piece(source, path, kind, s, stop, s, blank, stop - s))
        s, cap = stop, rows_per_shard
    return pieces


def _check_columns(path: str, kind: str, schema) -> None:
    """InputError when two columns, or two fields of a struct (inside lists too), share a name: reading
    keeps one of them (or none), as a CSV header with a column twice would."""
    twice = _twice_named(list(schema), "")
    if twice:
        raise InputError(f"{path} has the {kind} column {twice!r} twice.")


def _twice_named(fields: list, prefix: str) -> str | None:
    """The dotted name of the first field whose name a sibling has, among `fields` and their nested struct fields."""
    import pyarrow as pa

    twice = sorted(n for n, c in Counter(f.name for f in fields).items() if c > 1)
    if twice:
        return prefix + twice[0]
    for f in fields:
        t = f.type
        while pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
            t = t.value_type
        if pa.types.is_struct(t):
            inner = _twice_named([t.field(i) for i in range(t.num_fields)], f"{prefix}{f.name}.")
            if inner:
                return inner
    return None


OWN_SHARD_ROWS = 256  # an input of at least this many records starts a partition of its own


def plan(inputs: list[str], rows_per_shard: int, split: str = "train", options: dict | None = None) -> list[Partition]:
    """The partitions of the inputs, in input order.  The files of one input (a folder's many files) are
    packed into partitions of rows_per_shard rows, each file cut where a partition fills up.  An input of
    fewer than OWN_SHARD_ROWS records that fits whole in the room the partition before it has left joins
    that partition (many small files given one by one, as a shell glob gives them, pack as a folder's
    files do); any other input starts a partition of its own and is cut every rows_per_shard rows from its
    own start.  A glob URL (s3://b/data/*.jsonl) stands for the objects it matches, each an input as a shell glob's
    files are; `options` are the storage options of URL inputs.  Deterministic."""
    groups: list[list[Piece]] = []
    room = 0  # rows the last partition can still take
    for inp in [
        each for given in inputs for each in (sources.expand(given, options) if storage.is_url(given) else [given])
    ]:
        own = _input_partitions(inp, rows_per_shard, split, options)
        rows = sum(p.rows for g in own for p in g)
        if not own:
            continue
        if groups and rows <= room and rows < OWN_SHARD_ROWS:
            groups[-1] += own[0]
            room -= rows
        else:
            groups += own
            room = rows_per_shard - sum(p.rows for p in own[-1])
    if not groups:
        raise InputError("The inputs hold no records.")
    return [Partition(i, tuple(g)) for i, g in enumerate(groups)]


def _input_partitions(inp: str, rows_per_shard: int, split: str, options: dict | None = None) -> list[list[Piece]]:
    """The pieces of one input's partitions on their own: its files packed into partitions of rows_per_shard
    rows (an input of one file cut every rows_per_shard rows); [] for an input without records."""
    groups: list[list[Piece]] = []
    pieces: list[Piece] = []
    room = rows_per_shard
    for _, path, kind in _expand(inp, split, options):
        if not room:  # the partition is full: this file opens the next one
            groups.append(pieces)
            pieces, room = [], rows_per_shard
        if kind == "jsonl":
            cut = _jsonl_pieces(inp, path, room, rows_per_shard, options)
        elif kind == "csv" and storage.is_url(path):
            cut = _csv_pieces(inp, path, room, rows_per_shard, options)
        else:
            cut = _row_pieces(inp, path, kind, room, rows_per_shard, options)
        for k, piece in enumerate(cut):
            if k:  # a piece after the first exists only when the one before filled its partition
                groups.append(pieces)
                pieces, room = [], rows_per_shard
            pieces.append(piece)
            room -= piece.rows
    if any(p.rows for p in pieces):
        groups.append(pieces)
    elif pieces and groups:  # blank lines after the input's last record: counted with it
        groups[-1] += pieces
    return groups


def plan_digest(parts: list[Partition]) -> str:
    """A fingerprint of a plan (every piece of every partition), which a resumed build must find again."""
    import hashlib

    text = json.dumps([[p.index, [list(vars(x).values()) for x in p.pieces]] for p in parts])
    return hashlib.sha256(text.encode("utf-8", errors="surrogateescape")).hexdigest()


def _whole_file(path: str, kind: str, options: dict | None = None) -> list:
    """Entries of a JSON array or CSV file (parsed once per worker process): records, _Bad, _BLANK."""
    return _parsed_file(path, kind, json.dumps(options or {}, sort_keys=True))


@functools.lru_cache(maxsize=1)
def _parsed_file(path: str, kind: str, options: str) -> list:
    if storage.is_url(path):
        data = sources.read_all(path, json.loads(options))
    else:
        with open(path, "rb") as fh:
            data = fh.read()
    # Bytes that are not UTF-8 become lone surrogates, which the record check rejects per record.
    text = data.removeprefix(_BOM).decode("utf-8", errors="surrogateescape")
    return _json_array(path, text) if kind == "json" else _csv_rows(path, text)


def _json_array(path: str, text: str) -> list:
    try:  # fast path: the whole array at once
        data = _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON ({exc}); use JSONL for one record per line.") from None
    except (ValueError, RecursionError):  # one element too deep or a bad number: parse element by element
        return _json_elements(path, text)
    if not isinstance(data, list):
        raise InputError(f"{path} holds a JSON {type(data).__name__}, expected an array of records.")
    return data


def _json_elements(path: str, text: str) -> list:
    """Elements of a JSON array, parsed one at a time; an element that parses to an error becomes a _Bad."""
    out: list = []
    pos = _WS.match(text, 0).end()
    if not text.startswith("[", pos):
        raise InputError(f"{path} does not hold a JSON array of records.")
    pos = _WS.match(text, pos + 1).end()
    closed = text.startswith("]", pos)
    while not closed:
        start = pos
        try:
            value, pos = _DECODER.raw_decode(text, pos)
            out.append(value)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path} is not valid JSON ({exc}); use JSONL for one record per line.") from None
        except (ValueError, RecursionError) as exc:
            pos = _skip_value(path, text, start)
            out.append(_Bad(*_value_fault(exc), text[start:pos]))
        pos = _WS.match(text, pos).end()
        if text.startswith(",", pos):
            pos = _WS.match(text, pos + 1).end()
        elif text.startswith("]", pos):
            closed = True
        else:
            raise InputError(f"{path} is not valid JSON (expected ',' or ']' at character {pos}).")
    if _WS.match(text, pos + 1).end() != len(text):
        raise InputError(f"{path} is not valid JSON (extra data after the array at character {pos + 1}).")
    return out


def _skip_value(path: str, text: str, start: int) -> int:
    """End of the JSON value starting at `start`, found without parsing it (used for values json cannot parse)."""
    if text[start] not in "[{":  # a number or constant
        return _SCALAR.match(text, start).end()
    depth = 0
    for m in _TOKEN.finditer(text, start):
        t = m.group()
        if t in ("[", "{"):
            depth += 1
        elif t in ("]", "}"):
            depth -= 1
            if depth == 0:
                return m.end()
    raise InputError(f"{path} is not valid JSON (an array element starting at character {start} never ends).")


def _value_fault(exc: BaseException) -> tuple[str, str]:
    """(reason, detail) of a JSON value that is valid syntax but cannot become a record."""
    if isinstance(exc, RecursionError):
        return "too_deep", f"The record is nested more than {MAX_DEPTH} levels deep."
    if isinstance(exc, _DuplicateKey):
        key = escape_surrogates(str(exc.args[0])[:40])
        return "duplicate_key", f"The record has the field name '{key}' twice in one object."
    if isinstance(exc, _BadNumber):
        return "invalid_number", f"The record holds {str(exc).split()[0]}, which is not a JSON number."
    if "digits" in str(exc):  # Python refuses to read integers past sys.get_int_max_str_digits()
        return "invalid_number", f"The record holds an integer of more than {sys.get_int_max_str_digits()} digits."
    return "invalid_number", f"The record holds a number that cannot be read ({str(exc)[:80]})."


def _csv_rows(path: str, text: str) -> list:
    reader = _csv_reader(io.StringIO(text, newline=""))
    header = _csv_header(path, reader)
    return list(_csv_entries(reader, header))


def _csv_reader(lines):
    csv.field_size_limit(sys.maxsize)  # one long field is that record's matter, not a file error
    return csv.reader(lines)  # stdlib csv keeps every field a string


def _csv_header(path: str, reader) -> list[str]:
    try:
        header = next(reader, None)
    except csv.Error as exc:
        raise InputError(f"{path} is not a readable CSV file ({exc}).") from None
    if not header:
        raise InputError(f"{path} has no CSV header line.")
    twice = sorted(h for h, n in Counter(header).items() if n > 1)
    if twice:
        raise InputError(f"{path} has the CSV column {twice[0]!r} twice in its header.")
    return header


def _csv_entries(reader, header: list[str], line0: int = 0) -> Iterator:
    """The entries (record, _Bad, _BLANK) of the rows `reader` gives after the header; `line0`: the file's lines
    before the reader's first (line numbers in messages count from the file's start)."""
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            detail = f"The CSV row ending on line {line0 + reader.line_num} cannot be parsed ({exc})."
            yield _Bad("malformed_csv", detail, "")
            continue
        if not fields:
            yield _BLANK
        elif len(fields) != len(header):
            detail = f"The CSV row has {len(fields)} field(s); the header has {len(header)}."
            yield _Bad("malformed_csv", detail, json.dumps(fields, ensure_ascii=False))
        else:
            yield dict(zip(header, fields))


class _CsvLines:
    """The text lines of a binary CSV file from byte `pos` to byte `stop` (None: its end), split as
    io.StringIO(text, newline="") splits the whole text (at \\n, \\r\\n and \\r), bytes that are not UTF-8 as
    lone surrogates (as the whole file decoded), a BOM at the file's start dropped.  `pos` is the byte after the
    last line handed out: where the record a csv.reader over these lines has just given ends."""

    def __init__(self, fh, pos: int, stop: int | None = None):
        self.fh, self.pos, self.stop = fh, pos, stop

    def __iter__(self) -> Iterator[str]:
        while self.stop is None or self.pos < self.stop:
            data = self.fh.readline()
            if not data:
                return
            if self.pos == 0 and data.startswith(_BOM):
                data, self.pos = data[len(_BOM) :], len(_BOM)
            for line in io.StringIO(data.decode("utf-8", errors="surrogateescape"), newline=""):
                if self.stop is not None and self.pos >= self.stop:
                    return
                self.pos += len(line.encode("utf-8", errors="surrogateescape"))
                yield line


def _csv_pieces(source: str, path: str, room: int, rows_per_shard: int, options: dict | None) -> list[Piece]:
    """Pieces of a CSV object in a store, cut between records by byte offsets (kind csv_bytes), streamed once and
    never held whole: the rows (blank ones included) and the cuts of _row_pieces, each piece also keeping the
    file's lines before it (line numbers of malformed rows)."""
    cuts, cap = [], room
    with _open(path, options) as fh, _store_errors(path):
        lines = _CsvLines(fh, 0)
        reader = _csv_reader(lines)
        header = _csv_header(path, reader)
        start = end = lines.pos
        line = end_line = reader.line_num
        first = row = blank = 0
        for entry in _csv_entries(reader, header):
            if row - first == cap:
                cuts.append(Piece(source, path, "csv_bytes", start, end, first, blank, cap, line))
                start, line, first, blank, cap = end, end_line, row, 0, rows_per_shard
            row, blank = row + 1, blank + (entry is _BLANK)
            end, end_line = lines.pos, reader.line_num
    if row > first:
        cuts.append(Piece(source, path, "csv_bytes", start, end, first, blank, row - first, line))
    return cuts


def _csv_range(piece: Piece, options: dict | None) -> list:
    """The entries of a csv_bytes piece: the header read from the object's start, then its own byte range."""
    with _open(piece.path, options) as fh, _store_errors(piece.path):
        header = _csv_header(piece.path, _csv_reader(_CsvLines(fh, 0)))
        fh.seek(piece.start)
        return list(_csv_entries(_csv_reader(_CsvLines(fh, piece.start, piece.stop)), header, piece.line))


@functools.lru_cache(maxsize=4)
def _arrow_table(path: str):
    import pyarrow as pa

    try:
        return pa.ipc.open_stream(pa.memory_map(path)).read_all()
    except pa.ArrowInvalid:
        return pa.ipc.open_file(pa.memory_map(path)).read_all()


def read(part: Partition, max_bytes: int = MAX_RECORD_BYTES, options: dict | None = None) -> Iterator[Item]:
    """Every record of `part` as an Item, in file order (blank lines skipped)."""
    for piece in part.pieces:
        yield from read_piece(piece, max_bytes, options)


def read_piece(piece: Piece, max_bytes: int = MAX_RECORD_BYTES, options: dict | None = None) -> Iterator[Item]:
    """Every record of one piece as an Item, in file order (blank lines skipped); rows count in its file.
    A record larger than `max_bytes` (0: no limit) is rejected as too_large: a JSONL line is measured in
    bytes and never held whole, a Parquet/Arrow row by the bytes of its string and binary values before it
    becomes Python objects, a JSON array element or CSV row (parsed whole with its file) by the UTF-8 bytes
    of its strings and field names.  `options`: the storage options of a piece of an object in a store, which
    is read from there (its own byte range or row groups)."""
    if piece.kind == "jsonl":
        yield from _read_jsonl(piece, max_bytes, options)
        return
    if piece.kind == "parquet":
        rows = _parquet_rows(piece, max_bytes, options)
    elif piece.kind == "arrow":
        rows = _table_rows(_arrow_table(piece.path).slice(piece.start, piece.stop - piece.start), max_bytes)
    elif piece.kind == "csv_bytes":
        rows = _csv_range(piece, options)
    else:
        rows = _whole_file(piece.path, piece.kind, options)[piece.start : piece.stop]
    for row, entry in enumerate(rows, piece.first_row):
        if entry is _BLANK:
            continue
        if isinstance(entry, _Bad):
            yield Item(row, None, (entry.reason, entry.detail), entry.raw)
            continue
        fault = check_record(entry, max_bytes)
        if fault and fault[0] == "too_large":  # its text, cut: the rejects file stays small
            raw = json.dumps(entry, ensure_ascii=False, default=str)[:RAW_PREFIX]
            yield Item(row, None, fault, raw)
        else:
            yield Item(row, entry, fault, None)


def _read_jsonl(piece: Piece, max_bytes: int, options: dict | None = None) -> Iterator[Item]:
    """Lines read one at a time, each at most max_bytes (and its line ending) held: a longer line is read
    past in chunks and rejected as too_large, its raw the first RAW_PREFIX bytes."""
    row = piece.first_row
    with _open(piece.path, options) as fh, _store_errors(piece.path):
        fh.seek(piece.start)
        for _, length, line, whole in _lines(fh, piece.start, piece.stop, max_bytes + 2 if max_bytes else None):
            if whole and not line.strip():  # the same test as _jsonl_pieces: row numbers agree with the plan
                continue
            if max_bytes and length > max_bytes:
                raw = line[:RAW_PREFIX].removeprefix(_BOM).decode("utf-8", errors="backslashreplace")
                detail = f"The line is {length} bytes long, more than --max-record-bytes {max_bytes}."
                yield Item(row, None, ("too_large", detail), raw)
            else:
                yield _jsonl_item(row, line.removeprefix(_BOM).removesuffix(b"\n"))
            row += 1


def _jsonl_item(row: int, line: bytes) -> Item:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raw = line.decode("utf-8", errors="backslashreplace")
        return Item(row, None, ("invalid_utf8", f"The line has bytes that are not UTF-8 at position {exc.start}."), raw)
    try:
        record = _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        return Item(
            row, None, ("malformed_json", f"The line is not valid JSON ({exc.msg} at column {exc.colno})."), text
        )
    except (ValueError, RecursionError) as exc:
        return Item(row, None, _value_fault(exc), text)
    # Only a line with many brackets can nest deep, and only a \uD8xx-\uDFxx escape makes a surrogate.
    if text.count("[") + text.count("{") > MAX_DEPTH or ("\\u" in text and _SURROGATE_ESCAPE.search(text)):
        return Item(row, record, check_record(record), text)
    return Item(row, record, None, text)


def check_record(value, max_bytes: int = 0) -> tuple[str, str] | None:
    """(reason, detail) of the first fault in a parsed record (unpaired surrogate in a value or a field
    name, nesting deeper than MAX_DEPTH, more than `max_bytes` UTF-8 bytes of strings and field names when
    max_bytes is not 0), or None.  Iterative: any depth is safe."""
    stack = [(value, 0, None)]  # (value, depth, path as a linked (parent, key) chain)
    size = 0  # UTF-8 bytes of the strings and field names seen so far
    while stack:
        v, depth, path = stack.pop()
        t = type(v)
        if max_bytes:
            size += _utf8_len(v) if t is str else 0
            size += _utf8_len(path[1]) if path is not None and type(path[1]) is str else 0
            if size > max_bytes:
                return "too_large", f"The record holds more than {max_bytes} bytes of text (--max-record-bytes)."
        if t is str:
            if not v.isascii() and _SURROGATE.search(v):
                return (
                    "invalid_unicode",
                    f"Field '{_path_text(path)}' holds an unpaired surrogate or bytes that are not UTF-8.",
                )
        elif t is dict or t is list or t is tuple:
            if depth >= MAX_DEPTH:
                return "too_deep", f"Field '{_path_text(path)}' is nested more than {MAX_DEPTH} levels deep."
            for k, x in v.items() if t is dict else enumerate(v):
                if type(k) is str and not k.isascii() and _SURROGATE.search(k):
                    where = f"in '{_path_text(path)}'" if path else "of the record"
                    return (
                        "invalid_unicode",
                        f"A field name {where} holds an unpaired surrogate or bytes that are not UTF-8.",
                    )
                stack.append((x, depth + 1, (path, k)))
    return None


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", errors="surrogatepass"))


def _path_text(path) -> str:
    keys = []
    while path is not None:
        path, key = path
        keys.append(f"[{key}]" if type(key) is int else "." + escape_surrogates(str(key)[:40]))
    text = "".join(reversed(keys)).lstrip(".") or "(the record)"
    return text if len(text) <= 60 else text[:57] + "..."


def escape_surrogates(text: str) -> str:
    """`text` with each lone surrogate written as its JSON escape (so it encodes as UTF-8, and a JSON
    text stays the same JSON value)."""
    if text.isascii() or not _SURROGATE.search(text):
        return text
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def raw_text(item: Item) -> str:
    """The record's original text, else a JSON rendering of it; always valid UTF-8."""
    if item.raw is not None:
        return escape_surrogates(item.raw)
    try:
        return escape_surrogates(json.dumps(item.record, ensure_ascii=False, default=str))
    except RecursionError:  # only a record nested past Python's recursion limit, which read() rejects as too_deep
        return ""


def _parquet_file(path: str, options: dict | None = None):
    import pyarrow.parquet as pq

    source = sources.open_binary(path, options) if storage.is_url(path) else path
    try:
        return pq.ParquetFile(source)
    except Exception as exc:  # not Parquet, truncated, or a schema pyarrow refuses (e.g. nested past 100 levels)
        raise InputError(f"Cannot read the Parquet file {path} ({str(exc).splitlines()[0][:200]}).") from None


def _parquet_rows(part: Piece, max_bytes: int, options: dict | None = None) -> list:
    """The rows of a Parquet piece, reading only the row groups that hold them."""
    pf = _parquet_file(part.path, options)
    out, row0 = [], 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        lo, hi = max(part.start, row0), min(part.stop, row0 + n)
        if lo < hi:
            with _store_errors(part.path):
                group = pf.read_row_group(g)
            out.extend(_table_rows(group.slice(lo - row0, hi - lo), max_bytes))
        row0 += n
    return out


def _table_rows(table, max_bytes: int = 0) -> list:
    """Rows of an Arrow table as dicts; a row that does not convert (e.g. a string column holding bytes
    that are not UTF-8) becomes a _Bad for that row alone, and so does a row with more than `max_bytes`
    bytes of string and binary values (0: no limit), found before any of it becomes Python objects."""
    if max_bytes:
        sizes = _row_bytes(table)
        large = [int(i) for i in (sizes > max_bytes).nonzero()[0]]
        if large:
            out, prev = [], 0
            for i in large:
                out += _table_rows(table.slice(prev, i - prev))
                detail = f"The row holds {int(sizes[i])} bytes of text, more than --max-record-bytes {max_bytes}."
                out.append(_Bad("too_large", detail, ""))
                prev = i + 1
            return out + _table_rows(table.slice(prev))
    try:
        return table.to_pylist()
    except Exception:  # pyarrow raises several types; find the rows at fault below
        return [_table_row(table, i) for i in range(table.num_rows)]


def _row_bytes(table):
    """Per row of an Arrow table, the bytes of its string and binary values (nested ones included), as numpy."""
    import numpy as np

    total = np.zeros(table.num_rows, dtype=np.int64)
    for column in table.columns:
        total += np.concatenate([_array_bytes(c) for c in column.chunks] or [np.zeros(0, np.int64)])
    return total


def _array_bytes(arr):
    """Per element of an Arrow array, the bytes of the string and binary values inside it."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    t = arr.type
    if pa.types.is_dictionary(t):
        return _array_bytes(arr.dictionary_decode())
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return pc.binary_length(arr).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    if pa.types.is_map(t):
        t = pa.list_(pa.struct([t.key_field.with_nullable(False), t.item_field]))
        arr = arr.cast(t)
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        inner = _array_bytes(arr.flatten())
        parents = pc.list_parent_indices(arr).to_numpy(zero_copy_only=False)
        return np.bincount(parents, weights=inner, minlength=len(arr)).astype(np.int64)
    if pa.types.is_struct(t):
        out = np.zeros(len(arr), dtype=np.int64)
        for child in arr.flatten():
            out += _array_bytes(child)
        return out
    return np.zeros(len(arr), dtype=np.int64)  # numbers and other fixed-size values: a few bytes each


def _table_row(table, i: int):
    try:
        return table.slice(i, 1).to_pylist()[0]
    except Exception:
        pass
    import pyarrow as pa

    rendered, bad = {}, []
    for name in table.column_names:
        cell = table.column(name).slice(i, 1)
        try:
            rendered[name] = cell.to_pylist()[0]
        except Exception:
            bad.append(name)
            try:
                rendered[name] = cell.cast(pa.binary()).to_pylist()[0].decode("utf-8", errors="backslashreplace")
            except Exception:
                rendered[name] = None
    bad = bad or table.column_names[:1]
    reason = "invalid_utf8" if any(pa.types.is_string(table.schema.field(n).type) for n in bad) else "unreadable_row"
    detail = (
        f"Field '{escape_surrogates(str(bad[0])[:40])}' cannot be read (bytes that are not UTF-8 or an "
        "unsupported value)."
    )
    return _Bad(reason, detail, json.dumps(rendered, ensure_ascii=False, default=str))
