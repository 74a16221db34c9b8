"""Where sftgo reads and writes: a local path or a URL of an object store, opened through fsspec.

Input: a location the user gave (`data/x.jsonl`, `s3://bucket/prefix`, `gs://...`, `abfs://...`, `hf://datasets/...`,
`memory://...`, `file:///...`) and storage options (credentials, endpoint; a JSON object from --storage-options or a
config file).  Output: an fsspec filesystem and the path inside it, or one sentence saying why not (an unknown scheme,
a backend whose package is not installed, with the extra that brings it, a malformed option).
Cost: an import of the backend the first time; fsspec caches filesystem instances per (protocol, options).

Credentials and endpoints come from each backend's standard environment when the options do not name them (S3:
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_PROFILE, ...; GCS: GOOGLE_APPLICATION_CREDENTIALS;
Azure: AZURE_STORAGE_CONNECTION_STRING, ...; the hub: HF_TOKEN).  Nothing here reads a credential itself.

`hf:NAME` (no slashes after the colon) is not a URL here: it names a Hugging Face dataset, resolved by the readers.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

from sftgo.core.errors import ConfigError

URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")

# scheme -> (the package that implements it, the sftgo extra that installs it); None: fsspec's own
BACKENDS: dict[str, tuple[str, str] | None] = {
    "file": None,
    "local": None,
    "memory": None,
    "s3": ("s3fs", "s3"),
    "s3a": ("s3fs", "s3"),
    "gs": ("gcsfs", "gcs"),
    "gcs": ("gcsfs", "gcs"),
    "abfs": ("adlfs", "azure"),
    "abfss": ("adlfs", "azure"),
    "az": ("adlfs", "azure"),
    "hf": ("huggingface_hub", "hf"),
}


class StorageError(ConfigError):
    """A location sftgo cannot open as asked: one sentence for the user."""


def scheme(location: str) -> str | None:
    """The URL scheme of `location` in lower case (`s3`), or None for a local path."""
    m = URL.match(str(location))
    return m.group(1).lower() if m else None


def is_url(location) -> bool:
    """Whether `location` is a URL (a scheme followed by ://), as opposed to a local path."""
    return scheme(str(location)) is not None


def is_remote(location) -> bool:
    """A URL whose data does not live in this machine's file system (not file:// or local://)."""
    return scheme(str(location)) not in (None, "file", "local")


def local_path(location, what: str = "") -> Path:
    """The local path `location` names: itself, or the path of a file:// (local://) URL.  A URL of a store is refused
    in one sentence (`what`, e.g. "--out", names the setting): it never becomes a local path (Path("s3://b/x") is
    the folder s3:/b/x, which nothing may create)."""
    if not is_url(location):
        return Path(location)
    if is_remote(location):
        raise StorageError(f"{what} {location} is a URL of an object store, but a local path is needed here.".lstrip())
    check_backend(str(location))
    import fsspec.core

    return Path(fsspec.core.url_to_fs(str(location))[1])


def parse_options(value, what: str = "--storage-options") -> dict:
    """Storage options from a JSON object text (the command line) or a dict (a config file): a dict whose keys are
    strings; anything else is one sentence."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise StorageError(
                f'{what} must be a JSON object, e.g. \'{{"endpoint_url": "http://127.0.0.1:9000"}}\'; '
                f"this is not JSON ({exc.msg} at character {exc.pos})."
            ) from None
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise StorageError(f"{what} must be a JSON object with string keys, not {type(value).__name__}.")
    return dict(value)


def check_backend(location: str) -> None:
    """Refuse, in one sentence, a URL whose scheme fsspec does not know or whose backend is not installed."""
    name = scheme(location)
    if name is None:
        return
    from fsspec.registry import known_implementations

    if name not in BACKENDS and name not in known_implementations:
        known = ", ".join(f"{s}://" for s in sorted(set(BACKENDS) - {"local"}))
        raise StorageError(f"{location} has a scheme, {name}://, that sftgo cannot open; it reads {known}.")
    backend = BACKENDS.get(name)
    if backend is not None and importlib.util.find_spec(backend[0]) is None:
        package, extra = backend
        raise StorageError(
            f"{location} needs the {package} package, which is not installed: pip install 'sftgo[{extra}]'."
        )


def filesystem(location: str, options: dict | None = None):
    """(fsspec filesystem, path inside it) for a URL or a local path; options are the backend's own keyword
    arguments (for s3fs e.g. {"endpoint_url": ..., "key": ..., "secret": ...} or {"client_kwargs": {...}})."""
    check_backend(str(location))
    import fsspec.core

    try:
        return fsspec.core.url_to_fs(str(location), **(options or {}))
    except (TypeError, ValueError) as exc:
        raise StorageError(f"{location} cannot be opened with these storage options: {exc}.") from None


def join(location: str, *names: str) -> str:
    """`location` with `names` appended by '/', for URLs and local paths alike."""
    out = str(location).rstrip("/") if is_url(location) else str(location)
    for name in names:
        out = f"{out}/{name}" if is_url(out) else os.path.join(out, name)
    return out


def sentence(exc: BaseException, location: str) -> str:
    """One sentence for an error a store raised while sftgo read or wrote `location`: missing credentials, a
    missing bucket or object, a refused permission, an unreachable endpoint; otherwise the error's own words."""
    kind = type(exc).__name__
    text = str(exc).strip().rstrip(".") or kind
    if kind in ("NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError", "CredentialRetrievalError"):
        return (
            f"No credentials were found for {location}: set the backend's environment (for S3 AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE) or pass them in --storage-options."
        )
    if isinstance(exc, FileNotFoundError):
        return f"{location} does not exist (no such bucket, container or object): {text}."
    if isinstance(exc, PermissionError):
        return f"Access to {location} is denied: {text}; check the credentials and the bucket's policy."
    if kind in ("EndpointConnectionError", "ClientConnectorError", "ConnectTimeoutError", "ConnectionError"):
        return f"The store holding {location} cannot be reached: {text}; check the endpoint (AWS_ENDPOINT_URL)."
    return f"{location}: {text}."
