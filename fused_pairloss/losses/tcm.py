"""Threshold-consistent margin loss (Zhang et al., "Threshold-Consistent Margin Loss for Open-World
Deep Metric Learning", 2023; PML ThresholdConsistentMarginLoss), cosine only.

Over PML's pair lists (all pairs, or an indices_tuple's, duplicates counted), with S the cosine
similarity of the pair's two embeddings:
    pos = sum_{S_ap <= m+} (m+ - S_ap) / #{S_ap <= m+}   (0 if none),
    neg = sum_{S_an >= m-} (S_an - m-) / #{S_an >= m-}   (0 if none),
    loss = lambda+ pos + lambda- neg (already reduced).

Declaration: hinge terms relu(m+ - S) on the positives and relu(S - m-) on the negatives, summed
with the count of terms > 0 per row. That count leaves out a pair exactly on its margin (its term
is 0), which PML's <= / >= counts: the one deliberate difference (docs/semantics.md).
The engine's operands are the rows F.cosine_similarity compares (cosine_similarity_rows: norms
clamped at 1e-8, not F.normalize's 1e-12), so S is PML's for every row, a short one included.
"""
from __future__ import annotations

import torch

from .. import _validation as V
from ..ops import engines
from ..ops._common import LOCAL, loss_function, rows_of, zero_loss
from ..ops.spec import PairLossSpec, PairTerm
from ..ops.stats import pair_stats
from ._base import _PairLoss, _warn_once, run_pair_loss
from ._reference_common import check_distance, fp16_rows_normalized_to_nan, nan_in_nan_out, pair_count_matrices, \
    pml_pair_lists, pml_pairs_of_call
from ._registry import LossEntry


def tcm_reference(embeddings, labels, ref_emb=None, ref_labels=None, *, lambda_plus=1.0, lambda_minus=1.0,
                  margin_plus=0.9, margin_minus=0.5, distance="cosine", indices_tuple=None):
    """PML ThresholdConsistentMarginLoss (tcm_loss.py) step by step: the pair lists
    (lmu.convert_to_pairs), F.cosine_similarity of the rows of `embeddings` at those indices (PML
    takes both ends from embeddings, also with a ref_emb), the masked means, their weighted sum."""
    check_distance(distance, allowed=("cosine",), loss="threshold_consistent_margin_loss")
    shape = (embeddings.shape[0], (embeddings if ref_emb is None else ref_emb).shape[0])
    a1, p, a2, n = pml_pair_lists(*pair_count_matrices(labels, ref_emb, ref_labels, indices_tuple, shape,
                                                       embeddings.device))
    if ref_emb is not None and ref_emb.shape[0] > embeddings.shape[0] and not V._compiling():
        ends = torch.cat([p, n])
        if ends.numel() and int(ends.max()) >= embeddings.shape[0]:  # PML: an IndexError
            raise ValueError(f"ref_emb: ThresholdConsistentMarginLoss takes both ends of a pair from embeddings (as "
                             f"PML), so its pairs' ref rows must be rows of embeddings too; ref_emb has "
                             f"{ref_emb.shape[0]} rows, embeddings {embeddings.shape[0]}")
    pos_sims = torch.nn.functional.cosine_similarity(rows_of(embeddings, a1), rows_of(embeddings, p))
    neg_sims = torch.nn.functional.cosine_similarity(rows_of(embeddings, a2), rows_of(embeddings, n))
    below = pos_sims <= margin_plus
    above = neg_sims >= margin_minus
    pos_tcm = ((margin_plus - pos_sims) * below).sum() / below.sum() if below.any() else 0
    neg_tcm = ((neg_sims - margin_minus) * above).sum() / above.sum() if above.any() else 0
    loss = lambda_plus * pos_tcm + lambda_minus * neg_tcm
    if not torch.is_tensor(loss):  # PML's zero loss for a plain 0
        loss = zero_loss(embeddings)
    return nan_in_nan_out(loss, embeddings, None)


COSINE_SIMILARITY_EPS = 1e-8  # F.cosine_similarity's default eps, which PML's TCM uses


def cosine_similarity_rows(x):
    """The rows F.cosine_similarity multiplies: x / max(|x|, 1e-8), the clamp outside autograd (torch
    clamps the norm in place under no_grad), so a row shorter than 1e-8 gets the gradient of x / |x|'s
    formula at the clamped value (F.normalize's clamp_min passes none to the norm there). The norm is
    F.normalize's op (its dtype under autocast)."""
    norm = x.norm(2, dim=1, keepdim=True)
    clamped = torch.where(norm < COSINE_SIMILARITY_EPS, COSINE_SIMILARITY_EPS + (norm - norm.detach()), norm)
    return x / clamped


def _has_row_below_cosine_eps(*xs):
    """Whether a row of any of the tensors (None skipped) has a norm < 1e-8: F.cosine_similarity and
    F.normalize (the miners' distances) make different rows of it."""
    return any(bool((torch.linalg.vector_norm(x.detach(), dim=1) < COSINE_SIMILARITY_EPS).any())
               for x in xs if x is not None)


def declaration(margin_plus, margin_minus):
    return PairLossSpec(pos=PairTerm(scale=-1.0, shift=float(margin_plus), hinge=True, sum=True),
                        neg=PairTerm(scale=1.0, shift=float(margin_minus), hinge=True, sum=True), distance="cosine")


def combine(st: engines.PairStats, embeddings, *, lambda_plus, lambda_minus, batch=LOCAL):
    def masked_mean(total, count):
        n = batch.sum(count)
        return torch.where(n > 0, batch.sum(total) / n.clamp(min=1), 0.0)

    loss = lambda_plus * masked_mean(st.sum_pos, st.nonzero_pos) + lambda_minus * masked_mean(st.sum_neg,
                                                                                               st.nonzero_neg)
    return loss.to(embeddings.dtype)


def _separate_ref(embeddings, labels, ref_emb, ref_labels):
    return ref_emb is not None and not (ref_emb is embeddings and ref_labels is labels)


def _warn_unfused_ref():
    _warn_once("tcm.ref", "fused_pairloss: ThresholdConsistentMarginLoss with a ref_emb is computed as PML computes "
               "it (both ends of a pair taken from embeddings), unfused")


@loss_function
def tcm_fused(embeddings, labels, ref_emb, ref_labels, *, lambda_plus=1.0, lambda_minus=1.0, margin_plus=0.9,
              margin_minus=0.5, distance="cosine", backend, exclude_col=None, batch=LOCAL):
    hyper = dict(lambda_plus=lambda_plus, lambda_minus=lambda_minus, margin_plus=margin_plus,
                 margin_minus=margin_minus, distance=distance)
    if _separate_ref(embeddings, labels, ref_emb, ref_labels) and exclude_col is None:
        # PML takes both ends of a pair from embeddings, also the ref's: what it computes then is
        # not a comparison with ref_emb, so it is reproduced as it is, unfused
        return tcm_reference(embeddings, labels, ref_emb, ref_labels, **hyper)
    if batch is LOCAL and not V._compiling() and fp16_rows_normalized_to_nan(embeddings, ref_emb):
        # NaN similarities of an fp16 zero row: PML's steps over the same pairs (its NaN terms)
        return tcm_reference(embeddings, labels, ref_emb, ref_labels, **hyper,
                             indices_tuple=pml_pairs_of_call(labels, ref_labels, exclude_col, backend))
    # the batch against itself (self mode), or an explicit exclusion against a ref; on PML's rows
    q = cosine_similarity_rows(embeddings)
    r, labels_r = (None, None) if exclude_col is None else (cosine_similarity_rows(ref_emb), ref_labels)
    st = pair_stats(q, r, labels, labels_r, exclude_col, declaration(margin_plus, margin_minus), backend)
    loss = combine(st, embeddings, lambda_plus=lambda_plus, lambda_minus=lambda_minus, batch=batch)
    return nan_in_nan_out(loss, embeddings, None)


@loss_function
def threshold_consistent_margin_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, lambda_plus=1.0,
                                     lambda_minus=1.0, margin_plus=0.9, margin_minus=0.5, distance="cosine",
                                     backend="auto"):
    """PML ThresholdConsistentMarginLoss(lambda_plus, lambda_minus, margin_plus, margin_minus); cosine only."""
    for name, v in (("lambda_plus", lambda_plus), ("lambda_minus", lambda_minus), ("margin_plus", margin_plus),
                    ("margin_minus", margin_minus)):
        V.check_real(name, v)
    check_distance(distance, allowed=("cosine",), loss="threshold_consistent_margin_loss")
    if _separate_ref(embeddings, labels, ref_emb, ref_labels):
        _warn_unfused_ref()
    return run_pair_loss(tcm_reference, tcm_fused, embeddings, labels, ref_emb, ref_labels, backend,
                         lambda_plus=lambda_plus, lambda_minus=lambda_minus, margin_plus=margin_plus,
                         margin_minus=margin_minus, distance=distance)


class ThresholdConsistentMarginLoss(_PairLoss):
    """Drop-in for pytorch_metric_learning.losses.ThresholdConsistentMarginLoss (CosineSimilarity)."""
    _distance_measures_the_batch = False  # PML's loss does not call its distance on the batch
    _distances = ("cosine",)
    _cosine_only = True
    _reference = staticmethod(tcm_reference)
    _fuses_pair_miners = True  # our MultiSimilarityMiner's and PairMarginMiner's pairs: their rule in the engine
    _pair_based = True  # PML reduces the pair lists: a listed pair counts as often as it is listed
    # PML's wrappers pass a ref_emb, whose rows PML's TCM does not read: called as PML calls it
    _fused_in_wrappers = False

    def __init__(self, lambda_plus=1.0, lambda_minus=1.0, margin_plus=0.9, margin_minus=0.5, backend="auto",
                 **kwargs):
        super().__init__()
        for name, v in (("lambda_plus", lambda_plus), ("lambda_minus", lambda_minus), ("margin_plus", margin_plus),
                        ("margin_minus", margin_minus)):
            V.check_real(name, v)
        self.lambda_plus, self.lambda_minus = lambda_plus, lambda_minus
        self.margin_plus, self.margin_minus = margin_plus, margin_minus
        self._init_pair(backend, kwargs, (lambda_plus, lambda_minus, margin_plus, margin_minus))

    def _hyper(self):
        return dict(lambda_plus=self.lambda_plus, lambda_minus=self.lambda_minus, margin_plus=self.margin_plus,
                    margin_minus=self.margin_minus, distance=self._distance_kind)

    def _functional(self):
        return threshold_consistent_margin_loss

    def _forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        if _separate_ref(embeddings, labels, ref_emb, ref_labels):
            _warn_unfused_ref()
        return super()._forward(embeddings, labels, indices_tuple, ref_emb, ref_labels)

    def _fused_with_miner_rule(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        if _separate_ref(embeddings, labels, ref_emb, ref_labels):
            return None  # PML's reading of a ref_emb (tcm_fused): the reference with the listed pairs
        if hasattr(indices_tuple, "spec_changes") and _has_row_below_cosine_eps(embeddings, ref_emb):
            return None  # the miner measured other rows than TCM's S (cosine_similarity_rows): its listed pairs
        return super()._fused_with_miner_rule(embeddings, labels, indices_tuple, ref_emb, ref_labels)

    def _fused_with_listed_pairs(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        if _separate_ref(embeddings, labels, ref_emb, ref_labels):
            return None  # PML's reading of a ref_emb (tcm_fused): the reference with the listed pairs
        return super()._fused_with_listed_pairs(embeddings, labels, indices_tuple, ref_emb, ref_labels)


ENTRIES = (
    LossEntry(ThresholdConsistentMarginLoss, "pair", functional=threshold_consistent_margin_loss,
              reference=tcm_reference, fused=tcm_fused,
              hyper=("lambda_plus", "lambda_minus", "margin_plus", "margin_minus"), ref_emb=False),
)
