"""Histogram loss (Ustinova & Lempitsky, NIPS 2016; PML HistogramLoss), cosine similarity.

PML's pairs: from all triplets (or an indices_tuple's), the distinct unordered pairs {a, p} and
{a, n}: the positive pairs of the anchors that have a negative and the negative pairs of which an
end has a positive. Over each set, the soft histogram of S on the nodes -1, -1 + delta, ..., 1
(delta = 2 / n_bins): a pair with r = floor((S + 1) / delta) adds (S + 1 - r delta) / delta to node
r + 1 and ((r + 1) delta - 1 - S) / delta to node r; divided by the set's size it is the density
p+ or p-. loss = sum_k p-_k Phi+_k, Phi+ = cumsum(p+) (the probability that a negative pair is more
similar than a positive one).

Fused: the pair engine's per-row histograms with PML's binning (`declaration`;
PairHistogram.pml_bins) on every backend, summed over the rows: each unordered pair twice (once
from each end), its set's size too, so the densities are PML's. The samples without a positive
(their class alone in the batch) share one new label for the engine, so that a pair of two of them,
no pair of PML's, is no negative pair either. The backward recomputes the tiles: dL/dS_ij =
(g_{r+1} - g_r) / delta with g the gradient of the pair's histogram. Memory O(N D + N n_bins); the
densities, the cumulative sum and the loss are PyTorch on n_bins + 1 numbers. S = 1 exactly (a
duplicated sample) puts r on the last node, where PML's scatter goes out of range (it raises).
"""
from __future__ import annotations

import torch

from .. import _validation as V
from ..ops._common import LOCAL, loss_function, label_counts, normalize, similarity_dtype, unused_label, zero_loss
from ..ops.spec import NO_TERM, PairHistogram, PairLossSpec
from ..ops.stats import pair_stats
from ._base import _PairLoss, check_self_only, run_pair_loss
from ._reference_common import check_distance, convert_to_triplets, distance_matrix, nan_in_nan_out
from ._registry import LossEntry


class BinsMismatchError(ValueError, AssertionError):
    """delta != 2 / n_bins: a ValueError, and the AssertionError PML raises (its tests expect one)."""


def check_bins(n_bins, delta):
    """PML's (n_bins, delta): delta = 2 / n_bins; defaults n_bins = 100. Returns delta."""
    if n_bins is not None:
        V.check_positive("n_bins", n_bins)
    if delta is not None:
        V.check_positive("delta", delta)
    if delta is not None and n_bins is not None and delta != 2 / n_bins:
        raise BinsMismatchError(f"delta and n_bins must satisfy delta = 2 / n_bins (as in PML); got delta={delta}, "
                                f"n_bins={n_bins}")
    return delta if delta is not None else 2 / (100 if n_bins is None else n_bins)


def _nodes(delta):
    return round(1 + 2 / delta)


def _bins(s, delta):
    """PML's r = floor((S.float() + 1) / delta) and the two weights with its operations (r delta
    is an integer tensor times a float: torch's default dtype), in S's dtype; r kept below the
    last node (S = 1: weight 1 on it)."""
    r = torch.floor((s.float() + 1) / delta).long().clamp(0, _nodes(delta) - 2)
    upper = ((s + 1 - r * delta) / delta).to(s.dtype)
    lower = (((r + 1) * delta - 1 - s) / delta).to(s.dtype)
    return r, upper, lower


def _pair_sets(labels):
    """Per sample: whether it has a positive, whether it has a negative."""
    class_size = label_counts(labels)
    return class_size >= 2, class_size < labels.shape[0]


def histogram_reference(embeddings, labels, ref_emb=None, ref_labels=None, *, n_bins=None, delta=None,
                        distance="cosine", indices_tuple=None):
    """PML HistogramLoss (histogram_loss.py) step by step: all triplets (lmu.convert_to_triplets) or
    the tuple's, the distinct unordered (anchor, positive) and (anchor, negative) pairs, the
    densities of their similarities, sum of p- times the cumulative p+."""
    check_distance(distance, allowed=("cosine",), loss="histogram_loss")
    check_self_only(embeddings, labels, ref_emb, ref_labels, "HistogramLoss")
    delta = check_bins(n_bins, delta)
    labels_t = None if labels is None else torch.as_tensor(labels, device=embeddings.device)
    a, p, n = convert_to_triplets(indices_tuple, labels_t, labels_t)
    if len(a) == 0:
        return zero_loss(embeddings)
    mat = distance_matrix(embeddings, embeddings, "cosine")

    def distinct(i, j):
        return torch.unique(torch.sort(torch.stack([i, j]), dim=0).values, dim=1)

    def density(values):
        r, upper, lower = _bins(values, delta)
        out = torch.zeros(_nodes(delta), dtype=values.dtype, device=values.device)
        return (out.scatter_add(0, r + 1, upper).scatter_add(0, r, lower)) / values.shape[0]

    ap, an = distinct(a, p), distinct(a, n)
    phi = torch.cumsum(density(mat[ap[0], ap[1]]), 0)
    loss = nan_in_nan_out(torch.sum(density(mat[an[0], an[1]]) * phi), embeddings, None)
    return loss.to(similarity_dtype(embeddings, "cosine"))  # PML's dtype under autocast


def declaration(delta):
    """The pair engine's per-row histograms of S with PML's binning (nodes -1, -1 + delta, ..., 1),
    over each row's positives and its negatives; no term reduced."""
    return PairLossSpec(pos=NO_TERM, neg=NO_TERM, distance="cosine",
                        histogram=PairHistogram(_nodes(delta), 1.0 / delta, -1.0, pml_bins=True))


def _engine_histograms(q, labels, delta, backend):
    """(histograms [2, nodes], sizes int64[2]) of PML's positive and negative pairs, not divided by
    the sets' sizes, each pair counted from both ends (module docstring). The samples without a
    positive share one new label for the engine, so that a pair of two of them is no negative pair;
    the spurious positive pairs this gives them are left out with their rows."""
    has_pos, _ = _pair_sets(labels)
    engine_labels = torch.where(has_pos, labels, unused_label(labels))
    st = pair_stats(q, None, engine_labels, None, None, declaration(delta), backend)
    hist_pos = torch.where(has_pos, st.hist_pos, torch.zeros_like(st.hist_pos)).sum(1)
    size_pos = torch.where(has_pos, st.count_pos, torch.zeros_like(st.count_pos)).sum()
    return torch.stack([hist_pos, st.hist_neg.sum(1)]), torch.stack([size_pos, st.count_neg.sum()]).to(torch.int64)


@loss_function
def histogram_fused(embeddings, labels, ref_emb, ref_labels, *, n_bins=None, delta=None, distance="cosine", backend,
                    exclude_col=None, batch=LOCAL):
    check_self_only(embeddings, labels, ref_emb, ref_labels, "HistogramLoss")
    delta = check_bins(n_bins, delta)
    labels = torch.as_tensor(labels, device=embeddings.device).to(torch.int64).contiguous()
    q = normalize(embeddings).contiguous()
    hist, sizes = _engine_histograms(q, labels, delta, backend)
    density = hist / sizes.clamp(min=1).to(hist.dtype)[:, None]
    loss = torch.sum(density[1] * torch.cumsum(density[0], 0))
    # PML: no triplet, the zero loss (no positive pair with a negative, or no negative pair)
    loss = torch.where((sizes > 0).all(), loss, torch.zeros_like(loss))
    # PML's value has its similarity matrix's dtype (the autocast dtype under autocast)
    return nan_in_nan_out(loss, embeddings, None).to(similarity_dtype(embeddings, "cosine"))


@loss_function
def histogram_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, n_bins=None, delta=None, distance="cosine",
                   backend="auto"):
    """PML HistogramLoss(n_bins, delta) (CosineSimilarity); no ref_emb, as PML."""
    check_bins(n_bins, delta)
    check_distance(distance, allowed=("cosine",), loss="histogram_loss")
    check_self_only(embeddings, labels, ref_emb, ref_labels, "HistogramLoss")
    return run_pair_loss(histogram_reference, histogram_fused, embeddings, labels, ref_emb, ref_labels, backend,
                         n_bins=n_bins, delta=delta, distance=distance)


class HistogramLoss(_PairLoss):
    """Drop-in for pytorch_metric_learning.losses.HistogramLoss (CosineSimilarity; no ref_emb, as
    PML); `delta` is PML's attribute (2 / n_bins). An indices_tuple's triplets (labels=None allowed,
    as PML) go through the reference, which filters its pairs as PML does."""
    _refuses_ref = True  # PML: ref_emb is not supported
    _distances = ("cosine",)
    _reference = staticmethod(histogram_reference)
    _listed_pairs = False
    _fused_in_wrappers = False  # PML's wrappers pass a ref_emb, which PML's HistogramLoss refuses

    def __init__(self, n_bins=None, delta=None, backend="auto", **kwargs):
        super().__init__()
        self.delta = check_bins(n_bins, delta)
        self._init_pair(backend, kwargs, (n_bins, delta))

    def _hyper(self):
        return dict(delta=self.delta, distance=self._distance_kind)

    def _functional(self):
        return histogram_loss


ENTRIES = (
    LossEntry(HistogramLoss, "pair", functional=histogram_loss, reference=histogram_reference, fused=histogram_fused,
              hyper=("n_bins", "delta"), ref_emb=False),
)
