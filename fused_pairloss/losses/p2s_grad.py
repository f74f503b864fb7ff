"""P2SGrad (Zhang et al., CVPR 2019; PML P2SGradLoss): the mean squared error between the cosines
and the one-hot targets, whose gradient is the paper's eq. 11.

With x^_i = x_i / |x_i| and the weight W (D, C) of unit columns (the module renormalizes them in
place before every call, as PML), cos_ic = x^_i . w_c and
    loss = 1/(N C) sum_{i,c} (cos_ic - [c == y_i])^2.

No N x C tensor and no class engine: the sum of squares is a quadratic form of the D x D Gram
matrix G = W W^T,
    sum_{i,c} cos_ic^2 = sum_i x^_i^T G x^_i,   sum_i cos_{i,y_i} = sum_i x^_i . w_{y_i},
    loss = (sum_i x^_i^T G x^_i - 2 sum_i x^_i . w_{y_i} + N) / (N C),
so the forward costs O(C D^2 + N D^2) instead of the N C D of the logits (and its backward the same
through autograd), in O(D^2 + (N + C) D) memory, on every device. PML clamps each cosine to
[-1, 1]; with unit columns only rounding takes a cosine past 1, where the cosine's own gradient is
0, so the identity's value and gradients equal PML's to rounding (docs/semantics.md).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _validation as V
from .._backends import resolve_backend
from ..ops._common import loss_function
from ..ops.operands import stat_dtype
from ._base import _ClassLoss, _check_sizes
from ._registry import LossEntry


def _unit_rows(embeddings):
    """PML's x / x.pow(2).sum(1).pow(0.5) (no eps: a zero row gives NaN, as PML)."""
    return embeddings / embeddings.pow(2).sum(1).pow(0.5).unsqueeze(1)


def check_unit_columns(weight):
    """PML asserts |w_c| = 1 to rtol 1e-5 (1e-2 in fp16) after its renormalization; bf16 (which
    PML's assertion refuses) gets fp16's."""
    if V._compiling() or weight.device.type == "meta" or weight.numel() == 0:
        return
    rtol = 1e-2 if weight.dtype in (torch.float16, torch.bfloat16) else 1e-5
    norms = weight.detach().pow(2).sum(0).pow(0.5)
    if not bool(torch.all(torch.abs(norms - 1.0) < rtol)):
        raise ValueError("weight must have unit-norm columns (P2SGradLoss renormalizes its weight before each "
                         "call; a column of norm below 1e-5 stays short, as in PML)")


def p2s_grad_reference(embeddings, labels, weight):
    """PML P2SGradLoss.compute_loss after its renormalization, step by step (N x C): the cosines
    x @ W / |x| clamped to [-1, 1], the one-hot targets, torch's MSE (mean over N x C)."""
    cos_theta = (embeddings.mm(weight.to(embeddings.dtype)) / embeddings.pow(2).sum(1).pow(0.5).view(-1, 1))
    cos_theta = cos_theta.clamp(-1, 1)
    with torch.no_grad():
        index = torch.zeros_like(cos_theta)
        index.scatter_(1, labels.view(-1, 1), 1)
    return F.mse_loss(cos_theta, index)


class _GramForm(torch.autograd.Function):
    """sum_i x^_i^T (W W^T) x^_i - 2 sum_i x^_i . w_{y_i} with a backward that writes W's gradient
    once, 2 g ((X^^T X^) W - M) with M_c = sum_{i: y_i = c} x^_i scattered into it in place
    (autograd's own would add three D x C tensors: the Gram product's two operands and the
    gather's scatter). In the operands' dtype (autocast off). With create_graph the backward
    recomputes its N x D products from the inputs, so second order goes through it."""

    @staticmethod
    def _products(x_hat, w, labels):
        return x_hat @ (w @ w.t()), w.index_select(1, labels).t()  # G x^_i, w_{y_i} (N x D each)

    @staticmethod
    def forward(ctx, x_hat, w, labels):
        with torch.autocast(x_hat.device.type, enabled=False):
            quadratic, target_columns = _GramForm._products(x_hat, w, labels)
            ctx.save_for_backward(x_hat, w, labels, quadratic, target_columns)
            return (quadratic * x_hat).sum() - 2 * (x_hat * target_columns).sum()

    @staticmethod
    def backward(ctx, grad):
        x_hat, w, labels, quadratic, target_columns = ctx.saved_tensors
        grad_x = grad_w = None
        with torch.autocast(x_hat.device.type, enabled=False):
            if torch.is_grad_enabled():  # create_graph: the products as functions of the inputs
                quadratic, target_columns = _GramForm._products(x_hat, w, labels)
            if ctx.needs_input_grad[0]:  # d/dx^_i: 2 G x^_i - 2 w_{y_i}
                grad_x = (2 * grad) * (quadratic - target_columns)
            if ctx.needs_input_grad[1]:
                grad_w = (x_hat.t() @ x_hat) @ w  # one D x C tensor, updated in place
                grad_w.index_add_(1, labels, x_hat.t(), alpha=-1).mul_(2 * grad)
        return grad_x, grad_w, None


def p2s_grad_fused(embeddings, labels, weight, *, backend=None):
    """The Gram-matrix form (module docstring); fp16 / bf16 compute in fp32."""
    A = stat_dtype(embeddings.dtype)
    x_hat, w = _unit_rows(embeddings.to(A)), weight.to(A)
    labels = labels.to(device=embeddings.device, dtype=torch.int64)
    n, num_classes = x_hat.shape[0], w.shape[1]
    return ((_GramForm.apply(x_hat, w, labels) + n) / (n * num_classes)).to(embeddings.dtype)


@loss_function
def p2s_grad_loss(embeddings, labels, weight, *, backend="auto"):
    """PML P2SGradLoss on a weight (D, C) with unit columns (P2SGradLoss renormalizes its own)."""
    V.check_centers(embeddings, labels, weight, 1, name="weight")
    check_unit_columns(weight)
    if resolve_backend(backend, embeddings.device) == "reference":
        return p2s_grad_reference(embeddings, labels, weight)
    return p2s_grad_fused(embeddings, labels, weight)


def _unit_columns_init(weight):
    """PML's P2SGrad initialization: uniform in [-1, 1], each column renormalized to norm 1."""
    weight.data.uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)


class P2SGradLoss(_ClassLoss):
    """Drop-in for pytorch_metric_learning.losses.P2SGradLoss; parameter `weight` (D, C), its columns
    renormalized to unit norm in place before every call (PML's renorm(2, 1, 1e-5) * 1e5)."""
    _size_name = "descriptors_dim"
    _param = "weight"
    _cosine_only = False
    _distances = ("cosine",)

    def __init__(self, descriptors_dim, num_classes, backend="auto", **kwargs):
        super().__init__()
        _check_sizes(descriptors_dim=descriptors_dim, num_classes=num_classes)
        self.descriptors_dim, self.num_classes = descriptors_dim, num_classes
        self._init_class((descriptors_dim, num_classes), backend, kwargs, (descriptors_dim, num_classes),
                         init=_unit_columns_init)
        self.m_loss = torch.nn.MSELoss()  # PML's attribute (no state)

    def cast_weights(self, embeddings):
        """PML's forward: the weight renormalized in place, then moved to the embeddings' dtype."""
        self.weight.data = self.weight.data.renorm(2, 1, 1e-5).mul(1e5)
        return super().cast_weights(embeddings)

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        if indices_tuple is not None and self._pml is None:  # PML's indices_tuple_not_supported
            raise ValueError("P2SGradLoss: indices_tuple is not supported (as in PML)")
        return super().forward(embeddings, labels, indices_tuple, ref_emb, ref_labels)

    def _distance_ref_rows(self):
        return None  # PML's P2SGradLoss does not call its distance

    def _call(self, embeddings, labels, weight):
        return p2s_grad_loss(embeddings, labels, weight, backend=self.backend)

    def _logits(self, embeddings):
        """The cosines x @ W / |x| clamped to [-1, 1] (N x C): what P2SGrad compares with the targets."""
        weight = self.cast_weights(embeddings)
        return (embeddings.mm(weight) / embeddings.pow(2).sum(1).pow(0.5).view(-1, 1)).clamp(-1, 1)

    def extra_repr(self):
        return f"descriptors_dim={self.descriptors_dim}, num_classes={self.num_classes}, backend={self.backend!r}"


ENTRIES = (
    LossEntry(P2SGradLoss, "class", functional=p2s_grad_loss, reference=p2s_grad_reference, weight_layout="columns",
              unit_weights=True),
)
