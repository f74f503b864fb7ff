"""SoftTriple loss (Qian et al., ICCV 2019; PML SoftTripleLoss) on the class engine.

Declaration: S_ic = sum_k softmax_k(s_ick / gamma) s_ick over the K centers of class c (pooling),
row term z = la S over the other classes (LSE); the target logit la (S_{i,y_i} - margin) is formed
here from target_sim. Row combination: cross-entropy L_i = logaddexp(lse_i, z_i) - z_i, mean over
rows, plus center_reg_weight * PML's SparseCentersRegularizer computed per class block
(C x K x K, never C*K x C*K).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _validation as V
from .._backends import resolve_backend
from ..ops import engines
from ..ops._common import LOCAL, loss_function, normalize
from ..ops.operands import softplus, stat_dtype
from ..ops.spec import ClassLossSpec, PairTerm
from ..ops.stats import class_stats
from ._base import _ClassLoss, _check_sizes, _distance_name, run_class_loss
from ._reference_common import miner_weights
from ._registry import LossEntry


def sparse_centers_regularizer(centers, centers_per_class):
    """PML SparseCentersRegularizer on fc (D, C*K): mean over same-class center pairs k < k' of
    sqrt(2 + tiny - min(2 cos, 2)), divided by C*K*(K-1) (PML's DivisorReducer)."""
    K = centers_per_class
    w = normalize(centers.t())
    CK = w.shape[0]
    sims = w @ w.t()
    cls = torch.arange(CK, device=w.device) // K
    same = (cls.unsqueeze(1) == cls.unsqueeze(0)) & torch.ones(CK, CK, dtype=torch.bool, device=w.device).triu(1)
    tiny = torch.finfo(centers.dtype).tiny
    reg = torch.sqrt(2.0 + tiny - torch.clamp(2.0 * sims[same], max=2))
    return reg.sum() / (2 * same.sum())


def soft_triple_reference(embeddings, labels, centers, *, centers_per_class=10, la=20.0, gamma=0.1,
                          margin=0.01, center_reg_weight=0.0, indices_tuple=None):
    """PML SoftTripleLoss (MeanReducer); centers = PML's `fc`, shape (D, C*K). With an
    indices_tuple, PML's miner weights multiply the rows' losses (lmu.convert_to_weights)."""
    K = centers_per_class
    C = centers.shape[1] // K
    sim_to_centers = normalize(embeddings) @ normalize(centers.t()).t()
    sim_to_centers = sim_to_centers.view(-1, C, K)
    prob = F.softmax(sim_to_centers * (1.0 / gamma), dim=2)
    sim_to_classes = torch.sum(prob * sim_to_centers, dim=2)
    margin_mat = torch.zeros_like(sim_to_classes)
    margin_mat[torch.arange(margin_mat.shape[0], device=margin_mat.device), labels] = margin
    losses = F.cross_entropy(la * (sim_to_classes - margin_mat), labels, reduction="none")
    if indices_tuple is not None:
        losses = losses * miner_weights(indices_tuple, labels, losses.dtype)
    loss = losses.mean()
    if center_reg_weight:
        loss = loss + center_reg_weight * sparse_centers_regularizer(centers, K)
    return loss


def declaration(centers_per_class, la, gamma):
    """PML's fc is (D, C*K); the engine normalizes its columns (PML: F.normalize(fc, dim=0))."""
    return ClassLossSpec(row=PairTerm(scale=la, lse=True), centers_per_class=centers_per_class,
                         pool_gamma=gamma if centers_per_class > 1 else None,
                         normalize_weights=True, weights_layout="columns")


def sparse_centers_regularizer_blockwise(centers, centers_per_class):
    """PML SparseCentersRegularizer (docs/semantics.md) from per-class K x K blocks."""
    K = centers_per_class
    w = normalize(centers.t())  # (C*K, D)
    C = w.shape[0] // K
    blocks = w.view(C, K, -1)
    sims = torch.bmm(blocks, blocks.transpose(1, 2))  # (C, K, K)
    iu = torch.triu_indices(K, K, offset=1, device=w.device)
    pair_sims = sims[:, iu[0], iu[1]]
    tiny = torch.finfo(centers.dtype).tiny
    reg = torch.sqrt(2.0 + tiny - torch.clamp(2.0 * pair_sims, max=2))
    return reg.sum() / (C * K * (K - 1))


def combine(st: engines.ClassStats, embeddings, *, la, margin, batch=LOCAL, row_weights=None):
    """The mean of the rows' cross-entropies; `row_weights`: PML's miner weights multiply them."""
    z_target = la * (st.target_sim - margin)
    rows = softplus(st.lse_other - z_target)  # logaddexp(lse, z) - z, its digits kept (margin_softmax.py)
    if row_weights is not None:
        rows = rows * row_weights
    return batch.mean(rows).to(embeddings.dtype)


@loss_function
def soft_triple_fused(embeddings, labels, centers, *, centers_per_class, la, gamma, margin,
                      center_reg_weight, backend, row_weights=None):
    q = normalize(embeddings)
    # centers: PML's fc (D, C*K), column c*K+k = center k of class c
    st = class_stats(q, centers, labels, declaration(centers_per_class, la, gamma), backend)
    loss = combine(st, embeddings, la=la, margin=margin, row_weights=row_weights)
    if center_reg_weight:
        loss = loss + center_reg_weight * sparse_centers_regularizer_blockwise(centers, centers_per_class)
    return loss


@loss_function
def soft_triple_loss(embeddings, labels, centers, *, centers_per_class=10, la=20.0, gamma=0.1, margin=0.01,
                     center_reg_weight=0.0, backend="auto"):
    """PML SoftTripleLoss; centers is PML's fc, shape (D, C*K), column c*K+k = center k of class c."""
    V.check_centers(embeddings, labels, centers, centers_per_class)
    V.check_positive("la", la)
    V.check_positive("gamma", gamma)
    V.check_real("margin", margin)
    V.check_real("center_reg_weight", center_reg_weight)
    if center_reg_weight and centers_per_class < 2:
        raise ValueError("center_reg_weight > 0 needs centers_per_class >= 2 (the regularizer "
                         f"compares centers of one class); got centers_per_class={centers_per_class}")
    return run_class_loss(soft_triple_reference, soft_triple_fused, embeddings, labels, centers, backend,
                          centers_per_class=centers_per_class, la=la, gamma=gamma, margin=margin,
                          center_reg_weight=center_reg_weight)


class SoftTripleLoss(_ClassLoss):
    """Drop-in for pytorch_metric_learning.losses.SoftTripleLoss; parameter `fc` (D, C*K) in PML's
    layout (column c*K+k is center k of class c), so PML state_dicts load. The center regularizer:
    center_reg_weight=w, or PML's weight_regularizer=SparseCentersRegularizer(C, K) with
    weight_reg_weight=w (both fused)."""
    _inverted_only = True  # PML asserts distance.is_inverted only

    def __init__(self, num_classes, embedding_size, centers_per_class=10, la=20, gamma=0.1, margin=0.01,
                 center_reg_weight=0.0, backend="auto", **kwargs):
        super().__init__()
        _check_sizes(num_classes=num_classes, embedding_size=embedding_size, centers_per_class=centers_per_class)
        V.check_positive("la", la)
        V.check_positive("gamma", gamma)
        V.check_real("margin", margin)
        V.check_real("center_reg_weight", center_reg_weight)
        reg = kwargs.get("weight_regularizer")
        if reg is not None and center_reg_weight:
            raise ValueError("pass center_reg_weight or PML's weight_regularizer, not both")
        if reg is not None and _is_sparse_centers(reg, num_classes, centers_per_class):
            center_reg_weight = kwargs.get("weight_reg_weight", 1)
            V.check_real("weight_reg_weight", center_reg_weight)
            self._fused_kwargs = ("weight_regularizer", "weight_reg_weight")  # the fused regularizer
        elif reg is None:
            self._fused_kwargs = ("weight_reg_weight",)  # PML ignores it without a regularizer
        if center_reg_weight and centers_per_class < 2:
            raise ValueError("center_reg_weight > 0 needs centers_per_class >= 2")
        self.num_classes, self.embedding_size = num_classes, embedding_size
        self.centers_per_class, self.la, self._gamma, self.margin = centers_per_class, la, gamma, margin
        self.center_reg_weight = center_reg_weight
        self._init_class((embedding_size, num_classes * centers_per_class), backend, kwargs,
                         (num_classes, embedding_size, centers_per_class, la, gamma, margin))

    def _pml_fallback_kwargs(self, kwargs):
        """center_reg_weight (ours) as PML spells it: weight_regularizer=SparseCentersRegularizer."""
        if not self.center_reg_weight or "weight_regularizer" in kwargs:  # PML's own, or None assigned since
            return kwargs
        from pytorch_metric_learning.regularizers import SparseCentersRegularizer
        return dict(kwargs, weight_regularizer=SparseCentersRegularizer(self.num_classes, self.centers_per_class),
                    weight_reg_weight=self.center_reg_weight)

    @property
    def gamma(self):
        """PML's attribute: 1 / gamma (the pooling's inverse temperature; the argument is gamma)."""
        return 1.0 / self._gamma

    @gamma.setter
    def gamma(self, value):
        self._gamma = 1.0 / value

    def _call(self, embeddings, labels, fc):
        return soft_triple_loss(embeddings, labels, fc, centers_per_class=self.centers_per_class,
                                la=self.la, gamma=self._gamma, margin=self.margin,
                                center_reg_weight=self.center_reg_weight, backend=self.backend)

    def _fused_with_weights(self, embeddings, labels, indices_tuple, fc):
        """PML's miner weights (lmu.convert_to_weights: O(#indices)) on the fused rows: no N x C."""
        backend = resolve_backend(self.backend, embeddings.device)
        if backend == "reference":
            return None
        V.check_centers(embeddings, labels, fc, self.centers_per_class)
        weights = miner_weights(indices_tuple, torch.as_tensor(labels, device=embeddings.device),
                                stat_dtype(embeddings.dtype))
        return soft_triple_fused(embeddings, labels, fc, centers_per_class=self.centers_per_class, la=self.la,
                                 gamma=self._gamma, margin=self.margin, center_reg_weight=self.center_reg_weight,
                                 backend=backend, row_weights=weights)

    def _reference_with_weights(self, embeddings, labels, indices_tuple):
        return soft_triple_reference(embeddings, labels, self.fc, centers_per_class=self.centers_per_class,
                                     la=self.la, gamma=self._gamma, margin=self.margin,
                                     center_reg_weight=self.center_reg_weight, indices_tuple=indices_tuple)

    def _logits(self, embeddings):
        """PML's: the pooled similarity S_ic of every row and class (N x C)."""
        fc = self.cast_weights(embeddings)
        sim = (normalize(embeddings) @ F.normalize(fc, dim=0)).view(-1, self.num_classes, self.centers_per_class)
        return (torch.softmax(sim / self._gamma, dim=2) * sim).sum(2)

    def extra_repr(self):
        return (f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, "
                f"centers_per_class={self.centers_per_class}, la={self.la}, gamma={self._gamma}, "
                f"margin={self.margin}, center_reg_weight={self.center_reg_weight}, backend={self.backend!r}")


def _is_sparse_centers(reg, num_classes, centers_per_class):
    """PML's SparseCentersRegularizer(num_classes, centers_per_class) with its defaults: the
    regularizer the fused SoftTriple computes (center_reg_weight)."""
    try:
        from pytorch_metric_learning.distances import CosineSimilarity
        from pytorch_metric_learning.reducers import DivisorReducer
        from pytorch_metric_learning.regularizers import SparseCentersRegularizer
    except ImportError:
        return False
    if not (type(reg) is SparseCentersRegularizer and type(reg.reducer) is DivisorReducer
            and type(reg.distance) is CosineSimilarity and _distance_name(reg.distance) == "cosine"
            and not reg.collect_stats):  # its stats: PML's computation records them
        return False
    # its (num_classes, centers_per_class) live only in its mask (the attributes of those names
    # are PML's zero-initialized records)
    K = centers_per_class
    mask = reg.same_class_mask
    if K < 2 or tuple(mask.shape) != (num_classes * K, num_classes * K):
        return False
    block = torch.ones(K, K, dtype=torch.bool).triu(1)
    return bool(mask.sum() == num_classes * block.sum()) and bool(mask[:K, :K].equal(block))


ENTRIES = (
    LossEntry(SoftTripleLoss, "class", functional=soft_triple_loss, reference=soft_triple_reference,
              hyper=("la", "gamma", "margin"), weight_layout="columns"),
)
