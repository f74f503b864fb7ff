"""CPU engines (backend "cpu": csrc/cpu) against the materializing oracles of their ops
(fused_pairloss/ops/oracle.py), with the shared kit's declarations, inputs and tolerance rule.

Exact where the arithmetic is exact: on dyadic inputs S is exact, so the set sizes and the mining
thresholds are compared bitwise (against the same-dtype oracle: the distance's sqrt rounds in the
stat dtype). Determinism: any thread count gives the same bits (the work partition and every GEMM
depend on the shapes only), and the AVX2 kernels give the AVX-512 kernels' bits (the same FMA
chains); the baseline kernels (no FMA) are checked against the oracle.
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fused_pairloss as fpl
from fused_pairloss.ops import engines, oracle
from fused_pairloss.ops.spec import NO_TERM, PAIR_VALUES, PairHistogram, PairLossSpec, pair_value_rows

import kit

CPU_BUILT = fpl.build_info()["cpu"]
pytestmark = pytest.mark.skipif(not CPU_BUILT and not os.environ.get("CI"),
                                reason="fused_pairloss._C (CPU kernels) not built: "
                                       + str(fpl.build_info()["library_error"]))
op = torch.ops.fused_pairloss
ISAS = ("avx512", "avx2", "base")
INF = float("inf")


def pair_fwd(case, spec):
    terms, flags = spec.pack()
    return op.pair_engine_forward(*case.args(), list(terms), flags)


def pair_bwd(gv, case, spec, fwd, need_grad_r=True):
    terms, flags = spec.pack()
    return op.pair_engine_backward(gv, *case.args(), fwd[0], fwd[2], list(terms), flags, need_grad_r)


def check_pair(case, spec, exact, seed=0):
    """Forward and backward of one op call against the oracle (fp64 truth, same-dtype reference)."""
    A = kit.stat_dtype(case.q.dtype)
    terms, flags = spec.pack()
    out = pair_fwd(case, spec)
    same = oracle.pair_engine_forward_oracle(*case.args(), terms, flags)
    truth, _ = kit.pair_truth(case, spec)
    assert [t.dtype for t in out] == [A, torch.int32, A]
    if exact:
        assert torch.equal(out[1], same[1]), "set sizes"
        assert torch.equal(out[2][:2], same[2][:2]), "mining thresholds"
    rows = pair_value_rows(terms)  # PAIR_VALUES and the histograms' nodes
    for k in range(rows):
        name = PAIR_VALUES[k] if k < len(PAIR_VALUES) else f"histogram row {k - len(PAIR_VALUES)}"
        kit.check_close(out[0][k], truth[0][k], same[0][k], what=name, dtype=case.q.dtype)
    kit.check_close(out[2][2], truth[2][2], same[2][2], what="pos_vs_neg_dlse", dtype=case.q.dtype)
    g = torch.Generator().manual_seed(seed + 1)
    gv = torch.randn(rows, case.q.shape[0], generator=g, dtype=torch.float64).to(A)
    # each backward gets its own forward's statistics, as in training: the softmax weights
    # exp(x - lse) are then consistent with the x the backward recomputes
    grads = pair_bwd(gv, case, spec, out)
    _, ref_grads = kit.pair_truth(case, spec, gv)
    same_grads = oracle.pair_engine_backward_oracle(gv, *case.args(), same[0], same[2], terms, flags, True)
    assert grads[0].dtype == case.q.dtype
    kit.check_close(grads[0], ref_grads[0], same_grads[0], what="grad_q", dtype=case.q.dtype)
    if case.r is None:
        assert grads[1].numel() == 0
    else:
        kit.check_close(grads[1], ref_grads[1], same_grads[1], what="grad_r", dtype=case.q.dtype)
    return out, grads


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("mode", ["self", "ref_excl"])
def test_ntxent_terms_below_the_tiny(mode, dtype):
    """NTXent's terms where sigmoid(t) is below the tiny: the value and gradient of -log(e^t +
    tiny), not -log(tiny) with a zero gradient (kit.ntxent_below_tiny_case)."""
    case, spec = kit.ntxent_below_tiny_case(mode, dtype)
    check_pair(case, spec, exact=False)


# N from 1 to 700, D odd and even, all label layouts: tiles are 32..96 rows at these sizes, so
# N >= 70 spans several row blocks (edge tiles, off-diagonal tiles, several rounds); N = 700 runs
# on the thread team (the smaller ones inline)
SHAPES = [(1, 3, "few"), (2, 4, "same"), (7, 5, "distinct"), (33, 8, "few"), (70, 6, "many"),
          (129, 7, "same"), (300, 10, "few"), (300, 9, "distinct"), (700, 12, "many")]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("decl,mode", kit.pair_declarations_and_modes())
def test_pair_op_parity_dyadic(decl, mode, dtype):
    spec = kit.PAIR_DECLARATIONS[decl]
    for n, d, layout in SHAPES:
        check_pair(kit.pair_case(mode, n, d, layout, dtype, "dyadic", seed=n), spec, exact=True, seed=n)


# mining on random fp32 S is left out: a pair could sit within an ulp of a threshold
@pytest.mark.parametrize("mode", kit.MODES)
@pytest.mark.parametrize("decl,dtype", [("ms", torch.float32), ("circle", torch.float32), ("ntxent", torch.float32),
                                        ("supcon", torch.float32), ("contrastive_lp", torch.float32),
                                        ("lifted_lp", torch.float32), ("ms_mine", torch.float64),
                                        ("ms_lp_mine", torch.float64)], ids=str)
def test_pair_op_parity_random(decl, mode, dtype):
    for n, d, layout in [(5, 3, "few"), (64, 16, "many"), (257, 33, "few")]:
        check_pair(kit.pair_case(mode, n, d, layout, dtype, "normalized", seed=n), kit.PAIR_DECLARATIONS[decl],
                   exact=False, seed=n)


# the histograms (kit.HIST_DECLARATIONS): dyadic rows put pairs on the nodes, where
# the kernels' and the oracle's gradient is 0 on both sides
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("mode", kit.MODES)
@pytest.mark.parametrize("decl", list(kit.HIST_DECLARATIONS))
def test_pair_histograms(decl, mode, dtype):
    spec = kit.HIST_DECLARATIONS[decl]
    for n, d, layout in [(7, 5, "distinct"), (70, 6, "many"), (300, 10, "few")]:
        for data in ("dyadic", "normalized"):
            check_pair(kit.pair_case(mode, n, d, layout, dtype, data, seed=n), spec, exact=data == "dyadic", seed=n)


def test_pair_histograms_nan_and_range():
    """A NaN pair makes its row's node 0 NaN (NaN in, NaN out); a pair beyond the last node by less
    than a node width still reaches it (1 - f), one further out adds nothing."""
    spec = kit.HIST_DECLARATIONS["cosine_with_sums"]
    terms, flags = spec.pack()
    case = kit.pair_case("ref", 40, 6, "few", torch.float64, "normalized", seed=1)
    case.q[3, 0] = float("nan")
    out = op.pair_engine_forward(*case.args(), list(terms), flags)
    hist = out[0][len(PAIR_VALUES):].view(2, 17, 40)
    assert torch.isnan(hist[:, 0, 3]).all() and not torch.isnan(hist[:, 1:, 3]).any()
    assert not torch.isnan(hist[:, :, [0, 1, 2, 4]]).any()
    # nodes 0.5 and 0.75 (lo 0.5, width 0.25) on S of the rows as given: row 0's positive at S = 1
    # (u = 2) is out of reach, its negatives at S = 0.625 (u = 0.5) and 0.875 (u = 1.5) add
    # 0.5 + 0.5 and 0.5 (the rest of the latter to a node past the last)
    two = PairLossSpec(pos=NO_TERM, neg=NO_TERM, histogram=PairHistogram(2, 4.0, 0.5))
    t2, f2 = two.pack()
    q = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.625, 0.0], [0.875, 0.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1])
    h = op.pair_engine_forward(q, None, y, None, None, list(t2), f2)[0][len(PAIR_VALUES):]
    assert torch.equal(h[:, 0], torch.tensor([0.0, 0.0, 0.5, 1.0], dtype=torch.float64))


def test_pair_need_grad_r_false_skips_the_column_pass():
    case = kit.pair_case("ref", 90, 8, "few", torch.float64, "normalized", seed=3)
    spec = kit.PAIR_DECLARATIONS["circle"]
    fwd = pair_fwd(case, spec)
    gv = torch.ones(len(PAIR_VALUES), 90, dtype=torch.float64)
    gq_full, gr_full = pair_bwd(gv, case, spec, fwd, True)
    gq, gr = pair_bwd(gv, case, spec, fwd, False)
    assert gr.numel() == 0 and gr_full.shape == case.r.shape
    assert torch.equal(gq, gq_full)


def test_pair_ref_mode_one_walk_backward():
    """With 4 blocks or more on each side the ref-mode backward computes both gradients in one walk
    (its rounds order dq's tile sums differently from the row pass that runs without grad_r): the
    same dq up to rounding, and both gradients the oracle's."""
    case = kit.pair_case("ref", 300, 12, "few", torch.float64, "normalized", seed=7, m=280)
    spec = kit.PAIR_DECLARATIONS["circle"]
    check_pair(case, spec, exact=False, seed=7)
    fwd = pair_fwd(case, spec)
    gv = torch.randn(len(PAIR_VALUES), 300, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    gq_walk, _ = pair_bwd(gv, case, spec, fwd, True)
    gq_rows, _ = pair_bwd(gv, case, spec, fwd, False)
    torch.testing.assert_close(gq_walk, gq_rows, rtol=1e-12, atol=1e-12)


def test_self_mode_equals_its_ref_mode_twin():
    """Self mode (upper-triangle tiles, transposed reuse) equals a ref-mode call with r = a copy of q
    and each row's own column excluded; its grad_q equals grad_q + grad_r of that call."""
    for decl in ("ms_mine", "circle", "ntxent", "contrastive_lp"):
        spec = kit.PAIR_DECLARATIONS[decl]
        case = kit.pair_case("self", 150, 6, "few", torch.float64, "dyadic", seed=3)
        twin = kit.PairCase(case.q, case.q.clone(), case.labels_q, case.labels_q.clone(), torch.arange(150))
        a, b = pair_fwd(case, spec), pair_fwd(twin, spec)
        assert torch.equal(a[1], b[1]) and torch.equal(a[2][:2], b[2][:2])
        torch.testing.assert_close(a[0], b[0], rtol=1e-12, atol=1e-12)
        gv = torch.randn(len(PAIR_VALUES), 150, dtype=torch.float64)
        ga, _ = pair_bwd(gv, case, spec, a)
        gq, gr = pair_bwd(gv, twin, spec, a)
        torch.testing.assert_close(ga, gq + gr, rtol=1e-10, atol=1e-10)


def test_forward_backward_masks_consistent():
    """The backward recomputes S and the mining masks: with a tiny miner epsilon and many ties
    (dyadic S), a mask that disagreed with the forward's would give exp(x - lse) for a pair the
    forward never summed, and the gradients would not match the oracle's."""
    spec = kit.PAIR_DECLARATIONS["ms_mine0"]
    for mode in kit.MODES:
        check_pair(kit.pair_case(mode, 260, 4, "few", torch.float32, "dyadic", seed=11), spec, exact=True)


def _results(run):
    out = []
    for x in run():
        out.extend(x if isinstance(x, (tuple, list)) else [x])
    return out


def _pair_calls(dtype):
    """Every declaration in every mode on a shape with several tiles and thread items."""
    def run():
        res = []
        decls = [(kit.PAIR_DECLARATIONS[d], m) for d, m in kit.pair_declarations_and_modes()]
        for spec, mode in decls + [(spec, "self") for spec in kit.HIST_DECLARATIONS.values()]:
            case = kit.pair_case(mode, 600, 24, "many", dtype, "normalized", seed=5)
            fwd = pair_fwd(case, spec)
            gv = torch.ones(fwd[0].shape[0], 600, dtype=fwd[0].dtype)
            res.append(fwd)
            res.append(pair_bwd(gv, case, spec, fwd))
        return res
    return run


def _class_calls(dtype):
    def run():
        res = []
        for spec, K in [*kit.CLASS_DECLARATIONS.values(), *kit.LOSS_CLASS_DECLARATIONS.values()]:
            for n, C in [(600, 300), (300, 1100)]:  # both backward ownerships (rows / classes)
                case = kit.as_loss_weights(kit.class_case(n, 24, C, K, dtype, seed=7), spec)
                terms, flags = spec.pack()
                fwd = op.class_engine_forward(*case.args(), list(terms), flags)
                gr = torch.ones(2, n, dtype=fwd[0].dtype)
                gc = torch.full((2, C), 0.5, dtype=fwd[0].dtype)
                res.append(fwd)
                res.append(op.class_engine_backward(gr, gc, case.q, case.w, case.labels, fwd[0], fwd[1], K,
                                                    list(terms), flags, True))
        return res
    return run


def _triplet_calls(dtype):
    """The all-triplets kernel in both modes, distances and row paths (few positives: compared with
    every negative; many: a binary search), on 3 strips of rows."""
    def run():
        res = []
        g = torch.Generator().manual_seed(3)
        q = F.normalize(torch.randn(600, 24, generator=g, dtype=torch.float64), dim=1).to(dtype)
        r = F.normalize(torch.randn(650, 24, generator=g, dtype=torch.float64), dim=1).to(dtype)
        for classes in (40, 2):
            lq, lr = torch.randint(0, classes, (600,), generator=g), torch.randint(0, classes, (650,), generator=g)
            for lp in (True, False):
                for args in ((q, q, lq, lq, torch.arange(600)), (q, r, lq, lr, torch.full((600,), -1))):
                    for window in ((-INF, INF), (0.0, 0.3)):
                        fwd = op.triplet_engine_forward(*args, 0.1, lp, *window)
                        res.append(fwd)
                        res.append(op.triplet_engine_backward(torch.ones_like(fwd[0]), *args, 0.1, lp, *window, True,
                                                              True))
                    if lp:  # the bins (DynamicSoftMargin)
                        bins = op.triplet_bins_engine_forward(*args, -2.0, 0.4, 10)
                        res.append(bins)
                        res.append(op.triplet_bins_engine_backward(torch.ones_like(bins[0]), *args, -2.0, 0.4, 10,
                                                                   True, True))
        return res
    return run


CALLS = {"pair": _pair_calls, "class": _class_calls, "triplet": _triplet_calls}


@pytest.mark.parametrize("engine", ["pair", "class", "triplet"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_threads_do_not_change_results(engine, dtype):
    run = CALLS[engine](dtype)
    old = torch.get_num_threads()
    try:
        results = []
        for nt in (1, 2, 3, 4):
            torch.set_num_threads(nt)
            results.append(_results(run))
    finally:
        torch.set_num_threads(old)
    for nt, res in zip((2, 3, 4), results[1:]):
        for a, b in zip(results[0], res):
            assert torch.equal(a, b), f"{engine} {dtype}: {nt} threads differ from 1 thread"


@pytest.fixture
def isa_cap():
    """Run with the CPU kernels of another instruction set; restores the selection in force before
    (which FPL_CPU_ISA may have capped) afterwards."""
    selected_before = op.cpu_isa()
    def set_cap(name):
        return op.cpu_isa(name)
    yield set_cap
    op.cpu_isa(selected_before)


def test_cpu_isa_op(isa_cap):
    assert op.cpu_isa() in ISAS  # the selection in force (FPL_CPU_ISA may cap it)
    best = isa_cap("avx512")  # capped at what the CPU supports
    assert best in ISAS
    assert isa_cap("base") == "base"
    assert op.cpu_isa() == "base"
    assert isa_cap("avx2") == ("avx2" if best != "base" else "base")
    assert isa_cap("avx512") == best
    with pytest.raises(RuntimeError, match="expected"):
        op.cpu_isa("sse9")


@pytest.mark.parametrize("cap", ["AVX2", "sse9"])
def test_unknown_fpl_cpu_isa_is_named(cap):
    """The library reads FPL_CPU_ISA when it loads; a value it does not know is named in a warning,
    not ignored in silence."""
    code = ("import warnings\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            "    from fused_pairloss import _extension\n"
            "    _extension.load()\n"
            "print([str(w.message) for w in caught])\n")
    env = dict(os.environ, FPL_CPU_ISA=cap)
    safe_path = ["-P"] if sys.flags.safe_path else []  # the package this run tests (make test: the installed wheel)
    out = subprocess.run([sys.executable, *safe_path, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert f"FPL_CPU_ISA={cap!r} is not one of" in out


@pytest.mark.parametrize("engine", ["pair", "class", "triplet"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_avx2_kernels_give_the_avx512_bits(engine, dtype, isa_cap):
    run = CALLS[engine](dtype)
    isa_cap("avx512")
    a = _results(run)
    if isa_cap("avx2") != "avx2":
        pytest.skip("this CPU has no AVX2")
    b = _results(run)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("isa", ["avx2", "base"])
@pytest.mark.parametrize("decl", ["ms_mine", "circle", "ntxent_lp", "contrastive_lp"])
def test_other_isa_kernels_match_the_oracle(decl, isa, isa_cap):
    if isa_cap(isa) != isa:
        pytest.skip(f"this CPU has no {isa}")
    for mode in kit.MODES:
        for dtype in (torch.float32, torch.float64):
            check_pair(kit.pair_case(mode, 300, 10, "few", dtype, "dyadic", seed=4), kit.PAIR_DECLARATIONS[decl],
                       exact=True)
            for spec, K in kit.CLASS_DECLARATIONS.values():
                check_class(kit.class_case(70, 12, 40, K, dtype, seed=2), spec)


def test_nan_propagates():
    """A NaN row gives NaN statistics; with mining its thresholds are NaN (comparisons with NaN are
    false, so the kept sets lose the row: the loss adds an exact 0 of the inputs to stay NaN). Hinge
    terms drop NaN (PML's AvgNonZeroReducer; ops/README.md): the row's sums and counts of x > 0
    hold none of its pairs, and the loss stays NaN through the same exact 0."""
    for decl in ("ms", "ms_mine", "ntxent", "contrastive_lp"):
        case = kit.pair_case("self", 80, 6, "few", torch.float32, "normalized", seed=1)
        case.q[5, 2] = float("nan")
        spec = kit.PAIR_DECLARATIONS[decl]
        values, counts, aux = pair_fwd(case, spec)
        if spec.mine:
            assert torch.isnan(aux[0][5]) and torch.isnan(aux[1][5]), decl
        elif spec.neg.hinge:
            assert values[3][5] == 0 and counts[3][5] == 0 and counts[1][5] > 0, decl
            assert not torch.isnan(values[2:4]).any(), decl
        else:
            assert torch.isnan(values[1 if spec.neg.lse else 3][5]), decl


def test_large_scales_stay_finite():
    case = kit.pair_case("ref", 200, 16, "few", torch.float32, "normalized", seed=2)
    for spec in (kit.PAIR_DECLARATIONS["ms"], kit.circle.declaration(0.25, 256.0)):
        out = pair_fwd(case, spec)
        assert torch.isfinite(out[0][:2]).all()


def test_pair_gradcheck():
    """Numerical gradients of the op (declarations without a detached weight: Circle's is, by design,
    no part of the gradient)."""
    case = kit.pair_case("ref_excl", 9, 4, "few", torch.float64, "normalized", seed=1)
    for decl in ("ms_lp_mine", "ntxent", "supcon", "contrastive_cos", "lifted_lp"):
        spec = kit.PAIR_DECLARATIONS[decl]
        terms, flags = spec.pack()

        def f(q, r):
            v, _, _ = op.pair_engine_forward(q, r, case.labels_q, case.labels_r, case.exclude_col, list(terms), flags)
            return torch.where(torch.isfinite(v), v, 0)

        q = case.q.clone().requires_grad_(True)
        r = case.r.clone().requires_grad_(True)
        assert torch.autograd.gradcheck(f, (q, r), eps=1e-6, atol=1e-5)


# ---- class engine ---------------------------------------------------------------------------------
def check_class(case, spec, seed=0):
    A = kit.stat_dtype(case.q.dtype)
    terms, flags = spec.pack()
    out = op.class_engine_forward(*case.args(), list(terms), flags)
    same = oracle.class_engine_forward_oracle(*case.args(), terms, flags)
    c64 = case.to(torch.float64)
    truth = oracle.class_engine_forward_oracle(*c64.args(), terms, flags)
    assert out[0].dtype == out[1].dtype == A
    for k in range(2):
        kit.check_close(out[0][k], truth[0][k], same[0][k], what=f"rows[{k}]", dtype=case.q.dtype)
        kit.check_close(out[1][k], truth[1][k], same[1][k], what=f"cols[{k}]", dtype=case.q.dtype)
    g = torch.Generator().manual_seed(seed + 1)
    n, C = case.q.shape[0], engines.weight_count(case.w, flags) // case.K
    gr = torch.randn(2, n, generator=g, dtype=torch.float64).to(A)
    gc = torch.randn(2, C, generator=g, dtype=torch.float64).to(A)
    grads = op.class_engine_backward(gr, gc, case.q, case.w, case.labels, out[0], out[1], case.K, list(terms),
                                     flags, True)
    ref = oracle.class_engine_backward_oracle(gr.double(), gc.double(), c64.q, c64.w, c64.labels, truth[0],
                                              truth[1], case.K, list(terms), flags, True)
    same_g = oracle.class_engine_backward_oracle(gr, gc, case.q, case.w, case.labels, same[0], same[1], case.K,
                                                 list(terms), flags, True)
    kit.check_close(grads[0], ref[0], same_g[0], what="grad_q", dtype=case.q.dtype)
    kit.check_close(grads[1], ref[1], same_g[1], what="grad_w", dtype=case.q.dtype)
    return out, grads


CLASS_SHAPES = [(1, 5, 2), (37, 16, 7), (300, 10, 130), (600, 24, 1200), (256, 8, 512)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp64", "fp32", "fp16", "bf16"])
@pytest.mark.parametrize("decl", list(kit.CLASS_DECLARATIONS))
def test_class_op_parity(decl, dtype):
    spec, K = kit.CLASS_DECLARATIONS[decl]
    for n, d, C in CLASS_SHAPES:
        if dtype in (torch.float16, torch.bfloat16):
            # the kernels compute in fp32 from exactly converted inputs: the oracle in fp32 on the same
            # (rounded) inputs is the truth's same-dtype reference
            case = kit.class_case(n, d, C, K, dtype, seed=n)
            check_class(case.to(torch.float32), spec, seed=n)
            continue
        check_class(kit.class_case(n, d, C, K, dtype, seed=n), spec, seed=n)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("decl", list(kit.LOSS_CLASS_DECLARATIONS))
def test_class_op_on_the_losses_weights(decl, dtype):
    """The losses' own declarations: weights as PML stores them ((D, C*K) columns or (C*K, D) rows,
    any norm), normalized by the engine per tile; grad_w in the same layout, through normalize's
    backward. Both backward ownerships, and a zero vector (F.normalize's clamp: grad / eps)."""
    spec, K = kit.LOSS_CLASS_DECLARATIONS[decl]
    for n, d, C in [(37, 16, 7), (300, 10, 130), (200, 24, 600)]:
        case = kit.as_loss_weights(kit.class_case(n, d, C, K, dtype, seed=n), spec, seed=n)
        check_class(case, spec, seed=n)
    case = kit.as_loss_weights(kit.class_case(40, 8, 6, K, dtype, seed=3), spec, seed=3)
    if spec.weights_layout == "columns":
        case.w[:, K] = 0
    else:
        case.w[K] = 0
    check_class(case, spec, seed=3)


@pytest.mark.parametrize("decl", ["cosface", "softtriple", "proxyanchor"])
def test_class_weights_too_large_to_pack_once(decl):
    """Weights whose packed copy exceeds the engine's once-per-call budget (32 MiB): every tile is
    packed on each visit instead. Same values as the oracle, and the same bits for any thread count."""
    spec, K = kit.LOSS_CLASS_DECLARATIONS[decl]
    n, d, ck = 12, 16, 600_000  # packed: 600k x 16 fp32 = 37 MiB
    case = kit.as_loss_weights(kit.class_case(n, d, ck // K, K, torch.float32, seed=5), spec, seed=5)
    assert case.w.numel() * case.w.element_size() > 32 << 20
    check_class(case, spec, seed=5)
    terms, flags = spec.pack()

    def run():
        rows, cols = op.class_engine_forward(*case.args(), list(terms), flags)
        gq, gw = op.class_engine_backward(torch.ones_like(rows), torch.ones_like(cols), case.q, case.w, case.labels,
                                          rows, cols, K, list(terms), flags, True)
        return rows, cols, gq, gw

    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(3)
        three = run()
    finally:
        torch.set_num_threads(old)
    for what, a, b in zip(("rows", "cols", "grad_q", "grad_w"), one, three):
        torch.testing.assert_close(b, a, rtol=0, atol=0, equal_nan=True, msg=f"{what}: 3 threads differ from 1")


def test_class_weight_nan_propagates():
    spec, K = kit.LOSS_CLASS_DECLARATIONS["cosface"]
    case = kit.as_loss_weights(kit.class_case(20, 8, 6, K, torch.float32, seed=2), spec)
    case.w[2, 4] = float("nan")  # class 4's vector
    terms, flags = spec.pack()
    rows, _ = op.class_engine_forward(*case.args(), list(terms), flags)
    target4 = case.labels == 4
    assert target4.any() and not target4.all()
    assert torch.isnan(rows[0][~target4]).all()  # class 4 is among their other classes
    assert torch.isnan(rows[1][target4]).all() and torch.isfinite(rows[1][~target4]).all()


def test_class_need_grad_w_false():
    spec, K = kit.CLASS_DECLARATIONS["softtriple"]
    case = kit.class_case(300, 8, 60, K, torch.float64, seed=1)
    terms, flags = spec.pack()
    rows, cols = op.class_engine_forward(*case.args(), list(terms), flags)
    gr, gc = torch.ones_like(rows), torch.zeros_like(cols)
    args = (case.q, case.w, case.labels, rows, cols, K, list(terms), flags)
    gq, gw = op.class_engine_backward(gr, gc, *args, False)
    gq2, gw2 = op.class_engine_backward(gr, gc, *args, True)
    assert gw.numel() == 0 and gw2.shape == case.w.shape
    torch.testing.assert_close(gq, gq2, rtol=1e-12, atol=1e-12)


def test_class_many_classes():
    """C*K = 100k centers: the engine never builds N x C*K."""
    spec, _ = kit.CLASS_DECLARATIONS["cosface"]
    case = kit.class_case(64, 16, 100_000, 1, torch.float32, seed=3)
    check_class(case, spec)


def test_class_nan_propagates():
    spec, K = kit.CLASS_DECLARATIONS["softtriple"]
    case = kit.class_case(40, 8, 12, K, torch.float32, seed=2)
    case.q[3, 1] = float("nan")
    terms, flags = spec.pack()
    rows, _ = op.class_engine_forward(*case.args(), list(terms), flags)
    assert torch.isnan(rows[0][3]) and torch.isfinite(rows[0][:3]).all()


def test_class_gradcheck():
    for name in ("softtriple", "softtriple_k1", "proxyanchor", "cosface"):
        spec, K = kit.CLASS_DECLARATIONS[name]
        case = kit.class_case(7, 4, 3, K, torch.float64, seed=1)
        terms, flags = spec.pack()

        def f(q, w):
            r, c = op.class_engine_forward(q, w, case.labels, K, list(terms), flags)
            return torch.where(torch.isfinite(r), r, 0), torch.where(torch.isfinite(c), c, 0)

        q = case.q.clone().requires_grad_(True)
        w = case.w.clone().requires_grad_(True)
        assert torch.autograd.gradcheck(f, (q, w), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("isa", ["avx2", "base"])
def test_other_isa_triplet_kernels_match_the_pytorch_op(isa, isa_cap):
    """The all-triplets and the triplet-bins kernels of another instruction set against the PyTorch
    ops on dyadic rows (the same u, so the same counts and bins)."""
    from fused_pairloss.ops import triplets
    if isa_cap(isa) != isa:
        pytest.skip(f"this CPU has no {isa}")
    g = torch.Generator().manual_seed(8)
    for dtype in (torch.float32, torch.float64):
        q = kit.dyadic(300, 12, g, dtype)
        for classes in (30, 2):
            lab = torch.randint(0, classes, (300,), generator=g)
            for lp, window in ((True, (-INF, INF)), (False, (-INF, INF)), (True, (-0.5, 0.0))):
                args = (q, q, lab, lab, torch.arange(300), 0.25, lp, *window)
                sums, counts, in_window = op.triplet_engine_forward(*args)
                ref_sums, ref_counts, ref_in_window = triplets.triplet_rows(*args)
                assert torch.equal(counts, ref_counts) and torch.equal(in_window, ref_in_window)
                kit.check_close(sums, ref_sums.double(), what="sums", dtype=dtype)
                grads = op.triplet_engine_backward(torch.ones_like(sums), *args, True, True)
                ref_grads = triplets.triplet_rows_backward(torch.ones_like(sums), *args, True, True)
                for a, b in zip(grads, ref_grads):
                    kit.check_close(a, b.double(), what="grad", dtype=dtype)
            # the bins (DynamicSoftMargin), the fp64 op the truth (the fp32 op's bins add in fp32)
            args, args64 = ((x, x, lab, lab, torch.arange(300), -2.0, 0.4, 10) for x in (q, q.double()))
            bins, counts = op.triplet_bins_engine_forward(*args)
            ref_bins, ref_counts = triplets.triplet_bins(*args)
            assert torch.equal(counts, ref_counts)
            kit.check_close(bins, triplets.triplet_bins(*args64)[0], ref_bins, what="bins", dtype=dtype)
            w = torch.linspace(-1, 1, bins.numel(), dtype=torch.float64).view(bins.shape)
            grads = op.triplet_bins_engine_backward(w.to(dtype), *args, True, True)
            ref_grads = triplets.triplet_bins_backward(w.to(dtype), *args, True, True)
            truth = triplets.triplet_bins_backward(w, *args64, True, True)
            for a, t, b in zip(grads, truth, ref_grads):
                kit.check_close(a, t, b, what="bins grad", dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("mode", kit.MODES)
@pytest.mark.parametrize("name", list(kit.ROW_SHIFT_DECLARATIONS))
def test_pair_row_shift(name, mode, dtype):
    """The op's row_shift (each row's terms shifted by its own number) against the oracle."""
    case = kit.pair_case(mode, 37, 16, "few", dtype)
    kit.check_row_shift(op.pair_engine_forward, op.pair_engine_backward, case, kit.ROW_SHIFT_DECLARATIONS[name])
