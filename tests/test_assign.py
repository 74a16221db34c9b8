"""Group ids from scores: top-eta per sample, K quantiles, deterministic ties."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sftgo.grouping.assign import assign_groups, important_count


def brute_force(scores, mask, eta, k):
    """Reference: sort each sample's supervised tokens by (-score, position), NaNs at the bottom."""
    out = np.full(len(scores), -1)
    sup = [i for i in range(len(scores)) if mask[i]]
    order = sorted(sup, key=lambda i: (math.isnan(scores[i]), 0.0 if math.isnan(scores[i]) else -float(scores[i]), i))
    n = len(order)
    for rank, i in enumerate(order):
        if k == 2:
            out[i] = 1 if rank < max(1, math.ceil(eta * n - 1e-9)) else 0
        else:
            out[i] = k - 1 - (rank * k) // n
    return out


@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("eta", [0.1, 0.3, 0.5])
def test_matches_brute_force_on_random_batches(k, eta):
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 40, size=30)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    scores = rng.choice([0.0, 0.1, 0.25, 0.5], size=offsets[-1]).astype(np.float32)  # many ties
    mask = (rng.random(offsets[-1]) < 0.6).astype(np.int8)
    groups = assign_groups(scores, mask, offsets, eta, k)
    for a, b in zip(offsets[:-1], offsets[1:]):
        assert groups[a:b].tolist() == brute_force(scores[a:b], mask[a:b], eta, k).tolist()


def test_counts_and_ties():
    scores = np.array([0.0, 0.5, 0.5, 0.5, 0.1, 0.9, 0.0, 0.0, 0.0, 0.0, 0.0], dtype=np.float32)
    mask = np.array([0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], dtype=np.int8)  # 10 supervised
    g = assign_groups(scores, mask, np.array([0, 11]), eta=0.3)
    assert g[0] == -1
    assert g.tolist() == [-1, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0]  # 0.9 then the two earliest 0.5s
    assert important_count(10, 0.3) == 3 and important_count(1, 0.3) == 1 and important_count(0, 0.3) == 0


def test_empty_and_unsupervised_rows():
    g = assign_groups(np.zeros(3, np.float32), np.zeros(3, np.int8), np.array([0, 0, 3]), 0.3)
    assert g.tolist() == [-1, -1, -1]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ties_of_signed_zeros_infinities_and_nans_break_by_position(dtype):
    """Signed zeros tie, every NaN ties and ranks last, infinities order; ties go to the earlier token.
    Oracle: brute_force (Python's sort on (-score, position), NaNs at the bottom)."""
    rng = np.random.default_rng(1)
    pool = np.array([0.0, -0.0, 1.5, -1.5, np.inf, -np.inf, np.nan, -np.nan, 1e-45, -1e-45, 2.0], dtype=dtype)
    lengths = rng.integers(0, 60, size=40)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    scores = rng.choice(pool, size=offsets[-1])
    mask = (rng.random(offsets[-1]) < 0.7).astype(np.int8)
    for k in (2, 3):
        groups = assign_groups(scores, mask, offsets, 0.3, k)
        for a, b in zip(offsets[:-1], offsets[1:]):
            assert groups[a:b].tolist() == brute_force(scores[a:b], mask[a:b], 0.3, k).tolist()
