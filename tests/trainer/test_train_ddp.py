"""torchrun with 2 CPU processes (gloo): disjoint data per rank, identical weights at the end."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = textwrap.dedent("""
    import json, os, sys
    from safetensors.torch import save_file
    import sftgo.trainer.batching as tb
    import sftgo.trainer.loop as tl
    from sftgo.trainer.config import TrainConfig

    rank = int(os.environ["RANK"])
    seen, nets = [], []
    collate = tb.collate
    def recording_collate(rows, *a, **k):  # which samples this rank trains on
        seen.extend(s["id"] for row in rows for s in row)
        return collate(rows, *a, **k)
    tb.collate = recording_collate

    class Capture(tl.TokenLossModel):  # keep a handle on this rank's model
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            nets.append(self)
    tl.TokenLossModel = Capture

    cfg = TrainConfig(**json.loads(sys.argv[1]))
    tl.run(cfg)
    state = {k: v.detach().clone().contiguous() for k, v in nets[0].model.state_dict().items()}
    save_file(state, os.path.join(cfg.out, f"weights-rank{rank}.safetensors"))
    json.dump(seen, open(os.path.join(cfg.out, f"ids-rank{rank}.json"), "w"))
""")


@pytest.mark.slow
def test_ddp_two_cpu_processes_read_disjoint_data_and_end_with_identical_weights(tmp_path, shard_dir, tiny_model_dir):
    script = tmp_path / "ddp_run.py"
    script.write_text(SCRIPT)
    out = tmp_path / "ddp"
    cfg = dict(
        data=str(shard_dir),
        out=str(out),
        model=tiny_model_dir,
        max_steps=3,
        batch_tokens=160,
        lr=3e-3,
        grad_accum=2,
        progress=False,
        tensorboard=False,
        shuffle_buffer=8,
        bucket_pool=2,
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", SFTGO_CACHE=os.environ.get("SFTGO_CACHE", "/tmp/sftgo-cache"))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(script),
            json.dumps(cfg),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    ids = [json.loads((out / f"ids-rank{k}.json").read_text()) for k in (0, 1)]
    assert ids[0] and ids[1]
    assert not set(ids[0]) & set(ids[1]), "the ranks trained on overlapping samples"
    w0, w1 = (load_file(str(out / f"weights-rank{k}.safetensors")) for k in (0, 1))
    start = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    saved = load_file(str(out / "model" / "model.safetensors"))
    for k in start:
        key = k if k in w0 else f"model.{k}" if f"model.{k}" in w0 else k
        assert torch.equal(w0[key], w1[key]), k
        assert torch.equal(w0[key], saved[k]), k
    assert any(not torch.equal(start[k], saved[k]) for k in start)
    # one global step = 2 ranks x 2 micro-batches; the logged token count covers both ranks
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3]
