"""The public API of docs/api.md: names, signatures (parameter names, kinds, defaults), backend
discovery, build_info, and drop-in compatibility with PML modules (fc layout, state_dicts,
positional forward arguments)."""
import inspect

import pytest
import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning.regularizers import SparseCentersRegularizer

import fused_pairloss as fpl
from fused_pairloss import functional as Fn

P = inspect.Parameter
POS = P.POSITIONAL_OR_KEYWORD
KWO = P.KEYWORD_ONLY
NODEF = P.empty


def _sig(obj):
    return [(p.name, p.kind, p.default) for p in inspect.signature(obj).parameters.values()]


def _expect(*params):
    """params: (name, default) -> POSITIONAL_OR_KEYWORD; ('*', ...) switches to KEYWORD_ONLY;
    '**kwargs' is PML's VAR_KEYWORD tail."""
    out, kind = [], POS
    for item in params:
        if item == "*":
            kind = KWO
            continue
        if item == "**kwargs":
            out.append(("kwargs", P.VAR_KEYWORD, NODEF))
            continue
        name, default = item
        out.append((name, kind, default))
    return out


PAIR_CLASSES = ["MultiSimilarityLoss", "CircleLoss", "NTXentLoss", "SupConLoss", "ContrastiveLoss",
                "GeneralizedLiftedStructureLoss", "TripletMarginLoss"]
CLASS_CLASSES = ["SoftTripleLoss", "ProxyCircleLoss", "ProxyAnchorLoss", "NormalizedSoftmaxLoss", "CosFaceLoss",
                 "ArcFaceLoss"]
FUNCTIONAL_NAMES = ["multi_similarity_loss", "circle_loss", "ntxent_loss", "supcon_loss", "contrastive_loss",
                    "generalized_lifted_structure_loss", "triplet_margin_loss", "soft_triple_loss", "proxy_circle_loss",
                    "proxy_anchor_loss", "normalized_softmax_loss", "cosface_loss", "arcface_loss"]


def test_public_names():
    for name in PAIR_CLASSES + CLASS_CLASSES + ["functional", "reference", "available_backends", "build_info"]:
        assert hasattr(fpl, name), name
        assert name in fpl.__all__, name
    for name in FUNCTIONAL_NAMES:
        assert callable(getattr(fpl.functional, name)), name
        assert callable(getattr(fpl.reference, name)), name
    for name in PAIR_CLASSES + CLASS_CLASSES:
        assert issubclass(getattr(fpl, name), torch.nn.Module)
    import fused_pairloss.functional
    import fused_pairloss.reference
    assert fpl.functional is fused_pairloss.functional and fpl.reference is fused_pairloss.reference
    assert isinstance(fpl.__version__, str)


CONSTRUCTORS = {
    fpl.MultiSimilarityLoss: _expect(("alpha", 2.0), ("beta", 50.0), ("base", 0.5), ("miner_epsilon", None),
                                     ("backend", "auto"), "**kwargs"),
    fpl.CircleLoss: _expect(("m", 0.4), ("gamma", 80.0), ("backend", "auto"), "**kwargs"),
    fpl.NTXentLoss: _expect(("temperature", 0.07), ("backend", "auto"), "**kwargs"),
    fpl.SupConLoss: _expect(("temperature", 0.1), ("backend", "auto"), "**kwargs"),
    fpl.ContrastiveLoss: _expect(("pos_margin", 0), ("neg_margin", 1), ("backend", "auto"), "**kwargs"),
    fpl.GeneralizedLiftedStructureLoss: _expect(("neg_margin", 1), ("pos_margin", 0), ("backend", "auto"),
                                                "**kwargs"),
    fpl.TripletMarginLoss: _expect(("margin", 0.05), ("swap", False), ("smooth_loss", False),
                                   ("triplets_per_anchor", "all"), ("backend", "auto"), "**kwargs"),
    fpl.SoftTripleLoss: _expect(("num_classes", NODEF), ("embedding_size", NODEF), ("centers_per_class", 10),
                                ("la", 20.0), ("gamma", 0.1), ("margin", 0.01), ("center_reg_weight", 0.0),
                                ("backend", "auto"), "**kwargs"),
    fpl.ProxyCircleLoss: _expect(("num_classes", NODEF), ("embedding_size", NODEF), ("m", 0.25), ("gamma", 256.0),
                                 ("backend", "auto")),
    fpl.ProxyAnchorLoss: _expect(("num_classes", NODEF), ("embedding_size", NODEF), ("margin", 0.1), ("alpha", 32),
                                 ("backend", "auto"), "**kwargs"),
    fpl.NormalizedSoftmaxLoss: _expect(("num_classes", NODEF), ("embedding_size", NODEF), ("temperature", 0.05),
                                       ("backend", "auto"), "**kwargs"),
    fpl.CosFaceLoss: _expect(("num_classes", NODEF), ("embedding_size", NODEF), ("margin", 0.35), ("scale", 64),
                             ("backend", "auto"), "**kwargs"),
    fpl.ArcFaceLoss: _expect(("num_classes", NODEF), ("embedding_size", NODEF), ("margin", 28.6), ("scale", 64),
                             ("backend", "auto"), "**kwargs"),
}


@pytest.mark.parametrize("cls", list(CONSTRUCTORS), ids=lambda c: c.__name__)
def test_constructor_signatures(cls):
    assert _sig(cls) == CONSTRUCTORS[cls]


@pytest.mark.parametrize("cls", [getattr(fpl, n) for n in PAIR_CLASSES], ids=lambda c: c.__name__)
def test_pair_forward_signature_is_pmls(cls):
    ours = _sig(cls.forward)
    theirs = _sig(pml_losses.BaseMetricLossFunction.forward)
    assert ours == theirs == _expect(("self", NODEF), ("embeddings", NODEF), ("labels", None),
                                     ("indices_tuple", None), ("ref_emb", None), ("ref_labels", None))


@pytest.mark.parametrize("cls", [getattr(fpl, n) for n in CLASS_CLASSES], ids=lambda c: c.__name__)
def test_class_forward_signature(cls):
    assert [n for n, _, _ in _sig(cls.forward)][:3] == ["self", "embeddings", "labels"]
    # everything after (embeddings, labels) must be optional
    assert all(d is not NODEF for _, _, d in _sig(cls.forward)[3:])


_PAIR_HEAD = (("embeddings", NODEF), ("labels", NODEF), ("ref_emb", None), ("ref_labels", None), "*")
FUNCTIONALS = {
    "multi_similarity_loss": _expect(*_PAIR_HEAD, ("alpha", 2.0), ("beta", 50.0), ("base", 0.5),
                                     ("miner_epsilon", None), ("distance", "cosine"), ("backend", "auto")),
    "circle_loss": _expect(*_PAIR_HEAD, ("m", 0.4), ("gamma", 80.0), ("backend", "auto")),
    "ntxent_loss": _expect(*_PAIR_HEAD, ("temperature", 0.07), ("distance", "cosine"), ("backend", "auto")),
    "supcon_loss": _expect(*_PAIR_HEAD, ("temperature", 0.1), ("distance", "cosine"), ("backend", "auto")),
    "contrastive_loss": _expect(*_PAIR_HEAD, ("pos_margin", 0.0), ("neg_margin", 1.0), ("distance", "lp"),
                                ("backend", "auto")),
    "generalized_lifted_structure_loss": _expect(*_PAIR_HEAD, ("neg_margin", 1.0), ("pos_margin", 0.0),
                                                 ("distance", "lp"), ("backend", "auto")),
    "triplet_margin_loss": _expect(*_PAIR_HEAD, ("margin", 0.05), ("distance", "lp"), ("swap", False),
                                   ("smooth_loss", False), ("triplets_per_anchor", "all"), ("backend", "auto")),
    "soft_triple_loss": _expect(("embeddings", NODEF), ("labels", NODEF), ("centers", NODEF), "*",
                                ("centers_per_class", 10), ("la", 20.0), ("gamma", 0.1), ("margin", 0.01),
                                ("center_reg_weight", 0.0), ("backend", "auto")),
    "proxy_circle_loss": _expect(("embeddings", NODEF), ("labels", NODEF), ("proxies", NODEF), "*",
                                 ("m", 0.25), ("gamma", 256.0), ("backend", "auto")),
    "proxy_anchor_loss": _expect(("embeddings", NODEF), ("labels", NODEF), ("proxies", NODEF), "*",
                                 ("margin", 0.1), ("alpha", 32.0), ("backend", "auto")),
    "normalized_softmax_loss": _expect(("embeddings", NODEF), ("labels", NODEF), ("W", NODEF), "*",
                                       ("temperature", 0.05), ("backend", "auto")),
    "cosface_loss": _expect(("embeddings", NODEF), ("labels", NODEF), ("W", NODEF), "*", ("margin", 0.35),
                            ("scale", 64.0), ("backend", "auto")),
    "arcface_loss": _expect(("embeddings", NODEF), ("labels", NODEF), ("W", NODEF), "*", ("margin", 28.6),
                            ("scale", 64.0), ("backend", "auto")),
}


@pytest.mark.parametrize("name", list(FUNCTIONALS))
def test_functional_signatures(name):
    assert _sig(getattr(Fn, name)) == FUNCTIONALS[name]


def test_functional_hyperparameters_are_keyword_only():
    x, y = torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2])
    with pytest.raises(TypeError):
        Fn.multi_similarity_loss(x, y, None, None, 2.0)
    with pytest.raises(TypeError):
        Fn.circle_loss(x, y, None, None, 0.4)


def test_defaults_match_pml():
    """Constructor defaults equal PML 2.9's (the drop-in promise), for every loss PML has."""
    for name in PAIR_CLASSES + CLASS_CLASSES:
        if name == "ProxyCircleLoss":  # no PML counterpart
            continue
        ours = inspect.signature(getattr(fpl, name)).parameters
        theirs = inspect.signature(getattr(pml_losses, name)).parameters
        for n, p in theirs.items():
            if p.kind in (P.VAR_KEYWORD, P.VAR_POSITIONAL):
                continue
            assert n in ours, (name, n)
            assert ours[n].default == p.default, (name, n, ours[n].default, p.default)
    assert inspect.signature(pml_miners.MultiSimilarityMiner).parameters["epsilon"].default == 0.1


# ----------------------------------------------------------------------------------------------
# backends and build info
# ----------------------------------------------------------------------------------------------
def test_available_backends():
    for dev in ("cpu", torch.device("cpu"), torch.zeros(1)):
        avail = fpl.available_backends(dev)
        assert isinstance(avail, list)
        assert "reference" in avail
        assert set(avail) <= {"reference", "cpu", "triton", "cuda"}
        assert len(set(avail)) == len(avail)
        assert "cuda" not in avail  # never for CPU tensors
    assert fpl.available_backends() == fpl.available_backends("cpu")
    if not torch.cuda.is_available():
        assert fpl.available_backends("cuda") == ["reference"]


def test_build_info():
    info = fpl.build_info()
    assert isinstance(info, dict)
    for key in ("cpu", "cuda", "cuda_arch_list", "torch", "triton"):
        assert key in info, key
    assert isinstance(info["cpu"], bool) and isinstance(info["cuda"], bool)
    assert info["torch"] == torch.__version__
    assert info["cpu"] == ("cpu" in fpl.available_backends("cpu"))
    if not info["cuda"]:
        assert "cuda" not in fpl.available_backends("cuda")


# ----------------------------------------------------------------------------------------------
# drop-in compatibility with PML modules
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("C,D,K", [(5, 8, 10), (3, 4, 1), (7, 3, 2)])
def test_soft_triple_fc_layout_and_init_match_pml(C, D, K):
    torch.manual_seed(123)
    theirs = pml_losses.SoftTripleLoss(C, D, centers_per_class=K)
    torch.manual_seed(123)
    ours = fpl.SoftTripleLoss(C, D, centers_per_class=K)
    assert isinstance(ours.fc, torch.nn.Parameter)
    assert tuple(ours.fc.shape) == tuple(theirs.fc.shape) == (D, C * K)
    assert ours.fc.dtype == theirs.fc.dtype == torch.float32
    # same init (kaiming_uniform_(a=sqrt(5)) on the same shape, same RNG draws)
    assert torch.equal(ours.fc, theirs.fc)
    assert [n for n, _ in ours.named_parameters()] == ["fc"]


def test_soft_triple_state_dict_round_trip_with_pml():
    theirs = pml_losses.SoftTripleLoss(6, 5, centers_per_class=3,
                                       weight_regularizer=SparseCentersRegularizer(6, 3), weight_reg_weight=0.2)
    ours = fpl.SoftTripleLoss(6, 5, centers_per_class=3, center_reg_weight=0.2, backend="reference")
    assert set(ours.state_dict()) == set(theirs.state_dict()) == {"fc"}
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert torch.equal(ours.fc, theirs.fc)
    with torch.no_grad():
        ours.fc.mul_(2.0).add_(0.1)
    back = pml_losses.SoftTripleLoss(6, 5, centers_per_class=3)
    back.load_state_dict(ours.state_dict(), strict=True)
    assert torch.equal(back.fc, ours.fc)
    x = torch.randn(9, 5)
    y = torch.randint(0, 6, (9,))
    torch.testing.assert_close(ours(x, y), _pml_st_loaded(ours, x, y))


def _pml_st_loaded(ours, x, y):
    t = pml_losses.SoftTripleLoss(6, 5, centers_per_class=3, weight_regularizer=SparseCentersRegularizer(6, 3),
                                  weight_reg_weight=0.2)
    t.load_state_dict(ours.state_dict())
    return t(x, y)


def test_soft_triple_wrong_state_dict_shape_is_rejected():
    ours = fpl.SoftTripleLoss(6, 5, centers_per_class=3)
    with pytest.raises(RuntimeError, match="fc"):
        ours.load_state_dict(pml_losses.SoftTripleLoss(6, 5, centers_per_class=2).state_dict())


def test_proxy_circle_fc():
    mod = fpl.ProxyCircleLoss(11, 7)
    assert isinstance(mod.fc, torch.nn.Parameter) and tuple(mod.fc.shape) == (7, 11)
    assert set(mod.state_dict()) == {"fc"}
    mod2 = fpl.ProxyCircleLoss(11, 7)
    mod2.load_state_dict(mod.state_dict(), strict=True)
    assert torch.equal(mod.fc, mod2.fc)


@pytest.mark.parametrize("kind", ["ms", "circle"])
def test_pair_modules_accept_pml_positional_forward(kind):
    ours = (fpl.MultiSimilarityLoss if kind == "ms" else fpl.CircleLoss)(backend="reference")
    theirs = pml_losses.MultiSimilarityLoss() if kind == "ms" else pml_losses.CircleLoss()
    g = torch.Generator().manual_seed(0)
    x, r = torch.randn(12, 5, generator=g), torch.randn(9, 5, generator=g)
    y, ry = torch.randint(0, 3, (12,), generator=g), torch.randint(0, 3, (9,), generator=g)
    calls = [
        ((x, y), {}),
        ((x, y, None), {}),
        ((x, y, None, r, ry), {}),
        ((x,), dict(labels=y)),
        ((x, y), dict(ref_emb=r, ref_labels=ry)),
        ((), dict(embeddings=x, labels=y, indices_tuple=None, ref_emb=r, ref_labels=ry)),
    ]
    for args, kw in calls:
        a, b = ours(*args, **kw), theirs(*args, **kw)
        assert a.dim() == 0
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6)
    # indices_tuple in the third position, as PML's miners are used
    it = pml_miners.MultiSimilarityMiner(0.1)(x, y)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(ours(x, y, it), theirs(x, y, it), rtol=2e-5, atol=1e-6)


def test_miner_epsilon_replaces_pml_miner_plus_loss():
    # exact-dot-product inputs (docs/design.md): entries in {-1, 0, 1}, 4 nonzeros per row -> norm 2
    g = torch.Generator().manual_seed(1)
    x = torch.zeros(30, 16)
    for i in range(30):
        idx = torch.randperm(16, generator=g)[:4]
        x[i, idx] = (torch.randint(0, 2, (4,), generator=g) * 2 - 1).float()
    y = torch.randint(0, 4, (30,), generator=g)
    theirs = pml_losses.MultiSimilarityLoss()(x, y, pml_miners.MultiSimilarityMiner(0.1)(x, y))
    ours = fpl.MultiSimilarityLoss(miner_epsilon=0.1, backend="reference")(x, y)
    torch.testing.assert_close(ours, theirs)
    assert not torch.allclose(ours, fpl.MultiSimilarityLoss(backend="reference")(x, y))


@pytest.mark.parametrize("cls,args", [(fpl.SoftTripleLoss, (4, 5)), (fpl.ProxyCircleLoss, (4, 5))],
                         ids=["SoftTriple", "ProxyCircle"])
def test_class_modules_forward_and_train(cls, args):
    mod = cls(*args, backend="reference")
    x = torch.randn(8, 5, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    loss = mod(x, y)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    loss.backward()
    assert x.grad is not None and mod.fc.grad is not None and mod.fc.grad.abs().sum() > 0
    # keyword call as PML users write it
    torch.testing.assert_close(mod(embeddings=x, labels=y), loss.detach())


def test_modules_repr_and_backend_attribute():
    for mod in (fpl.MultiSimilarityLoss(), fpl.CircleLoss(), fpl.SoftTripleLoss(2, 3), fpl.ProxyCircleLoss(2, 3)):
        assert mod.backend == "auto"
        assert "backend='auto'" in repr(mod)
    assert "miner_epsilon=0.2" in repr(fpl.MultiSimilarityLoss(miner_epsilon=0.2))


# ----------------------------------------------------------------------------------------------
# PML's keyword arguments and the new modules
# ----------------------------------------------------------------------------------------------
from pytorch_metric_learning import distances as pml_distances  # noqa: E402
from pytorch_metric_learning import reducers as pml_reducers  # noqa: E402


@pytest.mark.parametrize("name,kw", [("MultiSimilarityLoss", {}), ("NTXentLoss", {}), ("SupConLoss", {}),
                                     ("ContrastiveLoss", {}), ("GeneralizedLiftedStructureLoss", {})])
@pytest.mark.parametrize("distance", ["default", "cosine", "lp", "dot"])
def test_pair_modules_with_pml_distances_are_fused_and_equal_pml(name, kw, distance):
    dist = {"default": None, "cosine": pml_distances.CosineSimilarity(), "lp": pml_distances.LpDistance(),
            "dot": pml_distances.DotProductSimilarity()}[distance]
    if name in ("ContrastiveLoss", "GeneralizedLiftedStructureLoss") and distance in ("cosine", "dot"):
        kw = dict(pos_margin=0.9, neg_margin=0.1)
    extra = {} if dist is None else {"distance": dist}
    ours = getattr(fpl, name)(backend="cpu", **kw, **extra)
    theirs = getattr(pml_losses, name)(**kw, **extra)
    assert ours._pml is None and ours._distance_kind in ("cosine", "lp")
    assert type(ours.distance) is type(theirs.distance)  # PML's object, as PML's class has it
    g = torch.Generator().manual_seed(4)
    x = torch.randn(30, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 6, (30,), generator=g)
    torch.testing.assert_close(ours(x, y), theirs(x, y), rtol=1e-9, atol=1e-12)


def test_unfused_pml_arguments_go_to_pml_with_one_warning(monkeypatch):
    monkeypatch.setattr(fpl.losses._base, "_warned", set())
    reducer = pml_reducers.SumReducer()
    ours = fpl.NTXentLoss(reducer=reducer)
    theirs = pml_losses.NTXentLoss(reducer=pml_reducers.SumReducer())
    assert ours._pml is not None
    x, y = torch.randn(20, 5), torch.randint(0, 4, (20,))
    with pytest.warns(UserWarning, match="pytorch-metric-learning itself"):
        a = ours(x, y)
    torch.testing.assert_close(a, theirs(x, y))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours(x, y)  # once
    # an Lp distance with p=1 is not PML's default LpDistance: computed by PML too
    assert fpl.MultiSimilarityLoss(distance=pml_distances.LpDistance(p=1))._pml is not None


def test_cosine_only_losses_reject_other_distances():
    for cls in (fpl.CircleLoss, fpl.CosFaceLoss, fpl.ArcFaceLoss):
        args = () if cls is fpl.CircleLoss else (4, 5)
        with pytest.raises(ValueError, match="distance"):
            cls(*args, distance=pml_distances.LpDistance())


def test_soft_triple_pml_regularizer_is_fused():
    reg = SparseCentersRegularizer(6, 3)
    ours = fpl.SoftTripleLoss(6, 5, centers_per_class=3, weight_regularizer=reg, weight_reg_weight=0.3,
                              backend="cpu")
    assert ours._pml is None and ours.center_reg_weight == 0.3
    theirs = pml_losses.SoftTripleLoss(6, 5, centers_per_class=3, weight_regularizer=SparseCentersRegularizer(6, 3),
                                       weight_reg_weight=0.3)
    theirs.load_state_dict(ours.state_dict())
    x, y = torch.randn(12, 5), torch.randint(0, 6, (12,))
    torch.testing.assert_close(ours(x, y), theirs(x, y), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="not both"):
        fpl.SoftTripleLoss(6, 5, centers_per_class=3, center_reg_weight=0.1,
                           weight_regularizer=pml_reducers.MeanReducer())


@pytest.mark.parametrize("name,param,shape", [("ProxyAnchorLoss", "proxies", (7, 5)),
                                              ("NormalizedSoftmaxLoss", "W", (5, 7)), ("CosFaceLoss", "W", (5, 7)),
                                              ("ArcFaceLoss", "W", (5, 7))])
def test_class_modules_parameter_layout_init_and_state_dict_match_pml(name, param, shape):
    torch.manual_seed(9)
    theirs = getattr(pml_losses, name)(7, 5)
    torch.manual_seed(9)
    ours = getattr(fpl, name)(7, 5, backend="cpu")
    p = getattr(ours, param)
    assert isinstance(p, torch.nn.Parameter) and tuple(p.shape) == shape
    assert set(ours.state_dict()) == set(theirs.state_dict()) == {param}
    assert torch.equal(p, getattr(theirs, param))  # PML's weight_init_func on the same draws
    with torch.no_grad():
        p.mul_(1.5)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(16, 5, dtype=torch.float32)
    y = torch.randint(0, 7, (16,))
    torch.testing.assert_close(ours(x, y), theirs(x, y), rtol=2e-5, atol=2e-5)
    ours.load_state_dict(theirs.state_dict(), strict=True)
