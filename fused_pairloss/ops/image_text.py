"""The image-text ops of ClipLoss and SigLipLoss (docs/design.md, "Image-text losses"): statistics of
the logits x_ij = t (q_i . r_j) (+ b) of two feature blocks, in row chunks, without the N x M block.

    fused_pairloss::clip_lse(q[N,D], r[M,D], scale[], cols, pos_offset) -> (row_lse A[N], col_lse A[M] or [0])
        row_lse_i = LSE_{j != i + pos_offset} x_ij, col_lse_j = LSE_{i != j - pos_offset} x_ij (only when
        cols), x_ij = scale (q_i . r_j): over the others than the positive pair, so that the loss
        softplus(lse - x_pos) keeps the digits of a row whose positive dominates
    fused_pairloss::siglip_rows(q[N,D], r[M,D], scale[], bias[], pos_offset) -> rows A[N]
        rows_i = sum_j softplus(-z_ij x_ij), x_ij = scale (q_i . r_j) + bias, z_ij = +1 for the
        positive column j = i + pos_offset (when 0 <= j < M), -1 elsewhere

A = float64 for fp64 inputs, else float32 (fp16 / bf16 features are converted to fp32 once). scale and
bias are 0-dim tensors (learnable: their gradients are reductions, see below). The forward walks
row chunks (_chunk_rows): CLIP's row LSE of a chunk is final, its column LSE is
merged chunk by chunk (running maximum and rescaled sum), so both directions come from one walk.
The backward ops recompute each chunk and form G = dL/dx in place:
    CLIP    G_ij = g_row_i exp(x_ij - row_lse_i) + g_col_j exp(x_ij - col_lse_j), 0 at the positives
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

# logits of one chunk: CHUNK_ELEMENTS (8 MiB in fp32), but at least MIN_CHUNK_ROWS rows while that
# stays within MAX_CHUNK_ELEMENTS (32 MiB): the gradient product G^T q of a chunk has the chunk's
# rows as its inner dimension, and below about 256 it is bound by the M x D accumulator's memory
# traffic. One to two chunk-sized buffers live at once.
CHUNK_ELEMENTS = 1 << 21
MIN_CHUNK_ROWS = 256
MAX_CHUNK_ELEMENTS = 1 << 23


def _chunk_rows(m):
    m = max(m, 1)
    return max(1, CHUNK_ELEMENTS // m, min(MIN_CHUNK_ROWS, MAX_CHUNK_ELEMENTS // m))


def _chunks(n, m):
    step = _chunk_rows(m)
    return [(i0, min(n, i0 + step)) for i0 in range(0, n, step)]


def _as_stat(x, A):
    return x if x.dtype == A else x.to(A)


# ---- CLIP: row and column log-sum-exps ------------------------------------------------------------
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


def _finite_or_zero(x):
    """A shift for exp(x - shift): x where finite, else 0 (an all -inf row / column stays -inf, +inf
    and NaN propagate)."""
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


class _Buffers:
    """The chunk-sized scratch of one call (allocated once: a fresh allocation per chunk costs page
    faults), viewed as c x M for a chunk of c rows."""

    def __init__(self, n, m, count, A, device):
        rows = min(n, _chunk_rows(m))
        self.m = m
        self.flat = [torch.empty(rows * m, dtype=A, device=device) for _ in range(count)]

    def get(self, k, c):
        return self.flat[k][:c * self.m].view(c, self.m)


@torch.library.custom_op("fused_pairloss::clip_lse", mutates_args=())
def clip_lse(q: torch.Tensor, r: torch.Tensor, scale: torch.Tensor, cols: bool,
             pos_offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    A = stat_dtype(q.dtype)
    qa, ra, t = _as_stat(q, A), _as_stat(r, A), scale.to(A)
    n, m = q.shape[0], r.shape[0]
    row_lse = torch.empty(n, dtype=A, device=q.device)
    if not cols:
        col_lse = q.new_empty((0,), dtype=A)
    else:
        col_max = torch.full((m,), float("-inf"), dtype=A, device=q.device)
        col_sum = torch.zeros(m, dtype=A, device=q.device)
    buf = _Buffers(n, m, 2 if cols else 1, A, q.device)
    rt = ra.t()
    for i0, i1 in _chunks(n, m):
        x = torch.mm(qa[i0:i1] * t, rt, out=buf.get(0, i1 - i0))   # c x M logits
        _leave_out_positives(x, i0, i1, pos_offset)
        if cols:
            new_max = torch.maximum(col_max, x.amax(0))
            shift = _finite_or_zero(new_max)
            # rescale the running sum to the new maximum, add this chunk's terms
            e = torch.sub(x, shift, out=buf.get(1, i1 - i0)).exp_()
            col_sum.mul_((col_max - shift).exp_()).add_(e.sum(0))
            col_max = new_max
        rshift = _finite_or_zero(x.amax(1, keepdim=True))
        row_lse[i0:i1] = x.sub_(rshift).exp_().sum(1).log_().add_(rshift[:, 0])
    if cols:
        col_lse = col_sum.log_().add_(_finite_or_zero(col_max))
    return row_lse, col_lse


@clip_lse.register_fake
def _(q, r, scale, cols, pos_offset):
    A = stat_dtype(q.dtype)
    return q.new_empty((q.shape[0],), dtype=A), q.new_empty((r.shape[0] if cols else 0,), dtype=A)


def _common_factor(*gs):
    """The one value of every entry of the incoming gradients (a mean reduction gives each row the
    same), as a 0-dim tensor, or None when they differ."""
    g = torch.cat([x.reshape(-1) for x in gs])
    if g.numel() and bool((g == g[0]).all()):
        return g[0]
    return None


def _leave_out_positives(x, i0, i1, pos_offset):
    """A chunk's positive logits set to -inf (in place): out of the LSEs, and G = 0 there."""
    diag = _positive_diagonal(x, i0, i1, pos_offset)
    if diag is not None:
        diag.fill_(float("-inf"))


def _no_others_as_zero(lse):
    """An LSE over no other logit (-inf: a batch of one) as 0 in exp(x - lse), whose x are then all
    -inf: G = 0 there, not exp(-inf + inf) = NaN."""
    return lse.masked_fill(lse == float("-inf"), 0.0)


def _clip_grad_logits(x, tmp, row_lse, g_row, col_lse, g_col):
    """G = g_row exp(x - row_lse) (+ g_col exp(x - col_lse)) of a chunk of logits x, in place (tmp:
    scratch of x's shape; col_lse None: rows only); g_row / g_col None: a common factor left out.
    The positives of x are -inf (_leave_out_positives), the LSEs _no_others_as_zero's."""
    G = x
    if col_lse is not None:
        rows_term = torch.sub(x, row_lse[:, None], out=tmp).exp_()
        if g_row is not None:
            rows_term.mul_(g_row[:, None])
        G = x.sub_(col_lse[None, :]).exp_()
        if g_col is not None:
            G.mul_(g_col[None, :])
        return G.add_(rows_term)
    G = x.sub_(row_lse[:, None]).exp_()
    return G if g_row is None else G.mul_(g_row[:, None])


@torch.library.custom_op("fused_pairloss::clip_lse_backward", mutates_args=())
def clip_lse_backward(grad_row: torch.Tensor, grad_col: torch.Tensor, q: torch.Tensor, r: torch.Tensor,
                      scale: torch.Tensor, row_lse: torch.Tensor, col_lse: torch.Tensor, cols: bool,
                      pos_offset: int, need_grad_q: bool,
                      need_grad_r: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_q, grad_r, grad_scale) of sum_i grad_row_i row_lse_i (+ sum_j grad_col_j col_lse_j);
    an empty tensor for a feature gradient not needed."""
    A = stat_dtype(q.dtype)
    qa, ra, t = _as_stat(q, A), _as_stat(r, A), scale.to(A)
    g_row, g_col = grad_row.to(A), (grad_col.to(A) if cols else None)
    row_lse, col_lse = _no_others_as_zero(row_lse), (_no_others_as_zero(col_lse) if cols else col_lse)
    # the usual case, one value in every incoming gradient: G / common from exps alone, the factor
    # applied to the c x D products instead of the c x M chunk
    common = _common_factor(g_row, *([g_col] if cols else []))
    if common is not None:
        g_row = g_col = None
    n, m, d = q.shape[0], r.shape[0], q.shape[1]
    grad_q = torch.empty_like(qa) if need_grad_q else None
    grad_r = torch.zeros_like(ra) if need_grad_r else None
    grad_t = torch.zeros((), dtype=A, device=q.device)
    buf = _Buffers(n, m, 2 if cols else 1, A, q.device)
    U_flat = torch.empty(buf.flat[0].numel() // max(m, 1) * d, dtype=A, device=q.device)
    rt = ra.t()
    for i0, i1 in _chunks(n, m):
        c = i1 - i0
        qc = qa[i0:i1]
        x = torch.mm(qc * t, rt, out=buf.get(0, c))
        _leave_out_positives(x, i0, i1, pos_offset)
        G = _clip_grad_logits(x, buf.get(1, c) if cols else None, row_lse[i0:i1],
                              None if g_row is None else g_row[i0:i1], col_lse if cols else None, g_col)
        U = torch.mm(G, ra, out=U_flat[:c * d].view(c, d))         # G r (c x D)
        if common is not None:
            U.mul_(common)
        grad_t += (U * qc).sum()
        if need_grad_q:
            torch.mul(U, t, out=grad_q[i0:i1])
        if need_grad_r:
            grad_r.addmm_(G.t(), qc if common is None else qc * common)  # G^T q, times t below
    if need_grad_r:
        grad_r.mul_(t)
    empty = q.new_empty  # one per gradient not needed: an op's outputs may not alias
    return ((empty((0,)) if grad_q is None else grad_q.to(q.dtype)),
            (empty((0,)) if grad_r is None else grad_r.to(r.dtype)),
            grad_t.to(scale.dtype))


@clip_lse_backward.register_fake
def _(grad_row, grad_col, q, r, scale, row_lse, col_lse, cols, pos_offset, need_grad_q, need_grad_r):
    empty = q.new_empty  # one per gradient not needed: an op's outputs may not alias
    return ((torch.empty_like(q) if need_grad_q else empty((0,))),
            (torch.empty_like(r) if need_grad_r else empty((0,))),
            torch.empty_like(scale))


def _clip_vjp_differentiable(g_row, g_col, q, r, scale, row_lse, col_lse, cols, pos_offset):
    """The same vector-Jacobian product in differentiable PyTorch (create_graph=True): the saved
    LSEs are the forward op's outputs, so their own dependence on q, r, scale is differentiated too."""
    A = stat_dtype(q.dtype)
    qa, ra, t = q.to(A), r.to(A), scale.to(A)
    s = qa @ ra.t()
    rows = torch.arange(q.shape[0], device=q.device)[:, None]
    others = rows + pos_offset != torch.arange(r.shape[0], device=q.device)[None, :]
    x = torch.where(others, t * s, float("-inf"))
    G = g_row.to(A)[:, None] * torch.exp(x - _no_others_as_zero(row_lse)[:, None])
    if cols:
        G = G + g_col.to(A)[None, :] * torch.exp(x - _no_others_as_zero(col_lse)[None, :])
    return (t * (G @ ra)).to(q.dtype), (t * (G.t() @ qa)).to(r.dtype), (G * s).sum().to(scale.dtype)


def _clip_setup(ctx, inputs, output):
    q, r, scale, cols, pos_offset = inputs
    ctx.save_for_backward(q, r, scale, *output)
    ctx.cols, ctx.pos_offset = cols, pos_offset


def _clip_backward(ctx, grad_row, grad_col):
    q, r, scale, row_lse, col_lse = ctx.saved_tensors
    need_q, need_r, need_t = ctx.needs_input_grad[:3]
    if not (need_q or need_r or need_t):
        return None, None, None, None, None
    grad_row = torch.zeros_like(row_lse) if grad_row is None else grad_row
    if ctx.cols:
        grad_col = torch.zeros_like(col_lse) if grad_col is None else grad_col
    else:
        grad_col = col_lse  # empty
    if torch.is_grad_enabled():  # create_graph=True
        gq, gr, gt = _clip_vjp_differentiable(grad_row, grad_col, q, r, scale, row_lse, col_lse, ctx.cols,
                                              ctx.pos_offset)
    else:
        gq, gr, gt = clip_lse_backward(grad_row.contiguous(), grad_col.contiguous(), q, r, scale, row_lse,
                                       col_lse, ctx.cols, ctx.pos_offset, need_q, need_r)
    return (gq if need_q else None), (gr if need_r else None), (gt if need_t else None), None, None


# ---- SigLIP: per-row sums of the pair terms -------------------------------------------------------
@torch.library.custom_op("fused_pairloss::siglip_rows", mutates_args=())
def siglip_rows(q: torch.Tensor, r: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                pos_offset: Optional[int]) -> torch.Tensor:
    A = stat_dtype(q.dtype)
    qa, ra, t, b = _as_stat(q, A), _as_stat(r, A), scale.to(A), bias.to(A)
    n, m = q.shape[0], r.shape[0]
    rows = torch.empty(n, dtype=A, device=q.device)
    buf = _Buffers(n, m, 1, A, q.device)
    rt = ra.t()
    for i0, i1 in _chunks(n, m):
        x = torch.addmm(b, qa[i0:i1] * t, rt, out=buf.get(0, i1 - i0))
        diag = _positive_diagonal(x, i0, i1, pos_offset)
        if diag is not None:
            diag.neg_()                                            # -z x: +x off the diagonal, -x on it
        # softplus(x) as open_clip's -logsigmoid(-x): F.softplus returns x itself above 20, which drops
        # e^-x (visible in fp64)
        rows[i0:i1] = F.logsigmoid(x.neg_()).sum(1).neg_()
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
    n, m, d = q.shape[0], r.shape[0], q.shape[1]
    grad_q = torch.empty_like(qa) if need_grad_q else None
    grad_r = torch.zeros_like(ra) if need_grad_r else None
    grad_t = torch.zeros((), dtype=A, device=q.device)
    grad_b = torch.zeros((), dtype=A, device=q.device)
    buf = _Buffers(n, m, 1, A, q.device)
    U_flat = torch.empty(buf.flat[0].numel() // max(m, 1) * d, dtype=A, device=q.device)
    rt = ra.t()
    for i0, i1 in _chunks(n, m):
        c = i1 - i0
        qc, gc = qa[i0:i1], g[i0:i1, None]
        x = torch.addmm(b, qc * t, rt, out=buf.get(0, c))
        diag = _positive_diagonal(x, i0, i1, pos_offset)
        if diag is not None:
            diag.neg_()
        H = x.sigmoid_()                                           # d/dx' softplus(x') with x' = -z x
        if diag is not None:
            diag.neg_()                                            # dx'/dx = -z: H = G / g_i
        grad_b += (H.sum(1, keepdim=True) * gc).sum()
        U = torch.mm(H, ra, out=U_flat[:c * d].view(c, d)).mul_(gc)  # G r (c x D)
        grad_t += (U * qc).sum()
        if need_grad_q:
            torch.mul(U, t, out=grad_q[i0:i1])
        if need_grad_r:
            grad_r.addmm_(H.t(), qc * gc)                          # G^T q, times t below
    if need_grad_r:
        grad_r.mul_(t)
    empty = q.new_empty  # one per gradient not needed: an op's outputs may not alias
    return ((empty((0,)) if grad_q is None else grad_q.to(q.dtype)),
            (empty((0,)) if grad_r is None else grad_r.to(r.dtype)),
            grad_t.to(scale.dtype), grad_b.to(bias.dtype))


@siglip_rows_backward.register_fake
def _(grad_rows, q, r, scale, bias, pos_offset, need_grad_q, need_grad_r):
    empty = q.new_empty  # one per gradient not needed: an op's outputs may not alias
    return ((torch.empty_like(q) if need_grad_q else empty((0,))),
            (torch.empty_like(r) if need_grad_r else empty((0,))),
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
