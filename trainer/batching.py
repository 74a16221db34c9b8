"""Turn a sample stream into micro-batches under a token budget, and collate them to tensors.

Input: samples from `trainer.data.ShardStream` (dicts with numpy token, mask and group arrays).
Output: `Batch` objects: padded [B, T] tensors (or one flat padding-free row [1, total] with
its samples' boundaries) with next-token targets, group ids and sample ids aligned to the
predicting position, plus the truncation counts of their samples.
Cost: O(tokens) numpy work per batch plus a sort per bucket pool; no model involvement.

Cutting (`fit`): a sample is cut only at `max_length`, never to fit a micro-batch; every cut
is counted (samples, and supervised tokens lost), and a sample left with no supervised
target is skipped and counted.  The counts ride on the batches, so one epoch's batches
account for every supervised token of the shards: trained + cut = the manifest's total.

Two groupings, each a list of rows holding lists of samples:
- bucketed padding: one sample per row; a pool of samples is sorted by length and cut into
  batches whose rows x longest length stays within `batch_tokens`, and the batches of the
  pool are emitted in a seeded random order (so the model doesn't see lengths in order).
  A sample longer than `batch_tokens` is a batch of its own (over the budget, not cut).
- packing: rows of `min(max_length, batch_tokens)` tokens, `batch_tokens // row` rows per
  batch, filled first-fit; position ids restart at 0 for every sample; a sample longer than
  the row is a batch of its own.  Attention between samples: we pass position_ids and no
  attention mask, and transformers (>= 4.56) derives a block-diagonal causal mask from the
  restarting position ids for sdpa/eager, and flash attention uses them natively; a test
  checks the packed outputs equal unpacked ones.
Padded batches pass no attention mask either: padding is on the right and attention is
causal, so real tokens never see pads (and sdpa keeps its fast is_causal path).

Two layouts of a micro-batch's tensors (`collate`):
- rows [B, T]: each row's samples side by side, padded on the right to the longest row.
- padding-free (`flat=True`): the same micro-batch (the same grouping, budget and samples) as
  one flat row [1, total] of whole samples, no padding at all; position ids restart per
  sample, and `cu_seqlens` (int32 [S+1], the cumulative sample lengths) and `max_seqlen`
  (the longest sample, a Python int) are computed here on the host.  The model attends
  with trainer.attention (varlen kernels: no mask, no padding, each sample only itself), to
  which `Batch.attention_kwargs()` hands the segments.  With --pack the flat row holds about
  `batch_tokens` tokens; with bucketing, the bucket's samples without their padding.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from sftgo.core.shards import ShardError
from sftgo.trainer.attention import segment_kwargs
from sftgo.trainer.data import hash_key
from sftgo.trainer.supervised import Supervised, find

IGNORE = -100
ARRAYS = ("input_ids", "loss_mask", "groups")


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] long
    position_ids: torch.Tensor | None  # [B, T] long when packed or flat, else None
    targets: torch.Tensor  # [B, T] long: token predicted at each position, IGNORE if not supervised
    groups: torch.Tensor  # [B, T] long: group of that target, -1 if not supervised
    segments: torch.Tensor  # [B, T] long: batch-local sample id of that target (unique per sample)
    num_tokens: int  # real (non-pad) tokens
    num_samples: int
    truncated_samples: int = 0  # samples of this batch cut at max_length
    truncated_loss_tokens: int = 0  # supervised tokens those cuts removed
    skipped_samples: int = 0  # samples before these that had no supervised token left (not trained)
    cu_seqlens: torch.Tensor | None = None  # flat layout: int32 [S+1] cumulative sample lengths, else None
    max_seqlen: int = 0  # flat layout: the longest sample
    sup: Supervised | None = None  # the supervised targets as index tensors and host counts (trainer.supervised)

    def attention_kwargs(self) -> dict:
        """What the model's forward passes to the attention besides the ids: the flat row's segments, or nothing."""
        return {} if self.cu_seqlens is None else segment_kwargs(self.cu_seqlens, self.max_seqlen)

    def __post_init__(self):
        if self.sup is None and self.targets.device.type == "cpu":  # on the host: found here, not in the step
            self.sup = find(self.targets, self.groups, self.segments, self.input_ids)

    def pin_memory(self) -> Batch:
        """The same batch in page-locked host memory, so a non_blocking copy to a GPU is asynchronous."""
        return self._map(lambda t: t.pin_memory(), None if self.sup is None else self.sup.pin_memory())

    def to(self, device):
        return self._map(lambda t: t.to(device, non_blocking=True), None if self.sup is None else self.sup.to(device))

    def _map(self, fn, sup):
        move = lambda t: None if t is None else fn(t)  # noqa: E731
        return Batch(
            move(self.input_ids),
            move(self.position_ids),
            move(self.targets),
            move(self.groups),
            move(self.segments),
            self.num_tokens,
            self.num_samples,
            self.truncated_samples,
            self.truncated_loss_tokens,
            self.skipped_samples,
            move(self.cu_seqlens),
            self.max_seqlen,
            sup,
        )


def fit(samples, max_length: int):
    """Samples cut to `max_length` (the only cut); those with no supervised target left are
    skipped.  Each kept sample carries "cut": [samples truncated, supervised tokens cut, samples
    skipped] since the previous kept sample (itself included); what follows the last kept
    sample rides on it (one sample of look-ahead), so nothing counted is lost."""
    held, pending = None, [0, 0, 0]
    for s in samples:
        mask = s["loss_mask"]
        if len(mask) > max_length:
            pending[0] += 1
            pending[1] += int((mask[max_length:] == 1).sum())
            s = {k: (v[:max_length] if k in ARRAYS else v) for k, v in s.items()}
            s["length"] = max_length
        if not (s["loss_mask"][1:] == 1).any():  # the first token is never a target
            pending[2] += 1
            continue
        s["cut"], pending = pending, [0, 0, 0]
        if held is not None:
            yield held
        held = s
    if held is not None:
        held["cut"] = [a + b for a, b in zip(held["cut"], pending)]
        yield held


def bucketed(samples, batch_tokens: int, pool_batches: int, rng: random.Random):
    """Yield lists of rows (each row a one-sample list), rows x longest <= batch_tokens, or a
    single row when that one sample is longer than the budget."""
    pool_tokens = pool_batches * batch_tokens

    def flush(pool):
        pool.sort(key=lambda s: s["length"])
        batches, cur = [], []
        for s in pool:
            if cur and (len(cur) + 1) * s["length"] > batch_tokens:  # sorted ascending: the new longest
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
        tokens += s["length"]
        if tokens >= pool_tokens:
            yield from flush(pool)
            pool, tokens = [], 0
    if pool:
        yield from flush(pool)


def packed(samples, batch_tokens: int, max_length: int):
    """Yield lists of rows, each row several samples whose lengths sum to <= the row length; a
    sample longer than the row is a batch of one row of its own."""
    limit = min(max_length, batch_tokens)
    n_rows = max(1, batch_tokens // limit)
    rows: list[list] = []
    used: list[int] = []
    for s in samples:
        n = s["length"]
        if n > limit:
            yield [[s]]
            continue
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


def collate(rows: list[list[dict]], pad_id: int, packed_rows: bool, flat: bool = False) -> Batch:
    """Concatenate each row's samples (already `fit`), pad on the right, align next-token targets.
    flat: all the rows' samples in one row with no padding, and their boundaries (padding-free)."""
    if flat:
        rows, packed_rows = [[s for row in rows for s in row]], True
    width = max(sum(s["length"] for s in row) for row in rows)
    B = len(rows)
    ids = np.full((B, width), pad_id, dtype=np.int64)
    mask = np.zeros((B, width), dtype=bool)
    grp = np.full((B, width), -1, dtype=np.int64)
    seg = np.full((B, width), -1, dtype=np.int64)
    pos = np.zeros((B, width), dtype=np.int64)
    n_samples = n_tokens = 0
    cut = [0, 0, 0]
    for r, row in enumerate(rows):
        at = 0
        for s in row:
            n = s["length"]
            ids[r, at : at + n] = s["input_ids"]
            mask[r, at : at + n] = s["loss_mask"] == 1
            grp[r, at : at + n] = s["groups"]
            seg[r, at : at + n] = n_samples
            pos[r, at : at + n] = np.arange(n)
            at += n
            n_samples += 1
            cut = [a + b for a, b in zip(cut, s.get("cut", (0, 0, 0)))]
        n_tokens += at
        if packed_rows and at < width:  # the padding tail is a sequence of its own
            pos[r, at:] = np.arange(width - at)
    if (mask & (grp < 0)).any():  # never dropped silently (trainer.data.check_tokens refuses such shards)
        raise ShardError("A trained token (loss_mask 1) has no group (-1); every trained token needs a group id.")
    # position p predicts token p+1; it is supervised iff token p+1 is, within the same sample
    sup = mask[:, 1:] & (seg[:, 1:] == seg[:, :-1])
    targets = np.full((B, width), IGNORE, dtype=np.int64)
    targets[:, :-1] = np.where(sup, ids[:, 1:], IGNORE)
    groups = np.full((B, width), -1, dtype=np.int64)
    groups[:, :-1] = np.where(sup, grp[:, 1:], -1)
    segments = np.full((B, width), -1, dtype=np.int64)
    segments[:, :-1] = np.where(sup, seg[:, 1:], -1)
    cu_seqlens, max_seqlen = None, 0
    if flat:
        lengths = [s["length"] for s in rows[0]]
        cu_seqlens = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
        max_seqlen = max(lengths)
    return Batch(
        torch.from_numpy(ids),
        torch.from_numpy(pos) if packed_rows else None,
        torch.from_numpy(targets),
        torch.from_numpy(groups),
        torch.from_numpy(segments),
        n_tokens,
        n_samples,
        *cut,
        cu_seqlens,
        max_seqlen,
    )


class Batches:
    """Endless micro-batches of one rank, epoch after epoch, with a resumable position.

    `position` = (epoch, micro-batches already taken in that epoch).  The pipeline is
    deterministic given (seed, epoch, rank), so resuming rebuilds it and skips that many
    batches: exact, at the cost of re-reading (not re-training on) the skipped data.
    """

    def __init__(
        self, stream, *, batch_tokens, max_length, pack, pool_batches, seed, pad_id, rank=0, cycle=True, flat=False
    ):
        self.stream, self.flat = stream, flat
        self.batch_tokens, self.max_length, self.pack = batch_tokens, max_length, pack
        self.pool_batches, self.seed, self.pad_id, self.rank, self.cycle = pool_batches, seed, pad_id, rank, cycle
        self.position = (0, 0)

    def row_lists(self, epoch: int, lengths_only: bool = False):
        samples = fit(self.stream.samples(epoch, lengths_only=lengths_only), self.max_length)
        if self.pack:
            return packed(samples, self.batch_tokens, self.max_length)
        rng = random.Random(hash_key(self.seed, epoch, self.rank, 2))
        return bucketed(samples, self.batch_tokens, self.pool_batches, rng)

    def count(self, epoch: int = 0) -> int:
        """Micro-batches in `epoch`, from a dry pass over the lengths and masks only (cheap)."""
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
                yield collate(rows, self.pad_id, self.pack, self.flat)
            if not self.cycle:
                return
            if taken == 0:  # cycling over nothing would spin forever
                raise ShardError(
                    f"Process {self.rank} got no samples from the data: there are fewer records than processes."
                )
            epoch, skip = epoch + 1, 0
            self.position = (epoch, 0)
