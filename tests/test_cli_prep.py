"""End to end: `sftgo-prep` as a user runs it, in a real subprocess."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_help_shows_examples(cli):
    for args in (["--help"], ["build", "--help"], ["inspect", "--help"]):
        out = cli("sftgo-prep", *args).stdout
        assert "sftgo-prep" in out
    assert "Example:" in cli("sftgo-prep", "build", "--help").stdout
    assert "Example:" in cli("sftgo-prep", "inspect", "--help").stdout


def test_build_then_inspect(cli, tmp_path):
    out = tmp_path / "shards"
    proc = cli(
        "sftgo-prep",
        "build",
        ROOT / "data/alpaca.jsonl",
        ROOT / "data/chat.jsonl",
        "--out",
        out,
        "--workers",
        "2",
        "--rows-per-shard",
        "250",
        "--rejects",
        tmp_path / "rej.jsonl",
    )
    assert re.search(r"Wrote 600 records \(\d+ tokens, \d+ supervised\) in 4 shard\(s\)", proc.stdout)
    assert "score+write" in proc.stderr  # progress bar
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["totals"]["records_written"] == 600
    html = tmp_path / "report.html"
    text = cli("sftgo-prep", "inspect", out, "--sample", "7", "--html", html, "--samples", "20", "--no-color").stdout
    assert "Records:      600 written of 600 read" in text
    assert re.search(r"Groups \[tfidf\].*group 0: \d+\.\d%, group 1: \d+\.\d%", text)
    assert "Sample length (tokens):" in text and "[[" in text  # important tokens marked in plain text
    page = html.read_text()
    assert page.count("<div class='s'>") == 20 and "group 1, score" in page
    coloured = cli("sftgo-prep", "inspect", out, "--color").stdout
    assert "\x1b[1;30;43m" in coloured


def test_config_file_and_flag_override(cli, tmp_path, dask_scheduler):
    cfg = tmp_path / "prep.json"
    cfg.write_text(
        json.dumps(
            {"inputs": [str(ROOT / "data/alpaca.jsonl")], "eta": 0.5, "max_length": 128, "scheduler": dask_scheduler}
        )
    )
    cli("sftgo-prep", "build", "--config", cfg, "--out", tmp_path / "a", "--quiet")
    params = json.loads((tmp_path / "a/manifest.json").read_text())["params"]
    assert params["eta"] == 0.5 and params["max_length"] == 128
    cli("sftgo-prep", "build", "--config", cfg, "--out", tmp_path / "b", "--eta", "0.2", "--quiet")
    params = json.loads((tmp_path / "b/manifest.json").read_text())["params"]
    assert params["eta"] == 0.2 and params["max_length"] == 128


def test_errors_are_one_sentence(cli, tmp_path):
    cases = [
        (["build", tmp_path / "nope.jsonl", "--out", tmp_path / "o"], "does not exist"),
        (
            ["build", ROOT / "data/alpaca.jsonl", "--out", tmp_path / "o", "--eta", "1.5"],
            "--eta must be between 0 and 1",
        ),
        (["build", ROOT / "data/alpaca.jsonl"], "output directory with --out"),
        (
            ["build", ROOT / "data/alpaca.jsonl", "--out", tmp_path / "o", "--tokenizer", "./no/such/dir"],
            "is not a local directory",
        ),
        (["inspect", tmp_path], "has no manifest.json"),
    ]
    for args, message in cases:
        proc = cli("sftgo-prep", *args, check=False)
        assert proc.returncode == 1, proc.stderr
        assert message in proc.stderr and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    proc = cli("sftgo-prep", "inspect", tmp_path, "--debug", check=False)
    assert "Traceback" in proc.stderr
