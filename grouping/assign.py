"""Group ids from importance scores.

Input: per-token float32 scores and int8 loss masks of many samples, flattened, plus
each sample's token offsets (Arrow list layout).
Output: int8 group ids per token: -1 where not supervised; with 2 groups, 1 for the
top ceil(eta * n) of a sample's n supervised tokens by score and 0 for the rest; with
K > 2 groups, K equal-size rank quantiles (K-1 = most important).  Ties break by
position (earlier token first), so groups are deterministic.
With corpus-wide thresholds (`--threshold corpus`) the cut-offs are quantiles of every supervised
token's score in the corpus instead (corpus_thresholds, then assign_by_thresholds).
Cost: one stable sort of the supervised tokens of the batch by one 64-bit key (row, then score
descending; vectorised, near O(N) since the rows come in order); the corpus
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
    order = _row_then_descending(row, scores[sup])
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


def _row_then_descending(row: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Stable order by row, then value descending; ties keep their input order.

    float32 values: one stable argsort of a uint64 key, the row in the high 32 bits and the negated
    value's order-preserving bit pattern in the low 32 (one sort of one key, faster than np.lexsort's
    sort per key).  Zeros of either sign tie and every NaN ties, last, as in np.lexsort.  Other dtypes: np.lexsort."""
    if values.dtype != np.float32 or (len(row) and row[-1] >= 2**32):
        return np.lexsort((-values.astype(np.float64), row))
    neg = -values + np.float32(0.0)  # -0.0 + 0.0 == +0.0: both zeros get one bit pattern
    nan = np.isnan(neg)
    if nan.any():
        neg[nan] = np.float32(np.nan)  # one positive NaN: above +inf, like np.lexsort's NaNs-last
    bits = neg.view(np.uint32)
    # IEEE-754 order as unsigned order: flip every bit of a negative, set the sign bit of the others
    key = np.where(bits >= np.uint32(0x80000000), ~bits, bits | np.uint32(0x80000000)).astype(np.uint64)
    key |= row.astype(np.uint64) << np.uint64(32)
    return np.argsort(key, kind="stable")


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
