"""The shape of the input, not its records: many tiny files, a folder tree, a value nested 10,000 deep.
Real builds through the CLI on a real Dask cluster."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import write_jsonl

BIN = Path(sys.executable).parent
DEEP = 10_000


def tiny_tree(root: Path, n: int) -> list[str]:
    """n one-record JSONL files in a folder tree (three levels, uneven); returns the ids their records get."""
    ids = []
    for i in range(n):
        rel = Path(f"d{i % 7}") / f"e{i % 3}" / f"r{i:05d}.jsonl"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(json.dumps({"instruction": f"Say {i}.", "output": f"It is {i}."}) + "\n")
        ids.append(f"{root.name}/{rel}:0")
    return ids


def prep(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "sftgo-prep"), *args], capture_output=True, text=True, timeout=900)


def shard_ids(out: Path) -> list[str]:
    return [i for p in sorted(out.glob("shard-*.parquet")) for i in pq.read_table(p, columns=["id"])["id"].to_pylist()]


def test_thousands_of_tiny_files_fill_shards_of_rows_per_shard(tmp_path, dask_scheduler):
    """3,000 one-record files build into ceil(3000/500) shards of 500 records, every record once, with
    its file:ROW id, and nothing on stderr but the summary."""
    ids = tiny_tree(tmp_path / "tree", 3000)
    out = tmp_path / "out"
    done = prep(
        "build", str(tmp_path / "tree"), "--out", str(out), "--rows-per-shard", "500", "--scheduler", dask_scheduler
    )
    assert done.returncode == 0, done.stderr[-3000:]
    shards = sorted(out.glob("shard-*.parquet"))
    assert len(shards) == math.ceil(3000 / 500)
    assert [pq.read_metadata(p).num_rows for p in shards] == [500] * 6
    assert sorted(shard_ids(out)) == sorted(ids)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["totals"]["records_in"] == manifest["totals"]["records_written"] == 3000
    for noise in ("Traceback", "CancelledError", "CommClosedError", "cancelled"):
        assert noise not in done.stderr


def test_a_killed_build_of_many_files_resumes_to_the_same_bytes(tmp_path, dask_scheduler):
    """The packed plan is the same on the resumed build (it is recorded and checked), so the result is
    byte-identical to an uninterrupted build (made on the session's cluster: the bytes do not depend on it)."""
    tiny_tree(tmp_path / "tree", 700)
    args = ["build", str(tmp_path / "tree"), "--rows-per-shard", "100", "--workers", "1"]
    ref = tmp_path / "ref"
    assert prep(*args, "--out", str(ref), "--scheduler", dask_scheduler).returncode == 0
    out = tmp_path / "out"
    cmd = [str(BIN / "sftgo-prep"), *args, "--out", str(out)]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    from tests.test_resume_and_cluster import files_of, wait_for

    wait_for(out, ".staging/*/part-00002.json", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    again = prep(*args, "--out", str(out))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming:" in again.stderr and "of 7 partition(s)" in again.stderr
    assert files_of(out) == files_of(ref)


def test_a_mix_of_shapes_packs_by_rows_and_keeps_every_record(tmp_path, dask_scheduler):
    """Empty files, blank-only files, a file larger than a shard, tiny JSON arrays, CSV and Parquet files
    in one folder: shards of rows_per_shard rows (the last one fewer), every record once, blank lines counted."""
    import pyarrow as pa

    root = tmp_path / "mix"
    root.mkdir()
    rec = [{"instruction": f"Q{i}", "output": f"A{i}"} for i in range(40)]
    write_jsonl(root / "a_big.jsonl", rec[:23])
    (root / "b_empty.jsonl").write_text("")
    (root / "c_blank.jsonl").write_text("\n\n")
    (root / "d_arr.json").write_text(json.dumps(rec[23:26]))
    (root / "e.csv").write_text(
        "instruction,output\n" + "".join(f"{r['instruction']},{r['output']}\n" for r in rec[26:30])
    )
    pq.write_table(pa.Table.from_pylist(rec[30:40]), root / "f.parquet")
    out = tmp_path / "out"
    done = prep("build", str(root), "--out", str(out), "--rows-per-shard", "7", "--scheduler", dask_scheduler)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [pq.read_metadata(p).num_rows for p in sorted(out.glob("shard-*.parquet"))] == [7] * 5 + [5]
    assert sorted(shard_ids(out)) == sorted(
        [f"mix/a_big.jsonl:{i}" for i in range(23)]
        + [f"mix/d_arr.json:{i}" for i in range(3)]
        + [f"mix/e.csv:{i}" for i in range(4)]
        + [f"mix/f.parquet:{i}" for i in range(10)]
    )
    totals = json.loads((out / "manifest.json").read_text())["totals"]
    assert totals["records_in"] == totals["records_written"] == 40
    assert totals["blank_lines_skipped"] == 2


def test_two_thousand_files_given_one_by_one_fill_shards_of_rows_per_shard(tmp_path, dask_scheduler):
    """A shell glob gives 2,000 one-record files as 2,000 inputs: they pack into ceil(2000/500) shards of 500
    records as a folder's files do, every record once with its <file name>:0 id, and the manifest keeps one
    entry per input, in input order, with its own counts."""
    root = tmp_path / "many"
    root.mkdir()
    files = []
    for i in range(2000):
        path = root / f"r{i:05d}.jsonl"
        path.write_text(json.dumps({"instruction": f"Say {i}.", "output": f"It is {i}."}) + "\n")
        files.append(str(path))
    out = tmp_path / "out"
    done = prep("build", *files, "--out", str(out), "--rows-per-shard", "500", "--scheduler", dask_scheduler)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [pq.read_metadata(p).num_rows for p in sorted(out.glob("shard-*.parquet"))] == [500] * 4
    assert shard_ids(out) == [f"r{i:05d}.jsonl:0" for i in range(2000)]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"] == [{"input": f, "records_in": 1, "written": 1, "rejected": 0} for f in files]
    assert manifest["totals"]["records_in"] == manifest["totals"]["records_written"] == 2000


def test_small_inputs_pack_around_a_big_one_cut_from_its_own_start(tmp_path, dask_scheduler):
    """A big input starts a shard of its own and is cut every rows_per_shard rows from its start; the small
    inputs after it (one-record files, a CSV with a bad row, a folder) fill the room its last shard left,
    then open the next; each input's records, rejects and counts stay its own."""
    rec = [{"instruction": f"Q{i}", "output": f"A{i}"} for i in range(50)]
    small = write_jsonl(tmp_path / "small.jsonl", rec[:3])
    big = write_jsonl(tmp_path / "big.jsonl", rec[3:26])
    ones = [str(write_jsonl(tmp_path / f"one{i:02d}.jsonl", [rec[26 + i]])) for i in range(12)]
    table = tmp_path / "table.csv"
    table.write_text("instruction,output\nQ38,A38\nQ39,A39,extra\n")  # the second row: a counted rejection
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [rec[40]])
    write_jsonl(folder / "b.jsonl", [rec[41]])
    inputs = [str(small), str(big), *ones, str(table), str(folder)]
    out, rejects = tmp_path / "out", tmp_path / "rejects.jsonl"
    done = prep(
        "build", *inputs, "--out", str(out), "--rows-per-shard", "10", "--rejects", str(rejects),
        "--scheduler", dask_scheduler,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    shards = [pq.read_table(p, columns=["id"])["id"].to_pylist() for p in sorted(out.glob("shard-*.parquet"))]
    assert shards == [
        [f"small.jsonl:{i}" for i in range(3)],
        [f"big.jsonl:{i}" for i in range(10)],  # cut from its own start, not to fill the first shard
        [f"big.jsonl:{i}" for i in range(10, 20)],
        [f"big.jsonl:{i}" for i in range(20, 23)] + [f"one{i:02d}.jsonl:0" for i in range(7)],
        [f"one{i:02d}.jsonl:0" for i in range(7, 12)] + ["table.csv:0", "folder/a.jsonl:0", "folder/b.jsonl:0"],
    ]
    manifest = json.loads((out / "manifest.json").read_text())
    counts = [(e["input"], e["records_in"], e["written"], e["rejected"]) for e in manifest["inputs"]]
    assert counts == [(str(small), 3, 3, 0), (str(big), 23, 23, 0), *[(f, 1, 1, 0) for f in ones]] + [
        (str(table), 2, 1, 1),
        (str(folder), 2, 2, 0),
    ]
    rejected = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert [(r["id"], r["source"], r["reason"]) for r in rejected] == [("table.csv:1", str(table), "malformed_csv")]


def deep_array(depth: int = DEEP) -> str:
    return "[" * depth + "]" * depth


def deep_object(depth: int = DEEP) -> str:
    return '{"a": ' * depth + "1" + "}" * depth


GOOD = {"instruction": "Name a colour.", "output": "Blue."}


@pytest.mark.parametrize("deep", [deep_array(), deep_object()], ids=["array", "object"])
def test_a_deep_record_in_a_json_array_is_rejected_and_the_rest_written(tmp_path, dask_scheduler, deep):
    path = tmp_path / "data.json"
    path.write_text(
        "[" + json.dumps(GOOD) + ", " + '{"instruction": "x", "output": ' + deep + "}, " + json.dumps(GOOD) + "]"
    )
    out = tmp_path / "out"
    done = prep(
        "build", str(path), "--out", str(out), "--scheduler", dask_scheduler, "--rejects", str(tmp_path / "r.jsonl")
    )
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["totals"]["records_written"] == 2
    assert manifest["rejected"] == {"too_deep": 1}
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("deep", [deep_array(), deep_object()], ids=["array", "object"])
def test_a_json_file_that_is_one_deep_value_is_one_sentence(tmp_path, dask_scheduler, deep):
    path = tmp_path / "deep.json"
    path.write_text(deep)
    done = prep("build", str(path), "--out", str(tmp_path / "out"), "--scheduler", dask_scheduler)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr and "RecursionError" not in done.stderr
    error = [line for line in done.stderr.splitlines() if line.startswith("Error: ")]
    assert len(error) == 1 and "deep" in error[0], done.stderr[-3000:]


def test_jsonl_lines_nested_too_deep_are_counted_rejections(tmp_path, dask_scheduler):
    path = tmp_path / "d.jsonl"
    write_jsonl(
        path, [GOOD, deep_array(), deep_object(), {"instruction": "a", "output": json.loads(deep_array(50))}, GOOD]
    )
    out = tmp_path / "out"
    done = prep("build", str(path), "--out", str(out), "--scheduler", dask_scheduler)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["totals"]["records_in"] == 5 and manifest["totals"]["records_written"] == 2
    assert manifest["rejected"]["too_deep"] == 2
    assert sum(manifest["rejected"].values()) == 3
