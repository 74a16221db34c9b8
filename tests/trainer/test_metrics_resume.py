"""On resume, TensorBoard shows each step once, like metrics.jsonl: what the run that died logged past its
checkpoint is purged.  Read back with TensorBoard's own EventAccumulator."""

import pytest

from sftgo.trainer.metrics import MetricsLog

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def test_a_resumed_run_shows_each_step_once_in_tensorboard_and_metrics(tmp_path):
    first = MetricsLog(tmp_path, None, tensorboard=True)
    for step in range(1, 6):  # the run that died logged steps 1-5; its checkpoint is at step 2
        first.write({"step": step, "split": "train", "loss": 10.0 + step})
    first.close()
    again = MetricsLog(tmp_path, 2, tensorboard=True)
    for step in (3, 4):
        again.write({"step": step, "split": "train", "loss": 20.0 + step})
    again.close()
    acc = event_accumulator.EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 11.0), (2, 12.0), (3, 23.0), (4, 24.0)]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4
