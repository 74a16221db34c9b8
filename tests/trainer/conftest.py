"""Shared fixtures: shard directories written with pyarrow (the pipeline's contract) and a
tiny randomly initialised Llama saved with the embedded tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

os.environ.setdefault("SFTGO_CACHE", "/tmp/sftgo-cache")

from sftgo.core.fileio import file_sha256  # noqa: E402
from sftgo.core.shards import write_manifest  # noqa: E402


def write_shards(
    out_dir,
    records,
    *,
    rows_per_shard=16,
    strategies=("tfidf",),
    num_groups=2,
    tokenizer_name="embedded",
    fingerprint="test",
    vocab_size=64,
    eos_token_id=0,
    pad_token_id=None,
):
    """Write `records` (dicts with id, input_ids, loss_mask, and importance/group per strategy)
    as zstd Parquet shards plus manifest.json with correct sha256s. Returns the directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards, tokens, loss_tokens = [], 0, 0
    for i in range(0, max(len(records), 1), rows_per_shard):
        chunk = records[i : i + rows_per_shard]
        if not chunk:
            break
        cols = {
            "id": pa.array([r["id"] for r in chunk], pa.string()),
            "input_ids": pa.array([list(r["input_ids"]) for r in chunk], pa.list_(pa.int32())),
            "loss_mask": pa.array([list(r["loss_mask"]) for r in chunk], pa.list_(pa.int8())),
        }
        for s in strategies:
            cols[f"importance_{s}"] = pa.array([list(r[f"importance_{s}"]) for r in chunk], pa.list_(pa.float32()))
            cols[f"group_{s}"] = pa.array([list(r[f"group_{s}"]) for r in chunk], pa.list_(pa.int8()))
        cols["num_tokens"] = pa.array([len(r["input_ids"]) for r in chunk], pa.int32())
        cols["num_loss_tokens"] = pa.array([int(sum(r["loss_mask"])) for r in chunk], pa.int32())
        name = f"shard-{len(shards):05d}.parquet"
        pq.write_table(pa.table(cols), out / name, compression="zstd")
        t = sum(len(r["input_ids"]) for r in chunk)
        lt = sum(int(sum(r["loss_mask"])) for r in chunk)
        tokens, loss_tokens = tokens + t, loss_tokens + lt
        shards.append(
            {"path": name, "rows": len(chunk), "tokens": t, "loss_tokens": lt, "sha256": file_sha256(out / name)}
        )
    manifest = {
        "format_version": 1,
        "tokenizer": {
            "name": tokenizer_name,
            "fingerprint": fingerprint,
            "chat_template_sha256": "0" * 64,
            "vocab_size": vocab_size,
            "pad_token_id": pad_token_id,
            "eos_token_id": eos_token_id,
        },
        "params": {"max_length": 4096},
        "strategies": {s: {"eta": 0.3, "num_groups": num_groups} for s in strategies},
        "shards": shards,
        "totals": {
            "records_in": len(records),
            "records_written": len(records),
            "records_rejected": 0,
            "tokens": tokens,
            "loss_tokens": loss_tokens,
        },
        "rejected": {},
    }
    write_manifest(out, manifest)
    return out


def make_records(n, vocab, *, seed=0, min_len=8, max_len=40, num_groups=2, strategies=("tfidf",), prefix="r"):
    """Random samples: a prompt (mask 0) then a response (mask 1) with importance-quantile groups."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        L = int(rng.integers(min_len, max_len + 1))
        p = int(rng.integers(1, max(2, L // 2)))
        ids = rng.integers(1, vocab, size=L).astype(np.int32)
        mask = np.zeros(L, np.int8)
        mask[p:] = 1
        rec = {"id": f"{prefix}{i}", "input_ids": ids.tolist(), "loss_mask": mask.tolist()}
        for s in strategies:
            imp = np.where(mask == 1, rng.random(L), 0.0).astype(np.float32)
            grp = np.full(L, -1, np.int8)
            sup = np.flatnonzero(mask)
            order = np.argsort(imp[sup], kind="stable")
            q = (np.arange(len(sup)) * num_groups) // max(1, len(sup))
            grp[sup[order]] = q.astype(np.int8)
            rec[f"importance_{s}"] = imp.tolist()
            rec[f"group_{s}"] = grp.tolist()
        records.append(rec)
    return records


@pytest.fixture(scope="session")
def shardkit():
    """The helpers above, as a fixture (test modules never import conftest by name)."""
    from types import SimpleNamespace

    return SimpleNamespace(write_shards=write_shards, make_records=make_records)


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_lm):
    """A 2-layer, hidden-32 Llama over the embedded tokenizer's vocabulary (tests/conftest.py)."""
    return tiny_lm(0)


@pytest.fixture(scope="session")
def fingerprint(tokenizer):
    from sftgo.core.models import tokenizer_fingerprint

    return tokenizer_fingerprint(tokenizer)


def _train_shards(out_dir, tokenizer, fingerprint):
    """The train shards (48 records, 3 shards) matching the tiny model's tokenizer, written to `out_dir`."""
    recs = make_records(48, 500, seed=1)
    return write_shards(
        out_dir,
        recs,
        fingerprint=fingerprint,
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


@pytest.fixture
def shard_dir(tmp_path, tokenizer, fingerprint):
    """A train shard directory of its own for the test (it may change it)."""
    return _train_shards(tmp_path / "shards", tokenizer, fingerprint)


@pytest.fixture(scope="session")
def shared_shard_dir(tmp_path_factory, tokenizer, fingerprint):
    """The same shards, written once for the session: for tests that only read them."""
    return _train_shards(tmp_path_factory.mktemp("train") / "shards", tokenizer, fingerprint)


@pytest.fixture
def eval_dir(tmp_path, tokenizer, fingerprint):
    recs = make_records(12, 500, seed=2, prefix="e")
    return write_shards(
        tmp_path / "eval",
        recs,
        fingerprint=fingerprint,
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
