"""What machine this is, for reports (bench results, experiment results).

Input: Linux /proc/cpuinfo where it exists, else the platform module.
Output: `cpu_model()`, the CPU's model name as a string ("AMD EPYC", "Intel(R) Xeon(R) ...").
Cost: one read of a small file.
"""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name: /proc/cpuinfo's "model name" on Linux, else what the platform module says."""
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    return next(
        (line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
        platform.processor() or platform.machine(),
    )
