"""--gpu-workers on a Dask cluster started from the command line: a `dask scheduler`, a worker without
resources and one with `--resources GPU=1 --nthreads 1` (here on CPU: the resource is what routes the model
tasks; each worker process sees its own device either way).  The build's reference-scoring tasks run only on
the GPU worker, which loads the model once, and the shards equal a local build's byte for byte; a cluster
without the resource is refused with one sentence.

The cluster fixture is this file's own (each process in its own folder with its own HOME and TMPDIR)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import BIN, write_jsonl

RECORDS = [
    {"instruction": f"Name a colour that rhymes with {w}.", "output": f"A colour that rhymes with {w} is {c}."}
    for w, c in [("bed", "red"), ("mean", "green"), ("sue", "blue"), ("mellow", "yellow"), ("pink", "ink")]
]


class Cluster:
    """A `dask scheduler` and `dask worker`s as separate processes, like a user's cluster; closed by close()."""

    def __init__(self, root: Path):
        self.root = root
        self.procs: dict[str, subprocess.Popen] = {}
        sched_file = root / "scheduler.json"
        self._start(
            "scheduler",
            ["scheduler", "--scheduler-file", str(sched_file), "--host", "127.0.0.1", "--port", "0", "--no-dashboard"],
        )
        deadline = time.time() + 60
        while not sched_file.exists():
            assert time.time() < deadline, "dask scheduler did not start"
            time.sleep(0.1)
        self.address = json.loads(sched_file.read_text())["address"]

    def _start(self, name: str, args: list[str]) -> None:
        home = self.root / name
        (home / "tmp").mkdir(parents=True)
        env = dict(os.environ, HOME=str(home), TMPDIR=str(home / "tmp"), OMP_NUM_THREADS="1")
        self.procs[name] = subprocess.Popen(
            [str(BIN / "dask"), *args],
            cwd=home,
            env=env,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def add_worker(self, name: str, *extra: str) -> None:
        local = str(self.root / name / "dask")
        self._start(
            name,
            [
                "worker",
                self.address,
                "--name",
                name,
                "--nthreads",
                "1",
                "--local-directory",
                local,
                "--no-nanny",
                "--no-dashboard",
                *extra,
            ],
        )

    def close(self) -> None:
        for p in self.procs.values():
            os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(timeout=3)
            except subprocess.TimeoutExpired:  # a worker that holds a model can hang on the way out
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        c.add_worker("cpu")
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "colours.jsonl", RECORDS)


def build_args(data: Path, out: Path) -> list[str]:
    return ["build", str(data), "--out", str(out), "--strategy", "reference", "--rows-per-shard", "2", "--quiet"]


def files_of(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def test_require_without_a_gpu_worker_is_one_sentence(cluster, data, tmp_path, cli):
    from distributed import Client

    with Client(cluster.address, timeout="30s") as client:
        client.wait_for_workers(1, timeout=60)
        assert "gpu" not in {w["name"] for w in client.scheduler_info()["workers"].values()}
    out = tmp_path / "out"
    proc = cli(
        "sftgo-prep", *build_args(data, out), "--scheduler", cluster.address, "--gpu-workers", "require", check=False
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: --gpu-workers require: no worker"), proc.stderr
    assert "--resources GPU=1" in lines[0]
    assert not list(out.glob("shard-*.parquet"))


def test_reference_scoring_runs_only_on_the_gpu_worker(cluster, data, tmp_path, cli):
    from distributed import Client, get_task_stream

    local = tmp_path / "local"  # the same build on a local cluster, run while the GPU worker starts
    local_build = subprocess.Popen([str(BIN / "sftgo-prep"), *build_args(data, local), "--workers", "1"])
    cluster.add_worker("gpu", "--resources", "GPU=1")
    assert local_build.wait(timeout=300) == 0
    out = tmp_path / "out"
    with Client(cluster.address, timeout="30s") as client:
        client.wait_for_workers(2, timeout=60)
        names = {a: w["name"] for a, w in client.scheduler_info()["workers"].items()}
        with get_task_stream(client) as stream:
            cli("sftgo-prep", *build_args(data, out), "--scheduler", cluster.address, "--gpu-workers", "require")
        ran = {}
        for task in stream.data:
            ran.setdefault(task["key"].split("-")[0], set()).add(names[task["worker"]])
        # pass 1 (tokenize + reference scoring): 3 partitions, all on the GPU worker
        assert ran["tokenize"] == {"gpu"}, ran
        # one model, loaded once, on the GPU worker only; the other worker never loaded one
        loads = client.run(lambda: __import__("sftgo.grouping.reference", fromlist=["_"])._scorer.cache_info())
        by_name = {names[a]: info for a, info in loads.items()}
        assert by_name["gpu"].misses == 1 and by_name["gpu"].currsize == 1, by_name
        assert by_name["cpu"].misses == 0, by_name
    assert len(list(out.glob("shard-*.parquet"))) == 3
    assert files_of(out) == files_of(local)


def test_tasks_needing_a_resource_no_worker_has_stop_with_a_sentence(monkeypatch):
    """A GPU worker that dies mid-build leaves its tasks waiting for the resource: after NO_WORKERS_S that
    is a TaskError naming it, even while workers without it live (map_tasks asks this every 5 s)."""
    from distributed import Client, LocalCluster

    from sftgo.pipeline import executor

    with LocalCluster(n_workers=1, processes=False, dashboard_address=":0") as cluster, Client(cluster) as c:
        assert executor._no_workers_since(c, None, "tokenize", 0, 3) is None  # a worker: nothing is stuck
        since = executor._no_workers_since(c, None, "tokenize", 0, 3, {"GPU": 1})
        assert since is not None  # none with the resource: counting from now
        with pytest.raises(
            executor.TaskError,
            match=r"^tokenize stopped: the Dask cluster has had no worker with the resources \{'GPU': 1\} for "
            r"120 s \(1 of 3 tasks done\); its workers died or never started\.$",
        ):
            executor._no_workers_since(c, since - executor.NO_WORKERS_S - 1, "tokenize", 1, 3, {"GPU": 1})
        assert executor.workers_with(c, {"GPU": 1}) == []


def test_settings_checked_and_notes(tmp_path):
    import importlib.util

    from sftgo.core.errors import ConfigError
    from sftgo.pipeline.config import BuildConfig, ignored_settings

    base = {"inputs": ["x.jsonl"], "out": str(tmp_path / "out")}
    with pytest.raises(ConfigError, match=r"^--gpu-workers cuda starts a local cluster .* cannot join --scheduler"):
        BuildConfig(**base, gpu_workers="cuda", scheduler="tcp://127.0.0.1:1").validate()
    with pytest.raises(ConfigError, match=r"^--gpu-workers must be one of auto, require, off, cuda, got 'gpu'\.$"):
        BuildConfig(**base, gpu_workers="gpu").validate()
    if importlib.util.find_spec("dask_cuda") is None:
        with pytest.raises(ConfigError, match=r"^--gpu-workers cuda needs dask-cuda"):
            BuildConfig(**base, gpu_workers="cuda").validate()
    notes = ignored_settings(BuildConfig(**base, gpu_workers="require", workers=3), ["tfidf"])
    assert notes == ["--gpu-workers require is ignored: no strategy of this run runs a model (reference, semantic)."]
    assert not ignored_settings(BuildConfig(**base, gpu_workers="require"), ["tfidf", "reference"])
    cuda = BuildConfig(**base, gpu_workers="cuda", workers=3)
    assert ignored_settings(cuda, ["reference"]) == [
        "--workers is ignored: --gpu-workers cuda starts one worker per visible GPU."
    ]
    # where the build runs is not part of what it produces
    assert "gpu_workers" not in BuildConfig(**base, gpu_workers="require").params()
