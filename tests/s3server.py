"""A real S3-protocol server on the loopback for tests: moto in server mode, started as a subprocess.

`S3Server()` is a context manager: it starts `moto_server` on a free port of 127.0.0.1, waits until it answers, and
yields itself; `env` holds the standard AWS variables (endpoint, test credentials, region) that s3fs, boto3 and every
process started with them read; `bucket(name)` creates a bucket; leaving the block stops the server.  The same
server serves every test of a session (the `s3` fixture in conftest.py); each test makes its own bucket.
Cost: about 2 s to start; requests go over HTTP on the loopback, so it is slow next to local files.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    def __init__(self, log_dir: Path | None = None):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_SESSION_TOKEN": "",
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_CONFIG_FILE": os.devnull,
        }
        self.log_dir = log_dir
        self.proc = None
        self._made = 0

    def __enter__(self) -> S3Server:
        exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
        cmd = [exe] if exe else [sys.executable, "-m", "moto.server"]
        log = open(self.log_dir / "moto.log", "wb") if self.log_dir else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen([*cmd, "-H", "127.0.0.1", "-p", str(self.port)], stdout=log, stderr=log)
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1).close()
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.__exit__(None, None, None)
                    raise RuntimeError(f"moto_server did not start on {self.endpoint}") from None
                time.sleep(0.2)

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def apply_env(self, monkeypatch) -> None:
        """Point this process's S3 clients at the server (undone at the end of the test)."""
        for key, value in self.env.items():
            monkeypatch.setenv(key, value)
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()  # cached s3fs instances hold the old endpoint

    def bucket(self, prefix: str = "b") -> str:
        """A new, empty bucket; its name."""
        import boto3

        self._made += 1
        name = f"{prefix}-{os.getpid()}-{self._made}-{int(time.time() * 1000) % 100000}"
        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )
        client.create_bucket(Bucket=name)
        return name
