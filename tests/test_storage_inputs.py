"""Inputs read from object stores: a build of s3:// objects (a JSONL file, a Parquet file, a folder, a glob) gives
the shards of the same build of the local files, byte for byte; memory:// inputs plan and read as local files do;
what goes wrong with a URL is one sentence through the real CLI."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sftgo.core import storage
from sftgo.core.errors import ConfigError
from sftgo.pipeline import readers
from tests.conftest import BIN, ROOT, cli, write_jsonl

AWS_KEYS = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
)


def _records(prefix: str, n: int) -> list:
    return [
        {"instruction": f"{prefix} question {i} about topic {i % 7}", "output": f"answer {i} " * (1 + i % 5)}
        for i in range(n)
    ]


def _make_inputs(root: Path) -> None:
    """A JSONL file, a Parquet file of 3 row groups, a CSV file (a BOM, CRLF endings, a quoted field over two
    lines, a blank line, a row with too many fields), a folder (a subfolder, a README and a hidden file beside the
    data) and two small files for a glob."""
    root.mkdir()
    lines = [json.dumps(r) for r in _records("a", 14)]
    lines[3], lines[8] = "{not json", ""
    write_jsonl(root / "a.jsonl", lines)  # a JSONL file with a bad line and a blank one
    pq.write_table(pa.Table.from_pylist(_records("p", 11)), root / "b.parquet", row_group_size=4)
    rows = [f'"c question {i}",answer {i}' for i in range(13)]
    rows[2], rows[5], rows[9] = '"a question\r\nover two lines","an ""answer"""', "", "one,field,too many"
    (root / "c.csv").write_bytes("\ufeffinstruction,output\r\n".encode() + "\r\n".join(rows).encode() + b"\r\n")
    (root / "folder" / "sub").mkdir(parents=True)
    write_jsonl(root / "folder" / "x.jsonl", _records("x", 5))
    write_jsonl(root / "folder" / "sub" / "y.jsonl", _records("y", 6))
    (root / "folder" / "README.txt").write_text("not data\n")
    (root / "folder" / ".hidden.jsonl").write_text("{}\n")
    (root / "glob").mkdir()
    write_jsonl(root / "glob" / "g1.jsonl", _records("g1", 3))
    write_jsonl(root / "glob" / "g2.jsonl", _records("g2", 4))
    (root / "glob" / "other.parquet").write_bytes(b"not matched by the glob")


def _upload(root: Path, url: str) -> None:
    fs, path = storage.filesystem(url)
    for f in sorted(root.rglob("*")):
        if f.is_file():
            fs.pipe_file(f"{path}/{f.relative_to(root).as_posix()}", f.read_bytes())


def _digests(out: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.parquet"))}


def _env_without_aws() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_SHARED_CREDENTIALS_FILE=os.devnull, AWS_CONFIG_FILE=os.devnull, AWS_EC2_METADATA_DISABLED="true")
    return dict(env, PYTHONUNBUFFERED="1")


def _prep(*args, env: dict, python_prefix: str | None = None) -> subprocess.Popen:
    """`sftgo-prep ARGS` started in a subprocess with `env` (or, with python_prefix, through `python -c` running
    that code first and then the CLI's main)."""
    if python_prefix is None:
        cmd = [str(BIN / "sftgo-prep"), *map(str, args)]
    else:
        code = f"{python_prefix}\nimport sys\nfrom sftgo.pipeline.cli import main\nsys.argv[0] = 'sftgo-prep'\nmain()"
        cmd = [sys.executable, "-c", code, *map(str, args)]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_s3_inputs_give_the_shards_of_the_local_files(dask_scheduler, s3, tmp_path):
    """Both builds run on the session's local cluster, whose workers started before the AWS environment was set
    (dask_scheduler comes first): the S3 build's tasks open the objects with the options they are given."""
    local = tmp_path / "data"
    _make_inputs(local)
    bucket = s3.bucket()
    _upload(local, f"s3://{bucket}/data")
    url = f"s3://{bucket}/data"
    common = ["--rows-per-shard", "6", "--scheduler", dask_scheduler, "--quiet"]
    local_inputs = [
        local / "a.jsonl",
        local / "b.parquet",
        local / "c.csv",
        local / "folder",
        local / "glob/g1.jsonl",
        local / "glob/g2.jsonl",
    ]
    urls = [f"{url}/a.jsonl", f"{url}/b.parquet", f"{url}/c.csv", f"{url}/folder", f"{url}/glob/*.jsonl"]
    # The S3 build runs with no AWS variable at all: the driver and the tasks get endpoint and keys as data.
    options = json.dumps({"endpoint_url": s3.endpoint, "key": "testing", "secret": "testing"})
    # (one build after the other: two builds at once on one scheduler would share task keys)
    # --rejects: a file:// URL (its local path) beside a local --out, and an object in the store
    local_rejects, rejects_url = tmp_path / "rejects.jsonl", f"s3://{bucket}/rejects/rejects.jsonl"
    cli(
        "sftgo-prep",
        "build",
        *local_inputs,
        "--out",
        tmp_path / "localout",
        "--rejects",
        f"file://{local_rejects}",
        *common,
    )
    remote = _prep(
        "build", *urls, "--out", tmp_path / "s3out", "--rejects", rejects_url, "--storage-options", options, *common,
        env=_env_without_aws(),
    )  # fmt: skip
    stdout, stderr = remote.communicate(timeout=300)
    assert remote.returncode == 0, stderr
    assert "(README.txt)" in stderr and "skipped .hidden.jsonl" in stderr  # the rules of a local folder

    shards = _digests(tmp_path / "localout")
    assert len(shards) > 5 and "idf.parquet" in shards
    assert _digests(tmp_path / "s3out") == shards
    got = json.loads((tmp_path / "s3out" / "manifest.json").read_text())
    want = json.loads((tmp_path / "localout" / "manifest.json").read_text())
    names = dict(zip(map(str, local_inputs[:4]), urls[:4]))
    names.update({str(local_inputs[4]): f"{url}/glob/g1.jsonl", str(local_inputs[5]): f"{url}/glob/g2.jsonl"})
    assert [e["input"] for e in got["inputs"]] == [names[e["input"]] for e in want["inputs"]]
    assert got["params"]["inputs"] == urls
    for m in (got, want):
        m["params"].pop("inputs")
        for e in m["inputs"]:
            e.pop("input")
    assert got == want and want["rejected"] == {"malformed_csv": 1, "malformed_json": 1}
    stored = [json.loads(x) for x in storage.filesystem(rejects_url)[0].cat_file(rejects_url).splitlines()]
    written = [json.loads(x) for x in local_rejects.read_text().splitlines()]
    assert [r.pop("source") for r in stored] == [f"{url}/a.jsonl", f"{url}/c.csv"]  # each record's own input
    assert [r.pop("source") for r in written] == [str(local / "a.jsonl"), str(local / "c.csv")]
    assert len(stored) == 2 and stored == written
    assert not any(p.name.startswith(("file:", "s3:")) for p in [*tmp_path.iterdir(), *ROOT.iterdir()])
    built = (tmp_path / "s3out" / ".build.json").read_text() + (tmp_path / "s3out" / "manifest.json").read_text()
    assert "storage_options" not in built and "testing" not in built  # credentials are never written

    # The same command again: nothing to do; after an object changed: refused as a changed local file is.
    again = ["build", *urls, "--out", tmp_path / "s3out", "--storage-options", options, *common]
    proc = _prep(*again, env=_env_without_aws())
    assert proc.communicate(timeout=120)[0].startswith("Nothing written") and proc.returncode == 0
    storage.filesystem(url)[0].pipe_file(f"{bucket}/data/folder/x.jsonl", b'{"instruction": "q", "output": "a"}\n')
    proc = _prep(*again, env=_env_without_aws())
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "its inputs changed since" in err and "Traceback" not in err


def test_memory_inputs_plan_and_read_as_local_files(tmp_path):
    local = tmp_path / "data"
    _make_inputs(local)
    _upload(local, "memory://sftgo-inputs/data")
    url = "memory://sftgo-inputs/data"
    as_local = {f"{url}/{n}": str(local / n) for n in ("a.jsonl", "b.parquet", "c.csv", "folder")}
    parts = readers.plan([*as_local, f"{url}/glob/*.jsonl"], 5)
    want = readers.plan([*as_local.values(), str(local / "glob/g1.jsonl"), str(local / "glob/g2.jsonl")], 5)
    assert [len(p.pieces) for p in parts] == [len(p.pieces) for p in want]
    for got_part, want_part in zip(parts, want):
        for g, w in zip(got_part.pieces, want_part.pieces):
            assert (g.first_row, g.rows, g.blank_lines) == (w.first_row, w.rows, w.blank_lines)
            if w.kind == "csv":  # a CSV object is cut by bytes, a local CSV file by rows (parsed whole)
                assert g.kind == "csv_bytes" and g.start < g.stop
            else:
                assert (g.kind, g.start, g.stop) == (w.kind, w.start, w.stop)
            assert g.path.startswith("memory://") and g.path.split("/data/")[1] == w.path.split("/data/")[1]
            assert g.source.split("/data/")[1] == w.source.split("/data/")[1]
        assert list(readers.read(got_part, 1000)) == list(readers.read(want_part, 1000))


def test_store_errors_are_one_sentence(s3, tmp_path):
    """Through the real CLI: an unknown scheme, a missing object and bucket, no credentials, a glob that matches
    nothing, a missing backend package (s3fs hidden from the process), storage options that are not an object
    (on the command line, in a config file)."""
    bucket = s3.bucket()
    storage.filesystem(f"s3://{bucket}")[0].pipe_file(f"{bucket}/d/x.jsonl", b'{"instruction": "q", "output": "a"}\n')
    env = dict(os.environ, PYTHONUNBUFFERED="1", AWS_EC2_METADATA_DISABLED="true")
    no_keys = dict(_env_without_aws(), AWS_ENDPOINT_URL=s3.endpoint)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"storage_options": ["key", "secret"]}))
    hide_s3fs = "import sys; sys.modules['s3fs'] = None"
    cases = [  # (input, more arguments, environment, code run before the CLI, what the one line says)
        ("nosuch://b/x.jsonl", [], env, None, "has a scheme, nosuch://, that sftgo cannot open"),
        (f"s3://{bucket}/d/missing.jsonl", [], env, None, "does not exist (no such bucket, container or object)"),
        ("s3://no-such-bucket-sftgo/x.jsonl", [], env, None, "does not exist (no such bucket, container or object)"),
        (f"s3://{bucket}/d/*.csv", [], env, None, "matches no object"),
        (f"s3://{bucket}/d/x.jsonl", [], no_keys, None, "No credentials were found for"),
        (f"s3://{bucket}/d/y.jsonl", [], env, hide_s3fs, "needs the s3fs package, which is not installed: pip install"),
        (f"s3://{bucket}/d/x.jsonl", ["--storage-options", "[1]"], env, None, "must be a JSON object"),
        (f"s3://{bucket}/d/x.jsonl", ["--config", config], env, None, "Setting 'storage_options' must be"),
    ]
    procs = [
        _prep("build", inp, *more, "--out", tmp_path / f"out{i}", "--quiet", env=e, python_prefix=prefix)
        for i, (inp, more, e, prefix, _) in enumerate(cases)
    ]
    for (inp, _, _, _, says), proc in zip(cases, procs):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 1, (inp, out, err)
        assert says in err and "Traceback" not in err, (inp, err)
        assert err.strip().startswith("Error:") and len(err.strip().splitlines()) == 1, err
        assert inp in err or "storage" in err


def test_storage_options_are_typed_and_never_recorded():
    from sftgo.pipeline.config import BuildConfig, ignored_settings

    cfg = BuildConfig(inputs=["data/alpaca.jsonl"], out="o", storage_options={"anon": True}).validate()
    assert "storage_options" not in cfg.params()
    assert any("--storage-options is ignored" in n for n in ignored_settings(cfg, cfg.strategies))
    cfg = BuildConfig(inputs=["s3://b/x.jsonl"], out="o", storage_options={"anon": True}).validate()
    assert not any("storage-options" in n for n in ignored_settings(cfg, cfg.strategies))
    with pytest.raises(ConfigError, match="storage_options"):
        BuildConfig(inputs=["s3://b/x.jsonl"], out="o", storage_options={1: "x"}).validate()


def test_outputs_and_url_inputs_meet_by_store_and_path():
    from sftgo.pipeline.sources import overlap

    assert overlap("s3://b/data/out", "s3://b/data") == "lies inside"
    assert overlap("s3://b/data", "s3://b/data/x.jsonl") == "holds"
    assert overlap("s3a://b/data/", "s3://b/data") == "is the same as"
    assert overlap("s3://b/data/out", "s3://b/data/*.jsonl") == "lies inside"  # a glob counts from its folder
    assert overlap("s3://b/other", "s3://b/data") is None and overlap("s3://c/data", "s3://b/data") is None
    assert overlap("gs://b/data/out", "s3://b/data") is None and overlap("out", "s3://b/data") is None
    assert overlap("/tmp/x/out", "file:///tmp/x") == "lies inside"
