"""Tiled class engine (SoftTriple, ProxyCircle): Python side of the ops for every backend.

Like a fused linear cross-entropy: the kernels walk tiles of whole classes (all K centers of a
class) of w (C*K, D), pool the K center similarities, and keep an online log-sum-exp over
classes per row; they return lse_i and the target class similarity S_{i,y_i} (README.md). The loss
plug-ins combine those in Python; autograd goes through this one rule for all op families.
"""
from __future__ import annotations

import torch

from ._registry import EngineOps


def _stat_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _fake_forward(q, w, labels, centers_per_class, kind, p0, p1, p2):
    n, A = q.shape[0], _stat_dtype(q)
    return q.new_empty((n,), dtype=A), q.new_empty((n,), dtype=A)


def _fake_backward(grad_lse, grad_target_sim, q, w, labels, lse, centers_per_class, kind, p0, p1, p2):
    return torch.empty_like(q), torch.empty_like(w)


def _setup_context(ctx, inputs, output):
    q, w, labels, centers_per_class, kind, p0, p1, p2 = inputs
    lse, _ = output
    ctx.save_for_backward(q, w, labels, lse)
    ctx.flags = (centers_per_class, kind, p0, p1, p2)


def _make_backward(backward_op):
    def backward(ctx, grad_lse, grad_target_sim):
        q, w, labels, lse = ctx.saved_tensors
        grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse.contiguous()
        grad_target_sim = torch.zeros_like(lse) if grad_target_sim is None else grad_target_sim.contiguous()
        grad_q, grad_w = backward_op(grad_lse, grad_target_sim, q, w, labels, lse, *ctx.flags)
        return grad_q, grad_w, None, None, None, None, None, None

    return backward


def _triton_module():
    from . import triton_class_engine

    return triton_class_engine


_ops = EngineOps("class_engine", _fake_forward, _fake_backward, _setup_context, _make_backward,
                 _triton_module)
forward_op = _ops.forward_op


def row_stats(q, w, labels, *, centers_per_class, kind, params, backend):
    """(lse, target_sim) per row (README.md); q (N, D) and w (C*K, D) normalized."""
    p0, p1, p2 = (float(p) for p in params)
    labels = labels.to(device=q.device, dtype=torch.int64).contiguous()
    return forward_op(backend)(q.contiguous(), w.contiguous(), labels, int(centers_per_class),
                               int(kind), p0, p1, p2)

