"""The supervised positions of a micro-batch, found on the host so the training step never asks the device.

Input: a batch's [B, T] targets, groups and sample ids (CPU tensors, as trainer.batching.collate makes them).
Output: a `Supervised`: int index tensors (the row-major position, target, group and dense sample id of every
supervised target, N of them) and the counts the step's denominators need (N, samples, tokens per group id),
as plain Python numbers.
Cost: O(B x T) on the host, once per micro-batch (at collate time, off the training step); moving the four
[N] tensors to the device is one small copy each.  The step then selects with index_select / index_add, whose
output sizes are known, instead of boolean masks, torch.unique or .item(), each of which makes the host wait
for the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE = -100


@dataclass(frozen=True)
class Supervised:
    index: torch.Tensor
    """int64 [N]: row-major position (row * T + column) of each supervised target."""
    targets: torch.Tensor
    """int64 [N]: the token predicted there."""
    groups: torch.Tensor
    """int64 [N]: its group id (>= 0)."""
    samples: torch.Tensor
    """int64 [N]: its sample, numbered 0..num_samples-1 in the order of the batch's sample ids."""
    num_samples: int
    """Samples with at least one supervised target."""
    group_tokens: tuple[int, ...]
    """Supervised targets per group id 0..(largest id present); empty when nothing is supervised."""

    @property
    def num_targets(self) -> int:
        return int(self.index.numel())

    def to(self, device) -> Supervised:
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return Supervised(
            move(self.index),
            move(self.targets),
            move(self.groups),
            move(self.samples),
            self.num_samples,
            self.group_tokens,
        )

    def pin_memory(self) -> Supervised:
        pin = lambda t: t.pin_memory()  # noqa: E731
        return Supervised(
            pin(self.index),
            pin(self.targets),
            pin(self.groups),
            pin(self.samples),
            self.num_samples,
            self.group_tokens,
        )


def find(targets: torch.Tensor, groups: torch.Tensor, segments: torch.Tensor) -> Supervised:
    """The supervised targets (target != IGNORE) of a [B, T] batch; host tensors expected (a device
    tensor works too, at the cost of the syncs this module exists to avoid)."""
    targets, groups, segments = (t.detach().cpu() for t in (targets, groups, segments))
    flat = targets.reshape(-1)
    index = torch.nonzero(flat != IGNORE).reshape(-1)
    grp = groups.reshape(-1)[index]
    seg = segments.reshape(-1)[index]
    distinct, dense = torch.unique(seg, return_inverse=True)  # sorted: the objectives' order of samples
    counts = torch.bincount(grp) if grp.numel() else torch.zeros(0, dtype=torch.long)
    return Supervised(
        index,
        flat[index].contiguous(),
        grp.contiguous(),
        dense.reshape(-1).contiguous(),
        int(distinct.numel()),
        tuple(int(c) for c in counts.tolist()),
    )
