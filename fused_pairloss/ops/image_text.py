"""The image-text ops of ClipLoss and SigLipLoss (docs/design.md, "Image-text losses"): statistics of
the logits x_ij = t (q_i . r_j) (+ b) of two feature blocks, in row chunks, without the N x M block.

    fused_pairloss::clip_lse(q[N,D], r[M,D], scale[], cols) -> (row_lse A[N], col_lse A[M] or [0])
        row_lse_i = LSE_j x_ij, col_lse_j = LSE_i x_ij (only when cols), x_ij = scale (q_i . r_j)
    fused_pairloss::siglip_rows(q[N,D], r[M,D], scale[], bias[], pos_offset) -> rows A[N]
        rows_i = sum_j softplus(-z_ij x_ij), x_ij = scale (q_i . r_j) + bias, z_ij = +1 for the
        positive column j = i + pos_offset (when 0 <= j < M), -1 elsewhere

A = float64 for fp64 inputs, else float32 (fp16 / bf16 features are converted to fp32 once). scale and
bias are 0-dim tensors (learnable: their gradients are reductions, see below). The forward walks
row chunks of at most CHUNK_ELEMENTS logits: CLIP's row LSE of a chunk is final, its column LSE is
merged chunk by chunk (running maximum and rescaled sum), so both directions come from one walk.
The backward ops recompute each chunk and form G = dL/dx in place:
    CLIP    G_ij = g_row_i exp(x_ij - row_lse_i) + g_col_j exp(x_ij - col_lse_j)
    SigLIP  G_ij = -z_ij g_i sigmoid(-z_ij x_ij)
then grad_q = scale G r, grad_r = scale G^T q, grad_scale = sum_ij G_ij (q_i . r_j) = sum_i q_i . (G r)_i
(a c x D reduction per chunk), grad_bias = sum_ij G_ij. Memory: O(chunk x M + (N + M) D).

These are PyTorch ops (matmuls of the backend's BLAS and elementwise passes), the same on every
device; each has a fake kernel and an autograd rule. create_graph=True takes a differentiable
PyTorch path of the same formulas (it keeps every chunk for the second derivative, so it costs
N x M memory for that call); the backward ops themselves raise when differentiated.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .operands import stat_dtype

# logits of one chunk (a few chunk-sized buffers live at once: 16 MiB each in fp32)
CHUNK_ELEMENTS = 1 << 22


def _chunks(n, m):
    step = max(1, CHUNK_ELEMENTS // max(m, 1))
    return [(i0, min(n, i0 + step)) for i0 in range(0, n, step)]


def _as_stat(x, A):
    return x if x.dtype == A else x.to(A)


# ---- CLIP: row and column log-sum-exps ------------------------------------------------------------
@torch.library.custom_op("fused_pairloss::clip_lse", mutates_args=())
def clip_lse(q: torch.Tensor, r: torch.Tensor, scale: torch.Tensor, cols: bool) -> tuple[torch.Tensor, torch.Tensor]:
    A = stat_dtype(q.dtype)
    qa, ra, t = _as_stat(q, A), _as_stat(r, A), scale.to(A)
    n, m = q.shape[0], r.shape[0]
    row_lse = torch.empty(n, dtype=A, device=q.device)
    if not cols:
        col_lse = q.new_empty((0,), dtype=A)
    else:
        col_max = torch.full((m,), float("-inf"), dtype=A, device=q.device)
        col_sum = torch.zeros(m, dtype=A, device=q.device)
    rt = ra.t()
    for i0, i1 in _chunks(n, m):
        x = torch.mm(qa[i0:i1], rt).mul_(t)                       # c x M logits
        rmax = x.amax(1, keepdim=True)
        if cols:
            cmax = x.amax(0)
            new_max = torch.maximum(col_max, cmax)
            finite = torch.isfinite(new_max)
            shift = torch.where(finite, new_max, torch.zeros_like(new_max))
            # rescale the running sum to the new maximum, add this chunk's terms
            col_sum.mul_(torch.exp(col_max - shift)).add_(torch.exp(x - shift).sum(0))
            col_max = new_max
        rshift = torch.where(torch.isfinite(rmax), rmax, torch.zeros_like(rmax))
        row_lse[i0:i1] = x.sub_(rshift).exp_().sum(1).log_().add_(rshift[:, 0])
    if cols:
        col_lse = col_sum.log_().add_(torch.where(torch.isfinite(col_max), col_max, torch.zeros_like(col_max)))
    return row_lse, col_lse


@clip_lse.register_fake
def _(q, r, scale, cols):
    A = stat_dtype(q.dtype)
    return q.new_empty((q.shape[0],), dtype=A), q.new_empty((r.shape[0] if cols else 0,), dtype=A)


def _clip_grad_logits(x, g_row, row_lse, g_col, col_lse):
    """G of a chunk of logits x (overwritten) for the saved LSEs (in place; g_col None: rows only)."""
    if g_col is None:
        return x.sub_(row_lse[:, None]).exp_().mul_(g_row[:, None])
    rows = torch.sub(x, row_lse[:, None]).exp_().mul_(g_row[:, None])
    return x.sub_(col_lse[None, :]).exp_().mul_(g_col[None, :]).add_(rows)


@torch.library.custom_op("fused_pairloss::clip_lse_backward", mutates_args=())
def clip_lse_backward(grad_row: torch.Tensor, grad_col: torch.Tensor, q: torch.Tensor, r: torch.Tensor,
                      scale: torch.Tensor, row_lse: torch.Tensor, col_lse: torch.Tensor, cols: bool,
                      need_grad_q: bool, need_grad_r: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_q, grad_r, grad_scale) of sum_i grad_row_i row_lse_i (+ sum_j grad_col_j col_lse_j);
    an empty tensor for a feature gradient not needed."""
    A = stat_dtype(q.dtype)
    qa, ra, t = _as_stat(q, A), _as_stat(r, A), scale.to(A)
    g_row, g_col = grad_row.to(A), (grad_col.to(A) if cols else None)
    n, m = q.shape[0], r.shape[0]
    grad_q = torch.empty_like(qa) if need_grad_q else None
    grad_r = torch.zeros_like(ra) if need_grad_r else None
    grad_t = torch.zeros((), dtype=A, device=q.device)
    rt = ra.t()
    for i0, i1 in _chunks(n, m):
        qc = qa[i0:i1]
        x = torch.mm(qc, rt).mul_(t)
        G = _clip_grad_logits(x, g_row[i0:i1], row_lse[i0:i1], g_col, col_lse)
        U = torch.mm(G, ra)                                        # G r (c x D)
        grad_t += (U * qc).sum()
        if need_grad_q:
            grad_q[i0:i1] = U.mul_(t)
        if need_grad_r:
            grad_r.addmm_(G.t(), qc)                          # G^T q, times t below
    if need_grad_r:
        grad_r.mul_(t)
    empty = q.new_empty((0,))
    return ((empty if grad_q is None else grad_q.to(q.dtype)), (empty if grad_r is None else grad_r.to(r.dtype)),
            grad_t.to(scale.dtype))


@clip_lse_backward.register_fake
def _(grad_row, grad_col, q, r, scale, row_lse, col_lse, cols, need_grad_q, need_grad_r):
    empty = q.new_empty((0,))
    return ((torch.empty_like(q) if need_grad_q else empty), (torch.empty_like(r) if need_grad_r else empty),
            torch.empty_like(scale))


def _clip_vjp_differentiable(g_row, g_col, q, r, scale, row_lse, col_lse, cols):
    """The same vector-Jacobian product in differentiable PyTorch (create_graph=True): the saved
    LSEs are the forward op's outputs, so their own dependence on q, r, scale is differentiated too."""
    A = stat_dtype(q.dtype)
    qa, ra, t = q.to(A), r.to(A), scale.to(A)
    s = qa @ ra.t()
    x = t * s
    G = g_row.to(A)[:, None] * torch.exp(x - row_lse[:, None])
    if cols:
        G = G + g_col.to(A)[None, :] * torch.exp(x - col_lse[None, :])
    return (t * (G @ ra)).to(q.dtype), (t * (G.t() @ qa)).to(r.dtype), (G * s).sum().to(scale.dtype)


def _clip_setup(ctx, inputs, output):
    q, r, scale, cols = inputs
    ctx.save_for_backward(q, r, scale, *output)
    ctx.cols = cols


def _clip_backward(ctx, grad_row, grad_col):
    q, r, scale, row_lse, col_lse = ctx.saved_tensors
    need_q, need_r, need_t = ctx.needs_input_grad[:3]
    if not (need_q or need_r or need_t):
        return None, None, None, None
    grad_row = torch.zeros_like(row_lse) if grad_row is None else grad_row
    if ctx.cols:
        grad_col = torch.zeros_like(col_lse) if grad_col is None else grad_col
    else:
        grad_col = col_lse  # empty
    if torch.is_grad_enabled():  # create_graph=True
        gq, gr, gt = _clip_vjp_differentiable(grad_row, grad_col, q, r, scale, row_lse, col_lse, ctx.cols)
    else:
        gq, gr, gt = clip_lse_backward(grad_row.contiguous(), grad_col.contiguous(), q, r, scale, row_lse,
                                       col_lse, ctx.cols, need_q, need_r)
    return (gq if need_q else None), (gr if need_r else None), (gt if need_t else None), None


# ---- SigLIP: per-row sums of the pair terms -------------------------------------------------------
def _positive_diagonal(x, i0, i1, pos_offset):
    """The view of a chunk's positive logits (rows i0..i1, column i + pos_offset) inside [0, M), and
    the range of chunk rows it covers."""
    if pos_offset is None:
        return None
    m = x.shape[1]
    lo, hi = max(i0, -pos_offset), min(i1, m - pos_offset)
    if lo >= hi:
        return None
    return x[lo - i0:hi - i0, lo + pos_offset:hi + pos_offset].diagonal()


@torch.library.custom_op("fused_pairloss::siglip_rows", mutates_args=())
def siglip_rows(q: torch.Tensor, r: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                pos_offset: Optional[int]) -> torch.Tensor:
    A = stat_dtype(q.dtype)
    qa, ra, t, b = _as_stat(q, A), _as_stat(r, A), scale.to(A), bias.to(A)
    n, m = q.shape[0], r.shape[0]
    rows = torch.empty(n, dtype=A, device=q.device)
    rt = ra.t()
    for i0, i1 in _chunks(n, m):
        x = torch.mm(qa[i0:i1], rt).mul_(t).add_(b)
        diag = _positive_diagonal(x, i0, i1, pos_offset)
        if diag is not None:
            diag.neg_()                                            # -z x: +x off the diagonal, -x on it
        rows[i0:i1] = F.softplus(x).sum(1)
    return rows


@siglip_rows.register_fake
def _(q, r, scale, bias, pos_offset):
    return q.new_empty((q.shape[0],), dtype=stat_dtype(q.dtype))


@torch.library.custom_op("fused_pairloss::siglip_rows_backward", mutates_args=())
def siglip_rows_backward(grad_rows: torch.Tensor, q: torch.Tensor, r: torch.Tensor, scale: torch.Tensor,
                         bias: torch.Tensor, pos_offset: Optional[int], need_grad_q: bool,
                         need_grad_r: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_q, grad_r, grad_scale, grad_bias) of sum_i grad_rows_i rows_i; an empty tensor for a
    feature gradient not needed."""
    A = stat_dtype(q.dtype)
    qa, ra, t, b = _as_stat(q, A), _as_stat(r, A), scale.to(A), bias.to(A)
    g = grad_rows.to(A)
    n, m = q.shape[0], r.shape[0]
    grad_q = torch.empty_like(qa) if need_grad_q else None
    grad_r = torch.zeros_like(ra) if need_grad_r else None
    grad_t = torch.zeros((), dtype=A, device=q.device)
    grad_b = torch.zeros((), dtype=A, device=q.device)
    rt = ra.t()
    for i0, i1 in _chunks(n, m):
        qc = qa[i0:i1]
        x = torch.mm(qc, rt).mul_(t).add_(b)
        diag = _positive_diagonal(x, i0, i1, pos_offset)
        if diag is not None:
            diag.neg_()
        G = x.sigmoid_().mul_(g[i0:i1, None])                      # d/dx' softplus(x') with x' = -z x
        if diag is not None:
            diag.neg_()                                            # dx'/dx = -z
        grad_b += G.sum()
        U = torch.mm(G, ra)
        grad_t += (U * qc).sum()
        if need_grad_q:
            grad_q[i0:i1] = U.mul_(t)
        if need_grad_r:
            grad_r.addmm_(G.t(), qc)                          # G^T q, times t below
    if need_grad_r:
        grad_r.mul_(t)
    empty = q.new_empty((0,))
    return ((empty if grad_q is None else grad_q.to(q.dtype)), (empty if grad_r is None else grad_r.to(r.dtype)),
            grad_t.to(scale.dtype), grad_b.to(bias.dtype))


@siglip_rows_backward.register_fake
def _(grad_rows, q, r, scale, bias, pos_offset, need_grad_q, need_grad_r):
    empty = q.new_empty((0,))
    return ((torch.empty_like(q) if need_grad_q else empty), (torch.empty_like(r) if need_grad_r else empty),
            torch.empty_like(scale), torch.empty_like(bias))


def _siglip_signs(n, m, pos_offset, A, device):
    """-z as an N x M tensor (the differentiable path only)."""
    sign = torch.ones(n, m, dtype=A, device=device)
    if pos_offset is not None:
        diag = _positive_diagonal(sign, 0, n, pos_offset)
        if diag is not None:
            diag.fill_(-1)
    return sign


def _siglip_vjp_differentiable(g, q, r, scale, bias, pos_offset):
    A = stat_dtype(q.dtype)
    qa, ra, t, b = q.to(A), r.to(A), scale.to(A), bias.to(A)
    s = qa @ ra.t()
    sign = _siglip_signs(q.shape[0], r.shape[0], pos_offset, A, q.device)
    G = g.to(A)[:, None] * sign * torch.sigmoid(sign * (t * s + b))
    return ((t * (G @ ra)).to(q.dtype), (t * (G.t() @ qa)).to(r.dtype), (G * s).sum().to(scale.dtype),
            G.sum().to(bias.dtype))


def _siglip_setup(ctx, inputs, output):
    q, r, scale, bias, pos_offset = inputs
    ctx.save_for_backward(q, r, scale, bias)
    ctx.pos_offset = pos_offset


def _siglip_backward(ctx, grad_rows):
    q, r, scale, bias = ctx.saved_tensors
    need_q, need_r, need_t, need_b = ctx.needs_input_grad[:4]
    if grad_rows is None or not (need_q or need_r or need_t or need_b):
        return None, None, None, None, None
    if torch.is_grad_enabled():  # create_graph=True
        gq, gr, gt, gb = _siglip_vjp_differentiable(grad_rows, q, r, scale, bias, ctx.pos_offset)
    else:
        gq, gr, gt, gb = siglip_rows_backward(grad_rows.contiguous(), q, r, scale, bias, ctx.pos_offset,
                                              need_q, need_r)
    return (gq if need_q else None), (gr if need_r else None), (gt if need_t else None), \
        (gb if need_b else None), None


def _backward_not_differentiable(ctx, *grads):
    raise RuntimeError("fused_pairloss: the image-text backward ops (first-order gradients) are not "
                       "differentiable; second-order gradients go through create_graph=True")


def _no_context(ctx, inputs, output):
    pass


clip_lse.register_autograd(_clip_backward, setup_context=_clip_setup)
clip_lse_backward.register_autograd(_backward_not_differentiable, setup_context=_no_context)
siglip_rows.register_autograd(_siglip_backward, setup_context=_siglip_setup)
siglip_rows_backward.register_autograd(_backward_not_differentiable, setup_context=_no_context)

__all__ = ["clip_lse", "clip_lse_backward", "siglip_rows", "siglip_rows_backward", "CHUNK_ELEMENTS"]
