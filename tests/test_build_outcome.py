"""Issue 10 items 2, 5, 8, 10, 11, 13: a build that does not do its job does not exit 0, config
values keep their types, manifest paths stay inside the build directory, Dask stays quiet, and
a kill between the manifest and the clean-up resumes with the same command (all real CLI runs)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys

import pyarrow.parquet as pq
import pytest


def _shared():
    """tests/conftest.py's helpers (cli, write_jsonl) by path: `from conftest import` would find whichever
    conftest.py pytest put first on sys.path (tests/trainer has one too)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("sftgo_tests_shared", Path(__file__).with_name("conftest.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cli, write_jsonl = _shared().cli, _shared().write_jsonl


def _qa_csv(path, n=20):
    path.write_text("question,answer\n" + "".join(f"What is {i} + {i}?,{2 * i}\n" for i in range(n)))
    return path


def test_zero_records_fails_with_the_fix(tmp_path, dask_scheduler):
    src = _qa_csv(tmp_path / "qa.csv")
    proc = cli(
        "sftgo-prep", "build", src, "--out", tmp_path / "out", "--quiet", "--scheduler", dask_scheduler, check=False
    )
    assert proc.returncode == 1
    err = proc.stderr.strip()
    assert err.count("\n") == 0, err
    assert "Wrote 0 records: 20 of 20 record(s) were rejected as unknown_format" in err
    assert "--field-map instruction=question,output=answer" in err and "question, answer" in err
    assert not (tmp_path / "out" / "manifest.json").exists()
    # the hinted fix works, with the same --out (nothing half-finished is left in the way)
    cli(
        "sftgo-prep",
        "build",
        src,
        "--out",
        tmp_path / "out",
        "--quiet",
        "--scheduler",
        dask_scheduler,
        "--field-map",
        "instruction=question,output=answer",
    )
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["totals"]["records_written"] == 20


def test_field_map_naming_no_field_is_an_error(tmp_path, dask_scheduler):
    src = _qa_csv(tmp_path / "qa.csv")
    proc = cli(
        "sftgo-prep",
        "build",
        src,
        "--out",
        tmp_path / "out",
        "--quiet",
        "--scheduler",
        dask_scheduler,
        "--field-map",
        "instruction=question,output=anwser",
        check=False,
    )
    assert proc.returncode == 1
    assert "anwser" in proc.stderr and "no record has a field" in proc.stderr


def test_rejections_dominating_warn_with_the_reason(tmp_path, dask_scheduler):
    good = [{"instruction": f"Say {i}.", "output": f"It is {i}."} for i in range(3)]
    bad = [{"question": f"q{i}", "answer": "a"} for i in range(7)]
    src = write_jsonl(tmp_path / "mix.jsonl", good + bad)
    proc = cli("sftgo-prep", "build", src, "--out", tmp_path / "out", "--scheduler", dask_scheduler)
    assert "Warning: most records were rejected: 7 of 10 record(s) were rejected as unknown_format" in proc.stderr


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"trust_remote_code": "false"}', "Setting 'trust_remote_code' must be bool, not str \"false\"."),
        ('{"eta": "0.3"}', "Setting 'eta' must be float, not str \"0.3\"."),
        ('{"field_map": "a=b"}', "Setting 'field_map' must be dict"),
        ('{"strategies": "tfidf"}', "Setting 'strategies' must be list"),
        ('{"max_length": true}', "Setting 'max_length' must be int, not bool true."),
    ],
)
def test_config_values_keep_their_types(tmp_path, text, message):
    config = tmp_path / "c.json"
    config.write_text(text)
    proc = cli("sftgo-prep", "build", "data/alpaca.jsonl", "--out", tmp_path / "out", "--config", config, check=False)
    assert proc.returncode == 1
    assert proc.stderr.startswith("Error: " + message), proc.stderr
    assert "Traceback" not in proc.stderr


def test_yaml_and_toml_configs(tmp_path, dask_scheduler):
    (tmp_path / "c.yaml").write_text("eta: 0.25\nstrategies: [tfidf]\nrows-per-shard: 200\ntrust_remote_code: false\n")
    cli(
        "sftgo-prep",
        "build",
        "data/alpaca.jsonl",
        "--out",
        tmp_path / "y",
        "--config",
        tmp_path / "c.yaml",
        "--quiet",
        "--scheduler",
        dask_scheduler,
    )
    params = json.loads((tmp_path / "y" / "manifest.json").read_text())["params"]
    assert params["eta"] == 0.25 and params["rows_per_shard"] == 200
    (tmp_path / "c.yaml").write_text("trust_remote_code: 'no'\n")
    proc = cli(
        "sftgo-prep",
        "build",
        "data/alpaca.jsonl",
        "--out",
        tmp_path / "z",
        "--config",
        tmp_path / "c.yaml",
        check=False,
    )
    assert proc.returncode == 1 and "'trust_remote_code' must be bool" in proc.stderr


@pytest.fixture(scope="module")
def built(tmp_path_factory, dask_scheduler):
    out = tmp_path_factory.mktemp("built") / "shards"
    cli(
        "sftgo-prep",
        "build",
        "data/alpaca.jsonl",
        "--out",
        out,
        "--quiet",
        "--rows-per-shard",
        "150",
        "--scheduler",
        dask_scheduler,
    )
    return out


@pytest.mark.parametrize(
    "bad", ["../outside/shard-00000.parquet", "/tmp/shard-00000.parquet", "sub/shard-00000.parquet", "link.parquet"]
)
def test_manifest_paths_cannot_leave_the_build(built, tmp_path, bad):
    out = tmp_path / "shards"
    shutil.copytree(built, out)
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(out / "shard-00000.parquet", outside / "shard-00000.parquet")
    (out / "link.parquet").symlink_to(outside / "shard-00000.parquet")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"][0]["path"] = bad
    (out / "manifest.json").write_text(json.dumps(manifest))
    before = (outside / "shard-00000.parquet").read_bytes()
    for command in (
        ["sftgo-prep", "score", out, "--strategy", "tfidf", "--overwrite", "--quiet"],
        ["sftgo-prep", "inspect", out, "--no-color"],
        ["sftgo-train", "--data", out, "--out", tmp_path / "run", "--max-steps", "1", "--no-progress"],
    ):
        proc = cli(*command, check=False)
        assert proc.returncode == 1, (command, proc.stdout, proc.stderr)
        assert "Error:" in proc.stderr and "refusing" in proc.stderr, proc.stderr
    assert (outside / "shard-00000.parquet").read_bytes() == before


def test_kill_after_the_manifest_resumes_with_the_same_command(built, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(built, out)
    (out / ".staging").mkdir()  # what a kill between writing the manifest and the clean-up leaves
    (out / ".staging" / "part-00000.json").write_text("{}")
    proc = cli("sftgo-prep", "build", "data/alpaca.jsonl", "--out", out, "--rows-per-shard", "150")
    assert "already holds this build; nothing to do" in proc.stderr
    assert not (out / ".staging").exists()
    # the summary line says nothing was written, also when --quiet leaves it the only line
    for run in (
        proc,
        cli("sftgo-prep", "build", "data/alpaca.jsonl", "--out", out, "--rows-per-shard", "150", "--quiet"),
    ):
        assert run.stdout.startswith(f"Nothing written: {out} already holds this build, ") and "Wrote" not in run.stdout


def test_duplicate_ids_and_repeated_inputs_are_counted(tmp_path, dask_scheduler):
    recs = [{"id": "same", "instruction": f"Say {i}.", "output": f"It is {i}."} for i in range(4)]
    src = write_jsonl(tmp_path / "a.jsonl", recs)
    proc = cli("sftgo-prep", "build", src, src, "--out", tmp_path / "out", "--scheduler", dask_scheduler)
    assert "is the same as" in proc.stderr and "read twice" in proc.stderr
    assert "repeat an id" in proc.stderr
    totals = json.loads((tmp_path / "out" / "manifest.json").read_text())["totals"]
    assert totals["duplicate_ids"] == 7 and totals["records_written"] == 8


def test_worker_failure_is_one_sentence_and_busy_dashboard_port_is_silent(built, tmp_path):
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", 8787))
        sock.listen()
    except OSError:
        pass  # someone else holds it: the condition under test holds anyway
    try:
        out = tmp_path / "shards"
        shutil.copytree(built, out)
        manifest = json.loads((out / "manifest.json").read_text())
        # a shard that passes the checks but whose rows cannot be decoded back: the worker fails
        table = pq.read_table(out / "shard-00000.parquet")
        assert table.num_rows
        proc = cli(
            "sftgo-prep",
            "score",
            out,
            "--strategy",
            "semantic",
            "--compressor-model",
            tmp_path / "nope",
            "--quiet",
            check=False,
        )
        assert proc.returncode == 1
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("Error: "), proc.stderr
        assert "Traceback" not in proc.stderr and "8787" not in proc.stderr + proc.stdout
        assert manifest == json.loads((out / "manifest.json").read_text())
    finally:
        sock.close()


@pytest.mark.parametrize(
    "damage, key",
    [
        (lambda m: m.pop("totals"), "totals"),
        (lambda m: m.__setitem__("shards", {"path": "shard-00000.parquet"}), "shards"),
        (lambda m: m["shards"][0].__setitem__("rows", "150"), "shards"),
        (lambda m: m["tokenizer"].pop("fingerprint"), "tokenizer"),
        (lambda m: m.__setitem__("strategies", ["tfidf"]), "strategies"),
    ],
)
def test_a_damaged_manifest_is_one_sentence_for_every_command(built, tmp_path, damage, key):
    out = tmp_path / "shards"
    shutil.copytree(built, out)
    manifest = json.loads((out / "manifest.json").read_text())
    damage(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))
    expected = f"has a missing or malformed '{key}' entry: it was edited or damaged."
    for command in (
        ["sftgo-prep", "score", out, "--strategy", "tfidf", "--overwrite", "--quiet"],
        ["sftgo-prep", "inspect", out, "--no-color"],
        ["sftgo-train", "--data", out, "--out", tmp_path / "run", "--max-steps", "1", "--no-progress"],
    ):
        proc = cli(*command, check=False)
        assert proc.returncode == 1, (command, proc.stderr)
        assert proc.stderr.count("\n") == 1 and expected in proc.stderr, (command, proc.stderr)


def test_a_bad_manifest_is_refused_before_torch_or_a_tokenizer_loads(built, tmp_path):
    """Both commands that read shards check the manifest and the shards first: a refusal costs no torch
    import, no tokenizer and no model (seconds each on a small machine), and no Dask cluster."""
    out = tmp_path / "shards"
    shutil.copytree(built, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"][0]["path"] = "../elsewhere.parquet"
    (out / "manifest.json").write_text(json.dumps(manifest))
    for module, args in (
        ("sftgo.pipeline.cli", ["score", str(out), "--strategy", "tfidf", "--overwrite", "--quiet"]),
        ("sftgo.trainer.cli", ["--data", str(out), "--out", str(tmp_path / "run"), "--no-progress"]),
    ):
        code = (
            f"import sys\nfrom {module} import main\ntry:\n    main({args!r})\nexcept SystemExit as e:\n"
            "    print('exit', e.code)\nprint(sorted(m for m in ('torch', 'transformers', 'distributed') if m "
            "in sys.modules))"
        )
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert "refusing" in proc.stderr, (module, proc.stderr)
        assert proc.stdout.splitlines() == ["exit 1", "[]"], (module, proc.stdout, proc.stderr)


def test_settings_nothing_reads_are_said_not_ignored(tmp_path, dask_scheduler):
    proc = cli(
        "sftgo-prep",
        "build",
        "data/alpaca.jsonl",
        "--out",
        tmp_path / "o",
        "--quiet",
        "--reference-model",
        "x",
        "--tfidf-unit",
        "token",
        "--tfidf-token-pattern",
        "(?u)\\b\\w+\\b",
        "--num-groups",
        "3",
        "--eta",
        "0.2",
        "--scheduler",
        dask_scheduler,
        "--workers",
        "1",
    )
    notes = [line for line in proc.stderr.splitlines() if line.startswith("Note: ")]
    assert notes == [
        "Note: --reference-model is ignored: it applies to the reference strategy, which this run does not score.",
        "Note: --tfidf-token-pattern is ignored: with --tfidf-unit token the terms are token ids.",
        f"Note: --workers is ignored: the cluster at --scheduler {dask_scheduler} runs with its own workers.",
        "Note: --eta is ignored: --num-groups 3 makes equal quantiles (eta sets group 1 of two).",
    ]
    quiet = cli(
        "sftgo-prep", "build", "data/alpaca.jsonl", "--out", tmp_path / "p", "--quiet", "--scheduler", dask_scheduler
    )
    assert "Note:" not in quiet.stderr
