"""Where `sftgo-prep` writes, against hostile or careless output paths: a device, a FIFO, a symlink, a
folder or a socket where a file goes; an output inside an input (or around one); a folder sftgo may not
write in.  Real CLI subprocesses on the session's Dask cluster; the oracle is the file system itself
(what kind of node each path is afterwards, and every byte of a build that must survive)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import stat
import threading
from pathlib import Path

import pytest

from sftgo.core import fileio

ROOT = Path(__file__).resolve().parents[1]
BAD_LINE = "{not json"


@pytest.fixture
def small(tmp_path):
    """20 alpaca records and one malformed line (one rejection to write)."""
    src = tmp_path / "in" / "a.jsonl"
    src.parent.mkdir()
    lines = (ROOT / "data/alpaca.jsonl").read_text().splitlines(keepends=True)[:20]
    src.write_text("".join(lines) + BAD_LINE + "\n")
    return src


def build(cli, scheduler, inputs, out, *extra):
    inputs = inputs if isinstance(inputs, list) else [inputs]
    return cli("sftgo-prep", "build", *inputs, "--out", out, "--quiet", "--scheduler", scheduler, *extra, check=False)


def ok(proc):
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    return proc


def refused(proc, *words, code=1):
    """Exit 1 (2: click's usage error) with one `Error:` sentence naming `words`; no traceback, no raw OS error."""
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "[Errno" not in proc.stderr, proc.stderr
    assert proc.stderr.count("Error: ") == 1, proc.stderr
    for w in words:
        assert str(w) in proc.stderr, proc.stderr
    return proc


def tree(folder: Path) -> dict:
    """Every file under `folder` and its bytes (hidden ones too): what must survive a refused command."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def kind(path) -> int:
    return stat.S_IFMT(os.lstat(path).st_mode)


# ---------------------------------------------------------------- streamed outputs: devices, FIFOs, links
@pytest.fixture
def null_device(tmp_path):
    """/dev/null for a user (who cannot replace it), and for root a private node of the same device (1:3):
    a sftgo without the fix would replace the machine's /dev/null with a file."""
    if os.geteuid() != 0:
        return Path("/dev/null")
    node = tmp_path / "null"
    try:
        os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except OSError:
        pytest.skip("running as root where device nodes cannot be made; /dev/null is not risked")
    return node


def test_rejects_to_dev_null_writes_into_the_device(cli, tmp_path, small, dask_scheduler, null_device):
    before = os.lstat(null_device)
    ok(build(cli, dask_scheduler, small, tmp_path / "out", "--rejects", null_device))
    after = os.lstat(null_device)
    assert stat.S_ISCHR(after.st_mode) and after.st_rdev == before.st_rdev and after.st_ino == before.st_ino
    assert not list(null_device.parent.glob(f".{null_device.name}.*.tmp"))  # no temporary left beside it


def test_rejects_to_a_fifo_arrive_in_it(cli, tmp_path, small, dask_scheduler):
    fifo = tmp_path / "rejects.fifo"
    os.mkfifo(fifo)
    got: list[str] = []

    def read():
        with open(fifo, encoding="utf-8") as fh:  # blocks until the build opens it for writing
            got.append(fh.read())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        ok(build(cli, dask_scheduler, small, tmp_path / "out", "--rejects", fifo))
    finally:
        if reader.is_alive():  # the build never opened it: let the reader go
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(30)
    assert stat.S_ISFIFO(kind(fifo))
    rows = [json.loads(line) for line in got[0].splitlines()]
    assert [(r["reason"], r["raw"]) for r in rows] == [("malformed_json", BAD_LINE)]


def test_rejects_through_a_symlink_write_its_target_and_keep_the_link(cli, tmp_path, small, dask_scheduler):
    """A path the user names is written where it leads, as a shell's `>` does; the link stays a link (sftgo
    never replaces it with a file) and what it points at gets the rejects, whole."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    target = elsewhere / "rej.jsonl"
    target.write_text("old\n")
    link = tmp_path / "rej-link.jsonl"
    link.symlink_to(target)
    ok(build(cli, dask_scheduler, small, tmp_path / "out", "--rejects", link))
    assert stat.S_ISLNK(kind(link)) and os.readlink(link) == str(target)
    assert [json.loads(x)["reason"] for x in target.read_text().splitlines()] == ["malformed_json"]


@pytest.mark.parametrize("what", ["folder", "socket", "dangling link", "link to a folder", "link to an input"])
def test_rejects_that_is_no_file_is_refused_before_anything_is_written(cli, tmp_path, small, dask_scheduler, what):
    path = tmp_path / "rej"
    holder = None
    if what == "folder":
        path.mkdir()
    elif what == "socket":
        holder = socket.socket(socket.AF_UNIX)
        holder.bind(str(path))
    elif what == "dangling link":
        path.symlink_to(tmp_path / "nowhere" / "rej.jsonl")
    elif what == "link to a folder":
        (tmp_path / "d").mkdir()
        path.symlink_to(tmp_path / "d")
    else:
        path.symlink_to(small)
    before = os.lstat(path)
    try:
        usage = what in ("folder", "link to a folder")  # click's own check of a file option
        words = [f"'--rejects': File '{path}' is a directory"] if usage else [f"--rejects {path}"]
        refused(build(cli, dask_scheduler, small, tmp_path / "out", "--rejects", path), *words, code=2 if usage else 1)
    finally:
        if holder is not None:
            holder.close()
    after = os.lstat(path)
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    assert not (tmp_path / "out").exists() and small.read_text().endswith(BAD_LINE + "\n")


@pytest.fixture
def built(cli, tmp_path, small, dask_scheduler):
    out = tmp_path / "out"
    ok(build(cli, dask_scheduler, small, out))
    return out


def test_inspect_html_to_dev_null_and_to_a_fifo_never_to_a_socket(cli, tmp_path, built, null_device):
    inode = os.lstat(null_device).st_ino
    ok(cli("sftgo-prep", "inspect", built, "--html", null_device, "--samples", "3", "--no-color", check=False))
    assert stat.S_ISCHR(os.lstat(null_device).st_mode) and os.lstat(null_device).st_ino == inode
    fifo = tmp_path / "page.fifo"
    os.mkfifo(fifo)
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(Path(fifo).read_text()), daemon=True)
    reader.start()
    ok(cli("sftgo-prep", "inspect", built, "--html", fifo, "--samples", "3", "--no-color", check=False))
    reader.join(30)
    assert stat.S_ISFIFO(kind(fifo)) and got and got[0].count("<div class='s'>") == 3
    sock = tmp_path / "page.sock"
    with socket.socket(socket.AF_UNIX) as holder:
        holder.bind(str(sock))
        refused(cli("sftgo-prep", "inspect", built, "--html", sock, check=False), f"--html {sock}", "a socket")
        assert stat.S_ISSOCK(kind(sock))


def test_a_link_among_the_files_a_build_replaces_is_refused_and_kept(cli, tmp_path, small, built, dask_scheduler):
    """--overwrite replaces the build's own files; a symlink in their place is the user's, not replaced."""
    other = tmp_path / "precious.parquet"
    other.write_bytes(b"not ours")
    (built / "idf.parquet").unlink()
    (built / "idf.parquet").symlink_to(other)
    before = tree(built)
    refused(build(cli, dask_scheduler, small, built, "--overwrite"), f"{built / 'idf.parquet'}", "symlink")
    assert stat.S_ISLNK(kind(built / "idf.parquet")) and other.read_bytes() == b"not ours"
    assert tree(built) == before


# ---------------------------------------------------------------- an output inside an input, or around one
def test_out_inside_an_input_folder_or_around_an_input_is_refused(cli, tmp_path, small, dask_scheduler):
    data = small.parent
    cases = [
        (data, data / "shards", "lies inside the input"),
        (data, data, "is the same as the input"),
        (small, data, "holds the input"),
        (data, tmp_path / "via-link" / "shards", "lies inside the input"),
    ]
    (tmp_path / "via-link").symlink_to(data)
    before = tree(data)
    for source, out, words in cases:
        refused(build(cli, dask_scheduler, source, out), f"--out {out}", words, str(source))
        assert tree(data) == before and not (data / "shards").exists() and not (data / ".lock").exists()


def test_a_good_build_survives_a_refused_overwrite_that_would_read_it(cli, tmp_path, small, dask_scheduler):
    """The reported case: DIR/shards holds a good build, then `build DIR --out DIR/shards --overwrite` (which
    would read the manifest, shards and idf.parquet back as records) is refused before anything is removed;
    so is an input that lies inside --out."""
    shards = small.parent / "shards"
    ok(build(cli, dask_scheduler, small, shards))
    good = tree(shards)
    refused(build(cli, dask_scheduler, small.parent, shards, "--overwrite"), "lies inside the input")
    inner = shards / "more.jsonl"
    inner.write_text(small.read_text())
    refused(build(cli, dask_scheduler, [small, inner], shards, "--overwrite"), f"holds the input {inner}")
    inner.unlink()
    assert tree(shards) == good
    again = ok(build(cli, dask_scheduler, small, shards))
    assert "Nothing written" in again.stdout  # still the whole, current build


# ---------------------------------------------------------------- folders sftgo may not write in
def test_a_read_only_output_folder_is_one_sentence(cli, tmp_path, small, built, dask_scheduler, read_only):
    ro = tmp_path / "ro"
    ro.mkdir()
    with read_only(ro):
        refused(build(cli, dask_scheduler, small, ro / "shards"), f"--out {ro / 'shards'}", f"{ro} is not writable")
        refused(build(cli, dask_scheduler, small, ro), f"--out {ro}", "not writable")
        refused(
            build(cli, dask_scheduler, small, tmp_path / "o2", "--rejects", ro / "rej.jsonl"),
            f"--rejects {ro / 'rej.jsonl'}",
            "not writable",
        )
        proc = cli("sftgo-prep", "inspect", built, "--html", ro / "p.html", "--samples", "2", check=False)
        refused(proc, f"--html {ro / 'p.html'}", "not writable")
    assert not any(ro.iterdir()) and not (tmp_path / "o2").exists()
    good = tree(built)
    with read_only(built):  # --overwrite of a build in a folder it may not change removes nothing
        refused(build(cli, dask_scheduler, small, built, "--overwrite"), f"--out {built}", "not writable")
        score = ["sftgo-prep", "score", built, "--strategy", "tfidf", "--overwrite", "--scheduler", dask_scheduler]
        refused(cli(*score, "--quiet", check=False), f"Cannot write {built}: it is not writable")
    assert tree(built) == good


def test_an_out_that_is_a_regular_file_is_refused(cli, tmp_path, small, dask_scheduler):
    path = tmp_path / "file"
    path.write_text("mine")
    refused(build(cli, dask_scheduler, small, path), f"--out {path}", "not a directory")
    assert path.read_text() == "mine"


# ---------------------------------------------------------------- the rule itself
@pytest.mark.parametrize(
    ("code", "words"),
    [
        (errno.EACCES, "permission denied"),
        (errno.EPERM, "permission denied"),
        (errno.EROFS, "read-only file system"),
        (errno.ENOSPC, "full"),
        (errno.ENOENT, "does not exist"),
        (errno.EISDIR, "is a folder"),
        (errno.ENOTDIR, "is a file where a folder"),
    ],
)
def test_os_errors_become_one_sentence_with_the_path_and_the_fix(code, words):
    text = fileio.os_error_sentence(OSError(code, os.strerror(code), "/x/y"), "--out")
    assert text.startswith("Cannot use --out /x/y: ") and words in text and "Errno" not in text
    assert text.endswith(".") and text.count(". ") == 0


def test_only_streamed_outputs_go_into_a_fifo(tmp_path):
    fifo = tmp_path / "f"
    os.mkfifo(fifo)
    assert fileio.output_target(fifo, "--rejects", stream=True) == (fifo, True)
    with pytest.raises(fileio.PathError, match="FIFO"):
        fileio.output_target(fifo, "manifest")  # a file that must be whole (and renamed into place) is never one
    link = tmp_path / "l"
    link.symlink_to(tmp_path / "t")
    (tmp_path / "t").write_text("")
    with pytest.raises(fileio.PathError, match="symlink"):
        fileio.output_target(link)  # inside sftgo's own folders a link is refused, not followed
    assert fileio.output_target(link, follow=True) == (tmp_path / "t", False)
