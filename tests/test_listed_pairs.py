"""Pair losses given a miner's indices_tuple compute over the listed pairs only (ops/listed.py: the
engine's row statistics from the pairs' rows, O(#pairs x D), never N x M), equal to PML's loss with
the same tuple: values and gradients (embeddings and ref_emb), fp32 and fp64, self and ref mode,
labels=None, duplicated pairs (PML's pair-based losses count them, its mat-based ones do not)."""
import pytest
import torch

import fused_pairloss as fpl
from kit import check_close

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
from pytorch_metric_learning.distances import CosineSimilarity, LpDistance  # noqa: E402
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu  # noqa: E402

LOSSES = {
    "MultiSimilarityLoss": {}, "CircleLoss": {}, "SupConLoss": {}, "GeneralizedLiftedStructureLoss": {},
    "ContrastiveLoss": {}, "NTXentLoss": {},
    "NTXentLoss-lp": dict(distance=LpDistance()), "ContrastiveLoss-cos": dict(pos_margin=0.9, neg_margin=0.1,
                                                                             distance=CosineSimilarity()),
    "LiftedStructureLoss": {},
    "LiftedStructureLoss-cos": dict(pos_margin=0.8, neg_margin=0.2, distance=CosineSimilarity()),
    "TupletMarginLoss": dict(scale=16),
    "SignalToNoiseRatioContrastiveLoss": dict(pos_margin=0.3, neg_margin=1.5),
}
MINERS = {
    "multi_similarity": lambda: pml_miners.MultiSimilarityMiner(0.2),
    "pair_margin": lambda: pml_miners.PairMarginMiner(0.6, 0.9),
    "batch_hard": lambda: pml_miners.BatchHardMiner(),
    "triplet_margin": lambda: pml_miners.TripletMarginMiner(0.3),
    "duplicated_pairs": None,
}


def inputs(mode, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(40, 8, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    y = torch.randint(0, 5, (40,), generator=g)
    if mode == "self":
        return x, y, None, None
    r = torch.randn(30, 8, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    return x, y, r, torch.randint(0, 5, (30,), generator=g)


def mined(miner, x, y, r, ry):
    if MINERS[miner] is not None:
        return MINERS[miner]()(x, y, r, ry)
    a1, p, a2, n = lmu.get_all_pairs_indices(y, ry)
    if r is None:  # PML's identity rule: the self pairs are no positives
        keep = a1 != p
        a1, p = a1[keep], p[keep]
    return (torch.cat([a1, a1[:7]]), torch.cat([p, p[:7]]), torch.cat([a2, a2[:5]]), torch.cat([n, n[:5]]))


def module(lib, key):
    return getattr(lib, key.split("-")[0])(**LOSSES[key])


def value_and_grads(loss, x, y, idx, r, ry):
    out = loss(x, y, idx, r, ry)
    wrt = [x] if r is None else [x, r]
    grads = torch.autograd.grad(out, wrt, allow_unused=True)
    return out, [torch.zeros_like(w) if g is None else g for g, w in zip(grads, wrt)]


# fp64 on every miner's tuple, fp32 on two of them
CASES = [(m, torch.float64) for m in MINERS] + [(m, torch.float32) for m in ("multi_similarity", "duplicated_pairs")]


@pytest.mark.parametrize("miner,dtype", CASES, ids=[f"{m}-{str(d)[-7:]}" for m, d in CASES])
@pytest.mark.parametrize("mode", ["self", "ref"])
@pytest.mark.parametrize("loss", list(LOSSES))
def test_listed_pairs_equal_pml(loss, miner, mode, dtype, monkeypatch):
    x, y, r, ry = inputs(mode, dtype)
    idx = mined(miner, x.detach(), y, None if r is None else r.detach(), ry)
    with monkeypatch.context() as m:  # the listed path, not the reference's N x M
        m.setattr(fpl.losses._base._PairLoss, "_reference_with_indices", None)
        ours, grads = value_and_grads(module(fpl.losses, loss), x, y, idx, r, ry)
        ours_unlabelled = module(fpl.losses, loss)(x, None, idx, r, None)
    same, same_grads = value_and_grads(module(pml_losses, loss), x, y, idx, r, ry)
    conv = {id(t): t.detach().double().requires_grad_(True) for t in (x, r) if t is not None}
    x64, r64 = conv[id(x)], None if r is None else conv[id(r)]
    truth, truth_grads = value_and_grads(module(pml_losses, loss), x64, y, idx, r64, ry)
    check_close(ours, truth, same, what="value", dtype=dtype)
    for k, (a, t, b) in enumerate(zip(grads, truth_grads, same_grads)):
        check_close(a, t, b, what=f"grad {k}", dtype=dtype)
    assert torch.equal(ours_unlabelled, ours)  # labels=None: the same sets


def test_one_pair_rule_on_listed_duplicates_is_pmls():
    """PML's one-pair rule counts listed pairs, duplicates included: a mat-based loss given one
    positive pair twice and one negative pair is computed (by the reference), as PML's."""
    x, y, _, _ = inputs("self", torch.float64)
    pos = torch.nonzero(y[:, None] == y[None, :])
    pos = pos[pos[:, 0] != pos[:, 1]][0]
    neg = torch.nonzero(y[:, None] != y[None, :])[0]
    idx = (pos[:1].repeat(2), pos[1:].repeat(2), neg[:1], neg[1:])
    for name in ("MultiSimilarityLoss", "CircleLoss"):
        torch.testing.assert_close(getattr(fpl.losses, name)()(x, y, idx), getattr(pml_losses, name)()(x, y, idx))


def test_indices_from_another_batch_are_named():
    x, y, _, _ = inputs("self", torch.float64)
    idx = pml_miners.MultiSimilarityMiner(0.2)(torch.randn(60, 8, dtype=torch.float64), torch.randint(0, 5, (60,)))
    with pytest.raises(ValueError, match="indices_tuple: .*another batch"):
        fpl.ContrastiveLoss()(x, y, idx)
    with pytest.raises(ValueError, match="indices_tuple: anchors and their partners"):
        fpl.CircleLoss()(x, y, (idx[0], idx[1][:-1], idx[2], idx[3]))
    with pytest.raises(ValueError, match="indices_tuple: .*another batch"):
        fpl.TripletMarginLoss()(x, y, pml_miners.BatchHardMiner()(torch.randn(60, 8, dtype=torch.float64),
                                                                  torch.randint(0, 5, (60,))))


@pytest.mark.parametrize("loss", list(LOSSES) + ["TripletMarginLoss", "MarginLoss", "IntraPairVarianceLoss"])
@pytest.mark.parametrize("mode", ["self", "ref"])
def test_nan_in_a_row_no_listed_pair_reads(loss, mode):
    """NaN in, NaN out (docs/semantics.md) also where the tuple lists no pair of the NaN row: PML
    gives a finite value there for some losses and NaN for others; every loss gives NaN here."""
    x, y, r, ry = inputs(mode, torch.float64)
    idx = pml_miners.MultiSimilarityMiner(0.2)(x[:30], y[:30], *((r, ry) if r is None else (r[:-1], ry[:-1])))
    x = x.detach().clone()
    x[35, 0] = float("nan")
    if r is not None:
        r = r.detach().clone()
        r[-1, 0] = float("nan")
        assert not any(bool((t == len(r) - 1).any()) for t in idx[1::2])  # not listed
    cls, kw = loss.split("-")[0], LOSSES.get(loss, {})
    assert torch.isnan(getattr(fpl, cls)(**kw)(x, y, idx, r, ry))


@pytest.mark.parametrize("lp", [True, False], ids=["lp", "cosine"])
def test_pair_values_gradcheck_and_chunks(lp, monkeypatch):
    """The listed pairs' v (an autograd function over chunks of gathers): gradcheck, self mode (one
    tensor in both roles), several chunks equal to one; gradgradcheck (create_graph's differentiable
    backward)."""
    from fused_pairloss.ops import listed
    g = torch.Generator().manual_seed(3)
    q = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    r = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    rows, cols = torch.randint(0, 7, (30,), generator=g), torch.randint(0, 5, (30,), generator=g)
    torch.autograd.gradcheck(lambda a, b: listed.pair_values(a, b, rows, cols, lp), (q, r))
    torch.autograd.gradcheck(lambda a: listed.pair_values(a, a, rows, cols % 7, lp), (q,))
    whole = listed.pair_values(q, r, rows, cols, lp)
    (gq, gr) = torch.autograd.grad(whole.sum(), (q, r))
    monkeypatch.setattr(listed, "CHUNK_PAIRS", 4)
    parts = listed.pair_values(q, r, rows, cols, lp)
    torch.testing.assert_close(parts, whole, rtol=0, atol=0)
    for a, b in zip(torch.autograd.grad(parts.sum(), (q, r)), (gq, gr)):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-14)
    torch.autograd.gradgradcheck(lambda a, b: listed.pair_values(a, b, rows, cols, lp).pow(2), (q, r))
    torch.autograd.gradgradcheck(lambda a: listed.pair_values(a, a, rows, cols % 7, lp).pow(2), (q,))


@pytest.mark.gpu
@pytest.mark.parametrize("loss", list(LOSSES))
def test_gpu_listed_pairs_equal_pml(loss):
    x, y, r, ry = inputs("ref", torch.float64)
    x, r = x.detach().cuda().requires_grad_(True), r.detach().cuda().requires_grad_(True)
    y, ry = y.cuda(), ry.cuda()
    idx = mined("multi_similarity", x.detach(), y, r.detach(), ry)
    ours, grads = value_and_grads(module(fpl.losses, loss), x, y, idx, r, ry)
    theirs, pml_grads = value_and_grads(module(pml_losses, loss), x, y, idx, r, ry)
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)
    for a, b in zip(grads, pml_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("forward", ["engine_op", "torch"])
@pytest.mark.parametrize("lp", [True, False], ids=["lp", "cosine"])
def test_dense_strips_equal_gathers(lp, forward, monkeypatch):
    """A dense list (rows ascending) goes through row strips of S, a sparse one through row gathers:
    the same values and gradients, duplicates included; and the strip-wise pair count equals
    torch.unique's. With the C++ op the forward takes its own path (its own dense rule; its two
    paths: test_listed_values_are_the_engines_bits) and the backward's strips and gathers are
    compared; with torch's forward both."""
    from fused_pairloss.ops import listed
    if forward == "torch":
        monkeypatch.setattr(listed, "_ENGINE_VALUES_OP", False)
    elif listed.engine_values_op(torch.zeros(1, 1), torch.zeros(1, 1)) is None:
        pytest.skip("fused_pairloss._C (the CPU kernels) not built")
    g = torch.Generator().manual_seed(4)
    q = torch.randn(50, 6, generator=g, dtype=torch.float64, requires_grad=True)
    r = torch.randn(40, 6, generator=g, dtype=torch.float64, requires_grad=True)
    rows = torch.sort(torch.randint(0, 50, (900,), generator=g))[0]
    cols = torch.randint(0, 40, (900,), generator=g)
    out = {}
    for path, fraction in (("dense", 10 ** 9), ("gathers", 0)):
        monkeypatch.setattr(listed, "DENSE_FRACTION", fraction)
        monkeypatch.setattr(listed, "STRIP_ELEMENTS", 7 * 40)  # several strips
        v = listed.pair_values(q, r, rows, cols, lp)
        w = torch.linspace(-1, 1, len(v), dtype=v.dtype)
        out[path] = (v, *torch.autograd.grad((v * w).sum(), (q, r)),
                     *listed.ListedPairs((rows, cols, rows, cols), True, q.device, 50, 40).pos)
    for a, b in zip(out["dense"], out["gathers"]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("loss", ["MultiSimilarityLoss", "ContrastiveLoss", "NTXentLoss", "NTXentLoss-lp",
                                  "LiftedStructureLoss", "TupletMarginLoss"])
@pytest.mark.parametrize("mode", ["self", "ref"])
def test_dense_strips_and_gathers_agree(loss, mode, monkeypatch):
    """A list's pair values from row strips of S (a dense list) and from gathers of its pairs' rows:
    the same statistics, so the same values and gradients."""
    from fused_pairloss.ops import listed
    x, y, r, ry = inputs(mode, torch.float64, seed=3)
    idx = mined("duplicated_pairs", x.detach(), y, None if r is None else r.detach(), ry)
    results = []
    for fraction in (10 ** 9, 0):  # every list dense / none
        monkeypatch.setattr(listed, "DENSE_FRACTION", fraction)
        with monkeypatch.context() as m:  # the listed path, not the reference's N x M
            m.setattr(fpl.losses._base._PairLoss, "_reference_with_indices", None)
            results.append(value_and_grads(module(fpl.losses, loss), x, y, idx, r, ry))
    (a, ga), (b, gb) = results
    check_close(a, b, what="value")
    for k, (u, v) in enumerate(zip(ga, gb)):
        check_close(u, v, what=f"grad {k}")


ISAS = ["avx512", "avx2", "base"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("lp", [True, False], ids=["lp", "cosine"])
def test_listed_values_are_the_engines_bits(lp, dtype, monkeypatch):
    """On CPU a listed pair's v has the bits the engines' tiles hold for it (csrc/cpu/listed_pairs_cpu.cpp),
    so a kink or a margin decides a listed pair as the same loss over the label sets (PML's
    CrossBatchMemory test compares the two): against the triplet engine's u of each row's farthest
    positive and nearest negative (row_extremes), with identical and near-identical rows (the lp near
    pairs' recompute) and a NaN row; a dense list (row strips of the engines' GEMM) and a sparse one
    (pair by pair), on every instruction set this CPU has; pair_values goes through the op."""
    from fused_pairloss.ops import listed, triplets
    extremes = triplets.row_extremes_op(torch.device("cpu"))
    if extremes is None or listed.engine_values_op(torch.zeros(1, 1), torch.zeros(1, 1)) is None:
        pytest.skip("fused_pairloss._C (the CPU kernels) not built")
    g = torch.Generator().manual_seed(11)
    n, m, d = 70, 90, 37
    q = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1).to(dtype)
    r = torch.nn.functional.normalize(torch.randn(m, d, generator=g, dtype=torch.float64), dim=1).to(dtype)
    r[:5] = q[:5]
    r[5:10] = q[5:10] + 1e-3
    q[12] = float("nan")
    lq, lr = torch.randint(0, 4, (n,), generator=g), torch.randint(0, 4, (m,), generator=g)
    rows, cols = (t.reshape(-1) for t in torch.meshgrid(torch.arange(n), torch.arange(m), indexing="ij"))
    sparse = torch.randperm(n * m, generator=g)[:500]
    op, calls = listed._ENGINE_VALUES_OP, []
    monkeypatch.setattr(listed, "_ENGINE_VALUES_OP", lambda *a: calls.append(1) or op(*a))
    before = torch.ops.fused_pairloss.cpu_isa()
    try:
        for isa in ISAS:
            if torch.ops.fused_pairloss.cpu_isa(isa) != isa:
                continue
            pos_u, pos_i, neg_u, neg_i = extremes(q, r, lq, lr, torch.full((n,), -1), lp, True, False)
            dense = listed.pair_values(q, r, rows, cols, lp).view(n, m)
            torch.testing.assert_close(listed.pair_values(q, r, rows[sparse], cols[sparse], lp),
                                       dense.view(-1)[sparse], rtol=0, atol=0, equal_nan=True)
            for u, i in ((pos_u, pos_i), (neg_u, neg_i)):
                has = i >= 0
                v = dense[has.nonzero().squeeze(1), i[has]]
                assert torch.equal(v if lp else -v, u[has]), isa
                assert has.sum() > 60
            assert bool(dense[12].isnan().all()) and not bool(dense[13].isnan().any())
            if lp:
                assert bool((dense[:5, :5].diagonal() == 0).all())
    finally:
        torch.ops.fused_pairloss.cpu_isa(before)
    assert len(calls) >= 2


def test_listed_values_op_check_and_errors():
    from fused_pairloss.ops import listed
    op = listed.engine_values_op(torch.zeros(1, 1), torch.zeros(1, 1))
    if op is None:
        pytest.skip("fused_pairloss._C (the CPU kernels) not built")
    g = torch.Generator().manual_seed(12)
    q, r = torch.randn(9, 5, generator=g, dtype=torch.float64), torch.randn(7, 5, generator=g, dtype=torch.float64)
    rows, cols = torch.randint(0, 9, (20,), generator=g), torch.randint(0, 7, (20,), generator=g)
    for lp in (True, False):
        torch.library.opcheck(torch.ops.fused_pairloss.listed_pair_values.default, (q, r, rows, cols, lp))
    assert op(q, r, rows[:0], cols[:0], True).shape == (0,)
    with pytest.raises(RuntimeError, match="no gradient of its own"):  # pair_values carries the gradient
        op(q.requires_grad_(), r, rows, cols, True).sum().backward()
    q = q.detach()
    with pytest.raises(RuntimeError, match="lies outside"):
        op(q, r, rows, cols + 7, True)
    with pytest.raises(RuntimeError, match="float32 or both float64"):
        op(q, r.float(), rows, cols, True)
    with pytest.raises(RuntimeError, match="int64 vectors of one length"):
        op(q, r, rows, cols[:3], True)


def test_listed_values_the_same_for_any_thread_count():
    """Sizes that run the op's dense strips and its pair-by-pair items on several threads: the
    same bits for 1 to 4 threads."""
    from fused_pairloss.ops import listed
    op = listed.engine_values_op(torch.zeros(1, 1), torch.zeros(1, 1))
    if op is None:
        pytest.skip("fused_pairloss._C (the CPU kernels) not built")
    g = torch.Generator().manual_seed(19)
    q = torch.nn.functional.normalize(torch.randn(600, 16, generator=g), dim=1)
    rows, cols = (t.reshape(-1) for t in torch.meshgrid(torch.arange(600), torch.arange(600), indexing="ij"))
    sparse = torch.randperm(rows.numel(), generator=g)[:300000]
    before = torch.get_num_threads()
    try:
        for lp in (True, False):
            results = []
            for threads in (1, 2, 3, 4):
                torch.set_num_threads(threads)
                results.append((op(q, q, rows, cols, lp), op(q, q, rows[sparse], cols[sparse], lp)))
            for dense, picked in results[1:]:
                assert torch.equal(dense, results[0][0]) and torch.equal(picked, results[0][1]), lp
            assert torch.equal(results[0][1], results[0][0][sparse])
    finally:
        torch.set_num_threads(before)


def test_listed_gradients_the_same_for_any_thread_count():
    """A listed path that gathers rows by the pairs' indices (AngularLoss over a miner's triplets,
    each anchor listed thousands of times): its gradient has the same bits for 1 and 2 threads
    (index_select's backward; x[index]'s adds the repeats in a thread-dependent order)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(96, 16, generator=g)
    labels = torch.randint(0, 6, (96,), generator=g)
    triplets = lmu.get_all_triplets_indices(labels)
    before = torch.get_num_threads()
    try:
        grads = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            e = x.clone().requires_grad_()
            grads.append(torch.autograd.grad(fpl.AngularLoss(backend="auto")(e, labels, triplets), e)[0])
        assert torch.equal(grads[0], grads[1])
    finally:
        torch.set_num_threads(before)
