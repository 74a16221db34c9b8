"""The converted-model cache (sftgo.core.models.model_dir / tokenizer_dir).

A GGUF model is converted once into $SFTGO_CACHE.  Under torchrun every rank may convert at once, inside
an initialised process group, where transformers' save_pretrained writes weights on rank 0 only: a rank
that wrote no weights must not be able to leave a copy marked complete.  And a cached copy that lacks its
files is converted again with a note, not trusted for its marker.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CONVERT_ON_RANK_1 = """
import torch.distributed as dist
dist.init_process_group("gloo")
if dist.get_rank() == 1:  # rank 0 waits: the conversion is rank 1's alone
    from sftgo.core.models import model_dir
    print("DIR", model_dir(None), flush=True)
dist.barrier()
dist.destroy_process_group()
"""


def test_a_rank_other_than_0_converts_the_weights(tmp_path):
    script = tmp_path / "convert.py"
    script.write_text(CONVERT_ON_RANK_1)
    env = dict(os.environ, SFTGO_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    folder = Path(next(line for line in proc.stdout.splitlines() if line.startswith("DIR ")).split(" ", 1)[1])
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()

    # the oracle: transformers' own GGUF loader, reading the embedded file directly
    from transformers import AutoModelForCausalLM

    from sftgo.core.models import resolve

    ref = resolve(None)
    direct = AutoModelForCausalLM.from_pretrained(
        ref.location, gguf_file=ref.gguf_file, dtype=torch.float32
    ).state_dict()
    cached = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()
    assert set(cached) == set(direct)
    for key in direct:
        assert torch.equal(cached[key], direct[key]), key


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A cache in which the embedded tokenizer was converted, once for the module: (the cache, the folder)."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SFTGO_CACHE", str(cache))
        from sftgo.core.models import tokenizer_dir

        return cache, Path(tokenizer_dir(None))


def test_a_cached_copy_without_its_files_is_converted_again(tmp_path, monkeypatch, capsys, converted):
    shutil.copytree(converted[0], tmp_path, dirs_exist_ok=True)  # a finished conversion of its own
    monkeypatch.setenv("SFTGO_CACHE", str(tmp_path))
    from sftgo.core.models import tokenizer_dir

    first = Path(tokenizer_dir(None))
    assert first.is_relative_to(tmp_path) and "Note" not in capsys.readouterr().err
    good = (first / "tokenizer.json").read_bytes()
    (first / "tokenizer.json").unlink()  # marked complete, but cut short
    assert (first / ".complete").exists()
    again = Path(tokenizer_dir(None))
    assert again == first and (again / "tokenizer.json").read_bytes() == good
    err = capsys.readouterr().err
    assert f"Note: the converted copy in {first} lacks tokenizer.json; converting it again." in err
    assert [p.name for p in first.parent.iterdir()] == ["tokenizer"]  # nothing left beside it
    assert tokenizer_dir(None) == str(first) and "Note" not in capsys.readouterr().err  # whole again: no note


def test_the_folders_of_killed_conversions_are_removed(tmp_path, monkeypatch):
    import fcntl
    import time

    monkeypatch.setenv("SFTGO_CACHE", str(tmp_path))
    from sftgo.core.models import _gguf_cache_dir, resolve, tokenizer_dir

    parent = _gguf_cache_dir(resolve(None), "tokenizer").parent
    parent.mkdir(parents=True)
    old = time.time() - 3600
    folders = {
        name: parent / name
        for name in (".tokenizer-dead", ".broken-tokenizer-dead", ".tokenizer-busy", ".tokenizer-young", ".model-other")
    }
    for name, folder in folders.items():
        folder.mkdir()
        (folder / "tokenizer.json").write_text("half")
        if name != ".tokenizer-young":
            os.utime(folder, (old, old))
    busy = os.open(folders[".tokenizer-busy"], os.O_RDONLY)  # a conversion still writing it
    fcntl.flock(busy, fcntl.LOCK_EX)
    try:
        tokenizer_dir(None)
    finally:
        os.close(busy)
    left = sorted(p.name for p in parent.iterdir())
    # killed ones go; one in use, one too young to be locked yet, and another kind's are left alone
    assert left == [".model-other", ".tokenizer-busy", ".tokenizer-young", "tokenizer"]


def test_a_cache_that_cannot_be_written_is_one_sentence(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("SFTGO_CACHE", str(blocker / "cache"))
    import pytest

    from sftgo.core.models import CacheError, tokenizer_dir

    with pytest.raises(CacheError) as caught:
        tokenizer_dir(None)
    assert str(caught.value).startswith(f"Cannot write the converted-model cache in {blocker / 'cache'}/")
    assert str(caught.value).endswith("; set SFTGO_CACHE to a writable folder.")


def test_a_build_from_a_local_tokenizer_needs_no_writable_cache(tmp_path, monkeypatch, converted):
    from sftgo.core.models import load_build_tokenizer

    local = str(converted[1])  # a plain Hugging Face tokenizer folder
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("SFTGO_CACHE", str(blocker / "cache"))  # the light-load memo cannot be written: no matter
    tok, light_ok = load_build_tokenizer(local)
    assert light_ok and tok("hello world")["input_ids"]


def test_a_converted_copy_has_ordinary_folder_permissions(converted):
    """The converted folder is made with mkdtemp (0700); renamed into a cache that users share
    (SFTGO_CACHE), it must be readable by them like any folder the umask allows."""
    import stat

    from sftgo.core.fileio import UMASK

    folder = converted[1]
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~UMASK != 0o700
