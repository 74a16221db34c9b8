"""Streaming, batching and collation: determinism, disjoint ranks, budgets, alignment, resume position."""

import random

import numpy as np
import pytest

from sftgo.core.shards import group_column, read_manifest
from sftgo.trainer.batching import IGNORE, Batches, bucketed, collate, fit, packed
from sftgo.trainer.data import ShardStream, prefetch


@pytest.fixture
def shards(tmp_path, shardkit):
    return shardkit.write_shards(tmp_path / "s", shardkit.make_records(70, 100, seed=0), rows_per_shard=16)


def stream(d, **kw):
    return ShardStream(str(d), read_manifest(d), group_column("tfidf"), **kw)


def ids(samples):
    return [s["id"] for s in samples]


def test_stream_is_deterministic_per_seed_and_epoch_and_is_a_permutation(shards):
    a = ids(stream(shards, seed=1, shuffle_buffer=8).samples(0))
    assert a == ids(stream(shards, seed=1, shuffle_buffer=8).samples(0))
    assert sorted(a) == sorted(f"r{i}" for i in range(70))
    assert a != ids(stream(shards, seed=2, shuffle_buffer=8).samples(0))
    assert a != ids(stream(shards, seed=1, shuffle_buffer=8).samples(1))
    assert ids(stream(shards, shuffle=False).samples(0)) == [f"r{i}" for i in range(70)]


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_read_disjoint_parts_that_cover_the_data(shards, world):
    parts = [set(ids(stream(shards, seed=4, rank=r, world_size=world).samples(0))) for r in range(world)]
    assert sum(len(p) for p in parts) == 70
    assert set().union(*parts) == {f"r{i}" for i in range(70)}
    assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1


def test_samples_carry_arrays_with_groups_only_on_supervised_tokens(shards, shardkit):
    recs = {r["id"]: r for r in shardkit.make_records(70, 100, seed=0)}
    for s in stream(shards, shuffle=False).samples(0):
        r = recs[s["id"]]
        assert s["input_ids"].tolist() == r["input_ids"] and s["loss_mask"].tolist() == r["loss_mask"]
        want = [g if m == 1 else -1 for g, m in zip(r[group_column("tfidf")], r["loss_mask"])]
        assert s["groups"].tolist() == want and s["length"] == len(r["input_ids"])


def test_without_a_group_column_supervised_tokens_are_group_zero(shards):
    s = next(ShardStream(str(shards), read_manifest(shards), None).samples(0))
    assert s["groups"].tolist() == [0 if m else -1 for m in s["loss_mask"].tolist()]


def test_bucketed_batches_respect_the_token_budget_and_keep_every_sample(shards):
    samples = list(stream(shards).samples(0))
    batches = list(bucketed(iter(samples), 120, 4, random.Random(0)))
    seen = [s["id"] for b in batches for row in b for s in row]
    assert sorted(seen) == sorted(ids(samples))
    for b in batches:
        assert all(len(row) == 1 for row in b)
        assert len(b) * max(row[0]["length"] for row in b) <= 120 or len(b) == 1

    # bucketing reduces padding compared with the stream order
    def pad(bs):
        return sum(len(b) * max(r[0]["length"] for r in b) - sum(r[0]["length"] for r in b) for b in bs)

    naive = [[[s] for s in samples[i : i + 3]] for i in range(0, len(samples), 3)]
    assert pad(batches) < pad(naive)


def test_packed_rows_fit_the_row_length(shards):
    samples = list(stream(shards).samples(0))
    batches = list(packed(iter(samples), 128, 64))
    assert sorted(s["id"] for b in batches for row in b for s in row) == sorted(ids(samples))
    for b in batches:
        assert len(b) <= 2
        assert all(sum(min(s["length"], 64) for s in row) <= 64 for row in b)
    assert sum(len(row) for b in batches for row in b) > sum(len(b) for b in batches)  # some rows hold several


def _sample(ids_, mask, groups):
    return {
        "id": "x",
        "input_ids": np.array(ids_),
        "loss_mask": np.array(mask),
        "groups": np.array(groups),
        "length": len(ids_),
    }


def test_collate_aligns_targets_groups_and_samples_with_the_predicting_position():
    a = _sample([10, 11, 12, 13], [0, 0, 1, 1], [-1, -1, 1, 0])
    b = _sample([20, 21, 22], [0, 1, 1], [-1, 0, 1])
    batch = collate([[a], [b]], pad_id=0, packed_rows=False)
    assert batch.input_ids.tolist() == [[10, 11, 12, 13], [20, 21, 22, 0]]
    assert batch.position_ids is None
    assert batch.targets.tolist() == [[IGNORE, 12, 13, IGNORE], [21, 22, IGNORE, IGNORE]]
    assert batch.groups.tolist() == [[-1, 1, 0, -1], [0, 1, -1, -1]]
    assert batch.segments.tolist() == [[-1, 0, 0, -1], [1, 1, -1, -1]]
    assert batch.num_tokens == 7


def test_packed_collate_restarts_positions_and_never_targets_across_samples():
    a = _sample([10, 11, 12], [0, 1, 1], [-1, 0, 1])
    b = _sample([20, 21, 22], [1, 1, 1], [0, 1, 0])  # b's first token is supervised: must not be a target of a
    batch = collate([[a, b]], pad_id=0, packed_rows=True)
    assert batch.input_ids.tolist() == [[10, 11, 12, 20, 21, 22]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1, 2]]
    assert batch.targets.tolist() == [[11, 12, IGNORE, 21, 22, IGNORE]]
    assert batch.groups.tolist() == [[0, 1, -1, 1, 0, -1]]
    assert batch.segments.tolist() == [[0, 0, -1, 1, 1, -1]]


def test_truncation_happens_only_at_max_length_and_is_counted():
    a = _sample(list(range(1, 11)), [0] + [1] * 9, [-1] + [0] * 9)
    fitted = list(fit(iter([a]), 4))
    assert fitted[0]["cut"] == [1, 6, 0]  # one sample cut, 6 supervised tokens lost, none skipped
    batch = collate([fitted], pad_id=0, packed_rows=False)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4]] and batch.targets.tolist() == [[2, 3, 4, IGNORE]]
    assert (batch.truncated_samples, batch.truncated_loss_tokens, batch.skipped_samples) == (1, 6, 0)


def test_a_sample_with_no_supervised_token_left_is_skipped_and_counted():
    prompt_only = _sample(list(range(1, 11)), [0] * 6 + [1] * 4, [-1] * 6 + [1] * 4)  # cut at 5: nothing left
    ok = _sample([1, 2, 3], [0, 1, 1], [-1, 0, 1])
    kept = list(fit(iter([prompt_only, ok, prompt_only]), 5))
    assert len(kept) == 1 and kept[0]["cut"] == [2, 8, 2]  # the trailing skip rides on the last kept sample


@pytest.mark.parametrize("pack", [False, True])
def test_samples_longer_than_the_budget_get_a_micro_batch_of_their_own(shards, pack):
    """--batch-tokens below the longest samples: no sample is cut (max_length is larger)."""
    b = Batches(
        stream(shards, seed=5),
        batch_tokens=16,
        max_length=4096,
        pack=pack,
        pool_batches=2,
        seed=5,
        pad_id=0,
        cycle=False,
    )
    samples = {s["id"]: s for s in stream(shards, seed=5).samples(0)}
    batches = list(b)
    assert sum(x.num_samples for x in batches) == len(samples)
    assert sum(x.num_tokens for x in batches) == sum(s["length"] for s in samples.values())
    assert sum(x.truncated_samples for x in batches) == 0
    for x in batches:  # over the budget only as a single sample
        assert x.input_ids.numel() <= 16 or x.num_samples == 1
    assert b.count(0) == len(batches)


@pytest.mark.parametrize("pack", [False, True])
def test_resuming_at_a_position_continues_with_exactly_the_same_batches(shards, pack):
    def make():
        return Batches(
            stream(shards, seed=3, shuffle_buffer=16),
            batch_tokens=96,
            max_length=48,
            pack=pack,
            pool_batches=3,
            seed=3,
            pad_id=0,
        )

    per_epoch = make().count(0)
    first = make()
    it = iter(first)
    seq = [next(it).input_ids.tolist() for _ in range(per_epoch + 5)]  # crosses into epoch 1
    assert seq[:per_epoch] != seq[per_epoch : 2 * per_epoch][:per_epoch]  # new epoch, new order
    for k in (2, per_epoch, per_epoch + 2):
        again = make()
        it = iter(again)
        for _ in range(k):
            next(it)
        resumed = make()
        resumed.position = again.position
        it2 = iter(resumed)
        assert [next(it2).input_ids.tolist() for _ in range(3)] == seq[k : k + 3]


def test_dry_count_equals_the_number_of_batches_of_an_epoch(shards):
    b = Batches(
        stream(shards, seed=5),
        batch_tokens=100,
        max_length=60,
        pack=False,
        pool_batches=2,
        seed=5,
        pad_id=0,
        cycle=False,
    )
    assert b.count(0) == sum(1 for _ in b)


def test_prefetch_passes_items_in_order_and_reraises_reader_errors():
    assert list(prefetch(iter(range(50)), 2)) == list(range(50))

    def bad():
        yield 1
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        list(prefetch(bad(), 2))


def test_a_rank_without_samples_fails_instead_of_spinning(tmp_path, shardkit):
    d = shardkit.write_shards(tmp_path / "one", shardkit.make_records(1, 100))
    b = Batches(
        ShardStream(str(d), read_manifest(d), group_column("tfidf"), rank=1, world_size=2),
        batch_tokens=100,
        max_length=60,
        pack=False,
        pool_batches=2,
        seed=0,
        pad_id=0,
    )
    with pytest.raises(ValueError, match="no samples"):
        next(iter(b))


def test_closing_the_prefetch_generator_joins_its_thread():
    """A reader thread still inside pyarrow at interpreter exit can abort the process, so closing
    the generator (the training loop does at its end) must leave no reader thread behind."""
    import threading
    import time

    def slow_reader():
        for i in range(100):
            time.sleep(0.05)  # reading a record batch
            yield i

    before = set(threading.enumerate())
    gen = prefetch(slow_reader(), 2)
    assert next(gen) == 0
    ours = [t for t in threading.enumerate() if t.name == "sftgo-prefetch" and t not in before]
    assert len(ours) == 1
    gen.close()
    assert not ours[0].is_alive()
    # a reader that has already read everything and waits to hand over the end marker stops too
    gen = prefetch(iter(range(2)), 1)
    assert next(gen) == 0
    time.sleep(0.3)  # the reader now holds 1 in the full queue and waits to put the end marker
    ours = [t for t in threading.enumerate() if t.name == "sftgo-prefetch" and t not in before]
    gen.close()
    assert not [t for t in ours if t.is_alive()]
