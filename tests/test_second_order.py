"""Second-order gradients (gradient penalties, meta-learning: autograd.grad(loss, x,
create_graph=True), then backward through it) of every fused loss: correct, or an error, never a
silently wrong answer (docs/design.md, "Second-order gradients"). The fused backward ops compute
first-order gradients; under create_graph the engines take the differentiable path of the
materializing oracle, so the Hessian-vector products must equal the reference backend's."""
import pytest
import torch
from torch.autograd import gradgradcheck

import fused_pairloss as fpl
from fused_pairloss.losses import multi_similarity, proxy_anchor
from kit import LOSSES, check_close, loss_case

FUSED = [b for b in ("cpu", "triton") if b in fpl.available_backends("cpu")]


def hessian_vector_products(loss, case, backend, seed=1):
    """(value, grads, H v) of one call for fixed random directions v (one per parameter)."""
    out = loss.fn(*case.args, backend=backend, **loss.kwargs)
    grads = torch.autograd.grad(out, case.params, create_graph=True)
    g = torch.Generator().manual_seed(seed)
    vs = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in case.params]
    hv = torch.autograd.grad(sum((gr * v).sum() for gr, v in zip(grads, vs)), case.params, allow_unused=True)
    return out, grads, [torch.zeros_like(p) if h is None else h for p, h in zip(case.params, hv)]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("name", list(LOSSES))
def test_hessian_vector_products_match_the_reference(name, backend):
    loss = LOSSES[name]
    modes = ["self"] if loss.kind == "class" or backend == "triton" else [m for m in ("self", "ref") if m in loss.modes]
    for mode in modes:
        case = loss_case(loss, 12, 6, torch.float64, mode=mode, seed=3)
        val, grads, hv = hessian_vector_products(loss, case, backend)
        ref_val, ref_grads, ref_hv = hessian_vector_products(loss, case, "reference")
        check_close(val, ref_val, what=f"{name} {backend} {mode} value")
        for k, (a, b) in enumerate(zip(grads, ref_grads)):
            check_close(a, b, what=f"{name} {backend} {mode} grad {k}")
        for k, (a, b) in enumerate(zip(hv, ref_hv)):
            assert b.abs().max() > 0, f"{name} {mode}: the reference's H v {k} is zero: the check would be empty"
            check_close(a, b, what=f"{name} {backend} {mode} H v {k}")


@pytest.mark.parametrize("name", list(LOSSES))
def test_backward_is_linear_in_its_seed_also_at_zero(name):
    """The backward taken with create_graph is linear in its incoming gradient also where that is 0
    (torch.autograd.functional.jvp's double-vjp, a loss weight learned from 0): d/dw <grad(w L), v>
    at w = 0 is <grad L, v>. TupletMarginLoss's acos zeroed its gradient where the seed was 0, and
    gave 0.0916 where PML gives -0.1525."""
    loss = LOSSES[name]
    case = loss_case(loss, 12, 6, torch.float64, mode="self", seed=3)
    backend = FUSED[0]
    g = torch.Generator().manual_seed(1)
    vs = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in case.params]
    weight = torch.zeros((), dtype=torch.float64, requires_grad=True)
    out = loss.fn(*case.args, backend=backend, **loss.kwargs)
    grads = torch.autograd.grad(out * weight, case.params, create_graph=True)
    (by_seed,) = torch.autograd.grad(sum((gr * v).sum() for gr, v in zip(grads, vs)), weight)
    grads = torch.autograd.grad(loss.fn(*case.args, backend=backend, **loss.kwargs), case.params)
    want = sum((gr * v).sum() for gr, v in zip(grads, vs))
    assert want != 0, f"{name}: <grad L, v> is 0: the check would be empty"
    check_close(by_seed, want, what=name)


@pytest.mark.parametrize("name", list(LOSSES))
def test_forward_mode_ad_raises(name):
    """The fused ops have no forward derivative: their outputs carried a zero tangent (MultiSimilarity's
    jvp 0.0 where PML's is -0.0396). torch.autograd.forward_ad and torch.func.jvp raise instead."""
    import torch.autograd.forward_ad as forward_ad
    loss = LOSSES[name]
    case = loss_case(loss, 12, 6, torch.float64, mode="self", seed=3)
    x, rest = case.args[0].detach(), case.args[1:]
    with pytest.raises(NotImplementedError, match="forward-mode AD"), forward_ad.dual_level():
        loss.fn(forward_ad.make_dual(x, torch.ones_like(x)), *rest, backend=FUSED[0], **loss.kwargs)
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        torch.func.jvp(lambda e: loss.fn(e, *rest, backend=FUSED[0], **loss.kwargs), (x,), (torch.ones_like(x),))


def test_forward_mode_ad_through_a_module_raises():
    import torch.autograd.forward_ad as forward_ad
    x, y = torch.randn(12, 6, dtype=torch.float64), torch.arange(12) % 3
    for module in (fpl.MultiSimilarityLoss(), fpl.TripletMarginLoss(), fpl.ArcFaceLoss(3, 6).double()):
        with pytest.raises(NotImplementedError, match="forward-mode AD"), forward_ad.dual_level():
            module(forward_ad.make_dual(x, torch.ones_like(x)), y)
    scale = torch.tensor(10.0, dtype=torch.float64)
    for module in (fpl.ClipLoss(), fpl.SigLipLoss()):
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            torch.func.jvp(lambda image: module(image, x, scale, -scale), (x,), (torch.ones_like(x),))


def test_forward_mode_ad_of_what_the_loss_does_not_read():
    """Only a tangent the fused ops would drop raises: a jvp through other inputs of a sum with a
    loss of constant inputs, and a loss the reference backend computes (backend="auto" resolved to
    it, as on a device without kernels), give PyTorch's tangents."""
    import torch.autograd.forward_ad as forward_ad
    from fused_pairloss import _backends
    x, y = torch.randn(12, 6, dtype=torch.float64), torch.arange(12) % 3
    s = torch.tensor(1.5, dtype=torch.float64)
    _, tangent = torch.func.jvp(lambda t: t * t + fpl.functional.ntxent_loss(x, y), (s,), (torch.ones_like(s),))
    assert float(tangent) == 3.0
    want = None
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(x, torch.ones_like(x))
        want = forward_ad.unpack_dual(fpl.functional.multi_similarity_loss(dual, y, backend="reference")).tangent
    real = _backends.available_backends
    try:
        _backends.available_backends = lambda device="cpu": ["reference"]
        assert _backends.resolve_backend("auto", x.device) == "reference"
        with forward_ad.dual_level():
            dual = forward_ad.make_dual(x, torch.ones_like(x))
            got = forward_ad.unpack_dual(fpl.MultiSimilarityLoss()(dual, y)).tangent
    finally:
        _backends.available_backends = real
    check_close(got, want, what="auto resolved to the reference")
    assert want != 0


def test_multi_similarity_second_order_regression():
    """The reported case: MS at N=24 fp64, where the backward op differentiated as a constant gave a
    Hessian-vector product off by 4e-3 (entries up to 3.7e-3); and gradgradcheck."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 8, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 4, (24,), generator=g)
    v = torch.randn(24, 8, generator=g, dtype=torch.float64)

    def hv(backend):
        (gx,) = torch.autograd.grad(fpl.functional.multi_similarity_loss(x, y, backend=backend), x,
                                    create_graph=True)
        return torch.autograd.grad((gx * v).sum(), x)[0]

    check_close(hv("cpu"), hv("reference"), what="MS H v")
    assert gradgradcheck(lambda e: fpl.functional.multi_similarity_loss(e, y, backend="cpu"), (x,))


@pytest.mark.parametrize("name", ["contrastive", "softtriple", "ms_mined", "ntxent"])
def test_gradgradcheck(name):
    loss = LOSSES[name]
    case = loss_case(loss, 8, 4, torch.float64, seed=5)
    others = [a for a in case.args if not any(a is p for p in case.params)]

    def fn(*params):
        it = iter(params)
        args = [next(it) if any(a is p for p in case.params) else a for a in case.args]
        return loss.fn(*args, backend="cpu", **loss.kwargs)

    assert others  # the labels
    assert gradgradcheck(fn, case.params)


@pytest.mark.parametrize("engine", ["pair", "class"])
def test_backward_ops_refuse_to_be_differentiated(engine):
    """Calling a backward op directly on inputs that need grad and differentiating its result raises
    instead of treating the op as a constant."""
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(6, 4, generator=g, dtype=torch.float64), dim=1)
    q.requires_grad_(True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    ops = torch.ops.fused_pairloss
    if engine == "pair":
        terms, flags = multi_similarity.declaration(2.0, 50.0, 0.5).pack()
        values, _, aux = ops.pair_engine_forward(q, None, labels, None, None, list(terms), flags)
        gq, _ = ops.pair_engine_backward(torch.ones_like(values), q, None, labels, None, None, values.detach(),
                                         aux, list(terms), flags, False)
    else:
        w = torch.nn.functional.normalize(torch.randn(3, 4, generator=g, dtype=torch.float64), dim=1)
        terms, flags = proxy_anchor.declaration(0.1, 32.0).pack()
        rows, cols = ops.class_engine_forward(q, w, labels, 1, list(terms), flags)
        gq, _ = ops.class_engine_backward(torch.ones_like(rows), torch.ones_like(cols), q, w, labels,
                                          rows.detach(), cols.detach(), 1, list(terms), flags, False)
    with pytest.raises(RuntimeError, match="not differentiable"):
        gq.sum().backward()


@pytest.mark.parametrize("mode", ["self", "ref"])
@pytest.mark.parametrize("cls_name,kwargs", [("MultiSimilarityLoss", {}), ("ContrastiveLoss", {}),
                                             ("TripletMarginLoss", {}), ("NTXentLoss", {}),
                                             ("MarginLoss", {})])
def test_listed_pairs_second_order_matches_pml(cls_name, kwargs, mode):
    """A miner's indices_tuple runs the listed-pairs path (ops/listed.py): its Hessian-vector
    product is PML's, with autograd.grad(inputs=...) too (which skips nodes it does not need)."""
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    from pytorch_metric_learning import miners
    g = torch.Generator().manual_seed(3)
    x = torch.randn(12, 6, generator=g, dtype=torch.float64)
    r = torch.randn(10, 6, generator=g, dtype=torch.float64)
    y, ry = torch.arange(12) % 3, torch.arange(10) % 3
    v = torch.randn(12, 6, generator=g, dtype=torch.float64)
    results = []
    for lib in (fpl.losses, pml_losses):
        xx = x.clone().requires_grad_(True)
        tup = miners.MultiSimilarityMiner(0.1)(*((x, y) if mode == "self" else (x, y, r, ry)))
        args = (xx, y, tup) if mode == "self" else (xx, y, tup, r, ry)
        out = getattr(lib, cls_name)(**kwargs)(*args)
        (grad,) = torch.autograd.grad(out, xx, create_graph=True)
        (hv,) = torch.autograd.grad((grad * v).sum(), xx)
        results.append((out, grad, hv))
    (a, ga, ha), (b, gb, hb) = results
    assert hb.abs().max() > 0
    check_close(a, b, what="value")
    check_close(ga, gb, what="grad")
    check_close(ha, hb, what="H v")


@pytest.mark.parametrize("backend", FUSED)
def test_rows_with_empty_mined_sets_have_finite_second_order(backend):
    """MultiSimilarity's miner leaves rows 1 and 6 of this batch without pairs: their log-sum-exps
    are -inf, where torch.logaddexp's second derivative is NaN; the row combinations' logaddexp
    (ops/operands.py) keeps it finite, so H v is the reference's."""
    loss = LOSSES["ms_mined"]
    case = loss_case(loss, 8, 4, torch.float64, mode="self", seed=6)
    val, grads, hv = hessian_vector_products(loss, case, backend)
    ref_val, ref_grads, ref_hv = hessian_vector_products(loss, case, "reference")
    assert torch.isfinite(hv[0]).all() and ref_hv[0].abs().max() > 0
    check_close(hv[0], ref_hv[0], what="H v")


def test_logaddexp_second_derivative_at_minus_infinity():
    from fused_pairloss.ops.operands import logaddexp
    a = torch.tensor([float("-inf"), 0.5, float("-inf"), float("nan")], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.3, float("-inf"), float("-inf"), 0.0], dtype=torch.float64, requires_grad=True)
    out = logaddexp(a, b)
    assert torch.equal(out[:3], torch.logaddexp(a, b).detach()[:3]) and torch.isnan(out[3])
    ga, gb = torch.autograd.grad(out[:2].sum(), (a, b), create_graph=True)
    assert ga.tolist()[:2] == [0.0, 1.0] and gb.tolist()[:2] == [1.0, 0.0]
    second = torch.autograd.grad((ga + 2 * gb).sum(), (a, b))
    assert all(torch.isfinite(s[:2]).all() for s in second)


@pytest.mark.parametrize("which", ["embeddings", "ref_emb"])
@pytest.mark.parametrize("cls_name", ["AngularLoss", "IntraPairVarianceLoss"])
def test_second_order_when_only_one_input_requires_grad(cls_name, which):
    """create_graph with only the embeddings or only ref_emb requiring grad: PML's H v (the
    differentiable recomputation differentiates only what is asked of it)."""
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    g = torch.Generator().manual_seed(4)
    x = torch.randn(10, 5, generator=g, dtype=torch.float64)
    r = torch.randn(9, 5, generator=g, dtype=torch.float64)
    y, ry = torch.arange(10) % 3, torch.arange(9) % 3
    v = torch.randn(*(x.shape if which == "embeddings" else r.shape), generator=g, dtype=torch.float64)
    results = []
    for lib in (fpl.losses, pml_losses):
        xx, rr = x.clone(), r.clone()
        leaf = (xx if which == "embeddings" else rr).requires_grad_(True)
        out = getattr(lib, cls_name)()(xx, y, None, rr, ry)
        (grad,) = torch.autograd.grad(out, leaf, create_graph=True)
        (hv,) = torch.autograd.grad((grad * v).sum(), leaf)
        results.append((grad, hv))
    (ga, ha), (gb, hb) = results
    assert hb.abs().max() > 0
    check_close(ga, gb, what="grad")
    check_close(ha, hb, what="H v")
