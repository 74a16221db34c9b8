"""`sftgo-prep inspect` on hostile shard directories, as a user runs it (real subprocess):
escape sequences in the data never reach the terminal raw, and damaged, deleted, foreign or
empty shard sets give one sentence (or a 0-record summary), never a traceback or a bare path."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sftgo.core.fileio import file_sha256
from sftgo.pipeline.build import run as build
from sftgo.pipeline.config import BuildConfig
from sftgo.pipeline.inspect import printable

EVIL_ID = "evil\x1b]0;pwned\x07\u202e\r"
EVIL = {
    "id": EVIL_ID,
    "instruction": "Clear \x1b[2J the screen \u202egnp.exe",
    "output": "Sure \x1b]0;title\x07 done \x1b[2J ok \x9b31m bell\x07 del\x7f zero\u200bwidth end",
}
OUR_COLOURS = re.compile(r"\x1b\[(?:2|36|1;30;43|0)m")  # the only escapes inspect may print (with --color)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, dask_scheduler) -> Path:
    """12 real records (the first one full of terminal escapes) in 2 shards of 6."""
    tmp = tmp_path_factory.mktemp("inspect")
    records = [EVIL] + [{"instruction": f"Name river {i}.", "output": f"The Oriel {i} flows north."} for i in range(11)]
    src = tmp / "a.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    build(
        BuildConfig(
            inputs=[str(src)], out=str(tmp / "shards"), rows_per_shard=6, scheduler=dask_scheduler, progress=False
        )
    )
    return tmp / "shards"


@pytest.fixture
def copy(shards, tmp_path) -> Path:
    """A private copy of the shards to damage."""
    return Path(shutil.copytree(shards, tmp_path / "shards"))


def inspect(cli, directory, *args):
    return cli("sftgo-prep", "inspect", directory, *args, check=False)


def refused(cli, directory, *args, message: str) -> str:
    """inspect exits 1 with exactly one line, `Error: <one sentence>`, and prints nothing else."""
    proc = inspect(cli, directory, "--no-color", *args)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], proc.stderr
    assert lines[0].endswith(".") and "\x1b" not in lines[0]
    return lines[0]


def edit_manifest(directory: Path, change) -> None:
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def evil_row(directory: Path) -> int:
    ids = [
        i for s in sorted(directory.glob("shard-*.parquet")) for i in pq.read_table(s, columns=["id"])["id"].to_pylist()
    ]
    return ids.index(EVIL_ID)


def test_printable_escapes_every_non_printing_character():
    assert printable("a\x1b[2Jb\x9b\x7f\u202e\u200b\u2028\ud800\U000e0001") == (
        "a\\x1b[2Jb\\x9b\\x7f\\u202e\\u200b\\u2028\\ud800\\U000e0001"
    )
    assert printable("tab\there\nnew line", keep="\n\t") == "tab\there\nnew line"
    assert printable("tab\there\n") == "tab\\x09here\\x0a"
    assert (
        printable("ünïcode 中文 non\u00a0breaking") == "ünïcode 中文 non\u00a0breaking"
    )  # printable text and spaces stay
    assert printable(0.3) == "0.3"


def test_escapes_in_the_data_are_shown_escaped(cli, copy):
    def plant(manifest):  # data-derived text from the manifest as well: a rejection reason and a value
        manifest["rejected"] = {"odd\x1b]0;reason\x07": sum(manifest["rejected"].values()) + 1}
        manifest["totals"]["records_rejected"] += 1  # the counts still add up: only the text is hostile
        manifest["totals"]["records_in"] += 1
        manifest["strategies"]["tfidf"]["eta"] = "\x1b[2J\u202e"

    edit_manifest(copy, plant)
    row = evil_row(copy)
    plain = inspect(cli, copy, "--sample", str(row), "--no-color")
    assert plain.returncode == 0, plain.stderr
    text = plain.stdout
    for raw in ("\x1b", "\x07", "\x9b", "\x7f", "\u202e", "\u200b", "\r"):
        assert raw not in text + plain.stderr, repr(raw)
    assert f"Sample {row} (evil\\x1b]0;pwned\\x07\\u202e\\x0d), groups by tfidf" in text
    assert "odd\\x1b]0;reason\\x07" in text and "eta=\\x1b[2J\\u202e" in text
    assert "\\x1b]0;" in text and "\\x1b[2" in text and "\\x7f" in text  # the token pieces, escaped
    assert "<|im_start|>assistant\n" in text  # newlines of the sample's text stay newlines
    coloured = inspect(cli, copy, "--sample", str(row), "--color")
    assert coloured.returncode == 0, coloured.stderr
    assert "\x1b[1;30;43m" in coloured.stdout  # our colours are raw escapes ...
    assert "\x1b" not in OUR_COLOURS.sub("", coloured.stdout)  # ... and the only ones
    assert "\x07" not in coloured.stdout and "\u202e" not in coloured.stdout


def test_a_strategy_name_with_escapes_is_escaped_in_the_error(cli, shards):
    line = refused(cli, shards, "--strategy", "x\x1b[2J", message="has no 'x\\x1b[2J' groups")
    assert "(it has: tfidf)" in line


def test_a_flipped_shard_is_refused(cli, copy):
    shard = copy / "shard-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    refused(cli, copy, message="shard-00001.parquet does not match its checksum in the manifest")


def test_a_foreign_shard_is_refused_even_with_a_matching_manifest_entry(cli, copy):
    shard = copy / "shard-00001.parquet"
    pq.write_table(pa.table({"id": ["x"] * 6}), shard)

    def adopt(manifest):  # hand-edited to the foreign file's checksum: the schema check still catches it
        manifest["shards"][1]["sha256"] = file_sha256(shard)

    edit_manifest(copy, adopt)
    refused(cli, copy, message="shard-00001.parquet has no column 'input_ids'")


def test_a_deleted_shard_is_named_in_one_sentence(cli, copy):
    (copy / "shard-00001.parquet").unlink()
    refused(cli, copy, message="shard-00001.parquet listed in the manifest is missing")


def test_an_empty_shard_list_is_a_zero_record_summary(cli, copy):
    def empty(manifest):
        manifest["shards"] = []
        manifest["totals"].update(
            records_in=0, records_written=0, records_rejected=0, tokens=0, loss_tokens=0, truncated=0
        )
        manifest["rejected"] = {}

    edit_manifest(copy, empty)
    proc = inspect(cli, copy, "--no-color")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "(0 file(s)" in proc.stdout and "Records:      0 written of 0 read, 0 rejected" in proc.stdout
    assert "(no samples)" in proc.stdout and "No records to show: the build wrote 0 records." in proc.stdout
    refused(cli, copy, "--sample", "3", message="--sample 3 is out of range: the build has no records.")


def test_an_empty_shard_list_that_contradicts_the_counts_is_refused(cli, copy):
    edit_manifest(copy, lambda m: m.update(shards=[]))
    refused(cli, copy, message="counts 12 records written but its shards hold 0 rows")


def test_sample_beyond_the_rows_is_one_sentence(cli, shards):
    refused(cli, shards, "--sample", "12", message="--sample 12 is out of range: the build has 12 records (0 to 11).")
    refused(cli, shards, "--sample", "-1", message="--sample -1 is out of range")
    assert inspect(cli, shards, "--sample", "11", "--no-color").returncode == 0


@pytest.mark.parametrize(
    "key, value",
    [
        ("shards", "shard-00000.parquet"),
        ("shards", [{"path": 7}]),
        ("totals", {"records_written": "12"}),
        ("tokenizer", None),
    ],
)
def test_a_malformed_manifest_is_one_sentence(cli, copy, key, value):
    edit_manifest(copy, lambda m: m.update({key: value}))
    refused(cli, copy, message=f"has a missing or malformed '{key}' entry")
