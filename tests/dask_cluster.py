"""A Dask cluster started as users start one: `dask scheduler` and `dask worker` processes from the command line.

`CommandLineCluster(env, workers=2)` is a context manager: it starts the venv's `dask scheduler` on a free port of
127.0.0.1 and `workers` `dask worker` processes (one thread each), each process in its own empty working folder with
its own HOME and TMPDIR (so the workers share no folder with the driver or each other, as on separate machines), with
`env` added to their environment (e.g. the S3 server's AWS_* variables); it waits until every worker is connected and
yields itself (`address`).  `kill_worker(i)` ends worker i with SIGKILL (its whole process group: the nanny and the
worker), `start_worker(i)` starts it again, `wait_for_workers(n)` waits until n are connected; leaving the block stops
everything.
Cost: a few seconds to start (each worker imports Dask); one Python process per worker and one for the scheduler.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.s3server import free_port

BIN = Path(sys.executable).parent


class CommandLineCluster:
    def __init__(self, root: Path, env: dict[str, str] | None = None, workers: int = 2):
        self.root, self.workers = Path(root), workers
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.env = dict(env or {})
        self.procs: dict[str, subprocess.Popen] = {}

    def _start(self, name: str, args: list[str]) -> None:
        home = self.root / name
        for sub in ("cwd", "home", "tmp"):
            (home / sub).mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, **self.env, HOME=str(home / "home"), TMPDIR=str(home / "tmp"))
        log = open(home / "log.txt", "ab")  # noqa: SIM115 (closed when the process ends)
        self.procs[name] = subprocess.Popen(
            [str(BIN / "dask"), *args],
            cwd=home / "cwd",
            env=env,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        log.close()

    def start_worker(self, i: int) -> None:
        self._start(
            f"worker-{i}",
            [
                "worker",
                self.address,
                "--nthreads",
                "1",
                "--no-dashboard",
                "--name",
                f"worker-{i}",
                "--host",
                "127.0.0.1",
                "--local-directory",
                str(self.root / f"worker-{i}" / "tmp"),
            ],
        )

    def kill_worker(self, i: int) -> None:
        proc = self.procs.pop(f"worker-{i}")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def wait_for_workers(self, n: int, timeout: float = 120.0) -> None:
        from distributed import Client

        with Client(self.address, timeout="30s") as client:
            client.wait_for_workers(n, timeout=timeout)
            deadline = time.monotonic() + timeout
            while len(client.scheduler_info()["workers"]) != n:  # (a killed worker is gone from the list)
                assert time.monotonic() < deadline, f"the cluster did not settle at {n} workers"
                time.sleep(0.2)

    def __enter__(self) -> CommandLineCluster:
        self._start("scheduler", ["scheduler", "--host", "127.0.0.1", "--port", str(self.port), "--no-dashboard"])
        try:
            for i in range(self.workers):
                self.start_worker(i)
            self.wait_for_workers(self.workers)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for proc in self.procs.values():
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs.clear()
