"""Concurrency and state: the losses called from several Python threads at once give the bits of the
same calls made one at a time; under CPU autocast (bf16) each loss returns PML's value dtype and
PML's value to bf16 accuracy; torch.no_grad / inference mode give the grad-mode value without a
graph; the class-loss modules keep working after moves between dtypes (and to "meta" where PML's
do), and their state_dicts load across dtypes."""
import threading
import warnings

import pytest
import torch

import fused_pairloss as fpl
from fused_pairloss.losses import REGISTRY
from kit import LOSSES, Loss, LossCase, check_close, loss_case, run_loss
from kit import balanced_labels as kit_balanced_labels

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
from pytorch_metric_learning import distances as pml_distances  # noqa: E402
from pytorch_metric_learning import miners as pml_miners  # noqa: E402
from pytorch_metric_learning import regularizers as pml_regularizers  # noqa: E402

FUSED = [b for b in ("cpu", "triton") if b in fpl.available_backends("cpu")]
THREADS = 4
# the Triton interpreter runs numpy per block: a few losses that cover the engines' paths (pair
# with mining, pair with LSE + sum, pooled class rows, class columns)
TRITON_THREAD_LOSSES = ("ms_mined", "supcon", "softtriple", "proxyanchor")
CLASS_MODULES = tuple(name for name, entry in REGISTRY.items() if entry.kind == "class")


# ---- (a) threads ---------------------------------------------------------------------------------
def _bitwise_equal(a, b):
    value_a, grads_a = a
    value_b, grads_b = b
    return torch.equal(value_a, value_b) and all(torch.equal(x, y) for x, y in zip(grads_a, grads_b))


@pytest.mark.parametrize("backend", FUSED)
def test_threads_give_the_bits_of_one_call_at_a_time(backend):
    """Each thread runs every loss (value and gradients) on its own inputs, all threads released at
    once; the results are bitwise those of the same calls made sequentially beforehand."""
    names = list(LOSSES) if backend == "cpu" else list(TRITON_THREAD_LOSSES)
    n, rounds = (24, 3) if backend == "cpu" else (10, 1)
    cases = {(t, name): loss_case(LOSSES[name], n, 8, torch.float32, seed=100 * t + k)
             for t in range(THREADS) for k, name in enumerate(names)}
    expected = {key: run_loss(LOSSES[key[1]], case, backend) for key, case in cases.items()}
    for _ in range(rounds):
        got, errors = {}, []
        start = threading.Barrier(THREADS)

        def work(t):
            try:
                start.wait()
                for name in names:
                    got[(t, name)] = run_loss(LOSSES[name], cases[(t, name)], backend)
            except Exception as e:  # reported below, with the thread's loss
                errors.append((t, repr(e)))

        threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=120)
        assert not any(th.is_alive() for th in threads), "a thread did not finish"
        assert not errors, errors
        differ = [key for key in expected if not _bitwise_equal(got[key], expected[key])]
        assert not differ, f"{backend}: results differ from one call at a time: {differ}"


# ---- PML's module for a kit loss ---------------------------------------------------------------------
def _pml_kwargs(loss):
    kw = {k: v for k, v in loss.kwargs.items() if k not in ("miner_epsilon", "center_reg_weight")}
    if "distance" in kw:
        kw["distance"] = pml_distances.LpDistance() if kw["distance"] == "lp" else pml_distances.CosineSimilarity()
    return kw


def modules_for(loss, num_classes, d):
    """(our module, PML's module or None, PML's miner or None) with the same parameter."""
    cls_kw = {k: v for k, v in loss.kwargs.items() if k != "distance"}
    if "distance" in loss.kwargs:
        cls_kw["distance"] = _pml_kwargs(loss)["distance"]
    sizes = loss.entry.size_kwargs(num_classes, d) if loss.kind == "class" else {}
    ours = loss.entry.cls(**sizes, **cls_kw)
    if not loss.entry.in_pml:
        return ours, None, None
    pml_kw = _pml_kwargs(loss)
    if "center_reg_weight" in loss.kwargs:  # SoftTriple's fused regularizer is PML's SparseCentersRegularizer
        pml_kw.update(weight_regularizer=pml_regularizers.SparseCentersRegularizer(num_classes,
                                                                                  loss.centers_per_class),
                      weight_reg_weight=loss.kwargs["center_reg_weight"])
    pml = getattr(pml_losses, loss.entry.pml_name)(**sizes, **pml_kw)
    if loss.kind == "class":
        pml.load_state_dict(ours.state_dict())
    miner = None
    if "miner_epsilon" in loss.kwargs:
        miner = pml_miners.MultiSimilarityMiner(loss.kwargs["miner_epsilon"], distance=pml_kw.get("distance"))
    return ours, pml, miner


def _value_and_grads(module, x, y, leaves, miner=None):
    x = x.clone().requires_grad_(True)
    idx = None if miner is None else miner(x, y)
    value = module(x, y) if idx is None else module(x, y, idx)
    grads = torch.autograd.grad(value, [x, *leaves], allow_unused=True)
    return value, [torch.zeros_like(p) if g is None else g for p, g in zip([x, *leaves], grads)]


# ---- (b) autocast --------------------------------------------------------------------------------
# the kit's losses with a PML class, and the cosine lifted structure (PML: a bf16 value too); not
# NCA with the cosine, which PML cannot run under bf16 autocast (its fill_diagonal_ of fp32's
# lowest value into the bf16 similarity matrix overflows)
AUTOCAST_LOSSES = {**{n: l for n, l in LOSSES.items() if l.entry.in_pml and n != "nca_cos"},
                   "lifted_cos": Loss("lifted_cos", "GeneralizedLiftedStructureLoss",
                                      dict(distance="cosine", pos_margin=0.8, neg_margin=0.2))}


@pytest.mark.parametrize("name", list(AUTOCAST_LOSSES))
def test_autocast_bf16_returns_what_pml_returns(name):
    """Under torch.autocast("cpu", bfloat16) PML computes its similarity matrix in bf16: the value
    is bf16 for the cosine pair losses that reduce it directly, the input dtype otherwise. Ours:
    the same dtype, the value and gradients within the kit's bf16 rule of the fp64 truth (at least
    as close as PML's, plus the bf16 floor)."""
    loss = AUTOCAST_LOSSES[name]
    n, d, num_classes = 24, 8, 5
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, d, generator=g)
    y = kit_balanced_labels(n) if loss.balanced_labels else \
        torch.randint(0, num_classes if loss.kind == "class" else 4, (n,), generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours, pml, miner = modules_for(loss, num_classes, d)
        leaves_ours = list(ours.parameters())
        leaves_pml = list(pml.parameters())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            value, grads = _value_and_grads(ours, x, y, leaves_ours)
            pml_value, pml_grads = _value_and_grads(pml, x, y, leaves_pml, miner)
    truth_params = [t.detach().double().requires_grad_(True) for t in [x, *leaves_ours]]
    truth, truth_grads = run_loss(loss, LossCase((truth_params[0], y, *truth_params[1:]), tuple(truth_params)),
                                  "reference")
    assert value.dtype == pml_value.dtype, (value.dtype, pml_value.dtype)
    check_close(value.float(), truth, pml_value.float(), what=f"{name} autocast value", dtype=torch.bfloat16)
    for k, (a, b, t) in enumerate(zip(grads, pml_grads, truth_grads)):
        assert a.dtype == b.dtype
        check_close(a, t, b, what=f"{name} autocast grad {k}", dtype=torch.bfloat16)


# ---- (c) no_grad and inference mode ------------------------------------------------------------
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("name", list(LOSSES))
def test_no_grad_and_inference_mode(backend, name):
    """The grad-mode value, no graph, no error; also on tensors created in inference mode (inside
    and outside it)."""
    loss = LOSSES[name]
    n = 16 if backend == "cpu" else 8
    case = loss_case(loss, n, 6, torch.float32, seed=5)
    value, _ = run_loss(loss, case, backend)
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            got = loss.fn(*case.args, backend=backend, **loss.kwargs)
        assert torch.equal(got, value.detach()), context.__name__
        assert not got.requires_grad and got.grad_fn is None, context.__name__
    with torch.inference_mode():
        inference_args = tuple(a.detach().clone() for a in case.args)
        got = loss.fn(*inference_args, backend=backend, **loss.kwargs)
    assert inference_args[0].is_inference() and got.is_inference()
    assert torch.equal(got, value.detach())
    got = loss.fn(*inference_args, backend=backend, **loss.kwargs)  # inference tensors, normal mode
    assert torch.equal(got, value.detach()) and got.grad_fn is None


@pytest.mark.parametrize("cls_name", CLASS_MODULES)
def test_class_module_in_inference_mode(cls_name):
    """A module whose parameter requires grad, called in inference mode: no graph, the grad-mode value."""
    module = getattr(fpl, cls_name)(**REGISTRY[cls_name].size_kwargs(4, 6))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 6, generator=g), torch.randint(0, 4, (12,), generator=g)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    value = module(x, y)
    module.load_state_dict(state)  # P2SGradLoss renormalizes its weight in place on every call, as PML's
    with torch.inference_mode():
        got = module(x, y)
    assert got.grad_fn is None and torch.equal(got, value.detach())


# ---- (d) modules across dtypes and devices ------------------------------------------------------
def _class_pair(cls_name, seed=0):
    """(fused module, reference-backend module) with the same parameter."""
    kw = dict(centers_per_class=3) if cls_name == "SoftTripleLoss" else {}
    torch.manual_seed(seed)
    sizes = REGISTRY[cls_name].size_kwargs(4, 6)
    fused = getattr(fpl, cls_name)(**sizes, **kw)
    reference = getattr(fpl, cls_name)(**sizes, backend="reference", **kw)
    reference.load_state_dict(fused.state_dict())
    return fused, reference


@pytest.mark.parametrize("cls_name", CLASS_MODULES)
def test_class_module_moved_between_dtypes(cls_name):
    """After .double(), .half(), .bfloat16() and back .float(), value and gradients (embeddings and
    parameter, the latter in the parameter's dtype) agree with the reference backend by the kit's
    rule; a module in another dtype than the embeddings casts its parameter as PML's does."""
    fused, reference = _class_pair(cls_name)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(12, 6, generator=g), torch.randint(0, 4, (12,), generator=g)
    for move, dtype in (("double", torch.float64), ("half", torch.float16), ("bfloat16", torch.bfloat16),
                        ("float", torch.float32)):
        getattr(fused, move)()
        getattr(reference, move)()
        (param,) = fused.parameters()
        assert param.dtype == dtype
        xd = x.to(dtype)
        value, grads = _value_and_grads(fused, xd, y, [param])
        ref_value, ref_grads = _value_and_grads(reference, xd, y, list(reference.parameters()))
        truth_module = _class_pair(cls_name)[1].double()
        truth_module.load_state_dict(fused.state_dict())
        truth, truth_grads = _value_and_grads(truth_module, xd.double(), y, list(truth_module.parameters()))
        assert value.dtype == dtype and grads[1].dtype == dtype
        check_close(value, truth, ref_value, what=f"{cls_name} {move} value")
        for k, (a, b, t) in enumerate(zip(grads, ref_grads, truth_grads)):
            check_close(a, t, b, what=f"{cls_name} {move} grad {k}")
    fused.double()  # fp32 embeddings, fp64 parameter: PML's cast_types makes the parameter itself fp32
    value, grads = _value_and_grads(fused, x, y, list(fused.parameters()))
    (param,) = fused.parameters()
    assert value.dtype == param.dtype == grads[1].dtype == torch.float32
    reference.double()
    ref_value, ref_grads = _value_and_grads(reference, x, y, list(reference.parameters()))
    check_close(value, ref_value.double(), what=f"{cls_name} fp64 module, fp32 embeddings", dtype=torch.float32)


@pytest.mark.parametrize("cls_name", CLASS_MODULES)
def test_state_dict_round_trips_across_dtypes(cls_name):
    fused, _ = _class_pair(cls_name)
    (original,) = [p.detach().clone() for p in fused.parameters()]
    through_fp64 = _class_pair(cls_name, seed=1)[0]
    through_fp64.load_state_dict(fused.double().state_dict())  # fp32 -> fp64 -> fp32 is exact
    assert torch.equal(next(through_fp64.parameters()), original)
    through_half = _class_pair(cls_name, seed=1)[0]
    through_half.load_state_dict(fused.half().state_dict())
    assert torch.equal(next(through_half.parameters()), original.half().float())
    if REGISTRY[cls_name].in_pml:  # PML's module loads ours in another dtype, and back
        kw = dict(centers_per_class=3) if cls_name == "SoftTripleLoss" else {}
        pml = getattr(pml_losses, cls_name)(**REGISTRY[cls_name].size_kwargs(4, 6), **kw).double()
        pml.load_state_dict(fused.double().state_dict())
        back = _class_pair(cls_name, seed=1)[0]
        back.load_state_dict(pml.state_dict())
        assert torch.equal(next(back.parameters()), original.half().float())


@pytest.mark.parametrize("cls_name", [c for c in CLASS_MODULES if REGISTRY[c].in_pml])
def test_meta_device_where_pml_runs(cls_name):
    """On "meta" (shapes only), ours runs wherever PML's runs (value 0-dim, backward gives shapes);
    where PML's raises (a data-dependent nonzero), ours runs or raises the same error type."""
    kw = dict(centers_per_class=3) if cls_name == "SoftTripleLoss" else {}
    x = torch.empty(12, 6, device="meta")
    y = torch.empty(12, dtype=torch.long, device="meta")

    def run(module):
        module = module.to("meta")
        xm = x.clone().requires_grad_(True)
        value = module(xm, y)
        value.backward()
        return value, xm.grad

    try:
        pml_result = run(getattr(pml_losses, cls_name)(**REGISTRY[cls_name].size_kwargs(4, 6), **kw))
    except Exception as e:
        pml_error = type(e)
        try:
            run(getattr(fpl, cls_name)(**REGISTRY[cls_name].size_kwargs(4, 6), **kw))
        except Exception as ours:
            assert isinstance(ours, pml_error), (ours, pml_error)
        return
    value, grad = run(getattr(fpl, cls_name)(**REGISTRY[cls_name].size_kwargs(4, 6), **kw))
    assert value.device.type == "meta" and value.shape == pml_result[0].shape and value.dtype == pml_result[0].dtype
    assert grad.shape == x.shape


def _rebinding_functional_call(module, x, y):
    w = torch.linspace(-1.0, 2.0, module.W.numel(), dtype=x.dtype).reshape(module.W.shape)
    return torch.func.functional_call(module, {"W": w}, (x, y))


def _rebinding_parametrization(module, x, y):
    class Scaled(torch.nn.Module):
        def forward(self, w):
            return w * torch.linspace(0.5, 2.0, w.shape[1], dtype=w.dtype)
    with torch.no_grad():
        module.W.copy_(torch.linspace(-1.0, 2.0, module.W.numel(), dtype=x.dtype).reshape(module.W.shape))
    torch.nn.utils.parametrize.register_parametrization(module, "W", Scaled())
    return module(x, y)


def _rebinding_to_empty(module, x, y):
    module = module.to("meta").to_empty(device="cpu")  # new Parameter objects, without __setattr__
    with torch.no_grad():
        module.W.copy_(torch.linspace(-1.0, 2.0, module.W.numel(), dtype=x.dtype).reshape(module.W.shape))
    return module(x, y)


@pytest.mark.parametrize("rebind", [_rebinding_functional_call, _rebinding_parametrization, _rebinding_to_empty])
@pytest.mark.parametrize("cls_name, kwargs", [("ArcFaceLoss", dict(collect_stats=True)),
                                              ("LargeMarginSoftmaxLoss", dict(reducer="mean"))])
def test_pmls_computation_reads_the_parameter_as_the_module_does(rebind, cls_name, kwargs):
    """A class loss that PML computes (collect_stats, a reducer) reads its parameter at each call as
    PML's module does: a functional_call's, a parametrization's, or a Parameter replaced by to_empty
    (PML's instance kept the Parameter it was set up with: another value, no gradient to W)."""
    from pytorch_metric_learning import reducers as pml_reducers
    if kwargs.get("reducer") == "mean":
        kwargs = dict(kwargs, reducer=pml_reducers.MeanReducer())
    g = torch.Generator().manual_seed(3)
    x = torch.randn(10, 6, generator=g, dtype=torch.float64).requires_grad_(True)
    y = torch.arange(10) % 4
    results = []
    for lib in (pml_losses, fpl):
        module = getattr(lib, cls_name)(num_classes=4, embedding_size=6, **kwargs).double()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = rebind(module, x, y)
        results.append((value, *torch.autograd.grad(value, x)))
    torch.testing.assert_close(results[1], results[0])


@pytest.mark.parametrize("cls_name", [c for c, e in REGISTRY.items() if e.kind in ("pair", "class")])
def test_constructed_under_the_meta_device_context(cls_name):
    """`with torch.device("meta")`: every module of ours constructs, its parameters on meta (PML's
    do, but for LargeMarginSoftmax / SphereFace; a class loss's small PML twin and AngularLoss's
    alpha raised)."""
    entry = REGISTRY[cls_name]
    kw = entry.size_kwargs(4, 6) if entry.kind == "class" else (
        dict(margin=0.4, Tn=2.0) if cls_name == "RankedListLoss" else {})
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = getattr(fpl, cls_name)(**kw)
    assert all(p.device.type == "meta" for p in module.parameters())
