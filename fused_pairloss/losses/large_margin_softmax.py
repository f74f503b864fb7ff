"""Large-margin softmax (Liu et al., ICML 2016; PML LargeMarginSoftmaxLoss) and SphereFace (Liu et
al., CVPR 2017; PML SphereFaceLoss) on the class engine.

W is PML's (D, C). With cos_ic the cosine of x_i and w_c, theta_i = acos(clamp(cos_{i,y_i}, -1, 1))
and the integer margin m, the target's cosine becomes (paper eq. 6, 7)
    psi_i = (-1)^k cos(m theta_i) - 2 k,   k = floor(theta_i m / pi) (detached, as PML),
    cos(m theta) = sum_{n <= m/2} (-1)^n binom(m, 2n) cos^(m-2n) (1 - cos^2)^n.
Logits: LargeMargin z_ic = scale |x_i| |w_c| cos_ic, SphereFace z_ic = scale |x_i| cos_ic; the
target's with cos + (psi - cos) in place of cos (PML's). L_i = w_i (LSE_c z_ic - z_{i,y_i}) with
PML's miner weights w_i; loss = mean over rows.

Declaration: for c != y_i, |x_i| |w_c| cos_ic = x_i . w_c, so the engine takes the raw embeddings
against W's raw columns (SphereFace: normalized columns, x_i . w_c / |w_c|) with scale, reduced by
LSE over the non-target classes. The target logit is formed here from the engine's target dot
product (its gradient flows back through the engine) and the norms, with PML's operations on the
cosine, so its gradient at the clamp and the branches is PML's.
"""
from __future__ import annotations

import functools
import math
import numbers

import torch
import torch.nn.functional as F

from .. import _validation as V
from .._backends import resolve_backend
from ..ops._common import loss_function, normalize
from ..ops.operands import softplus, stat_dtype
from ..ops.spec import ClassLossSpec, PairTerm
from ..ops.stats import class_stats
from ._base import _ClassLoss, _check_sizes, _has_short_row, _like, run_class_loss
from ._reference_common import miner_weights
from ._registry import LossEntry

NORMALIZE_EPS = 1e-12  # F.normalize's, which PML's CosineSimilarity applies


def check_margin(margin):
    """PML stores int(margin); the expansion needs m >= 1 (PML divides pi by it)."""
    if isinstance(margin, bool) or not isinstance(margin, (numbers.Real, torch.Tensor)):
        raise TypeError(f"margin must be a number (PML takes int(margin)); got {type(margin).__name__}")
    if not math.isfinite(float(margin)):
        raise ValueError(f"margin must be finite; got {margin!r}")
    if int(margin) < 1:
        raise ValueError(f"margin must be >= 1 (the integer multiple of the target's angle); got {margin!r}")
    return int(margin)


def cos_of_multiple_angle(cosine, margin):
    """cos(m theta) from cos(theta), PML's get_cos_with_margin: the terms of eq. 7 as tensors of
    the input's dtype (binomials from math.comb: exact integers)."""
    n = torch.arange(margin // 2 + 1, device=cosine.device).to(cosine.dtype)
    binomials = torch.tensor([math.comb(margin, 2 * int(k)) for k in range(margin // 2 + 1)],
                             device=cosine.device).to(cosine.dtype)
    alternating = torch.tensor([(-1) ** k for k in range(margin // 2 + 1)], device=cosine.device).to(cosine.dtype)
    c = cosine.unsqueeze(1)
    terms = alternating * binomials * c ** (margin - 2 * n) * (1 - c ** 2) ** n
    return terms.sum(1)


def target_cosine(cosine, margin):
    """psi(theta) of the target's cosine (PML's modify_cosine_of_target_classes), then PML's
    cos + (psi - cos)."""
    with_margin = cos_of_multiple_angle(cosine, margin)
    angles = torch.acos(torch.clamp(cosine, -1, 1))
    with torch.no_grad():
        k = (angles / (math.pi / margin)).floor()
    psi = ((-1) ** k) * with_margin - 2 * k
    return cosine + (psi - cosine)


def _reference(embeddings, labels, W, *, margin, scale, sphereface, indices_tuple):
    """PML LargeMarginSoftmaxLoss.compute_loss / SphereFaceLoss step by step (N x C)."""
    margin = check_margin(margin)
    dtype = embeddings.dtype
    W = W.to(dtype)
    N, C = labels.shape[0], W.shape[1]
    mask = torch.zeros(N, C, dtype=dtype, device=embeddings.device)
    mask[torch.arange(N, device=embeddings.device), labels] = 1
    cosine = normalize(embeddings) @ normalize(W.t()).t()  # CosineSimilarity(embeddings, W^T)
    cosine_of_target = cosine[mask == 1]
    diff = (target_cosine(cosine_of_target, margin) - cosine_of_target).unsqueeze(1)
    logits = cosine + mask * diff
    magnitudes = torch.norm(embeddings, p=2, dim=1).unsqueeze(1)
    if not sphereface:
        magnitudes = torch.norm(W, p=2, dim=0).unsqueeze(0) * magnitudes
    losses = F.cross_entropy(logits * magnitudes * scale, labels, reduction="none")
    return torch.mean(losses * miner_weights(indices_tuple, labels, dtype))


def large_margin_softmax_reference(embeddings, labels, W, *, margin=4, scale=1.0, indices_tuple=None):
    """PML LargeMarginSoftmaxLoss (large_margin_softmax_loss.py; MeanReducer; W (D, C)):
        L_i = w_i (LSE_c z_ic - z_{i,y_i}),  z_ic = scale |x_i| |w_c| cos_ic,
    the target's cosine replaced by cos + (psi(theta) - cos) (module docstring); loss = mean_i L_i."""
    return _reference(embeddings, labels, W, margin=margin, scale=scale, sphereface=False,
                      indices_tuple=indices_tuple)


def sphereface_reference(embeddings, labels, W, *, margin=4, scale=1.0, indices_tuple=None):
    """PML SphereFaceLoss (sphereface_loss.py: LargeMarginSoftmaxLoss with z_ic = scale |x_i| cos_ic)."""
    return _reference(embeddings, labels, W, margin=margin, scale=scale, sphereface=True,
                      indices_tuple=indices_tuple)


def declaration(scale, sphereface):
    return ClassLossSpec(row=PairTerm(scale=scale, lse=True), normalize_weights=sphereface, weights_layout="columns")


def target_logit(target_dot, x_norm, target_norm, *, margin, scale):
    """z_{i,y_i} = scale |x_i| |w_{y_i}| psi(cos) from the engine's target dot product x_i . w_{y_i}
    (SphereFace: against the normalized column, target_norm 1) and the norms; the cosine's norms
    at least 1e-12, as PML's F.normalize (a zero row: cosine 0, logit 0)."""
    magnitude = x_norm * target_norm
    cosine = target_dot / (x_norm.clamp_min(NORMALIZE_EPS) * torch.as_tensor(target_norm).clamp_min(NORMALIZE_EPS))
    return target_cosine(cosine, margin) * magnitude * scale


class _WithTargetColumns(torch.autograd.Function):
    """(W, its columns w_{y_i} as N x D rows): the second output's gradient is scattered into the
    first's in place, so W's gradient is one D x C tensor (the engine's), not a second one from
    the gather (at C = 1M, D = 128 that is 488 MiB)."""

    @staticmethod
    def forward(ctx, W, labels):
        ctx.save_for_backward(labels)
        ctx.weight_shape = W.shape
        return W.view_as(W), W.index_select(1, labels).t()

    @staticmethod
    def backward(ctx, grad_W, grad_columns):
        (labels,) = ctx.saved_tensors
        if grad_columns is None:
            return grad_W, None
        if grad_W is None:
            grad_W = grad_columns.new_zeros(ctx.weight_shape)
        return grad_W.index_add_(1, labels, grad_columns.t()), None


@loss_function
def large_margin_fused(embeddings, labels, W, *, margin, scale, sphereface, backend, row_weights=None):
    margin = check_margin(margin)
    labels = labels.to(device=embeddings.device, dtype=torch.int64)
    if sphereface:
        st = class_stats(embeddings, W, labels, declaration(scale, True), backend)
        target_norm = 1.0
    else:
        W, target_columns = _WithTargetColumns.apply(W, labels)
        st = class_stats(embeddings, W, labels, declaration(scale, False), backend)
        target_norm = torch.linalg.vector_norm(target_columns.to(st.target_sim.dtype), dim=1)
    x_norm = torch.linalg.vector_norm(embeddings.to(st.target_sim.dtype), dim=1)
    z = target_logit(st.target_sim, x_norm, target_norm, margin=margin, scale=scale)
    rows = softplus(st.lse_other - z)  # logaddexp(lse, z) - z, its digits kept (margin_softmax.py)
    if row_weights is not None:
        rows = rows * row_weights
    return rows.mean().to(embeddings.dtype)


def _run(embeddings, labels, W, *, margin, scale, backend, sphereface):
    V.check_centers(embeddings, labels, W, 1, name="W")
    check_margin(margin)
    V.check_positive("scale", scale)
    reference_fn = sphereface_reference if sphereface else large_margin_softmax_reference
    resolve_backend(backend, embeddings.device)  # a bad backend is an error with short rows too
    if _has_short_row_outside_compile(embeddings):
        backend = "reference"
    return run_class_loss(reference_fn, functools.partial(large_margin_fused, sphereface=sphereface), embeddings,
                          labels, W, backend, margin=margin, scale=scale)


def _has_short_row_outside_compile(embeddings):
    """A row of norm <= 1e-12 (or overflowing): PML's cosine is that of F.normalize's row, which is
    no unit row, and the engine's target cosine x . w / (|x| |w|) is not it; such a batch is the
    reference's (N x C: a degenerate input). While torch.compile traces, no sync to look."""
    return not V._compiling() and _has_short_row(embeddings)


@loss_function
def large_margin_softmax_loss(embeddings, labels, W, *, margin=4, scale=1.0, backend="auto"):
    """PML LargeMarginSoftmaxLoss; W in PML's layout (D, C); margin an integer >= 1."""
    return _run(embeddings, labels, W, margin=margin, scale=scale, backend=backend, sphereface=False)


@loss_function
def sphereface_loss(embeddings, labels, W, *, margin=4, scale=1.0, backend="auto"):
    """PML SphereFaceLoss; W in PML's layout (D, C); margin an integer >= 1."""
    return _run(embeddings, labels, W, margin=margin, scale=scale, backend=backend, sphereface=True)


class LargeMarginSoftmaxLoss(_ClassLoss):
    """Drop-in for pytorch_metric_learning.losses.LargeMarginSoftmaxLoss; parameter `W` (D, C).
    `margin` is stored as int(margin), as PML."""
    _param = "W"
    _sphereface = False
    _reference_fn = staticmethod(large_margin_softmax_reference)

    def __init__(self, num_classes, embedding_size, margin=4, scale=1, backend="auto", **kwargs):
        super().__init__()
        _check_sizes(num_classes=num_classes, embedding_size=embedding_size)
        self.margin = check_margin(margin)
        V.check_positive("scale", scale)
        self.num_classes, self.embedding_size, self.scale = num_classes, embedding_size, scale
        self._init_class((embedding_size, num_classes), backend, kwargs, (num_classes, embedding_size),
                         dict(margin=margin, scale=scale), init=torch.nn.init.normal_)
        self.cross_entropy = torch.nn.CrossEntropyLoss(reduction="none")  # PML's attribute (no state)
        self._hold_pml_read()
        self.init_margin()

    def init_margin(self):
        """PML's attributes for eq. 7 (plain tensors, not buffers: PML keeps them out of the
        state_dict): n = 0..m//2, binom(m, 2n), the powers m - 2n of the cosine, (-1)^n. The loss
        itself reads only `margin` (cos_of_multiple_angle)."""
        self.margin = check_margin(self.margin)
        self.max_n = self.margin // 2
        self.n_range = torch.arange(self.max_n + 1)
        self.margin_choose_n = torch.tensor([float(math.comb(self.margin, 2 * n)) for n in range(self.max_n + 1)],
                                            dtype=torch.float64)
        self.cos_powers = self.margin - 2 * self.n_range
        self.alternating = 1 - 2 * (self.n_range % 2)

    def _hyper(self):
        return dict(margin=self.margin, scale=self.scale)

    def _call(self, embeddings, labels, W):
        fn = sphereface_loss if self._sphereface else large_margin_softmax_loss
        return fn(embeddings, labels, W, backend=self.backend, **self._hyper())

    def _fused_with_weights(self, embeddings, labels, indices_tuple, W):
        """PML's miner weights (O(#indices)) on the fused rows."""
        backend = resolve_backend(self.backend, embeddings.device)
        if backend == "reference" or _has_short_row_outside_compile(embeddings):
            return None
        V.check_centers(embeddings, labels, W, 1, name="W")
        labels = torch.as_tensor(labels, device=embeddings.device)
        weights = miner_weights(indices_tuple, labels, stat_dtype(embeddings.dtype))
        return large_margin_fused(embeddings, labels, W, sphereface=self._sphereface, backend=backend,
                                  row_weights=weights, **self._hyper())

    def _reference_with_weights(self, embeddings, labels, indices_tuple):
        return self._reference_fn(embeddings, labels, _like(self.W, embeddings), indices_tuple=indices_tuple,
                                  **self._hyper())

    def _logits(self, embeddings):
        """PML's get_logits: the scaled cosines without the margin (N x C)."""
        W = self.cast_weights(embeddings)
        magnitudes = torch.norm(embeddings, p=2, dim=1).unsqueeze(1)
        if not self._sphereface:
            magnitudes = torch.norm(W, p=2, dim=0).unsqueeze(0) * magnitudes
        return normalize(embeddings) @ F.normalize(W, dim=0) * magnitudes * self.scale

    def extra_repr(self):
        return (f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, margin={self.margin}, "
                f"scale={self.scale}, backend={self.backend!r}")


class SphereFaceLoss(LargeMarginSoftmaxLoss):
    """Drop-in for pytorch_metric_learning.losses.SphereFaceLoss; parameter `W` (D, C)."""
    _sphereface = True
    _reference_fn = staticmethod(sphereface_reference)


ENTRIES = (
    LossEntry(LargeMarginSoftmaxLoss, "class", functional=large_margin_softmax_loss,
              reference=large_margin_softmax_reference, hyper=("margin", "scale"), weight_layout="columns"),
    LossEntry(SphereFaceLoss, "class", functional=sphereface_loss, reference=sphereface_reference,
              hyper=("margin", "scale"), weight_layout="columns"),
)
