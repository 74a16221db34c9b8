"""Pass 1 of a build, one partition: read -> normalise -> tokenize -> extract terms -> stage.

Input: a Partition, the build parameters, the tokenizer location and the staging folder.
Output (files in the staging folder, each written atomically, the .json last so that
its presence marks the partition done):
  part-NNNNN.staged.parquet  id, input_ids, loss_mask, num_tokens, num_loss_tokens and
                             each strategy's staged columns (pipeline/strategies.py): for
                             tfidf the response's terms, their counts and each token's term
                             index; for model strategies the importance itself
  part-NNNNN.df.parquet      (term, df) of this partition, for the corpus IDF
  part-NNNNN.rejects.jsonl   every rejected record with reason and detail
  part-NNNNN.json            counts: records in / written / rejected by reason, tokens
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

from sftgo.grouping import tfidf
from sftgo.core import models
from sftgo.pipeline import formats, readers, strategies
from sftgo.pipeline.chat import ChatEncoder
from sftgo.core.shards import atomic_write, atomic_write_text
from sftgo.pipeline.strategies import list_column

BATCH = 512  # conversations per tokenizer call: amortises the Rust call, bounds memory


def stage_path(staging: str, index: int, suffix: str) -> Path:
    return Path(staging) / f"part-{index:05d}.{suffix}"


@functools.lru_cache(maxsize=2)
def get_encoder(tokenizer: str, max_length: int, overflow: str, trust_remote_code: bool, light: bool) -> ChatEncoder:
    """One tokenizer + encoder per worker process, reused by every task on that worker.
    light: load through the generic class (models.load_tokenizer_light), which the driver found
    equal to AutoTokenizer's load for this tokenizer."""
    tok = models.load_tokenizer_light(tokenizer) if light else None
    if tok is None:  # not light, or the generic class could not read the files
        tok = models.load_tokenizer(tokenizer, trust_remote_code)
    return ChatEncoder(tok, max_length, overflow)


def warm_up(tokenizer: str, max_length: int, overflow: str, trust_remote_code: bool, light: bool) -> None:
    """Load this worker's encoder ahead of its first task (returns nothing to ship back)."""
    get_encoder(tokenizer, max_length, overflow, trust_remote_code, light)


def process(part: readers.Partition, params: dict, encoder: ChatEncoder) -> tuple[dict, list[dict], dict]:
    """Records of a partition -> (columns of accepted records, rejects, counts). No I/O besides reading."""
    field_map = params["field_map"] or None
    fmt = params["format"]
    base = os.path.basename(part.source.rstrip("/")) or part.source
    ids: list[str] = []
    convs: list[list[dict]] = []
    raws: list[tuple[int, dict]] = []  # (row, original record) of accepted records, for rejects later
    rejects: list[dict] = []
    rows_in = 0

    def reject(rid, row, reason, detail, raw):
        rejects.append({"id": rid, "source": part.source, "row": row, "reason": reason, "detail": detail, "record": raw})

    for row, rec, bad in readers.read(part):
        rows_in += 1
        fallback = f"{base}:{row}"
        if bad is not None:
            reject(fallback, row, bad[0], bad[1], bad[2])
            continue
        rid = formats.record_id(rec, fallback) if isinstance(rec, dict) else fallback
        try:
            if not isinstance(rec, dict):
                raise formats.RecordError("not_an_object", f"the record is a JSON {type(rec).__name__}, not an object")
            kind = formats.detect_format(rec, field_map) if fmt == "auto" else fmt
            convs.append(formats.to_messages(rec, kind, field_map))
            ids.append(rid)
            raws.append((row, rec))
        except formats.RecordError as err:
            reject(rid, row, err.reason, err.detail, rec)

    cols: dict[str, list] = {"id": [], "input_ids": [], "loss_mask": [], "text": [], "spans": [], "offsets": []}
    truncated = 0
    for lo in range(0, len(convs), BATCH):
        batch = slice(lo, lo + BATCH)
        for rid, raw, enc in zip(ids[batch], raws[batch], encoder.encode_batch(convs[batch])):
            if isinstance(enc, formats.RecordError):
                reject(rid, raw[0], enc.reason, enc.detail, raw[1])
                continue
            truncated += enc.truncated
            cols["id"].append(rid)
            cols["input_ids"].append(enc.input_ids)
            cols["loss_mask"].append(enc.loss_mask)
            cols["text"].append(enc.text)
            cols["spans"].append(enc.content_spans)
            cols["offsets"].append(enc.offsets)
    reasons = Counter(r["reason"] for r in rejects)
    counts = {
        "index": part.index,
        "source": part.source,
        "records_in": rows_in,
        "written": len(cols["id"]),
        "rejected": dict(sorted(reasons.items())),
        "truncated": truncated,
    }
    return cols, rejects, counts


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


def write_stage(staging: str, index: int, table: pa.Table, rejects: list[dict], counts: dict) -> dict:
    """Write a partition's staged files (the .json last: it marks the partition done)."""
    atomic_write(stage_path(staging, index, "staged.parquet"), lambda p: pq.write_table(table, p, compression="lz4"))
    if "tfidf_terms" in table.column_names:
        df = tfidf.document_freq(table["tfidf_terms"].combine_chunks())
        atomic_write(stage_path(staging, index, "df.parquet"), lambda p: pq.write_table(df, p))
    lines = "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rejects)
    atomic_write_text(stage_path(staging, index, "rejects.jsonl"), lines)
    atomic_write_text(stage_path(staging, index, "json"), json.dumps(counts, sort_keys=True))
    return counts


def prepare_partition(part: readers.Partition, params: dict, tokenizer: str, staging: str, light: bool = False) -> dict:
    done = stage_path(staging, part.index, "json")
    if done.exists():
        return json.loads(done.read_text())
    encoder = get_encoder(tokenizer, params["max_length"], params["overflow"], params["trust_remote_code"], light)
    cols, rejects, counts = process(part, params, encoder)
    staged: dict[str, pa.Array] = {}
    for strategy in params["strategies"]:
        staged.update(strategies.stage(strategy, cols, params, tokenizer))
    table = staged_table(cols, staged)
    counts["tokens"] = int(table["num_tokens"].to_numpy().sum())  # the lengths staged_table already counted
    counts["loss_tokens"] = int(table["num_loss_tokens"].to_numpy().sum())
    return write_stage(staging, part.index, table, rejects, counts)
