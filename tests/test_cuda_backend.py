"""CUDA C++ backend (backend "cuda", csrc/cuda): pair engine and class engine, with the shared
kit's declarations, inputs and tolerance rule (tests/kit.py).

Three layers:
- CPU, always: when the installed library was built with CUDA (build_info()["cuda"]), all four
  ops have CUDA kernels registered (CI builds the CUDA code on a machine with no GPU and checks it
  this way).
- CPU, when a C++ compiler and the CUDA headers are there: the kernels of csrc/cuda compiled as
  plain C++ (csrc/cuda/emu: one std::thread per CUDA thread, emulated barriers, shuffles and WMMA
  fragments) inside the real host glue (csrc/cuda/glue.h), registered as ops `fpl_cuda_emu::*` on
  CPU tensors with the schemas of the fused ops, and compared op by op with the materializing
  oracles (fused_pairloss.ops.oracle). This runs the real tiling, masks, label-sorted bands,
  transposed / symmetrized self-mode tiles and every backward pass on a machine without a GPU.
- GPU (@pytest.mark.gpu, skipped without one): the same op-level parity on the device in every
  dtype, loss-level parity of every loss of the kit's table against backend="reference",
  determinism, memory, large scales.

Declarations: the kit's table (the losses' own declarations) plus a few built directly with
spec.PairLossSpec / ClassLossSpec for engine features no loss combines yet (LSE and sum of one
set, NTXent's pair term with mining, a row term with both column terms, K = 10 / 64).
Exactness (docs/design.md): on dyadic inputs every dot product, squared norm and squared distance is
exact in any summation order, also through the tensor cores (fp16 / bf16 hold k/4 exactly), so
the set sizes and the mining thresholds are compared bitwise with the same-dtype oracle; mining
epsilons and margins are multiples of 1/16, so many pairs sit exactly on the boundaries.
Everything else: kit.check_close, with the stat dtype's floor for statistics and the input
dtype's for gradients (returned in the input dtype).
"""
import glob
import hashlib
import os
import tempfile

import pytest
import torch

import fused_pairloss as fpl
from fused_pairloss.ops import oracle
from fused_pairloss.ops import spec as S

import kit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
LOWP = (torch.float16, torch.bfloat16)
ALL_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
DTYPE_IDS = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
T = S.PairTerm

# ---- declarations: the kit's, and engine features beyond them ------------------------------------
EXTRA_PAIR = {
    # weighted (Circle's detached relu weights) terms reduced by LSE and by sum together
    "circle_lse_sum": S.PairLossSpec(pos=T(-4.0, 0.75, 1.25, -1.0, lse=True, sum=True),
                                     neg=T(4.0, 0.25, 0.25, 1.0, lse=True, sum=True)),
    # NTXent's pair term with mining: both deferrals (max_neg and lse_neg) in one walk
    "ntxent_mine": S.PairLossSpec(pos=T(4.0, lse=True), neg=T(4.0, lse=True), pos_vs_neg_lse=True,
                                  miner_epsilon=0.0625),
    "ntxent_lp_mine_after_excl": S.PairLossSpec(pos=T(-2.0, sum=True), neg=T(-2.0, lse=True), distance="lp",
                                                pos_vs_neg_lse=True, miner_epsilon=0.125,
                                                exclude_after_mining=True),
}
PAIR_DECLS = {**kit.PAIR_DECLARATIONS, **EXTRA_PAIR}

EXTRA_CLASS = {
    "softtriple_k10": (S.ClassLossSpec(row=T(8.0, lse=True), centers_per_class=10, pool_gamma=0.125), 10),
    "softtriple_k64": (S.ClassLossSpec(row=T(8.0, lse=True), centers_per_class=64, pool_gamma=0.125), 64),
    # a row term and both column terms: the row and the column kernel in one call
    "row_and_cols": (S.ClassLossSpec(row=T(4.0, 0.125, lse=True), col_pos=T(-2.0, 0.5, lse=True),
                                     col_neg=T(2.0, 0.0, 0.25, 1.0, lse=True)), 1),
}
CLASS_DECLS = {**kit.CLASS_DECLARATIONS, **EXTRA_CLASS}


def decls_and_modes(names=None):
    """(declaration, mode) pairs that mean something (kit's rule: exclude-after-mining only with
    the excluded column of a separate ref)."""
    names = list(PAIR_DECLS) if names is None else names
    return [(n, m) for n in names for m in kit.MODES if m == "ref_excl" or not PAIR_DECLS[n].exclude_after_mining]


# ---- checks against the oracles -------------------------------------------------------------------
def _on(t, device):
    return t if (t is None or device is None) else t.to(device)


def _cpu(ts):
    return [t.cpu() for t in ts]


def check_pair(ops, case, spec, exact, seed=0, need_grad_r=True, device=None):
    """Forward and backward of one op call (emulated: device None; GPU: "cuda") against the oracle:
    fp64 truth and same-dtype reference (kit.check_close), set sizes and thresholds bitwise where
    exact. Returns the outputs (on the CPU)."""
    dtype = case.q.dtype
    A = kit.stat_dtype(dtype)
    terms, flags = spec.pack()
    dcase = case.to(device=device) if device else case
    out = _cpu(ops.pair_engine_forward(*dcase.args(), list(terms), flags))
    same = oracle.pair_engine_forward_oracle(*case.args(), terms, flags)
    truth, _ = kit.pair_truth(case, spec)
    assert [t.dtype for t in out] == [A, torch.int32, A]
    assert [t.shape for t in out] == [t.shape for t in same]
    if exact:
        assert torch.equal(out[1], same[1]), "set sizes"
        assert torch.equal(out[2][:2], same[2][:2]), "mining thresholds"
    else:
        for k in (0, 1):
            kit.check_close(out[2][k], truth[2][k], same[2][k], what=S.PAIR_AUX[k], dtype=A)
    rows = S.pair_value_rows(terms)  # PAIR_VALUES and the histograms' nodes
    for k in range(rows):
        name = S.PAIR_VALUES[k] if k < len(S.PAIR_VALUES) else f"histogram row {k - len(S.PAIR_VALUES)}"
        kit.check_close(out[0][k], truth[0][k], same[0][k], what=name, dtype=A)
    kit.check_close(out[2][2], truth[2][2], same[2][2], what=S.PAIR_AUX[2], dtype=A)
    g = torch.Generator().manual_seed(seed + 1)
    gv = torch.randn(rows, case.q.shape[0], generator=g, dtype=torch.float64).to(A)
    # the backward gets its own forward's statistics, as in training
    grads = _cpu(ops.pair_engine_backward(_on(gv, device), *dcase.args(), _on(out[0], device), _on(out[2], device),
                                          list(terms), flags, need_grad_r))
    _, truth_g = kit.pair_truth(case, spec, gv, need_grad_r)
    same_g = oracle.pair_engine_backward_oracle(gv, *case.args(), same[0], same[2], terms, flags, need_grad_r)
    assert grads[0].dtype == dtype
    kit.check_close(grads[0], truth_g[0], same_g[0], what="grad_q", dtype=dtype)
    if case.r is None or not need_grad_r:
        assert grads[1].shape == (0,)
    else:
        assert grads[1].dtype == dtype
        kit.check_close(grads[1], truth_g[1], same_g[1], what="grad_r", dtype=dtype)
    return out, grads


def check_class(ops, case, spec, seed=0, need_grad_w=True, device=None):
    dtype = case.q.dtype
    A = kit.stat_dtype(dtype)
    terms, flags = spec.pack()
    dcase = case.to(device=device) if device else case
    out = _cpu(ops.class_engine_forward(*dcase.args(), list(terms), flags))
    same = oracle.class_engine_forward_oracle(*case.args(), terms, flags)
    c64 = case.to(torch.float64)
    truth = oracle.class_engine_forward_oracle(*c64.args(), terms, flags)
    assert out[0].dtype == out[1].dtype == A
    for k in range(2):
        kit.check_close(out[0][k], truth[0][k], same[0][k], what=S.CLASS_ROWS[k], dtype=A)
        kit.check_close(out[1][k], truth[1][k], same[1][k], what=S.CLASS_COLS[k], dtype=A)
    g = torch.Generator().manual_seed(seed + 1)
    n, C = case.q.shape[0], case.w.shape[0] // case.K
    gr = torch.randn(2, n, generator=g, dtype=torch.float64).to(A)
    gc = torch.randn(2, C, generator=g, dtype=torch.float64).to(A)
    grads = _cpu(ops.class_engine_backward(_on(gr, device), _on(gc, device), dcase.q, dcase.w, dcase.labels,
                                           _on(out[0], device), _on(out[1], device), case.K, list(terms), flags,
                                           need_grad_w))
    truth_g = oracle.class_engine_backward_oracle(gr.double(), gc.double(), c64.q, c64.w, c64.labels, truth[0],
                                                  truth[1], case.K, terms, flags, need_grad_w)
    same_g = oracle.class_engine_backward_oracle(gr, gc, *case.args()[:3], same[0], same[1], case.K, terms, flags,
                                                 need_grad_w)
    assert grads[0].dtype == dtype
    kit.check_close(grads[0], truth_g[0], same_g[0], what="grad_q", dtype=dtype)
    if need_grad_w:
        assert grads[1].dtype == dtype
        kit.check_close(grads[1], truth_g[1], same_g[1], what="grad_w", dtype=dtype)
    else:
        assert grads[1].shape == (0,)
    return out, grads


# ---------------------------------------------------------------------------------------------
# 1. The built library registers the CUDA kernels (CPU-runnable; CI's check of the CUDA build)
# ---------------------------------------------------------------------------------------------
def test_cuda_kernels_registered_when_built_with_cuda():
    info = fpl.build_info()
    if not info["cuda"]:
        pytest.skip(f"the loaded library has no CUDA kernels (library={info['library']}, "
                    f"error={info['library_error']})")
    for op in ("pair_engine_forward", "pair_engine_backward", "class_engine_forward",
               "class_engine_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_pairloss::{op}", "CUDA"), op
    assert info["cuda_arch_list"], "a CUDA build records the archs it was compiled for"


# ---------------------------------------------------------------------------------------------
# 2. CPU emulation of the CUDA kernels and their glue (csrc/cuda/emu)
# ---------------------------------------------------------------------------------------------
def _cuda_include_dir():
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    try:
        from torch.utils.cpp_extension import CUDA_HOME
        homes.insert(1, CUDA_HOME)
    except Exception:  # pragma: no cover
        pass
    for h in homes:
        if h and os.path.exists(os.path.join(h, "include", "cuda_fp16.h")):
            return os.path.join(h, "include")
    return None


def _emu_sources():
    return [os.path.join(CSRC, "cuda", "emu", f) for f in ("emu_ops.cpp", "emu_pair.cpp", "emu_class.cpp",
                                                           "emu_triplet.cpp")]


_EMU_LOADED = []  # the emulation library is loaded once per process (a second load of a rebuilt file
# would register its ops twice), also when other test modules reuse this fixture


@pytest.fixture(scope="module")
def emu():
    if _EMU_LOADED:
        return torch.ops.fpl_cuda_emu
    import shutil

    from torch.utils import cpp_extension

    inc = _cuda_include_dir()
    if shutil.which(os.environ.get("CXX", "c++")) is None or inc is None:
        pytest.skip("the CUDA kernel emulation needs a C++ compiler and the CUDA headers (cuda_fp16.h)")
    deps = sorted(glob.glob(os.path.join(CSRC, "cuda", "**", "*"), recursive=True)
                  + glob.glob(os.path.join(CSRC, "common", "*")))
    h = hashlib.sha1(torch.__version__.encode())
    for p in deps:
        if os.path.isfile(p):
            with open(p, "rb") as f:
                h.update(p.encode() + f.read())
    build_dir = os.path.join(tempfile.gettempdir(), f"fpl_cuda_emu_{h.hexdigest()[:16]}")
    os.makedirs(build_dir, exist_ok=True)
    cpp_extension.load(
        name="fpl_cuda_emu", sources=_emu_sources(), extra_include_paths=[CSRC, inc],
        extra_cflags=["-std=c++20", "-O1", "-pthread"], extra_ldflags=["-pthread"],
        build_directory=build_dir, with_cuda=False, is_python_module=False, verbose=False)
    _EMU_LOADED.append(build_dir)
    return torch.ops.fpl_cuda_emu


# ---- pair engine --------------------------------------------------------------------------------
# 70 rows (ref: 35 columns): 2 row blocks, ragged; 131 rows (ref: 136 columns): 3 row blocks and 3
# column tiles, several diagonal tiles, bands across tile edges; D = 24 / 37: partial chunks, and
# D = 37 rows are not 16-byte multiples (scalar loads)
EMU_SHAPES = [(70, 24, "few"), (131, 37, "many")]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("decl,mode", decls_and_modes())
def test_emulated_pair_op_parity_dyadic(emu, decl, mode, dtype):
    # fp64 on the smaller shape only (2 row blocks): the emulation's time goes to the larger one, whose
    # extra tiles the fp32 case covers
    for n, d, layout in EMU_SHAPES if dtype == torch.float32 else EMU_SHAPES[:1]:
        check_pair(emu, kit.pair_case(mode, n, d, layout, dtype, "dyadic", seed=n), PAIR_DECLS[decl], exact=True,
                   seed=n)


@pytest.mark.parametrize("mode", kit.MODES)
@pytest.mark.parametrize("name", list(kit.ROW_SHIFT_DECLARATIONS))
def test_emulated_pair_row_shift(emu, name, mode):
    """The op's row_shift against the oracle: the forward's and both backward passes' per-row terms,
    the label-sorted order of the deferred walks (ms_mine, ntxent), 3 row blocks."""
    case = kit.pair_case(mode, 131, 24, "many", torch.float32, seed=5)
    kit.check_row_shift(emu.pair_engine_forward, emu.pair_engine_backward, case, kit.ROW_SHIFT_DECLARATIONS[name])


@pytest.mark.parametrize("dtype", LOWP, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("decl,mode", decls_and_modes(["ms_mine", "circle", "ntxent_lp", "contrastive_lp",
                                                       "ms_mine_after_excl", "ntxent_mine"]))
def test_emulated_pair_op_low_precision_through_wmma(emu, decl, mode, dtype):
    """fp16 / bf16 go through the (emulated) WMMA tiles with fp32 accumulation; dyadic entries are
    exact in both, so S is exact and the set sizes and thresholds are still bitwise the oracle's."""
    check_pair(emu, kit.pair_case(mode, 70, 40, "few", dtype, "dyadic", seed=3), PAIR_DECLS[decl], exact=True)


# 1 row; all one label (no negatives); all distinct (no positives); exactly one tile; one past it
SHAPES = [(1, 3, "few"), (2, 4, "same"), (7, 5, "distinct"), (64, 16, "few"), (65, 8, "same"),
          (129, 7, "distinct")]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("decl,mode", decls_and_modes(["ms_mine0", "ms_mine_after_excl", "circle_lse_sum",
                                                       "contrastive_lp", "ntxent_lp_mine_after_excl", "supcon"]))
def test_emulated_pair_op_shapes_and_label_layouts(emu, decl, mode, dtype):
    for n, d, layout in SHAPES:
        check_pair(emu, kit.pair_case(mode, n, d, layout, dtype, "dyadic", seed=n + d), PAIR_DECLS[decl],
                   exact=True, seed=n)


# mining on random fp32 S is left out: a pair could sit within an ulp of a threshold
@pytest.mark.parametrize("mode", kit.MODES)
@pytest.mark.parametrize("decl,dtype", [("ms", torch.float32), ("circle", torch.float32), ("ntxent", torch.float32),
                                        ("supcon", torch.float32), ("contrastive_lp", torch.float32),
                                        ("lifted_lp", torch.float32), ("ms_mine", torch.float64),
                                        ("ms_lp_mine", torch.float64), ("ntxent_mine", torch.float64)], ids=str)
def test_emulated_pair_op_parity_random(emu, decl, mode, dtype):
    check_pair(emu, kit.pair_case(mode, 100, 33, "many", dtype, "normalized", seed=7), PAIR_DECLS[decl],
               exact=False, seed=7)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("mode", ["self", "ref_excl"])
def test_emulated_ntxent_terms_below_the_tiny(emu, mode, dtype):
    """-log(e^t + tiny) where e^t is below the tiny (kit.ntxent_below_tiny_case)."""
    case, spec = kit.ntxent_below_tiny_case(mode, dtype)
    check_pair(emu, case, spec, exact=False)


@pytest.mark.parametrize("decl", ["ms_mine", "contrastive_lp", "ntxent_mine"])
def test_emulated_need_grad_r_false_skips_the_column_pass(emu, decl):
    case = kit.pair_case("ref", 70, 24, "few", torch.float32, "dyadic", seed=11)
    _, (gq1, gr1) = check_pair(emu, case, PAIR_DECLS[decl], exact=True, seed=11, need_grad_r=True)
    _, (gq0, gr0) = check_pair(emu, case, PAIR_DECLS[decl], exact=True, seed=11, need_grad_r=False)
    assert gr1.shape == case.r.shape and gr0.shape == (0,)
    assert torch.equal(gq0, gq1)


@pytest.mark.parametrize("decl", ["ms_mine", "circle", "contrastive_lp", "ntxent_mine"])
def test_emulated_self_mode_is_symmetric(emu, decl):
    """Self mode reads S_ij and S_ji from one canonical tile: its forward is bitwise the forward of
    its ref-mode twin (r a copy of q, each row's own column excluded) on Gaussian fp32 rows (no
    help from exactness); its gradient (G + G^T) q is grad_q + grad_r of the twin to rounding; and
    both are bitwise reproducible."""
    spec = PAIR_DECLS[decl]
    terms, flags = spec.pack()
    case = kit.pair_case("self", 150, 40, "few", torch.float32, "normalized", seed=5)
    twin = kit.PairCase(case.q, case.q.clone(), case.labels_q, case.labels_q.clone(), torch.arange(150))
    a = emu.pair_engine_forward(*case.args(), list(terms), flags)
    b = emu.pair_engine_forward(*twin.args(), list(terms), flags)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    gv = torch.randn(len(S.PAIR_VALUES), 150, generator=torch.Generator().manual_seed(5))
    ga, _ = emu.pair_engine_backward(gv, *case.args(), a[0], a[2], list(terms), flags, True)
    gq, gr = emu.pair_engine_backward(gv, *twin.args(), a[0], a[2], list(terms), flags, True)
    kit.check_close(ga, gq.double() + gr.double(), what="grad_q", dtype=torch.float32)
    a2 = emu.pair_engine_forward(*case.args(), list(terms), flags)
    ga2, _ = emu.pair_engine_backward(gv, *case.args(), a[0], a[2], list(terms), flags, True)
    assert all(torch.equal(x, y) for x, y in zip(a, a2)) and torch.equal(ga, ga2)


def _misaligned(t):
    """The same values at an address that is not 16-byte aligned (the glue then takes scalar loads)."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    assert out.data_ptr() % 16 != 0
    return out


def test_emulated_vector_and_scalar_loads_agree(emu):
    for dtype in (torch.float32, torch.float16):
        case = kit.pair_case("ref", 70, 64, "few", dtype, "normalized", seed=3)
        terms, flags = PAIR_DECLS["ms_mine"].pack()
        a = emu.pair_engine_forward(*case.args(), list(terms), flags)
        b = emu.pair_engine_forward(_misaligned(case.q), _misaligned(case.r), *case.args()[2:], list(terms), flags)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        spec, K = CLASS_DECLS["row_and_cols"]
        cc = kit.class_case(70, 64, 20, K, dtype, seed=3)
        a = emu.class_engine_forward(*cc.args(), *spec.pack())
        b = emu.class_engine_forward(_misaligned(cc.q), _misaligned(cc.w), cc.labels, K, *spec.pack())
        assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("mode", ["self", "ref"])
@pytest.mark.parametrize("decl", ["ms", "ms_mine", "circle_lse_sum", "ntxent", "ntxent_mine", "contrastive_lp"])
def test_emulated_nan_in_nan_out(emu, decl, mode):
    """A NaN entry: NaN in the same statistics as the oracle's (torch.amin / amax semantics for the
    thresholds: every comparison with NaN is false), the same set sizes, no crash, NaN in the NaN
    row's gradient. The distance keeps NaN (pair_terms.inl pair_v_lp, as the CPU engine), while the
    oracle's _lp maps a NaN d^2 to d = 0: for lp only NaN-in-NaN-out is checked. Hinge terms drop
    NaN (PML's AvgNonZeroReducer), so there the NaN row's hinge sums are finite."""
    spec = PAIR_DECLS[decl]
    terms, flags = spec.pack()
    case = kit.pair_case(mode, 70, 24, "few", torch.float32, "dyadic", seed=2)
    case.q[3, 2] = float("nan")
    values, counts, aux = emu.pair_engine_forward(*case.args(), list(terms), flags)
    hinge = spec.pos.hinge or spec.neg.hinge
    if hinge:  # hinge terms drop NaN (ops/README.md): the NaN row's sums and counts of x > 0 hold none
        assert not values[2:4, 3].isnan().any() and counts[2:4, 3].eq(0).all()
    elif spec.distance == "lp":
        assert torch.isnan(values[2, 3]) and torch.isnan(values[3, 3])
    else:
        ref = oracle.pair_engine_forward_oracle(*case.args(), terms, flags)
        assert torch.equal(counts, ref[1])
        assert torch.equal(values.isnan(), ref[0].isnan()) and torch.equal(aux.isnan(), ref[2].isnan())
    assert hinge or values[:, 3].isnan().any() or aux[:2, 3].isnan().all()
    gv = torch.randn(len(S.PAIR_VALUES), 70, generator=torch.Generator().manual_seed(2))
    gq, gr = emu.pair_engine_backward(gv, *case.args(), values, aux, list(terms), flags, True)
    assert gq.shape == case.q.shape and gr.shape == ((0,) if case.r is None else case.r.shape)
    if not spec.mine:  # mining drops every pair of the NaN row (comparisons with NaN are false)
        assert torch.isnan(gq[3]).all()


# the histograms (kit.HIST_DECLARATIONS: FastAP's of d^2, HistogramLoss's PML bins, a cosine one
# beside sums): dyadic rows put pairs on the nodes (gradient 0 on both sides), random rows between them
@pytest.mark.parametrize("mode", kit.MODES)
@pytest.mark.parametrize("decl", list(kit.HIST_DECLARATIONS))
def test_emulated_pair_histograms(emu, decl, mode):
    spec = kit.HIST_DECLARATIONS[decl]
    n, d, layout = EMU_SHAPES[0]
    check_pair(emu, kit.pair_case(mode, n, d, layout, torch.float32, "dyadic", seed=n), spec, exact=True, seed=n)
    check_pair(emu, kit.pair_case(mode, n, d, "many", torch.float64, "normalized", seed=3), spec, exact=False)


def test_emulated_pair_histograms_nan_and_half_inputs(emu):
    """A NaN pair makes its row's node 0 NaN and nothing else; bf16 inputs (fp32 statistics) through
    the WMMA tiles on dyadic rows."""
    spec = kit.HIST_DECLARATIONS["cosine_with_sums"]
    terms, flags = spec.pack()
    case = kit.pair_case("ref", 40, 6, "few", torch.float64, "normalized", seed=1)
    case.q[3, 0] = float("nan")
    hist = emu.pair_engine_forward(*case.args(), list(terms), flags)[0][len(S.PAIR_VALUES):].view(2, 17, 40)
    assert torch.isnan(hist[:, 0, 3]).all() and not torch.isnan(hist[:, 1:, 3]).any()
    assert not torch.isnan(hist[:, :, [0, 1, 2, 4]]).any()
    check_pair(emu, kit.pair_case("self", 70, 40, "few", torch.bfloat16, "dyadic", seed=3),
               kit.HIST_DECLARATIONS["histogram"], exact=True)


def test_emulated_empty_sides(emu):
    terms, flags = PAIR_DECLS["ntxent_lp_mine_after_excl"].pack()
    q = kit.dyadic(6, 8, torch.Generator().manual_seed(0), torch.float32)
    lq = torch.arange(6) % 2
    # M = 0: every set empty
    r, lr = q[:0], lq[:0]
    values, counts, aux = emu.pair_engine_forward(q, r, lq, lr, torch.full((6,), -1), list(terms), flags)
    assert torch.isneginf(values[:2]).all() and (values[2:] == 0).all() and (counts == 0).all()
    assert torch.isposinf(aux[0]).all() and torch.isneginf(aux[1]).all() and (aux[2] == 0).all()
    gv = torch.ones(len(S.PAIR_VALUES), 6)
    gq, gr = emu.pair_engine_backward(gv, q, r, lq, lr, None, values, aux, list(terms), flags, True)
    assert (gq == 0).all() and gq.shape == (6, 8) and gr.shape == (0, 8)
    # N = 0
    values, counts, aux = emu.pair_engine_forward(q[:0], None, lq[:0], None, None, list(terms), flags)
    assert values.shape == (len(S.PAIR_VALUES), 0) and counts.shape == (4, 0) and aux.shape == (3, 0)
    gq, gr = emu.pair_engine_backward(gv[:, :0], q[:0], q, lq[:0], lq, None, values, aux, list(terms), flags, True)
    assert gq.shape == (0, 8) and (gr == 0).all() and gr.shape == (6, 8)
    # exclude_col values outside [-1, M) exclude nothing (no device sync to reject them)
    case = kit.pair_case("ref", 9, 4, "few", torch.float64, "dyadic", seed=1)
    a = emu.pair_engine_forward(*case.args()[:4], torch.full((9,), 99), list(terms), flags)
    b = emu.pair_engine_forward(*case.args()[:4], None, list(terms), flags)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_emulated_rejects_bad_arguments(emu):
    terms, flags = PAIR_DECLS["ms"].pack()
    q = torch.zeros(4, 3)
    lq = torch.zeros(4, dtype=torch.long)
    with pytest.raises(RuntimeError, match="exclude_col is implied"):
        emu.pair_engine_forward(q, None, lq, None, torch.zeros(4, dtype=torch.long), list(terms), flags)
    with pytest.raises(RuntimeError, match="terms must have"):
        emu.pair_engine_forward(q, None, lq, None, None, list(terms)[:-1], flags)
    with pytest.raises(RuntimeError, match="unknown pair flag"):
        emu.pair_engine_forward(q, None, lq, None, None, list(terms), flags | (1 << 14))
    hist_terms, hist_flags = kit.HIST_DECLARATIONS["fastap"].pack()
    with pytest.raises(RuntimeError, match="a histogram cannot be combined with mining"):
        emu.pair_engine_forward(q, None, lq, None, None, list(hist_terms), hist_flags | S.MINE)
    values = emu.pair_engine_forward(q, None, lq, None, None, list(hist_terms), hist_flags)[0]
    with pytest.raises(RuntimeError, match=r"grad_values must have shape \(29, 4\)"):
        emu.pair_engine_backward(torch.zeros(7, 4), q, None, lq, None, None, values, torch.zeros(3, 4),
                                 list(hist_terms), hist_flags, True)
    with pytest.raises(RuntimeError, match="same dtype"):
        emu.pair_engine_forward(q, q.double(), lq, lq, None, list(terms), flags)
    with pytest.raises(RuntimeError, match="float32, float64, float16 or bfloat16"):
        emu.pair_engine_forward(q.int(), None, lq, None, None, list(terms), flags)
    spec = S.ClassLossSpec(row=T(1.0, lse=True), centers_per_class=65, pool_gamma=0.1)
    with pytest.raises(RuntimeError, match="at most 64"):
        emu.class_engine_forward(q, torch.zeros(65, 3), lq, 65, *spec.pack())


# ---- class engine -------------------------------------------------------------------------------
# (n, d, C): 2 row blocks, one class tile (K = 1) / 2-3 tiles (K = 5: 12 classes a tile); 3 row
# blocks, 3 class tiles for K = 1, scalar loads (D = 37), most classes without a sample
EMU_CLASS_SHAPES = [(70, 24, 13), (131, 37, 150)]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("decl", [d for d in CLASS_DECLS if d != "softtriple_k64"])
def test_emulated_class_op_parity(emu, decl, dtype):
    spec, K = CLASS_DECLS[decl]
    for n, d, C in EMU_CLASS_SHAPES:
        check_class(emu, kit.class_case(n, d, C, K, dtype, seed=n), spec, seed=n)


def test_emulated_class_op_one_class_per_tile(emu):
    spec, K = CLASS_DECLS["softtriple_k64"]
    check_class(emu, kit.class_case(131, 37, 3, K, torch.float32, seed=5), spec)


@pytest.mark.parametrize("decl", ["proxycircle", "proxyanchor", "row_and_cols"])
def test_emulated_class_op_dyadic_kinks(emu, decl):
    """Dyadic inputs put pairs exactly on the relu kinks of the weighted terms."""
    spec, K = CLASS_DECLS[decl]
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        check_class(emu, kit.class_case(70, 24, 13, K, dtype, seed=4, data="dyadic"), spec, seed=4)


@pytest.mark.parametrize("decl", ["softtriple", "proxyanchor", "row_and_cols"])
def test_emulated_class_need_grad_w_false(emu, decl):
    spec, K = CLASS_DECLS[decl]
    case = kit.class_case(70, 24, 13, K, torch.float32, seed=8)
    _, (gq1, gw1) = check_class(emu, case, spec, seed=8, need_grad_w=True)
    _, (gq0, gw0) = check_class(emu, case, spec, seed=8, need_grad_w=False)
    assert gw0.shape == (0,) and gw1.shape == case.w.shape and torch.equal(gq0, gq1)


@pytest.mark.parametrize("decl", ["softtriple", "proxycircle", "row_and_cols"])
def test_emulated_class_nan_in_nan_out(emu, decl):
    spec, K = CLASS_DECLS[decl]
    terms, flags = spec.pack()
    case = kit.class_case(70, 24, 13, K, torch.float32, seed=9)
    case.q[1, 3] = float("nan")
    case.w[4 * K, 0] = float("nan")  # class 4
    rows, cols = emu.class_engine_forward(*case.args(), list(terms), flags)
    rrows, rcols = oracle.class_engine_forward_oracle(*case.args(), terms, flags)
    assert torch.equal(rows[0].isnan(), rrows[0].isnan()) and torch.equal(cols.isnan(), rcols.isnan())
    # target_sim_i = S_{i,y_i}: NaN for the NaN row and for the rows of the NaN class only (the
    # oracle's (S * one_hot).sum(1) spreads a NaN of any class to every row)
    assert torch.equal(rows[1].isnan(), (torch.arange(70) == 1) | (case.labels == 4))
    assert rows[0].isnan().any()
    g = torch.ones_like(rrows), torch.ones_like(rcols)
    gq, gw = emu.class_engine_backward(*g, case.q, case.w, case.labels, rrows, rcols, K, list(terms), flags, True)
    assert gq.shape == case.q.shape and gw.shape == case.w.shape and torch.isnan(gq[1]).all()


def test_emulated_class_edge_cases(emu):
    spec, K = CLASS_DECLS["row_and_cols"]
    terms, flags = spec.pack()
    # C = 1: no other class (row LSE -inf), every row a positive of the class
    case = kit.class_case(5, 8, 1, 1, torch.float32, seed=0)
    rows, cols = emu.class_engine_forward(*case.args(), list(terms), flags)
    assert torch.isneginf(rows[0]).all() and torch.isneginf(cols[1]).all()
    check_class(emu, case, spec)
    # labels that are no class index: target_sim NaN (the Python layer rejects them first)
    rows, _ = emu.class_engine_forward(case.q, case.w, torch.full((5,), 7), 1, list(terms), flags)
    assert torch.isnan(rows[1]).all()
    # N = 0
    rows, cols = emu.class_engine_forward(case.q[:0], case.w, case.labels[:0], 1, list(terms), flags)
    assert rows.shape == (2, 0) and torch.isneginf(cols).all()
    gq, gw = emu.class_engine_backward(rows, cols, case.q[:0], case.w, case.labels[:0], rows, cols, 1, list(terms),
                                       flags, True)
    assert gq.shape == (0, 8) and (gw == 0).all()


# ---- triplet engine -----------------------------------------------------------------------------
TRIPLET_WINDOWS = {"none": (float("-inf"), float("inf")), "hard": (float("-inf"), 0.0), "semihard": (0.0, 0.5)}


def triplet_inputs(mode, n, classes, dtype, seed, d=24):
    """Dyadic rows (kit.dyadic): S and d^2 exact, so the counts are the PyTorch op's exactly; ref
    mode: 50 more columns, every third row leaving one column out."""
    g = torch.Generator().manual_seed(seed)
    q = kit.dyadic(n, d, g, dtype)
    lq = torch.randint(0, classes, (n,), generator=g)
    if mode == "self":
        return q, q, lq, lq, torch.arange(n)
    r = kit.dyadic(n + 50, d, g, dtype)
    lr = torch.randint(0, classes, (n + 50,), generator=g)
    ex = torch.full((n,), -1)
    ex[::3] = torch.randint(0, n + 50, (len(ex[::3]),), generator=g)
    return q, r, lq, lr, ex


def check_triplet_grads(grads, truth_g, same_g, need, dtype):
    """(grad_q, grad_r) of a CUDA triplet op: empty where not needed, else the input dtype and close
    by the kit's rule."""
    for k, wanted in enumerate(need):
        if not wanted:
            assert grads[k].numel() == 0
            continue
        assert grads[k].dtype == dtype
        kit.check_close(grads[k].cpu(), truth_g[k], same_g[k], what=["grad q", "grad r"][k], dtype=dtype)


def check_triplet(ops, args, margin, lp, window, need=(True, True), device="cpu"):
    """The CUDA triplet op pair (emulated: ops = the emulation; or the GPU's) against the PyTorch op
    triplet_rows on the same rows: counts and in_window exactly, sums and the gradients of q and r
    by the kit's rule (the truth: the PyTorch op in fp64)."""
    from fused_pairloss.ops import triplets

    q, r, lq, lr, ex = args
    dtype = q.dtype
    args64 = tuple(a.double() if a.is_floating_point() else a for a in args)
    on = tuple(a.to(device) for a in args)
    got = ops.triplet_engine_forward(*on, margin, lp, *window)
    same = triplets.triplet_rows(*args, margin, lp, *window)
    truth = triplets.triplet_rows(*args64, margin, lp, *window)
    assert torch.equal(got[1].cpu(), same[1]) and torch.equal(got[2].cpu(), same[2])
    kit.check_close(got[0].cpu(), truth[0], same[0], what="sums", dtype=dtype)
    g = torch.linspace(0.5, 1.5, len(lq), dtype=torch.float64)
    grads = ops.triplet_engine_backward(g.to(device, same[0].dtype), *on, margin, lp, *window, *need)
    same_g = triplets.triplet_rows_backward(g.to(same[0].dtype), *args, margin, lp, *window, *need)
    truth_g = triplets.triplet_rows_backward(g, *args64, margin, lp, *window, *need)
    check_triplet_grads(grads, truth_g, same_g, need, dtype)


def check_triplet_bins(ops, args, lo, bins, need=(True, True), device="cpu"):
    """The CUDA triplet-bins op pair (emulated or the GPU's) against the PyTorch op triplet_bins on
    the same rows: counts exactly, the bins and the gradients of q and r by the kit's rule (the
    truth: the PyTorch op in fp64)."""
    from fused_pairloss.ops import triplets

    q, r, lq, lr, ex = args
    dtype, width = q.dtype, 2 * abs(lo) / bins
    args64 = tuple(a.double() if a.is_floating_point() else a for a in args)
    on = tuple(a.to(device) for a in args)
    got = ops.triplet_bins_engine_forward(*on, lo, width, bins)
    same = triplets.triplet_bins(*args, lo, width, bins)
    truth = triplets.triplet_bins(*args64, lo, width, bins)
    assert torch.equal(got[1].cpu(), same[1]) and same[1].sum() > 0
    kit.check_close(got[0].cpu(), truth[0], same[0], what="bins", dtype=dtype)
    g = torch.randn(truth[0].shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grads = ops.triplet_bins_engine_backward(g.to(device, same[0].dtype), *on, lo, width, bins, *need)
    same_g = triplets.triplet_bins_backward(g.to(same[0].dtype), *args, lo, width, bins, *need)
    truth_g = triplets.triplet_bins_backward(g, *args64, lo, width, bins, *need)
    check_triplet_grads(grads, truth_g, same_g, need, dtype)


def test_emulated_triplet_bins_inf_entry_as_the_pytorch_op(emu):
    """A pair whose x = a - u is NaN (inf - inf; the op's own input) is in no bin, forward and
    backward, as in the PyTorch op (the kernel binned it by a cast of NaN)."""
    from fused_pairloss.ops import triplets

    g = torch.Generator().manual_seed(1)
    q = torch.randint(-2, 3, (70, 9), generator=g).double() / 4
    labels = torch.randint(0, 5, (70,), generator=g)
    q[4, 2] = float("inf")
    args = (q, q, labels, labels, torch.arange(70), -2.0, 0.4, 10)
    got, same = emu.triplet_bins_engine_forward(*args), triplets.triplet_bins(*args)
    assert torch.equal(got[1], same[1])
    torch.testing.assert_close(got[0], same[0], equal_nan=True)
    grad = torch.randn(same[0].shape, generator=g, dtype=torch.float64)
    got_g = emu.triplet_bins_engine_backward(grad, *args, True, True)
    same_g = triplets.triplet_bins_backward(grad, *args, True, True)
    for a, b in zip(got_g, same_g):
        torch.testing.assert_close(a, b, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("mode", ["self", "ref"])
def test_emulated_triplet_bins_parity(emu, dtype, mode):
    """DynamicSoftMargin's bins: 70 rows, 2 row blocks, ragged; ref mode 120 columns; ~6 positives a
    row; PML's default grid and a narrow one (x below lo and past the last edge)."""
    args = triplet_inputs(mode, 70, 12, dtype, seed=8)
    check_triplet_bins(emu, args, -2.0, 10)
    check_triplet_bins(emu, args, -0.5, 6, need=(True, False) if mode == "ref" else (True, True))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("lp", [True, False], ids=["lp", "cosine"])
@pytest.mark.parametrize("mode,window", [("self", "none"), ("ref", "none"), ("ref", "hard"), ("self", "semihard")])
def test_emulated_triplet_op_parity(emu, dtype, lp, mode, window):
    """70 rows: 2 row blocks, ragged; ref mode 120 columns: 2 column tiles; ~6 positives a row."""
    check_triplet(emu, triplet_inputs(mode, 70, 12, dtype, seed=1), 0.25, lp, TRIPLET_WINDOWS[window])


def test_emulated_triplet_op_many_positives_half_inputs_and_need_flags(emu):
    check_triplet(emu, triplet_inputs("self", 70, 2, torch.float32, seed=2), 0.2, True, TRIPLET_WINDOWS["none"])
    check_triplet(emu, triplet_inputs("ref", 40, 5, torch.float16, seed=3), 0.1, True, TRIPLET_WINDOWS["none"])
    args = triplet_inputs("ref", 40, 5, torch.float64, seed=4)
    check_triplet(emu, args, 0.2, False, TRIPLET_WINDOWS["semihard"], need=(True, False))
    check_triplet(emu, args, 0.2, True, TRIPLET_WINDOWS["hard"], need=(False, True))


def test_emulated_triplet_op_nan_row_and_empty(emu):
    """A NaN row is in no term and leaves the other rows as the batch without it; no positives /
    no rows give zeros."""
    from fused_pairloss.ops import triplets
    from test_triplet_margin import check_nan_row_is_in_no_term

    q, _, lq, _, _ = triplet_inputs("self", 50, 4, torch.float64, seed=5)
    q = check_nan_row_is_in_no_term(emu.triplet_engine_forward, q, lq, reference=triplets.triplet_rows)
    distinct = torch.arange(50)  # every label once: no positives
    sums, counts, win = emu.triplet_engine_forward(q, q, distinct, distinct, torch.arange(50), 0.2, True,
                                                   *TRIPLET_WINDOWS["none"])
    assert (sums == 0).all() and (counts == 0).all() and (win == 0).all()
    sums, counts, win = emu.triplet_engine_forward(q[:0], q, lq[:0], lq, torch.arange(0), 0.2, True,
                                                   *TRIPLET_WINDOWS["none"])
    assert sums.shape == (0,)


# ---------------------------------------------------------------------------------------------
# 3. GPU (the real kernels; skipped without a GPU)
# ---------------------------------------------------------------------------------------------
GPU, GPU_BACKEND = "cuda", "cuda"  # device and backend of the GPU tests (a dry run of their logic on the
# CPU points them at the emulation)


def _gpu_ops():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if "cuda" not in fpl.available_backends("cuda"):
        pytest.skip(f"the cuda backend is not available: {fpl.build_info()}")
    return torch.ops.fused_pairloss


# 300 rows (ref: 150): 5 row blocks; D = 136: 16-byte loads; 257 rows (ref: 262), D = 37: scalar loads
GPU_SHAPES = [(300, 136, "few"), (257, 37, "many")]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("decl,mode", decls_and_modes())
def test_gpu_pair_op_parity_dyadic(decl, mode, dtype):
    """Dyadic inputs (exact S also through the tensor cores): set sizes and thresholds bitwise."""
    ops = _gpu_ops()
    for n, d, layout in GPU_SHAPES:
        d = min(d, 64)  # dyadic dot products are exact for d <= 64
        check_pair(ops, kit.pair_case(mode, n, d, layout, dtype, "dyadic", seed=n), PAIR_DECLS[decl], exact=True,
                   seed=n, device=GPU)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("mode", kit.MODES)
@pytest.mark.parametrize("name", list(kit.ROW_SHIFT_DECLARATIONS))
def test_gpu_pair_row_shift(name, mode, dtype):
    ops = _gpu_ops()
    case = kit.pair_case(mode, 300, 64, "many", dtype, seed=5)
    kit.check_row_shift(ops.pair_engine_forward, ops.pair_engine_backward, case, kit.ROW_SHIFT_DECLARATIONS[name],
                        device=GPU)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("mode", kit.MODES)
@pytest.mark.parametrize("decl", list(kit.HIST_DECLARATIONS))
def test_gpu_pair_histograms(decl, mode, dtype):
    """The histograms on the device: dyadic rows (exact S) and random unit rows."""
    ops = _gpu_ops()
    spec = kit.HIST_DECLARATIONS[decl]
    for n, d, layout in GPU_SHAPES:
        check_pair(ops, kit.pair_case(mode, n, min(d, 64), layout, dtype, "dyadic", seed=n), spec, exact=True,
                   seed=n, device=GPU)
    if dtype in (torch.float32, torch.float64):
        check_pair(ops, kit.pair_case(mode, 700, 128, "many", dtype, "normalized", seed=7), spec, exact=False,
                   seed=7, device=GPU)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("decl", ["ms_mine_after_excl", "contrastive_lp", "ntxent_mine", "circle_lse_sum"])
def test_gpu_pair_op_shapes_and_need_grad_r(decl, dtype):
    ops = _gpu_ops()
    for decl_, mode in decls_and_modes([decl]):
        for n, d, layout in SHAPES + [(1000, 64, "many")]:
            check_pair(ops, kit.pair_case(mode, n, d, layout, dtype, "dyadic", seed=n), PAIR_DECLS[decl_],
                       exact=True, seed=n, device=GPU)
    case = kit.pair_case("ref", 300, 40, "few", dtype, "dyadic", seed=1)
    _, (gq1, _) = check_pair(ops, case, PAIR_DECLS[decl], exact=True, need_grad_r=True, device=GPU)
    _, (gq0, gr0) = check_pair(ops, case, PAIR_DECLS[decl], exact=True, need_grad_r=False, device=GPU)
    assert gr0.shape == (0,) and torch.equal(gq0, gq1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("mode", kit.MODES)
@pytest.mark.parametrize("decl", ["ms", "circle", "ntxent", "supcon", "contrastive_lp", "lifted_lp"])
def test_gpu_pair_op_parity_random(decl, mode, dtype):
    ops = _gpu_ops()
    check_pair(ops, kit.pair_case(mode, 700, 128, "many", dtype, "normalized", seed=7), PAIR_DECLS[decl],
               exact=False, seed=7, device=GPU)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("decl", ["ms_mine", "contrastive_lp", "ntxent_mine"])
def test_gpu_self_mode_equals_its_ref_mode_twin(decl, dtype):
    """fp32 / fp64 (FMA: S_ij == S_ji whatever the operand order): the forward bitwise; fp16 / bf16
    through the tensor cores: self mode reads both orientations from one canonical tile, its twin
    computes S_ji with the operands swapped, so Gaussian rows agree to rounding only (dyadic
    rows exactly, see the parity tests)."""
    ops = _gpu_ops()
    spec = PAIR_DECLS[decl]
    terms, flags = spec.pack()
    case = kit.pair_case("self", 500, 64, "many", dtype, "normalized", seed=5).to(device=GPU)
    twin = kit.PairCase(case.q, case.q.clone(), case.labels_q, case.labels_q.clone(),
                        torch.arange(500, device=GPU))
    a = ops.pair_engine_forward(*case.args(), list(terms), flags)
    b = ops.pair_engine_forward(*twin.args(), list(terms), flags)
    if dtype in LOWP:
        for k in range(len(S.PAIR_VALUES)):
            kit.check_close(a[0][k].cpu(), b[0][k].cpu().double(), what=S.PAIR_VALUES[k], dtype=dtype)
    else:
        assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("decl", list(CLASS_DECLS))
def test_gpu_class_op_parity(decl, dtype):
    ops = _gpu_ops()
    spec, K = CLASS_DECLS[decl]
    for n, d, C in [(300, 136, 50), (257, 37, 150), (64, 16, 100_000 // K)]:
        check_class(ops, kit.class_case(n, d, C, K, dtype, seed=n), spec, seed=n, device=GPU)
    case = kit.class_case(130, 40, 20, K, dtype, seed=1)
    _, (gq1, _) = check_class(ops, case, spec, need_grad_w=True, device=GPU)
    _, (gq0, gw0) = check_class(ops, case, spec, need_grad_w=False, device=GPU)
    assert gw0.shape == (0,) and torch.equal(gq0, gq1)
    if K <= 1:
        check_class(ops, kit.class_case(300, 64, 70, K, dtype, seed=4, data="dyadic"), spec, device=GPU)


def _to_cuda(case: "kit.LossCase"):
    """The case on the GPU as fresh leaves; a tensor passed twice stays one tensor (PML's
    `ref_labels is labels` rule)."""
    conv = {id(p): p.detach().to(GPU).requires_grad_(True) for p in case.params}
    for a in case.args:
        if torch.is_tensor(a) and id(a) not in conv:
            conv[id(a)] = a.to(GPU)
    args = tuple(conv.get(id(a), a) for a in case.args)
    return kit.LossCase(args, tuple(conv[id(p)] for p in case.params))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("name,mode", [(n, m) for n in kit.PAIR_LOSSES for m in kit.LOSSES[n].modes]
                         + [(n, "self") for n in kit.CLASS_LOSSES])
def test_gpu_losses_match_reference(name, mode, dtype):
    """Every loss of the kit's table through backend="cuda": values and gradients against the fp64
    reference with the kit's rule (slack over the reference backend's own error in that dtype)."""
    _gpu_ops()
    loss = kit.LOSSES[name]
    for n, d in [(96, 64), (300, 40)]:
        case = kit.loss_case(loss, n, d, dtype, mode, seed=n, num_classes=50 if loss.kind == "class" else None)
        kit.check_loss_parity(loss, _to_cuda(case), GPU_BACKEND, what=f"{name} {mode} n={n}")


@pytest.mark.gpu
@pytest.mark.parametrize("lp", [True, False], ids=["lp", "cosine"])
@pytest.mark.parametrize("mode,window", [("self", "none"), ("ref", "semihard")])
def test_gpu_triplet_op_parity(lp, mode, window):
    """The CUDA all-triplets op against the PyTorch op at real sizes (1000 rows, ~4 positives a row;
    ref mode 1050 columns), fp64 and fp32, and its results bitwise the same on a second call."""
    ops = _gpu_ops()
    for dtype in (torch.float64, torch.float32):
        args = triplet_inputs(mode, 1000, 250, dtype, seed=7, d=64)
        check_triplet(ops, args, 0.2, lp, TRIPLET_WINDOWS[window], device=GPU)
        on = tuple(a.to(GPU) for a in args)
        a, b = ops.triplet_engine_forward(*on, 0.2, lp, *TRIPLET_WINDOWS[window]), \
            ops.triplet_engine_forward(*on, 0.2, lp, *TRIPLET_WINDOWS[window])
        assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["self", "ref"])
def test_gpu_triplet_bins_op_parity(mode):
    """The CUDA triplet-bins op (DynamicSoftMargin) against the PyTorch op at real sizes (1000 rows,
    ~4 positives a row), fp64 and fp32, and its results bitwise the same on a second call."""
    ops = _gpu_ops()
    for dtype in (torch.float64, torch.float32):
        args = triplet_inputs(mode, 1000, 250, dtype, seed=9, d=64)
        check_triplet_bins(ops, args, -2.0, 10, device=GPU)
        on = tuple(a.to(GPU) for a in args)
        a, b = ops.triplet_bins_engine_forward(*on, -2.0, 0.4, 10), ops.triplet_bins_engine_forward(*on, -2.0, 0.4, 10)
        assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.gpu
def test_gpu_results_are_deterministic_and_large_scales_stay_finite():
    ops = _gpu_ops()
    for decl in ("ms_mine_after_excl", "ntxent_mine", "contrastive_lp"):
        spec = PAIR_DECLS[decl]
        terms, flags = spec.pack()
        runs = []
        for _ in range(2):
            for _, mode in decls_and_modes([decl]):
                case = kit.pair_case(mode, 1000, 128, "many", torch.float32, "normalized", seed=12).to(device=GPU)
                out = ops.pair_engine_forward(*case.args(), list(terms), flags)
                g = ops.pair_engine_backward(torch.ones_like(out[0]), *case.args(), out[0], out[2], list(terms), flags,
                                             True)
                runs.append([*out, *g])
        half = len(runs) // 2
        for a, b in zip(runs[:half], runs[half:]):
            assert all(torch.equal(u, v) for u, v in zip(a, b)), decl
    spec, K = CLASS_DECLS["row_and_cols"]
    outs = []
    for _ in range(2):
        case = kit.class_case(1000, 128, 300, K, torch.float32, seed=13).to(device=GPU)
        rows, cols = ops.class_engine_forward(*case.args(), *spec.pack())
        g = ops.class_engine_backward(torch.ones_like(rows), torch.ones_like(cols), case.q, case.w, case.labels, rows,
                                      cols, K, *spec.pack(), True)
        outs.append([rows, cols, *g])
    assert all(torch.equal(u, v) for u, v in zip(*outs))
    # gamma = 256, beta = 50: an online max, never a fixed bound
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(1000, 128, generator=gen).to(GPU).requires_grad_()
    y = torch.randint(0, 50, (1000,), generator=gen).to(GPU)
    loss = fpl.functional.multi_similarity_loss(x, y, beta=50.0, miner_epsilon=0.1, backend=GPU_BACKEND)
    gx = torch.autograd.grad(loss, x)[0]
    assert torch.isfinite(loss) and torch.isfinite(gx).all()
    p = torch.randn(128, 50, generator=gen).to(GPU).requires_grad_()
    loss = fpl.functional.proxy_circle_loss(x, y, p, gamma=256.0, backend=GPU_BACKEND)
    gx, gp = torch.autograd.grad(loss, (x, p))
    assert torch.isfinite(loss) and torch.isfinite(gx).all() and torch.isfinite(gp).all()


@pytest.mark.gpu
def test_gpu_memory_stays_linear():
    """No N x N (or N x C) buffer: at N = 16384 a forward + backward allocates far less than one
    fp32 N x N matrix (1 GiB); the extra memory is O((N + M) D)."""
    ops = _gpu_ops()
    n, d = 16384, 128
    case = kit.pair_case("self", n, d, "many", torch.float32, "normalized", seed=13).to(device=GPU)
    for decl in ("ms_mine", "ntxent", "contrastive_lp"):
        terms, flags = PAIR_DECLS[decl].pack()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = ops.pair_engine_forward(*case.args(), list(terms), flags)
        ops.pair_engine_backward(torch.ones_like(out[0]), *case.args(), out[0], out[2], list(terms), flags, False)
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
        assert extra < 6 * n * d * 4 + (64 << 20), (decl, extra)
    spec, K = CLASS_DECLS["row_and_cols"]
    cc = kit.class_case(n, d, 20000, K, torch.float32, seed=14).to(device=GPU)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    rows, cols = ops.class_engine_forward(*cc.args(), *spec.pack())
    ops.class_engine_backward(torch.ones_like(rows), torch.ones_like(cols), cc.q, cc.w, cc.labels, rows, cols, K,
                              *spec.pack(), True)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < 4 * (n + 20000) * d * 4 + (64 << 20)
