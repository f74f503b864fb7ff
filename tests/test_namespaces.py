"""One import line for PML's namespaces, and our classes inside PML's wrappers (and PML's inside
ours), each equal to PML's own."""
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
