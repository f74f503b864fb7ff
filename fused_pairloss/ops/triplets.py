"""The all-triplets op: per anchor row, the sum and the count of the triplet hinge terms > 0 over
all its (positive, negative) pairs, without enumerating the triplets (docs/design.md, "Triplets").

    fused_pairloss::triplet_rows(q[N,D], r[M,D], labels_q[N], labels_r[M], exclude_col[N], margin, lp,
                                 window_lo, window_hi) -> (sums A[N], counts int64[N], in_window int64[N])

q, r normalized rows (self mode: r is q and exclude_col[i] = i); u = d (lp) or -S; per row i, A_p =
u_ip + margin over its positives (same label, p != exclude_col_i), B_n = u_in over its negatives:
sums_i = sum_{p,n} relu(A_p - B_n) = sum_p (k_p A_p - sum_{n: B_n < A_p} B_n), k_p = #{n : B_n <
A_p}, counts_i = sum_p k_p (the nonzero terms). Per row the positives' A are sorted (a top-k), every
negative is placed in the bucket between two of them (a binary search), and per-bucket counts and
sums, prefix-summed over the buckets, give k_p and the sums. Rows go in chunks of at most
CHUNK_ELEMENTS pair entries; the backward op recomputes each chunk (d sums_i / d A_p = k_p, d sums_i
/ d B_n = -#{p : A_p > B_n}), so no N x M tensor exists at any time. A stat dtype as the engines
(fp32 for fp16 / bf16, fp64 for fp64).

A miner's window (TripletMarginMiner's type_of_triplets, on PML's triplet margin u_an - u_ap)
keeps only the (p, n) with window_lo < B_n - u_ap <= window_hi (-inf, inf: every pair); in_window_i
counts them (the miner's triplets of row i). With a window each positive is compared with every
negative (P passes over the row) instead of the buckets.

Implementations of that schema, each a torch.library op pair (forward, backward) with a fake kernel
and one autograd rule: `triplet_rows` here in PyTorch, the same on every device; the compiled op
`fused_pairloss::triplet_engine_forward`, whose CPU kernel (csrc/cpu/triplet_engine_cpu.cpp: one
strip of rows against all columns at a time, its S from the engines' GEMM) the "cpu" backend uses
and whose CUDA kernel (csrc/cuda/triplet_engine.cu) the "cuda" backend; and the Triton ops of
ops/triton_triplets.py. `rows_op(backend, device)` picks the first two.
"""
from __future__ import annotations

import functools

import torch

from .. import _extension
from ._common import CompiledRowKernels
from .operands import lp_distances, lp_squared_distances, stat_dtype

# pair entries of one chunk's N_chunk x M buffers (a few of them live at once)
CHUNK_ELEMENTS = 1 << 20


def triplet_u(q, r, lp):
    """u = d (accurate near d = 0 as the engines: docs/design.md "Numerics") or -S; a NaN d2 stays
    NaN, as in the engines' u (its pairs then hold no term, as PML's NaN distances)."""
    s = q @ r.t()
    if not lp:
        return -s
    d2 = lp_squared_distances(s, q, r)
    return torch.where(d2.isnan(), d2, lp_distances(d2))


def _chunk_sets(q, r, labels_q, labels_r, exclude_col, lp):
    """u of a chunk and its positive / negative masks."""
    u = triplet_u(q, r, lp)
    same = labels_q[:, None] == labels_r[None, :]
    cols = torch.arange(r.shape[0], device=q.device)
    return u, same & (cols[None, :] != exclude_col[:, None]), ~same


def _buckets(u, positive, negative, margin):
    """Per row, the positives' thresholds A ascending (B x P, P the chunk's largest positive set, the
    rows with fewer padded with -inf in front), where they sit in u (B x P), and each column's bucket
    t = #{j : A_j <= u} (B x M): a negative is below A_j (a nonzero term) iff j >= t."""
    P = int(positive.sum(1).max()) if u.numel() else 0
    thresholds = torch.where(positive, u + margin, torch.full_like(u, float("-inf")))
    A, where_in_u = torch.topk(thresholds, P, dim=1, largest=True, sorted=True)
    A, where_in_u = A.flip(1), where_in_u.flip(1)
    bucket = torch.searchsorted(A.detach().contiguous(), u.detach().contiguous(), right=True)
    return A, where_in_u, bucket, P


NO_WINDOW = (float("-inf"), float("inf"))


def _has_window(window_lo, window_hi):
    return (window_lo, window_hi) != NO_WINDOW


def _positives(u, positive):
    """Per row the positives' u and columns (B x P, P the chunk's largest positive set; rows with
    fewer padded, `real` False there)."""
    P = int(positive.sum(1).max()) if u.numel() else 0
    _, cols = torch.topk(positive.to(torch.int8), P, dim=1)
    real = torch.gather(positive, 1, cols)
    return torch.gather(u, 1, cols), cols, real


def _window_terms(u, positive, negative, margin, window_lo, window_hi):
    """Per positive rank j (a loop over P): the B x M masks of the (p_j, n) in the window and of the
    terms > 0 there, with the hinge x = u_pj + margin - u_n."""
    a, cols, real = _positives(u, positive)
    for j in range(a.shape[1]):
        aj = a[:, j:j + 1]
        tm = u - aj
        win = negative & real[:, j:j + 1] & (tm > window_lo) & (tm <= window_hi)
        x = (aj + margin) - u
        yield j, cols, win, win & (x > 0), x


def chunk_rows(q, r, labels_q, labels_r, exclude_col, margin, lp, window_lo=NO_WINDOW[0], window_hi=NO_WINDOW[1]):
    """(sums, counts, in_window) of the rows q (a chunk) against r, sums differentiable. Without a
    window: per bucket the count and the sum of the negatives in it, prefix sums over the buckets
    give k_j and sum_{n: B_n < A_j} B_n; with one, a pass per positive."""
    u, positive, negative = _chunk_sets(q, r, labels_q, labels_r, exclude_col, lp)
    B = u.shape[0]
    if _has_window(window_lo, window_hi):
        sums = u.new_zeros(B)
        counts = torch.zeros(B, dtype=torch.int64, device=u.device)
        in_window = torch.zeros_like(counts)
        for _, _, win, on, x in _window_terms(u, positive, negative, margin, window_lo, window_hi):
            sums = sums + torch.where(on, x, torch.zeros_like(x)).sum(1)
            counts += on.sum(1)
            in_window += win.sum(1)
        return sums, counts, in_window
    A, _, bucket, P = _buckets(u, positive, negative, margin)
    k = torch.zeros(B, P + 1, dtype=u.dtype, device=u.device).scatter_add(1, bucket, negative.to(u.dtype))
    below = torch.zeros(B, P + 1, dtype=u.dtype, device=u.device).scatter_add(
        1, bucket, torch.where(negative, u, torch.zeros_like(u)))
    k, below = k[:, :P].cumsum(1), below[:, :P].cumsum(1)
    real = torch.isfinite(A)
    terms = torch.where(real, k * torch.where(real, A, torch.zeros_like(A)) - below, torch.zeros_like(A))
    n_pos = real.sum(1)
    in_window = n_pos * (negative & (u == u)).sum(1)
    return terms.sum(1), torch.where(real, k, torch.zeros_like(k)).sum(1).to(torch.int64), in_window


def _chunks(n, m):
    step = max(1, CHUNK_ELEMENTS // max(m, 1))
    return [(i0, min(n, i0 + step)) for i0 in range(0, n, step)]


@torch.library.custom_op("fused_pairloss::triplet_rows", mutates_args=())
def triplet_rows(q: torch.Tensor, r: torch.Tensor, labels_q: torch.Tensor, labels_r: torch.Tensor,
                 exclude_col: torch.Tensor, margin: float, lp: bool, window_lo: float,
                 window_hi: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    A = stat_dtype(q.dtype)
    qa, ra = q.to(A), r.to(A)
    parts = [chunk_rows(qa[i0:i1], ra, labels_q[i0:i1], labels_r, exclude_col[i0:i1], margin, lp, window_lo,
                        window_hi) for i0, i1 in _chunks(q.shape[0], r.shape[0])]
    if not parts:
        return q.new_zeros((0,), dtype=A), q.new_zeros((0,), dtype=torch.int64), q.new_zeros((0,), dtype=torch.int64)
    return tuple(torch.cat(x) for x in zip(*parts))


def _fake_rows(q, r, labels_q, labels_r, exclude_col, margin, lp, window_lo, window_hi):
    n = q.shape[0]
    return (q.new_empty((n,), dtype=stat_dtype(q.dtype)), q.new_empty((n,), dtype=torch.int64),
            q.new_empty((n,), dtype=torch.int64))


triplet_rows.register_fake(_fake_rows)


def _chunk_vjp(differentiable, grad, q, r, labels_q, labels_r, exclude_col, scalars, need_q, need_r):
    """(grad_q, grad_r) of sum_i grad_i . out_i, differentiable (create_graph=True), chunk by chunk
    (each chunk recomputed): `differentiable(q_chunk, r, labels_q_chunk, labels_r, exclude_col_chunk,
    *scalars)` is an op's first output for those rows (chunk_rows' sums, chunk_bins' bins)."""
    A = stat_dtype(q.dtype)
    q_grads, grad_r = [], None
    for i0, i1 in _chunks(q.shape[0], r.shape[0]):
        with torch.enable_grad():
            # nodes of their own (r may be q itself), through which the graph reaches q and r
            qc = q[i0:i1].to(A)
            rc = r.to(A).view_as(r)
            out = differentiable(qc, rc, labels_q[i0:i1], labels_r, exclude_col[i0:i1], *scalars)
            wanted = [t for t, need in ((qc, need_q), (rc, need_r)) if need]
            grads = list(torch.autograd.grad(out, wanted, grad[i0:i1].to(A), create_graph=True, allow_unused=True))
        if need_q:
            gq = grads.pop(0)
            q_grads.append(torch.zeros_like(qc) if gq is None else gq)
        if need_r:
            gr = grads.pop(0)
            if gr is not None:
                grad_r = gr if grad_r is None else grad_r + gr
    grad_q = (torch.cat(q_grads) if q_grads else torch.zeros_like(q, dtype=A)).to(q.dtype) if need_q else None
    if need_r:
        grad_r = (torch.zeros_like(r, dtype=A) if grad_r is None else grad_r).to(r.dtype)
    return grad_q, grad_r


def _chunk_coefficients(q, r, labels_q, labels_r, exclude_col, margin, lp, window):
    """dsums_i/dv_ij of a chunk (v = d, or S for the cosine): k_j for a positive, -c_n for a negative
    with c_n = #{j : A_j > B_n} = P - t_n (the -inf padding sits below every bucket; with a window:
    the terms > 0 counted pass by pass), divided by d for lp (0 at d = 0), negated for the cosine
    (u = -S)."""
    u, positive, negative = _chunk_sets(q, r, labels_q, labels_r, exclude_col, lp)
    if _has_window(*window):
        coef = torch.zeros_like(u)
        for j, cols, _, on, _ in _window_terms(u, positive, negative, margin, *window):
            coef = coef - on.to(u.dtype)
            coef = coef.scatter_add(1, cols[:, j:j + 1], on.sum(1, keepdim=True).to(u.dtype))
    else:
        A, where_in_u, bucket, P = _buckets(u, positive, negative, margin)
        k = torch.zeros(u.shape[0], P + 1, dtype=u.dtype, device=u.device).scatter_add(1, bucket,
                                                                                       negative.to(u.dtype))
        k = k[:, :P].cumsum(1)
        coef = torch.zeros_like(u).scatter(1, where_in_u, torch.where(torch.isfinite(A), k, torch.zeros_like(k)))
        coef = torch.where(negative, -(P - bucket).to(u.dtype), torch.where(positive, coef, torch.zeros_like(u)))
    if lp:
        return torch.where(u > 0, coef / torch.where(u > 0, u, torch.ones_like(u)), torch.zeros_like(u))
    return -coef


@torch.library.custom_op("fused_pairloss::triplet_rows_backward", mutates_args=())
def triplet_rows_backward(grad_sums: torch.Tensor, q: torch.Tensor, r: torch.Tensor, labels_q: torch.Tensor,
                          labels_r: torch.Tensor, exclude_col: torch.Tensor, margin: float, lp: bool,
                          window_lo: float, window_hi: float, need_grad_q: bool,
                          need_grad_r: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The vector-Jacobian product of triplet_rows' sums, chunk by chunk: with W = g_i dsums_i/dv_ij
    (v = d or S), grad_q = W r (+ the lp norms' share: d_ij = |q_i - r_j| gives (q_i - r_j) / d_ij)
    and grad_r = W^T q likewise; an empty tensor for a gradient not needed."""
    window = (window_lo, window_hi)
    return _vjp_through_u(lambda qc, i0, i1: grad_sums[i0:i1, None].to(qc.dtype) * _chunk_coefficients(
        qc, r.to(qc.dtype), labels_q[i0:i1], labels_r, exclude_col[i0:i1], margin, lp, window), q, r, lp,
        need_grad_q, need_grad_r)


def _vjp_through_u(chunk_W, q, r, lp, need_grad_q, need_grad_r):
    """(grad_q, grad_r) from W = chunk_W(q_chunk, i0, i1), per chunk of rows dL/du / u for lp (u = d:
    d/dq_i |q_i - r_j| = (q_i - r_j) / d) or -dL/du for the cosine (u = -S); an empty tensor for a
    gradient not needed."""
    A = stat_dtype(q.dtype)
    qa, ra = q.to(A), r.to(A)
    grad_q = torch.zeros_like(qa) if need_grad_q else None
    grad_r = torch.zeros_like(ra) if need_grad_r else None
    sign = -1.0 if lp else 1.0
    for i0, i1 in _chunks(q.shape[0], r.shape[0]):
        W = chunk_W(qa[i0:i1], i0, i1)
        if need_grad_q:
            grad_q[i0:i1] = sign * (W @ ra) + (W.sum(1, keepdim=True) * qa[i0:i1] if lp else 0)
        if need_grad_r:
            grad_r += sign * (W.t() @ qa[i0:i1]) + (W.sum(0)[:, None] * ra if lp else 0)
    empty = q.new_empty  # one per gradient not needed: an op's outputs may not alias
    return ((empty((0,)) if grad_q is None else grad_q.to(q.dtype)),
            (empty((0,)) if grad_r is None else grad_r.to(r.dtype)))


def _fake_grads(q, r, need_grad_q, need_grad_r):
    """The fake kernels' (grad_q, grad_r): like q and r, or an empty tensor (one per gradient not
    needed: an op's outputs may not alias)."""
    return (torch.empty_like(q) if need_grad_q else q.new_empty((0,))), (
        torch.empty_like(r) if need_grad_r else q.new_empty((0,)))


def _fake_rows_backward(grad_sums, q, r, labels_q, labels_r, exclude_col, margin, lp, window_lo, window_hi,
                        need_grad_q, need_grad_r):
    return _fake_grads(q, r, need_grad_q, need_grad_r)


triplet_rows_backward.register_fake(_fake_rows_backward)


def _setup_context(ctx, inputs, output):
    q, r, labels_q, labels_r, exclude_col, *scalars = inputs
    ctx.save_for_backward(q, r, labels_q, labels_r, exclude_col)
    ctx.scalars = tuple(scalars)


def _hinge_sums(q, r, labels_q, labels_r, exclude_col, margin, lp, window_lo, window_hi):
    return chunk_rows(q, r, labels_q, labels_r, exclude_col, margin, lp, window_lo, window_hi)[0]


def _autograd_backward(backward_op, differentiable_vjp):
    """The autograd rule of a forward op (q, r, labels_q, labels_r, exclude_col, *scalars) whose
    first output is differentiable: its first-order gradient is `backward_op`; under
    create_graph=True `differentiable_vjp(grad, q, r, labels_q, labels_r, exclude_col, scalars,
    need_q, need_r)`, the same product recomputed in PyTorch, differentiable."""
    def backward(ctx, grad, *_other_outputs):
        q, r, labels_q, labels_r, exclude_col = ctx.saved_tensors
        need_q, need_r = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        rest = (None,) * (3 + len(ctx.scalars))  # labels, exclude_col, the scalars
        if grad is None or not (need_q or need_r):
            return (None, None, *rest)
        if torch.is_grad_enabled():  # create_graph=True: the gradient itself must be differentiable
            gq, gr = differentiable_vjp(grad, q, r, labels_q, labels_r, exclude_col, ctx.scalars, need_q, need_r)
        else:
            gq, gr = backward_op(grad.contiguous(), q, r, labels_q, labels_r, exclude_col, *ctx.scalars, need_q,
                                 need_r)
        return ((gq if need_q else None), (gr if need_r else None), *rest)
    return backward


def _backward_not_differentiable(ctx, *grads):
    raise RuntimeError("fused_pairloss: the triplet ops' backward op (a first-order gradient) is not "
                       "differentiable; second-order gradients go through create_graph=True")


def _no_context(ctx, inputs, output):
    pass


def _chunked(differentiable):
    """The create_graph vector-Jacobian product of an op whose first output `differentiable`
    computes for a chunk of rows (_chunk_vjp)."""
    return functools.partial(_chunk_vjp, differentiable)


def _register_pair(forward, backward, fakes, differentiable_vjp):
    """The autograd rule (and, with fakes, the fake kernels) of a forward / backward op pair, given as
    custom op objects or qualified names; `differentiable_vjp` as _autograd_backward's."""
    if fakes is not None:
        torch.library.register_fake(forward)(fakes[0])
        torch.library.register_fake(backward)(fakes[1])
    backward_op = getattr(torch.ops.fused_pairloss, backward.split("::")[1]) if isinstance(backward, str) else backward
    torch.library.register_autograd(forward, _autograd_backward(backward_op, differentiable_vjp),
                                    setup_context=_setup_context)
    torch.library.register_autograd(backward, _backward_not_differentiable, setup_context=_no_context)


_register_pair(triplet_rows, triplet_rows_backward, None, _chunked(_hinge_sums))


# ---- triplet bins (DynamicSoftMarginLoss) --------------------------------------------------------
def chunk_bins(q, r, labels_q, labels_r, exclude_col, lo, width, bins):
    """(bins [B, 2, bins], counts [B]) of the rows q (a chunk) against r, the bins differentiable (the
    schema below): a pass per positive rank over the row's negatives (B x M at a time)."""
    u, positive, negative = _chunk_sets(q, r, labels_q, labels_r, exclude_col, True)
    a, _, real = _positives(u, positive)
    B = u.shape[0]
    inc, x_sums = u.new_zeros(B, bins), u.new_zeros(B, bins)
    counts = torch.zeros(B, dtype=torch.int64, device=u.device)
    for j in range(a.shape[1]):
        on, x, k, m, f = _bin_terms(a[:, j:j + 1], u, negative & real[:, j:j + 1], lo, width, bins)
        zero = torch.zeros_like(x)
        inc = inc.scatter_add(1, m, torch.where(on, 1 - f, zero)).scatter_add(1, m + 1, torch.where(on, f, zero))
        x_sums = x_sums.scatter_add(1, k, torch.where(on, x, zero))
        counts += on.sum(1)
    return torch.stack([inc, x_sums], 1), counts


def _bin_terms(a, u, pairs, lo, width, bins):
    """The (p, n) of one positive rank: kept (pairs and not NaN), x = a_p - u_n, PML's bin k =
    clamp(floor t, 0, bins - 1) of t = (x - lo) / width, m = min(k, bins - 2) and f = frac(t)."""
    x = a - u
    on = pairs & ~torch.isnan(x)
    t = torch.where(on, (x - lo) / width, torch.zeros_like(x))
    k = torch.floor(t).clamp(0, bins - 1).long()
    return on, x, k, k.clamp(max=bins - 2), torch.frac(t)


@torch.library.custom_op("fused_pairloss::triplet_bins", mutates_args=())
def triplet_bins(q: torch.Tensor, r: torch.Tensor, labels_q: torch.Tensor, labels_r: torch.Tensor,
                 exclude_col: torch.Tensor, lo: float, width: float, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row i of q (normalized), over its (positive, negative) pairs of r (positives: same label,
    column != exclude_col_i), x = d_ap - d_an in PML's bins of width `width` from `lo`:
    bins_out[i, 0] PML's histogram increments (1 - f at bin m, f at m + 1), bins_out[i, 1, k] the sum
    of x over bin k (module docstring of losses/dynamic_soft_margin.py); counts_i the number of
    pairs. The compiled op triplet_bins_engine_forward has the same schema."""
    A = stat_dtype(q.dtype)
    qa, ra = q.to(A), r.to(A)
    parts = [chunk_bins(qa[i0:i1], ra, labels_q[i0:i1], labels_r, exclude_col[i0:i1], lo, width, bins)
             for i0, i1 in _chunks(q.shape[0], r.shape[0])]
    if not parts:
        return q.new_zeros((0, 2, bins), dtype=A), q.new_zeros((0,), dtype=torch.int64)
    return torch.cat([b for b, _ in parts]), torch.cat([c for _, c in parts])


def _fake_bins(q, r, labels_q, labels_r, exclude_col, lo, width, bins):
    n = q.shape[0]
    return q.new_empty((n, 2, bins), dtype=stat_dtype(q.dtype)), q.new_empty((n,), dtype=torch.int64)


triplet_bins.register_fake(_fake_bins)


def bin_weights(grad_bins, width, bins):
    """[N, bins]: a pair's dL/dx per row and bin k for the incoming gradient of the bins,
    w_k = (g_inc[m + 1] - g_inc[m]) / width + g_x[k], m = min(k, bins - 2)."""
    m = torch.arange(bins, device=grad_bins.device).clamp(max=bins - 2)
    return (grad_bins[:, 0, m + 1] - grad_bins[:, 0, m]) / width + grad_bins[:, 1]


def _chunk_bin_W(grad, q, r, labels_q, labels_r, exclude_col, lo, width, bins):
    """W = dL/du_ij / u_ij of a chunk's rows (0 at u = 0): a pair's dL/dx is its bin's weight
    (bin_weights), added to d_ap and taken from d_an."""
    u, positive, negative = _chunk_sets(q, r, labels_q, labels_r, exclude_col, True)
    a, cols, real = _positives(u, positive)
    weight = bin_weights(grad, width, bins)
    coef = torch.zeros_like(u)
    for j in range(a.shape[1]):
        on, _, k, _, _ = _bin_terms(a[:, j:j + 1], u, negative & real[:, j:j + 1], lo, width, bins)
        w = torch.where(on, weight.gather(1, k), torch.zeros_like(u))
        coef = (coef - w).scatter_add(1, cols[:, j:j + 1], w.sum(1, keepdim=True))
    return torch.where(u > 0, coef / torch.where(u > 0, u, torch.ones_like(u)), torch.zeros_like(u))


@torch.library.custom_op("fused_pairloss::triplet_bins_backward", mutates_args=())
def triplet_bins_backward(grad_bins: torch.Tensor, q: torch.Tensor, r: torch.Tensor, labels_q: torch.Tensor,
                          labels_r: torch.Tensor, exclude_col: torch.Tensor, lo: float, width: float, bins: int,
                          need_grad_q: bool, need_grad_r: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The vector-Jacobian product of triplet_bins' bins, chunk by chunk."""
    return _vjp_through_u(lambda qc, i0, i1: _chunk_bin_W(grad_bins[i0:i1].to(qc.dtype), qc, r.to(qc.dtype),
                                                          labels_q[i0:i1], labels_r, exclude_col[i0:i1], lo, width,
                                                          bins),
                          q, r, True, need_grad_q, need_grad_r)


def _fake_bins_backward(grad_bins, q, r, labels_q, labels_r, exclude_col, lo, width, bins, need_grad_q, need_grad_r):
    return _fake_grads(q, r, need_grad_q, need_grad_r)


def _bins(q, r, labels_q, labels_r, exclude_col, lo, width, bins):
    return chunk_bins(q, r, labels_q, labels_r, exclude_col, lo, width, bins)[0]


triplet_bins_backward.register_fake(_fake_bins_backward)
_register_pair(triplet_bins, triplet_bins_backward, None, _chunked(_bins))

# ---- triplets whose term couples a positive and a negative (swap, smooth_loss) -------------------
def _coupled_groups(labels_q, labels_r, exclude_col, m, elements=CHUNK_ELEMENTS):
    """The (anchor, positive) pairs of the anchors that have a negative, in groups of at most
    `elements` / m pairs: anchors in label order (a group's anchors then share their positives'
    rows), each anchor's positives together in ascending column order. (a, p) index tensors, found
    by a binary search of each anchor's label among the sorted column labels (O(N + M + pairs)
    memory, a bounded run of anchors at a time)."""
    step = max(1, elements // max(m, 1))
    anchors = torch.sort(labels_q, stable=True).indices
    sorted_r, order_r = torch.sort(labels_r, stable=True)
    first = torch.searchsorted(sorted_r, labels_q[anchors])
    number = torch.searchsorted(sorted_r, labels_q[anchors], right=True) - first  # columns of its label
    number = torch.where(number < m, number, 0)  # an anchor without a negative has no triplet
    ends = number.cumsum(0)
    begin, done = 0, 0  # the run's first anchor, the columns listed before it
    while begin < anchors.numel():
        end = max(begin + 1, int(torch.searchsorted(ends, done + 8 * step, right=True)))
        count = number[begin:end]
        a = anchors[begin:end].repeat_interleave(count)
        within = torch.arange(a.numel(), device=a.device) - (ends[begin:end] - count - done).repeat_interleave(count)
        p = order_r[first[begin:end].repeat_interleave(count) + within]
        kept = p != exclude_col[a]
        a, p = a[kept], p[kept]
        for g0 in range(0, a.numel(), step):
            yield a[g0:g0 + step], p[g0:g0 + step]
        begin, done = end, int(ends[end - 1])


def _distinct_u(q, r, rows, lp):
    """(distinct rows, each listed row's place among them, u of the distinct rows of q against r)."""
    distinct, inverse = torch.unique(rows, return_inverse=True)
    return distinct, inverse, triplet_u(q[distinct], r, lp)


def _coupled_x(q, r, labels_q, labels_r, a, p, margin, lp, swap):
    """x = u_ap + margin - u'_an per listed (a, p) (G x M), the negatives' mask, and the u rows
    read: (distinct anchors, their places, their u) and the same of the positives under swap."""
    anchors = _distinct_u(q, r, a, lp)
    ua = anchors[2][anchors[1]]
    positives = None
    un = ua
    if swap:
        positives = _distinct_u(q, r, p, lp)
        un = torch.minimum(ua, positives[2][positives[1]])
    x = (ua.gather(1, p[:, None]) + margin) - un
    return x, labels_r[None, :] != labels_q[a][:, None], anchors, positives


def coupled_terms(q, r, labels_q, labels_r, a, p, margin, lp, swap, smooth):
    """Per listed (anchor a, positive p), over the negatives n of a: the sum of the terms > 0 and
    their count. x = u_ap + margin - u'_an, u'_an = min(u_an, u_pn) with swap (u_pn of row p of q
    against r: PML's mat[positive_idx, negative_idx], the smallest distance / largest similarity),
    else u_an; the term softplus(x) with smooth, else relu(x). Differentiable in q and r (torch's
    minimum splits a tie's gradient, as PML's torch.min)."""
    x, negative, _, _ = _coupled_x(q, r, labels_q, labels_r, a, p, margin, lp, swap)
    term = torch.nn.functional.softplus(x) if smooth else torch.relu(x)
    on = negative & (term > 0)  # AvgNonZero: NaN terms dropped
    return torch.where(on, term, torch.zeros_like(term)).sum(1), on.sum(1)


class _RowGrads:
    """grad_q and grad_r (None where not needed) of the sum over groups of sum(W * u), u the u of a
    group's distinct `rows` of q against r (u = d: d/dq_i |q_i - r_j| = (q_i - r_j) / d, 0 at d = 0;
    or u = -S). Each group adds to grad_q's rows and, in place, W^T q[rows] to grad_r (one pass
    over it a group); for d, r_j's own term (sum_i W_ij / d_ij) r_j is summed over the groups as a
    column weight and added once (finish)."""

    def __init__(self, q, r, lp, need_q, need_r):
        self.q, self.r, self.lp = q, r, lp
        self.grad_q = torch.zeros_like(q) if need_q else None
        self.grad_r = torch.zeros_like(r) if need_r else None
        self.column_weight = r.new_zeros(r.shape[0]) if need_r and lp else None

    def add(self, W, rows, u, per_difference=False):
        """per_difference: W is already the coefficients of the rows' differences (for d: W / d, the
        compiled kernels' division)."""
        q, r = self.q, self.r
        if self.lp and not per_difference:
            W = torch.where(u > 0, W / torch.where(u > 0, u, torch.ones_like(u)), torch.zeros_like(u))
        if self.grad_q is not None:
            self.grad_q.index_add_(0, rows, W.sum(1, keepdim=True) * q[rows] - W @ r if self.lp else -(W @ r))
        if self.grad_r is not None:
            self.grad_r.addmm_(W.t(), q[rows], alpha=-1)
            if self.lp:
                self.column_weight += W.sum(0)

    def finish(self):
        if self.column_weight is not None:
            self.grad_r += self.column_weight[:, None] * self.r
        return self.grad_q, self.grad_r


def coupled_grads(grad_sums, q, r, labels_q, labels_r, exclude_col, margin, lp, swap, smooth, need_q, need_r):
    """(grad_q, grad_r) (None where not needed) of sum_i grad_i sums_i in q's dtype of stats: per
    term on, g = grad_a relu'(x) = 1 or softplus'(x) (torch's: 1 above x = 20, else sigmoid(x));
    dL/du_ap = sum_n g, dL/du'_an = -g, which goes to u_an or u_pn, whichever is smaller (half to
    each on a tie: torch's minimum), then through u to the rows (_RowGrads)."""
    grads = _RowGrads(q, r, lp, need_q, need_r)
    native = _native_coupled_ids(q, labels_q, labels_r)
    elements = CHUNK_ELEMENTS if native is None else NATIVE_GROUP_ELEMENTS
    for a, p in _coupled_groups(labels_q, labels_r, exclude_col, r.shape[0], elements):
        if native is not None:
            group = _NativeGroup(q, r, native, a, p, margin, lp, swap)
            Wa, Wpair = torch.ops.fused_pairloss.triplet_coupled_chunk_coefficients(
                *group.operands, p, grad_sums[group.anchors].contiguous(), swap, smooth, lp)
            W = Wa if not swap else torch.zeros_like(group.U).index_add_(0, group.anchor_rows, Wa).index_add_(
                0, group.pos_rows, Wpair)
            grads.add(W, group.rows, group.U, per_difference=True)
            continue
        x, negative, (da, ia, Ua), positives = _coupled_x(q, r, labels_q, labels_r, a, p, margin, lp, swap)
        term = torch.nn.functional.softplus(x) if smooth else torch.relu(x)
        on = negative & (term > 0)
        slope = torch.where(x > 20, 1.0, torch.sigmoid(x)).to(x.dtype) if smooth else torch.ones_like(x)
        g = torch.where(on, slope, torch.zeros_like(x)) * grad_sums[a, None].to(x.dtype)
        W_anchor = torch.zeros_like(x).scatter_(1, p[:, None], g.sum(1, keepdim=True))
        if swap:
            dp, ip, Up = positives
            ua, up = Ua[ia], Up[ip]
            to_an = torch.where(ua < up, 1.0, torch.where(ua == up, 0.5, 0.0)).to(x.dtype)
            W_anchor -= g * to_an
            grads.add(torch.zeros_like(Up).index_add_(0, ip, -g * (1 - to_an)), dp, Up)
        else:
            W_anchor -= g
        grads.add(torch.zeros_like(Ua).index_add_(0, ia, W_anchor), da, Ua)
    return grads.finish()


# The compiled CPU kernels of a group's terms (csrc/cpu/triplet_coupled_cpu.cpp), with their fake kernels.
# Their groups hold no G x M terms, only the u rows read (and under swap G x M coefficients in the
# backward): at most NATIVE_GROUP_ELEMENTS / M pairs a group, so that a group's products read r
# for more rows at a time.
NATIVE_GROUP_ELEMENTS = 1 << 22
_native_coupled = CompiledRowKernels({
    "triplet_coupled_chunk_sums":
        lambda U, class_ids, anchor_ids, anchor_rows, pair_offsets, pair_x0, pos_rows, swap, smooth: (
            U.new_empty(anchor_rows.shape), anchor_rows.new_empty(anchor_rows.shape)),
    "triplet_coupled_chunk_coefficients":
        lambda U, class_ids, anchor_ids, anchor_rows, pair_offsets, pair_x0, pos_rows, cols, grad, swap, smooth, lp: (
            U.new_empty((anchor_rows.shape[0], U.shape[1])),
            U.new_empty((pair_x0.shape[0] if swap else 0, U.shape[1]))),
    "triplet_u_rows": lambda q, r, lp: q.new_empty((q.shape[0], r.shape[0])),
})


def _native_coupled_ids(qa, labels_q, labels_r):
    """Where the compiled kernels compute the coupled terms (CPU, fp32 / fp64 rows): the rows' and the
    columns' dense class ids in qa's dtype (exact: fewer than 2^24 of them); else None."""
    n = labels_q.shape[0]
    if qa.device.type != "cpu" or not _native_coupled(qa) or n + labels_r.shape[0] >= 1 << 24:
        return None
    ids = torch.unique(torch.cat([labels_q, labels_r]), return_inverse=True)[1].to(qa.dtype)
    return ids[:n], ids[n:].contiguous()


class _NativeGroup:
    """A group of (anchor a, positive p) pairs as the compiled kernels read it: U = u of the rows
    read (the anchors, and the positives' rows under swap) against r, the engines' u (one compiled
    pass: triplet_u_rows); per distinct anchor (in the group's order: its pairs are listed
    together) its row of U and its pairs' range; per pair x0 = u_ap + margin and its positive's row
    of U. `operands`: the kernels' arguments up to the flags."""

    def __init__(self, q, r, ids, a, p, margin, lp, swap):
        self.anchors, per_anchor = torch.unique_consecutive(a, return_counts=True)
        offsets = torch.cat([per_anchor.new_zeros(1), per_anchor.cumsum(0)])
        c = self.anchors.numel()
        if swap:
            self.rows, where = torch.unique(torch.cat([self.anchors, p]), return_inverse=True)
            self.anchor_rows, self.pos_rows = where[:c].contiguous(), where[c:].contiguous()
        else:
            self.rows, self.anchor_rows = self.anchors, torch.arange(c, device=a.device)
            self.pos_rows = a.new_empty((0,))
        self.U = torch.ops.fused_pairloss.triplet_u_rows(q[self.rows], r, lp)
        x0 = self.U[self.anchor_rows.repeat_interleave(per_anchor), p] + margin
        ids_q, ids_r = ids
        self.operands = (self.U, ids_r, ids_q[self.anchors].contiguous(), self.anchor_rows, offsets, x0.contiguous(),
                         self.pos_rows)


@torch.library.custom_op("fused_pairloss::triplet_coupled_rows", mutates_args=())
def triplet_coupled_rows(q: torch.Tensor, r: torch.Tensor, labels_q: torch.Tensor, labels_r: torch.Tensor,
                         exclude_col: torch.Tensor, margin: float, lp: bool, swap: bool,
                         smooth: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per anchor row, the sum and the count of its triplet terms > 0 (coupled_terms) over all its
    (positive, negative) pairs, streamed in groups of (anchor, positive) pairs against all columns:
    O(N P M) work, no buffer over CHUNK_ELEMENTS entries, never the triplets. In the stat dtype,
    also under autocast."""
    A = stat_dtype(q.dtype)
    qa, ra = q.to(A), r.to(A)
    sums = qa.new_zeros(q.shape[0])
    counts = torch.zeros(q.shape[0], dtype=torch.int64, device=q.device)
    native = _native_coupled_ids(qa, labels_q, labels_r)
    elements = CHUNK_ELEMENTS if native is None else NATIVE_GROUP_ELEMENTS
    with torch.no_grad(), _no_autocast(q.device):
        for a, p in _coupled_groups(labels_q, labels_r, exclude_col, r.shape[0], elements):
            if native is None:
                s, c = coupled_terms(qa, ra, labels_q, labels_r, a, p, margin, lp, swap, smooth)
            else:
                group = _NativeGroup(qa, ra, native, a, p, margin, lp, swap)
                s, c = torch.ops.fused_pairloss.triplet_coupled_chunk_sums(*group.operands, swap, smooth)
                a = group.anchors
            sums.index_add_(0, a, s)
            counts.index_add_(0, a, c)
    return sums, counts


def _no_autocast(device):
    """The ops' PyTorch bodies compute in their stat dtype: autocast would run their products in half."""
    return torch.autocast(device.type, enabled=False)


def _fake_coupled_rows(q, r, labels_q, labels_r, exclude_col, margin, lp, swap, smooth):
    n = q.shape[0]
    return q.new_empty((n,), dtype=stat_dtype(q.dtype)), q.new_empty((n,), dtype=torch.int64)


triplet_coupled_rows.register_fake(_fake_coupled_rows)


def _coupled_vjp(grad_sums, q, r, labels_q, labels_r, exclude_col, scalars, need_q, need_r):
    """(grad_q, grad_r) of sum_i grad_i sums_i, differentiable (create_graph=True): each group of
    pairs recomputed in PyTorch and differentiated by autograd (a group reads rows of q beyond its
    anchors: its positives' under swap)."""
    A = stat_dtype(q.dtype)
    with torch.enable_grad(), _no_autocast(q.device):
        # nodes of their own (r may be q itself), through which the graph reaches q and r
        qa, ra = q.to(A).view_as(q), r.to(A).view_as(r)
        wanted = [t for t, need in ((qa, need_q), (ra, need_r)) if need]
        total = [None] * len(wanted)
        for a, p in _coupled_groups(labels_q, labels_r, exclude_col, r.shape[0]):
            s, _ = coupled_terms(qa, ra, labels_q, labels_r, a, p, *scalars)
            grads = torch.autograd.grad(s, wanted, grad_sums[a].to(A), create_graph=True, allow_unused=True)
            total = [t if g is None else (g if t is None else t + g) for t, g in zip(total, grads)]
    out = []
    for x, need in ((q, need_q), (r, need_r)):
        if need:
            g = total.pop(0)
            out.append((torch.zeros_like(x, dtype=A) if g is None else g).to(x.dtype))
        else:
            out.append(None)
    return tuple(out)


@torch.library.custom_op("fused_pairloss::triplet_coupled_rows_backward", mutates_args=())
def triplet_coupled_rows_backward(grad_sums: torch.Tensor, q: torch.Tensor, r: torch.Tensor,
                                  labels_q: torch.Tensor, labels_r: torch.Tensor, exclude_col: torch.Tensor,
                                  margin: float, lp: bool, swap: bool, smooth: bool, need_grad_q: bool,
                                  need_grad_r: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The vector-Jacobian product of triplet_coupled_rows' sums (coupled_grads, each group of pairs
    recomputed); an empty tensor for a gradient not needed."""
    A = stat_dtype(q.dtype)
    with _no_autocast(q.device):
        gq, gr = coupled_grads(grad_sums.to(A), q.to(A), r.to(A), labels_q, labels_r, exclude_col, margin, lp, swap,
                               smooth, need_grad_q, need_grad_r)
    empty = q.new_empty  # one per gradient not needed: an op's outputs may not alias
    return (empty((0,)) if gq is None else gq.to(q.dtype)), (empty((0,)) if gr is None else gr.to(r.dtype))


def _fake_coupled_rows_backward(grad_sums, q, r, labels_q, labels_r, exclude_col, margin, lp, swap, smooth,
                                need_grad_q, need_grad_r):
    return _fake_grads(q, r, need_grad_q, need_grad_r)


triplet_coupled_rows_backward.register_fake(_fake_coupled_rows_backward)


_register_pair(triplet_coupled_rows, triplet_coupled_rows_backward, None, _coupled_vjp)


ROWS_SCHEMA = ((_fake_rows, _fake_rows_backward), _chunked(_hinge_sums))
BINS_SCHEMA = ((_fake_bins, _fake_bins_backward), _chunked(_bins))


def register_rows_op(forward, backward):
    """Fake kernels and the autograd rule of another implementation of the rows' schema (the Triton
    ops of ops/triton_triplets.py)."""
    _register_pair(forward, backward, *ROWS_SCHEMA)


def register_bins_op(forward, backward):
    """The same for the bins' schema."""
    _register_pair(forward, backward, *BINS_SCHEMA)


def _register_native():
    """Fake kernels and autograd of the compiled op pair (when the loaded library has it); the device
    types it has kernels for ({"cpu"} or {"cpu", "cuda"}), empty if none. Read once: a lookup of
    the dispatcher is not traceable by torch.compile."""
    if not _extension.has_kernel("triplet_engine_forward", "CPU"):
        return frozenset()
    _register_pair("fused_pairloss::triplet_engine_forward", "fused_pairloss::triplet_engine_backward", *ROWS_SCHEMA)
    _register_pair("fused_pairloss::triplet_bins_engine_forward", "fused_pairloss::triplet_bins_engine_backward",
                   *BINS_SCHEMA)
    torch.library.register_fake("fused_pairloss::row_extremes")(_fake_row_extremes)
    if _extension.has_kernel("ascending_kept_columns", "CPU"):  # not in a library built before it
        torch.library.register_fake("fused_pairloss::ascending_kept_columns")(_fake_ascending_kept_columns)
    return frozenset(["cpu"] + (["cuda"] if _extension.has_kernel("triplet_engine_forward", "CUDA") else []))



def _fake_row_extremes(q, r, labels_q, labels_r, exclude_col, lp, pos_largest, neg_largest):
    n, A = q.shape[0], stat_dtype(q.dtype)
    return (q.new_empty((n,), dtype=A), q.new_empty((n,), dtype=torch.int64), q.new_empty((n,), dtype=A),
            q.new_empty((n,), dtype=torch.int64))


def _fake_ascending_kept_columns(values, keep):
    n, listed = values.shape[0], torch.library.get_ctx().new_dynamic_size()
    return (values.new_empty((listed,), dtype=torch.int64), values.new_empty((listed,), dtype=torch.int64),
            values.new_empty((n,), dtype=torch.int64), values.new_empty((n,), dtype=torch.bool))


def ascending_kept_columns_op(device):
    """The C++ op that orders MultiSimilarityMiner's pairs of a row (csrc/cpu/kept_order_cpu.cpp) for
    tensors on `device` (CPU tensors, when built), else None."""
    if row_extremes_op(device) is None or not _extension.has_kernel("ascending_kept_columns", "CPU"):
        return None
    return torch.ops.fused_pairloss.ascending_kept_columns


def row_extremes_op(device):
    """The C++ op of the batch miners' hardest / easiest pairs for tensors on `device` (CPU tensors,
    when built), else None (the miners then mine in PyTorch)."""
    if device.type != "cpu":
        return None
    return torch.ops.fused_pairloss.row_extremes if _NATIVE_DEVICES else None


def rows_op(backend, device):
    """The forward op of the triplet rows for a backend: the compiled kernel of "cpu" on CPU tensors
    and of "cuda" on CUDA tensors (csrc/cuda/triplet_engine.cu; when built), else the PyTorch op.
    ("triton" has its own op: ops/triton_triplets.py.)"""
    return _native_op("triplet_engine_forward", backend, device) or triplet_rows


def bins_op(backend, device):
    """The forward op of the triplet bins for a backend: the compiled kernel of "cpu" on CPU tensors
    and of "cuda" on CUDA tensors (csrc/cuda/triplet_engine.cu; when built), else the PyTorch op
    triplet_bins. ("triton" has its own op: ops/triton_triplets.py.)"""
    return _native_op("triplet_bins_engine_forward", backend, device) or triplet_bins


def _native_op(name, backend, device):
    """The compiled op `name` for "cpu" on CPU tensors or "cuda" on CUDA tensors, when the loaded
    library has kernels there; else None."""
    if backend in ("cpu", "cuda") and device.type == backend:
        if backend in _NATIVE_DEVICES:
            return getattr(torch.ops.fused_pairloss, name)
    return None


# at import (after the fake kernels above): the dispatcher's lookups are not traceable by torch.compile
_NATIVE_DEVICES = _register_native()
