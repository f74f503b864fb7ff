"""Triton pair engine (backend "triton"): op-level parity with the materializing oracle
(fused_pairloss.reference.pair_engine_*_reference), loss-level parity with backend="reference",
and GPU precision checks (issue #4). Without a GPU this runs through the Triton interpreter
(tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported).

Near thresholds (SPEC §3): mining and Circle's relu kinks are tested with "dyadic" embeddings,
rows with 16 entries of +-1/4 (unit norm), so every S is a multiple of 1/16, exact in any summation
order; miner_eps = 1/8 and m = 1/4 then put many pairs exactly on the boundaries, and both sides
must make the same decision there.
"""
import glob
import zlib
import os

import pytest
import torch

if not glob.glob("/dev/nvidia[0-9]*"):  # also when this file runs without the conftest
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")
tpe = pytest.importorskip("fused_pairloss.ops.triton_pair_engine")
if not tpe.AVAILABLE:  # pragma: no cover
    pytest.skip("the Triton pair engine is not available", allow_module_level=True)

from fused_pairloss import reference as R  # noqa: E402
from fused_pairloss.ops import _kinds  # noqa: E402

MS, CIRCLE = _kinds.MULTI_SIMILARITY, _kinds.CIRCLE
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEV = "cpu" if INTERPRET else "cuda"
needs_device = pytest.mark.skipif(
    not INTERPRET and not torch.cuda.is_available(),
    reason="Triton needs a CUDA GPU or TRITON_INTERPRET=1")
pytestmark = needs_device

# (kind, p0, p1, p2, mine, miner_eps)
LOSSES = {
    "ms": (MS, 2.0, 50.0, 0.5, False, 0.0),
    "ms_mined": (MS, 2.0, 50.0, 0.5, True, 0.125),
    "circle": (CIRCLE, 0.25, 80.0, 0.0, False, 0.0),
}


def dyadic(n, d, gen, dtype=torch.float32):
    """n unit rows of dimension d (>= 16), 16 entries +-1/4 each: S = q.r exact (k/16)."""
    x = torch.zeros(n, d, dtype=torch.float64)
    for i in range(n):
        idx = torch.randperm(d, generator=gen)[:16]
        x[i, idx] = (torch.randint(0, 2, (16,), generator=gen) * 2 - 1).double() / 4
    return x.to(dtype)


def gaussian(n, d, gen, dtype=torch.float32):
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    return torch.nn.functional.normalize(x, dim=1).to(dtype)


def labels_for(layout, n, gen):
    if layout == "few":  # several classes, mixed pairs
        return torch.randint(0, 5, (n,), generator=gen)
    if layout == "one":  # a single class: no negatives anywhere
        return torch.zeros(n, dtype=torch.int64)
    if layout == "distinct":  # all different: no positives (in self mode)
        return torch.randperm(n, generator=gen) + 1000
    if layout == "pairs":  # two of each class
        return torch.randperm(n, generator=gen) // 2
    raise ValueError(layout)


def make_case(mode, layout, n, m, d, gen, dtype=torch.float32, data=dyadic):
    q = data(n, d, gen, dtype)
    lq = labels_for(layout, n, gen)
    if mode == "self":
        return q, None, lq, None, True
    r = data(m, d, gen, dtype)
    if mode == "ref_excl":  # PML: ref_labels is labels -> the diagonal i == j is excluded
        lr = lq[:m].clone() if m <= n else torch.cat([lq, labels_for(layout, m - n, gen)])
        return q, r, lq, lr, True
    return q, r, lq, labels_for(layout, m, gen), False


def to_dev(*ts):
    return [t.to(DEV) if isinstance(t, torch.Tensor) else t for t in ts]


def check_op(q, r, lq, lr, ex, loss, *, rtol, atol, seed=0):
    kind, p0, p1, p2, mine, eps = loss
    q, r, lq, lr = to_dev(q, r, lq, lr)
    fargs = (q, r, lq, lr, ex, kind, p0, p1, p2, mine, eps)
    out = tpe.forward_op(*fargs)
    ref = R.pair_engine_forward_reference(*fargs)
    names = ("lse_pos", "lse_neg", "count_pos", "count_neg", "min_pos", "max_neg")
    for name, a, b in zip(names, out, ref):
        assert a.dtype == b.dtype and a.shape == b.shape and a.device == b.device, name
        if a.dtype == torch.int32:
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda s: f"{name}: {s}")
    gen = torch.Generator().manual_seed(seed + 1)
    A = out[0].dtype
    gp = torch.randn(q.shape[0], generator=gen, dtype=A).to(DEV)
    gn = torch.randn(q.shape[0], generator=gen, dtype=A).to(DEV)
    bargs = (gp, gn, q, r, lq, lr, out[0], out[1], out[4], out[5], ex, kind, p0, p1, p2, mine, eps)
    gq, gr = tpe.backward_op(*bargs)
    rq, rr = R.pair_engine_backward_reference(*bargs)
    assert gq.dtype == q.dtype and gq.shape == q.shape
    # gradients sum many terms of size up to gamma: 10x the stats' tolerance, relative to max |g|
    rtol, atol = 10 * rtol, 10 * atol
    scale = max(1.0, rq.abs().max().item())
    torch.testing.assert_close(gq, rq, rtol=rtol, atol=atol * scale)
    if r is None:
        assert gr.shape == (0,)
    else:
        assert gr.dtype == r.dtype and gr.shape == r.shape
        scale = max(1.0, rr.abs().max().item())
        torch.testing.assert_close(gr, rr, rtol=rtol, atol=atol * scale)
    return out, (gq, gr)


# --------------------------------------------------------------------------- op level, fp32 --
@pytest.mark.parametrize("layout", ["few", "one", "distinct", "pairs"])
@pytest.mark.parametrize("mode", ["self", "ref", "ref_excl"])
@pytest.mark.parametrize("loss", list(LOSSES))
def test_op_parity_dyadic(loss, mode, layout):
    """Exact S (dyadic rows): thresholds and kinks hit exactly, decisions must agree."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{loss}{mode}{layout}".encode()))
    d = 33 if layout in ("few", "distinct") else 40  # odd and even D, not multiples of BLOCK_D
    q, r, lq, lr, ex = make_case(mode, layout, 97, 70, d, gen)
    out, _ = check_op(q, r, lq, lr, ex, LOSSES[loss], rtol=1e-5, atol=1e-5)
    if LOSSES[loss][4] and layout == "few":  # mining really dropped pairs, but not all of them
        kind, p0, p1, p2, _, _ = LOSSES[loss]
        unmined = tpe.forward_op(*to_dev(q, r, lq, lr), ex, kind, p0, p1, p2, False, 0.0)
        kept, total = out[2].sum() + out[3].sum(), unmined[2].sum() + unmined[3].sum()
        assert 0 < kept < total


@pytest.mark.parametrize("mode", ["self", "ref"])
@pytest.mark.parametrize("loss", list(LOSSES))
def test_op_parity_gaussian(loss, mode):
    """Generic data (S away from thresholds with probability 1), N across several row tiles."""
    gen = torch.Generator().manual_seed(7)
    q, r, lq, lr, ex = make_case(mode, "few", 150, 131, 64, gen, data=gaussian)
    check_op(q, r, lq, lr, ex, LOSSES[loss], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["self", "ref_excl"])
@pytest.mark.parametrize("loss", list(LOSSES))
def test_op_parity_split_walks(loss, mode, monkeypatch):
    """The GPU occupancy path (a row block's walk split over several programs, partial
    statistics / gradients combined after), forced here: same results as the oracle."""
    monkeypatch.setattr(tpe, "_num_splits", lambda blocks, tiles, device: 3)
    gen = torch.Generator().manual_seed(21)
    q, r, lq, lr, ex = make_case(mode, "few", 140, 200, 36, gen)
    check_op(q, r, lq, lr, ex, LOSSES[loss], rtol=1e-5, atol=1e-5)


def test_op_parity_few_hundred_rows_mined():
    gen = torch.Generator().manual_seed(3)
    q, r, lq, lr, ex = make_case("self", "few", 300, 0, 47, gen)
    check_op(q, r, lq, lr, ex, LOSSES["ms_mined"], rtol=1e-5, atol=1e-5)


def test_mining_masks_exact_ties():
    """With miner_eps = 1/8 and S on a 1/16 grid, S - eps == max_neg happens: the strict '<' must
    drop exactly those pairs (a wrong comparison or a recomputed S changes the counts)."""
    gen = torch.Generator().manual_seed(11)
    q, _, lq, _, _ = make_case("self", "few", 80, 0, 24, gen)
    q, lq = to_dev(q, lq)
    kind, p0, p1, p2, _, eps = LOSSES["ms_mined"]
    out = tpe.forward_op(q, None, lq, None, True, kind, p0, p1, p2, True, eps)
    s = q.double() @ q.double().t()
    same = lq[:, None] == lq[None, :]
    pos = same & ~torch.eye(len(lq), dtype=torch.bool, device=q.device)
    maxn = torch.where(~same, s, -torch.inf).amax(1)
    ties = (pos & (s - eps == maxn[:, None])).sum()
    assert ties > 0, "the case should contain exact ties"
    kept = (pos & (s - eps < maxn[:, None])).sum(1).to(torch.int32)
    assert torch.equal(out[2], kept)


def test_large_scales_stay_finite():
    """gamma=256 / beta=50 (logits far beyond exp's range): online max, finite and exact LSE."""
    gen = torch.Generator().manual_seed(5)
    q, r, lq, lr, ex = make_case("ref", "few", 90, 75, 32, gen, data=gaussian)
    for loss in [(CIRCLE, 0.25, 256.0, 0.0, False, 0.0), (MS, 2.0, 50.0, 0.5, True, 0.1),
                 (MS, 50.0, 50.0, -0.9, False, 0.0)]:
        out, grads = check_op(q, r, lq, lr, ex, loss, rtol=1e-5, atol=1e-5)
        assert torch.isfinite(out[0][out[2] > 0]).all() and torch.isfinite(out[1][out[3] > 0]).all()
        assert all(torch.isfinite(g).all() for g in grads)


def test_fp64():
    gen = torch.Generator().manual_seed(2)
    for mode, loss in [("self", "ms_mined"), ("ref", "circle")]:
        q, r, lq, lr, ex = make_case(mode, "few", 70, 50, 21, gen, dtype=torch.float64, data=gaussian)
        out, _ = check_op(q, r, lq, lr, ex, LOSSES[loss], rtol=1e-12, atol=1e-12)
        assert out[0].dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_op(dtype):
    """fp16/bf16 inputs: fp32 statistics; S exact here (dyadic), so stats match the oracle."""
    gen = torch.Generator().manual_seed(4)
    q, r, lq, lr, ex = make_case("ref", "few", 60, 40, 32, gen, dtype=dtype)
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    out, (gq, gr) = check_op(q, r, lq, lr, ex, LOSSES["ms_mined"], rtol=tol, atol=tol)
    assert out[0].dtype == torch.float32 and gq.dtype == dtype


def test_empty_and_tiny():
    kind, p0, p1, p2, mine, eps = LOSSES["ms_mined"]
    q = torch.nn.functional.normalize(torch.randn(5, 16, dtype=torch.float64)).float()
    lq = torch.tensor([0, 0, 1, 1, 2])
    q, lq = to_dev(q, lq)
    r0 = q.new_empty((0, 16))
    l0 = lq.new_empty((0,))
    out = tpe.forward_op(q, r0, lq, l0, False, kind, p0, p1, p2, mine, eps)
    assert torch.isneginf(out[0]).all() and torch.isneginf(out[1]).all()
    assert (out[2] == 0).all() and (out[3] == 0).all()
    assert torch.isposinf(out[4]).all() and torch.isneginf(out[5]).all()
    gq, gr = tpe.backward_op(torch.ones(5, device=DEV), torch.ones(5, device=DEV), q, r0, lq, l0,
                             out[0], out[1], out[4], out[5], False, kind, p0, p1, p2, mine, eps)
    assert gq.shape == q.shape and (gq == 0).all() and gr.shape == (0, 16)
    # N = 1, self mode: no pairs at all
    out = tpe.forward_op(q[:1], None, lq[:1], None, True, kind, p0, p1, p2, mine, eps)
    assert (out[2] == 0).all() and (out[3] == 0).all() and torch.isneginf(out[0]).all()
    # N = 0
    out = tpe.forward_op(q[:0], None, lq[:0], None, True, kind, p0, p1, p2, mine, eps)
    assert all(t.shape == (0,) for t in out)


def test_backward_deterministic():
    gen = torch.Generator().manual_seed(9)
    q, r, lq, lr, ex = to_dev(*make_case("ref", "few", 100, 80, 40, gen, data=gaussian))
    kind, p0, p1, p2, mine, eps = LOSSES["circle"]
    out = tpe.forward_op(q, r, lq, lr, ex, kind, p0, p1, p2, mine, eps)
    g = torch.linspace(-1, 1, 100, device=DEV)
    args = (g, g.flip(0), q, r, lq, lr, out[0], out[1], out[4], out[5], ex, kind, p0, p1, p2,
            mine, eps)
    a, b = tpe.backward_op(*args), tpe.backward_op(*args)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_opcheck():
    gen = torch.Generator().manual_seed(1)
    q, _, lq, _, _ = to_dev(*make_case("self", "few", 40, 0, 20, gen, data=gaussian))
    kind, p0, p1, p2, mine, eps = LOSSES["ms_mined"]
    fargs = (q, None, lq, None, True, kind, p0, p1, p2, mine, eps)
    torch.library.opcheck(tpe.forward_op, fargs)
    out = tpe.forward_op(*fargs)
    g = torch.ones(40, device=DEV)
    torch.library.opcheck(tpe.backward_op, (g, g, q, None, lq, None, out[0], out[1], out[4],
                                            out[5], True, kind, p0, p1, p2, mine, eps))


# ------------------------------------------------------------------------------ loss level --
F = pytest.importorskip("fused_pairloss.functional")


def _loss_case(fn, kw, with_ref, dtype=torch.float32, n=64, m=48, d=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen).to(DEV, dtype).requires_grad_()
    y = torch.randint(0, 4, (n,), generator=gen).to(DEV)
    if not with_ref:
        return x, y, (), ()
    xr = torch.randn(m, d, generator=gen).to(DEV, dtype).requires_grad_()
    yr = torch.randint(0, 4, (m,), generator=gen).to(DEV)
    return x, y, (xr, yr), (x, xr)


LOSS_FNS = {
    "ms": (lambda: F.multi_similarity_loss, {}),
    "ms_mined": (lambda: F.multi_similarity_loss, {"miner_epsilon": 0.1}),
    "circle": (lambda: F.circle_loss, {}),
    "circle_256": (lambda: F.circle_loss, {"m": 0.25, "gamma": 256.0}),
}


@pytest.mark.parametrize("with_ref", [False, True])
@pytest.mark.parametrize("name", list(LOSS_FNS))
def test_loss_parity(name, with_ref):
    fn, kw = LOSS_FNS[name]
    fn = fn()
    x, y, ref_args, wrt = _loss_case(fn, kw, with_ref)
    wrt = wrt or (x,)
    lt = fn(x, y, *ref_args, backend="triton", **kw)
    gt = torch.autograd.grad(lt, wrt)
    lr = fn(x, y, *ref_args, backend="reference", **kw)
    gr = torch.autograd.grad(lr, wrt)
    assert lt.shape == () and lt.dtype == x.dtype
    torch.testing.assert_close(lt, lr, rtol=1e-5, atol=1e-6)
    for a, b in zip(gt, gr):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * max(1.0, b.abs().max().item()))


def test_loss_quirk_too_few_pairs():
    """PML quirk: at most one positive and one negative pair -> loss 0, still attached."""
    x = torch.randn(1, 8, device=DEV, requires_grad=True)
    xr = torch.randn(2, 8, device=DEV)
    y, yr = torch.tensor([0], device=DEV), torch.tensor([0, 1], device=DEV)
    for fn in (F.multi_similarity_loss, F.circle_loss):
        loss = fn(x, y, xr, yr, backend="triton")
        assert loss.item() == 0.0 and loss.requires_grad
    # two positive pairs: not the quirk, a real (MS) loss equal to the reference's
    lt = F.multi_similarity_loss(x, y, xr, yr[[0, 0]], backend="triton")
    assert lt.item() > 0
    torch.testing.assert_close(lt, F.multi_similarity_loss(x, y, xr, yr[[0, 0]], backend="reference"))


def test_torch_compile_fullgraph():
    x, y, _, _ = _loss_case(None, {}, False, n=32, d=16)
    f = torch.compile(lambda x: F.multi_similarity_loss(x, y, miner_epsilon=0.1, backend="triton"),
                      fullgraph=True)
    lc = f(x)
    gc, = torch.autograd.grad(lc, x)
    le = F.multi_similarity_loss(x, y, miner_epsilon=0.1, backend="triton")
    ge, = torch.autograd.grad(le, x)
    torch.testing.assert_close(lc, le)
    torch.testing.assert_close(gc, ge)


# ------------------------------------------------------------------------------- GPU only --
def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["ms", "ms_mined", "circle"])
def test_gpu_low_precision_error_vs_fp64(name, dtype):
    """Issue #4 rule: the Triton low-precision error (vs an fp64 reference) is at most 2x the
    reference backend's own low-precision error (plus a tiny absolute floor)."""
    fn, kw = LOSS_FNS[name]
    fn = fn()
    gen = torch.Generator().manual_seed(0)
    x64 = torch.randn(512, 128, generator=gen, dtype=torch.float64).cuda()
    y = torch.randint(0, 32, (512,), generator=gen).cuda()

    def run(backend, dt):
        x = x64.to(dt).requires_grad_()
        loss = fn(x, y, backend=backend, **kw)
        g, = torch.autograd.grad(loss, x)
        return loss, g

    l64, g64 = run("reference", torch.float64)
    lref, gref = run("reference", dtype)
    ltri, gtri = run("triton", dtype)
    assert ltri.dtype == dtype and gtri.dtype == dtype
    floor = 1e-6
    assert _err(ltri, l64) <= 2 * _err(lref, l64) + floor * max(1.0, abs(l64.item()))
    assert _err(gtri, g64) <= 2 * _err(gref, g64) + floor * g64.abs().max().item()


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["self", "ref"])
@pytest.mark.parametrize("loss", list(LOSSES))
def test_gpu_fp32_op_parity(loss, mode):
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        gen = torch.Generator().manual_seed(0)
        q, r, lq, lr, ex = make_case(mode, "few", 1000, 777, 129, gen)
        q, r, lq, lr = [t.cuda() if t is not None else None for t in (q, r, lq, lr)]
        check_op(q, r, lq, lr, ex, LOSSES[loss], rtol=1e-5, atol=1e-5)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


@pytest.mark.gpu
def test_gpu_no_nxn_memory():
    """N = 16384 self mode, fwd + bwd: peak extra memory far below one N x N fp32 matrix (1 GiB)."""
    n, d = 16384, 128
    x = torch.nn.functional.normalize(torch.randn(n, d, device="cuda"), dim=1)
    y = torch.randint(0, 1000, (n,), device="cuda")
    kind, p0, p1, p2, mine, eps = LOSSES["ms_mined"]
    g = torch.ones(n, device="cuda")

    def step():
        out = tpe.forward_op(x, None, y, None, True, kind, p0, p1, p2, mine, eps)
        return out, tpe.backward_op(g, g, x, None, y, None, out[0], out[1], out[4], out[5], True,
                                    kind, p0, p1, p2, mine, eps)

    step()  # autotuning (its benchmark allocates a cache-flush buffer) happens here
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = step()
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < 64 * 2**20
    assert torch.isfinite(out[1][0]).all()
