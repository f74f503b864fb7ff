"""FastAP (Cakir et al., "Deep Metric Learning to Rank", CVPR 2019; PML FastAPLoss), with PML's
LpDistance(power=2) on normalized embeddings (d2 in [0, 4]).

Per row i, over its positives (same label, not i) and its negatives, the histograms of d2_ij on
the num_bins + 1 nodes 0, D, ..., 4 (D = 4 / num_bins) with triangular pulses
relu(1 - |d2 - node_k| / D): h+_i, h-_i. With H+ = cumsum(h+), H = cumsum(h+ + h-),
    FastAP_i = sum_k [h+ H+ > 0 and H > 0] h+_k H+_k / H_k / |P_i|,
    L_i = (1 - FastAP_i) w_i (PML's miner weights),  loss = mean of L_i over the rows with a positive.

Fused: the pair engine's histograms (PairLossSpec.histogram, h = d^2) on every backend, one walk
of the tiles: each pair adds 1 - f to node k = floor(d2 / D) and f to node k + 1 of its row's
histogram of its set; the backward recomputes the tiles, dL/dd2_ij = (g_{i,k+1} - g_{i,k}) / D (0
on a node, as PML's abs and relu). Memory O(N num_bins + N D); the per-row FastAP is PyTorch on the
N x (num_bins + 1) histograms.
"""
from __future__ import annotations

import math

import torch

from ..ops._common import LOCAL, loss_function, label_counts, normalize, zero_loss
from ..ops.spec import NO_TERM, PairHistogram, PairLossSpec
from ..ops.stats import pair_stats
from ._base import _RowWeightedSelfLoss, check_self_only, run_pair_loss
from ._reference_common import check_distance, miner_weights, nan_in_nan_out
from ._registry import LossEntry
from .nca import _nca_distance_kind

HISTOGRAM_MAX = 4.0  # 2 ** power of PML's LpDistance(power=2)


def check_num_bins(num_bins):
    """PML stores int(num_bins)."""
    if isinstance(num_bins, float) and not math.isfinite(num_bins):
        raise ValueError(f"num_bins must be finite; got {num_bins!r}")
    if isinstance(num_bins, bool) or not isinstance(num_bins, (int, float)) or int(num_bins) < 1:
        raise ValueError(f"num_bins must be a number with int(num_bins) >= 1; got {num_bins!r}")
    return int(num_bins)


def _fast_ap_rows(pos_hist, neg_hist, n_pos, weights):
    """PML's FastAP from the per-row histograms (N x (num_bins + 1)): (per-row losses, rows kept)."""
    total_pos = torch.cumsum(pos_hist, dim=1)
    total = torch.cumsum(pos_hist + neg_hist, dim=1)
    product = pos_hist * total_pos
    safe = (product > 0) & (total > 0)
    ap = torch.where(safe, product / torch.where(safe, total, torch.ones_like(total)), torch.zeros_like(product))
    kept = n_pos > 0
    ap = ap.sum(1) / torch.where(kept, n_pos, torch.ones_like(n_pos)).to(ap.dtype)
    return (1 - ap) * weights, kept, safe.any()


def fast_ap_reference(embeddings, labels, ref_emb=None, ref_labels=None, *, num_bins=10, distance="squared_lp",
                      indices_tuple=None):
    """PML FastAPLoss (fast_ap_loss.py) step by step: the pair indicators, the N x N squared
    distances (cdist ** 2 of the normalized rows), the pulses of every node (nodes x N x N), the
    histograms, FastAP per row, the mean over the rows with a positive."""
    check_distance(distance, allowed=("squared_lp",), loss="fast_ap_loss")
    check_self_only(embeddings, labels, ref_emb, ref_labels, "FastAPLoss")
    num_bins = check_num_bins(num_bins)
    dtype, device = embeddings.dtype, embeddings.device
    labels = torch.as_tensor(labels, device=device)
    weights = miner_weights(indices_tuple, labels, dtype)
    n = labels.shape[0]
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(n, dtype=torch.bool, device=device)
    I_pos, I_neg = (same & ~eye).to(dtype), (~same).to(dtype)
    n_pos = I_pos.sum(1)
    if not bool((n_pos > 0).any()):
        return zero_loss(embeddings)
    q = normalize(embeddings)
    dist = torch.cdist(q, q) ** 2 if dtype not in (torch.float16, torch.bfloat16) else \
        torch.nn.functional.pairwise_distance(q.unsqueeze(1), q.unsqueeze(0)) ** 2
    delta = HISTOGRAM_MAX / num_bins
    nodes = torch.linspace(0.0, HISTOGRAM_MAX, steps=num_bins + 1, device=device, dtype=dtype).view(-1, 1, 1)
    pulse = torch.relu(1 - torch.abs(dist - nodes) / delta)
    pos_hist, neg_hist = torch.sum(pulse * I_pos, dim=2).t(), torch.sum(pulse * I_neg, dim=2).t()
    rows, kept, any_safe = _fast_ap_rows(pos_hist, neg_hist, n_pos, weights)
    if not bool(any_safe):
        return zero_loss(embeddings)
    return nan_in_nan_out(rows[kept].mean(), embeddings, None)


def declaration(num_bins):
    """The pair engine's histograms of d^2 = v^2 (lp) on the nodes 0, D, ..., 4 (D = 4 / num_bins),
    per row over its positives and its negatives; no term reduced."""
    return PairLossSpec(pos=NO_TERM, neg=NO_TERM, distance="lp",
                        histogram=PairHistogram(num_bins + 1, num_bins / HISTOGRAM_MAX, 0.0, squared=True))


@loss_function
def fast_ap_fused(embeddings, labels, ref_emb, ref_labels, *, num_bins=10, distance="squared_lp", backend,
                  exclude_col=None, batch=LOCAL, row_weights=None):
    check_self_only(embeddings, labels, ref_emb, ref_labels, "FastAPLoss")
    num_bins = check_num_bins(num_bins)
    labels = torch.as_tensor(labels, device=embeddings.device).to(torch.int64).contiguous()
    q = normalize(embeddings).contiguous()
    st = pair_stats(q, None, labels, None, None, declaration(num_bins), backend)
    pos_hist, neg_hist = st.hist_pos.t(), st.hist_neg.t()
    A = pos_hist.dtype
    n_pos = label_counts(labels) - 1
    weights = torch.ones(labels.shape[0], dtype=A, device=labels.device) if row_weights is None else row_weights
    rows, kept, any_safe = _fast_ap_rows(pos_hist, neg_hist, n_pos.to(A), weights)
    mean = torch.where(kept, rows, torch.zeros_like(rows)).sum() / kept.sum().clamp(min=1).to(A)
    # PML: no row with a positive, or no safe histogram entry: the zero loss
    loss = torch.where(kept.any() & any_safe, mean, torch.zeros_like(mean))
    return nan_in_nan_out(loss.to(embeddings.dtype), embeddings, None)


@loss_function
def fast_ap_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, num_bins=10, distance="squared_lp",
                 backend="auto"):
    """PML FastAPLoss(num_bins) with its LpDistance(power=2) ("squared_lp"); no ref_emb, as PML."""
    check_num_bins(num_bins)
    check_distance(distance, allowed=("squared_lp",), loss="fast_ap_loss")
    check_self_only(embeddings, labels, ref_emb, ref_labels, "FastAPLoss")
    return run_pair_loss(fast_ap_reference, fast_ap_fused, embeddings, labels, ref_emb, ref_labels, backend,
                         num_bins=num_bins, distance=distance)


class FastAPLoss(_RowWeightedSelfLoss):
    """Drop-in for pytorch_metric_learning.losses.FastAPLoss (LpDistance(power=2) on normalized
    embeddings; no ref_emb, as PML); `num_bins` stored as int(num_bins). An indices_tuple gives
    PML's miner weights on the fused rows."""
    _distances = ("squared_lp",)
    _default_distance = "squared_lp"
    _kind_of = staticmethod(_nca_distance_kind)  # LpDistance(power=2) -> "squared_lp"
    _reference = staticmethod(fast_ap_reference)

    def __init__(self, num_bins=10, backend="auto", **kwargs):
        super().__init__()
        self.num_bins = check_num_bins(num_bins)
        self.num_edges = self.num_bins + 1
        self._init_pair(backend, kwargs, (num_bins,))

    def _hyper(self):
        return dict(num_bins=self.num_bins, distance=self._distance_kind)

    def _needs_pml_now(self):
        # PML derives num_edges = num_bins + 1 once and reads num_bins (the pulses' width) at each
        # call: another num_edges, or a num_bins that is no int, is PML's grid, not the engine's
        on_grid = (isinstance(self.num_bins, int) and not isinstance(self.num_bins, bool)
                   and self.num_edges == self.num_bins + 1)
        return None if on_grid else "num_bins / num_edges off num_edges = num_bins + 1"

    def _functional(self):
        return fast_ap_loss


ENTRIES = (
    LossEntry(FastAPLoss, "pair", functional=fast_ap_loss, reference=fast_ap_reference, fused=fast_ap_fused,
              hyper=("num_bins",), ref_emb=False),
)
