"""Turn a sample stream into micro-batches under a token budget, and collate them to tensors.

Input: samples from `trainer.data.ShardStream` (dicts with numpy token, mask and group arrays).
Output: `Batch` objects: padded [B, T] tensors with next-token targets, group ids and sample
ids aligned to the predicting position.
Cost: O(tokens) numpy work per batch plus a sort per bucket pool; no model involvement.

Two layouts, each a list of rows holding lists of samples:
- bucketed padding: one sample per row; a pool of samples is sorted by length and cut into
  batches whose rows x longest length stays within `batch_tokens`, and the batches of the
  pool are emitted in a seeded random order (so the model doesn't see lengths in order).
- packing: rows of `min(max_length, batch_tokens)` tokens, `batch_tokens // row` rows per
  batch, filled first-fit; position ids restart at 0 for every sample.  Attention between
  samples: we pass position_ids and no attention mask, and transformers (>= 4.56) derives a
  block-diagonal causal mask from the restarting position ids for sdpa/eager, and flash
  attention uses them natively; a test checks the packed outputs equal unpacked ones.
Padded batches pass no attention mask either: padding is on the right and attention is
causal, so real tokens never see pads (and sdpa keeps its fast is_causal path).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from sftgo.trainer.data import hash_key

IGNORE = -100


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] long
    position_ids: torch.Tensor | None  # [B, T] long when packed, else None
    targets: torch.Tensor  # [B, T] long: token predicted at each position, IGNORE if not supervised
    groups: torch.Tensor  # [B, T] long: group of that target, -1 if not supervised
    segments: torch.Tensor  # [B, T] long: batch-local sample id of that target (unique per sample)
    num_tokens: int  # real (non-pad) tokens
    num_samples: int

    def to(self, device):
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.input_ids), move(self.position_ids), move(self.targets), move(self.groups),
                     move(self.segments), self.num_tokens, self.num_samples)


def row_limit(batch_tokens: int, max_length: int) -> int:
    """The longest a sample (or a packed row) may be."""
    return min(max_length, batch_tokens)


def bucketed(samples, batch_tokens: int, max_length: int, pool_batches: int, rng: random.Random):
    """Yield lists of rows (each row a one-sample list), rows x longest <= batch_tokens."""
    limit = row_limit(batch_tokens, max_length)
    pool_tokens = pool_batches * batch_tokens

    def flush(pool):
        pool.sort(key=lambda s: min(s["length"], limit))
        batches, cur = [], []
        for s in pool:
            n = min(s["length"], limit)
            if cur and (len(cur) + 1) * n > batch_tokens:  # sorted ascending: n is the new longest
                batches.append(cur)
                cur = []
            cur.append([s])
        if cur:
            batches.append(cur)
        rng.shuffle(batches)
        return batches

    pool, tokens = [], 0
    for s in samples:
        pool.append(s)
        tokens += min(s["length"], limit)
        if tokens >= pool_tokens:
            yield from flush(pool)
            pool, tokens = [], 0
    if pool:
        yield from flush(pool)


def packed(samples, batch_tokens: int, max_length: int):
    """Yield lists of rows, each row several samples whose lengths sum to <= the row length."""
    limit = row_limit(batch_tokens, max_length)
    n_rows = max(1, batch_tokens // limit)
    rows: list[list] = []
    used: list[int] = []
    for s in samples:
        n = min(s["length"], limit)
        for i, u in enumerate(used):  # first fit among the open rows
            if u + n <= limit:
                rows[i].append(s)
                used[i] += n
                break
        else:
            if len(rows) == n_rows:
                yield rows
                rows, used = [], []
            rows.append([s])
            used.append(n)
    if rows:
        yield rows


def collate(rows: list[list[dict]], pad_id: int, max_length: int, batch_tokens: int, packed_rows: bool) -> Batch:
    """Concatenate each row's samples, pad on the right, and align next-token targets."""
    limit = row_limit(batch_tokens, max_length)
    width = max(sum(min(s["length"], limit) for s in row) for row in rows)
    B = len(rows)
    ids = np.full((B, width), pad_id, dtype=np.int64)
    mask = np.zeros((B, width), dtype=bool)
    grp = np.full((B, width), -1, dtype=np.int64)
    seg = np.full((B, width), -1, dtype=np.int64)
    pos = np.zeros((B, width), dtype=np.int64)
    n_samples = n_tokens = 0
    for r, row in enumerate(rows):
        at = 0
        for s in row:
            n = min(s["length"], limit)
            ids[r, at : at + n] = s["input_ids"][:n]
            mask[r, at : at + n] = s["loss_mask"][:n] == 1
            grp[r, at : at + n] = s["groups"][:n]
            seg[r, at : at + n] = n_samples
            pos[r, at : at + n] = np.arange(n)
            at += n
            n_samples += 1
        n_tokens += at
        if packed_rows and at < width:  # the padding tail is a sequence of its own
            pos[r, at:] = np.arange(width - at)
    # position p predicts token p+1; it is supervised iff token p+1 is, within the same sample
    sup = mask[:, 1:] & (seg[:, 1:] == seg[:, :-1]) & (grp[:, 1:] >= 0)
    targets = np.full((B, width), IGNORE, dtype=np.int64)
    targets[:, :-1] = np.where(sup, ids[:, 1:], IGNORE)
    groups = np.full((B, width), -1, dtype=np.int64)
    groups[:, :-1] = np.where(sup, grp[:, 1:], -1)
    segments = np.full((B, width), -1, dtype=np.int64)
    segments[:, :-1] = np.where(sup, seg[:, 1:], -1)
    return Batch(
        torch.from_numpy(ids),
        torch.from_numpy(pos) if packed_rows else None,
        torch.from_numpy(targets),
        torch.from_numpy(groups),
        torch.from_numpy(segments),
        n_tokens,
        n_samples,
    )


class Batches:
    """Endless micro-batches of one rank, epoch after epoch, with a resumable position.

    `position` = (epoch, micro-batches already taken in that epoch).  The pipeline is
    deterministic given (seed, epoch, rank), so resuming rebuilds it and skips that many
    batches: exact, at the cost of re-reading (not re-training on) the skipped data.
    """

    def __init__(self, stream, *, batch_tokens, max_length, pack, pool_batches, seed, pad_id, rank=0, cycle=True):
        self.stream = stream
        self.batch_tokens, self.max_length, self.pack = batch_tokens, max_length, pack
        self.pool_batches, self.seed, self.pad_id, self.rank, self.cycle = pool_batches, seed, pad_id, rank, cycle
        self.position = (0, 0)

    def row_lists(self, epoch: int, lengths_only: bool = False):
        samples = self.stream.samples(epoch, lengths_only=lengths_only)
        if self.pack:
            return packed(samples, self.batch_tokens, self.max_length)
        rng = random.Random(hash_key(self.seed, epoch, self.rank, 2))
        return bucketed(samples, self.batch_tokens, self.max_length, self.pool_batches, rng)

    def count(self, epoch: int = 0) -> int:
        """Micro-batches in `epoch`, from a dry pass over the lengths only (cheap)."""
        return sum(1 for _ in self.row_lists(epoch, lengths_only=True))

    def __iter__(self):
        epoch, skip = self.position
        while True:
            taken = 0
            for rows in self.row_lists(epoch):
                if taken < skip:
                    taken += 1
                    continue
                taken += 1
                self.position = (epoch, taken)
                yield collate(rows, self.pad_id, self.max_length, self.batch_tokens, self.pack)
            if not self.cycle:
                return
            if taken == 0:  # cycling over nothing would spin forever
                raise ValueError(f"Process {self.rank} got no samples from the data: there are fewer records than processes.")
            epoch, skip = epoch + 1, 0
            self.position = (epoch, 0)
