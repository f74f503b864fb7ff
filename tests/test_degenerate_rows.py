"""Rows where the fused path once gave another loss than PML's (the reference backend did not),
against PML itself (values and gradients, fp64 and fp32, tests/kit.py's rule): NCALoss on a row
of norm <= 1e-12 (no unit row after F.normalize: d^2 = 2 - 2 S does not hold) and with
ref_emb=embeddings and another ref_labels object (PML's rule `query is reference`);
ThresholdConsistentMarginLoss on a row of norm < 1e-8 (F.cosine_similarity's eps, not
F.normalize's 1e-12); SignalToNoiseRatioContrastiveLoss on a constant query row (PML's var / 0:
inf). Self mode, a ref, a miner's indices_tuple and CrossBatchMemory where the loss takes them;
and ordinary batches still fused (the reference function raising).

Also where the fused path's rounding differed from PML's at the dtype's edges: NCA's rows whose
softmax underflows, NTXent's terms below its tiny (and its second order at a low temperature),
SNR's all-constant rows, and the counts PML's AvgNonZeroReducer takes after its own rounding on
realistic two-view batches (SupCon in fp32 and half precision, Circle in fp16), TupletMargin's
near-duplicate positive in fp16."""
import math
import warnings

import pytest
import torch

import fused_pairloss as fpl
from fused_pairloss.losses import nca, snr_contrastive, tcm
from kit import check_close

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_miners = pytest.importorskip("pytorch_metric_learning.miners")

DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])


def rows(n, d, seed, dtype=torch.float64, zero=(), scaled=(), constant=()):
    """A random (n, d) batch with the rows `zero` all 0, `scaled` (row, factor) multiplied, `constant`
    (row, value) all equal to the value."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    for i in zero:
        x[i] = 0
    for i, f in scaled:
        x[i] *= f
    for i, c in constant:
        x[i] = c
    return x.to(dtype)


def value_and_grads(loss, args, params):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the one-time notes of the unfused paths
        out = loss(*args)
    grads = torch.autograd.grad(out, params, allow_unused=True)
    return out, [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def check_against_pml(ours, pml, args, dtype):
    """ours(*args) against pml(*args) in `dtype`, the gradients of the embeddings (and of a ref)
    included, with the kit's rule: PML on the fp64 inputs the truth, PML on the case's the
    same-dtype reference. Returns our value."""
    params = list({id(a): a for a in args if torch.is_tensor(a) and a.is_floating_point()}.values())
    # one input tensor passed twice (ref_emb=embeddings) stays one tensor
    cast = {id(p): p.detach().to(dtype).requires_grad_(True) for p in params}
    cast64 = {id(p): p.detach().double().requires_grad_(True) for p in params}
    args, args64 = [cast.get(id(a), a) for a in args], [cast64.get(id(a), a) for a in args]
    val, grads = value_and_grads(ours, args, list(cast.values()))
    same, same_grads = value_and_grads(pml, args, list(cast.values()))
    truth, truth_grads = value_and_grads(pml, args64, list(cast64.values()))
    check_close(val, truth, same, what="value", dtype=dtype)
    for k, (a, t, b) in enumerate(zip(grads, truth_grads, same_grads)):
        check_close(a, t, b, what=f"grad {k}", dtype=dtype)
    return val


def labels(*ids):
    return torch.tensor(ids)


# ---- NCALoss: a row of norm <= 1e-12 ----------------------------------------------------------------
@DTYPES
def test_nca_zero_row_of_the_issue(dtype):
    x = torch.tensor([[1.0, 0], [0, 0], [0, 1]])
    val = check_against_pml(fpl.NCALoss(), pml_losses.NCALoss(), (x, labels(0, 0, 1)), dtype)
    assert abs(float(val) - 0.503204) < 1e-5


@DTYPES
@pytest.mark.parametrize("where", ["query", "ref", "both"])
@pytest.mark.parametrize("short", ["zero", "1e-13"])
def test_nca_short_rows(where, short, dtype):
    """An all-zero row (normalized: 0) or one of norm ~1e-13 (normalized: norm ~0.1, not 1), in the
    batch (self mode) or in a ref, with PML's default distance and a softmax_scale."""
    y, ry = labels(0, 0, 1, 1, 2, 2, 0, 1), labels(0, 1, 2, 0, 1, 2, 2)
    make = (lambda n, seed, i: rows(n, 5, seed, zero=[i]) if short == "zero" else rows(n, 5, seed, scaled=[(i, 1e-13)]))
    x = make(8, 1, 2) if where in ("query", "both") else rows(8, 5, 1)
    r = make(7, 2, 4) if where in ("ref", "both") else rows(7, 5, 2)
    for kw in ({}, dict(softmax_scale=3)):
        ours, pml = fpl.NCALoss(**kw), pml_losses.NCALoss(**kw)
        if where != "ref":
            check_against_pml(ours, pml, (x, y), dtype)
        check_against_pml(ours, pml, (x, y, None, r, ry), dtype)


@DTYPES
def test_nca_ref_is_the_batch_with_other_label_objects(dtype):
    """ref_emb=embeddings (one tensor as both: PML's `query is reference`) leaves the diagonal out
    whatever ref_labels is: the same labels in another tensor, or other labels; also with a zero row."""
    y = labels(0, 0, 1, 1, 2, 2)
    for x in (rows(6, 4, 0), rows(6, 4, 0, zero=[3])):
        for ry in (y.clone(), labels(0, 1, 1, 2, 2, 0)):
            check_against_pml(fpl.NCALoss(), pml_losses.NCALoss(), (x, y, None, x, ry), dtype)
    torch.manual_seed(0)
    e = torch.randn(6, 4, dtype=torch.float64)
    assert abs(float(fpl.NCALoss()(e, y, ref_emb=e, ref_labels=y.clone())) - 2.52013) < 1e-5  # the issue's


def test_nca_short_rows_with_a_miner_and_in_cross_batch_memory():
    """NCA's indices_tuple (PML's per-row miner weights) and CrossBatchMemory (PML's call) with a
    zero row: PML's values."""
    x, y = rows(10, 5, 3, zero=[4]), labels(0, 1, 2, 0, 1, 2, 0, 1, 2, 0)
    r, ry = rows(7, 5, 4, zero=[1]), labels(0, 1, 2, 0, 1, 2, 0)
    for args in ((x, y), (x, y, None, r, ry)):
        idx = pml_miners.MultiSimilarityMiner(0.3)(*(a for a in args if a is not None))
        full = list(args) + [None] * (5 - len(args))
        full[2] = idx
        check_against_pml(fpl.NCALoss(), pml_losses.NCALoss(), full, torch.float64)
    run_memory(lambda: fpl.NCALoss(), lambda: pml_losses.NCALoss(), zero_row_at=1)


@DTYPES
@pytest.mark.parametrize("softmax_scale", [20, 30, 200])
def test_nca_rows_whose_softmax_underflows_are_dropped_as_pml(softmax_scale, dtype):
    """PML drops a row whose p_i (its softmax, in the input's dtype) underflows to 0: the positive
    40 s logits below the row's maximum (kept at s = 20; dropped at 30 in fp32 only; at 200 in
    both). The same rows are dropped here, in self and ref mode; the values are PML's in that dtype."""
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [1.0, 0.0], [0.6, 0.8]], dtype=dtype)
    y = labels(0, 0, 1, 1)
    for args in ((x, y), (x[:3], y[:3], None, x, y)):
        ours = fpl.NCALoss(softmax_scale=softmax_scale)(*args)
        theirs = pml_losses.NCALoss(softmax_scale=softmax_scale)(*args)
        assert torch.isfinite(theirs)
        assert abs(float(ours) - float(theirs)) <= 1e-5 * (1 + abs(float(theirs)))


# ---- NTXentLoss: pair terms whose sigmoid is below the tiny ------------------------------------------
@pytest.mark.parametrize("dtype,temperature", [(torch.float32, 0.01), (torch.float64, 0.001336)], ids=["fp32", "fp64"])
@pytest.mark.parametrize("how", ["self", "ref", "miner"])
def test_ntxent_terms_below_the_tiny_are_pmls(dtype, temperature, how):
    """A positive about 0.95 in cosine below its row's negatives: at these temperatures t = x_p -
    lse_neg is about -95 (fp32) or -711 (fp64), where PML's e^t is a subnormal and its term
    -log(e^t + tiny) differs from -log(tiny) with a gradient; the fused terms are PML's."""
    import kit

    case, _ = kit.ntxent_below_tiny_case("self", dtype)
    x, y = case.q, case.labels_q
    args = {"self": (x, y), "ref": (x[:5], y[:5], None, x, y),
            "miner": (x, y, pml_miners.MultiSimilarityMiner(0.5)(x, y))}[how]
    ours, ours_grad = value_and_grads(fpl.NTXentLoss(temperature), [a.requires_grad_(True) if a is x else a
                                                                     for a in args], [x])
    theirs, their_grad = value_and_grads(pml_losses.NTXentLoss(temperature), args, [x])
    assert their_grad[0].abs().max() > 1e-3  # the terms in the band carry a gradient
    assert abs(float(ours) - float(theirs)) <= 1e-6 * abs(float(theirs))
    assert (ours_grad[0] - their_grad[0]).abs().max() <= 1e-3 * their_grad[0].abs().max()


@pytest.mark.parametrize("how", ["self", "miner"])
def test_ntxent_second_order_at_a_low_temperature(how):
    """At temperature 0.01 a positive's t reaches about +-100: the Hessian-vector product is PML's
    (finite), on the engine's and the listed pairs' differentiable backward; and the pair term's own
    second derivative is finite for every t."""
    x, y = rows(10, 4, 21), labels(0, 0, 1, 1, 2, 2, 3, 3, 4, 4)
    idx = pml_miners.MultiSimilarityMiner(0.5)(x, y) if how == "miner" else None

    def hvp(loss):
        e = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(loss(e, y, idx), e, create_graph=True)
        return torch.autograd.grad((g * g).sum(), e)[0]

    ours, theirs = hvp(fpl.NTXentLoss(0.01)), hvp(pml_losses.NTXentLoss(0.01))
    assert torch.isfinite(ours).all() and float(theirs.abs().max()) > 1
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-9 * float(theirs.abs().max()))
    from fused_pairloss.ops.operands import ntx_pair_loss
    for dtype in (torch.float32, torch.float64):
        t = torch.linspace(-1000, 1000, 2001, dtype=dtype).requires_grad_(True)
        (g,) = torch.autograd.grad(ntx_pair_loss(t, torch.finfo(dtype).tiny).sum(), t, create_graph=True)
        assert torch.isfinite(torch.autograd.grad(g.sum(), t)[0]).all()


# ---- SupConLoss: rows of one dominant positive ----------------------------------------------------
@pytest.mark.parametrize("temperature,spread", [(0.01, 2.0), (0.02, 2.0), (0.02, 4.0)])
def test_supcon_counts_the_rows_pml_counts(temperature, spread):
    """Two views per class, rows of mixed difficulty: some rows have one positive far above their
    negatives and a loss of 1e-7 to 1e-5, which PML's AvgNonZeroReducer keeps or drops by how its
    max-shifted log-sum-exp rounds. The fused rows are counted by the same rounding
    (docs/semantics.md), so the means agree (they were up to 1% apart on these batches). Where the
    negatives' mass is spread over many terms each below PML's rounding, the order of torch's sum
    decides there, which the fused count does not follow."""
    g = torch.Generator().manual_seed(0)
    n, d = 256, 64
    y = torch.arange(n // 2).repeat_interleave(2)
    centers = torch.nn.functional.normalize(torch.randn(n // 2, d, generator=g), dim=1)
    x = centers[y] + spread * torch.rand(n // 2, generator=g)[y, None] * torch.randn(n, d, generator=g) / d ** 0.5
    pml = pml_losses.SupConLoss(temperature)
    rows_pml = pml.compute_loss(x, y, None, x, y)["loss"]["losses"]
    assert int(((rows_pml > 0) & (rows_pml < 1e-5)).sum()) > 0  # rows at PML's rounding
    ours, theirs = fpl.SupConLoss(temperature)(x, y), pml(x, y)
    assert abs(float(ours) - float(theirs)) <= 1e-5 * float(theirs)


@pytest.mark.parametrize("how", ["bf16_autocast", "fp16_inputs"])
def test_supcon_in_half_precision_counts_the_rows_pml_counts(how):
    """In half precision PML's rounding drops every row whose loss is below about 2^-9 (bf16) or
    2^-12 (fp16) of its z'_p: at temperature 0.05 most rows of this batch. The fused count follows
    it (the mean was 6x PML's in bf16 and 2.7x in fp16 before)."""
    g = torch.Generator().manual_seed(0)
    n, d = 256, 64
    y = torch.arange(n // 2).repeat_interleave(2)
    centers = torch.nn.functional.normalize(torch.randn(n // 2, d, generator=g), dim=1)
    x = centers[y] + torch.rand(n // 2, generator=g)[y, None] * torch.randn(n, d, generator=g) / d ** 0.5
    if how == "fp16_inputs":
        x = x.half()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=how == "bf16_autocast"):
        ours, theirs = fpl.SupConLoss(0.05)(x, y), pml_losses.SupConLoss(0.05)(x, y)
    assert ours.dtype == theirs.dtype
    assert abs(float(ours) - float(theirs)) <= 0.02 * float(theirs)


def _two_view_batch(n, d, level, seed=0):
    """Two views per class around unit class centers, each class with its own noise level in
    [0, level): rows from easy to hard, as in training."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n // 2).repeat_interleave(2)
    centers = torch.nn.functional.normalize(torch.randn(n // 2, d, generator=g), dim=1)
    return centers[y] + level * torch.rand(n // 2, generator=g)[y, None] * torch.randn(n, d, generator=g) / d ** 0.5, y


def test_circle_fp16_counts_the_rows_pml_counts():
    """PML's fp16 row losses below 3e-8 are 0, and its AvgNonZero drops those rows: the fused rows
    (in fp32) are counted the same way (the mean was 0.65 of PML's on this batch)."""
    x, y = _two_view_batch(256, 128, 1.0)
    x = x.half()
    ours, theirs = fpl.CircleLoss()(x, y), pml_losses.CircleLoss()(x, y)
    assert abs(float(ours) - float(theirs)) <= 0.02 * float(theirs)


def test_tuplet_fp16_near_duplicate_positive_is_finite_as_pml():
    """A positive pair's S of the fp16 unit rows, summed in fp32, comes out just above 1 (acos NaN);
    PML's fp16 S rounds to 1. The fused term takes it at 1, as PML's value does."""
    x, y = _two_view_batch(256, 128, 2.0)
    x = x.half()
    q = torch.nn.functional.normalize(x, dim=1).float()
    pos = (y[:, None] == y[None]) & ~torch.eye(len(y), dtype=torch.bool)
    assert float((q @ q.t())[pos].max()) > 1  # the case
    ours, theirs = fpl.TupletMarginLoss()(x, y), pml_losses.TupletMarginLoss()(x, y)
    assert torch.isfinite(ours) and abs(float(ours) - float(theirs)) <= 0.02 * float(theirs)


# ---- ThresholdConsistentMarginLoss: a row of norm < 1e-8 ------------------------------------------
@DTYPES
def test_tcm_short_row_of_the_issue(dtype):
    x = torch.tensor([[1.0, 0], [1e-10, 1e-10], [0, 1]])
    val = check_against_pml(fpl.ThresholdConsistentMarginLoss(), pml_losses.ThresholdConsistentMarginLoss(),
                            (x, labels(0, 0, 1)), dtype)
    assert abs(float(val) - 0.89) < 1e-5


@DTYPES
@pytest.mark.parametrize("short", ["zero", "1e-10", "1e-13"])
def test_tcm_short_rows(short, dtype):
    """Rows below F.cosine_similarity's eps (1e-8): an all-zero row, one of norm ~1e-10 (between the
    two eps) and one of norm ~1e-13 (below both), in self mode and with a ref (PML reads both ends
    from the batch there)."""
    kw = dict(margin_plus=0.6, margin_minus=0.2)
    x = (rows(12, 6, 5, zero=[3]) if short == "zero" else
         rows(12, 6, 5, scaled=[(3, float(short)), (8, float(short))]))
    y = labels(0, 0, 1, 1, 2, 2, 0, 1, 2, 3, 3, 0)
    ours, pml = fpl.ThresholdConsistentMarginLoss(**kw), pml_losses.ThresholdConsistentMarginLoss(**kw)
    check_against_pml(ours, pml, (x, y), dtype)
    check_against_pml(ours, pml, (x, y, None, rows(9, 6, 6), labels(0, 1, 2, 3, 0, 1, 2, 3, 0)), dtype)


@DTYPES
@pytest.mark.parametrize("miner", ["ours", "pml"])
def test_tcm_short_rows_with_a_miner(miner, dtype, monkeypatch):
    """A miner's pairs on a batch with a row of norm ~1e-10: our MultiSimilarityMiner's rule (which
    measured the row as F.normalize makes it) is not applied to TCM's S (the listed pairs are), PML's
    tuple through the listed pairs; PML's miner and loss the truth."""
    monkeypatch.setattr(fpl.losses._base._PairLoss, "ENGINE_PAIR_FRACTION", 0)  # the engine rule for any count
    kw = dict(margin_plus=0.6, margin_minus=0.2)
    x = rows(12, 6, 7)
    x[2] = (x[0] + 0.1 * x[2]) * 1e-10  # a close positive of row 0: mined otherwise on S than on its S / 100
    x = x.to(dtype)
    y = labels(0, 0, 0, 1, 2, 2, 0, 1, 2, 0, 1, 2)
    x_ = x.clone().requires_grad_(True)  # the miner's rule is for the tensor it mined
    idx = (fpl.miners.MultiSimilarityMiner(0.3) if miner == "ours" else pml_miners.MultiSimilarityMiner(0.3))(x_, y)
    pml_idx = pml_miners.MultiSimilarityMiner(0.3)(x, y)
    assert all(torch.equal(a, b) for a, b in zip(idx, pml_idx))
    ours, pml = fpl.ThresholdConsistentMarginLoss(**kw), pml_losses.ThresholdConsistentMarginLoss(**kw)
    val, (g,) = value_and_grads(ours, (x_, y, idx), [x_])
    same, (same_g,) = value_and_grads(pml, (x_, y, pml_idx), [x_])
    x64 = x.double().requires_grad_(True)
    truth, (truth_g,) = value_and_grads(pml, (x64, y, pml_idx), [x64])
    check_close(val, truth, same, what="value", dtype=dtype)
    check_close(g, truth_g, same_g, what="grad", dtype=dtype)


# ---- SignalToNoiseRatioContrastiveLoss: a constant query row ------------------------------------------
@DTYPES
def test_snr_constant_row_of_the_issue(dtype):
    x = torch.tensor([[1.0, 2, 0], [2, 2, 2], [0, 1, 3]])
    val = check_against_pml(fpl.SignalToNoiseRatioContrastiveLoss(), pml_losses.SignalToNoiseRatioContrastiveLoss(),
                            (x, labels(0, 0, 1)), dtype)
    assert float(val) == float("inf")


@DTYPES
@pytest.mark.parametrize("row", ["zero", "constant", "constant_pair"])
def test_snr_constant_query_rows(row, dtype):
    """An all-zero or a constant query row (PML: var(x_i) = 0, d inf, or NaN against another constant
    row, which PML's reducer drops), in self mode and against a ref; a constant row only in the ref
    is an ordinary column (d = 1)."""
    kw = dict(pos_margin=0.3, neg_margin=1.5)
    constant = {"zero": [], "constant": [(2, 0.7)], "constant_pair": [(2, 0.7), (5, -3.0)]}[row]
    x = rows(8, 5, 8, zero=[2] if row == "zero" else [], constant=constant)
    y = labels(0, 1, 1, 2, 0, 1, 2, 0)
    r, ry = rows(6, 5, 9, constant=[(1, 2.0)]), labels(0, 1, 2, 0, 1, 1)
    ours = fpl.SignalToNoiseRatioContrastiveLoss(**kw)
    pml = pml_losses.SignalToNoiseRatioContrastiveLoss(**kw)
    check_against_pml(ours, pml, (x, y), dtype)
    check_against_pml(ours, pml, (x, y, None, r, ry), dtype)
    check_against_pml(ours, pml, (rows(8, 5, 10), y, None, r, ry), dtype)  # only a column constant


@DTYPES
def test_snr_all_rows_constant_is_pmls_zero_loss(dtype):
    """Every row constant: every d is 0 / 0, no term passes PML's AvgNonZeroReducer, so PML returns
    its zero loss on the embeddings, gradient 0 (not NaN through the division)."""
    base = torch.tensor([1.0, -1, 2, 0.5, -3, 1, -0.2, 4], dtype=dtype).view(8, 1)
    y = labels(0, 0, 1, 1, 2, 2, 3, 3)
    for backend in ("auto", "reference"):
        x = base.expand(8, 4).clone().requires_grad_(True)
        loss = fpl.SignalToNoiseRatioContrastiveLoss(backend=backend)(x, y)
        (grad,) = torch.autograd.grad(loss, x)
        assert float(loss) == 0 and torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("mode", ["self", "ref"])
def test_snr_constant_row_with_a_miner(mode, monkeypatch):
    """A miner's tuple (the listed pairs, duplicates counted) on a batch with a constant row."""
    kw = dict(pos_margin=0.3, neg_margin=1.5)
    x, y = rows(10, 5, 11, constant=[(3, 1.0)]), labels(0, 1, 2, 0, 1, 2, 0, 1, 2, 0)
    r, ry = (None, None) if mode == "self" else (rows(7, 5, 12), labels(0, 1, 2, 0, 1, 2, 0))
    for miner in (pml_miners.TripletMarginMiner(0.5), pml_miners.PairMarginMiner(0.2, 0.8)):
        idx = miner(x, y, r, ry)
        with monkeypatch.context() as m:  # the listed pairs' call, not the module's N x M reference
            m.setattr(fpl.losses._base._PairLoss, "_reference_with_indices", None)
            check_against_pml(fpl.SignalToNoiseRatioContrastiveLoss(**kw),
                              pml_losses.SignalToNoiseRatioContrastiveLoss(**kw), (x, y, idx, r, ry),
                              torch.float64)


@pytest.mark.parametrize("masks", [False, True], ids=["all_queued", "enqueue_mask"])
def test_snr_constant_row_in_cross_batch_memory(masks):
    kw = dict(pos_margin=0.3, neg_margin=1.5)
    run_memory(lambda: fpl.SignalToNoiseRatioContrastiveLoss(**kw),
               lambda: pml_losses.SignalToNoiseRatioContrastiveLoss(**kw), constant_row_at=1, masks=masks)


def run_memory(make_ours, make_pml, zero_row_at=None, constant_row_at=None, masks=False, D=5, M=16):
    """fpl.CrossBatchMemory against PML's over four steps (fp64), the step `*_row_at` with a zero or
    constant row (then in the memory for the steps after)."""
    ours, theirs = fpl.CrossBatchMemory(make_ours(), D, M), pml_losses.CrossBatchMemory(make_pml(), D, M)
    g = torch.Generator().manual_seed(13)
    for t, b in enumerate((6, 7, 5, 6)):
        x = torch.randn(b, D, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (b,), generator=g)
        mask = (torch.arange(b) % 2 == 0) if masks else None
        if t == zero_row_at:
            x[1] = 0
        if t == constant_row_at:
            x[1] = 0.4  # a query row also with the enqueue mask (odd rows are the queries)
        results = []
        for xbm in (ours, theirs):
            x_ = x.clone().requires_grad_(True)
            results.append(value_and_grads(lambda *a: xbm(*a), (x_, y, None, mask), [x_]))
        (v, (gx,)), (vp, (gp,)) = results
        check_close(v, vp, what=f"step {t} value")
        check_close(gx, gp, what=f"step {t} grad")
        assert torch.equal(ours.embedding_memory, theirs.embedding_memory)
        if t == constant_row_at:
            assert float(vp) == float("inf")


# ---- ordinary batches stay fused --------------------------------------------------------------------
def test_ordinary_batches_stay_fused(monkeypatch):
    """Without a degenerate row the fused path computes (each reference raises): NCA in self mode,
    with a ref and with ref_emb=embeddings and a copy of the labels; TCM in self mode, also with our
    miner's rule in the engine; SNR in self mode, with a ref holding a constant row and in
    CrossBatchMemory."""
    def refuse(*args, **kwargs):
        raise AssertionError("the reference computed an ordinary batch")

    for module, name in ((nca, "nca_reference"), (tcm, "tcm_reference"),
                         (snr_contrastive, "snr_contrastive_reference")):
        monkeypatch.setattr(module, name, refuse)
    monkeypatch.setattr(fpl.losses._base._PairLoss, "_reference_with_indices", refuse)
    monkeypatch.setattr(fpl.losses._base._PairLoss, "_fused_with_listed_pairs", refuse)
    monkeypatch.setattr(fpl.losses._base._PairLoss, "ENGINE_PAIR_FRACTION", 0)
    x, y = rows(12, 6, 14, scaled=[(1, 1e-6)]), labels(0, 0, 1, 1, 2, 2, 0, 1, 2, 3, 3, 0)
    r, ry = rows(9, 6, 15, constant=[(2, 1.0)]), labels(0, 1, 2, 3, 0, 1, 2, 3, 0)
    for args in ((x, y), (x, y, None, r, ry), (x, y, None, x, y.clone())):
        check_against_pml(fpl.NCALoss(), pml_losses.NCALoss(), args, torch.float64)
    tcm_kw = dict(margin_plus=0.6, margin_minus=0.2)
    check_against_pml(fpl.ThresholdConsistentMarginLoss(**tcm_kw), pml_losses.ThresholdConsistentMarginLoss(**tcm_kw),
                      (x, y), torch.float64)
    x_ = x.clone().requires_grad_(True)
    mined = fpl.miners.MultiSimilarityMiner(0.3)(x_, y)
    assert float(fpl.ThresholdConsistentMarginLoss(**tcm_kw)(x_, y, mined)) == pytest.approx(
        float(pml_losses.ThresholdConsistentMarginLoss(**tcm_kw)(x, y, pml_miners.MultiSimilarityMiner(0.3)(x, y))),
        rel=1e-12)
    snr = (lambda: fpl.SignalToNoiseRatioContrastiveLoss(pos_margin=0.3, neg_margin=1.5),
           lambda: pml_losses.SignalToNoiseRatioContrastiveLoss(pos_margin=0.3, neg_margin=1.5))
    check_against_pml(snr[0](), snr[1](), (x, y), torch.float64)
    check_against_pml(snr[0](), snr[1](), (x, y, None, r, ry), torch.float64)
    run_memory(*snr)


# ---- while torch.compile traces (no sync to look for a degenerate row) --------------------------------
def test_nca_while_compiling_is_exact_on_every_row(monkeypatch):
    """NCA's fused call as torch.compile traces it (no sync): the wider rows for every call, exact
    with or without a short row; ref_emb=embeddings with the labels in another tensor leaves the
    diagonal out. Then compiled (fullgraph) on a batch with a zero row."""
    x, y = rows(8, 5, 16, zero=[2]), labels(0, 0, 1, 1, 2, 2, 0, 1)
    r, ry = rows(7, 5, 17), labels(0, 1, 2, 0, 1, 2, 2)
    with monkeypatch.context() as m:
        m.setattr(fpl._validation, "_compiling", lambda: True)
        for xx in (x, rows(8, 5, 18)):
            for args in ((xx, y), (xx, y, None, r, ry), (xx, y, None, xx, y.clone())):
                check_against_pml(fpl.NCALoss(), pml_losses.NCALoss(), args, torch.float64)
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b: nca.nca_loss(a, b, backend="cpu"), fullgraph=True, backend="aot_eager")
    check_against_pml(compiled, pml_losses.NCALoss(), (x, y), torch.float32)


# ---- ProxyNCALoss: a proxy of norm <= 1e-12 --------------------------------------------------------------
@DTYPES
@pytest.mark.parametrize("distance", [None, "cosine"])
def test_proxy_nca_zero_proxy(distance, dtype, monkeypatch):
    """A zero proxy (no unit row after F.normalize: d^2 = |x|^2 to it) as PML computes it, values and
    the gradients of the embeddings and of the proxies; an ordinary call keeps the engine's own
    normalization (the wider rows raise)."""
    from pytorch_metric_learning.distances import CosineSimilarity
    from fused_pairloss.losses import proxy_nca

    kw = {} if distance is None else dict(distance=CosineSimilarity())
    x, y = rows(10, 6, 19, dtype=dtype), labels(0, 1, 2, 3, 0, 1, 2, 3, 0, 1)
    for zero in ((2,), ()):
        ours, pml = fpl.ProxyNCALoss(4, 6, softmax_scale=3, **kw), pml_losses.ProxyNCALoss(4, 6, softmax_scale=3, **kw)
        ours.proxies.data[list(zero)] = 0
        pml.load_state_dict(ours.state_dict())
        with monkeypatch.context() as m:
            if not zero or distance == "cosine":  # the cosine needs no wider rows
                m.setattr(proxy_nca, "short_proxy_operands", lambda *a: (_ for _ in ()).throw(AssertionError("wide")))
            xo, xp = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
            a, b = ours(xo, y), pml(xp, y)
            a.backward()
            b.backward()
        check_close(a, b, b, what="value", dtype=dtype)
        check_close(xo.grad, xp.grad, xp.grad, what="grad embeddings", dtype=dtype)
        check_close(ours.proxies.grad, pml.proxies.grad, pml.proxies.grad, what="grad proxies", dtype=dtype)


@DTYPES
@pytest.mark.parametrize("pos_margin", [0.0, 0.2])
def test_snr_batch_as_its_own_ref_under_other_label_objects(pos_margin, dtype):
    """ref_emb=embeddings with a copy of the labels: PML's d_ii is exactly 0 (no term, not counted);
    the dot product's is 0 to rounding, so those diagonal positives are left out."""
    x, y = rows(12, 6, 21), labels(0, 0, 1, 1, 2, 2, 0, 1, 2, 3, 3, 0)
    kw = dict(pos_margin=pos_margin, neg_margin=1.5)
    check_against_pml(fpl.SignalToNoiseRatioContrastiveLoss(**kw), pml_losses.SignalToNoiseRatioContrastiveLoss(**kw),
                      (x, y, None, x, y.clone()), dtype)


@pytest.mark.parametrize("ref", [False, True])
def test_snr_listed_own_row_positives(ref):
    """Listed positive pairs (i, i) (a hand-made tuple, or all pairs under a copy of the labels):
    PML's d_ii is exactly 0 (no term at pos_margin 0, not counted); the fused path leaves them out."""
    from pytorch_metric_learning.utils import loss_and_miner_utils as lmu
    x, y = rows(10, 6, 22), labels(0, 0, 1, 1, 2, 2, 0, 1, 2, 0)
    tuples = [(torch.tensor([0, 0, 3]), torch.tensor([0, 1, 2]), torch.tensor([2, 4]), torch.tensor([0, 1])),
              lmu.get_all_pairs_indices(y, y.clone())]
    for idx in tuples:
        args = (x, y, idx, x, y) if ref else (x, y, idx)
        kw = dict(pos_margin=0.0, neg_margin=1.5)
        check_against_pml(fpl.SignalToNoiseRatioContrastiveLoss(**kw),
                          pml_losses.SignalToNoiseRatioContrastiveLoss(**kw), args, torch.float64)


# ---- rows whose norm overflows (fp32: |x| above about 1.8e19; F.normalize makes them zero rows) ----
def _zeroed(x, i):
    x = x.clone()
    x[i] = 0
    return x


@pytest.mark.parametrize("case", ["nca", "nca_ref", "ms_miner_lp", "contrastive_pair_margin_cos",
                                  "circle_pair_margin_lp"])
def test_rows_whose_norm_overflows_are_zero_rows_as_in_pml(case):
    """fp32 rows scaled by 1e20: F.normalize divides them by an infinite norm, to zero rows, in PML
    as in the fused path; PML's fp32 value is the same-dtype reference, PML's fp64 value with the
    rows zeroed the truth (values and the gradients of the embeddings)."""
    from pytorch_metric_learning.distances import CosineSimilarity, LpDistance
    from fused_pairloss import miners as our_miners
    y, ry = labels(0, 1, 2, 0, 1, 2, 0, 1, 2, 0), labels(0, 1, 2, 0, 1, 2, 0)
    x = rows(10, 6, 21, dtype=torch.float32, scaled=[(3, 1e20)])
    r = rows(7, 6, 22, dtype=torch.float32, scaled=[(2, 1e20)])
    loss_name, kw, miner = {
        "nca": ("NCALoss", {}, None), "nca_ref": ("NCALoss", {}, None),
        "ms_miner_lp": ("MultiSimilarityLoss", dict(distance=LpDistance()),
                        lambda: our_miners.MultiSimilarityMiner(0.3)),
        "contrastive_pair_margin_cos": (
            "ContrastiveLoss", {}, lambda: our_miners.PairMarginMiner(0.2, 0.8, distance=CosineSimilarity())),
        "circle_pair_margin_lp": (
            "CircleLoss", {}, lambda: our_miners.PairMarginMiner(0.2, 1.2, distance=LpDistance())),
    }[case]

    def call(lib, x, r):
        loss = getattr(lib, loss_name)(**kw)
        if case == "nca_ref":
            return loss(x, y, None, r, ry)
        return loss(x, y) if miner is None else loss(x, y, miner()(x, y))

    xo, xp = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    x64 = _zeroed(x.double(), 3).requires_grad_(True)
    a, b, t = call(fpl, xo, r), call(pml_losses, xp, r), call(pml_losses, x64, _zeroed(r.double(), 2))
    (ga,), (gb,), (gt,) = (torch.autograd.grad(v, [p]) for v, p in ((a, xo), (b, xp), (t, x64)))
    check_close(a, t, b, what="value", dtype=torch.float32)
    keep = torch.arange(10) != 3  # the overflowing row's own gradient: 1e-20 times the zero row's
    check_close(ga[keep], gt[keep], gb[keep], what="grad", dtype=torch.float32)


def test_proxy_nca_proxy_whose_norm_overflows():
    x, y = rows(10, 6, 23, dtype=torch.float32), labels(0, 1, 2, 3, 0, 1, 2, 3, 0, 1)
    ours, theirs = fpl.ProxyNCALoss(4, 6), pml_losses.ProxyNCALoss(4, 6)
    ours.proxies.data[1] *= 1e20
    theirs.load_state_dict(ours.state_dict())
    truth = pml_losses.ProxyNCALoss(4, 6).double()
    truth.load_state_dict(ours.state_dict())
    truth.proxies.data[1] = 0
    values = [loss(x.to(loss.proxies.dtype), y) for loss in (ours, theirs, truth)]
    check_close(values[0], values[2], values[1], what="value", dtype=torch.float32)


@DTYPES
@pytest.mark.parametrize("short", ["zero", "3e-13"])
def test_proxy_nca_reference_normalizes_once(short, dtype):
    """The reference backend as PML: each side normalized once (a zero row's gradient 1e12 times
    larger, a row of norm < 1e-12 another value, were it normalized twice)."""
    x = rows(10, 6, 24, zero=[3]) if short == "zero" else rows(10, 6, 24, scaled=[(3, 3e-13)])
    y = labels(0, 1, 2, 3, 0, 1, 2, 3, 0, 1)
    for backend in ("reference", "auto"):
        ours, pml = fpl.ProxyNCALoss(4, 6, backend=backend), pml_losses.ProxyNCALoss(4, 6)
        pml.load_state_dict(ours.state_dict())
        check_against_pml(ours, pml, (x, y), dtype)


@DTYPES
@pytest.mark.parametrize("name", ["LargeMarginSoftmaxLoss", "SphereFaceLoss"])
def test_large_margin_row_of_norm_below_eps(name, dtype):
    """A row of norm in (0, 1e-12]: PML's cosine is F.normalize's row's (no unit row), which the
    engine's x . w / (|x| |w|) is not; such a batch is the reference's: PML's gradient."""
    x, y = rows(10, 6, 25, scaled=[(3, 3e-13)]), labels(0, 1, 2, 3, 0, 1, 2, 3, 0, 1)
    ours, pml = getattr(fpl, name)(4, 6), getattr(pml_losses, name)(4, 6)
    pml.load_state_dict(ours.state_dict())
    check_against_pml(ours, pml, (x, y), dtype)
    idx = pml_miners.MultiSimilarityMiner(0.3)(x, y)
    check_against_pml(ours, pml, (x, y, idx), dtype)


# ---- TupletMarginLoss: PML's few-pairs zero with a positive at S = 1 ------------------------------------
@DTYPES
@pytest.mark.parametrize("how", ["listed_own_pair", "ref_copy", "memory_of_one"])
def test_tuplet_margin_few_pairs_zero_has_a_zero_gradient(how, dtype):
    """At most one positive and one negative pair: PML's constant zero, with a zero gradient, also
    when that positive is a row against its copy (S = 1, where acos' derivative is infinite)."""
    torch.manual_seed(0)
    e, b = torch.randn(3, 6, dtype=dtype), torch.randn(1, 6, dtype=dtype)
    results = []
    for lib in (fpl, pml_losses):
        if how == "memory_of_one":
            loss = lib.CrossBatchMemory(lib.TupletMarginLoss(), 6, memory_size=1)
            x = e[:1].clone().requires_grad_(True)
            value = loss(x, labels(0))
        else:
            x = e.clone().requires_grad_(True) if how == "listed_own_pair" else e[:1].clone().requires_grad_(True)
            if how == "listed_own_pair":
                value = lib.TupletMarginLoss()(x, labels(0, 1, 2), (labels(0), labels(0), labels(0), labels(1)))
            else:
                value = lib.TupletMarginLoss()(x, labels(0), ref_emb=torch.cat([e[:1], b]), ref_labels=labels(0, 1))
        second_order = lib is fpl and dtype == torch.float64  # fp32 may round the copy's S above 1 (acos: NaN)
        grad = torch.autograd.grad(value, x, create_graph=second_order)[0]
        if second_order:  # through the unused branch: 0 too, not 0 * inf
            (second,) = torch.autograd.grad((grad + grad ** 2).sum(), x, allow_unused=True)
            assert second is None or (torch.isfinite(second).all() and not second.any())
        results.append((value, grad.detach()))
    (a, ga), (p, gp) = results
    assert float(a) == float(p) == 0.0
    assert torch.equal(ga, gp) and not ga.any()


# ---- SNR: positives that are exact copies of the row (PML's d exactly 0, uncounted) -------------------
@DTYPES
@pytest.mark.parametrize("how", ["ref_clone", "duplicated_rows", "memory_twice", "listed_duplicates",
                                 "listed_ref_clone"])
def test_snr_exact_copies_are_not_counted_as_pml(how, dtype):
    from pytorch_metric_learning.utils import loss_and_miner_utils as lmu
    x = rows(12, 8, 31, dtype=dtype)
    y = labels(0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2)
    if how in ("duplicated_rows", "listed_duplicates"):
        x[5], x[9] = x[2], x[0]
        y[5], y[9] = y[2], y[0]
    if how == "memory_twice":  # the same batch enqueued twice: each query's copy from the step before
        vals = []
        for lib in (fpl, pml_losses):
            memory = lib.CrossBatchMemory(lib.SignalToNoiseRatioContrastiveLoss(), 8, memory_size=64)
            memory(x, y)
            xx = x.clone().requires_grad_(True)
            value = memory(xx, y)
            vals.append((value, torch.autograd.grad(value, xx)[0]))
        (a, ga), (b, gb) = vals
        check_close(a, b, b, what="value", dtype=dtype)
        check_close(ga, gb, gb, what="grad", dtype=dtype)
        return
    if how == "listed_duplicates":  # every pair listed: (a, p) of copies among them
        args = (x, y, lmu.get_all_pairs_indices(y))
    elif how == "listed_ref_clone":  # every pair of the batch against its copy, (i, i) included
        args = (x, y, lmu.get_all_pairs_indices(y, y), x.clone(), y.clone())
    else:
        args = (x, y, None, x.clone(), y.clone()) if how == "ref_clone" else (x, y)
    check_against_pml(fpl.SignalToNoiseRatioContrastiveLoss(), pml_losses.SignalToNoiseRatioContrastiveLoss(),
                      args, dtype)


@pytest.mark.parametrize("how", ["listed", "memory"])
def test_tuplet_pair_without_negatives_has_pmls_zero_gradient(how):
    """A positive pair of a row without negatives adds no term in PML (loss 0, gradient 0), also
    where its cosine rounds above 1 (acos would give NaN): a row against its own copy."""
    g = torch.Generator().manual_seed(3)
    y = torch.zeros(1, dtype=torch.long)
    for _ in range(6):  # the second row's cosine with itself is 1 + 2^-52 in fp64
        x = torch.randn(1, 8, generator=g, dtype=torch.float64)
        grads = []
        for lib in (fpl, pml_losses):
            xx = x.clone().requires_grad_(True)
            if how == "listed":
                idx = (torch.tensor([0]), torch.tensor([0]), torch.tensor([], dtype=torch.long),
                       torch.tensor([], dtype=torch.long))
                value = lib.TupletMarginLoss(scale=16)(xx, y, idx, x.clone(), y)
            else:  # a one-slot memory holding the row's own copy (PML keeps a one-row batch's self pair)
                memory = lib.CrossBatchMemory(lib.TupletMarginLoss(scale=16), 8, memory_size=1)
                value = memory(xx, y)
            grads.append((value, torch.autograd.grad(value, xx)[0]))
        (a, ga), (b, gb) = grads
        assert float(a) == float(b) == 0.0
        assert torch.equal(ga, gb) and not ga.any()


@pytest.mark.parametrize("name", ["SignalToNoiseRatioContrastiveLoss", "IntraPairVarianceLoss",
                                  "ThresholdConsistentMarginLoss", "MultiSimilarityLoss", "NTXentLoss", "CircleLoss",
                                  "SupConLoss"])
@pytest.mark.parametrize("where", ["batch", "ref", "miner", "our_miner", "memory_with_our_miner"])
def test_an_fp16_zero_row_as_pml(name, where):
    """An all-zero fp16 row normalizes to NaN (F.normalize's eps rounds to 0 in fp16), as in PML's
    distances; PML's reducers then drop the NaN terms (SNR) or keep them (NaN), and PML's miners
    drop its pairs. The fused combinations read them otherwise: SNR 2.0 against PML's 2.35,
    IntraPairVariance 0 and TCM a finite loss against PML's NaN; with a miner's rule in the engine
    MultiSimilarity 0.268 against 0.305, NTXent -6e-5 against 4.80, Circle 0 against 46.3; SupCon's
    listed pairs 3.62 against 0."""
    x = rows(12, 6, 0, zero=(2,)).half()
    y = torch.arange(12) % 3
    kwargs, args = {}, ()
    if where == "ref":
        ref = rows(9, 6, 1, zero=(4,)).half()
        kwargs = dict(ref_emb=ref, ref_labels=torch.arange(9) % 3)
    elif where == "miner":
        args = (pml_miners.MultiSimilarityMiner(0.3)(x.float(), y),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if where == "memory_with_our_miner":  # the miner's rule in the memory's fused step, as PML's steps
            if name == "ThresholdConsistentMarginLoss":
                pytest.skip("PML's CrossBatchMemory refuses ThresholdConsistentMarginLoss")
            pml = pml_losses.CrossBatchMemory(getattr(pml_losses, name)(), 6, memory_size=16,
                                              miner=pml_miners.MultiSimilarityMiner(0.1))(x, y)
            for backend in [b for b in ("cpu", "reference") if b in fpl.available_backends("cpu")]:
                ours = fpl.CrossBatchMemory(getattr(fpl, name)(backend=backend), 6, memory_size=16,
                                            miner=fpl.miners.MultiSimilarityMiner(0.1))(x, y)
                torch.testing.assert_close(ours, pml, equal_nan=True, msg=f"{name} {backend}")
            return
        pml = getattr(pml_losses, name)()(x, y, *args, **kwargs)
        if where == "our_miner":  # the miner's rule in the loss's engine, as PML's steps over its pairs
            pml = getattr(pml_losses, name)()(x, y, pml_miners.MultiSimilarityMiner(0.1)(x, y))
            args = (fpl.miners.MultiSimilarityMiner(0.1)(x, y),)
        for backend in [b for b in ("cpu", "reference") if b in fpl.available_backends("cpu")]:
            ours = getattr(fpl, name)(backend=backend)(x, y, *args, **kwargs)
            torch.testing.assert_close(ours, pml, equal_nan=True, msg=f"{name} {backend}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_instance_loss_of_duplicated_half_rows(dtype):
    """Each row twice (one label per row): the copy's logit equals the row's own, so each loss is
    log 2. The own and target logits were computed in the half dtype beside the engine's fp32 S
    (0.7007 where PML gives 0.6934 in fp16)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 8, generator=g).repeat_interleave(2, 0).to(dtype)
    y = torch.arange(12)
    ulp = torch.finfo(dtype).eps / 2  # the spacing of the dtype's numbers in [0.5, 1)
    for loss in (fpl.InstanceLoss(gamma=64), pml_losses.InstanceLoss(gamma=64)):
        assert abs(loss(x, y).item() - math.log(2)) <= ulp, type(loss).__module__


def test_an_fp16_zero_row_with_the_losss_own_miner_epsilon():
    """MultiSimilarityLoss(miner_epsilon): its miner's rule in the engine read an fp16 zero row's NaN
    similarities otherwise than PML's MultiSimilarityMiner (0.268 against 0.305); alone and in
    CrossBatchMemory, PML's value."""
    x = rows(12, 6, 0, zero=(2,)).half()
    y = torch.arange(12) % 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pml = pml_losses.MultiSimilarityLoss()(x, y, pml_miners.MultiSimilarityMiner(1.0)(x, y))
        torch.testing.assert_close(fpl.MultiSimilarityLoss(miner_epsilon=1.0)(x, y), pml, equal_nan=True)
        pml_memory = pml_losses.CrossBatchMemory(pml_losses.MultiSimilarityLoss(), 6, memory_size=16,
                                                 miner=pml_miners.MultiSimilarityMiner(1.0))
        ours_memory = fpl.CrossBatchMemory(fpl.MultiSimilarityLoss(miner_epsilon=1.0), 6, memory_size=16)
        torch.testing.assert_close(ours_memory(x, y), pml_memory(x, y), equal_nan=True)
