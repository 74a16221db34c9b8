"""Several strategies in one build, `score` adding one later, and inspect comparing them -- through
the real CLI, with tiny random reference models so that it runs in seconds."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]


def test_multi_strategy_build_score_and_compare(cli, tmp_path, tiny_lm, write_jsonl, dask_scheduler):
    lines = (ROOT / "data/alpaca.jsonl").read_text().splitlines()[:40]
    src = write_jsonl(tmp_path / "a.jsonl", [json.loads(x) for x in lines])
    out = tmp_path / "shards"
    cli(
        "sftgo-prep",
        "build",
        src,
        "--out",
        out,
        "--strategy",
        "tfidf,reference",
        "--reference-model",
        tiny_lm(0),
        "--rows-per-shard",
        "20",
        "--scheduler",
        dask_scheduler,
        "--quiet",
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["params"]["strategies"] == ["tfidf", "reference"]
    assert manifest["strategies"]["reference"]["model"] == tiny_lm(0)
    table = pq.read_table(out / "shard-00000.parquet")
    assert [c for c in table.column_names if c.startswith(("importance_", "group_"))] == [
        "importance_tfidf",
        "group_tfidf",
        "importance_reference",
        "group_reference",
    ]
    row = table.slice(0, 1).to_pylist()[0]
    mask, ref = np.array(row["loss_mask"]), np.array(row["importance_reference"])
    assert (ref[mask == 0] == 0).all() and (ref[mask == 1] > 0).all()  # a random LM has positive loss everywhere

    # Rho-1 excess loss added afterwards, without re-tokenizing
    proc = cli(
        "sftgo-prep",
        "score",
        out,
        "--strategy",
        "reference",
        "--overwrite",
        "--reference-mode",
        "excess",
        "--reference-model",
        tiny_lm(0),
        "--base-model",
        tiny_lm(1),
        "--eta",
        "0.2",
        "--quiet",
        "--scheduler",
        dask_scheduler,
    )
    assert "strategies now: tfidf, reference" in proc.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["strategies"]["reference"]["mode"] == "excess" and manifest["strategies"]["reference"]["eta"] == 0.2
    after = pq.read_table(out / "shard-00000.parquet")
    assert after["importance_tfidf"].equals(table["importance_tfidf"])  # other strategies untouched
    excess = np.array(after.slice(0, 1).to_pylist()[0]["importance_reference"])
    assert (excess[mask == 1] < 0).any() and (excess[mask == 1] > 0).any()  # base - reference: both signs

    text = cli(
        "sftgo-prep", "inspect", out, "--strategy", "tfidf,reference", "--no-color", "--html", tmp_path / "c.html"
    ).stdout
    assert re.search(r"Agreement tfidf vs reference: Jaccard of the important tokens 0\.\d{3}", text)
    assert "groups by tfidf" in text and "groups by reference" in text
    page = (tmp_path / "c.html").read_text()
    assert page.count("<b>tfidf</b>") == page.count("<b>reference</b>") == 40
