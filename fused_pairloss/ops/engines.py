"""The two fused engines, Python side: op registration (fake kernels, autograd) and the
statistics the ops return. The calls a loss makes are ops/stats.py:

- pair engine, tiles of S = q r^T: `stats.pair_stats(q, r, labels_q, labels_r, exclude_col, spec, backend)`
- class engine, tiles of whole classes of w: `stats.class_stats(q, w, labels, spec, backend)`

Each engine is an op pair with one schema (csrc/ops.cpp) and two implementations: the C++ ops
`fused_pairloss::<engine>_forward/_backward` (CPU kernels for backend "cpu", CUDA kernels for
"cuda") and their Triton twins `fused_pairloss::triton_<engine>_forward/_backward`
(ops/triton_engines.py). Both get the fake kernels and the autograd rule defined here: the forward
returns O(N) row statistics (and O(C) column statistics), the backward op gets their incoming
gradients and recomputes the tiles (FlashAttention's backward with saved LSE). A reference (ref
side, class weights) that needs no gradient skips its pass (`ctx.needs_input_grad`).
The C++ part registers at import (so opcheck and torch.compile see it), the Triton part on first
use (importing triton is slow).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .. import _extension
from . import spec as S
from .operands import stat_dtype, weight_count, weight_rows


class PairStats(NamedTuple):
    """Per-row statistics of the (kept) positive and negative sets (ops/README.md)."""
    lse_pos: torch.Tensor
    lse_neg: torch.Tensor
    sum_pos: torch.Tensor
    sum_neg: torch.Tensor
    pos_vs_neg: torch.Tensor
    weight_pos: torch.Tensor  # exp-weighted sums (PairTerm.sum_temperature): the sum of the weights
    weight_neg: torch.Tensor
    hist_pos: torch.Tensor  # histograms (PairLossSpec.histogram): [nodes, N], else [0, N]
    hist_neg: torch.Tensor
    count_pos: torch.Tensor
    count_neg: torch.Tensor
    nonzero_pos: torch.Tensor
    nonzero_neg: torch.Tensor
    min_pos: torch.Tensor
    max_neg: torch.Tensor


class ClassStats(NamedTuple):
    """Per-row and per-class statistics of the class engine (ops/README.md)."""
    lse_other: torch.Tensor
    target_sim: torch.Tensor
    col_lse_pos: torch.Tensor
    col_lse_neg: torch.Tensor


# ---- pair engine: fake kernels and autograd ------------------------------------------------------
def pair_fake_forward(q, r, labels_q, labels_r, exclude_col, terms, flags, row_shift=None):
    n, A = q.shape[0], stat_dtype(q.dtype)
    return (q.new_empty((S.pair_value_rows(terms), n), dtype=A),
            q.new_empty((len(S.PAIR_COUNTS), n), dtype=torch.int32),
            q.new_empty((len(S.PAIR_AUX), n), dtype=A))


def pair_fake_backward(grad_values, q, r, labels_q, labels_r, exclude_col, values, aux, terms, flags,
                       need_grad_r, row_shift=None):
    grad_r = torch.empty_like(r) if (r is not None and need_grad_r) else q.new_empty((0,))
    return torch.empty_like(q), grad_r


def _pair_setup_context(ctx, inputs, output):
    q, r, labels_q, labels_r, exclude_col, terms, flags, *rest = inputs
    row_shift = rest[0] if rest else None
    values, _, aux = output
    ctx.save_for_backward(q, r, labels_q, labels_r, exclude_col, values, aux, row_shift)
    ctx.spec_args = (terms, flags)


def _pair_autograd(backward_op):
    def backward(ctx, grad_values, _grad_counts, _grad_aux):
        q, r, labels_q, labels_r, exclude_col, values, aux, row_shift = ctx.saved_tensors
        need_q = ctx.needs_input_grad[0]
        need_r = r is not None and ctx.needs_input_grad[1]
        # row_shift is a constant to the op (its users differentiate it from the counts)
        none_after = (None,) * (len(ctx.needs_input_grad) - 2)
        if grad_values is None or not (need_q or need_r):
            return (None, None) + none_after
        if torch.is_grad_enabled():  # create_graph=True: the gradient must itself be differentiable
            grad_q, grad_r = _differentiable_pair_backward(grad_values, q, r, labels_q, labels_r, exclude_col,
                                                           *ctx.spec_args, need_q, need_r, row_shift)
        else:
            grad_q, grad_r = backward_op(grad_values.contiguous(), q, r, labels_q, labels_r, exclude_col,
                                         values, aux, *ctx.spec_args, need_r, row_shift)
        return ((grad_q if need_q else None), (grad_r if need_r else None)) + none_after

    return backward


# ---- class engine: fake kernels and autograd -----------------------------------------------------
def class_fake_forward(q, w, labels, centers_per_class, terms, flags):
    A = stat_dtype(q.dtype)
    return (q.new_empty((len(S.CLASS_ROWS), q.shape[0]), dtype=A),
            q.new_empty((len(S.CLASS_COLS), weight_count(w, flags) // centers_per_class), dtype=A))


def class_fake_backward(grad_rows, grad_cols, q, w, labels, rows, cols, centers_per_class, terms, flags,
                        need_grad_w):
    return torch.empty_like(q), (torch.empty_like(w) if need_grad_w else q.new_empty((0,)))


def _class_setup_context(ctx, inputs, output):
    q, w, labels, centers_per_class, terms, flags = inputs
    rows, cols = output
    ctx.save_for_backward(q, w, labels, rows, cols)
    ctx.spec_args = (centers_per_class, terms, flags)


def _class_autograd(backward_op):
    def backward(ctx, grad_rows, grad_cols):
        q, w, labels, rows, cols = ctx.saved_tensors
        need_q, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_q or need_w) or (grad_rows is None and grad_cols is None):
            return None, None, None, None, None, None
        grad_rows = torch.zeros_like(rows) if grad_rows is None else grad_rows.contiguous()
        grad_cols = torch.zeros_like(cols) if grad_cols is None else grad_cols.contiguous()
        if torch.is_grad_enabled():  # create_graph=True: the gradient must itself be differentiable
            grad_q, grad_w = _differentiable_class_backward(grad_rows, grad_cols, q, w, labels, *ctx.spec_args,
                                                            need_q, need_w)
        else:
            grad_q, grad_w = backward_op(grad_rows, grad_cols, q, w, labels, rows, cols, *ctx.spec_args, need_w)
        return (grad_q if need_q else None), (grad_w if need_w else None), None, None, None, None

    return backward


# ---- second order (docs/design.md, "Second-order gradients") ------------------------------------
# The backward ops compute first-order gradients only. Under create_graph=True (gradient penalties,
# meta-learning) the gradient is taken instead through the materializing oracle of the same
# declaration (ops/oracle.py), whose autograd graph PyTorch can differentiate again: correct to any
# order, at the oracle's N x M (N x C*K) memory for that call. The backward ops themselves carry an
# autograd rule that raises, so no path differentiates them silently as constants.
def _differentiable_grads(outputs, grad_outputs, inputs, needed):
    """The vector-Jacobian product of `outputs` with create_graph (differentiable in the inputs and
    in grad_outputs, which seed it and are not traced back); None for the inputs not needed. The
    outputs a declaration does not produce (-inf LSEs of empty sets) are constants: seeded with 0."""
    pairs = [(out, g) for out, g in zip(outputs, grad_outputs) if out.requires_grad]
    seeds = [torch.where(torch.isneginf(out), torch.zeros_like(out), g.to(out.dtype)) for out, g in pairs]
    wanted = [x for x, need in zip(inputs, needed) if need]
    grads = iter(torch.autograd.grad([out for out, _ in pairs], wanted, seeds, create_graph=True, allow_unused=True)
                 if pairs else [None] * len(wanted))
    out = []
    for x, need in zip(inputs, needed):
        g = next(grads) if need else None
        out.append(None if not need else (torch.zeros_like(x) if g is None else g.to(x.dtype)))
    return out


def _differentiable_pair_backward(grad_values, q, r, labels_q, labels_r, exclude_col, terms, flags, need_q, need_r,
                                  row_shift=None):
    from . import oracle  # the materializing oracle is only needed here

    # nodes of their own: r may be q itself (the op's two inputs each get their own share)
    q, r = q.view_as(q), (None if r is None else r.view_as(r))
    values, _, _ = oracle.pair_values(q, r, labels_q, labels_r, exclude_col, S.unpack_pair(terms, flags),
                                      row_shift=row_shift)
    return _differentiable_grads([values], [grad_values], [q, r], [need_q, need_r])


def _differentiable_class_backward(grad_rows, grad_cols, q, w, labels, centers_per_class, terms, flags,
                                   need_q, need_w):
    from . import oracle

    rows, cols = oracle.class_values(q, w, labels, centers_per_class, terms, flags)
    return _differentiable_grads([rows, cols], [grad_rows, grad_cols], [q, w], [need_q, need_w])


def _backward_op_autograd(op_name):
    """Autograd rule of a backward op: differentiating it is not supported (see above); raise."""
    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise RuntimeError(f"fused_pairloss: {op_name} (a first-order gradient) is not differentiable; "
                           "second-order gradients of the losses go through create_graph=True, which "
                           "takes the differentiable path")

    return backward, setup_context


class Engine:
    """One engine's op pair in both families (C++ and Triton) with one autograd rule."""

    def __init__(self, name, fake_forward, fake_backward, setup_context, autograd):
        self.name = name  # "pair_engine" / "class_engine"
        self.fake_forward, self.fake_backward = fake_forward, fake_backward
        self._setup_context, self._autograd = setup_context, autograd
        self._registered = set()
        self.register_cpp()

    def register_cpp(self):
        if "cpp" in self._registered or _extension.load() is None:
            return
        fwd, bwd = f"fused_pairloss::{self.name}_forward", f"fused_pairloss::{self.name}_backward"
        torch.library.register_fake(fwd)(self.fake_forward)
        torch.library.register_fake(bwd)(self.fake_backward)
        backward_op = getattr(torch.ops.fused_pairloss, f"{self.name}_backward")
        torch.library.register_autograd(fwd, self._autograd(backward_op), setup_context=self._setup_context)
        rule, setup = _backward_op_autograd(bwd)
        torch.library.register_autograd(bwd, rule, setup_context=setup)
        self._registered.add("cpp")

    def register_triton(self, forward_op, backward_op):
        """Called by ops/triton_engines.py once it has defined the Triton twins (ops/stats.py
        imports that module on the first "triton" call)."""
        torch.library.register_autograd(forward_op, self._autograd(backward_op), setup_context=self._setup_context)
        rule, setup = _backward_op_autograd(f"triton {self.name}_backward")
        torch.library.register_autograd(backward_op, rule, setup_context=setup)


PAIR = Engine("pair_engine", pair_fake_forward, pair_fake_backward, _pair_setup_context, _pair_autograd)
CLASS = Engine("class_engine", class_fake_forward, class_fake_backward, _class_setup_context, _class_autograd)


def exclusion_for(n: int, device, offset: int = 0) -> torch.Tensor:
    """exclude_col of rows that sit at columns offset .. offset + n - 1 of the ref."""
    return torch.arange(offset, offset + n, device=device, dtype=torch.int64)


__all__ = ["PairStats", "ClassStats", "Engine", "exclusion_for", "PAIR", "CLASS", "stat_dtype", "weight_rows",
           "weight_count"]
