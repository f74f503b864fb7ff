"""Histogram loss (Ustinova & Lempitsky, NIPS 2016; PML HistogramLoss), cosine similarity.

PML's pairs: from all triplets (or an indices_tuple's), the distinct unordered pairs {a, p} and
{a, n}: the positive pairs of the anchors that have a negative and the negative pairs of which an
end has a positive. Over each set, the soft histogram of S on the nodes -1, -1 + delta, ..., 1
(delta = 2 / n_bins): a pair with r = floor((S + 1) / delta) adds (S + 1 - r delta) / delta to node
r + 1 and ((r + 1) delta - 1 - S) / delta to node r; divided by the set's size it is the density
p+ or p-. loss = sum_k p-_k Phi+_k, Phi+ = cumsum(p+) (the probability that a negative pair is more
similar than a positive one).

Fused on "cpu": the CPU pair engine's per-row histograms with PML's binning (`declaration`;
PairHistogram.pml_bins), summed over the rows: each unordered pair twice (once from each end),
its set's size too, so the densities are PML's. The samples without a positive (their class alone
in the batch) share one new label for the engine, so that a pair of two of them, no pair of PML's,
is no negative pair either. On "triton" / "cuda" (the GPU engines have no histograms) the
op `fused_pairloss::pair_histograms` walks the batch in row chunks (S of a chunk against the rows
from its first on: each unordered pair once), scatter-adding both histograms, and its backward op
recomputes each chunk: dL/dS_ij = (g_{r+1} - g_r) / delta with g the gradient of the pair's
histogram, then grad_q = G q + G^T q chunk by chunk. Memory O(N D + N n_bins) on "cpu", O(chunk N +
N D + n_bins) for the op; the densities, the cumulative sum and the loss are PyTorch on n_bins + 1
numbers. S = 1 exactly (a duplicated sample) puts r on the last node, where PML's scatter goes out
of range (it raises).
"""
from __future__ import annotations

import torch

from .. import _validation as V
from ..ops._common import (LOCAL, label_counts, normalize, register_recomputing_autograd, row_chunks, similarity_dtype,
                           zero_loss)
from ..ops.operands import stat_dtype
from ..ops.spec import NO_TERM, PairHistogram, PairLossSpec
from ..ops.stats import pair_stats
from ._base import _PairLoss, check_self_only, run_pair_loss
from ._reference_common import check_distance, distance_matrix, nan_in_nan_out
from ._registry import LossEntry

# pair entries of one row chunk (a few chunk-sized buffers live at once)
CHUNK_ELEMENTS = 1 << 20


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
    from pytorch_metric_learning.utils import loss_and_miner_utils as lmu
    check_distance(distance, allowed=("cosine",), loss="histogram_loss")
    check_self_only(embeddings, labels, ref_emb, ref_labels, "HistogramLoss")
    delta = check_bins(n_bins, delta)
    labels_t = None if labels is None else torch.as_tensor(labels, device=embeddings.device)
    a, p, n = lmu.convert_to_triplets(indices_tuple, labels_t, labels_t, t_per_anchor="all")
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
    return nan_in_nan_out(torch.sum(density(mat[an[0], an[1]]) * phi), embeddings, None)


# ---- the op: both soft histograms of the batch's unordered pairs -----------------------------------
def _chunk_pairs(q, labels, has_pos, has_neg, i0, i1):
    """S of rows i0..i1 against the rows i0.. (the columns j > i of the upper triangle start
    there), and the masks of the chunk's pairs (i < j) in each set."""
    s = q[i0:i1] @ q[i0:].t()
    rows = torch.arange(i0, i1, device=q.device)
    cols = torch.arange(i0, q.shape[0], device=q.device)
    upper = cols[None, :] > rows[:, None]
    same = labels[i0:i1, None] == labels[None, i0:]
    pos = upper & same & has_neg[i0:i1, None]
    neg = upper & ~same & (has_pos[i0:i1, None] | has_pos[None, i0:])
    return s, pos, neg


@torch.library.custom_op("fused_pairloss::pair_histograms", mutates_args=())
def pair_histograms(q: torch.Tensor, labels: torch.Tensor, delta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(histograms A[2, nodes], sizes int64[2]): the soft histograms of S over the positive (row 0)
    and negative (row 1) unordered pairs of PML's triplets (module docstring), not divided by the
    sets' sizes."""
    A = stat_dtype(q.dtype)
    qa = q.to(A)
    has_pos, has_neg = _pair_sets(labels)
    hist = torch.zeros(2, _nodes(delta), dtype=A, device=q.device)
    sizes = torch.zeros(2, dtype=torch.int64, device=q.device)
    with torch.autocast(q.device.type, enabled=False):  # in the stat dtype
        for i0, i1 in row_chunks(q.shape[0], q.shape[0], CHUNK_ELEMENTS):
            s, pos, neg = _chunk_pairs(qa, labels, has_pos, has_neg, i0, i1)
            for k, mask in enumerate((pos, neg)):
                r, upper, lower = _bins(s[mask], delta)
                hist[k].index_add_(0, r + 1, upper).index_add_(0, r, lower)
                sizes[k] += mask.sum()
    return hist, sizes


@pair_histograms.register_fake
def _fake(q, labels, delta):
    return q.new_empty((2, _nodes(delta)), dtype=stat_dtype(q.dtype)), q.new_empty((2,), dtype=torch.int64)


@torch.library.custom_op("fused_pairloss::pair_histograms_backward", mutates_args=())
def pair_histograms_backward(grad_hist: torch.Tensor, q: torch.Tensor, labels: torch.Tensor,
                             delta: float) -> torch.Tensor:
    """grad_q of sum(grad_hist * histograms): per chunk G_ij = (g_{r+1} - g_r) / delta of the
    pair's set, then grad_q_i += sum_j G_ij q_j and grad_q_j += G_ij q_i."""
    A = stat_dtype(q.dtype)
    qa, g = q.to(A), grad_hist.to(A)
    has_pos, has_neg = _pair_sets(labels)
    grad_q = torch.zeros_like(qa)
    with torch.autocast(q.device.type, enabled=False):  # in the stat dtype
        for i0, i1 in row_chunks(q.shape[0], q.shape[0], CHUNK_ELEMENTS):
            s, pos, neg = _chunk_pairs(qa, labels, has_pos, has_neg, i0, i1)
            r, _, _ = _bins(s, delta)
            G = torch.zeros_like(s)
            for k, mask in enumerate((pos, neg)):
                G = torch.where(mask, (g[k][r + 1] - g[k][r]) / delta, G)
            grad_q[i0:i1] += G @ qa[i0:]
            grad_q[i0:] += G.t() @ qa[i0:i1]
    return grad_q.to(q.dtype)


@pair_histograms_backward.register_fake
def _fake_backward(grad_hist, q, labels, delta):
    return torch.empty_like(q)


def _differentiable_histograms(q, labels, delta):
    """The histograms as a differentiable PyTorch computation (create_graph=True only)."""
    A = stat_dtype(q.dtype)
    has_pos, has_neg = _pair_sets(labels)
    s, pos, neg = _chunk_pairs(q.to(A), labels, has_pos, has_neg, 0, q.shape[0])
    rows = []
    for mask in (pos, neg):
        r, upper, lower = _bins(s[mask], delta)
        out = torch.zeros(_nodes(delta), dtype=A, device=q.device)
        rows.append(out.index_add(0, r + 1, upper).index_add(0, r, lower))
    return torch.stack(rows)


register_recomputing_autograd(pair_histograms, pair_histograms_backward, _differentiable_histograms)


def declaration(delta):
    """The pair engine's per-row histograms of S with PML's binning (nodes -1, -1 + delta, ..., 1),
    over each row's positives and its negatives; no term reduced."""
    return PairLossSpec(pos=NO_TERM, neg=NO_TERM, distance="cosine",
                        histogram=PairHistogram(_nodes(delta), 1.0 / delta, -1.0, pml_bins=True))


def _engine_histograms(q, labels, delta):
    """(histograms [2, nodes], sizes int64[2]) as pair_histograms', each pair counted from both
    ends (module docstring). The samples without a positive share one new label for the engine, so
    that a pair of two of them is no negative pair; the spurious positive pairs this gives them are
    left out with their rows."""
    has_pos, _ = _pair_sets(labels)
    lowest = labels.min()
    alone_label = torch.where(lowest > torch.iinfo(torch.int64).min, lowest - 1, labels.max() + 1)
    engine_labels = torch.where(has_pos, labels, alone_label)
    st = pair_stats(q, None, engine_labels, None, None, declaration(delta), "cpu")
    hist_pos = torch.where(has_pos, st.hist_pos, torch.zeros_like(st.hist_pos)).sum(1)
    size_pos = torch.where(has_pos, st.count_pos, torch.zeros_like(st.count_pos)).sum()
    return torch.stack([hist_pos, st.hist_neg.sum(1)]), torch.stack([size_pos, st.count_neg.sum()]).to(torch.int64)


def histogram_fused(embeddings, labels, ref_emb, ref_labels, *, n_bins=None, delta=None, distance="cosine", backend,
                    exclude_col=None, batch=LOCAL):
    check_self_only(embeddings, labels, ref_emb, ref_labels, "HistogramLoss")
    delta = check_bins(n_bins, delta)
    labels = torch.as_tensor(labels, device=embeddings.device).to(torch.int64).contiguous()
    q = normalize(embeddings).contiguous()
    if backend == "cpu":  # the CPU pair engine's histograms (the other engines have none: the op)
        hist, sizes = _engine_histograms(q, labels, delta)
    else:
        hist, sizes = pair_histograms(q, labels, delta)
    density = hist / sizes.clamp(min=1).to(hist.dtype)[:, None]
    loss = torch.sum(density[1] * torch.cumsum(density[0], 0))
    # PML: no triplet, the zero loss (no positive pair with a negative, or no negative pair)
    loss = torch.where((sizes > 0).all(), loss, torch.zeros_like(loss))
    # PML's value has its similarity matrix's dtype (the autocast dtype under autocast)
    return nan_in_nan_out(loss, embeddings, None).to(similarity_dtype(embeddings, "cosine"))


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
