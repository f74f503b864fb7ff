"""Instance loss (Zheng et al., "Dual-Path Convolutional Image-Text Embeddings with Instance Loss",
ACM TOMM 2020; PML InstanceLoss).

PML's computation: the batch's cosine similarities scaled by gamma as logits, row i's target the
column t_i = the rank of y_i among the batch's distinct labels (torch.unique(labels,
return_inverse=True)); so per row, over every column j (its own included),
    L_i = LSE_j (gamma S_ij) - gamma S_{i t_i},   loss = mean_i L_i (PML's MeanReducer).

Declaration: x = gamma S on both pair sets, reduced by LSE, in self mode (the row's own column
excluded, so the engine's symmetric self-mode pass serves); the row's LSE is that of lse_pos,
lse_neg and its own logit gamma q_i . q_i. The target logit is one gathered row per row (O(N D)).
"""
from __future__ import annotations

import math

import torch

from .. import _validation as V
from ..ops import engines
from ..ops._common import LOCAL, loss_function, normalize
from ..ops.spec import PairLossSpec, PairTerm
from ..ops.stats import pair_stats
from ._base import _PairLoss, check_self_only, run_pair_loss
from ._reference_common import nan_in_nan_out
from ._registry import LossEntry


def _targets(labels, device):
    """PML's sim_label: the rank of each label among the distinct labels of the batch."""
    return torch.unique(torch.as_tensor(labels, device=device), return_inverse=True)[1]


def instance_reference(embeddings, labels, ref_emb=None, ref_labels=None, *, gamma=64.0, distance="cosine",
                       indices_tuple=None):
    """PML InstanceLoss(gamma) (instance_loss.py) step by step: S of the normalized batch with itself
    times gamma, cross-entropy against the labels' ranks among the distinct labels, their mean."""
    check_self_only(embeddings, labels, ref_emb, ref_labels, "InstanceLoss")
    if indices_tuple is not None:
        raise ValueError("InstanceLoss: indices_tuple is not supported (as in PML)")
    q = normalize(embeddings)
    logits = (q @ q.t()) * gamma
    loss = torch.nn.functional.cross_entropy(logits, _targets(labels, embeddings.device), reduction="none").mean()
    return nan_in_nan_out(loss, embeddings, None)


def declaration(gamma):
    term = PairTerm(scale=float(gamma), lse=True)
    return PairLossSpec(pos=term, neg=term, distance="cosine")


def combine(st: engines.PairStats, embeddings, own_logit, target_logit, target_is_own, *, batch=LOCAL):
    """L_i = LSE(others_i, own_i) - target_i, others_i = LSE(lse_pos_i, lse_neg_i) (the row's columns
    but its own), mean over the rows. Where the target is the row's own column (one label per
    instance: t_i = i) that is softplus(others_i - own_i), which keeps the relative digits of a
    small loss that the difference of two numbers near gamma loses (docs/semantics.md,
    cross-entropy rows)."""
    A = st.lse_pos.dtype
    own = own_logit.to(A)
    no_others = torch.isneginf(st.lse_pos) & torch.isneginf(st.lse_neg)  # a batch of one row
    # (a finite stand-in where there are none: logaddexp's gradient at (-inf, -inf) is NaN)
    others = torch.logaddexp(st.lse_pos.masked_fill(no_others, 0), st.lse_neg).masked_fill(no_others, -math.inf)
    rows = torch.where(target_is_own, torch.nn.functional.softplus(others - own),
                       torch.logaddexp(others, own) - target_logit.to(A))
    return batch.mean(rows).to(embeddings.dtype)


@loss_function
def instance_fused(embeddings, labels, ref_emb, ref_labels, *, gamma, distance="cosine", backend, exclude_col=None,
                   batch=LOCAL):
    check_self_only(embeddings, labels, ref_emb, ref_labels, "InstanceLoss")
    q = normalize(embeddings)
    labels_t = torch.as_tensor(labels, device=q.device)
    st = pair_stats(q, None, labels_t, None, None, declaration(gamma), backend)
    qa = q.to(st.lse_pos.dtype)  # the engine's S of half rows is fp32's: so are the own and target logits
    own = gamma * (qa * qa).sum(1)  # the row's own column, which self mode leaves out
    targets = _targets(labels_t, q.device)
    target = gamma * (qa * qa[targets]).sum(1)
    target_is_own = targets == torch.arange(len(targets), device=q.device)
    return nan_in_nan_out(combine(st, embeddings, own, target, target_is_own, batch=batch), embeddings, None)


@loss_function
def instance_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, gamma=64.0, distance="cosine",
                  backend="auto"):
    """PML InstanceLoss(gamma): CosineSimilarity only, no ref_emb (as PML)."""
    V.check_real("gamma", gamma)
    if distance != "cosine":
        raise ValueError(f"distance must be 'cosine' for InstanceLoss (PML asserts CosineSimilarity); got {distance!r}")
    check_self_only(embeddings, labels, ref_emb, ref_labels, "InstanceLoss")
    return run_pair_loss(instance_reference, instance_fused, embeddings, labels, ref_emb, ref_labels, backend,
                         gamma=gamma, distance=distance)


class InstanceLoss(_PairLoss):
    """Drop-in for pytorch_metric_learning.losses.InstanceLoss (CosineSimilarity; labels required; no
    ref_emb and no indices_tuple, as in PML)."""
    _refuses_ref = True  # PML: ref_emb is not supported
    _empty_batch_value = math.nan  # PML: the mean of an empty per-row loss
    _distances = ("cosine",)
    _cosine_only = True
    _reference = staticmethod(instance_reference)
    _listed_pairs = False
    _fused_in_wrappers = False  # PML's wrappers pass a ref_emb, which PML's InstanceLoss refuses

    def __init__(self, gamma=64, backend="auto", **kwargs):
        super().__init__()
        V.check_real("gamma", gamma)
        self.gamma = gamma
        self._init_pair(backend, kwargs, (gamma,))

    def _hyper(self):
        return dict(gamma=self.gamma, distance=self._distance_kind)

    def _functional(self):
        return instance_loss

    def _forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        if labels is None:
            raise ValueError("InstanceLoss: labels is required (as in PML)")
        if indices_tuple is not None:
            raise ValueError("InstanceLoss: indices_tuple is not supported (as in PML)")
        return super()._forward(embeddings, labels, indices_tuple, ref_emb, ref_labels)


ENTRIES = (
    LossEntry(InstanceLoss, "pair", functional=instance_loss, reference=instance_reference, fused=instance_fused,
              hyper=("gamma",), ref_emb=False),
)
