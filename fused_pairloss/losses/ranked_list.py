"""Ranked list loss (Wang et al., CVPR 2019; PML RankedListLoss), PML's LpDistance() on normalized
embeddings.

Per row i, over the other rows j, with b = alpha - margin (alpha = 1 + margin / 2 by default):
    positives with d_ij > b:     x = d_ij - b,    w = exp(Tp x),
    negatives with 0 < d_ij < alpha:  x = alpha - d_ij,  w = exp(Tn x),
    L+_i = sum w x / (sum w + N 1e-5)  over the active positives (PML adds 1e-5 for every column),
    L-_i likewise over the active negatives,
    L_i = (1 - imbalance) L+_i + imbalance L-_i,   loss = mean of L_i.
The weights are differentiated, as PML's (d/dx of w x / B is w (1 + T x - T L) / B).

Fused: every quantity is a sum over a row: the pair engine's exp-weighted sums (PairTerm
sum_temperature, docs/design.md "Exp-weighted sums") give sum w x and sum w per row and set, on
every backend. Deliberate difference (docs/semantics.md): a pair is selected by its rule alone,
without PML's further test d > 0, which matters only for two identical rows other than the row
itself.
"""
from __future__ import annotations

import math
import warnings

import torch

from .. import _validation as V
from ..ops import engines
from ..ops._common import LOCAL, loss_function, normalize, pair_operands
from ..ops.spec import PairLossSpec, PairTerm
from ..ops.stats import pair_stats
from ._base import _PairLoss, check_self_only, run_pair_loss
from ._reference_common import check_distance, nan_in_nan_out
from ._registry import LossEntry

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


# ---- fused: the pair engine's exp-weighted sums -----------------------------------------------
def declaration(margin, alpha, Tp, Tn):
    """lp distance; positives x = relu(d - b), negatives x = relu(alpha - d), each reduced by an
    exp-weighted sum (w = exp(T x) over x > 0; T = 0: the plain sum and the count of x > 0)."""
    return PairLossSpec(pos=PairTerm(scale=1.0, shift=alpha - margin, hinge=True, sum=True, sum_temperature=Tp),
                        neg=PairTerm(scale=-1.0, shift=alpha, hinge=True, sum=True, sum_temperature=Tn),
                        distance="lp")


def combine(st: engines.PairStats, embeddings, *, imbalance, Tp, Tn):
    """L+_i = sum w x / (sum w + N 1e-5), L-_i likewise; the mean of their imbalance mix."""
    n = st.sum_pos.shape[0]

    def row_loss(total, weight, nonzero, T):
        return total / ((weight if T != 0 else nonzero.to(total.dtype)) + EPS_PER_COLUMN * n)

    rows = (1 - imbalance) * row_loss(st.sum_pos, st.weight_pos, st.nonzero_pos, Tp) \
        + imbalance * row_loss(st.sum_neg, st.weight_neg, st.nonzero_neg, Tn)
    return rows.mean().to(embeddings.dtype)


@loss_function
def ranked_list_fused(embeddings, labels, ref_emb, ref_labels, *, margin=0.4, Tn=10.0, imbalance=0.5, alpha=None,
                      Tp=0.0, distance="lp", backend, exclude_col=None, batch=LOCAL):
    check_self_only(embeddings, labels, ref_emb, ref_labels, "RankedListLoss")
    alpha = check_hyper(margin, Tn, imbalance, alpha, Tp)
    q, _, _, _ = pair_operands(embeddings, labels, None, None)
    spec = declaration(float(margin), float(alpha), float(Tp), float(Tn))
    st = pair_stats(q, None, torch.as_tensor(labels, device=embeddings.device), None, None, spec, backend)
    loss = combine(st, embeddings, imbalance=imbalance, Tp=float(Tp), Tn=float(Tn))
    return nan_in_nan_out(loss, embeddings, None)


@loss_function
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
    _refuses_ref = True  # PML: ref_emb is not supported
    _empty_batch_value = math.nan  # PML: the mean of an empty per-row loss
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
                          stacklevel=V.user_stacklevel())
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
