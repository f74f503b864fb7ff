"""Triton engines (backend "triton", fused_pairloss/ops/triton_engines.py): the four ops against the
materializing oracles of ops/oracle.py, for the shared kit's declarations (tests/kit.py) and a few
more built with ops/spec.py, in self / ref / ref-with-exclude_col modes, fp32 and fp64 (fp16 / bf16
on exact inputs); split walks, the chunked gradient form and the need_grad_* paths forced; NaN,
empty and tiny inputs, large scales; opcheck of the four ops; every loss of the kit's table through
the shared autograd rule; the kernels compiled for sm_80 / sm_90 (offline, no GPU needed). The tests
marked `gpu` need a CUDA GPU
(fp16 / bf16 error bounds, fp32 parity at real sizes, determinism, memory, torch.compile).

Without a GPU this runs through the Triton interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported): sizes are small (interpreter tiles are 32 x 32, so
N = 45..70 already crosses several row and column tiles and their edges).

Exactness (docs/design.md, "Testing near thresholds"): on dyadic inputs (entries k/4) every S is exact in
fp32 and fp64, so the set sizes and the mining thresholds are compared bitwise with the same-dtype
oracle; everything else with one rule, |truth - triton| <= 2 |truth - same-dtype oracle| + floor,
truth being the fp64 oracle on the same inputs (the shared kit's rule).
"""
import glob
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

if not glob.glob("/dev/nvidia[0-9]*"):  # also when this file runs without the conftest
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")
T = pytest.importorskip("fused_pairloss.ops.triton_engines")
if not T.AVAILABLE:  # pragma: no cover
    pytest.skip("the Triton engines are not available", allow_module_level=True)

import fused_pairloss as fpl  # noqa: E402
from fused_pairloss.ops import oracle  # noqa: E402
from fused_pairloss.ops import spec as S  # noqa: E402
from fused_pairloss.ops.spec import PAIR_VALUES, PairLossSpec, PairTerm, ClassLossSpec  # noqa: E402

import kit  # noqa: E402
from kit import MODES, check_close, normalized, stat_dtype  # noqa: E402

INTERPRET = T.INTERPRETED
DEV = "cpu" if INTERPRET else "cuda"
pytestmark = pytest.mark.skipif(not INTERPRET and not torch.cuda.is_available(),
                                reason="Triton needs a CUDA GPU or TRITON_INTERPRET=1")
PAIR_FWD, PAIR_BWD = T.forward_op("pair_engine"), T.backward_op("pair_engine")
CLASS_FWD, CLASS_BWD = T.forward_op("class_engine"), T.backward_op("class_engine")


# ---- the shared kit (tests/kit.py): rule, inputs, declarations; cases as op arguments on DEV ------
def pair_case(*args, **kwargs):
    """kit.pair_case as the op's (q, r, labels_q, labels_r, exclude_col) on DEV."""
    return kit.pair_case(*args, **kwargs).to(device=DEV).args()


def class_case(*args, **kwargs):
    """kit.class_case as the op's (q, w, labels, K) on DEV."""
    return kit.class_case(*args, **kwargs).to(device=DEV).args()


def cast(args, dtype):
    return tuple(a.to(dtype) if (a is not None and a.is_floating_point()) else a for a in args)


P = PairTerm
# the kit's declarations, and one that has everything at once: mining + NTXent's pair term + sums
# of hinged and weighted terms
PAIR_DECLS = dict(kit.PAIR_DECLARATIONS, mixed=PairLossSpec(
    pos=P(2.0, 0.25, 0.5, 1.0, hinge=True, sum=True), neg=P(3.0, 0.25, lse=True, sum=True),
    miner_epsilon=0.125, pos_vs_neg_lse=True))
PAIR_DECLS_AND_MODES = kit.pair_declarations_and_modes() + [("mixed", mode) for mode in MODES]
CLASS_DECLS = dict(  # name: (declaration, K): the kit's, a padded K (3 -> 4 lanes), rows and columns
    kit.CLASS_DECLARATIONS,
    softtriple_k3=(ClassLossSpec(row=P(20.0, lse=True), centers_per_class=3, pool_gamma=0.1), 3),
    rows_and_cols=(ClassLossSpec(row=P(16.0, lse=True), col_pos=P(-8.0, 0.1, 0.5, 1.0, lse=True)), 1),
    col_neg_weighted=(ClassLossSpec(col_neg=P(8.0, -0.1, 0.5, 1.0, lse=True)), 1),
)


# ---- op-level checks -----------------------------------------------------------------------------
def pair_fwd(args, spec):
    terms, flags = spec.pack()
    return PAIR_FWD(*args, list(terms), flags)


def pair_bwd(gv, args, spec, fwd, need_grad_r=True):
    terms, flags = spec.pack()
    return PAIR_BWD(gv, *args, fwd[0], fwd[2], list(terms), flags, need_grad_r)


def check_pair(args, spec, exact, seed=0):
    """Forward and backward of one call against the oracle (fp64 truth, same-dtype reference);
    exact: set sizes and mining thresholds bitwise equal to the same-dtype oracle's."""
    terms, flags = spec.pack()
    dtype = args[0].dtype
    A = stat_dtype(dtype)
    out = pair_fwd(args, spec)
    assert [t.dtype for t in out] == [A, torch.int32, A]
    n = args[0].shape[0]
    rows = S.pair_value_rows(terms)  # PAIR_VALUES and the histograms' nodes
    assert [tuple(t.shape) for t in out] == [(rows, n), (4, n), (3, n)]
    same = oracle.pair_engine_forward_oracle(*args, terms, flags)
    a64 = cast(args, torch.float64)
    truth = oracle.pair_engine_forward_oracle(*a64, terms, flags)
    if exact:
        assert torch.equal(out[1], same[1]), "counts"
        assert torch.equal(out[2][:2], same[2][:2]), "mining thresholds"
    for k in range(rows):
        name = PAIR_VALUES[k] if k < len(PAIR_VALUES) else f"histogram row {k - len(PAIR_VALUES)}"
        check_close(out[0][k], truth[0][k], same[0][k], what=name, dtype=dtype)
    check_close(out[2][2], truth[2][2], same[2][2], what="pos_vs_neg_dlse", dtype=dtype)
    g = torch.Generator().manual_seed(seed + 1)
    gv = torch.randn(rows, args[0].shape[0], generator=g, dtype=torch.float64).to(DEV, A)
    grads = pair_bwd(gv, args, spec, out)
    ref = oracle.pair_engine_backward_oracle(gv.double(), *a64, truth[0], truth[2], terms, flags, True)
    same_g = oracle.pair_engine_backward_oracle(gv, *args, same[0], same[2], terms, flags, True)
    assert grads[0].dtype == dtype and grads[0].shape == args[0].shape
    check_close(grads[0], ref[0], same_g[0], what="grad_q", dtype=dtype)
    if args[1] is None:
        assert grads[1].shape == (0,)
    else:
        assert grads[1].dtype == dtype and grads[1].shape == args[1].shape
        check_close(grads[1], ref[1], same_g[1], what="grad_r", dtype=dtype)
    return out, grads


def class_fwd(case, spec):
    terms, flags = spec.pack()
    return CLASS_FWD(*case, list(terms), flags)


def check_class(case, spec, seed=0, tol_dtype=None):
    terms, flags = spec.pack()
    q, w, y, K = case
    dtype = q.dtype
    A = stat_dtype(dtype)
    out = class_fwd(case, spec)
    assert out[0].dtype == out[1].dtype == A
    assert out[0].shape == (2, q.shape[0]) and out[1].shape == (2, w.shape[0] // K)
    up = (q.to(A), w.to(A), y, K)  # fp16 / bf16: the kernels compute in fp32 from exact upcasts
    same = oracle.class_engine_forward_oracle(*up, terms, flags)
    c64 = (q.double(), w.double(), y, K)
    truth = oracle.class_engine_forward_oracle(*c64, terms, flags)
    for k in range(2):
        check_close(out[0][k], truth[0][k], same[0][k], what=f"rows[{k}]", dtype=tol_dtype or A)
        check_close(out[1][k], truth[1][k], same[1][k], what=f"cols[{k}]", dtype=tol_dtype or A)
    g = torch.Generator().manual_seed(seed + 1)
    gr = torch.randn(2, q.shape[0], generator=g, dtype=torch.float64).to(DEV, A)
    gc = torch.randn(2, w.shape[0] // K, generator=g, dtype=torch.float64).to(DEV, A)
    grads = CLASS_BWD(gr, gc, q, w, y, out[0], out[1], K, list(terms), flags, True)
    ref = oracle.class_engine_backward_oracle(gr.double(), gc.double(), *c64[:3], truth[0], truth[1], K,
                                              list(terms), flags, True)
    same_g = oracle.class_engine_backward_oracle(gr, gc, *up[:3], same[0], same[1], K, list(terms), flags, True)
    assert grads[0].dtype == dtype and grads[1].dtype == dtype
    assert grads[0].shape == q.shape and grads[1].shape == w.shape
    check_close(grads[0], ref[0], same_g[0].to(dtype), what="grad_q", dtype=dtype)
    check_close(grads[1], ref[1], same_g[1].to(dtype), what="grad_w", dtype=dtype)
    return out, grads


# ================================================================== registration and schemas
def _cpp_schemas():
    """The C++ string literals of csrc/ops.cpp, adjacent ones concatenated (as the compiler does)."""
    import re

    with open(os.path.join(os.path.dirname(__file__), "..", "csrc", "ops.cpp")) as f:
        src = f.read()
    return re.sub(r'"\s*"', "", src)


def test_schemas_are_the_cpp_ops_schemas():
    """Exactly the schemas of csrc/ops.cpp (names with the `triton_` prefix), as registered."""
    cpp = _cpp_schemas()
    for name, schema in T.SCHEMAS.items():
        assert f'"{name}{schema}"' in cpp, name
        op = getattr(torch.ops.fused_pairloss, f"triton_{name}").default
        assert str(op._schema) == f"fused_pairloss::triton_{name}{schema}"
        if fpl.build_info()["cpu"]:  # the C++ op's registered schema, argument for argument
            cpp_op = getattr(torch.ops.fused_pairloss, name).default
            assert str(cpp_op._schema).split("(", 1)[1] == str(op._schema).split("(", 1)[1]


def test_engines_dispatch_to_the_triton_ops():
    from fused_pairloss.ops import engines, stats

    assert stats.forward_op(engines.PAIR, "triton") is PAIR_FWD
    assert stats.forward_op(engines.CLASS, "triton") is CLASS_FWD
    assert "triton" in fpl.available_backends(DEV)


def test_opcheck_all_four_ops():
    for decl, mode in (("mixed", "self"), ("ms_lp_mine", "ref_excl"), ("contrastive_cos", "ref")):
        args = pair_case(mode, 20, 6, "few", torch.float32, "normalized", seed=1)
        spec = PAIR_DECLS[decl]
        terms, flags = spec.pack()
        torch.library.opcheck(PAIR_FWD, (*args, list(terms), flags))
        v, _, aux = PAIR_FWD(*args, list(terms), flags)
        torch.library.opcheck(PAIR_BWD, (torch.ones_like(v), *args, v, aux, list(terms), flags, True))
        rs = kit.row_shifts(20).float().to(DEV)  # the optional row_shift
        torch.library.opcheck(PAIR_FWD, (*args, list(terms), flags, rs))
        v, _, aux = PAIR_FWD(*args, list(terms), flags, rs)
        torch.library.opcheck(PAIR_BWD, (torch.ones_like(v), *args, v, aux, list(terms), flags, True, rs))
    for decl in ("softtriple_k3", "rows_and_cols"):
        spec, K = CLASS_DECLS[decl]
        case = class_case(20, 6, 5, K, torch.float32, seed=2)
        terms, flags = spec.pack()
        torch.library.opcheck(CLASS_FWD, (*case, list(terms), flags))
        rows, cols = CLASS_FWD(*case, list(terms), flags)
        torch.library.opcheck(CLASS_BWD, (torch.ones_like(rows), torch.ones_like(cols), *case[:3], rows, cols, K,
                                          list(terms), flags, True))


def test_bad_arguments():
    args = pair_case("ref", 6, 4, "few", torch.float32)
    terms, flags = PAIR_DECLS["ms"].pack()
    with pytest.raises(RuntimeError, match="terms must have 19"):
        PAIR_FWD(*args, list(terms)[:8], flags)
    with pytest.raises(RuntimeError, match="unknown pair flag"):
        PAIR_FWD(*args, list(terms), flags | (1 << 14))
    with pytest.raises(RuntimeError, match="keep windows cannot be combined with mining"):
        PAIR_FWD(*args, list(terms), flags | S.MINE | S.KEEP_WINDOWS)
    with pytest.raises(RuntimeError, match="exclude-after-mining needs mining"):
        PAIR_FWD(*args, list(terms), flags | S.EXCLUDE_AFTER_MINING)
    hist_terms, hist_flags = kit.HIST_DECLARATIONS["cosine_with_sums"].pack()
    with pytest.raises(RuntimeError, match="a histogram cannot be combined with mining"):
        PAIR_FWD(*args, list(hist_terms), hist_flags | S.MINE)
    with pytest.raises(RuntimeError, match="hist_inv_width must be a number > 0"):
        PAIR_FWD(*args, list(hist_terms[:13]) + [0.0] + list(hist_terms[14:]), hist_flags)
    with pytest.raises(RuntimeError, match="hist-pml-bins needs a histogram of 2 nodes"):
        PAIR_FWD(*args, [1.0 if k == 11 else t for k, t in enumerate(hist_terms)], hist_flags | S.HIST_PML_BINS)
    with pytest.raises(RuntimeError, match="implied"):
        PAIR_FWD(args[0], None, args[2], None, torch.zeros(6, dtype=torch.long, device=DEV), list(terms), flags)
    spec, K = CLASS_DECLS["softtriple_k3"]
    q, w, y, _ = class_case(6, 4, 3, 3, torch.float32)
    terms, flags = spec.pack()
    with pytest.raises(RuntimeError, match="multiple"):
        CLASS_FWD(q, w[:7], y, 3, list(terms), flags)
    with pytest.raises(RuntimeError, match="same D"):
        CLASS_FWD(q, w[:, :2], y, 3, list(terms), flags)
    with pytest.raises(RuntimeError, match="column reductions need"):
        CLASS_FWD(q, w, y, 3, list(terms), flags | S.COL_POS_LSE)


# =================================================================================== pair engine
@pytest.mark.parametrize("decl,mode", PAIR_DECLS_AND_MODES)
def test_pair_op_parity_dyadic(decl, mode):
    """Exact S (fp32, dyadic): sizes and thresholds bitwise, the rest by the rule. N = 45 rows,
    odd M: 2 row tiles and 2 column tiles with edges; D = 12 < BLOCK_D."""
    check_pair(pair_case(mode, 45, 12, "few", torch.float32, "dyadic", seed=len(decl)), PAIR_DECLS[decl],
               exact=True)


@pytest.mark.parametrize("decl", list(PAIR_DECLS))
def test_pair_op_parity_fp64(decl):
    """fp64, random unit rows, D = 40 (three BLOCK_D chunks of 16), every mode."""
    for mode in MODES:
        check_pair(pair_case(mode, 38, 40, "many" if mode == "ref" else "few", torch.float64, "normalized", seed=3),
                   PAIR_DECLS[decl], exact=False)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("decl", list(kit.HIST_DECLARATIONS))
def test_pair_histograms(decl, mode):
    """The histograms (kit.HIST_DECLARATIONS: FastAP's of d^2, HistogramLoss's PML bins, a cosine one
    beside sums): dyadic fp32 rows put pairs on the nodes (where the gradient is 0 on both sides),
    random fp64 rows between them; 2 x 2 tiles with edges."""
    spec = kit.HIST_DECLARATIONS[decl]
    check_pair(pair_case(mode, 45, 12, "few", torch.float32, "dyadic", seed=4), spec, exact=True)
    check_pair(pair_case(mode, 38, 20, "many", torch.float64, "normalized", seed=5), spec, exact=False)


def test_pair_histograms_nan_split_and_reach(monkeypatch):
    """NaN in, NaN out (node 0 of the NaN row only); split walks add their partial histograms; a
    pair past the last node by less than a node width reaches it, one further out adds nothing."""
    spec = kit.HIST_DECLARATIONS["cosine_with_sums"]
    terms, flags = spec.pack()
    args = list(pair_case("ref", 40, 6, "few", torch.float64, "normalized", seed=1))
    args[0][3, 0] = float("nan")
    hist = PAIR_FWD(*args, list(terms), flags)[0][len(PAIR_VALUES):].view(2, 17, 40)
    assert torch.isnan(hist[:, 0, 3]).all() and not torch.isnan(hist[:, 1:, 3]).any()
    assert not torch.isnan(hist[:, :, [0, 1, 2, 4]]).any()
    monkeypatch.setattr(T, "_splits", lambda owned, walked, device: 3)
    split = PAIR_FWD(*args, list(terms), flags)[0][len(PAIR_VALUES):].view(2, 17, 40)
    torch.testing.assert_close(split, hist, equal_nan=True)
    monkeypatch.undo()
    two = PairLossSpec(pos=S.NO_TERM, neg=S.NO_TERM, histogram=S.PairHistogram(2, 4.0, 0.5))
    t2, f2 = two.pack()
    q = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.625, 0.0], [0.875, 0.0]], dtype=torch.float64, device=DEV)
    y = torch.tensor([0, 0, 1, 1], device=DEV)
    h = PAIR_FWD(q, None, y, None, None, list(t2), f2)[0][len(PAIR_VALUES):]
    # nodes 0.5 and 0.75: row 0's positive at S = 1 (u = 2) is out of reach, its negatives at
    # u = 0.5 and 1.5 add 0.5 + 0.5 and 0.5 (the rest of the latter to a node past the last)
    assert h[:, 0].tolist() == [0.0, 0.0, 0.5, 1.0]


@pytest.mark.parametrize("decl", ["ms", "circle", "ntxent", "contrastive_lp"])
def test_pair_op_parity_fp32_random(decl):
    """fp32 random rows (no mining: a pair within an ulp of a threshold could flip), D = 40 (two
    BLOCK_D chunks), label layouts with empty sets."""
    for mode, layout in (("self", "distinct"), ("ref", "same"), ("ref_excl", "many")):
        check_pair(pair_case(mode, 40, 40, layout, torch.float32, "normalized", seed=5), PAIR_DECLS[decl],
                   exact=False)


def test_mining_ties_are_decided_exactly():
    """miner_eps = 1/8 on dyadic S (multiples of 1/16): pairs with S - eps == max_neg exist, the strict
    '<' drops exactly those, in the forward and in the recomputed backward masks (ms_mine0: eps = 0,
    the tie is S == max_neg itself)."""
    for decl in ("ms_mine", "ms_mine0"):
        args = pair_case("self", 64, 6, "few", torch.float32, "dyadic", seed=11)
        q, lq = args[0].double(), args[2]
        eps = PAIR_DECLS[decl].miner_epsilon
        s = q @ q.t()
        same = lq[:, None] == lq[None, :]
        pos = same & ~torch.eye(len(lq), dtype=torch.bool, device=q.device)
        maxn = torch.where(~same, s, -torch.inf).amax(1)
        assert (pos & (s - eps == maxn[:, None])).any(), "the case should contain exact ties"
        out, _ = check_pair(args, PAIR_DECLS[decl], exact=True)
        assert torch.equal(out[1][0], (pos & (s - eps < maxn[:, None])).sum(1).to(torch.int32))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(kit.ROW_SHIFT_DECLARATIONS))
def test_pair_row_shift(name, mode):
    """The op's row_shift against the oracle (the forward's walks, the row pass with self mode's
    second orientation, the column pass)."""
    case = kit.pair_case(mode, 45, 12, "few", torch.float32, seed=9)
    kit.check_row_shift(PAIR_FWD, PAIR_BWD, case, kit.ROW_SHIFT_DECLARATIONS[name], device=DEV)


def test_pair_row_shift_split_walks(monkeypatch):
    """The row shift with the walks split over programs (the GPU occupancy path, forced)."""
    monkeypatch.setattr(T, "_splits", lambda owned, walked, device: 3)
    for name, mode in (("ms_mine", "self"), ("margin_lp", "ref_excl")):
        case = kit.pair_case(mode, 70, 10, "few", torch.float32, seed=21)
        kit.check_row_shift(PAIR_FWD, PAIR_BWD, case, kit.ROW_SHIFT_DECLARATIONS[name], device=DEV)


@pytest.mark.parametrize("decl,mode", [("ms_mine", "self"), ("mixed", "ref_excl"), ("ntxent_lp", "ref"),
                                       ("ms_mine_after_excl", "ref_excl"), ("contrastive_lp", "self"),
                                       ("fastap", "ref"), ("histogram", "self")])
def test_pair_split_walks(decl, mode, monkeypatch):
    """The GPU occupancy path, forced: a row block's walk dealt to 3 programs (partial statistics
    combined in a fixed order, one launch per walk), and the gradient passes' walks split too. Same
    results as the oracle; thresholds and sizes bitwise those of the unsplit run."""
    spec = {**PAIR_DECLS, **kit.HIST_DECLARATIONS}[decl]
    args = pair_case(mode, 70, 10, "few", torch.float32, "dyadic", seed=21)
    one = pair_fwd(args, spec)
    monkeypatch.setattr(T, "_splits", lambda owned, walked, device: 3)
    out, _ = check_pair(args, spec, exact=True)
    assert torch.equal(out[1], one[1]) and torch.equal(out[2][:2], one[2][:2])


@pytest.mark.parametrize("decl,mode", [("ms_lp_mine", "self"), ("lifted_lp", "ref"), ("supcon", "ref_excl")])
def test_pair_chunked_gradient(decl, mode, monkeypatch):
    """D larger than one gradient chunk (forced: BLOCK_G = 16 < D = 40): the owning program
    read-add-writes each chunk of its rows, incl. the lp norms' share; with and without splits."""
    monkeypatch.setattr(T, "_block_g", lambda D, dtype: (16, 16 >= D))
    args = pair_case(mode, 40, 40, "few", torch.float64, "normalized", seed=4)
    check_pair(args, PAIR_DECLS[decl], exact=False)
    monkeypatch.setattr(T, "_splits", lambda owned, walked, device: 2)
    check_pair(args, PAIR_DECLS[decl], exact=False)


def test_need_grad_r_false_skips_the_column_pass(monkeypatch):
    args = pair_case("ref", 40, 8, "few", torch.float64, "normalized", seed=3)
    for decl in ("circle", "ms_lp_mine"):
        spec = PAIR_DECLS[decl]
        fwd = pair_fwd(args, spec)
        gv = torch.randn(len(S.PAIR_VALUES), 40, dtype=torch.float64, device=DEV)
        gq_full, gr_full = pair_bwd(gv, args, spec, fwd, True)
        with monkeypatch.context() as m:
            m.setattr(T, "_pair_bwd_cols", None)  # launching the column pass would fail
            gq, gr = pair_bwd(gv, args, spec, fwd, False)
        assert gr.shape == (0,) and gr_full.shape == args[1].shape
        assert torch.equal(gq, gq_full)


def test_pair_autograd_skips_the_column_pass_for_a_detached_ref():
    """The shared autograd rule (engines.PAIR.register_triton): a ref without grad (memory bank)."""
    from fused_pairloss.ops import stats

    q, r, lq, lr, _ = pair_case("ref", 30, 8, "few", torch.float64, "normalized", seed=2)
    q = q.requires_grad_(True)
    st = stats.pair_stats(q, r, lq, lr, None, PAIR_DECLS["ms_mine"], "triton")
    (gq,) = torch.autograd.grad(st.lse_pos.nan_to_num(0, 0, 0).sum() + st.lse_neg.nan_to_num(0, 0, 0).sum(), q)
    spec = PAIR_DECLS["ms_mine"]
    fwd = pair_fwd((q.detach(), r, lq, lr, None), spec)
    gv = torch.zeros(len(S.PAIR_VALUES), 30, dtype=torch.float64, device=DEV)
    gv[0] = torch.isfinite(fwd[0][0]).double()
    gv[1] = torch.isfinite(fwd[0][1]).double()
    torch.testing.assert_close(gq, pair_bwd(gv, (q.detach(), r, lq, lr, None), spec, fwd, False)[0])


def test_self_mode_equals_its_ref_mode_twin():
    """Self mode (G + G^T in one row pass) equals a ref-mode call with r = a copy of q and the
    diagonal excluded: same statistics, grad_q = grad_q + grad_r of the twin."""
    for decl in ("ms_mine", "ntxent", "contrastive_lp", "mixed"):
        spec = PAIR_DECLS[decl]
        q, _, lq, _, _ = pair_case("self", 50, 6, "few", torch.float64, "dyadic", seed=3)
        twin = (q, q.clone(), lq, lq.clone(), torch.arange(50, device=DEV))
        a, b = pair_fwd((q, None, lq, None, None), spec), pair_fwd(twin, spec)
        assert torch.equal(a[1], b[1]) and torch.equal(a[2][:2], b[2][:2])
        torch.testing.assert_close(a[0], b[0], rtol=1e-12, atol=1e-12)
        gv = torch.randn(len(S.PAIR_VALUES), 50, dtype=torch.float64, device=DEV)
        ga, _ = pair_bwd(gv, (q, None, lq, None, None), spec, a)
        gq, gr = pair_bwd(gv, twin, spec, a)
        torch.testing.assert_close(ga, gq + gr, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_pair_low_precision_inputs(dtype):
    """fp16 / bf16 inputs: fp32 statistics, exact S on dyadic inputs (sizes and thresholds bitwise);
    gradients in the input dtype (rounded once, at the store)."""
    for decl, mode in (("ms_mine", "self"), ("ntxent_lp", "ref_excl")):
        args = pair_case(mode, 40, 12, "few", dtype, "dyadic", seed=4)
        spec = PAIR_DECLS[decl]
        terms, flags = spec.pack()
        out = pair_fwd(args, spec)
        assert out[0].dtype == torch.float32
        up = cast(args, torch.float32)
        same = oracle.pair_engine_forward_oracle(*up, terms, flags)
        assert torch.equal(out[1], same[1]) and torch.equal(out[2][:2], same[2][:2])
        for k in range(5):
            check_close(out[0][k], same[0][k], what=PAIR_VALUES[k], dtype=torch.float32)
        gv = torch.randn(len(S.PAIR_VALUES), 40, dtype=torch.float32, device=DEV)
        gq, gr = pair_bwd(gv, args, spec, out)
        rq, rr = oracle.pair_engine_backward_oracle(gv, *up, out[0], out[2], terms, flags, True)
        assert gq.dtype == dtype
        check_close(gq, rq.to(dtype), what="grad_q", dtype=dtype)
        if args[1] is not None:
            check_close(gr, rr.to(dtype), what="grad_r", dtype=dtype)


def test_pair_nan_propagates():
    """A NaN row gives NaN statistics where the oracle has them (and NaN mining thresholds: the
    kept sets lose the row); NaN reaches the gradients the oracle's NaNs reach."""
    for decl in ("ms", "ms_mine", "ntxent", "contrastive_cos", "supcon"):
        spec = PAIR_DECLS[decl]
        terms, flags = spec.pack()
        for mode in ("self", "ref"):
            args = list(pair_case(mode, 20, 8, "few", torch.float32, "normalized", seed=1))
            args[0] = args[0].clone()
            args[0][5, 2] = float("nan")
            out = pair_fwd(args, spec)
            ref = oracle.pair_engine_forward_oracle(*args, terms, flags)
            assert torch.equal(out[0].isnan(), ref[0].isnan()), decl
            assert torch.equal(out[2].isnan(), ref[2].isnan()), decl
            if spec.mine:
                assert out[2][0, 5].isnan() and out[2][1, 5].isnan()
            gv = torch.ones(len(S.PAIR_VALUES), 20, device=DEV)
            gq, _ = pair_bwd(gv, args, spec, out)
            if spec.pos.hinge or spec.neg.hinge:
                # pair_terms.inl term_dvalue closes the hinge at a NaN x (!(x > 0)); torch's relu
                # backward (the oracle) passes the gradient there (NaN <= 0 is false)
                continue
            rq, _ = oracle.pair_engine_backward_oracle(gv, *args, out[0], out[2], terms, flags, True)
            assert torch.equal(gq.isnan().any(1), rq.isnan().any(1)), decl


def test_pair_large_scales_stay_finite():
    """gamma = 256, beta = 50, 1/temperature = 100: logits far beyond exp's range; the online max
    keeps the statistics and gradients finite and by the rule."""
    decls = [PairLossSpec(pos=P(-256.0, 0.75, 1.25, -1.0, lse=True), neg=P(256.0, 0.25, 0.25, 1.0, lse=True)),
             PairLossSpec(pos=P(-50.0, -0.9, lse=True), neg=P(50.0, 0.5, lse=True), miner_epsilon=0.1),
             PairLossSpec(pos=P(100.0), neg=P(100.0, lse=True), pos_vs_neg_lse=True)]
    args = pair_case("ref", 40, 16, "few", torch.float32, "normalized", seed=5)
    for k, spec in enumerate(decls):
        out, grads = check_pair(args, spec, exact=False)
        assert k != 0 or out[0][:2][torch.isfinite(out[0][:2])].abs().max() > 100  # beyond exp's range
        assert torch.isfinite(out[0][1][out[1][1] > 0]).all() and torch.isfinite(out[0][2:]).all()
        assert not spec.pos.lse or torch.isfinite(out[0][0][out[1][0] > 0]).all()
        assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("mode", ["self", "ref_excl"])
def test_ntxent_terms_below_the_tiny(mode, dtype):
    """-log(e^t + tiny) where e^t is below the tiny (kit.ntxent_below_tiny_case)."""
    case, spec = kit.ntxent_below_tiny_case(mode, dtype)
    check_pair(case.to(device=DEV).args(), spec, exact=False)


def test_pair_empty_and_tiny():
    spec = PAIR_DECLS["mixed"]
    terms, flags = spec.pack()
    q = normalized(5, 16, torch.Generator().manual_seed(0), torch.float32).to(DEV)
    lq = torch.tensor([0, 0, 1, 1, 2], device=DEV)
    # M = 0: empty sets everywhere
    v, c, a = PAIR_FWD(q, q[:0], lq, lq[:0], None, list(terms), flags)
    assert torch.isneginf(v[:2]).all() and (v[2:] == 0).all() and (c == 0).all()
    assert torch.isposinf(a[0]).all() and torch.isneginf(a[1]).all() and (a[2] == 0).all()
    gq, gr = PAIR_BWD(torch.ones(len(S.PAIR_VALUES), 5, device=DEV), q, q[:0], lq, lq[:0], None, v, a, list(terms),
                      flags, True)
    assert (gq == 0).all() and gr.shape == (0, 16)
    # N = 0
    v, c, a = PAIR_FWD(q[:0], None, lq[:0], None, None, list(terms), flags)
    assert v.shape == (len(S.PAIR_VALUES), 0) and c.shape == (4, 0) and a.shape == (3, 0)
    gq, gr = PAIR_BWD(v, q[:0], None, lq[:0], None, None, v, a, list(terms), flags, True)
    assert gq.shape == (0, 16) and gr.shape == (0,)
    # N = 1, self mode: no pairs
    check_pair((q[:1], None, lq[:1], None, None), spec, exact=True)
    # tiny ref mode with every row excluding another column
    check_pair((q, q.flip(0).contiguous(), lq, lq.flip(0).contiguous(), torch.tensor([4, 3, -1, 1, 0], device=DEV)),
               spec, exact=False)


def test_pair_deterministic():
    for mode in ("self", "ref"):
        args = pair_case(mode, 50, 16, "few", torch.float32, "normalized", seed=9)
        spec = PAIR_DECLS["mixed"]
        a, b = pair_fwd(args, spec), pair_fwd(args, spec)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        gv = torch.randn(len(S.PAIR_VALUES), 50, device=DEV)
        ga, gb = pair_bwd(gv, args, spec, a), pair_bwd(gv, args, spec, a)
        assert torch.equal(ga[0], gb[0]) and torch.equal(ga[1], gb[1])


# ================================================================================== class engine
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("decl", list(CLASS_DECLS))
def test_class_op_parity(decl, dtype):
    """N = 45 (2 row blocks), C = 37 (KP = 8 for K = 5: 10 class tiles; K = 1: 2 tiles), D = 40
    (several BLOCK_D chunks); a one-row, one-class case too."""
    spec, K = CLASS_DECLS[decl]
    check_class(class_case(45, 40, 37, K, dtype, seed=7), spec)
    check_class(class_case(1, 8, 1, K, dtype, seed=8), spec)


@pytest.mark.parametrize("decl", ["softtriple", "proxyanchor", "rows_and_cols"])
def test_class_splits_and_chunked_gradient(decl, monkeypatch):
    """Split walks (row kernels over class tiles, column kernels over row blocks: partial LSEs merged,
    partial gradients summed) and the chunked gradient form, forced."""
    spec, K = CLASS_DECLS[decl]
    case = class_case(40, 40, 21, K, torch.float64, seed=15)
    one = check_class(case, spec)
    monkeypatch.setattr(T, "_splits", lambda owned, walked, device: 3)
    monkeypatch.setattr(T, "_block_g", lambda D, dtype: (16, 16 >= D))
    out, grads = check_class(case, spec)
    torch.testing.assert_close(out, one[0], rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(grads, one[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_class_low_precision_inputs(dtype):
    for decl in ("softtriple_k3", "proxyanchor"):
        spec, K = CLASS_DECLS[decl]
        check_class(class_case(40, 32, 19, K, dtype, seed=4), spec, tol_dtype=torch.float32)


def test_class_need_grad_w_false(monkeypatch):
    spec, K = CLASS_DECLS["rows_and_cols"]
    case = class_case(40, 8, 20, K, torch.float64, seed=1)
    terms, flags = spec.pack()
    rows, cols = class_fwd(case, spec)
    gr, gc = torch.randn_like(rows), torch.randn_like(cols)
    args = (*case[:3], rows, cols, K, list(terms), flags)
    gq2, gw2 = CLASS_BWD(gr, gc, *args, True)
    monkeypatch.setattr(T, "_class_bwd_cols_kernel", None)  # launching the column pass would fail
    gq, gw = CLASS_BWD(gr, gc, *args, False)
    assert gw.shape == (0,) and gw2.shape == case[1].shape
    assert torch.equal(gq, gq2)


def test_class_nan_propagates():
    """NaN in a row of q and in one center: the row LSEs and column LSEs are NaN where the oracle's
    are; target_sim is S_{i,y_i} itself (NaN only for the rows whose target is NaN)."""
    for decl in ("softtriple", "proxyanchor", "rows_and_cols"):
        spec, K = CLASS_DECLS[decl]
        q, w, y, _ = class_case(12, 8, 4, K, torch.float32, seed=2)
        q[3, 1] = float("nan")
        w[2 * K, 0] = float("nan")  # class 2
        terms, flags = spec.pack()
        rows, cols = class_fwd((q, w, y, K), spec)
        ref_rows, ref_cols = oracle.class_engine_forward_oracle(q, w, y, K, terms, flags)
        assert torch.equal(rows[0].isnan(), ref_rows[0].isnan()) and torch.equal(cols.isnan(), ref_cols.isnan())
        expect = (y == 2) | (torch.arange(12, device=DEV) == 3)
        assert torch.equal(rows[1].isnan(), expect), decl


def test_class_large_scales_stay_finite():
    """gamma = 1024, la = 200 with a sharp pool (gamma 0.01): logits far beyond exp's range."""
    for spec, K in ((ClassLossSpec(row=P(1024.0, 0.25, 0.25, 1.0, lse=True)), 1),
                    (ClassLossSpec(row=P(200.0, lse=True), centers_per_class=5, pool_gamma=0.01), 5),
                    (ClassLossSpec(col_pos=P(-512.0, 0.1, lse=True), col_neg=P(512.0, -0.1, lse=True)), 1)):
        out, grads = check_class(class_case(40, 32, 13, K, torch.float32, seed=5), spec)
        stats = torch.cat([out[0][0], out[1].flatten()])
        assert stats[torch.isfinite(stats)].abs().max() > 100  # beyond exp's range
        assert all(torch.isfinite(g).all() for g in grads)


def test_class_empty():
    spec, K = CLASS_DECLS["rows_and_cols"]
    q, w, y, _ = class_case(5, 16, 4, K, torch.float32, seed=8)
    terms, flags = spec.pack()
    rows, cols = CLASS_FWD(q[:0], w, y[:0], K, list(terms), flags)
    assert rows.shape == (2, 0) and cols.shape == (2, 4) and torch.isneginf(cols).all()
    gq, gw = CLASS_BWD(rows, torch.ones_like(cols), q[:0], w, y[:0], rows, cols, K, list(terms), flags, True)
    assert gq.shape == (0, 16) and gw.shape == w.shape and (gw == 0).all()


def test_class_deterministic():
    spec, K = CLASS_DECLS["softtriple_k3"]
    case = class_case(50, 16, 20, K, torch.float32, seed=9)
    terms, flags = spec.pack()
    a, b = class_fwd(case, spec), class_fwd(case, spec)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    gr, gc = torch.randn_like(a[0]), torch.randn_like(a[1])
    args = (gr, gc, *case[:3], a[0], a[1], K, list(terms), flags, True)
    ga, gb = CLASS_BWD(*args), CLASS_BWD(*args)
    assert torch.equal(ga[0], gb[0]) and torch.equal(ga[1], gb[1])


# ==================================================================================== loss level
@pytest.mark.parametrize("name", kit.PAIR_LOSSES + kit.CLASS_LOSSES)
def test_loss_parity(name):
    """Every loss of the kit's table through the shared autograd rule (engines.*.register_triton):
    value and gradients by the kit's rule (fp32, truth the fp64 reference)."""
    loss = kit.LOSSES[name]
    modes = tuple(m for m in ("self", "ref_excl") if m in loss.modes) if loss.kind == "pair" else ("self",)
    for mode in modes:
        case = kit.loss_case(loss, 24, 8, torch.float32, mode=mode, seed=1)
        if DEV != "cpu":  # the same leaves on the GPU
            conv = {id(p): p.detach().to(DEV).requires_grad_(True) for p in case.params}
            case = kit.LossCase(tuple(conv.get(id(a), a.to(DEV) if torch.is_tensor(a) else a) for a in case.args),
                                tuple(conv[id(p)] for p in case.params))
        kit.check_loss_parity(loss, case, "triton", what=f"{name} {mode}")


# ============================================================================ compiles for a GPU
_COMPILE_SCRIPT = textwrap.dedent("""
    import os
    os.environ.pop("TRITON_INTERPRET", None)
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fused_pairloss.ops import triton_engines as T
    from fused_pairloss.ops import spec as S
    TY = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}
    from fused_pairloss.ops import triton_triplets as TT
    INT_PTRS = {"lq_ptr": "*i64", "lr_ptr": "*i64", "ex_ptr": "*i64", "y_ptr": "*i64", "cnt_ptr": "*i32",
                "cols_ptr": "*i64", "counts_ptr": "*i64", "win_ptr": "*i64", "k_ptr": "*i32", "rank_ptr": "*i64",
                "er_ptr": "*i64", "pos_ptr": "*i64"}

    def build(kern, dtype, const, arch, num_warps, num_stages=3, ptrs=None):
        names = kern.arg_names
        sig = {}
        for n in names:
            if n in const: sig[n] = "constexpr"
            elif n in (ptrs or {}): sig[n] = ptrs[n]
            elif n in INT_PTRS: sig[n] = INT_PTRS[n]
            elif n in ("q_ptr", "r_ptr", "w_ptr"): sig[n] = "*" + TY[dtype]
            elif n.endswith("_ptr"): sig[n] = "*" + TY[T.stat_dtype(dtype)]
            elif n.startswith("k_"): sig[n] = "fp64"
            else: sig[n] = "i32"
        src = ASTSource(fn=kern, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()})
        out = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                             options={"num_warps": num_warps, "num_stages": num_stages})
        assert out.asm["cubin"], kern

    def pair(dtype, flags, arch, self_mode, excl, D, temperatures=(0.0, 0.0), hist_nodes=0):
        sw = T._pair_switches(flags, [0.0] * 9 + list(temperatures) + [float(hist_nodes), 0.0, 1.0])
        cfg = T._FWD_CONFIGS[0]
        common = dict(EXCL=excl, PREC=T.dot_precision(dtype), BLOCK_D=T.block_d(dtype), **cfg.kwargs)
        build(T._pair_fwd_kernel, dtype, dict(common, **sw, WALK_THRESH=sw["MINE"], WALK_MAIN=True,
                                              WALK_NTX=sw["NTX"]), arch, cfg.num_warps)
        bg, one = T._block_g(D, dtype)
        b = dict(common, **sw, BLOCK_G=bg, ONE_CHUNK=one, GPREC=T.grad_dot_precision(dtype))
        b.pop("EAM")
        if self_mode:
            build(T._pair_bwd_rows_kernel, dtype, dict(b, SELF=True), arch, cfg.num_warps)
        else:
            build(T._pair_bwd_cols_kernel, dtype, b, arch, cfg.num_warps)

    def klass(dtype, flags, K, arch, D):
        sw = T._class_switches(flags)
        blocks = T._class_blocks(4096, 1000, K, dtype)
        warps = blocks.pop("num_warps")
        prec = T.dot_precision(dtype)
        pool = T._pool_kind(K, flags)
        build(T._class_fwd_rows_kernel, dtype, dict(ROW_LSE=sw["ROW_LSE"], ROW_SP=sw["ROW_SP"], POOL=pool, PREC=prec,
                                                    **blocks), arch, warps)
        bg, one = T._block_g(D, dtype)
        meta = dict(PREC=prec, POOL=pool, **sw, **blocks, BLOCK_G=bg, ONE_CHUNK=one, GPREC=T.grad_dot_precision(dtype))
        if K == 1:
            cb = dict(blocks)
            cb.pop("KP")
            build(T._class_fwd_cols_kernel, dtype, dict(COL_POS=sw["COL_POS"], COL_NEG=sw["COL_NEG"],
                                                        WRITE_TSIM=True, PREC=prec, **cb), arch, warps)
            build(T._class_bwd_cols_kernel, dtype, meta, arch, warps)
        else:
            build(T._class_bwd_rows_kernel, dtype, meta, arch, warps)

    def triplet(dtype, lp, window, arch, D):  # the all-triplets kernels (ops/triton_triplets.py), on A = fp32
        b = TT._blocks()
        warps, stages = b.pop("num_warps"), b.pop("num_stages")
        common = dict(LP=lp, WINDOW=window, PREC=T.dot_precision(dtype), BLOCK_D=T.block_d(dtype), **b)
        build(TT._triplet_fwd_kernel, torch.float32, common, arch, warps, stages)
        bg, one = T._block_g(D, dtype)
        g = dict(common, BINS=False, GPREC=T.grad_dot_precision(dtype), BLOCK_G=bg, ONE_CHUNK=one)
        build(TT._triplet_bwd_rows_kernel, torch.float32, dict(g, GRAD=True), arch, warps, stages)
        build(TT._triplet_bwd_cols_kernel, torch.float32, g, arch, warps, stages)
        build(TT._triplet_pos_u_kernel, torch.float32, dict(LP=lp, PREC=T.dot_precision(dtype), BLOCK=b["BLOCK_M"],
                                                           BLOCK_D=T.block_d(dtype)), arch, warps, stages)

    def rank_rows(dtype, arch):  # SmoothAP's and PNP's row kernels (ops/triton_rank_rows.py) on S's dtype
        from fused_pairloss.ops import triton_rank_rows as TR
        b = dict(BLOCK_P=TR._BLOCK_P, BLOCK_J=TR._BLOCK_J)
        for kern, extra in ((TR._smooth_ap_ranks_kernel, dict(DERIV=True)), (TR._smooth_ap_grad_kernel, {}),
                            (TR._pnp_ranks_kernel, dict(DERIV=True)), (TR._pnp_grad_kernel, {})):
            build(kern, dtype, dict(b, **extra), arch, 4)

    def bins(dtype, arch, D):  # the triplet bins (DynamicSoftMargin): the forward's rows x columns x bins
        b = TT._blocks()
        warps, stages = b.pop("num_warps"), b.pop("num_stages")
        common = dict(PREC=T.dot_precision(dtype), BLOCK_D=T.block_d(dtype), **b)
        build(TT._triplet_bins_fwd_kernel, torch.float32, dict(common, NB=16), arch, warps, stages,
              ptrs={"acc_ptr": "*fp64"})
        bg, one = T._block_g(D, dtype)
        g = dict(common, LP=True, WINDOW=False, BINS=True, GPREC=T.grad_dot_precision(dtype), BLOCK_G=bg,
                 ONE_CHUNK=one)
        build(TT._triplet_bwd_rows_kernel, torch.float32, dict(g, GRAD=True), arch, warps, stages,
              ptrs={"k_ptr": "*fp32"})
        build(TT._triplet_bwd_cols_kernel, torch.float32, g, arch, warps, stages, ptrs={"k_ptr": "*fp32"})

    # bf16 self mode with mining (register accumulator); fp32 ref mode with lp, NTXent, sums, hinge,
    # mining and exclude_col (chunked gradient); exp-weighted sums; SoftTriple's pooling in bf16; SubCenterArcFace's max
    # pooling in fp32; ProxyAnchor in fp32; SigLIP's softplus rows (D + 1 = 528 columns) in fp32; the
    # triplet kernels (lp, all triplets, register accumulator; cosine, a miner's window, chunked)
    pair(torch.bfloat16, S.MINE | S.POS_LSE | S.NEG_LSE | S.EXCLUDE_AFTER_MINING, 90, True, 1, 128)
    pair(torch.float32, S.NEG_LSE | S.NEG_SUM | S.POS_SUM | S.POS_HINGE | S.POS_VS_NEG_LSE | S.LP_DISTANCE | S.MINE,
         80, False, 2, 300)
    # RankedListLoss's exp-weighted sums (lp, self mode)
    pair(torch.float32, S.POS_SUM | S.POS_HINGE | S.NEG_SUM | S.NEG_HINGE | S.LP_DISTANCE, 90, True, 0, 128,
         (1.0, 10.0))
    # histograms: FastAP's of d^2 (fp32, self mode), HistogramLoss's PML bins (fp16 ref mode, chunked gradient)
    pair(torch.float32, S.LP_DISTANCE | S.HIST_SQUARED, 90, True, 1, 128, hist_nodes=11)
    pair(torch.float16, S.HIST_PML_BINS | S.POS_SUM, 80, False, 0, 300, hist_nodes=101)
    pair(torch.float64, S.HIST_PML_BINS, 80, True, 1, 64, hist_nodes=17)  # fp64 atomic adds
    klass(torch.bfloat16, S.ROW_LSE, 10, 90, 128)
    klass(torch.float32, S.ROW_LSE | S.POOL_MAX, 3, 80, 128)
    klass(torch.float32, S.COL_POS_LSE | S.COL_NEG_LSE, 1, 80, 300)
    klass(torch.float32, S.ROW_LSE | S.ROW_SOFTPLUS_SUM, 1, 90, 528)
    triplet(torch.float32, True, False, 90, 128)
    triplet(torch.float32, False, True, 80, 300)
    bins(torch.float32, 90, 128)
    rank_rows(torch.float32, 90)
    rank_rows(torch.float64, 80)
    print("compiled")
""")


@pytest.mark.skipif(not INTERPRET, reason="on a GPU the other tests compile and run the kernels")
def test_kernels_compile_for_gpu():
    """The interpreter accepts code the GPU compiler rejects: compile the kernels of both engines for
    sm_90 / sm_80 through ptxas (Triton's own), in a subprocess without the interpreter."""
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=900)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("no ptxas in this triton install")
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-4000:]


# ============================================================================== GPU only (issue)
GPU_LOSSES = {  # name: (call(x, y, c), K or None)
    "ms": (lambda x, y, c, **kw: fpl.functional.multi_similarity_loss(x, y, **kw), None),
    "ms_mined": (lambda x, y, c, **kw: fpl.functional.multi_similarity_loss(x, y, miner_epsilon=0.1, **kw), None),
    "circle": (lambda x, y, c, **kw: fpl.functional.circle_loss(x, y, **kw), None),
    "softtriple": (lambda x, y, c, **kw: fpl.functional.soft_triple_loss(x, y, c, centers_per_class=10, **kw), 10),
    "proxycircle": (lambda x, y, c, **kw: fpl.functional.proxy_circle_loss(x, y, c, **kw), 1),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", list(GPU_LOSSES))
def test_gpu_low_precision_error_vs_fp64(name, dtype):
    """The kit's rule at loss level: the Triton fp16 / bf16 error (vs the fp64 reference) is at most
    2x the reference backend's own error in that dtype, plus a small floor."""
    call, K = GPU_LOSSES[name]
    gen = torch.Generator().manual_seed(0)
    x64 = torch.randn(512, 128, generator=gen, dtype=torch.float64).cuda()
    y = torch.randint(0, 32 if K is None else 300, (512,), generator=gen).cuda()
    c64 = None if K is None else torch.randn(128, 300 * K, generator=gen, dtype=torch.float64).cuda()

    def run(backend, dt):
        x = x64.to(dt).requires_grad_()
        c = None if c64 is None else c64.to(dt).requires_grad_()
        loss = call(x, y, c, backend=backend)
        return (loss, *torch.autograd.grad(loss, (x,) if c is None else (x, c)))

    truth, low, tri = run("reference", torch.float64), run("reference", dtype), run("triton", dtype)
    assert all(t.dtype == dtype for t in tri)
    for a, b, t in zip(tri, low, truth):
        check_close(a, t, b, what=name, dtype=dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("decl", ["ms_mine", "circle", "ntxent_lp", "contrastive_lp", "mixed"])
def test_gpu_fp32_op_parity(decl):
    """Real sizes on a GPU (true fp32 products: allow_tf32 off): several row blocks, split walks
    (few row blocks for the SM count), dyadic inputs so the sizes and thresholds are bitwise."""
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for mode in MODES:
            check_pair(pair_case(mode, 1000, 40, "many", torch.float32, "dyadic", seed=0, m=777),
                       PAIR_DECLS[decl], exact=True)
            check_pair(pair_case(mode, 200, 40, "few", torch.float32, "dyadic", seed=1), PAIR_DECLS[decl],
                       exact=True)  # 4 row blocks: split walks
        for name in ("softtriple", "proxyanchor", "rows_and_cols"):
            spec, K = CLASS_DECLS[name]
            check_class(class_case(1000, 129, 777, K, torch.float32, seed=12), spec)
            check_class(class_case(300, 512, 100, K, torch.float32, seed=13), spec)  # chunked gradient
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


@pytest.mark.gpu
def test_gpu_deterministic_and_same_bits_split_or_not():
    """Run to run bitwise; the mining decisions of split (few rows) and unsplit runs agree bitwise."""
    spec = PAIR_DECLS["ms_mine"]
    args = pair_case("self", 4096, 128, "many", torch.float32, "normalized", seed=3)
    a, b = pair_fwd(args, spec), pair_fwd(args, spec)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    gv = torch.randn(len(S.PAIR_VALUES), 4096, device="cuda")
    ga, gb = pair_bwd(gv, args, spec, a), pair_bwd(gv, args, spec, a)
    assert torch.equal(ga[0], gb[0])
    # 128 rows against 4096: 2 row blocks, so the walks are split over many programs
    few = (args[0][:128].contiguous(), args[0], args[2][:128].contiguous(), args[2], torch.arange(128, device="cuda"))
    assert T._splits(2, 64, torch.device("cuda")) > 1
    split = pair_fwd(few, spec)
    T_splits = T._splits
    try:
        T._splits = lambda owned, walked, device: 1
        unsplit = pair_fwd(few, spec)
    finally:
        T._splits = T_splits
    assert torch.equal(split[1], unsplit[1]) and torch.equal(split[2][:2], unsplit[2][:2])
    torch.testing.assert_close(split[0], unsplit[0], rtol=1e-5, atol=1e-5)
    case = class_case(2048, 128, 1000, 10, torch.bfloat16, seed=4)
    spec_c, _ = CLASS_DECLS["softtriple"]
    spec_c = ClassLossSpec(row=spec_c.row, centers_per_class=10, pool_gamma=0.1)
    r1, r2 = class_fwd(case, spec_c), class_fwd(case, spec_c)
    assert torch.equal(r1[0], r2[0])


@pytest.mark.gpu
def test_gpu_no_n_by_n_memory():
    """N = 16384 self mode with mining and NTXent's walk, fwd + bwd: peak extra memory far below one
    N x N fp32 matrix (1 GiB); class engine N = 8192, C*K = 50000 (1.5 GiB as N x C*K)."""
    n, d = 16384, 128
    x = F.normalize(torch.randn(n, d, device="cuda"), dim=1)
    y = torch.randint(0, 1000, (n,), device="cuda")
    spec = PAIR_DECLS["mixed"]
    gv = torch.ones(len(S.PAIR_VALUES), n, device="cuda")
    step = lambda: pair_bwd(gv, (x, None, y, None, None), spec, pair_fwd((x, None, y, None, None), spec))  # noqa
    step()  # autotuning (its benchmark allocates a cache-flush buffer) happens here
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    gq, _ = step()
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < 64 * 2**20
    assert torch.isfinite(gq).all()
    q, w, yc, K = class_case(8192, 128, 5000, 10, torch.float32, seed=14)
    spec_c = ClassLossSpec(row=P(20.0, lse=True), centers_per_class=10, pool_gamma=0.1)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    rows, cols = class_fwd((q, w, yc, K), spec_c)
    terms, flags = spec_c.pack()
    CLASS_BWD(torch.ones_like(rows), torch.zeros_like(cols), q, w, yc, rows, cols, K, list(terms), flags, True)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < 2 * (8192 + 50000) * 128 * 4 + 64 * 2**20


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph():
    """The triton_ops trace into torch.compile (fullgraph) and give the eager values and gradients."""
    torch._dynamo.reset()
    x = torch.randn(256, 64, device="cuda", requires_grad=True)
    y = torch.randint(0, 16, (256,), device="cuda")
    f = lambda x: fpl.functional.multi_similarity_loss(x, y, miner_epsilon=0.1, backend="triton")  # noqa: E731
    lc = torch.compile(f, fullgraph=True)(x)
    (gc,) = torch.autograd.grad(lc, x)
    le = f(x)
    (ge,) = torch.autograd.grad(le, x)
    torch.testing.assert_close(lc, le)
    torch.testing.assert_close(gc, ge)


@pytest.mark.gpu
def test_gpu_tf32_only_when_enabled():
    """fp32 uses true fp32 products unless allow_tf32: with it off the statistics match fp64 to fp32
    rounding; with it on they may not (and stay within TF32's error)."""
    args = pair_case("ref", 512, 256, "many", torch.float32, "normalized", seed=6)
    spec = PAIR_DECLS["circle"]
    terms, flags = spec.pack()
    truth = oracle.pair_engine_forward_oracle(*cast(args, torch.float64), terms, flags)
    prev = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        ieee = pair_fwd(args, spec)
        torch.backends.cuda.matmul.allow_tf32 = True
        tf32 = pair_fwd(args, spec)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    fin = torch.isfinite(truth[0][:2])
    e_ieee = (ieee[0][:2].double() - truth[0][:2])[fin].abs().max().item()
    e_tf32 = (tf32[0][:2].double() - truth[0][:2])[fin].abs().max().item()
    assert e_ieee < 1e-3 and e_ieee <= e_tf32 + 1e-6
