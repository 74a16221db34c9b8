"""GPU workers of a Dask cluster: where the tasks that run a model strategy (reference, semantic) go.

Input: a Dask client, the --gpu-workers setting (GPU_MODES) and the build's strategy objects; a strategy
that runs a model in pass 1 says so with the class attribute `accelerator = True` (grouping/registry.py).
Output: the Dask resources those tasks are submitted with -- {"GPU": 1} when workers advertise the resource
(`dask worker ADDRESS --resources GPU=1 --nthreads 1`): each such worker then runs one of them at a time and
holds one model, on the device it sees (CUDA_VISIBLE_DEVICES per worker, as dask-cuda sets it; the models'
device "auto" takes cuda:0 of what the worker sees) -- or None when they may run on any worker.  For
--gpu-workers cuda, the local cluster: dask-cuda's LocalCUDACluster, one worker per visible GPU.
Cost: one query of the scheduler per build.
"""

from __future__ import annotations

import importlib.util

from sftgo.core.errors import ConfigError, SftgoError
from sftgo.pipeline import executor

RESOURCE = "GPU"  # the Dask worker resource a GPU worker advertises
GPU_MODES = ("auto", "require", "off", "cuda")


class GpuWorkersError(SftgoError, RuntimeError):
    """The cluster has no GPU worker although the build requires one."""


def check_mode(mode: str, scheduler: str | None) -> None:
    """The --gpu-workers setting is known and, for cuda, can start its cluster here; one sentence otherwise."""
    if mode not in GPU_MODES:
        raise ConfigError(f"--gpu-workers must be one of {', '.join(GPU_MODES)}, got {mode!r}.")
    if mode != "cuda":
        return
    if scheduler:
        raise ConfigError(
            "--gpu-workers cuda starts a local cluster of GPU workers, so it cannot join --scheduler; start the "
            f"cluster's GPU workers with --resources {RESOURCE}=1 and use --gpu-workers require instead."
        )
    if importlib.util.find_spec("dask_cuda") is None:
        raise ConfigError(
            "--gpu-workers cuda needs dask-cuda (`pip install dask-cuda`), which is not installed; or start "
            f"the GPU workers yourself with --resources {RESOURCE}=1 and pass --scheduler."
        )


def accelerated(strategies: list) -> list[str]:
    """The names of the strategies that run a model in pass 1 (their tasks want a GPU)."""
    return [s.name for s in strategies if getattr(s, "accelerator", False)]


def model_task_resources(c, mode: str, strategies: list) -> dict | None:
    """The resources of the tasks that run the strategies' models: {RESOURCE: 1} when a model strategy is
    built, the mode is not off and the cluster has a GPU worker; None otherwise.  Modes require and cuda
    without a GPU worker are GpuWorkersError, one sentence, before any task is submitted."""
    names = accelerated(strategies)
    if mode == "off" or not names:
        return None
    if executor.workers_with(c, {RESOURCE: 1}):
        return {RESOURCE: 1}
    if mode == "auto":
        return None
    if mode == "cuda":
        raise GpuWorkersError(
            "--gpu-workers cuda started no GPU worker: dask-cuda sees no GPU here (check CUDA_VISIBLE_DEVICES "
            "and the NVIDIA driver)."
        )
    raise GpuWorkersError(
        f"--gpu-workers {mode}: no worker of the Dask cluster advertises the {RESOURCE} resource that the "
        f"{', '.join(names)} model needs; start each GPU worker with `dask worker ADDRESS --resources "
        f"{RESOURCE}=1 --nthreads 1` (or pass --gpu-workers auto to let any worker run the model)."
    )


def cuda_cluster(**kwargs):
    """dask-cuda's LocalCUDACluster: one worker per visible GPU, each with its own CUDA_VISIBLE_DEVICES and
    the RESOURCE resource; `kwargs` as for distributed.LocalCluster.  check_mode has found dask-cuda."""
    from dask_cuda import LocalCUDACluster

    return LocalCUDACluster(resources={RESOURCE: 1}, **kwargs)
