"""fused_pairloss.reference for the wider families (docs/semantics.md) against pytorch-metric-learning 2.9:
NTXent, SupCon, Contrastive, GeneralizedLiftedStructure, Multi-Similarity with LpDistance (pair
family), ProxyAnchor, NormalizedSoftmax, CosFace, ArcFace (class family).

Values and gradients (w.r.t. embeddings, ref_emb and the class weights) are compared with PML:
- fp64: to ~1e-10 of the scale;
- fp32: against the fp64 truth (PML in fp64 on the very same fp32 inputs, upcast exactly): the
  reference's fp32 error may be at most twice PML's own fp32 error plus a few fp32 ulps of the
  scale, so the tolerance is tied to what fp32 can do on that input.
Inputs are random normals (no coincident embeddings for "lp"), checked to stay away from every
relu kink / branch point, so fp32 and fp64 take the same branches. Explicit indices_tuples come
from PML miners run once, so PML and the reference see the same pairs.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import distances as pml_dist
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners

from fused_pairloss import reference as R
from fused_pairloss.losses import _reference_common as RC

F32_EPS = torch.finfo(torch.float32).eps


# ----------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------
def _gen(seed):
    return torch.Generator().manual_seed(seed)


def rand_emb(n, d, seed):
    """fp64 normals; the fp32 runs use the rounded copy and the truth its exact upcast."""
    return torch.randn(n, d, generator=_gen(seed), dtype=torch.float64)


def make_labels(n, layout, seed):
    g = _gen(seed)
    if layout == "few":
        return torch.randint(0, 3, (n,), generator=g)
    if layout == "many":
        return torch.randint(0, max(1, n // 2), (n,), generator=g)
    if layout == "same":
        return torch.full((n,), 7, dtype=torch.long)
    if layout == "distinct":
        return torch.randperm(n, generator=g)
    raise ValueError(layout)


def setup_pairs(mode, n, m, d, layout, seed):
    """(emb, labels, ref_emb, ref_labels) in fp64 for mode self / ref / ref_is_labels."""
    emb = rand_emb(n, d, seed)
    labels = make_labels(n, layout, seed + 1)
    if mode == "self":
        return emb, labels, None, None
    if mode == "ref":
        ref = rand_emb(m, d, seed + 2)
        ref_labels = make_labels(m, layout, seed + 3)
        if layout == "distinct":
            ref_labels = ref_labels + n  # no label shared with the queries: no positive anywhere
        elif layout != "same":
            ref_labels[: min(n, m) // 2] = labels[: min(n, m) // 2]
        return emb, labels, ref, ref_labels
    if mode == "ref_is_labels":
        return emb, labels, rand_emb(n, d, seed + 2), labels
    raise ValueError(mode)


def _dist_module(distance):
    return pml_dist.CosineSimilarity() if distance == "cosine" else pml_dist.LpDistance()


def _mat64(emb, ref, distance):
    q = F.normalize(emb.double(), dim=1)
    r = q if ref is None else F.normalize(ref.double(), dim=1)
    return q @ r.t() if distance == "cosine" else torch.cdist(q, r)


def _pair_masks64(labels, ref_labels, n, m, self_excl):
    ry = labels if ref_labels is None else ref_labels
    pos = labels[:, None] == ry[None]
    if self_excl:
        pos &= ~torch.eye(n, m, dtype=torch.bool)
    return pos, labels[:, None] != ry[None]


# ----------------------------------------------------------------------------------------------
# comparison
# ----------------------------------------------------------------------------------------------
def _grads(loss, leaves):
    if not loss.requires_grad:
        return [torch.zeros_like(t) for t in leaves]
    gs = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(gs, leaves)]


def _maxabs(x):
    return float(x.abs().max()) if x.numel() else 0.0


def _check(run_ours, run_pml, inputs, what):
    """run_*(tensors) -> loss, with tensors a list of leaves (embeddings, ref_emb / weights).
    Compares fp64 tightly and fp32 against the fp64 truth as described at the top."""
    def run(fn, xs):
        leaves = [x.clone().requires_grad_(True) for x in xs]
        loss = fn(leaves)
        assert loss.dim() == 0 and loss.dtype == xs[0].dtype, what
        return loss.detach(), [g.detach() for g in _grads(loss, leaves)], loss.requires_grad

    x64 = [x.double() for x in inputs]
    o64, p64 = run(run_ours, x64), run(run_pml, x64)
    assert o64[2] == p64[2], f"{what}: graph attachment differs"
    for a, b, name in zip([o64[0]] + o64[1], [p64[0]] + p64[1], ["loss"] + [f"grad{i}" for i in range(len(x64))]):
        scale = max(1.0, _maxabs(b))
        assert _maxabs(a - b) <= 1e-10 * scale, f"{what} fp64 {name}: {_maxabs(a - b)} (scale {scale})"

    x32 = [x.float() for x in inputs]
    truth = run(run_pml, [x.double() for x in x32])  # exact upcast: the same input point
    o32, p32 = run(run_ours, x32), run(run_pml, x32)
    for name, t, a, b in zip(["loss"] + [f"grad{i}" for i in range(len(x32))], [truth[0]] + truth[1],
                             [o32[0]] + o32[1], [p32[0]] + p32[1]):
        scale = max(1.0, _maxabs(t))
        err_ours, err_pml = _maxabs(a.double() - t), _maxabs(b.double() - t)
        assert err_ours <= 2 * err_pml + 8 * F32_EPS * scale, \
            f"{what} fp32 {name}: ours {err_ours:.3g} vs PML {err_pml:.3g} (scale {scale:.3g})"
    return o64[0]


# ----------------------------------------------------------------------------------------------
# pair losses: registry
# ----------------------------------------------------------------------------------------------
# name -> (reference fn, PML class, fixed hyper-parameter sets or None: per distance, see _hyper)
PAIR_LOSSES = {
    "ntxent": (R.ntxent_loss, pml_losses.NTXentLoss, [dict(temperature=0.07), dict(temperature=0.5)]),
    "supcon": (R.supcon_loss, pml_losses.SupConLoss, [dict(temperature=0.1), dict(temperature=0.4)]),
    "contrastive": (R.contrastive_loss, pml_losses.ContrastiveLoss, None),
    "gls": (R.generalized_lifted_structure_loss, pml_losses.GeneralizedLiftedStructureLoss, None),
    "ms": (R.multi_similarity_loss, pml_losses.MultiSimilarityLoss, None),
}


def _hyper(name, distance):
    """Hyper-parameter sets per loss and distance (margins that make sense for that distance)."""
    fixed = PAIR_LOSSES[name][2]
    if fixed is not None:
        return fixed
    if name == "contrastive":
        return ([dict(), dict(pos_margin=0.3, neg_margin=1.2)] if distance == "lp"
                else [dict(pos_margin=0.8, neg_margin=0.3), dict(pos_margin=1.0, neg_margin=0.0)])
    if name == "gls":
        return ([dict(), dict(neg_margin=1.3, pos_margin=0.4)] if distance == "lp"
                else [dict(neg_margin=0.2, pos_margin=0.9)])
    if name == "ms":
        return ([dict(), dict(alpha=1.0, beta=10.0, base=1.2)] if distance == "lp"
                else [dict(alpha=1.0, beta=10.0, base=0.2)])
    raise ValueError(name)


def _pml_pair(name, distance, kw):
    cls = PAIR_LOSSES[name][1]
    return cls(distance=_dist_module(distance), **kw)


def _pair_runners(name, distance, kw, labels, ref_labels, has_ref, indices_tuple=None):
    fn = PAIR_LOSSES[name][0]
    pml = _pml_pair(name, distance, kw)

    def ours(xs):
        r = xs[1] if has_ref else None
        return fn(xs[0], labels, r, ref_labels, distance=distance, indices_tuple=indices_tuple, **kw)

    def theirs(xs):
        r = xs[1] if has_ref else None
        return pml(xs[0], labels, indices_tuple, r, ref_labels)
    return ours, theirs


def _kink_args(name, distance, kw, mat, pos, neg):
    """The arguments of Contrastive's per-pair relus and of GLS's per-row relu (None otherwise)."""
    mg = (lambda x, y: y - x) if distance == "cosine" else (lambda x, y: x - y)
    if name == "contrastive":
        return torch.cat([mg(mat, kw.get("pos_margin", 0.0))[pos], mg(kw.get("neg_margin", 1.0), mat)[neg]])
    if name == "gls":
        lse = lambda x, k: torch.where(k.any(1), x.masked_fill(~k, -torch.inf).logsumexp(1), 0)
        rows = pos.any(1) | neg.any(1)  # a row without pairs is an exact 0 in every dtype
        return (lse(mg(mat, kw.get("pos_margin", 0.0)), pos) + lse(mg(kw.get("neg_margin", 1.0), mat), neg))[rows]
    return None


def _assert_away_from_kinks(name, distance, kw, emb, labels, ref, ref_labels, self_excl, gap=0.0):
    """Every relu argument of Contrastive / GLS has the same (nonzero) sign in fp32 (the bits
    PML and the reference both compute there) as in the fp64 truth on the same fp32 point, so
    both dtypes take the same branches (and AvgNonZero keeps the same terms); and, for
    gradcheck, lies more than `gap` from the kink in fp64."""
    pos, neg = _pair_masks64(labels, ref_labels, emb.shape[0], (emb if ref is None else ref).shape[0], self_excl)
    e32, r32 = emb.float(), None if ref is None else ref.float()
    m32 = RC.distance_matrix(e32, e32 if r32 is None else r32, distance)
    m64 = RC.distance_matrix(e32.double(), (e32 if r32 is None else r32).double(), distance)
    v32, v64 = _kink_args(name, distance, kw, m32, pos, neg), _kink_args(name, distance, kw, m64, pos, neg)
    if v32 is None:
        return
    assert torch.equal(torch.sign(v32), torch.sign(v64).float()), f"{name}: input at a kink, change the seed"
    vals = _kink_args(name, distance, kw, _mat64(emb, ref, distance), pos, neg)
    assert vals.numel() == 0 or float(vals.abs().min()) > gap, f"{name}: input too close to a kink"


# ----------------------------------------------------------------------------------------------
# pair losses vs PML: sizes, label layouts, modes, distances, both cdist regimes
# ----------------------------------------------------------------------------------------------
# (n, m, d, layout); with "lp", max(n, m) <= 25 runs torch.cdist's direct formula, > 25 its
# matmul formula (self / ref_is_labels modes are n x n)
PAIR_CASES = [
    (1, 5, 8, "few"), (2, 3, 5, "few"), (12, 20, 7, "distinct"), (20, 9, 16, "few"),
    (17, 30, 31, "many"), (40, 33, 33, "same"), (64, 48, 16, "few"), (200, 130, 24, "many"),
]
MODES = ["self", "ref", "ref_is_labels"]


def test_cases_cover_both_cdist_regimes():
    sides = [max(n, m) for n, m, _, _ in PAIR_CASES] + [n for n, _, _, _ in PAIR_CASES]
    assert any(s <= 25 for s in sides) and any(s > 25 for s in sides)
    assert any(d % 2 for _, _, d, _ in PAIR_CASES) and any(d % 2 == 0 for _, _, d, _ in PAIR_CASES)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("n,m", [(20, 25), (26, 3), (3, 26), (40, 40)])
def test_lp_matrix_is_pmls_bitwise(n, m, dtype):
    """The reference's "lp" matrix is PML LpDistance()'s, bit for bit, in both cdist regimes,
    and the two regimes really differ (matmul formula: self distance not exactly 0)."""
    x, y = rand_emb(n, 9, n).to(dtype), rand_emb(m, 9, m + 1).to(dtype)
    assert torch.equal(RC.distance_matrix(x, y, "lp"), pml_dist.LpDistance()(x, y))
    assert torch.equal(RC.distance_matrix(x, x, "lp"), pml_dist.LpDistance()(x, x))
    assert torch.equal(RC.distance_matrix(x, y, "cosine"), pml_dist.CosineSimilarity()(x, y))
    diag = RC.distance_matrix(x, x, "lp").diagonal()
    if n <= 25:
        assert torch.equal(diag, torch.zeros_like(diag))
    elif dtype == torch.float32:
        assert diag.abs().max() > 0


def test_lp_fp16_takes_pmls_pairwise_branch():
    """fp16 has no cdist kernel: PML's LpDistance loops pairwise_distance (with its eps=1e-6)."""
    for n in (7, 30):
        x, y = rand_emb(n, 5, 1).half(), rand_emb(4, 5, 2).half()
        assert torch.equal(RC.distance_matrix(x, y, "lp"), pml_dist.LpDistance()(x, y))
        assert torch.equal(RC.distance_matrix(x, x, "lp"), pml_dist.LpDistance()(x, x))


def _pair_params():
    """(name, case, mode, distance): MS with cosine is tests/test_reference_vs_pml.py's; PML's
    NTXent is O(positive pairs x negative pairs) in memory and time, so n=200 in ref mode only."""
    out = []
    for name in ["ntxent", "supcon", "contrastive", "gls", "ms"]:
        for case in PAIR_CASES:
            for mode in MODES:
                for distance in (["lp"] if name == "ms" else ["cosine", "lp"]):
                    if name == "ntxent" and case[0] > 64 and mode != "ref":
                        continue
                    out.append(pytest.param(name, case, mode, distance,
                                            id="{}-n{}m{}d{}-{}-{}-{}".format(name, *case, mode, distance)))
    return out


@pytest.mark.parametrize("name,case,mode,distance", _pair_params())
def test_pair_loss_vs_pml(name, case, mode, distance):
    n, m, d, layout = case
    emb, labels, ref, ref_labels = setup_pairs(mode, n, m, d, layout, seed=n * 11 + d)
    self_excl = ref is None or ref_labels is labels
    inputs = [emb] if ref is None else [emb, ref]
    for kw in _hyper(name, distance):
        _assert_away_from_kinks(name, distance, kw, emb, labels, ref, ref_labels, self_excl)
        ours, theirs = _pair_runners(name, distance, kw, labels, ref_labels, ref is not None)
        _check(ours, theirs, inputs, f"{name} {distance} {kw}")


def test_pair_losses_are_not_trivially_equal():
    """The comparisons above must be able to fail: the hyper-parameters, the distance and the
    identity rule each change the value on a typical input."""
    emb, labels, ref, _ = setup_pairs("ref_is_labels", 30, 30, 9, "few", seed=3)
    for name in ["ntxent", "supcon", "contrastive", "gls", "ms"]:
        fn = PAIR_LOSSES[name][0]
        kws = _hyper(name, "lp")
        a = fn(emb, labels, ref, labels, distance="lp", **kws[0])
        assert not torch.allclose(a, fn(emb, labels, ref, labels.clone(), distance="lp", **kws[0])), name
        assert not torch.allclose(a, fn(emb, labels, distance="lp", **kws[0])), name
        if len(kws) > 1:
            assert not torch.allclose(a, fn(emb, labels, ref, labels, distance="lp", **kws[1])), name
        assert not torch.allclose(a, fn(emb, labels, ref, labels, distance="cosine", **_hyper(name, "cosine")[0])), name


# ----------------------------------------------------------------------------------------------
# explicit indices_tuple from PML miners (pair lists with duplicates, triplets)
# ----------------------------------------------------------------------------------------------
_MINERS = {
    "triplet_all": lambda: pml_miners.TripletMarginMiner(margin=0.2, type_of_triplets="all"),
    "batch_hard": lambda: pml_miners.BatchHardMiner(),
    "multi_similarity": lambda: pml_miners.MultiSimilarityMiner(0.1),
    "pair_margin": lambda: pml_miners.PairMarginMiner(pos_margin=0.2, neg_margin=0.8),
}


@pytest.mark.parametrize("mode", ["self", "ref"])
@pytest.mark.parametrize("miner", list(_MINERS))
@pytest.mark.parametrize("name", ["ntxent", "supcon", "contrastive", "gls", "ms"])
def test_pair_loss_explicit_indices_tuple_vs_pml(name, miner, mode):
    emb, labels, ref, ref_labels = setup_pairs(mode, 16, 12, 8, "few", seed=5)
    it = _MINERS[miner]()(emb, labels, ref, ref_labels)
    assert len(it[0]) > 1
    inputs = [emb] if ref is None else [emb, ref]
    for distance in ["cosine", "lp"]:
        kw = _hyper(name, distance)[0]
        _assert_away_from_kinks(name, distance, kw, emb, labels, ref, ref_labels, ref is None)
        ours, theirs = _pair_runners(name, distance, kw, labels, ref_labels, ref is not None, it)
        got = _check(ours, theirs, inputs, f"{name} {distance} {miner}")
        unmined = PAIR_LOSSES[name][0](emb, labels, ref, ref_labels, distance=distance, **kw)
        if miner == "triplet_all" or name in ("ntxent", "contrastive"):
            assert not torch.allclose(got, unmined), f"{name} {miner}: the mined pairs must matter"


def test_pair_based_losses_count_duplicate_pairs():
    """NTXent and Contrastive reduce PML's pair lists, so a pair listed twice weighs twice (as a
    triplet miner lists them); the mat-based losses see 0/1 masks and do not change."""
    emb, labels, _, _ = setup_pairs("self", 10, 10, 6, "few", seed=8)
    pos = [(i, j) for i in range(10) for j in range(10) if i != j and labels[i] == labels[j]]
    neg = [(i, j) for i in range(10) for j in range(10) if labels[i] != labels[j]]
    a1, p = torch.tensor([x[0] for x in pos]), torch.tensor([x[1] for x in pos])
    a2, n = torch.tensor([x[0] for x in neg]), torch.tensor([x[1] for x in neg])
    once = (a1, p, a2, n)
    twice = (torch.cat([a1, a1[:1]]), torch.cat([p, p[:1]]), torch.cat([a2, a2[:1]]), torch.cat([n, n[:1]]))
    for name in ["ntxent", "contrastive", "supcon", "gls", "ms"]:
        fn, cls, _ = PAIR_LOSSES[name]
        kw = _hyper(name, "lp")[0]
        base = fn(emb, labels, distance="lp", **kw)
        torch.testing.assert_close(fn(emb, labels, distance="lp", indices_tuple=once, **kw), base)
        dup = fn(emb, labels, distance="lp", indices_tuple=twice, **kw)
        torch.testing.assert_close(dup, cls(distance=pml_dist.LpDistance(), **kw)(emb, labels, twice))
        if name in ("ntxent", "contrastive"):
            assert not torch.allclose(dup, base), name
        else:
            torch.testing.assert_close(dup, base)


# ----------------------------------------------------------------------------------------------
# Multi-Similarity with LpDistance and the miner
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("mode", ["self", "ref"])
@pytest.mark.parametrize("case", [(12, 9, 7, "few"), (40, 30, 16, "few"), (64, 64, 9, "many"),
                                  (30, 20, 8, "same"), (20, 20, 8, "distinct")],
                         ids=lambda c: "n{}m{}d{}-{}".format(*c))
@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_multi_similarity_lp_mining_vs_pml_miner(case, mode, dtype, eps):
    """miner_epsilon with distance="lp" is PML MultiSimilarityMiner(eps, distance=LpDistance())
    (its non-inverted rule: keep positives with d + eps > min neg d, negatives with
    d - eps < max pos d). Both compute the same cdist bits, so the mined sets are identical in
    either dtype and the losses are compared at the same dtype."""
    n, m, d, layout = case
    emb, labels, ref, ref_labels = setup_pairs(mode, n, m, d, layout, seed=n + d)
    emb = emb.to(dtype)
    ref = None if ref is None else ref.to(dtype)
    miner = pml_miners.MultiSimilarityMiner(eps, distance=pml_dist.LpDistance())
    a1, p, a2, nn_ = miner(emb, labels, ref, ref_labels)
    # the mined masks are the miner's pairs, exactly
    mat = RC.distance_matrix(emb, emb if ref is None else ref, "lp")
    pos, neg = _pair_masks64(labels, ref_labels, mat.shape[0], mat.shape[1], ref is None)
    hp, hn = R.multi_similarity_mine(mat, pos, neg, eps, "lp")
    mp, mn = torch.zeros_like(hp), torch.zeros_like(hn)
    mp[a1, p] = True
    mn[a2, nn_] = True
    assert torch.equal(hp, mp) and torch.equal(hn, mn)
    if layout in ("few", "many") and eps == 0.1:  # the mining must matter
        assert hp.any() and hn.any() and hp.sum() + hn.sum() < pos.sum() + neg.sum()
    # losses and gradients
    pml = pml_losses.MultiSimilarityLoss(distance=pml_dist.LpDistance())
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    leaves = [emb] if ref is None else [emb, ref]
    res = []
    for use_ours in (True, False):
        xs = [x.clone().requires_grad_(True) for x in leaves]
        r = None if ref is None else xs[1]
        if use_ours:
            loss = R.multi_similarity_loss(xs[0], labels, r, ref_labels, miner_epsilon=eps, distance="lp")
        else:
            loss = pml(xs[0], labels, miner(xs[0], labels, r, ref_labels), r, ref_labels)
        res.append((loss.detach(), _grads(loss, xs)))
    torch.testing.assert_close(res[0][0], res[1][0], **tol)
    for g1, g2 in zip(res[0][1], res[1][1]):
        torch.testing.assert_close(g1, g2, rtol=tol["rtol"], atol=tol["atol"] * max(1.0, _maxabs(g2)))


def test_multi_similarity_lp_mined_nan_in_nan_out():
    emb = rand_emb(12, 5, 0)
    emb[4, 1] = float("nan")
    labels = make_labels(12, "few", 0)
    assert torch.isnan(R.multi_similarity_loss(emb, labels, miner_epsilon=0.1, distance="lp"))


def test_circle_rejects_non_cosine_distance_as_pml_does():
    with pytest.raises(AssertionError, match="CosineSimilarity"):
        pml_losses.CircleLoss(distance=pml_dist.LpDistance())
    emb, labels = rand_emb(6, 4, 0), make_labels(6, "few", 0)
    with pytest.raises(ValueError, match="distance"):
        R.circle_loss(emb, labels, distance="lp")
    torch.testing.assert_close(R.circle_loss(emb, labels, distance="cosine"), pml_losses.CircleLoss()(emb, labels))


@pytest.mark.parametrize("name", list(PAIR_LOSSES))
def test_unknown_distance_is_rejected(name):
    emb, labels = rand_emb(6, 4, 0), make_labels(6, "few", 0)
    with pytest.raises(ValueError, match="distance"):
        PAIR_LOSSES[name][0](emb, labels, distance="dot")


# ----------------------------------------------------------------------------------------------
# pair losses: edge cases
# ----------------------------------------------------------------------------------------------
def _zero_attached(loss, leaves):
    assert float(loss.detach()) == 0.0 and loss.requires_grad
    for g in _grads(loss, leaves):
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("distance", ["cosine", "lp"])
@pytest.mark.parametrize("name", list(PAIR_LOSSES))
def test_pair_edge_cases(name, distance):
    fn, cls, _ = PAIR_LOSSES[name]
    kw = _hyper(name, distance)[0]
    pml = cls(distance=_dist_module(distance), **kw)
    # a single row in self mode: no pair at all -> PML's graph-attached zero
    e1 = rand_emb(1, 5, 1).requires_grad_(True)
    _zero_attached(fn(e1, torch.tensor([3]), distance=distance, **kw), [e1])
    assert float(pml(e1, torch.tensor([3])).detach()) == 0.0
    # one positive and one negative pair in the whole batch: the one-pair rule
    e, r = rand_emb(1, 5, 2).requires_grad_(True), rand_emb(2, 5, 3).requires_grad_(True)
    _zero_attached(fn(e, torch.tensor([0]), r, torch.tensor([0, 1]), distance=distance, **kw), [e, r])
    # no positives anywhere / no negatives anywhere (also the large-batch versions are in the
    # parametrized comparison): equal to PML, and zero for the losses that need both kinds
    for y in (torch.arange(9), torch.zeros(9, dtype=torch.long)):
        x = rand_emb(9, 5, 4).requires_grad_(True)
        ours, theirs = fn(x, y, distance=distance, **kw), pml(x, y)
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
        if name in ("ntxent", "supcon"):
            _zero_attached(ours, [x])


@pytest.mark.parametrize("mode", ["self", "ref"])
@pytest.mark.parametrize("distance", ["cosine", "lp"])
@pytest.mark.parametrize("name", list(PAIR_LOSSES))
def test_pair_nan_input_like_pml(name, distance, mode):
    """NaN in the input (one entry of one query row) gives NaN. PML gives NaN for NTXent, GLS and
    MS (MeanReducer: the NaN row / its pairs enter the mean) and SupCon in self mode (the NaN column
    enters every row's max); it is finite for SupCon with a separate ref and for Contrastive, where
    AvgNonZero drops the NaN terms (NaN > 0 is false): there the reference deliberately keeps NaN in,
    NaN out, the project's rule (docs/semantics.md)."""
    fn, cls, _ = PAIR_LOSSES[name]
    kw = _hyper(name, distance)[0]
    emb, labels, ref, ref_labels = setup_pairs(mode, 14, 10, 6, "few", seed=21)
    emb[3, 2] = float("nan")
    ours = fn(emb, labels, ref, ref_labels, distance=distance, **kw)
    theirs = cls(distance=_dist_module(distance), **kw)(emb, labels, None, ref, ref_labels)
    pml_nan = name in ("ntxent", "ms", "gls") or (name == "supcon" and mode == "self")
    assert bool(torch.isnan(theirs)) == pml_nan, f"PML {name}: {theirs}"
    assert bool(torch.isnan(ours)), f"{name}: {ours}"


# ----------------------------------------------------------------------------------------------
# class losses vs PML
# ----------------------------------------------------------------------------------------------
# name -> (reference fn, PML class, parameter name, hyper-parameter sets)
CLASS_LOSSES = {
    "proxy_anchor": (R.proxy_anchor_loss, pml_losses.ProxyAnchorLoss, "proxies",
                     [dict(margin=0.1, alpha=32), dict(margin=0.3, alpha=8)]),
    "normalized_softmax": (R.normalized_softmax_loss, pml_losses.NormalizedSoftmaxLoss, "W",
                           [dict(temperature=0.05), dict(temperature=0.5)]),
    "cosface": (R.cosface_loss, pml_losses.CosFaceLoss, "W", [dict(margin=0.35, scale=64), dict(margin=0.1, scale=8)]),
    "arcface": (R.arcface_loss, pml_losses.ArcFaceLoss, "W", [dict(margin=28.6, scale=64), dict(margin=10.0, scale=4)]),
}


def _class_weights(name, C, D, seed):
    shape = (C, D) if CLASS_LOSSES[name][2] == "proxies" else (D, C)
    return rand_emb(*shape, seed)


def _class_runners(name, kw, labels, C, D, indices_tuple=None):
    fn, cls, attr, _ = CLASS_LOSSES[name]

    def ours(xs):
        return fn(xs[0], labels, xs[1], indices_tuple=indices_tuple, **kw)

    def theirs(xs):
        mod = cls(num_classes=C, embedding_size=D, **kw)
        delattr(mod, attr)  # the parameter becomes our leaf itself, so autograd reaches xs[1]
        setattr(mod, attr, xs[1])
        return mod(xs[0], labels, indices_tuple)
    return ours, theirs


def _arcface_away_from_branches(emb, labels, W, margin, gap=1e-4):
    s = (F.normalize(emb, dim=1) @ F.normalize(W, dim=0))[torch.arange(len(labels)), labels]
    theta = torch.acos(s.clamp(-1, 1))
    assert float((theta - (math.pi - math.radians(margin))).abs().min()) > gap
    assert float((1 - s.abs()).min()) > gap


CLASS_CASES = [  # (N, D, C, label layout)
    (1, 5, 3, "rand"), (7, 8, 4, "rand"), (10, 9, 10, "distinct"), (12, 6, 5, "same"),
    (33, 17, 10, "rand"), (64, 32, 1, "rand"), (130, 31, 3, "rand"), (200, 24, 50, "rand"),
]


def _class_labels(N, C, layout, seed):
    if layout == "distinct":
        return torch.randperm(C, generator=_gen(seed))[:N]
    if layout == "same":
        return torch.full((N,), C - 1, dtype=torch.long)
    y = torch.randint(0, C, (N,), generator=_gen(seed))
    if N >= 2:
        y[0], y[-1] = 0, C - 1  # edge classes
    return y


@pytest.mark.parametrize("case", CLASS_CASES, ids=lambda c: "N{}D{}C{}-{}".format(*c))
@pytest.mark.parametrize("name", list(CLASS_LOSSES))
def test_class_loss_vs_pml(name, case):
    N, D, C, layout = case
    emb = rand_emb(N, D, N + D)
    labels = _class_labels(N, C, layout, N * C)
    W = _class_weights(name, C, D, C + D)
    for kw in CLASS_LOSSES[name][3]:
        if name == "arcface":
            _arcface_away_from_branches(emb, labels, W, kw["margin"])
        ours, theirs = _class_runners(name, kw, labels, C, D)
        _check(ours, theirs, [emb, W], f"{name} {kw}")


@pytest.mark.parametrize("miner", ["triplet_all", "multi_similarity", "batch_hard"])
@pytest.mark.parametrize("name", list(CLASS_LOSSES))
def test_class_loss_miner_weights_vs_pml(name, miner):
    """indices_tuple -> PML's convert_to_weights (counts over all the tuple's indices / max count):
    ProxyAnchor adds weight - 1 inside the exponent, the softmax losses multiply the CE by it."""
    N, D, C = 30, 12, 4
    emb = rand_emb(N, D, 7)
    labels = _class_labels(N, C, "rand", 8)
    it = _MINERS[miner]()(emb, labels)
    w = RC.miner_weights(it, labels, torch.float64)
    assert len(it[0]) > 1 and not torch.all(w == 1)
    W = _class_weights(name, C, D, 9)
    kw = CLASS_LOSSES[name][3][0]
    if name == "arcface":
        _arcface_away_from_branches(emb, labels, W, kw["margin"])
    ours, theirs = _class_runners(name, kw, labels, C, D, it)
    got = _check(ours, theirs, [emb, W], f"{name} {miner}")
    assert not torch.allclose(got, CLASS_LOSSES[name][0](emb, labels, W, **kw)), "the weights must matter"


def test_arcface_monotonic_branch_and_acos_clamp_like_pml():
    """Rows whose target angle exceeds pi - margin take PML's "keep monotonic" branch
    cos(theta) - m sin(m); embeddings parallel to their class column put cos at the acos clamp
    (|s| = 1 up to rounding), where PML's gradient is whatever clamp + acos give (possibly
    non-finite): the reference must give the same, NaN/inf pattern included."""
    D, C = 6, 4
    W = rand_emb(D, C, 1)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    emb = rand_emb(8, D, 2) * 0.05 - W[:, labels].t()  # target angle near 180 deg: other branch
    emb[4:] += 2 * W[:, labels[4:]].t()  # these four near 0 deg: the cos(theta + m) branch
    s = (F.normalize(emb, dim=1) @ F.normalize(W, dim=0))[torch.arange(8), labels]
    theta = torch.acos(s)
    m = math.radians(28.6)
    assert (theta > math.pi - m + 1e-3).sum() == 4 and (theta < math.pi - m - 1e-3).sum() == 4
    ours, theirs = _class_runners("arcface", dict(margin=28.6, scale=64), labels, C, D)
    _check(ours, theirs, [emb, W], "arcface branches")
    # the branch matters: the plain cos(theta + m) formula would give another value
    plain = F.cross_entropy(64 * torch.where(F.one_hot(labels, C).bool(), torch.cos(torch.acos(
        (F.normalize(emb, dim=1) @ F.normalize(W, dim=0)).clamp(-1, 1)) + m),
        F.normalize(emb, dim=1) @ F.normalize(W, dim=0)), labels)
    assert not torch.allclose(plain, R.arcface_loss(emb, labels, W))
    # at the clamp: exactly parallel rows
    for dtype in (torch.float64, torch.float32):
        e = (3 * W[:, labels].t()).to(dtype)
        res = []
        for fn in (ours, theirs):
            xs = [e.clone().requires_grad_(True), W.to(dtype).clone().requires_grad_(True)]
            loss = fn(xs)
            res.append([loss.detach()] + _grads(loss, xs))
        for a, b in zip(*res):
            torch.testing.assert_close(a, b, equal_nan=True, rtol=1e-5 if dtype == torch.float32 else 1e-10,
                                       atol=1e-5 if dtype == torch.float32 else 1e-10)


def test_class_weights_cast_to_input_dtype():
    """PML casts its parameter's data to the input dtype in forward; the reference casts a copy
    (differentiably): fp64 loss, gradient in the parameter's own dtype, PML's value."""
    N, D, C = 9, 5, 3
    emb = rand_emb(N, D, 3)
    labels = _class_labels(N, C, "rand", 4)
    for name, (fn, cls, attr, hyper) in CLASS_LOSSES.items():
        w32 = _class_weights(name, C, D, 5).float().requires_grad_(True)
        loss = fn(emb, labels, w32, **hyper[0])
        assert loss.dtype == torch.float64
        (g,) = torch.autograd.grad(loss, w32)
        assert g.dtype == torch.float32
        mod = cls(num_classes=C, embedding_size=D, **hyper[0])
        getattr(mod, attr).data = w32.detach().clone()
        torch.testing.assert_close(loss, mod(emb, labels), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", list(CLASS_LOSSES))
def test_class_nan_input_like_pml(name):
    fn, cls, attr, hyper = CLASS_LOSSES[name]
    N, D, C = 10, 6, 4
    emb = rand_emb(N, D, 11)
    emb[2, 3] = float("nan")
    labels = _class_labels(N, C, "rand", 12)
    W = _class_weights(name, C, D, 13)
    mod = cls(num_classes=C, embedding_size=D, **hyper[0])
    getattr(mod, attr).data = W.clone()
    ours = fn(emb, labels, W, **hyper[0])
    torch.testing.assert_close(ours, mod(emb, labels), equal_nan=True)
    assert torch.isnan(ours)


# ----------------------------------------------------------------------------------------------
# gradcheck (fp64, small inputs away from kinks)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("distance,n", [("cosine", 7), ("lp", 7), ("lp", 27)],
                         ids=["cosine", "lp-cdist-direct", "lp-cdist-matmul"])
@pytest.mark.parametrize("mode", ["self", "ref"])
@pytest.mark.parametrize("name", list(PAIR_LOSSES))
def test_gradcheck_pair(name, distance, mode, n):
    fn = PAIR_LOSSES[name][0]
    special = {"ntxent": dict(temperature=0.5), "supcon": dict(temperature=0.5),
               "ms": dict(alpha=2.0, beta=5.0, base=0.5 if distance == "cosine" else 1.0)}
    kw = special.get(name, _hyper(name, distance)[0])
    emb, labels, ref, ref_labels = setup_pairs(mode, n, 6, 4, "few", seed=31)
    _assert_away_from_kinks(name, distance, kw, emb, labels, ref, ref_labels, ref is None, gap=1e-3)
    leaves = [emb.requires_grad_(True)] + ([] if ref is None else [ref.requires_grad_(True)])
    f = lambda *xs: fn(xs[0], labels, xs[1] if ref is not None else None, ref_labels, distance=distance, **kw)
    assert float(f(*leaves).detach()) > 0
    assert torch.autograd.gradcheck(f, leaves)


@pytest.mark.parametrize("name", list(CLASS_LOSSES))
def test_gradcheck_class(name):
    fn, _, _, _ = CLASS_LOSSES[name]
    kw = {"proxy_anchor": dict(margin=0.1, alpha=4), "normalized_softmax": dict(temperature=0.5),
          "cosface": dict(margin=0.35, scale=4), "arcface": dict(margin=28.6, scale=4)}[name]
    N, D, C = 6, 5, 4
    emb = rand_emb(N, D, 41)
    labels = torch.tensor([0, 1, 3, 3, 2, 0])
    W = _class_weights(name, C, D, 42)
    if name == "arcface":
        _arcface_away_from_branches(emb, labels, W, 28.6, gap=1e-3)
    it = pml_miners.TripletMarginMiner(margin=0.5, type_of_triplets="all")(emb, labels)
    for indices_tuple in (None, it):
        f = lambda e, w: fn(e, labels, w, indices_tuple=indices_tuple, **kw)
        assert torch.autograd.gradcheck(f, (emb.clone().requires_grad_(True), W.clone().requires_grad_(True)))
