"""Proxy-NCA (Movshovitz-Attias et al., ICCV 2017; PML ProxyNCALoss) on the class engine.

PML's NCALoss computation with the proxies (C, D) as the reference and class c as proxy c's label:
with z_ic = s * mat_ic, mat = -d^2 (PML's default LpDistance(power=2)) or S (CosineSimilarity) of
the normalized embedding and proxy,
    p_i = softmax_c(z_ic) at c = y_i,   L_i = -w_i log p_i
(w_i PML's miner weights, convert_to_weights with using_ref: a sample's count as an anchor),
loss = mean of L_i over the rows with p_i != 0 (PML's MeanReducer; p_i underflows to 0 only for a
target logit about 100 below the row's largest).

Declaration: on unit rows d^2 = 2 - 2 S, so both distances are a term on S: x = 2 s (S - 1)
(squared distance) or x = s S (cosine), reduced by LSE over the classes c != y_i; the proxies
enter normalized per row (the engine normalizes each tile). A proxy of norm <= 1e-12 is no unit
row after F.normalize: such a call runs on rows one entry wider (short_proxy_operands), exact; not
while torch.compile traces (no sync to look), where such a proxy has d^2 = 2 - 2 S.
Row combination: the target's logit z from the engine's target_sim, L_i = logaddexp(lse_i, z_i) - z_i.
"""
from __future__ import annotations

import dataclasses

import torch

from .. import _validation as V
from .._backends import resolve_backend
from ..ops._common import loss_function, normalize
from ..ops.operands import softplus, stat_dtype
from ..ops.spec import ClassLossSpec, PairTerm
from ..ops.stats import class_stats
from ._base import _ClassLoss, _check_sizes, _has_short_row, _like, run_class_loss
from ._reference_common import distance_matrix, miner_weights
from ._registry import LossEntry
from .nca import DISTANCES, _check_distance, _nca_distance_kind, wider_rows


def proxy_nca_reference(embeddings, labels, proxies, *, softmax_scale=1.0, distance="squared_lp", indices_tuple=None):
    """PML ProxyNCALoss (proxy_losses.py, NCALoss.nca_computation with the proxies as reference)
    step by step: miner weights per row, mat = -d^2 (PML's LpDistance: cdist, fp16 pairwise) or S
    (N x C), the softmax over each row, the target's mass, -log of it times the weight over the rows
    where it is not 0, their mean."""
    _check_distance(distance)
    dtype = embeddings.dtype
    weights = miner_weights(indices_tuple, labels, dtype, using_ref=True)  # PML: query is not reference
    # PML's distance(query, proxies): each side normalized once
    mat = distance_matrix(embeddings, proxies.to(dtype), "cosine" if distance == "cosine" else "lp")
    mat = mat if distance == "cosine" else -mat ** 2
    same = (labels[:, None] == torch.arange(proxies.shape[0], device=labels.device)[None, :]).to(mat.dtype)
    exp = (torch.softmax(softmax_scale * mat, dim=1) * same).sum(1)
    non_zero = exp != 0
    return (-torch.log(exp[non_zero]) * weights[non_zero]).mean()


def declaration(softmax_scale, distance):
    s = float(softmax_scale)
    term = PairTerm(scale=s, lse=True) if distance == "cosine" else PairTerm(scale=2.0 * s, shift=1.0, lse=True)
    return ClassLossSpec(row=term, normalize_weights=True, weights_layout="rows")


def short_proxy_operands(embeddings, proxies):
    """The class engine's operands for proxies that need not be unit rows after F.normalize (norm
    <= 1e-12: a zero proxy stays 0, d^2 = |q|^2 to it, not 2 - 2 S): nca.wider_rows of the
    normalized rows (normalized here: the engine must not)."""
    return wider_rows(normalize(embeddings), normalize(proxies.to(embeddings.dtype)))


@loss_function
def proxy_nca_fused(embeddings, labels, proxies, *, softmax_scale, distance="squared_lp", backend, row_weights=None):
    labels = labels.to(device=embeddings.device, dtype=torch.int64)
    spec = declaration(softmax_scale, distance)
    if distance == "squared_lp" and not V._compiling() and _has_short_row(proxies):
        q, p = short_proxy_operands(embeddings, proxies)  # a copy of the proxies, for this call only
        st = class_stats(q, p, labels, dataclasses.replace(spec, normalize_weights=False), backend)
    else:
        st = class_stats(normalize(embeddings), proxies, labels, spec, backend)
    s = float(softmax_scale)
    z = s * st.target_sim if distance == "cosine" else 2.0 * s * (st.target_sim - 1)
    rows = softplus(st.lse_other - z)  # logaddexp(lse, z) - z, its digits kept (margin_softmax.py)
    # PML's p_i != 0, in the input's dtype as PML's softmax; those rows out of the arithmetic
    kept = torch.exp(-rows.detach().to(embeddings.dtype)) != 0
    if row_weights is not None:
        rows = rows * row_weights
    rows = torch.where(kept, rows, torch.zeros_like(rows))
    mean = rows.sum() / kept.sum().to(rows.dtype)  # no kept row: 0 / 0, PML's mean of nothing (NaN)
    return mean.to(embeddings.dtype)


@loss_function
def proxy_nca_loss(embeddings, labels, proxies, *, softmax_scale=1.0, distance="squared_lp", backend="auto"):
    """PML ProxyNCALoss; proxies in PML's layout (C, D); distance "squared_lp" (PML's default
    LpDistance(power=2)) or "cosine"."""
    V.check_centers(embeddings, labels, proxies, 1, name="proxies", classes_first=True)
    V.check_real("softmax_scale", softmax_scale)
    _check_distance(distance)
    return run_class_loss(proxy_nca_reference, proxy_nca_fused, embeddings, labels, proxies, backend,
                          softmax_scale=softmax_scale, distance=distance)


def _labels_only_compared(labels, embeddings, num_classes):
    """Labels PML's ProxyNCA takes and our engine does not: float or bool, or integers outside
    [0, num_classes)."""
    if not (isinstance(labels, torch.Tensor) and isinstance(embeddings, torch.Tensor) and labels.dim() == 1
            and embeddings.dim() == 2 and labels.shape[0] == embeddings.shape[0]):
        return False  # the usual checks name what is wrong
    if labels.is_floating_point() or labels.dtype == torch.bool:
        return True
    # integers: out of range only (one sync, as the range check of the fused path's own); not while
    # torch.compile traces (no sync there: the fused path's check is skipped too)
    return (not labels.is_complex() and labels.numel() > 0 and labels.device.type != "meta" and not V._compiling()
            and bool(((labels < 0) | (labels >= num_classes)).any()))


class ProxyNCALoss(_ClassLoss):
    """Drop-in for pytorch_metric_learning.losses.ProxyNCALoss; parameter `proxies` (C, D)."""
    _param = "proxies"
    _distances = DISTANCES
    _default_distance = "squared_lp"
    _cosine_only = False
    _kind_of = staticmethod(_nca_distance_kind)

    def __init__(self, num_classes, embedding_size, softmax_scale=1, backend="auto", **kwargs):
        super().__init__()
        _check_sizes(num_classes=num_classes, embedding_size=embedding_size)
        V.check_real("softmax_scale", softmax_scale)
        self.num_classes, self.embedding_size, self.softmax_scale = num_classes, embedding_size, softmax_scale
        self._init_class((num_classes, embedding_size), backend, kwargs, (num_classes, embedding_size),
                         dict(softmax_scale=softmax_scale), init=torch.nn.init.normal_)
        self.proxy_labels = torch.arange(num_classes)  # PML's attribute (not in the state_dict)

    def _hyper(self):
        return dict(softmax_scale=self.softmax_scale, distance=self._distance_kind)

    def _fused_forward(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        if _labels_only_compared(labels, embeddings, self.num_classes):
            # PML compares the labels with the proxies' classes 0..C-1 and never indexes with them:
            # float and bool labels work there, and a row whose label is no class has p = 0, which
            # PML's mean drops. The fused engine indexes with the labels: PML's steps (N x C), after
            # PML's cast_types of the parameter itself
            self.cast_weights(embeddings)
            return self._reference_with_weights(embeddings, labels.to(embeddings.device), indices_tuple)
        return super()._fused_forward(embeddings, labels, indices_tuple, ref_emb, ref_labels)

    def _distance_ref_rows(self):
        return self.proxies  # PML's distance(embeddings, proxies), proxies (C, D)

    def _call(self, embeddings, labels, proxies):
        return proxy_nca_loss(embeddings, labels, proxies, backend=self.backend, **self._hyper())

    def _fused_with_weights(self, embeddings, labels, indices_tuple, proxies):
        """PML's miner weights (O(#indices)) on the fused rows."""
        backend = resolve_backend(self.backend, embeddings.device)
        if backend == "reference":
            return None
        V.check_centers(embeddings, labels, proxies, 1, name="proxies", classes_first=True)
        labels = torch.as_tensor(labels, device=embeddings.device)
        weights = miner_weights(indices_tuple, labels, stat_dtype(embeddings.dtype), using_ref=True)
        return proxy_nca_fused(embeddings, labels, proxies, backend=backend, row_weights=weights, **self._hyper())

    def _reference_with_weights(self, embeddings, labels, indices_tuple):
        return proxy_nca_reference(embeddings, labels, _like(self.proxies, embeddings), indices_tuple=indices_tuple,
                                   **self._hyper())

    def _logits(self, embeddings):
        """PML's get_logits: the distance matrix to the proxies, d^2 or S (N x C)."""
        mat = distance_matrix(embeddings, self.cast_weights(embeddings), self._distance_kind.replace("squared_", ""))
        return mat if self._distance_kind == "cosine" else mat ** 2

    def extra_repr(self):
        return (f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, "
                f"softmax_scale={self.softmax_scale}, backend={self.backend!r}")


ENTRIES = (
    LossEntry(ProxyNCALoss, "class", functional=proxy_nca_loss, reference=proxy_nca_reference,
              hyper=("softmax_scale",), weight_layout="rows"),
)
