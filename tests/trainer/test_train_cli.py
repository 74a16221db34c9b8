"""`sftgo-train` as a real subprocess: artifacts, resume, --help, --config, one-sentence errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sftgo.trainer.config import ConfigError, make_config, read_config_file

BIN = str(Path(sys.executable).parent / "sftgo-train")


def sftgo_train(*args, timeout=300):
    env = dict(os.environ, SFTGO_CACHE=os.environ.get("SFTGO_CACHE", "/tmp/sftgo-cache"))
    return subprocess.run([BIN, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow
def test_cli_end_to_end_artifacts_and_resume(tmp_path, shard_dir, eval_dir, tiny_model_dir):
    out = tmp_path / "run"
    common = [
        "--data",
        shard_dir,
        "--out",
        out,
        "--model",
        tiny_model_dir,
        "--eval-data",
        eval_dir,
        "--max-steps",
        6,
        "--batch-tokens",
        160,
        "--lr",
        "3e-3",
        "--eval-every",
        3,
        "--no-progress",
    ]
    first = sftgo_train(*common, "--stop-after", 3)
    assert first.returncode == 0, first.stderr
    assert (out / "checkpoints" / "step-0000003" / "model.safetensors").is_file()
    second = sftgo_train(*common, "--resume")
    assert second.returncode == 0, second.stderr
    assert "group 1" in second.stdout  # the summary table

    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    for key in (
        "loss",
        "ce",
        "worst",
        "group_loss",
        "worst_group",
        "worst_switches",
        "lam",
        "lr",
        "tokens_per_s",
        "grad_norm",
        "peak_rss_mb",
    ):
        assert key in train[-1], key
    # each step's resident-set peak is the step's own (restarted before it), and the run's peak holds them all
    summary = json.loads((out / "summary.json").read_text())
    run_peak = summary["peak_memory_mb_per_rank"][0]["train_rss_mb"]
    assert all(0 < r["peak_rss_mb"] <= run_peak for r in train[3:])
    assert [r["step"] for r in recs if r["split"] == "eval"] == [0, 3, 6]
    png = (out / "loss_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    from transformers import AutoModelForCausalLM, AutoTokenizer

    for d in (out / "model", out / "checkpoints" / "step-0000006"):
        model = AutoModelForCausalLM.from_pretrained(d)
        tok = AutoTokenizer.from_pretrained(d)
        assert model.config.num_hidden_layers == 2 and len(tok) == model.config.vocab_size


def test_help_shows_an_example():
    r = sftgo_train("--help")
    assert r.returncode == 0
    assert "Example:" in r.stdout and "sftgo-train --data" in r.stdout and "--batch-tokens" in r.stdout


def test_errors_are_one_sentence_without_traceback(tmp_path):
    r = sftgo_train("--data", tmp_path / "nope", "--out", tmp_path / "o")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "nope" in lines[0]
    assert "Traceback" not in r.stderr
    debug = sftgo_train("--data", tmp_path / "nope", "--out", tmp_path / "o", "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_bad_option_value_is_a_usage_error(tmp_path):
    r = sftgo_train("--data", tmp_path, "--out", tmp_path / "o", "--objective", "dpo")
    assert r.returncode == 2 and "dpo" in r.stderr


def test_config_file_values_are_overridden_by_flags(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('data = "shards"\nout = "run"\nlam = 0.5\nmax-steps = 7\n')
    values = read_config_file(str(toml))
    cfg = make_config(values, lam=0.2)
    assert (cfg.data, cfg.lam, cfg.max_steps) == ("shards", 0.2, 7)
    js = tmp_path / "c.json"
    js.write_text(json.dumps({"data": "d", "out": "o", "objective": "rho1"}))
    assert make_config(read_config_file(str(js))).objective == "rho1"
    js.write_text(json.dumps({"data": "d", "out": "o", "lamda": 1}))
    with pytest.raises(ConfigError, match="unknown setting"):
        read_config_file(str(js))


def test_cli_reads_config_file_and_reports_its_errors(tmp_path):
    js = tmp_path / "c.json"
    js.write_text(json.dumps({"data": str(tmp_path / "missing"), "out": str(tmp_path / "o"), "lam": 3}))
    r = sftgo_train("--config", js)
    assert r.returncode == 1 and "--lam" in r.stderr
    r = sftgo_train("--config", js, "--lam", "0.5")  # the flag fixes the file's bad value; now the data is missing
    assert r.returncode == 1 and "missing" in r.stderr
