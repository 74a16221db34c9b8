"""Hostile build directories against `score`, `inspect` and the lock, as a user runs them (real CLI
subprocesses, real functions): a pending `.scoring` commit is finished only when it is this request's,
for this build, complete and intact; `score` verifies a build as `inspect` does; manifest numbers are
typed (a bool is no int); `--html` never lands on a file of the build; a symlinked `.lock` is refused;
a TF-IDF pattern that finds no term stops the build."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sftgo.core.locks import LockedError, exclusive, shared
from sftgo.core.shards import ShardError, read_manifest
from sftgo.pipeline import score

ROOT = Path(__file__).resolve().parents[1]
ETA = "0.2"  # the scoring request of these tests: tfidf recomputed with another eta (no model to load)


def one_sentence(proc) -> str:
    """The command failed with exactly one line, `Error: <sentence>.`, and no traceback."""
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and lines[0].endswith("."), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def files_of(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def builds(tmp_path_factory, dask_scheduler) -> dict:
    """a: 20 alpaca records (tfidf, eta 0.3); b: another build (10 records); scored: a with tfidf
    recomputed at eta 0.2 -- what `score a --strategy tfidf --overwrite --eta 0.2` leaves."""
    from sftgo.pipeline.build import run as build
    from sftgo.pipeline.config import BuildConfig

    tmp = tmp_path_factory.mktemp("hostile-score")
    lines = (ROOT / "data" / "alpaca.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (tmp / "a20.jsonl").write_text("".join(lines[:20]), encoding="utf-8")
    (tmp / "a10.jsonl").write_text("".join(lines[:10]), encoding="utf-8")
    for name, src in (("a", "a20.jsonl"), ("b", "a10.jsonl")):
        build(BuildConfig(inputs=[str(tmp / src)], out=str(tmp / name), scheduler=dask_scheduler, progress=False))
    shutil.copytree(tmp / "a", tmp / "scored")
    score.run(
        str(tmp / "scored"),
        ["tfidf"],
        {"eta": float(ETA), "trust_remote_code": False},
        scheduler=dask_scheduler,
        overwrite=True,
        progress=False,
    )
    return {"a": tmp / "a", "b": tmp / "b", "scored": tmp / "scored", "scheduler": dask_scheduler}


def copy_of(builds, name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(builds[name], tmp_path / name))


def edit_manifest(directory: Path, change) -> None:
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def rescore(cli, builds, out: Path, eta: str = ETA, *extra):
    return cli(
        "sftgo-prep",
        "score",
        out,
        "--strategy",
        "tfidf",
        "--overwrite",
        "--eta",
        eta,
        "--quiet",
        "--scheduler",
        builds["scheduler"],
        *extra,
        check=False,
    )


def plant_pending(builds, out: Path) -> Path:
    """out/.scoring as a `score a --strategy tfidf --overwrite --eta 0.2` killed while committing leaves it:
    the new manifest, shards and idf, and the key of that request for build a."""
    scoring = out / ".scoring"
    scoring.mkdir()
    for name in ("manifest.json", "shard-00000.parquet", "idf.parquet"):
        shutil.copy(builds["scored"] / name, scoring / name)
    _, key = score.request(
        builds["a"], read_manifest(builds["a"]), ["tfidf"], {"eta": float(ETA), "trust_remote_code": False}
    )
    (scoring / score.MARKER).write_text(json.dumps(key, sort_keys=True))
    return scoring


# ---------------------------------------------------------------- readers hold the folder


def test_score_and_build_are_refused_while_a_run_reads_the_shards(cli, builds, tmp_path):
    out = copy_of(builds, "a", tmp_path)
    before = files_of(out)
    busy = (
        f"Error: {out} is being read by another sftgo process (a training run, a report or load_shards); "
        "wait for it to finish or choose another --out."
    )
    with shared(out):  # what sftgo-train holds on --data and --eval-data for its whole run
        assert one_sentence(rescore(cli, builds, out)) == busy
        rebuilt = cli(
            "sftgo-prep",
            "build",
            ROOT / "data" / "alpaca.jsonl",
            "--out",
            out,
            "--overwrite",
            "--quiet",
            "--scheduler",
            builds["scheduler"],
            check=False,
        )
        assert one_sentence(rebuilt) == busy
    assert files_of(out) == before
    assert rescore(cli, builds, out).returncode == 0  # once the run is over


def test_inspect_and_load_shards_wait_for_a_writer_and_hold_off_writers(cli, builds, tmp_path, monkeypatch):
    """Every reader of a build holds the shared lock: `inspect` and `load_shards` are refused while a build
    or score writes the folder, and a build is refused while they read it."""
    from sftgo.trainer.hf import load_shards

    out = copy_of(builds, "a", tmp_path)
    written = f"is being written by another sftgo process (pid {os.getpid()})"
    with exclusive(out):  # what a build or score holds
        assert written in one_sentence(cli("sftgo-prep", "inspect", out, check=False))
        with pytest.raises(LockedError, match=r"being written by another sftgo process"):
            load_shards(str(out))
    import sftgo.pipeline.inspect as inspect_mod

    seen = []
    real = inspect_mod._report

    def report_and_try_a_build(path, *args):  # while inspect reads: a build into the folder is refused
        with pytest.raises(LockedError, match=r"being read by another sftgo process"):
            with exclusive(path):
                pass
        seen.append(path)
        return real(path, *args)

    monkeypatch.setattr(inspect_mod, "_report", report_and_try_a_build)
    inspect_mod.run(str(out))
    assert seen == [out]
    assert len(load_shards(str(out))) == read_manifest(out)["totals"]["records_written"]


def test_a_lock_file_this_user_cannot_write_is_still_locked_for_reading(builds, tmp_path):
    """A build made by another user (its .lock not writable here) is read under a shared lock taken
    read-only, so a writer is still held off; root stands in for that user with an immutable .lock."""
    import subprocess

    out = copy_of(builds, "a", tmp_path)
    lock = out / ".lock"
    lock.touch()
    if subprocess.run(["chattr", "+i", str(lock)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not permitted here")
    try:
        with pytest.raises(OSError):
            os.open(lock, os.O_RDWR)  # what the reader could not open before
        with shared(out):
            with pytest.raises(LockedError):
                with exclusive(out):
                    pass
    finally:
        subprocess.run(["chattr", "-i", str(lock)], check=True)


# ---------------------------------------------------------------- defect 6: pending commits
def test_a_pending_commit_of_this_request_is_finished_even_half_moved(cli, builds, tmp_path):
    out = copy_of(builds, "a", tmp_path)
    scoring = plant_pending(builds, out)
    os.replace(scoring / "shard-00000.parquet", out / "shard-00000.parquet")  # killed after the first rename
    proc = rescore(cli, builds, out)
    assert proc.returncode == 0 and "Note:" not in proc.stderr, proc.stderr
    assert files_of(out) == files_of(builds["scored"]) and not scoring.exists()


def test_a_planted_copy_of_the_manifest_is_not_taken_for_a_commit(cli, builds, tmp_path):
    out = copy_of(builds, "a", tmp_path)
    (out / ".scoring").mkdir()
    shutil.copy(out / "manifest.json", out / ".scoring" / "manifest.json")
    proc = rescore(cli, builds, out)
    assert proc.returncode == 0, proc.stderr
    assert read_manifest(out)["strategies"]["tfidf"]["eta"] == float(ETA)  # the request was done, not skipped
    assert files_of(out) == files_of(builds["scored"])
    assert "Note: removed" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "planted",
    [
        {"shards": [], "strategies": {}, "params": {"strategies": []}},
        {"shards": 5},
        {"format_version": 1, "shards": 5},
        "not json {",
    ],
)
def test_a_damaged_pending_manifest_is_discarded_with_a_note(cli, builds, tmp_path, planted):
    out = copy_of(builds, "a", tmp_path)
    (out / ".scoring").mkdir()
    (out / ".scoring" / "manifest.json").write_text(planted if isinstance(planted, str) else json.dumps(planted))
    proc = rescore(cli, builds, out)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert files_of(out) == files_of(builds["scored"])  # the request done, the planted manifest not committed
    assert [line for line in proc.stderr.splitlines() if line.startswith("Note: discarded")], proc.stderr


def test_a_stale_pending_commit_of_another_build_is_discarded(cli, builds, tmp_path):
    out = copy_of(builds, "b", tmp_path)  # a fresh build (as after `build --overwrite`) under a's pending commit
    plant_pending(builds, out)
    proc = rescore(cli, builds, out)
    assert proc.returncode == 0, proc.stderr
    manifest = read_manifest(out)  # b's records, scored: not a's build brought back
    assert manifest["totals"]["records_written"] == 10 and manifest["strategies"]["tfidf"]["idf"]["documents"] == 10
    assert pq.read_metadata(out / "shard-00000.parquet").num_rows == 10
    assert "Note: discarded" in proc.stderr and "another build" in proc.stderr


def test_a_pending_commit_with_a_damaged_file_is_discarded(cli, builds, tmp_path):
    out = copy_of(builds, "a", tmp_path)
    scoring = plant_pending(builds, out)
    pq.write_table(pa.table({"id": ["x"]}), scoring / "shard-00000.parquet")
    proc = rescore(cli, builds, out)
    assert proc.returncode == 0, proc.stderr
    assert read_manifest(out)["shards"] == read_manifest(builds["scored"])["shards"]  # not the foreign file
    assert files_of(out) == files_of(builds["scored"])
    assert "Note: discarded" in proc.stderr and "missing or damaged" in proc.stderr


def test_a_half_moved_commit_of_another_request_is_refused_then_finished(cli, builds, tmp_path):
    out = copy_of(builds, "a", tmp_path)
    scoring = plant_pending(builds, out)
    os.replace(scoring / "shard-00000.parquet", out / "shard-00000.parquet")
    line = one_sentence(rescore(cli, builds, out, "0.4"))
    assert "half-way through committing an earlier `sftgo-prep score --strategy tfidf`" in line
    assert scoring.exists()
    assert rescore(cli, builds, out).returncode == 0  # the request it holds finishes it
    assert files_of(out) == files_of(builds["scored"])


# ---------------------------------------------------------------- defect 7: verified like inspect
@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t.update(records_written=100000), "counts 100000 records written but its shards hold 20 rows"),
        (lambda t: t.update(tokens=t["tokens"] + 1), "tokens in total but its shards hold"),
    ],
)
def test_score_refuses_the_counts_inspect_refuses(cli, builds, tmp_path, change, message):
    out = copy_of(builds, "a", tmp_path)
    edit_manifest(out, lambda m: change(m["totals"]))
    before = files_of(out)
    for command in (["score", out, "--strategy", "tfidf", "--overwrite", "--quiet"], ["inspect", out, "--no-color"]):
        assert message in one_sentence(cli("sftgo-prep", *command, check=False))
    assert files_of(out) == before


# ---------------------------------------------------------------- defect 8: what the readers index
@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m.pop("params"), "missing or malformed 'params' entry"),
        (lambda m: m.pop("strategies"), "missing or malformed 'strategies' entry"),
        (lambda m: m.pop("rejected"), "missing or malformed 'rejected' entry"),
        (lambda m: m["params"].update(strategies=["tfidf", "reference"]), "missing or malformed 'params' entry"),
        (lambda m: m["params"].pop("eta"), "has no 'params.eta' entry"),
        (lambda m: m["params"].update(colour="red"), "has an unknown 'params.colour' entry"),
        (lambda m: m["params"].update(eta=True), "has params sftgo would refuse"),
        (lambda m: m["params"].update(eta=7.0), "has params sftgo would refuse"),
    ],
)
def test_a_manifest_without_what_score_reads_is_one_sentence(cli, builds, tmp_path, change, message):
    out = copy_of(builds, "a", tmp_path)
    edit_manifest(out, change)
    assert message in one_sentence(
        cli("sftgo-prep", "score", out, "--strategy", "tfidf", "--overwrite", "--quiet", check=False)
    )


# ---------------------------------------------------------------- defect 19: typed numbers
@pytest.mark.parametrize("version", [True, 1.0, "1"])
def test_format_version_must_be_the_integer_one(cli, builds, tmp_path, version):
    out = copy_of(builds, "a", tmp_path)
    edit_manifest(out, lambda m: m.update(format_version=version))
    for command in (["inspect", out, "--no-color"], ["score", out, "--strategy", "tfidf", "--overwrite", "--quiet"]):
        assert f"has format version {version!r}" in one_sentence(cli("sftgo-prep", *command, check=False))


@pytest.mark.parametrize(
    "change",
    [
        lambda m: m["shards"][0].update(rows=True),
        lambda m: m["shards"][0].update(tokens=float(m["shards"][0]["tokens"])),
        lambda m: m["totals"].update(truncated=False),
        lambda m: m["strategies"]["tfidf"].update(num_groups=2.0),
        lambda m: m["rejected"].update(too_long=True),
    ],
)
def test_a_bool_or_float_is_no_count_in_the_manifest(builds, tmp_path, change):
    out = copy_of(builds, "a", tmp_path)
    edit_manifest(out, change)
    with pytest.raises(ShardError, match="missing or malformed"):
        read_manifest(out)


# ---------------------------------------------------------------- defect 3: --html
@pytest.mark.parametrize(
    "target", ["manifest.json", "link.html", ".lock", "shard-00000.parquet", "idf.parquet", ".staging/page.html"]
)
def test_html_never_lands_on_a_file_of_the_build(cli, builds, tmp_path, target):
    out = copy_of(builds, "a", tmp_path)
    (out / "link.html").symlink_to("manifest.json")
    (tmp_path / "alias").symlink_to(out)  # the same build reached through a symlinked folder
    before = files_of(out)
    for where in (out / target, tmp_path / "alias" / target):
        line = one_sentence(cli("sftgo-prep", "inspect", out, "--no-color", "--html", where, check=False))
        assert "which the build in" in line and "owns" in line
    assert files_of(out) == before and not (out / ".staging").exists()


def test_html_page_is_written_by_rename(cli, builds, tmp_path):
    out = copy_of(builds, "a", tmp_path)
    kept, pages = tmp_path / "kept.html", tmp_path / "pages"
    kept.write_text("keep me")
    pages.mkdir()
    os.link(kept, pages / "report.html")  # written in place, the page would land in kept.html too
    proc = cli("sftgo-prep", "inspect", out, "--no-color", "--html", pages / "report.html", "--samples", "2")
    assert "Wrote" in proc.stdout and "<html>" in (pages / "report.html").read_text()
    assert kept.read_text() == "keep me"


def test_html_inside_the_build_it_reports_on_is_refused(cli, builds, tmp_path):
    """An output inside the folder the command reads: the next build of that folder would take it for data."""
    out = copy_of(builds, "a", tmp_path)
    (tmp_path / "alias").symlink_to(out)
    before = files_of(out)
    for where in (out / "report.html", tmp_path / "alias" / "sub" / "report.html"):
        line = one_sentence(cli("sftgo-prep", "inspect", out, "--no-color", "--html", where, check=False))
        assert line == f"Error: --html {where} lies inside the build {out} it reports on; write the page elsewhere."
    assert files_of(out) == before and not (out / "sub").exists()


# ---------------------------------------------------------------- defect 15: the lock
def test_a_symlinked_lock_is_refused_and_its_target_kept(cli, builds, tmp_path):
    out = copy_of(builds, "a", tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (out / ".lock").unlink()
    (out / ".lock").symlink_to(victim)
    line = one_sentence(
        cli(
            "sftgo-prep",
            "build",
            ROOT / "data" / "alpaca.jsonl",
            "--out",
            out,
            "--quiet",
            "--workers",
            "1",
            check=False,
        )
    )
    assert ".lock is a symlink" in line
    assert victim.read_text() == "precious\n"


def test_a_lock_that_is_no_plain_file_is_refused(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    for name, make in (("hard", lambda lock: os.link(victim, lock)), ("fifo", os.mkfifo), ("dir", os.mkdir)):
        out = tmp_path / name
        out.mkdir()
        make(out / ".lock")
        with pytest.raises(LockedError, match=r"\.lock is .*; remove it and run again"):
            with exclusive(out):
                pass
    assert victim.read_text() == "precious\n"
    with exclusive(tmp_path / "fine"):  # an ordinary lock still works
        assert (tmp_path / "fine" / ".lock").read_text() == str(os.getpid())


# ---------------------------------------------------------------- defect 20: empty TF-IDF vocabulary
def test_a_token_pattern_that_finds_no_term_stops_the_build(cli, builds, tmp_path):
    line = one_sentence(
        cli(
            "sftgo-prep",
            "build",
            builds["a"].parent / "a20.jsonl",
            "--out",
            tmp_path / "zz",
            "--quiet",
            "--tfidf-token-pattern",
            "zzzz",
            "--threshold",
            "corpus",
            "--scheduler",
            builds["scheduler"],
            check=False,
        )
    )
    assert "The TF-IDF vocabulary is empty" in line and "--tfidf-token-pattern" in line
    assert not (tmp_path / "zz" / "manifest.json").exists()


def test_fit_refuses_an_empty_vocabulary(tmp_path):
    from sftgo.grouping.tfidf import STRATEGY, document_freq

    empty = document_freq(pa.array([[], []], pa.list_(pa.string())))
    with pytest.raises(ValueError, match="vocabulary is empty.*any of the 2 responses"):
        STRATEGY.fit([empty], 2, str(tmp_path))
    assert not (tmp_path / "idf.parquet").exists()


def test_a_shard_listed_twice_or_counts_that_do_not_add_up_are_refused(tmp_path):
    """(train review, defect 9) a manifest listing a shard twice would train every sample twice per epoch."""
    from sftgo.core.shards import ShardError, check_manifest

    base = {
        "format_version": 1,
        "tokenizer": {"name": "t", "fingerprint": "f"},
        "params": {},
        "strategies": {},
        "rejected": {"too_long": 1},
        "shards": [{"path": "shard-00000.parquet", "sha256": "x", "rows": 2, "tokens": 10, "loss_tokens": 5}],
        "totals": {"records_in": 3, "records_written": 2, "records_rejected": 1, "tokens": 10, "loss_tokens": 5},
    }
    assert check_manifest(tmp_path, json.loads(json.dumps(base)))
    twice = json.loads(json.dumps(base))
    twice["shards"] *= 2
    twice["totals"].update(records_in=5, records_written=4, tokens=20, loss_tokens=10)
    with pytest.raises(ShardError, match="twice"):
        check_manifest(tmp_path, twice)
    for change in ({"records_in": 4}, {"records_rejected": 2}):
        bad = json.loads(json.dumps(base))
        bad["totals"].update(change)
        with pytest.raises(ShardError, match="do not add up"):
            check_manifest(tmp_path, bad)
