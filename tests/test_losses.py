"""Every loss through every fused backend on this machine against the reference backend (which
tests/test_reference_*.py check against PML), with the shared kit's tolerance rule: values and
gradients of the embeddings, the ref embeddings and the class weights; PML's edge cases; NaN in,
NaN out; torch.compile(fullgraph=True) of each loss."""
import pytest
import torch

import fused_pairloss as fpl

import kit

CPU_FUSED = [b for b in fpl.available_backends("cpu") if b == "cpu"]  # triton: its own (interpreter) tests
GPU = torch.cuda.is_available()


def _pair_modes():
    return [(name, mode) for name in kit.PAIR_LOSSES for mode in kit.LOSSES[name].modes]


@pytest.mark.parametrize("backend", CPU_FUSED)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("name,mode", _pair_modes())
def test_pair_loss_parity(name, mode, dtype, backend):
    loss = kit.LOSSES[name]
    for n, d in [(40, 7), (130, 16)]:
        case = kit.loss_case(loss, n, d, dtype, mode, seed=n)
        kit.check_loss_parity(loss, case, backend, what=f"{name} {mode} n={n}")


@pytest.mark.parametrize("backend", CPU_FUSED)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("name", kit.CLASS_LOSSES)
def test_class_loss_parity(name, dtype, backend):
    loss = kit.LOSSES[name]
    for n, d, C in [(40, 7, 13), (130, 16, 300)]:
        case = kit.loss_case(loss, n, d, dtype, seed=n, num_classes=C)
        kit.check_loss_parity(loss, case, backend, what=f"{name} n={n} C={C}")


def _edge_cases():
    """Labels that exercise PML's rules: one row, no positives, no negatives, one positive pair."""
    return {
        "one_row": torch.tensor([3]),
        "no_positives": torch.arange(9),
        "no_negatives": torch.zeros(9, dtype=torch.long),
        "one_positive_pair": torch.tensor([0, 0, 1, 2, 3, 4, 5]),
        "two_classes": torch.tensor([0, 1] * 6),
    }


@pytest.mark.parametrize("backend", CPU_FUSED)
@pytest.mark.parametrize("name", kit.PAIR_LOSSES)
def test_pair_loss_edge_cases(name, backend):
    loss = kit.LOSSES[name]
    for what, y in _edge_cases().items():
        g = torch.Generator().manual_seed(len(y))
        x = torch.randn(len(y), 5, generator=g, dtype=torch.float64, requires_grad=True)
        case = kit.LossCase((x, y), (x,))
        if loss.balanced_labels and torch.unique(torch.bincount(y)[torch.bincount(y) > 0]).numel() > 1:
            for b in (backend, "reference"):  # PML refuses labels of unequal counts
                with pytest.raises(ValueError, match="same number of elements"):
                    kit.run_loss(loss, case, b)
            continue
        a, ga = kit.run_loss(loss, case, backend)
        b, gb = kit.run_loss(loss, case, "reference")
        # NaN where PML's value is NaN (NCA without a positive: PML's mean of nothing)
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, equal_nan=True, msg=f"{name} {what}")
        torch.testing.assert_close(ga[0], gb[0], rtol=1e-9, atol=1e-12, msg=f"{name} {what} grad")
        assert a.grad_fn is not None, f"{name} {what}: the zero loss stays attached to the graph"


@pytest.mark.parametrize("backend", CPU_FUSED)
@pytest.mark.parametrize("name", list(kit.LOSSES))
def test_nan_in_nan_out(name, backend):
    loss = kit.LOSSES[name]
    case = kit.loss_case(loss, 24, 6, torch.float32, seed=1)
    with torch.no_grad():
        case.args[0][4, 2] = float("nan")
    out = loss.fn(*case.args, backend=backend, **loss.kwargs)
    ref = loss.fn(*case.args, backend="reference", **loss.kwargs)
    assert kit.isnan_scalar(out) == kit.isnan_scalar(ref), (name, out, ref)
    assert kit.isnan_scalar(out), f"{name}: a NaN embedding gives a NaN loss"


@pytest.mark.parametrize("name", list(kit.LOSSES))
def test_torch_compile_fullgraph(name):
    if not CPU_FUSED:
        pytest.fail("the cpu backend must be available when the library is built")
    loss = kit.LOSSES[name]
    torch._dynamo.reset()
    case = kit.loss_case(loss, 16, 8, torch.float32, seed=2)

    def fn(*args):
        return loss.fn(*args, backend="cpu", **loss.kwargs)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(*case.args)
    ref = loss.fn(*case.args, backend="reference", **loss.kwargs)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    grads = torch.autograd.grad(out, case.params)
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("make", [lambda: fpl.ContrastiveLoss(), lambda: fpl.MultiSimilarityLoss(miner_epsilon=0.1),
                                  lambda: fpl.TripletMarginLoss(0.1), lambda: fpl.NCALoss(),
                                  lambda: fpl.ArcFaceLoss(4, 8), lambda: fpl.MarginLoss(),
                                  lambda: fpl.ProxyNCALoss(4, 8)],
                         ids=["contrastive", "ms_mined", "triplet", "nca", "arcface", "margin", "proxynca"])
def test_torch_compile_fullgraph_of_a_module(make):
    """A module's forward (PML's input handling: labels' device and ids, the empty-batch and ref
    rules) traces without a graph break, with int and with float labels, and again for another
    batch size (automatic dynamic shapes)."""
    loss = make()
    g = torch.Generator().manual_seed(3)
    for labels_float in (False, True) if not isinstance(loss, (fpl.ArcFaceLoss, fpl.ProxyNCALoss)) else (False,):
        torch._dynamo.reset()
        compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
        for n in (16, 20):
            x, y = torch.randn(n, 8, generator=g), torch.arange(n) % 4
            labels = y.float() if labels_float else y
            torch.testing.assert_close(compiled(x, labels), loss(x, labels), rtol=1e-5, atol=1e-6)


def test_torch_compile_of_margin_loss_follows_an_assigned_beta():
    """A fixed beta assigned after construction (PML's attribute) is the one the compiled call uses."""
    torch._dynamo.reset()
    loss = fpl.MarginLoss()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    x, y = torch.randn(12, 8, generator=torch.Generator().manual_seed(5)), torch.arange(12) % 4
    for beta in (1.2, torch.tensor([0.5])):
        loss.beta = beta
        torch.testing.assert_close(compiled(x, y), loss(x, y))


def test_torch_compile_of_margin_loss_follows_beta_changed_in_place():
    """PML's beta is a tensor its loss reads at each call: changed in place (annealed), the compiled
    call follows it (it kept the first value: 0.443 where PML gives 1.138), as does a learned beta
    frozen later (it raised)."""
    torch._dynamo.reset()
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.randint(0, 4, (16,), generator=torch.Generator().manual_seed(1))
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    loss, pml = fpl.MarginLoss(), pml_losses.MarginLoss()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    for beta in (1.2, 0.9, 0.5):
        with torch.no_grad():
            loss.beta.fill_(beta)
            pml.beta.fill_(beta)
        torch.testing.assert_close(compiled(x, y), pml(x, y))
    frozen = fpl.MarginLoss(learn_beta=True)
    frozen.beta.requires_grad_(False)
    torch.testing.assert_close(torch.compile(frozen, fullgraph=True, backend="aot_eager")(x, y), frozen(x, y))


@pytest.mark.parametrize("make,name,values", [
    (lambda: fpl.SupConLoss(0.1), "temperature", (0.1, 0.2, 0.3)),
    (lambda: fpl.MultiSimilarityLoss(), "alpha", (2.0, 3.0, 2.5)),
    (lambda: fpl.MultiSimilarityLoss(), "beta", (50.0, 40.0, 30.0)),
], ids=["supcon_temperature", "ms_alpha", "ms_beta"])
def test_inductor_follows_a_reassigned_hyper_parameter(make, name, values):
    """torch.compile with inductor (its graph caches) gives each assigned value's loss: a float in
    the traced arithmetic beside the engine's constant (MultiSimilarity's -alpha in its terms,
    alpha in its row combination) made a later value's call serve an earlier value's graph, until
    the hyper-parameters became constants of the graph (ops/_common.py hyper_parameters)."""
    torch._dynamo.reset()
    loss = make()
    compiled = torch.compile(loss, fullgraph=True)
    x = torch.randn(12, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.randint(0, 4, (12,), generator=torch.Generator().manual_seed(2))
    for value in values:
        setattr(loss, name, value)
        fresh = make()
        setattr(fresh, name, value)
        torch.testing.assert_close(compiled(x, y), fresh(x, y))


def test_every_function_computing_with_hyper_parameters_makes_them_constants():
    """Every loss's functional form and fused call carries ops/_common.loss_function: the
    frame in which it runs under torch.compile (one resumed after a graph break too) has the call's
    floats as constants before it computes with them."""
    from fused_pairloss.losses import clip, siglip
    functions = [fn for entry in fpl.losses.REGISTRY.values() for fn in (entry.functional, entry.fused)]
    functions += [clip.clip_loss, clip.clip_fused, siglip.siglip_loss, siglip.siglip_fused]
    unmarked = [fn.__name__ for fn in functions if fn is not None and not getattr(fn, "loss_function", False)]
    assert not unmarked


def test_inductor_follows_hyper_parameters_read_after_a_graph_break():
    """ProxyNCALoss with a miner's indices_tuple (its weights: a graph break) reads softmax_scale in a
    frame of its own, where the third value became a symbolic input (torch's automatic dynamic) and
    inductor served an earlier value's graph (27% off), until the fused function made it constant; the
    functional form of NormalizedSoftmaxLoss (1 / temperature in the engine's terms) likewise."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 8, generator=g, dtype=torch.float64)
    y = torch.arange(32) % 8
    mined = fpl.miners.BatchHardMiner()(x, y)
    loss = fpl.ProxyNCALoss(8, 8).double()
    compiled = torch.compile(lambda e: loss(e, y, mined))
    W = torch.randn(8, 8, generator=g, dtype=torch.float64)
    softmax = torch.compile(lambda e, t: fpl.functional.normalized_softmax_loss(e, y, W, temperature=t))
    for value in (1.0, 2.0, 3.0, 4.0):
        loss.softmax_scale = value
        torch.testing.assert_close(compiled(x), loss(x, y, mined))
        temperature = value / 20
        torch.testing.assert_close(softmax(x, temperature),
                                   fpl.functional.normalized_softmax_loss(x, y, W, temperature=temperature))


def test_torch_compile_of_angular_loss_with_an_obtuse_alpha():
    """AngularLoss's alpha is PML's tensor in radians: one whose tangent is negative traces too (a
    negative base under ** raised while dynamo traced the constants)."""
    torch._dynamo.reset()
    loss = fpl.AngularLoss()
    compiled = torch.compile(loss, backend="eager")
    x, y = torch.randn(16, 8, generator=torch.Generator().manual_seed(2)), torch.arange(16) % 4
    for alpha in (0.7, 2.0):
        loss.alpha = alpha
        torch.testing.assert_close(compiled(x, y), loss(x, y))


def test_inductor_cross_batch_memory_follows_a_reassigned_alpha():
    """CrossBatchMemory's fused step calls the loss's fused function itself: its hyper-parameters are
    the graph's constants there too (a stale alpha at the fourth value before); an eager twin with
    the same memory is the truth."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(1)
    compiled_memory, eager_memory = (fpl.CrossBatchMemory(fpl.MultiSimilarityLoss(), 6, memory_size=16)
                                     for _ in range(2))
    compiled = torch.compile(compiled_memory, fullgraph=True)
    for alpha in (2.0, 3.0, 2.5, 1.5):
        x, y = torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)
        compiled_memory.loss.alpha = eager_memory.loss.alpha = alpha
        torch.testing.assert_close(compiled(x, y), eager_memory(x, y))


@pytest.mark.parametrize("make", [lambda: fpl.CircleLoss(), lambda: fpl.ArcFaceLoss(4, 8)], ids=["circle", "arcface"])
def test_torch_compile_dynamic_true_traces_a_module(make):
    """dynamic=True (every float and int symbolic): the module's check of PML's objects (a softplus'
    beta, a distance's settings) traces too."""
    torch._dynamo.reset()
    loss = make()
    compiled = torch.compile(loss, fullgraph=True, dynamic=True, backend="aot_eager")
    x, y = torch.randn(16, 8, generator=torch.Generator().manual_seed(4)), torch.arange(16) % 4
    torch.testing.assert_close(compiled(x, y), loss(x, y), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_classes", [None, 4], ids=["one_beta", "per_class"])
def test_torch_compile_traces_a_learned_margin_beta(num_classes):
    """MarginLoss(learn_beta=True), one beta or per class: the rows' betas are an operand of the
    engine (row_shift), so fullgraph tracing works and gives eager's value and gradients."""
    torch._dynamo.reset()
    loss = fpl.MarginLoss(learn_beta=True, nu=0.2, num_classes=num_classes)
    with torch.no_grad():
        loss.beta.add_(torch.linspace(-0.2, 0.2, loss.beta.numel()))
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    x = torch.randn(24, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
    y = torch.arange(24) % 4
    got = compiled(x, y)
    got_grads = torch.autograd.grad(got, [x, loss.beta])
    want = loss(x, y)
    want_grads = torch.autograd.grad(want, [x, loss.beta])
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b)
    assert float(got_grads[1].abs().sum()) > 0


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("name", list(kit.LOSSES))
def test_gpu_loss_parity(name, dtype, backend):
    """GPU backends, every loss, fp32/bf16/fp16, against the reference on the same GPU inputs."""
    if backend not in fpl.available_backends("cuda"):
        pytest.fail(f"{backend} is not available on this GPU machine: {fpl.available_backends('cuda')}")
    loss = kit.LOSSES[name]
    modes = loss.modes if loss.kind == "pair" else ("self",)
    for mode in modes:
        case = kit.loss_case(loss, 300, 64, torch.float32, mode, seed=3, num_classes=500)
        case = kit.cast_case(case, dtype)
        case = kit.LossCase(tuple(a.cuda() if torch.is_tensor(a) else a for a in case.args), ())
        params = tuple(a for a in case.args if torch.is_tensor(a) and a.is_floating_point())
        params = tuple(p.detach().requires_grad_(True) for p in params)
        it = iter(params)
        args = tuple(next(it) if torch.is_tensor(a) and a.is_floating_point() else a for a in case.args)
        gpu_case = kit.LossCase(args, params)
        kit.check_loss_parity(loss, gpu_case, backend, what=f"{name} {mode} {dtype} {backend}")
