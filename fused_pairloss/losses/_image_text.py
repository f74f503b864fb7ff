"""What ClipLoss and SigLipLoss (open_clip's image-text losses) share: their argument checks and the
feature exchanges across ranks, with open_clip 3.3's autograd semantics (loss.py: gather_features,
neighbour_exchange*, torch.distributed.nn.all_gather / all_reduce). Only features travel between
ranks, never logits."""
from __future__ import annotations

import importlib.util
import numbers
import os
import sys

import torch
import torch.distributed as dist

from .._backends import resolve_backend
from ..ops.operands import autocast_enabled


# ---- the reference ---------------------------------------------------------------------------------
def open_clip_loss_module():
    """open_clip's src/open_clip/loss.py as a module (it needs only torch; the package's __init__
    imports torchvision and timm), from an installed open_clip or where `make deps` puts it
    (pip install --no-deps --target <venv>/no-deps); None if neither has it."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        init = os.path.join(sys.prefix, "no-deps", "open_clip", "__init__.py")
        if not os.path.exists(init):
            return None
        folder = os.path.dirname(init)
    else:
        folder = list(spec.submodule_search_locations)[0]
    loss_spec = importlib.util.spec_from_file_location("open_clip_loss", os.path.join(folder, "loss.py"))
    module = importlib.util.module_from_spec(loss_spec)
    loss_spec.loader.exec_module(module)
    return module


# ---- argument checks -----------------------------------------------------------------------------
CHUNKED = "chunked"  # the PyTorch row-chunk ops of ops/image_text.py


def resolve(backend, device, *, engine=False):
    """The computation a backend names: "reference" (open_clip's materializing math), a compiled
    engine backend ("cpu", "cuda", "triton"; only where the loss has an engine path: `engine`), or
    CHUNKED, the PyTorch row-chunk ops, which run on every device with or without the compiled
    extension. "auto": the fastest engine backend of the device, else CHUNKED. A named backend is
    validated as for every loss."""
    if backend == "auto":
        name = resolve_backend("auto", device) if engine else "reference"
        return CHUNKED if name == "reference" else name
    name = resolve_backend(backend, device)
    return name if name == "reference" or engine else CHUNKED


def check_rank(rank, world_size):
    for name, v in (("rank", rank), ("world_size", world_size)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{name} must be an int; got {type(v).__name__}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1; got {world_size}")
    # one process: open_clip never reads rank (nor use_horovod) there
    if world_size > 1 and not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size) = [0, {world_size}); got {rank}")


def check_process_group(rank, world_size):
    """world_size > 1: a process group of that size in which this process has that rank."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"world_size={world_size} needs an initialized torch.distributed process group")
    actual_world, actual_rank = dist.get_world_size(), dist.get_rank()
    if actual_world != world_size:
        raise ValueError(f"world_size={world_size} but the process group has {actual_world} ranks")
    if actual_rank != rank:
        raise ValueError(f"rank={rank} but this process is rank {actual_rank} of the process group")


def two_dtypes_under_autocast(image_features, text_features):
    """Features of two dtypes (check_features allows them under autocast only): open_clip's steps
    compute them (its product casts both to autocast's dtype after scaling one, its labels take the
    image features' dtype), the reference backend."""
    return image_features.dtype != text_features.dtype


def check_features(image_features, text_features, world_size=1):
    for name, x in (("image_features", image_features), ("text_features", text_features)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor; got {x.dtype}")
        if x.dim() != 2:
            raise ValueError(f"{name} must be 2-D (batch, dim); got shape {tuple(x.shape)}")
    if image_features.dtype != text_features.dtype and not autocast_enabled(image_features.device.type):
        # (under autocast open_clip's product casts both: two_dtypes_under_autocast)
        raise TypeError(f"text_features must have image_features' dtype {image_features.dtype}; "
                        f"got {text_features.dtype}")
    if image_features.shape != text_features.shape:
        raise ValueError(f"text_features must have image_features' shape {tuple(image_features.shape)} (one "
                         f"caption per image); got {tuple(text_features.shape)}")
    if image_features.device != text_features.device:
        raise ValueError(f"text_features must be on image_features' device {image_features.device}; got "
                         f"{text_features.device}")
    if world_size > 1 and image_features.shape[0] < 1:
        raise ValueError("image_features must have at least one row on every rank")


def check_scalar(name, value, features):
    """logit_scale / logit_bias: a tensor of one element (0-dim, or [1] as some checkpoints store
    it) or a real number; returned as a 0-dim tensor on the features' device."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar (a tensor of one element); got shape {tuple(value.shape)}")
        if value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{name} must be a real-valued tensor; got {value.dtype}")
        if value.device != features.device:
            raise ValueError(f"{name} must be on the features' device {features.device}; got {value.device}")
        if not value.is_floating_point():  # an integer tensor (no gradient): a number, as open_clip's product has it
            return value.reshape(()).to(_number_dtype(features))
        return value.reshape(())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a scalar tensor or a real number; got {type(value).__name__}")
    return torch.tensor(float(value), dtype=_number_dtype(features), device=features.device)


def _number_dtype(features):
    """A number's dtype: the statistics dtype (fp32 for fp16 / bf16 features: not rounded to theirs)."""
    return torch.float64 if features.dtype == torch.float64 else torch.float32


_AUTOCAST_DTYPES = {}  # (reference, device type, autocast dtype, operand dtypes) -> open_clip's loss dtype


def open_clip_dtype(reference, image_features, text_features, scale, bias):
    """The dtype of open_clip's loss for these operands: the features' without autocast; under
    torch.autocast, what open_clip's math (`reference`: its products run in the autocast dtype, its
    cross-entropy or logsigmoid as autocast decides for the device and torch version) returns on two
    rows of the same dtypes, asked once per combination."""
    device = image_features.device.type
    if not autocast_enabled(device):  # (False on the meta device, which autocast does not know)
        return image_features.dtype
    key = (reference, device, torch.get_autocast_dtype(device), image_features.dtype, text_features.dtype,
           scale.dtype, scale.dim(), None if bias is None else (bias.dtype, bias.dim()))
    dtype = _AUTOCAST_DTYPES.get(key)
    if dtype is None:
        def rows(x):
            return torch.ones((2, 1), dtype=x.dtype, device=x.device)

        def number(x):
            return None if x is None else torch.ones(x.shape, dtype=x.dtype, device=x.device)

        with torch.no_grad():
            dtype = reference(rows(image_features), rows(text_features), number(scale), number(bias)).dtype
        _AUTOCAST_DTYPES[key] = dtype
    return dtype


def empty_batch_loss(image_features, text_features, scale, bias):
    """open_clip's value for a batch of no pairs: NaN (CLIP's cross-entropy means, SigLIP's sum / B,
    over nothing), attached to the graph with zero gradients, as open_clip's."""
    attached = image_features.sum() + text_features.sum() + scale * 0
    if bias is not None:
        attached = attached + bias * 0
    return (attached * 0 + float("nan")).to(image_features.dtype)


# ---- feature exchanges (open_clip's semantics) ---------------------------------------------------
def gather_features(image_features, text_features, *, local_loss, gather_with_grad, rank, world_size):
    """open_clip's gather_features (torch.distributed): every rank's features in rank order. With
    gather_with_grad, torch.distributed.nn.all_gather (its backward sums every rank's gradient of a
    slice into the rank that owns it); without, a plain all_gather, with this rank's own tensors put
    back in (so that they carry its gradient) unless local_loss."""
    if gather_with_grad:
        import torch.distributed.nn as dnn

        return torch.cat(dnn.all_gather(image_features), dim=0), torch.cat(dnn.all_gather(text_features), dim=0)
    images = [torch.zeros_like(image_features) for _ in range(world_size)]
    texts = [torch.zeros_like(text_features) for _ in range(world_size)]
    dist.all_gather(images, image_features.detach().contiguous())
    dist.all_gather(texts, text_features.detach().contiguous())
    if not local_loss:
        images[rank], texts[rank] = image_features, text_features
    return torch.cat(images, dim=0), torch.cat(texts, dim=0)


def _exchange(from_rank, to_rank, tensor):
    received = torch.zeros_like(tensor)
    ops = [dist.P2POp(dist.isend, tensor.contiguous(), to_rank), dist.P2POp(dist.irecv, received, from_rank)]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return received


def _exchange_bidir(left_rank, right_rank, to_left, to_right):
    from_left, from_right = torch.zeros_like(to_right), torch.zeros_like(to_left)
    ops = [dist.P2POp(dist.isend, to_right.contiguous(), right_rank),
           dist.P2POp(dist.isend, to_left.contiguous(), left_rank),
           dist.P2POp(dist.irecv, from_right, right_rank),
           dist.P2POp(dist.irecv, from_left, left_rank)]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return from_right, from_left


class _NeighbourExchange(torch.autograd.Function):
    """Receive from from_rank what this rank sends to to_rank; the gradient goes back the other way."""

    @staticmethod
    def forward(ctx, from_rank, to_rank, tensor):
        ctx.from_rank, ctx.to_rank = from_rank, to_rank
        return _exchange(from_rank, to_rank, tensor)

    @staticmethod
    def backward(ctx, grad):
        return None, None, _NeighbourExchange.apply(ctx.to_rank, ctx.from_rank, grad)


class _NeighbourExchangeBidir(torch.autograd.Function):
    @staticmethod
    def forward(ctx, left_rank, right_rank, to_left, to_right):
        ctx.left_rank, ctx.right_rank = left_rank, right_rank
        return _exchange_bidir(left_rank, right_rank, to_left, to_right)

    @staticmethod
    def backward(ctx, *grads):
        return (None, None) + _NeighbourExchangeBidir.apply(ctx.right_rank, ctx.left_rank, *grads)


def siglip_other_blocks(text_features, *, rank, world_size, dist_impl):
    """The other ranks' text features as open_clip's SigLipLoss receives them in each dist_impl
    (bidir, shift: ring exchanges with grad; reduce: one all_reduce per rank, with grad; gather: one
    all_gather with grad), in its order of use, as pairs (block, weight): weight 1 for another
    rank's block, 0 for this rank's own copy in reduce / gather, which open_clip adds with factor 0
    (the caller adds 0 * block.sum(), so that the backward still takes part in that block's
    collective, as open_clip's does). A generator: a block's loss is computed before the next
    arrives (bidir and shift keep only the blocks in flight). The gradients of the received blocks
    flow back to the ranks that own them."""
    right, left = (rank + 1) % world_size, (rank - 1 + world_size) % world_size
    if dist_impl == "bidir":
        to_left = to_right = text_features
        num_bidir, remainder = divmod(world_size - 1, 2)
        for _ in range(num_bidir):
            received = _NeighbourExchangeBidir.apply(left, right, to_left, to_right)
            for block in received:
                yield block, 1.0
            to_left, to_right = received
        if remainder:
            yield _NeighbourExchange.apply(left, right, to_right), 1.0
    elif dist_impl == "shift":
        to_right = text_features
        for _ in range(world_size - 1):
            to_right = _NeighbourExchange.apply(left, right, to_right)
            yield to_right, 1.0
    elif dist_impl == "reduce":
        import torch.distributed.nn as dnn

        for i in range(world_size):
            yield dnn.all_reduce(text_features * (rank == i), dist.ReduceOp.SUM), float(i != rank)
    elif dist_impl == "gather":
        import torch.distributed.nn as dnn

        blocks = dnn.all_gather(text_features)
        for i in range(world_size):
            yield blocks[i], float(i != rank)
    else:  # checked by the constructor
        raise AssertionError(dist_impl)
