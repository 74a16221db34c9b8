"""`sftgo-prep build` against what a hostile or careless user gives it: a build that is no longer
current, output paths that would destroy inputs or other files, settings that would be lost or
overflow, damaged staging.  Real CLI subprocesses on the session's Dask cluster."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from sftgo.core.config import load_config_file
from sftgo.pipeline.config import BuildConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def small(tmp_path):
    src = tmp_path / "a.jsonl"
    src.write_text("".join((ROOT / "data/alpaca.jsonl").read_text().splitlines(keepends=True)[:20]))
    return src


def build(cli, src, out, *extra, scheduler=None, check=False):
    args = ["sftgo-prep", "build", *([src] if not isinstance(src, list) else src), "--out", out, "--quiet", *extra]
    if scheduler:
        args += ["--scheduler", scheduler]
    return cli(*args, check=check)


def refused(proc, *words):
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w in proc.stderr, proc.stderr
    return proc


def test_a_finished_build_is_current_only_with_the_same_inputs_and_whole_shards(cli, tmp_path, small, dask_scheduler):
    out = tmp_path / "out"
    assert build(cli, small, out, scheduler=dask_scheduler).returncode == 0
    assert (out / ".build.json").is_file()
    again = build(cli, small, out, scheduler=dask_scheduler)
    assert again.returncode == 0 and "Nothing written" in again.stdout
    # the same file with other content (and the same size: the mtime tells)
    text = small.read_text()
    small.write_text(text.replace("a", "b", 1))
    os.utime(small, ns=(small.stat().st_atime_ns, small.stat().st_mtime_ns + 1_000_000))
    refused(build(cli, small, out, scheduler=dask_scheduler), "inputs changed since", "--overwrite")
    assert build(cli, small, out, "--overwrite", scheduler=dask_scheduler).returncode == 0
    (out / "shard-00000.parquet").unlink()
    refused(build(cli, small, out, scheduler=dask_scheduler), "is not whole", "missing", "--overwrite")
    # --rejects cannot be written from a finished build: said, not skipped
    assert build(cli, small, out, "--overwrite", scheduler=dask_scheduler).returncode == 0
    proc = refused(build(cli, small, out, "--rejects", tmp_path / "rej.jsonl", scheduler=dask_scheduler), "--rejects")
    assert "keeps no rejected records" in proc.stderr and not (tmp_path / "rej.jsonl").exists()


def test_rejects_may_not_replace_an_input_or_a_build_file(cli, tmp_path, small):
    before = small.read_bytes()
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(small, folder / "b.jsonl")
    cases = [
        (small, "would overwrite the input"),
        (folder / "rej.jsonl", "would overwrite the input"),
        (tmp_path / "o" / "manifest.json", "that the build in"),
        (tmp_path / "o" / "shard-00000.parquet", "that the build in"),
        (tmp_path / "o" / ".staging" / "x.jsonl", "that the build in"),
    ]
    for path, words in cases:
        refused(build(cli, [small, folder], tmp_path / "o", "--rejects", path), words)
    assert small.read_bytes() == before and not (tmp_path / "o").exists()


def test_overwrite_replaces_only_an_sftgo_build(cli, tmp_path, small, dask_scheduler):
    user = tmp_path / "user"
    user.mkdir()
    (user / "manifest.json").write_text('{"my": "project manifest"}')
    (user / "shard-2023-sales.parquet").write_text("keep")
    for extra in ([], ["--overwrite"]):
        refused(build(cli, small, user, *extra, scheduler=dask_scheduler), "sftgo-prep did not write")
    assert (user / "manifest.json").read_text() == '{"my": "project manifest"}'
    assert (user / "shard-2023-sales.parquet").read_text() == "keep"
    # a pending `score` commit of an earlier build is gone after --overwrite (it would bring that build back)
    out = tmp_path / "out"
    assert build(cli, small, out, scheduler=dask_scheduler).returncode == 0
    (out / ".scoring").mkdir()
    shutil.copy(out / "manifest.json", out / ".scoring" / "manifest.json")
    assert build(cli, small, out, "--overwrite", scheduler=dask_scheduler).returncode == 0
    assert not (out / ".scoring").exists()


def test_settings_that_would_be_lost_or_overflow_are_refused(tmp_path, small):
    with pytest.raises(ValueError, match="between 2 and 127"):
        BuildConfig(inputs=[str(small)], out="o", num_groups=300).validate()
    BuildConfig(inputs=[str(small)], out="o", num_groups=127).validate()
    with pytest.raises(ValueError, match="unknown field 'id'"):
        BuildConfig(inputs=[str(small)], out="o", field_map={"instruction": "question", "id": "uid"}).validate()
    cases = {
        "d1.json": '{"max-length": 100, "max_length": 4000}',
        "d2.json": '{"max_length": 100, "max_length": 4000}',
        "d3.yaml": "max_length: 100\nmax_length: 4000\n",
        "d4.toml": "max_length = 100\nmax-length = 4000\n",
    }
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match="twice"):
            load_config_file(str(tmp_path / name), BuildConfig)
    (tmp_path / "ok.yaml").write_text("max_length: 100\nworkers: 1\n")
    assert load_config_file(str(tmp_path / "ok.yaml"), BuildConfig) == {"max_length": 100, "workers": 1}


def test_local_model_paths_are_recorded_absolute(tmp_path, small, monkeypatch):
    (tmp_path / "mytok").mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = BuildConfig(inputs=[str(small)], out="o", tokenizer="mytok", reference_model="owner/hub-model").validate()
    assert cfg.tokenizer == str(tmp_path / "mytok") and cfg.params()["tokenizer"] == str(tmp_path / "mytok")
    assert cfg.reference_model == "owner/hub-model"  # not a local path: as given


def test_missing_models_and_ignored_split_are_said_before_any_work(cli, tmp_path, small):
    out = tmp_path / "o"
    refused(
        build(cli, small, out, "--strategy", "reference", "--reference-model", str(tmp_path / "none")),
        "--reference-model",
    )
    refused(
        build(cli, small, out, "--strategy", "semantic", "--compressor-model", str(tmp_path / "none")),
        "--compressor-model",
    )
    assert not out.exists()  # nothing staged: the corrected command starts clean


def test_split_on_local_files_and_truncation_are_said(cli, tmp_path, small, dask_scheduler):
    proc = build(cli, small, tmp_path / "o", "--split", "validation", "--max-length", "60", scheduler=dask_scheduler)
    assert proc.returncode == 0
    assert "--split validation is ignored" in proc.stderr
    truncated = json.loads((tmp_path / "o" / "manifest.json").read_text())["totals"]["truncated"]
    assert truncated > 0 and f"truncated {truncated} to --max-length 60" in proc.stdout


def test_damaged_staging_is_redone_or_refused_in_one_sentence(cli, tmp_path, small, dask_scheduler):
    ref = tmp_path / "ref"
    assert build(cli, small, ref, scheduler=dask_scheduler).returncode == 0
    # a staged partition whose record is damaged is prepared again; the result is the same build
    out = tmp_path / "out"
    assert build(cli, small, out, "--rows-per-shard", "5", scheduler=dask_scheduler).returncode == 0
    ref5 = {p.name: p.read_bytes() for p in out.glob("shard-*.parquet")}
    shutil.rmtree(out)
    from sftgo.pipeline import readers
    from sftgo.pipeline.build import _input_identity
    from sftgo.pipeline.prepare import STAGED

    cfg = BuildConfig(inputs=[str(small)], out=str(out), rows_per_shard=5).validate()
    (out / ".staging" / "0123456789abcdef").mkdir(parents=True)
    plan = readers.plan_digest(readers.plan(cfg.inputs, 5))
    key = {
        "params": cfg.params(),
        "inputs": _input_identity(cfg),
        "staged": STAGED,
        "plan": plan,
        "work": "0123456789abcdef",
    }
    (out / ".staging" / "build.json").write_text(json.dumps(key, sort_keys=True))
    (out / ".staging" / "0123456789abcdef" / "part-00000.json").write_text("{}")
    assert build(cli, small, out, "--rows-per-shard", "5", scheduler=dask_scheduler).returncode == 0
    assert {p.name: p.read_bytes() for p in out.glob("shard-*.parquet")} == ref5
    # a damaged record of the build itself: one sentence
    bad = tmp_path / "bad"
    (bad / ".staging").mkdir(parents=True)
    (bad / ".staging" / "build.json").write_text("garbage")
    refused(build(cli, small, bad, scheduler=dask_scheduler), "is damaged", "--overwrite")


def test_score_and_inspect_take_a_config_file_that_flags_override(cli, tmp_path, small, dask_scheduler):
    out = tmp_path / "o"
    assert build(cli, small, out, scheduler=dask_scheduler).returncode == 0
    (tmp_path / "score.json").write_text(
        json.dumps({"strategies": ["tfidf"], "eta": 0.4, "overwrite": True, "scheduler": dask_scheduler})
    )
    cli("sftgo-prep", "score", out, "--config", tmp_path / "score.json", "--quiet")
    assert json.loads((out / "manifest.json").read_text())["strategies"]["tfidf"]["eta"] == 0.4
    cli("sftgo-prep", "score", out, "--config", tmp_path / "score.json", "--eta", "0.2", "--quiet")
    assert json.loads((out / "manifest.json").read_text())["strategies"]["tfidf"]["eta"] == 0.2
    (tmp_path / "bad.json").write_text(json.dumps({"max_length": 100}))  # a build setting: not score's to change
    refused(
        cli("sftgo-prep", "score", out, "--config", tmp_path / "bad.json", "--strategy", "tfidf", check=False),
        "unknown setting(s): max_length",
    )
    refused(cli("sftgo-prep", "score", out, check=False), "Give the strategies")
    (tmp_path / "inspect.json").write_text(json.dumps({"sample": 3, "color": False}))
    text = cli("sftgo-prep", "inspect", out, "--config", tmp_path / "inspect.json").stdout
    assert "Sample 3 " in text and "\x1b[" not in text
    assert (
        "Sample 1 " in cli("sftgo-prep", "inspect", out, "--config", tmp_path / "inspect.json", "--sample", "1").stdout
    )
    (tmp_path / "inspect.json").write_text(json.dumps({"sample": "3"}))
    refused(cli("sftgo-prep", "inspect", out, "--config", tmp_path / "inspect.json", check=False), "must be int")


def test_staged_counts_of_a_partition_of_several_inputs_are_checked_per_input(tmp_path):
    """A partition packing several small inputs stages each input's records in / written / rejected, which
    add up to the partition's; a record that breaks any of that (or names other inputs) is not reused."""
    import copy

    from sftgo.core import models
    from sftgo.pipeline import prepare, readers

    inputs = []
    for name, lines in (("a", ['{"instruction": "Q", "output": "A"}'] * 2), ("b", ["{not json", '{"x": 1}'])):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
        inputs.append(str(tmp_path / f"{name}.jsonl"))
    cfg = BuildConfig(inputs=inputs, out=str(tmp_path / "o"), rows_per_shard=10).validate()
    [part] = readers.plan(inputs, 10)
    staging = tmp_path / "staging"
    staging.mkdir()
    counts = prepare.prepare_partition(part, cfg, cfg.strategy_objects(), models.tokenizer_dir(None), str(staging))
    assert counts["sources"] == [
        {"source": inputs[0], "records_in": 2, "written": 2, "rejected": 0},
        {"source": inputs[1], "records_in": 2, "written": 0, "rejected": 2},
    ]
    done = prepare.stage_path(str(staging), 0, "json")
    assert prepare._staged_counts(done, part) == counts

    def swap(c):
        c["sources"].reverse()

    def moved(c):  # each input still adds up, the partition does not
        c["sources"][0].update(records_in=3, written=3)

    def lost(c):
        c["sources"][1].update(rejected=1)

    def lost_in_total(c):
        c["records_in"] += 1

    def not_a_count(c):
        c["sources"][0]["written"] = 2.0

    def extra_key(c):
        c["sources"][0]["tokens"] = 1

    def none(c):
        del c["sources"]

    for damage in (swap, moved, lost, lost_in_total, not_a_count, extra_key, none):
        bad = copy.deepcopy(counts)
        damage(bad)
        done.write_text(json.dumps(bad))
        assert prepare._staged_counts(done, part) is None, damage.__name__
