"""Per-step memory peaks (trainer.memory.MemoryMeter.step_peak): the kernel's high-water mark is restarted before each
step, so a step's figure leaves out what came before it, while the run's peak keeps everything."""

import numpy as np
import pytest
import torch

from sftgo.trainer.memory import MemoryMeter, proc_status_mb, restart_rss_peak

pytestmark = pytest.mark.skipif(
    not restart_rss_peak(), reason="the kernel does not let /proc/self/clear_refs restart the peak"
)


def test_a_step_peak_leaves_out_what_came_before_it_and_the_run_peak_keeps_it():
    r = MemoryMeter(torch.device("cpu"), setup_rss_mb=1.0)
    r.step_peak(restart=True)
    big = np.ones(400 * 2**20 // 8)  # 400 MB touched: an eval or a save between two steps
    high = proc_status_mb("VmRSS")
    del big
    before = r.step_peak(restart=True)  # the start of the next step
    assert before["peak_rss_mb"] >= high - 5  # (the kernel's counters lag by a few pages)
    small = np.ones(10 * 2**20 // 8)  # the step itself
    del small
    step = r.step_peak(restart=False)["peak_rss_mb"]
    assert step < high - 300  # the 400 MB before the step are not the step's
    assert r.train_rss_mb >= high - 5  # but they are the run's


def test_no_figure_where_the_peak_cannot_be_measured_apart():
    r = MemoryMeter(torch.device("cpu"), setup_rss_mb=None)
    assert r.step_peak(restart=True) == {}
