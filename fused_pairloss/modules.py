"""nn.Module wrappers with PML's constructor arguments and forward signatures (SPEC §1)."""
from __future__ import annotations

import math
import warnings

import torch

from . import _validation as V
from . import functional, reference
from ._backends import resolve_backend


class _PairLossBase(torch.nn.Module):
    _warned_indices_tuple = False

    def _reference_with_indices(self, fn, embeddings, labels, indices_tuple, ref_emb, ref_labels, **kw):
        # An explicit indices_tuple (from any PML miner) is honoured by the reference path, as PML.
        if not _PairLossBase._warned_indices_tuple:
            warnings.warn("fused_pairloss: an explicit indices_tuple is computed by the unfused reference "
                          "path (it materializes N x M); use miner_epsilon for the fused MS miner",
                          stacklevel=5)  # forward, Module._call_impl, _wrapped_call_impl, caller
            _PairLossBase._warned_indices_tuple = True
        V.check_pair_inputs(embeddings, labels, ref_emb, ref_labels)
        if not isinstance(indices_tuple, (tuple, list)) or len(indices_tuple) not in (3, 4):
            raise ValueError("indices_tuple must be a tuple of 3 (a, p, n) or 4 (a1, p, a2, n) index tensors")
        resolve_backend(self.backend, embeddings.device)  # still reject unknown backends
        return fn(embeddings, labels, ref_emb, ref_labels, indices_tuple=indices_tuple, **kw)


class MultiSimilarityLoss(_PairLossBase):
    """Drop-in for pytorch_metric_learning.losses.MultiSimilarityLoss; miner_epsilon=e replaces
    PML's MultiSimilarityMiner(e) + MultiSimilarityLoss."""

    def __init__(self, alpha=2.0, beta=50.0, base=0.5, miner_epsilon=None, backend="auto"):
        super().__init__()
        V.check_positive("alpha", alpha)
        V.check_positive("beta", beta)
        V.check_real("miner_epsilon", miner_epsilon, allow_none=True)
        self.alpha, self.beta, self.base = alpha, beta, base
        self.miner_epsilon, self.backend = miner_epsilon, backend

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        if indices_tuple is not None:
            if self.miner_epsilon is not None:
                raise ValueError("pass either indices_tuple or miner_epsilon, not both")
            return self._reference_with_indices(reference.multi_similarity_loss, embeddings, labels,
                                                indices_tuple, ref_emb, ref_labels, alpha=self.alpha,
                                                beta=self.beta, base=self.base)
        return functional.multi_similarity_loss(embeddings, labels, ref_emb, ref_labels, alpha=self.alpha,
                                                beta=self.beta, base=self.base,
                                                miner_epsilon=self.miner_epsilon, backend=self.backend)

    def extra_repr(self):
        return (f"alpha={self.alpha}, beta={self.beta}, base={self.base}, "
                f"miner_epsilon={self.miner_epsilon}, backend={self.backend!r}")


class CircleLoss(_PairLossBase):
    """Drop-in for pytorch_metric_learning.losses.CircleLoss (pair-wise labels)."""

    def __init__(self, m=0.4, gamma=80.0, backend="auto"):
        super().__init__()
        V.check_real("m", m)
        V.check_positive("gamma", gamma)
        self.m, self.gamma, self.backend = m, gamma, backend

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        if indices_tuple is not None:
            return self._reference_with_indices(reference.circle_loss, embeddings, labels, indices_tuple,
                                                ref_emb, ref_labels, m=self.m, gamma=self.gamma)
        return functional.circle_loss(embeddings, labels, ref_emb, ref_labels, m=self.m,
                                      gamma=self.gamma, backend=self.backend)

    def extra_repr(self):
        return f"m={self.m}, gamma={self.gamma}, backend={self.backend!r}"


def _kaiming_like_pml(fc):
    # PML's default weight_init_func: kaiming_uniform_(a=sqrt(5)) on fc
    torch.nn.init.kaiming_uniform_(fc, a=math.sqrt(5))


def _check_sizes(**sizes):
    for name, v in sizes.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1; got {v!r}")


def _fc_like(fc, embeddings):
    """fc on the embeddings' device and dtype (PML's cast_types); the functional API validates the rest."""
    if isinstance(embeddings, torch.Tensor) and embeddings.is_floating_point() and (
            fc.dtype != embeddings.dtype or fc.device != embeddings.device):
        return fc.to(device=embeddings.device, dtype=embeddings.dtype)
    return fc


class SoftTripleLoss(torch.nn.Module):
    """Drop-in for pytorch_metric_learning.losses.SoftTripleLoss; parameter `fc` (D, C*K) in PML's
    layout (column c*K+k is center k of class c), so PML state_dicts load. center_reg_weight > 0
    adds PML's SparseCentersRegularizer (weight_reg_weight in PML)."""

    def __init__(self, num_classes, embedding_size, centers_per_class=10, la=20.0, gamma=0.1,
                 margin=0.01, center_reg_weight=0.0, backend="auto"):
        super().__init__()
        _check_sizes(num_classes=num_classes, embedding_size=embedding_size,
                     centers_per_class=centers_per_class)
        V.check_positive("la", la)
        V.check_positive("gamma", gamma)
        if center_reg_weight and centers_per_class < 2:
            raise ValueError("center_reg_weight > 0 needs centers_per_class >= 2")
        self.num_classes, self.embedding_size = num_classes, embedding_size
        self.centers_per_class, self.la, self.gamma, self.margin = centers_per_class, la, gamma, margin
        self.center_reg_weight, self.backend = center_reg_weight, backend
        self.fc = torch.nn.Parameter(torch.empty(embedding_size, num_classes * centers_per_class))
        _kaiming_like_pml(self.fc)

    def forward(self, embeddings, labels):
        return functional.soft_triple_loss(embeddings, labels, _fc_like(self.fc, embeddings),
                                           centers_per_class=self.centers_per_class,
                                           la=self.la, gamma=self.gamma, margin=self.margin,
                                           center_reg_weight=self.center_reg_weight, backend=self.backend)

    def extra_repr(self):
        return (f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, "
                f"centers_per_class={self.centers_per_class}, la={self.la}, gamma={self.gamma}, "
                f"margin={self.margin}, center_reg_weight={self.center_reg_weight}, backend={self.backend!r}")


class ProxyCircleLoss(torch.nn.Module):
    """Circle loss with class-level labels: one learnable proxy per class, parameter `fc` (D, C)."""

    def __init__(self, num_classes, embedding_size, m=0.25, gamma=256.0, backend="auto"):
        super().__init__()
        _check_sizes(num_classes=num_classes, embedding_size=embedding_size)
        V.check_positive("gamma", gamma)
        self.num_classes, self.embedding_size, self.m, self.gamma = num_classes, embedding_size, m, gamma
        self.backend = backend
        self.fc = torch.nn.Parameter(torch.empty(embedding_size, num_classes))
        _kaiming_like_pml(self.fc)

    def forward(self, embeddings, labels):
        return functional.proxy_circle_loss(embeddings, labels, _fc_like(self.fc, embeddings),
                                            m=self.m, gamma=self.gamma,
                                            backend=self.backend)

    def extra_repr(self):
        return (f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, m={self.m}, "
                f"gamma={self.gamma}, backend={self.backend!r}")
