"""Our miners (fused_pairloss/_miners.py: PML's classes mined in chunks of rows) against PML's own:
the same index tuples in the same order, the same recorded stats; TripletMarginMiner's result fused
by TripletMarginLoss (the list not read) equal to PML's miner + loss in values, gradients and
num_triplets; and our miners' tuples inside our losses and PML's."""
import copy

import math

import pytest
import torch

import fused_pairloss as fpl

pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
from pytorch_metric_learning.distances import CosineSimilarity, LpDistance  # noqa: E402

from fused_pairloss import _miners, miners  # noqa: E402
from kit import check_close  # noqa: E402

# ref_without_labels: PML reads a ref_emb without ref_labels with the labels (`ref_labels is labels`)
MODES = ["self", "ref", "ref_is_labels", "ref_without_labels"]


def batch(mode, n=48, d=12, classes=5, seed=0, dtype=torch.float64):
    """Embeddings, labels and the ref arguments of a mode (None, None in self mode)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    y = torch.randint(0, classes, (n,), generator=g)
    if mode == "self":
        return x, y, None, None
    r = torch.randn(n + 7 if mode == "ref" else n, d, generator=g, dtype=torch.float64).to(dtype)
    ry = {"ref": torch.randint(0, classes, (len(r),), generator=g), "ref_is_labels": y}.get(mode)
    return x, y, r.requires_grad_(True), ry


MINER_CASES = [
    ("PairMarginMiner", {}),
    ("PairMarginMiner", dict(pos_margin=0.5, neg_margin=0.4, distance=CosineSimilarity())),
    ("MultiSimilarityMiner", {}),
    ("MultiSimilarityMiner", dict(epsilon=0.3, distance=LpDistance())),
    ("BatchHardMiner", {}),
    ("BatchHardMiner", dict(distance=CosineSimilarity())),
    ("BatchEasyHardMiner", {}),
    ("BatchEasyHardMiner", dict(pos_strategy="hard", neg_strategy="semihard", distance=CosineSimilarity())),
    ("BatchEasyHardMiner", dict(pos_strategy="semihard", neg_strategy="easy")),
    ("BatchEasyHardMiner", dict(pos_strategy="all", neg_strategy="hard")),
    ("BatchEasyHardMiner", dict(pos_strategy="easy", neg_strategy="all", allowed_pos_range=(0.2, 1.5))),
    ("BatchEasyHardMiner", dict(pos_strategy="all", neg_strategy="all")),
    ("TripletMarginMiner", dict(margin=0.3, type_of_triplets="semihard")),
    ("TripletMarginMiner", dict(margin=0.1, type_of_triplets="hard", distance=CosineSimilarity())),
]


def case_id(case):
    name, kw = case
    return name + "-" + "-".join(f"{k}={v if not hasattr(v, 'is_inverted') else type(v).__name__}"
                                 for k, v in kw.items())


@pytest.fixture
def small_chunks(monkeypatch):
    """Several chunks of rows on the tests' small batches."""
    monkeypatch.setattr(_miners, "CHUNK_ELEMENTS", 7 * 64)
    monkeypatch.setattr(_miners, "TRIPLET_CHUNK_ELEMENTS", 5 * 64 * 20)


DISTANCE_STATS = ["initial_avg_query_norm", "initial_avg_ref_norm", "final_avg_query_norm", "final_avg_ref_norm"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", MINER_CASES, ids=case_id)
def test_miner_tuples_equal_pml(case, mode, small_chunks):
    """The tuples and the miner's stats; the stats of its distance (collect_stats: the norms of all
    rows, which our miners measure in chunks)."""
    name, kw = case
    x, y, r, ry = batch(mode)
    x = x * (1 + torch.arange(len(x), dtype=x.dtype)[:, None])  # rows of other norms in each chunk
    ours, theirs = getattr(miners, name)(**kw), getattr(pml_miners, name)(**kw)
    for miner in (ours, theirs):
        miner.distance = copy.deepcopy(miner.distance)  # not the case's shared object
        miner.distance.collect_stats = True
    assert isinstance(ours, getattr(pml_miners, name)) and ours is not theirs
    a, b = ours(x, y, r, ry), theirs(x, y, r, ry)
    assert len(a) == len(b)
    for k, (s, t) in enumerate(zip(a, b)):
        assert torch.equal(s, t), f"{name}: element {k}"
    for stat in ("num_pos_pairs", "num_neg_pairs", "num_triplets"):
        assert getattr(ours, stat, None) == getattr(theirs, stat, None), stat
    for stat in DISTANCE_STATS:
        assert getattr(ours.distance, stat) == pytest.approx(getattr(theirs.distance, stat), rel=1e-12), stat


@pytest.mark.parametrize("case", [c for c in MINER_CASES if c[0] != "MultiSimilarityMiner"], ids=case_id)
def test_collect_stats_equal_pml(case, small_chunks):
    name, kw = case
    x, y, _, _ = batch("self", seed=3)
    ours = getattr(miners, name)(collect_stats=True, **kw)
    theirs = getattr(pml_miners, name)(collect_stats=True, **kw)
    ours(x, y), theirs(x, y)
    for stat in theirs._record_these_stats:
        torch.testing.assert_close(torch.tensor(float(getattr(ours, stat))),
                                   torch.tensor(float(getattr(theirs, stat))), rtol=1e-12, atol=1e-12, msg=stat)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("distance", ["lp", "cosine"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("type_of_triplets", ["all", "hard", "semihard", "easy"])
def test_triplet_miner_fused_into_triplet_loss(type_of_triplets, mode, distance, dtype, monkeypatch):
    """Our TripletMarginMiner + TripletMarginLoss: the window in the op (the listed path is not
    taken), PML's miner + loss's value and gradients (fp64 PML the truth, PML in the dtype the
    reference) and num_triplets."""
    x, y, r, ry = batch(mode, seed=5, dtype=dtype)
    dist = {} if distance == "lp" else dict(distance=CosineSimilarity())
    mm, lm = (0.3, 0.2) if distance == "lp" else (0.15, 0.1)
    params = [x] if r is None else [x, r]

    def run(lib_miners, lib_losses, inputs):
        miner = lib_miners.TripletMarginMiner(margin=mm, type_of_triplets=type_of_triplets, **dist)
        xx, yy, rr, rry = inputs
        mined = miner(xx, yy, rr, rry)
        loss = lib_losses.TripletMarginLoss(margin=lm, **dist)(xx, yy, mined, rr, rry)
        wrt = [xx] if rr is None else [xx, rr]
        grads = torch.autograd.grad(loss, wrt, allow_unused=True)  # PML's zero loss may not reach ref_emb
        grads = [torch.zeros_like(w) if g is None else g for g, w in zip(grads, wrt)]
        return loss, grads, miner.num_triplets, mined

    with monkeypatch.context() as m:
        m.setattr(fpl.TripletMarginLoss, "_reference_with_indices", None)  # the listed triplets' path
        loss, grads, count, mined = run(miners, fpl.losses, (x, y, r, ry))
    same, same_grads, pml_count, pml_mined = run(pml_miners, pml_losses, (x, y, r, ry))
    conv = {id(p): p.detach().double().requires_grad_(True) for p in params}
    inputs64 = (conv[id(x)], y, None if r is None else conv[id(r)], ry)
    truth, truth_grads, _, _ = run(pml_miners, pml_losses, inputs64)
    if dtype == torch.float64:
        assert count == pml_count == len(pml_mined[0])
    check_close(loss, truth, same, what="value", dtype=dtype)
    for k, (a, t, b) in enumerate(zip(grads, truth_grads, same_grads)):
        check_close(a, t, b, what=f"grad {k}", dtype=dtype)


def test_mined_triplets_is_pmls_tuple_to_anything_else():
    """A real tuple: PML's losses (their reducers check for a tuple) and our loss on other inputs
    (then from the list) see PML's (a, p, n)."""
    x, y, _, _ = batch("self", seed=6)
    ours, theirs = miners.TripletMarginMiner(margin=0.2), pml_miners.TripletMarginMiner(margin=0.2)
    mined, listed = ours(x, y), theirs(x, y)
    assert isinstance(mined, tuple) and len(mined) == 3 and ours.num_triplets == theirs.num_triplets
    assert all(torch.equal(s, t) for s, t in zip(mined, listed)) and torch.equal(torch.cat(mined), torch.cat(listed))
    for loss in (pml_losses.ContrastiveLoss(), pml_losses.MarginLoss()):
        torch.testing.assert_close(loss(x, y, mined), loss(x, y, listed))
    x2 = x.detach().clone().requires_grad_(True)  # other embeddings: not fused, the listed triplets are used
    torch.testing.assert_close(fpl.TripletMarginLoss(0.1)(x2, y, mined),
                               pml_losses.TripletMarginLoss(0.1)(x2, y, listed))


@pytest.mark.parametrize("name", ["PairMarginMiner", "MultiSimilarityMiner", "BatchHardMiner",
                                  "BatchEasyHardMiner"])
def test_miner_tuples_in_our_losses_equal_pml(name):
    x, y, _, _ = batch("self", seed=7)
    for loss in ("ContrastiveLoss", "TripletMarginLoss", "MultiSimilarityLoss"):
        ours = getattr(fpl.losses, loss)()(x, y, getattr(miners, name)()(x, y))
        theirs = getattr(pml_losses, loss)()(x, y, getattr(pml_miners, name)()(x, y))
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12, msg=f"{name} + {loss}")


def test_bad_type_of_triplets_is_named():
    with pytest.raises(ValueError, match="type_of_triplets"):
        miners.TripletMarginMiner(type_of_triplets="hardest")


def test_namespace_has_our_miners():
    assert miners.TripletMarginMiner is _miners.TripletMarginMiner
    assert miners.BatchHardMiner is _miners.BatchHardMiner
    assert miners.HDCMiner is pml_miners.HDCMiner  # one we lack: PML's own


def test_row_extremes_opcheck():
    from fused_pairloss.ops import triplets
    if triplets.row_extremes_op(torch.device("cpu")) is None:
        pytest.skip("fused_pairloss._C (the CPU kernels) not built")
    g = torch.Generator().manual_seed(9)
    q = torch.nn.functional.normalize(torch.randn(9, 5, generator=g, dtype=torch.float64), dim=1)
    r = torch.nn.functional.normalize(torch.randn(7, 5, generator=g, dtype=torch.float64), dim=1)
    lq, lr = torch.randint(0, 3, (9,), generator=g), torch.randint(0, 3, (7,), generator=g)
    for lp, largest in ((True, (True, False)), (False, (False, True))):
        torch.library.opcheck(torch.ops.fused_pairloss.row_extremes.default,
                              (q, r, lq, lr, torch.full((9,), -1), lp, *largest))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("values", ["random", "ties", "nonfinite"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("distance", [CosineSimilarity(), LpDistance()], ids=["cosine", "lp"])
def test_ms_miner_order_equals_pml(distance, mode, values, dtype, small_chunks, monkeypatch):
    """MultiSimilarityMiner sorts only each row's kept pairs (the op ascending_kept_columns) and
    sorts a row as PML does where two kept values are equal (on a grid of multiples of 1/4, where
    torch.sort orders ties its own way), or a chunk with a NaN or inf: PML's tuple, bitwise."""
    from fused_pairloss.ops import triplets
    if triplets.ascending_kept_columns_op(torch.device("cpu")) is None:
        pytest.skip("fused_pairloss._C (the CPU kernels) not built")
    x, y, r, ry = batch(mode, n=96, d=6, dtype=dtype)
    x = x.detach()
    if values == "ties":
        x, r = (x * 4).round() / 4, None if r is None else (r.detach() * 4).round() / 4
        x[(x == 0).all(1)] = 1  # no zero row: its cosines would all tie at 0
        if r is not None:
            r[(r == 0).all(1)] = 1
    if values == "nonfinite":
        x[5, 2] = float("nan")
        x[50, 1] = float("inf")
    seen = {"tied": 0, "ordered": 0}
    order = triplets.ascending_kept_columns_op(torch.device("cpu"))

    def spy(*args):
        out = order(*args)
        seen["ordered"] += 1
        seen["tied"] += int(out[3].sum())
        return out

    monkeypatch.setattr(triplets, "ascending_kept_columns_op", lambda device: spy)
    ours = miners.MultiSimilarityMiner(0.1, distance=distance)(x, y, r, ry)
    theirs = pml_miners.MultiSimilarityMiner(0.1, distance=distance)(x, y, r, ry)
    assert values == "nonfinite" or (len(theirs[0]) and len(theirs[2])), "the miner keeps pairs of both sets"
    for k, (a, b) in enumerate(zip(ours, theirs)):
        assert torch.equal(a, b), f"element {k}"
    n_chunks = len(_miners._row_chunks(len(x), len(x if r is None else r), len(x if r is None else r),
                                       _miners.CHUNK_ELEMENTS))
    if values == "nonfinite":  # a chunk with a NaN or an inf: PML's steps (every chunk in self mode)
        assert seen["ordered"] == (0 if r is None else 2 * (n_chunks - 2))
    else:
        assert seen["ordered"] == 2 * n_chunks
        assert (seen["tied"] > 0) == (values == "ties")


def test_ascending_kept_columns_op():
    from fused_pairloss.ops import triplets
    op = triplets.ascending_kept_columns_op(torch.device("cpu"))
    if op is None:
        pytest.skip("fused_pairloss._C (the CPU kernels) not built")
    g = torch.Generator().manual_seed(16)
    for dtype, n_cols in ((torch.float32, 300), (torch.float64, 300), (torch.float32, 20)):
        v = (torch.randn(9, n_cols, generator=g, dtype=torch.float64) * 8).round().to(dtype) / 8  # ties
        v[0, :4] = torch.tensor([0.0, -0.0, 0.0, -0.0], dtype=dtype)  # -0.0 == +0.0: a tie
        keep = torch.rand(9, n_cols, generator=g) < 0.7
        keep[0, :4] = True
        keep[3] = False  # a row without an entry
        rows, cols, counts, tied = op(v, keep)
        assert torch.equal(counts, keep.sum(1))
        # stable: columns ascending among equal values; -0.0 just below +0.0 (a tie the caller redoes)
        by = torch.where((v == 0) & torch.signbit(v), torch.full_like(v, -1e-30), v)
        for i in range(9):
            listed = torch.nonzero(keep[i]).flatten()
            expect = listed[torch.sort(by[i, listed], stable=True)[1]]
            mine = cols[rows == i]
            assert torch.equal(mine, expect), i
            sorted_v = v[i, mine]
            assert bool(tied[i]) == bool((sorted_v[1:] == sorted_v[:-1]).any()), i
        assert bool(tied[0])
        torch.library.opcheck(torch.ops.fused_pairloss.ascending_kept_columns.default, (v, keep))
    with pytest.raises(RuntimeError, match="keep must be a bool tensor"):
        op(torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(RuntimeError, match="float32 or float64"):
        op(torch.zeros(2, 3, dtype=torch.float16), torch.zeros(2, 3, dtype=torch.bool))


@pytest.mark.parametrize("strategies", [("hard", "hard"), ("easy", "easy"), ("hard", "easy"), ("easy", "hard")])
def test_batch_miner_kernel_equals_pml_on_ties(strategies):
    """The C++ row extremes against PML with repeated rows (8 distinct ones): the first column of a
    tie, as torch.max / torch.min. Each prototype has four entries +-1 (norm 2), so the normalized
    rows are +-1/2 and every distance and cosine is exact: tied across the copies of a row in any
    summation order (a BLAS may compute the copies' entries with different roundings)."""
    g = torch.Generator().manual_seed(10)
    prototypes = torch.zeros(8, 6, dtype=torch.float64)
    for k in range(8):
        cols = torch.randperm(6, generator=g)[:4]
        prototypes[k, cols] = torch.randint(0, 2, (4,), generator=g).double() * 2 - 1
    assert len({tuple(p.tolist()) for p in prototypes}) == 8
    x = prototypes[torch.randint(0, 8, (40,), generator=g)]
    y = torch.randint(0, 4, (40,), generator=g)
    for dist in ({}, dict(distance=CosineSimilarity())):
        kw = dict(pos_strategy=strategies[0], neg_strategy=strategies[1], **dist)
        a, b = miners.BatchEasyHardMiner(**kw)(x, y), pml_miners.BatchEasyHardMiner(**kw)(x, y)
        for s, t in zip(a, b):
            assert torch.equal(s, t), kw


@pytest.mark.gpu
@pytest.mark.parametrize("case", MINER_CASES, ids=case_id)
def test_gpu_miner_tuples_equal_pml(case):
    """On CUDA tensors (the chunked PyTorch mining; the C++ row extremes are CPU-only): PML's tuples."""
    name, kw = case
    x, y, _, _ = batch("self", n=300, d=32)
    x, y = x.detach().cuda(), y.cuda()
    a, b = getattr(miners, name)(**kw)(x, y), getattr(pml_miners, name)(**kw)(x, y)
    for s, t in zip(a, b):
        assert torch.equal(s, t), name


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("type_of_triplets", ["all", "semihard"])
def test_gpu_triplet_miner_fused_into_triplet_loss(type_of_triplets, backend):
    x, y, _, _ = batch("self", n=300, d=32, seed=2)
    x = x.detach().cuda().requires_grad_(True)
    y = y.cuda()
    mined = miners.TripletMarginMiner(margin=0.3, type_of_triplets=type_of_triplets)(x, y)
    ours = fpl.TripletMarginLoss(margin=0.2, backend=backend)(x, y, mined)
    theirs = pml_losses.TripletMarginLoss(margin=0.2)(x, y, tuple(mined))
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("miner", ["MultiSimilarityMiner", "PairMarginMiner", "PairMarginMiner-cosine"])
def test_gpu_pair_miner_rule_fused_into_pair_loss(miner, backend):
    """The miner's rule in the GPU engines' declaration (MS epsilon, PairMargin's keep windows, a
    cosine PairMarginMiner's moved to d), equal to PML's miner + loss on the same CUDA tensors."""
    x, y, _, _ = batch("self", n=300, d=32, seed=3)
    x = x.detach().cuda().requires_grad_(True)
    y = y.cuda()
    kw = {"PairMarginMiner": dict(pos_margin=1.2, neg_margin=1.4),
          "PairMarginMiner-cosine": dict(pos_margin=0.2, neg_margin=-0.1, distance=CosineSimilarity())}.get(miner, {})
    mined = getattr(miners, miner.split("-")[0])(**kw)(x, y)
    loss = fpl.ContrastiveLoss(backend=backend)
    loss.ENGINE_PAIR_FRACTION = 0  # the engine whatever the number of mined pairs
    assert loss._fused_with_miner_rule(x, y, mined, None, None) is not None
    ours = loss(x, y, mined)
    theirs = pml_losses.ContrastiveLoss()(x, y, tuple(mined))
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)
    g_ours, = torch.autograd.grad(ours, x)
    g_theirs, = torch.autograd.grad(theirs, x)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-7, atol=1e-12)


MS_FUSED_LOSSES = {  # loss -> (cosine kwargs, lp kwargs or None: cosine only)
    "MultiSimilarityLoss": ({}, dict(beta=10, distance=LpDistance())),
    "CircleLoss": ({}, None),
    "NTXentLoss": ({}, dict(temperature=0.2, distance=LpDistance())),
    "SupConLoss": ({}, dict(temperature=0.2, distance=LpDistance())),
    "ContrastiveLoss": (dict(pos_margin=0.9, neg_margin=0.1, distance=CosineSimilarity()), {}),
    "GeneralizedLiftedStructureLoss": (dict(pos_margin=0.8, neg_margin=0.2, distance=CosineSimilarity()), {}),
    "ThresholdConsistentMarginLoss": ({}, None),
    "MarginLoss": (dict(beta=0.3, distance=CosineSimilarity()), dict(beta=0.9)),
}


# PML's cosine-only losses with the cosine only; PML's TCM reads a ref_emb's indices as rows of
# embeddings, which is computed as PML does (tests/test_pml_pair_losses.py), not fused
MS_FUSED_CASES = [("ms", loss, mode, distance) for loss, kws in MS_FUSED_LOSSES.items() for mode in ("self", "ref")
                  for distance, kw in zip(("cosine", "lp"), kws)
                  if kw is not None and not (loss == "ThresholdConsistentMarginLoss" and mode == "ref")]
# PairMarginMiner with the loss's distance: its margins as the engine's keep windows
MS_FUSED_CASES += [("margins",) + case[1:] for case in MS_FUSED_CASES]
# the MS miner's default CosineSimilarity() beside a loss's LpDistance(): mined on -d^2 / 2 = S - 1
MS_FUSED_CASES += [("ms", loss, mode, "cosine_miner_lp") for loss, kws in MS_FUSED_LOSSES.items()
                   for mode in ("self", "ref") if kws[1] is not None]
# PairMarginMiner's default LpDistance() beside a cosine loss, CosineSimilarity() beside an lp loss:
# its margins moved through d^2 = 2 - 2 S
MS_FUSED_CASES += [("margins", loss, mode, other) for loss, kws in MS_FUSED_LOSSES.items() for mode in ("self", "ref")
                   for other, kw in zip(("lp_miner_cosine", "cosine_miner_lp"), kws)
                   if kw is not None and not (loss == "ThresholdConsistentMarginLoss" and mode == "ref")]
PAIR_MINERS = {  # (miner, kwargs): margins that cut both sets of the test batch (d about 1.4 +- 0.4)
    ("ms", "cosine"): ("MultiSimilarityMiner", dict(epsilon=0.1, distance=CosineSimilarity())),
    ("ms", "lp"): ("MultiSimilarityMiner", dict(epsilon=0.1, distance=LpDistance())),
    ("ms", "cosine_miner_lp"): ("MultiSimilarityMiner", dict(epsilon=0.1, distance=CosineSimilarity())),
    ("margins", "cosine"): ("PairMarginMiner", dict(pos_margin=0.2, neg_margin=-0.1, distance=CosineSimilarity())),
    ("margins", "lp"): ("PairMarginMiner", dict(pos_margin=1.2, neg_margin=1.5, distance=LpDistance())),
    ("margins", "lp_miner_cosine"): ("PairMarginMiner", dict(pos_margin=1.2, neg_margin=1.5)),
    ("margins", "cosine_miner_lp"): ("PairMarginMiner", dict(pos_margin=0.2, neg_margin=-0.1,
                                                             distance=CosineSimilarity())),
}
# the loss's own distance in each case of MS_FUSED_CASES (its kwargs in MS_FUSED_LOSSES)
LOSS_DISTANCE = {"cosine": "cosine", "lp": "lp", "cosine_miner_lp": "lp", "lp_miner_cosine": "cosine"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("miner,loss,mode,distance", MS_FUSED_CASES)
def test_pair_miner_rule_fused_into_pair_losses(miner, loss, mode, distance, dtype, monkeypatch):
    """Our MultiSimilarityMiner's or PairMarginMiner's pairs given to a pair loss with the miner's
    distance (or a cosine MS miner beside an lp loss, a PairMarginMiner with the other of lp and
    cosine): the miner's rule in the loss's engine (the list is not read), equal to PML's miner +
    loss (values and gradients; fp64 PML the truth, PML in the dtype the reference)."""
    kw = MS_FUSED_LOSSES[loss][0 if LOSS_DISTANCE[distance] == "cosine" else 1]
    miner_name, miner_kw = PAIR_MINERS[miner, distance]
    x, y, r, ry = batch(mode, seed=11, dtype=dtype)
    params = [x] if r is None else [x, r]

    def run(lib_miners, lib_losses, inputs):
        xx, yy, rr, rry = inputs
        mined = getattr(lib_miners, miner_name)(**miner_kw)(xx, yy, rr, rry)
        out = getattr(lib_losses, loss)(**kw)(xx, yy, mined, rr, rry)
        wrt = [xx] if rr is None else [xx, rr]
        grads = torch.autograd.grad(out, wrt, allow_unused=True)
        return out, [torch.zeros_like(w) if g is None else g for g, w in zip(grads, wrt)], mined

    with monkeypatch.context() as m:  # neither the listed pairs nor the reference
        m.setattr(fpl.losses._base._PairLoss, "_fused_with_listed_pairs", None)
        m.setattr(fpl.losses._base._PairLoss, "_reference_with_indices", None)
        m.setattr(getattr(fpl.losses, loss), "_reference_with_indices", None)
        m.setattr(fpl.losses._base._PairLoss, "ENGINE_PAIR_FRACTION", 0)  # the engine for any number of pairs
        value, grads, mined = run(miners, fpl.losses, (x, y, r, ry))
    same, same_grads, listed = run(pml_miners, pml_losses, (x, y, r, ry))
    n_pos, n_neg = len(listed[0]), len(listed[2])
    all_pos = int((y[:, None] == (y if ry is None else ry)[None, :]).sum()) - (len(y) if r is None else 0)
    assert 0 < n_pos < all_pos and 0 < n_neg, "the miner must keep some pairs of each set and drop some positives"
    assert all(torch.equal(a, b) for a, b in zip(mined, listed)), "the miner's tuple is PML's"
    conv = {id(p): p.detach().double().requires_grad_(True) for p in params}
    truth, truth_grads, _ = run(pml_miners, pml_losses, (conv[id(x)], y, None if r is None else conv[id(r)], ry))
    check_close(value, truth, same, what="value", dtype=dtype)
    for k, (a, t, b) in enumerate(zip(grads, truth_grads, same_grads)):
        check_close(a, t, b, what=f"grad {k}", dtype=dtype)


def test_ms_miner_pairs_are_listed_where_the_rule_differs():
    """An lp miner beside a cosine loss, or PML's ref_labels-is-labels case (its miner keeps the
    diagonal there): the loss reads the list, still equal to PML."""
    x, y, r, _ = batch("ref_is_labels", seed=12)
    cosine_loss = dict(distance=CosineSimilarity(), pos_margin=0.9, neg_margin=0.1)
    for args, loss_kw, miner_kw in (((x, y), cosine_loss, dict(distance=LpDistance())),
                                    ((x, y, r, y), cosine_loss, {})):
        mined = miners.MultiSimilarityMiner(0.1, **miner_kw)(*args)
        listed = pml_miners.MultiSimilarityMiner(0.1, **miner_kw)(*args)
        ours = fpl.ContrastiveLoss(**loss_kw)
        ours.ENGINE_PAIR_FRACTION = 0
        assert ours._fused_with_miner_rule(args[0], args[1], mined, *(args[2:] or (None, None))) is None
        check_close(ours(args[0], args[1], mined, *args[2:]),
                    pml_losses.ContrastiveLoss(**loss_kw)(args[0], args[1], listed, *args[2:]), what=str(loss_kw))


def test_cosine_miner_beside_lp_loss_with_a_zero_row_reads_the_list():
    """A zero row stays zero under PML's normalize, so -d^2 / 2 is not S - 1 for its pairs: the
    cosine miner's pairs beside an lp loss are read from the list there, equal to PML. (Its pairs'
    d is 1 up to rounding: margins off 1, so that no term sits at its relu kink.)"""
    x, y, _, _ = batch("self", seed=13)
    x = x.detach().clone()
    x[3] = 0
    mined, listed = miners.MultiSimilarityMiner(0.1)(x, y), pml_miners.MultiSimilarityMiner(0.1)(x, y)
    margins = dict(pos_margin=0.1, neg_margin=1.2)
    ours = fpl.ContrastiveLoss(**margins)
    ours.ENGINE_PAIR_FRACTION = 0
    assert ours._fused_with_miner_rule(x, y, mined, None, None) is None
    check_close(ours(x, y, mined), pml_losses.ContrastiveLoss(**margins)(x, y, listed), what="zero row")
    x[3] = 1  # the same call without the zero row: the rule in the engine
    mined = miners.MultiSimilarityMiner(0.1)(x, y)
    assert ours._fused_with_miner_rule(x, y, mined, None, None) is not None


def test_lp_margin_miner_beside_cosine_loss_with_a_zero_row_reads_the_list():
    """PairMarginMiner's LpDistance() margins move to S through d^2 = 2 - 2 S, which a zero row
    (zero after normalization) breaks: the cosine loss reads the list there, equal to PML."""
    x, y, _, _ = batch("self", seed=13)
    x = x.detach().clone()
    x[3] = 0
    ours = fpl.MultiSimilarityLoss()
    ours.ENGINE_PAIR_FRACTION = 0
    for zero_row in (True, False):
        mined, listed = miners.PairMarginMiner(1.2, 1.5)(x, y), pml_miners.PairMarginMiner(1.2, 1.5)(x, y)
        assert (ours._fused_with_miner_rule(x, y, mined, None, None) is None) == zero_row
        check_close(ours(x, y, mined), pml_losses.MultiSimilarityLoss()(x, y, listed), what=f"zero row {zero_row}")
        x[3] = 1


@pytest.mark.parametrize("distance", [LpDistance(), CosineSimilarity()], ids=["lp", "cosine"])
@pytest.mark.parametrize("margins", [(float("nan"), 1.5), (1.2, float("nan"))])
def test_nan_margin_is_read_from_the_list(margins, distance):
    """A NaN margin keeps no pair of its set in PML (every comparison with NaN is false): not a keep
    window, the list is read (with the miner's distance or moved to the other), equal to PML."""
    x, y, _, _ = batch("self", seed=17)
    for loss in (fpl.ContrastiveLoss(), fpl.MultiSimilarityLoss()):
        loss.ENGINE_PAIR_FRACTION = 0
        mined = miners.PairMarginMiner(*margins, distance=distance)(x, y)
        listed = pml_miners.PairMarginMiner(*margins, distance=distance)(x, y)
        assert loss._fused_with_miner_rule(x, y, mined, None, None) is None
        check_close(loss(x, y, mined), getattr(pml_losses, type(loss).__name__)()(x, y, listed),
                    what=f"{type(loss).__name__} {margins}")


@pytest.mark.parametrize("miner_distance", ["lp", "cosine"])
def test_margins_moved_to_the_other_distance_keep_pmls_pairs(miner_distance):
    """margin_windows on the other distance's v, every case of its margins (passed by all pairs, by
    none, in between), against PML's miner on unit rows: a pair is in the moved window iff PML kept
    it (fp64, off the thresholds)."""
    from fused_pairloss._miners import margin_windows
    x, y, _, _ = batch("self", n=64, d=8, seed=15, dtype=torch.float64)
    q = torch.nn.functional.normalize(x.detach(), dim=1)
    s = q @ q.t()
    d = (2 - 2 * s).clamp_min(0).sqrt()
    same, other = y[:, None] == y[None, :], y[:, None] != y[None, :]
    same.fill_diagonal_(False)
    v = s if miner_distance == "lp" else d  # the loss's v
    margins = ((-0.5, 0.0), (0.3, 1.1), (1.2, 1.5), (2.5, 3.0)) if miner_distance == "lp" else \
        ((1.5, 1.2), (0.99, 0.9), (0.2, -0.1), (-1.5, -2.0))
    for pos_margin, neg_margin in margins:
        dist = LpDistance() if miner_distance == "lp" else CosineSimilarity()
        miner = pml_miners.PairMarginMiner(pos_margin, neg_margin, distance=dist)
        a1, p, a2, n = miner(x, y)
        (plo, phi), (nlo, nhi) = margin_windows(miner, "cosine" if miner_distance == "lp" else "lp")
        kept_pos = same & (v > plo) & (v < phi)
        kept_neg = other & (v > nlo) & (v < nhi)
        assert torch.equal(torch.stack(torch.where(kept_pos)), torch.stack((a1, p))), (pos_margin, neg_margin)
        assert torch.equal(torch.stack(torch.where(kept_neg)), torch.stack((a2, n))), (pos_margin, neg_margin)


def _copies_of_rows():
    """Every row three times: copies at d = 0 exactly (S = 1 within rounding)."""
    g = torch.Generator().manual_seed(3)
    return (torch.randn(4, 5, generator=g, dtype=torch.float64).repeat(3, 1),
            torch.tensor([0, 1, 0, 2, 0, 1, 1, 2, 2, 1, 0, 2]))


def _rows_of_disjoint_supports():
    """Non-negative sparse rows: those of disjoint supports at S = 0 exactly (d = sqrt 2)."""
    g = torch.Generator().manual_seed(1)
    x = torch.relu(torch.randn(32, 4, generator=g, dtype=torch.float64))
    x[x.norm(dim=1) == 0, 0] = 1.0
    return x, torch.randint(0, 4, (32,), generator=g)


@pytest.mark.parametrize("rows,miner_distance,margins,loss", [
    (_copies_of_rows, "lp", (0.0, 10.0), "NTXentLoss"), (_copies_of_rows, "lp", (0.0, 1.2), "MultiSimilarityLoss"),
    (_copies_of_rows, "cosine", (1.0, -0.2), "MarginLoss"), (_copies_of_rows, "cosine", (0.5, 1.0), "ContrastiveLoss"),
    (_rows_of_disjoint_supports, "cosine", (0.8, 0.0), "MarginLoss"),
    (_rows_of_disjoint_supports, "cosine", (0.8, 0.0), "GeneralizedLiftedStructureLoss"),
    (_rows_of_disjoint_supports, "lp", (math.sqrt(2), 1.9), "NTXentLoss")])
def test_margins_at_exact_points_moved_to_the_other_distance_read_the_list(rows, miner_distance, margins, loss):
    """Copies of a row (d = 0 exactly, S = 1 within rounding) sit on a margin of 0 (LpDistance) or 1
    (CosineSimilarity), rows of disjoint supports on a cosine margin of 0 (an lp one of sqrt 2):
    moved to the other v, the edge decided them otherwise than PML (NTXentLoss 8.90 against PML's
    12.40 with every sample three times; MarginLoss 3% off, its gradient 26%, at orthogonality).
    Such a margin is read from the list, in the loss's own call and in CrossBatchMemory holding the
    batch twice; equal to PML."""
    x, y = rows()
    distance = LpDistance() if miner_distance == "lp" else CosineSimilarity()
    ours, pml = getattr(fpl, loss)(), getattr(pml_losses, loss)()
    ours.ENGINE_PAIR_FRACTION = 0
    mined = miners.PairMarginMiner(*margins, distance=distance)(x, y)
    assert ours._fused_with_miner_rule(x, y, mined, None, None) is None
    check_close(ours(x, y, mined), pml(x, y, pml_miners.PairMarginMiner(*margins, distance=distance)(x, y)),
                what="listed")
    memories = [cls(loss_fn, x.shape[1], memory_size=2 * len(x),
                    miner=pml_miners.PairMarginMiner(*margins, distance=distance))
                for cls, loss_fn in ((fpl.CrossBatchMemory, getattr(fpl, loss)()),
                                     (pml_losses.CrossBatchMemory, getattr(pml_losses, loss)()))]
    for step in range(2):
        check_close(memories[0](x, y), memories[1](x, y), what=f"memory step {step}")


def test_few_mined_pairs_are_read_from_the_list():
    """The miner's rule in the engine walks all N x M pairs; a list of fewer than
    ENGINE_PAIR_FRACTION of them is cheaper to read. Either way PML's value."""
    x, y, _, _ = batch("self", n=64, classes=32, seed=14)
    loss = fpl.ContrastiveLoss()
    for neg_margin, engine in ((0.5, False), (1.9, True)):  # d of these rows: about 1.4 +- 0.4
        mined = miners.PairMarginMiner(0.2, neg_margin)(x, y)
        kept = len(mined[0]) + len(mined[2])
        assert (kept >= loss.ENGINE_PAIR_FRACTION * 64 * 64) == engine, kept
        assert (loss._fused_with_miner_rule(x, y, mined, None, None) is not None) == engine
        check_close(loss(x, y, mined), pml_losses.ContrastiveLoss()(x, y, tuple(mined)), what=f"{neg_margin}")


def test_mined_tuples_pickle_and_copy_as_pmls_tuple():
    import copy
    import pickle
    x, y, _, _ = batch("self", seed=13)
    for mined in (miners.MultiSimilarityMiner(0.1)(x, y), miners.TripletMarginMiner(0.2)(x, y)):
        for other in (pickle.loads(pickle.dumps(mined)), copy.deepcopy(mined), copy.copy(mined)):
            assert type(other) is tuple and len(other) == len(mined)
            assert all(torch.equal(a, b) for a, b in zip(other, mined))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", ["BatchHardMiner", "BatchEasyHardMiner"])
def test_hardest_pairs_of_a_nan_row_as_pml(name, dtype):
    """PML's torch.max picks a NaN as a row's extreme (the NaN row stays an anchor and becomes every
    row's hardest pair); the C++ extremes skip NaN comparisons, so such a batch is mined in PyTorch:
    PML's tuple."""
    from pytorch_metric_learning import miners as pml_miners
    g = torch.Generator().manual_seed(7)
    x = torch.randn(12, 6, generator=g, dtype=dtype)
    y = torch.arange(12) % 4
    x[3, 1] = float("nan")
    ours, theirs = getattr(fpl.miners, name)()(x, y), getattr(pml_miners, name)()(x, y)
    assert len(ours) == len(theirs) and all(torch.equal(a, b) for a, b in zip(ours, theirs))


@pytest.mark.parametrize("how", ["fp16", "bf16", "autocast_bf16"])
@pytest.mark.parametrize("distance", ["lp", "cosine"])
@pytest.mark.parametrize("name", ["BatchHardMiner", "BatchEasyHardMiner"])
def test_batch_miners_in_half_precision_tie_as_pml(name, distance, how):
    """PML mines on its fp16 / bf16 matrix (autocast's for the cosine's matmul), where roundings tie
    many pairs and torch.max takes the first: our tuple is PML's (not the precise extremes)."""
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(how, torch.float32)
    kw = dict(distance=LpDistance() if distance == "lp" else CosineSimilarity())
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        x, y = torch.randn(64, 16, generator=g), torch.randint(0, 8, (64,), generator=g)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=how == "autocast_bf16"):
            ours = tuple(getattr(miners, name)(**kw)(x.to(dtype), y))
            theirs = getattr(pml_miners, name)(**kw)(x.to(dtype), y)
        assert len(ours) == len(theirs) and all(torch.equal(a, b) for a, b in zip(ours, theirs)), seed


@pytest.mark.parametrize("name", ["PairMarginMiner", "MultiSimilarityMiner", "BatchHardMiner", "BatchEasyHardMiner",
                                  "TripletMarginMiner"])
def test_a_wider_ref_without_ref_labels_is_pmls(name):
    """PML accepts a ref_emb of more rows than the embeddings without ref_labels (it reads the labels
    for the ref's first rows): our miners give PML's tuple; a narrower one is a ValueError."""
    g = torch.Generator().manual_seed(0)
    x, r = (torch.randn(n, 6, generator=g, dtype=torch.float64) for n in (12, 15))
    y = torch.arange(12) % 3
    ours, theirs = tuple(getattr(miners, name)()(x, y, r)), getattr(pml_miners, name)()(x, y, r)
    assert len(ours) == len(theirs) and all(torch.equal(a, b) for a, b in zip(ours, theirs))
    with pytest.raises(ValueError, match="ref_labels"):
        getattr(miners, name)()(x, y, r[:10])


@pytest.mark.parametrize("ref_labels_of", ["other_labels", "a_copy"])
@pytest.mark.parametrize("type_of_triplets", ["all", "hard", "semihard"])
def test_triplet_miner_on_the_batch_as_its_own_ref_under_other_labels(type_of_triplets, ref_labels_of):
    """ref_emb=embeddings with another labels object: PML's identity rule does not apply (the
    diagonal is a pair at d = 0), so the fused TripletMarginLoss is ref mode, PML's value."""
    x, y, _, _ = batch("self", n=24, d=8, classes=4, seed=2)
    other = torch.randint(0, 4, (24,), generator=torch.Generator().manual_seed(9))
    y2 = y.clone() if ref_labels_of == "a_copy" else other
    mined = miners.TripletMarginMiner(0.3, type_of_triplets=type_of_triplets)(x, y, x, y2)
    ours = fpl.TripletMarginLoss(margin=0.1)(x, y, mined, x, y2)
    theirs = pml_losses.TripletMarginLoss(margin=0.1)(x, y, tuple(mined), x, y2)
    check_close(ours, theirs, theirs, what="value", dtype=torch.float64)


@pytest.mark.parametrize("name", ["BatchHardMiner", "BatchEasyHardMiner"])
def test_batch_miners_float_labels_are_compared_not_truncated(name):
    """Fractional float labels (0.1, 0.2, ...) are distinct classes, as PML's == says: the CPU op's
    extremes take them as ids, not as integers (which merged them)."""
    g = torch.Generator().manual_seed(31)
    x = torch.randn(12, 4, generator=g, dtype=torch.float64)
    for y in (torch.tensor([.1, .2, .3] * 4), torch.tensor([1.5, 1, 1.5, 1, 2, 2] * 2)):
        ours, theirs = getattr(miners, name)()(x, y), getattr(pml_miners, name)()(x, y)
        assert len(ours) == len(theirs) and all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_unknown_strategy_assigned_later_raises_as_pml():
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.arange(8) % 3
    for lib in (miners, pml_miners):
        m = lib.BatchEasyHardMiner()
        m.pos_strategy = "HARD"
        with pytest.raises(NotImplementedError):
            m(x, y)


def test_type_of_triplets_assigned_later_mines_as_pml():
    """A type_of_triplets PML's mine does not know, assigned after construction: PML keeps the
    triplets of "all", so do ours, also fused into the loss."""
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.arange(16) % 3
    mined = []
    for lib in (miners, pml_miners):
        m = lib.TripletMarginMiner(margin=0.2)
        m.type_of_triplets = "semi-hard"
        mined.append(m(x, y))
    assert all(torch.equal(a, b) for a, b in zip(*mined))
    check_close(fpl.TripletMarginLoss()(x, y, mined[0]), pml_losses.TripletMarginLoss()(x, y, mined[1]))


def test_ms_miner_with_nan_labels_as_pml():
    """NaN labels match no label, their own neither: the pair count PML's early return reads is
    the true one (the diagonal is no pair of a NaN row)."""
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.tensor([0.0, 0.0, float("nan"), float("nan"), 1.0, 2.0])
    ours, pml = miners.MultiSimilarityMiner(0.5)(x, y), pml_miners.MultiSimilarityMiner(0.5)(x, y)
    assert len(pml[0]) > 0 and all(torch.equal(a, b) for a, b in zip(ours, pml))


@pytest.mark.parametrize("type_of_triplets", ["hard", "semihard"])
@pytest.mark.parametrize("distance", [CosineSimilarity, LpDistance])
def test_triplet_window_at_zero_with_copies_under_other_labels_reads_the_list(type_of_triplets, distance):
    """Samples copied under another label: a triplet whose positive and negative are copies sits
    exactly on the "hard" / "semihard" edge at 0, which PML's matrix rounds to either side; the
    loss reads the list there (PML's value), and fuses the window without such copies."""
    g = torch.Generator().manual_seed(37)
    base = torch.randn(15, 8, generator=g, dtype=torch.float64)
    x = torch.cat([base, base[torch.randint(0, 15, (15,), generator=g)]])
    y = torch.randint(0, 4, (30,), generator=g)
    mined = miners.TripletMarginMiner(0.2, type_of_triplets, distance=distance())(x, y)
    listed = pml_miners.TripletMarginMiner(0.2, type_of_triplets, distance=distance())(x, y)
    assert all(torch.equal(a, b) for a, b in zip(mined, listed))
    loss = fpl.TripletMarginLoss(margin=0.05, distance=distance())
    assert not mined.fused_for(x, y, None, None, loss._distance_kind)
    ours = loss(x, y, mined)
    assert torch.equal(ours, loss(x, y, tuple(mined)))
    # (PML's cdist of more than 25 rows goes through a matmul: 1e-10 off in fp64 where d is near 0)
    torch.testing.assert_close(ours, pml_losses.TripletMarginLoss(margin=0.05, distance=distance())(x, y, listed),
                               rtol=1e-8, atol=0)
    y_base = y[:15]
    distinct = miners.TripletMarginMiner(0.2, type_of_triplets, distance=distance())(base, y_base)
    assert distinct.fused_for(base, y_base, None, None, loss._distance_kind)


@pytest.mark.parametrize("how", ["autocast", "bfloat16", "float16"])
@pytest.mark.parametrize("miner,loss", [(lambda: miners.MultiSimilarityMiner(0.1), lambda: fpl.ContrastiveLoss()),
                                        (lambda: miners.PairMarginMiner(0.3, 0.2, distance=CosineSimilarity()),
                                         lambda: fpl.SupConLoss()),
                                        (lambda: miners.TripletMarginMiner(distance=CosineSimilarity()),
                                         lambda: fpl.TripletMarginLoss(distance=CosineSimilarity()))],
                         ids=["ms-contrastive", "pair_margin-supcon", "triplet"])
def test_mined_in_half_precision_is_read_from_the_list(how, miner, loss):
    """PML's miner in half precision (half inputs, or the cosine's matmul under autocast) keeps the
    pairs of its rounded matrix: the loss reads the list (the engine's fp32 rule keeps others near
    the edges), so the mined result and its plain tuple give the same bits."""
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(64, 32, generator=g)
        x = (x if how == "autocast" else x.to(getattr(torch, how))).requires_grad_(True)
        y = torch.randint(0, 4, (64,), generator=g)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=how == "autocast"):
            mined = miner()(x, y)
            values = [loss()(x, y, indices) for indices in (mined, tuple(mined))]
        grads = [torch.autograd.grad(v, x)[0] for v in values]
        assert mined.half_precision
        assert torch.equal(values[0], values[1]) and torch.equal(grads[0], grads[1]), seed


@pytest.mark.parametrize("name,loss", [("TripletMarginMiner", "TripletMarginLoss"),
                                       ("PairMarginMiner", "ContrastiveLoss"),
                                       ("MultiSimilarityMiner", "MultiSimilarityLoss")])
def test_distance_changed_between_mining_and_the_loss(name, loss):
    """The loss applies the miner's rule only as it was mined: a miner's distance changed in place
    after mining leaves the listed indices to the loss, as PML reads them."""
    g = torch.Generator().manual_seed(32)
    x, y = 3 * torch.randn(10, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (10,), generator=g)
    ours, theirs = getattr(miners, name)(), getattr(pml_miners, name)()
    ours.distance.normalize_embeddings = theirs.distance.normalize_embeddings = False
    mined, pml_mined = ours(x, y), theirs(x, y)
    ours.distance.normalize_embeddings = theirs.distance.normalize_embeddings = True
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    a, b = getattr(fpl.losses, loss)()(xa, y, mined), getattr(pml_losses, loss)()(xb, y, pml_mined)
    check_close(a, b.detach(), what="value")
    check_close(torch.autograd.grad(a, xa)[0], torch.autograd.grad(b, xb)[0], what="grad")


def test_triplet_miner_float_labels_without_loss_labels():
    """TripletMarginLoss over our TripletMarginMiner's triplets with labels=None: the miner's float
    labels taken as PML compares them."""
    g = torch.Generator().manual_seed(33)
    x = torch.randn(8, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([0.5, 1.5, 0.5, 1.5, 2.5, 2.5, 0.5, 1.5])
    ours = fpl.losses.TripletMarginLoss()(x, None, miners.TripletMarginMiner()(x, y))
    check_close(ours, pml_losses.TripletMarginLoss()(x, None, pml_miners.TripletMarginMiner()(x, y)), what="value")


@pytest.mark.parametrize("changed", ["embeddings", "labels", "indices"])
@pytest.mark.parametrize("miner,loss,kw", [
    ("MultiSimilarityMiner", "CircleLoss", dict(epsilon=0.5)),
    ("PairMarginMiner", "ContrastiveLoss", dict(pos_margin=0.2, neg_margin=1.3)),
    ("TripletMarginMiner", "TripletMarginLoss", dict(margin=0.3, type_of_triplets="semihard")),
], ids=["ms", "pair_margin", "triplet_margin"])
def test_inputs_changed_in_place_after_mining_read_the_list(miner, loss, kw, changed):
    """A miner's inputs changed in place between mining and the loss call (an optimizer step, a
    refilled label buffer), or its returned indices edited: the mined pairs are no longer the rule's
    on the new values, so the loss reads the list, as PML's loss does."""
    x, y, _, _ = batch("self", n=24, seed=31)
    ours_mined = getattr(miners, miner)(**kw)(x, y)
    pml_mined = getattr(pml_miners, miner)(**kw)(x, y)
    with torch.no_grad():
        if changed == "embeddings":
            x.mul_(1.3).add_(0.2)
        elif changed == "labels":
            y.copy_(torch.randint(0, 5, y.shape, generator=torch.Generator().manual_seed(32)))
        else:  # the returned index tensors edited (their second halves repeat their first)
            for ours_t, pml_t in zip(ours_mined, pml_mined):
                half = len(ours_t) // 2
                ours_t[len(ours_t) - half:] = ours_t[:half].clone()
                pml_t[len(pml_t) - half:] = pml_t[:half].clone()
    got = getattr(fpl, loss)()(x, y, ours_mined)
    (g,) = torch.autograd.grad(got, x)
    want = getattr(pml_losses, loss)()(x, y, pml_mined)
    (w,) = torch.autograd.grad(want, x)
    check_close(got, want, what="value")
    check_close(g, w, what="grad")


def test_mined_under_inference_mode_as_pml():
    """Inference tensors keep no version counter: the loss reads the mined list (PML's value). A
    miner run under inference_mode on ordinary inputs (its indices inference tensors), the loss
    outside it with gradients: PML's value (the indices cannot have been edited since)."""
    x, y, _, _ = batch("self", n=24, seed=33)
    with torch.inference_mode():
        xi = x.detach().clone()
        ours = fpl.CircleLoss()(xi, y, miners.PairMarginMiner(0.2, 0.8)(xi, y))
        want = pml_losses.CircleLoss()(xi, y, pml_miners.PairMarginMiner(0.2, 0.8)(xi, y))
    check_close(ours, want, what="value")
    with torch.inference_mode():
        mined, pml_mined = miners.PairMarginMiner(0.5, 0.5)(x, y), pml_miners.PairMarginMiner(0.5, 0.5)(x, y)
    check_close(fpl.MultiSimilarityLoss()(x, y, mined), pml_losses.MultiSimilarityLoss()(x, y, pml_mined),
                what="value, mined under inference_mode")
    # read from the list (pairs joined into triplets, as PML's TripletMarginLoss does), with gradients:
    # the inference index tensors are copied (autograd cannot save them), PML's value and gradient
    x = x.detach().requires_grad_(True)
    with torch.inference_mode():
        mined = pml_miners.PairMarginMiner(0.2, 0.8)(x, y)
    got, want = fpl.TripletMarginLoss()(x, y, mined), pml_losses.TripletMarginLoss()(x, y, mined)
    check_close(got, want, what="TripletMarginLoss, mined under inference_mode")
    check_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(want, x)[0], what="its gradient")
