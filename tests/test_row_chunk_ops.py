"""The losses' own row-chunk ops (IntraPairVariance's pair_squared_hinges, SmoothAP, PNP):
torch.library.opcheck of each op and its backward op (schema, fake kernel, autograd registration,
AOT dispatch), and the same value and gradient when the work is split into many chunks."""
import pytest
import torch
import torch.nn.functional as F

from fused_pairloss import functional as Fn
from fused_pairloss import _extension
from fused_pairloss.losses import intra_pair_variance, pnp, smooth_ap

import kit  # noqa: E402


def _inputs(n=20, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    labels = torch.arange(n // 4).repeat_interleave(4)[torch.randperm(n, generator=g)]
    return q, labels


def _ops():
    """(name, op, backward op, args after (q, labels), upstream gradient shape)."""
    n = 20
    return [
        ("smoothap", smooth_ap.smooth_ap_rows, smooth_ap.smooth_ap_rows_backward, (0.1,), (n,)),
        ("pnp", pnp.pnp_rows, pnp.pnp_rows_backward, (0.1, "Dq", 2.0, 1.5), (n,)),
    ]


@pytest.mark.parametrize("name,op,backward_op,args,grad_shape", _ops(), ids=[o[0] for o in _ops()])
def test_opcheck(name, op, backward_op, args, grad_shape):
    q, labels = _inputs()
    torch.library.opcheck(op, (q.clone().requires_grad_(True), labels, *args))
    torch.library.opcheck(op, (q, labels, *args))
    grad = torch.randn(grad_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.library.opcheck(backward_op, (grad, q, labels, *args))


@pytest.mark.parametrize("self_mode", [True, False], ids=["self", "ref"])
def test_opcheck_pair_squared_hinges(self_mode):
    q, labels = _inputs()
    r, labels_r, excl = (None, None, None) if self_mode else (q.flip(0).contiguous(), labels.flip(0).contiguous(),
                                                              torch.full_like(labels, -1))
    thresholds = torch.tensor([0.2, -0.1], dtype=torch.float64)
    args = (labels, labels_r, excl, thresholds.requires_grad_(True), 1.0, -1.0, "cosine", "cpu")
    torch.library.opcheck(intra_pair_variance.pair_squared_hinges,
                          (q.clone().requires_grad_(True), None if r is None else r.clone().requires_grad_(True),
                           *args))
    grad = torch.randn(2, q.shape[0], dtype=torch.float64)
    torch.library.opcheck(intra_pair_variance.pair_squared_hinges_backward,
                          (grad, q, r, labels, labels_r, excl, thresholds.detach(), 1.0, -1.0, "cosine", "cpu"))


LOSSES = {
    "smoothap": (smooth_ap, lambda x, y: Fn.smooth_ap_loss(x, y, temperature=0.1, backend="cpu")),
    "pnp": (pnp, lambda x, y: Fn.pnp_loss(x, y, anneal=0.1, variant="Ib", backend="cpu")),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_many_chunks_give_the_one_chunk_result(name, monkeypatch):
    module, fn = LOSSES[name]
    q, labels = _inputs(n=24, seed=2)
    x = (3 * q).requires_grad_(True)
    one = fn(x, labels)
    (g_one,) = torch.autograd.grad(one, x)
    monkeypatch.setattr(module, "CHUNK_ELEMENTS", 1)  # one row (anchor) per chunk
    if hasattr(module, "NATIVE_CHUNK_ELEMENTS"):  # SmoothAP's compiled row kernels' chunks too
        monkeypatch.setattr(module, "NATIVE_CHUNK_ELEMENTS", 1)
    many = fn(x, labels)
    (g_many,) = torch.autograd.grad(many, x)
    torch.testing.assert_close(many, one, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g_many, g_one, rtol=1e-10, atol=1e-14)


NATIVE_ROW_KERNELS = _extension.has_kernel("smooth_ap_chunk_ranks", "CPU")
needs_native = pytest.mark.skipif(not NATIVE_ROW_KERNELS, reason="the compiled CPU library is not built")


def _ranking_case(classes, per_class, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    n = classes * per_class
    q = F.normalize(torch.randn(n, 8, generator=g, dtype=torch.float64), dim=1)
    labels = torch.arange(classes).repeat(per_class)[torch.randperm(n, generator=g)]
    grad = torch.randn(n, generator=g, dtype=torch.float64)
    return q.to(dtype), labels, grad.to(dtype)


# (module, (op, backward op), extra arguments per case): SmoothAP's temperature; PNP's anneal, variant, b, alpha
RANKING_OPS = {
    "smoothap": (smooth_ap, (smooth_ap.smooth_ap_rows, smooth_ap.smooth_ap_rows_backward),
                 [(0.1,), (0.01,), (0.5,)]),
    "pnp": (pnp, (pnp.pnp_rows, pnp.pnp_rows_backward),
            [(0.05, "O", 2.0, 1.0), (0.01, "Dq", 2.0, 1.5), (0.2, "Ib", 3.0, 1.0)]),
}


def _both(ops, q, labels, grad, args):
    op, backward_op = ops
    return op(q, labels, *args), backward_op(grad, q, labels, *args)


def _check_kernels_against_pytorch_chunks(module, ops, q, labels, grad, args, monkeypatch, what):
    """The loss op's rows and gradient through its row kernels against its PyTorch chunks, under
    the kit's rule (truth: the PyTorch chunks in fp64)."""
    kernels = _both(ops, q, labels, grad, args)
    with monkeypatch.context() as m:
        m.setattr(module, "_native_chunks", lambda qa: False)
        same_dtype = _both(ops, q, labels, grad, args)
        truth = _both(ops, q.double(), labels, grad.double(), args)
    for j, part in enumerate(("rows", "grad")):
        kit.check_close(kernels[j], truth[j], same_dtype[j], what=f"{what} {part}")


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", list(RANKING_OPS))
def test_row_kernels_match_the_pytorch_chunks(name, dtype, monkeypatch):
    """SmoothAP's and PNP's compiled row kernels (CPU) against their PyTorch chunks (the other
    devices' path): the op's rows and the gradient, under the kit's tolerance rule against the fp64
    PyTorch result; several class layouts (for PNP: uneven classes and singletons), rows not a whole
    number of the kernels' 16 lanes."""
    module, ops, arg_list = RANKING_OPS[name]
    for k, (classes, per_class) in enumerate(((5, 5), (7, 3), (16, 2))):
        q, labels, grad = _ranking_case(classes, per_class, dtype, seed=classes)
        if name == "pnp":  # uneven classes, a singleton
            labels = labels.clone()
            labels[:3] = labels[3]
            labels[-1] = 1000
        _check_kernels_against_pytorch_chunks(module, ops, q, labels, grad, arg_list[k], monkeypatch,
                                              f"{name} {classes}x{per_class}")


@needs_native
def test_row_kernels_same_bits_for_any_isa_and_thread_count():
    """The row kernels on a given chunk of S: the same bits for every instruction set and thread
    count (S itself is a BLAS product, whose bits may depend on the thread count)."""
    q, labels, grad = _ranking_case(9, 4, torch.float32, seed=3)
    S, g = (q[5:30] @ q.t()).contiguous(), grad[5:30].contiguous()
    ids = labels.to(torch.float32)
    positives, valid = pnp._positive_lists(labels)
    positives = torch.where(valid, positives, -1)[5:30].contiguous()
    g_rk = torch.randn(positives.shape, generator=torch.Generator().manual_seed(2))
    ops, old_threads = torch.ops.fused_pairloss, torch.get_num_threads()
    isa_before = ops.cpu_isa()
    runs = []
    try:
        for isa in ("base", "avx2", "avx512"):
            for threads in (1, 3):
                if ops.cpu_isa(isa) != isa:
                    continue
                torch.set_num_threads(threads)
                runs.append((isa, threads, [ops.smooth_ap_chunk_ranks(S, 5, 9, 0.05),
                                            ops.smooth_ap_chunk_grad(S, g, 5, 9, 0.05),
                                            ops.pnp_chunk_ranks(S, ids, positives, 5, 0.05),
                                            ops.pnp_chunk_grad(S, ids, positives, g_rk, 5, 0.05)]))
    finally:
        ops.cpu_isa(isa_before)
        torch.set_num_threads(old_threads)
    assert len(runs) >= 4
    for isa, threads, outs in runs[1:]:
        for k, (a, b) in enumerate(zip(outs, runs[0][2])):
            assert torch.equal(a, b), (isa, threads, k)


@needs_native
def test_row_kernel_ops():
    """The four compiled ops: opcheck (schema, fake kernel), and their argument checks."""
    q, labels, grad = _ranking_case(4, 3, torch.float64, seed=1)
    smooth_ap._native_chunks(q)  # registers the fake kernels
    pnp._native_chunks(q)
    S = (q[2:7] @ q.t()).contiguous()
    ids = labels.to(torch.float64)
    positives = pnp._positive_lists(labels)[0][2:7].contiguous()
    g_rk = torch.randn(positives.shape, dtype=torch.float64)
    ops = torch.ops.fused_pairloss
    torch.library.opcheck(ops.smooth_ap_chunk_ranks.default, (S, 2, 4, 0.1))
    torch.library.opcheck(ops.smooth_ap_chunk_grad.default, (S, grad[2:7].contiguous(), 2, 4, 0.1))
    torch.library.opcheck(ops.pnp_chunk_ranks.default, (S, ids, positives, 2, 0.1))
    torch.library.opcheck(ops.pnp_chunk_grad.default, (S, ids, positives, g_rk, 2, 0.1))
    with pytest.raises(RuntimeError, match="block must divide"):
        ops.smooth_ap_chunk_ranks(S, 2, 5, 0.1)
    with pytest.raises(RuntimeError, match="are not rows"):
        ops.smooth_ap_chunk_ranks(S, 9, 4, 0.1)
    with pytest.raises(RuntimeError, match="grad_ap"):
        ops.smooth_ap_chunk_grad(S, grad[:3].contiguous(), 2, 4, 0.1)
    with pytest.raises(RuntimeError, match="1 / temperature must be finite"):
        ops.smooth_ap_chunk_ranks(S.float(), 2, 4, 1e-40)
    with pytest.raises(RuntimeError, match="positives must be columns"):
        ops.pnp_chunk_ranks(S, ids, positives + 100, 2, 0.1)
    with pytest.raises(RuntimeError, match="class_ids"):
        ops.pnp_chunk_ranks(S, ids.float(), positives, 2, 0.1)
    with pytest.raises(RuntimeError, match="grad_rk"):
        ops.pnp_chunk_grad(S, ids, positives, g_rk[:, :1].contiguous(), 2, 0.1)


# ---- the Triton row kernels (the ops' CUDA kernels, ops/triton_rank_rows.py) ----------------------
def _triton_rank_rows():
    pytest.importorskip("triton")
    from fused_pairloss.ops import triton_rank_rows as TR

    if not TR.AVAILABLE:
        pytest.skip("the Triton row kernels need the compiled library (the ops' schemas)")
    return TR


def _interpreted():
    from fused_pairloss.ops import triton_engines

    return triton_engines.INTERPRETED


def _chunk_case(name, classes, per_class, dtype, seed, a0, a1):
    """(S rows a0..a1 of the batch, the op's extra arguments before first_row, after it)."""
    q, labels, _ = _ranking_case(classes, per_class, dtype, seed)
    S = (q[a0:a1] @ q.t()).contiguous()
    if name == "smoothap":
        return S, (), (classes, 0.05)
    positives, valid = pnp._positive_lists(labels)
    positives = torch.where(valid, positives, -1)[a0:a1].contiguous()
    return S, (torch.unique(labels, return_inverse=True)[1].to(dtype), positives), (0.02,)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", ["smoothap", "pnp"])
def test_triton_row_kernels_match_the_cpu_kernels(name, dtype):
    """The GPUs' row kernels (run by the interpreter on CPU tensors) against the compiled CPU ones:
    ranks and gradients under the kit's rule (truth: the CPU kernels in fp64); 33 classes of 2
    (SmoothAP: two blocks of p's, columns over two tiles), 5 classes of 20 (PNP: positive lists
    wider than a block), a chunk that starts inside a block."""
    TR = _triton_rank_rows()
    if not _interpreted():
        pytest.skip("the GPU runs these kernels in the loss tests")
    ops = torch.ops.fused_pairloss
    for classes, per_class, a0, a1 in ((33, 2, 3, 50), (5, 20, 0, 100), (4, 3, 1, 12)):
        case = _chunk_case(name, classes, per_class, dtype, classes, a0, a1)
        case64 = _chunk_case(name, classes, per_class, torch.float64, classes, a0, a1)
        S, before, after = case
        rows = S.shape[0]
        width = rows if name == "smoothap" else before[1].shape
        g = torch.randn(width, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        for op in ("ranks", "grad"):
            cpu_op = getattr(ops, f"{'smooth_ap' if name == 'smoothap' else 'pnp'}_chunk_{op}")
            tr_op = getattr(TR, f"{'smooth_ap' if name == 'smoothap' else 'pnp'}_chunk_{op}")

            def args(c, gd):
                s, b, a = c
                return (s, *b, *((gd,) if op == "grad" else ()), a0, *a)
            got = tr_op(*args(case, g.to(dtype)))
            same = cpu_op(*args(case, g.to(dtype)))
            truth = cpu_op(*args(case64, g))
            kit.check_close(got, truth, same, what=f"{name} {classes}x{per_class} {op}")


@needs_native
@pytest.mark.parametrize("name", ["smoothap", "pnp"])
def test_triton_row_kernels_keep_nan(name):
    """A NaN entry of S: NaN in the GPUs' ranks and gradient exactly where the CPU kernels have it
    (PNP's clamp keeps NaN in the ranks), the same values elsewhere."""
    TR = _triton_rank_rows()
    if not _interpreted():
        pytest.skip("the GPU runs these kernels in the loss tests")
    ops = torch.ops.fused_pairloss
    prefix = "smooth_ap" if name == "smoothap" else "pnp"
    S, before, after = _chunk_case(name, 5, 4, torch.float64, 2, 0, 20)
    S[3, 7] = float("nan")
    g = torch.randn(S.shape[0] if name == "smoothap" else before[1].shape, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(3))
    for op in ("ranks", "grad"):
        args = (S, *before, *((g,) if op == "grad" else ()), 0, *after)
        got, want = getattr(TR, f"{prefix}_chunk_{op}")(*args), getattr(ops, f"{prefix}_chunk_{op}")(*args)
        # (PNP's gradient drops the NaN pairs: the clamp passes no gradient there)
        assert torch.equal(torch.isnan(got), torch.isnan(want)) and (op == "grad" or torch.isnan(want).any()), op
        torch.testing.assert_close(got, want, equal_nan=True)


def test_triton_row_kernels_check_their_arguments():
    TR = _triton_rank_rows()
    S = torch.zeros(3, 8)
    with pytest.raises(RuntimeError, match="block must divide"):
        TR.smooth_ap_chunk_ranks(S, 0, 3, 0.1)
    with pytest.raises(RuntimeError, match="are not rows"):
        TR.smooth_ap_chunk_ranks(S, 6, 4, 0.1)
    with pytest.raises(RuntimeError, match="1 / temperature must be finite"):
        TR.smooth_ap_chunk_ranks(S, 0, 4, 1e-40)
    with pytest.raises(RuntimeError, match="grad_ap"):
        TR.smooth_ap_chunk_grad(S, torch.zeros(2), 0, 4, 0.1)
    ids, positives = torch.zeros(8), torch.zeros(3, 2, dtype=torch.long)
    with pytest.raises(RuntimeError, match="positives must be columns"):
        TR.pnp_chunk_ranks(S, ids, positives + 100, 0, 0.1)
    with pytest.raises(RuntimeError, match="class_ids"):
        TR.pnp_chunk_ranks(S, ids.double(), positives, 0, 0.1)
    with pytest.raises(RuntimeError, match="grad_rk"):
        TR.pnp_chunk_grad(S, ids, positives, torch.zeros(3, 1), 0, 0.1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", list(RANKING_OPS))
def test_gpu_row_kernels_match_the_pytorch_chunks(name, dtype, monkeypatch):
    """On a GPU the losses' ops run the Triton row kernels: their rows and gradients against the
    PyTorch chunks on the same device (kit's rule, truth the fp64 PyTorch chunks), and at N = 2048
    the memory of the op's forward and backward stays within a few chunks of S."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    _triton_rank_rows()
    module, ops, arg_list = RANKING_OPS[name]
    for k, (classes, per_class) in enumerate(((5, 5), (33, 2), (16, 8))):
        q, labels, grad = (t.cuda() for t in _ranking_case(classes, per_class, dtype, seed=classes))
        assert module._native_chunks(q)
        _check_kernels_against_pytorch_chunks(module, ops, q, labels, grad, arg_list[k], monkeypatch,
                                              f"{name} {classes}x{per_class}")
    # the ops' CUDA kernels (schema, fake kernel) on a chunk, as test_row_kernel_ops on the CPU
    S = (q[2:7] @ q.t()).contiguous()
    if name == "smoothap":
        torch.library.opcheck(torch.ops.fused_pairloss.smooth_ap_chunk_ranks.default, (S, 2, classes, 0.1))
        torch.library.opcheck(torch.ops.fused_pairloss.smooth_ap_chunk_grad.default,
                              (S, grad[2:7].contiguous(), 2, classes, 0.1))
    else:
        ids = torch.unique(labels, return_inverse=True)[1].to(S.dtype)
        positives = pnp._positive_lists(labels)[0][2:7].contiguous()
        torch.library.opcheck(torch.ops.fused_pairloss.pnp_chunk_ranks.default, (S, ids, positives, 2, 0.1))
        torch.library.opcheck(torch.ops.fused_pairloss.pnp_chunk_grad.default,
                              (S, ids, positives, torch.randn_like(positives, dtype=S.dtype), 2, 0.1))
    q, labels, grad = (t.cuda() for t in _ranking_case(32, 64, torch.float32, seed=1))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    _both(ops, q, labels, grad, arg_list[0])
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < 64 * 2**20
