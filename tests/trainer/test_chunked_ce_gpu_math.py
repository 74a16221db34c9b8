"""The chunked LM head + CE at GPU size, checked on CPU: both paths (two-pass, fused) give F.cross_entropy's
gradients; with bf16 inputs every head GEMM runs in bf16 and the weight gradient sums in fp32 (a dispatch-mode
record of the GEMMs, which also counts them: the fused path does 3 per chunk and none in the backward); bf16
stays close to the fp32 oracle; and a real (tiny Llama) training step gives the same statistics and
gradients on both paths for sft and dft."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from sftgo.trainer.batching import collate
from sftgo.trainer.chunked_ce import chunk_rows, fused_cross_entropy, token_cross_entropy
from sftgo.trainer.model import TokenLossModel
from sftgo.trainer.step import Objective, backward_step

aten = torch.ops.aten
GEMMS = {aten.mm, aten.addmm, aten.bmm, aten.baddbmm, aten.addbmm, aten.matmul, aten.mv, aten.dot}


def _case(n, h=12, v=40, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    head = torch.nn.Linear(h, v, bias=bias).to(dtype)
    hidden = torch.randn(n, h, dtype=dtype).requires_grad_()
    return head, hidden, torch.randint(0, v, (n,))


def _oracle(hidden, head, targets, weigh):
    """sum_i w_i * CE_i on the full logits, written as a loop over the tokens (w_i = weigh(CE_i), detached)."""
    logits = F.linear(hidden.float(), head.weight.float(), None if head.bias is None else head.bias.float())
    total = logits.sum() * 0.0  # keeps the graph when there is no token
    for i in range(hidden.shape[0]):
        ce = F.cross_entropy(logits[i : i + 1], targets[i : i + 1])
        total = total + weigh(ce.detach(), i) * ce
    return total


def _run(path, hidden, head, targets, chunk, weigh):
    """The scalar sum_i w_i * CE_i through one of the head's two paths."""
    if path == "fused":

        def rows_weigh(ce, rows):
            return torch.stack([weigh(c, i) for c, i in zip(ce, range(rows.start, rows.stop))])

        return fused_cross_entropy(hidden, head, targets, rows_weigh, chunk)[0]
    ce = token_cross_entropy(hidden, head, targets, chunk)
    w = torch.stack([weigh(c, i) for i, c in enumerate(ce.detach())]) if ce.numel() else ce.detach()
    return (w * ce).sum()


FIXED = torch.rand(64, generator=torch.Generator().manual_seed(3))
WEIGHTS = {"fixed": lambda ce, i: FIXED[i], "own ce (dft)": lambda ce, i: torch.exp(-ce) / 7}


@pytest.mark.parametrize("path", ["two-pass", "fused"])
@pytest.mark.parametrize("n,chunk,bias", [(20, 4, True), (20, 7, False), (20, 64, True), (0, 4, True)])
@pytest.mark.parametrize("weights", list(WEIGHTS))
def test_both_paths_give_the_gradients_of_cross_entropy_on_the_full_logits(path, n, chunk, bias, weights):
    head, hidden, targets = _case(n, bias=bias)
    params = [hidden, *head.parameters()]
    got = _run(path, hidden, head, targets, chunk, WEIGHTS[weights])
    want = _oracle(hidden, head, targets, WEIGHTS[weights])
    assert torch.allclose(got, want, atol=1e-5)
    g_got = torch.autograd.grad(got * 3.0, params, allow_unused=True)  # the incoming scalar scales them
    g_want = torch.autograd.grad(want * 3.0, params, allow_unused=True)
    for a, b, p in zip(g_got, g_want, params):
        a = torch.zeros_like(p) if a is None else a  # N = 0: no gradient at all, or zeros
        b = torch.zeros_like(p) if b is None else b
        assert a.dtype == p.dtype
        assert torch.allclose(a, b, atol=1e-5), (path, (a - b).abs().max())


class GemmLog(TorchDispatchMode):
    """Records every matmul-family op (after linear/matmul decompose) with its tensor arguments' dtypes, the
    phase it ran in, and in-place accumulations into the [V, H] weight-gradient shape."""

    def __init__(self, weight_shape):
        super().__init__()
        self.phase, self.gemms, self.accumulators, self.shape = "forward", [], [], tuple(weight_shape)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if func.overloadpacket in GEMMS or func.overloadpacket is aten.addmm_:
            self.gemms.append((self.phase, str(func), [t.dtype for t in tensors]))
        if func.overloadpacket in (aten.add_, aten.addmm_, aten.copy_) and tuple(tensors[0].shape) == self.shape:
            self.accumulators.append(tensors[0].dtype)
        return func(*args, **kwargs)


SETUPS = {  # name: (hidden dtype, head dtype, CPU bf16 autocast around the forward, the GEMMs' dtype)
    "autocast over fp32 weights": (torch.float32, torch.float32, True, torch.bfloat16),
    "bf16 hidden, fp32 head": (torch.bfloat16, torch.float32, False, torch.bfloat16),
    "bf16 weights": (torch.bfloat16, torch.bfloat16, False, torch.bfloat16),
    "fp32 stays fp32": (torch.float32, torch.float32, False, torch.float32),
}


@pytest.mark.parametrize("setup", list(SETUPS))
@pytest.mark.parametrize("path", ["two-pass", "fused"])
def test_bf16_inputs_run_every_head_gemm_in_bf16_with_an_fp32_weight_gradient(setup, path):
    hidden_dtype, head_dtype, autocast, gemm_dtype = SETUPS[setup]
    n, chunk = 20, 6  # 4 chunks, the last one short
    head, hidden, targets = _case(n, h=16, v=48, bias=True, dtype=head_dtype)
    hidden = hidden.detach().to(hidden_dtype).requires_grad_()
    log = GemmLog(head.weight.shape)
    with log:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if path == "fused":
                loss = fused_cross_entropy(hidden, head, targets, lambda ce, rows: torch.ones_like(ce), chunk)[0]
            else:
                loss = token_cross_entropy(hidden, head, targets, chunk).sum()
        log.phase = "backward"
        loss.backward()
    chunks = math.ceil(n / chunk)
    assert log.gemms and all(d == gemm_dtype for _, _, dtypes in log.gemms for d in dtypes), log.gemms
    assert log.accumulators and set(log.accumulators) == {torch.float32}  # the weight gradient sums in fp32
    forward = [g for g in log.gemms if g[0] == "forward"]
    backward = [g for g in log.gemms if g[0] == "backward"]
    if path == "fused":  # logits, grad_h, grad_W per chunk, all in the forward
        assert (len(forward), len(backward)) == (3 * chunks, 0)
    else:  # logits; then recompute all but the last chunk's, grad_h, grad_W
        assert (len(forward), len(backward)) == (chunks, 3 * chunks - 1)
    assert head.weight.grad.dtype == head_dtype and hidden.grad.dtype == hidden_dtype
    assert head.bias.grad.dtype == head_dtype


@pytest.mark.parametrize("path", ["two-pass", "fused"])
def test_bf16_results_stay_close_to_the_fp32_oracle(path):
    """bf16 GEMMs (8 mantissa bits): CE within 0.05 nats, gradients within 2% (relative L2 norm) of fp32
    arithmetic on the same bf16-rounded inputs, over 32 chunks of grad_W accumulation."""
    n, chunk = 128, 4
    head, hidden, targets = _case(n, h=64, v=96, bias=False, dtype=torch.bfloat16, seed=1)
    ref_head = torch.nn.Linear(64, 96, bias=False)
    with torch.no_grad():
        ref_head.weight.copy_(head.weight.float())
    ref_hidden = hidden.detach().float().requires_grad_()

    def weigh(ce, i):  # dft's weights: a function of the token's own (bf16-path) CE
        return torch.exp(-ce) / n

    got = _run(path, hidden, head, targets, chunk, weigh)
    want = _oracle(ref_hidden, ref_head, targets, weigh)
    got.backward()
    want.backward()
    assert abs(got.item() - want.item()) < 0.05
    ce = token_cross_entropy(hidden.detach(), head, targets, chunk)
    assert (ce - F.cross_entropy(ref_hidden.detach() @ ref_head.weight.T, targets, reduction="none")).abs().max() < 0.05
    for a, b in [(hidden.grad, ref_hidden.grad), (head.weight.grad, ref_head.weight.grad)]:
        assert (a.float() - b).norm() / b.norm() < 0.02


def test_chunk_set_by_memory():
    assert chunk_rows(50_000, "cpu") == 1024  # the old default off CUDA
    assert chunk_rows(131_072, "cuda") == 2048  # 2048 x 128k x 4 bytes = 1 GiB
    assert chunk_rows(49_152, "cuda", budget=49_152 * 4 * 300 + 5) == 300
    assert chunk_rows(10**9, "cuda") == 1  # never zero rows


def _batch(rng, vocab):
    def sample(n, p):
        mask = np.r_[np.zeros(p, np.int8), np.ones(n - p, np.int8)]
        groups = np.where(mask == 1, rng.integers(0, 2, size=n), -1)
        return {"id": "x", "input_ids": rng.integers(5, vocab, size=n), "loss_mask": mask, "groups": groups}

    samples = [dict(s, length=len(s["loss_mask"])) for s in (sample(24, 4), sample(17, 9), sample(30, 6))]
    return [collate([[samples[0]], [samples[1]]], 0, False), collate([[samples[2]]], 0, False)]


@pytest.fixture(scope="module")
def lm():
    """A tiny Llama whose LM head is its input embedding (as SmolLM2's): the head's gradient meets the lookup's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=1000,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).train()


@pytest.mark.parametrize("objective", ["sft", "dft"])
def test_the_training_step_is_the_same_on_both_paths(lm, objective):
    """backward_step as sftgo-train calls it in one process (the tied head's gradient added into weight.grad),
    two micro-batches, ce_chunk 16 (several chunks): the fused head gives the two-pass statistics exactly and
    the same gradients."""
    micro = _batch(np.random.default_rng(0), lm.config.vocab_size)
    results = []
    for fused in (False, True):
        net = TokenLossModel(lm, ce_chunk=16, lookup_into_grad=True, fused_ce=fused)
        stats = backward_step(net, micro, Objective(objective, 2), lam=0.0)
        grads = {k: p.grad.clone() for k, p in lm.named_parameters() if p.grad is not None}
        lm.zero_grad(set_to_none=True)
        results.append((stats, grads))
    (two, g_two), (fused, g_fused) = results
    assert (two.loss, two.ce, two.worst, two.ties) == (fused.loss, fused.ce, fused.worst, fused.ties)
    for a, b in [(two.group_sum, fused.group_sum), (two.group_count, fused.group_count)]:
        assert torch.equal(a, b)
    assert torch.equal(two.grad_sum, fused.grad_sum) and two.grad_sum.sum() > 0
    assert g_two.keys() == g_fused.keys() and len(g_two) == len(list(lm.parameters()))
    for k in g_two:
        assert torch.allclose(g_two[k], g_fused[k], rtol=1e-4, atol=1e-6), k


HOOKS = {  # case: (objective, lam, Group-DRO weights); the weights must be exact where a hook answers
    "sft": ("sft", 0.0, None),
    "dft": ("dft", 0.0, None),
    "rho1": ("rho1", 0.0, None),
    "weighted": ("weighted", 0.0, None),
    "sftgo at λ = 0": ("sftgo", 0.0, None),
    "sftgo with Group-DRO": ("sftgo", 0.6, torch.tensor([0.3, 0.2, 0.5], dtype=torch.float64)),
    "sftgo (max over a sample's groups)": ("sftgo", 0.6, None),
}


@pytest.mark.parametrize("case", list(HOOKS))
def test_token_grad_hooks_equal_the_objectives_own_gradient(case):
    """dL / dCE from each built-in's token_grad (per chunk, before the objective sees any CE) equals autograd
    through its train_loss, with step-wide denominators larger than this micro-batch's; sftgo's max has none."""
    from sftgo.trainer.registry import LossInput
    from sftgo.trainer.step import Counts

    name, lam, dro = HOOKS[case]
    g = torch.Generator().manual_seed(5)
    groups = torch.randint(-1, 3, (30,), generator=g)
    segments = torch.arange(30) // 7
    ce = (torch.rand(30, generator=g) * 4).requires_grad_()
    counts = Counts(41.0, 9.0, torch.tensor([15.0, 12.0, 14.0], dtype=torch.float64), 0, 0, 0, 0)
    obj = Objective(name, 3, weight=2.5)
    x = LossInput(None, groups, segments, counts, lam, obj, dro)
    hook = obj.impl.token_grad(x)
    if name == "sftgo" and lam and dro is None:
        assert hook is None
        return
    (want,) = torch.autograd.grad(obj.impl.train_loss(LossInput(ce, groups, segments, counts, lam, obj, dro)).loss, ce)
    got = torch.cat([hook(ce.detach()[i : i + 8], slice(i, i + 8)) for i in range(0, 30, 8)])
    assert want.abs().sum() > 0
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-9), (got, want)


def test_the_step_takes_the_fused_head_only_where_an_objective_has_exact_weights(lm):
    from sftgo.trainer.step import Counts, micro_loss, step_counts, supervised_of

    micro = _batch(np.random.default_rng(1), lm.config.vocab_size)[1:]
    counts = Counts.of(step_counts(micro, 2, "cpu"), 2, "cpu")
    sup = supervised_of(micro[0])
    for name, lam, fused_ce, fused in [("sft", 0, True, True), ("sftgo", 0.5, True, False), ("dft", 0, False, False)]:
        net = TokenLossModel(lm, ce_chunk=16, fused_ce=fused_ce)
        *_, to_backward = micro_loss(net, micro[0], sup, Objective(name, 2), lam, counts, None, contextlib.nullcontext)
        assert ("Fused" in type(to_backward.grad_fn).__name__) == fused, name
