"""A non-finite loss or gradient norm stops training at that step with one sentence and a non-zero exit; no model is
exported and the last good checkpoint is kept (sftgo-train and SFTGOTrainer alike); --skip-nonfinite N skips up to
N such steps instead, counted in the metrics, the summary and the checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sftgo.core.errors import TrainingError
from sftgo.trainer.config import TrainConfig
from sftgo.trainer.loop import run
from sftgo.trainer.resume import CheckpointState

BIN = str(Path(sys.executable).parent / "sftgo-train")


def test_a_diverging_run_stops_at_the_first_nan_step_keeping_the_last_good_checkpoint(
    tmp_path, shared_shard_dir, tiny_model_dir
):
    out = tmp_path / "run"
    args = ["--data", shared_shard_dir, "--out", out, "--model", tiny_model_dir, "--batch-tokens", 160]
    args += ["--max-steps", 6, "--lr", "1e10", "--save-every", 1, "--no-progress", "--no-tensorboard"]
    proc = subprocess.run([BIN, *map(str, args)], capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert proc.returncode == 1, proc.stderr[-2000:]
    said = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert len(said) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    good = [
        r["step"] for r in records if r["split"] == "train" and r["loss"] is not None and r["grad_norm"] is not None
    ]
    bad = good[-1] + 1  # the first step whose loss or gradient norm is not finite
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert said[0].startswith(f"Error: Step {bad} has a loss of ")
    assert (
        f"not finite, so training stops here: no model is exported and the last good checkpoint, {latest}, " in said[0]
    )
    assert int(latest.split("-")[1]) == bad - 1  # nothing of the bad step was saved
    assert not (out / "model").exists() and not (out / "summary.json").exists()
    state = CheckpointState.read(out / "checkpoints" / latest)
    assert state.step == bad - 1 and state.nonfinite_skipped == 0


def diverging(data, out, model, steps: int, skip: int) -> TrainConfig:
    """A run whose learning rate makes the weights blow up after its first step."""
    return TrainConfig(
        data=str(data),
        out=str(out),
        model=model,
        max_steps=steps,
        batch_tokens=160,
        lr=1e10,
        progress=False,
        tensorboard=False,
        skip_nonfinite=skip,
    )


def test_skip_nonfinite_skips_counts_and_reports(tmp_path, shared_shard_dir, tiny_model_dir):
    out = tmp_path / "run"
    summary = run(diverging(shared_shard_dir, out, tiny_model_dir, 5, 100))
    records = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]
    skipped = [r["step"] for r in records if r["skipped_nonfinite"]]
    assert skipped and summary["nonfinite_skipped"] == len(skipped) == records[-1]["nonfinite_skipped"]
    assert f"steps skipped for a non-finite loss or gradient: {len(skipped)}" in summary["table"]
    assert CheckpointState.read(out / "checkpoints" / "step-0000005").nonfinite_skipped == len(skipped)


def test_skip_nonfinite_allows_only_n(tmp_path, shared_shard_dir, tiny_model_dir):
    with pytest.raises(TrainingError, match=r"not finite \(after 1 skipped\), so training stops here"):
        run(diverging(shared_shard_dir, tmp_path / "run", tiny_model_dir, 6, 1))


def test_sftgotrainer_stops_on_a_nan_loss(tmp_path, shared_shard_dir, tiny_model_dir):
    from transformers import AutoModelForCausalLM, TrainingArguments

    from sftgo.trainer.hf import SFTGOCollator, SFTGOTrainer, load_shards

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.get_output_embeddings().weight.fill_(float("nan"))  # every logit NaN: the first loss is NaN
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"),
        max_steps=2,
        per_device_train_batch_size=2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = SFTGOTrainer(
        model=model,
        args=args,
        train_dataset=load_shards(str(shared_shard_dir)),
        data_collator=SFTGOCollator(0, groups="tfidf"),
    )
    with pytest.raises(TrainingError, match=r"^Step 1 has a loss of nan, not finite, so training stops here"):
        trainer.train()
