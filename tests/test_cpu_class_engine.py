"""The fused CPU class engine (csrc/cpu/class_engine_cpu.cpp: SoftTriple, ProxyCircle) against the
materializing oracles (fused_pairloss.reference.class_engine_*_reference) and the reference losses.

Tile geometry of the kernel (to make sure the tests cross its boundaries): rows in blocks of 256,
classes in tiles of max(1, 512 // K) whole classes; the backward owns the larger of (N, C*K).
The class engine has no mining threshold and its only kink (ProxyCircle's relu(S + m)) is
continuous in value with a detached weight, so random inputs are fine here (SPEC §3).
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fused_pairloss as fpl
from fused_pairloss import _extension
from fused_pairloss.ops import _kinds
from fused_pairloss.reference import (class_engine_backward_reference,
                                      class_engine_forward_reference)

ST, PC = _kinds.SOFT_TRIPLE, _kinds.PROXY_CIRCLE
PARAMS = {ST: (20.0, 0.1, 0.01), PC: (0.25, 256.0, 0.0)}
BUILT = _extension.has_kernel("class_engine_forward", "CPU")
WHY = _extension.load_error() or "the loaded library has no CPU kernel for class_engine_forward"
pytestmark = pytest.mark.skipif(not BUILT, reason=f"CPU class engine not built: {WHY}")


def _op():
    from fused_pairloss.ops import class_engine  # noqa: F401  (fake kernels + autograd)

    return torch.ops.fused_pairloss


def _inputs(n, d, c, k, dtype=torch.float32, seed=0, edge_labels=True):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1).to(dtype)
    w = F.normalize(torch.randn(c * k, d, generator=g, dtype=torch.float64), dim=1).to(dtype)
    y = torch.randint(0, c, (n,), generator=g)
    if edge_labels:  # the first and the last class, also at the first / last row of the batch
        y[0] = c - 1
        y[-1] = 0
        if n > 2:
            y[n // 2] = c - 1
    return q, w, y


def _rel_err(a, b):
    a, b = a.double(), b.double()
    scale = b.abs().max().clamp(min=1e-30)
    return ((a - b).abs().max() / scale).item() if b.numel() else 0.0


# fp32 tolerances, relative to the largest entry: the fp32 oracle itself is ~5e-6 away from fp64
# at gamma=256 (logits up to ~240 carry ulp(240) ~ 1.5e-5 absolute error into exp).
TOL = {torch.float64: 1e-13, torch.float32: 2e-5}

SHAPES = [
    (1, 5, 2),       # one row, two classes
    (37, 16, 7),     # one row block, one class tile
    (300, 17, 5),    # 2 row blocks (last partial), C*K < N: backward owns rows
    (129, 33, 1000),  # several class tiles (last partial), backward owns classes
    (257, 64, 2999),  # row block edge + 1
    (600, 8, 150),   # 3 row blocks; K=10: C*K > N owns classes, K=1: owns rows
]
KINDS = [(ST, 1), (ST, 3), (ST, 10), (PC, 1)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind,k", KINDS)
@pytest.mark.parametrize("n,d,c", SHAPES)
def test_op_parity_with_reference(n, d, c, kind, k, dtype):
    if k == 10 and c > 1000:
        c = 700  # keep the materializing oracle small
    op = _op()
    q, w, y = _inputs(n, d, c, k, dtype, seed=n + c + k)
    p = PARAMS[kind]
    lse, ts = op.class_engine_forward(q, w, y, k, kind, *p)
    lse_r, ts_r = class_engine_forward_reference(q, w, y, k, kind, *p)
    assert lse.dtype == ts.dtype == dtype and lse.shape == ts.shape == (n,)
    assert torch.isfinite(lse).all() and torch.isfinite(ts).all()
    assert _rel_err(lse, lse_r) <= TOL[dtype]
    assert _rel_err(ts, ts_r) <= TOL[dtype]

    g = torch.Generator().manual_seed(1)
    gl = torch.randn(n, generator=g, dtype=dtype)
    gt = torch.randn(n, generator=g, dtype=dtype)
    gq, gw = op.class_engine_backward(gl, gt, q, w, y, lse_r, k, kind, *p)
    gq_r, gw_r = class_engine_backward_reference(gl, gt, q, w, y, lse_r, k, kind, *p)
    assert gq.dtype == gw.dtype == dtype and gq.shape == q.shape and gw.shape == w.shape
    assert gq_r.abs().max() > 0 and gw_r.abs().max() > 0
    assert _rel_err(gq, gq_r) <= TOL[dtype]
    assert _rel_err(gw, gw_r) <= TOL[dtype]


@pytest.mark.parametrize("kind,k", [(ST, 4), (PC, 1)])
def test_only_one_gradient_input(kind, k):
    """grad_lse = 0 (only target_sim used) and grad_target_sim = 0 separately."""
    op = _op()
    q, w, y = _inputs(150, 24, 300, k, torch.float64, seed=3)
    p = PARAMS[kind]
    lse, _ = op.class_engine_forward(q, w, y, k, kind, *p)
    ones, zeros = torch.ones_like(lse), torch.zeros_like(lse)
    for gl, gt in ((ones, zeros), (zeros, ones)):
        got = op.class_engine_backward(gl, gt, q, w, y, lse, k, kind, *p)
        want = class_engine_backward_reference(gl, gt, q, w, y, lse, k, kind, *p)
        for a, b in zip(got, want):
            assert _rel_err(a, b) <= 1e-13


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind,k", [(ST, 3), (PC, 1)])
def test_half_inputs_computed_in_fp32(kind, k, dtype):
    op = _op()
    q, w, y = _inputs(140, 40, 200, k, dtype, seed=5)
    p = PARAMS[kind]
    lse, ts = op.class_engine_forward(q, w, y, k, kind, *p)
    lse_r, ts_r = class_engine_forward_reference(q, w, y, k, kind, *p)
    assert lse.dtype == ts.dtype == torch.float32
    assert _rel_err(lse, lse_r) <= 3e-5 and _rel_err(ts, ts_r) <= 3e-5
    gl, gt = torch.ones_like(lse), torch.full_like(lse, -0.5)
    gq, gw = op.class_engine_backward(gl, gt, q, w, y, lse_r, k, kind, *p)
    gq_r, gw_r = class_engine_backward_reference(gl, gt, q, w, y, lse_r, k, kind, *p)
    assert gq.dtype == gw.dtype == dtype
    # both round an fp32 result to the input dtype once
    eps = torch.finfo(dtype).eps
    assert _rel_err(gq, gq_r) <= 2 * eps and _rel_err(gw, gw_r) <= 2 * eps


@pytest.mark.parametrize("kind,k", [(ST, 5), (PC, 1)])
@pytest.mark.parametrize("shape", [(300, 32, 400), (40, 32, 60)])
def test_threads_do_not_change_results(kind, k, shape):
    """The partition depends on the shapes only (backward: max(threads, 4) private chunks), so
    1, 2 and 3 threads give the same bits (3 threads also split the forward's items of one row
    block between threads)."""
    op = _op()
    n, d, c = shape
    q, w, y = _inputs(n, d, c, k, torch.float32, seed=7)
    p = PARAMS[kind]
    gl, gt = torch.ones(n), torch.full((n,), 0.25)
    before = torch.get_num_threads()
    outs = []
    try:
        for nt in (1, 2, 3):
            torch.set_num_threads(nt)
            lse, ts = op.class_engine_forward(q, w, y, k, kind, *p)
            gq, gw = op.class_engine_backward(gl, gt, q, w, y, lse, k, kind, *p)
            outs.append((lse, ts, gq, gw))
    finally:
        torch.set_num_threads(before)
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
            assert torch.equal(a, b)


def test_repeatable_and_forward_recompute():
    """Same call twice -> same bits (no atomics, no scheduling dependence)."""
    op = _op()
    q, w, y = _inputs(200, 24, 900, 2, torch.float32, seed=11)
    p = PARAMS[ST]
    a = op.class_engine_forward(q, w, y, 2, ST, *p)
    b = op.class_engine_forward(q, w, y, 2, ST, *p)
    assert all(torch.equal(x, z) for x, z in zip(a, b))
    g1 = op.class_engine_backward(torch.ones(200), torch.ones(200), q, w, y, a[0], 2, ST, *p)
    g2 = op.class_engine_backward(torch.ones(200), torch.ones(200), q, w, y, a[0], 2, ST, *p)
    assert all(torch.equal(x, z) for x, z in zip(g1, g2))


def test_many_classes():
    """C*K ~ 100k rows of w (several hundred class tiles), few rows of q (the forward splits the
    classes across work items and merges the partial log-sum-exps)."""
    op = _op()
    q, w, y = _inputs(9, 16, 100_003, 1, torch.float32, seed=13)
    for kind in (ST, PC):
        p = PARAMS[kind]
        lse, ts = op.class_engine_forward(q, w, y, 1, kind, *p)
        lse_r, ts_r = class_engine_forward_reference(q, w, y, 1, kind, *p)
        assert _rel_err(lse, lse_r) <= 3e-5 and torch.equal(ts, ts_r)
        gl = torch.ones(9)
        gq, gw = op.class_engine_backward(gl, gl, q, w, y, lse_r, 1, kind, *p)
        gq_r, gw_r = class_engine_backward_reference(gl, gl, q, w, y, lse_r, 1, kind, *p)
        assert _rel_err(gq, gq_r) <= 3e-5 and _rel_err(gw, gw_r) <= 3e-5


def test_large_scales_stay_finite():
    """la = 200 and gamma = 1024 with similarities near 1: logits far beyond exp's range."""
    op = _op()
    q, w, y = _inputs(64, 8, 50, 2, torch.float32, seed=17)
    w = w.clone()
    w[y * 2] = q  # each row's first own center equals the row: s = 1
    for kind, k, p in ((ST, 2, (200.0, 0.1, 0.01)), (PC, 1, (0.25, 1024.0, 0.0))):
        ww = w if k == 2 else w[::2].contiguous()
        lse, ts = op.class_engine_forward(q, ww, y, k, kind, *p)
        lse_r, ts_r = class_engine_forward_reference(q.double(), ww.double(), y, k, kind, *p)
        assert torch.isfinite(lse).all() and lse.abs().max() > 100
        assert _rel_err(lse, lse_r) <= 1e-5 and _rel_err(ts, ts_r) <= 1e-5
        gq, gw = op.class_engine_backward(torch.ones(64), torch.ones(64), q, ww, y, lse, k, kind, *p)
        assert torch.isfinite(gq).all() and torch.isfinite(gw).all()


def test_proxy_circle_single_class_has_empty_lse():
    op = _op()
    q, w, y = _inputs(5, 4, 1, 1, torch.float64, seed=19)
    lse, ts = op.class_engine_forward(q, w, y, 1, PC, *PARAMS[PC])
    assert torch.equal(lse, torch.full_like(lse, float("-inf")))
    torch.testing.assert_close(ts, (q @ w.t())[:, 0])
    gq, gw = op.class_engine_backward(torch.ones(5), torch.ones(5), q, w, y, lse, 1, PC, *PARAMS[PC])
    torch.testing.assert_close(gq, w.expand(5, -1))  # only d target_sim / dq = w_y
    torch.testing.assert_close(gw, q.sum(0, keepdim=True))


@pytest.mark.parametrize("kind,k", [(ST, 3), (PC, 1)])
def test_nan_in_nan_out(kind, k):
    op = _op()
    q, w, y = _inputs(140, 16, 300, k, torch.float32, seed=23)
    q = q.clone()
    q[77, 3] = float("nan")
    p = PARAMS[kind]
    lse, ts = op.class_engine_forward(q, w, y, k, kind, *p)
    assert torch.isnan(lse[77]) and torch.isnan(ts[77])
    mask = torch.ones(140, dtype=torch.bool)
    mask[77] = False
    assert torch.isfinite(lse[mask]).all() and torch.isfinite(ts[mask]).all()
    gq, gw = op.class_engine_backward(torch.ones(140), torch.ones(140), q, w, y, lse, k, kind, *p)
    assert torch.isnan(gq[77]).all() and torch.isnan(gw).any()
    assert torch.isfinite(gq[mask]).all()


def test_empty_batch_and_input_checks():
    op = _op()
    q, w, y = _inputs(0, 8, 4, 2, torch.float32, edge_labels=False)
    lse, ts = op.class_engine_forward(q, w, y, 2, ST, *PARAMS[ST])
    assert lse.shape == ts.shape == (0,)
    gq, gw = op.class_engine_backward(lse, ts, q, w, y, lse, 2, ST, *PARAMS[ST])
    assert gq.shape == (0, 8) and torch.equal(gw, torch.zeros_like(w))
    q, w, y = _inputs(6, 8, 4, 2, torch.float32)
    with pytest.raises(RuntimeError, match="out of range"):
        op.class_engine_forward(q, w, y + 4, 2, ST, *PARAMS[ST])
    with pytest.raises(RuntimeError, match="multiple"):
        op.class_engine_forward(q, w[:7], y, 2, ST, *PARAMS[ST])
    with pytest.raises(RuntimeError, match="centers_per_class=1"):
        op.class_engine_forward(q, w, y, 2, PC, *PARAMS[PC])


@pytest.mark.parametrize("k", [1, 3])
def test_gradcheck_soft_triple_op(k):
    """fp64 gradcheck of the op through its registered autograd (ProxyCircle's detached relu
    weight is not the true derivative, so only SoftTriple can be gradchecked at op level)."""
    op = _op()
    q, w, y = _inputs(6, 5, 4, k, torch.float64, seed=29)
    q.requires_grad_(True)
    w.requires_grad_(True)
    p = (2.0, 0.5, 0.1)  # moderate la / gamma: well-conditioned finite differences
    assert torch.autograd.gradcheck(lambda a, b: op.class_engine_forward(a, b, y, k, ST, *p), (q, w))


# ---- loss level: backend="cpu" vs backend="reference" ---------------------------------------------
def _need_cpu_backend():
    if "cpu" not in fpl.available_backends("cpu"):
        pytest.skip("backend 'cpu' not available (fpl.available_backends checks the pair engine too)")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("k,reg", [(1, 0.0), (4, 0.0), (4, 0.2)])
def test_soft_triple_loss_cpu_vs_reference(k, reg, dtype):
    _need_cpu_backend()
    g = torch.Generator().manual_seed(31)
    n, d, c = 150, 20, 120
    x = torch.randn(n, d, generator=g, dtype=dtype)
    y = torch.randint(0, c, (n,), generator=g)
    y[0], y[1] = 0, c - 1
    centers = torch.randn(d, c * k, generator=g, dtype=dtype)
    out = []
    for backend in ("cpu", "reference"):
        xx, cc = x.clone().requires_grad_(True), centers.clone().requires_grad_(True)
        loss = fpl.functional.soft_triple_loss(xx, y, cc, centers_per_class=k, center_reg_weight=reg,
                                               backend=backend)
        loss.backward()
        out.append((loss.detach(), xx.grad, cc.grad))
    tol = TOL[dtype]
    for a, b in zip(*out):
        assert _rel_err(a, b) <= tol


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_proxy_circle_loss_cpu_vs_reference(dtype):
    _need_cpu_backend()
    g = torch.Generator().manual_seed(37)
    n, d, c = 170, 24, 600
    x = torch.randn(n, d, generator=g, dtype=dtype)
    y = torch.randint(0, c, (n,), generator=g)
    y[0], y[1] = 0, c - 1
    proxies = torch.randn(d, c, generator=g, dtype=dtype)
    out = []
    for backend in ("cpu", "reference"):
        xx, pp = x.clone().requires_grad_(True), proxies.clone().requires_grad_(True)
        loss = fpl.functional.proxy_circle_loss(xx, y, pp, backend=backend)
        loss.backward()
        out.append((loss.detach(), xx.grad, pp.grad))
    for a, b in zip(*out):
        assert _rel_err(a, b) <= TOL[dtype]


def test_soft_triple_loss_gradcheck_cpu():
    _need_cpu_backend()
    g = torch.Generator().manual_seed(41)
    x = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    centers = torch.randn(4, 3 * 2, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 2, 1, 2, 0])
    fn = lambda a, b: fpl.functional.soft_triple_loss(a, y, b, centers_per_class=2, la=3.0, gamma=0.5,  # noqa: E731
                                                      backend="cpu")
    assert torch.autograd.gradcheck(fn, (x, centers))


# ---- every compiled instruction-set variant of the tile loops -----------------------------------
_ISA_CHILD = r"""
import sys, torch
torch.ops.load_library(sys.argv[1])
cases = torch.load(sys.argv[2])
outs = []
for q, w, y, k, kind, p, gl, lse in cases:
    op = torch.ops.fused_pairloss
    outs.append(op.class_engine_forward(q, w, y, k, kind, *p) + op.class_engine_backward(gl, gl, q, w, y, lse, k, kind, *p))
torch.save(outs, sys.argv[3])
"""


def test_instruction_set_variants(tmp_path):
    """FPL_CPU_ISA caps the run-time choice of the compiled tile loops; the base (SSE2) and AVX2
    variants must match the oracle too (the other tests run this machine's best variant). Both
    run at once in subprocesses that import only torch and the library."""
    lib = _extension.load()
    g = torch.Generator().manual_seed(0)
    cases, wants = [], []
    for kind, k in ((ST, 3), (PC, 1)):
        for dt in (torch.float32, torch.float64):
            q = F.normalize(torch.randn(131, 19, generator=g, dtype=dt), dim=1)
            w = F.normalize(torch.randn(700 * k, 19, generator=g, dtype=dt), dim=1)
            y = torch.randint(0, 700, (131,), generator=g)
            p = PARAMS[kind]
            gl = torch.randn(131, generator=g, dtype=dt)
            lse, ts = class_engine_forward_reference(q, w, y, k, kind, *p)
            cases.append((q, w, y, k, kind, p, gl, lse))
            wants.append((lse, ts) + class_engine_backward_reference(gl, gl, q, w, y, lse, k, kind, *p))
    torch.save(cases, tmp_path / "cases.pt")
    procs = {}
    for isa in ("base", "avx2"):
        env = dict(os.environ, FPL_CPU_ISA=isa)
        procs[isa] = subprocess.Popen(
            [sys.executable, "-c", _ISA_CHILD, lib, str(tmp_path / "cases.pt"), str(tmp_path / f"{isa}.pt")],
            env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for isa, proc in procs.items():
        _, stderr = proc.communicate(timeout=180)
        assert proc.returncode == 0, stderr[-2000:]
        got = torch.load(tmp_path / f"{isa}.pt")
        for outs, want in zip(got, wants):
            for a, b in zip(outs, want):
                assert a.dtype == b.dtype
                assert _rel_err(a, b) <= TOL[b.dtype], isa
