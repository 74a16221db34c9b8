"""Group ids from importance scores.

Input: per-token float32 scores and int8 loss masks of many samples, flattened, plus
each sample's token offsets (Arrow list layout).
Output: int8 group ids per token: -1 where not supervised; with 2 groups, 1 for the
top ceil(eta * n) of a sample's n supervised tokens by score and 0 for the rest; with
K > 2 groups, K equal-size rank quantiles (K-1 = most important).  Ties break by
position (earlier token first), so groups are deterministic.
With corpus-wide thresholds (`--threshold corpus`) the cut-offs are quantiles of every supervised
token's score in the corpus instead (corpus_thresholds, then assign_by_thresholds).
Cost: one lexsort over the supervised tokens of the batch (vectorised, O(N log N)); the corpus
cut-offs hold every supervised score in memory once (4 bytes per token).
"""
from __future__ import annotations

import math

import numpy as np


def assign_groups(
    scores: np.ndarray, loss_mask: np.ndarray, row_offsets: np.ndarray, eta: float = 0.3, num_groups: int = 2
) -> np.ndarray:
    """Group id per token for all rows; row i spans [row_offsets[i], row_offsets[i + 1])."""
    groups = np.full(len(scores), -1, dtype=np.int8)
    sup = np.flatnonzero(loss_mask)
    if not len(sup):
        return groups
    lengths = np.diff(row_offsets)
    row = np.repeat(np.arange(len(lengths)), lengths)[sup]
    # rank supervised tokens within their row: by row, then score descending, then position
    order = np.lexsort((sup, -scores[sup].astype(np.float64), row))
    row_sorted = row[order]
    n_sup = np.bincount(row, minlength=len(lengths))
    first = np.concatenate([[0], np.cumsum(n_sup)[:-1]])
    rank = np.arange(len(order)) - first[row_sorted]
    n = n_sup[row_sorted]
    if num_groups == 2:
        k = np.ceil(eta * n - 1e-9).astype(np.int64)  # tolerance: eta * n that is an integer in exact arithmetic
        g = (rank < np.maximum(k, 1)).astype(np.int8)
    else:
        g = (num_groups - 1 - (rank * num_groups) // n).astype(np.int8)
    groups[sup[order]] = g
    return groups


def important_count(n: int, eta: float) -> int:
    """How many of n supervised tokens are important with two groups (for docs and tests)."""
    return max(1, math.ceil(eta * n - 1e-9)) if n else 0


def corpus_thresholds(values: np.ndarray, eta: float, num_groups: int) -> list[float]:
    """Cut-offs over every supervised token's score of the corpus (exact: numpy.quantile's default
    linear method over all values, so the result depends on the multiset only, not on partitioning).
    Two groups: [quantile(1 - eta)]; K > 2: the K-1 quantiles j/K."""
    if not len(values):
        return []
    qs = [1.0 - eta] if num_groups == 2 else [j / num_groups for j in range(1, num_groups)]
    return [float(q) for q in np.quantile(np.asarray(values, dtype=np.float64), qs)]


def assign_by_thresholds(scores: np.ndarray, loss_mask: np.ndarray, thresholds: list[float]) -> np.ndarray:
    """Group id per token = how many cut-offs its score reaches (score >= cut-off); -1 where not
    supervised.  With two groups: 1 for scores at or above the corpus cut-off, else 0."""
    groups = np.full(len(scores), -1, dtype=np.int8)
    sup = np.flatnonzero(loss_mask)
    cut = np.asarray(thresholds, dtype=np.float64)
    groups[sup] = np.searchsorted(cut, scores[sup].astype(np.float64), side="right").astype(np.int8)
    return groups
