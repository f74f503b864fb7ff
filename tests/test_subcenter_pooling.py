"""SubCenterArcFaceLoss's max over sub-centers on every fused backend of this machine, where the
kit's random inputs never go: exact ties between sub-centers (duplicated columns), where PML's
torch.max sends the gradient to the first center; and its get_outliers against PML's."""
import pytest
import torch

import fused_pairloss as fpl
from fused_pairloss import functional as F

L = pytest.importorskip("pytorch_metric_learning.losses")

BACKENDS = [b for b in fpl.available_backends("cpu") if b in ("cpu", "triton")]


def tied_case(dtype):
    """Every class's sub-centers 0 and 2 identical (the max ties exactly), 1 different."""
    g = torch.Generator().manual_seed(11)
    N, D, C, K = 20, 8, 4, 3
    W = torch.randn(D, C * K, generator=g, dtype=torch.float64)
    W[:, 2::K] = W[:, 0::K]
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    # rows aligned with center 0 of their class: the tied pair is the maximum for the target
    y = torch.randint(0, C, (N,), generator=g)
    x = x + 3 * W[:, y * K].t()
    return x.to(dtype), y, W.to(dtype)


def value_and_grads(fn, x, y, W):
    xs, Ws = x.clone().requires_grad_(True), W.clone().requires_grad_(True)
    value = fn(xs, y, Ws)
    return [value.detach(), *torch.autograd.grad(value, [xs, Ws])]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_tied_sub_centers_send_the_gradient_to_the_first_as_pml(backend, dtype):
    x, y, W = tied_case(dtype)
    hyper = dict(margin=20.0, scale=8.0, sub_centers=3)

    def pml(xs, ys, Ws):
        module = L.SubCenterArcFaceLoss(num_classes=4, embedding_size=8, margin=20.0, scale=8.0, sub_centers=3)
        del module.W
        module.W = Ws
        return module(xs, ys)

    ours = value_and_grads(lambda *a: F.subcenter_arcface_loss(*a, backend=backend, **hyper), x, y, W)
    theirs = value_and_grads(pml, x, y, W)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-6)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **tol)
    grad_W = ours[2]
    assert torch.all(grad_W[:, 2::3] == 0), "the tied duplicate (center 2) gets no gradient"
    assert torch.any(grad_W[:, 0::3] != 0)


def test_get_outliers_as_pml():
    g = torch.Generator().manual_seed(12)
    ours = fpl.SubCenterArcFaceLoss(num_classes=5, embedding_size=6, sub_centers=3)
    theirs = L.SubCenterArcFaceLoss(num_classes=5, embedding_size=6, sub_centers=3)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(40, 6, generator=g)
    y = torch.randint(0, 4, (40,), generator=g)  # class 4 absent: its dominant column is not set
    got, got_centers = ours.get_outliers(x, y, threshold=60)
    want, want_centers = theirs.get_outliers(x, y, threshold=60)
    assert got.tolist() == want.tolist() and len(got) > 0
    torch.testing.assert_close(got_centers[:, :4], want_centers[:, :4], rtol=0, atol=0)
    torch.testing.assert_close(ours(x, y), theirs(x, y), rtol=1e-5, atol=1e-6)
