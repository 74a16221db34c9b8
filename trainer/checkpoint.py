"""Atomic training checkpoints and the final model directory.

Input: the model, tokenizer, optimizer, scheduler and the loop's own state.
Output: RUN_DIR/checkpoints/step-NNNNNNN/ holding
    model.safetensors + config.json (or a LoRA adapter), tokenizer files  -- `save_pretrained`,
        so `AutoModelForCausalLM.from_pretrained(dir)` loads the checkpoint as a model;
    trainer_state.pt   optimizer + scheduler tensors (torch.save of our own tensors only,
        loaded back with weights_only=True; nothing user-supplied is ever unpickled);
    trainer_state.json step, data position, objective state (Group-DRO weights, worst-group
        bookkeeping), the shards' sha256 lists (checked by --resume), truncation counts;
    rng-rank{R}.pt     torch (and CUDA) RNG state of each rank;
and RUN_DIR/checkpoints/latest naming the newest one.  Checkpoints stay fp32 (exact resume);
RUN_DIR/model is saved in the dtype the model was loaded in, with its own `use_cache`.
Atomicity: everything is written into a hidden temporary directory that is renamed into
place only when complete; `latest` is replaced atomically afterwards.  A crash at any point
leaves the previous checkpoint intact and `latest` pointing at a complete directory.
Cost: one write of the weights plus twice their size for AdamW moments.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from sftgo.core.shards import atomic_write_text
from sftgo.trainer.config import ConfigError

LATEST = "latest"


def checkpoints_dir(out: str | os.PathLike) -> Path:
    return Path(out) / "checkpoints"


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    pointer = checkpoints_dir(out) / LATEST
    if not pointer.is_file():
        return None
    path = checkpoints_dir(out) / pointer.read_text().strip()
    return path if path.is_dir() else None


def save_pretrained(model, tokenizer, path: Path) -> None:
    model.save_pretrained(path)  # safetensors by default
    tokenizer.save_pretrained(path)


def begin(out, step: int) -> Path:
    """Rank 0: a fresh temporary directory for checkpoint `step`."""
    tmp = checkpoints_dir(out) / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def write_main(tmp: Path, model, tokenizer, optimizer, scheduler, state: dict) -> None:
    """Rank 0: weights, tokenizer, optimizer/scheduler tensors and the JSON state.  model and
    optimizer None: an --fsdp checkpoint, whose ranks write them sharded (trainer/fsdp.py)."""
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
    if final.exists():  # e.g. re-saving the same step after a resume
        shutil.rmtree(final)
    os.rename(tmp, final)
    atomic_write_text(checkpoints_dir(out) / LATEST, final.name + "\n")
    done = sorted(p for p in checkpoints_dir(out).glob("step-*") if p.is_dir())
    for old in done[: max(0, len(done) - max(1, keep))]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(path: Path) -> dict:
    """The JSON state of checkpoint `path` (step, data position, shard checksums, ...)."""
    return json.loads((path / "trainer_state.json").read_text())


def load_state(path: Path, rank: int, optimizer, scheduler) -> dict:
    """Restore optimizer, scheduler and this rank's RNG; return the JSON state."""
    rng_file = path / f"rng-rank{rank}.pt"
    if not rng_file.is_file():  # without it the run would not continue exactly: refuse, don't guess
        raise ConfigError(f"{path} has no {rng_file.name}, so process {rank} cannot continue exactly; "
                          "the checkpoint is incomplete or from another number of processes.")
    tensors = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
    if "optimizer" in tensors:  # else an --fsdp checkpoint: trainer/fsdp.py loaded it already
        optimizer.load_state_dict(tensors["optimizer"])
    scheduler.load_state_dict(tensors["scheduler"])
    rng = torch.load(rng_file, map_location="cpu", weights_only=True)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return read_state(path)


def _replace_dir(out, name: str, model, tokenizer) -> Path:
    """RUN_DIR/name <- save_pretrained(model, tokenizer), written aside and renamed into place (the
    previous one, if any, is kept until the new one is complete)."""
    final, tmp, old = Path(out) / name, Path(out) / f".tmp-{name}", Path(out) / f".old-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(model, tokenizer, tmp)
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
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
