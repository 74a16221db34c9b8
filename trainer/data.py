"""Stream samples from sftgo shards: seeded shuffling, disjoint per rank, bounded memory.

Input: a shard directory (its manifest), the columns to read, seed/epoch, rank/world size.
Output: an iterator of samples, dicts of numpy arrays:
    {"id", "length", "input_ids" int32[L], "loss_mask" int8[L], "groups" int8[L]}
(`lengths_only=True` yields {"length", "loss_mask"} only: the dry pass that counts steps per
epoch, which needs the mask to know which samples truncation leaves without a target).
Cost: one background thread decodes Parquet record batches (pyarrow releases the GIL);
memory is bounded by `readahead` record batches plus `shuffle_buffer` samples, whatever
the size of the data.

Order: the shard order is permuted per (seed, epoch); rows are read in file order and the
global row index i goes to rank i % world_size, so ranks see disjoint samples of the same
global order (each rank decodes all shards' columns but keeps 1/world of the rows: Parquet
decoding is cheap next to a training step, and this keeps ranks' sample counts within one).
A shuffle buffer (seeded per seed/epoch/rank) then mixes rows across record batches and
shards.  There are no DataLoader workers: tokenized shards need no CPU-heavy transform, so
one reader thread per rank keeps up, and disjointness is per rank.
"""
from __future__ import annotations

import queue
import random
import threading
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

READ_ROWS = 512  # rows per Parquet record batch


def _rng(*key) -> random.Random:
    return random.Random(hash_key(*key))


def hash_key(*key) -> int:
    """A stable integer seed from a tuple of ints (Python's hash() of tuples is stable for ints)."""
    h = 1469598103934665603
    for k in key:
        h = ((h ^ (int(k) & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h


def prefetch(iterable, depth: int):
    """Iterate `iterable` in a background thread, at most `depth` items ahead.
    Closing the returned generator stops the thread and waits for it: a reader thread still
    inside pyarrow when the interpreter exits can abort the process ("terminate called
    without an active exception")."""
    if depth <= 0:
        yield from iterable
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        """Queue item unless the consumer has gone (never block past `stop`)."""
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for item in iterable:
                if not put(item):
                    return
            put(done)
        except BaseException as exc:  # hand reader errors to the consumer
            put(exc)

    thread = threading.Thread(target=work, daemon=True, name="sftgo-prefetch")
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=60)  # it sees `stop` within 0.1 s of finishing the batch it is reading


class ShardStream:
    """The samples of one rank, for one epoch at a time."""

    def __init__(
        self,
        data_dir: str,
        manifest: dict,
        group_column: str | None,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        shuffle_buffer: int = 1024,
        readahead: int = 2,
    ):
        self.dir = Path(data_dir)
        self.shards = [s["path"] for s in manifest["shards"]]
        self.group_column = group_column
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle, self.shuffle_buffer, self.readahead = shuffle, shuffle_buffer, readahead

    def shard_order(self, epoch: int) -> list[str]:
        order = list(self.shards)
        if self.shuffle:
            _rng(self.seed, epoch).shuffle(order)
        return order

    def _record_batches(self, epoch: int, columns: list[str]):
        for path in self.shard_order(epoch):
            yield from pq.ParquetFile(self.dir / path).iter_batches(batch_size=READ_ROWS, columns=columns)

    def _rows(self, epoch: int, lengths_only: bool):
        columns = ["loss_mask"] if lengths_only else ["id", "input_ids", "loss_mask"]
        if not lengths_only and self.group_column:
            columns.append(self.group_column)
        index = 0  # global row index in this epoch's order
        for rb in prefetch(self._record_batches(epoch, columns), self.readahead):
            n = rb.num_rows
            mine = [i for i in range(n) if (index + i) % self.world_size == self.rank]
            index += n
            if lengths_only:
                arr = rb.column("loss_mask")
                off, vals = arr.offsets.to_numpy(), arr.values.to_numpy(zero_copy_only=False)
                for i in mine:
                    yield {"length": int(off[i + 1] - off[i]), "loss_mask": vals[off[i] : off[i + 1]]}
                continue
            ids = rb.column("id").to_pylist()
            cols = {}
            for name in ("input_ids", "loss_mask") + ((self.group_column,) if self.group_column else ()):
                arr = rb.column(name)
                cols[name] = (arr.offsets.to_numpy(), arr.values.to_numpy(zero_copy_only=False))
            for i in mine:
                sample = {"id": ids[i]}
                for name, (off, vals) in cols.items():
                    sample[name] = vals[off[i] : off[i + 1]]
                mask = sample["loss_mask"]
                if self.group_column:
                    groups = sample.pop(self.group_column)
                    # a token is grouped only where it is supervised
                    sample["groups"] = np.where(mask == 1, groups, -1).astype(np.int8)
                else:  # plain SFT: one group, 0, on every supervised token
                    sample["groups"] = np.where(mask == 1, 0, -1).astype(np.int8)
                sample["length"] = len(mask)
                yield sample

    def samples(self, epoch: int, lengths_only: bool = False):
        """This rank's samples for `epoch`, shuffled through the buffer when shuffling."""
        rows = self._rows(epoch, lengths_only)
        if not self.shuffle or self.shuffle_buffer <= 1:
            yield from rows
            return
        rng = _rng(self.seed, epoch, self.rank, 1)
        buf: list = []
        for row in rows:
            if len(buf) < self.shuffle_buffer:
                buf.append(row)
                continue
            j = rng.randrange(len(buf))
            buf[j], row = row, buf[j]
            yield row
        rng.shuffle(buf)
        yield from buf
