"""Atomic training checkpoints and the final model directory.

Input: the model, tokenizer, optimizer, scheduler and the loop's own state.
Output: RUN_DIR/checkpoints/step-NNNNNNN/ holding
    model.safetensors + config.json (or a LoRA adapter), tokenizer files  -- `save_pretrained`,
        so `AutoModelForCausalLM.from_pretrained(dir)` loads the checkpoint as a model;
    trainer_state.pt   optimizer + scheduler tensors (torch.save of our own tensors only,
        loaded back with weights_only=True; nothing user-supplied is ever unpickled);
    trainer_state.json the loop's state (trainer.resume.CheckpointState: step, data position,
        objective state, the run's id and settings, the shards' sha256 lists, truncation counts),
        read and checked in trainer/resume.py alone;
    rng-rank{R}.pt     torch (and CUDA) RNG state of each rank;
and RUN_DIR/checkpoints/latest naming the newest one (a plain step-NNNNNNN name: --resume
refuses anything else, so no checkpoint is ever read from outside the run directory).
Reading one back is reading untrusted input: every entry of trainer_state.json is checked for
type and range, the tensors load with weights_only (anything else is refused in our own
sentence), and a schedule or AdamW settings that differ from the run's are refused, not applied.
Checkpoints stay fp32 (exact resume); RUN_DIR/model is saved in the dtype the model was loaded in, with its own
`use_cache`.
Atomicity: everything is written into a hidden temporary directory that is renamed into
place only when complete; `latest` is replaced atomically afterwards.  A crash at any point
leaves the previous checkpoint intact and `latest` pointing at a complete directory.
Cost: one write of the weights plus twice their size for AdamW moments.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import torch

from sftgo.core.errors import ConfigError
from sftgo.core.fileio import atomic_write_text, check_output_dir, remove
from sftgo.trainer.attention import original_attention

LATEST = "latest"
STEP_DIR = re.compile(r"step-(\d{7,})")  # what `latest` may name: a checkpoint directory beside it


class CheckpointError(ConfigError):
    """A checkpoint is damaged, incomplete, edited or another run's; one sentence naming the file.  It is a
    ConfigError (what these errors were before it existed), so `except ConfigError` still catches it."""


def checkpoints_dir(out: str | os.PathLike) -> Path:
    return Path(out) / "checkpoints"


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    """The checkpoint `latest` names, or None when there is no `latest`.  It must name a plain step-NNNNNNN
    directory inside RUN_DIR/checkpoints (no path, no symlink): a checkpoint is never read from elsewhere."""
    folder = checkpoints_dir(out)
    pointer = folder / LATEST
    if not pointer.exists() and not pointer.is_symlink():
        return None
    damaged = "it was edited or damaged; point it at one of the step-* directories there (a name, no path)"
    if pointer.is_symlink() or not pointer.is_file():
        raise CheckpointError(f"{pointer} is not a plain file: {damaged}.")
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        raise CheckpointError(f"{pointer} is not readable text: {damaged}.") from None
    if not STEP_DIR.fullmatch(name):
        raise CheckpointError(
            f"{pointer} names {name[:80]!r}, which is not a checkpoint directory step-NNNNNNN inside "
            f"{folder}: {damaged}."
        )
    path = folder / name
    if path.is_symlink() or not path.is_dir():
        what = "a symlink" if path.is_symlink() else "missing"
        raise CheckpointError(f"{pointer} names {name}, which is {what} in {folder}: {damaged}.")
    return path


def save_pretrained(model, tokenizer, path: Path) -> None:
    with original_attention(model):  # the saved config names the model's own attention, not the padding-free one
        model.save_pretrained(path)  # safetensors by default
    tokenizer.save_pretrained(path)


def begin(out, step: int) -> Path:
    """Rank 0: a fresh temporary directory for checkpoint `step`."""
    check_output_dir(checkpoints_dir(out))  # never saved through a link into somewhere else
    tmp = checkpoints_dir(out) / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def write_main(tmp: Path, model, tokenizer, optimizer, scheduler, state: dict) -> None:
    """Rank 0: weights, tokenizer, optimizer/scheduler tensors and the JSON state (trainer.resume.CheckpointState,
    as a dict).  model and optimizer None: an --fsdp checkpoint, whose ranks write them sharded (trainer/fsdp.py)."""
    if model is not None:
        save_pretrained(model, tokenizer, tmp)
    else:
        tokenizer.save_pretrained(tmp)
    tensors = {"scheduler": scheduler.state_dict()}
    if optimizer is not None:
        tensors["optimizer"] = optimizer.state_dict()
    torch.save(tensors, tmp / "trainer_state.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")


def write_rng(tmp: Path, rank: int) -> None:
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, tmp / f"rng-rank{rank}.pt")


def commit(out, tmp: Path, step: int, keep: int) -> Path:
    """Rank 0: rename the finished directory into place, point `latest` at it, prune old ones."""
    final = checkpoints_dir(out) / f"step-{step:07d}"
    check_output_dir(final)
    if final.exists():  # e.g. re-saving the same step after a resume
        shutil.rmtree(final)
    os.rename(tmp, final)
    atomic_write_text(checkpoints_dir(out) / LATEST, final.name + "\n")
    done = sorted(p for p in checkpoints_dir(out).glob("step-*") if p.is_dir())
    for old in done[: max(0, len(done) - max(1, keep))]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def is_finite(value) -> bool:
    """A JSON number (not a boolean) that is finite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _load(file: Path):
    """torch.load of our own tensors only (weights_only): anything else is refused in one sentence."""
    if not file.is_file():
        raise CheckpointError(f"{file.parent} has no {file.name}: the checkpoint is incomplete.")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError and friends, whose message suggests unpickling it anyway
        raise CheckpointError(
            f"{file} cannot be loaded as plain tensors ({type(exc).__name__}): it holds something else, "
            "so it was not written by sftgo-train or is damaged; refusing to unpickle it."
        ) from None


# the AdamW settings a checkpoint must share with the run (its lr follows the schedule and is set from it)
OPTIMIZER_KEYS = ("betas", "eps", "weight_decay", "amsgrad", "maximize", "initial_lr", "decoupled_weight_decay")


def optimizer_settings(optimizer) -> list[dict]:
    """The hyperparameters of each param group (everything but the parameters), before a checkpoint loads."""
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b and type(a) is type(b) if isinstance(a, bool) or isinstance(b, bool) else a == b


def restore_optimizer_settings(path: Path, optimizer, fresh: list[dict]) -> None:
    """Refuse a checkpoint whose AdamW settings differ from the run's (another run's, or edited: a
    `maximize` would turn training into gradient ascent), then put the run's own settings back."""
    if len(optimizer.param_groups) != len(fresh):
        raise CheckpointError(
            f"{path / 'trainer_state.pt'} holds {len(optimizer.param_groups)} optimizer parameter groups, "
            f"not {len(fresh)}: the checkpoint belongs to another run or was edited."
        )
    for group, mine in zip(optimizer.param_groups, fresh):
        for key in OPTIMIZER_KEYS:
            if key in mine and not _same(group.get(key), mine[key]):
                raise CheckpointError(
                    f"{path / 'trainer_state.pt'} holds the optimizer setting {key}={group.get(key)!r} where "
                    f"this run has {mine[key]!r}: the checkpoint belongs to another run or was edited."
                )
        group.update(mine)


def _scheduler_ok(loaded, fresh: dict) -> bool:
    """The scheduler state has exactly the entries, types and lengths of the run's own (LambdaLR copies
    every entry into itself)."""
    if not isinstance(loaded, dict) or set(loaded) != set(fresh):
        return False
    for key, want in fresh.items():
        got = loaded[key]
        if type(got) is not type(want):
            return False
        if isinstance(want, list):
            if len(got) != len(want):
                return False
            for g, w in zip(got, want):
                if isinstance(w, dict):
                    if not isinstance(g, dict) or set(g) != set(w) or not all(is_finite(v) for v in g.values()):
                        return False
                elif not is_finite(g):
                    return False
    return True


def load_state(path: Path, rank: int, optimizer, scheduler, fresh: list[dict], sharded: bool = False) -> None:
    """Restore optimizer, scheduler and this rank's RNG from their files.  `fresh`: the optimizer's settings
    before anything was loaded (optimizer_settings); `sharded`: an --fsdp run, whose optimizer state
    trainer/fsdp.py loaded already.  The JSON state is trainer.resume.CheckpointState's to read and check."""
    rng_file = path / f"rng-rank{rank}.pt"
    if not rng_file.is_file():  # without it the run would not continue exactly: refuse, don't guess
        raise CheckpointError(
            f"{path} has no {rng_file.name}, so process {rank} cannot continue exactly; "
            "the checkpoint is incomplete or from another number of processes."
        )
    tensors = _load(path / "trainer_state.pt")
    file = path / "trainer_state.pt"
    if not isinstance(tensors, dict) or not _scheduler_ok(tensors.get("scheduler"), scheduler.state_dict()):
        raise CheckpointError(
            f"{file} holds no learning-rate schedule of this run's form: the checkpoint belongs to "
            "another run or was edited."
        )
    if "optimizer" in tensors and not sharded:
        try:
            optimizer.load_state_dict(tensors["optimizer"])
        except Exception as exc:
            raise CheckpointError(
                f"{file} holds an optimizer state that does not fit this model "
                f"({(str(exc).splitlines() or [type(exc).__name__])[0]}): the checkpoint belongs to "
                "another run or was edited."
            ) from None
    elif not sharded:
        raise CheckpointError(
            f"{file} holds no optimizer state (an --fsdp checkpoint keeps it sharded): the checkpoint is "
            "from a run with other settings or was edited."
        )
    restore_optimizer_settings(path, optimizer, fresh)
    scheduler.load_state_dict(tensors["scheduler"])
    rng = _load(rng_file)
    try:
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    except Exception:
        raise CheckpointError(
            f"{rng_file} holds no random-number-generator state torch accepts: the checkpoint was edited or damaged."
        ) from None


def sweep(out) -> list[str]:
    """Rank 0, holding RUN_DIR/.lock, when a run starts: what an interrupted save left behind.  Half-written
    checkpoints (checkpoints/.tmp-step-*) and exports (.tmp-model, .tmp-adapter) are removed; an
    export interrupted between its two renames, whose finished folder then exists only as .old-NAME, is
    put back.  Returns a note per thing done."""
    out = Path(out)
    notes = []
    for tmp in sorted(checkpoints_dir(out).glob(".tmp-step-*")) + [out / ".tmp-model", out / ".tmp-adapter"]:
        if tmp.exists() or tmp.is_symlink():
            remove(tmp)
            notes.append(f"removed {tmp}, a save that was interrupted")
    for name in ("model", "adapter"):
        final, old = out / name, out / f".old-{name}"
        if old.is_dir() and not old.is_symlink() and not (final.exists() or final.is_symlink()):
            os.rename(old, final)
            notes.append(f"put back {final}: its replacement was interrupted")
        elif old.exists() or old.is_symlink():
            remove(old)
            notes.append(f"removed {old}, the previous {name} of a replacement that was interrupted")
    return notes


def _replace_dir(out, name: str, model, tokenizer) -> Path:
    """RUN_DIR/name <- save_pretrained(model, tokenizer), written aside and renamed into place (the
    previous one, if any, is kept until the new one is complete).  RUN_DIR is a run directory
    (trainer.preflight.check_run_dir): what is replaced is the run's own output."""
    final, tmp, old = Path(out) / name, Path(out) / f".tmp-{name}", Path(out) / f".old-{name}"
    check_output_dir(final)  # a link or a file there is not the run's to replace
    remove(tmp)  # never save through a symlink into somewhere else
    save_pretrained(model, tokenizer, tmp)
    remove(old)
    if final.exists() or final.is_symlink():
        os.rename(final, old)
    os.rename(tmp, final)
    remove(old)
    return final


def save_adapter(out, model, tokenizer) -> Path:
    """RUN_DIR/adapter: the peft adapter alone (adapter_config.json + adapter_model.safetensors),
    which PeftModel.from_pretrained(base, dir) loads; replaced atomically."""
    return _replace_dir(out, "adapter", model, tokenizer)


def save_final(out, model, tokenizer, dtype: torch.dtype | None = None, use_cache: bool | None = None) -> Path:
    """RUN_DIR/model: the final weights (LoRA merged into the base), replaced atomically, in
    `dtype` (the one the model was loaded in; training runs in fp32) and with the model's own
    `use_cache` (training turns it off).  Training is over: the model is cast in place."""
    if hasattr(model, "merge_and_unload"):  # peft: ship a plain model; training is over
        model = model.merge_and_unload()
    if dtype is not None:
        model = model.to(dtype)
    if use_cache is not None:
        model.config.use_cache = use_cache
    return _replace_dir(out, "model", model, tokenizer)
