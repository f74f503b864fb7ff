"""fused_pairloss.reference (and the public API with backend="reference") against
pytorch-metric-learning 2.9, the oracle of docs/semantics.md: values and gradients, fp64 and fp32.

Inputs near the mining thresholds follow docs/design.md: the mining tests build rows whose normalized
entries are multiples of 1/4 (norm exactly 4 before normalization), so every S is an exact
multiple of 1/16 in fp32 and fp64 and PML and the reference see the same comparisons.
"""
import warnings

import pytest
import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning.regularizers import SparseCentersRegularizer

import fused_pairloss as fpl
from fused_pairloss import functional as Fn
from fused_pairloss import reference as R

TOL = {torch.float64: dict(rtol=1e-9, atol=1e-11), torch.float32: dict(rtol=2e-5, atol=2e-6)}


# ----------------------------------------------------------------------------------------------
# input builders
# ----------------------------------------------------------------------------------------------
def _gen(seed):
    return torch.Generator().manual_seed(seed)


def rand_emb(n, d, dtype, seed):
    return torch.randn(n, d, generator=_gen(seed), dtype=torch.float64).to(dtype)


# Patterns of |entries| whose squares sum to 16: every row has norm exactly 4, so normalized
# entries are multiples of 1/4 and every cosine similarity is an exact multiple of 1/16.
_NORM4_PATTERNS = ([1] * 16, [2] * 4, [3, 2, 1, 1, 1], [2, 2, 2, 1, 1, 1, 1], [3] + [1] * 7, [4],
                   [2, 2, 2, 2], [3, 2, 1, 1, 1])


def exact_emb(n, d, dtype, seed, scale=1.0):
    """Rows of norm exactly 4*scale with small-integer entries (d >= 16)."""
    assert d >= 16
    g = _gen(seed)
    x = torch.zeros(n, d, dtype=torch.float64)
    for i in range(n):
        pat = _NORM4_PATTERNS[int(torch.randint(len(_NORM4_PATTERNS), (1,), generator=g))]
        pos = torch.randperm(d, generator=g)[: len(pat)]
        sign = torch.randint(0, 2, (len(pat),), generator=g, dtype=torch.float64) * 2 - 1
        x[i, pos] = torch.tensor(pat, dtype=torch.float64) * sign
    return (x * scale).to(dtype)


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


def _grads(loss, tensors):
    gs = torch.autograd.grad(loss, tensors, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(gs, tensors)]


def assert_close(a, b, dtype, what=""):
    tol = TOL[dtype]
    # gradients: tolerance relative to the largest entry, so tiny entries need not match digits
    scale = max(1.0, float(b.detach().abs().max())) if b.numel() else 1.0
    torch.testing.assert_close(a.detach().double(), b.detach().double(), rtol=tol["rtol"],
                               atol=tol["atol"] * scale, msg=lambda m: f"{what}: {m}")


def _setup(mode, n, m, d, dtype, layout, seed, exact=False):
    """Returns (emb, labels, ref_emb, ref_labels) for mode in self / ref / ref_is_labels."""
    mk = exact_emb if exact else rand_emb
    emb = mk(n, d, dtype, seed)
    labels = make_labels(n, layout, seed + 1)
    if mode == "self":
        return emb, labels, None, None
    if mode == "ref":
        ref = mk(m, d, dtype, seed + 2)
        ref_labels = make_labels(m, layout, seed + 3)
        if layout != "same" and m > 0:  # make sure some labels are shared with the queries
            ref_labels[: min(n, m) // 2] = labels[: min(n, m) // 2]
        return emb, labels, ref, ref_labels
    if mode == "ref_is_labels":
        return emb, labels, mk(n, d, dtype, seed + 2), labels
    raise ValueError(mode)


def _run_pair(fpl_fn, pml_fn, emb, labels, ref, ref_labels, dtype):
    """Loss + gradients of fpl_fn and pml_fn on independent leaf copies; returns both."""
    out = []
    for fn in (fpl_fn, pml_fn):
        e = emb.clone().requires_grad_(True)
        r = None if ref is None else ref.clone().requires_grad_(True)
        loss = fn(e, labels, r, ref_labels)
        assert loss.dim() == 0 and loss.dtype == dtype
        gs = _grads(loss, [e] + ([] if r is None else [r])) if loss.requires_grad else None
        out.append((loss, gs))
    return out


def _compare(out, dtype, what):
    (l1, g1), (l2, g2) = out
    assert_close(l1, l2, dtype, f"{what} loss")
    assert (g1 is None) == (g2 is None), f"{what}: graph attachment differs"
    if g1 is not None:
        for a, b, name in zip(g1, g2, ("d/dembeddings", "d/dref_emb")):
            assert torch.isfinite(a).all() == torch.isfinite(b).all()
            assert_close(a, b, dtype, f"{what} {name}")


# PML calls with ref_labels is labels must pass the very same tensor object, as we do.
def _pml_ms(alpha, beta, base, eps=None):
    loss_fn = pml_losses.MultiSimilarityLoss(alpha=alpha, beta=beta, base=base)
    miner = None if eps is None else pml_miners.MultiSimilarityMiner(epsilon=eps)

    def fn(e, y, r, ry):
        it = None if miner is None else miner(e, y, r, ry)
        return loss_fn(e, y, it, r, ry)
    return fn


def _pml_circle(m, gamma):
    loss_fn = pml_losses.CircleLoss(m=m, gamma=gamma)
    return lambda e, y, r, ry: loss_fn(e, y, None, r, ry)


# ----------------------------------------------------------------------------------------------
# Multi-Similarity and Circle: random inputs, every size / layout / mode
# ----------------------------------------------------------------------------------------------
CASES = [  # (n, m, d, layout)
    (1, 3, 8, "few"), (2, 2, 5, "few"), (3, 4, 7, "distinct"), (17, 9, 31, "few"),
    (32, 48, 64, "many"), (64, 33, 33, "same"), (96, 96, 16, "distinct"), (200, 130, 24, "few"),
]
MODES = ["self", "ref", "ref_is_labels"]


def _entries(fns, n):
    """All entry points (raw reference, functional, module) on small batches; on large ones only
    the functional API (the others are the same code path), to keep the suite fast."""
    return list(fns.items()) if n <= 64 else [("functional", fns["functional"])]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "n{}m{}d{}-{}".format(*c))
def test_multi_similarity_vs_pml(case, mode, dtype):
    n, m, d, layout = case
    emb, labels, ref, ref_labels = _setup(mode, n, m, d, dtype, layout, seed=n * 7 + d)
    for alpha, beta, base in ((2.0, 50.0, 0.5), (1.0, 10.0, 0.2)):
        fns = {
            "reference": lambda e, y, r, ry: R.multi_similarity_loss(e, y, r, ry, alpha=alpha, beta=beta, base=base),
            "functional": lambda e, y, r, ry: Fn.multi_similarity_loss(
                e, y, r, ry, alpha=alpha, beta=beta, base=base, backend="reference"),
            "module": lambda e, y, r, ry: fpl.MultiSimilarityLoss(alpha, beta, base, backend="reference")(
                e, y, None, r, ry),
        }
        for name, fn in _entries(fns, n):
            _compare(_run_pair(fn, _pml_ms(alpha, beta, base), emb, labels, ref, ref_labels, dtype),
                     dtype, f"MS {name} a={alpha}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "n{}m{}d{}-{}".format(*c))
def test_circle_vs_pml(case, mode, dtype):
    n, m, d, layout = case
    emb, labels, ref, ref_labels = _setup(mode, n, m, d, dtype, layout, seed=n * 5 + d)
    for mm, gamma in ((0.4, 80.0), (0.25, 256.0)):
        fns = {
            "reference": lambda e, y, r, ry: R.circle_loss(e, y, r, ry, m=mm, gamma=gamma),
            "functional": lambda e, y, r, ry: Fn.circle_loss(e, y, r, ry, m=mm, gamma=gamma, backend="reference"),
            "module": lambda e, y, r, ry: fpl.CircleLoss(mm, gamma, backend="reference")(e, y, None, r, ry),
        }
        for name, fn in _entries(fns, n):
            _compare(_run_pair(fn, _pml_circle(mm, gamma), emb, labels, ref, ref_labels, dtype),
                     dtype, f"Circle {name} m={mm}")


def test_ref_labels_identity_rule_changes_the_result():
    """`ref_labels is labels` excludes the diagonal; an equal but distinct tensor does not."""
    emb, labels, ref, _ = _setup("ref_is_labels", 12, 12, 9, torch.float64, "few", seed=3)
    ident = R.multi_similarity_loss(emb, labels, ref, labels)
    copy = R.multi_similarity_loss(emb, labels, ref, labels.clone())
    pml = pml_losses.MultiSimilarityLoss()
    torch.testing.assert_close(ident, pml(emb, labels, None, ref, labels))
    torch.testing.assert_close(copy, pml(emb, labels, None, ref, labels.clone()))
    assert not torch.allclose(ident, copy)
    ident_c = R.circle_loss(emb, labels, ref, labels)
    copy_c = R.circle_loss(emb, labels, ref, labels.clone())
    assert not torch.allclose(ident_c, copy_c)


# ----------------------------------------------------------------------------------------------
# Multi-Similarity with mining (exact dot products: docs/design.md)
# ----------------------------------------------------------------------------------------------
def test_exact_emb_gives_exact_similarities():
    x = exact_emb(40, 19, torch.float32, seed=1)
    xn = torch.nn.functional.normalize(x, dim=1)
    s32 = xn @ xn.t()
    s64 = torch.nn.functional.normalize(x.double(), dim=1) @ torch.nn.functional.normalize(x.double(), dim=1).t()
    assert torch.equal(s32.double(), s64)
    assert torch.equal(s64 * 16, torch.round(s64 * 16))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("mode", ["self", "ref"])
@pytest.mark.parametrize("case", [(5, 7, 16, "few"), (40, 23, 19, "few"), (64, 64, 32, "many"),
                                  (120, 50, 17, "distinct"), (33, 20, 16, "same"), (200, 150, 24, "few")],
                         ids=lambda c: "n{}m{}d{}-{}".format(*c))
@pytest.mark.parametrize("eps", [0.1, 0.0, 0.3])
def test_multi_similarity_mining_vs_pml_miner(case, mode, dtype, eps):
    n, m, d, layout = case
    emb, labels, ref, ref_labels = _setup(mode, n, m, d, dtype, layout, seed=n + d, exact=True)
    pml = _pml_ms(2.0, 50.0, 0.5, eps)
    fns = {
        "reference": lambda e, y, r, ry: R.multi_similarity_loss(e, y, r, ry, miner_epsilon=eps),
        "functional": lambda e, y, r, ry: Fn.multi_similarity_loss(e, y, r, ry, miner_epsilon=eps, backend="reference"),
        "module": lambda e, y, r, ry: fpl.MultiSimilarityLoss(miner_epsilon=eps, backend="reference")(
            e, y, None, r, ry),
    }
    for name, fn in _entries(fns, n if eps == 0.1 else 10 ** 9):
        _compare(_run_pair(fn, pml, emb, labels, ref, ref_labels, dtype), dtype, f"MS mined {name}")


def test_mining_changes_the_loss():
    """The mining test above must be able to fail: mining has to matter on those inputs."""
    emb, labels, _, _ = _setup("self", 64, 64, 32, torch.float64, "few", seed=5, exact=True)
    mined = R.multi_similarity_loss(emb, labels, miner_epsilon=0.1)
    plain = R.multi_similarity_loss(emb, labels)
    assert not torch.allclose(mined, plain)
    s = torch.nn.functional.normalize(emb, dim=1) @ torch.nn.functional.normalize(emb, dim=1).t()
    pos = (labels[:, None] == labels[None]) & ~torch.eye(64, dtype=torch.bool)
    neg = labels[:, None] != labels[None]
    hp, hn = R.multi_similarity_mine(s, pos, neg, 0.1)
    assert 0 < hp.sum() < pos.sum() and 0 < hn.sum() < neg.sum()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_mining_random_inputs_away_from_thresholds(dtype):
    """Random (inexact) inputs: compare only when no S is within 1e-4 of a mining threshold."""
    checked = 0
    for seed in range(30):
        emb = rand_emb(48, 8, dtype, 100 + seed)
        labels = make_labels(48, "few", seed)
        s = torch.nn.functional.normalize(emb.double(), dim=1) @ torch.nn.functional.normalize(emb.double(), dim=1).t()
        pos = (labels[:, None] == labels[None]) & ~torch.eye(48, dtype=torch.bool)
        neg = ~(labels[:, None] == labels[None])
        minpos = torch.where(pos, s, torch.inf).amin(1, keepdim=True)
        maxneg = torch.where(neg, s, -torch.inf).amax(1, keepdim=True)
        eps = 0.1
        gap = torch.cat([((s - eps) - maxneg)[pos].abs(), ((s + eps) - minpos)[neg].abs()])
        if gap.min() < 1e-4:
            continue
        checked += 1
        out = _run_pair(lambda e, y, r, ry: R.multi_similarity_loss(e, y, r, ry, miner_epsilon=eps),
                        _pml_ms(2.0, 50.0, 0.5, eps), emb, labels, None, None, dtype)
        _compare(out, dtype, f"MS mined random seed {seed}")
        if checked >= 4:
            break
    assert checked >= 2


def test_pml_miner_with_ref_labels_is_labels_documented_difference():
    """With a separate ref_emb and `ref_labels is labels`, PML's MultiSimilarityMiner does not
    exclude the diagonal pairs (i, i) (its `embeddings is ref_emb` test fails), so it may mine
    (i, i) as a positive and as a negative at once and its loss then asserts. docs/semantics.md excludes
    the diagonal from the positives (the identity rule) before mining: check the reference equals
    PML's loss on the miner's pairs with the diagonal removed from both lists."""
    emb, labels, ref, _ = _setup("ref_is_labels", 24, 24, 16, torch.float64, "few", seed=9, exact=True)
    eps = 0.1
    a1, p, a2, n = pml_miners.MultiSimilarityMiner(eps)(emb, labels, ref, labels)
    # recompute the miner's thresholds with the diagonal out of both sets
    s = torch.nn.functional.normalize(emb, dim=1) @ torch.nn.functional.normalize(ref, dim=1).t()
    same = labels[:, None] == labels[None]
    eye = torch.eye(24, dtype=torch.bool)
    pos, neg = same & ~eye, ~same
    hp, hn = R.multi_similarity_mine(s, pos, neg, eps)
    ia1, ip = torch.where(hp)
    ia2, in_ = torch.where(hn)
    expected = pml_losses.MultiSimilarityLoss()(emb, labels, (ia1, ip, ia2, in_), ref, labels)
    got = R.multi_similarity_loss(emb, labels, ref, labels, miner_epsilon=eps)
    torch.testing.assert_close(got, expected)
    # PML 2.9 really does mine the diagonal here, and its loss then asserts on its own pairs
    assert (a1 == p).any() and (a2 == n).any()
    with pytest.raises(AssertionError, match="either be positive or negative"):
        pml_losses.MultiSimilarityLoss()(emb, labels, (a1, p, a2, n), ref, labels)
    # (S_ii also enters PML's row thresholds there, so its off-diagonal pairs differ too)


# ----------------------------------------------------------------------------------------------
# PML quirks: the one-pair rule, Circle's AvgNonZero
# ----------------------------------------------------------------------------------------------
def _assert_zero_attached(loss, leaves):
    assert loss.dim() == 0 and float(loss.detach()) == 0.0
    assert loss.requires_grad, "PML's zero loss is attached to the graph"
    for g in _grads(loss, leaves):
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("which", ["ms", "circle"])
def test_one_pair_quirk(which):
    fn = (lambda *a, **k: R.multi_similarity_loss(*a, **k)) if which == "ms" else R.circle_loss
    pml = pml_losses.MultiSimilarityLoss() if which == "ms" else pml_losses.CircleLoss()
    # ref mode: one query, one positive and one negative reference -> exactly 1 + 1 pairs
    e = rand_emb(1, 6, torch.float64, 1).requires_grad_(True)
    r = rand_emb(2, 6, torch.float64, 2).requires_grad_(True)
    y, ry = torch.tensor([0]), torch.tensor([0, 1])
    loss = fn(e, y, r, ry)
    assert float(pml(e, y, None, r, ry).detach()) == 0.0
    _assert_zero_attached(loss, [e, r])
    # N = 1 in self mode: no pairs at all
    e1 = rand_emb(1, 6, torch.float64, 3).requires_grad_(True)
    _assert_zero_attached(fn(e1, torch.tensor([4])), [e1])
    # two pairs of one kind is not the quirk: 2 positives, 0 negatives
    e2 = rand_emb(2, 6, torch.float64, 4).requires_grad_(True)
    y2 = torch.tensor([1, 1])
    l2 = fn(e2, y2)
    torch.testing.assert_close(l2, pml(e2, y2))
    if which == "ms":
        assert float(l2.detach()) > 0
    # explicit indices with 1 positive and 1 negative pair in a bigger batch
    e3 = rand_emb(8, 6, torch.float64, 5).requires_grad_(True)
    y3 = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    it = (torch.tensor([0]), torch.tensor([1]), torch.tensor([2]), torch.tensor([5]))
    _assert_zero_attached(fn(e3, y3, indices_tuple=it), [e3])
    assert float(pml(e3, y3, it).detach()) == 0.0
    # ... and with 2 positive pairs it is not zero
    it2 = (torch.tensor([0, 1]), torch.tensor([1, 0]), torch.tensor([0, 1]), torch.tensor([2, 5]))
    l3 = fn(e3, y3, indices_tuple=it2)
    torch.testing.assert_close(l3, pml(e3, y3, it2))
    assert float(l3.detach()) > 0


def test_one_pair_quirk_after_mining():
    """Mining that leaves 1 positive and 1 negative pair gives PML's zero loss (attached), though
    the same two pairs as an explicit list of 2 + 1 pairs would give a positive loss."""
    c = lambda s: [s, (1 - s * s) ** 0.5]
    e = torch.tensor([[1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    # refs: positives at S = 0.5 and 1.0, negatives at S = 0.75 and 0.0: with eps = 0.1 the
    # miner keeps positive S=0.5 (0.4 < 0.75) and negative S=0.75 (0.85 > 0.5) only
    r = torch.tensor([c(0.5), c(1.0), c(0.75), c(0.0)], dtype=torch.float64, requires_grad=True)
    y, ry = torch.tensor([0]), torch.tensor([0, 0, 1, 1])
    a1, p, a2, n = pml_miners.MultiSimilarityMiner(0.1)(e, y, r, ry)
    assert p.tolist() == [0] and n.tolist() == [2]
    loss = R.multi_similarity_loss(e, y, r, ry, miner_epsilon=0.1)
    pml = _pml_ms(2.0, 50.0, 0.5, 0.1)(e, y, r, ry)
    assert float(pml.detach()) == 0.0
    _assert_zero_attached(loss, [e, r])
    _assert_zero_attached(Fn.multi_similarity_loss(e, y, r, ry, miner_epsilon=0.1, backend="reference"), [e, r])
    it = (torch.tensor([0, 0]), torch.tensor([0, 1]), torch.tensor([0]), torch.tensor([2]))
    assert float(R.multi_similarity_loss(e, y, r, ry, indices_tuple=it).detach()) > 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_circle_avg_non_zero(dtype):
    # singleton classes: those rows have no positive, loss 0, and must not count in the mean
    emb = rand_emb(20, 12, dtype, 11)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 3, 4, 5, 5, 6, 7, 8, 9, 9, 9, 10, 11, 12, 13])
    out = _run_pair(lambda e, y, r, ry: R.circle_loss(e, y, r, ry), _pml_circle(0.4, 80.0), emb, labels, None, None,
                    dtype)
    _compare(out, dtype, "Circle avg-nonzero")
    # independent check of the reduction: mean over the rows that have both sets
    q = torch.nn.functional.normalize(emb.double(), dim=1)
    s = q @ q.t()
    rows = []
    for i in range(20):
        pos = [j for j in range(20) if j != i and labels[j] == labels[i]]
        neg = [j for j in range(20) if labels[j] != labels[i]]
        if not pos:
            continue
        lp = torch.stack([-80 * max(0.0, 1.4 - float(s[i, j])) * (s[i, j] - 0.6) for j in pos]).logsumexp(0)
        ln = torch.stack([80 * max(0.0, float(s[i, j]) + 0.4) * (s[i, j] - 0.4) for j in neg]).logsumexp(0)
        rows.append(torch.nn.functional.softplus(lp + ln))
    expected = torch.stack(rows).mean()
    assert len(rows) == 10  # classes 0, 1, 5, 9 have >= 2 members
    assert_close(out[0][0], expected, dtype, "Circle loop")


def test_circle_all_rows_zero_gives_attached_zero():
    emb = rand_emb(6, 5, torch.float64, 12).requires_grad_(True)
    labels = torch.arange(6)  # all distinct: no positives anywhere
    loss = R.circle_loss(emb, labels)
    assert float(pml_losses.CircleLoss()(emb, labels).detach()) == 0.0
    _assert_zero_attached(loss, [emb])
    loss_f = Fn.circle_loss(emb, labels, backend="reference")
    _assert_zero_attached(loss_f, [emb])


def test_circle_far_negative_has_logit_zero():
    """A negative with S <= -m contributes exp(0) = 1 to the negative sum (docs/semantics.md)."""
    e = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1])
    # row 0: positive S=1 -> lp = -80*0.4*0.4 = -12.8; negatives S=-1 twice -> ln = 0 each
    row = torch.nn.functional.softplus(torch.tensor(-12.8, dtype=torch.float64)
                                       + torch.log(torch.tensor(2.0, dtype=torch.float64)))
    torch.testing.assert_close(R.circle_loss(e, y), row)
    torch.testing.assert_close(pml_losses.CircleLoss()(e, y), row)


# ----------------------------------------------------------------------------------------------
# Explicit indices_tuple from PML miners, through the modules (with their one-time warning)
# ----------------------------------------------------------------------------------------------
_MINERS = {
    "triplet_all": lambda: pml_miners.TripletMarginMiner(margin=0.2, type_of_triplets="all"),
    "triplet_semihard": lambda: pml_miners.TripletMarginMiner(margin=0.3, type_of_triplets="semihard"),
    "batch_hard": lambda: pml_miners.BatchHardMiner(),
    "multi_similarity": lambda: pml_miners.MultiSimilarityMiner(0.1),
    "pair_margin": lambda: pml_miners.PairMarginMiner(pos_margin=0.2, neg_margin=0.8),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("miner", list(_MINERS))
@pytest.mark.parametrize("mode", ["self", "ref"])
def test_explicit_indices_tuple_vs_pml(miner, mode, dtype, monkeypatch):
    monkeypatch.setattr(fpl.losses._base, "_warned", set())
    emb, labels, ref, ref_labels = _setup(mode, 40, 30, 16, dtype, "few", seed=21, exact=True)
    it = _MINERS[miner]()(emb, labels, ref, ref_labels)
    assert len(it[0]) > 1
    pairs = [
        (fpl.MultiSimilarityLoss(backend="reference"), pml_losses.MultiSimilarityLoss()),
        (fpl.MultiSimilarityLoss(1.0, 20.0, 0.3, backend="reference"), pml_losses.MultiSimilarityLoss(1.0, 20.0, 0.3)),
        (fpl.CircleLoss(backend="reference"), pml_losses.CircleLoss()),
        (fpl.CircleLoss(0.25, 256.0, backend="reference"), pml_losses.CircleLoss(m=0.25, gamma=256.0)),
    ]
    warned = set()
    for ours, theirs in pairs:
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            out = _run_pair(lambda e, y, r, ry: ours(e, y, it, r, ry), lambda e, y, r, ry: theirs(e, y, it, r, ry),
                            emb, labels, ref, ref_labels, dtype)
        ours_warn = [w for w in rec if "indices_tuple" in str(w.message)]
        first = type(ours) not in warned  # once per loss class
        assert len(ours_warn) == (1 if first else 0), [str(w.message) for w in rec]
        warned.add(type(ours))
        _compare(out, dtype, f"{type(ours).__name__} with {miner}")
    # the mined pairs must matter: a different result than without indices_tuple
    mined, unmined = pairs[0][0](emb, labels, it, ref, ref_labels), pairs[0][0](emb, labels, None, ref, ref_labels)
    assert not torch.allclose(mined, unmined)


def test_indices_tuple_warning_is_a_userwarning_once(monkeypatch):
    monkeypatch.setattr(fpl.losses._base, "_warned", set())
    emb = rand_emb(10, 4, torch.float32, 3)
    labels = make_labels(10, "few", 3)
    it = pml_miners.BatchHardMiner()(emb, labels)
    with pytest.warns(UserWarning, match="CircleLoss computes an explicit indices_tuple"):
        fpl.CircleLoss(backend="reference")(emb, labels, it)
    with pytest.warns(UserWarning, match="MultiSimilarityLoss computes an explicit indices_tuple"):
        fpl.MultiSimilarityLoss(backend="reference")(emb, labels, it)  # its own warning, once per loss class
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fpl.MultiSimilarityLoss(backend="reference")(emb, labels, it)
        fpl.CircleLoss(backend="reference")(emb, labels, indices_tuple=it)
    for name in ("NCALoss", "DynamicSoftMarginLoss"):  # (they took the reference without a word)
        with pytest.warns(UserWarning, match=f"{name} computes an explicit indices_tuple"):
            getattr(fpl, name)()(emb, labels, it)


def test_indices_tuple_with_miner_epsilon_is_rejected():
    emb = rand_emb(10, 4, torch.float32, 3)
    labels = make_labels(10, "few", 3)
    it = pml_miners.BatchHardMiner()(emb, labels)
    with pytest.raises(ValueError, match="indices_tuple"):
        fpl.MultiSimilarityLoss(miner_epsilon=0.1, backend="reference")(emb, labels, it)


# ----------------------------------------------------------------------------------------------
# SoftTriple vs PML (shared fc), with and without the SparseCentersRegularizer
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("C,K,D,N", [(1, 1, 3, 1), (5, 1, 8, 16), (4, 3, 7, 20), (10, 10, 32, 64),
                                     (37, 2, 17, 130)])
@pytest.mark.parametrize("reg", [0.0, 0.2])
def test_soft_triple_vs_pml(C, K, D, N, reg, dtype):
    if reg and K < 2:
        pytest.skip("the regularizer needs K >= 2")
    torch.manual_seed(C * 100 + K)
    kw = dict(centers_per_class=K, la=20.0, gamma=0.1, margin=0.01)
    if reg:
        theirs = pml_losses.SoftTripleLoss(C, D, weight_regularizer=SparseCentersRegularizer(C, K),
                                           weight_reg_weight=reg, **kw)
    else:
        theirs = pml_losses.SoftTripleLoss(C, D, **kw)
    theirs = theirs.to(dtype)
    ours = fpl.SoftTripleLoss(C, D, center_reg_weight=reg, backend="reference", **kw).to(dtype)
    ours.load_state_dict(theirs.state_dict())
    assert torch.equal(ours.fc, theirs.fc)
    emb = rand_emb(N, D, dtype, seed=C + K + N).requires_grad_(True)
    labels = torch.randint(0, C, (N,), generator=_gen(N))
    labels[0], labels[-1] = 0, C - 1  # edge classes
    res = []
    for mod in (ours, theirs):
        mod.zero_grad()
        e = emb.detach().clone().requires_grad_(True)
        loss = mod(e, labels)
        assert loss.dtype == dtype and loss.dim() == 0
        loss.backward()
        res.append((loss.detach(), e.grad.clone(), mod.fc.grad.clone()))
    (l1, ge1, gf1), (l2, ge2, gf2) = res
    assert_close(l1, l2, dtype, "SoftTriple loss")
    assert_close(ge1, ge2, dtype, "SoftTriple d/dembeddings")
    assert_close(gf1, gf2, dtype, "SoftTriple d/dfc")
    # the functional and the raw reference agree with the module
    fn = Fn.soft_triple_loss(emb.detach(), labels, theirs.fc.detach(), center_reg_weight=reg, backend="reference", **kw)
    rf = R.soft_triple_loss(emb.detach(), labels, theirs.fc.detach(), center_reg_weight=reg, **kw)
    assert_close(fn, l2, dtype, "functional SoftTriple")
    assert_close(rf, l2, dtype, "reference SoftTriple")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("C,K", [(3, 2), (6, 4), (2, 10)])
def test_sparse_centers_regularizer_vs_pml(C, K, dtype):
    torch.manual_seed(C + K)
    fc = torch.randn(9, C * K, dtype=dtype)
    a = fc.clone().requires_grad_(True)
    b = fc.clone().requires_grad_(True)
    ours = R.sparse_centers_regularizer(a, K)
    pml_reg = SparseCentersRegularizer(C, K)
    theirs = pml_reg.reducer(pml_reg.compute_loss(b.t()), b.t(), None)
    assert_close(ours, theirs, dtype, "regularizer")
    ga, = torch.autograd.grad(ours, a)
    gb, = torch.autograd.grad(theirs, b)
    assert_close(ga, gb, dtype, "regularizer grad")
    # regularizer through the loss: fpl center_reg_weight=w == PML weight_reg_weight=w
    emb = rand_emb(12, 9, dtype, 1)
    labels = torch.randint(0, C, (12,), generator=_gen(2))
    base = R.soft_triple_loss(emb, labels, fc, centers_per_class=K)
    with_reg = R.soft_triple_loss(emb, labels, fc, centers_per_class=K, center_reg_weight=0.3)
    assert_close(with_reg - base, 0.3 * ours.detach(), dtype, "regularizer weight")


def test_soft_triple_fp64_module_keeps_fp32_parameter():
    """PML casts fc in place to the input dtype; ours casts a copy: the loss value must match."""
    torch.manual_seed(0)
    theirs = pml_losses.SoftTripleLoss(4, 6, centers_per_class=2)
    ours = fpl.SoftTripleLoss(4, 6, centers_per_class=2, backend="reference")
    ours.load_state_dict(theirs.state_dict())
    emb = rand_emb(10, 6, torch.float64, 0)
    labels = torch.randint(0, 4, (10,), generator=_gen(1))
    l_ours = ours(emb, labels)
    l_theirs = theirs(emb, labels)
    assert l_ours.dtype == torch.float64
    torch.testing.assert_close(l_ours, l_theirs)
    l_ours.backward()
    assert ours.fc.grad is not None and ours.fc.grad.dtype == ours.fc.dtype


# ----------------------------------------------------------------------------------------------
# NaN inputs: NaN loss, never a crash
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_nan_embeddings_give_nan_loss(dtype):
    emb = rand_emb(12, 6, dtype, 0)
    emb[3, 2] = float("nan")
    labels = make_labels(12, "few", 0)
    ref = rand_emb(7, 6, dtype, 1)
    ref_labels = make_labels(7, "few", 1)
    fc = torch.randn(6, 4 * 3, dtype=dtype)
    prox = torch.randn(6, 5, dtype=dtype)
    lab_c = torch.randint(0, 4, (12,), generator=_gen(4))
    cases = {
        "ms": lambda: Fn.multi_similarity_loss(emb, labels, backend="reference"),
        "ms_ref": lambda: Fn.multi_similarity_loss(emb, labels, ref, ref_labels, backend="reference"),
        "circle": lambda: Fn.circle_loss(emb, labels, backend="reference"),
        "soft_triple": lambda: Fn.soft_triple_loss(emb, lab_c, fc, centers_per_class=3, backend="reference"),
        "proxy_circle": lambda: Fn.proxy_circle_loss(emb, lab_c, prox, backend="reference"),
    }
    for name, f in cases.items():
        loss = f()
        assert loss.dim() == 0 and torch.isnan(loss), f"{name}: {loss}"
    # With mining, every comparison with NaN is false, so the NaN row and column would be mined
    # away (PML's miner returns a finite value); we keep "NaN in, NaN out" there too.
    # Circle in ref mode: only the NaN query row is NaN and AvgNonZero drops it (NaN > 0 is
    # false), exactly as PML does: the loss is finite and equals PML's.
    cref = Fn.circle_loss(emb, labels, ref, ref_labels, backend="reference")
    torch.testing.assert_close(cref, pml_losses.CircleLoss()(emb, labels, None, ref, ref_labels), **TOL[dtype])
    assert torch.isfinite(cref)
    mined = Fn.multi_similarity_loss(emb, labels, miner_epsilon=0.1, backend="reference")
    assert mined.dim() == 0 and torch.isnan(mined)
    # all-NaN batch too (Circle's AvgNonZero drops NaN rows, but its zero loss is then NaN too)
    alln = torch.full((5, 3), float("nan"), dtype=dtype)
    y = torch.tensor([0, 0, 1, 1, 2])
    assert torch.isnan(Fn.circle_loss(alln, y, backend="reference"))
    assert torch.isnan(Fn.multi_similarity_loss(alln, y, backend="reference"))
    # PML agrees that these are NaN
    assert torch.isnan(pml_losses.CircleLoss()(alln, y))
    assert torch.isnan(pml_losses.MultiSimilarityLoss()(emb, labels))


# ----------------------------------------------------------------------------------------------
# gradcheck (fp64, tiny inputs away from kinks)
# ----------------------------------------------------------------------------------------------
def _away_from_mining_thresholds(emb, labels, eps, margin=1e-3):
    q = torch.nn.functional.normalize(emb, dim=1)
    s = q @ q.t()
    n = len(labels)
    pos = (labels[:, None] == labels[None]) & ~torch.eye(n, dtype=torch.bool)
    neg = labels[:, None] != labels[None]
    minpos = torch.where(pos, s, torch.inf).amin(1, keepdim=True)
    maxneg = torch.where(neg, s, -torch.inf).amax(1, keepdim=True)
    gap = torch.cat([((s - eps) - maxneg)[pos & torch.isfinite(maxneg)].abs(),
                     ((s + eps) - minpos)[neg & torch.isfinite(minpos)].abs()])
    return gap.numel() == 0 or float(gap.min()) > margin


def test_gradcheck_multi_similarity():
    emb = rand_emb(7, 5, torch.float64, 0).requires_grad_(True)
    ref = rand_emb(6, 5, torch.float64, 1).requires_grad_(True)
    y = torch.tensor([0, 0, 1, 1, 1, 2, 3])
    ry = torch.tensor([0, 1, 1, 2, 4, 0])
    f = lambda e: R.multi_similarity_loss(e, y, alpha=2.0, beta=10.0, base=0.5)
    assert torch.autograd.gradcheck(f, (emb,))
    f2 = lambda e, r: R.multi_similarity_loss(e, y, r, ry, alpha=2.0, beta=10.0, base=0.3)
    assert torch.autograd.gradcheck(f2, (emb, ref))


def test_gradcheck_multi_similarity_mined():
    for seed in range(50):
        emb = rand_emb(8, 4, torch.float64, seed)
        y = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
        if _away_from_mining_thresholds(emb, y, 0.1):
            break
    else:
        pytest.fail("no input away from the thresholds")
    emb.requires_grad_(True)
    mined = R.multi_similarity_loss(emb, y, miner_epsilon=0.1)
    assert not torch.allclose(mined, R.multi_similarity_loss(emb, y))
    assert torch.autograd.gradcheck(lambda e: R.multi_similarity_loss(e, y, beta=10.0, miner_epsilon=0.1), (emb,))


def _circle_frozen_weights(e, y, r, ry, m, gamma, e0, r0):
    """Circle with its alpha weights computed from the fixed point (e0, r0): its true gradient at
    (e0, r0) is what the detached-weight Circle loss must return there. Written from docs/semantics.md,
    independently of the reference (rows with both sets; mean of the rows > 0)."""
    def sims(a, b):
        return torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(b, dim=1).t()
    s = sims(e, e if r is None else r)
    with torch.no_grad():
        s0 = sims(e0, e0 if r0 is None else r0)
    ry_ = y if r is None else ry
    pos = y[:, None] == ry_[None]
    if r is None:
        pos &= ~torch.eye(len(y), dtype=torch.bool)
    neg = y[:, None] != ry_[None]
    rows = []
    for i in range(len(y)):
        if pos[i].any() and neg[i].any():
            lp = (-gamma * torch.relu(1 + m - s0[i, pos[i]]) * (s[i, pos[i]] - (1 - m))).logsumexp(0)
            ln = (gamma * torch.relu(s0[i, neg[i]] + m) * (s[i, neg[i]] - m)).logsumexp(0)
            rows.append(torch.nn.functional.softplus(lp + ln))
    return torch.stack(rows).mean()


@pytest.mark.parametrize("mode", ["self", "ref"])
def test_gradcheck_circle(mode):
    """Circle's weights are detached, so its gradient is not the derivative of its value (a plain
    gradcheck must fail); it must equal the derivative of the loss with weights frozen at the
    point, which gradcheck verifies."""
    e0 = rand_emb(7, 5, torch.float64, 2)
    y = torch.tensor([0, 0, 1, 1, 1, 2, 3])
    r0, ry = (None, None) if mode == "self" else (rand_emb(6, 5, torch.float64, 3), torch.tensor([0, 1, 1, 2, 4, 0]))
    m, gamma = (0.4, 4.0) if mode == "self" else (0.25, 8.0)
    leaves0 = [e0] if r0 is None else [e0, r0]

    def frozen(*xs):
        return _circle_frozen_weights(xs[0], y, None if r0 is None else xs[1], ry, m, gamma, e0, r0)

    def ours(*xs):
        return R.circle_loss(xs[0], y, None if r0 is None else xs[1], ry, m=m, gamma=gamma)

    leaves = [x.clone().requires_grad_(True) for x in leaves0]
    assert torch.autograd.gradcheck(frozen, leaves)
    torch.testing.assert_close(ours(*leaves), frozen(*leaves))
    for a, b in zip(_grads(ours(*leaves), leaves), _grads(frozen(*leaves), leaves)):
        torch.testing.assert_close(a, b)
    assert not torch.autograd.gradcheck(ours, leaves, raise_exception=False), "weights must be detached"


@pytest.mark.parametrize("K,reg", [(1, 0.0), (3, 0.0), (3, 0.2)])
def test_gradcheck_soft_triple(K, reg):
    C, D = 4, 5
    emb = rand_emb(6, D, torch.float64, 4).requires_grad_(True)
    fc = rand_emb(D, C * K, torch.float64, 5).requires_grad_(True)
    y = torch.tensor([0, 1, 3, 3, 2, 0])
    f = lambda e, w: R.soft_triple_loss(e, y, w, centers_per_class=K, la=5.0, gamma=0.5, margin=0.01,
                                        center_reg_weight=reg)
    assert torch.autograd.gradcheck(f, (emb, fc))


def test_gradcheck_proxy_circle_value_only():
    """ProxyCircle has detached weights too (a plain gradcheck must fail); its gradients are
    checked against an independent loop in tests/test_proxy_circle_reference.py."""
    emb = rand_emb(6, 5, torch.float64, 6).requires_grad_(True)
    prox = rand_emb(5, 4, torch.float64, 7).requires_grad_(True)
    y = torch.tensor([0, 1, 3, 3, 2, 0])
    f = lambda e, p: R.proxy_circle_loss(e, y, p, m=0.25, gamma=4.0)
    assert not torch.autograd.gradcheck(f, (emb, prox), raise_exception=False)
