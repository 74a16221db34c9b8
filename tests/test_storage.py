"""sftgo.core.storage: URLs and local paths, backends and their extras, options, and a real S3 server."""

from __future__ import annotations

import pytest

from sftgo.core import storage
from sftgo.core.errors import ConfigError


def test_urls_and_paths():
    assert storage.scheme("S3://bucket/x") == "s3"
    assert storage.is_url("memory://a") and storage.is_remote("memory://a")
    assert storage.is_url("file:///tmp/x") and not storage.is_remote("file:///tmp/x")
    for local in ("data/x.jsonl", "/abs/x", "hf:tatsu-lab/alpaca", "C:relative", "./s3://odd"):
        assert not storage.is_url(local), local
    assert storage.join("s3://b/p/", "a", "b.json") == "s3://b/p/a/b.json"
    assert storage.join("out", "shard.parquet").endswith("out/shard.parquet")


def test_options_are_a_json_object():
    assert storage.parse_options('{"endpoint_url": "http://x", "anon": false}') == {
        "endpoint_url": "http://x",
        "anon": False,
    }
    assert storage.parse_options(None) == {}
    assert storage.parse_options({"key": "k"}) == {"key": "k"}
    for bad in ("[1, 2]", "not json", '"text"', "3"):
        with pytest.raises(ConfigError, match="storage-options must be a JSON object"):
            storage.parse_options(bad)


def test_unknown_scheme_and_missing_backend_are_one_sentence(monkeypatch):
    with pytest.raises(ConfigError, match=r"nosuch://, that sftgo cannot open"):
        storage.filesystem("nosuch://bucket/x")
    real = storage.importlib.util.find_spec
    monkeypatch.setattr(storage.importlib.util, "find_spec", lambda n: None if n == "gcsfs" else real(n))
    with pytest.raises(ConfigError, match=r"needs the gcsfs package.*pip install 'sftgo\[gcs\]'"):
        storage.filesystem("gs://bucket/x")


def test_memory_and_s3_roundtrip(s3):
    fs, path = storage.filesystem("memory://sftgo-test/a.txt")
    fs.pipe(path, b"hello")
    assert fs.cat(path) == b"hello"
    bucket = s3.bucket()
    fs, path = storage.filesystem(f"s3://{bucket}/x/y.txt")
    fs.pipe(path, b"data")
    assert storage.filesystem(f"s3://{bucket}/x/y.txt")[0].cat(path) == b"data"
    with pytest.raises(FileNotFoundError) as info:
        storage.filesystem("s3://no-such-bucket-here/x")[0].cat("no-such-bucket-here/x")
    assert "does not exist" in storage.sentence(info.value, "s3://no-such-bucket-here/x")


def test_a_config_file_is_local_a_file_url_is_its_path(tmp_path):
    from sftgo.core.config import load_config_file
    from sftgo.pipeline.config import BuildConfig

    (tmp_path / "c.json").write_text('{"rows_per_shard": 7}')
    assert load_config_file(f"file://{tmp_path}/c.json", BuildConfig) == {"rows_per_shard": 7}
    for url in ("s3://bucket/c.json", "memory://c.yaml"):
        with pytest.raises(storage.StorageError, match=r"^--config .* is a URL of an object store, but a local path"):
            load_config_file(url, BuildConfig)
