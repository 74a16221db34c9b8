"""Pass 1 of a build, one partition: read -> normalise -> tokenize -> extract terms -> stage.

Input: a Partition, the build parameters, the tokenizer location and the staging folder.
Output (files in the staging folder, each written atomically, the .json last so that
its presence marks the partition done):
  part-NNNNN.staged.arrow    id, input_ids, loss_mask, num_tokens, num_loss_tokens and
                             each strategy's staged columns (grouping/registry.py): for
                             tfidf the response's terms, their counts and each token's term
                             index; for model strategies the importance itself.  Arrow IPC
                             with LZ4 buffers (read_staged): internal to one build, so chosen
                             for its write and read speed over Parquet's smaller files
  part-NNNNN.stats-S.parquet what strategy S fits on the whole corpus needs of this partition
                             (tfidf: (term, df), for the corpus IDF)
  part-NNNNN.rejects.jsonl   every rejected record with reason, detail and its original text (raw)
  part-NNNNN.json            counts: records in / written / rejected by reason, tokens, assistant turns
                             left unsupervised by weight 0; records in / written / rejected per input
                             ("sources", in input order: a partition may pack several small inputs)
Returns the counts.  A partition already done is not redone.
Cost: for tfidf, the chat template render and the Rust tokenizer (linear in text); model
strategies add their forward passes.
"""

from __future__ import annotations

import functools
import json
import os
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from sftgo.core import models
from sftgo.core.fileio import atomic_write, atomic_write_text
from sftgo.core.shards import list_column
from sftgo.grouping import registry
from sftgo.pipeline import executor, formats, readers
from sftgo.pipeline.chat import ChatEncoder

BATCH = 512  # conversations per tokenizer call: amortises the Rust call, bounds memory


STAGED = "staged.arrow"  # the staged table's suffix; build.json records it (a staging of another format is not resumed)


def stage_path(staging: str, index: int, suffix: str) -> Path:
    return Path(staging) / part_name(index, suffix)


def part_name(index: int, suffix: str) -> str:
    """The name of a staged file of partition `index` in a work folder."""
    return f"part-{index:05d}.{suffix}"


def write_staged(staging: str, index: int, table: pa.Table) -> None:
    """Partition `index`'s staged table as one Arrow IPC record batch with LZ4-compressed buffers, atomically."""

    def write(tmp):
        options = pa.ipc.IpcWriteOptions(compression="lz4")
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema, options=options) as writer:
            writer.write_table(table, max_chunksize=max(table.num_rows, 1))

    atomic_write(stage_path(staging, index, STAGED), write)


def read_staged(staging: str, index: int, columns: list[str] | None = None) -> pa.Table:
    """Partition `index`'s staged table (or some of its columns), as write_staged wrote it, except that
    a list column's item field is named "element", as Parquet names it: staged columns pass into the
    shards (input_ids, loss_mask, a model strategy's importance), whose schema has always said so."""
    with pa.OSFile(str(stage_path(staging, index, STAGED)), "rb") as source:
        table = pa.ipc.open_file(source).read_all()
    if columns is not None:
        table = table.select(columns)
    return table.cast(pa.schema([_element_named(f) for f in table.schema], metadata=table.schema.metadata))


def _element_named(field: pa.Field) -> pa.Field:
    if not pa.types.is_list(field.type):
        return field
    return field.with_type(pa.list_(field.type.value_field.with_name("element")))


@functools.lru_cache(maxsize=2)
def worker_tokenizer(tokenizer: str, trust_remote_code: bool, light: bool):
    """One tokenizer per worker process, reused by every task on that worker.
    light: load through the generic class (models.load_tokenizer_light, no torch import), which the
    driver found equal to AutoTokenizer's load for this tokenizer."""
    tok = models.load_tokenizer_light(tokenizer) if light else None
    if tok is None:  # not light, or the generic class could not read the files
        tok = models.load_tokenizer(tokenizer, trust_remote_code)
    return tok


@functools.lru_cache(maxsize=2)
def get_encoder(tokenizer: str, max_length: int, overflow: str, trust_remote_code: bool, light: bool) -> ChatEncoder:
    """One encoder per worker process over `worker_tokenizer`."""
    return ChatEncoder(worker_tokenizer(tokenizer, trust_remote_code, light), max_length, overflow)


def warm_up(tokenizer: str, max_length: int, overflow: str, trust_remote_code: bool, light: bool) -> None:
    """Load this worker's encoder ahead of its first task (returns nothing to ship back)."""
    get_encoder(tokenizer, max_length, overflow, trust_remote_code, light)


def tokenizer_facts(tokenizer: str, trust_remote_code: bool, light: bool) -> dict:
    """Task: the manifest's facts about the worker's tokenizer (models.tokenizer_facts, one pass over the
    vocabulary), which spares the driver a tokenizer load of its own."""
    return models.tokenizer_facts(worker_tokenizer(tokenizer, trust_remote_code, light))


def _encode(encoder: ChatEncoder, convs: list[list[dict]]) -> list:
    """Encoded or RecordError per conversation; a tokenizer failure is the failing record's reject
    (the batch is retried one by one to find it), never the partition's death."""
    try:
        return encoder.encode_batch(convs)
    except Exception:
        out = []
        for conv in convs:
            try:
                out.append(encoder.encode_batch([conv])[0])
            except Exception as exc:
                out.append(
                    formats.RecordError("encode_error", f"The tokenizer failed on this record ({type(exc).__name__}).")
                )
        return out


class _Accepted:
    """What one partition yields: the accepted records' columns, the rejects, the truncation count, and the
    records written and rejected per input."""

    def __init__(self, part: readers.Partition):
        self.piece_sources = [p.source for p in part.pieces]  # by piece number, the first of `order`
        self.written: Counter = Counter()
        self.rejected: Counter = Counter()
        self.cols: dict[str, list] = {
            "id": [],
            "input_ids": [],
            "loss_mask": [],
            "text": [],
            "spans": [],
            "offsets": [],
        }
        self.rejects: list[dict] = []
        self.truncated = 0
        self.weight_zero = 0  # assistant turns of accepted records left unsupervised by their weight 0

    def reject(self, rid: str, item: readers.Item, reason: str, detail: str, order: tuple) -> None:
        """Keep a rejected record; `order` ((piece, row) in the partition) puts the rejects in file order."""
        safe = readers.escape_surrogates
        source = self.piece_sources[order[0]]
        self.rejected[source] += 1
        self.rejects.append(
            {
                "order": order,
                "id": safe(rid),
                "source": safe(source),
                "row": item.row,
                "reason": reason,
                "detail": safe(detail),
                "raw": readers.raw_text(item),
            }
        )

    def encode(self, encoder: ChatEncoder, pending: list[tuple[str, readers.Item, list[dict], tuple]]) -> None:
        for (rid, item, conv, order), enc in zip(pending, _encode(encoder, [conv for _, _, conv, _ in pending])):
            if isinstance(enc, formats.RecordError):
                self.reject(rid, item, enc.reason, enc.detail, order)
                continue
            self.written[self.piece_sources[order[0]]] += 1
            self.truncated += enc.truncated
            self.weight_zero += conv.weight_zero
            values = (rid, enc.input_ids, enc.loss_mask, enc.text, enc.content_spans, enc.offsets)
            for column, value in zip(self.cols.values(), values):
                column.append(value)
        pending.clear()


def _items(part: readers.Partition, max_bytes: int, options: dict | None = None):
    """(position in the partition, piece, Item) of every record of `part`, in order; `options`: the storage
    options of pieces of objects in a store."""
    for k, piece in enumerate(part.pieces):
        for item in readers.read_piece(piece, max_bytes, options):
            yield (k, item.row), piece, item


@functools.lru_cache(maxsize=64)
def _id_base(source: str, piece: readers.Piece) -> str:
    """What a record id without an id of its own starts with: the input's name, and for a file of a folder
    its path in the folder (rows restart per file)."""
    base = os.path.basename(source.rstrip("/")) or source
    if piece.kind != "arrow" and os.path.abspath(piece.path) != os.path.abspath(source):
        base = f"{base}/{os.path.relpath(piece.path, source)}"
    return base


def process(part: readers.Partition, cfg, encoder: ChatEncoder) -> tuple[dict, list[dict], dict]:
    """Records of a partition -> (columns of accepted records, rejects, counts). No I/O besides reading.

    records_in = written + sum(rejected): a fault inside one record (unreadable, wrong shape, refused by
    the template or the tokenizer) is that record's reject, which keeps its original text under "raw";
    at most BATCH records are held before encoding.  counts also hold blank_lines (skipped, not records)
    and field_map_hits {canonical: records that have the mapped field; 0 = no record has it}."""
    field_map = cfg.field_map or None
    out = _Accepted(part)
    hits = Counter(dict.fromkeys(field_map or (), 0))
    pending: list[tuple[str, readers.Item, list[dict], tuple]] = []  # (id, item, conversation, order) to encode
    rows_in: Counter = Counter()
    for order, piece, item in _items(part, cfg.record_limit(), cfg.storage_options):
        rows_in[piece.source] += 1
        rid = f"{_id_base(piece.source, piece)}:{item.row}"
        if item.reject is not None:
            out.reject(rid, item, *item.reject, order)
            continue
        if field_map:
            hits.update(formats.mapped_fields(item.record, field_map))
        rid = formats.record_id(item.record, rid)
        try:
            kind = formats.detect_format(item.record, field_map) if cfg.format == "auto" else cfg.format
            pending.append((rid, item, formats.to_messages(item.record, kind, field_map), order))
        except formats.RecordError as err:
            out.reject(rid, item, err.reason, err.detail, order)
        if len(pending) == BATCH:
            out.encode(encoder, pending)
    out.encode(encoder, pending)
    out.rejects.sort(key=lambda r: r.pop("order"))  # in file order, whenever they were found
    counts = {
        "index": part.index,
        "sources": [
            {"source": s, "records_in": rows_in[s], "written": out.written[s], "rejected": out.rejected[s]}
            for s in part.sources
        ],
        "records_in": rows_in.total(),
        "written": len(out.cols["id"]),
        "rejected": dict(sorted(Counter(r["reason"] for r in out.rejects).items())),
        "truncated": out.truncated,
        "weight_zero_turns": out.weight_zero,
        "blank_lines": part.blank_lines,
        "field_map_hits": dict(sorted(hits.items())),
    }
    return out.cols, out.rejects, counts


def staged_table(cols: dict, staged: dict[str, pa.Array]) -> pa.Table:
    """Base columns of the accepted records plus the strategies' staged columns."""
    data = {
        "id": pa.array(cols["id"], pa.string()),
        "input_ids": list_column(cols["input_ids"], pa.int32()),
        "loss_mask": list_column(cols["loss_mask"], pa.int8()),
        "num_tokens": pa.array([len(a) for a in cols["input_ids"]], pa.int32()),
        "num_loss_tokens": pa.array([int(m.sum()) for m in cols["loss_mask"]], pa.int32()),
    }
    data.update(staged)
    return pa.table(data)


def stats_suffix(strategy: str) -> str:
    """The staged file of a fitted strategy's per-partition statistics (read back by finalize.fit_strategy)."""
    return f"stats-{strategy}.parquet"


def stage_columns(strategies: list, cols: dict, cfg, tokenizer: str) -> dict[str, pa.Array]:
    """Pass 1 of every strategy on one partition held in memory."""
    staged: dict[str, pa.Array] = {}
    for strategy in strategies:
        staged.update(strategy.stage(cols, cfg, tokenizer))
    return staged


def write_stage(staging: str, index: int, table: pa.Table, rejects: list[dict], counts: dict, strategies: list) -> dict:
    """Write a partition's staged files (the .json last: it marks the partition done)."""
    write_staged(staging, index, table)
    for strategy in strategies:
        if registry.fitted(strategy):
            stats = strategy.partition_stats(table)
            atomic_write(
                stage_path(staging, index, stats_suffix(strategy.name)), lambda p, stats=stats: pq.write_table(stats, p)
            )
    lines = "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rejects)
    atomic_write_text(stage_path(staging, index, "rejects.jsonl"), lines)
    atomic_write_text(stage_path(staging, index, "json"), json.dumps(counts, sort_keys=True))
    return counts


_COUNT_KEYS = ("records_in", "written", "truncated", "weight_zero_turns", "blank_lines", "tokens", "loss_tokens")
_SOURCE_KEYS = ("records_in", "written", "rejected")


def _staged_counts(path, part: readers.Partition) -> dict | None:
    """The counts a finished pass 1 of `part` staged, or None when the file is not such a record: every
    count a whole number, records in = written + rejected, for the partition and for each of its inputs
    (which are the partition's, in order, and add up to its totals)."""
    try:
        counts = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    whole = (
        isinstance(counts, dict)
        and counts.get("index") == part.index
        and all(_count(counts.get(k)) for k in _COUNT_KEYS)
        and all(isinstance(counts.get(k), dict) for k in ("rejected", "field_map_hits"))
        and all(_count(n) for n in counts["rejected"].values())
        and counts["records_in"] == counts["written"] + sum(counts["rejected"].values())
    )
    return counts if whole and _sources_agree(counts, part) else None


def _count(value) -> bool:
    return type(value) is int and value >= 0


def _sources_agree(counts: dict, part: readers.Partition) -> bool:
    """The staged per-input counts name the partition's inputs in order and add up to its totals."""
    sources = counts.get("sources")
    if not (isinstance(sources, list) and len(sources) == len(part.sources)):
        return False
    for entry, source in zip(sources, part.sources):
        if not (
            isinstance(entry, dict)
            and set(entry) == {"source", *_SOURCE_KEYS}
            and entry["source"] == source
            and all(_count(entry[k]) for k in _SOURCE_KEYS)
            and entry["records_in"] == entry["written"] + entry["rejected"]
        ):
            return False
    return (
        sum(e["records_in"] for e in sources) == counts["records_in"]
        and sum(e["written"] for e in sources) == counts["written"]
        and sum(e["rejected"] for e in sources) == sum(counts["rejected"].values())
    )


def prepare_partition(
    part: readers.Partition, cfg, strategies: list, tokenizer: str, staging: str, light: bool = False
) -> dict:
    done = stage_path(staging, part.index, "json")
    if done.exists():
        counts = _staged_counts(done, part)
        if counts is not None:
            return counts  # else damaged (not written by a finished task): the partition is prepared again
    encoder = get_encoder(tokenizer, cfg.max_length, cfg.overflow, cfg.trust_remote_code, light)
    with executor.gc_paused():
        cols, rejects, counts = process(part, cfg, encoder)
        table = staged_table(cols, stage_columns(strategies, cols, cfg, tokenizer))
    counts["tokens"] = int(table["num_tokens"].to_numpy().sum())  # the lengths staged_table already counted
    counts["loss_tokens"] = int(table["num_loss_tokens"].to_numpy().sum())
    return write_stage(staging, part.index, table, rejects, counts, strategies)
