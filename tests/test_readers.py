"""Readers: every input kind, partition planning, and malformed input counted, never dropped."""
from __future__ import annotations

import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sftgo.pipeline import readers

RECORDS = [{"instruction": f"Question {i}?", "input": "", "output": f"Answer number {i}."} for i in range(23)]


def read_all(inputs, rows_per_shard=5, split="train"):
    parts = readers.plan([str(i) for i in inputs], rows_per_shard, split)
    rows = [item for p in parts for item in readers.read(p)]
    return parts, rows


def test_jsonl_partitions_cover_every_line_once(tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "a.jsonl", RECORDS[:11] + [""] + RECORDS[11:])  # a blank line is not a record
    parts, rows = read_all([path], rows_per_shard=5)
    assert [p.stop - p.start > 0 for p in parts] == [True] * 5
    assert [p.index for p in parts] == list(range(5))
    assert [r[1] for r in rows] == RECORDS
    assert [r[0] for r in rows] == list(range(23))


def test_bad_lines_are_yielded_as_rejections(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"a": 1}\n{not json\n\xff\xfe{"b": 2}\n[1, 2]\n')
    _, rows = read_all([path])
    assert [r[2][0] if r[2] else None for r in rows] == [None, "malformed_json", "invalid_utf8", None]
    assert rows[1][2][2] == "{not json"  # the raw line is kept for the rejects file
    assert rows[3][1] == [1, 2]  # not an object: the normaliser rejects it later


@pytest.mark.parametrize("kind", ["json", "parquet", "csv", "arrow_dir", "hf_local", "folder"])
def test_every_input_kind_reads_all_records(tmp_path, kind, write_jsonl):
    if kind == "json":
        inp = tmp_path / "a.json"
        inp.write_text(json.dumps(RECORDS))
    elif kind == "parquet":
        inp = tmp_path / "a.parquet"
        pq.write_table(pa.Table.from_pylist(RECORDS), inp, row_group_size=4)
    elif kind == "csv":
        inp = tmp_path / "a.csv"
        inp.write_text("instruction,input,output\n" + "".join(f'"{r["instruction"]}","","{r["output"]}"\n' for r in RECORDS))
    elif kind == "arrow_dir":
        inp = tmp_path / "ds"
        datasets.Dataset.from_list(RECORDS).save_to_disk(str(inp))
    elif kind == "hf_local":  # a hub-style dataset name resolved through datasets.load_dataset
        folder = tmp_path / "repo"
        folder.mkdir()
        write_jsonl(folder / "train.jsonl", RECORDS)
        inp = f"hf:{folder}"
    else:
        inp = tmp_path / "mixed"
        inp.mkdir()
        write_jsonl(inp / "a.jsonl", RECORDS[:10])
        pq.write_table(pa.Table.from_pylist(RECORDS[10:]), inp / "b.parquet")
    _, rows = read_all([inp], rows_per_shard=5)
    assert [r[1] for r in rows] == RECORDS


def test_csv_fields_stay_strings(tmp_path):
    inp = tmp_path / "n.csv"
    inp.write_text("prompt,completion\nWhat is 6 x 7?,42\n")
    _, rows = read_all([inp])
    assert rows[0][1] == {"prompt": "What is 6 x 7?", "completion": "42"}


def test_datasetdict_split(tmp_path):
    inp = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(RECORDS[:3]), "test": datasets.Dataset.from_list(RECORDS[3:5])}).save_to_disk(str(inp))
    assert [r[1] for r in read_all([inp], split="test")[1]] == RECORDS[3:5]
    with pytest.raises(readers.InputError, match="no split 'dev'"):
        readers.plan([str(inp)], 5, "dev")


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: p / "missing.jsonl", "does not exist"),
        (lambda p: (p / "x.txt").write_text("hi") and p / "x.txt", "unsupported extension"),
        (lambda p: (p / "e").mkdir() or p / "e", "holds no .jsonl"),
        (lambda p: (p / "a.json").write_text("[1, 2") and p / "a.json", "not valid JSON"),
        (lambda p: (p / "empty.jsonl").write_text("\n\n") and p / "empty.jsonl", "hold no records"),
    ],
)
def test_unreadable_inputs_give_one_sentence(tmp_path, setup, message):
    with pytest.raises(readers.InputError, match=message):
        read_all([setup(tmp_path)])
