"""Margin-softmax cross-entropies on the class engine: PML's NormalizedSoftmaxLoss (Zhai & Wu,
2019), CosFaceLoss (Wang et al., CVPR 2018), ArcFaceLoss (Deng et al., CVPR 2019) and
SubCenterArcFaceLoss (Deng et al., ECCV 2020: K sub-centers per class, S_ic = max_k s_ick, then
ArcFace).

Declaration: row LSE over the classes c != y_i of scale * S_ic (cosine S, max-pooled over the
sub-centers; scale = 1/temperature, or PML's `scale`); the target logit is formed here from
target_sim, with PML's own formula: NormalizedSoftmax S_y / t, CosFace s (S_y - m), ArcFace
s * cos(acos(S_y) + m) with PML's clamp and "keep it monotonic" branch. Combination: cross-entropy
L_i = logaddexp(lse_i, z_i) - z_i, mean over rows, computed as softplus(lse_i - z_i) (the difference
would cancel to the rounding of |z_i| where the target dominates: a small loss keeps its digits).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import _validation as V
from .._backends import resolve_backend
from ..ops import engines
from ..ops._common import LOCAL, loss_function, normalize
from ..ops.operands import softplus
from ..ops.spec import ClassLossSpec, PairTerm
from ..ops.stats import class_stats
from ._base import _ClassLoss, _LossBase, _check_sizes, _like
from ._reference_common import miner_weights
from ._registry import LossEntry


def _large_margin_softmax(embeddings, labels, W, scale, modify_target, indices_tuple, sub_centers=1):
    """PML LargeMarginSoftmaxLoss.compute_loss (large_margin_softmax_loss.py:101-128) with
    CosFace's / ArcFace's scale_logits (logits * scale, no norms); SubCenterArcFace's get_cosine
    (the max over each class's sub_centers adjacent columns) when sub_centers > 1."""
    dtype = embeddings.dtype
    W = W.to(dtype)
    N, C = labels.shape[0], W.shape[1] // sub_centers
    mask = torch.zeros(N, C, dtype=dtype, device=embeddings.device)
    mask[torch.arange(N, device=embeddings.device), labels] = 1
    cosine = normalize(embeddings) @ normalize(W.t()).t()  # CosineSimilarity(embeddings, W^T)
    if sub_centers > 1:
        cosine = cosine.view(-1, C, sub_centers).max(dim=2).values
    cosine_of_target = cosine[mask == 1]
    diff = (modify_target(cosine_of_target) - cosine_of_target).unsqueeze(1)
    logits = (cosine + mask * diff) * scale  # target logit: s + (f(s) - s), as PML (not f(s))
    losses = F.cross_entropy(logits, labels, reduction="none")
    return torch.mean(losses * miner_weights(indices_tuple, labels, dtype))


def normalized_softmax_reference(embeddings, labels, W, *, temperature=0.05, indices_tuple=None):
    """PML NormalizedSoftmaxLoss (normalized_softmax_loss.py:25-52; MeanReducer).
    W: PML's `W`, shape (D, C), cast to the input dtype as PML's cast_types does.

    PML's default distance here is DotProductSimilarity(), whose normalize_embeddings defaults to
    True (base_distance.py:8): the embeddings ARE normalized; W is normalized per column
    (get_logits, line 48) and then, as the distance's ref side, per row of W^T again (idempotent up
    to rounding; kept so the bits agree). With s_ic = q_i . w_c:
        L_i = w_i (LSE_c (s_ic / T) - s_{i,y_i} / T)    (cross-entropy times the miner weight)
    loss = (1/N) sum_i L_i (samples with weight 0 still count in N).
    """
    dtype = embeddings.dtype
    W = W.to(dtype)
    normalized_W = F.normalize(W, p=2, dim=0)
    logits = (normalize(embeddings) @ normalize(normalized_W.t()).t()) / temperature
    losses = F.cross_entropy(logits, labels, reduction="none")
    return torch.mean(losses * miner_weights(indices_tuple, labels, dtype))


def cosface_reference(embeddings, labels, W, *, margin=0.35, scale=64, indices_tuple=None):
    """PML CosFaceLoss (cosface_loss.py; MeanReducer). W: PML's `W`, shape (D, C).

    s_ic = q_i . w_c (both normalized); target logit t_i = s_{i,y_i} + ((s_{i,y_i} - margin)
    - s_{i,y_i}) (= s - margin to rounding), the others s_ic; scaled by `scale`:
        L_i = w_i (LSE_c z_ic - z_{i,y_i}),  z = scale * logits;   loss = (1/N) sum_i L_i.
    """
    return _large_margin_softmax(embeddings, labels, W, scale, lambda s: s - margin, indices_tuple)


def _arcface_target(margin_degrees):
    """ArcFace's modify_target for a margin in degrees (module docstring of arcface_reference)."""
    m = math.radians(margin_degrees)  # == np.radians(margin) (x * pi/180 in both)
    threshold = math.pi - m  # PML: np.deg2rad(180) - margin, np.deg2rad(180) == math.pi
    m_sin_m = m * math.sin(m)

    def modify(cosine_of_target):
        angles = torch.acos(torch.clamp(cosine_of_target, -1, 1))
        return torch.where(angles <= threshold, torch.cos(angles + m), torch.cos(angles) - m_sin_m)
    return modify


def arcface_reference(embeddings, labels, W, *, margin=28.6, scale=64, indices_tuple=None):
    """PML ArcFaceLoss (arcface_loss.py; MeanReducer). W: PML's `W`, shape (D, C); margin in
    degrees (PML's init_margin: np.radians, line 23).

    With m = radians(margin), s = s_{i,y_i} and theta = acos(clamp(s, -1, 1))
    (large_margin_softmax_loss.py:59-60: the clamp passes the gradient at |s| = 1 itself, where
    acos' is infinite, and blocks it for |s| > 1 from rounding), the target logit is
        f(s) = cos(theta + m)               if theta <= pi - m   (arcface_loss.py:35-40)
               cos(theta) - m sin(m)        otherwise ("keep the cost monotonically decreasing")
    (cos(theta) recomputed through acos, not s); then as CosFace with t_i = s + (f(s) - s).
    """
    return _large_margin_softmax(embeddings, labels, W, scale, _arcface_target(margin), indices_tuple)


def subcenter_arcface_reference(embeddings, labels, W, *, margin=28.6, scale=64, sub_centers=3,
                                indices_tuple=None):
    """PML SubCenterArcFaceLoss (subcenter_arcface_loss.py; MeanReducer). W: PML's `W`, shape
    (D, C * sub_centers), class c's sub-centers the adjacent columns c*K .. c*K + K-1. ArcFace on
    s_ic = max_k s_ick (torch.max: the gradient to the first sub-center attaining it)."""
    return _large_margin_softmax(embeddings, labels, W, scale, _arcface_target(margin), indices_tuple,
                                 sub_centers=sub_centers)


def declaration(scale, sub_centers=1):
    """PML's W is (D, C*K); the engine normalizes its columns (PML: F.normalize(W, dim=0)) and
    max-pools each class's K sub-centers (SubCenterArcFace)."""
    return ClassLossSpec(row=PairTerm(scale=scale, lse=True), centers_per_class=sub_centers,
                         pool_max=sub_centers > 1, normalize_weights=True, weights_layout="columns")


def target_logit(kind, sim, *, scale, margin):
    """The target class's logit from its cosine, with PML's own operations (its clamp and acos
    decide the gradient at |cos| = 1): PML adds the modification as `s + (f(s) - s)`."""
    if kind == "normalized_softmax":
        return sim * scale
    if kind == "cosface":
        modified = sim - margin
    else:  # arcface: margin in radians here (PML converts its degrees with np.radians)
        angles = torch.acos(torch.clamp(sim, -1, 1))
        modified = torch.where(angles <= math.pi - margin, torch.cos(angles + margin),
                               torch.cos(angles) - margin * math.sin(margin))
    return (sim + (modified - sim)) * scale


def combine(st: engines.ClassStats, embeddings, *, kind, scale, margin, batch=LOCAL):
    z = target_logit(kind, st.target_sim, scale=scale, margin=margin)
    return batch.mean(softplus(st.lse_other - z)).to(embeddings.dtype)


@loss_function
def margin_softmax_fused(embeddings, labels, weights, *, kind, scale, margin, backend, sub_centers=1):
    """weights: PML's W (D, C * sub_centers)."""
    q = normalize(embeddings)
    st = class_stats(q, weights, labels, declaration(scale, sub_centers), backend)
    return combine(st, embeddings, kind=kind, scale=scale, margin=margin)


@loss_function
def normalized_softmax_loss(embeddings, labels, W, *, temperature=0.05, backend="auto"):
    """PML NormalizedSoftmaxLoss; W in PML's layout (D, C)."""
    V.check_centers(embeddings, labels, W, 1, name="W")
    V.check_positive("temperature", temperature)
    backend = resolve_backend(backend, embeddings.device)
    if backend == "reference":
        return normalized_softmax_reference(embeddings, labels, W, temperature=temperature)
    return margin_softmax_fused(embeddings, labels, W, kind="normalized_softmax", scale=1.0 / temperature,
                                margin=0.0, backend=backend)


@loss_function
def cosface_loss(embeddings, labels, W, *, margin=0.35, scale=64.0, backend="auto"):
    """PML CosFaceLoss; W in PML's layout (D, C)."""
    V.check_centers(embeddings, labels, W, 1, name="W")
    V.check_real("margin", margin)
    V.check_positive("scale", scale)
    backend = resolve_backend(backend, embeddings.device)
    if backend == "reference":
        return cosface_reference(embeddings, labels, W, margin=margin, scale=scale)
    return margin_softmax_fused(embeddings, labels, W, kind="cosface", scale=scale, margin=margin, backend=backend)


@loss_function
def arcface_loss(embeddings, labels, W, *, margin=28.6, scale=64.0, backend="auto"):
    """PML ArcFaceLoss; margin in degrees (as PML); W in PML's layout (D, C)."""
    V.check_centers(embeddings, labels, W, 1, name="W")
    V.check_real("margin", margin)
    V.check_positive("scale", scale)
    backend = resolve_backend(backend, embeddings.device)
    if backend == "reference":
        return arcface_reference(embeddings, labels, W, margin=margin, scale=scale)
    return margin_softmax_fused(embeddings, labels, W, kind="arcface", scale=scale, margin=math.radians(margin),
                                backend=backend)


@loss_function
def subcenter_arcface_loss(embeddings, labels, W, *, margin=28.6, scale=64.0, sub_centers=3, backend="auto"):
    """PML SubCenterArcFaceLoss; margin in degrees (as PML); W in PML's layout (D, C * sub_centers)."""
    V.check_centers(embeddings, labels, W, sub_centers, name="W", k_name="sub_centers")
    V.check_real("margin", margin)
    V.check_positive("scale", scale)
    backend = resolve_backend(backend, embeddings.device)
    if backend == "reference":
        return subcenter_arcface_reference(embeddings, labels, W, margin=margin, scale=scale, sub_centers=sub_centers)
    return margin_softmax_fused(embeddings, labels, W, kind="arcface", scale=scale, margin=math.radians(margin),
                                backend=backend, sub_centers=sub_centers)


class _MarginSoftmax(_ClassLoss):
    _param = "W"

    def _init_margin(self, num_classes, embedding_size, backend, kwargs, pml_kwargs):
        _check_sizes(num_classes=num_classes, embedding_size=embedding_size)
        self.num_classes, self.embedding_size = num_classes, embedding_size
        # PML's WeightRegularizerMixin default weight_init_func: normal_
        self._init_class((embedding_size, num_classes), backend, kwargs, (num_classes, embedding_size), pml_kwargs,
                         init=torch.nn.init.normal_)
        self.cross_entropy = torch.nn.CrossEntropyLoss(reduction="none")  # PML's attribute (no state)
        self._hold_pml_read()

    def _reference_with_weights(self, embeddings, labels, indices_tuple):
        return self._reference_fn(embeddings, labels, _like(self.W, embeddings), indices_tuple=indices_tuple,
                                  **self._hyper())

    def _call(self, embeddings, labels, W):
        return self._functional_fn(embeddings, labels, W, backend=self.backend, **self._hyper())

    def _cosines(self, embeddings):
        return normalize(embeddings) @ F.normalize(self.cast_weights(embeddings), dim=0)

    def extra_repr(self):
        hyper = ", ".join(f"{k}={v}" for k, v in self._hyper().items())
        return (f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, {hyper}, "
                f"backend={self.backend!r}")


class NormalizedSoftmaxLoss(_MarginSoftmax):
    """Drop-in for pytorch_metric_learning.losses.NormalizedSoftmaxLoss; parameter `W` (D, C).
    PML's default distance, DotProductSimilarity on normalized embeddings, is the cosine."""
    _cosine_only = False
    _reference_fn = staticmethod(normalized_softmax_reference)
    _functional_fn = staticmethod(normalized_softmax_loss)

    def __init__(self, num_classes, embedding_size, temperature=0.05, backend="auto", **kwargs):
        super().__init__()
        V.check_positive("temperature", temperature)
        self.temperature = temperature
        self._init_margin(num_classes, embedding_size, backend, kwargs, dict(temperature=temperature))

    def _hyper(self):
        return dict(temperature=self.temperature)

    def _distance_ref_rows(self):
        return self.distance.normalize(self.W, dim=0).t()  # PML's distance(embeddings, normalized_W.t())

    def _logits(self, embeddings):
        """PML's: cosines over the temperature (N x C)."""
        return self._cosines(embeddings) / self.temperature


class _ScaledMarginSoftmax(_MarginSoftmax):
    """CosFace and ArcFace: a margin on the target's cosine, then a scale."""

    def _init_margin_scale(self, num_classes, embedding_size, margin, scale, backend, kwargs):
        V.check_real("margin", margin)
        V.check_positive("scale", scale)
        self.margin, self.scale = margin, scale
        self._init_margin(num_classes, embedding_size, backend, kwargs, dict(margin=margin, scale=scale))

    def _hyper(self):
        return dict(margin=self.margin, scale=self.scale)

    def _logits(self, embeddings):
        """PML's: scaled cosines, without the margin (N x C)."""
        return self._cosines(embeddings) * self.scale


class CosFaceLoss(_ScaledMarginSoftmax):
    """Drop-in for pytorch_metric_learning.losses.CosFaceLoss; parameter `W` (D, C)."""
    _reference_fn = staticmethod(cosface_reference)
    _functional_fn = staticmethod(cosface_loss)

    def __init__(self, num_classes, embedding_size, margin=0.35, scale=64, backend="auto", **kwargs):
        super().__init__()
        self._init_margin_scale(num_classes, embedding_size, margin, scale, backend, kwargs)


class ArcFaceLoss(_ScaledMarginSoftmax):
    """Drop-in for pytorch_metric_learning.losses.ArcFaceLoss; parameter `W` (D, C). The argument
    `margin` is in degrees and the attribute in radians, as PML's (its init_margin: np.radians)."""
    _reference_fn = staticmethod(arcface_reference)
    _functional_fn = staticmethod(arcface_loss)

    def __init__(self, num_classes, embedding_size, margin=28.6, scale=64, backend="auto", **kwargs):
        super().__init__()
        self._init_margin_scale(num_classes, embedding_size, margin, scale, backend, kwargs)

    @property
    def margin(self):
        """PML's attribute: the additive angular margin in radians."""
        return self._margin_radians

    @margin.setter
    def margin(self, value):  # the constructor's degrees go through _init_margin_scale
        self._margin_radians, self._margin_degrees = value, math.degrees(value)

    def _init_margin_scale(self, num_classes, embedding_size, margin, scale, backend, kwargs):
        super()._init_margin_scale(num_classes, embedding_size, margin, scale, backend, kwargs)
        # math.radians: x * (pi / 180), the value of PML's np.radians
        self._margin_radians, self._margin_degrees = math.radians(margin), margin

    def _hyper(self):  # the functional form takes degrees, as PML's constructor
        return dict(margin=self._margin_degrees, scale=self.scale)


class SubCenterArcFaceLoss(ArcFaceLoss):
    """Drop-in for pytorch_metric_learning.losses.SubCenterArcFaceLoss; parameter `W` (D, C * K),
    class c's sub-centers the adjacent columns. PML takes num_classes and embedding_size as keywords
    only; they may also be given positionally here."""
    _reference_fn = staticmethod(subcenter_arcface_reference)
    _functional_fn = staticmethod(subcenter_arcface_loss)

    def __init__(self, num_classes, embedding_size, margin=28.6, scale=64, sub_centers=3, backend="auto", **kwargs):
        _LossBase.__init__(self)  # not ArcFaceLoss's: its parameter has K columns per class
        _check_sizes(num_classes=num_classes, embedding_size=embedding_size, sub_centers=sub_centers)
        V.check_real("margin", margin)
        V.check_positive("scale", scale)
        self.num_classes, self.embedding_size, self.sub_centers = num_classes, embedding_size, sub_centers
        self.scale = scale
        self._margin_radians, self._margin_degrees = math.radians(margin), margin
        self._init_class((embedding_size, num_classes * sub_centers), backend, kwargs, (),
                         dict(num_classes=num_classes, embedding_size=embedding_size, margin=margin, scale=scale,
                              sub_centers=sub_centers), init=torch.nn.init.normal_)
        self.cross_entropy = torch.nn.CrossEntropyLoss(reduction="none")  # PML's attribute (no state)
        self._hold_pml_read()

    def _hyper(self):
        return dict(super()._hyper(), sub_centers=self.sub_centers)

    def _cosines(self, embeddings):
        """PML's get_cosine: the max over each class's sub-centers (N x C)."""
        return super()._cosines(embeddings).view(-1, self.num_classes, self.sub_centers).max(dim=2).values

    def get_outliers(self, embeddings, labels, threshold=75, return_dominant_centers=True):
        """PML's get_outliers: per class present in labels, its dominant sub-center (the one most of
        the class's samples are closest to) and the samples farther than `threshold` degrees from
        it. Returns (outlier indices, dominant centers (D, C)); classes without samples keep
        uninitialized columns, as PML's."""
        if self._users_computation:  # PML's, on this module: it calls the user's overrides
            return self._pml_class().get_outliers(self, embeddings, labels, threshold, return_dominant_centers)
        if self._pml_only_assigned():  # a distance changed since (PML reads it at each call)
            self._fall_back_now()
        if self._pml is not None:
            with self._synced_pml() as pml:
                return pml.get_outliers(embeddings, labels, threshold, return_dominant_centers)
        W = self.cast_weights(embeddings)  # PML's cast_types first
        V.check_centers(embeddings, labels, W, self.sub_centers, name="W", k_name="sub_centers")
        cos_threshold = math.cos(math.radians(threshold))
        dominant = torch.empty(W.shape[0], self.num_classes, dtype=embeddings.dtype, device=embeddings.device)
        outliers = []
        with torch.no_grad():
            for label in range(self.num_classes):
                members = (labels == label).nonzero().flatten()
                if members.numel() == 0:
                    continue
                centers = W[:, label * self.sub_centers:(label + 1) * self.sub_centers]
                cosines = normalize(embeddings[members]) @ normalize(centers.t()).t()
                best = torch.bincount(cosines.argmax(dim=1)).argmax()
                dominant[:, label] = centers[:, best]
                outliers.extend(members[cosines[:, best] < cos_threshold].tolist())
        return torch.tensor(outliers, device=embeddings.device).flatten(), dominant


ENTRIES = (
    LossEntry(NormalizedSoftmaxLoss, "class", functional=normalized_softmax_loss,
              reference=normalized_softmax_reference, hyper=("temperature",), weight_layout="columns"),
    LossEntry(CosFaceLoss, "class", functional=cosface_loss, reference=cosface_reference, hyper=("margin", "scale"),
              weight_layout="columns"),
    LossEntry(ArcFaceLoss, "class", functional=arcface_loss, reference=arcface_reference, hyper=("margin", "scale"),
              weight_layout="columns"),
    LossEntry(SubCenterArcFaceLoss, "class", functional=subcenter_arcface_loss, reference=subcenter_arcface_reference,
              hyper=("margin", "scale", "sub_centers"), weight_layout="columns"),
)
