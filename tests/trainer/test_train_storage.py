"""sftgo-train --data s3://... against a real S3 server (moto, tests/s3server.py): the same weights as from the local
folder, a cache folder that stays under --cache-limit and is removed at the end, an exact stop-and-resume, torchrun
ranks that download disjoint shards and resume exactly, and one sentence for a damaged shard, a missing bucket or
missing credentials; load_shards and sftgo-prep inspect on a URL."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
ARGS = ["--batch-tokens", 160, "--grad-accum", 2, "--max-steps", 6, "--no-progress", "--no-tensorboard"]
ARGS += ["--shuffle-buffer", 8, "--bucket-pool", 2, "--lr", "3e-3"]


def env(server, **extra):
    return {**os.environ, **server.env, "OMP_NUM_THREADS": "1", "AWS_EC2_METADATA_DISABLED": "true", **extra}


def run(cmd, *args, environ, check=True):
    proc = subprocess.run([str(BIN / cmd), *map(str, args)], capture_output=True, text=True, timeout=300, env=environ)
    assert not check or proc.returncode == 0, proc.stderr[-3000:]
    return proc


def errors(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def upload(server, local: Path, bucket: str, prefix: str = "build") -> str:
    import s3fs

    fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=server.endpoint)
    for f in sorted(local.iterdir()):
        if f.is_file() and not f.name.startswith("."):
            fs.put(str(f), f"{bucket}/{prefix}/{f.name}")
    return f"s3://{bucket}/{prefix}"


@pytest.fixture(scope="module")
def store(s3_server, shared_shard_dir):
    """The session's train shards uploaded to a bucket: (URL, largest shard in bytes)."""
    url = upload(s3_server, Path(shared_shard_dir), s3_server.bucket())
    return url, max(p.stat().st_size for p in Path(shared_shard_dir).glob("shard-*.parquet"))


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, s3_server, shared_shard_dir, tiny_model_dir):
    """The same training from the local folder: the weights every store run must end with."""
    out = tmp_path_factory.mktemp("local") / "run"
    environ = env(s3_server)
    run("sftgo-train", "--data", shared_shard_dir, "--out", out, "--model", tiny_model_dir, *ARGS, environ=environ)
    return out


def test_streaming_from_s3_ends_with_the_weights_of_local_data_within_the_cache_limit(
    tmp_path, s3_server, store, local_run, tiny_model_dir
):
    url, largest = store
    limit = 2 * largest  # less than the 3 shards together: they cannot all be held at once
    options = json.dumps({"key": "testing", "secret": "s3cr3t-testing", "endpoint_url": s3_server.endpoint})
    out, cache = tmp_path / "run", tmp_path / "cache"
    environ = env(s3_server, AWS_SECRET_ACCESS_KEY="s3cr3t-testing")
    proc = run(
        "sftgo-train", "--data", url, "--out", out, "--model", tiny_model_dir, *ARGS, "--storage-options", options,
        "--cache-dir", cache, "--cache-limit", limit, environ=environ,
    )  # fmt: skip
    assert sha(out / "model" / "model.safetensors") == sha(local_run / "model" / "model.safetensors")
    summary = json.loads((out / "summary.json").read_text())
    cached = summary["data_cache"]
    assert cached["limit_bytes"] == limit
    assert 0 < cached["per_rank"][0]["peak_bytes"] <= limit
    assert sorted(cached["per_rank"][0]["shards"]["data"][0]) == [f"shard-0000{i}.parquet" for i in range(3)]
    assert list(cache.iterdir()) == [] and not Path(cached["folder"]).exists()  # emptied and removed
    written = "".join(p.read_text() for p in (out / "config.json", out / "summary.json", out / "metrics.jsonl"))
    assert "s3cr3t" not in written and "storage_options" not in written  # credentials are never written
    assert "is ignored" not in proc.stderr  # the store's settings are read

    too_small = run(
        "sftgo-train", "--data", url, "--out", tmp_path / "small", "--model", tiny_model_dir, *ARGS,
        "--cache-limit", largest - 1, environ=env(s3_server), check=False,
    )  # fmt: skip
    assert too_small.returncode == 1
    assert len(errors(too_small)) == 1 and "--cache-limit" in errors(too_small)[0], too_small.stderr[-2000:]


def test_a_run_stopped_and_resumed_from_s3_ends_as_an_uninterrupted_one(tmp_path, s3_server, store, local_run):
    url, _ = store
    out = tmp_path / "run"
    model = json.loads((local_run / "config.json").read_text())["model"]
    args = ["--data", url, "--out", out, "--model", model, *ARGS]
    run("sftgo-train", *args, "--stop-after", 3, environ=env(s3_server))
    assert not (out / "model").exists()
    resumed = run("sftgo-train", *args, "--resume", environ=env(s3_server))
    assert "resuming from step-0000003" in resumed.stderr
    assert sha(out / "model" / "model.safetensors") == sha(local_run / "model" / "model.safetensors")


def torchrun(*args, environ):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*cmd, "-m", "sftgo.trainer.cli", *map(str, args), "--debug"],
        capture_output=True,
        text=True,
        timeout=300,
        env=environ,
    )
    said = [line for line in proc.stderr.splitlines() if "Error" in line or "error" in line]  # each rank's own
    assert proc.returncode == 0, "\n".join(said[-20:]) + "\n" + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_torchrun_ranks_stream_disjoint_shards_from_s3_and_resume_exactly(tmp_path, s3_server, store, tiny_model_dir):
    url, _ = store
    out, resumed = tmp_path / "ddp", tmp_path / "resumed"
    args = ["--data", url, "--model", tiny_model_dir, *ARGS, "--max-steps", 4]
    torchrun(*args, "--out", out, environ=env(s3_server))
    ranks = json.loads((out / "summary.json").read_text())["data_cache"]["per_rank"]
    first = [set(r["shards"]["data"][0]) for r in ranks]  # each rank's shards of epoch 0
    assert len(first) == 2 and all(first) and not first[0] & first[1]  # each rank downloaded only its own
    assert first[0] | first[1] == {f"shard-0000{i}.parquet" for i in range(3)}

    # stopped after step 2 (a checkpoint, no model), then resumed: the weights of the uninterrupted run
    torchrun(*args, "--out", resumed, "--stop-after", 2, environ=env(s3_server))
    assert not (resumed / "model").exists()
    proc = torchrun(*args, "--out", resumed, "--resume", environ=env(s3_server))
    assert "resuming from step-0000002" in proc.stderr
    assert sha(resumed / "model" / "model.safetensors") == sha(out / "model" / "model.safetensors")


def test_a_damaged_shard_on_the_store_is_one_sentence_naming_it(tmp_path, s3_server, shard_dir, tiny_model_dir):
    shard = Path(shard_dir) / "shard-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[200] ^= 0xFF  # a byte of the data pages: the footer still reads, the checksum does not match
    shard.write_bytes(bytes(data))
    url = upload(s3_server, Path(shard_dir), s3_server.bucket())
    cache = tmp_path / "cache"
    proc = run(
        "sftgo-train", "--data", url, "--out", tmp_path / "run", "--model", tiny_model_dir, *ARGS,
        "--cache-dir", cache, environ=env(s3_server), check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    assert errors(proc) == [
        f"Error: Shard {url}/shard-00001.parquet does not match its checksum in the manifest: it is corrupted or was "
        "replaced."
    ], proc.stderr[-3000:]
    assert list(cache.iterdir()) == []


def test_a_missing_bucket_missing_credentials_and_a_url_out_are_one_sentence(
    tmp_path, s3_server, store, tiny_model_dir
):
    url, _ = store
    base = ["--out", tmp_path / "run", "--model", tiny_model_dir, "--max-steps", 1]
    missing = run("sftgo-train", "--data", "s3://no-such-bucket-here/x", *base, environ=env(s3_server), check=False)
    assert missing.returncode == 1
    assert errors(missing) == [
        "Error: s3://no-such-bucket-here/x does not exist (no such bucket, container or object): no such bucket."
    ], missing.stderr[-2000:]

    bare = {k: v for k, v in env(s3_server).items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    nocred = run("sftgo-train", "--data", url, *base, environ=bare, check=False)
    assert nocred.returncode == 1
    assert len(errors(nocred)) == 1 and errors(nocred)[0].startswith(f"Error: No credentials were found for {url}")

    url_out = run("sftgo-train", "--data", url, "--out", "s3://b/runs/x", environ=env(s3_server), check=False)
    assert url_out.returncode == 1
    assert len(errors(url_out)) == 1 and "must be a local folder" in errors(url_out)[0]
    assert not (tmp_path / "run").exists()


def test_load_shards_and_inspect_read_a_build_on_s3(s3_server, store, shared_shard_dir, monkeypatch):
    from sftgo.trainer.hf import load_shards

    url, _ = store
    s3_server.apply_env(monkeypatch)
    remote = load_shards(url, storage_options={"endpoint_url": s3_server.endpoint})
    local = load_shards(str(shared_shard_dir))
    assert remote.to_dict() == local.to_dict()
    shown = run("sftgo-prep", "inspect", url, environ=env(s3_server)).stdout
    there = run("sftgo-prep", "inspect", shared_shard_dir, environ=env(s3_server)).stdout
    assert url in shown and shown.replace(url, "X") == there.replace(str(shared_shard_dir), "X")


def test_file_urls_are_the_local_paths_they_name(tmp_path, shard_dir, tiny_model_dir):
    from sftgo.trainer.loop import run as train
    from tests.trainer.tiny import tiny_config

    out = tmp_path / "run"
    cfg = tiny_config(
        f"file://{shard_dir}", f"file://{out}", tiny_model_dir, max_steps=1, eval_data=f"file://{shard_dir}"
    )
    train(cfg)
    assert (out / "model" / "model.safetensors").is_file()  # the run folder is the path, not a folder "file:"
    recorded = json.loads((out / "config.json").read_text())
    assert recorded["data"] == recorded["eval_data"] == str(shard_dir) and recorded["out"] == str(out)
    assert not any(p.name.startswith("file:") for p in Path.cwd().iterdir())


def test_the_cache_measures_a_folder_whose_shard_the_reader_just_released(tmp_path, monkeypatch):
    """The download thread sizes the cache folder while the reader deletes the shard it finished: a file listed but
    gone before its size is read counts nothing (it once failed a resumed torchrun run, naming the vanished file)."""
    from sftgo.core import remote

    (tmp_path / "0001-000000-shard-00000.parquet").write_bytes(b"x" * 10)
    (tmp_path / "0001-000001-shard-00001.parquet").write_bytes(b"y" * 5)
    listing = os.scandir

    class Listing(list):  # what os.scandir gives: a context manager over the entries
        def __enter__(self):
            return iter(self)

        def __exit__(self, *exc):
            return False

    def released_after_listing(folder):
        entries = Listing(listing(folder))
        (tmp_path / "0001-000000-shard-00000.parquet").unlink()  # the reader is done with it
        return entries

    monkeypatch.setattr(remote.os, "scandir", released_after_listing)
    cache = remote.ShardCache.__new__(remote.ShardCache)  # (only its folder is measured)
    cache.folder = tmp_path
    assert cache.disk_bytes() == 5
