"""CUDA C++ backend (backend "cuda", csrc/cuda): pair engine and class engine.

Three layers:
- CPU, always: when the installed library was built with CUDA (build_info()["cuda"]), all four
  ops have CUDA kernels registered (CI builds the CUDA code on a machine with no GPU and checks it
  this way).
- CPU, when a C++ compiler and the CUDA headers are there: the kernels of csrc/cuda compiled as
  plain C++ (csrc/cuda/emu: one std::thread per CUDA thread, emulated barriers, shuffles and WMMA
  fragments) inside the real host glue (csrc/cuda/glue.h), registered as ops `fpl_cuda_emu::*` on
  CPU tensors, and compared op by op with the materializing oracles (fused_pairloss.ops.oracle)
  for many declarations built directly with spec.PairLossSpec / ClassLossSpec. This runs the real
  tiling, masks, label-sorted bands, transposed / symmetrized self-mode tiles and every backward
  pass on a machine without a GPU.
- GPU (@pytest.mark.gpu, skipped without one): the same op-level parity on the device in every
  dtype, loss-level parity through the public API against backend="reference", determinism,
  memory, large scales.

Near thresholds (SPEC §3): the op-level cases use dyadic inputs (entries k/4, |k| <= 2): every
dot product, squared norm and squared distance is exact in fp16/bf16/fp32/fp64 whatever the
summation order (and a square root of an exact value is correctly rounded), so S and d are the
same numbers in the kernels and in the oracle; mining epsilons and margins are multiples of 1/16,
so many pairs sit exactly on the mining / hinge / relu boundaries and both sides must decide them
alike. Counts and thresholds are then compared bitwise, values and gradients to a tolerance tied
to the stat dtype.
"""
import glob
import hashlib
import os
import tempfile

import pytest
import torch

import fused_pairloss as fpl
from fused_pairloss import functional as Fn
from fused_pairloss.ops import oracle
from fused_pairloss.ops import spec as S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
LOWP = (torch.float16, torch.bfloat16)
DTYPE_IDS = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

# ---------------------------------------------------------------------------------------------
# Declarations (built directly, not through the loss plug-ins: every engine feature on its own)
# ---------------------------------------------------------------------------------------------
T = S.PairTerm
PAIR_SPECS = {
    # Multi-Similarity (alpha=2, beta=50, base=0.5)
    "ms": S.PairLossSpec(pos=T(-2.0, 0.5, lse=True), neg=T(50.0, 0.5, lse=True)),
    "ms_mined": S.PairLossSpec(pos=T(-2.0, 0.5, lse=True), neg=T(50.0, 0.5, lse=True), miner_epsilon=0.125),
    "ms_mined_eam": S.PairLossSpec(pos=T(-2.0, 0.5, lse=True), neg=T(50.0, 0.5, lse=True), miner_epsilon=0.125,
                                   exclude_after_mining=True),
    # Circle (m = 1/4, gamma = 80): detached relu weights with kinks at S = 5/4 and S = -1/4
    "circle": S.PairLossSpec(pos=T(-80.0, 0.75, 1.25, -1.0, lse=True), neg=T(80.0, 0.25, 0.25, 1.0, lse=True)),
    # weighted terms reduced by LSE and by sum together
    "circle_sum": S.PairLossSpec(pos=T(-4.0, 0.75, 1.25, -1.0, lse=True, sum=True),
                                 neg=T(4.0, 0.25, 0.25, 1.0, lse=True, sum=True)),
    # Contrastive-like: hinges reduced by sum (and the count of x > 0), cosine and lp distance
    "contrastive_cos": S.PairLossSpec(pos=T(-1.0, 0.75, hinge=True, sum=True), neg=T(1.0, 0.25, hinge=True, sum=True)),
    "contrastive_lp": S.PairLossSpec(pos=T(1.0, 0.5, hinge=True, sum=True), neg=T(-1.0, 2.0, hinge=True, sum=True),
                                     distance="lp"),
    # MS on PML's LpDistance with the miner (u = -d)
    "ms_lp_mined": S.PairLossSpec(pos=T(2.0, 1.5, lse=True), neg=T(-8.0, 1.5, lse=True), distance="lp",
                                  miner_epsilon=0.125),
    # NTXent-like: per positive -log(sigmoid(x - lse_neg) + tiny), plus a sum over the positives
    "ntxent": S.PairLossSpec(pos=T(4.0, sum=True), neg=T(4.0, lse=True), pos_vs_neg_lse=True),
    "ntxent_mined": S.PairLossSpec(pos=T(4.0, lse=True), neg=T(4.0, lse=True), pos_vs_neg_lse=True,
                                   miner_epsilon=0.0625, exclude_after_mining=True),
}
CLASS_SPECS = {
    # SoftTriple (la = 8, gamma = 1/8)
    "softtriple_k1": S.ClassLossSpec(row=T(8.0, lse=True)),
    "softtriple_k3": S.ClassLossSpec(row=T(8.0, lse=True), centers_per_class=3, pool_gamma=0.125),
    "softtriple_k10": S.ClassLossSpec(row=T(8.0, lse=True), centers_per_class=10, pool_gamma=0.125),
    # class-level Circle: weighted row term
    "proxy_circle": S.ClassLossSpec(row=T(16.0, 0.25, 0.25, 1.0, lse=True)),
    # ProxyAnchor-like: column LSEs only
    "proxy_anchor": S.ClassLossSpec(col_pos=T(-4.0, 0.25, lse=True), col_neg=T(4.0, -0.25, lse=True)),
    # a row term and both column terms
    "row_and_cols": S.ClassLossSpec(row=T(4.0, 0.125, lse=True), col_pos=T(-2.0, 0.5, lse=True),
                                    col_neg=T(2.0, 0.0, 0.25, 1.0, lse=True)),
}


def stat_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def tols(dtype):
    """(values, gradients) tolerances, tied to the stat dtype (values, rtol = atol) and for the
    gradients, returned in the input dtype, to that dtype's rounding too (max abs error relative
    to the largest reference entry)."""
    if stat_dtype(dtype) == torch.float64:
        return 1e-10, 1e-9
    return 3e-5, max(1e-4, torch.finfo(dtype).eps)


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------
def dyadic(n, d, gen, dtype):
    return (torch.randint(-2, 3, (n, d), generator=gen).double() / 4).to(dtype)


def gaussian(n, d, gen, dtype):
    return torch.nn.functional.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1).to(dtype)


def labels_for(n, gen, layout="few"):
    if layout == "few":
        return torch.randint(0, 5, (n,), generator=gen)
    if layout == "same":
        return torch.full((n,), 3, dtype=torch.long)
    if layout == "distinct":
        return torch.randperm(n, generator=gen) * 2 - 7  # negative ids too
    raise ValueError(layout)


def pair_inputs(mode, n, m, d, dtype, data="dyadic", layout="few", seed=0):
    """(q, r, labels_q, labels_r, exclude_col) of an op call. Modes: self; ref; ref_excl (ref with a
    random exclude_col, -1 for some rows); ref_self (r a copy of q, exclude_col the diagonal:
    PML's `ref_labels is labels`)."""
    gen = torch.Generator().manual_seed(seed)
    make = dyadic if data == "dyadic" else gaussian
    q = make(n, d, gen, dtype)
    lq = labels_for(n, gen, layout)
    if mode == "self":
        return q, None, lq, None, None
    if mode == "ref_self":
        return q, q.clone(), lq, lq.clone(), torch.arange(n)
    r = make(m, d, gen, dtype)
    lr = labels_for(m, gen, layout)
    excl = None
    if mode == "ref_excl":
        excl = torch.randint(-1, m, (n,), generator=gen)
    return q, r, lq, lr, excl


def grad_values_for(n, dtype, seed):
    gen = torch.Generator().manual_seed(seed + 1000)
    return torch.randn(len(S.PAIR_VALUES), n, generator=gen, dtype=torch.float64).to(stat_dtype(dtype))


# ---------------------------------------------------------------------------------------------
# Checks against the oracles
# ---------------------------------------------------------------------------------------------
def assert_values_close(a, b, tol, name):
    a, b = a.cpu(), b.cpu()
    assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, b.dtype, a.shape, b.shape)
    assert torch.equal(torch.isnan(a), torch.isnan(b)), name
    assert torch.equal(torch.isposinf(a), torch.isposinf(b)) and torch.equal(torch.isneginf(a), torch.isneginf(b)), name
    torch.testing.assert_close(a, b, rtol=tol, atol=tol, equal_nan=True, msg=name)


def assert_grad_close(a, b, tol, name):
    a, b = a.cpu(), b.cpu()
    assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, b.dtype, a.shape, b.shape)
    if b.numel() == 0:
        return
    a, b = a.double(), b.double()
    scale = max(b.abs().max().item(), 1e-30)
    err = (a - b).abs().max().item()
    assert err <= tol * scale, f"{name}: max error {err:.3g} vs scale {scale:.3g} (tol {tol})"


def check_pair_forward(out, ref, dtype, exact, lp=False):
    """exact (dyadic inputs): counts and mining thresholds bitwise; lp: thresholds to 2 ulps, as
    torch's CPU sqrt (the oracle's) is not correctly rounded in fp64 (sqrt(8) is 1 ulp low) while
    the kernels' is; the counts stay exact (a tie needs a rational d, whose sqrt both get right)."""
    vtol, _ = tols(dtype)
    values, counts, aux = out
    rv, rc, ra = ref
    assert values.dtype == stat_dtype(dtype) and counts.dtype == torch.int32 and aux.dtype == stat_dtype(dtype)
    for k, name in enumerate(S.PAIR_VALUES):
        assert_values_close(values[k], rv[k], vtol, name)
    if exact:
        assert torch.equal(counts.cpu(), rc), ("counts", counts, rc)
    else:
        assert (counts.cpu() - rc).abs().max().item() <= 0 if rc.numel() else True
    for k in (0, 1):
        if exact and not lp:
            assert torch.equal(aux[k].cpu(), ra[k]), S.PAIR_AUX[k]
        else:
            ulps = 2 * torch.finfo(stat_dtype(dtype)).eps
            assert_values_close(aux[k], ra[k], ulps if exact else vtol, S.PAIR_AUX[k])
    assert_values_close(aux[2], ra[2], vtol, S.PAIR_AUX[2])


def check_pair_op(ops, spec, mode, dtype, n=70, m=90, d=24, data="dyadic", layout="few", seed=0,
                  need_grad_r=True, to_device=None):
    """Forward and backward of ops (emulated or GPU) against the oracles; returns the outputs."""
    q, r, lq, lr, excl = pair_inputs(mode, n, m, d, dtype, data, layout, seed)
    terms, flags = spec.pack()
    dev = to_device or (lambda t: t)
    opt = lambda t: None if t is None else dev(t)  # noqa: E731
    args = (dev(q), opt(r), dev(lq), opt(lr), opt(excl))
    out = ops.pair_engine_forward(*args, list(terms), flags)
    ref = oracle.pair_engine_forward_oracle(q, r, lq, lr, excl, terms, flags)
    check_pair_forward(out, ref, dtype, exact=(data == "dyadic"), lp=spec.distance == "lp")
    gv = grad_values_for(n, dtype, seed)
    gq, gr = ops.pair_engine_backward(dev(gv), *args, dev(ref[0]), dev(ref[2]), list(terms), flags, need_grad_r)
    rq, rr = oracle.pair_engine_backward_oracle(gv, q, r, lq, lr, excl, ref[0], ref[2], terms, flags, need_grad_r)
    _, gtol = tols(dtype)
    assert gq.dtype == dtype
    assert_grad_close(gq, rq, gtol, "grad_q")
    if r is None or not need_grad_r:
        assert gr.numel() == 0 and gr.shape == (0,)
    else:
        assert gr.dtype == dtype
        assert_grad_close(gr, rr, gtol, "grad_r")
    return out, (gq, gr)


def class_inputs(spec, n, c, d, dtype, data, seed):
    gen = torch.Generator().manual_seed(seed)
    make = dyadic if data == "dyadic" else gaussian
    K = spec.centers_per_class
    q = make(n, d, gen, dtype)
    w = make(c * K, d, gen, dtype)
    labels = torch.randint(0, c, (n,), generator=gen)
    return q, w, labels


def check_class_op(ops, spec, dtype, n=70, c=13, d=24, data="gaussian", seed=0, need_grad_w=True, to_device=None):
    q, w, labels = class_inputs(spec, n, c, d, dtype, data, seed)
    terms, flags = spec.pack()
    K = spec.centers_per_class
    dev = to_device or (lambda t: t)
    rows, cols = ops.class_engine_forward(dev(q), dev(w), dev(labels), K, list(terms), flags)
    rrows, rcols = oracle.class_engine_forward_oracle(q, w, labels, K, terms, flags)
    vtol, gtol = tols(dtype)
    for k, name in enumerate(S.CLASS_ROWS):
        assert_values_close(rows[k], rrows[k], vtol, name)
    for k, name in enumerate(S.CLASS_COLS):
        assert_values_close(cols[k], rcols[k], vtol, name)
    gen = torch.Generator().manual_seed(seed + 1)
    A = stat_dtype(dtype)
    grows = torch.randn(rrows.shape, generator=gen, dtype=torch.float64).to(A)
    gcols = torch.randn(rcols.shape, generator=gen, dtype=torch.float64).to(A)
    gq, gw = ops.class_engine_backward(dev(grows), dev(gcols), dev(q), dev(w), dev(labels), dev(rrows), dev(rcols),
                                       K, list(terms), flags, need_grad_w)
    rq, rw = oracle.class_engine_backward_oracle(grows, gcols, q, w, labels, rrows, rcols, K, terms, flags,
                                                 need_grad_w)
    assert gq.dtype == dtype
    assert_grad_close(gq, rq, gtol, "grad_q")
    if need_grad_w:
        assert gw.dtype == dtype
        assert_grad_close(gw, rw, gtol, "grad_w")
    else:
        assert gw.numel() == 0 and gw.shape == (0,)
    return (rows, cols), (gq, gw)


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
    return [os.path.join(CSRC, "cuda", "emu", f) for f in ("emu_ops.cpp", "emu_pair.cpp", "emu_class.cpp")]


@pytest.fixture(scope="module")
def emu():
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
    return torch.ops.fpl_cuda_emu


# ---- pair engine --------------------------------------------------------------------------------
PAIR_MODES = ["self", "ref", "ref_excl"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("mode", PAIR_MODES)
@pytest.mark.parametrize("name", list(PAIR_SPECS))
def test_emulated_pair_engine_matches_oracle(emu, name, mode, dtype):
    """Dyadic inputs: counts and thresholds bitwise, values and gradients to the dtype's tolerance;
    70 x 90 spans 2 row blocks and 2 column tiles (ragged), D = 24 not a multiple of a chunk."""
    check_pair_op(emu, PAIR_SPECS[name], mode, dtype, seed=len(name))


LOWP_SPECS = ["ms", "ms_mined", "circle", "contrastive_lp", "ntxent_mined"]


@pytest.mark.parametrize("dtype", LOWP, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("mode", ["self", "ref_excl"])
@pytest.mark.parametrize("name", LOWP_SPECS)
def test_emulated_pair_engine_low_precision_through_wmma(emu, name, mode, dtype):
    """fp16 / bf16 go through the (emulated) WMMA tiles with fp32 accumulation; dyadic entries are
    exact in both, so S is exact and the counts and thresholds are still bitwise the oracle's."""
    check_pair_op(emu, PAIR_SPECS[name], mode, dtype, d=40, seed=3)


# (n, m, d, layout): 1 row; all one label (no negatives); all distinct (no positives); exactly one
# tile; 3 row blocks with a ragged last tile and D = 37 (scalar loads, several diagonal tiles)
SHAPES = [(1, 1, 3, "few"), (5, 3, 16, "same"), (9, 12, 8, "distinct"), (64, 64, 16, "few"),
          (130, 75, 37, "few")]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("mode", ["self", "ref_excl", "ref_self"])
@pytest.mark.parametrize("name", ["ms_mined_eam", "circle_sum", "contrastive_lp", "ntxent"])
def test_emulated_pair_engine_shapes_and_label_layouts(emu, name, mode, dtype):
    for n, m, d, layout in SHAPES:
        check_pair_op(emu, PAIR_SPECS[name], mode, dtype, n=n, m=m, d=d, layout=layout, seed=n + d)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("mode", PAIR_MODES)
@pytest.mark.parametrize("name", ["ms", "circle", "ntxent", "contrastive_lp"])
def test_emulated_pair_engine_random_inputs(emu, name, mode, dtype):
    """Unit-norm Gaussian rows (no exact ties, no mining: a 1-ulp difference in S decides nothing)."""
    check_pair_op(emu, PAIR_SPECS[name], mode, dtype, n=100, m=80, d=33, data="gaussian", seed=7)


@pytest.mark.parametrize("name", ["ms_mined", "contrastive_lp", "ntxent_mined"])
def test_emulated_pair_engine_need_grad_r_false_skips_the_column_pass(emu, name):
    spec = PAIR_SPECS[name]
    _, (gq1, gr1) = check_pair_op(emu, spec, "ref_excl", torch.float32, need_grad_r=True, seed=11)
    _, (gq0, gr0) = check_pair_op(emu, spec, "ref_excl", torch.float32, need_grad_r=False, seed=11)
    assert gr1.shape == (90, 24) and gr0.shape == (0,)
    assert torch.equal(gq0, gq1)


@pytest.mark.parametrize("name", ["ms_mined", "circle", "contrastive_lp", "ntxent_mined"])
def test_emulated_self_mode_is_symmetric(emu, name):
    """Self mode reads S_ij and S_ji from one canonical tile: its forward is bitwise the ref-mode
    forward with r a copy of q and the diagonal excluded (Gaussian fp32: no help from exactness),
    its gradient (G + G^T) q equals grad_q + grad_r of that call to rounding; and both are
    bitwise reproducible."""
    spec = PAIR_SPECS[name]
    terms, flags = spec.pack()
    q, _, lq, _, _ = pair_inputs("self", 150, 0, 40, torch.float32, "gaussian", seed=5)
    a = emu.pair_engine_forward(q, None, lq, None, None, list(terms), flags)
    b = emu.pair_engine_forward(q, q.clone(), lq, lq.clone(), torch.arange(150), list(terms), flags)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    gv = grad_values_for(150, torch.float32, 5)
    ga, _ = emu.pair_engine_backward(gv, q, None, lq, None, None, a[0], a[2], list(terms), flags, True)
    gq, gr = emu.pair_engine_backward(gv, q, q.clone(), lq, lq.clone(), torch.arange(150), a[0], a[2], list(terms),
                                      flags, True)
    assert_grad_close(ga, gq + gr, 1e-5, "grad_q")
    a2 = emu.pair_engine_forward(q, None, lq, None, None, list(terms), flags)
    ga2, _ = emu.pair_engine_backward(gv, q, None, lq, None, None, a[0], a[2], list(terms), flags, True)
    assert all(torch.equal(x, y) for x, y in zip(a, a2)) and torch.equal(ga, ga2)


@pytest.mark.parametrize("mode", ["self", "ref"])
@pytest.mark.parametrize("name", ["ms", "ms_mined", "circle_sum", "ntxent", "contrastive_lp"])
def test_emulated_pair_engine_nan_in_nan_out(emu, name, mode):
    """A NaN entry: NaN in the same statistics as the oracle's (torch.amin / amax semantics for the
    thresholds: every comparison with NaN is false), no crash, NaN in the NaN row's gradient.
    The distance keeps NaN (pair_terms.inl pair_v_lp, as the CPU engine): the oracle's _lp maps a
    NaN d^2 to d = 0, so for lp only NaN-in-NaN-out is checked."""
    spec = PAIR_SPECS[name]
    terms, flags = spec.pack()
    q, r, lq, lr, excl = pair_inputs(mode, 70, 90, 24, torch.float32, seed=2)
    q[3, 2] = float("nan")
    values, counts, aux = emu.pair_engine_forward(q, r, lq, lr, excl, list(terms), flags)
    if spec.distance == "lp":
        assert torch.isnan(values[2, 3]) and torch.isnan(values[3, 3])
    else:
        ref = oracle.pair_engine_forward_oracle(q, r, lq, lr, excl, terms, flags)
        assert torch.equal(counts, ref[1])
        assert torch.equal(values.isnan(), ref[0].isnan()) and torch.equal(aux.isnan(), ref[2].isnan())
    assert values[:, 3].isnan().any() or aux[:2, 3].isnan().all()
    gv = grad_values_for(70, torch.float32, 2)
    gq, gr = emu.pair_engine_backward(gv, q, r, lq, lr, excl, values, aux, list(terms), flags, True)
    assert gq.shape == q.shape and gr.shape == ((0,) if r is None else r.shape)
    if not spec.mine:  # mining drops every pair of the NaN row (comparisons with NaN are false)
        assert torch.isnan(gq[3]).all()


def test_emulated_pair_engine_empty_sides(emu):
    spec = PAIR_SPECS["ntxent_mined"]
    terms, flags = spec.pack()
    q = dyadic(6, 8, torch.Generator().manual_seed(0), torch.float32)
    lq = torch.arange(6) % 2
    # M = 0: every set empty
    r, lr = q[:0], lq[:0]
    values, counts, aux = emu.pair_engine_forward(q, r, lq, lr, torch.full((6,), -1), list(terms), flags)
    assert torch.isneginf(values[:2]).all() and (values[2:] == 0).all() and (counts == 0).all()
    assert torch.isposinf(aux[0]).all() and torch.isneginf(aux[1]).all() and (aux[2] == 0).all()
    gv = torch.ones(5, 6)
    gq, gr = emu.pair_engine_backward(gv, q, r, lq, lr, None, values, aux, list(terms), flags, True)
    assert (gq == 0).all() and gq.shape == (6, 8) and gr.shape == (0, 8)
    # N = 0
    values, counts, aux = emu.pair_engine_forward(q[:0], None, lq[:0], None, None, list(terms), flags)
    assert values.shape == (5, 0) and counts.shape == (4, 0) and aux.shape == (3, 0)
    gq, gr = emu.pair_engine_backward(gv[:, :0], q[:0], q, lq[:0], lq, None, values, aux, list(terms), flags, True)
    assert gq.shape == (0, 8) and (gr == 0).all() and gr.shape == (6, 8)


def test_emulated_pair_engine_rejects_bad_arguments(emu):
    terms, flags = PAIR_SPECS["ms"].pack()
    q = torch.zeros(4, 3)
    lq = torch.zeros(4, dtype=torch.long)
    with pytest.raises(RuntimeError, match="exclude_col is implied"):
        emu.pair_engine_forward(q, None, lq, None, torch.zeros(4, dtype=torch.long), list(terms), flags)
    with pytest.raises(RuntimeError, match="terms must have"):
        emu.pair_engine_forward(q, None, lq, None, None, list(terms)[:-1], flags)
    with pytest.raises(RuntimeError, match="unknown pair flag"):
        emu.pair_engine_forward(q, None, lq, None, None, list(terms), flags | (1 << 12))
    with pytest.raises(RuntimeError, match="same dtype"):
        emu.pair_engine_forward(q, q.double(), lq, lq, None, list(terms), flags)
    with pytest.raises(RuntimeError, match="float32, float64, float16 or bfloat16"):
        emu.pair_engine_forward(q.int(), None, lq, None, None, list(terms), flags)


# ---- class engine -------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("name", list(CLASS_SPECS))
def test_emulated_class_engine_matches_oracle(emu, name, dtype):
    check_class_op(emu, CLASS_SPECS[name], dtype, seed=len(name))


@pytest.mark.parametrize("name", ["proxy_circle", "proxy_anchor", "row_and_cols"])
def test_emulated_class_engine_dyadic_kinks(emu, name):
    """Dyadic inputs put pairs exactly on the relu kinks of the weighted terms."""
    check_class_op(emu, CLASS_SPECS[name], torch.float32, data="dyadic", seed=4)
    check_class_op(emu, CLASS_SPECS[name], torch.float64, data="dyadic", seed=4)


def test_emulated_class_engine_many_tiles_and_empty_classes(emu):
    # K = 64: one class per tile; 3 row blocks; D = 37 (scalar loads)
    k64 = S.ClassLossSpec(row=T(8.0, lse=True), centers_per_class=64, pool_gamma=0.125)
    check_class_op(emu, k64, torch.float32, n=130, c=3, d=37, seed=5)
    # 150 classes for 70 rows: 3 class tiles, most classes without a sample (col_lse_pos = -inf)
    for name in ("proxy_anchor", "row_and_cols"):
        (rows, cols), _ = check_class_op(emu, CLASS_SPECS[name], torch.float32, n=70, c=150, d=16, seed=6)
        assert torch.isneginf(cols[0]).sum() >= 80


@pytest.mark.parametrize("name", ["softtriple_k3", "proxy_anchor", "row_and_cols"])
def test_emulated_class_engine_need_grad_w_false(emu, name):
    _, (gq1, gw1) = check_class_op(emu, CLASS_SPECS[name], torch.float32, need_grad_w=True, seed=8)
    _, (gq0, gw0) = check_class_op(emu, CLASS_SPECS[name], torch.float32, need_grad_w=False, seed=8)
    assert gw0.shape == (0,) and torch.equal(gq0, gq1)


@pytest.mark.parametrize("name", ["softtriple_k3", "proxy_circle", "row_and_cols"])
def test_emulated_class_engine_nan_in_nan_out(emu, name):
    spec = CLASS_SPECS[name]
    terms, flags = spec.pack()
    K = spec.centers_per_class
    q, w, labels = class_inputs(spec, 70, 13, 24, torch.float32, "gaussian", 9)
    q[1, 3] = float("nan")
    w[4 * K, 0] = float("nan")  # class 4
    rows, cols = emu.class_engine_forward(q, w, labels, K, list(terms), flags)
    rrows, rcols = oracle.class_engine_forward_oracle(q, w, labels, K, terms, flags)
    assert torch.equal(rows[0].isnan(), rrows[0].isnan()) and torch.equal(cols.isnan(), rcols.isnan())
    # target_sim_i = S_{i,y_i}: NaN for the NaN row and for the rows of the NaN class only (the
    # oracle's (S * one_hot).sum(1) spreads a NaN of any class to every row)
    assert torch.equal(rows[1].isnan(), (torch.arange(70) == 1) | (labels == 4))
    assert rows[0].isnan().any()
    g = torch.ones_like(rrows), torch.ones_like(rcols)
    gq, gw = emu.class_engine_backward(*g, q, w, labels, rrows, rcols, K, list(terms), flags, True)
    assert gq.shape == q.shape and gw.shape == w.shape and torch.isnan(gq[1]).all()


def test_emulated_class_engine_edge_cases(emu):
    spec = CLASS_SPECS["row_and_cols"]
    terms, flags = spec.pack()
    q, w, labels = class_inputs(spec, 5, 1, 8, torch.float32, "gaussian", 0)
    # C = 1: no other class (row LSE -inf), every row is a positive of the class
    rows, cols = emu.class_engine_forward(q, w, labels, 1, list(terms), flags)
    ref = oracle.class_engine_forward_oracle(q, w, labels, 1, terms, flags)
    assert torch.isneginf(rows[0]).all() and torch.isneginf(cols[1]).all()
    assert_values_close(rows, ref[0], 3e-5, "rows")
    assert_values_close(cols, ref[1], 3e-5, "cols")
    # labels that are no class index: target_sim NaN (the Python layer rejects them first)
    rows, _ = emu.class_engine_forward(q, w, torch.full((5,), 7), 1, list(terms), flags)
    assert torch.isnan(rows[1]).all()
    # N = 0
    rows, cols = emu.class_engine_forward(q[:0], w, labels[:0], 1, list(terms), flags)
    assert rows.shape == (2, 0) and torch.isneginf(cols).all()
    with pytest.raises(RuntimeError, match="at most 64"):
        emu.class_engine_forward(q, torch.zeros(65, 8), torch.zeros(5, dtype=torch.long), 65,
                                 *S.ClassLossSpec(row=T(1.0, lse=True), centers_per_class=65, pool_gamma=0.1).pack())


# ---------------------------------------------------------------------------------------------
# 3. GPU (the real kernels; skipped without a GPU)
# ---------------------------------------------------------------------------------------------
def _needs_cuda_backend():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if "cuda" not in fpl.available_backends("cuda"):
        pytest.skip(f"the cuda backend is not available: {fpl.build_info()}")
    return torch.ops.fused_pairloss


def _cuda(t):
    return t.cuda()


ALL_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("mode", PAIR_MODES)
@pytest.mark.parametrize("name", list(PAIR_SPECS))
def test_gpu_pair_engine_matches_oracle(name, mode, dtype):
    """Dyadic inputs (exact S also through the tensor cores): counts and thresholds bitwise.
    300 x 200 rows: 5 row blocks, ragged tiles; D = 136: 16-byte loads."""
    ops = _needs_cuda_backend()
    check_pair_op(ops, PAIR_SPECS[name], mode, dtype, n=300, m=200, d=136, seed=len(name), to_device=_cuda)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("name", ["ms_mined_eam", "contrastive_lp", "ntxent_mined"])
def test_gpu_pair_engine_scalar_loads_and_shapes(name, dtype):
    ops = _needs_cuda_backend()
    for n, m, d, layout in SHAPES + [(257, 129, 37, "distinct"), (200, 300, 38, "same")]:
        for mode in ("self", "ref_excl"):
            check_pair_op(ops, PAIR_SPECS[name], mode, dtype, n=n, m=m, d=d, layout=layout, seed=n, to_device=_cuda)
    check_pair_op(ops, PAIR_SPECS[name], "ref_excl", dtype, n=300, m=200, d=40, need_grad_r=False, to_device=_cuda)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("mode", PAIR_MODES)
@pytest.mark.parametrize("name", ["ms", "circle", "ntxent", "contrastive_lp"])
def test_gpu_pair_engine_random_inputs(name, mode, dtype):
    ops = _needs_cuda_backend()
    check_pair_op(ops, PAIR_SPECS[name], mode, dtype, n=700, m=500, d=128, data="gaussian", seed=7,
                  to_device=_cuda)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("name", ["ms_mined", "contrastive_lp", "ntxent_mined"])
def test_gpu_self_mode_equals_ref_mode_with_the_diagonal_excluded(name, dtype):
    """fp32 / fp64 (FMA: S_ij == S_ji whatever the operand order): bitwise; fp16 / bf16 through the
    tensor cores: the canonical tile orientation makes self mode symmetric, but the ref-mode call
    computes S_ji with the other operand order, so only to rounding (dyadic: exact anyway)."""
    ops = _needs_cuda_backend()
    spec = PAIR_SPECS[name]
    terms, flags = spec.pack()
    q, _, lq, _, _ = pair_inputs("self", 500, 0, 64, dtype, "gaussian", seed=5)
    q, lq = q.cuda(), lq.cuda()
    a = ops.pair_engine_forward(q, None, lq, None, None, list(terms), flags)
    b = ops.pair_engine_forward(q, q.clone(), lq, lq.clone(), torch.arange(500, device="cuda"), list(terms), flags)
    if dtype in LOWP:
        for x, y in zip(a, b):
            assert_values_close(x.double(), y.double(), 1e-4, "self vs ref")
    else:
        assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("name", list(CLASS_SPECS))
def test_gpu_class_engine_matches_oracle(name, dtype):
    ops = _needs_cuda_backend()
    check_class_op(ops, CLASS_SPECS[name], dtype, n=300, c=50, d=136, seed=len(name), to_device=_cuda)
    check_class_op(ops, CLASS_SPECS[name], dtype, n=130, c=150, d=37, seed=1, to_device=_cuda)
    check_class_op(ops, CLASS_SPECS[name], dtype, n=130, c=20, d=40, need_grad_w=False, to_device=_cuda)


@pytest.mark.gpu
def test_gpu_class_engine_dyadic_and_one_class_per_tile():
    ops = _needs_cuda_backend()
    for dtype in ALL_DTYPES:
        for name in ("proxy_circle", "proxy_anchor", "row_and_cols"):
            check_class_op(ops, CLASS_SPECS[name], dtype, n=300, c=70, d=64, data="dyadic", seed=4, to_device=_cuda)
        k64 = S.ClassLossSpec(row=T(8.0, lse=True), centers_per_class=64, pool_gamma=0.125)
        check_class_op(ops, k64, dtype, n=200, c=5, d=48, seed=5, to_device=_cuda)


def _loss_and_grads(fn, tensors, kwargs, backend, dtype):
    leaves = [t.detach().to("cuda", dtype).requires_grad_() if t.is_floating_point() else t.to("cuda")
              for t in tensors]
    loss = fn(*leaves, **kwargs, backend=backend)
    assert loss.dtype == dtype
    wrt = [t for t in leaves if t.requires_grad]
    grads = torch.autograd.grad(loss, wrt)
    return loss.detach().double().cpu(), [g.double().cpu() for g in grads]


def _loss_case(name, ref_mode, gen):
    n, d, c = 96, 64, 20
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 6, (n,), generator=gen)
    if name == "ms_mined":  # exact S (dyadic rows) so the mining decisions are exact
        x = dyadic(n, d, gen, torch.float64)
    tensors = [x, y]
    if name in ("ms", "ms_mined", "circle") and ref_mode:
        tensors += [torch.randn(80, d, generator=gen, dtype=torch.float64), torch.randint(0, 6, (80,), generator=gen)]
    if name == "proxy_circle":
        return Fn.proxy_circle_loss, [x, torch.randint(0, c, (n,), generator=gen),
                                      torch.randn(d, c, generator=gen, dtype=torch.float64)], {}
    if name.startswith("softtriple"):
        K = int(name[-1])
        centers = torch.randn(d, c * K, generator=gen, dtype=torch.float64)
        return Fn.soft_triple_loss, [x, torch.randint(0, c, (n,), generator=gen), centers], {
            "centers_per_class": K, "center_reg_weight": 0.2 if K > 1 else 0.0}
    fn, kwargs = {"ms": (Fn.multi_similarity_loss, {}),
                  "ms_mined": (Fn.multi_similarity_loss, {"miner_epsilon": 0.1}),
                  "circle": (Fn.circle_loss, {})}[name]
    return fn, tensors, kwargs


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("name,ref_mode", [("ms", False), ("ms", True), ("ms_mined", False), ("ms_mined", True),
                                           ("circle", False), ("circle", True), ("softtriple_1", False),
                                           ("softtriple_3", False), ("proxy_circle", False)])
def test_gpu_losses_match_reference(name, ref_mode, dtype):
    """fp32: to rounding; fp16 / bf16: error against an fp64 reference at most 2x the reference
    backend's own error in that dtype."""
    _needs_cuda_backend()
    fn, tensors, kwargs = _loss_case(name, ref_mode, torch.Generator().manual_seed(10))
    got = _loss_and_grads(fn, tensors, kwargs, "cuda", dtype)
    ref = _loss_and_grads(fn, tensors, kwargs, "reference", dtype)
    if dtype == torch.float32:
        torch.testing.assert_close(got[0], ref[0], rtol=1e-4, atol=1e-5)
        for a, b in zip(got[1], ref[1]):
            assert_grad_close(a, b, 1e-4, "grad")
        return
    exact = _loss_and_grads(fn, tensors, kwargs, "reference", torch.float64)
    eps = torch.finfo(dtype).eps
    for a, b, e in zip([got[0], *got[1]], [ref[0], *ref[1]], [exact[0], *exact[1]]):
        err_cuda, err_ref = (a - e).norm().item(), (b - e).norm().item()
        assert err_cuda <= 2 * err_ref + eps * e.norm().item() + 1e-12, (err_cuda, err_ref)


@pytest.mark.gpu
def test_gpu_results_are_deterministic_and_large_scales_stay_finite():
    ops = _needs_cuda_backend()
    gen = torch.Generator().manual_seed(12)
    x = torch.nn.functional.normalize(torch.randn(1000, 128, generator=gen), dim=1).cuda()
    y = torch.randint(0, 50, (1000,), generator=gen).cuda()
    for name in ("ms_mined_eam", "ntxent_mined", "contrastive_lp"):
        terms, flags = PAIR_SPECS[name].pack()
        runs = []
        for _ in range(2):
            for r, lr, ex in ((None, None, None), (x.flip(0).contiguous(), y.flip(0).contiguous(),
                                                   torch.arange(1000, device="cuda").flip(0))):
                out = ops.pair_engine_forward(x, r, y, lr, ex, list(terms), flags)
                g = ops.pair_engine_backward(torch.ones_like(out[0]), x, r, y, lr, ex, out[0], out[2], list(terms),
                                             flags, r is not None)
                runs.append([*out, *g])
        for a, b in zip(runs[:2], runs[2:]):
            assert all(torch.equal(u, v) for u, v in zip(a, b)), name
    # gamma = 256, beta = 50: an online max, never a fixed bound
    loss = Fn.multi_similarity_loss(x.requires_grad_(), y, beta=50.0, miner_epsilon=0.1, backend="cuda")
    gx = torch.autograd.grad(loss, x)[0]
    assert torch.isfinite(loss) and torch.isfinite(gx).all()
    p = torch.randn(128, 50, generator=gen).cuda().requires_grad_()
    loss = Fn.proxy_circle_loss(x, y, p, gamma=256.0, backend="cuda")
    gx, gp = torch.autograd.grad(loss, (x, p))
    assert torch.isfinite(loss) and torch.isfinite(gx).all() and torch.isfinite(gp).all()
    spec = CLASS_SPECS["row_and_cols"]
    w = torch.nn.functional.normalize(torch.randn(300, 128, generator=gen), dim=1).cuda()
    yc = torch.randint(0, 300, (1000,), generator=gen).cuda()
    outs = []
    for _ in range(2):
        rows, cols = ops.class_engine_forward(x.detach(), w, yc, 1, *spec.pack())
        g = ops.class_engine_backward(torch.ones_like(rows), torch.ones_like(cols), x.detach(), w, yc, rows, cols, 1,
                                      *spec.pack(), True)
        outs.append([rows, cols, *g])
    assert all(torch.equal(u, v) for u, v in zip(*outs))


@pytest.mark.gpu
def test_gpu_memory_stays_linear():
    """No N x N (or N x C) buffer: at N = 16384 a forward + backward allocates far less than one
    fp32 N x N matrix (1 GiB); the extra memory is O((N + M) D)."""
    ops = _needs_cuda_backend()
    n, d = 16384, 128
    gen = torch.Generator().manual_seed(13)
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1).cuda()
    y = torch.randint(0, 1000, (n,), generator=gen).cuda()
    torch.cuda.synchronize()
    for name in ("ms_mined", "ntxent", "contrastive_lp"):
        terms, flags = PAIR_SPECS[name].pack()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = ops.pair_engine_forward(x, None, y, None, None, list(terms), flags)
        ops.pair_engine_backward(torch.ones_like(out[0]), x, None, y, None, None, out[0], out[2], list(terms), flags,
                                 False)
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
        assert extra < 6 * n * d * 4 + (64 << 20), (name, extra)
    w = torch.nn.functional.normalize(torch.randn(20000, d, generator=gen), dim=1).cuda()
    yc = torch.randint(0, 20000, (n,), generator=gen).cuda()
    spec = CLASS_SPECS["row_and_cols"]
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    rows, cols = ops.class_engine_forward(x, w, yc, 1, *spec.pack())
    ops.class_engine_backward(torch.ones_like(rows), torch.ones_like(cols), x, w, yc, rows, cols, 1, *spec.pack(), True)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < 4 * (n + 20000) * d * 4 + (64 << 20)
