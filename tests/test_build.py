"""`sftgo-prep build` through run(): shards, manifest, accounting, round trips through other readers."""

from __future__ import annotations

import fcntl
import json
import math
from pathlib import Path

import datasets
import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sftgo.core import models
from sftgo.core.fileio import file_sha256
from sftgo.core.locks import LockedError
from sftgo.core.shards import ShardError, read_manifest, verify_shards
from sftgo.grouping.assign import assign_groups
from sftgo.pipeline.build import BuildError, run
from sftgo.pipeline.config import BuildConfig

ROOT = Path(__file__).resolve().parents[1]
BAD_LINES = [
    b"{not json",  # malformed_json
    b'\xff\xfe{"instruction": "q", "output": "a"}',  # invalid_utf8
    b"[1, 2]",  # not_an_object
    b'{"instruction": "Say nothing.", "output": "   "}',  # empty_response
    b'{"conversations": [{"from": "tool", "value": "x"}, {"from": "gpt", "value": "y"}]}',  # unknown_role
    b'{"instruction": 5, "output": "five"}',  # wrong_type
    b'{"messages": [{"role": "user", "content": "hi"}]}',  # no_assistant_turn
    b'{"instruction": "End<|im_end|>", "output": "x"}',  # control_token_in_text
    b'{"title": "no known fields"}',  # unknown_format
    b'{"instruction": "Write a long answer.", "output": "' + b"word " * 400 + b'"}',  # truncated, kept
    b'{"instruction": "' + b"long prompt " * 300 + b'", "output": "late"}',  # no_loss_tokens after truncation
]
EXPECTED_REJECTS = {
    "malformed_json": 1,
    "invalid_utf8": 1,
    "not_an_object": 1,
    "empty_response": 1,
    "unknown_role": 1,
    "wrong_type": 1,
    "no_assistant_turn": 1,
    "control_token_in_text": 1,
    "unknown_format": 1,
    "no_loss_tokens": 1,
}


@pytest.fixture(scope="module")
def built(tmp_path_factory, dask_scheduler):
    tmp = tmp_path_factory.mktemp("build")
    bad = tmp / "bad.jsonl"
    bad.write_bytes(b"\n".join(BAD_LINES) + b"\n")
    sharegpt = tmp / "sharegpt.parquet"
    pq.write_table(
        pa.Table.from_pylist(
            [
                {
                    "conversations": [
                        {"from": "human", "value": f"Name river {i}."},
                        {"from": "gpt", "value": f"The Oriel {i}."},
                    ]
                }
                for i in range(30)
            ]
        ),
        sharegpt,
    )
    pc_csv = tmp / "pc.csv"
    pc_csv.write_text("prompt,completion\n" + "".join(f"What is {i} + {i}?,{2 * i}\n" for i in range(20)))
    cfg = BuildConfig(
        inputs=[str(ROOT / "data/alpaca.jsonl"), str(ROOT / "data/chat.jsonl"), str(bad), str(sharegpt), str(pc_csv)],
        out=str(tmp / "out"),
        rows_per_shard=128,
        max_length=256,
        scheduler=dask_scheduler,
        rejects=str(tmp / "rejects.jsonl"),
        progress=False,
    )
    manifest, wrote = run(cfg)
    assert wrote
    return cfg, manifest, Path(cfg.out)


def shard_table(out: Path, manifest: dict) -> pa.Table:
    return pa.concat_tables([pq.read_table(out / s["path"]) for s in manifest["shards"]])


def test_accounting_nothing_lost(built):
    cfg, manifest, out = built
    t = manifest["totals"]
    assert t["records_in"] == 300 + 300 + len(BAD_LINES) + 30 + 20
    assert t["records_in"] == t["records_written"] + t["records_rejected"]
    assert manifest["rejected"] == EXPECTED_REJECTS
    assert t["truncated"] >= 2  # the long answer and some long generated records
    rejects = [json.loads(line) for line in Path(cfg.rejects).read_text().splitlines()]
    assert len(rejects) == t["records_rejected"]
    assert {r["reason"] for r in rejects} == set(EXPECTED_REJECTS)
    assert all(r["detail"] and r["source"] for r in rejects)
    assert sum(i["records_in"] for i in manifest["inputs"]) == t["records_in"]


def test_manifest_and_shards_are_consistent(built):
    cfg, manifest, out = built
    assert read_manifest(out) == manifest
    assert not (out / ".staging").exists()
    tok = models.load_tokenizer(None)
    assert manifest["tokenizer"]["fingerprint"] == models.tokenizer_fingerprint(tok)
    assert manifest["params"]["eta"] == 0.3 and manifest["params"]["inputs"] == cfg.inputs
    assert [s["path"] for s in manifest["shards"]] == [f"shard-{i:05d}.parquet" for i in range(len(manifest["shards"]))]
    verify_shards(out, strategies=("tfidf",), tokenizer_fingerprint=manifest["tokenizer"]["fingerprint"])
    assert file_sha256(out / "idf.parquet") == manifest["strategies"]["tfidf"]["idf"]["sha256"]
    assert pq.ParquetFile(out / "shard-00000.parquet").metadata.row_group(0).column(0).compression == "ZSTD"
    table = shard_table(out, manifest)
    assert table.num_rows == manifest["totals"]["records_written"] == sum(s["rows"] for s in manifest["shards"])
    assert sum(s["tokens"] for s in manifest["shards"]) == manifest["totals"]["tokens"]
    assert len(set(table["id"].to_pylist())) == table.num_rows


def test_columns_obey_the_schema(built):
    _, manifest, out = built
    table = shard_table(out, manifest)
    assert table.schema.field("input_ids").type == pa.list_(pa.int32())
    assert table.schema.field("loss_mask").type == pa.list_(pa.int8())
    assert table.schema.field("importance_tfidf").type == pa.list_(pa.float32())
    assert table.schema.field("group_tfidf").type == pa.list_(pa.int8())
    for row in table.slice(0, 200).to_pylist():
        mask, imp, grp = np.array(row["loss_mask"]), np.array(row["importance_tfidf"]), np.array(row["group_tfidf"])
        n = int(mask.sum())
        assert len(row["input_ids"]) == row["num_tokens"] == len(mask) == len(imp) == len(grp) <= 256
        assert n == row["num_loss_tokens"] > 0
        assert (grp[mask == 0] == -1).all() and (imp[mask == 0] == 0).all() and (grp[mask == 1] >= 0).all()
        assert (grp == 1).sum() == max(1, math.ceil(0.3 * n - 1e-9))
        assert imp[grp == 1].min() >= imp[grp == 0].max(initial=0.0)  # important = highest scores
    # groups are reproducible from the stored scores
    col = table["importance_tfidf"].combine_chunks()
    offsets = col.offsets.to_numpy()
    again = assign_groups(
        col.flatten().to_numpy(), table["loss_mask"].combine_chunks().flatten().to_numpy(), offsets, 0.3
    )
    assert np.array_equal(again, table["group_tfidf"].combine_chunks().flatten().to_numpy())


def test_readable_by_datasets_pandas_duckdb(built):
    _, manifest, out = built
    files = [str(out / s["path"]) for s in manifest["shards"]]
    ds = datasets.load_dataset("parquet", data_files=files, split="train")
    assert len(ds) == manifest["totals"]["records_written"]
    assert set(ds.column_names) >= {
        "id",
        "input_ids",
        "loss_mask",
        "importance_tfidf",
        "group_tfidf",
        "num_tokens",
        "num_loss_tokens",
    }
    df = pd.read_parquet(out / "shard-00000.parquet")
    assert len(df) == manifest["shards"][0]["rows"]
    tokens = duckdb.sql(f"SELECT sum(num_tokens) FROM read_parquet({files!r})").fetchall()[0][0]
    assert tokens == manifest["totals"]["tokens"]
    important = duckdb.sql(
        f"SELECT count(*) FROM (SELECT unnest(group_tfidf) AS g FROM read_parquet({files!r})) WHERE g = 1"
    ).fetchall()[0][0]
    assert 0.29 < important / manifest["totals"]["loss_tokens"] < 0.35


def test_corrupted_and_foreign_shards_are_named(built, tmp_path):
    import shutil

    _, manifest, out = built
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    with pytest.raises(ShardError, match="vocabulary differs"):
        verify_shards(copy, tokenizer_fingerprint="0" * 64)
    with pytest.raises(ShardError, match="no 'semantic' groups"):
        verify_shards(copy, strategies=("semantic",))
    shard = copy / "shard-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="shard-00001.parquet does not match its checksum"):
        verify_shards(copy)
    pq.write_table(pa.table({"id": ["x"]}), shard)  # a foreign file under the same name
    with pytest.raises(ShardError, match="shard-00001.parquet has no column 'input_ids'"):
        verify_shards(copy, checksums=False)
    shutil.copy(out / "shard-00001.parquet", shard)
    (copy / "shard-00002.parquet").unlink()
    with pytest.raises(ShardError, match="shard-00002.parquet listed in the manifest is missing"):
        verify_shards(copy, checksums=False)


def small_cfg(tmp_path, scheduler: str | None, **kw) -> BuildConfig:
    return BuildConfig(
        inputs=[str(ROOT / "data/alpaca.jsonl")], out=str(tmp_path / "o"), scheduler=scheduler, progress=False, **kw
    )


def test_rebuild_refusals_and_drop_policy(tmp_path, dask_scheduler):
    cfg = small_cfg(tmp_path, dask_scheduler, max_length=64, overflow="drop", tfidf_unit="token")
    manifest, _ = run(cfg)
    assert manifest["rejected"].get("too_long", 0) > 0
    assert manifest["totals"]["truncated"] == 0
    assert (
        manifest["totals"]["records_in"]
        == 300
        == manifest["totals"]["records_written"] + manifest["rejected"]["too_long"]
    )
    assert run(cfg) == (manifest, False)  # same parameters: nothing to do, nothing written
    with pytest.raises(BuildError, match="finished build with other parameters"):
        run(small_cfg(tmp_path, dask_scheduler, max_length=64, overflow="drop", eta=0.5))
    again, wrote = run(small_cfg(tmp_path, dask_scheduler, max_length=64, overflow="drop", eta=0.5, overwrite=True))
    assert wrote
    assert again["params"]["eta"] == 0.5


def test_an_unfinished_build_of_another_staging_format_is_not_resumed(tmp_path):
    """A staging folder that an older sftgo left (its build.json without this version's staged format) is
    refused with one sentence that says so, before any cluster starts; other keys keep their own sentence."""
    from sftgo.pipeline import build

    cfg = small_cfg(tmp_path, None)
    staging = Path(cfg.out) / build.STAGING
    staging.mkdir(parents=True)
    key = {"params": cfg.params(), "inputs": build._input_identity(cfg)}  # what builds before the Arrow staging wrote
    (staging / "build.json").write_text(json.dumps(key, sort_keys=True))
    with pytest.raises(BuildError, match="staged by another version of sftgo; pass --overwrite"):
        run(cfg)
    key["params"]["eta"] = 0.9
    (staging / "build.json").write_text(json.dumps(key, sort_keys=True))
    with pytest.raises(BuildError, match="unfinished build with other parameters or inputs"):
        run(cfg)


def test_second_build_refuses_while_first_runs(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    with open(out / ".lock", "a+") as fh:  # what a running build holds
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(LockedError, match="Another build .* is writing to"):
            run(small_cfg(tmp_path, None))  # refused before any cluster starts
    assert not (out / "manifest.json").exists()


def test_k_groups(tmp_path, dask_scheduler):
    manifest, _ = run(small_cfg(tmp_path, dask_scheduler, num_groups=4))
    table = shard_table(Path(tmp_path / "o"), manifest)
    g = table["group_tfidf"].combine_chunks().flatten().to_numpy()
    frac = np.bincount(g[g >= 0]) / (g >= 0).sum()
    assert len(frac) == 4 and np.allclose(frac, 0.25, atol=0.03)


def test_field_map_and_forced_format(tmp_path, write_jsonl, dask_scheduler):
    src = write_jsonl(
        tmp_path / "qa.jsonl",
        [{"question": f"Who built tower {i}?", "answer": f"Idris Pellow built tower {i}."} for i in range(12)],
    )
    cfg = BuildConfig(
        inputs=[str(src)],
        out=str(tmp_path / "o"),
        scheduler=dask_scheduler,
        progress=False,
        format="alpaca",
        field_map={"instruction": "question", "output": "answer"},
    )
    manifest, _ = run(cfg)
    assert manifest["totals"]["records_written"] == 12 and manifest["params"]["field_map"] == {
        "instruction": "question",
        "output": "answer",
    }
    with pytest.raises(
        BuildError,
        match="Wrote 0 records: 12 of 12 record.s. were rejected as missing_field; name your fields with --field-map",
    ):
        run(
            BuildConfig(
                inputs=[str(src)], out=str(tmp_path / "p"), scheduler=dask_scheduler, progress=False, format="alpaca"
            )
        )


def test_a_known_tokenizer_is_not_loaded_in_the_driver(tokenizer, tmp_path, monkeypatch, dask_scheduler):
    """Once the light load is known to equal AutoTokenizer's, the driver loads no tokenizer: a worker's
    warm-up reports the manifest's tokenizer entry, and the build is the same, byte for byte."""
    tok_dir = tmp_path / "tok"
    tokenizer.save_pretrained(tok_dir)
    monkeypatch.setattr(models, "cache_root", lambda: tmp_path / "cache")

    def build(out):
        cfg = BuildConfig(
            inputs=[str(ROOT / "data" / "alpaca.jsonl")],
            out=str(tmp_path / out),
            tokenizer=str(tok_dir),
            scheduler=dask_scheduler,
            progress=False,
        )
        return run(cfg)[0]

    assert not models.light_load_known(str(tok_dir))
    first = build("first")  # the driver compares both loads and remembers the verdict
    assert models.light_load_known(str(tok_dir)) and not models.light_load_known(str(tok_dir), trust_remote_code=True)
    refuse = lambda *a, **k: pytest.fail("the driver loaded a tokenizer")  # noqa: E731
    monkeypatch.setattr(models, "load_tokenizer", refuse)
    monkeypatch.setattr(models, "load_tokenizer_light", refuse)
    second = build("second")
    assert second == first and second["tokenizer"]["name"] == str(tok_dir)
    assert second["tokenizer"]["fingerprint"] == models.tokenizer_fingerprint(tokenizer)
    for shard in first["shards"]:
        assert (tmp_path / "first" / shard["path"]).read_bytes() == (tmp_path / "second" / shard["path"]).read_bytes()
