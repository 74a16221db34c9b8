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
    distinct_ids: tuple[torch.Tensor, torch.Tensor] | None = None
    """(the batch's distinct input ids, sorted; each position's row in them, row-major): the in-place
    embedding gradient's grouping (trainer.model), when the input ids were given."""

    @property
    def num_targets(self) -> int:
        return int(self.index.numel())

    def to(self, device) -> Supervised:
        return self._map(lambda t: t.to(device, non_blocking=True))

    def pin_memory(self) -> Supervised:
        return self._map(lambda t: t.pin_memory())

    def _map(self, move) -> Supervised:
        return Supervised(
            move(self.index),
            move(self.targets),
            move(self.groups),
            move(self.samples),
            self.num_samples,
            self.group_tokens,
            None if self.distinct_ids is None else tuple(move(t) for t in self.distinct_ids),
        )


def find(targets: torch.Tensor, groups: torch.Tensor, segments: torch.Tensor, input_ids=None) -> Supervised:
    """The supervised targets (target != IGNORE) of a [B, T] batch, and with `input_ids` their distinct ids;
    host tensors expected (a device tensor works too, at the cost of the syncs this module exists to avoid)."""
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
        None if input_ids is None else _distinct(input_ids.detach().cpu()),
    )


def _distinct(input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    distinct, inverse = torch.unique(input_ids.reshape(-1), return_inverse=True)
    return distinct, inverse.reshape(-1)
