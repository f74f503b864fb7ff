"""Tiled pair engine (S = q r^T): Python side of the ops for every backend.

The kernels (csrc/cpu, csrc/cuda: op `fused_pairloss::pair_engine_forward/backward`; Triton:
`triton_pair_engine.py`) return per-row statistics of the (mined) positive and negative sets:
lse_pos, lse_neg (online log-sum-exp of the loss's logits), the set sizes, and the mining
thresholds (README.md beside this file). Here: fake kernels for the C++ ops, and one autograd rule
for both op families: d lse / d S is a softmax over the row's set, so the backward op gets the
incoming grads of lse_pos / lse_neg and the saved statistics, recomputes S tile by tile and forms
G = dL/dS (FlashAttention's backward with saved LSE).
"""
from __future__ import annotations

import torch

from ._registry import EngineOps


def _stat_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _fake_forward(q, r, labels_q, labels_r, exclude_diag, kind, p0, p1, p2, mine, miner_eps):
    n, A = q.shape[0], _stat_dtype(q)
    f = lambda dt: q.new_empty((n,), dtype=dt)  # noqa: E731
    return f(A), f(A), f(torch.int32), f(torch.int32), f(A), f(A)


def _fake_backward(grad_lse_pos, grad_lse_neg, q, r, labels_q, labels_r, lse_pos, lse_neg, min_pos,
                   max_neg, exclude_diag, kind, p0, p1, p2, mine, miner_eps):
    return torch.empty_like(q), (torch.empty_like(r) if r is not None else q.new_empty((0,)))


def _setup_context(ctx, inputs, output):
    q, r, labels_q, labels_r, exclude_diag, kind, p0, p1, p2, mine, miner_eps = inputs
    lse_pos, lse_neg, _, _, min_pos, max_neg = output
    ctx.save_for_backward(q, r, labels_q, labels_r, lse_pos, lse_neg, min_pos, max_neg)
    ctx.flags = (exclude_diag, kind, p0, p1, p2, mine, miner_eps)


def _make_backward(backward_op):
    def backward(ctx, grad_lse_pos, grad_lse_neg, *_unused):
        q, r, labels_q, labels_r, lse_pos, lse_neg, min_pos, max_neg = ctx.saved_tensors
        grad_lse_pos = torch.zeros_like(lse_pos) if grad_lse_pos is None else grad_lse_pos.contiguous()
        grad_lse_neg = torch.zeros_like(lse_neg) if grad_lse_neg is None else grad_lse_neg.contiguous()
        grad_q, grad_r = backward_op(grad_lse_pos, grad_lse_neg, q, r, labels_q, labels_r, lse_pos,
                                     lse_neg, min_pos, max_neg, *ctx.flags)
        return grad_q, (grad_r if r is not None else None), None, None, None, None, None, None, None, None, None

    return backward


def _triton_module():
    from . import triton_pair_engine

    return triton_pair_engine


_ops = EngineOps("pair_engine", _fake_forward, _fake_backward, _setup_context, _make_backward,
                 _triton_module)
forward_op = _ops.forward_op


def row_stats(q, r, labels_q, labels_r, *, exclude_diag, kind, params, mine, miner_eps, backend):
    """Per-row statistics of the pair sets (README.md): (lse_pos, lse_neg, count_pos, count_neg,
    min_pos, max_neg). q, r normalized; r None = self mode. Differentiable w.r.t. q and r."""
    p0, p1, p2 = (float(p) for p in params)
    labels_q = labels_q.to(device=q.device, dtype=torch.int64).contiguous()
    if r is not None:
        r = r.contiguous()
        labels_r = labels_r.to(device=q.device, dtype=torch.int64).contiguous()
    else:
        labels_r = None
        exclude_diag = True
    return forward_op(backend)(q.contiguous(), r, labels_q, labels_r, bool(exclude_diag), int(kind),
                               p0, p1, p2, bool(mine), float(miner_eps))

