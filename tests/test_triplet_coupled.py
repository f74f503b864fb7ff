"""TripletMarginLoss's swap and smooth_loss (the op fused_pairloss::triplet_coupled_rows, streamed
over (anchor, positive) pairs) and its integer triplets_per_anchor (PML's sample, drawn as PML draws
it) against PML's own class: values and gradients, fp32 and fp64, self and ref modes, listed
tuples, the op's registration, chunking, double backward, torch.compile."""
import pytest
import torch

import fused_pairloss as fpl
from fused_pairloss.losses._reference_common import sampled_triplets
from fused_pairloss.ops import triplets
from kit import check_close

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
from pytorch_metric_learning.distances import CosineSimilarity  # noqa: E402
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu  # noqa: E402

COUPLED = {"swap": dict(swap=True), "smooth": dict(smooth_loss=True), "both": dict(swap=True, smooth_loss=True)}


def inputs(n, d, classes, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    return x, torch.randint(0, classes, (n,), generator=g)


def call_inputs(mode, dtype, n=40, seed=1):
    """(args, params) of a call in `mode`: self, ref (another batch of fewer rows: every positive
    index below the batch's rows, which PML's swap reads) or ref_is_labels (ref_labels is labels)."""
    x, y = inputs(n, 12, 5, dtype, seed)
    if mode == "self":
        return (x, y), [x]
    r, ry = inputs(n - 10 if mode == "ref" else n, 12, 5, dtype, seed + 1)
    return (x, y, None, r, y if mode == "ref_is_labels" else ry), [x, r]


def value_and_grads(fn, params, seed=None):
    if seed is not None:
        torch.manual_seed(seed)
    out = fn()
    return out, torch.autograd.grad(out, params)


def check_against_pml(ours, pml, args, params, dtype, seed=None):
    """The fp64 PML call is the truth, PML in the case's dtype the same-dtype reference (tests/kit.py);
    each call seeded alike (a sampled loss draws its triplets)."""
    val, grads = value_and_grads(lambda: ours(*args), params, seed)
    pml_val, pml_grads = value_and_grads(lambda: pml(*args), params, seed)
    conv = {id(p): p.detach().double().requires_grad_(True) for p in params}
    args64 = [conv.get(id(a), a) for a in args]
    truth, truth_grads = value_and_grads(lambda: pml(*args64), [conv[id(p)] for p in params], seed)
    assert val.dtype == pml_val.dtype
    check_close(val, truth, pml_val, what="value", dtype=dtype)
    for k, (a, b, t) in enumerate(zip(grads, pml_grads, truth_grads)):
        check_close(a, t, b, what=f"grad {k}", dtype=dtype)


def losses(distance, **kw):
    extra = dict(margin=0.2) if distance == "lp" else dict(margin=0.1, distance=CosineSimilarity())
    return fpl.TripletMarginLoss(**kw, **extra), pml_losses.TripletMarginLoss(**kw, **extra)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("distance", ["lp", "cosine"])
@pytest.mark.parametrize("mode", ["self", "ref", "ref_is_labels"])
@pytest.mark.parametrize("option", list(COUPLED))
def test_all_triplets_coupled_match_pml(option, mode, distance, dtype):
    ours, pml = losses(distance, **COUPLED[option])
    args, params = call_inputs(mode, dtype)
    check_against_pml(ours, pml, args, params, dtype)


@pytest.mark.parametrize("mode", ["self", "ref", "ref_is_labels"])
@pytest.mark.parametrize("per_anchor", [1, 4, None, 0])
def test_sampled_triplets_are_pmls(mode, per_anchor):
    """The same draws as PML's get_random_triplet_indices, on integer and float labels."""
    _, y = inputs(30, 4, 4, torch.float64, seed=2)
    ry = y if mode != "ref" else torch.randint(0, 5, (25,), generator=torch.Generator().manual_seed(3))
    for labels, ref in ((y, ry), (y.double() / 2, ry.double() / 2)):
        ref = None if mode == "self" else (labels if mode == "ref_is_labels" else ref)
        torch.manual_seed(7)
        ours = sampled_triplets(labels, ref, per_anchor)
        torch.manual_seed(7)
        theirs = lmu.get_random_triplet_indices(labels, ref, t_per_anchor=per_anchor)
        for a, b in zip(ours, theirs):
            assert torch.equal(a, b.to(torch.int64))
    # the generator is left where PML leaves it
    torch.manual_seed(7)
    sampled_triplets(y, None if mode == "self" else ry, per_anchor)
    after_ours = torch.randint(0, 2 ** 30, (4,))
    torch.manual_seed(7)
    lmu.get_random_triplet_indices(y, None if mode == "self" else ry, t_per_anchor=per_anchor)
    assert torch.equal(after_ours, torch.randint(0, 2 ** 30, (4,)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("mode", ["self", "ref", "ref_is_labels"])
@pytest.mark.parametrize("kw", [dict(), dict(swap=True), dict(smooth_loss=True)], ids=["hinge", "swap", "smooth"])
def test_sampled_loss_matches_pml(kw, mode, dtype):
    ours, pml = losses("lp", triplets_per_anchor=3, **kw)
    args, params = call_inputs(mode, dtype)
    check_against_pml(ours, pml, args, params, dtype, seed=11)
    ours, pml = losses("cosine", triplets_per_anchor=3, **kw)
    check_against_pml(ours, pml, args, params, dtype, seed=12)


@pytest.mark.parametrize("option", list(COUPLED))
@pytest.mark.parametrize("miner", ["triplet_margin", "multi_similarity"])
def test_listed_tuples_with_coupled_options(miner, option):
    """A miner's triplets, or its pairs joined on the anchor as PML joins them, with swap /
    smooth_loss: from the listed rows, equal to PML (labels=None too)."""
    x, y = inputs(32, 10, 4, torch.float64, seed=4)
    m = {"triplet_margin": pml_miners.TripletMarginMiner(margin=0.2, type_of_triplets="all"),
         "multi_similarity": pml_miners.MultiSimilarityMiner(0.1)}[miner]
    indices = m(x.detach(), y)
    ours, pml = losses("lp", **COUPLED[option])
    for labels in (y, None):
        check_against_pml(ours, pml, (x, labels, indices), [x], torch.float64)


def test_swap_needs_positives_within_the_batch():
    """PML reads u_pn as mat[positive_idx, negative_idx] of the batch against ref_emb: a positive of
    ref_emb past the batch's rows fails there (IndexError), a ValueError naming swap here, on all
    triplets and on listed ones."""
    x, y = inputs(8, 6, 2, torch.float64, seed=5)
    r, ry = inputs(20, 6, 2, torch.float64, seed=6)
    with pytest.raises(IndexError):
        pml_losses.TripletMarginLoss(swap=True)(x, y, None, r, ry)
    with pytest.raises(ValueError, match="swap"):
        fpl.TripletMarginLoss(swap=True)(x, y, None, r, ry)
    listed = (torch.tensor([0]), torch.tensor([15]), torch.tensor([1]))
    with pytest.raises(ValueError, match="swap"):
        fpl.TripletMarginLoss(swap=True)(x, y, listed, r, ry)
    fpl.TripletMarginLoss(smooth_loss=True)(x, y, None, r, ry)  # no swap: any ref


def op_args(n, classes, seed, d=6, ref=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    lq = torch.randint(0, classes, (n,), generator=g)
    if not ref:
        return q, q, lq, lq, torch.arange(n)
    r = torch.nn.functional.normalize(torch.randn(n - 2, d, generator=g, dtype=torch.float64), dim=1)
    return q, r, lq, torch.randint(0, classes, (n - 2,), generator=g), torch.full((n,), -1)


@pytest.mark.parametrize("ref", [False, True], ids=["self", "ref"])
@pytest.mark.parametrize("lp", [True, False], ids=["lp", "cosine"])
@pytest.mark.parametrize("option", list(COUPLED))
def test_opcheck(option, lp, ref):
    q, r, lq, lr, ex = op_args(9, 3, seed=8, ref=ref)
    q = q.requires_grad_(True)
    r = q if not ref else r.requires_grad_(True)
    swap, smooth = COUPLED[option].get("swap", False), COUPLED[option].get("smooth_loss", False)
    args = (q, r, lq, lr, ex, 0.2, lp, swap, smooth)
    torch.library.opcheck(triplets.triplet_coupled_rows, args)
    sums, _ = triplets.triplet_coupled_rows(*args)
    for need in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(triplets.triplet_coupled_rows_backward,
                              (torch.ones_like(sums), q.detach(), r.detach(), *args[2:], *need))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("lp", [True, False], ids=["lp", "cosine"])
def test_compiled_group_ops(lp, dtype):
    """The three compiled ops of a group (csrc/cpu/triplet_coupled_cpu.cpp): opcheck (schema, fake
    kernel); triplet_u_rows against PyTorch's u (within the dtype's bound; a duplicated row exactly 0
    apart, a NaN row NaN); the lp coefficients are the plain ones over u; their argument checks."""
    q, r, lq, lr, ex = op_args(12, 3, seed=9, ref=True)
    q, r = q.to(dtype), r.to(dtype)
    if not triplets._native_coupled(q):
        pytest.skip("the library was built without the CPU kernels")
    ops = torch.ops.fused_pairloss
    torch.library.opcheck(ops.triplet_u_rows.default, (q, r, lp))  # (opcheck's comparisons: no NaN)
    r = torch.cat([r, q[:1], torch.full_like(q[:1], float("nan"))])
    lr = torch.cat([lr, lq[:1], lq[:1]])
    U = ops.triplet_u_rows(q, r, lp)
    check_close(U[:, :-1], triplets.triplet_u(q.double(), r[:-1].double(), lp), triplets.triplet_u(q, r[:-1], lp),
                what="u")
    assert U[:, -1].isnan().all()
    if lp:
        assert U[0, -2] == 0
    r, lr = r[:-1], lr[:-1]
    a, p = next(triplets._coupled_groups(lq, lr, torch.full((12,), -1), r.shape[0]))
    ids = triplets._native_coupled_ids(q, lq, lr)
    for swap in (False, True):
        group = triplets._NativeGroup(q, r, ids, a, p, 0.2, lp, swap)
        grad = torch.linspace(0.5, 1.5, group.anchors.numel(), dtype=dtype)
        torch.library.opcheck(ops.triplet_coupled_chunk_sums.default, (*group.operands, swap, True))
        args = (*group.operands, p, grad, swap, True)
        torch.library.opcheck(ops.triplet_coupled_chunk_coefficients.default, (*args, lp))
        plain, divided = ops.triplet_coupled_chunk_coefficients(*args, False), ops.triplet_coupled_chunk_coefficients(
            *args, lp)
        for k, rows in enumerate([group.anchor_rows, group.pos_rows]):
            u = group.U[rows]
            expected = torch.where(u > 0, plain[k] / torch.where(u > 0, u, 1), 0) if lp else plain[k]
            assert torch.equal(divided[k], expected)
    with pytest.raises(RuntimeError, match="one width"):
        ops.triplet_u_rows(q, r[:, :2], lp)
    with pytest.raises(RuntimeError, match="both be float32 or both float64"):
        ops.triplet_u_rows(q, r.to(torch.float16), lp)


@pytest.mark.parametrize("option", list(COUPLED))
def test_groups_split_give_one_groups_result(option, monkeypatch):
    """Two classes (about 30 positives a row): the pairs of a chunk of rows in several groups, the
    rows in several chunks; forward and backward equal one group's."""
    q, r, lq, lr, ex = op_args(64, 2, seed=9, ref=True)
    swap, smooth = COUPLED[option].get("swap", False), COUPLED[option].get("smooth_loss", False)

    def run():
        qq, rr = q.clone().requires_grad_(True), r.clone().requires_grad_(True)
        sums, counts = triplets.triplet_coupled_rows(qq, rr, lq, lr, ex, 0.3, True, swap, smooth)
        w = torch.linspace(0.5, 1.5, len(sums), dtype=sums.dtype)
        return (counts, sums, *torch.autograd.grad((sums * w).sum(), [qq, rr]))
    whole = run()
    monkeypatch.setattr(triplets, "CHUNK_ELEMENTS", 62 * 5)  # 5 rows or pairs a group
    monkeypatch.setattr(triplets, "NATIVE_GROUP_ELEMENTS", 62 * 5)  # the compiled kernels' groups too
    parts = run()
    assert torch.equal(parts[0], whole[0])
    for k, (a, b) in enumerate(zip(parts[1:], whole[1:])):
        check_close(a, b, what=["sums", "grad q", "grad r"][k])


@pytest.mark.parametrize("option", list(COUPLED))
def test_double_backward_matches_the_reference(option):
    """create_graph=True: the gradient is differentiable, its Hessian-vector product the reference's."""
    x, y = inputs(24, 6, 3, torch.float64, seed=10)
    v = torch.randn_like(x)

    def hvp(backend):
        xx = x.detach().clone().requires_grad_(True)
        loss = fpl.TripletMarginLoss(margin=0.3, backend=backend, **COUPLED[option])(xx, y)
        (g,) = torch.autograd.grad(loss, xx, create_graph=True)
        return torch.autograd.grad((g * v).sum(), xx)[0]
    check_close(hvp("cpu"), hvp("reference"), what="hvp")


def test_compile_traces_a_coupled_call():
    x, y = inputs(32, 8, 4, torch.float32, seed=12)
    loss = fpl.TripletMarginLoss(swap=True, smooth_loss=True)
    eager = value_and_grads(lambda: loss(x, y), [x])
    compiled_fn = torch.compile(loss, fullgraph=True, backend="aot_eager")
    compiled = value_and_grads(lambda: compiled_fn(x, y), [x])
    check_close(compiled[0], eager[0], what="value")
    check_close(compiled[1][0], eager[1][0], what="grad")


def test_nan_in_nan_out_and_no_triplets():
    x, y = inputs(16, 6, 3, torch.float64, seed=13)
    with torch.no_grad():
        x[3] = float("nan")
    for kw in COUPLED.values():
        assert torch.isnan(fpl.TripletMarginLoss(**kw)(x, y))
    x, y = inputs(10, 6, 1, torch.float32, seed=14)  # one class: no negative
    for kw in (*COUPLED.values(), dict(triplets_per_anchor=2)):
        val = fpl.TripletMarginLoss(**kw)(x, y)
        assert val.item() == 0 and val.requires_grad


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_coupled(dtype):
    """Half-precision rows, the op's stats in fp32: PML in the same dtype is the reference."""
    x, y = inputs(48, 16, 6, dtype, seed=15)
    for kw in COUPLED.values():
        ours, pml = losses("lp", **kw)
        check_against_pml(ours, pml, (x, y), [x], dtype)


def test_cross_batch_memory_with_coupled_options():
    """PML's CrossBatchMemory semantics around ours (its pair tuple joined into triplets): equal to
    PML's memory around PML's loss over steps that fill and wrap the queue."""
    from pytorch_metric_learning.losses import CrossBatchMemory as PmlMemory
    for kw in (dict(smooth_loss=True), dict(swap=True)):
        ours, pml = fpl.CrossBatchMemory(fpl.TripletMarginLoss(**kw), 8, memory_size=16), PmlMemory(
            pml_losses.TripletMarginLoss(**kw), 8, memory_size=16)
        for step in range(3):
            x, y = inputs(8, 8, 3, torch.float64, seed=20 + step)
            try:
                want = value_and_grads(lambda: pml(x, y), [x])
            except IndexError:  # PML's swap reads a memory row past the batch's rows
                with pytest.raises(ValueError, match="swap"):
                    ours(x, y)
                break
            got = value_and_grads(lambda: ours(x, y), [x])
            check_close(got[0], want[0], what="value")
            check_close(got[1][0], want[1][0], what="grad")


@pytest.mark.gpu
@pytest.mark.parametrize("option", list(COUPLED))
def test_gpu_coupled_matches_the_cpu(option):
    x, y = inputs(256, 32, 20, torch.float32, seed=16)
    ours = fpl.TripletMarginLoss(**COUPLED[option])
    cpu = value_and_grads(lambda: ours(x, y), [x])
    xc = x.detach().cuda().requires_grad_(True)
    gpu = value_and_grads(lambda: ours(xc, y.cuda()), [xc])
    check_close(gpu[0].cpu(), cpu[0], what="value")
    check_close(gpu[1][0].cpu(), cpu[1][0], what="grad")


@pytest.mark.parametrize("distance", ["lp", "cosine"])
def test_coupled_under_autocast(distance):
    """CPU autocast to bf16: the op computes in its stat dtype (not autocast's bf16 products), the
    value in PML's dtype there, within bf16's bound of the fp64 truth."""
    x, y = inputs(24, 8, 4, torch.float32, seed=17)
    for kw in COUPLED.values():
        ours, pml = losses(distance, **kw)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            val, pml_val = ours(x, y), pml(x, y)
        truth = pml(x.detach().double(), y)
        assert val.dtype == pml_val.dtype
        check_close(val, truth, pml_val, what="value", dtype=torch.bfloat16)


def run_op(q, r, lq, lr, ex, margin, lp, swap, smooth):
    """The op's counts, sums and gradients of a weighted sum of the sums (q and r leaves of their own)."""
    qq = q.detach().clone().requires_grad_(True)
    rr = qq if r is q else r.detach().clone().requires_grad_(True)
    sums, counts = triplets.triplet_coupled_rows(qq, rr, lq, lr, ex, margin, lp, swap, smooth)
    w = torch.linspace(0.5, 1.5, len(sums), dtype=sums.dtype)
    params = [qq] if rr is qq else [qq, rr]
    return (counts, sums, *torch.autograd.grad((sums * w).sum(), params))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", ["random", "dyadic_ties", "nan_row"])
@pytest.mark.parametrize("ref", [False, True], ids=["self", "ref"])
@pytest.mark.parametrize("lp", [True, False], ids=["lp", "cosine"])
@pytest.mark.parametrize("option", list(COUPLED))
def test_compiled_kernels_match_the_pytorch_groups(option, lp, ref, case, dtype, monkeypatch):
    """The CPU kernels (csrc/cpu/triplet_coupled_cpu.cpp) against the op's PyTorch groups: the
    counts equal, sums and gradients within the dtype's bound. dyadic_ties: entries on a grid, so
    that swap's u_an and u_pn tie exactly (each takes half the gradient); nan_row: a NaN row."""
    if not triplets._native_coupled(torch.ones(1)):
        pytest.skip("the library was built without the CPU kernels")
    q, r, lq, lr, ex = op_args(30, 4, seed=21, d=8, ref=ref)
    if case == "dyadic_ties":
        g = torch.Generator().manual_seed(22)
        q = torch.randint(-1, 2, q.shape, generator=g).double() / 2
        r = q if not ref else torch.randint(-1, 2, r.shape, generator=g).double() / 2
    elif case == "nan_row":
        q = q.clone()
        q[5] = float("nan")
        r = q if not ref else r
    q, r = q.to(dtype), (q.to(dtype) if r is q else r.to(dtype))
    swap, smooth = COUPLED[option].get("swap", False), COUPLED[option].get("smooth_loss", False)
    args = (q, r, lq, lr, ex, 0.25, lp, swap, smooth)
    native = run_op(*args)
    monkeypatch.setattr(triplets, "_native_coupled_ids", lambda *a: None)
    pytorch = run_op(*args)
    assert torch.equal(native[0], pytorch[0])
    for k, (a, b) in enumerate(zip(native[1:], pytorch[1:])):
        check_close(a, b, what=["sums", "grad q", "grad r"][k])


def test_smooth_counts_the_subnormal_terms_as_torch(monkeypatch):
    """float32 softplus is a (subnormal) positive down to x = ln 2^-150 (about -104), so PML's
    AvgNonZero counts those terms: the kernels count them too. The module's rows are normalized
    (|x| <= 2 + margin), the op's need not be: far apart unnormalized rows put terms there."""
    if not triplets._native_coupled(torch.ones(1)):
        pytest.skip("the library was built without the CPU kernels")
    g = torch.Generator().manual_seed(23)
    y = torch.arange(12) % 3
    q = torch.randn(12, 4, generator=g) * 0.3
    q[:, 0] += torch.tensor([0.0, 1.5, 96.0])[y]  # classes 0 and 1 close (terms of order 1), 2 far
    u = torch.cdist(q.double(), q.double())
    same = y[:, None] == y[None, :]
    terms = (u[:, :, None] - u[:, None, :] + 0.05)[same[:, :, None] & ~same[:, None, :]]
    assert ((terms < -87) & (terms > -103)).sum() > terms.numel() / 4, "a quarter of the terms in the band"
    args = (q, q, y, y, torch.arange(12), 0.05, True, False, True)
    native = run_op(*args)
    monkeypatch.setattr(triplets, "_native_coupled_ids", lambda *a: None)
    pytorch = run_op(*args)
    assert torch.equal(native[0], pytorch[0])
    for k, (a, b) in enumerate(zip(native[1:], pytorch[1:])):
        check_close(a, b, what=["sums", "grad q"][k])


@pytest.mark.parametrize("option", list(COUPLED))
def test_a_ref_of_one_class_has_no_triplet(option):
    """A ref_emb of one label, larger than the batch: no anchor has a negative, so PML's zero loss
    (swap reads no positive's row, even one past the batch's rows)."""
    x, y = inputs(3, 4, 2, torch.float64, seed=24)
    r, _ = inputs(6, 4, 2, torch.float64, seed=25)
    ry = torch.zeros(6, dtype=torch.long)
    ours, pml = fpl.TripletMarginLoss(**COUPLED[option]), pml_losses.TripletMarginLoss(**COUPLED[option])
    got, want = ours(x, y, ref_emb=r, ref_labels=ry), pml(x, y, ref_emb=r, ref_labels=ry)
    assert got.item() == want.item() == 0
    for a, b in zip(torch.autograd.grad(got, [x, r], allow_unused=True),
                    torch.autograd.grad(want, [x, r], allow_unused=True, materialize_grads=True)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_a_subnormal_term_counts_as_pmls(dtype):
    """Normal inputs whose similarity is a subnormal (1e-39 in fp32, 1e-320 in fp64): the kernels
    keep subnormals (no flush to zero), so a hinge term x that is one counts in AvgNonZero as PML's."""
    tiny = 1e-20 if dtype == torch.float32 else 1e-160
    x = torch.tensor([[tiny, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [10 * tiny, 0.0, 0.0, 1.0],
                      [0.0, 0.8, 0.6, 0.0]], dtype=dtype, requires_grad=True)
    y = torch.tensor([0, 0, 1, 1])
    kw = dict(margin=0.0, swap=True, distance=CosineSimilarity())
    ours, pml = fpl.TripletMarginLoss(**kw), pml_losses.TripletMarginLoss(**kw)
    check_against_pml(ours, pml, (x, y), [x], dtype)


def test_fp64_softplus_counts_its_subnormal_terms(monkeypatch):
    """fp64 softplus is a subnormal positive for x in about (-745, -708): counted as torch's."""
    if not triplets._native_coupled(torch.ones(1)):
        pytest.skip("the library was built without the CPU kernels")
    g = torch.Generator().manual_seed(26)
    q = torch.randn(40, 3, generator=g, dtype=torch.float64)
    q[:, 0] += 730.0 * (torch.arange(40) % 2)  # two classes 730 apart: x about -730 + (u_ap)
    y = torch.arange(40) % 2
    args = (q, q, y, y, torch.arange(40), 0.0, True, False, True)
    native = run_op(*args)
    monkeypatch.setattr(triplets, "_native_coupled_ids", lambda *a: None)
    pytorch = run_op(*args)
    assert native[0].sum() > 0
    assert torch.equal(native[0], pytorch[0])
