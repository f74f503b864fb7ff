"""The all-triplets op on Triton (fused_pairloss/ops/triton_triplets.py, ops
fused_pairloss::triton_triplet_forward / _backward): against the PyTorch op triplet_rows (the same
schema) on dyadic rows, where every u is exact in both and ties are decided alike, so the counts
are compared exactly and the sums and gradients by the kit's rule; with and without a miner's
window, self and ref mode, few and many positives (beyond MAX_POSITIVES the PyTorch op computes);
NaN rows, fp16 inputs, opcheck, TripletMarginLoss(backend="triton"). Without a GPU through the
Triton interpreter (tests/conftest.py), at small sizes; the `gpu` tests run the same checks on CUDA
tensors at real sizes."""
import glob
import os

import pytest
import torch

if not glob.glob("/dev/nvidia[0-9]*"):  # also when this file runs without the conftest
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")
TT = pytest.importorskip("fused_pairloss.ops.triton_triplets")
if not TT.AVAILABLE:  # pragma: no cover
    pytest.skip("the Triton engines are not available", allow_module_level=True)

import fused_pairloss as fpl  # noqa: E402
from fused_pairloss.ops import triplets  # noqa: E402
from fused_pairloss.ops import triton_engines as TE  # noqa: E402
from kit import check_close  # noqa: E402
from test_triplet_margin import check_nan_row_is_in_no_term, check_opcheck, op_inputs, op_results  # noqa: E402

FWD, BWD = TT.forward_op(), TT.backward_op()
WINDOWS = {"none": triplets.NO_WINDOW, "hard": (float("-inf"), 0.0), "semihard": (0.0, 0.5)}
pytestmark = pytest.mark.skipif(not TE.INTERPRETED and not torch.cuda.is_available(),
                                reason="Triton needs a CUDA GPU or TRITON_INTERPRET=1")


def to(args, device):
    return tuple(a.to(device) for a in args)


def check_against_the_pytorch_op(args, margin, lp, window, dtype):
    """counts and in_window exactly; sums and the gradients of q and r by the kit's rule (the truth:
    the PyTorch op in fp64 on the same rows)."""
    mode_self = args[1] is args[0]
    args64 = tuple(a.double() if a.is_floating_point() else a for a in args)
    args64 = (args64[0], args64[0], *args64[2:]) if mode_self else args64
    ours = op_results(FWD, args, margin, lp, window)
    same = op_results(triplets.triplet_rows, args, margin, lp, window)
    truth = op_results(triplets.triplet_rows, args64, margin, lp, window)
    assert torch.equal(ours[0].cpu(), same[0].cpu()) and torch.equal(ours[1].cpu(), same[1].cpu())
    assert ours[2].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    for k, (a, t, b) in enumerate(zip(ours[2:], truth[2:], same[2:])):
        check_close(a.cpu(), t.cpu(), b.cpu(), what=["sums", "grad q", "grad r"][k], dtype=dtype)


CASES = [(dtype, lp, mode, "none") for dtype in (torch.float32, torch.float64) for lp in (True, False)
         for mode in ("self", "ref")] + [(torch.float64, lp, mode, w) for lp in (True, False)
                                         for mode, w in (("ref", "hard"), ("self", "semihard"))]


@pytest.mark.parametrize("dtype,lp,mode,window", CASES,
                         ids=[f"{'fp32' if c[0] == torch.float32 else 'fp64'}-{'lp' if c[1] else 'cos'}-{c[2]}-{c[3]}"
                              for c in CASES])
def test_matches_the_pytorch_op(dtype, lp, mode, window):
    """70 rows (3 row and column tiles of the interpreter's 32), ~6 positives a row; ref mode with a
    wider r and every third row leaving one column out."""
    check_against_the_pytorch_op(op_inputs(mode, 70, 12, dtype, seed=3), 0.25, lp, WINDOWS[window], dtype)


def test_many_positives_compute_with_the_pytorch_op():
    """A row with more than MAX_POSITIVES positives: the PyTorch op's own results, bitwise."""
    args = op_inputs("self", 3 * TT.MAX_POSITIVES, 2, torch.float64, seed=4)
    assert TT.positives(args[2], args[3], args[4])[0].shape[1] > TT.MAX_POSITIVES
    ours = op_results(FWD, args, 0.2, True)
    theirs = op_results(triplets.triplet_rows, args, 0.2, True)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_positives_are_each_rows_same_label_columns_but_the_excluded():
    lq = torch.tensor([0, 1, 0, 2, 5])
    lr = torch.tensor([1, 0, 0, 2, 1, 0])
    ex = torch.tensor([1, -1, 5, 3, 0])
    cols, real = TT.positives(lq, lr, ex)
    got = [sorted(c[m].tolist()) for c, m in zip(cols, real)]
    assert got == [[2, 5], [0, 4], [1, 2], [], []]


def test_half_inputs_accumulate_in_fp32():
    args = op_inputs("ref", 60, 6, torch.float16, seed=9)
    ours = op_results(FWD, args, 0.1, True)
    same = op_results(triplets.triplet_rows, args, 0.1, True)
    assert ours[2].dtype == torch.float32 and ours[3].dtype == torch.float16
    assert torch.equal(ours[0], same[0])
    check_close(ours[2], same[2].double(), what="sums", dtype=torch.float16)


def test_nan_row_is_in_no_term():
    """As the C++ kernel: the other rows equal the batch without the NaN row."""
    q, _, lq, _, _ = op_inputs("self", 50, 4, torch.float64, seed=10)
    check_nan_row_is_in_no_term(FWD, q, lq, reference=triplets.triplet_rows)


@pytest.mark.parametrize("lp", [True, False], ids=["lp", "cosine"])
@pytest.mark.parametrize("window", [triplets.NO_WINDOW, (0.0, 0.4)], ids=["all", "window"])
def test_opcheck(lp, window):
    check_opcheck(FWD, BWD, lp, window, needs=((True, True), (False, True)))


@pytest.mark.parametrize("miner", [None, "semihard"])
def test_loss_through_the_triton_backend(miner):
    """TripletMarginLoss(backend="triton"), alone and fed by a fused TripletMarginMiner, against the
    reference backend (the loss on the op's sums and counts)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(48, 12, generator=g, dtype=torch.float64).requires_grad_(True)
    y = torch.randint(0, 8, (48,), generator=g)

    def run(backend):
        loss = fpl.TripletMarginLoss(margin=0.2, backend=backend)
        mined = None if miner is None else fpl.miners.TripletMarginMiner(margin=0.3, type_of_triplets=miner)(x, y)
        out = loss(x, y, mined)
        return out, torch.autograd.grad(out, x)[0]

    ours, reference = run("triton"), run("reference")
    torch.testing.assert_close(ours[0], reference[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours[1], reference[1], rtol=1e-10, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.parametrize("lp", [True, False], ids=["lp", "cosine"])
@pytest.mark.parametrize("window", ["none", "semihard"])
def test_gpu_matches_the_pytorch_op(lp, window):
    """CUDA tensors at a real size (N = 2048, 4 per class; ref mode 2098 columns), fp32 and fp64."""
    for dtype in (torch.float32, torch.float64):
        args = to(op_inputs("ref", 2048, 512, dtype, seed=12, d=64), "cuda")
        check_against_the_pytorch_op(args, 0.2, lp, WINDOWS[window], dtype)


# ---- the bins (DynamicSoftMarginLoss; ops/README.md triplet_bins) ----------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("mode", ["self", "ref"])
def test_bins_match_the_pytorch_op(dtype, mode):
    """70 rows (3 row and column tiles), ~6 positives a row, PML's default grid and a narrow one
    (pairs below lo and past the last edge)."""
    check_bins_against_the_pytorch_op(op_inputs(mode, 70, 12, dtype, seed=5), dtype)


def check_bins_against_the_pytorch_op(args, dtype, grids=((-2.0, 10), (-0.5, 6))):
    """counts exactly, the bins and the gradients of q and r by the kit's rule (the truth: the
    PyTorch op in fp64 on the same rows)."""
    from test_triplet_bins import op_results as bin_results

    mode_self = args[1] is args[0]
    args64 = tuple(a.double() if a.is_floating_point() else a for a in args)
    args64 = (args64[0], args64[0], *args64[2:]) if mode_self else args64
    for lo, bins in grids:
        ours = bin_results(TT.bins_forward_op(), args, lo, bins)
        same = bin_results(triplets.triplet_bins, args, lo, bins)
        truth = bin_results(triplets.triplet_bins, args64, lo, bins)
        assert torch.equal(ours[0].cpu(), same[0].cpu()) and same[0].sum() > 0
        for k, (a, t, b) in enumerate(zip(ours[1:], truth[1:], same[1:])):
            check_close(a.cpu(), t.cpu(), b.cpu(), what=["bins", "grad q", "grad r"][k], dtype=dtype)


@pytest.mark.gpu
def test_gpu_bins_match_the_pytorch_op():
    """CUDA tensors at a real size (N = 2048, 4 per class; ref mode 2098 columns), fp32 and fp64."""
    for dtype in (torch.float32, torch.float64):
        check_bins_against_the_pytorch_op(to(op_inputs("ref", 2048, 512, dtype, seed=13, d=64), "cuda"), dtype)


def test_bins_opcheck_and_many_bins_compute_with_the_pytorch_op():
    from test_triplet_bins import _opcheck, op_results as bin_results

    _opcheck(TT.bins_forward_op(), TT._OPS["bins_backward"], "ref")
    args = op_inputs("self", 40, 6, torch.float64, seed=6)
    bins = TT.MAX_BINS + 1
    ours = bin_results(TT.bins_forward_op(), args, -2.0, bins)
    theirs = bin_results(triplets.triplet_bins, args, -2.0, bins)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


@pytest.mark.parametrize("distance", ["cosine", "lp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_a_negative_copying_a_positive_ties_as_in_pml(distance, dtype):
    """Rows of other classes that copy a row's positives: d_ap == d_an exactly, so with margin 0 the
    term is exactly 0, which PML's AvgNonZeroReducer does not count. The positives' u is summed as
    the tiles sum the negatives' (it was a tree sum per row: an ulp apart, and the loss 2.5% / 5%
    off in fp32 / fp64)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 129, generator=g, dtype=torch.float64).to(dtype)
    y = torch.arange(12) // 3
    x[3], x[6], x[9] = x[1], x[2], x[0]
    kwargs = dict(margin=0.0, distance=distance)
    ours = fpl.functional.triplet_margin_loss(x, y, backend="triton", **kwargs)
    reference = fpl.functional.triplet_margin_loss(x, y, backend="reference", **kwargs)
    assert float(ours) == pytest.approx(float(reference), rel=1e-6 if dtype == torch.float32 else 1e-12)
