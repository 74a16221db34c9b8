"""The only place that knows about Dask: start or join a cluster, map a function, show progress.

Input: a worker count (local cluster of processes, one thread each) or the address of
an existing scheduler; a plain function and its per-task arguments.
Output: the function's results in task order; the first task failure is raised again
in the driver as TaskError with the worker's one-line message.
Cost: a local cluster starts in a few seconds (each worker is a fresh Python process
that imports the pipeline once, then keeps its tokenizer across tasks).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import secrets
import sys
import time
from collections.abc import Callable, Iterator

from tqdm import tqdm

from sftgo.core.errors import SftgoError
from sftgo.core.fileio import os_error_sentence


class TaskError(SftgoError, RuntimeError):
    """A task failed on a worker."""


def _quiet() -> None:
    """Dask's own logs and the busy-dashboard-port warning are not for our users."""
    import warnings

    for name in ("distributed", "distributed.worker", "distributed.nanny", "distributed.scheduler", "tornado"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    # "Port 8787 is already in use": another cluster's dashboard; we serve none (random port below)
    warnings.filterwarnings("ignore", message="Port .* is already in use", category=UserWarning)


def abandon_clusters() -> None:
    """After an interrupt: close the local clusters this process started, quietly.  (distributed's own
    close at exit fails, with a traceback, on a cluster interrupted while it was starting.)"""
    spec = sys.modules.get("distributed.deploy.spec")
    if spec is None:  # no cluster was ever started
        return
    for cluster in list(spec.SpecCluster._instances):
        with contextlib.suppress(Exception):
            cluster.close(timeout=10)
        spec.SpecCluster._instances.discard(cluster)


@contextlib.contextmanager
def local_cluster(workers: int, cuda: bool = False) -> Iterator:
    """A Dask LocalCluster of `workers` processes with one thread each, quiet, with no fixed
    dashboard port; closed on exit.  What `client` starts when no scheduler is given (the test
    suite also starts one and hands its address to many builds as --scheduler).  With `cuda`:
    dask-cuda's LocalCUDACluster instead, one worker per visible GPU (pipeline/gpus.py)."""
    from dask import config as dask_config
    from distributed import LocalCluster

    from sftgo.pipeline import gpus

    _quiet()
    # Workers inherit these: one thread each for tokenizers / BLAS so workers do not oversubscribe cores.
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    # Our tasks are long and hold the GIL.  Whatever else a worker runs takes the GIL from them, so this
    # cluster, which runs nothing but them, keeps its own housekeeping rare: no statistical profiler (it
    # samples the task thread every 10 ms, for a dashboard page), the event-loop tick every 1 s instead of
    # 20 ms (it only measures loop latency), the system monitor every 5 s and the memory monitor every
    # 1 s.  And no MALLOC_TRIM_THRESHOLD_ (Dask sets it to 64 KiB to hand freed memory back at once; that
    # also fixes glibc's mmap threshold, and pass 1's large short-lived arrays then cost page faults).
    # Together this shortens pass 1 markedly (figures in bench/analysis.md).
    environ = dict(dask_config.get("distributed.nanny.pre-spawn-environ", {}))
    environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    settings = {
        "distributed.admin.tick.limit": "1h",  # long GIL-holding tasks are expected
        "distributed.admin.tick.interval": "1s",
        "distributed.admin.system-monitor.interval": "5s",
        "distributed.worker.memory.monitor-interval": "1s",
        "distributed.worker.profile.enabled": False,
        # (dask-cuda replaces each worker's `env` with its CUDA_VISIBLE_DEVICES: its workers get ours here)
        "distributed.nanny.pre-spawn-environ": {**environ, **env} if cuda else environ,
    }
    # no fixed dashboard port: never collides with (or warns about) another cluster
    common = {"threads_per_worker": 1, "dashboard_address": ":0", "silence_logs": logging.CRITICAL, "env": env}
    with dask_config.set(settings):
        if cuda:
            cluster = gpus.cuda_cluster(**common)
        else:
            cluster = LocalCluster(n_workers=workers, processes=True, **common)
    try:
        yield cluster
    finally:
        cluster.close()


@contextlib.contextmanager
def client(workers: int = 2, scheduler: str | None = None, cuda: bool = False) -> Iterator:
    """A Dask client.  Dask's own logs and worker tracebacks are silenced: a failed task reaches
    the user as one sentence (TaskError; the traceback only with --debug, as its __cause__).
    `cuda`: the local cluster is one of GPU workers (local_cluster)."""
    from distributed import Client

    _quiet()
    if scheduler:
        try:
            c = Client(scheduler, timeout="20s")
        except OSError as exc:
            raise TaskError(f"Cannot reach the Dask scheduler at {scheduler} ({exc}).") from None
        try:
            yield c
        finally:
            c.close()
        return
    with local_cluster(workers, cuda) as cluster:
        c = Client(cluster)
        try:
            yield c
        finally:
            c.close()


NO_WORKERS_S = 120.0  # how long tasks wait on a cluster that has no worker before the build says so and stops
POLL_S = 5.0  # how long map_tasks waits for a result before it asks whether the cluster has a worker at all


IN_FLIGHT_PER_THREAD = 4  # tasks the scheduler holds per worker thread: enough to keep every worker busy


def map_tasks(
    c, fn: Callable, args: list[tuple], desc: str, progress: bool = True, resources: dict | None = None
) -> list:
    """Run fn(*a) for every a in args on the cluster; results in the order of args.  `resources`: the Dask
    worker resources each task holds while it runs (e.g. {"GPU": 1}: only workers that advertise them run
    it, as many at a time as they advertise; pipeline/gpus.py).  At most
    IN_FLIGHT_PER_THREAD tasks per worker thread are submitted at a time, and each result is collected and
    released as it arrives: however many tasks there are, the scheduler and the driver hold a few.  A
    cluster left without workers (all died, or none ever joined; with `resources`, none that has them) is a
    TaskError after NO_WORKERS_S, not a wait forever."""
    from distributed import wait

    if not args:
        return []
    window = IN_FLIGHT_PER_THREAD * max(sum(c.nthreads().values()), 2)
    run = secrets.token_hex(4)  # task keys unique to this call: two builds on one scheduler never share a result
    results: list = [None] * len(args)
    waiting = iter(enumerate(args))
    running: dict = {}  # future -> its task's number
    bar = tqdm(total=len(args), desc=desc, unit="part", file=sys.stderr, disable=not progress, leave=True)
    try:
        empty_since = None
        while True:
            for i, a in itertools.islice(waiting, window - len(running)):
                running[c.submit(fn, *a, pure=False, key=f"{desc}-{run}-{i:05d}", resources=resources)] = i
            if not running:
                return results
            try:
                done, _ = wait(list(running), timeout=POLL_S, return_when="FIRST_COMPLETED")
            except TimeoutError:  # nothing finished in POLL_S: is anyone working?
                empty_since = _no_workers_since(c, empty_since, desc, bar.n, len(args), resources)
                continue
            for fut in done:
                if fut.status == "error":
                    exc = fut.exception()
                    raise task_error(desc, exc) from exc
                results[running.pop(fut)] = fut.result()
                fut.release()
                bar.update(1)
            empty_since = None
    finally:
        bar.close()
        for fut in running:
            fut.release()


def _no_workers_since(
    c, since: float | None, desc: str, done: int, total: int, resources: dict | None = None
) -> float | None:
    """When the cluster has had no worker (with `resources`: none that has them) since (None: it has
    one); TaskError past NO_WORKERS_S."""
    if workers_with(c, resources) if resources else c.nthreads():  # c.nthreads(): {worker address: threads}
        return None
    now = time.monotonic()
    if since is not None and now - since > NO_WORKERS_S:
        which = f"worker with the resources {resources}" if resources else "worker"
        raise TaskError(
            f"{desc} stopped: the Dask cluster has had no {which} for {NO_WORKERS_S:.0f} s ({done} of "
            f"{total} tasks done); its workers died or never started."
        )
    return now if since is None else since


def workers_with(c, resources: dict) -> list[str]:
    """Addresses of the cluster's workers that advertise at least `resources` (asked of the scheduler)."""
    return [
        address
        for address, w in c.scheduler_info()["workers"].items()
        if all((w.get("resources") or {}).get(name, 0) >= need for name, need in resources.items())
    ]


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for one task's bulk work, and back as it was after it.
    Pass 1 allocates millions of short-lived, acyclic objects (token offset tuples, messages); each
    collection of the older generations walks them all again.  What the task leaves in cycles is
    collected at the next collection after it."""
    import gc

    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def on_every_worker(c, fn: Callable, *args) -> list:
    """Start fn(*args) once on each worker without waiting; keep the returned futures alive until
    the work they prepare for is done."""
    return [
        c.submit(fn, *args, pure=False, workers=[w], allow_other_workers=False) for w in c.scheduler_info()["workers"]
    ]


def task_error(desc: str, exc: BaseException) -> TaskError:
    """The one sentence of a task that failed: a file it could not read or write by its path and fix."""
    if isinstance(exc, OSError) and not isinstance(exc, SftgoError):
        return TaskError(f"{desc} failed on a worker: {os_error_sentence(exc)}")
    return TaskError(f"{desc} failed on a worker: {type(exc).__name__}: {exc}")


def result(fut, desc: str):
    """The result of a future; its failure raised as TaskError, one sentence naming `desc`."""
    try:
        return fut.result()
    except Exception as exc:
        raise task_error(desc, exc) from exc


def run_one(c, fn: Callable, *args):
    """Run a single function on a worker (e.g. a reduction) and return its result."""
    return result(c.submit(fn, *args, pure=False), getattr(fn, "__name__", "task"))
