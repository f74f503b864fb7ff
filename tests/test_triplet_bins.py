"""The triplet engine's bins (DynamicSoftMarginLoss; fused_pairloss/ops/triplets.py triplet_bins and
its C++ kernel triplet_bins_engine_forward): the kernel against the PyTorch op, both ops'
registration (opcheck), the PyTorch op's chunks, and second-order gradients. DynamicSoftMarginLoss
itself against PML: the kit's parity tests (tests/kit.py, "dsm")."""
import os

import pytest
import torch

from fused_pairloss.ops import triplets
from kit import check_close
from test_triplet_margin import op_inputs  # dyadic rows: both ops see the same d and x, ties included

NATIVE = triplets.bins_op("cpu", torch.device("cpu")) is not triplets.triplet_bins
needs_native = pytest.mark.skipif(not NATIVE and not os.environ.get("CI"),
                                  reason="fused_pairloss._C (the CPU kernels) not built")

# (lo, bins): PML's default grid; a narrow one that puts many x below lo and past the last edge
# (PML's clamped bins, negative fractions); many bins (the kernel's weights on the heap)
GRIDS = {"default": (-2.0, 10), "narrow": (-0.5, 6), "fine": (-2.0, 100)}


def op_results(op, args, lo, bins):
    """counts, the bins and the gradients of a weighted sum of them wrt q and r."""
    q, r, lq, lr, ex = args
    q = q.clone().requires_grad_(True)
    r = q if args[1] is args[0] else r.clone().requires_grad_(True)
    out, counts = op(q, r, lq, lr, ex, lo, 2 * abs(lo) / bins, bins)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(out)
    params = [q] if r is q else [q, r]
    return (counts, out, *torch.autograd.grad((out * w).sum(), params))


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("mode", ["self", "ref"])
@pytest.mark.parametrize("grid", list(GRIDS))
def test_cpu_kernel_matches_the_pytorch_op(dtype, mode, grid):
    """The C++ kernel against the PyTorch op (fp64: the truth; the dtype's own: the reference); the
    counts exactly. Rows with ~5 positives and, in self mode, some with ~100."""
    lo, bins = GRIDS[grid]
    args = op_inputs(mode, 300, 40 if mode == "ref" else 3, dtype, seed=bins)
    args64 = tuple(a.double() if a.is_floating_point() else a for a in args)
    args64 = (args64[0], args64[0], *args64[2:]) if mode == "self" else args64
    native = op_results(torch.ops.fused_pairloss.triplet_bins_engine_forward, args, lo, bins)
    same = op_results(triplets.triplet_bins, args, lo, bins)
    truth = op_results(triplets.triplet_bins, args64, lo, bins)
    assert torch.equal(native[0], same[0]) and native[0].sum() > 0
    assert native[1].dtype == dtype
    for k, (a, t, b) in enumerate(zip(native[1:], truth[1:], same[1:])):
        check_close(a, t, b, what=["bins", "grad q", "grad r"][k], dtype=dtype)


@needs_native
def test_cpu_kernel_nan_row_is_in_no_term():
    """A NaN row adds to no bin, in no other row either (the loss's NaN comes from its inputs:
    nan_in_nan_out); the other rows as without it."""
    op = torch.ops.fused_pairloss.triplet_bins_engine_forward
    args = op_inputs("self", 60, 4, torch.float64, seed=3)
    q = args[0].clone()
    q[7] = float("nan")
    out, counts = op(q, q, *args[2:], -2.0, 0.4, 10)
    assert counts[7] == 0 and torch.all(out[7] == 0) and torch.isfinite(out).all()
    keep = torch.arange(60) != 7
    lab = args[2][keep]
    ref, ref_counts = op(q[keep], q[keep], lab, lab, torch.arange(59), -2.0, 0.4, 10)
    assert torch.equal(counts[keep], ref_counts)
    check_close(out[keep], ref, what="bins")


@needs_native
def test_cpu_kernel_inf_entry_as_the_pytorch_op():
    """An infinite entry (the op's own input; the losses normalize it to a NaN row): a pair whose
    x = a - u is NaN (inf - inf) is in no bin, as in the PyTorch op (the kernel's bin of a NaN
    was an index out of its buffer)."""
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-2, 3, (70, 9), generator=g).double() / 4
    labels = torch.randint(0, 5, (70,), generator=g)
    q[4, 2] = float("inf")
    args = (q, q, labels, labels, torch.arange(70), -2.0, 0.4, 10)
    native = torch.ops.fused_pairloss.triplet_bins_engine_forward(*args)
    same = triplets.triplet_bins(*args)
    assert torch.equal(native[1], same[1])
    torch.testing.assert_close(native[0], same[0], equal_nan=True)


def test_many_chunks_give_the_one_chunk_result(monkeypatch):
    args = op_inputs("ref", 64, 4, torch.float64, seed=4)
    whole = op_results(triplets.triplet_bins, args, -2.0, 10)
    monkeypatch.setattr(triplets, "CHUNK_ELEMENTS", 94 * 7)  # 7 rows per chunk: 10 chunks, the last short
    parts = op_results(triplets.triplet_bins, args, -2.0, 10)
    assert torch.equal(parts[0], whole[0])
    for a, b in zip(parts[1:], whole[1:]):
        check_close(a, b, what="chunked")


def _opcheck(forward, backward, mode):
    q, r, lq, lr, ex = op_inputs(mode, 20, 4, torch.float64, seed=6, d=6)
    q = (q + 0.01 * torch.randn(q.shape, generator=torch.Generator().manual_seed(7), dtype=q.dtype))
    r = q if mode == "self" else r
    args = (q.requires_grad_(True), r if mode == "self" else r.clone().requires_grad_(True), lq, lr, ex, -2.0, 0.4, 10)
    torch.library.opcheck(forward, args)
    out, _ = forward(*args)
    for need in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(backward, (torch.ones_like(out), q.detach(), r.detach(), *args[2:], *need))


@pytest.mark.parametrize("mode", ["self", "ref"])
def test_opcheck(mode):
    _opcheck(triplets.triplet_bins, triplets.triplet_bins_backward, mode)


@needs_native
@pytest.mark.parametrize("mode", ["self", "ref"])
def test_cpu_kernel_opcheck(mode):
    _opcheck(torch.ops.fused_pairloss.triplet_bins_engine_forward.default,
             torch.ops.fused_pairloss.triplet_bins_engine_backward.default, mode)


@pytest.mark.parametrize("native", [False, True], ids=["pytorch", "cpu_kernel"])
def test_second_order_gradients(native):
    """create_graph=True differentiates the PyTorch computation of the bins (gradgradcheck, random
    rows: no pair on a bin edge), whichever op ran the forward: this checks that the C++ op's
    autograd routes there (its first-order backward: the parity tests above)."""
    if native and not NATIVE:
        pytest.skip("fused_pairloss._C (the CPU kernels) not built")
    op = torch.ops.fused_pairloss.triplet_bins_engine_forward if native else triplets.triplet_bins
    g = torch.Generator().manual_seed(8)
    q = torch.nn.functional.normalize(torch.randn(12, 5, generator=g, dtype=torch.float64), dim=1)
    r = torch.nn.functional.normalize(torch.randn(15, 5, generator=g, dtype=torch.float64), dim=1)
    lq, lr = torch.randint(0, 3, (12,), generator=g), torch.randint(0, 3, (15,), generator=g)
    w = torch.randn(12, 2, 10, generator=g, dtype=torch.float64)

    def f(q, r):
        return (op(q, r, lq, lr, torch.full((12,), -1), -2.0, 0.4, 10)[0] * w).sum()
    assert torch.autograd.gradgradcheck(f, (q.requires_grad_(True), r.requires_grad_(True)))


@needs_native
def test_cpu_kernel_refuses_a_bad_grid():
    """The kernel checks its grid (the loss checks its own arguments first, naming them)."""
    q, r, lq, lr, ex = op_inputs("ref", 10, 3, torch.float64, seed=1)
    for lo, width, bins in ((float("nan"), 0.4, 10), (-2.0, 0.0, 10), (-2.0, 0.4, 1)):
        with pytest.raises(RuntimeError, match="triplet_bins"):
            torch.ops.fused_pairloss.triplet_bins_engine_forward(q, r, lq, lr, ex, lo, width, bins)
