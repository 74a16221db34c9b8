"""Catch the operations that make the host wait for a CUDA device, on any device (CPU included).

Input: code run inside `with NoHostSync():` (or `NoHostSync(record=True)` to list them all instead;
`allow`: source files, by path suffix, whose syncs are let through, e.g. a library's own).
Output: `HostSyncError` at the first operation whose result size or value the host must read back from a
GPU before it can go on -- .item() / float() / int() / bool() of a tensor (aten._local_scalar_dense),
nonzero and argwhere, unique, masked_select, indexing or index_put with a boolean mask, bincount,
repeat_interleave without output_size, aten.equal, and copies from a device to the CPU.  On a CPU run those
ops are cheap, so the check finds, on a laptop, what would stall a GPU step; it cannot see a CPU tensor's
.cpu() or .tolist() (no-ops on a CPU tensor), which torch.cuda.set_sync_debug_mode("error") does on a GPU.
Cost: one Python call per aten op inside the block (debugging and tests only).
"""

from __future__ import annotations

import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sftgo.core.errors import SftgoError

_ALWAYS = {
    "aten::_local_scalar_dense",
    "aten::nonzero",
    "aten::nonzero_numpy",
    "aten::argwhere",
    "aten::masked_select",
    "aten::bincount",
    "aten::equal",
    "aten::_unique",
    "aten::_unique2",
    "aten::unique_dim",
    "aten::unique_consecutive",
    "aten::unique_dim_consecutive",
}
_MASK_INDEXED = {"aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"}
_COPIES = {"aten::_to_copy", "aten::copy_", "aten::to"}


class HostSyncError(SftgoError):
    """An operation that makes the host wait for the device ran where none may."""


def _is_bool(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8)


def why_it_syncs(func, args, kwargs) -> str | None:
    """A short reason when `func(*args, **kwargs)` waits for a CUDA device, else None."""
    name = func._schema.name
    if name in _ALWAYS:
        return name
    if name in _MASK_INDEXED and len(args) > 1 and any(_is_bool(i) for i in (args[1] or ()) if i is not None):
        return f"{name} with a boolean mask"
    if name == "aten::repeat_interleave" and kwargs.get("output_size") is None:
        return f"{name} without output_size"
    if name in _COPIES:
        src = args[1] if name == "aten::copy_" else args[0]
        dst = args[0].device if name == "aten::copy_" else kwargs.get("device")
        if isinstance(src, torch.Tensor) and src.device.type != "cpu" and dst is not None:
            if torch.device(dst).type == "cpu":
                return f"{name} from {src.device.type} to the CPU"
    return None


class NoHostSync(TorchDispatchMode):
    """Raise HostSyncError on an op that waits for the device; with record=True, list them in `.caught`;
    one called from a file ending in one of `allow` is let through and listed in `.allowed`."""

    def __init__(self, record: bool = False, allow: tuple[str, ...] = ()):
        super().__init__()
        self.record, self.allow = record, allow
        self.caught: list[str] = []
        self.allowed: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        reason = why_it_syncs(func, args, kwargs)
        if reason is not None and self.allow:
            frames = traceback.extract_stack()
            site = next((f for f in reversed(frames) if f.filename.endswith(self.allow)), None)
            if site is not None:
                self.allowed.append(f"{reason} at {site.filename}:{site.lineno}")
                reason = None
        if reason is not None:
            if not self.record:
                raise HostSyncError(f"{reason} makes the host wait for the device inside a sync-free block.")
            self.caught.append(reason)
        return func(*args, **kwargs)
