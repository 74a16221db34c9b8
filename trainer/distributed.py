"""Rank set-up and numeric precision: which process this is, on which device, in which dtype.

Input: the environment torchrun or `accelerate launch` sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT),
a TrainConfig's --fsdp and --precision.
Output: (rank, world size, device) with the process group initialised when there are several ranks (gloo on
CPU, NCCL on GPU); `on_rank0` to run a decision on rank 0 and give every rank its result or its error;
`barrier`; whether to compute in bf16, the autocast context for it, and the dtype of the trained state
(weights, gradients, optimizer moments: fp32, or bf16 under --precision bf16-state).
Cost: one process-group initialisation; a broadcast of a small object per `on_rank0`.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist

from sftgo.core.errors import ConfigError, SftgoError
from sftgo.trainer.config import TrainConfig


def setup_distributed(fsdp: bool = False):
    """(rank, world_size, device); initialises the process group under torchrun (or accelerate
    launch, which sets the same variables).  --fsdp on one process gets a process group of one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if (world > 1 or fsdp) and not dist.is_initialized():
        if world == 1:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    return rank, world, device


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def on_rank0(fn):
    """Run fn on rank 0 only and give every rank its result, or raise its error everywhere."""
    if not dist.is_initialized():
        return fn()
    box = [None, None, None]
    if dist.get_rank() == 0:
        try:
            box[0] = fn()
        except SftgoError as exc:
            box[1:] = [str(exc), type(exc).__name__]
    dist.broadcast_object_list(box, src=0)  # our own small values (a path, a message, a class name), never user data
    if box[1] is not None:  # the same class on every rank where it is one of ours, else a ConfigError
        kind = next((c for c in _error_classes() if c.__name__ == box[2]), ConfigError)
        raise kind(box[1])
    return box[0]


def _error_classes() -> list[type]:
    """Every SftgoError subclass defined so far (the ones rank 0 can raise are imported on every rank)."""
    found, todo = [], [SftgoError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


def bf16_native(device) -> bool:
    """Whether `device` computes in bf16 natively: a GPU that supports it, or a CPU with AVX512-BF16 or AMX
    (oneDNN's bf16 kernels; elsewhere CPU bf16 is emulated and slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return (
        device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


def use_bf16(cfg: TrainConfig, device, *, allow_emulated: bool = False) -> bool:
    """auto: bf16 on GPUs that support it; bf16 and bf16-state: also on a CPU with native bf16 (faster than fp32
    there, see bf16_native); fp32: never.  `allow_emulated` (tests only) lets a CPU without native bf16 through."""
    if cfg.precision == "fp32":
        return False
    if cfg.precision in ("bf16", "bf16-state"):
        if not (allow_emulated or bf16_native(device)):
            raise ConfigError(
                f"--precision {cfg.precision} needs a GPU or a CPU with native bf16 (AVX512-BF16 or AMX); this "
                f"{device.type} has none: use auto or fp32."
            )
        return True
    return device.type == "cuda" and bf16_native(device)


def state_dtype(cfg: TrainConfig, device, *, allow_emulated: bool = False) -> torch.dtype:
    """The dtype of the weights, their gradients and AdamW's moments: bf16 under --precision bf16-state (no fp32
    master copy: half the memory, but an update below bf16's resolution of the weight is lost), else fp32."""
    if cfg.precision == "bf16-state" and use_bf16(cfg, device, allow_emulated=allow_emulated):
        return torch.bfloat16
    return torch.float32


def autocast_for(cfg: TrainConfig, device):
    """bf16 autocast with DDP / one process; under --fsdp the MixedPrecisionPolicy casts instead."""
    if use_bf16(cfg, device) and not cfg.fsdp:
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def barrier() -> None:
    """Wait for every rank (nothing to wait for on one process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
