"""The surface PML users touch, against PML itself: losses computed from an indices_tuple alone
(labels=None), the class losses' signature, errors, weight casting and get_logits."""
import warnings

import pytest
import torch

import fused_pairloss as fpl
from fused_pairloss.losses import REGISTRY

L = pytest.importorskip("pytorch_metric_learning.losses")
from pytorch_metric_learning import miners  # noqa: E402
from pytorch_metric_learning.distances import CosineSimilarity  # noqa: E402

PAIR = ["ContrastiveLoss", "MultiSimilarityLoss", "NTXentLoss", "CircleLoss", "SupConLoss",
        "GeneralizedLiftedStructureLoss", "TripletMarginLoss"]
CLASS = ["ArcFaceLoss", "CosFaceLoss", "NormalizedSoftmaxLoss", "ProxyAnchorLoss", "SoftTripleLoss",
         "LargeMarginSoftmaxLoss", "SphereFaceLoss", "ProxyNCALoss", "SubCenterArcFaceLoss"]


def batch(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 8, generator=g, dtype=dtype), torch.randint(0, 3, (16,), generator=g)


@pytest.mark.parametrize("name", PAIR)
def test_pair_loss_from_an_indices_tuple_without_labels(name):
    x, y = batch()
    idx = miners.MultiSimilarityMiner()(x, y)
    for kw in ({}, dict(ref_emb=x)):
        xo, xp = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        a = getattr(fpl, name)()(xo, indices_tuple=idx, **kw)
        b = getattr(L, name)()(xp, indices_tuple=idx, **kw)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(torch.autograd.grad(a, xo)[0], torch.autograd.grad(b, xp)[0],
                                   rtol=1e-10, atol=1e-12)


def make_pair(name):
    kw = dict(centers_per_class=2) if name == "SoftTripleLoss" else {}
    sizes = REGISTRY[name].size_kwargs(3, 8)
    ours, pml = getattr(fpl, name)(**sizes, **kw), getattr(L, name)(**sizes, **kw)
    pml.load_state_dict(ours.state_dict())
    return ours, pml


@pytest.mark.parametrize("name", CLASS)
def test_class_loss_casts_its_weights_and_gives_pmls_logits(name):
    x, y = batch(1)
    ours, pml = make_pair(name)
    torch.testing.assert_close(ours(x, y), pml(x, y), rtol=1e-12, atol=1e-12)
    w_ours, w_pml = getattr(ours, ours._param), getattr(pml, ours._param)
    assert w_ours.dtype == w_pml.dtype == torch.float64  # PML's cast_types: the parameter itself
    assert isinstance(w_ours, torch.nn.Parameter)
    torch.testing.assert_close(ours.get_logits(x), pml.get_logits(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("labels_as", ["float", "bool", "out_of_range"])
def test_proxy_nca_casts_its_proxies_for_labels_it_only_compares(labels_as):
    """ProxyNCALoss's labels PML only compares with the classes (float, bool, a label that is no
    class: computed by PML's steps): PML's cast_types still moves the proxies themselves to the
    embeddings' dtype, so their gradient and an optimizer's steps are PML's."""
    x, y = batch(3)
    y = {"float": y.double(), "bool": y > 0, "out_of_range": torch.where(y == 0, 7, y)}[labels_as]
    ours, pml = make_pair("ProxyNCALoss")
    for module in (ours, pml):
        module.float()
        module(x, y).backward()
    assert ours.proxies.dtype == pml.proxies.dtype == ours.proxies.grad.dtype == torch.float64
    torch.testing.assert_close(ours.proxies.grad, pml.proxies.grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", CLASS)
def test_class_loss_signature_and_errors_as_pml(name):
    x, y = batch(2)
    ours, pml = make_pair(name)
    for kw, what in ((dict(), "labels"), (dict(labels=y, ref_emb=x), "ref_emb")):
        with pytest.raises(ValueError, match=what):
            ours(x, **kw)
        with pytest.raises(ValueError):
            pml(x, **kw)
    idx = miners.MultiSimilarityMiner()(x, y)  # miner weights on the rows, as PML
    torch.testing.assert_close(ours(x, y, idx), pml(x, y, idx), rtol=1e-12, atol=1e-12)


def test_p2s_grad_renormalizes_in_place_and_refuses_what_pml_refuses():
    """P2SGradLoss renormalizes its weight's columns in place before every call (PML's renorm):
    from a weight PML's would hold, the same value, gradients and renormalized weight; PML's
    errors for an indices_tuple and a ref_emb, and labels named when missing."""
    x, y = batch(7)
    ours, pml = fpl.P2SGradLoss(8, 3), L.P2SGradLoss(8, 3)
    ours.weight.data.mul_(torch.tensor([0.5, 2.0, 7.0]))  # columns off the unit sphere
    pml.load_state_dict(ours.state_dict())
    xo, xp = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    a, b = ours(xo, y), pml(xp, y)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.weight.data, pml.weight.data, rtol=0, atol=0)
    # PML's renorm scales to maxnorm / (norm + 1e-7): unit columns to about 1e-7
    torch.testing.assert_close(ours.weight.data.norm(dim=0), torch.ones(3, dtype=torch.float64), rtol=1e-6, atol=0)
    grads = [torch.autograd.grad(v, [xx, m.weight]) for v, xx, m in ((a, xo, ours), (b, xp, pml))]
    for g_ours, g_pml in zip(*grads):
        torch.testing.assert_close(g_ours, g_pml, rtol=1e-10, atol=1e-13)
    idx = miners.MultiSimilarityMiner()(x, y)
    for kw in (dict(labels=y, indices_tuple=idx), dict(labels=y, ref_emb=x)):
        with pytest.raises(ValueError, match="not supported"):
            ours(x, **kw)
        with pytest.raises(ValueError, match="not supported"):
            pml(x, **kw)
    with pytest.raises(ValueError, match="labels"):
        ours(x)


@pytest.mark.parametrize("name", ["ContrastiveLoss", "GeneralizedLiftedStructureLoss", "LiftedStructureLoss"])
def test_cosine_with_default_margins_is_accepted_as_pml(name, monkeypatch):
    monkeypatch.setattr(fpl._validation, "_warned_margins", set())
    x, y = batch(3)
    with pytest.warns(UserWarning, match=f"{name}: pos_margin=0 < neg_margin=1 .* order meant for the other") as w:
        ours = getattr(fpl, name)(distance=CosineSimilarity())
    assert w[0].filename == __file__  # the user's line, not ours
    with warnings.catch_warnings(record=True) as at_call:
        warnings.simplefilter("always")
        value = ours(x, y)
    assert not [m for m in at_call if "order meant" in str(m.message)], "warned once, not again by the call"
    torch.testing.assert_close(value, getattr(L, name)(distance=CosineSimilarity())(x, y), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["ContrastiveLoss", "GeneralizedLiftedStructureLoss", "LiftedStructureLoss"])
def test_margins_assigned_in_the_other_order_compile_fullgraph(name, monkeypatch):
    """The margin-order warning is not traced (torch.compile cannot): a compiled call with margins
    assigned in the other order computes, as the eager call does."""
    monkeypatch.setattr(fpl._validation, "_warned_margins", set())
    x, y = batch(4)
    module = getattr(fpl, name)()
    module.pos_margin = 1.5
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, y), module(x, y))



@pytest.mark.parametrize("name", CLASS)
def test_class_loss_accepts_the_batch_as_its_own_ref_as_pml(name):
    x, y = batch(4)
    ours, pml = make_pair(name)
    torch.testing.assert_close(ours(x, y, None, x, y), pml(x, y, None, x, y), rtol=1e-12, atol=1e-12)


def _state(module):
    """A module's PML-style surface: distance and reducer types, with collect_stats."""
    return (type(module.distance), type(module.reducer), module.collect_stats, module.distance.collect_stats)


@pytest.mark.parametrize("name", PAIR + CLASS)
def test_distance_and_reducer_are_pmls_objects(name):
    """`distance` and `reducer` are PML's objects of PML's types (so `Miner(distance=loss.distance)`
    works); the module still computes fused; its state_dict is PML's."""
    sizes = REGISTRY[name].size_kwargs(4, 8) if name in CLASS else {}
    ours, theirs = getattr(fpl, name)(**sizes), getattr(L, name)(**sizes)
    assert ours._pml is None
    assert type(ours.distance) is type(theirs.distance)
    if not isinstance(theirs.reducer, type(None)):
        assert type(ours.reducer) is type(theirs.reducer)
        if hasattr(theirs.reducer, "reducers"):  # MultipleReducers: the same sub-losses
            assert set(ours.reducer.reducers) == set(theirs.reducer.reducers)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    if name in PAIR:
        x, y = batch(3)
        mined = miners.BatchHardMiner(distance=ours.distance)(x, y)
        torch.testing.assert_close(ours(x, y, mined), theirs(x, y, mined), rtol=1e-9, atol=1e-12)


def test_collect_stats_follows_pmls_global_flag(monkeypatch):
    """PML's c_f.COLLECT_STATS: the default of collect_stats, on the loss and on its distance and
    reducer (PML's test_collect_stats_flag); True makes PML compute (it records the stats)."""
    from pytorch_metric_learning.utils import common_functions as c_f
    for flag in (True, False):
        monkeypatch.setattr(c_f, "COLLECT_STATS", flag)
        loss = fpl.TripletMarginLoss()
        assert loss.collect_stats == flag and loss.distance.collect_stats == flag and loss.reducer.collect_stats == flag
        assert (loss._pml is not None) == flag
    for flag in (True, False):
        assert fpl.TripletMarginLoss(collect_stats=flag).collect_stats == flag
    monkeypatch.setattr(fpl.losses._base, "_warned", set())
    x, y = batch(4)
    ours, theirs = fpl.ContrastiveLoss(collect_stats=True), L.ContrastiveLoss(collect_stats=True)
    with pytest.warns(UserWarning, match="computed by pytorch-metric-learning"):
        ours(x, y)
    theirs(x, y)
    assert ours._pml.collect_stats and ours.distance is ours._pml.distance and ours.reducer is ours._pml.reducer


def test_hyper_parameters_are_stored_as_pml_stores_them():
    """ArcFace's margin in radians (PML's init_margin), SoftTriple's gamma as 1 / gamma; setting them
    as PML users do changes the loss as it changes PML's."""
    x, y = batch(5)
    y = y % 3
    for name, attr, value in (("ArcFaceLoss", "margin", 0.3), ("SoftTripleLoss", "gamma", 5.0)):
        ours, theirs = getattr(fpl, name)(3, 8), getattr(L, name)(3, 8)
        assert getattr(ours, attr) == getattr(theirs, attr)
        ours.load_state_dict(theirs.state_dict())
        setattr(ours, attr, value)
        setattr(theirs, attr, value)
        torch.testing.assert_close(ours(x, y), theirs(x, y), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("margin", [1, 4, 5.7])
def test_large_margin_softmax_keeps_pml_expansion_attributes(margin):
    """PML's init_margin attributes of LargeMarginSoftmax / SphereFace (the terms of the paper's
    eq. 7), equal in value and dtype, and kept out of the state_dict as PML keeps them."""
    for name in ("LargeMarginSoftmaxLoss", "SphereFaceLoss"):
        ours, theirs = getattr(fpl, name)(3, 8, margin=margin), getattr(L, name)(3, 8, margin=margin)
        assert (ours.margin, ours.max_n) == (theirs.margin, theirs.max_n)
        for attr in ("n_range", "margin_choose_n", "cos_powers", "alternating"):
            a, b = getattr(ours, attr), getattr(theirs, attr)
            assert a.dtype == b.dtype and torch.equal(a, b), attr
        assert ours.state_dict().keys() == theirs.state_dict().keys()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_soft_triple_miner_weights_are_fused_as_pml(dtype):
    """SoftTripleLoss with a miner's indices_tuple: PML's miner weights on the fused rows (no N x C,
    no warning), values and gradients (embeddings and fc) equal to PML's."""
    import warnings
    from kit import check_close
    g = torch.Generator().manual_seed(6)
    x = torch.randn(60, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, 7, (60,), generator=g)
    idx = miners.MultiSimilarityMiner(0.1)(x, y)
    theirs = L.SoftTripleLoss(7, 16, centers_per_class=3).double()
    results = []
    for lib, dt in ((fpl, dtype), (L, dtype), (L, torch.float64)):
        loss = lib.SoftTripleLoss(7, 16, centers_per_class=3)
        loss.load_state_dict(theirs.state_dict())
        loss = loss.to(dt)
        xx = x.to(dt).requires_grad_(True)
        with warnings.catch_warnings():
            warnings.simplefilter("error" if lib is fpl else "ignore")
            value = loss(xx, y, idx)
        results.append((value, *torch.autograd.grad(value, [xx, loss.fc])))
    ours, same, truth = results
    for k, (a, b, t) in enumerate(zip(ours, same, truth)):
        check_close(a, t, b, what=["value", "grad x", "grad fc"][k], dtype=dtype)


def _same_as_pml(ours, theirs, x, y, params=()):
    """ours and PML's module on the same inputs (fp64): values and gradients (x and the named
    parameters, PML's state loaded into ours first)."""
    if params:
        ours.load_state_dict(theirs.state_dict())
    results = []
    for loss in (ours, theirs):
        xx = x.clone().requires_grad_(True)
        value = loss(xx, y)
        results.append((value, *torch.autograd.grad(value, [xx, *(getattr(loss, p) for p in params)])))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


COSINE_CLASS_OF_PML = ["CircleLoss", "TupletMarginLoss", "InstanceLoss", "ThresholdConsistentMarginLoss",
                       "CosFaceLoss", "ArcFaceLoss", "LargeMarginSoftmaxLoss", "SphereFaceLoss"]


@pytest.mark.parametrize("name", COSINE_CLASS_OF_PML)
def test_any_cosine_similarity_pml_takes_is_pmls_computation(name):
    """The losses whose PML class asserts a CosineSimilarity take every one (other power or p, a
    subclass) and give PML's number (computed by PML: not what the fused cosine gives)."""
    class MyCosine(CosineSimilarity):
        pass
    x, y = batch(3)
    sizes = REGISTRY[name].size_kwargs(3, 8) if REGISTRY[name].kind == "class" else {}
    for distance in (CosineSimilarity(power=2), CosineSimilarity(p=1), MyCosine()):
        with pytest.warns(UserWarning, match="computed by pytorch-metric-learning"):
            ours = getattr(fpl, name)(**sizes, distance=distance)
            theirs = getattr(L, name)(**sizes, distance=distance)
            _same_as_pml(ours, theirs, x, y, params=(ours._param,) if sizes else ())
        fpl.losses._base._warned.clear()


def test_snr_distance_other_than_pmls_default_is_pmls_computation():
    """SNRDistance(p=1) normalizes the rows in the L1 norm: PML's computation, not the fused SNR."""
    from pytorch_metric_learning.distances import SNRDistance
    x, y = batch(4)
    with pytest.warns(UserWarning, match="computed by pytorch-metric-learning"):
        _same_as_pml(fpl.SignalToNoiseRatioContrastiveLoss(distance=SNRDistance(p=1)),
                     L.SignalToNoiseRatioContrastiveLoss(distance=SNRDistance(p=1)), x, y)


def test_soft_triple_center_regularizer_survives_every_path():
    """SoftTriple's center regularizer: fused with PML's default SparseCentersRegularizer (PML's
    attributes kept); PML's computation with another one; and on every fallback PML gets the
    regularizer (ours: center_reg_weight as PML's SparseCentersRegularizer)."""
    from pytorch_metric_learning.reducers import SumReducer
    from pytorch_metric_learning.regularizers import SparseCentersRegularizer
    x, y = batch(5)
    C, D, K = 3, 8, 2

    def pair(reg_kwargs=None, ours_kwargs=None, **extra):
        reg = SparseCentersRegularizer(C, K, **(reg_kwargs or {}))
        theirs = L.SoftTripleLoss(C, D, centers_per_class=K, weight_regularizer=reg, weight_reg_weight=0.4, **extra)
        ours_kw = ours_kwargs if ours_kwargs is not None else dict(weight_regularizer=reg, weight_reg_weight=0.4)
        return fpl.SoftTripleLoss(C, D, centers_per_class=K, **ours_kw, **extra), theirs

    ours, theirs = pair()
    assert ours._pml is None and isinstance(ours.weight_regularizer, SparseCentersRegularizer)
    assert ours.weight_reg_weight == 0.4
    _same_as_pml(ours, theirs, x, y, params=("fc",))
    for case in (dict(reg_kwargs=dict(distance=CosineSimilarity(power=2))), dict(collect_stats=True),
                 dict(reducer=SumReducer()), dict(ours_kwargs=dict(center_reg_weight=0.4), collect_stats=True)):
        ours, theirs = pair(**case)
        assert ours._pml is not None, case
        with pytest.warns(UserWarning, match="computed by pytorch-metric-learning"):
            _same_as_pml(ours, theirs, x, y, params=("fc",))
        fpl.losses._base._warned.clear()


def test_circle_loss_has_pmls_derived_attributes():
    ours, theirs = fpl.CircleLoss(m=0.3), L.CircleLoss(m=0.3)
    assert [getattr(ours, k) for k in ("op", "on", "delta_p", "delta_n")] == [
        getattr(theirs, k) for k in ("op", "on", "delta_p", "delta_n")]


@pytest.mark.parametrize("name", [n for n, e in fpl.losses.REGISTRY.items()
                                  if e.kind == "pair" and e.cls._refuses_ref and e.in_pml])
@pytest.mark.parametrize("rows", [0, 6], ids=["empty_batch", "batch"])
def test_a_refused_ref_is_refused_also_beside_an_empty_batch(name, rows):
    """PML's losses that take no ref_emb check that before anything else: an empty batch with a ref
    raised there and returned a value here (0, or NaN)."""
    x = torch.randn(rows, 8, dtype=torch.float64)
    y = torch.arange(rows) % 2
    ref, ref_labels = torch.randn(5, 8, dtype=torch.float64), torch.arange(5) % 2
    args = (0.4, 10.0) if name == "RankedListLoss" else ()  # PML's required margin, Tn
    for module in (getattr(fpl, name)(*args), getattr(L, name)(*args)):
        with pytest.raises(ValueError, match="not supported"):
            module(x, y, ref_emb=ref, ref_labels=ref_labels)


@pytest.mark.parametrize("name", [n for n, e in fpl.losses.REGISTRY.items() if e.kind == "pair" and e.in_pml])
def test_an_empty_batch_without_labels_or_indices_raises_as_pml(name):
    """PML needs labels (or an indices_tuple) before it looks at the batch: an empty batch without
    either raised there and returned 0 (or NaN) here."""
    args = (0.4, 10.0) if name == "RankedListLoss" else ()
    if name == "NCALoss":  # PML: a batch of at most one row is its zero loss first
        assert float(fpl.NCALoss()(torch.randn(0, 8))) == float(L.NCALoss()(torch.randn(0, 8))) == 0.0
        return
    with pytest.raises(ValueError, match="labels"):
        getattr(fpl, name)(*args)(torch.randn(0, 8))
    with pytest.raises((ValueError, AttributeError, IndexError)):  # PML's check, or its computation's crash
        getattr(L, name)(*args)(torch.randn(0, 8))
