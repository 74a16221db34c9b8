"""The two baselines of issue 13.1 against loop-written oracles: `dft` (each token's CE times its
own detached probability, as TRL's loss_type="dft") and `weighted` (CE with a fixed weight on the
important group, a weighted token mean); their accumulated-batch denominators; the effective
per-group weight every step logs (group_weight); and both through sftgo-train."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sftgo.trainer.config import TrainConfig
from sftgo.trainer.loop import run
from sftgo.trainer.objectives import dft_loss, weighted_loss
from sftgo.trainer.step import Counts, Objective, objective_parts, token_weights
from tests.trainer.tiny import tiny_config


def _batch(seed=0, n=40, k=2):
    g = torch.Generator().manual_seed(seed)
    loss = (torch.rand(1, n, generator=g, dtype=torch.float64) * 4).requires_grad_()  # one row of n tokens
    groups = torch.randint(-1, k, (1, n), generator=g)
    return loss, groups


def test_dft_equals_a_loop():
    loss, groups = _batch()
    parts = dft_loss(loss, groups)
    total, n = 0.0, 0
    for ce, grp in zip(loss.flatten().tolist(), groups.flatten().tolist()):
        if grp >= 0:
            total += math.exp(-ce) * ce  # p * (-log p), p = the token's own probability
            n += 1
    assert float(parts.loss) == pytest.approx(total / n, rel=1e-12)
    # the probability is detached: d loss / d ce_t = p_t / n (not p_t (1 - ce_t) / n)
    (grad,) = torch.autograd.grad(parts.loss, loss)
    for ce, grp, gr in zip(loss.flatten().tolist(), groups.flatten().tolist(), grad.flatten().tolist()):
        assert gr == pytest.approx(math.exp(-ce) / n if grp >= 0 else 0.0, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("weight", [1.0, 3.5, 0.25])
def test_weighted_equals_a_loop(weight):
    loss, groups = _batch(seed=1, k=3)
    parts = weighted_loss(loss, groups, weight, num_groups=3)
    num = den = 0.0
    for ce, grp in zip(loss.flatten().tolist(), groups.flatten().tolist()):
        if grp >= 0:
            w = weight if grp == 2 else 1.0
            num, den = num + w * ce, den + w
    assert float(parts.loss) == pytest.approx(num / den, rel=1e-12)
    if weight == 1.0:  # weight 1 is plain SFT
        assert float(parts.loss) == pytest.approx(float(parts.ce), rel=1e-12)


@pytest.mark.parametrize("name", ["dft", "weighted"])
def test_micro_batches_with_step_denominators_sum_to_the_whole(name):
    loss, groups = _batch(seed=2, n=60)
    loss, groups = loss[0], groups[0]  # flat, with a sample id per token (as the step passes them)
    obj = Objective(name, 2, weight=2.0)
    seg = torch.arange(60) // 6

    def counts(g):
        sup = g >= 0
        return Counts(
            float(sup.sum()),
            float(torch.unique(seg[: len(g)][sup]).numel()),
            torch.bincount(g[sup], minlength=2).double(),
            0,
            0,
            0,
            0,
        )

    whole = objective_parts(obj, loss, groups, seg, 0.9, counts(groups)).loss
    step = counts(groups)
    split = sum(objective_parts(obj, loss[a:b], groups[a:b], seg[a:b], 0.9, step).loss for a, b in ((0, 24), (24, 60)))
    assert float(split) == pytest.approx(float(whole), rel=1e-12)


def test_group_weight_is_relative_to_plain_sft():
    loss, groups = _batch(seed=3, n=50)
    loss, groups = loss[0], groups[0]
    n = float((groups >= 0).sum())
    for name, expect in (("sft", (1.0, 1.0)), ("weighted", None)):
        obj = Objective(name, 2, weight=3.0)
        parts = objective_parts(
            obj,
            loss,
            groups,
            torch.zeros_like(groups),
            0.9,
            Counts(n, 0.0, torch.bincount(groups[groups >= 0]).double(), 0, 0, 0, 0),
        )
        grad_sum = token_weights(parts.loss, loss, groups, 2)
        count = torch.bincount(groups[groups >= 0], minlength=2).double()
        weight = (grad_sum / count * n).tolist()
        if expect:
            assert weight == pytest.approx(list(expect))
        else:  # the important group weighs 3 times the rest
            assert weight[1] / weight[0] == pytest.approx(3.0)


@pytest.mark.parametrize("extra", [dict(objective="dft"), dict(objective="weighted", group_weight=2.5)])
def test_baselines_train_through_sftgo_train(tmp_path, shard_dir, tiny_model_dir, extra):
    out = tmp_path / "run"
    run(tiny_config(shard_dir, out, tiny_model_dir, max_steps=3, **extra))
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["split"] == "train"]
    assert len(train) == 3 and all(math.isfinite(r["loss"]) for r in train)
    for r in train:
        w0, w1 = r["group_weight"]
        if extra["objective"] == "weighted":
            assert w1 / w0 == pytest.approx(2.5, rel=1e-6)
        else:  # DFT weighs each token by its probability: below plain SFT's 1 everywhere
            assert 0 < w0 < 1 and 0 < w1 < 1


def test_settings_the_objective_does_not_read_are_said(tmp_path, shard_dir, tiny_model_dir, capsys):
    run(
        TrainConfig(
            data=str(shard_dir),
            out=str(tmp_path / "r"),
            model=tiny_model_dir,
            max_steps=1,
            batch_tokens=160,
            progress=False,
            tensorboard=False,
            objective="sft",
            lam=0.5,
            group_weight=2.0,
            lora_alpha=8.0,
        )
    )
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("Note: ")]
    assert notes == [
        "Note: --lam is ignored: only --objective sftgo reads it, not sft.",
        "Note: --group-weight is ignored: only --objective weighted reads it, not sft.",
        "Note: --lora-alpha is ignored: there is no LoRA without --lora-r.",
    ]
