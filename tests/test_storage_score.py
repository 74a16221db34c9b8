"""`sftgo-prep score URL` on a real S3 server (tests/s3server.py) with a cluster of command-line processes
(tests/dask_cluster.py) whose workers share no folder with the driver: the result is byte-identical to the same
build scored in a local folder; a score killed mid-commit and run again ends byte-identical; a pending commit of
another request is discarded with a note, or refused while half moved; errors are one sentence and create no local
folder; --overwrite recomputes.

The request of these tests is tfidf computed again with another eta (no model to load)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sftgo.core.shards import ShardError, read_manifest, verify_build
from sftgo.pipeline import score
from tests.dask_cluster import CommandLineCluster

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT / "data"))
from generate import generate, write_jsonl  # noqa: E402

ETA = 0.2
REQUEST = {"eta": ETA, "trust_remote_code": False}


def files_of(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file() and p.name != ".lock"}


def store(url: str):
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()  # (other processes write here)
    return fs, root


def objects_of(url: str) -> dict[str, bytes]:
    """Every object directly under `url` (the lease aside) -> its bytes."""
    fs, root = store(url)
    return {
        p.rsplit("/", 1)[-1]: fs.cat_file(p)
        for p in sorted(fs.ls(root, detail=False))
        if fs.isfile(p) and not p.endswith("/.lock")
    }


def keys_under(url: str) -> list[str]:
    fs, root = store(url)
    return sorted(p[len(root) + 1 :] for p in fs.find(root))


@pytest.fixture(scope="module")
def cluster(s3_server, tmp_path_factory):
    with CommandLineCluster(tmp_path_factory.mktemp("cluster"), s3_server.env, workers=2) as c:
        yield c


@pytest.fixture(scope="module")
def builds(cluster, s3_server, tmp_path_factory):
    """local: a build of 40 records in 4 shards into a local folder; scored: local scored with tfidf at eta 0.2 (what
    `score local --strategy tfidf --overwrite --eta 0.2` leaves); url: the same build into the store (a build of
    its own, on the cluster), which each test copies to its own prefix."""
    from sftgo.pipeline.build import run as build
    from sftgo.pipeline.config import BuildConfig

    tmp = tmp_path_factory.mktemp("score-store")
    write_jsonl(generate(40, 3, "alpaca"), tmp / "a.jsonl")
    common = {"inputs": [str(tmp / "a.jsonl")], "rows_per_shard": 10, "scheduler": cluster.address, "progress": False}
    build(BuildConfig(**common, out=str(tmp / "local")))
    build(BuildConfig(**common, out=str(tmp / "scored")))
    score.run(str(tmp / "scored"), ["tfidf"], REQUEST, scheduler=cluster.address, overwrite=True, progress=False)
    url = f"s3://{s3_server.bucket()}/built"
    with pytest.MonkeyPatch.context() as mp:
        s3_server.apply_env(mp)
        build(BuildConfig(**common, out=url))
        assert objects_of(url) == files_of(tmp / "local")
    return {"local": tmp / "local", "scored": tmp / "scored", "url": url, "scheduler": cluster.address}


def copy_of(builds, s3) -> str:
    """The store build, copied to a new bucket of this test."""
    url = f"s3://{s3.bucket()}/run"
    fs, root = store(builds["url"])
    for name in objects_of(builds["url"]):
        fs.copy(f"{root}/{name}", f"{store(url)[1]}/{name}")
    return url


def rescore(builds, url: str, eta: float = ETA):
    return score.run(url, ["tfidf"], {**REQUEST, "eta": eta}, scheduler=builds["scheduler"], overwrite=True)


class Killed(BaseException):
    """What the monkeypatched commit raises where a kill would have stopped the driver."""


def killed_mid_commit(builds, url: str, copies: int, half: bool = False) -> None:
    """Run the request of these tests on `url` with its commit stopped after `copies` shards or artifacts were
    moved to their final keys (with `half`, the last of them copied but not yet deleted from .scoring), as a driver
    killed there leaves it (the lease aside: released here, taken over after a kill)."""
    done = []
    real = score._Store.replace

    def replace(self, src, dst):
        if f"/{score.SCORING}/" not in str(dst):  # a commit's move (not one into .scoring)
            if len(done) == copies:
                raise Killed
            done.append(dst)
            if half and len(done) == copies:
                self.fs.copy(self._key(src), self._key(dst))
                raise Killed
        real(self, src, dst)

    with pytest.MonkeyPatch.context() as mp, pytest.raises(Killed):
        mp.setattr(score._Store, "replace", replace)
        rescore(builds, url)


def test_score_on_a_store_is_byte_identical_to_a_local_score(builds, s3, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    url = copy_of(builds, s3)
    manifest = rescore(builds, url)
    got, want = objects_of(url), files_of(builds["scored"])
    assert got == want  # every shard, idf.parquet, the record of the inputs and manifest.json, byte for byte
    assert manifest == read_manifest(url) == read_manifest(builds["scored"])
    assert manifest["strategies"]["tfidf"]["eta"] == ETA
    assert not [k for k in keys_under(url) if k.startswith(".scoring")]  # the work is cleaned up
    verify_build(url)
    assert list(tmp_path.iterdir()) == []  # no local folder named after the URL


@pytest.mark.parametrize("half", [False, True])
def test_a_score_killed_mid_commit_finishes_it_when_run_again(builds, s3, capsys, half):
    url = copy_of(builds, s3)
    killed_mid_commit(builds, url, 2, half)
    keys = keys_under(url)
    assert ".scoring/manifest.json" in keys and ".scoring/score.json" in keys
    assert read_manifest(url) == read_manifest(builds["local"])  # the old manifest, over shards partly rewritten
    with pytest.raises(ShardError, match="does not match its checksum"):
        verify_build(url)  # a reader in the commit window is refused, never served a mix
    capsys.readouterr()
    rescore(builds, url)
    assert "Note:" not in capsys.readouterr().err
    assert objects_of(url) == files_of(builds["scored"])
    assert not [k for k in keys_under(url) if k.startswith(".scoring")]


def test_a_half_moved_commit_of_another_request_is_refused_then_finished(builds, s3):
    url = copy_of(builds, s3)
    killed_mid_commit(builds, url, 1)
    with pytest.raises(ShardError) as refused:
        rescore(builds, url, 0.4)
    assert "is half-way through committing an earlier `sftgo-prep score --strategy tfidf`" in str(refused.value)
    assert ".scoring/manifest.json" in keys_under(url)  # kept for the request that can finish it
    rescore(builds, url)
    assert objects_of(url) == files_of(builds["scored"])


def test_a_pending_commit_of_another_request_is_discarded_with_a_note(builds, s3, capsys):
    url = copy_of(builds, s3)
    killed_mid_commit(builds, url, 0)  # the pending manifest written, nothing moved yet
    assert objects_of(url) == files_of(builds["local"])  # the build as it was
    capsys.readouterr()
    manifest = rescore(builds, url, 0.4)
    err = capsys.readouterr().err
    assert "Note: discarded" in err and "another request" in err, err
    assert manifest == verify_build(url) and manifest["strategies"]["tfidf"]["eta"] == 0.4
    assert not [k for k in keys_under(url) if k.startswith(".scoring")]


def prep(*args, cwd: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "sftgo-prep"), *map(str, args)],
        cwd=cwd,
        env=dict(env or os.environ, PYTHONUNBUFFERED="1", AWS_EC2_METADATA_DISABLED="true"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def one_line(proc) -> str:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in err, err
    return lines[0]


def test_cli_errors_are_one_sentence_and_create_no_local_folder(s3, tmp_path):
    bucket = s3.bucket()
    no_keys = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    no_keys.update(AWS_SHARED_CREDENTIALS_FILE=os.devnull, AWS_CONFIG_FILE=os.devnull, AWS_ENDPOINT_URL=s3.endpoint)
    nobucket = f"s3://no-such-bucket-{os.getpid()}/x"
    cases = [  # (URL, environment, the line)
        (
            nobucket,
            None,
            f"Error: {nobucket}: the bucket no-such-bucket-{os.getpid()} does not exist; create it first "
            "(sftgo-prep creates no buckets).",
        ),
        (
            f"s3://{bucket}/x",
            None,
            f"Error: s3://{bucket}/x has no manifest.json: the build did not complete or this is not an sftgo-prep "
            "output.",
        ),
        (
            "memory://nothing/here",
            None,
            "Error: memory://nothing/here has no manifest.json: the build did not complete or this is not an "
            "sftgo-prep output.",
        ),
        (f"s3://{bucket}/x", no_keys, f"Error: No credentials were found for s3://{bucket}/x: set the backend's"),
    ]
    procs = [prep("score", url, "--strategy", "tfidf", "--quiet", cwd=tmp_path, env=env) for url, env, _ in cases]
    for (url, _, says), proc in zip(cases, procs):
        assert one_line(proc).startswith(says), url
    assert list(tmp_path.iterdir()) == []  # nothing named s3:, memory: or after the URL
    assert keys_under(f"s3://{bucket}") == []  # and nothing (not even the lease) written to the store


def test_overwrite_on_a_store_through_the_cli(builds, s3, tmp_path):
    url = copy_of(builds, s3)
    args = ["score", url, "--strategy", "tfidf", "--eta", ETA, "--scheduler", builds["scheduler"], "--quiet"]
    refused = one_line(prep(*args, cwd=tmp_path))
    assert refused == f"Error: {url} already has 'tfidf' groups; pass --overwrite to compute them again."
    assert objects_of(url) == files_of(builds["local"])
    done = prep(*args, "--overwrite", cwd=tmp_path)
    out, err = done.communicate(timeout=300)
    assert done.returncode == 0, err
    assert out.strip() == f"Added tfidf groups to 4 shard(s) in {url}; strategies now: tfidf."
    assert objects_of(url) == files_of(builds["scored"])  # recomputed: the local score's bytes
    assert list(tmp_path.iterdir()) == []


def test_a_url_never_becomes_a_local_path(tmp_path, monkeypatch):
    from sftgo.core import storage
    from sftgo.core.errors import SftgoError
    from sftgo.core.locks import exclusive

    monkeypatch.chdir(tmp_path)
    assert storage.local_path(f"file://{tmp_path}/x") == tmp_path / "x"
    with pytest.raises(SftgoError, match="is a URL of an object store, but a local path is needed here"):
        storage.local_path("s3://b/x", "--out")
    with pytest.raises(SftgoError), exclusive("s3://b/x"):
        pass
    assert list(tmp_path.iterdir()) == []


def test_a_score_killed_before_its_commit_resumes_in_its_work_folder(builds, s3):
    """Killed once the tasks are done and the shards moved into .scoring (before the pending manifest): run again,
    it takes up the work folder its marker names, drops what was moved out of it and ends byte-identical."""
    url = copy_of(builds, s3)
    with pytest.MonkeyPatch.context() as mp, pytest.raises(Killed):
        mp.setattr(score._Store, "check_held", lambda self: (_ for _ in ()).throw(Killed()))
        rescore(builds, url)
    keys = keys_under(url)
    assert ".scoring/score.json" in keys and ".scoring/manifest.json" not in keys
    work = [k for k in keys if k.startswith(".scoring/") and k.endswith("/part-00000.json")]
    assert len(work) == 1
    rescore(builds, url)
    assert objects_of(url) == files_of(builds["scored"])
    assert not [k for k in keys_under(url) if k.startswith(".scoring")]
