"""--compile: each decoder layer compiled with torch.compile, as torchtitan and torchtune do.

Input: the model (under --fsdp after fully_shard of every layer, before DDP wraps it: torchtitan's order), the
run's --compile setting (None: on for CUDA, off on a CPU) and the device.  The backend is inductor, or the
SFTGO_COMPILE_BACKEND environment variable's (e.g. aot_eager, which tests use on a CPU).
Output: the same model, each decoder layer compiled in place (nn.Module.compile); the embedding, the loss and
the optimizer stay eager.  `CompileClock` says how much of a step's time was compilation.
Cost: the first step compiles one layer graph (the layers share it) and each layer's backward; later steps
run the compiled kernels.  Shapes: the layers are compiled with dynamic=True, so the batch's rows and length
are symbolic from the first step and the varying lengths of bucketed or packed batches reuse that one graph
(no rounding of lengths; a batch of one row may compile a second, specialised graph once).
"""

from __future__ import annotations

import os

import torch
from torch import nn

BACKEND_ENV = "SFTGO_COMPILE_BACKEND"


def resolve(cfg, device: torch.device) -> tuple[bool, str | None]:
    """Whether to compile, and a note when the default (on for CUDA) is not followed.  An explicit --compile
    with what it does not support was refused by TrainConfig.validate."""
    if cfg.compile is False or (cfg.compile is None and device.type != "cuda"):
        return False, None
    blocker = "--grad-checkpointing" if cfg.grad_checkpointing else "--lora-r" if cfg.lora_r > 0 else None
    if blocker is not None:
        return (
            False,
            f"Note: the decoder layers are not compiled (the CUDA default): --compile does not support {blocker}.",
        )
    return True, None


def compile_layers(layers: list[nn.Module], backend: str | None = None) -> str:
    """Compile each layer in place (dynamic shapes); returns the backend used."""
    backend = backend or os.environ.get(BACKEND_ENV) or "inductor"
    for layer in layers:
        layer.compile(backend=backend, dynamic=True)
    return backend


class CompileClock:
    """Seconds torch.compile spent, read between steps: `since()` is the compile time since the last call
    (0 when nothing compiled), so a step's time can be reported apart from its compilation."""

    def __init__(self) -> None:
        self._seen = self._total()

    @staticmethod
    def _total() -> float:
        from torch._dynamo.utils import compilation_time_metrics

        return float(sum(compilation_time_metrics.get("_compile.compile_inner", ())))

    def since(self) -> float:
        now = self._total()
        spent, self._seen = now - self._seen, now
        return spent
