"""TripletMarginLoss (fused_pairloss/losses/triplet_margin.py, ops fused_pairloss::triplet_rows and
its C++ kernel triplet_engine_forward) against PML's own class: values and gradients over all
triplets, listed triplets and pairs from PML's miners; the C++ kernel against the PyTorch op, and
both ops' registration. swap, smooth_loss and sampled triplets: tests/test_triplet_coupled.py."""
import os

import pytest
import torch

import fused_pairloss as fpl
from fused_pairloss.ops import triplets
from kit import check_close, dyadic

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
from pytorch_metric_learning.distances import CosineSimilarity  # noqa: E402


def value_and_grads(fn, params):
    out = fn()
    return out, torch.autograd.grad(out, params)


def inputs(n, d, classes, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    return x, torch.randint(0, classes, (n,), generator=g)


def check_against_pml(ours, pml, args, params, dtype):
    """Our module and PML's on the same inputs: the fp64 PML call is the truth, PML in the case's
    dtype the same-dtype reference (tests/kit.py's rule)."""
    val, grads = value_and_grads(lambda: ours(*args), params)
    pml_val, pml_grads = value_and_grads(lambda: pml(*args), params)
    conv = {id(p): p.detach().double().requires_grad_(True) for p in params}
    args64 = [conv.get(id(a), a) for a in args]
    truth, truth_grads = value_and_grads(lambda: pml(*args64), [conv[id(p)] for p in params])
    check_close(val, truth, pml_val, what="value", dtype=dtype)
    for k, (a, b, t) in enumerate(zip(grads, pml_grads, truth_grads)):
        check_close(a, t, b, what=f"grad {k}", dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("distance", ["lp", "cosine"])
@pytest.mark.parametrize("mode", ["self", "ref", "ref_is_labels"])
def test_all_triplets_match_pml(dtype, distance, mode):
    x, y = inputs(40, 12, 5, dtype, seed=1)
    kw = dict(margin=0.2) if distance == "lp" else dict(margin=0.1, distance=CosineSimilarity())
    ours, pml = fpl.TripletMarginLoss(**kw), pml_losses.TripletMarginLoss(**kw)
    if mode == "self":
        check_against_pml(ours, pml, (x, y), [x], dtype)
        return
    r, ry = inputs(30 if mode == "ref" else 40, 12, 5, dtype, seed=2)
    ry = y if mode == "ref_is_labels" else ry
    check_against_pml(ours, pml, (x, y, None, r, ry), [x, r], dtype)


def test_many_rows_in_several_chunks(monkeypatch):
    """The PyTorch op's rows split into several chunks (forward and backward) give one chunk's result."""
    x, y = inputs(64, 8, 4, torch.float64, seed=3)
    ex = torch.arange(64)

    def run():
        q = torch.nn.functional.normalize(x, dim=1)
        sums, counts, _ = triplets.triplet_rows(q, q, y, y, ex, 0.3, True, *triplets.NO_WINDOW)
        return counts, sums, torch.autograd.grad(sums.sum(), x)[0]
    whole = run()
    monkeypatch.setattr(triplets, "CHUNK_ELEMENTS", 64 * 7)  # 7 rows per chunk: 10 chunks, the last short
    parts = run()
    assert torch.equal(parts[0], whole[0])
    check_close(parts[1], whole[1], what="value")
    check_close(parts[2], whole[2], what="grad")


NATIVE = triplets.rows_op("cpu", torch.device("cpu")) is not triplets.triplet_rows
needs_native = pytest.mark.skipif(not NATIVE and not os.environ.get("CI"),
                                  reason="fused_pairloss._C (the CPU kernels) not built")


def op_inputs(mode, n, classes, dtype, seed, d=16):
    """Dyadic rows (tests/kit.py): S and d^2 are exact in every dtype, so both ops see the same u
    (d correctly rounded from an exact d^2) and take the same decisions, ties included."""
    g = torch.Generator().manual_seed(seed)
    q = dyadic(n, d, g, dtype)
    lq = torch.randint(0, classes, (n,), generator=g)
    if mode == "self":
        return q, q, lq, lq, torch.arange(n)
    m = n + 50
    r = dyadic(m, d, g, dtype)
    lr = torch.randint(0, classes, (m,), generator=g)
    ex = torch.full((n,), -1)
    ex[::3] = torch.randint(0, m, (len(ex[::3]),), generator=g)  # some rows leave one column out
    return q, r, lq, lr, ex


def op_results(op, args, margin, lp, window=triplets.NO_WINDOW):
    """counts, in_window, sums and the gradients of a weighted sum of the sums wrt q and r."""
    q, r, lq, lr, ex = args
    q = q.clone().requires_grad_(True)
    r = q if args[1] is args[0] else r.clone().requires_grad_(True)
    sums, counts, in_window = op(q, r, lq, lr, ex, margin, lp, *window)
    w = torch.linspace(0.5, 1.5, len(sums), dtype=sums.dtype)
    params = [q] if r is q else [q, r]
    return (counts, in_window, sums, *torch.autograd.grad((sums * w).sum(), params))


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("lp", [True, False], ids=["lp", "cosine"])
@pytest.mark.parametrize("mode", ["self", "ref"])
@pytest.mark.parametrize("classes", [40, 2], ids=["few_positives", "many_positives"])
@pytest.mark.parametrize("window", ["none", "hard", "semihard"])
def test_cpu_kernel_matches_the_pytorch_op(dtype, lp, mode, classes, window):
    """The C++ kernel against the PyTorch op (fp64: the truth; the dtype's own: the reference): rows
    with ~15 positives (compared with every negative) and with ~300 (without a window: a binary
    search among them), with and without a miner's window; the counts exactly."""
    if classes == 2 and window != "none" and (dtype == torch.float32 or mode == "ref"):
        pytest.skip("one windowed many-positives case is enough (the PyTorch op loops over ~300 positives)")
    win = {"none": triplets.NO_WINDOW, "hard": (float("-inf"), 0.0), "semihard": (0.0, 0.5)}[window]
    args = op_inputs(mode, 600 if window == "none" else 200, classes, dtype, seed=classes)
    args64 = tuple(a.double() if a.is_floating_point() else a for a in args)
    args64 = (args64[0], args64[0], *args64[2:]) if mode == "self" else args64
    native = op_results(torch.ops.fused_pairloss.triplet_engine_forward, args, 0.25, lp, win)
    same = op_results(triplets.triplet_rows, args, 0.25, lp, win)
    truth = op_results(triplets.triplet_rows, args64, 0.25, lp, win)
    assert torch.equal(native[0], same[0]) and torch.equal(native[1], same[1])
    assert native[2].dtype == dtype
    for k, (a, t, b) in enumerate(zip(native[2:], truth[2:], same[2:])):
        check_close(a, t, b, what=["sums", "grad q", "grad r"][k], dtype=dtype)


@needs_native
def test_cpu_kernel_half_inputs_accumulate_in_fp32():
    args = op_inputs("ref", 100, 6, torch.float16, seed=9)
    native = op_results(torch.ops.fused_pairloss.triplet_engine_forward, args, 0.1, True)
    same = op_results(triplets.triplet_rows, args, 0.1, True)
    assert native[2].dtype == torch.float32 and native[3].dtype == torch.float16
    check_close(native[2], same[2].double(), what="sums", dtype=torch.float16)


def check_nan_row_is_in_no_term(op, q, lq, reference):
    """Self mode with row 7 of q NaN: that row has no nonzero term (the loss adds an exact 0 of the
    inputs to stay NaN), and the other rows equal `reference` on the batch without it (their terms
    with the NaN u are left out). Returns the q with the NaN row."""
    n = len(lq)
    q = q.clone()
    q[7] = float("nan")
    sums, counts, _ = op(q, q, lq, lq, torch.arange(n), 0.2, True, *triplets.NO_WINDOW)
    assert counts[7] == 0 and sums[7] == 0 and torch.isfinite(sums).all()
    keep = torch.arange(n) != 7
    sub = reference(q[keep], q[keep], lq[keep], lq[keep], torch.arange(n - 1), 0.2, True, *triplets.NO_WINDOW)
    torch.testing.assert_close(sums[keep], sub[0], rtol=1e-12, atol=1e-12)
    assert torch.equal(counts[keep], sub[1])
    return q


def check_opcheck(forward, backward, lp, window, needs):
    """torch.library.opcheck of a triplet op pair (forward, and backward for each need flag pair)."""
    q, r, lq, lr, ex = op_inputs("ref", 9, 3, torch.float64, seed=11, d=5)
    q, r = q.requires_grad_(True), r.requires_grad_(True)
    args = (q, r, lq, lr, ex, 0.2, lp, *window)
    torch.library.opcheck(forward, args)
    sums, _, _ = forward(*args)
    for need in needs:
        torch.library.opcheck(backward, (torch.ones_like(sums), q.detach(), r.detach(), *args[2:], *need))


@needs_native
def test_cpu_kernel_nan_row_is_in_no_term():
    q, _, lq, _, _ = op_inputs("self", 50, 4, torch.float64, seed=10)
    op = torch.ops.fused_pairloss.triplet_engine_forward
    check_nan_row_is_in_no_term(op, q, lq, reference=op)


@pytest.mark.parametrize("miner", ["triplet_margin", "multi_similarity", "batch_hard"])
def test_indices_tuple_from_pml_miners(miner):
    """A miner's triplets (or pairs, joined on the anchor as PML does) are computed from the listed
    rows: equal to PML; labels=None with an indices_tuple as PML allows."""
    x, y = inputs(32, 10, 4, torch.float64, seed=4)
    m = {"triplet_margin": pml_miners.TripletMarginMiner(margin=0.2, type_of_triplets="all"),
         "multi_similarity": pml_miners.MultiSimilarityMiner(0.1),
         "batch_hard": pml_miners.BatchHardMiner()}[miner]
    indices = m(x.detach(), y)
    for labels in (y, None):
        check_against_pml(fpl.TripletMarginLoss(margin=0.2), pml_losses.TripletMarginLoss(margin=0.2),
                          (x, labels, indices), [x], torch.float64)


def test_no_triplets_gives_pml_zero_loss():
    x, y = inputs(10, 6, 1, torch.float32, seed=6)  # one class: no negative
    val = fpl.TripletMarginLoss()(x, y)
    assert val.item() == 0 and val.requires_grad and val.item() == pml_losses.TripletMarginLoss()(x, y).item()


@pytest.mark.parametrize("bad", ["some", -3, 2.5, True])
def test_bad_triplets_per_anchor_is_named(bad):
    with pytest.raises(ValueError, match="triplets_per_anchor"):
        fpl.TripletMarginLoss(triplets_per_anchor=bad)


def test_labels_or_indices_required():
    with pytest.raises(ValueError, match="labels"):
        fpl.TripletMarginLoss()(torch.randn(4, 3))


@pytest.mark.parametrize("self_mode", [True, False])
def test_opcheck(self_mode):
    g = torch.Generator().manual_seed(7)
    q = torch.nn.functional.normalize(torch.randn(9, 5, generator=g, dtype=torch.float64), dim=1)
    lq = torch.randint(0, 3, (9,), generator=g)
    if self_mode:
        r, lr, ex = q, lq, torch.arange(9)
    else:
        r = torch.nn.functional.normalize(torch.randn(7, 5, generator=g, dtype=torch.float64), dim=1)
        lr, ex = torch.randint(0, 3, (7,), generator=g), torch.full((9,), -1)
    q = q.clone().requires_grad_(True)
    r = q if self_mode else r.requires_grad_(True)
    for window in (triplets.NO_WINDOW, (-0.1, 0.3)):
        torch.library.opcheck(triplets.triplet_rows, (q, r, lq, lr, ex, 0.2, True, *window))
        sums, _, _ = triplets.triplet_rows(q, r, lq, lr, ex, 0.2, True, *window)
        torch.library.opcheck(triplets.triplet_rows_backward, (torch.ones_like(sums), q.detach(), r.detach(), lq, lr,
                                                               ex, 0.2, True, *window, True, True))


@needs_native
@pytest.mark.parametrize("lp", [True, False], ids=["lp", "cosine"])
@pytest.mark.parametrize("window", [triplets.NO_WINDOW, (0.0, 0.4)], ids=["all", "window"])
def test_cpu_kernel_opcheck(lp, window):
    check_opcheck(torch.ops.fused_pairloss.triplet_engine_forward.default,
                  torch.ops.fused_pairloss.triplet_engine_backward.default, lp, window,
                  needs=((True, True), (True, False), (False, True)))


def test_nan_in_nan_out():
    x, y = inputs(12, 5, 3, torch.float32, seed=8)
    x = x.detach().clone()
    x[4, 0] = float("nan")
    assert torch.isnan(fpl.TripletMarginLoss()(x, y))


def test_pairs_join_on_the_anchor_in_pmls_order():
    """PML's convert_to_triplets join (torch.where over #pos x #neg) without that matrix."""
    from fused_pairloss.ops.listed import join_on_anchor
    g = torch.Generator().manual_seed(12)
    for _ in range(20):
        a1 = torch.randint(0, 9, (int(torch.randint(0, 30, (1,), generator=g)),), generator=g)
        a2 = torch.randint(0, 9, (int(torch.randint(0, 30, (1,), generator=g)),), generator=g)
        expected = torch.where(a1[:, None] == a2[None, :])
        for got, want in zip(join_on_anchor(a1, a2), expected):
            assert torch.equal(got, want)


@pytest.mark.parametrize("direct_thresholds", [10 ** 9, 0], ids=["table", "sorted_keys"])
def test_below_counts_equal_the_comparisons(direct_thresholds, monkeypatch):
    """The pair tuple's triplet counts without the #pos x #neg comparisons (each anchor's thresholds
    in a table, or the sorted-key search): against them, random values and ties on a grid of
    multiples of 1/4 (B_j = A_t counts in neither), anchors without thresholds, fp32 and fp64."""
    from fused_pairloss.losses import triplet_margin
    from fused_pairloss.losses.triplet_margin import _below_counts
    monkeypatch.setattr(triplet_margin, "DIRECT_THRESHOLDS", direct_thresholds)
    g = torch.Generator().manual_seed(13)
    for trial in range(60):
        na, nb, anchors = (int(torch.randint(1, hi, (1,), generator=g)) for hi in (40, 200, 8))
        dtype = (torch.float32, torch.float64)[trial % 2]
        if trial % 3:
            A, B = (torch.randint(-6, 6, (k,), generator=g).to(dtype) / 4 for k in (na, nb))
        else:
            A, B = (torch.randn(k, generator=g, dtype=dtype) for k in (na, nb))
        anchor_a, anchor_b = (torch.randint(0, anchors, (k,), generator=g) for k in (na, nb))
        k, c = _below_counts(anchor_a, A, anchor_b, B)
        below = (anchor_a[:, None] == anchor_b[None, :]) & (B[None, :] < A[:, None])
        assert torch.equal(k, below.sum(1)) and torch.equal(c, below.sum(0)), trial


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("distance", ["lp", "cosine"])
@pytest.mark.parametrize("mode", ["self", "ref"])
def test_pair_tuples_are_counted_not_joined(mode, distance, dtype, monkeypatch):
    """A pair tuple's triplets (PML's convert_to_triplets: each listed positive with each listed
    negative of its anchor, duplicates included) are counted per pair, never joined: equal to PML in
    values and gradients, with the labels and without; the join is not called."""
    from fused_pairloss.losses import triplet_margin
    x, y = inputs(48, 12, 5, dtype, seed=14)
    kw = dict(margin=0.2) if distance == "lp" else dict(margin=0.1, distance=CosineSimilarity())
    args, params = (x, y), [x]
    if mode == "ref":
        r, ry = inputs(36, 12, 5, dtype, seed=15)
        args, params = (x, y, None, r, ry), [x, r]
    mined_on = [t.detach() if torch.is_tensor(t) else t for t in args[:2] + args[3:]]
    a1, p, a2, n = pml_miners.MultiSimilarityMiner(0.3)(*mined_on)
    pairs = (torch.cat([a1, a1[:9]]), torch.cat([p, p[:9]]), torch.cat([a2, a2[-5:]]), torch.cat([n, n[-5:]]))

    def no_join(*_):
        raise AssertionError("the pairs were joined into triplets")
    monkeypatch.setattr(triplet_margin, "join_on_anchor", no_join)
    ours, pml = fpl.TripletMarginLoss(**kw), pml_losses.TripletMarginLoss(**kw)
    for labels in (y, None):
        call = (args[0], labels, pairs) + tuple(args[3:])
        check_against_pml(ours, pml, call, params, dtype)
    with pytest.raises(AssertionError, match="joined"):  # the reference backend joins them, as PML
        fpl.TripletMarginLoss(backend="reference", **kw)(args[0], y, pairs, *args[3:])


def test_pair_tuples_with_nan_what_pml_accepts_and_one_side_empty(monkeypatch):
    """A NaN row gives NaN without joining the pairs; what PML accepts with a pair tuple (it reads
    the tuple only): float labels, ref_emb without ref_labels, labels=None; a tuple without
    negative pairs gives PML's zero loss."""
    from fused_pairloss.losses import triplet_margin
    x, y = inputs(20, 6, 3, torch.float64, seed=16)
    r, _ = inputs(15, 6, 3, torch.float64, seed=18)
    a1, p, a2, n = pml_miners.MultiSimilarityMiner(0.3)(x.detach(), y)
    x_nan = x.detach().clone()
    x_nan[int(a1[0])] = float("nan")
    with monkeypatch.context() as m:
        m.setattr(triplet_margin, "join_on_anchor", None)  # a join would fail
        assert torch.isnan(fpl.TripletMarginLoss()(x_nan, y, (a1, p, a2, n)))
        pairs = (a1, p % 15, a2, n % 15)
        for call in ((x, y.double(), pairs), (x, y, pairs, r), (x, None, pairs, r)):
            check_close(fpl.TripletMarginLoss()(*call), pml_losses.TripletMarginLoss()(*call), what=str(len(call)))
    empty = fpl.TripletMarginLoss()(x, y, (a1, p, a2[:0], n[:0]))
    assert empty.item() == 0 and empty.item() == pml_losses.TripletMarginLoss()(x, y, (a1, p, a2[:0], n[:0])).item()


@pytest.mark.gpu
def test_gpu_pair_tuples_are_counted():
    x, y = inputs(48, 12, 5, torch.float64, seed=17)
    pairs = pml_miners.MultiSimilarityMiner(0.3)(x.detach(), y)
    xc = x.detach().cuda().requires_grad_(True)
    ours, ours_grad = value_and_grads(lambda: fpl.TripletMarginLoss(0.2)(xc, y.cuda(), [t.cuda() for t in pairs]), [xc])
    pml, pml_grad = value_and_grads(lambda: pml_losses.TripletMarginLoss(0.2)(x, y, pairs), [x])
    torch.testing.assert_close(ours.cpu(), pml, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ours_grad[0].cpu(), pml_grad[0], rtol=1e-9, atol=1e-12)
