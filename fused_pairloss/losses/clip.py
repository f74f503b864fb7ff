"""CLIP loss (Radford et al., "Learning Transferable Visual Models From Natural Language Supervision",
2021): the symmetric InfoNCE of open_clip 3.3's `ClipLoss` (src/open_clip/loss.py), a drop-in.

With logits x_ij = t (q_i . r_j) (+ b) of image rows q and text rows r (t = logit_scale, already
exponentiated; b = logit_bias, which cancels in both softmaxes), row i's positive column p(i):
    loss = 1/2 [ mean_i (LSE_j x_ij - x_i,p(i)) + mean_j (LSE_i' y_ji' - y_j,p(j)) ]
the cross-entropy of the image rows against the texts and of the text rows against the images
(open_clip's `F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)`,
halved). On one process (or with local_loss=False: the gathered features of every rank) q and r
are the whole batch, p(i) = i, and the text direction is the column LSE of the same logits: one
walk gives both directions. With local_loss=True each rank's rows are its own images against every
rank's texts and its own texts against every rank's images, p(i) = rank * B + i: two row walks.

The walk is the class engine's (`declaration`; docs/design.md "Image-text losses"): the texts are
its classes and p(i) row i's label; where "auto" finds no engine for the device, the PyTorch
row-chunk op `ops/image_text.clip_lse`. Neither holds the B x B (or B x world*B) logits: one LSE
per row and per column is saved. logit_scale's gradient flows through the product t q.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._backends import check_backend_name
from ..ops._common import loss_function
from ..ops.image_text import clip_lse
from ..ops.operands import softplus, stat_dtype
from ..ops.spec import ClassLossSpec, PairTerm
from ..ops.stats import class_stats
from . import _image_text as IT


def clip_reference(image_features, text_features, logit_scale, logit_bias=None, *, all_image_features=None,
                   all_text_features=None, local_loss=False, rank=0):
    """open_clip 3.3 ClipLoss.forward after its gather (loss.py: get_logits, get_ground_truth,
    forward), materializing the logits. Without all_* (one process): logits_per_image =
    t * image @ text.T, logits_per_text = t * text @ image.T, labels = arange(B). With the gathered
    all_* (world_size > 1): local_loss=True: t * image @ all_text.T and t * text @ all_image.T,
    labels = arange(B) + rank * B; local_loss=False: t * all_image @ all_text.T and its transpose,
    labels = arange(world * B). logit_bias (if given) is added to both; loss = the mean of the two
    cross-entropies."""
    if all_image_features is None:
        logits_per_image = logit_scale * image_features @ text_features.T
        logits_per_text = logit_scale * text_features @ image_features.T
    elif local_loss:
        logits_per_image = logit_scale * image_features @ all_text_features.T
        logits_per_text = logit_scale * text_features @ all_image_features.T
    else:
        logits_per_image = logit_scale * all_image_features @ all_text_features.T
        logits_per_text = logits_per_image.T
    if logit_bias is not None:
        logits_per_image = logits_per_image + logit_bias
        logits_per_text = logits_per_text + logit_bias
    n = logits_per_image.shape[0]
    labels = torch.arange(n, device=image_features.device)
    if all_image_features is not None and local_loss:
        labels = labels + n * rank
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def _positive_logits(q, r, scale, offset):
    """t (q_i . r_{i + offset}) in the stat dtype (differentiable)."""
    A = stat_dtype(q.dtype)
    return scale.to(A) * (q.to(A) * r[offset:offset + q.shape[0]].to(A)).sum(1)


def _chunked_losses(q, r, scale, offset, cols, backend=None):
    """The rows' (and the columns', or None) cross-entropies LSE_j x_ij - x_i,i+offset of x = t q r^T
    as softplus(LSE over the others - x_pos), as _engine_losses: the LSEs over the others from the
    PyTorch row-chunk op, the positives from the two rows."""
    row, col = clip_lse(q, r, scale, cols, offset)
    return _cross_entropies(row, col if cols else None, _positive_logits(q, r, scale, offset))


def _cross_entropies(row_lse_other, col_lse_other, pos):
    """softplus(LSE over the others - x_pos) of the rows (and the columns, or None): a row whose
    positive dominates keeps its digits (logaddexp(lse, x_pos) - x_pos cancels to x_pos's rounding)."""
    # open_clip's LSE - x_pos and its gradients are NaN at an infinite logit (B = 1, t = inf): an exact
    # 0 (and a gradient of exactly 0) elsewhere. Not pos - pos: its +g and -g into pos would cancel
    # (g - sigma g) - g to the rounding of g, where sigma g is a small loss's gradient
    nan_if_infinite = pos * (pos - pos).detach()
    return (softplus(row_lse_other - pos) + nan_if_infinite,
            None if col_lse_other is None else softplus(col_lse_other - pos) + nan_if_infinite)


# The class engine's declaration of CLIP (docs/design.md "Image-text losses"): the texts are the
# classes (K = 1, rows layout, not normalized), row i's label its positive column i + offset, the
# rows t q_i. The engine's row LSE skips the label's column and gives that logit as target_sim;
# its column LSE over the rows of other labels is the column's LSE without its positive row, which
# is the positive of that column when N = M and offset = 0 (the only case with columns).
def declaration(columns=True):
    """The row LSE of the logits (and the column LSE over the rows of other labels)."""
    logit = PairTerm(scale=1.0, lse=True)
    return ClassLossSpec(row=logit, col_neg=logit if columns else None)


def _engine_losses(q, r, scale, offset, cols, backend):
    """The same from the class engine on `backend` (both directions from the same tiles: one walk on
    the CPU, a row and a column pass on GPUs)."""
    n = q.shape[0]
    if cols and (offset != 0 or r.shape[0] != n):
        raise ValueError("clip: column LSEs need the square block (offset 0)")
    labels = torch.arange(offset, offset + n, device=q.device)
    st = class_stats(scale.to(q.dtype) * q, r, labels, declaration(cols), backend)
    return _cross_entropies(st.lse_other, st.col_lse_neg if cols else None, st.target_sim)


@loss_function
def clip_fused(image_features, text_features, logit_scale, logit_bias=None, *, backend=IT.CHUNKED,
               all_image_features=None, all_text_features=None, local_loss=False, rank=0, dtype=None):
    """The same loss without the logits: row (and column) LSEs from the class engine on `backend`,
    or from the PyTorch row-chunk op (IT.CHUNKED). fp16 / bf16 features enter as fp32 (one copy), so
    each feature's gradient is summed in fp32 and rounded once. The loss in `dtype` (default: the
    features')."""
    dtype = dtype or image_features.dtype
    A = stat_dtype(image_features.dtype)
    image_features, text_features = image_features.to(A), text_features.to(A)
    if all_image_features is not None:
        all_image_features, all_text_features = all_image_features.to(A), all_text_features.to(A)
    losses = _chunked_losses if backend == IT.CHUNKED else _engine_losses
    if all_image_features is not None and local_loss:
        off = rank * image_features.shape[0]
        per_image, _ = losses(image_features, all_text_features, logit_scale, off, False, backend)
        per_text, _ = losses(text_features, all_image_features, logit_scale, off, False, backend)
        loss = (per_image.mean() + per_text.mean()) / 2
    else:
        q = image_features if all_image_features is None else all_image_features
        r = text_features if all_text_features is None else all_text_features
        per_image, per_text = losses(q, r, logit_scale, 0, True, backend)
        loss = (per_image.mean() + per_text.mean()) / 2
    loss = loss.to(dtype)
    if logit_bias is not None:
        loss = _with_cancelled_bias(loss, logit_bias.to(loss.dtype))
    return loss


def _with_cancelled_bias(loss, bias):
    """b cancels in both softmaxes: the value and every gradient are b's, but open_clip's logits
    carry it, so a non-finite b makes the loss and every gradient NaN, and a NaN loss makes b's
    gradient NaN. Elsewhere exactly the loss, and b's gradient 0."""
    bias_nan = (bias - bias).detach()  # 0, or NaN where b is not finite
    loss_nan = torch.where(torch.isnan(loss), loss, torch.zeros_like(loss)).detach()
    return loss * (1 + bias_nan) + bias * (loss_nan + bias_nan)


@loss_function
def clip_loss(image_features, text_features, logit_scale, logit_bias=None, *, local_loss=False,
              gather_with_grad=False, rank=0, world_size=1, backend="auto"):
    """open_clip ClipLoss(local_loss, gather_with_grad, rank=rank, world_size=world_size)(image_features,
    text_features, logit_scale, logit_bias), fused. world_size > 1: an initialized
    torch.distributed process group of that size in which this process is `rank`; every rank's
    image_features / text_features have the same shape."""
    IT.check_rank(rank, world_size)
    IT.check_features(image_features, text_features, world_size)
    scale = IT.check_scalar("logit_scale", logit_scale, image_features)
    bias = None if logit_bias is None else IT.check_scalar("logit_bias", logit_bias, image_features)
    backend = IT.resolve(backend, image_features.device, engine=True)
    if IT.two_dtypes_under_autocast(image_features, text_features):
        backend = "reference"
    if image_features.shape[0] == 0:
        return IT.empty_batch_loss(image_features, text_features, scale, bias).to(
            IT.open_clip_dtype(clip_reference, image_features, text_features, scale, bias))
    gathered = {}
    if world_size > 1:
        IT.check_process_group(rank, world_size)
        all_image, all_text = IT.gather_features(image_features, text_features, local_loss=local_loss,
                                                 gather_with_grad=gather_with_grad, rank=rank, world_size=world_size)
        gathered = dict(all_image_features=all_image, all_text_features=all_text, local_loss=local_loss, rank=rank)
    if backend == "reference":
        return clip_reference(image_features, text_features, scale, bias, **gathered)
    dtype = IT.open_clip_dtype(clip_reference, image_features, text_features, scale, bias)
    return clip_fused(image_features, text_features, scale, bias, backend=backend, dtype=dtype, **gathered)


class ClipLoss(torch.nn.Module):
    """Drop-in for open_clip.loss.ClipLoss (open_clip 3.3): the same constructor arguments and
    forward signature; `backend` picks the computation ("reference": open_clip's materializing
    math). The loss builds no label tensor; open_clip's `get_logits` and `get_ground_truth` (and the
    label cache they keep) are there for code that calls them, as open_clip's subclasses do: they
    build the B x B logits. use_horovod=True is not supported across processes (a ValueError with
    world_size > 1; one process never exchanges, as in open_clip)."""

    def __init__(self, local_loss=False, gather_with_grad=False, cache_labels=False, rank=0, world_size=1,
                 use_horovod=False, backend="auto"):
        super().__init__()
        IT.check_rank(rank, world_size)
        if use_horovod and world_size > 1:
            raise ValueError("use_horovod=True is not supported by fused_pairloss.ClipLoss (torch.distributed only)")
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = use_horovod
        self.backend = check_backend_name(backend)
        self.prev_num_logits = 0  # open_clip's label cache (get_ground_truth)
        self.labels = {}

    def get_ground_truth(self, device, num_logits):
        """open_clip's: arange(num_logits), offset by num_logits * rank with local_loss across ranks."""
        if self.prev_num_logits == num_logits and device in self.labels:
            return self.labels[device]
        labels = torch.arange(num_logits, device=device, dtype=torch.long)
        if self.world_size > 1 and self.local_loss:
            labels = labels + num_logits * self.rank
        if self.cache_labels:
            self.labels[device] = labels
            self.prev_num_logits = num_logits
        return labels

    def get_logits(self, image_features, text_features, logit_scale, logit_bias=None):
        """open_clip's (logits_per_image, logits_per_text), materialized; the features gathered from
        the ranks as forward gathers them."""
        if self.world_size > 1:
            all_image, all_text = IT.gather_features(image_features, text_features, local_loss=self.local_loss,
                                                     gather_with_grad=self.gather_with_grad, rank=self.rank,
                                                     world_size=self.world_size)
            if self.local_loss:
                per_image = logit_scale * image_features @ all_text.T
                per_text = logit_scale * text_features @ all_image.T
            else:
                per_image = logit_scale * all_image @ all_text.T
                per_text = per_image.T
        else:
            per_image = logit_scale * image_features @ text_features.T
            per_text = logit_scale * text_features @ image_features.T
        if logit_bias is not None:
            per_image, per_text = per_image + logit_bias, per_text + logit_bias
        return per_image, per_text

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        loss = clip_loss(image_features, text_features, logit_scale, logit_bias, local_loss=self.local_loss,
                         gather_with_grad=self.gather_with_grad, rank=self.rank, world_size=self.world_size,
                         backend=self.backend)
        return {"contrastive_loss": loss} if output_dict else loss

    def extra_repr(self):
        return (f"local_loss={self.local_loss}, gather_with_grad={self.gather_with_grad}, rank={self.rank}, "
                f"world_size={self.world_size}, backend={self.backend!r}")
