"""FSDP2 on 2 CPU processes (gloo) under torchrun, and the launchers (issue 11.1, 11.2):
- FSDP follows DDP's loss trajectory on the same data (the sharding changes no maths);
- a run stopped after 2 steps and resumed from its sharded (torch.distributed.checkpoint)
  checkpoint ends with the same weights as a straight run;
- the consolidated final model loads with transformers;
- `accelerate launch -m sftgo.trainer.cli` gives 2 ranks reading disjoint data, like torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, OMP_NUM_THREADS="1", SFTGO_CACHE=os.environ.get("SFTGO_CACHE", "/tmp/sftgo-cache"))


def _train(launcher: list[str], args: dict, timeout: int = 400) -> subprocess.CompletedProcess:
    flags = []
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        flags += [flag] if value is True else [flag, str(value)]
    proc = subprocess.run(
        [*launcher, "-m", "sftgo.trainer.cli", *flags, "--no-progress", "--no-tensorboard"],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _losses(out: Path) -> list[float]:
    return [
        r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"
    ]


@pytest.fixture(scope="module")
def base(shared_shard_dir, tiny_model_dir):
    return dict(
        data=shared_shard_dir,
        model=tiny_model_dir,
        max_steps=4,
        batch_tokens=160,
        lr=3e-3,
        grad_accum=2,
        shuffle_buffer=8,
        bucket_pool=2,
        ce_chunk=64,
    )


@pytest.fixture(scope="module")
def straight(tmp_path_factory, base) -> Path:
    """The 4-step runs the tests compare against, trained once for the module: root/ddp and root/fsdp."""
    root = tmp_path_factory.mktemp("fsdp-runs")
    _train(TORCHRUN, {**base, "out": root / "ddp"})
    _train(TORCHRUN, {**base, "out": root / "fsdp", "fsdp": True})
    return root


@pytest.mark.slow
def test_fsdp_follows_ddp_and_its_model_loads(straight):
    ddp, sharded = _losses(straight / "ddp"), _losses(straight / "fsdp")
    assert len(ddp) == len(sharded) == 4
    assert sharded == pytest.approx(ddp, rel=1e-4, abs=1e-5)
    assert sharded[-1] < sharded[0]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(straight / "fsdp" / "model")
    a, b = (
        load_file(str(straight / "ddp" / "model" / "model.safetensors")),
        load_file(str(straight / "fsdp" / "model" / "model.safetensors")),
    )
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=1e-4, msg=key)
    assert model.config.use_cache is True
    ckpt = straight / "fsdp" / "checkpoints" / "step-0000004"
    assert (ckpt / "sharded" / ".metadata").exists() and not (ckpt / "model.safetensors").exists()
    summary = json.loads((straight / "fsdp" / "summary.json").read_text())
    peaks = summary["peak_memory_mb_per_rank"]
    assert [m["rank"] for m in peaks] == [0, 1]
    # the training phase is measured apart from set-up (Linux clear_refs): a positive part of the whole
    assert all(0 < m["train_rss_mb"] <= m["rss_mb"] for m in peaks)
    # training on a CPU fixes glibc's mmap threshold (trainer.hostmem) on every rank, FSDP and DDP alike
    for run in ("fsdp", "ddp"):
        said = json.loads((straight / run / "summary.json").read_text())["host_malloc"]
        assert said["mmap_threshold_bytes"] == int(os.environ.get("MALLOC_MMAP_THRESHOLD_", 1 << 20))


@pytest.mark.slow
def test_fsdp_stop_and_resume_gives_the_straight_runs_weights(tmp_path, base, straight):
    _train(TORCHRUN, {**base, "out": tmp_path / "resumed", "fsdp": True, "stop_after": 2})
    assert len(_losses(tmp_path / "resumed")) == 2
    _train(TORCHRUN, {**base, "out": tmp_path / "resumed", "fsdp": True, "resume": True})
    assert _losses(tmp_path / "resumed") == _losses(straight / "fsdp")
    a = load_file(str(straight / "fsdp" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model" / "model.safetensors"))
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_accelerate_launch_gives_two_ranks_on_disjoint_data(tmp_path, base, straight):
    accelerate = [
        str(Path(sys.executable).parent / "accelerate"),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
    ]
    proc = _train(accelerate, {**base, "out": tmp_path / "acc"})
    assert "2 processes" in proc.stderr
    # the same 2-rank run whichever launcher started it
    assert _losses(tmp_path / "acc") == _losses(straight / "ddp")
