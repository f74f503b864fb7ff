"""SigLIP loss (Zhai et al., "Sigmoid Loss for Language Image Pre-Training", 2023): open_clip 3.3's
`SigLipLoss` (src/open_clip/loss.py), a drop-in.

With logits x_ij = t (q_i . r_j) + b (t = logit_scale, already exponentiated; b = logit_bias) and
z_ij = +1 for the matching pair, -1 otherwise, a block of B images against B texts costs
    block(q, r) = (1/B) sum_ij -log sigmoid(z_ij x_ij) = (1/B) sum_ij softplus(-z_ij x_ij)
and each rank's loss is its own block (positives on the diagonal) plus, for world_size > 1, its
images against every other rank's texts (negative_only: z = -1 everywhere), the texts exchanged as
open_clip's dist_impl does (bidir, shift, reduce, gather).

The fused path (`ops/image_text.siglip_rows`) sums softplus(-z x) per row over row chunks (the
positive's sign flipped in place, so its term is computed as accurately as open_clip's) and never
holds a B x B block; logit_scale's and logit_bias's gradients are reductions of its backward
(sum_ij G_ij q_i . r_j and sum_ij G_ij).
"""
from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

from ..ops.image_text import siglip_rows
from . import _image_text as IT

DIST_IMPLS = ("bidir", "shift", "reduce", "gather")


def siglip_reference(image_features, text_features, logit_scale, logit_bias, *, negative_only=False):
    """open_clip 3.3 SigLipLoss._loss, materializing the logits: logits = t * image @ text.T + b,
    labels = 2 I - 1 (or -1 everywhere with negative_only), -logsigmoid(labels * logits).sum() / B."""
    logits = logit_scale * image_features @ text_features.T
    if logit_bias is not None:
        logits = logits + logit_bias
    n = image_features.shape[0]
    labels = -torch.ones((n, n), device=image_features.device, dtype=image_features.dtype)
    if not negative_only:
        labels = 2 * torch.eye(n, device=image_features.device, dtype=image_features.dtype) + labels
    return -F.logsigmoid(labels * logits).sum() / n


def siglip_fused(image_features, text_features, logit_scale, logit_bias, *, negative_only=False):
    """The same block from the fused op (per-row sums of softplus(-z x), row chunks)."""
    rows = siglip_rows(image_features, text_features, logit_scale, logit_bias, None if negative_only else 0)
    return (rows.sum() / image_features.shape[0]).to(image_features.dtype)


def siglip_loss(image_features, text_features, logit_scale, logit_bias, *, rank=0, world_size=1, dist_impl=None,
                backend="auto"):
    """open_clip SigLipLoss(rank=rank, world_size=world_size, dist_impl=dist_impl)(image_features,
    text_features, logit_scale, logit_bias), fused. world_size > 1: an initialized
    torch.distributed process group of that size in which this process is `rank`."""
    IT.check_rank(rank, world_size)
    dist_impl = check_dist_impl(dist_impl)
    IT.check_features(image_features, text_features)
    scale = IT.check_scalar("logit_scale", logit_scale, image_features)
    if logit_bias is None:
        raise TypeError("logit_bias is required by SigLipLoss (a scalar tensor, e.g. the model's logit_bias)")
    bias = IT.check_scalar("logit_bias", logit_bias, image_features)
    backend = IT.resolve(backend, image_features.device)
    block = siglip_reference if backend == "reference" else siglip_fused
    loss = block(image_features, text_features, scale, bias)
    if world_size > 1:
        IT.check_process_group(rank, world_size)
        for other, weight in IT.siglip_other_blocks(text_features, rank=rank, world_size=world_size,
                                                    dist_impl=dist_impl):
            if weight:
                loss = loss + block(image_features, other, scale, bias, negative_only=True)
            else:  # open_clip's 0 * (own block): no value; keeps this rank in the block's backward collective
                loss = loss + other.sum() * 0
    return loss


def check_dist_impl(dist_impl):
    dist_impl = dist_impl or "bidir"  # open_clip's default
    if dist_impl not in DIST_IMPLS:
        raise ValueError(f"dist_impl must be None or one of {DIST_IMPLS}; got {dist_impl!r}")
    return dist_impl


class SigLipLoss(torch.nn.Module):
    """Drop-in for open_clip.loss.SigLipLoss (open_clip 3.3): the same constructor arguments and
    forward signature (logit_bias required); `backend` picks the computation ("reference":
    open_clip's materializing math). chunk_size (newer open_clip's chunked local loss, a memory
    setting) is accepted and has no effect: the fused path is always chunked. cache_labels has
    nothing to cache (no label tensor is built)."""

    def __init__(self, cache_labels=False, rank=0, world_size=1, dist_impl=None, chunk_size=0, backend="auto"):
        super().__init__()
        IT.check_rank(rank, world_size)
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 0:
            raise ValueError(f"chunk_size must be an int >= 0; got {chunk_size!r}")
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.dist_impl = check_dist_impl(dist_impl)
        self.chunk_size = chunk_size
        self.backend = backend

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        loss = siglip_loss(image_features, text_features, logit_scale, logit_bias, rank=self.rank,
                           world_size=self.world_size, dist_impl=self.dist_impl, backend=self.backend)
        return {"contrastive_loss": loss} if output_dict else loss

    def extra_repr(self):
        return f"rank={self.rank}, world_size={self.world_size}, dist_impl={self.dist_impl!r}, backend={self.backend!r}"
