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

From a store (a `cache`, core.remote.ShardCache, for a --data URL) each rank reads whole shards instead: those at
positions rank, rank + world_size, ... of the epoch's shard order, downloaded a few ahead and deleted once read, so
a rank downloads only its own shards (a build needs at least as many shards as processes).  With one process the
order is the same as from a local folder; with several, each rank's samples differ from the local split.
"""

from __future__ import annotations

import contextlib
import queue
import random
import threading
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from sftgo.core import storage
from sftgo.core.shards import ShardError, column_strategy

READ_ROWS = 512  # rows per Parquet record batch


def check_tokens(
    mask: np.ndarray, groups: np.ndarray | None, k: int | None, where: str, column: str = "groups"
) -> None:
    """Refuse token columns that contradict the shard contract, vectorised over any number of rows: loss_mask
    holds 0 (not trained) or 1 (trained); the group is -1 exactly where loss_mask is 0 and in 0..K-1 where
    it is 1.  `where` names the rows (a shard, a sample) in the one-sentence ShardError."""
    bad = (mask != 0) & (mask != 1)
    if bad.any():
        raise ShardError(
            f"{where} has loss_mask value {mask[bad][0]}; only 0 (not trained) and 1 (trained) are "
            "valid: the shard was damaged or not written by sftgo-prep."
        )
    if groups is None:
        return
    trained = mask == 1
    if (groups[~trained] != -1).any():
        value = groups[~trained][groups[~trained] != -1][0]
        raise ShardError(
            f"{where} gives group {value} in '{column}' to a token that loss_mask does not train "
            "(it must be -1 there): the shard contradicts its own loss_mask."
        )
    ids = groups[trained]
    wrong = (ids < 0) | (ids >= k) if k is not None else ids < 0
    if wrong.any():
        allowed = f"0..{k - 1}" if k is not None else "0 or more"
        raise ShardError(
            f"{where} has a trained token with group {ids[wrong][0]} in '{column}', not one of {allowed} "
            "as the manifest declares: its tokens would be dropped or trained as a group that does "
            "not exist."
        )


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
        cache=None,
    ):
        self.dir = Path(data_dir)
        self.location = str(data_dir)
        self.cache = cache  # a core.remote.ShardCache when data_dir is a store URL
        self.shards = [s["path"] for s in manifest["shards"]]
        self.group_column = group_column
        strategy = manifest.get("strategies", {}).get(column_strategy(group_column)) if group_column else None
        self.num_groups = int(strategy.get("num_groups", 2)) if isinstance(strategy, dict) else None
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle, self.shuffle_buffer, self.readahead = shuffle, shuffle_buffer, readahead

    def shard_order(self, epoch: int) -> list[str]:
        order = list(self.shards)
        if self.shuffle:
            _rng(self.seed, epoch).shuffle(order)
        return order

    def _record_batches(self, epoch: int, columns: list[str]):
        if self.cache is not None:
            yield from self._cached_record_batches(epoch, columns)
            return
        for path in self.shard_order(epoch):
            for rb in pq.ParquetFile(self.dir / path).iter_batches(batch_size=READ_ROWS, columns=columns):
                yield path, rb

    def _cached_record_batches(self, epoch: int, columns: list[str]):
        """From a store: this rank's whole shards (every world_size-th of the epoch's order), each downloaded
        through the cache and deleted once read."""
        mine = self.shard_order(epoch)[self.rank :: self.world_size]
        with contextlib.closing(self.cache.local_paths(mine)) as local:
            for path, file in zip(mine, local):
                for rb in pq.ParquetFile(file).iter_batches(batch_size=READ_ROWS, columns=columns):
                    yield path, rb

    def where(self, path: str):
        """How messages name shard `path`."""
        return self.dir / path if self.cache is None else storage.join(self.location, path)

    def _columns(self, path: str, rb, names) -> dict:
        """{name: (offsets, values)} of list columns of record batch `rb`, checked against the shard contract
        (in the reader thread: a contradiction reaches the loop as the ShardError naming the shard)."""
        where = f"Shard {self.where(path)}"
        cols = {}
        for name in names:
            arr = rb.column(name)
            if arr.null_count or arr.values.null_count:
                raise ShardError(
                    f"{where} has missing values in column '{name}': the shard was damaged or not written "
                    "by sftgo-prep."
                )
            off = arr.offsets.to_numpy()
            cols[name] = (off, arr.values.to_numpy(zero_copy_only=False))
        lengths = {name: np.diff(off) for name, (off, _) in cols.items()}
        first = next(iter(lengths.values()))
        for n in lengths.values():
            if not np.array_equal(n, first):
                row = int(np.flatnonzero(n != first)[0])
                raise ShardError(
                    f"{where}: in row {row} of a record batch, {', '.join(lengths)} differ in length; "
                    "every token needs its loss_mask (and group)."
                )
        flat = {name: vals[off[0] : off[-1]] for name, (off, vals) in cols.items()}
        group = self.group_column if self.group_column in flat else None
        check_tokens(
            flat["loss_mask"], flat[group] if group else None, self.num_groups, where, column=group or "groups"
        )
        return cols

    def _rows(self, epoch: int, lengths_only: bool):
        columns = ["loss_mask"] if lengths_only else ["id", "input_ids", "loss_mask"]
        if not lengths_only and self.group_column:
            columns.append(self.group_column)
        index = 0  # global row index in this epoch's order
        share, rank = (self.world_size, self.rank) if self.cache is None else (1, 0)  # a store: whole shards
        for path, rb in prefetch(self._record_batches(epoch, columns), self.readahead):
            n = rb.num_rows
            mine = [i for i in range(n) if (index + i) % share == rank]
            index += n
            if lengths_only:
                off, vals = self._columns(path, rb, ["loss_mask"])["loss_mask"]
                for i in mine:
                    yield {"length": int(off[i + 1] - off[i]), "loss_mask": vals[off[i] : off[i + 1]]}
                continue
            ids = rb.column("id").to_pylist()
            cols = self._columns(
                path, rb, ["input_ids", "loss_mask"] + ([self.group_column] if self.group_column else [])
            )
            for i in mine:
                sample = {"id": ids[i]}
                for name, (off, vals) in cols.items():
                    sample[name] = vals[off[i] : off[i + 1]]
                mask = sample["loss_mask"]
                if self.group_column:  # checked: -1 exactly where the mask is 0
                    sample["groups"] = sample.pop(self.group_column).astype(np.int8)
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
