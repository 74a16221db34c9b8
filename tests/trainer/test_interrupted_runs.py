"""sftgo-train after an interruption: a signal (Ctrl-C, SIGTERM, SIGUSR1) stops the run with a checkpoint and
--resume goes on from it; a run killed before its first checkpoint starts again (with a note) instead of being a dead
end; what an interrupted save left is cleaned up or put back; a cut-off last line
of metrics.jsonl does not block --resume; a refused --resume leaves the run's recorded settings alone."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

BIN = str(Path(sys.executable).parent / "sftgo-train")


def env():
    return dict(os.environ, SFTGO_CACHE=os.environ.get("SFTGO_CACHE", "/tmp/sftgo-cache"), OMP_NUM_THREADS="1")


def train(data, model, out, *extra, steps=2):
    args = [
        "--data",
        data,
        "--out",
        out,
        "--model",
        model,
        "--batch-tokens",
        160,
        "--max-steps",
        steps,
        "--no-progress",
        "--no-tensorboard",
        *extra,
    ]
    return subprocess.run([BIN, *map(str, args)], capture_output=True, text=True, timeout=300, env=env())


def errors(proc):
    return [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]


def start(data, model, out, *extra, tensorboard=True):
    """A long sftgo-train run in the background, returned once it has logged two records."""
    args = ["--data", data, "--out", out, "--model", model, "--batch-tokens", 160, "--max-steps", 100000]
    args += ["--no-progress", "--tensorboard" if tensorboard else "--no-tensorboard", *extra]
    proc = subprocess.Popen(
        [BIN, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env()
    )
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    return proc


@pytest.fixture(scope="module")
def finished_template(tmp_path_factory, shared_shard_dir, tiny_model_dir):
    """A finished run of 2 steps with a checkpoint at each (--save-every 1), trained once for the module."""
    out = tmp_path_factory.mktemp("finished") / "run"
    proc = train(shared_shard_dir, tiny_model_dir, out, "--save-every", 1)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


@pytest.fixture
def finished_run(finished_template, tmp_path):
    """A copy of the finished run for the test (it may change it), as if trained in the test's own folder."""
    out = tmp_path / "run"
    shutil.copytree(finished_template, out, symlinks=True)
    config = json.loads((out / "config.json").read_text())
    config.update(out=str(out))
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def test_a_run_killed_before_its_first_checkpoint_starts_again(tmp_path, shared_shard_dir, tiny_model_dir):
    out = tmp_path / "run"
    proc = start(shared_shard_dir, tiny_model_dir, out)
    proc.kill()  # SIGKILL: no handler runs, nothing is saved
    proc.communicate(timeout=120)
    assert not (out / "checkpoints" / "latest").exists()
    metrics = out / "metrics.jsonl"

    again = train(shared_shard_dir, tiny_model_dir, out, "--resume")  # --resume or not: there is nothing to resume
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"Note: {out} holds a run that stopped before its first checkpoint" in again.stderr
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == sorted(steps) and steps[0] <= 1 and steps[-1] == 2  # the first attempt's records are gone
    assert not (out / "tb").exists()  # its TensorBoard log went with them (this run writes none)

    # a finished run is never started over (it saved its checkpoint at the end)
    done = train(shared_shard_dir, tiny_model_dir, out, steps=3)
    assert errors(done) == [f"Error: {out} already holds a run; pass --resume to continue it or choose another --out."]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_stops_the_run_with_a_checkpoint_and_resume_says_where_it_goes_on(
    tmp_path, shared_shard_dir, tiny_model_dir, sig
):
    """Ctrl-C, and what Slurm and Kubernetes send before a kill: a checkpoint at the step boundary, one sentence,
    exit 128 + the signal's number; --resume then says from which step it goes on."""
    out = tmp_path / "run"
    proc = start(shared_shard_dir, tiny_model_dir, out)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, (proc.returncode, stderr[-2000:])
    name = signal.Signals(sig).name
    assert f"Note: {name} received; stopping after the current step with a checkpoint" in stderr
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert [line for line in stderr.splitlines() if line.startswith("Error: ")] == [
        f"Error: Interrupted by {name}; saved the checkpoint {latest}: continue with --resume."
    ]
    step = int(latest.split("-")[1])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records) == step  # every step it logged is in the checkpoint

    resumed = train(shared_shard_dir, tiny_model_dir, out, "--resume", "--stop-after", step + 1, steps=100000)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"Note: resuming from {latest}: training goes on from step {step}." in resumed.stderr


def test_what_an_interrupted_save_left_is_removed_or_put_back(finished_run, shared_shard_dir, tiny_model_dir):
    out = finished_run
    (out / "checkpoints" / ".tmp-step-0000009").mkdir()  # a checkpoint save killed half-way
    (out / "checkpoints" / ".tmp-step-0000009" / "model.safetensors").write_bytes(b"half")
    (out / ".tmp-model").mkdir()  # an export killed before its first rename ...
    os.rename(out / "model", out / ".old-model")  # ... and one killed between its two renames
    weights = (out / ".old-model" / "model.safetensors").read_bytes()

    refused = train(shared_shard_dir, tiny_model_dir, out, steps=3)  # not --resume: refused, but cleaned up
    assert errors(refused) == [
        f"Error: {out} already holds a run; pass --resume to continue it or choose another --out."
    ]
    assert (out / "model" / "model.safetensors").read_bytes() == weights  # the finished model is back in place
    assert not (out / ".old-model").exists() and not (out / ".tmp-model").exists()
    assert not (out / "checkpoints" / ".tmp-step-0000009").exists()

    (out / "checkpoints" / ".tmp-step-0000004").mkdir()
    (out / ".old-model").mkdir()  # beside a whole model/: the leftover of a replacement, removed
    resumed = train(shared_shard_dir, tiny_model_dir, out, "--resume", steps=3)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"Note: removed {out / 'checkpoints' / '.tmp-step-0000004'}, a save that was interrupted." in resumed.stderr
    assert (
        f"Note: removed {out / '.old-model'}, the previous model of a replacement that was interrupted."
        in resumed.stderr
    )
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-0000002", "step-0000003"]


def test_a_cut_off_last_metrics_line_does_not_block_resume(finished_run, shared_shard_dir, tiny_model_dir):
    out = finished_run
    metrics = out / "metrics.jsonl"
    whole = metrics.read_text()
    metrics.write_text(whole + '{"step": 3, "split": "tra')  # the write a kill or a full disk cut short
    resumed = train(shared_shard_dir, tiny_model_dir, out, "--resume", "--save-every", 1, steps=3)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"Note: the last line of {metrics} is not a whole record" in resumed.stderr
    records = [json.loads(line) for line in metrics.read_text().splitlines()]  # every line whole again
    assert max(r["step"] for r in records) == 3 and metrics.read_text().startswith(whole)

    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(lines[:1] + ["not json"] + lines[1:]) + "\n")  # damage inside: refused
    damaged = train(shared_shard_dir, tiny_model_dir, out, "--resume", steps=4)
    assert errors(damaged) == [
        f"Error: {metrics} line 2 is not a metrics record of sftgo-train: the file was edited "
        "or damaged; repair or remove that line to resume."
    ]


def test_a_refused_resume_leaves_the_recorded_settings(finished_run, shared_shard_dir, tiny_model_dir):
    out = finished_run
    config = (out / "config.json").read_bytes()
    state = out / "checkpoints" / "step-0000002" / "trainer_state.json"
    edited = json.loads(state.read_text())
    edited["worst_group"] = 99  # refused by the restore, after the checks of the run directory
    state.write_text(json.dumps(edited))
    refused = train(shared_shard_dir, tiny_model_dir, out, "--resume", steps=5)
    assert len(errors(refused)) == 1 and "'worst_group' = 99" in errors(refused)[0]
    assert (out / "config.json").read_bytes() == config  # still the run's own --max-steps 2


def test_a_run_is_refused_while_its_shards_are_being_written(tmp_path, shard_dir, tiny_model_dir):
    from sftgo.core.locks import exclusive

    with exclusive(Path(shard_dir), what="build"):  # a build or score at work in the shard folder
        proc = train(shard_dir, tiny_model_dir, tmp_path / "run")
    assert errors(proc) == [
        f"Error: {shard_dir} is being written by another sftgo process (pid {os.getpid()}); wait "
        "for it to finish before the training run reads it."
    ]
