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
    assert [[x.stop - x.start > 0 for x in p.pieces] for p in parts] == [[True]] * 5
    assert [p.index for p in parts] == list(range(5))
    assert [r.record for r in rows] == RECORDS
    assert [r.row for r in rows] == list(range(23))


def test_bad_lines_are_yielded_as_rejections(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"a": 1}\n{not json\n\xff\xfe{"b": 2}\n[1, 2]\n')
    _, rows = read_all([path])
    assert [r.reject[0] if r.reject else None for r in rows] == [None, "malformed_json", "invalid_utf8", None]
    assert [r.raw for r in rows] == [
        '{"a": 1}',
        "{not json",
        '\\xff\\xfe{"b": 2}',
        "[1, 2]",
    ]  # every line's text is kept
    assert rows[3].record == [1, 2]  # not an object: the normaliser rejects it later


def test_blank_lines_are_skipped_and_counted_per_partition(tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "b.jsonl", ["", *RECORDS[:3], "  ", "", *RECORDS[3:6], "\t"])
    parts, rows = read_all([path], rows_per_shard=3)
    assert [r.record for r in rows] == RECORDS[:6] and [r.row for r in rows] == list(range(6))
    assert [p.blank_lines for p in parts] == [3, 1]  # every blank line in exactly one partition


def test_csv_blank_lines_are_counted(tmp_path):
    inp = tmp_path / "b.csv"
    inp.write_text("prompt,completion\n\nQ1,A1\n\n\nQ2,A2\n")
    parts, rows = read_all([inp], rows_per_shard=100)
    assert [r.record for r in rows] == [{"prompt": "Q1", "completion": "A1"}, {"prompt": "Q2", "completion": "A2"}]
    assert sum(p.blank_lines for p in parts) == 3


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
        inp.write_text(
            "instruction,input,output\n" + "".join(f'"{r["instruction"]}","","{r["output"]}"\n' for r in RECORDS)
        )
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
    assert [r.record for r in rows] == RECORDS
    assert all(r.reject is None for r in rows)


def test_csv_fields_stay_strings(tmp_path):
    inp = tmp_path / "n.csv"
    inp.write_text("prompt,completion\nWhat is 6 x 7?,42\n")
    _, rows = read_all([inp])
    assert rows[0].record == {"prompt": "What is 6 x 7?", "completion": "42"}


def test_datasetdict_split(tmp_path):
    inp = tmp_path / "dd"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(RECORDS[:3]), "test": datasets.Dataset.from_list(RECORDS[3:5])}
    ).save_to_disk(str(inp))
    assert [r.record for r in read_all([inp], split="test")[1]] == RECORDS[3:5]
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
        (lambda p: (p / "t.json").write_text('[{"a": 1} {"b": 2}]') and p / "t.json", "not valid JSON"),
        (lambda p: (p / "d.json").write_text("[" * 5000 + "]" * 4999) and p / "d.json", "not valid JSON"),
        (lambda p: (p / "x.json").write_text('[{"a": 1}] extra') and p / "x.json", "not valid JSON"),
        (lambda p: (p / "h.csv").write_text("a,b,a\n1,2,3\n") and p / "h.csv", "column 'a' twice"),
        (lambda p: (p / "n.csv").write_text("\n") and p / "n.csv", "no CSV header"),
    ],
)
def test_unreadable_inputs_give_one_sentence(tmp_path, setup, message):
    with pytest.raises(readers.InputError, match=message) as e:
        read_all([setup(tmp_path)])
    assert "\n" not in str(e.value) and len(str(e.value)) < 300


def test_an_input_joins_the_partition_before_only_when_small_and_whole(tmp_path, write_jsonl):
    """An input fewer than OWN_SHARD_ROWS records long that fits whole in the room left joins the partition
    before it; an input that does not fit, or is OWN_SHARD_ROWS records or more, starts a partition of its own
    (so two inputs of a few hundred records stay two shards, as they were)."""
    own = readers.OWN_SHARD_ROWS
    one = write_jsonl(tmp_path / "one.jsonl", RECORDS[:1])
    under = write_jsonl(tmp_path / "under.jsonl", [RECORDS[0]] * (own - 1))
    at = write_jsonl(tmp_path / "at.jsonl", [RECORDS[0]] * own)

    def shape(inputs, rows_per_shard):
        parts = readers.plan([str(i) for i in inputs], rows_per_shard)
        return [[(x.source.rsplit("/", 1)[-1], x.rows) for x in p.pieces] for p in parts]

    assert shape([one, under, one], 10 * own) == [[("one.jsonl", 1), ("under.jsonl", own - 1), ("one.jsonl", 1)]]
    assert shape([one, at, one], 10 * own) == [[("one.jsonl", 1)], [("at.jsonl", own), ("one.jsonl", 1)]]
    assert shape([one, under, under], own) == [[("one.jsonl", 1), ("under.jsonl", own - 1)], [("under.jsonl", own - 1)]]


def test_the_plan_digest_names_the_input_of_every_piece(tmp_path, write_jsonl):
    """Two plans that read the same bytes into the same partitions but name an input differently (its records
    are counted under that name) have different digests: a resumed build does not reuse the other's staging."""
    a = write_jsonl(tmp_path / "a.jsonl", RECORDS[:2])
    write_jsonl(tmp_path / "b.jsonl", RECORDS[2:4])
    one = readers.plan([str(a), str(tmp_path / "b.jsonl")], 10)
    other = readers.plan([str(a), f"{tmp_path}/./b.jsonl"], 10)
    assert [[(x.path, x.start, x.stop) for x in p.pieces] for p in one] == [
        [(x.path, x.start, x.stop) for x in p.pieces] for p in other
    ]
    assert readers.plan_digest(one) != readers.plan_digest(other)
