"""Issue #7: the reference class-level Circle loss (proxy_circle_loss / ProxyCircleLoss) against
an independent per-sample loop written from the Circle paper's unified formula (docs/semantics.md, K = 1):

    L_i = softplus( log sum_{c != y_i} exp(gamma a_n (s_n - m)) - gamma a_p (s_p - (1 - m)) ),
    a_p = relu(1 + m - s_p), a_n = relu(s_n + m), both detached;  loss = mean_i L_i.

Nothing here calls the reference's internals: the loop is the oracle.
"""
import math

import pytest
import torch

import fused_pairloss as fpl
from fused_pairloss import functional as Fn
from fused_pairloss import reference as R

TOL = {torch.float64: dict(rtol=1e-9, atol=1e-10), torch.float32: dict(rtol=3e-5, atol=3e-5)}


def _unit(v):
    return v / torch.clamp(torch.sqrt((v * v).sum()), min=1e-12)


def loop_loss(x, labels, w, m, gamma, frozen_at=None, live=False):
    """Per-sample loop in fp64 (classes vectorized within a sample). w: (D, C). Weights a_p, a_n
    are detached; with frozen_at=(x0, w0) they are taken from that point instead; with live=True
    they are not detached (the wrong loss, to show the detach matters)."""
    n, c_count = x.shape[0], w.shape[1]
    x64, w64 = x.double(), w.double()
    P = w64 / torch.clamp(torch.sqrt((w64 * w64).sum(0, keepdim=True)), min=1e-12)  # unit columns
    if frozen_at is not None:
        x0, w0 = (t.detach().double() for t in frozen_at)
        P0 = w0 / torch.clamp(torch.sqrt((w0 * w0).sum(0, keepdim=True)), min=1e-12)
    total = x64.new_zeros(())
    for i in range(n):
        y = int(labels[i])
        s = _unit(x64[i]) @ P  # (C,) similarities of sample i to every class
        if frozen_at is not None:
            s_w = _unit(x0[i]) @ P0
        else:
            s_w = s if live else s.detach()
        a_p = torch.relu(1 + m - s_w[y])
        pos_term = -gamma * a_p * (s[y] - (1 - m))
        others = torch.arange(c_count) != y
        a_n = torch.relu(s_w[others] + m)
        lse_n = torch.logsumexp(gamma * a_n * (s[others] - m), dim=0)
        total = total + torch.nn.functional.softplus(lse_n + pos_term)
    return total / n


def _inputs(n, d, c, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
    w = torch.randn(d, c, generator=g, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, c, (n,), generator=g)
    labels[0] = 0
    labels[-1] = c - 1  # the edge classes
    return x, w, labels


def _value_and_grads(fn, x, w):
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    loss = fn(x, w)
    gx, gw = torch.autograd.grad(loss, (x, w))
    return loss.detach(), gx, gw


def _check(ours, oracle, dtype, what):
    tol = TOL[dtype]
    for a, b, name in zip(ours, oracle, ("loss", "d/dembeddings", "d/dproxies")):
        scale = max(1.0, float(b.abs().max()))
        torch.testing.assert_close(a.double(), b.double(), rtol=tol["rtol"], atol=tol["atol"] * scale,
                                   msg=lambda msg: f"{what} {name}: {msg}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("n,d,c", [(1, 3, 2), (2, 4, 2), (9, 7, 3), (16, 16, 17), (12, 33, 128),
                                   (6, 12, 1000), (4, 8, 3000)])
@pytest.mark.parametrize("m,gamma", [(0.25, 256.0), (0.4, 80.0), (0.1, 16.0)])
def test_proxy_circle_vs_loop(n, d, c, m, gamma, dtype):
    x, w, labels = _inputs(n, d, c, dtype, seed=n * 31 + c)
    oracle = _value_and_grads(lambda a, b: loop_loss(a, labels, b, m, gamma), x.double(), w.double())
    ref = _value_and_grads(lambda a, b: R.proxy_circle_loss(a, labels, b, m=m, gamma=gamma), x, w)
    fun = _value_and_grads(lambda a, b: Fn.proxy_circle_loss(a, labels, b, m=m, gamma=gamma, backend="reference"), x, w)
    assert ref[0].dtype == dtype and ref[0].dim() == 0
    assert torch.isfinite(ref[0]) and all(torch.isfinite(g).all() for g in ref[1:])
    _check(ref, oracle, dtype, f"reference C={c}")
    _check(fun, oracle, dtype, f"functional C={c}")


def test_detach_matters_for_gradients():
    """The loop with live (non-detached) weights has a different gradient: the test above would
    catch a reference that forgot the detach."""
    x, w, labels = _inputs(8, 6, 5, torch.float64, seed=3)
    live = _value_and_grads(lambda a, b: loop_loss(a, labels, b, 0.25, 16.0, live=True), x, w)
    det = _value_and_grads(lambda a, b: loop_loss(a, labels, b, 0.25, 16.0), x, w)
    ref = _value_and_grads(lambda a, b: R.proxy_circle_loss(a, labels, b, m=0.25, gamma=16.0), x, w)
    torch.testing.assert_close(live[0], det[0])
    assert not torch.allclose(live[1], det[1], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ref[1], det[1])
    torch.testing.assert_close(ref[2], det[2])


@pytest.mark.parametrize("m,gamma", [(0.25, 4.0), (0.4, 2.0)])
def test_gradcheck_fp64(m, gamma):
    """gradcheck the loss whose weights are frozen at the point (its true gradient there is what
    the detached loss must return), then compare the reference's gradient to it at the point. A
    plain gradcheck of the detached reference must fail."""
    x0, w0, labels = _inputs(5, 4, 4, torch.float64, seed=11)
    frozen = lambda a, b: loop_loss(a, labels, b, m, gamma, frozen_at=(x0, w0))
    xs = (x0.clone().requires_grad_(True), w0.clone().requires_grad_(True))
    assert torch.autograd.gradcheck(frozen, xs)
    got = _value_and_grads(lambda a, b: R.proxy_circle_loss(a, labels, b, m=m, gamma=gamma), x0, w0)
    want = _value_and_grads(frozen, x0, w0)
    _check(got, want, torch.float64, "frozen-weight gradcheck")
    assert not torch.autograd.gradcheck(lambda a, b: R.proxy_circle_loss(a, labels, b, m=m, gamma=gamma), xs,
                                        raise_exception=False)


def test_far_negative_contributes_one():
    """A negative class with s_n <= -m has a_n = 0, logit 0: it adds exp(0) = 1 to the sum."""
    w = torch.tensor([[1.0, -1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)  # classes at +x, -x, +y
    x = torch.tensor([[2.0, 0.0]], dtype=torch.float64)  # on class 0: s = (1, -1, 0)
    m, gamma = 0.25, 256.0
    # pos: a_p = 0.25, term = -256*0.25*(1-0.75) = -16; negs: -1 -> 0 (logit 0); 0 -> 256*0.25*(-0.25) = -16
    lse_neg = torch.log(torch.exp(torch.tensor(0.0)) + torch.exp(torch.tensor(-16.0))).double()
    expected = torch.nn.functional.softplus(lse_neg - 16)
    got = R.proxy_circle_loss(x, torch.tensor([0]), w, m=m, gamma=gamma)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got, loop_loss(x, torch.tensor([0]), w, m, gamma))


def test_large_scale_stays_finite():
    """gamma=256 with aligned inputs: logits ~ +-240 must not overflow in fp32."""
    c, d = 50, 16
    g = torch.Generator().manual_seed(0)
    w = torch.randn(d, c, generator=g)
    labels = torch.randint(0, c, (40,), generator=g)
    x_good = w.t()[labels] + 0.01 * torch.randn(40, d, generator=g)   # near its proxy: small loss
    x_bad = w.t()[(labels + 1) % c] + 0.01 * torch.randn(40, d, generator=g)  # near a wrong proxy: huge
    for x in (x_good, x_bad):
        val, gx, gw = _value_and_grads(lambda a, b: R.proxy_circle_loss(a, labels, b), x, w)
        assert torch.isfinite(val) and torch.isfinite(gx).all() and torch.isfinite(gw).all()
        oracle = loop_loss(x.double(), labels, w.double(), 0.25, 256.0)
        torch.testing.assert_close(val.double(), oracle, rtol=1e-5, atol=1e-4)
    assert float(R.proxy_circle_loss(x_bad, labels, w)) > 100


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_module_vs_loop(dtype):
    C, D, N = 21, 10, 15
    torch.manual_seed(0)
    mod = fpl.ProxyCircleLoss(C, D, m=0.3, gamma=64.0, backend="reference")
    assert isinstance(mod.fc, torch.nn.Parameter) and tuple(mod.fc.shape) == (D, C)
    assert mod.fc.abs().sum() > 0  # initialized
    mod = mod.to(dtype)
    x, _, labels = _inputs(N, D, C, dtype, seed=5)
    xx = x.clone().requires_grad_(True)
    loss = mod(xx, labels)
    loss.backward()
    oracle = _value_and_grads(lambda a, b: loop_loss(a, labels, b, 0.3, 64.0), x.double(), mod.fc.detach().double())
    _check((loss.detach(), xx.grad, mod.fc.grad), oracle, dtype, "module")
    # the module's fc is what the functional uses as proxies
    torch.testing.assert_close(loss.detach(), Fn.proxy_circle_loss(x, labels, mod.fc.detach(), m=0.3, gamma=64.0,
                                                                   backend="reference"))


def test_module_fp64_input_with_fp32_parameter():
    """The parameter moves to the input's dtype, as every class loss's does (PML's cast_types)."""
    C, D = 6, 5
    mod = fpl.ProxyCircleLoss(C, D, backend="reference")
    x, _, labels = _inputs(7, D, C, torch.float64, seed=8)
    loss = mod(x, labels)
    assert loss.dtype == torch.float64 and mod.fc.dtype == torch.float64
    loss.backward()
    assert mod.fc.grad is not None and mod.fc.grad.dtype == torch.float64
    torch.testing.assert_close(loss.detach(), loop_loss(x, labels, mod.fc.detach().double(), 0.25, 256.0))


def test_mean_over_samples():
    """The loss is the mean of the per-sample terms: duplicating the batch leaves it unchanged,
    and it is not the sum."""
    x, w, labels = _inputs(6, 5, 4, torch.float64, seed=9)
    one = R.proxy_circle_loss(x, labels, w)
    two = R.proxy_circle_loss(torch.cat([x, x]), torch.cat([labels, labels]), w)
    torch.testing.assert_close(one, two)
    per = [float(loop_loss(x[i:i + 1], labels[i:i + 1], w, 0.25, 256.0)) for i in range(6)]
    assert math.isclose(float(one), sum(per) / 6, rel_tol=1e-10)
