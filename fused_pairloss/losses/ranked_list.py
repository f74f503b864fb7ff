"""Ranked list loss (Wang et al., CVPR 2019; PML RankedListLoss), PML's LpDistance() on normalized
embeddings.

Per row i, over the other rows j, with b = alpha - margin (alpha = 1 + margin / 2 by default):
    positives with d_ij > b:     x = d_ij - b,    w = exp(Tp x),
    negatives with 0 < d_ij < alpha:  x = alpha - d_ij,  w = exp(Tn x),
    L+_i = sum w x / (sum w + N 1e-5)  over the active positives (PML adds 1e-5 for every column),
    L-_i likewise over the active negatives,
    L_i = (1 - imbalance) L+_i + imbalance L-_i,   loss = mean of L_i.
The weights are differentiated, as PML's (d/dx of w x / B is w (1 + T x - T L) / B).

Fused: every quantity is a sum over a row, so the op `fused_pairloss::ranked_list_rows` walks the
rows in chunks (d of a chunk against every row, the engines' accurate formula near 0) and reduces
the four sums per row; its backward op recomputes each chunk with the analytic gradient. Memory
O(chunk N + N D). (The pair engine has no exp-weighted sum, so this is a PyTorch op.)
"""
from __future__ import annotations

import warnings

import torch

from .. import _validation as V
from ..ops._common import LOCAL, normalize, register_recomputing_autograd, row_chunks
from ..ops.operands import add_row_chunk_distance_grad, lp_distances, lp_squared_distances, stat_dtype
from ._base import _PairLoss, check_self_only, run_pair_loss
from ._reference_common import check_distance, nan_in_nan_out
from ._registry import LossEntry

CHUNK_ELEMENTS = 1 << 20
EPS_PER_COLUMN = 1e-5  # PML's torch.sum(w + 1e-5, dim=1)


class ImbalanceError(ValueError, AssertionError):
    """imbalance outside [0, 1]: a ValueError, and the AssertionError PML raises (its tests expect one)."""


def check_hyper(margin, Tn, imbalance, alpha, Tp):
    for name, value in (("margin", margin), ("Tn", Tn), ("Tp", Tp)):
        V.check_real(name, value)
    if alpha is not None:
        V.check_real("alpha", alpha)
    V.check_real("imbalance", imbalance)
    if not 0 <= imbalance <= 1:
        raise ImbalanceError(f"imbalance must be between 0 and 1 (as in PML); got {imbalance!r}")
    return 1 + margin / 2 if alpha is None else alpha


def ranked_list_reference(embeddings, labels, ref_emb=None, ref_labels=None, *, margin=0.4, Tn=10.0, imbalance=0.5,
                          alpha=None, Tp=0.0, distance="lp", indices_tuple=None):
    """PML RankedListLoss.compute_loss step by step (N x N): the distances with a zero diagonal,
    P* and N*, their weights, the row sums, their mean."""
    check_distance(distance, allowed=("lp",), loss="ranked_list_loss")
    check_self_only(embeddings, labels, ref_emb, ref_labels, "RankedListLoss")
    if indices_tuple is not None:
        raise ValueError("RankedListLoss: indices_tuple is not supported (as in PML)")
    alpha = check_hyper(margin, Tn, imbalance, alpha, Tp)
    q = normalize(embeddings)
    mat = torch.cdist(q, q) if q.dtype not in (torch.float16, torch.bfloat16) else \
        torch.nn.functional.pairwise_distance(q.unsqueeze(1), q.unsqueeze(0))
    mat = mat - mat * torch.eye(len(mat), device=mat.device, dtype=mat.dtype)
    labels = torch.as_tensor(labels, device=embeddings.device)
    y = labels.unsqueeze(1) == labels.unsqueeze(0)
    P_star, N_star = torch.zeros_like(mat), torch.zeros_like(mat)
    w_p, w_n = torch.zeros_like(mat), torch.zeros_like(mat)
    neg_mask = (~y) & (mat < alpha)
    N_star[neg_mask] = mat[neg_mask]
    y.fill_diagonal_(False)
    pos_mask = y & (mat > alpha - margin)
    P_star[pos_mask] = mat[pos_mask]
    w_p[P_star > 0] = torch.exp(Tp * (P_star[P_star > 0] - (alpha - margin)))
    w_n[N_star > 0] = torch.exp(Tn * (alpha - N_star[N_star > 0]))
    loss_P = torch.sum(w_p * (P_star - (alpha - margin)), dim=1) / torch.sum(w_p + EPS_PER_COLUMN, dim=1)
    loss_N = torch.sum(w_n * (alpha - N_star), dim=1) / torch.sum(w_n + EPS_PER_COLUMN, dim=1)
    return nan_in_nan_out(((1 - imbalance) * loss_P + imbalance * loss_N).mean(), embeddings, None)


# ---- the op: the four sums per row ---------------------------------------------------------------
def _chunk_terms(q, labels, i0, i1, margin, alpha, Tp, Tn):
    """d of rows i0..i1 against every row and per set (positives, negatives) (x, w): x = d - b or
    alpha - d, w its weight exp(T x) on the active pairs and 0 elsewhere. A positive is active for
    d > max(b, 0) (the row itself, at d = 0, never is), a negative for 0 < d < alpha."""
    d = lp_distances(lp_squared_distances(q[i0:i1] @ q.t(), q[i0:i1], q))
    same = labels[i0:i1, None] == labels[None, :]
    b = alpha - margin
    xp, xn = d - b, alpha - d
    e = torch.exp(torch.where(same, Tp * xp, Tn * xn))  # the two sets are disjoint: one exp per pair
    zero = torch.zeros_like(d)
    wp = torch.where(same & (d > max(b, 0.0)), e, zero)
    wn = torch.where(~same & (d < alpha) & (d > 0), e, zero)
    return d, ((xp, wp), (xn, wn))


def _row_sums(x, w, n):
    """L = sum w x / B, B = sum w + n 1e-5 (PML's), per row (c x 1 each)."""
    total = w.sum(1, keepdim=True) + EPS_PER_COLUMN * n
    return (w * x).sum(1, keepdim=True) / total, total


@torch.library.custom_op("fused_pairloss::ranked_list_rows", mutates_args=())
def ranked_list_rows(q: torch.Tensor, labels: torch.Tensor, margin: float, alpha: float, Tp: float,
                     Tn: float) -> torch.Tensor:
    """A[2, N]: per row L+ (0) and L- (1) (module docstring)."""
    A = stat_dtype(q.dtype)
    qa = q.to(A)
    out = torch.empty(2, q.shape[0], dtype=A, device=q.device)
    with torch.autocast(q.device.type, enabled=False):
        for i0, i1 in row_chunks(q.shape[0], q.shape[0], CHUNK_ELEMENTS):
            _, terms = _chunk_terms(qa, labels, i0, i1, margin, alpha, Tp, Tn)
            for k, (x, w) in enumerate(terms):
                out[k, i0:i1] = _row_sums(x, w, q.shape[0])[0].squeeze(1)
    return out


@ranked_list_rows.register_fake
def _fake(q, labels, margin, alpha, Tp, Tn):
    return q.new_empty((2, q.shape[0]), dtype=stat_dtype(q.dtype))


@torch.library.custom_op("fused_pairloss::ranked_list_rows_backward", mutates_args=())
def ranked_list_rows_backward(grad: torch.Tensor, q: torch.Tensor, labels: torch.Tensor, margin: float, alpha: float,
                              Tp: float, Tn: float) -> torch.Tensor:
    """grad_q of sum(grad * rows): per active pair dL/dx = g w (1 + T x - T L) / B (x = d - b for
    the positives, alpha - d for the negatives), then through d = |q_i - q_j| chunk by chunk."""
    A = stat_dtype(q.dtype)
    qa, g = q.to(A), grad.to(A)
    grad_q = torch.zeros_like(qa)
    with torch.autocast(q.device.type, enabled=False):
        for i0, i1 in row_chunks(q.shape[0], q.shape[0], CHUNK_ELEMENTS):
            d, ((xp, wp), (xn, wn)) = _chunk_terms(qa, labels, i0, i1, margin, alpha, Tp, Tn)
            # dL/dx = g w (1 + T x - T L) / B; x = d - b (positives), alpha - d (negatives)
            lp, bp = _row_sums(xp, wp, q.shape[0])
            ln, bn = _row_sums(xn, wn, q.shape[0])
            gp, gn = g[0, i0:i1, None], g[1, i0:i1, None]
            grad_d = wp * ((gp / bp) * (1 + Tp * (xp - lp))) - wn * ((gn / bn) * (1 + Tn * (xn - ln)))
            add_row_chunk_distance_grad(grad_q, grad_d, d, qa, i0, i1)
    return grad_q.to(q.dtype)


@ranked_list_rows_backward.register_fake
def _fake_backward(grad, q, labels, margin, alpha, Tp, Tn):
    return torch.empty_like(q)


def _differentiable_rows(q, labels, margin, alpha, Tp, Tn):
    """ranked_list_rows as a differentiable computation (create_graph=True only)."""
    A = stat_dtype(q.dtype)
    _, terms = _chunk_terms(q.to(A), labels, 0, q.shape[0], margin, alpha, Tp, Tn)
    return torch.stack([_row_sums(x, w, q.shape[0])[0].squeeze(1) for x, w in terms])


register_recomputing_autograd(ranked_list_rows, ranked_list_rows_backward, _differentiable_rows)


def ranked_list_fused(embeddings, labels, ref_emb, ref_labels, *, margin=0.4, Tn=10.0, imbalance=0.5, alpha=None,
                      Tp=0.0, distance="lp", backend, exclude_col=None, batch=LOCAL):
    check_self_only(embeddings, labels, ref_emb, ref_labels, "RankedListLoss")
    alpha = check_hyper(margin, Tn, imbalance, alpha, Tp)
    labels = torch.as_tensor(labels, device=embeddings.device).to(torch.int64).contiguous()
    rows = ranked_list_rows(normalize(embeddings).contiguous(), labels, float(margin), float(alpha), float(Tp),
                            float(Tn))
    loss = ((1 - imbalance) * rows[0] + imbalance * rows[1]).mean()
    return nan_in_nan_out(loss.to(embeddings.dtype), embeddings, None)


def ranked_list_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, margin=0.4, Tn=10.0, imbalance=0.5,
                     alpha=None, Tp=0.0, distance="lp", backend="auto"):
    """PML RankedListLoss(margin, Tn, imbalance, alpha, Tp) with its LpDistance(); no ref_emb."""
    check_hyper(margin, Tn, imbalance, alpha, Tp)
    check_distance(distance, allowed=("lp",), loss="ranked_list_loss")
    check_self_only(embeddings, labels, ref_emb, ref_labels, "RankedListLoss")
    return run_pair_loss(ranked_list_reference, ranked_list_fused, embeddings, labels, ref_emb, ref_labels, backend,
                         margin=margin, Tn=Tn, imbalance=imbalance, alpha=alpha, Tp=Tp, distance=distance)


class RankedListLoss(_PairLoss):
    """Drop-in for pytorch_metric_learning.losses.RankedListLoss (LpDistance(); margin and Tn
    required, as PML; labels required; no ref_emb and no indices_tuple, as PML)."""
    _distances = ("lp",)
    _default_distance = "lp"
    _reference = staticmethod(ranked_list_reference)
    _listed_pairs = False
    _fused_in_wrappers = False  # PML's wrappers pass a ref_emb, which PML's RankedListLoss refuses

    def __init__(self, margin, Tn, imbalance=0.5, alpha=None, Tp=0, backend="auto", **kwargs):
        super().__init__()
        self.alpha = check_hyper(margin, Tn, imbalance, alpha, Tp)
        if Tp > 5 or Tn > 5:  # PML's warning
            warnings.warn("Values of Tp or Tn are too high. Too large temperature values may lead to overflow.",
                          stacklevel=2)
        self.margin, self.imbalance, self.Tp, self.Tn = margin, imbalance, Tp, Tn
        self._init_pair(backend, kwargs, (margin, Tn, imbalance, alpha, Tp))

    def _hyper(self):
        return dict(margin=self.margin, Tn=self.Tn, imbalance=self.imbalance, alpha=self.alpha, Tp=self.Tp,
                    distance=self._distance_kind)

    _labels_without_indices = True

    def _functional(self):
        return ranked_list_loss


ENTRIES = (
    LossEntry(RankedListLoss, "pair", functional=ranked_list_loss, reference=ranked_list_reference,
              fused=ranked_list_fused, hyper=("margin", "Tn", "imbalance", "alpha", "Tp"), ref_emb=False),
)
