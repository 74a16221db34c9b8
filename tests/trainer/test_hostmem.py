"""trainer.hostmem: with glibc's threshold fixed, freed large blocks go back to the kernel;
with glibc's default (dynamic threshold), the same frees stay in the process."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from sftgo.trainer import hostmem

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's allocator on Linux"
)

SCRIPT = """
import sys, torch
from sftgo.trainer import hostmem
def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS:")) / 1024
if sys.argv[1] == "apply":
    print(hostmem.apply(True), file=sys.stderr)
torch.empty(4 << 20, dtype=torch.uint8).fill_(1)  # mmapped, then freed: glibc raises its threshold above 4 MB
before = rss()
blocks = [torch.empty(4 << 20, dtype=torch.uint8).fill_(1) for _ in range(32)]  # 128 MB
pin = torch.empty(256 << 10, dtype=torch.uint8)  # a block after them (below the threshold) keeps the heap top in use
del blocks
print(rss() - before)
"""


def retained_mb(mode: str) -> float:
    # glibc's defaults: any MALLOC_*_ variable (Dask's nanny sets MALLOC_TRIM_THRESHOLD_ in the process that starts a
    # LocalCluster, which earlier tests do) or malloc tunable turns its dynamic threshold off
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, env=env, check=True)
    return float(proc.stdout.strip())


def test_fixed_threshold_returns_freed_blocks_that_the_default_keeps():
    assert retained_mb("default") > 64  # the 128 MB freed stay resident under glibc's dynamic threshold
    assert retained_mb("apply") < 16


def test_apply_says_what_it_did(monkeypatch):
    monkeypatch.delenv(hostmem.ENV, raising=False)
    assert hostmem.apply(False)["mmap_threshold_bytes"] is None
    assert hostmem.apply(True) == {"mmap_threshold_bytes": hostmem.THRESHOLD, "set_by": "sftgo-train (mallopt)"}
    monkeypatch.setenv(hostmem.ENV, "65536")  # the user's own setting wins and is reported
    assert hostmem.apply(True)["mmap_threshold_bytes"] == 65536
