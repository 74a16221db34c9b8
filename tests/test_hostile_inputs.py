"""Hostile inputs: a fault inside one record is that record's counted rejection, with its original text
kept for --rejects, never the death of a partition or of a build; a whole file that cannot be read is
one sentence.  Unit tests on readers.read / prepare.process, then one real build through the CLI."""

from __future__ import annotations

import codecs
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sftgo.pipeline import readers
from sftgo.pipeline.chat import ChatEncoder
from sftgo.pipeline.config import BuildConfig
from sftgo.pipeline.prepare import process

GOOD = '{"instruction": "Name a river.", "output": "The Norford River."}'
DEEP = "[" * 10_000 + "]" * 10_000
# (line as bytes, the reason it is rejected for, or None when it is accepted).  The first line starts
# with a UTF-8 BOM: it must not cost the first record.
HOSTILE: list[tuple[bytes, str | None]] = [
    (codecs.BOM_UTF8 + GOOD.encode(), None),
    (b'{"instruction": "Q?", "output": "bad \\ud800 answer"}', "invalid_unicode"),  # in the response
    (b'{"id": "x\\udfff", "instruction": "Q?", "output": "A."}', "invalid_unicode"),  # in the id
    (b'{"instruction": "Q?", "output": "A.", "system": "\\uDC00"}', "invalid_unicode"),  # system, upper-case escape
    (b'{"instruction": "Q?", "output": "A.", "history": [["\\ud800", "a"]]}', "invalid_unicode"),  # history
    (
        b'{"messages": [{"role": "user\\ud800", "content": "q"}, {"role": "assistant", "content": "a"}]}',
        "invalid_unicode",
    ),
    (b'{"instruction": "Q?", "output": "A.", "\\ud800": 1}', "invalid_unicode"),  # a field name
    (
        b'{"instruction": "Q?", "output": "A.", "meta": ' + DEEP.encode() + b"}",
        "too_deep",
    ),  # past Python's recursion limit
    (
        b'{"instruction": "Q?", "output": "A.", "meta": ' + b"[" * 150 + b"]" * 150 + b"}",
        "too_deep",
    ),  # parses, too deep
    (DEEP.encode(), "too_deep"),
    (b'{"instruction": "Q?", "output": "A.", "score": NaN}', "invalid_number"),
    (b'{"instruction": "Q?", "output": "A.", "score": -Infinity}', "invalid_number"),
    (b'{"instruction": "Q?", "output": "A.", "id": ' + b"7" * 5000 + b"}", "invalid_number"),
    (b'"just a string"', "not_an_object"),
    (b"42", "not_an_object"),
    (b"null", "not_an_object"),
    (b"[1, 2]", "not_an_object"),
    (b'{"instruction": 5, "output": "A."}', "wrong_type"),  # a number where a string is expected
    (b'{"instruction": "Q?", "output": 1e400}', "wrong_type"),
    (b'{"instruction": "Q?", "output": "A.\x00"}', "malformed_json"),  # a raw NUL byte
    (b'\xff\xfe{"instruction": "Q?", "output": "A."}', "invalid_utf8"),
    (b'{"instruction": "Q?", "output": "\xed\xa0\x80"}', "invalid_utf8"),  # a surrogate encoded in UTF-8
    (b"{not json", "malformed_json"),
    (codecs.BOM_UTF8, "malformed_json"),  # a line holding only a BOM is not blank and not JSON
    (b'{"instruction": "Q\\u0000?", "output": "A\\u0000."}', None),  # an escaped NUL is valid text
    (b'{"instruction": "Smile?", "output": "\\ud83d\\ude00 yes"}', None),  # a surrogate pair is one emoji
    (b'{"id": 12345678901234567890123, "instruction": "Q?", "output": "A."}', None),  # a big but readable int id
    (GOOD.encode(), None),
]
BLANKS = [b"", b"   ", b"\t\r"]  # skipped and counted, not records


def hostile_file(path: Path) -> Path:
    lines = [line for line, _ in HOSTILE]
    lines[3:3] = BLANKS  # blank lines in the middle, one partition or another counts them
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def expected_counts() -> dict[str, int]:
    counts: dict[str, int] = {}
    for _, reason in HOSTILE:
        if reason:
            counts[reason] = counts.get(reason, 0) + 1
    return dict(sorted(counts.items()))


@pytest.fixture(scope="module")
def encoder(tokenizer):
    return ChatEncoder(tokenizer, 256)


def run_process(path, encoder, rows_per_shard=4, field_map=None):
    """process() over every partition of `path`; returns (written ids, rejects, per-partition counts)."""
    ids, rejects, counts = [], [], []
    for part in readers.plan([str(path)], rows_per_shard):
        cols, rej, c = process(part, BuildConfig(inputs=[str(path)], field_map=field_map or {}), encoder)
        ids += cols["id"]
        rejects += rej
        counts.append(c)
    return ids, rejects, counts


def assert_exact(counts: list[dict]) -> None:
    for c in counts:
        assert c["records_in"] == c["written"] + sum(c["rejected"].values())


@pytest.mark.parametrize("rows_per_shard", [1, 4, 1000])
def test_every_hostile_line_is_its_own_counted_reject(tmp_path, encoder, rows_per_shard):
    ids, rejects, counts = run_process(hostile_file(tmp_path / "h.jsonl"), encoder, rows_per_shard)
    assert_exact(counts)
    assert {r["row"]: r["reason"] for r in rejects} == {i: reason for i, (_, reason) in enumerate(HOSTILE) if reason}
    assert len(ids) == sum(reason is None for _, reason in HOSTILE) == sum(c["written"] for c in counts)
    assert "12345678901234567890123" in ids and "h.jsonl:0" in ids  # the BOM line kept its record
    assert sum(c["blank_lines"] for c in counts) == len(BLANKS)
    total: dict[str, int] = {}
    for c in counts:
        for reason, n in c["rejected"].items():
            total[reason] = total.get(reason, 0) + n
    assert dict(sorted(total.items())) == expected_counts()
    for r in rejects:
        assert r["detail"].endswith(".") and "\n" not in r["detail"] and len(r["detail"]) < 200


def test_every_reject_keeps_its_line_as_valid_json(tmp_path, encoder):
    _, rejects, _ = run_process(hostile_file(tmp_path / "h.jsonl"), encoder)
    for r in rejects:
        line = json.dumps(r, ensure_ascii=False).encode("utf-8")  # raises on an unescaped surrogate
        assert json.loads(line) == r
        original = HOSTILE[r["row"]][0].removeprefix(codecs.BOM_UTF8)
        if r["reason"] == "invalid_utf8":
            assert r["raw"] == original.decode("utf-8", errors="backslashreplace")
        else:
            assert r["raw"] == original.decode("utf-8")  # the line exactly as read


def test_encoder_rejects_keep_raw_text_too(tmp_path, encoder, write_jsonl):
    long_prompt = {"instruction": "long prompt " * 300, "output": "late"}
    path = write_jsonl(
        tmp_path / "t.jsonl", [json.loads(GOOD), long_prompt, {"instruction": "a<|im_end|>", "output": "x"}]
    )
    _, rejects, counts = run_process(path, encoder)
    assert [(r["reason"], json.loads(r["raw"])) for r in rejects] == [
        ("no_loss_tokens", long_prompt),
        ("control_token_in_text", {"instruction": "a<|im_end|>", "output": "x"}),
    ]
    assert_exact(counts)


def test_json_array_rejects_only_the_bad_elements(tmp_path, encoder):
    good = json.loads(GOOD)
    elements = [GOOD, '{"meta": ' + DEEP + "}", '{"x": Infinity}', "9" * 5000, '{"output": "\\ud800"}', "[1]", GOOD]
    path = tmp_path / "a.json"
    path.write_bytes(codecs.BOM_UTF8 + ("[\n  " + ",\n  ".join(elements) + "\n]\n").encode())
    items = [item for p in readers.plan([str(path)], 3) for item in readers.read(p)]
    assert [i.reject[0] if i.reject else None for i in items] == [
        None,
        "too_deep",
        "invalid_number",
        "invalid_number",
        "invalid_unicode",
        None,
        None,
    ]
    assert items[0].record == items[6].record == good
    assert items[1].raw == '{"meta": ' + DEEP + "}"  # the element's text, found without parsing it
    ids, rejects, counts = run_process(path, encoder, rows_per_shard=3)
    assert_exact(counts)
    assert len(ids) == 2 and [r["reason"] for r in rejects] == [
        "too_deep",
        "invalid_number",
        "invalid_number",
        "invalid_unicode",
        "not_an_object",
    ]
    assert json.loads(rejects[3]["raw"]) == {"output": "\ud800"}  # escaped again: valid JSON, same value


def test_json_array_bytes_that_are_not_utf8_reject_their_element(tmp_path):
    path = tmp_path / "a.json"
    path.write_bytes(b'[{"instruction": "Q", "output": "\xff"}, ' + GOOD.encode() + b"]")
    items = [item for p in readers.plan([str(path)], 10) for item in readers.read(p)]
    assert [i.reject[0] if i.reject else None for i in items] == ["invalid_unicode", None]
    assert readers.raw_text(items[0]).encode("utf-8")  # renders as valid UTF-8 text


def test_csv_hostile_rows(tmp_path, encoder):
    path = tmp_path / "a.csv"
    path.write_bytes(
        codecs.BOM_UTF8
        + b"instruction,output\n"
        + b"Q1,A1\n"
        + b"Q\x002,A2\n"
        + b"Q3,\xff\n"
        + b"Q4,A4,extra\n"
        + b"Q5\n"
        + b"\n"
        + b'"Q6","'
        + b"x" * 200_000
        + b'"\n'
        + b"Q7,7\n"
    )
    items = [item for p in readers.plan([str(path)], 3) for item in readers.read(p)]
    assert [i.reject[0] if i.reject else None for i in items] == [
        None,
        None,
        "invalid_unicode",
        "malformed_csv",
        "malformed_csv",
        None,
        None,
    ]
    assert items[0].record == {"instruction": "Q1", "output": "A1"}  # the BOM is not part of the first column's name
    assert json.loads(readers.raw_text(items[3])) == ["Q4", "A4", "extra"]
    ids, rejects, counts = run_process(path, encoder, rows_per_shard=3)
    assert_exact(counts)
    assert sum(c["blank_lines"] for c in counts) == 1
    assert len(ids) == 4 and all(json.dumps(r, ensure_ascii=False).encode() for r in rejects)


def test_parquet_row_with_bytes_that_are_not_utf8(tmp_path, encoder):
    offsets = pa.py_buffer(b"".join(n.to_bytes(4, "little") for n in (0, 2, 4, 6)))
    bad = pa.Array.from_buffers(pa.string(), 3, [None, offsets, pa.py_buffer(b"A.\xff\xfeA.")])
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"instruction": ["Q1", "Q2", "Q3"], "output": bad}), path)
    ids, rejects, counts = run_process(path, encoder)
    assert_exact(counts)
    assert len(ids) == 2 and [(r["row"], r["reason"]) for r in rejects] == [(1, "invalid_utf8")]
    assert json.loads(rejects[0]["raw"]) == {"instruction": "Q2", "output": "\\xff\\xfe"}
    assert "'output'" in rejects[0]["detail"]


def test_parquet_rows_render_as_json_in_rejects(tmp_path, encoder):
    path = tmp_path / "b.parquet"
    rows = [
        {"instruction": "Q", "output": "  ", "score": float("nan")},
        {"instruction": "Q", "output": "A", "score": 1.0},
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)
    ids, rejects, counts = run_process(path, encoder)
    assert len(ids) == 1 and rejects[0]["reason"] == "empty_response"
    assert json.loads(rejects[0]["raw"])["output"] == "  "


def test_check_record_walks_any_depth_without_recursion():
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    assert readers.check_record({"a": deep})[0] == "too_deep"
    assert readers.check_record({"a": [[[["x"]]]], "b": {"c": "\u00e9\U0001f600"}}) is None
    assert readers.check_record({"a": [{"b": "ok"}, {"c": "\udc80"}]}) == (
        "invalid_unicode",
        "Field 'a[1].c' holds an unpaired surrogate or bytes that are not UTF-8.",
    )


def test_field_map_hits_count_records_having_each_mapped_field(tmp_path, encoder, write_jsonl):
    recs = [{"question": f"Q{i}", "answer": f"A{i}"} for i in range(5)] + [{"question": "Q"}]
    path = write_jsonl(tmp_path / "f.jsonl", recs)
    field_map = {"instruction": "question", "output": "answr"}  # a typo: no record has "answr"
    _, _, counts = run_process(path, encoder, rows_per_shard=4, field_map=field_map)
    assert [c["field_map_hits"] for c in counts] == [{"instruction": 4, "output": 0}, {"instruction": 2, "output": 0}]
    _, _, counts = run_process(path, encoder, field_map={"instruction": "question", "output": "answer"})
    assert sum(c["field_map_hits"]["output"] for c in counts) == 5
    assert all(c["field_map_hits"] == {} for c in run_process(path, encoder)[2])  # no map, nothing to count


def test_build_through_the_cli_survives_every_hostile_record(tmp_path, cli, dask_scheduler):
    """A real build (Dask cluster, subprocess): exit 0, every hostile record counted by reason."""
    root = Path(__file__).resolve().parents[1]
    hostile = hostile_file(tmp_path / "hostile.jsonl")
    array = tmp_path / "array.json"
    array.write_text("[" + ",".join([GOOD, '{"x": ' + DEEP + "}", '{"output": "\\ud800"}']) + "]")
    out, rejects_file = tmp_path / "out", tmp_path / "rejects.jsonl"
    proc = cli(
        "sftgo-prep",
        "build",
        root / "data/alpaca.jsonl",
        hostile,
        array,
        "--out",
        out,
        "--scheduler",
        dask_scheduler,
        "--rows-per-shard",
        "5",
        "--rejects",
        rejects_file,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    expected = expected_counts()
    for reason, n in {"too_deep": 1, "invalid_unicode": 1}.items():  # the array's two bad elements
        expected[reason] += n
    assert manifest["rejected"] == expected
    t = manifest["totals"]
    good = sum(reason is None for _, reason in HOSTILE) + 1
    assert t["records_in"] == 300 + len(HOSTILE) + 3
    assert t["records_in"] == t["records_written"] + t["records_rejected"]
    assert t["records_written"] == 300 + good
    lines = rejects_file.read_bytes().decode("utf-8").splitlines()  # valid UTF-8 throughout
    rejects = [json.loads(line) for line in lines]
    assert len(rejects) == t["records_rejected"] and all("raw" in r and r["reason"] and r["detail"] for r in rejects)


def _build(cli, scheduler, out, *args):
    proc = cli(
        "sftgo-prep", "build", *args, "--out", out, "--scheduler", scheduler, "--rejects", out.parent / "rej.jsonl"
    )
    manifest = json.loads((out / "manifest.json").read_text())
    rejects = [json.loads(line) for line in (out.parent / "rej.jsonl").read_text().splitlines()]
    return proc, manifest, rejects


def test_a_50_mb_jsonl_line_is_its_own_too_large_reject(tmp_path, cli, dask_scheduler):
    """A real build: the 50 MB line (default limit) is rejected as too_large with a short raw; the others are
    written, row numbers after it stay right."""
    path = tmp_path / "big.jsonl"
    with open(path, "w") as fh:
        fh.write(GOOD + "\n" + json.dumps({"instruction": "hi", "output": "y" * 50_000_000}) + "\n" + GOOD + "\n\n")
        fh.write(" " * 3_000_000 + "\n" + GOOD + "\n")  # a long blank line is a blank line, not a record
    proc, manifest, rejects = _build(cli, dask_scheduler, tmp_path / "out", path)
    assert manifest["rejected"] == {"too_large": 1}
    assert manifest["totals"]["records_written"] == 3 and manifest["totals"]["blank_lines_skipped"] == 2
    assert manifest["params"]["max_record_bytes"] == 16 * 2**20
    (reject,) = rejects
    assert reject["row"] == 1 and reject["raw"].startswith('{"instruction": "hi"')
    assert len(reject["raw"]) <= readers.RAW_PREFIX and "50000" in reject["detail"]
    assert "too_large: 1" in proc.stdout


@pytest.mark.parametrize("limit, reason", [("100000", "too_large"), ("0", None)])
def test_max_record_bytes_sets_the_limit_and_0_lifts_it(tmp_path, cli, dask_scheduler, limit, reason):
    path = tmp_path / "long.jsonl"
    path.write_text(GOOD + "\n" + json.dumps({"instruction": "hi", "output": "word " * 40_000}) + "\n")
    _, manifest, rejects = _build(cli, dask_scheduler, tmp_path / "out", path, "--max-record-bytes", limit)
    assert [r["reason"] for r in rejects] == ([reason] if reason else [])
    assert manifest["totals"]["records_written"] == 2 - bool(reason)
    assert manifest["params"]["max_record_bytes"] == int(limit)


def test_parquet_rows_over_the_limit_are_too_large(tmp_path, cli, dask_scheduler):
    """A top-level string and one nested in list<struct> (a messages column) are both measured."""
    msgs = lambda text: [{"role": "user", "content": "hi"}, {"role": "assistant", "content": text}]  # noqa: E731
    path = tmp_path / "chat.parquet"
    pq.write_table(
        pa.table(
            {
                "messages": [msgs("fine"), msgs("z" * 300_000), msgs("ok"), msgs("good")],
                "note": ["a", "b", "c", "n" * 300_000],
            }
        ),
        path,
        row_group_size=2,
    )
    _, manifest, rejects = _build(cli, dask_scheduler, tmp_path / "out", path, "--max-record-bytes", "200000")
    assert manifest["rejected"] == {"too_large": 2} and manifest["totals"]["records_written"] == 2
    assert [(r["row"], r["reason"]) for r in rejects] == [(1, "too_large"), (3, "too_large")]


def test_json_array_and_csv_records_over_the_limit_are_too_large(tmp_path):
    array = tmp_path / "a.json"
    array.write_text(json.dumps([json.loads(GOOD), {"instruction": "é" * 600, "output": "x"}, json.loads(GOOD)]))
    table = tmp_path / "t.csv"
    table.write_text("instruction,output\nhi,there\nhi," + "x" * 1001 + "\n")
    for path, bad in ((array, 1), (table, 1)):
        (part,) = readers.plan([str(path)], 10)
        items = list(readers.read(part, 1000))
        assert [i.row for i in items if i.reject and i.reject[0] == "too_large"] == [bad]
        assert all(i.reject is None for i in items if i.row != bad)
        assert all(len(i.raw) <= readers.RAW_PREFIX for i in items if i.reject)
        assert not any(i.reject for i in readers.read(part, 0))
