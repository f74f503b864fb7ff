"""Proxy-Anchor loss (Kim et al., CVPR 2020; PML ProxyAnchorLoss) on the class engine.

Declaration: column reductions over the samples of each proxy c (K = 1): LSE over y_i == c of
alpha (margin - s_ic) and over y_i != c of alpha (s_ic + margin) (PML's distance.margin).
Combination: PML's DivisorReducer: sum_c softplus(pos_c) / |classes with a sample| +
sum_c softplus(neg_c) / C (its logsumexp with add_one; an empty set gives 0).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _validation as V
from ..ops import engines
from ..ops._common import loss_function, logaddexp, normalize, zero_loss
from ..ops.spec import ClassLossSpec, PairTerm
from ..ops.stats import class_stats
from ._base import _ClassLoss, _check_sizes, _like, run_class_loss
from ._reference_common import distance_margin, masked_logsumexp, miner_weights
from ._registry import LossEntry


def proxy_anchor_reference(embeddings, labels, proxies, *, margin=0.1, alpha=32, indices_tuple=None):
    """PML ProxyAnchorLoss (proxy_anchor_loss.py:30-82; DivisorReducer per sub-loss, summed).
    proxies: PML's `proxies`, shape (C, D), cast to the input dtype as PML's cast_types does.

    s_ic = q_i . p_c (CosineSimilarity, both normalized); w_i = miner weight (1 without a tuple)
    and the shift u_i = w_i - 1 (0 or in [-1, 0): PML ADDS it inside the exponent, so an unlisted
    sample is damped by e^-1, not dropped). Per class c, LSEs over the samples (columns of S),
    with the added one (add_one=True; an empty set gives 0):
        pos_c = log(1 + sum_{i: y_i = c}  e^{alpha (margin - s_ic) + u_i})
        neg_c = log(1 + sum_{i: y_i != c} e^{alpha (s_ic + margin) + u_i})
    loss = sum_c pos_c / #{classes with a positive in the batch} + sum_c neg_c / C
    (a zero divisor gives the graph-attached 0 for that part, divisor_reducer.py:21-28).
    """
    dtype = embeddings.dtype
    proxies = proxies.to(dtype)
    C = proxies.shape[0]
    miner_shift = (miner_weights(indices_tuple, labels, dtype) - 1).unsqueeze(1)
    cos = normalize(embeddings) @ normalize(proxies).t()  # (N, C)
    pos_mask = F.one_hot(labels, C).bool()
    neg_mask = ~pos_mask
    n_with_pos = pos_mask.any(dim=0).sum()
    pos_exp = distance_margin(cos, margin, "cosine")  # margin - s
    neg_exp = distance_margin(-margin, cos, "cosine")  # s - (-margin)
    # PML: lmu.logsumexp(..., dim=0), i.e. per column; done here per row of the transpose
    pos_term = masked_logsumexp((alpha * pos_exp + miner_shift).t(), pos_mask.t(), add_one=True)
    neg_term = masked_logsumexp((alpha * neg_exp + miner_shift).t(), neg_mask.t(), add_one=True)
    pos_loss = torch.where(n_with_pos > 0, pos_term.sum() / n_with_pos.clamp(min=1),
                           zero_loss(embeddings))
    neg_loss = neg_term.sum() / C  # divisor num_classes >= 1
    return pos_loss + neg_loss


def declaration(margin, alpha):
    """PML's proxies are (C, D); the engine normalizes them."""
    return ClassLossSpec(col_pos=PairTerm(scale=-alpha, shift=margin, lse=True),
                         col_neg=PairTerm(scale=alpha, shift=-margin, lse=True), normalize_weights=True)


def combine(st: engines.ClassStats, embeddings, labels, num_classes):
    zero = torch.zeros_like(st.col_lse_pos)
    pos = logaddexp(st.col_lse_pos, zero)  # softplus; exact at -inf
    neg = logaddexp(st.col_lse_neg, zero)
    with_pos = torch.bincount(labels, minlength=num_classes).gt(0).sum()
    pos_loss = torch.where(with_pos > 0, pos.sum() / with_pos.clamp(min=1), 0).to(embeddings.dtype)
    neg_loss = (neg.sum() / num_classes).to(embeddings.dtype)
    return torch.where(with_pos > 0, pos_loss, zero_loss(embeddings)) + neg_loss


@loss_function
def proxy_anchor_fused(embeddings, labels, proxies, *, margin, alpha, backend):
    q = normalize(embeddings)
    st = class_stats(q, proxies, labels, declaration(margin, alpha), backend)
    return combine(st, embeddings, labels, proxies.shape[0])


@loss_function
def proxy_anchor_loss(embeddings, labels, proxies, *, margin=0.1, alpha=32.0, backend="auto"):
    """PML ProxyAnchorLoss; proxies in PML's layout (C, D)."""
    V.check_centers(embeddings, labels, proxies, 1, name="proxies", classes_first=True)
    V.check_real("margin", margin)
    V.check_positive("alpha", alpha)
    return run_class_loss(proxy_anchor_reference, proxy_anchor_fused, embeddings, labels, proxies, backend,
                          margin=margin, alpha=alpha)


def _kaiming_normal_fan_out(proxies):
    """PML's ProxyAnchor initialization."""
    torch.nn.init.kaiming_normal_(proxies, mode="fan_out")


class ProxyAnchorLoss(_ClassLoss):
    """Drop-in for pytorch_metric_learning.losses.ProxyAnchorLoss; parameter `proxies` (C, D).
    Another distance than the cosine is computed by PML itself."""
    _empty_batch_value = 0.0  # PML's zero loss (no rows, no pairs)
    _param = "proxies"
    _cosine_only = False

    def __init__(self, num_classes, embedding_size, margin=0.1, alpha=32, backend="auto", **kwargs):
        super().__init__()
        _check_sizes(num_classes=num_classes, embedding_size=embedding_size)
        V.check_real("margin", margin)
        V.check_positive("alpha", alpha)
        self.num_classes, self.embedding_size, self.margin, self.alpha = num_classes, embedding_size, margin, alpha
        self._init_class((num_classes, embedding_size), backend, kwargs, (num_classes, embedding_size, margin, alpha),
                         init=_kaiming_normal_fan_out)

    def _distance_ref_rows(self):
        return self.proxies  # PML's distance(embeddings, proxies), proxies (C, D)

    def _call(self, embeddings, labels, proxies):
        return proxy_anchor_loss(embeddings, labels, proxies, margin=self.margin, alpha=self.alpha,
                                 backend=self.backend)

    def _logits(self, embeddings):
        """PML's: the cosine of every row with every proxy (N x C)."""
        return normalize(embeddings) @ F.normalize(self.cast_weights(embeddings), dim=1).t()

    def _reference_with_weights(self, embeddings, labels, indices_tuple):
        return proxy_anchor_reference(embeddings, labels, _like(self.proxies, embeddings), margin=self.margin,
                                      alpha=self.alpha, indices_tuple=indices_tuple)

    def extra_repr(self):
        return (f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, margin={self.margin}, "
                f"alpha={self.alpha}, backend={self.backend!r}")


ENTRIES = (
    LossEntry(ProxyAnchorLoss, "class", functional=proxy_anchor_loss, reference=proxy_anchor_reference,
              hyper=("margin", "alpha"), weight_layout="rows"),
)
