"""fpl.CrossBatchMemory against PML's CrossBatchMemory step by step (values, gradients, the memory
buffers, queue_idx, has_been_filled, the miner's records) over a wrap-around, with enqueue_mask,
reset_queue, the MultiSimilarity, PairMargin and TripletMargin miners (PML's and ours; fused: mined
against the memory with the self slot, self comparisons removed after), other miners and explicit
indices_tuple (PML's computation); state_dicts both ways; the fused path's footprint (no B x M
tensor, no column pass for the memory); argument validation."""
import warnings

import pytest
import torch

import fused_pairloss as fpl

pytest.importorskip("pytorch_metric_learning")
from pytorch_metric_learning import distances as Dm  # noqa: E402
from pytorch_metric_learning import losses as L  # noqa: E402
from pytorch_metric_learning import miners  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

D, M = 8, 20
SIZES = (7, 6, 1, 9, 5, 8, 3)  # 7 + 6 + 1 + 9 > 20: wraps in step 4; a one-row batch (PML's rule)
RTOL, ATOL = 1e-9, 1e-12

LOSSES = {
    "ms": (lambda: fpl.MultiSimilarityLoss(), lambda: L.MultiSimilarityLoss()),
    "ms_lp": (lambda: fpl.MultiSimilarityLoss(beta=10, distance=Dm.LpDistance()),
              lambda: L.MultiSimilarityLoss(beta=10, distance=Dm.LpDistance())),
    "circle": (lambda: fpl.CircleLoss(), lambda: L.CircleLoss()),
    "ntxent": (lambda: fpl.NTXentLoss(), lambda: L.NTXentLoss()),
    "ntxent_lp": (lambda: fpl.NTXentLoss(0.2, distance=Dm.LpDistance()),
                  lambda: L.NTXentLoss(0.2, distance=Dm.LpDistance())),
    "supcon": (lambda: fpl.SupConLoss(), lambda: L.SupConLoss()),
    "contrastive_cos": (lambda: fpl.ContrastiveLoss(0.9, 0.1, distance=Dm.CosineSimilarity()),
                        lambda: L.ContrastiveLoss(0.9, 0.1, distance=Dm.CosineSimilarity())),
    # lp with pos_margin 0: a kept self pair (PML's one-row rule) sits on the relu kink at d = 0
    "contrastive": (lambda: fpl.ContrastiveLoss(0.1, 1.0), lambda: L.ContrastiveLoss(0.1, 1.0)),
    "lifted": (lambda: fpl.GeneralizedLiftedStructureLoss(), lambda: L.GeneralizedLiftedStructureLoss()),
    "lifted_cos": (lambda: fpl.GeneralizedLiftedStructureLoss(0.2, 0.8, distance=Dm.CosineSimilarity()),
                   lambda: L.GeneralizedLiftedStructureLoss(0.2, 0.8, distance=Dm.CosineSimilarity())),
    "triplet": (lambda: fpl.TripletMarginLoss(0.2), lambda: L.TripletMarginLoss(0.2)),
    "triplet_cos": (lambda: fpl.TripletMarginLoss(0.1, distance=Dm.CosineSimilarity()),
                    lambda: L.TripletMarginLoss(0.1, distance=Dm.CosineSimilarity())),
    "margin": (lambda: fpl.MarginLoss(0.2, beta=0.9), lambda: L.MarginLoss(0.2, beta=0.9)),
    "margin_cos": (lambda: fpl.MarginLoss(0.1, beta=0.3, distance=Dm.CosineSimilarity()),
                   lambda: L.MarginLoss(0.1, beta=0.3, distance=Dm.CosineSimilarity())),
    "lifted_pairs": (lambda: fpl.LiftedStructureLoss(), lambda: L.LiftedStructureLoss()),
    "tuplet": (lambda: fpl.TupletMarginLoss(scale=16), lambda: L.TupletMarginLoss(scale=16)),
    "angular": (lambda: fpl.AngularLoss(), lambda: L.AngularLoss()),
    "snr": (lambda: fpl.SignalToNoiseRatioContrastiveLoss(pos_margin=0.3, neg_margin=1.5),
            lambda: L.SignalToNoiseRatioContrastiveLoss(pos_margin=0.3, neg_margin=1.5)),
    "nca": (lambda: fpl.NCALoss(softmax_scale=2), lambda: L.NCALoss(softmax_scale=2)),
    "ipv": (lambda: fpl.IntraPairVarianceLoss(0.05, 0.05), lambda: L.IntraPairVarianceLoss(0.05, 0.05)),
}


def batches(seed, sizes=SIZES, masks=False, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    for b in sizes:
        x = torch.randn(b, D, generator=g, dtype=torch.float64).to(dtype)
        y = torch.randint(0, 4, (b,), generator=g)
        m = (torch.rand(b, generator=g) < 0.5) if masks else None
        yield x, y, m


def step(xbm, x, y, mask=None, indices_tuple=None):
    x = x.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        v = xbm(x, y, indices_tuple, mask)
    (g,) = torch.autograd.grad(v, [x], allow_unused=True)
    return v.detach(), (torch.zeros_like(x) if g is None else g)


def same_state(a, b, what):
    assert a.queue_idx == b.queue_idx and a.has_been_filled == b.has_been_filled, what
    torch.testing.assert_close(a.embedding_memory, b.embedding_memory, rtol=0, atol=0, msg=what)
    assert torch.equal(a.label_memory, b.label_memory), what


def run_against_pml(ours, theirs, data, what, rtol=RTOL, atol=ATOL, indices=None):
    for t, (x, y, m) in enumerate(data):
        idx = None if indices is None else indices(x, y)
        v, g = step(ours, x, y, m, idx)
        vp, gp = step(theirs, x, y, m, idx)
        torch.testing.assert_close(v, vp, rtol=rtol, atol=atol, msg=lambda s: f"{what} step {t} value: {s}")
        torch.testing.assert_close(g, gp, rtol=rtol, atol=atol, msg=lambda s: f"{what} step {t} grad: {s}")
        same_state(ours, theirs, f"{what} step {t}")
        same_miner_records(ours, theirs, f"{what} step {t}")


MINER_RECORDS = ("num_pos_pairs", "num_neg_pairs", "num_triplets", "pos_pair_dist", "neg_pair_dist",
                 "avg_triplet_margin")


def same_miner_records(ours, theirs, what):
    """The miner's stats after the step are PML's (the fused step counts without listing); nothing
    to compare where our side has no miner object (a MultiSimilarityLoss's miner_epsilon)."""
    if ours.miner is None or theirs.miner is None:
        return
    for k in MINER_RECORDS:
        mine, pml = getattr(ours.miner, k, None), getattr(theirs.miner, k, None)
        assert (mine is None) == (pml is None), f"{what}: miner.{k} {mine} != {pml}"
        assert pml is None or mine == pytest.approx(pml, rel=1e-9, abs=1e-12, nan_ok=True), \
            f"{what}: miner.{k} {mine} != {pml}"


@pytest.mark.parametrize("name", list(LOSSES))
def test_against_pml_step_by_step(name):
    make_f, make_p = LOSSES[name]
    run_against_pml(fpl.CrossBatchMemory(make_f(), D, M), L.CrossBatchMemory(make_p(), D, M), batches(1), name)


@pytest.mark.parametrize("name", ["ms", "ntxent", "contrastive_cos", "lifted"])
def test_enqueue_mask_and_reset_queue(name):
    make_f, make_p = LOSSES[name]
    ours, theirs = fpl.CrossBatchMemory(make_f(), D, M), L.CrossBatchMemory(make_p(), D, M)
    run_against_pml(ours, theirs, batches(2, masks=True), f"{name} enqueue_mask")
    ours.reset_queue()
    theirs.reset_queue()
    same_state(ours, theirs, "after reset_queue")
    assert ours.queue_idx == 0 and not ours.has_been_filled
    run_against_pml(ours, theirs, batches(3, sizes=(5, 9, 8)), f"{name} after reset_queue")


@pytest.mark.parametrize("distance", ["cosine", "lp"])
@pytest.mark.parametrize("ours_miner", [False, True], ids=["pml_miner", "our_miner"])
def test_multi_similarity_miner_fused(distance, ours_miner):
    """PML's order of operations: MultiSimilarityMiner(eps) mines the batch against the memory,
    its own slot included (it sits in the thresholds), then the self comparisons are removed. The
    miner's num_pos_pairs / num_neg_pairs count that mining, self slots included."""
    dist = (lambda: Dm.LpDistance()) if distance == "lp" else (lambda: Dm.CosineSimilarity())
    make_miner = fpl.miners.MultiSimilarityMiner if ours_miner else miners.MultiSimilarityMiner
    beta = 10 if distance == "lp" else 50
    for eps in (0.1, 0.3):
        ours = fpl.CrossBatchMemory(fpl.MultiSimilarityLoss(beta=beta, distance=dist()), D, M,
                                    miner=make_miner(eps, distance=dist()))
        assert ours._plan(None, torch.device("cpu")) is not None, "the MS miner is fused"
        theirs = L.CrossBatchMemory(L.MultiSimilarityLoss(beta=beta, distance=dist()), D, M,
                                    miner=miners.MultiSimilarityMiner(eps, distance=dist()))
        run_against_pml(ours, theirs, batches(4), f"MS miner {distance} eps={eps}")
        run_against_pml(ours, theirs, batches(5, masks=True), f"MS miner {distance} eps={eps} enqueue_mask")
    # miner_epsilon on the loss means the same as the miner
    ours = fpl.CrossBatchMemory(fpl.MultiSimilarityLoss(beta=beta, miner_epsilon=0.1, distance=dist()), D, M)
    theirs = L.CrossBatchMemory(L.MultiSimilarityLoss(beta=beta, distance=dist()), D, M,
                                miner=miners.MultiSimilarityMiner(0.1, distance=dist()))
    run_against_pml(ours, theirs, batches(6), f"miner_epsilon {distance}")
    # and on the reference backend (PML's steps with that miner, the loss without its own rule)
    ours = fpl.CrossBatchMemory(fpl.MultiSimilarityLoss(beta=beta, miner_epsilon=0.1, distance=dist(),
                                                        backend="reference"), D, M)
    theirs = L.CrossBatchMemory(L.MultiSimilarityLoss(beta=beta, distance=dist()), D, M,
                                miner=miners.MultiSimilarityMiner(0.1, distance=dist()))
    run_against_pml(ours, theirs, batches(6), f"miner_epsilon {distance} reference")


@pytest.mark.parametrize("distance", ["lp", "cosine"])
@pytest.mark.parametrize("ours_miner", [False, True], ids=["pml_miner", "our_miner"])
def test_triplet_margin_miner_fused(distance, ours_miner):
    """TripletMarginMiner (PML's or ours, every type_of_triplets) beside a TripletMarginLoss: PML
    mines the batch against the memory and removes the triplets whose positive is the anchor's own
    slot; the fused op keeps the miner's window and leaves that slot out of the positives. The
    miner's num_triplets (and collect_stats' means) count the mining, self slots included."""
    dist = (lambda: Dm.LpDistance()) if distance == "lp" else (lambda: Dm.CosineSimilarity())
    make_miner = fpl.miners.TripletMarginMiner if ours_miner else miners.TripletMarginMiner
    for t, kind in enumerate(("all", "hard", "semihard", "easy")):
        stats = dict(collect_stats=t % 2 == 1)
        ours = fpl.CrossBatchMemory(fpl.TripletMarginLoss(0.1, distance=dist()), D, M,
                                    miner=make_miner(0.3, type_of_triplets=kind, distance=dist(), **stats))
        assert ours._plan(None, torch.device("cpu")) is not None, "the triplet miner is fused"
        theirs = L.CrossBatchMemory(L.TripletMarginLoss(0.1, distance=dist()), D, M,
                                    miner=miners.TripletMarginMiner(0.3, type_of_triplets=kind, distance=dist(),
                                                                    **stats))
        run_against_pml(ours, theirs, batches(20 + t), f"TripletMarginMiner {kind} {distance}")
        run_against_pml(ours, theirs, batches(30 + t, masks=True), f"TripletMarginMiner {kind} {distance} mask")
    # a miner measuring with another distance than the loss's: PML's computation
    other = Dm.CosineSimilarity() if distance == "lp" else Dm.LpDistance()
    ours = fpl.CrossBatchMemory(fpl.TripletMarginLoss(0.1, distance=dist()), D, M,
                                miner=make_miner(0.3, distance=other))
    assert ours._plan(None, torch.device("cpu")) is None


def copied_batches(seed):
    """Batches whose rows repeat earlier rows under other labels (a sample in two classes)."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(12, D, generator=g, dtype=torch.float64)
    for b in SIZES:
        yield pool[torch.randint(0, 12, (b,), generator=g)], torch.randint(0, 4, (b,), generator=g), None


@pytest.mark.parametrize("kind", ["hard", "semihard"])
@pytest.mark.parametrize("distance", ["lp", "cosine"])
def test_triplet_window_at_zero_with_copies_in_the_memory_is_pmls(kind, distance):
    """A positive and a negative that are copies (the same sample under two labels) sit exactly on
    the "hard" / "semihard" edge at 0, which PML's matrix rounds to either side: the memory takes
    PML's steps then, and equals PML's."""
    dist = (lambda: Dm.LpDistance()) if distance == "lp" else (lambda: Dm.CosineSimilarity())
    ours = fpl.CrossBatchMemory(fpl.TripletMarginLoss(0.05, distance=dist()), D, M,
                                miner=fpl.miners.TripletMarginMiner(0.3, type_of_triplets=kind, distance=dist()))
    theirs = L.CrossBatchMemory(L.TripletMarginLoss(0.05, distance=dist()), D, M,
                                miner=miners.TripletMarginMiner(0.3, type_of_triplets=kind, distance=dist()))
    run_against_pml(ours, theirs, copied_batches(3), f"copies {kind} {distance}", rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("how", ["bfloat16", "autocast"])
def test_a_miner_in_half_precision_is_pmls(how):
    """A miner on half-precision rows (or the cosine under autocast) keeps the pairs of PML's rounded
    matrix: the memory takes PML's steps, the same bits as PML's memory."""
    dtype = torch.bfloat16 if how == "bfloat16" else torch.float32
    loss = dict(distance=Dm.CosineSimilarity(), pos_margin=0.9, neg_margin=0.3)
    ours = fpl.CrossBatchMemory(fpl.ContrastiveLoss(**loss), D, M, miner=fpl.miners.MultiSimilarityMiner(0.1))
    theirs = L.CrossBatchMemory(L.ContrastiveLoss(**loss), D, M, miner=miners.MultiSimilarityMiner(0.1))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=how == "autocast"):
        fused = ours._plan(None, torch.device("cpu"))
        assert fused is not None
        assert ours._plan_for_rows(fused, torch.ones(2, D, dtype=dtype), torch.arange(2),
                                   torch.ones(2, D, dtype=dtype), torch.arange(2)) is None
        # (the listed pairs' terms in fp32, PML's in bf16: the dtype's rounding apart)
        run_against_pml(ours, theirs, batches(4, dtype=dtype), f"half precision {how}", rtol=5e-2, atol=2e-3)


@pytest.mark.parametrize("distance", ["lp", "cosine"])
def test_miner_records_against_zero_rows_and_without_queries(distance):
    """PML's quirk: enqueueing zero rows marks the memory as filled, so its initial zero rows (label 0)
    take part; a batch that is all enqueued has no query (PML's miner mines nothing). The miners'
    records equal PML's there too (the miner margin 1.2 puts the zero rows, at d = 1 from a unit
    row, inside the windows), and with duplicate rows across labels (d = 0 at the hard / semihard
    window edges)."""
    dist = (lambda: Dm.LpDistance()) if distance == "lp" else (lambda: Dm.CosineSimilarity())
    g = torch.Generator().manual_seed(11)
    x = torch.randn(6, D, generator=g, dtype=torch.float64)
    x[3] = x[1]  # a duplicate row under another label
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    steps = [(x, y, torch.zeros(6, dtype=torch.bool)), (x, y, None),
             (x, y, torch.ones(6, dtype=torch.bool)), (x.flip(0), y, torch.arange(6) % 2 == 0)]
    for kind in ("all", "hard", "semihard"):
        for make_loss, make_miner, pml_loss, pml_miner in (
                (fpl.TripletMarginLoss, lambda: fpl.miners.TripletMarginMiner(1.2, type_of_triplets=kind,
                                                                              distance=dist(), collect_stats=True),
                 L.TripletMarginLoss, lambda: miners.TripletMarginMiner(1.2, type_of_triplets=kind, distance=dist(),
                                                                       collect_stats=True)),
                (fpl.MultiSimilarityLoss, lambda: miners.MultiSimilarityMiner(0.5, distance=dist()),
                 L.MultiSimilarityLoss, lambda: miners.MultiSimilarityMiner(0.5, distance=dist()))):
            ours = fpl.CrossBatchMemory(make_loss(distance=dist()), D, M, miner=make_miner())
            theirs = L.CrossBatchMemory(pml_loss(distance=dist()), D, M, miner=pml_miner())
            assert ours._plan(None, torch.device("cpu")) is not None
            for t, (xs, ys, mask) in enumerate(steps):
                ours(xs, ys, enqueue_mask=mask)
                theirs(xs, ys, enqueue_mask=mask)
                same_miner_records(ours, theirs, f"{make_loss.__name__} {kind} {distance} step {t}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("lp", [True, False], ids=["lp", "cosine"])
def test_own_slot_triplet_counts_match_the_ops_distances(lp, dtype):
    """miner_triplet_counts' range of one product per pair against the count on the op's own u
    (ops/triplets.triplet_u, its near-pair rule included): duplicate rows under other labels (d = 0
    at the hard / semihard edges), zero rows (d = 1, not sqrt(2)), NaN rows, every window and
    negative margins."""
    from fused_pairloss.losses.triplet_margin import miner_triplet_counts
    from fused_pairloss.ops.triplets import triplet_u
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(5)
    q = F.normalize(torch.randn(12, D, generator=g, dtype=torch.float64), dim=1).to(dtype)
    r = torch.cat([F.normalize(torch.randn(30, D, generator=g, dtype=torch.float64), dim=1).to(dtype), q,
                   q[:4], torch.zeros(3, D, dtype=dtype)])  # own slots 30..41; copies of rows 0..3; zero rows
    labels_q = torch.randint(0, 4, (12,), generator=g)
    labels_r = torch.cat([torch.randint(0, 4, (30,), generator=g), labels_q, labels_q[:4] + 10,
                          torch.zeros(3, dtype=torch.long)])
    excl = torch.arange(30, 42)
    excl[5] = -1  # a row without an own slot
    q[7, 2] = r[9, 1] = float("nan")  # NaN pairs are in no window
    r[37] = q[7]
    inf = float("inf")
    for window in [(-inf, 0.3), (-inf, 0.0), (0.0, 0.3), (0.3, inf), (-inf, 1.2), (0.0, 1.2), (-inf, -0.1),
                   (-0.1, inf), (0.1, -0.1)]:
        got = miner_triplet_counts(torch.zeros(12, dtype=torch.long), q, r, labels_q, labels_r, excl, lp=lp,
                                   window=window)
        u = triplet_u(q.double(), r.double(), lp)
        u[torch.isnan(q).any(1)] = u[:, torch.isnan(r).any(1)] = float("nan")  # PML: NaN in no window
        rows = torch.arange(12)
        own = u[rows, excl.clamp(min=0)][:, None]
        margin = u - own
        kept = (margin > window[0]) & (margin <= window[1]) & (labels_q[:, None] != labels_r[None, :])
        want = torch.where(excl >= 0, kept.sum(1), 0)
        assert torch.equal(got, want), (window, got.tolist(), want.tolist())


def test_exclusion_after_mining_matters():
    """Rows whose only positive in the memory is their own slot: mined with the self slot in the
    thresholds (PML's order) they keep the negatives above 1 - eps, mined without it none (min_pos
    is +inf). A check that the declaration flag tells the two orders apart."""
    from fused_pairloss.losses import multi_similarity as ms
    from fused_pairloss.ops import stats
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, D, generator=g, dtype=torch.float64)
    y = torch.arange(6) + 10
    mem = torch.cat([torch.randn(10, D, generator=g, dtype=torch.float64), x])
    my = torch.cat([torch.randint(0, 3, (10,), generator=g), y])
    excl = torch.arange(10, 16)
    q, r = F.normalize(x, dim=1), F.normalize(mem, dim=1)
    after = stats.pair_stats(q, r, y, my, excl, ms.declaration(2, 50, 0.5, 1.5, exclude_after_mining=True), "cpu")
    before = stats.pair_stats(q, r, y, my, excl, ms.declaration(2, 50, 0.5, 1.5), "cpu")
    assert before.count_neg.sum() == 0 and after.count_neg.sum() > 0
    assert after.count_pos.sum() == 0  # the self slot is never kept


# (loss, miner): the miner's rule in a pair loss's engine against the memory; margins that cut both
# sets of these batches (D = 8: d about 1.4 +- 0.5, S about 0 +- 0.35)
PAIR_MINER_CASES = {
    # PML's documented setup (LpDistance loss, the miner's default CosineSimilarity(): mined on
    # -d^2 / 2 = S - 1), the loss's pos_margin off the relu kink at d = 0
    "contrastive+ms_default": (lambda m: m.ContrastiveLoss(0.1, 1.0), lambda m: m.MultiSimilarityMiner(0.1)),
    "contrastive+ms": (lambda m: m.ContrastiveLoss(0.1, 1.0),
                       lambda m: m.MultiSimilarityMiner(0.1, distance=Dm.LpDistance())),
    "contrastive_cos+ms": (lambda m: m.ContrastiveLoss(0.9, 0.1, distance=Dm.CosineSimilarity()),
                           lambda m: m.MultiSimilarityMiner(0.2)),
    "circle+ms": (lambda m: m.CircleLoss(), lambda m: m.MultiSimilarityMiner(0.1)),
    "ntxent_lp+ms": (lambda m: m.NTXentLoss(0.2, distance=Dm.LpDistance()),
                     lambda m: m.MultiSimilarityMiner(0.3, distance=Dm.LpDistance())),
    "contrastive+margins": (lambda m: m.ContrastiveLoss(0.1, 1.0), lambda m: m.PairMarginMiner(1.0, 1.5)),
    "contrastive_cos+margins": (lambda m: m.ContrastiveLoss(0.9, 0.1, distance=Dm.CosineSimilarity()),
                                lambda m: m.PairMarginMiner(0.3, -0.1, distance=Dm.CosineSimilarity())),
    "supcon+margins": (lambda m: m.SupConLoss(),
                       lambda m: m.PairMarginMiner(0.2, -0.2, distance=Dm.CosineSimilarity())),
    "ms_lp+margins": (lambda m: m.MultiSimilarityLoss(beta=10, distance=Dm.LpDistance()),
                      lambda m: m.PairMarginMiner(1.0, 1.5)),
    "lifted+margins": (lambda m: m.GeneralizedLiftedStructureLoss(), lambda m: m.PairMarginMiner(0.8, 1.6)),
    "margin+margins": (lambda m: m.MarginLoss(0.2, beta=0.9), lambda m: m.PairMarginMiner(1.0, 1.5)),
    # PairMarginMiner with the other distance: its margins moved through d^2 = 2 - 2 S
    "ms+margins_lp": (lambda m: m.MultiSimilarityLoss(), lambda m: m.PairMarginMiner(1.0, 1.5)),
    "contrastive+margins_cos": (lambda m: m.ContrastiveLoss(0.1, 1.0),
                                lambda m: m.PairMarginMiner(0.3, -0.1, distance=Dm.CosineSimilarity())),
    # windows that hold the own slot (d = 0, S = 1): the miner counts it, the loss leaves it out
    "contrastive+margins_own_slot": (lambda m: m.ContrastiveLoss(0.1, 1.0), lambda m: m.PairMarginMiner(-0.5, 1.5)),
    "ntxent+margins_own_slot": (lambda m: m.NTXentLoss(), lambda m: m.PairMarginMiner(1.5, 0.1,
                                                                                       distance=Dm.CosineSimilarity())),
}


@pytest.mark.parametrize("case", list(PAIR_MINER_CASES))
@pytest.mark.parametrize("ours_miner", [False, True], ids=["pml_miner", "our_miner"])
def test_pair_miner_rule_fused_against_the_memory(case, ours_miner):
    """MultiSimilarityMiner beside a pair loss other than MultiSimilarityLoss, and PairMarginMiner
    beside any pair loss that fuses their rules: the miner's rule in the engine against the memory
    (MS: the self slot in the thresholds, removed after; PairMargin: the self slot left out), and the
    miner's num_pos_pairs / num_neg_pairs PML's, self slots included."""
    make_loss, make_miner = PAIR_MINER_CASES[case]
    ours = fpl.CrossBatchMemory(make_loss(fpl.losses), D, M, miner=make_miner(fpl.miners if ours_miner else miners))
    assert ours._plan(None, torch.device("cpu")) is not None, "the miner's rule is fused"
    theirs = L.CrossBatchMemory(make_loss(L), D, M, miner=make_miner(miners))
    run_against_pml(ours, theirs, batches(8), case)
    assert 0 < theirs.miner.num_pos_pairs and 0 < theirs.miner.num_neg_pairs < 8 * M, "the miner keeps and drops pairs"
    run_against_pml(ours, theirs, batches(15, masks=True), f"{case} enqueue_mask")


@pytest.mark.parametrize("case", ["contrastive+ms_cos", "ms+margins_lp"])
def test_miner_with_the_other_distance_and_a_zero_row_is_pml_computation(case):
    """A zero row stays zero under PML's normalize, so d^2 = 2 - 2 S fails for its pairs (a cosine
    MultiSimilarityMiner beside an lp loss mines on -d^2 / 2 = S - 1, a PairMarginMiner's margins
    move through it): that step is PML's computation (a zero query, then a zero row in the memory),
    the others fused. (The zero row's d = 1 to every unit row: ContrastiveLoss's neg_margin and the
    PairMarginMiner's margins off it.)"""
    make_loss, make_miner = {
        "contrastive+ms_cos": (lambda m: m.ContrastiveLoss(0.1, 1.2), lambda m: m.MultiSimilarityMiner(0.1)),
        "ms+margins_lp": (lambda m: m.MultiSimilarityLoss(), lambda m: m.PairMarginMiner(1.1, 1.5))}[case]
    ours = fpl.CrossBatchMemory(make_loss(fpl.losses), D, M, miner=make_miner(fpl.miners))
    theirs = L.CrossBatchMemory(make_loss(L), D, M, miner=make_miner(miners))
    data = list(batches(16))
    data[1][0][2] = 0
    seen = []
    fused = ours._fused
    ours._fused = lambda *a, **k: seen.append(True) or fused(*a, **k)
    run_against_pml(ours, theirs, data, "zero row")
    # fused: step 0, and steps 5 and 6 after the ring buffer overwrote the zero row's slot
    assert len(seen) == 3 and bool((ours.embedding_memory.norm(dim=1) > 0).all())


def test_other_miners_and_indices_tuple_are_pml_computation():
    # PairMarginMiner collecting stats (PML's means over all pairs), a miner beside a loss that does
    # not fuse its rule
    for make_loss, make_miner in ((lambda m: m.ContrastiveLoss(), lambda: miners.PairMarginMiner(0.3, 0.7,
                                                                                                 collect_stats=True)),
                                  (lambda m: m.AngularLoss(), lambda: miners.MultiSimilarityMiner(0.1))):
        ours = fpl.CrossBatchMemory(make_loss(fpl.losses), D, M, miner=make_miner())
        assert ours._plan(None, torch.device("cpu")) is None
        theirs = L.CrossBatchMemory(make_loss(L), D, M, miner=make_miner())
        run_against_pml(ours, theirs, batches(8), type(ours.miner).__name__)
    # an explicit indices_tuple (pairs into the memory: here each row with its own new slot) is
    # concatenated to the memory's pairs
    ours = fpl.CrossBatchMemory(fpl.MultiSimilarityLoss(), D, M)
    theirs = L.CrossBatchMemory(L.MultiSimilarityLoss(), D, M)

    def own_slots(x, y):
        a = torch.arange(len(y))
        return a, (theirs.queue_idx + a) % M, a[:0], a[:0]

    run_against_pml(ours, theirs, batches(9), "indices_tuple", indices=own_slots)
    # a PML loss object inside ours: PML's computation
    run_against_pml(fpl.CrossBatchMemory(L.TripletMarginLoss(), D, M), L.CrossBatchMemory(L.TripletMarginLoss(), D, M),
                    batches(10), "TripletMarginLoss")
    # the reference backend: PML's computation with the reference loss
    run_against_pml(fpl.CrossBatchMemory(fpl.CircleLoss(backend="reference"), D, M),
                    L.CrossBatchMemory(L.CircleLoss(), D, M), batches(11), "reference backend")


def test_float32():
    ours = fpl.CrossBatchMemory(fpl.MultiSimilarityLoss(), D, M)
    theirs = L.CrossBatchMemory(L.MultiSimilarityLoss(), D, M)
    run_against_pml(ours, theirs, batches(12, dtype=torch.float32), "fp32", rtol=1e-4, atol=1e-5)
    assert ours.embedding_memory.dtype == torch.float32


def test_state_dict_both_ways():
    ours = fpl.CrossBatchMemory(fpl.MultiSimilarityLoss(), D, M)
    theirs = L.CrossBatchMemory(L.MultiSimilarityLoss(), D, M)
    assert set(ours.state_dict()) == set(theirs.state_dict()) == {"embedding_memory", "label_memory"}
    for x, y, _ in batches(13, sizes=(6, 5), dtype=torch.float32):
        step(theirs, x, y)
    ours.load_state_dict(theirs.state_dict())
    assert torch.equal(ours.embedding_memory, theirs.embedding_memory)
    ours.queue_idx, ours.has_been_filled = theirs.queue_idx, theirs.has_been_filled
    run_against_pml(ours, theirs, batches(14, sizes=(4, 8), dtype=torch.float32), "after loading PML's state",
                    rtol=1e-4, atol=1e-5)
    fresh = L.CrossBatchMemory(L.MultiSimilarityLoss(), D, M)
    fresh.load_state_dict(ours.state_dict())
    assert torch.equal(fresh.label_memory, ours.label_memory)


class _Watch(TorchDispatchMode):
    """The largest tensor any op creates, and the need_grad_r of every pair-engine backward."""

    def __init__(self):
        super().__init__()
        self.biggest, self.need_grad_r = 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if "pair_engine_backward" in str(func):
            self.need_grad_r.append(args[-1])
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor):
                self.biggest = max(self.biggest, t.numel())
        return out


@pytest.mark.parametrize("loss", ["ms", "ms_miner", "supcon"])
def test_fused_footprint(loss):
    """A full memory of 1024 rows, batch 64: nothing of B x M elements (the largest tensor is
    the memory, M x D), and the backward skips the memory's column pass."""
    Mbig, B, d = 1024, 64, 8
    miner = miners.MultiSimilarityMiner(0.1) if loss == "ms_miner" else None
    inner = fpl.SupConLoss() if loss == "supcon" else fpl.MultiSimilarityLoss()
    xbm = fpl.CrossBatchMemory(inner, d, Mbig, miner=miner)
    g = torch.Generator().manual_seed(0)
    for _ in range(Mbig // B):
        xbm(torch.randn(B, d, generator=g), torch.randint(0, 10, (B,), generator=g))
    assert xbm.has_been_filled
    x = torch.randn(B, d, generator=g, requires_grad=True)
    y = torch.randint(0, 10, (B,), generator=g)
    w = _Watch()
    with w:
        v = xbm(x, y)
        v.backward()
    assert w.biggest <= Mbig * d < B * Mbig, w.biggest
    assert w.need_grad_r == [False]
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_validation():
    xbm = fpl.CrossBatchMemory(fpl.MultiSimilarityLoss(), D, 8)
    x, y = torch.randn(5, D), torch.randint(0, 3, (5,))
    with pytest.raises(ValueError, match="embedding_size"):
        xbm(torch.randn(5, D + 1), y)
    with pytest.raises(ValueError, match="labels"):
        xbm(x, y[:4])
    with pytest.raises(ValueError, match="indices_tuple and enqueue_mask"):
        xbm(x, y, (y, y, y), torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="memory_size"):
        xbm(torch.randn(9, D), torch.randint(0, 3, (9,)))
    with pytest.raises(ValueError, match="memory_size"):
        xbm(torch.randn(12, D), torch.randint(0, 3, (12,)), enqueue_mask=torch.ones(12, dtype=torch.bool))
    with pytest.raises(TypeError, match="enqueue_mask"):
        xbm(x, y, enqueue_mask=torch.ones(5))
    with pytest.raises(ValueError, match="enqueue_mask"):
        xbm(x, y, enqueue_mask=torch.ones(4, dtype=torch.bool))
    with pytest.raises(TypeError, match="loss"):
        fpl.CrossBatchMemory(fpl.SoftTripleLoss(3, D), D)
    with pytest.raises(ValueError, match="memory_size"):
        fpl.CrossBatchMemory(fpl.MultiSimilarityLoss(), D, 0)
    with pytest.raises(TypeError, match="embedding_size"):
        fpl.CrossBatchMemory(fpl.MultiSimilarityLoss(), 8.0)
    for miner in (miners.MultiSimilarityMiner(), miners.PairMarginMiner(distance=Dm.CosineSimilarity())):
        both = fpl.CrossBatchMemory(fpl.MultiSimilarityLoss(miner_epsilon=0.1), D, 8, miner=miner)
        with pytest.raises(ValueError, match=f"miner={type(miner).__name__}.*miner_epsilon"):
            both(x, y)
    assert xbm.queue_idx == 0, "a rejected call does not touch the memory"


def test_float_and_bool_labels_as_pml():
    """PML keeps float / bool labels (compared with ==); ours keeps them as int64 (whole numbers; any
    other float is refused, naming labels): the same steps."""
    for convert in (lambda y: y.double(), lambda y: y == 0):
        ours, theirs = fpl.CrossBatchMemory(fpl.ContrastiveLoss(), D, M), L.CrossBatchMemory(L.ContrastiveLoss(), D, M)
        for t, (x, y, _) in enumerate(batches(3)):
            v, g = step(ours, x, convert(y))
            vp, gp = step(theirs, x, convert(y))
            torch.testing.assert_close(v, vp, rtol=RTOL, atol=ATOL)
            torch.testing.assert_close(g, gp, rtol=RTOL, atol=ATOL)
            assert torch.equal(ours.label_memory, theirs.label_memory.long()), f"step {t}"
    with pytest.raises(ValueError, match="labels"):
        fpl.CrossBatchMemory(fpl.ContrastiveLoss(), D, M)(torch.randn(3, D), torch.tensor([0.5, 1.0, 2.0]))


DISTANCE_STATS = ("initial_avg_query_norm", "initial_avg_ref_norm", "final_avg_query_norm", "final_avg_ref_norm")


@pytest.mark.parametrize("name", ["ContrastiveLoss", "MultiSimilarityLoss", "TripletMarginLoss"])
def test_distances_collecting_stats_record_pmls(name):
    """The loss's and the miner's distances with collect_stats, on the fused step: the stats of
    PML's steps (the query rows against the memory)."""
    sides = []
    for losses, miner_cls, memory in ((fpl, fpl.miners.TripletMarginMiner, fpl.CrossBatchMemory),
                                      (L, miners.TripletMarginMiner, L.CrossBatchMemory)):
        loss = getattr(losses, name)(distance=Dm.LpDistance(collect_stats=True))
        miner = miner_cls(0.3, distance=Dm.LpDistance(collect_stats=True))
        xbm = memory(loss, D, memory_size=16, miner=miner if name == "TripletMarginLoss" else None)
        for x, y, _ in batches(51):
            step(xbm, x * 3, y)
        sides.append([getattr(d, s) for d in (loss.distance, miner.distance) for s in DISTANCE_STATS])
    assert sides[0] == pytest.approx(sides[1], rel=1e-12)


def test_miner_epsilon_with_a_reducer_as_pmls_miner():
    """MultiSimilarityLoss(miner_epsilon=e) computed by PML (a reducer): PML's memory with
    MultiSimilarityMiner(e); the module keeps its miner_epsilon."""
    from pytorch_metric_learning import reducers
    ours = fpl.CrossBatchMemory(fpl.MultiSimilarityLoss(miner_epsilon=0.1, reducer=reducers.SumReducer()), D,
                                memory_size=16)
    theirs = L.CrossBatchMemory(L.MultiSimilarityLoss(reducer=reducers.SumReducer()), D, memory_size=16,
                                miner=miners.MultiSimilarityMiner(0.1))
    run_against_pml(ours, theirs, batches(52), "miner_epsilon with a reducer")
    assert ours.loss.miner_epsilon == 0.1
