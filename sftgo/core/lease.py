"""The lock of an output on an object store: a lease object URL/.lock that the writer holds while it runs.

Input: the URL of an output (`s3://bucket/prefix`) and its storage options.
Output: `held(url, options)`, a context manager: while it is open, URL/.lock holds this writer's owner record (host,
pid, a random id) and an expiry, renewed by a thread every RENEW_S seconds; leaving it deletes the lease.  A live lease
of another owner is a LeaseError naming the owner and the expiry; an expired one, or one left on this host by a process
that is gone, is taken over.  `lost()` on the handle says whether another writer took the lease while this one held it
(the build then refuses to publish).
How the lease is written: with a conditional put (S3 `If-None-Match: *`, fsspec mode="create") where the store has one,
so two writers cannot both create it; a store without conditional writes gets a write, a read-back and a comparison of
the owner.  Taking over an expired lease deletes it and creates it again conditionally.
What two concurrent writers can still do to each other: a writer stalled longer than the lease (a paused driver, a
cut network) loses it to another, keeps working, and only finds out at its next renewal or before it publishes; between
that check and its last write (the manifest) the two can interleave, and the manifest written last wins (each manifest
names only shards whose checksums it holds, so readers see one build or refuse a damaged one, never a silent mix).  Two
writers that find the same expired lease can both delete it; the conditional create then lets one of them in, except on
a store without conditional writes, where both may believe the read-back until the next renewal shows one its loss.
Cost: one small object written per RENEW_S while a build runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import sys
import threading
import time
from datetime import datetime, timezone

from sftgo.core import storage
from sftgo.core.errors import SftgoError

LEASE = ".lock"
TTL_S = 120.0  # a lease not renewed for this long is expired
RENEW_S = 20.0


class LeaseError(SftgoError, RuntimeError):
    """The output's lease is held by another live writer; one sentence naming it."""


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _pid_gone(owner: dict) -> bool:
    """The owner ran on this host and its process is gone (a killed driver): its lease may be taken over."""
    if owner.get("host") != socket.gethostname() or type(owner.get("pid")) is not int:
        return False
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class Lease:
    """This writer's lease on `url` (see the module docstring)."""

    def __init__(self, url: str, options: dict | None, what: str = "build"):
        self.url, self.what = url, what
        self.fs, root = storage.filesystem(url, options)
        self.key = f"{root.rstrip('/')}/{LEASE}"
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "id": secrets.token_hex(8)}
        self._stop = threading.Event()
        self._lost = False
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        return json.dumps({**self.owner, "expires": time.time() + TTL_S}, sort_keys=True).encode()

    def _read(self) -> dict | None:
        try:
            found = json.loads(self.fs.cat_file(self.key))
        except FileNotFoundError:
            return None
        except ValueError:
            found = {}
        return found if isinstance(found, dict) else {}

    def _create(self) -> bool:
        """Create the lease if there is none; whether this writer holds it now."""
        try:
            self.fs.pipe_file(self.key, self._record(), mode="create")
        except FileExistsError:
            return False
        except TypeError:  # a backend without conditional writes: write, then read back
            self.fs.pipe_file(self.key, self._record())
        except OSError as exc:  # a precondition refused in words s3fs does not map to FileExistsError
            if not any(word in str(exc).lower() for word in ("precondition", "pre-condition", "412")):
                raise
            return False
        self.fs.invalidate_cache(self.key)
        return self._mine(self._read())

    def _mine(self, found: dict | None) -> bool:
        return bool(found) and all(found.get(k) == v for k, v in self.owner.items())

    def take(self) -> None:
        """Hold the lease or raise LeaseError (one sentence)."""
        for _ in range(3):
            if self._create():
                break
            found = self._read()
            if found is None:
                continue  # released meanwhile: try again
            expires = found.get("expires")
            live = isinstance(expires, (int, float)) and expires > time.time()
            if live and not _pid_gone(found):
                raise LeaseError(
                    f"Another {self.what} ({found.get('host', '?')}, pid {found.get('pid', '?')}, lease "
                    f"{found.get('id', '?')}) holds {self.url}/{LEASE} until {_when(expires)}; wait for it or choose "
                    "another --out."
                )
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self.key)  # expired, or its writer is gone: taken over
        else:
            raise LeaseError(f"The lease {self.url}/{LEASE} changed hands while this {self.what} tried to take it.")
        self._thread = threading.Thread(target=self._renew, name="sftgo-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_S):
            try:
                self.fs.invalidate_cache(self.key)
                if not self._mine(self._read()):
                    self._lost = True
                    return
                self.fs.pipe_file(self.key, self._record())
            except Exception:  # a store that does not answer now may answer at the next renewal
                continue

    def lost(self) -> bool:
        """Whether another writer took the lease while this one held it (checked now)."""
        if not self._lost:
            self.fs.invalidate_cache(self.key)
            self._lost = not self._mine(self._read())
        return self._lost

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            if not self._lost and self._mine(self._read()):
                self.fs.rm_file(self.key)
        except Exception as exc:  # a store that does not answer now: the lease expires by itself
            print(
                f"Note: {storage.sentence(exc, f'{self.url}/{LEASE}').rstrip('.')}; the lease was not removed and "
                f"expires within {TTL_S:.0f} s.",
                file=sys.stderr,
            )


@contextlib.contextmanager
def held(url: str, options: dict | None = None, what: str = "build"):
    """Hold the lease on `url` for the block (see the module docstring); yields the Lease."""
    lease = Lease(url, options, what)
    lease.take()
    try:
        yield lease
    finally:
        lease.release()
