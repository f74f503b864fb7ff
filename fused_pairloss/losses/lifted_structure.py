"""Lifted structure losses: PML's LiftedStructureLoss (Oh Song et al., "Deep Metric Learning via
Lifted Structured Feature Embedding", CVPR 2016) and GeneralizedLiftedStructureLoss (Hermans et al.
2017, "In Defense of the Triplet Loss"), on the pair engine, as PML keeps them in one file.

LiftedStructureLoss, per positive pair (a, p) with L_x = LSE over the negative pairs of anchor x of
margin(neg_margin, u) (u = d for lp, PML's default; S for cosine):
    l_ap = relu(logaddexp(L_a, L_p) + margin(u_ap, pos_margin))^2 / 2,
the LSE over the negative pairs whose anchor index is a or p (PML compares the anchor indices of
the negative pairs with a and p, so in ref mode p is read as a row index of the batch: row p's
negatives when p < N and p != a; no such negative pair gives 0), mean over the positive pairs
(MeanReducer); PML's few-pairs rule. Two passes: the engine's per-row LSE over the negatives
(declaration: neg x = neg_margin - d, or S - neg_margin), then ops/positive_pairs.py over each
row's positives (O(#positive pairs)).

GeneralizedLiftedStructureLoss:
declaration (PML's distance.margin): lp distance (PML's default): pos x = d - pos_margin, neg x =
neg_margin - d; cosine: pos x = pos_margin - S, neg x = S - neg_margin; both reduced by LSE.
Combination: L_i = relu(lse_pos_i + lse_neg_i) with an empty set's LSE taken as 0 (PML's masked
logsumexp), mean over all rows; PML's few-pairs rule.
"""
from __future__ import annotations

import torch

from .. import _validation as V
from ..ops import engines
from ..ops._common import LOCAL, loss_function, pair_operands, pairs_of, similarity_dtype, zero_loss
from ..ops.positive_pairs import positive_pair_mean, positive_pair_sums, register_pair_term
from ..ops.spec import PairLossSpec, PairTerm
from ..ops.stats import pair_stats
from ._base import _PairLoss, run_pair_loss
from ._reference_common import (check_distance, distance_margin, masked_logsumexp, nan_in_nan_out, pair_setup,
                                pml_pair_lists, prepare_pairs, too_few_pairs)
from ._registry import LossEntry


def lifted_structure_reference(embeddings, labels, ref_emb=None, ref_labels=None, *,
                               neg_margin=1.0, pos_margin=0.0, distance="lp",
                               indices_tuple=None):
    """PML GeneralizedLiftedStructureLoss (lifted_structure_loss.py:52-80; mat-based,
    MeanReducer; PML's default distance is LpDistance()).

    Per row i, LSEs without the added one (an empty set gives 0):
      lp:     L_i = relu( LSE_{P_i} (d_ij - pos_margin) + LSE_{N_i} (neg_margin - d_ij) )
      cosine: L_i = relu( LSE_{P_i} (pos_margin - S_ij) + LSE_{N_i} (S_ij - neg_margin) )
    loss = (1/N) sum_i L_i over all rows (a row without positives still adds relu(LSE_{N_i})).
    One-pair rule -> 0.
    """
    check_distance(distance, loss="generalized_lifted_structure_loss")
    mat, pos, neg, too_few = prepare_pairs(embeddings, labels, ref_emb, ref_labels,
                                           indices_tuple, None, distance)
    pos_lse = masked_logsumexp(distance_margin(mat, pos_margin, distance), pos, add_one=False)
    neg_lse = masked_logsumexp(distance_margin(neg_margin, mat, distance), neg, add_one=False)
    loss = torch.mean(torch.relu(pos_lse + neg_lse))
    return torch.where(too_few, zero_loss(embeddings), loss).to(similarity_dtype(embeddings, distance))


def declaration(neg_margin, pos_margin, distance="lp"):
    sign = 1.0 if distance == "lp" else -1.0
    return PairLossSpec(pos=PairTerm(scale=sign, shift=pos_margin, lse=True),
                        neg=PairTerm(scale=-sign, shift=neg_margin, lse=True), distance=distance)


def combine(st: engines.PairStats, embeddings, *, batch=LOCAL):
    lp = torch.where(st.count_pos > 0, st.lse_pos, 0)
    ln = torch.where(st.count_neg > 0, st.lse_neg, 0)
    loss = batch.mean(torch.relu(lp + ln)).to(embeddings.dtype)
    return torch.where(batch.too_few_pairs(st.count_pos, st.count_neg), zero_loss(embeddings), loss)


@loss_function
def lifted_structure_fused(embeddings, labels, ref_emb, ref_labels, *, neg_margin, pos_margin, distance="lp",
                           backend, exclude_col=None, batch=LOCAL):
    q, r, labels_r, excl = pair_operands(embeddings, labels, ref_emb, ref_labels, exclude_col)
    st = pair_stats(q, r, labels, labels_r, excl, declaration(neg_margin, pos_margin, distance), backend)
    return combine(st, embeddings, batch=batch).to(similarity_dtype(embeddings, distance))  # PML's under autocast


@loss_function
def generalized_lifted_structure_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, neg_margin=1.0,
                                      pos_margin=0.0, distance="lp", backend="auto"):
    """PML GeneralizedLiftedStructureLoss(neg_margin, pos_margin); default distance LpDistance."""
    V.check_real("pos_margin", pos_margin)
    V.check_real("neg_margin", neg_margin)
    V.check_distance(distance)
    V.check_margins_ordered(pos_margin, neg_margin, distance, "generalized_lifted_structure_loss")
    return run_pair_loss(lifted_structure_reference, lifted_structure_fused, embeddings, labels, ref_emb,
                         ref_labels, backend, neg_margin=neg_margin, pos_margin=pos_margin, distance=distance)


class GeneralizedLiftedStructureLoss(_PairLoss):
    """Drop-in for pytorch_metric_learning.losses.GeneralizedLiftedStructureLoss (default LpDistance)."""
    _default_distance = "lp"
    _reference = staticmethod(lifted_structure_reference)
    _fuses_pair_miners = True  # our MultiSimilarityMiner's and PairMarginMiner's pairs: their rule in the engine

    def __init__(self, neg_margin=1, pos_margin=0, backend="auto", **kwargs):
        super().__init__()
        V.check_real("pos_margin", pos_margin)
        V.check_real("neg_margin", neg_margin)
        self.neg_margin, self.pos_margin = neg_margin, pos_margin
        self._init_pair(backend, kwargs, (neg_margin, pos_margin))
        if self._distance_kind is not None:
            V.check_margins_ordered(pos_margin, neg_margin, self._distance_kind, "GeneralizedLiftedStructureLoss",
                                    "generalized_lifted_structure_loss")

    def _hyper(self):
        return dict(neg_margin=self.neg_margin, pos_margin=self.pos_margin, distance=self._distance_kind)

    def _functional(self):
        return generalized_lifted_structure_loss


# ---- LiftedStructureLoss -----------------------------------------------------------------------
def lifted_structure_pairs_reference(embeddings, labels, ref_emb=None, ref_labels=None, *, neg_margin=1.0,
                                     pos_margin=0.0, distance="lp", indices_tuple=None):
    """PML LiftedStructureLoss(neg_margin, pos_margin) (lifted_structure_loss.py) step by step: the
    pair lists, per positive pair the negative pairs whose anchor is a or p (n_per_p), their masked
    LSE of margin(neg_margin, u), relu(lse + margin(u_ap, pos_margin))^2 / 2, the mean."""
    check_distance(distance, loss="lifted_structure_loss")
    mat, pos_cnt, neg_cnt = pair_setup(embeddings, labels, ref_emb, ref_labels, indices_tuple, distance)
    zero = zero_loss(embeddings)
    a1, p, a2, n = pml_pair_lists(pos_cnt, neg_cnt)
    if a1.numel() == 0 or a2.numel() == 0 or bool(too_few_pairs(a1.numel(), a2.numel(), mat.device)):
        return nan_in_nan_out(zero, embeddings, ref_emb)
    n_per_p = (a2[None, :] == a1[:, None]) | (a2[None, :] == p[:, None])
    neg_pairs = pairs_of(mat, a2, n)[None, :] * n_per_p.to(mat.dtype)
    lse = masked_logsumexp(distance_margin(neg_margin, neg_pairs, distance), n_per_p, add_one=False)[:, 0]
    losses = torch.relu(lse + distance_margin(pairs_of(mat, a1, p), pos_margin, distance)) ** 2 / 2
    return nan_in_nan_out(losses.mean(), embeddings, ref_emb)


def _lifted_union(row_lse, col_lse, same_index):
    """(lse, share of row a, share of row p) of the union of the two rows' negatives: logaddexp(L_a,
    L_p), L_p left out when p == a (one anchor), 0 when neither row has a negative (PML's masked LSE)."""
    col_lse = torch.where(same_index, torch.full_like(col_lse, float("-inf")), col_lse)
    has = ~(torch.isneginf(row_lse) & torch.isneginf(col_lse))
    top = torch.where(has, torch.maximum(row_lse, col_lse), torch.zeros_like(row_lse)).detach()
    e_row, e_col = torch.exp(row_lse - top), torch.exp(col_lse - top)
    total = torch.where(has, e_row + e_col, torch.ones_like(row_lse))
    lse = torch.where(has, top + torch.log(total), torch.zeros_like(row_lse))
    return lse, torch.where(has, e_row / total, 0.0), torch.where(has, e_col / total, 0.0)


def lifted_pair_term(u, row_lse, col_lse, same_index, pos_margin, _unused, lp):
    """relu(lse_union + margin(u, pos_margin))^2 / 2 (module docstring)."""
    lse, _, _ = _lifted_union(row_lse, col_lse, same_index)
    return torch.relu(lse + (u - pos_margin if lp else pos_margin - u)) ** 2 / 2


def lifted_pair_term_grad(u, row_lse, col_lse, same_index, pos_margin, _unused, lp):
    """With h = relu(lse + margin(u, pos_margin)): dl/du = +-h, dl/dL_a and dl/dL_p = h times each
    row's share of the union's exp-sum."""
    lse, share_row, share_col = _lifted_union(row_lse, col_lse, same_index)
    h = torch.relu(lse + (u - pos_margin if lp else pos_margin - u))
    return (h if lp else -h), h * share_row, h * share_col


register_pair_term("lifted_structure", lifted_pair_term, lifted_pair_term_grad)


def lifted_pairs_declaration(neg_margin, distance="lp"):
    sign = -1.0 if distance == "lp" else 1.0  # neg_margin - d, or S - neg_margin
    return PairLossSpec(pos=PairTerm(scale=0.0), neg=PairTerm(scale=sign, shift=neg_margin, lse=True),
                        distance=distance)


@loss_function
def lifted_structure_pairs_fused(embeddings, labels, ref_emb, ref_labels, *, neg_margin, pos_margin, distance="lp",
                                 backend, exclude_col=None, batch=LOCAL):
    q, r, labels_r, excl = pair_operands(embeddings, labels, ref_emb, ref_labels, exclude_col)
    st = pair_stats(q, r, labels, labels_r, excl, lifted_pairs_declaration(neg_margin, distance), backend)
    n_cols = q.shape[0] if r is None else r.shape[0]
    # L of column p is row p's (a row index of the batch); no such row: no negative pair
    pad = st.lse_neg.new_full((max(n_cols - q.shape[0], 0),), float("-inf"))
    col_lse = torch.cat([st.lse_neg, pad])[:n_cols]
    sums = positive_pair_sums(q, r, labels, labels_r, excl, st.lse_neg, col_lse, "lifted_structure",
                              float(pos_margin), 0.0, distance == "lp", backend)
    loss = positive_pair_mean(sums, st, embeddings, batch)
    return nan_in_nan_out(loss, embeddings, ref_emb).to(similarity_dtype(embeddings, distance))


@loss_function
def lifted_structure_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, neg_margin=1.0, pos_margin=0.0,
                          distance="lp", backend="auto"):
    """PML LiftedStructureLoss(neg_margin, pos_margin); default distance LpDistance."""
    V.check_real("pos_margin", pos_margin)
    V.check_real("neg_margin", neg_margin)
    V.check_distance(distance)
    V.check_margins_ordered(pos_margin, neg_margin, distance, "lifted_structure_loss")
    return run_pair_loss(lifted_structure_pairs_reference, lifted_structure_pairs_fused, embeddings, labels, ref_emb,
                         ref_labels, backend, neg_margin=neg_margin, pos_margin=pos_margin, distance=distance)


class LiftedStructureLoss(_PairLoss):
    """Drop-in for pytorch_metric_learning.losses.LiftedStructureLoss (default LpDistance)."""
    _default_distance = "lp"
    _reference = staticmethod(lifted_structure_pairs_reference)
    _pair_based = True  # PML reduces the pair lists: a listed pair counts as often as it is listed
    # the wrappers call it as PML does (its own fused call, or its listed pairs for CrossBatchMemory)
    _fused_in_wrappers = False

    def __init__(self, neg_margin=1, pos_margin=0, backend="auto", **kwargs):
        super().__init__()
        V.check_real("pos_margin", pos_margin)
        V.check_real("neg_margin", neg_margin)
        self.neg_margin, self.pos_margin = neg_margin, pos_margin
        self._init_pair(backend, kwargs, (neg_margin, pos_margin))
        if self._distance_kind is not None:
            V.check_margins_ordered(pos_margin, neg_margin, self._distance_kind, "LiftedStructureLoss",
                                    "lifted_structure_loss")

    def _hyper(self):
        return dict(neg_margin=self.neg_margin, pos_margin=self.pos_margin, distance=self._distance_kind)

    def _functional(self):
        return lifted_structure_loss


ENTRIES = (
    LossEntry(LiftedStructureLoss, "pair", functional=lifted_structure_loss,
              reference=lifted_structure_pairs_reference, fused=lifted_structure_pairs_fused,
              hyper=("neg_margin", "pos_margin")),
    LossEntry(GeneralizedLiftedStructureLoss, "pair", functional=generalized_lifted_structure_loss,
              reference=lifted_structure_reference, fused=lifted_structure_fused, hyper=("neg_margin", "pos_margin")),
)
