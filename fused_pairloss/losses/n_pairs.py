"""N-pairs loss (Sohn, "Improved Deep Metric Learning with Multi-class N-pair Loss Objective",
NIPS 2016; PML NPairsLoss).

PML's computation: one positive pair per label (lmu.convert_to_pos_pairs_with_unique_labels: of
the positive pairs in PML's order, the first one whose anchor has that label; with all pairs, the
class's first member and its second), anchors a_k and positives p_k of the K labels; then the
cross-entropy of S(a_k, p_j) (DotProductSimilarity on normalized embeddings, PML's default, i.e.
cosine) with target j = k:
    L_k = LSE_j S(a_k, p_j) - S(a_k, p_k),   loss = mean_k L_k (PML's MeanReducer).

Declaration: the K anchors against the K positives with labels 0..K-1 on both sides, so each
row's positive is its own pair and its negatives the other positives; x = S reduced by LSE on both
sets: L_k = logaddexp(lse_pos_k, lse_neg_k) - lse_pos_k (memory O(K D)).
"""
from __future__ import annotations

import torch

from .. import _validation as V
from ..ops import engines
from ..ops._common import LOCAL, loss_function, label_runs, normalize, zero_loss
from ..ops.operands import softplus
from ..ops.spec import PairLossSpec, PairTerm
from ..ops.stats import pair_stats
from ._base import record_distance_stats, _PairLoss, check_self_only, run_pair_loss
from ._reference_common import nan_in_nan_out
from ._registry import LossEntry

DECLARATION = PairLossSpec(pos=PairTerm(scale=1.0, lse=True), neg=PairTerm(scale=1.0, lse=True), distance="cosine")


def unique_label_pairs(labels, indices_tuple=None):
    """PML lmu.convert_to_pos_pairs_with_unique_labels: (anchors, positives), one pair per label in
    ascending label order, the first of PML's positive pairs (lmu.convert_to_pairs) with that anchor
    label (np.unique's return_index). Without a tuple the positive pairs are torch.where(same
    label, off the diagonal) in row-major order, whose first pair of a label is (its first member,
    its second)."""
    labels = torch.as_tensor(labels)
    if indices_tuple is None:
        order, starts, _ = label_runs(labels)
        has_second = torch.zeros_like(starts)
        has_second[:-1] = ~starts[1:]
        first = (starts & has_second).nonzero().squeeze(1)
        return order[first], order[first + 1]
    a, p = (torch.as_tensor(t, device=labels.device).long().reshape(-1) for t in indices_tuple[:2])
    order, starts, _ = label_runs(labels[a])
    chosen = order[starts]
    return a[chosen], p[chosen]


def n_pairs_reference(embeddings, labels, ref_emb=None, ref_labels=None, *, distance="cosine", indices_tuple=None):
    """PML NPairsLoss() (n_pairs_loss.py) step by step: the pairs with unique labels, the K x K
    similarities of their normalized anchors and positives, cross-entropy with the diagonal as
    targets, mean; no pair: PML's zero loss."""
    check_self_only(embeddings, labels, ref_emb, ref_labels, "NPairsLoss")
    a, p = unique_label_pairs(torch.as_tensor(labels, device=embeddings.device), indices_tuple)
    if a.numel() == 0:
        return zero_loss(embeddings)
    sim = normalize(embeddings[a]) @ normalize(embeddings[p]).t()
    targets = torch.arange(a.numel(), device=embeddings.device)
    return torch.nn.functional.cross_entropy(sim, targets, reduction="none").mean()


def combine(st: engines.PairStats, embeddings, *, batch=LOCAL):
    # logaddexp(lse_pos, lse_neg) - lse_pos, its digits kept where the positive dominates
    return batch.mean(softplus(st.lse_neg - st.lse_pos)).to(embeddings.dtype)


@loss_function
def n_pairs_fused(embeddings, labels, ref_emb, ref_labels, *, distance="cosine", backend, exclude_col=None,
                  batch=LOCAL, pairs=None):
    """`pairs`: the (anchors, positives) of unique_label_pairs when the caller has them already."""
    check_self_only(embeddings, labels, ref_emb, ref_labels, "NPairsLoss")
    a, p = unique_label_pairs(torch.as_tensor(labels, device=embeddings.device)) if pairs is None else pairs
    k = torch.arange(a.shape[0], device=embeddings.device)
    st = pair_stats(normalize(embeddings[a]), normalize(embeddings[p]), k, k, None, DECLARATION, backend)
    # no pair: PML's zero loss (a branch on the data-dependent count would break torch.compile's graph)
    loss = torch.where((k >= 0).any(), combine(st, embeddings, batch=batch),
                       zero_loss(embeddings))
    return nan_in_nan_out(loss, embeddings, None)


@loss_function
def n_pairs_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, distance="cosine", backend="auto"):
    """PML NPairsLoss() with its default DotProductSimilarity on normalized embeddings (cosine); no
    ref_emb (as PML)."""
    if distance != "cosine":
        raise ValueError(f"distance must be 'cosine' (PML's DotProductSimilarity on normalized embeddings) for "
                         f"NPairsLoss; got {distance!r}")
    check_self_only(embeddings, labels, ref_emb, ref_labels, "NPairsLoss")
    return run_pair_loss(n_pairs_reference, n_pairs_fused, embeddings, labels, ref_emb, ref_labels, backend,
                         distance=distance)


class NPairsLoss(_PairLoss):
    """Drop-in for pytorch_metric_learning.losses.NPairsLoss (default DotProductSimilarity(), which
    normalizes: fused as cosine; labels required; no ref_emb, as in PML). An indices_tuple chooses the
    pairs as PML's convert_to_pos_pairs_with_unique_labels does, fused too. `num_pairs`: PML's stat."""
    _distance_measures_the_batch = False  # PML's measures the pairs' anchors against their positives
    _refuses_ref = True  # PML: ref_emb is not supported
    _distances = ("cosine",)
    _reference = staticmethod(n_pairs_reference)
    _listed_pairs = False
    _fused_in_wrappers = False  # PML's wrappers pass a ref_emb, which PML's NPairsLoss refuses

    def __init__(self, backend="auto", **kwargs):
        super().__init__()
        self.num_pairs = 0
        self._init_pair(backend, kwargs, ())
        self.cross_entropy = torch.nn.CrossEntropyLoss(reduction="none")  # PML's attribute (no state)
        self._hold_pml_read()

    def _hyper(self):
        return dict(distance=self._distance_kind)

    def _functional(self):
        return n_pairs_loss

    def _forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        if labels is None:
            raise ValueError("NPairsLoss: labels is required (as in PML)")
        V.check_pair_inputs(embeddings, labels, None, None)
        check_self_only(embeddings, labels, ref_emb, ref_labels, "NPairsLoss")
        pairs = unique_label_pairs(torch.as_tensor(labels, device=embeddings.device), indices_tuple)
        self.num_pairs = int(pairs[0].numel())
        if self.num_pairs:
            record_distance_stats(self.distance, embeddings[pairs[0]], embeddings[pairs[1]])
        from .._backends import resolve_backend
        backend = resolve_backend(self.backend, embeddings.device)
        if backend == "reference":  # NaN in, NaN out also where the tuple lists no pair of the NaN row
            return nan_in_nan_out(n_pairs_reference(embeddings, labels, indices_tuple=indices_tuple), embeddings, None)
        return n_pairs_fused(embeddings, labels, None, None, backend=backend, pairs=pairs)


ENTRIES = (
    LossEntry(NPairsLoss, "pair", functional=n_pairs_loss, reference=n_pairs_reference, fused=n_pairs_fused,
              ref_emb=False),
)
