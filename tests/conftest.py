"""Shared fixtures: the embedded tokenizer, small input files, and a CLI runner (real subprocess)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
if str(ROOT) not in sys.path:  # `from tests.x import ...` in test modules, run alone or together
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def tokenizer():
    from sftgo.core import models

    return models.load_tokenizer(None)


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory, tokenizer):
    """Factory: tiny_lm(seed, tok=None) -> directory of a 2-layer, hidden-32 random Llama over the
    vocabulary of `tok` (default: the embedded tokenizer), saved with it (a real HF model, fast)."""
    made: dict[int, str] = {}

    def make(seed: int = 0, tok=None) -> str:
        if tok is None and seed in made:
            return made[seed]
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        tok = tok or tokenizer
        torch.manual_seed(seed)
        cfg = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
        )
        path = tmp_path_factory.mktemp(f"tiny-lm-{seed}")
        LlamaForCausalLM(cfg).save_pretrained(path)
        tok.save_pretrained(path)
        if tok is tokenizer:
            made[seed] = str(path)
        return str(path)

    return make


@pytest.fixture(scope="session")
def dask_scheduler():
    """The address of one local Dask cluster for the session (2 worker processes, one thread each:
    what `sftgo-prep build` starts for itself), which tests pass to builds as `--scheduler`, the path
    of a user with a running cluster.  Each build so skips a cluster start and stop (seconds on 2
    cores).  The tests whose subject is the local cluster (the default build, kill and resume,
    worker failures, registered strategies) start their own."""
    from sftgo.pipeline import executor

    with executor.local_cluster(2) as cluster:
        yield cluster.scheduler_address


def write_jsonl(path: Path, records: list) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def cli(command: str, *args: str, cwd: Path | None = None, timeout: int = 300, check: bool = True):
    """Run an installed console script (sftgo-prep / sftgo-train) as a user would."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [str(BIN / command), *map(str, args)], capture_output=True, text=True, cwd=cwd or ROOT, timeout=timeout, env=env
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{command} {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


@pytest.fixture(name="write_jsonl")
def _write_jsonl_fixture():
    return write_jsonl


@pytest.fixture(name="cli")
def _cli_fixture():
    return cli


@contextlib.contextmanager
def read_only(folder: Path):
    """`folder` made read-only for this process: chmod 0555 for a user, `chattr +i` for root (whom
    permissions do not bind); the test is skipped where neither is possible."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("running as root and chattr +i is not permitted here")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


@pytest.fixture(name="read_only")
def _read_only_fixture():
    return read_only


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-protocol server (moto in server mode) on the loopback, shared by the session (tests/s3server.py)."""
    from tests.s3server import S3Server

    with S3Server(tmp_path_factory.mktemp("moto")) as server:
        yield server


@pytest.fixture
def s3(s3_server, monkeypatch):
    """The S3 server with this process's environment pointing at it; `s3.bucket()` makes a fresh bucket."""
    s3_server.apply_env(monkeypatch)
    return s3_server
