"""SigLIP loss (Zhai et al., "Sigmoid Loss for Language Image Pre-Training", 2023): open_clip 3.3's
`SigLipLoss` (src/open_clip/loss.py), a drop-in.

With logits x_ij = t (q_i . r_j) + b (t = logit_scale, already exponentiated; b = logit_bias) and
z_ij = +1 for the matching pair, -1 otherwise, a block of B images against B texts costs
    block(q, r) = (1/B) sum_ij -log sigmoid(z_ij x_ij) = (1/B) sum_ij softplus(-z_ij x_ij)
and each rank's loss is its own block (positives on the diagonal) plus, for world_size > 1, its
images against every other rank's texts (negative_only: z = -1 everywhere), the texts exchanged as
open_clip's dist_impl does (bidir, shift, reduce, gather).

The fused path is the class engine's (`declaration`; docs/design.md "Image-text losses"): the texts
are its classes, each row i's label its positive column, and the engine sums softplus(x_ij) over
the other columns in its tile walk (flag ROW_SOFTPLUS_SUM) and returns the positive's logit, whose
term softplus(-x) is added here. The logits come out of the engine's product whole: the rows are
[t q_i, b] and the columns [r_j, 1] (b as two columns, a bf16 part and the rest, so that TF32
products keep it), so x_ij = t (q_i . r_j) + b, and logit_scale's and logit_bias's gradients flow
through those two copies. Where "auto" finds no engine for the device,
the PyTorch row-chunk op `ops/image_text.siglip_rows` (the same sums over row chunks). Neither holds
a B x B block.
"""
from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

from .._backends import check_backend_name
from ..ops._common import loss_function
from ..ops.image_text import siglip_rows
from ..ops.operands import softplus, stat_dtype
from ..ops.spec import ClassLossSpec, PairTerm
from ..ops.stats import class_stats
from . import _image_text as IT

DIST_IMPLS = ("bidir", "shift", "reduce", "gather")
BF16_MAX = torch.finfo(torch.bfloat16).max


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


def declaration():
    """SigLIP on the class engine: per row the sum of softplus(x) over the columns other than the
    row's label (its positive), and the label column's logit (target_sim)."""
    return ClassLossSpec(row=PairTerm(scale=1.0, lse=True), row_reduction="softplus_sum")


# The engine's operands are D + 2 wide (the bias as two columns, below), zero-padded to a multiple
# of OPERAND_ALIGN: the CPU engine reads rows of that width in place (its rows are padded to 16
# floats or 8 doubles), so the operands are copied once, here.
OPERAND_ALIGN = 16


def operand_width(d):
    """Columns of the engine's operands for D-dimensional features: D, two bias columns, padding."""
    return -(-(d + 2) // OPERAND_ALIGN) * OPERAND_ALIGN


def _engine_rows(q, r, scale, bias, negative_only, backend):
    """sum_j softplus(-z_ij x_ij) per row from the class engine on `backend`: the engine's sum over
    the columns but the label's, plus the label column's term (its logit negated when it is the
    positive; with negative_only the label is an arbitrary column, i mod M, negative like the rest)."""
    n, m = q.shape[0], r.shape[0]
    if n == 0 or m == 0:
        return q.new_zeros(n)
    pad = operand_width(q.shape[1]) - q.shape[1] - 2
    # x_ij = [t q_i, b_hi, b_lo, 0...] . [r_j, 1, 1, 0...]: b split so that a product with TF32
    # operands (Triton, torch.backends.cuda.matmul.allow_tf32) keeps it: b_hi has bf16's 8
    # significant bits, b_lo = b - b_hi (exact) the rest; the gradient reaches b through b_lo
    # (b_hi clamped to bf16's range: a larger fp64 b would round to an infinite b_hi; b_lo holds the rest)
    b_hi = bias.detach().clamp(-BF16_MAX, BF16_MAX).to(torch.bfloat16).to(bias.dtype)
    b_lo = bias - b_hi
    bias_cols = torch.stack([b_hi, b_lo]).expand(n, 2)
    rows_q = torch.cat([scale * q, bias_cols, q.new_zeros(n, pad)], 1)
    cols_r = torch.cat([r, r.new_ones(m, 2), r.new_zeros(m, pad)], 1)
    labels = torch.arange(n, device=q.device) % m
    st = class_stats(rows_q, cols_r, labels, declaration(), backend)
    x_label = st.target_sim
    return st.lse_other + softplus(x_label if negative_only else -x_label)


@loss_function
def siglip_fused(image_features, text_features, logit_scale, logit_bias, *, negative_only=False, backend=IT.CHUNKED,
                 dtype=None):
    """The same block without the logits: per-row sums of softplus(-z x) from the class engine on
    `backend`, or from the PyTorch row-chunk op (IT.CHUNKED). fp16 / bf16 features enter as fp32 (one
    copy), so each feature's gradient is summed in fp32 and rounded once. The loss in `dtype`
    (default: the features')."""
    dtype = dtype or image_features.dtype
    if backend == IT.CHUNKED:
        rows = siglip_rows(image_features, text_features, logit_scale, logit_bias, None if negative_only else 0)
    else:
        A = stat_dtype(image_features.dtype)
        rows = _engine_rows(image_features.to(A), text_features.to(A), logit_scale.to(A), logit_bias.to(A),
                            negative_only, backend)
    return (rows.sum() / image_features.shape[0]).to(dtype)


@loss_function
def siglip_loss(image_features, text_features, logit_scale, logit_bias, *, rank=0, world_size=1, dist_impl=None,
                backend="auto"):
    """open_clip SigLipLoss(rank=rank, world_size=world_size, dist_impl=dist_impl)(image_features,
    text_features, logit_scale, logit_bias), fused. world_size > 1: an initialized
    torch.distributed process group of that size in which this process is `rank`."""
    IT.check_rank(rank, world_size)
    dist_impl = check_dist_impl(dist_impl)
    IT.check_features(image_features, text_features, world_size)
    scale = IT.check_scalar("logit_scale", logit_scale, image_features)
    # None: no bias (open_clip adds none); the fused path then adds an exact 0
    bias = IT.check_scalar("logit_bias", 0 if logit_bias is None else logit_bias, image_features)
    backend = IT.resolve(backend, image_features.device, engine=True)
    if IT.two_dtypes_under_autocast(image_features, text_features):
        backend = "reference"
    if image_features.shape[0] == 0:
        return IT.empty_batch_loss(image_features, text_features, scale, None if logit_bias is None else bias).to(
            IT.open_clip_dtype(siglip_reference, image_features, text_features, scale, bias))
    if backend == "reference":
        block = siglip_reference
    else:
        dtype = IT.open_clip_dtype(siglip_reference, image_features, text_features, scale, bias)

        def block(*args, **kwargs):
            return siglip_fused(*args, backend=backend, dtype=dtype, **kwargs)
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
    forward signature (logit_bias=None: no bias); `backend` picks the computation ("reference":
    open_clip's materializing math). chunk_size (newer open_clip's chunked local loss, a memory
    setting) is accepted and has no effect: the fused path is always chunked. The loss builds no
    label tensor; open_clip's `get_ground_truth`, `get_logits` and `_loss` are there for code that
    calls them (they build the B x B logits)."""

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
        self.backend = check_backend_name(backend)
        self.prev_num_logits = 0  # open_clip's attributes (its label cache, unused there too)
        self.labels = {}

    def get_ground_truth(self, device, dtype, num_logits, negative_only=False):
        """open_clip's: 2 I - 1 (the matching pairs +1, the others -1), or -1 everywhere."""
        labels = -torch.ones((num_logits, num_logits), device=device, dtype=dtype)
        if not negative_only:
            labels = 2 * torch.eye(num_logits, device=device, dtype=dtype) + labels
        return labels

    def get_logits(self, image_features, text_features, logit_scale, logit_bias=None):
        """open_clip's t * image @ text.T + b, materialized."""
        logits = logit_scale * image_features @ text_features.T
        return logits if logit_bias is None else logits + logit_bias

    def _loss(self, image_features, text_features, logit_scale, logit_bias=None, negative_only=False):
        """open_clip's one block (its own images against one rank's texts), fused."""
        scale = IT.check_scalar("logit_scale", logit_scale, image_features)
        bias = IT.check_scalar("logit_bias", 0 if logit_bias is None else logit_bias, image_features)
        backend = IT.resolve(self.backend, image_features.device, engine=True)
        if backend == "reference":
            return siglip_reference(image_features, text_features, scale, bias, negative_only=negative_only)
        return siglip_fused(image_features, text_features, scale, bias, negative_only=negative_only,
                            backend=backend,
                            dtype=IT.open_clip_dtype(siglip_reference, image_features, text_features, scale, bias))

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        loss = siglip_loss(image_features, text_features, logit_scale, logit_bias, rank=self.rank,
                           world_size=self.world_size, dist_impl=self.dist_impl, backend=self.backend)
        return {"contrastive_loss": loss} if output_dict else loss

    def extra_repr(self):
        return f"rank={self.rank}, world_size={self.world_size}, dist_impl={self.dist_impl!r}, backend={self.backend!r}"
