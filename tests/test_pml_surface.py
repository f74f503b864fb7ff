"""The surface PML users touch, against PML itself: losses computed from an indices_tuple alone
(labels=None), the class losses' signature, errors, weight casting and get_logits."""
import pytest
import torch

import fused_pairloss as fpl

L = pytest.importorskip("pytorch_metric_learning.losses")
from pytorch_metric_learning import miners  # noqa: E402
from pytorch_metric_learning.distances import CosineSimilarity  # noqa: E402

PAIR = ["ContrastiveLoss", "MultiSimilarityLoss", "NTXentLoss", "CircleLoss", "SupConLoss",
        "GeneralizedLiftedStructureLoss", "TripletMarginLoss"]
CLASS = ["ArcFaceLoss", "CosFaceLoss", "NormalizedSoftmaxLoss", "ProxyAnchorLoss", "SoftTripleLoss"]


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
    ours, pml = getattr(fpl, name)(3, 8, **kw), getattr(L, name)(3, 8, **kw)
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


@pytest.mark.parametrize("name", ["ContrastiveLoss", "GeneralizedLiftedStructureLoss"])
def test_cosine_with_default_margins_is_accepted_as_pml(name, monkeypatch):
    monkeypatch.setattr(fpl._validation, "_warned_margins", set())
    x, y = batch(3)
    with pytest.warns(UserWarning, match="every pair violates"):
        ours = getattr(fpl, name)(distance=CosineSimilarity())
    torch.testing.assert_close(ours(x, y), getattr(L, name)(distance=CosineSimilarity())(x, y),
                               rtol=1e-12, atol=1e-12)



@pytest.mark.parametrize("name", CLASS)
def test_class_loss_accepts_the_batch_as_its_own_ref_as_pml(name):
    x, y = batch(4)
    ours, pml = make_pair(name)
    torch.testing.assert_close(ours(x, y, None, x, y), pml(x, y, None, x, y), rtol=1e-12, atol=1e-12)
