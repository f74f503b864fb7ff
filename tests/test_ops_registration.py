"""Every fused op is a torch.library op with a fake kernel and registered autograd: opcheck it,
and check that torch.compile(fullgraph=True) traces a whole loss call on each fused backend."""
import os

import pytest
import torch

import fused_pairloss as fpl
from fused_pairloss.ops import _kinds

CPU_BUILT = fpl.build_info()["cpu"]
IN_CI = bool(os.environ.get("CI"))


def _require_cpu():
    if not CPU_BUILT:
        if IN_CI:
            pytest.fail("CI must build fused_pairloss._C: " + str(fpl.build_info()["library_error"]))
        pytest.skip("fused_pairloss._C not built: " + str(fpl.build_info()["library_error"]))


def _fused_backends(device="cpu"):
    return [b for b in fpl.available_backends(device) if b != "reference"]


def _pair_args(self_mode, mine, kind, dtype=torch.float32, n=13, m=9, d=7):
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1)
    lq = torch.randint(0, 3, (n,), generator=g)
    if self_mode:
        r, lr = None, None
    else:
        r = torch.nn.functional.normalize(torch.randn(m, d, generator=g, dtype=dtype), dim=1)
        lr = torch.randint(0, 3, (m,), generator=g)
    params = (2.0, 50.0, 0.5) if kind == _kinds.MULTI_SIMILARITY else (0.4, 80.0, 0.0)
    return q, r, lq, lr, True if self_mode else False, kind, *params, mine, 0.1


@pytest.mark.parametrize("self_mode", [True, False])
@pytest.mark.parametrize("kind,mine", [(_kinds.MULTI_SIMILARITY, False), (_kinds.MULTI_SIMILARITY, True),
                                       (_kinds.CIRCLE, False)])
def test_opcheck_pair_engine(self_mode, kind, mine):
    _require_cpu()
    from fused_pairloss.ops import pair_engine  # noqa: F401  (registers fake + autograd)

    args = list(_pair_args(self_mode, mine, kind))
    args[0] = args[0].clone().requires_grad_(True)
    if args[1] is not None:
        args[1] = args[1].clone().requires_grad_(True)
    torch.library.opcheck(torch.ops.fused_pairloss.pair_engine_forward.default, tuple(args))
    fwd = torch.ops.fused_pairloss.pair_engine_forward(*[a.detach() if torch.is_tensor(a) else a for a in args])
    lse_pos, lse_neg, _, _, min_pos, max_neg = fwd
    q, r, lq, lr = (a.detach() if torch.is_tensor(a) else a for a in args[:4])
    bwd_args = (torch.ones_like(lse_pos), torch.ones_like(lse_neg), q, r, lq, lr, lse_pos, lse_neg,
                min_pos, max_neg, *args[4:])
    torch.library.opcheck(torch.ops.fused_pairloss.pair_engine_backward.default, bwd_args)


@pytest.mark.parametrize("kind,K", [(_kinds.SOFT_TRIPLE, 1), (_kinds.SOFT_TRIPLE, 3), (_kinds.PROXY_CIRCLE, 1)])
def test_opcheck_class_engine(kind, K):
    _require_cpu()
    from fused_pairloss.ops import class_engine  # noqa: F401

    g = torch.Generator().manual_seed(1)
    n, d, c = 11, 6, 5
    q = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).requires_grad_(True)
    w = torch.nn.functional.normalize(torch.randn(c * K, d, generator=g), dim=1).requires_grad_(True)
    y = torch.randint(0, c, (n,), generator=g)
    params = (20.0, 0.1, 0.01) if kind == _kinds.SOFT_TRIPLE else (0.25, 256.0, 0.0)
    args = (q, w, y, K, kind, *params)
    torch.library.opcheck(torch.ops.fused_pairloss.class_engine_forward.default, args)
    lse, tsim = torch.ops.fused_pairloss.class_engine_forward(q.detach(), w.detach(), y, K, kind, *params)
    bwd_args = (torch.ones_like(lse), torch.ones_like(tsim), q.detach(), w.detach(), y, lse, K, kind, *params)
    torch.library.opcheck(torch.ops.fused_pairloss.class_engine_backward.default, bwd_args)


def _loss_calls(backend):
    return {
        "ms": lambda x, y, c: fpl.functional.multi_similarity_loss(x, y, backend=backend),
        "ms_mined": lambda x, y, c: fpl.functional.multi_similarity_loss(x, y, miner_epsilon=0.1, backend=backend),
        "circle": lambda x, y, c: fpl.functional.circle_loss(x, y, backend=backend),
        "softtriple": lambda x, y, c: fpl.functional.soft_triple_loss(x, y, c, centers_per_class=2, backend=backend),
        "proxycircle": lambda x, y, c: fpl.functional.proxy_circle_loss(x, y, c[:, :4], backend=backend),
    }


@pytest.mark.parametrize("loss", ["ms", "ms_mined", "circle", "softtriple", "proxycircle"])
def test_torch_compile_fullgraph(loss):
    _require_cpu()
    backends = [b for b in _fused_backends() if b == "cpu"]  # the interpreter is too slow to compile-test here
    assert backends, "the cpu backend must be available when the library is built"
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(16, 8, generator=g, requires_grad=True)
    y = torch.randint(0, 4, (16,), generator=g)
    c = torch.randn(8, 8, generator=g, requires_grad=True)
    fn = _loss_calls(backends[0])[loss]
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(x, y, c)
    ref = _loss_calls("reference")[loss](x, y, c)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    out.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
