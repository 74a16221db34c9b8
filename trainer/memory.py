"""Memory measurement of a training process: the resident set (CPU) and torch's allocations (GPU).

Input: the device; calls at the start of training, around every step, and at the end.
Output: `MemoryMeter.step_peak()` -> each step's own peak (`peak_rss_mb`, and `peak_cuda_mb` on a GPU)
for metrics.jsonl; `MemoryMeter.per_rank()` -> every rank's peaks for summary.json: the whole process,
and the training phase after set-up (weights, gradients, optimizer state, activations).  The benchmarks
measure other trainers with the same two primitives, `proc_status_mb` and `restart_rss_peak`.
Cost: a read of /proc/self/status and a write to /proc/self/clear_refs per call (Linux); elsewhere only the
whole-process peak (getrusage) is reported.
"""

from __future__ import annotations

import dataclasses
import resource
from pathlib import Path

import torch
import torch.distributed as dist


def proc_status_mb(field: str = "VmHWM") -> float | None:
    """A memory field of this process from Linux /proc/self/status, in MB: VmHWM, the resident-set high-water
    mark, or VmRSS, the current resident set; None where there is no such file."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def restart_rss_peak() -> bool:
    """Restart the resident set's high-water mark ("5" into /proc/self/clear_refs); False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@dataclasses.dataclass
class MemoryMeter:
    """The peaks of one process; the training phase is measured apart from set-up where the kernel allows."""

    device: torch.device
    setup_rss_mb: float | None = None
    """The resident-set peak of set-up, once the training phase is measured apart (None: it is not)."""
    setup_cuda_mb: float = 0.0
    """torch's peak GPU allocation during set-up."""
    train_start_rss_mb: float | None = None
    """The resident set when training starts."""
    train_rss_mb: float = 0.0
    """The training phase's resident-set peak so far (the kernel's peak is restarted every step)."""
    train_cuda_mb: float = 0.0
    """The same of torch's GPU allocation."""

    def start_training(self) -> None:
        """Keep set-up's peaks, then restart them so that the peaks read later cover the training phase alone."""
        if self.device.type == "cuda":
            self.setup_cuda_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
            torch.cuda.reset_peak_memory_stats(self.device)
        before = proc_status_mb()
        if restart_rss_peak():
            self.setup_rss_mb, self.train_start_rss_mb = before, proc_status_mb("VmRSS")

    def step_peak(self, restart: bool) -> dict:
        """The peak since it was last restarted, folded into the training phase's peak, then restarted when
        `restart`: called before a step (what came between two steps, an eval or a save, stays out of the step's
        figure but not out of the run's) and after it.  Returns the step's metrics: `peak_rss_mb` (where the
        kernel lets the peak be restarted) and, on a GPU, `peak_cuda_mb`."""
        out = {}
        if self.setup_rss_mb is not None:
            hwm = proc_status_mb()
            if hwm is not None:
                self.train_rss_mb = max(self.train_rss_mb, hwm)
                out["peak_rss_mb"] = hwm
            if restart:
                restart_rss_peak()
        if self.device.type == "cuda":
            out["peak_cuda_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
            self.train_cuda_mb = max(self.train_cuda_mb, out["peak_cuda_mb"])
            if restart:
                torch.cuda.reset_peak_memory_stats(self.device)
        return out

    def per_rank(self, rank: int, world: int) -> list[dict]:
        """Every rank's peaks: the whole process's resident set (`rss_mb`), the training phase's
        (`train_rss_mb`, None where it could not be measured apart; `train_start_rss_mb`, what it started
        from) and on a GPU torch's most allocated (`cuda_mb`, `train_cuda_mb`).  Collective under torchrun."""
        self.step_peak(restart=False)  # what came after the last step (the final eval and export)
        whole = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        train = self.train_rss_mb if self.setup_rss_mb is not None else None
        mine = {
            "rank": rank,
            "rss_mb": max(whole, self.setup_rss_mb or 0.0, train or 0.0),
            "train_rss_mb": train,
            "train_start_rss_mb": self.train_start_rss_mb,
        }
        if self.device.type == "cuda":
            mine["train_cuda_mb"] = self.train_cuda_mb
            mine["cuda_mb"] = max(self.train_cuda_mb, self.setup_cuda_mb)
        if world == 1:
            return [mine]
        every: list = [None] * world
        dist.all_gather_object(every, mine)  # our own small dicts of numbers
        return every
