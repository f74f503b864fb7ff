"""Supervised contrastive loss (Khosla et al., NeurIPS 2020; PML SupConLoss) on the pair engine.

Declaration: x = S / t (distance: -d / t); positives reduced by LSE and by sum, negatives by LSE.
Combination: per row, -mean over P_i of (x_ij - LSE over P_i and N_i of x)
= (|P_i| lse_all_i - sum_pos_i) / (|P_i| + tiny) with lse_all = logaddexp(lse_pos, lse_neg), 0 for a
row without positives (one positive: softplus(lse_neg - x_p), counted where PML's rounding keeps it,
docs/semantics.md); PML's AvgNonZeroReducer over the rows; 0 when the batch has no positive or no
negative pair; PML's few-pairs rule. (PML subtracts the detached row max first: it cancels.)
"""
from __future__ import annotations

import torch

from .. import _validation as V
from ..ops import engines
from ..ops._common import LOCAL, loss_function, logaddexp, pair_operands, similarity_dtype, zero_loss
from ..ops.operands import lp_distances, softplus, stat_dtype
from ..ops.spec import PairLossSpec, PairTerm
from ..ops.stats import pair_stats
from ._base import _PairLoss, run_pair_loss
from ._reference_common import avg_non_zero, check_distance, masked_logsumexp, nan_in_nan_out, prepare_pairs
from ._registry import LossEntry


def supcon_reference(embeddings, labels, ref_emb=None, ref_labels=None, *, temperature=0.1,
                     distance="cosine", indices_tuple=None):
    """PML SupConLoss (mat-based; AvgNonZeroReducer over rows).

    z_ij = S_ij / T (cosine) or -d_ij / T (lp; supcon_loss.py:18-20). Per row i
    (supcon_loss.py:21-37):
        mx_i = max_j z_ij over ALL columns (detached; the self column and the columns in neither
               set included: in self mode z_ii = 1/T is the max for cosine, ~0 for lp)
        z'_ij = z_ij - mx_i;  den_i = LSE_{j in P_i u N_i} z'_ij (0 if the union is empty)
        L_i = -sum_{j in P_i} (z'_ij - den_i) / (|P_i| + tiny)
            = (|P_i| LSE_{P_i u N_i} z - sum_{P_i} z) / (|P_i| + tiny) mathematically (mx cancels);
    L_i = 0 for a row without positives (and exactly 0 for one positive and no negative).
    loss = mean of the L_i > 0, else 0; 0 (graph-attached) if the batch has no positive or no
    negative pair at all (supcon_loss.py:16, 39) or by the one-pair rule.
    """
    check_distance(distance, loss="supcon_loss")
    mat, pos, neg, too_few = prepare_pairs(embeddings, labels, ref_emb, ref_labels,
                                           indices_tuple, None, distance)
    z = (mat if distance == "cosine" else -mat) / temperature
    z = z - z.amax(dim=1, keepdim=True).detach()  # "for numerical stability"
    denominator = masked_logsumexp(z, pos | neg, add_one=False)
    log_prob = z - denominator
    pos_f = pos.to(z.dtype)
    # PML multiplies by the float mask (a NaN anywhere in the row propagates, as there)
    mean_log_prob_pos = (pos_f * log_prob).sum(dim=1) / (pos_f.sum(dim=1) + torch.finfo(z.dtype).tiny)
    loss = avg_non_zero(-mean_log_prob_pos, embeddings)
    loss = torch.where(pos.any() & neg.any(), loss, zero_loss(embeddings))
    loss = nan_in_nan_out(torch.where(too_few, zero_loss(embeddings), loss), embeddings, ref_emb)
    return loss.to(similarity_dtype(embeddings, distance))


def declaration(temperature, distance="cosine"):
    scale = (1.0 if distance == "cosine" else -1.0) / temperature
    return PairLossSpec(pos=PairTerm(scale=scale, lse=True, sum=True), neg=PairTerm(scale=scale, lse=True),
                        distance=distance)


def combine(st: engines.PairStats, embeddings, *, distance="cosine", excluded_logits=None, batch=LOCAL):
    zero = zero_loss(embeddings)
    cnt = st.count_pos.to(st.sum_pos.dtype)
    has_pos = st.count_pos > 0
    # rows without positives are 0; mask lse_pos before logaddexp (its gradient is NaN at -inf, -inf)
    lse_pos = torch.where(has_pos, st.lse_pos, 0)
    lse_all = logaddexp(lse_pos, st.lse_neg)
    tiny = torch.finfo(st.sum_pos.dtype).tiny
    rows = torch.where(has_pos, (cnt * lse_all - st.sum_pos) / (cnt + tiny), torch.zeros_like(cnt))
    # A row of one positive: L = log(1 + e^gap), gap = LSE_N - x_p, computed so (not as the difference
    # of two numbers of the size of x_p, which absorbs it at about 15 logits); (two or more
    # positives: L >= log |P|, never near 0). PML's AvgNonZero drops the row where its L rounds to
    # 0, which it computes in its distance matrix's dtype from z' = x - m (m: the row's maximum over
    # all columns, the excluded one included) as (log(1 + e^gap) + z'_p) - z'_p, the positive being
    # the maximum of its sets there: the same rounding decides here which rows count.
    gap = st.lse_neg - lse_pos
    dt = similarity_dtype(embeddings, distance)
    row_max = lse_pos if excluded_logits is None else torch.maximum(lse_pos, excluded_logits)
    z_pos = (lse_pos - row_max).to(dt)
    lse_shift = torch.log(1 + torch.exp(gap.detach()).to(dt))
    counted = (z_pos + lse_shift) - z_pos > 0
    rows = torch.where(st.count_pos == 1, torch.where(counted, softplus(gap), torch.zeros_like(gap)), rows)
    loss = batch.mean_above_zero(rows, zero)
    n_pos, n_neg = batch.sum(st.count_pos), batch.sum(st.count_neg)
    loss = torch.where((n_pos > 0) & (n_neg > 0), loss, zero)
    return torch.where(batch.too_few_pairs(st.count_pos, st.count_neg), zero, loss)


def excluded_column_logits(q, r, excl, temperature, distance):
    """z = S / T (lp: -d / T) of each row's excluded column (its own in self mode), which PML's row
    maximum includes; -inf for a row without one; None where no row has one. O(N D)."""
    if r is not None and excl is None:
        return None
    with torch.no_grad():
        if r is None:
            partner, has = q, torch.ones(q.shape[0], dtype=torch.bool, device=q.device)
        else:
            partner, has = r[excl.clamp(min=0)], excl >= 0
        s = (q * partner).sum(1, dtype=stat_dtype(q.dtype))
        if distance == "cosine":
            z = s / temperature
        else:
            d2 = (q * q).sum(1, dtype=s.dtype) + (partner * partner).sum(1, dtype=s.dtype) - 2 * s
            z = -lp_distances(d2.clamp(min=0)) / temperature
        return torch.where(has, z, float("-inf"))


@loss_function
def supcon_fused(embeddings, labels, ref_emb, ref_labels, *, temperature, distance="cosine", backend,
                 exclude_col=None, batch=LOCAL):
    q, r, labels_r, excl = pair_operands(embeddings, labels, ref_emb, ref_labels, exclude_col)
    st = pair_stats(q, r, labels, labels_r, excl, declaration(temperature, distance), backend)
    # while torch.compile traces: the row maximum is taken as the positive's (a temperature in the
    # traced arithmetic would become a graph input beside the engine's constant)
    excluded = None if V._compiling() else excluded_column_logits(q, r, excl, temperature, distance)
    loss = combine(st, embeddings, distance=distance, excluded_logits=excluded, batch=batch)
    # PML's AvgNonZeroReducer drops NaN terms: keep NaN in, NaN out (docs/semantics.md)
    loss = loss + zero_loss(embeddings) + (0 if ref_emb is None else zero_loss(ref_emb))
    return loss.to(similarity_dtype(embeddings, distance))  # PML's dtype under autocast


@loss_function
def supcon_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, temperature=0.1, distance="cosine",
                backend="auto"):
    """PML SupConLoss(temperature)."""
    V.check_positive("temperature", temperature)
    V.check_distance(distance)
    return run_pair_loss(supcon_reference, supcon_fused, embeddings, labels, ref_emb, ref_labels, backend,
                         temperature=temperature, distance=distance)


class SupConLoss(_PairLoss):
    """Drop-in for pytorch_metric_learning.losses.SupConLoss."""
    _reference = staticmethod(supcon_reference)
    _fuses_pair_miners = True  # our MultiSimilarityMiner's and PairMarginMiner's pairs: their rule in the engine

    def __init__(self, temperature=0.1, backend="auto", **kwargs):
        super().__init__()
        V.check_positive("temperature", temperature)
        self.temperature = temperature
        self._init_pair(backend, kwargs, (temperature,))

    def _hyper(self):
        return dict(temperature=self.temperature, distance=self._distance_kind)

    def _functional(self):
        return supcon_loss


ENTRIES = (
    LossEntry(SupConLoss, "pair", functional=supcon_loss, reference=supcon_reference, fused=supcon_fused,
              hyper=("temperature",)),
)
