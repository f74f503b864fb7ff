"""CPU pair engine (backend "cpu": csrc/cpu/pair_engine_cpu.cpp) against the materializing engine
oracles (fused_pairloss.reference.pair_engine_*_reference) and, at loss level, against
backend="reference".

Exactness near thresholds (SPEC §3): the op-level tests that compare mining decisions or Circle's
relu kinks use dyadic inputs (entries k/4, |k| <= 2, a few dims), whose dot products are exact in
fp32 and fp64, so S is the same number in both implementations and every tie (S at a mining
threshold, at a relu kink) is decided the same way. Random normalized inputs are used where a
1-ulp difference in S cannot flip a decision (no mining, or fp64).
"""
import os

import pytest
import torch
import torch.nn.functional as F

import fused_pairloss as fpl
from fused_pairloss import functional as FL
from fused_pairloss import reference as R
from fused_pairloss.ops import _kinds

CPU_BUILT = fpl.build_info()["cpu"]
IN_CI = bool(os.environ.get("CI"))

pytestmark = pytest.mark.skipif(
    not CPU_BUILT and not IN_CI,
    reason="fused_pairloss._C (CPU kernels) not built: " + str(fpl.build_info()["library_error"]),
)

MS, CIRCLE = _kinds.MULTI_SIMILARITY, _kinds.CIRCLE
# (kind, params, mine, miner_eps); Circle with m = 0.25 so its kinks (S = 1.25, S = -0.25) are dyadic
LOSSES = {
    "ms": (MS, (2.0, 50.0, 0.5), False, 0.0),
    "ms_mine": (MS, (2.0, 50.0, 0.5), True, 0.125),
    "ms_mine0": (MS, (2.0, 40.0, 0.5), True, 0.0),
    "circle": (CIRCLE, (0.25, 80.0, 0.0), False, 0.0),
    "circle_mine": (CIRCLE, (0.25, 64.0, 0.0), True, 0.25),  # the engine allows mining for any kind
}


def fwd_op(*a):
    return torch.ops.fused_pairloss.pair_engine_forward(*a)


def bwd_op(*a):
    return torch.ops.fused_pairloss.pair_engine_backward(*a)


def labels_for(layout, n, g):
    if layout == "few":
        return torch.randint(0, 3, (n,), generator=g)
    if layout == "many":
        return torch.randint(0, max(1, n // 2), (n,), generator=g)
    if layout == "same":
        return torch.full((n,), 7, dtype=torch.long)
    if layout == "distinct":
        return torch.randperm(n, generator=g) * 3 - 5  # negative ids too
    raise ValueError(layout)


def dyadic(n, d, g, dtype):
    return (torch.randint(-2, 3, (n, d), generator=g).to(dtype) / 4)


def normalized(n, d, g, dtype):
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1).to(dtype)


def make_case(mode, n, d, layout, dtype, data, seed=0):
    """(q, r, labels_q, labels_r, exclude_diag) for a mode: self / ref / ref_diag (separate r, N = M
    rows, self pairs excluded, PML's `ref_labels is labels` case)."""
    g = torch.Generator().manual_seed(seed)
    gen = dyadic if data == "dyadic" else normalized
    q = gen(n, d, g, dtype)
    lq = labels_for(layout, n, g)
    if mode == "self":
        return q, None, lq, None, True
    if mode == "ref_diag":
        return q, gen(n, d, g, dtype), lq, lq.clone(), True
    m = n + 5 if n % 2 else max(1, n // 2)
    return q, gen(m, d, g, dtype), lq, labels_for(layout, m, g), False


def check_forward(out, ref, exact_masks, tol):
    lse_pos, lse_neg, cp, cn, mnp, mxn = out
    A = torch.float64 if ref[0].dtype == torch.float64 else torch.float32
    for t in (lse_pos, lse_neg, mnp, mxn):
        assert t.dtype == A and t.shape == ref[0].shape
    assert cp.dtype == torch.int32 and cn.dtype == torch.int32
    if exact_masks:
        assert torch.equal(cp, ref[2]) and torch.equal(cn, ref[3])
        assert torch.equal(mnp, ref[4]) and torch.equal(mxn, ref[5])
    for a, b in ((lse_pos, ref[0]), (lse_neg, ref[1])):
        assert torch.equal(torch.isinf(a), torch.isinf(b))  # empty sets give -inf, same rows
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, equal_nan=True)


def check_grad(a, b, tol):
    assert a.dtype == b.dtype and a.shape == b.shape
    scale = b.abs().max().item() if b.numel() else 0.0
    err = (a.double() - b.double()).abs().max().item() if b.numel() else 0.0
    assert err <= tol * (1.0 + scale), (err, scale)


def run_op_parity(loss, mode, n, d, layout, dtype, data, seed=0):
    kind, params, mine, eps = LOSSES[loss]
    q, r, lq, lr, exd = make_case(mode, n, d, layout, dtype, data, seed)
    args = (q, r, lq, lr, exd, kind, *params, mine, eps)
    out = fwd_op(*args)
    ref = R.pair_engine_forward_reference(*args)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    check_forward(out, ref, exact_masks=(data == "dyadic" or dtype == torch.float64), tol=tol)
    g = torch.Generator().manual_seed(seed + 1)
    gp = torch.randn(n, generator=g, dtype=ref[0].dtype)
    gn = torch.randn(n, generator=g, dtype=ref[0].dtype)
    # the saved statistics of the reference, so that both backwards see identical inputs
    bargs = (gp, gn, q, r, lq, lr, ref[0], ref[1], ref[4], ref[5], exd, kind, *params, mine, eps)
    gq, gr = bwd_op(*bargs)
    rq, rr = R.pair_engine_backward_reference(*bargs)
    gtol = 1e-10 if dtype == torch.float64 else 1e-4
    check_grad(gq, rq, gtol)
    if r is None:
        assert gr.numel() == 0
    else:
        check_grad(gr, rr, gtol)
    return out, (gq, gr)


# N from 1 to ~700, D odd and even, all label layouts; tiles are 32..96 rows at these sizes, so
# N >= 70 spans several row blocks (edge tiles, off-diagonal tiles, several rounds); N = 700 is
# above the engine's size threshold for running tiles on a thread team (the smaller ones run inline).
SHAPES = [(1, 3, "few"), (2, 4, "same"), (7, 5, "distinct"), (33, 8, "few"), (70, 6, "many"),
          (129, 7, "same"), (300, 10, "few"), (300, 9, "distinct"), (700, 12, "many")]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("mode", ["self", "ref", "ref_diag"])
@pytest.mark.parametrize("loss", list(LOSSES))
def test_op_parity_dyadic(loss, mode, dtype):
    """Exact S: counts and mining thresholds bitwise equal, lse and grads to rounding."""
    for n, d, layout in SHAPES:
        run_op_parity(loss, mode, n, d, layout, dtype, "dyadic", seed=n)


# mining only in fp64 here: on random fp32 S a pair could sit within an ulp of a threshold (SPEC §3)
@pytest.mark.parametrize("mode", ["self", "ref", "ref_diag"])
@pytest.mark.parametrize("loss,dtype", [("ms", torch.float64), ("ms", torch.float32),
                                        ("circle", torch.float64), ("circle", torch.float32),
                                        ("ms_mine", torch.float64)], ids=str)
def test_op_parity_random(loss, mode, dtype):
    for n, d, layout in [(5, 3, "few"), (64, 16, "many"), (257, 33, "few")]:
        run_op_parity(loss, mode, n, d, layout, dtype, "normalized", seed=n)


def test_op_self_mode_uses_symmetric_S():
    """Self mode must treat S as symmetric: its result equals a cross-mode call whose r is a copy
    of q with the diagonal excluded (in fp64 with dyadic data, where S is exact)."""
    g = torch.Generator().manual_seed(3)
    q = dyadic(150, 6, g, torch.float64)
    lq = labels_for("few", 150, g)
    for loss in ("ms_mine", "circle"):
        kind, params, mine, eps = LOSSES[loss]
        a = fwd_op(q, None, lq, None, True, kind, *params, mine, eps)
        b = fwd_op(q, q.clone(), lq, lq.clone(), True, kind, *params, mine, eps)
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
        gp, gn = torch.ones(150, dtype=torch.float64), torch.full((150,), 0.5, dtype=torch.float64)
        ga, _ = bwd_op(gp, gn, q, None, lq, None, a[0], a[1], a[4], a[5], True, kind, *params, mine, eps)
        gq, gr = bwd_op(gp, gn, q, q.clone(), lq, lq.clone(), a[0], a[1], a[4], a[5], True, kind, *params,
                        mine, eps)
        torch.testing.assert_close(ga, gq + gr, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mode", ["self", "ref"])
def test_threads_agree(mode):
    """Results with 1 and 2 threads agree (the tile schedule does not depend on the thread count)."""
    q, r, lq, lr, exd = make_case(mode, 600, 32, "many", torch.float32, "normalized", seed=5)
    kind, params, mine, eps = LOSSES["ms_mine"]
    args = (q, r, lq, lr, exd, kind, *params, mine, eps)
    old = torch.get_num_threads()
    res = []
    try:
        for nt in (1, 2):
            torch.set_num_threads(nt)
            out = fwd_op(*args)
            g = torch.ones_like(out[0])
            grads = bwd_op(g, g, q, r, lq, lr, out[0], out[1], out[4], out[5], exd, kind, *params, mine, eps)
            res.append((out, grads))
    finally:
        torch.set_num_threads(old)
    (o1, g1), (o2, g2) = res
    for a, b in zip(o1, o2):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_forward_backward_masks_consistent():
    """The backward recomputes S and the mining masks: with a tiny miner epsilon and many ties
    (dyadic S), a mask that disagreed with the forward's would give exp(logit - lse) for a pair
    the forward did not count; the gradient then differs from the oracle's."""
    for mode in ("self", "ref"):
        run_op_parity("ms_mine0", mode, 260, 4, "few", torch.float32, "dyadic", seed=11)


def test_bf16_and_fp16_smoke():
    for dt in (torch.bfloat16, torch.float16):
        for mode in ("self", "ref"):
            q, r, lq, lr, exd = make_case(mode, 90, 16, "few", dt, "normalized", seed=2)
            kind, params, mine, eps = LOSSES["ms"]
            args = (q, r, lq, lr, exd, kind, *params, mine, eps)
            out = fwd_op(*args)
            assert out[0].dtype == torch.float32
            ref = R.pair_engine_forward_reference(*args)
            torch.testing.assert_close(out[0], ref[0], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(out[1], ref[1], rtol=1e-4, atol=1e-4)
            g = torch.ones_like(out[0])
            gq, gr = bwd_op(g, g, q, r, lq, lr, out[0], out[1], out[4], out[5], exd, kind, *params, mine, eps)
            rq, rr = R.pair_engine_backward_reference(g, g, q, r, lq, lr, ref[0], ref[1], ref[4], ref[5], exd,
                                                      kind, *params, mine, eps)
            assert gq.dtype == dt
            check_grad(gq, rq, 2e-2)
            if r is not None:
                assert gr.dtype == dt
                check_grad(gr, rr, 2e-2)


def test_large_scales_stay_finite():
    """gamma = 256 / beta = 50 on fp32: online max, no overflow."""
    for loss, params in (("circle", (0.25, 256.0, 0.0)), ("ms", (2.0, 50.0, 0.5))):
        kind, _, mine, eps = LOSSES[loss]
        q, r, lq, lr, exd = make_case("self", 200, 24, "few", torch.float32, "normalized", seed=4)
        out = fwd_op(q, r, lq, lr, exd, kind, *params, mine, eps)
        ref = R.pair_engine_forward_reference(q, r, lq, lr, exd, kind, *params, mine, eps)
        assert torch.isfinite(out[0]).all() and torch.isfinite(out[1]).all()
        torch.testing.assert_close(out[0], ref[0], rtol=2e-5, atol=2e-4)
        torch.testing.assert_close(out[1], ref[1], rtol=2e-5, atol=2e-4)


@pytest.mark.parametrize("loss", ["ms", "ms_mine", "circle"])
def test_nan_in_nan_out(loss):
    kind, params, mine, eps = LOSSES[loss]
    for mode in ("self", "ref"):
        q, r, lq, lr, exd = make_case(mode, 40, 8, "few", torch.float32, "normalized", seed=6)
        q = q.clone()
        q[3, 2] = float("nan")
        args = (q, r, lq, lr, exd, kind, *params, mine, eps)
        out = fwd_op(*args)
        ref = R.pair_engine_forward_reference(*args)
        for a, b in zip(out[:2] + out[4:], ref[:2] + ref[4:]):
            assert torch.equal(torch.isnan(a), torch.isnan(b))
        assert torch.isnan(out[0]).any() or torch.isnan(out[1]).any() or torch.isnan(out[4]).any()
        g = torch.ones_like(out[0])
        gq, gr = bwd_op(g, g, q, r, lq, lr, out[0], out[1], out[4], out[5], exd, kind, *params, mine, eps)
        assert gq.shape == q.shape  # no crash; NaN reaches the gradient of the NaN row at least
        if not mine:
            assert torch.isnan(gq[3]).all()


def test_empty_sets_and_tiny_batches():
    kind, params, mine, eps = LOSSES["ms"]
    # one sample: no pairs at all
    q = F.normalize(torch.randn(1, 5), dim=1)
    out = fwd_op(q, None, torch.tensor([4]), None, True, kind, *params, mine, eps)
    assert out[0].item() == float("-inf") and out[1].item() == float("-inf")
    assert out[2].item() == 0 and out[3].item() == 0
    g = torch.ones(1)
    gq, gr = bwd_op(g, g, q, None, torch.tensor([4]), None, out[0], out[1], out[4], out[5], True, kind, *params,
                    mine, eps)
    assert torch.equal(gq, torch.zeros_like(q)) and gr.numel() == 0
    # all same label: no negatives; all distinct: no positives
    q = F.normalize(torch.randn(50, 6), dim=1)
    out = fwd_op(q, None, torch.zeros(50, dtype=torch.long), None, True, kind, *params, True, 0.1)
    assert torch.isinf(out[1]).all() and (out[3] == 0).all() and (out[2] == 0).all()  # mining drops all
    out = fwd_op(q, None, torch.zeros(50, dtype=torch.long), None, True, kind, *params, False, 0.1)
    assert (out[2] == 49).all() and torch.isfinite(out[0]).all()
    out = fwd_op(q, None, torch.arange(50), None, True, kind, *params, False, 0.0)
    assert torch.isinf(out[0]).all() and (out[3] == 49).all()


# ---- loss level: public functional API, backend="cpu" against backend="reference" -------------
def _loss_pair(fn, x, y, ref_x=None, ref_y=None, **kw):
    outs = []
    for backend in ("cpu", "reference"):
        xs = x.detach().clone().requires_grad_(True)
        rs = None if ref_x is None else ref_x.detach().clone().requires_grad_(True)
        loss = fn(xs, y, rs, ref_y, backend=backend, **kw)
        loss.backward()
        outs.append((loss.detach(), xs.grad, None if rs is None else rs.grad))
    return outs


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("case", ["ms", "ms_mine", "circle"])
@pytest.mark.parametrize("mode", ["self", "ref"])
def test_loss_parity(case, mode, dtype):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(120, 24, generator=g, dtype=dtype)
    y = torch.randint(0, 10, (120,), generator=g)
    rx = ry = None
    if mode == "ref":
        rx = torch.randn(70, 24, generator=g, dtype=dtype)
        ry = torch.randint(0, 10, (70,), generator=g)
    if case == "circle":
        fn, kw = FL.circle_loss, {"m": 0.4, "gamma": 80.0}
    else:
        fn, kw = FL.multi_similarity_loss, {"miner_epsilon": 0.1 if case == "ms_mine" else None}
    (lc, gc, grc), (lr_, gr_, grr) = _loss_pair(fn, x, y, rx, ry, **kw)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert lc.dtype == dtype
    torch.testing.assert_close(lc, lr_, rtol=tol, atol=tol)
    check_grad(gc, gr_, 1e-9 if dtype == torch.float64 else 1e-4)
    if mode == "ref":
        check_grad(grc, grr, 1e-9 if dtype == torch.float64 else 1e-4)


@pytest.mark.parametrize("miner_epsilon", [None, 0.1])
def test_gradcheck_multi_similarity(miner_epsilon):
    g = torch.Generator().manual_seed(9)
    x = torch.randn(9, 5, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 0, 1, 1, 1, 2, 2, 0, 3])
    rx = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    ry = torch.tensor([0, 1, 2, 3, 0, 1])
    kw = dict(alpha=2.0, beta=10.0, base=0.5, miner_epsilon=miner_epsilon, backend="cpu")
    assert torch.autograd.gradcheck(lambda a: FL.multi_similarity_loss(a, y, **kw), (x,))
    assert torch.autograd.gradcheck(lambda a, b: FL.multi_similarity_loss(a, y, b, ry, **kw), (x, rx))
