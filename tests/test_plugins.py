"""Plug-ins from an installed package: examples/plugin (the `toklen` strategy and the `focal` objective, declared as
entry points) is installed with pip, then used from the CLIs as a user would: `sftgo-prep build --strategy toklen` on a
local Dask cluster (its worker processes load the strategy from the package) and `sftgo-train --objective focal
--groups toklen`.  The package goes into a folder of its own put on PYTHONPATH rather than into the shared venv, so
the rest of the suite never sees it; entry points are found the same way (the package's .dist-info on sys.path)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from sftgo.core import plugins
from sftgo.trainer.registry import LossInput

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """A folder holding the installed example package (built from a copy: the source tree stays clean)."""
    src = tmp_path_factory.mktemp("src") / "plugin"
    shutil.copytree(ROOT / "examples" / "plugin", src)
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(target),
            str(src),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert list(target.glob("sftgo_example_plugins-*.dist-info/entry_points.txt"))
    return target


def run(site: Path, command: str, *args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(site), PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [str(BIN / command), *map(str, args)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_an_installed_packages_strategy_and_objective_work_from_the_clis(site, tmp_path, tiny_lm):
    shards, runs = tmp_path / "shards", tmp_path / "run"
    assert "focal" in run(site, "sftgo-train", "--help").stdout
    run(
        site,
        "sftgo-prep",
        "build",
        "data/alpaca.jsonl",
        "--out",
        shards,
        "--strategy",
        "tfidf,toklen",
        "--workers",
        "2",
        "--quiet",
    )
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["strategies"]["toklen"]["unit"] == "characters"
    table = pq.read_table(shards / manifest["shards"][0]["path"]).to_pylist()
    for row in table:  # a supervised token's importance is its length in characters (whole, >= 1); 0 elsewhere
        for m, score, group in zip(row["loss_mask"], row["importance_toklen"], row["group_toklen"]):
            assert (score >= 1 and score == int(score) and group in (0, 1)) if m else (score == 0 and group == -1)

    run(
        site,
        "sftgo-train",
        "--data",
        shards,
        "--out",
        runs,
        "--model",
        tiny_lm(0),
        "--objective",
        "focal",
        "--groups",
        "toklen",
        "--max-steps",
        "2",
        "--batch-tokens",
        "512",
        "--no-progress",
        "--no-tensorboard",
    )
    records = [json.loads(line) for line in (runs / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    for r in train:  # the focal weight (1 - p)^2 is below 1: the loss is below the CE it weights
        assert 0 < r["loss"] < r["ce"] and len(r["group_loss"]) == 2
    assert (runs / "model" / "config.json").exists()


def test_the_focal_objective_equals_a_loop(site, monkeypatch):
    """In-process, through the registry's entry-point lookup: the plug-in's loss against a loop-written one."""
    monkeypatch.syspath_prepend(str(site))
    plugins._entry_points.cache_clear()
    from sftgo.trainer import registry
    from sftgo.trainer.step import Counts, Objective

    try:
        assert "focal" in registry.names()
        focal = registry.get("focal")
        ce = torch.tensor([0.1, 2.0, 0.7, 3.5], dtype=torch.float64)
        groups = torch.tensor([0, 1, 1, 0])
        counts = Counts(10.0, 2.0, torch.tensor([6.0, 4.0]), 12, 0, 0, 0)  # the step has more tokens than this call
        parts = focal.train_loss(LossInput(ce, groups, torch.tensor([0, 0, 1, 1]), counts, 0.9, Objective("focal", 2)))
        want = sum((1 - torch.exp(-c).item()) ** 2 * c.item() for c in ce) / 10.0
        assert parts.loss.item() == pytest.approx(want, rel=1e-12)
        assert focal.eval_loss(1.5, 2.0, [1.0, 2.0], 0.9) == 1.5
    finally:
        registry.REGISTRY.loaded.pop("focal", None)
        plugins._entry_points.cache_clear()


def test_a_broken_or_misshapen_plugin_is_one_sentence(tmp_path, monkeypatch):
    """An entry point that fails to import, or names an object that is not an objective, is refused naming it."""
    pkg = tmp_path / "broken_plugins"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("NOT_AN_OBJECTIVE = object()\n")
    info = tmp_path / "broken_plugins-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugins\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[sftgo.objectives]\nmissing = broken_plugins.nowhere:X\nshapeless = broken_plugins:NOT_AN_OBJECTIVE\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins._entry_points.cache_clear()
    from sftgo.trainer import registry

    try:
        with pytest.raises(
            plugins.PluginError,
            match=r"The objective 'missing' \(entry point broken_plugins.nowhere:X "
            r"of broken-plugins\) failed to load: ModuleNotFoundError",
        ):
            registry.get("missing")
        with pytest.raises(plugins.PluginShapeError, match="does not implement the objective protocol"):
            registry.get("shapeless")
    finally:
        plugins._entry_points.cache_clear()
