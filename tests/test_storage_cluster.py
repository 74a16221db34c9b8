"""`sftgo-prep build --out s3://...` on a real cluster of command-line processes (tests/dask_cluster.py) against a
real S3 server (tests/s3server.py): the workers share no folder with the driver, so every byte a task writes goes to
the store; the result is byte-identical to the same build into a local folder, through a killed worker and a killed
driver; a second writer is refused by the lease; a missing bucket is one sentence.

The inputs are objects in the same store (s3:// to s3://); the reference build reads the same files locally."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.dask_cluster import CommandLineCluster

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT / "data"))
from generate import generate, write_jsonl  # noqa: E402


def files_of(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file() and p.name != ".lock"}


def objects_of(url: str) -> dict[str, bytes]:
    """Every object directly under `url` (the lease aside) -> its bytes, read with a fresh S3 client."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()  # (listings other processes changed)
    return {
        p.rsplit("/", 1)[-1]: fs.cat_file(p)
        for p in sorted(fs.ls(root, detail=False))
        if fs.isfile(p) and not p.endswith("/.lock")
    }


def keys_under(url: str) -> list[str]:
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    return [p[len(root) + 1 :] for p in fs.find(root)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("corpus")
    write_jsonl(generate(240, 7, "alpaca"), tmp / "a.jsonl")
    write_jsonl(generate(240, 7, "chat"), tmp / "c.jsonl")
    return [str(tmp / "a.jsonl"), str(tmp / "c.jsonl")]


def build_args(corpus, out, *more):
    return [str(BIN / "sftgo-prep"), "build", *corpus, "--out", str(out), "--rows-per-shard", "40", "--quiet", *more]


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """The same build into a local folder on a local cluster."""
    out = tmp_path_factory.mktemp("ref") / "out"
    subprocess.run(build_args(corpus, out, "--workers", "2"), check=True, capture_output=True)
    return files_of(out)


@pytest.fixture(scope="module")
def cluster(s3_server, tmp_path_factory):
    with CommandLineCluster(tmp_path_factory.mktemp("cluster"), s3_server.env, workers=2) as c:
        yield c


def run_build(args, **kw):
    return subprocess.run(args, capture_output=True, text=True, timeout=300, **kw)


def wait_for_key(url: str, pattern: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    """Until an object whose key under `url` matches `pattern` (fnmatch) exists."""
    from fnmatch import fnmatch

    deadline = time.monotonic() + timeout
    while not any(fnmatch(k, pattern) for k in keys_under(url)):
        assert proc.poll() is None, f"the build ended before {pattern} appeared: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, f"{pattern} did not appear under {url}"
        time.sleep(0.05)


def test_s3_to_s3_on_a_command_line_cluster_is_byte_identical_to_a_local_build(corpus, reference, cluster, s3):
    import json

    import fsspec

    from sftgo.core.shards import verify_build

    bucket = s3.bucket()
    fs = fsspec.filesystem("s3")
    inputs = []
    for path in corpus:
        fs.put_file(path, f"{bucket}/in/{Path(path).name}")
        inputs.append(f"s3://{bucket}/in/{Path(path).name}")
    url = f"s3://{bucket}/run"
    done = run_build(build_args(inputs, url, "--scheduler", cluster.address))
    assert done.returncode == 0, done.stderr
    got = objects_of(url)
    assert set(got) == set(reference)
    data = [n for n in reference if n.endswith(".parquet")]
    assert len([n for n in data if n.startswith("shard-")]) == 12
    assert {n: got[n] for n in data} == {n: reference[n] for n in data}  # every shard and idf.parquet, byte for byte
    text = got["manifest.json"].decode()
    for path, url_in in zip(corpus, inputs):
        text = text.replace(json.dumps(url_in), json.dumps(path))
    assert json.loads(text) == json.loads(reference["manifest.json"])  # the same manifest but for the input names
    assert not [k for k in keys_under(url) if k.startswith(".staging")]  # the staging is cleaned up
    verify_build(url)  # a reader checks the manifest and every shard's checksum through the store
    again = run_build(build_args(inputs, url, "--scheduler", cluster.address))
    assert again.returncode == 0, again.stderr
    assert "Nothing written" in again.stdout and "already holds this build" in again.stdout


def test_a_worker_killed_mid_build_loses_nothing(corpus, reference, cluster, s3):
    url = f"s3://{s3.bucket()}/run"
    proc = subprocess.Popen(
        build_args(corpus, url, "--scheduler", cluster.address),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_key(url, ".staging/*/part-00002.json", proc)
        cluster.kill_worker(0)
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
        assert objects_of(url) == reference
    finally:
        if proc.poll() is None:
            proc.kill()
        cluster.start_worker(0)
        cluster.wait_for_workers(2)


def test_a_driver_killed_in_pass_2_resumes_to_identical_bytes_and_holds_off_a_second_writer(
    corpus, reference, cluster, s3
):
    url = f"s3://{s3.bucket()}/run"
    args = build_args(corpus, url, "--scheduler", cluster.address)
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_key(url, ".staging/*/shard-*.parquet", proc)  # pass 2 runs
        proc.send_signal(signal.SIGSTOP)  # a driver that holds the lease (and cannot publish while stopped)
        second = run_build(args)
        assert second.returncode == 1, second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in second.stderr, lines
        assert f", pid {proc.pid}, lease " in lines[0] and f") holds {url}/.lock until " in lines[0], lines
        proc.send_signal(signal.SIGKILL)  # the driver alone: the cluster and the store stay
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    keys = keys_under(url)
    assert "manifest.json" not in keys and any(k.startswith(".staging/") for k in keys)
    again = run_build([a for a in args if a != "--quiet"])  # the same command (with the log, to see the resume)
    assert again.returncode == 0, again.stderr
    assert "resuming: 12 of 12 partition(s) already tokenized" in again.stderr
    assert objects_of(url) == reference


def test_overwrite_on_a_store_replaces_the_old_build_at_publishing(corpus, reference, cluster, s3):
    """A finished build with other parameters is refused without --overwrite; with it, the new build is published
    (its manifest names exactly the shards present: the old build's extra shards are gone) and verifies."""
    import fsspec

    from sftgo.core.shards import read_manifest, verify_build

    url = f"s3://{s3.bucket()}/run"
    fs, root = fsspec.core.url_to_fs(url)
    for name, data in reference.items():  # the old build: 12 shards
        fs.pipe_file(f"{root}/{name}", data)
    args = build_args(corpus, url, "--scheduler", cluster.address, "--rows-per-shard", "60", "--eta", "0.4")
    refused = run_build(args)
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [
        f"Error: {url} already holds a finished build with other parameters; pass --overwrite to replace it."
    ]
    assert objects_of(url) == reference  # untouched
    done = run_build([*args, "--overwrite"])
    assert done.returncode == 0, done.stderr
    manifest = verify_build(url)
    assert manifest == read_manifest(url) and manifest["params"]["eta"] == 0.4
    shards = sorted(n for n in objects_of(url) if n.startswith("shard-"))
    assert shards == sorted(s["path"] for s in manifest["shards"]) and len(shards) == 8
    assert not [k for k in keys_under(url) if k.startswith(".staging")]


def test_a_missing_bucket_is_one_sentence(corpus, s3):
    url = f"s3://no-such-bucket-{os.getpid()}/run"
    done = run_build(build_args(corpus, url))
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"Error: --out {url}: the bucket no-such-bucket-{os.getpid()} does not exist; create it first "
        "(sftgo-prep creates no buckets)."
    ]


def test_the_lease_is_created_once_refuses_a_live_owner_and_is_taken_over_when_expired(s3):
    """The lease object itself, against the S3 server: its conditional create lets one of two writers in; a live
    lease is one sentence naming the owner and the expiry; an expired one is taken over, and its old holder learns
    that it lost it (a build then publishes nothing)."""
    import json

    import fsspec

    from sftgo.core import lease

    url = f"s3://{s3.bucket()}/run"
    a, b = lease.Lease(url, None), lease.Lease(url, None)
    assert a._create() and not b._create()  # If-None-Match: the second create is refused by the store
    a.fs.rm_file(a.key)
    with lease.held(url) as first:
        with pytest.raises(lease.LeaseError) as refused:
            lease.Lease(url, None).take()
        owner = first.owner
        assert str(refused.value).startswith(
            f"Another build ({owner['host']}, pid {owner['pid']}, lease {owner['id']}) holds {url}/.lock until "
        )
        assert str(refused.value).endswith(" UTC; wait for it or choose another --out.")
        fs, root = fsspec.core.url_to_fs(url)
        fs.pipe_file(f"{root}/.lock", json.dumps({**owner, "expires": time.time() - 1}).encode())  # it expired
        second = lease.Lease(url, None)
        second.take()
        assert first.lost()
        second.release()
    fs.invalidate_cache()
    assert not fs.exists(f"{root}/.lock")  # the holder released it; the one that lost it removed nothing
