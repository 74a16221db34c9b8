"""Logging where users look (issue 11.5) and LoRA adapters on their own (issue 11.6):
--report-to tensorboard,wandb,mlflow writes to each (W&B offline, MLflow to a local store), a
tracker that is not installed is an error before training, and --save-adapter writes the peft
adapter beside the merged model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from sftgo.trainer.config import ConfigError
from sftgo.trainer.loop import run
from tests.trainer.tiny import tiny_config

ROOT = Path(__file__).resolve().parents[2]


cfg = tiny_config  # a short run on the tiny model


def test_every_tracker_receives_the_metrics(tmp_path, shard_dir, tiny_model_dir, monkeypatch):
    for package in ("tensorboard", "wandb", "mlflow"):
        pytest.importorskip(package)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    out = tmp_path / "run"
    run(cfg(shard_dir, out, tiny_model_dir, tensorboard=None, report_to=["tensorboard", "wandb", "mlflow"]))
    # TensorBoard: event files with the per-group losses
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "train/group_0_loss", "train/group_1_loss"} <= set(tags)
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]
    # W&B: an offline run under RUN_DIR/wandb
    assert list((out / "wandb").glob("offline-run-*/files")) or list((out / "wandb").glob("offline-run-*"))
    # MLflow: a local store under RUN_DIR/mlruns with the metric history
    import mlflow

    mlflow.set_tracking_uri((out / "mlruns").resolve().as_uri())
    runs = mlflow.search_runs(search_all_experiments=True)
    assert len(runs) == 1
    history = mlflow.MlflowClient().get_metric_history(runs.iloc[0]["run_id"], "train.group_1_loss")
    assert [m.step for m in history] == [1, 2]


def test_unknown_or_missing_tracker_is_one_sentence(tmp_path, shard_dir, tiny_model_dir):
    with pytest.raises(ConfigError, match="'neptune' is not a tracker sftgo knows"):
        run(cfg(shard_dir, tmp_path / "a", tiny_model_dir, report_to=["neptune"]))
    # the package blocked from import, as on a machine without it
    code = (
        "import sys; sys.modules['mlflow'] = None; from sftgo.trainer.cli import main; "
        f"main(['--data', {str(shard_dir)!r}, '--out', {str(tmp_path / 'b')!r}, '--model', {tiny_model_dir!r}, "
        "'--max-steps', '1', '--report-to', 'mlflow', '--no-progress'])"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, SFTGO_CACHE=os.environ.get("SFTGO_CACHE", "/tmp/sftgo-cache")),
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        "Error: --report-to mlflow needs the mlflow package: pip install 'sftgo[mlflow]' (or pip install mlflow)."
    )
    assert not (tmp_path / "b" / "metrics.jsonl").exists()


def test_save_adapter_writes_the_adapter_beside_the_merged_model(tmp_path, shard_dir, tiny_model_dir):
    peft = pytest.importorskip("peft")
    out = tmp_path / "lora"
    run(cfg(shard_dir, out, tiny_model_dir, lora_r=4, lr=1e-2, save_adapter=True))
    assert (out / "adapter" / "adapter_config.json").is_file()
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert adapter and all("lora" in k for k in adapter)
    merged = load_file(str(out / "model" / "model.safetensors"))
    assert not any("lora" in k for k in merged)
    # base + adapter, merged, equals the shipped merged model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    again = peft.PeftModel.from_pretrained(base, out / "adapter").merge_and_unload()
    for key, value in again.state_dict().items():
        if key in merged:
            assert (value - merged[key]).abs().max() < 1e-6, key
    with pytest.raises(ConfigError, match="--save-adapter needs --lora-r"):
        cfg(shard_dir, tmp_path / "x", tiny_model_dir, save_adapter=True).validate()
