"""Reliability and scale, with real processes: a killed build resumes to identical bytes, and a
build runs unchanged on an existing Dask cluster (`dask scheduler` + two `dask worker`s)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT / "data"))
from generate import generate, write_jsonl  # noqa: E402


def files_of(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("corpus")
    write_jsonl(generate(4000, 7, "alpaca"), tmp / "a.jsonl")
    write_jsonl(generate(4000, 7, "chat"), tmp / "c.jsonl")
    return [str(tmp / "a.jsonl"), str(tmp / "c.jsonl")]


def build_args(corpus, out):
    return [str(BIN / "sftgo-prep"), "build", *corpus, "--out", str(out), "--rows-per-shard", "200", "--workers", "1"]


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    subprocess.run(build_args(corpus, out) + ["--quiet"], check=True, capture_output=True)
    return files_of(out)


def wait_for(
    folder: Path, pattern: str, proc: subprocess.Popen, timeout: float = 120.0, besides: Path | None = None
) -> None:
    """Until a file matching `pattern` appears in `folder` (one outside the folder `besides`)."""
    deadline = time.time() + timeout
    while not any(besides is None or besides not in p.parents for p in folder.glob(pattern)):
        assert proc.poll() is None, f"build ended before {pattern} appeared"
        assert time.time() < deadline, f"{folder / pattern} did not appear"
        time.sleep(0.02)


@pytest.mark.parametrize(
    "kill_after", [".staging/*/part-00004.json", ".staging/*/shard-00003.parquet"], ids=["tokenize", "write"]
)
def test_killed_build_resumes_to_identical_output(corpus, reference, tmp_path, kill_after):
    out = tmp_path / "out"
    proc = subprocess.Popen(
        build_args(corpus, out), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_for(out, kill_after, proc)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its Dask worker processes, mid-build
    proc.wait()
    assert not (out / "manifest.json").exists()
    assert (out / ".staging").exists()
    staged_before = len(list((out / ".staging").glob("*/part-*.json")))
    assert 0 < staged_before
    again = subprocess.run(build_args(corpus, out), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert f"resuming: {staged_before} of 40 partition(s) already tokenized" in again.stderr
    assert files_of(out) == reference  # byte-identical to an uninterrupted build
    assert not (out / ".staging").exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_scheduler_signal_stops_the_build_and_its_cluster_cleanly(corpus, reference, tmp_path, sig):
    """What Slurm or Kubernetes send before a kill: the driver stops its local cluster (no process of the
    build is left), says so in one sentence, exits 128 + the signal, and the same command resumes."""
    out = tmp_path / "out"
    proc = subprocess.Popen(
        build_args(corpus, out), start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wait_for(out, ".staging/*/part-00002.json", proc)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == (
        f"Interrupted by {signal.Signals(sig).name}; run the same command again to resume."
    )
    assert "Traceback" not in stderr
    deadline = time.time() + 30  # the cluster's worker processes (same session) are gone
    while True:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        assert time.time() < deadline, "processes of the interrupted build are still running"
        time.sleep(0.2)
    again = subprocess.run(build_args(corpus, out), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert files_of(out) == reference


def test_build_on_an_existing_dask_cluster(corpus, reference, tmp_path, cli):
    sched_file = tmp_path / "scheduler.json"
    procs = [
        subprocess.Popen(
            [
                str(BIN / "dask"),
                "scheduler",
                "--scheduler-file",
                str(sched_file),
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--no-dashboard",
            ],
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    ]
    try:
        deadline = time.time() + 60
        while not sched_file.exists():
            assert time.time() < deadline, "dask scheduler did not start"
            time.sleep(0.1)
        address = json.loads(sched_file.read_text())["address"]
        for _ in range(2):
            procs.append(
                subprocess.Popen(
                    [str(BIN / "dask"), "worker", address, "--nthreads", "1", "--no-dashboard"],
                    start_new_session=True,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        from distributed import Client

        with Client(address, timeout="30s") as client:
            client.wait_for_workers(2, timeout=60)
            out = tmp_path / "out"
            cli("sftgo-prep", *build_args(corpus, out)[1:], "--scheduler", address)
            # both workers tokenized, and each loaded its tokenizer exactly once for all its tasks
            info = client.run(lambda: __import__("sftgo.pipeline.prepare", fromlist=["_"]).get_encoder.cache_info())
            assert len(info) == 2
            assert all(i.misses == 1 and i.hits >= 1 for i in info.values()), info
        assert files_of(out) == reference
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            p.wait(timeout=30)


def test_score_adds_a_strategy_and_resumes_after_a_kill(corpus, reference, tmp_path):
    """`sftgo-prep score` recomputing tfidf from the shards alone (tokens decoded back to text) gives
    the very bytes of the build; killed mid-way and run again, it still does."""
    out = tmp_path / "out"
    out.mkdir()
    for name, data in reference.items():
        (out / name).write_bytes(data)
    refused = subprocess.run(
        [str(BIN / "sftgo-prep"), "score", str(out), "--strategy", "tfidf"], capture_output=True, text=True
    )
    assert refused.returncode == 1 and "already has 'tfidf' groups; pass --overwrite" in refused.stderr
    args = [str(BIN / "sftgo-prep"), "score", str(out), "--strategy", "tfidf", "--overwrite", "--workers", "1"]
    proc = subprocess.Popen(args, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(out, ".scoring/*/part-00005.json", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert files_of(out) == reference  # nothing visible changed yet
    subprocess.run(args, check=True, capture_output=True)
    assert files_of(out) == reference and not (out / ".scoring").exists()


def test_a_cluster_without_workers_stops_the_build_with_a_sentence(monkeypatch):
    """Tasks on a cluster whose workers all died (or never joined) are a TaskError after NO_WORKERS_S
    (one sentence, exit 1 through the CLI), never a wait forever."""
    from distributed import Client, LocalCluster

    from sftgo.pipeline import executor

    monkeypatch.setattr(executor, "NO_WORKERS_S", 1.0)
    monkeypatch.setattr(executor, "POLL_S", 0.25)  # looks for workers 4 times a second, not every 5 s
    with LocalCluster(n_workers=0, processes=False, dashboard_address=":0") as cluster, Client(cluster) as c:
        with pytest.raises(
            executor.TaskError,
            match=r"^tokenize stopped: the Dask cluster has had no worker for 1 s "
            r"\(0 of 2 tasks done\); its workers died or never started\.$",
        ):
            executor.map_tasks(c, abs, [(-1,), (2,)], "tokenize", progress=False)
        cluster.scale(1)  # once a worker joins, the same tasks run
        c.wait_for_workers(1, timeout=60)
        assert executor.map_tasks(c, abs, [(-1,), (2,)], "tokenize", progress=False) == [1, 2]


def _kill_when(args: list[str], folder: Path, pattern: str, besides: Path | None = None) -> None:
    proc = subprocess.Popen(args, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(folder, pattern, proc, besides=besides)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_a_late_task_of_a_killed_build_cannot_write_into_the_next_one(corpus, reference, tmp_path):
    """On an external cluster (--scheduler) the tasks of a killed build keep running.  Build A (another
    --max-length) is killed mid-way, then build B (--overwrite) in turn; A's late tasks then finish -- run
    here with the very arguments A's driver gave them, as a worker would -- before B is run again.  They fail
    (A's work folder is gone) instead of leaving A's partitions or shards for B to reuse, and B resumes to
    the bytes of an uninterrupted build."""
    from sftgo.core import models
    from sftgo.pipeline import readers
    from sftgo.pipeline.config import BuildConfig
    from sftgo.pipeline.finalize import shard_name, write_partition
    from sftgo.pipeline.prepare import prepare_partition

    out = tmp_path / "out"
    _kill_when(build_args(corpus, out) + ["--max-length", "64"], out, ".staging/*/part-00002.json")
    a_work = out / ".staging" / json.loads((out / ".staging" / "build.json").read_text())["work"]
    b_args = build_args(corpus, out) + ["--overwrite"]
    _kill_when(b_args, out, ".staging/*/part-00002.json", besides=a_work)
    assert not a_work.exists()
    cfg_a = BuildConfig(inputs=corpus, out=str(out), rows_per_shard=200, workers=1, max_length=64).validate()
    strategies, last = cfg_a.strategy_objects(), readers.plan(corpus, 200)[-1]
    with pytest.raises(OSError):  # pass 1 of A's last partition
        prepare_partition(last, cfg_a, strategies, models.tokenizer_dir(None), str(a_work))
    with pytest.raises(OSError):  # pass 2 of A's (had it got that far)
        write_partition(
            last.index, cfg_a, strategies, str(a_work), None, str(a_work / shard_name(last.index)), {}, str(a_work), {}
        )
    assert not a_work.exists() and not list(out.rglob(f"*{last.index:05d}*"))
    again = subprocess.run(build_args(corpus, out), capture_output=True, text=True)  # B again, as a user resumes it
    assert again.returncode == 0, again.stderr
    assert "resuming:" in again.stderr
    assert files_of(out) == reference


def test_a_late_task_of_a_killed_score_cannot_write_into_the_next_one(corpus, reference, tmp_path, dask_scheduler):
    """The same for `sftgo-prep score`: a late pass-A task of a killed request (--eta 0.2) fails once another
    request (--eta 0.4) has started, which then gives what it gives uninterrupted."""
    from sftgo.core import models
    from sftgo.grouping import registry
    from sftgo.pipeline.config import BuildConfig
    from sftgo.pipeline.score import stage_shard

    def fresh(name):
        d = tmp_path / name
        d.mkdir()
        for file, data in reference.items():
            (d / file).write_bytes(data)
        return d

    clean = fresh("clean")
    score = [str(BIN / "sftgo-prep"), "score", "--strategy", "tfidf", "--overwrite", "--workers", "1"]
    # the uninterrupted score, on the session's cluster (its bytes do not depend on the cluster; the killed
    # requests below run on their own local cluster)
    clean_args = score[:2] + [str(clean)] + score[2:] + ["--eta", "0.4", "--scheduler", dask_scheduler]
    subprocess.run(clean_args, check=True, capture_output=True)
    out = fresh("out")
    _kill_when(score[:2] + [str(out)] + score[2:] + ["--eta", "0.2"], out, ".scoring/*/part-00002.json")
    a_work = out / ".scoring" / json.loads((out / ".scoring" / "score.json").read_text())["work"]
    b_args = score[:2] + [str(out)] + score[2:] + ["--eta", "0.4"]
    _kill_when(b_args, out, ".scoring/*/part-00002.json", besides=a_work)
    assert not a_work.exists()
    cfg_a = BuildConfig(inputs=corpus, out=str(out), rows_per_shard=200, eta=0.2).validate()
    with pytest.raises(OSError):
        stage_shard(
            39,
            str(out / "shard-00039.parquet"),
            cfg_a,
            [registry.get("tfidf")],
            models.tokenizer_dir(None),
            str(a_work),
            False,
        )
    assert not a_work.exists()
    subprocess.run(b_args, check=True, capture_output=True)
    assert files_of(out) == files_of(clean)
