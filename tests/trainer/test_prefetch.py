"""trainer.prefetch: batches made ahead on a thread keep the exact resume position, raise the thread's error in
the caller, and stop (closing the data reader) when closed early."""

import threading

import pytest
import torch

from sftgo.core.shards import ShardError, group_column, read_manifest
from sftgo.trainer.batching import Batches
from sftgo.trainer.data import ShardStream
from sftgo.trainer.prefetch import Prefetch


@pytest.fixture
def batches(tmp_path, shardkit):
    d = shardkit.write_shards(tmp_path / "s", shardkit.make_records(40, 100, seed=0), rows_per_shard=16)

    def make():
        stream = ShardStream(str(d), read_manifest(d), group_column("tfidf"), seed=3, shuffle_buffer=16)
        return Batches(stream, batch_tokens=96, max_length=48, pack=False, pool_batches=3, seed=3, pad_id=0)

    return make


def test_the_position_is_the_last_batch_handed_out_and_resuming_there_is_exact(batches):
    per_epoch = batches().count(0)
    plain = iter(batches())
    want = [next(plain).input_ids.tolist() for _ in range(per_epoch + 4)]
    for k in (1, per_epoch, per_epoch + 1):  # inside an epoch, at its last batch, into the next
        source = batches()
        feed = Prefetch(source, torch.device("cpu"), depth=2)
        got = [next(feed).input_ids.tolist() for _ in range(k)]
        for _ in range(1000):  # the thread runs ahead: the source's position goes past the one handed out
            if source.position != feed.position:
                break
            threading.Event().wait(0.01)
        assert source.position != feed.position
        feed.close()
        assert got == want[:k]
        resumed = batches()
        resumed.position = feed.position
        it = iter(resumed)
        assert [next(it).input_ids.tolist() for _ in range(3)] == want[k : k + 3]


def test_an_error_in_the_thread_is_raised_in_the_caller_as_the_same_error(batches):
    error = ShardError("Shard shard-00001.parquet is corrupt.")

    class Failing:
        position = (0, 0)

        def __iter__(self):
            it = iter(batches())
            yield next(it)
            yield next(it)
            it.close()
            raise error

    feed = Prefetch(Failing(), torch.device("cpu"))
    next(feed), next(feed)
    with pytest.raises(ShardError) as caught:
        next(feed)
    assert caught.value is error
    with pytest.raises(StopIteration):
        next(feed)
    feed.close()


def test_close_stops_a_thread_waiting_on_a_full_queue_and_closes_the_reader(batches):
    closed = threading.Event()
    source = batches()

    class Watched:
        @property
        def position(self):
            return source.position

        def __iter__(self):
            try:
                yield from source
            finally:
                closed.set()

    feed = Prefetch(Watched(), torch.device("cpu"), depth=1)
    next(feed)
    feed.close()
    assert closed.is_set() and not feed._thread.is_alive()
