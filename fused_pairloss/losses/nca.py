"""Neighbourhood components analysis (Goldberger et al., NIPS 2004; PML NCALoss) on the pair engine.

Per row i, with z_ij = s * mat_ij, mat = -d^2 (PML's default LpDistance(power=2)) or S
(CosineSimilarity), over the columns j (not i itself when the ref is the batch):
    p_i = sum_{j: y_j = y_i} softmax_j(z_ij),   L_i = -log p_i,
loss = mean of L_i over the rows with p_i != 0 (PML's MeanReducer; NaN if no row has a positive,
as PML: the mean of nothing). p_i is 0 where PML's softmax, in the input's dtype, underflows: the
fused rows drop those whose exp(-L_i) is 0 in that dtype (PML rounds each positive's entry before
summing: docs/semantics.md).

Declaration: on unit rows d^2 = 2 - 2 S, so both distances are a term on v = S: x = 2 s (S - 1)
(squared distance) or x = s S (cosine), reduced by LSE over the positives and over the negatives.
Row combination: L_i = logaddexp(lse_pos_i, lse_neg_i) - lse_pos_i over the rows with a positive.
A row of norm <= 1e-12 is no unit row after F.normalize (an all-zero row stays 0): there the
squared distance runs on rows one entry wider (short_row_operands), still a term on v; so does
every call while torch.compile traces (no sync to look for such a row).
Identity rule: the diagonal is left out when the query is the reference (`embeddings is ref_emb`,
whatever the labels objects), as the engine's exclusion of a positive; a diagonal column of
another label (ref_labels other than labels there) is the reference's, except while torch.compile
traces, where it stays a negative.
"""
from __future__ import annotations

import math

import torch

from .. import _validation as V
from ..ops import engines
from ..ops._common import LOCAL, loss_function, normalize, pair_operands, zero_loss
from ..ops.engines import exclusion_for
from ..ops.operands import softplus
from ..ops.spec import PairLossSpec, PairTerm
from ..ops.stats import pair_stats
from ._base import _PairLoss, _has_short_row, computes_as_its_class, run_pair_loss, warn_unfused_indices
from ._reference_common import lp_distances, miner_weights, nan_in_nan_out
from ._registry import LossEntry

DISTANCES = ("squared_lp", "cosine")  # PML's LpDistance(power=2) (its default), CosineSimilarity()


def _check_distance(distance):
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES} (LpDistance(power=2) or CosineSimilarity()); "
                         f"got {distance!r}")


def nca_reference(embeddings, labels, ref_emb=None, ref_labels=None, *, softmax_scale=1.0, distance="squared_lp",
                  indices_tuple=None):
    """PML NCALoss(softmax_scale) step by step (nca_loss.py): miner weights per query row (PML's
    convert_to_weights: the anchors only when a ref is given), mat = -cdist^2 or S, the diagonal
    -inf when the ref is the batch itself (`query is reference`), the softmax over each row, the
    mass of the same-label columns, -log of it times the weight over the rows where it is not 0,
    their mean."""
    _check_distance(distance)
    if len(embeddings) <= 1:
        return zero_loss(embeddings)
    query = normalize(embeddings)
    same_object = ref_emb is None or ref_emb is embeddings
    reference = query if same_object else normalize(ref_emb)
    ref_labels = labels if ref_emb is None else ref_labels
    weights = miner_weights(indices_tuple, torch.as_tensor(labels, device=embeddings.device), query.dtype,
                            using_ref=not same_object)
    if distance == "cosine":
        mat = query @ reference.t()
    else:
        mat = -lp_distances(query, reference) ** 2
    if same_object:
        mat = mat.clone()
        mat.fill_diagonal_(float("-inf"))
    same = (torch.as_tensor(labels, device=mat.device)[:, None]
            == torch.as_tensor(ref_labels, device=mat.device)[None, :]).to(mat.dtype)
    exp = (torch.softmax(softmax_scale * mat, dim=1) * same).sum(1)
    non_zero = exp != 0
    loss = (-torch.log(exp[non_zero]) * weights[non_zero]).mean()
    # PML's dtype under autocast: its softmax runs in fp32, so the input dtype
    return nan_in_nan_out(loss, embeddings, ref_emb).to(embeddings.dtype)


def declaration(softmax_scale, distance):
    s = float(softmax_scale)
    term = PairTerm(scale=s, lse=True) if distance == "cosine" else PairTerm(scale=2.0 * s, shift=1.0, lse=True)
    return PairLossSpec(pos=term, neg=term, distance="cosine")


def combine(st: engines.PairStats, embeddings, *, batch=LOCAL):
    has_pos = st.count_pos > 0
    # the rows without a positive out of the arithmetic (their lse are -inf: no NaN in the gradient)
    lse_pos = torch.where(has_pos, st.lse_pos, torch.zeros_like(st.lse_pos))
    lse_neg = torch.where(has_pos, st.lse_neg, torch.zeros_like(st.lse_neg))
    rows = softplus(lse_neg - lse_pos)  # logaddexp(lse_pos, lse_neg) - lse_pos, its digits kept
    # PML's p_i != 0: its softmax, in the input's dtype, underflows to 0 where the positives are far
    # below the row's maximum, and PML drops that row
    kept = has_pos & (torch.exp(-rows.detach().to(embeddings.dtype)) != 0)
    rows = torch.where(kept, rows, torch.zeros_like(rows))
    n = batch.count(kept)
    mean = batch.sum(rows) / n.clamp(min=1).to(rows.dtype)
    # PML's MeanReducer of no row: the mean of nothing, NaN (a constant: no NaN in the gradient)
    return torch.where(n > 0, mean, torch.full_like(mean, float("nan"))).to(embeddings.dtype)


def wider_rows(q, r):
    """(q', r') whose term 2 s (q' . r' - 1) is -s d^2 up to a constant per row of q, for normalized
    rows that need not be unit rows (norm <= 1e-12 before F.normalize): -d_ij^2 = 2 S_ij - |r_j|^2
    - |q_i|^2, and the softmax over row i drops the constant -|q_i|^2, so q' = [q, 1],
    r' = [r, (1 - |r|^2) / 2] give 2 (q' . r' - 1) = -d^2 + |q_i|^2 - 1. (NCA, Proxy-NCA.)"""
    q_wide = torch.cat([q, torch.ones_like(q[:, :1])], dim=1)
    r_wide = torch.cat([r, (1 - (r * r).sum(1, keepdim=True)) / 2], dim=1)
    return q_wide, r_wide


def short_row_operands(q, r, labels, labels_r, exclude_col):
    """The pair engine's operands (q', r', labels_r, exclude_col) on wider_rows, in ref mode: self
    mode (r None) becomes the batch against itself with each row's own column excluded."""
    if r is None:
        r, labels_r, exclude_col = q, labels, exclusion_for(q.shape[0], q.device)
    return (*wider_rows(q, r), labels_r, exclude_col)


@loss_function
def nca_fused(embeddings, labels, ref_emb, ref_labels, *, softmax_scale, distance="squared_lp", backend,
              exclude_col=None, batch=LOCAL):
    if exclude_col is None and ref_emb is embeddings and ref_labels is not labels:
        # NCA's identity rule is `query is reference` (PML's diagonal -inf, whatever the labels objects):
        # the diagonal excluded from the positives, where it is one
        diagonal_positive = torch.as_tensor(labels, device=embeddings.device) == torch.as_tensor(
            ref_labels, device=embeddings.device)
        if not V._compiling() and not bool(diagonal_positive.all()):
            # a diagonal column of another label is a negative, which the engine does not exclude
            return nca_reference(embeddings, labels, ref_emb, ref_labels, softmax_scale=softmax_scale,
                                 distance=distance)
        exclude_col = torch.where(diagonal_positive, exclusion_for(embeddings.shape[0], embeddings.device), -1)
    if exclude_col is None and ref_emb is not None and ref_emb is not embeddings:
        # not the query itself (whatever `ref_labels is labels` says): keep the diagonal
        exclude_col = torch.full((embeddings.shape[0],), -1, dtype=torch.int64, device=embeddings.device)
    q, r, labels_r, excl = pair_operands(embeddings, labels, ref_emb, ref_labels, exclude_col)
    # d^2 = 2 - 2 S needs unit rows; F.normalize leaves a row of norm <= eps short (module docstring).
    # While torch.compile traces (no sync to look): the wider rows, exact for every row
    if distance == "squared_lp" and (V._compiling() or _has_short_row(embeddings, ref_emb)):
        q, r, labels_r, excl = short_row_operands(q, r, labels, labels_r, excl)
    st = pair_stats(q, r, labels, labels_r, excl, declaration(softmax_scale, distance), backend)
    loss = combine(st, embeddings, batch=batch)
    if batch.rows(embeddings) <= 1:  # PML's zero loss for a batch of one row
        loss = zero_loss(embeddings)
    return nan_in_nan_out(loss, embeddings, ref_emb).to(embeddings.dtype)


@loss_function
def nca_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, softmax_scale=1.0, distance="squared_lp",
             backend="auto"):
    """PML NCALoss(softmax_scale); PML's default distance LpDistance(power=2) ("squared_lp")."""
    V.check_positive("softmax_scale", softmax_scale)
    _check_distance(distance)
    return run_pair_loss(nca_reference, nca_fused, embeddings, labels, ref_emb, ref_labels, backend,
                         softmax_scale=softmax_scale, distance=distance)


def _nca_distance_kind(distance):
    """PML's distance object as this loss fuses it: LpDistance(power=2) (normalized, p=2) or
    CosineSimilarity() / DotProductSimilarity() (normalized); None for anything else (PML computes)."""
    if distance is None:
        return "squared_lp"
    if isinstance(distance, str):
        return distance if distance in DISTANCES else None
    try:
        from pytorch_metric_learning import distances as pml_distances
    except ImportError:
        return None
    if not (getattr(distance, "p", None) == 2 and getattr(distance, "normalize_embeddings", False)
            and computes_as_its_class(distance)):
        return None
    if type(distance) is pml_distances.LpDistance and getattr(distance, "power", None) == 2:
        return "squared_lp"
    if (type(distance) in (pml_distances.CosineSimilarity, pml_distances.DotProductSimilarity)
            and getattr(distance, "power", None) == 1):  # the same on normalized rows
        return "cosine"
    return None


class NCALoss(_PairLoss):
    """Drop-in for pytorch_metric_learning.losses.NCALoss (default distance LpDistance(power=2))."""
    _empty_ref_value = math.nan  # PML: no row has a positive, the mean of nothing
    _empty_batch_needs_labels = False  # PML: a batch of at most one row is its zero loss, labels or not
    _distances = DISTANCES
    _default_distance = "squared_lp"
    _reference = staticmethod(nca_reference)
    _listed_pairs = False  # an indices_tuple gives PML's per-row miner weights (the reference)
    # PML's CrossBatchMemory passes all pairs but the self ones, which NCA reads as miner weights over a
    # softmax that keeps the self column: the wrappers call it as PML does (the reference)
    _fused_in_wrappers = False

    def __init__(self, softmax_scale=1, backend="auto", **kwargs):
        super().__init__()
        V.check_positive("softmax_scale", softmax_scale)
        self.softmax_scale = softmax_scale
        self._init_pair(backend, kwargs, (softmax_scale,))

    @staticmethod
    def _kind_of(distance):
        return _nca_distance_kind(distance)

    def _hyper(self):
        return dict(softmax_scale=self.softmax_scale, distance=self._distance_kind)

    def _functional(self):
        return nca_loss

    def _reference_with_indices(self, embeddings, labels, indices_tuple, ref_emb, ref_labels, hyper):
        if labels is None:
            raise ValueError("NCALoss: labels is required (PML's labels_required), also with an indices_tuple")
        V.check_pair_inputs(embeddings, labels, ref_emb, ref_labels)
        warn_unfused_indices(self)
        return nca_reference(embeddings, labels, ref_emb, ref_labels, indices_tuple=indices_tuple, **hyper)


ENTRIES = (
    LossEntry(NCALoss, "pair", functional=nca_loss, reference=nca_reference, fused=nca_fused,
              hyper=("softmax_scale",)),
)
