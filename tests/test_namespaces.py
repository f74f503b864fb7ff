"""One import line for PML's namespaces, and our classes inside PML's wrappers (and PML's inside
ours), each equal to PML's own."""
import importlib

import pytest
import torch

import fused_pairloss as fpl

L = pytest.importorskip("pytorch_metric_learning.losses")
from pytorch_metric_learning import miners as pml_miners  # noqa: E402
from pytorch_metric_learning import reducers as pml_reducers  # noqa: E402


def test_one_import_line_gives_pml_namespaces():
    from fused_pairloss import distances, losses, miners, reducers, regularizers

    for name, entry in fpl.losses.REGISTRY.items():
        assert getattr(losses, name) is entry.cls, name
    assert losses.CrossBatchMemory is fpl.CrossBatchMemory
    assert losses.VICRegLoss is L.VICRegLoss  # a loss we lack: PML's own
    assert miners.BatchHardMiner is not pml_miners.BatchHardMiner  # ours (tests/test_miners.py)
    assert miners.HDCMiner is pml_miners.HDCMiner
    assert reducers.MeanReducer is pml_reducers.MeanReducer
    assert distances.LpDistance.__module__.startswith("pytorch_metric_learning")
    assert regularizers.LpRegularizer.__module__.startswith("pytorch_metric_learning")
    assert "VICRegLoss" in dir(losses) and "TripletMarginLoss" in dir(losses)
    with pytest.raises(AttributeError, match="neither fused_pairloss nor pytorch_metric_learning.losses"):
        losses.NoSuchLoss  # noqa: B018


def batch(seed=0, n=24, d=8, classes=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64).requires_grad_(True)
    return x, torch.randint(0, classes, (n,), generator=g)


def value_and_grad(fn, x):
    out = fn()
    (g,) = torch.autograd.grad(out, x)
    return out, g


@pytest.mark.parametrize("wrapper", ["multiple", "cross_batch_memory", "self_supervised"])
def test_ours_inside_pml_wrappers(wrapper):
    x, y = batch()
    if wrapper == "multiple":
        make = (lambda lib: L.MultipleLosses([lib.ContrastiveLoss(), lib.TripletMarginLoss(0.2)], weights=[1, 0.5]))
        args = (x, y)
    elif wrapper == "cross_batch_memory":
        make = (lambda lib: L.CrossBatchMemory(lib.TripletMarginLoss(0.2), 8, memory_size=32))
        args = (x, y)
    else:
        make = (lambda lib: L.SelfSupervisedLoss(lib.NTXentLoss()))
        x2 = (x.detach() + 0.1).requires_grad_(False)
        args = (x, x2)
    ours, g = value_and_grad(lambda: make(fpl)(*args), x)
    theirs, g_pml = value_and_grad(lambda: make(L)(*args), x)
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g, g_pml, rtol=1e-9, atol=1e-12)


def test_pml_loss_inside_our_cross_batch_memory():
    x, y = batch(1)
    ours, g = value_and_grad(lambda: fpl.CrossBatchMemory(L.TripletMarginLoss(0.2), 8, memory_size=32)(x, y), x)
    theirs, g_pml = value_and_grad(lambda: L.CrossBatchMemory(L.TripletMarginLoss(0.2), 8, memory_size=32)(x, y), x)
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g, g_pml, rtol=1e-9, atol=1e-12)


def test_star_imports_stand_for_pmls():
    """`from fused_pairloss.<namespace> import *` gives what PML's star import gives (its classes),
    ours where we have them: a module __getattr__ takes no part in a star import."""
    import inspect
    for namespace in ("losses", "miners", "distances", "reducers", "regularizers"):
        ours, pml = {}, {}
        exec(f"from fused_pairloss.{namespace} import *", ours)
        exec(f"from pytorch_metric_learning.{namespace} import *", pml)
        classes = {k for k, v in pml.items() if inspect.isclass(v)}
        assert classes <= set(ours), (namespace, classes - set(ours))
    star = {}
    exec("from fused_pairloss.losses import *", star)
    assert star["CrossBatchMemory"] is fpl.CrossBatchMemory and star["TripletMarginLoss"] is fpl.TripletMarginLoss
    assert star["MultipleLosses"] is importlib.import_module("pytorch_metric_learning.losses").MultipleLosses


def test_pmls_defaults_and_set_reducer_on_our_losses():
    """get_default_reducer / get_default_distance / sub_loss_names are PML's class's (its set_reducer
    and zero_losses read them from the instance): TripletMarginLoss().set_reducer(None) gave 0.212
    (the base class's MeanReducer) where PML gives 0.382; ContrastiveLoss's raised."""
    from pytorch_metric_learning.reducers import SumReducer
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (12,), generator=g)
    for name in ("TripletMarginLoss", "ContrastiveLoss", "MarginLoss", "NTXentLoss", "ProxyAnchorLoss"):
        args = (3, 6) if name == "ProxyAnchorLoss" else ()
        ours, pml = getattr(fpl, name)(*args).double(), getattr(L, name)(*args).double()
        assert type(ours.get_default_reducer()) is type(pml.get_default_reducer()), name
        assert type(ours.get_default_distance()) is type(pml.get_default_distance()), name
        assert ours.sub_loss_names() == pml.sub_loss_names(), name
        if args:
            continue
        for reducer in (None, SumReducer()):
            ours.set_reducer(reducer)
            pml.set_reducer(reducer)
            torch.testing.assert_close(ours(x, y), pml(x, y), msg=f"{name} set_reducer({reducer})")


def test_a_users_subclass_overrides_as_in_pml():
    """PML's extension points on a subclass of ours: compute_loss (PML's forward calls it),
    get_default_distance / get_default_reducer (the constructor's defaults); they were ignored."""
    from pytorch_metric_learning import distances, reducers
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (12,), generator=g)

    def overriding(base):
        class Constant(base):
            def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
                return {"loss": {"losses": embeddings.sum() * 0 + 123.0, "indices": None,
                                 "reduction_type": "already_reduced"}}

        class Cosine(base):
            def get_default_distance(self):
                return distances.CosineSimilarity()

        class Summed(base):
            def get_default_reducer(self):
                return reducers.SumReducer()
        return Constant, Cosine, Summed

    for ours, pml in zip(overriding(fpl.ContrastiveLoss), overriding(L.ContrastiveLoss)):
        a, b = ours(), pml()
        assert type(a.distance) is type(b.distance) and type(a.reducer) is type(b.reducer), ours.__name__
        torch.testing.assert_close(a(x, y), b(x, y), msg=ours.__name__)


def _constructor_kwargs(name):
    entry = fpl.losses.REGISTRY[name]
    if entry.kind == "class":
        return entry.size_kwargs(3, 6)
    return dict(margin=0.4, Tn=2.0) if name == "RankedListLoss" else {}


def _as_pmls_twin(name, ours_cls, pml_cls, seed):
    """A user's subclass of our `name` and its twin subclass of PML's, built alike (PML's weights
    loaded from ours): their values and gradients (the batch's, the weights') equal on a batch.
    Returns (ours, pml, ours' value, the value of our plain class with the same weights, the batch)."""
    kwargs = _constructor_kwargs(name)
    ours, pml = ours_cls(**kwargs).double(), pml_cls(**kwargs).double()
    plain = fpl.losses.REGISTRY[name].cls(**kwargs).double()
    if list(ours.state_dict()):
        pml.load_state_dict(ours.state_dict())
        plain.load_state_dict(ours.state_dict())
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(12, 6, generator=g, dtype=torch.float64).requires_grad_(True)
    y = torch.arange(12) % 3
    values, grads = [], []
    for loss in (ours, pml):
        value = loss(x, y)
        values.append(value)
        grads.append(torch.autograd.grad(value, [x, *loss.parameters()]))
    torch.testing.assert_close(values[0], values[1], msg=name)
    for ga, gb in zip(*grads):
        torch.testing.assert_close(ga, gb, msg=name)
    return ours, pml, values[0], plain(x, y), (x, y)


PML_LOSS_NAMES = [n for n, e in fpl.losses.REGISTRY.items() if e.in_pml and e.kind in ("pair", "class")]


@pytest.mark.parametrize("name", PML_LOSS_NAMES)
def test_a_users_compute_loss_through_super_is_pmls(name):
    """A user's compute_loss that wraps super().compute_loss (PML's usual extension): PML's class's
    computation on our module (it raised NotImplementedError)."""
    def doubling(base):
        class Doubled(base):
            def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
                out = super().compute_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)
                return {k: dict(v, losses=v["losses"] * 2) for k, v in out.items()}
        return Doubled

    _, _, value, plain, _ = _as_pmls_twin(name, doubling(fpl.losses.REGISTRY[name].cls), doubling(getattr(L, name)), 1)
    if plain != 0:  # the override is the user's: twice the loss (SmoothAP: PML's fp32)
        tol = dict(rtol=1e-5, atol=1e-6) if value.dtype == torch.float32 else {}
        torch.testing.assert_close(value.double(), 2 * plain, msg=name, **tol)


def _scaled_logits(self, logits, embeddings):
    return logits * 2.0


def _half_target_cosine(self, cosine_of_target_classes):
    return cosine_of_target_classes * 0.5


def _thrice_positive_distances(self, pair_dists, pos_or_neg):
    return pair_dists * 3.0 if pos_or_neg == "pos" else pair_dists * 0.5


def _halved_logits(self, embeddings):
    return super(type(self), self).get_logits(embeddings) * 0.5


def _mean_of_positives(self, mat, pos_mask, neg_mask):
    return {"loss": {"losses": (mat * pos_mask).sum() / pos_mask.sum(), "indices": None,
                     "reduction_type": "already_reduced"}}


def _twice_the_pair_loss(self, pair_dists, pos_or_neg):
    return 2 * super(type(self), self).get_per_pair_loss(pair_dists, pos_or_neg)


def _half_the_scaled_logits(self, logits, embeddings):
    return 0.5 * super(type(self), self).scale_logits(logits, embeddings)


def _twice_the_rows(self, mat, pos_mask, neg_mask):
    out = super(type(self), self)._compute_loss(mat, pos_mask, neg_mask)
    return {k: dict(v, losses=2 * v["losses"]) for k, v in out.items()}


@pytest.mark.parametrize("name, hook, method", [
    ("CosFaceLoss", "scale_logits", _scaled_logits),
    ("ArcFaceLoss", "modify_cosine_of_target_classes", _half_target_cosine),
    ("ContrastiveLoss", "get_per_pair_loss", _thrice_positive_distances),
    ("SoftTripleLoss", "get_logits", _halved_logits),
    ("MultiSimilarityLoss", "_compute_loss", _mean_of_positives),
    ("ContrastiveLoss", "get_per_pair_loss", _twice_the_pair_loss),
    ("CosFaceLoss", "scale_logits", _half_the_scaled_logits),
    ("MultiSimilarityLoss", "_compute_loss", _twice_the_rows),
])
def test_a_users_override_of_what_pmls_compute_loss_calls(name, hook, method):
    """A subclass of ours overriding a method PML's compute_loss calls (scale_logits,
    get_per_pair_loss, ...) computes as PML's subclass does (the override was ignored); one that
    calls super().<hook> reaches PML's (the 'super' object had none); a class loss's get_logits
    applies the user's override."""
    entry = fpl.losses.REGISTRY[name]
    ours, pml, value, plain, (x, _) = _as_pmls_twin(name, type("Users", (entry.cls,), {hook: method}),
                                                    type("Users", (getattr(L, name),), {hook: method}), 2)
    assert not torch.allclose(value, plain), "the override changes the loss"
    if entry.kind == "class":
        torch.testing.assert_close(ours.get_logits(x), pml.get_logits(x))


def test_a_users_own_getattr_and_subclasses_of_a_users_class():
    """A user's own __getattr__ (delegating to nn.Module's) keeps PML's attributes reachable, and so
    does a subclass of the user's class; a subclass of ProxyCircleLoss (no PML class) overriding
    _sub_loss_names computes (it raised NotImplementedError)."""
    def users(base):
        class Users(base):
            def __getattr__(self, name):
                return 2.0 if name == "extra_scale" else super().__getattr__(name)

            def get_per_pair_loss(self, pair_dists, pos_or_neg):
                return super().get_per_pair_loss(pair_dists, pos_or_neg) * self.extra_scale

        class Deeper(Users):
            pass
        return Users, Deeper

    x, y = batch(5, n=10, d=4)
    for ours, pml in zip(users(fpl.losses.ContrastiveLoss), users(L.ContrastiveLoss)):
        torch.testing.assert_close(ours()(x, y), pml()(x, y), msg=ours.__name__)

    class Renamed(fpl.losses.ProxyCircleLoss):
        def _sub_loss_names(self):
            return ["loss"]
    torch.manual_seed(0)
    plain = fpl.losses.ProxyCircleLoss(num_classes=3, embedding_size=4)
    renamed = Renamed(num_classes=3, embedding_size=4)
    renamed.load_state_dict(plain.state_dict())
    torch.testing.assert_close(renamed(x, y % 3), plain(x, y % 3))
