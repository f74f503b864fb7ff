"""Materializing oracles of the fused ops, for op-level tests of every backend.

Each function takes exactly the arguments of its op (csrc/ops.cpp) and returns what the op returns
(ops/README.md), computed with plain PyTorch on the whole N x M (N x C*K) matrix, from the same
packed declaration (`spec.unpack_pair` / `unpack_class`). The backward oracles are the autograd
of the forward ones (not a second derivation of the gradient formulas), so a kernel's backward is
checked against the true vector-Jacobian product of its forward. Statistics in the stat dtype.
"""
from __future__ import annotations

import numpy as np
import torch

from . import spec as S
from .operands import lp_squared_distances, ntx_pair_loss, softplus, stat_dtype, weight_rows

NEG_INF = float("-inf")


def _term(t: S.PairTerm, v, row_shift=None):
    """x = (scale * w(v)) * (v - shift), w detached; hinge: relu with NaN taken as 0 (loss_spec.h).
    row_shift (N,): row i's shift is shift + row_shift[i], added in v's dtype (as the kernels)."""
    w = torch.relu(t.weight_offset + t.weight_slope * v.detach())
    shift = t.shift
    if row_shift is not None:
        shift = (torch.tensor(t.shift, dtype=v.dtype, device=v.device) + row_shift.detach().to(v.dtype))[:, None]
    x = (t.scale * w) * (v - shift)
    return torch.where(x > 0, x, torch.zeros_like(x)) if t.hinge else x


def _lp(s, q, r):
    """sqrt(clamp_min(d2, 0)) with d2 = |q_i|^2 + |r_j|^2 - 2 S, or for the near pairs the sum of
    squared differences of the two rows (as the kernels: docs/design.md "Numerics"); gradient 0
    where d is 0 (torch.cdist's choice). The value is the correctly rounded square root (numpy's;
    torch's CPU sqrt can be 1 ulp off), so that on exact inputs the oracle's distances are the
    kernels' bit for bit."""
    d2 = torch.clamp_min(lp_squared_distances(s, q, r), 0)
    pos = (d2 > 0) | torch.isnan(d2)  # NaN passes through, as in the kernels
    d2_safe = torch.where(pos, d2, torch.ones_like(d2))
    root = torch.sqrt(d2_safe)
    exact = torch.from_numpy(np.sqrt(d2_safe.detach().cpu().numpy())).to(root.device)
    root = root + (exact - root).detach()
    return torch.where(pos, root, torch.zeros_like(d2))


def _masked_lse(x, mask, dim):
    """log-sum-exp of x over mask along dim: -inf (and no gradient) where the mask is empty, NaN
    where a masked x is NaN."""
    if x.shape[dim] == 0:
        return torch.full(x.shape[:dim] + x.shape[dim + 1:], NEG_INF, dtype=x.dtype, device=x.device)
    m = torch.where(mask, x, NEG_INF).amax(dim=dim, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    # exp of the masked entries only: an unmasked exp that overflows would make the gradient NaN
    total = torch.exp(torch.where(mask, x - m, NEG_INF)).sum(dim=dim, keepdim=True)
    empty = ~mask.any(dim=dim, keepdim=True)
    out = torch.where(empty, NEG_INF, m + torch.log(torch.where(empty, torch.ones_like(total), total)))
    return out.squeeze(dim)


def _pair_values(q, r, labels_q, labels_r, exclude_col, sp: S.PairLossSpec, row_shift=None):
    A = stat_dtype(q.dtype)
    qa = q.to(A)
    n = q.shape[0]
    if r is None:
        ra, labels_r = qa, labels_q
        exclude_col = torch.arange(n, device=q.device)
    else:
        ra = r.to(A)
        if exclude_col is None:
            exclude_col = torch.full((n,), -1, dtype=torch.long, device=q.device)
    s = qa @ ra.t()
    if sp.distance == "lp":
        v = _lp(s, qa, ra)
    else:
        v = s
    same = labels_q[:, None] == labels_r[None, :]
    cols = torch.arange(ra.shape[0], device=q.device)
    is_excluded = cols[None, :] == exclude_col[:, None]
    pos = same & ~is_excluded
    neg = ~same
    inf = torch.full((n,), float("inf"), dtype=A, device=q.device)
    min_pos, max_neg = inf, -inf
    if sp.mine:
        # the miner's similarity (pair_terms.inl mining_u): S, -d, or -d^2 / 2 (a cosine miner beside lp)
        u = ((-(v * v) * 0.5 if sp.miner_on_cosine else -v) if sp.distance == "lp" else v).detach()
        pos_unmined = same if sp.exclude_after_mining else pos
        if s.shape[1]:
            min_pos = torch.where(pos_unmined, u, float("inf")).amin(dim=1)
            max_neg = torch.where(neg, u, NEG_INF).amax(dim=1)
        eps = float(sp.miner_epsilon)
        pos = pos & (u - eps < max_neg[:, None])
        neg = neg & (u + eps > min_pos[:, None])
    if sp.pos_window is not None:  # PairMarginMiner: lo < v < hi (the bounds in the dtype, as torch compares)
        vd = v.detach()
        pos = pos & (vd > sp.pos_window[0]) & (vd < sp.pos_window[1])
        neg = neg & (vd > sp.neg_window[0]) & (vd < sp.neg_window[1])
    xp, xn = _term(sp.pos, v, row_shift), _term(sp.neg, v, row_shift)
    zero_row = torch.zeros(n, dtype=A, device=q.device)

    def lse(mask, x, on):
        return _masked_lse(x, mask, 1) if on else zero_row + NEG_INF

    def exp_weight(mask, x, t):
        """w = exp(T x) on the pairs with x > 0 (an exp-weighted sum, loss_spec.h), 1 elsewhere."""
        active = mask & (x > 0)
        return torch.exp(t.sum_temperature * torch.where(active, x, 0)), active

    def total(mask, x, t):
        if not t.sum:
            return zero_row
        return torch.where(mask, exp_weight(mask, x, t)[0] * x if t.exp_weighted else x, 0).sum(1)

    def weight(mask, x, t):
        if not t.exp_weighted:
            return zero_row
        w, active = exp_weight(mask, x, t)
        return torch.where(active, w, 0).sum(1)

    def nonzero(mask, x, on):
        return (mask & (x > 0)).sum(1).to(torch.int32) if on else zero_row.to(torch.int32)

    lse_pos, lse_neg = lse(pos, xp, sp.pos.lse), lse(neg, xn, sp.neg.lse)
    ntx, ntx_dlse = zero_row, zero_row
    if sp.pos_vs_neg_lse:
        tiny = sp.tiny(A)
        t = xp - lse_neg[:, None]
        ntx = torch.where(pos, ntx_pair_loss(t, tiny), 0).sum(1)
        td = t.detach().requires_grad_(True)
        with torch.enable_grad():
            dphi = torch.autograd.grad(ntx_pair_loss(td, tiny).sum(), td)[0]
        ntx_dlse = -torch.where(pos, dphi, 0).sum(1)
    values = torch.stack([lse_pos, lse_neg, total(pos, xp, sp.pos), total(neg, xn, sp.neg), ntx,
                          weight(pos, xp, sp.pos), weight(neg, xn, sp.neg)])
    if sp.histogram is not None:
        values = torch.cat([values, _histograms(v, pos, neg, sp.histogram)])
    counts = torch.stack([pos.sum(1).to(torch.int32), neg.sum(1).to(torch.int32),
                          nonzero(pos, xp, sp.pos.sum), nonzero(neg, xn, sp.neg.sum)])
    aux = torch.stack([min_pos, max_neg, ntx_dlse.detach()])
    return values, counts, aux


def _histograms(v, pos, neg, h: S.PairHistogram):
    """[2 * nodes, N]: per set and node k the sum over the row's pairs of the triangular pulse
    relu(1 - |u - k|), u = (v or v^2 - lo) inv_width (loss_spec.h); a NaN u makes node 0 NaN."""
    if h.pml_bins:
        return _pml_histograms(v, pos, neg, h)
    u = ((v * v if h.squared else v) - h.lo) * h.inv_width
    nan = torch.isnan(u)
    u = torch.where(nan, torch.full_like(u, -2.0), u)  # no node in reach
    nodes = torch.arange(h.nodes, device=v.device, dtype=v.dtype)
    out = []
    for mask in (pos, neg):
        pulses = torch.relu(1 - torch.abs(u[None] - nodes[:, None, None]))  # nodes x N x M
        hist = torch.where(mask[None], pulses, 0).sum(2)
        hist[0] = torch.where((mask & nan).any(1), float("nan"), hist[0])
        out.append(hist)
    return torch.cat(out)


def _pml_histograms(v, pos, neg, h: S.PairHistogram):
    """The same with PML HistogramLoss's operations (loss_spec.h kHistPmlBins): its bin r from
    float(v), its node positions r * delta in float, each pair's two weights."""
    delta = 1.0 / h.inv_width
    nan = torch.isnan(v)
    vv = torch.where(nan, torch.zeros_like(v), v)
    r = torch.floor((vv.float() - h.lo) / delta).clamp(0, h.nodes - 2).long()
    upper = ((vv - h.lo) - (r * delta).to(v.dtype)) / delta
    lower = (((r + 1) * delta + h.lo).to(v.dtype) - vv) / delta
    out = []
    for mask in (pos, neg):
        hist = v.new_zeros(h.nodes, v.shape[0])
        kept = mask & ~nan
        for k in range(h.nodes):  # node k: upper of the pairs in bin k - 1, lower of those in bin k
            hist[k] = torch.where(kept & (r == k - 1), upper, 0).sum(1) + torch.where(kept & (r == k), lower, 0).sum(1)
        hist[0] = torch.where((mask & nan).any(1), float("nan"), hist[0])
        out.append(hist)
    return torch.cat(out)


def pair_values(q, r, labels_q, labels_r, exclude_col, sp: S.PairLossSpec, row_shift=None):
    """The forward's (values, counts, aux), differentiable in q and r (to any order)."""
    return _pair_values(q, r, labels_q, labels_r, exclude_col, sp, row_shift)


def class_values(q, w, labels, centers_per_class, terms, flags):
    """The forward's (rows, cols) from the packed declaration, differentiable in q and w (to any order)."""
    cs = S.unpack_class(terms, flags, centers_per_class)
    return _class_values(q, weight_rows(w, flags), labels, centers_per_class, cs, float(terms[-1]))


def pair_engine_forward_oracle(q, r, labels_q, labels_r, exclude_col, terms, flags, row_shift=None):
    with torch.no_grad():
        return _pair_values(q, r, labels_q, labels_r, exclude_col, S.unpack_pair(terms, flags), row_shift)


def pair_engine_backward_oracle(grad_values, q, r, labels_q, labels_r, exclude_col, values, aux, terms, flags,
                                need_grad_r, row_shift=None):
    sp = S.unpack_pair(terms, flags)
    qv = q.detach().requires_grad_(True)
    rv = None if r is None else r.detach().requires_grad_(True)
    with torch.enable_grad():
        vals, _, _ = _pair_values(qv, rv, labels_q, labels_r, exclude_col, sp, row_shift)
        g = grad_values.to(vals.dtype)
        # outputs the declaration does not produce are constants: no gradient flows through them
        obj = torch.where(torch.isfinite(vals), vals * g, torch.zeros_like(vals)).sum()
        inputs = [qv] + ([rv] if rv is not None and need_grad_r else [])
        grads = torch.autograd.grad(obj, inputs, allow_unused=True)
    grad_q = torch.zeros_like(q) if grads[0] is None else grads[0].to(q.dtype)
    if rv is not None and need_grad_r:
        grad_r = torch.zeros_like(r) if grads[1] is None else grads[1].to(r.dtype)
    else:
        grad_r = q.new_empty((0,))
    return grad_q, grad_r


def _class_values(q, w, labels, K, cs: S.ClassLossSpec, inv_gamma):
    A = stat_dtype(q.dtype)
    n = q.shape[0]
    s = (q.to(A) @ w.to(A).t()).view(n, -1, K)  # (N, C, K)
    C = s.shape[1]
    if K > 1 and cs.pool_max:
        S_ = s.max(dim=2).values
    elif K > 1:
        S_ = (torch.softmax(s * inv_gamma, dim=2) * s).sum(2)
    else:
        S_ = s[:, :, 0]
    target = torch.nn.functional.one_hot(labels, C).bool()
    rows = torch.full((n,), NEG_INF, dtype=A, device=q.device)
    if cs.row is not None and cs.row_reduction == "softplus_sum":
        rows = torch.where(~target, softplus(_term(cs.row, S_)), 0.0).sum(1)
    elif cs.row is not None:
        rows = _masked_lse(_term(cs.row, S_), ~target, 1)
    target_sim = S_.gather(1, labels[:, None]).squeeze(1)
    cols = []
    for term, mask in ((cs.col_pos, target), (cs.col_neg, ~target)):
        if term is None:
            cols.append(torch.full((C,), NEG_INF, dtype=A, device=q.device))
        else:
            cols.append(_masked_lse(_term(term, S_), mask, 0))
    return torch.stack([rows, target_sim]), torch.stack(cols)


def class_engine_forward_oracle(q, w, labels, centers_per_class, terms, flags):
    with torch.no_grad():
        return class_values(q, w, labels, centers_per_class, terms, flags)


def class_engine_backward_oracle(grad_rows, grad_cols, q, w, labels, rows, cols, centers_per_class, terms, flags,
                                 need_grad_w):
    cs = S.unpack_class(terms, flags, centers_per_class)
    qv = q.detach().requires_grad_(True)
    wv = w.detach().requires_grad_(True)
    with torch.enable_grad():
        r_, c_ = _class_values(qv, weight_rows(wv, flags), labels, centers_per_class, cs, float(terms[-1]))
        obj = sum(torch.where(torch.isfinite(x), x * g.to(x.dtype), torch.zeros_like(x)).sum()
                  for x, g in ((r_, grad_rows), (c_, grad_cols)))
        grads = torch.autograd.grad(obj, [qv, wv], allow_unused=True)
    grad_q = torch.zeros_like(q) if grads[0] is None else grads[0].to(q.dtype)
    grad_w = (torch.zeros_like(w) if grads[1] is None else grads[1].to(w.dtype)) if need_grad_w else q.new_empty((0,))
    return grad_q, grad_w
