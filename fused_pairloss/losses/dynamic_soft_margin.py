"""Dynamic soft margin (Zhang & Rusinkiewicz, ICCV 2019; PML DynamicSoftMarginLoss), PML's
LpDistance() on normalized embeddings.

With labels, over all triplets (a, p, n) (or an indices_tuple's), x = d_ap - d_an. A histogram of
num_bins bins of width W = 2 |min_val| / num_bins from min_val is PML's state: the batch's
triplets add 1 - f at bin k = floor((x - min_val) / W) and f at k + 1 (f the fraction), mixed with
the previous histogram by `momentum` (1 on the first call, while the state sums to 0), then
normalized. loss = mean over the triplets of CDF_k x, CDF the cumulative histogram (its
dependence on the batch's own triplets differentiated, as PML's).

Fused (labels; the batch against itself or a ref_emb): the triplet engine's bins (ops/triplets.py
`triplet_bins`; its kernels on "cpu", "cuda" and "triton") give per anchor row the histogram
increments and the sums of x per bin over the row's (p, n), one pass over the row's negatives per
positive (no triplet is stored), and its backward recomputes them: a triplet's gradient is a
function of its bin only, w_k = (g_inc_{m+1} - g_inc_m) / W + g_x_k, added to d_ap and taken from
d_an. The state update, the CDF and the mean are PyTorch on num_bins numbers. Compute O(N M (D +
P)), P the positives per anchor; memory O((N + M) D). Without labels (PML's hardest-negative
reading of a batch and its ref): the reference computation (N x M).

Deliberate difference: the state is stored detached. PML's keeps the previous batch's graph, so
its second backward raises ("Trying to backward through the graph a second time").
"""
from __future__ import annotations

import math

import torch

from .. import _validation as V
from .._backends import resolve_backend
from ..ops._common import LOCAL, loss_function, pairs_of, zero_loss
from ._base import _PairLoss, _plain_number, _warn_once, check_tuple_inputs, run_pair_loss, warn_unfused_indices
from ._reference_common import check_distance, convert_to_triplets, distance_matrix, nan_in_nan_out
from ._registry import LossEntry
from .triplet_margin import triplet_engine_op, triplet_operands


def check_bins(min_val, num_bins, momentum):
    """(int(num_bins), the bins' width 2 |min_val| / num_bins); numpy numbers and one-element tensors
    taken as their values (an attribute assigned later too, as the constructor takes them)."""
    min_val, num_bins, momentum = _plain_number(min_val), _plain_number(num_bins), _plain_number(momentum)
    V.check_real("min_val", min_val)
    if min_val == 0:
        raise ValueError("min_val must not be 0 (the bins' width is 2 |min_val| / num_bins)")
    if isinstance(num_bins, bool) or not isinstance(num_bins, (int, float)) or not math.isfinite(num_bins) \
            or num_bins != int(num_bins) or num_bins < 2:
        raise ValueError(f"num_bins must be an integer >= 2 (PML sizes its histogram with it); got {num_bins!r}")
    V.check_real("momentum", momentum)
    return int(num_bins), 2 * abs(min_val) / num_bins


def _bin_and_fraction(x, min_val, delta, num_bins):
    """PML's idx = floor((x - min_val) / W) and frac; idx kept where PML's scatter stays in range."""
    u = (x - min_val) / delta
    return torch.floor(u).long().clamp(0, num_bins - 2), torch.frac(u)


def _state_update(increments, previous, momentum):
    """PML's update_histogram: (1 - m) previous + m increments, normalized; m = 1 while the state
    sums to 0."""
    m = torch.where(previous.sum() != 0, torch.as_tensor(momentum, dtype=previous.dtype, device=previous.device),
                    torch.ones((), dtype=previous.dtype, device=previous.device))
    mixed = (1.0 - m) * previous + m * increments
    return mixed / mixed.sum()


def dynamic_soft_margin_reference(embeddings, labels=None, ref_emb=None, ref_labels=None, *, min_val=-2.0,
                                  num_bins=10, momentum=0.01, histogram=None, distance="lp", indices_tuple=None,
                                  return_histogram=False):
    """PML DynamicSoftMarginLoss.compute_loss step by step (N x M): the triplet differences (with
    labels) or PML's hardest-negative differences (without), the histogram update from
    `histogram` (PML's hist_, zeros at first), CDF-weighted mean."""
    check_distance(distance, allowed=("lp",), loss="dynamic_soft_margin_loss")
    num_bins, delta = check_bins(min_val, num_bins, momentum)
    ref = embeddings if ref_emb is None else ref_emb
    previous = torch.zeros(num_bins, dtype=embeddings.dtype, device=embeddings.device) if histogram is None \
        else histogram.to(device=embeddings.device, dtype=embeddings.dtype)
    mat = distance_matrix(embeddings, ref, "lp")
    if labels is None:  # PML's compute_loss_without_labels
        r, c = mat.shape
        d_pos = torch.zeros(max(r, c), dtype=mat.dtype, device=mat.device)
        d_pos[:min(r, c)] = mat.diag()
        mat = mat.clone()
        mat.fill_diagonal_(float("inf"))
        min_a = torch.zeros(max(r, c), dtype=mat.dtype, device=mat.device)
        min_p = torch.zeros(max(r, c), dtype=mat.dtype, device=mat.device)
        min_a[:c] = mat.min(0).values
        min_p[:r] = mat.min(1).values
        x = d_pos - torch.min(min_a, min_p)
    else:
        labels = torch.as_tensor(labels, device=embeddings.device)
        ref_lab = labels if ref_labels is None else torch.as_tensor(ref_labels, device=embeddings.device)
        a, p, n = convert_to_triplets(indices_tuple, labels, ref_lab)
        x = pairs_of(mat, a, p) - pairs_of(mat, a, n)
    if len(x) == 0:
        return (zero_loss(embeddings), previous) if return_histogram else zero_loss(embeddings)
    idx, frac = _bin_and_fraction(x, min_val, delta, num_bins)
    increments = torch.zeros(num_bins, dtype=x.dtype, device=x.device).scatter_add(0, idx, 1 - frac) \
        .scatter_add(0, idx + 1, frac)
    state = _state_update(increments, previous, momentum)
    cdf = torch.cumsum(state, 0)
    weight_idx = torch.floor((x - min_val) / delta).long().clamp(0, num_bins - 1)
    loss = nan_in_nan_out((cdf[weight_idx] * x).mean(), embeddings, ref_emb)
    return (loss, state.detach()) if return_histogram else loss


@loss_function
def dynamic_soft_margin_fused(embeddings, labels, ref_emb, ref_labels, *, min_val=-2.0, num_bins=10, momentum=0.01,
                              histogram=None, distance="lp", backend, exclude_col=None, batch=LOCAL,
                              return_histogram=False):
    hyper = dict(min_val=min_val, num_bins=num_bins, momentum=momentum, histogram=histogram, distance=distance,
                 return_histogram=return_histogram)
    if labels is None:
        _warn_once("dynamic_soft_margin.no_labels", "fused_pairloss: DynamicSoftMarginLoss without labels is "
                   "computed by the reference path (N x M)")
        return dynamic_soft_margin_reference(embeddings, labels, ref_emb, ref_labels, **hyper)
    num_bins, delta = check_bins(min_val, num_bins, momentum)
    q, r, labels_q, labels_r, excl = triplet_operands(embeddings, labels, ref_emb, ref_labels, exclude_col)
    op = triplet_engine_op("bins", backend, q.device)
    per_row, counts = op(q, r, labels_q, labels_r, excl, float(min_val), delta, num_bins)
    sums, count = per_row.sum(0), counts.sum()
    previous = torch.zeros(num_bins, dtype=sums.dtype, device=sums.device) if histogram is None \
        else histogram.to(device=sums.device, dtype=sums.dtype)
    state = _state_update(sums[0], previous, momentum)
    loss = (torch.cumsum(state, 0) * sums[1]).sum() / count.clamp(min=1).to(sums.dtype)
    # no triplet: PML's zero loss, and the state unchanged
    loss = torch.where(count > 0, loss, torch.zeros_like(loss))
    state = torch.where(count > 0, state, previous)
    loss = nan_in_nan_out(loss.to(embeddings.dtype), embeddings, ref_emb)
    # a NaN input makes PML's state NaN too (its NaN x lands in the histogram); the engine skips them
    state = state + zero_loss(embeddings).detach().to(state.dtype) \
        + (0 if ref_emb is None else zero_loss(ref_emb).detach().to(state.dtype))
    return (loss, state.detach().to(embeddings.dtype)) if return_histogram else loss


@loss_function
def dynamic_soft_margin_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, min_val=-2.0, num_bins=10,
                             momentum=0.01, histogram=None, distance="lp", backend="auto", return_histogram=False):
    """PML DynamicSoftMarginLoss(min_val, num_bins, momentum) with its LpDistance(); `histogram`:
    the state before this call (PML's hist_; None: zeros, the first call). The module keeps the
    state; `return_histogram=True` returns (loss, the state after this call, detached) for the next."""
    check_bins(min_val, num_bins, momentum)
    check_distance(distance, allowed=("lp",), loss="dynamic_soft_margin_loss")
    if histogram is not None:
        if not isinstance(histogram, torch.Tensor) or not histogram.is_floating_point():
            raise TypeError(f"histogram must be None or a floating-point tensor of num_bins={num_bins} entries (the "
                            f"previous call's state); got {type(histogram).__name__}"
                            + (f" of dtype {histogram.dtype}" if isinstance(histogram, torch.Tensor) else ""))
        if histogram.shape != (num_bins,):
            raise ValueError(f"histogram must have shape ({num_bins},) (num_bins); got {tuple(histogram.shape)}")
    if not isinstance(return_histogram, bool):
        raise TypeError(f"return_histogram must be a bool; got {return_histogram!r}")
    return run_pair_loss(dynamic_soft_margin_reference, dynamic_soft_margin_fused, embeddings, labels, ref_emb,
                         ref_labels, backend, min_val=min_val, num_bins=num_bins, momentum=momentum,
                         histogram=histogram, distance=distance, return_histogram=return_histogram)


class DynamicSoftMarginLoss(_PairLoss):
    """Drop-in for pytorch_metric_learning.losses.DynamicSoftMarginLoss (LpDistance() on normalized
    embeddings); the histogram state `hist_` is PML's attribute (not in the state_dict, as PML),
    stored detached. Without labels (PML's reading of a batch against its ref) and with an
    indices_tuple: the reference computation."""
    _distances = ("lp",)
    _default_distance = "lp"
    _reference = staticmethod(dynamic_soft_margin_reference)
    _listed_pairs = False
    _fused_in_wrappers = False

    _pml_state = ("hist_",)  # its momentum histogram, PML's instance's where PML computes

    def __init__(self, min_val=-2.0, num_bins=10, momentum=0.01, backend="auto", **kwargs):
        super().__init__()
        self.num_bins = check_bins(min_val, num_bins, momentum)[0]
        self.min_val, self.momentum = min_val, momentum
        self.hist_ = torch.zeros((self.num_bins,))
        self._init_pair(backend, kwargs, (min_val, num_bins, momentum))

    def _hyper(self):
        return dict(min_val=self.min_val, num_bins=self.num_bins, momentum=self.momentum, distance=self._distance_kind)

    def _functional(self):
        return dynamic_soft_margin_loss

    @property
    def delta(self):
        """PML's bins' width 2 |min_val| / num_bins, derived (read-only here: it follows them)."""
        return check_bins(self.min_val, self.num_bins, self.momentum)[1]

    @delta.setter
    def delta(self, value):
        raise AttributeError("DynamicSoftMarginLoss.delta is 2 |min_val| / num_bins here: set min_val or num_bins")

    def _sync_pml(self):
        """PML's instance as ours: PML fixes its bins' width (delta) and its state's size at
        construction; here they follow min_val and num_bins (docs/api.md), also where PML computes
        (a reducer, a regularizer), and its state is ours, detached."""
        super()._sync_pml()
        self._pml.delta = self.delta
        self._pml.hist_ = self._state_of_size()

    def _run_pml(self, *args):
        out = super()._run_pml(*args)
        self.hist_ = self.hist_.detach()  # stored detached, as on the fused path (PML keeps the graph)
        return out

    def _state_of_size(self):
        """hist_, or for a num_bins set before the state holds anything, zeros of that size (the
        bins follow num_bins here: docs/api.md)."""
        num_bins = check_bins(self.min_val, self.num_bins, self.momentum)[0]
        if self.hist_.shape == (num_bins,):
            return self.hist_
        if self.hist_.dim() == 1 and not self.hist_.any():
            return self.hist_.new_zeros(num_bins)
        raise ValueError(f"num_bins={self.num_bins!r} does not match the histogram state hist_ of "
                         f"{tuple(self.hist_.shape)} entries: set num_bins before the first call, "
                         "or hist_ anew with it")

    def _forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        if indices_tuple is not None or labels is None:
            check_tuple_inputs(embeddings, labels, ref_emb, ref_labels)
        else:
            V.check_pair_inputs(embeddings, labels, ref_emb, ref_labels)
        hyper = dict(self._hyper(), histogram=self._state_of_size(), return_histogram=True)
        backend = resolve_backend(self.backend, embeddings.device)
        if indices_tuple is not None:
            warn_unfused_indices(self)
        if backend == "reference" or indices_tuple is not None:
            loss, self.hist_ = dynamic_soft_margin_reference(embeddings, labels, ref_emb, ref_labels,
                                                             indices_tuple=indices_tuple, **hyper)
        else:
            loss, self.hist_ = dynamic_soft_margin_fused(embeddings, labels, ref_emb, ref_labels, backend=backend,
                                                         **hyper)
        return loss


ENTRIES = (
    LossEntry(DynamicSoftMarginLoss, "pair", functional=dynamic_soft_margin_loss,
              reference=dynamic_soft_margin_reference, fused=dynamic_soft_margin_fused,
              hyper=("min_val", "num_bins", "momentum")),
)
