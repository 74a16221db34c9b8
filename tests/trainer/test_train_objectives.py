"""The objectives against hand-computed (loop-based) oracles."""

import math

import pytest
import torch
import torch.nn.functional as F

from sftgo.trainer.chunked_ce import token_cross_entropy
from sftgo.trainer.objectives import GroupDRO, lam_at, rho1_loss, sft_loss, sftgo_loss


def _batch(seed=0, B=5, T=12, K=2, empty_rows=(), single_group_rows=()):
    g = torch.Generator().manual_seed(seed)
    loss = torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    groups = torch.randint(0, K, (B, T), generator=g)
    groups[:, :3] = -1  # a prompt
    for r in empty_rows:
        groups[r] = -1
    for r in single_group_rows:
        groups[r][groups[r] >= 0] = 0
    return loss.requires_grad_(), groups


def oracle(loss, groups, lam, K, reduce="sample"):
    """The definitions of docs/method.md ("Objectives") written as plain loops."""
    sup = [(b, t) for b in range(groups.shape[0]) for t in range(groups.shape[1]) if groups[b, t] >= 0]
    ce = sum(loss[b, t] for b, t in sup) / len(sup)
    if reduce == "sample":
        per_sample = []
        for b in range(groups.shape[0]):
            means = []
            for k in range(K):
                toks = [loss[b, t] for t in range(groups.shape[1]) if groups[b, t] == k]
                if toks:
                    means.append(sum(toks) / len(toks))
            if means:
                per_sample.append(torch.stack(means).max())
        worst = sum(per_sample) / len(per_sample)
    else:
        means = []
        for k in range(K):
            toks = [loss[b, t] for b, t in sup if groups[b, t] == k]
            if toks:
                means.append(sum(toks) / len(toks))
        worst = torch.stack(means).max()
    return (1 - lam) * ce + lam * worst, ce, worst


@pytest.mark.parametrize("K", [2, 3])
@pytest.mark.parametrize("reduce", ["sample", "batch"])
def test_sftgo_loss_matches_loop_oracle_values_and_gradients(K, reduce):
    loss, groups = _batch(K=K, empty_rows=(2,), single_group_rows=(4,))
    parts = sftgo_loss(loss, groups, 0.9, reduce, num_groups=K)
    want, want_ce, want_worst = oracle(loss, groups, 0.9, K, reduce)
    assert (
        torch.allclose(parts.loss, want)
        and torch.allclose(parts.ce, want_ce)
        and torch.allclose(parts.worst, want_worst)
    )
    (g1,) = torch.autograd.grad(parts.loss, loss)
    (g2,) = torch.autograd.grad(want, loss)
    assert torch.allclose(g1, g2)
    # gradient only on supervised tokens; the worst term's share only on each sample's argmax group
    assert (g1[groups < 0] == 0).all()


def test_lambda_zero_is_plain_cross_entropy_exactly():
    torch.manual_seed(0)
    logits = torch.randn(4, 10, 33)
    targets = torch.randint(0, 33, (4, 10))
    groups = torch.randint(-1, 2, (4, 10))
    token_loss = F.cross_entropy(logits.view(-1, 33), targets.view(-1), reduction="none").view(4, 10)
    want = F.cross_entropy(logits[groups >= 0], targets[groups >= 0])
    assert torch.allclose(sftgo_loss(token_loss, groups, 0.0).loss, want, rtol=1e-6, atol=0)
    assert torch.allclose(sft_loss(token_loss, groups).loss, want, rtol=1e-6, atol=0)
    assert sftgo_loss(token_loss, groups, 0.0).loss == sftgo_loss(token_loss, groups, 0.0).ce


def test_lambda_one_is_worst_term_and_group_loss_is_batch_mean_with_nan_for_empty_group():
    loss = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    groups = torch.tensor([[-1, 0, 0, 1], [-1, 0, 0, 0]])
    parts = sftgo_loss(loss, groups, 1.0, num_groups=3)
    # sample 0: groups {0: 2.5, 1: 4} -> 4; sample 1: only group 0 -> 7; mean -> 5.5
    assert parts.loss.item() == pytest.approx(5.5)
    assert parts.group_loss[0].item() == pytest.approx((2 + 3 + 6 + 7 + 8) / 5)
    assert parts.group_loss[1].item() == pytest.approx(4.0)
    assert math.isnan(parts.group_loss[2].item())
    assert parts.group_count.tolist() == [5, 1, 0]


def test_samples_without_supervised_tokens_do_not_dilute_the_worst_term():
    loss, groups = _batch(empty_rows=(0, 1))
    full = sftgo_loss(loss, groups, 1.0)
    alone = sftgo_loss(loss[2:], groups[2:], 1.0)
    assert torch.allclose(full.loss, alone.loss)


def test_accumulated_micro_batches_sum_to_the_whole_batch_loss_and_gradient():
    loss, groups = _batch(B=6, seed=3)
    whole = sftgo_loss(loss, groups, 0.7, num_groups=2)
    (g_whole,) = torch.autograd.grad(whole.loss, loss)
    n_tok = (groups >= 0).sum()
    n_smp = ((groups >= 0).any(1)).sum()
    parts = [
        sftgo_loss(loss[i : i + 2], groups[i : i + 2], 0.7, num_groups=2, ce_denom=n_tok, worst_denom=n_smp)
        for i in range(0, 6, 2)
    ]
    total = sum(p.loss for p in parts)
    (g_acc,) = torch.autograd.grad(total, loss)
    assert torch.allclose(total, whole.loss) and torch.allclose(g_acc, g_whole)


def test_packed_segments_equal_one_sample_per_row():
    loss, groups = _batch(B=4, T=6, seed=5)
    rows = sftgo_loss(loss, groups, 0.9)
    # two rows of two samples each, told apart by segment ids
    packed_loss = loss.reshape(2, 12)
    packed_groups = groups.reshape(2, 12)
    segments = torch.arange(4).repeat_interleave(6).reshape(2, 12)
    packed = sftgo_loss(packed_loss, packed_groups, 0.9, segments=segments)
    assert torch.allclose(rows.loss, packed.loss)
    merged = sftgo_loss(packed_loss, packed_groups, 0.9)  # without segments the rows would merge samples
    assert not torch.allclose(rows.loss, merged.loss)


def test_rho1_is_cross_entropy_over_the_important_group_only():
    loss, groups = _batch(K=3, seed=7)
    parts = rho1_loss(loss, groups, num_groups=3)
    assert torch.allclose(parts.loss, loss[groups == 2].mean())
    (g,) = torch.autograd.grad(parts.loss, loss)
    assert (g[groups != 2] == 0).all() and (g[groups == 2] > 0).all()


def test_smooth_max_goes_from_mean_to_max_with_temperature():
    loss = torch.tensor([[1.0, 1.0, 3.0, 3.0]])
    groups = torch.tensor([[0, 0, 1, 1]])
    assert sftgo_loss(loss, groups, 1.0, temperature=1e-3).loss.item() == pytest.approx(3.0, abs=1e-2)
    assert sftgo_loss(loss, groups, 1.0, temperature=1e3).loss.item() == pytest.approx(2.0, abs=1e-2)
    mid = sftgo_loss(loss, groups, 1.0, temperature=1.0).loss.item()
    assert 2.0 < mid < 3.0


def test_group_dro_weights_the_groups_and_shift_toward_the_worse_group():
    loss = torch.tensor([[1.0, 1.0, 3.0, 3.0]])
    groups = torch.tensor([[0, 0, 1, 1]])
    dro = GroupDRO(2, step_size=0.5)
    parts = sftgo_loss(loss, groups, 1.0, group_weights=dro.weights)
    assert parts.loss.item() == pytest.approx(0.5 * 1 + 0.5 * 3)
    dro.update(parts.group_loss)
    w = dro.weights
    assert w[1] > w[0] and w.sum().item() == pytest.approx(1.0)
    assert (w[1] / w[0]).item() == pytest.approx(math.exp(0.5 * (3 - 1)))
    dro.update(torch.tensor([float("nan"), 3.0]))  # an empty group keeps its weight relative ratio logic
    assert torch.isfinite(dro.weights).all()


def test_ties_are_counted():
    loss = torch.tensor([[2.0, 2.0], [1.0, 3.0]])
    groups = torch.tensor([[0, 1], [0, 1]])
    assert sftgo_loss(loss, groups, 0.9).ties == 1


def test_nothing_supervised_gives_zero_not_nan():
    loss = torch.rand(2, 4, requires_grad=True)
    groups = torch.full((2, 4), -1)
    parts = sftgo_loss(loss, groups, 0.9)
    assert parts.loss.item() == 0.0
    parts.loss.backward()
    assert (loss.grad == 0).all()


@pytest.mark.parametrize("schedule,mid", [("constant", 0.9), ("linear", 0.5), ("cosine", 0.5)])
def test_lambda_schedules(schedule, mid):
    assert lam_at(0, 11, 0.9, schedule, 0.1) == pytest.approx(0.9)
    assert lam_at(5, 11, 0.9, schedule, 0.1) == pytest.approx(mid)
    assert lam_at(10, 11, 0.9, schedule, 0.1) == pytest.approx(0.9 if schedule == "constant" else 0.1)
    if schedule == "cosine":  # cosine decays slower than linear at first
        assert lam_at(2, 11, 0.9, "cosine", 0.1) > lam_at(2, 11, 0.9, "linear", 0.1)


@pytest.mark.parametrize("chunk", [5, 23, 100])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_cross_entropy_equals_unchunked_values_and_gradients(bias, chunk):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=bias).double()
    hidden = torch.randn(23, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (23,))
    weights = torch.rand(23, dtype=torch.float64)  # an arbitrary upstream gradient, like the SFT-GO weights
    got = token_cross_entropy(hidden, head, targets, chunk=chunk)
    want = F.cross_entropy(head(hidden), targets, reduction="none")
    assert torch.allclose(got, want.float(), atol=1e-5)
    g_got = torch.autograd.grad((got.double() * weights).sum(), [hidden, *head.parameters()])
    g_want = torch.autograd.grad((want * weights).sum(), [hidden, *head.parameters()])
    for a, b in zip(g_got, g_want):
        assert torch.allclose(a, b, atol=1e-5)


def test_chunked_cross_entropy_second_backward_recomputes_the_same_gradient():
    torch.manual_seed(1)
    head = torch.nn.Linear(8, 30, bias=False)
    hidden = torch.randn(10, 8, requires_grad=True)
    targets = torch.randint(0, 30, (10,))
    loss = token_cross_entropy(hidden, head, targets, chunk=4).sum()
    (g1,) = torch.autograd.grad(loss, hidden, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, hidden)
    assert torch.allclose(g1, g2)


def test_group_ids_beyond_the_declared_number_are_an_error():
    with pytest.raises(ValueError, match="group id 2"):
        sftgo_loss(torch.rand(1, 3), torch.tensor([[0, 1, 2]]), 0.9, num_groups=2)
