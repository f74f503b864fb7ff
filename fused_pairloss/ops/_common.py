"""Pieces shared by the loss modules (fused_pairloss/losses/): operands, PML's zero loss and
few-pairs rule, and the batch reductions a loss's row combination is written in (so the
distributed wrapper can run the same combination over rows spread across ranks)."""
from __future__ import annotations

import functools
import inspect
import threading

import numpy as np
import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F

from .. import _extension
from .engines import exclusion_for
from .operands import autocast_enabled, logaddexp  # noqa: F401 - logaddexp: for the row combinations


def normalize(x):
    return F.normalize(x, p=2, dim=1)  # eps 1e-12 (docs/semantics.md), in the input dtype as PML


def rows_of(x, index):
    """x[index] for a 1-d index with repeats, differentiably: index_select's backward adds the
    repeats with index_add, in the same order for any number of threads on the CPU (the backward of
    x[index] may add them in another order there; design.md#determinism)."""
    return x.index_select(0, index)


def pairs_of(mat, rows, cols):
    """mat[rows, cols] for index lists with repeats, differentiably, with rows_of's backward."""
    return mat.reshape(-1).index_select(0, rows * mat.shape[1] + cols)


def similarity_dtype(embeddings, distance):
    """The dtype of PML's distance matrix for these embeddings, which is the dtype of the value of
    the pair losses that reduce it directly (MultiSimilarity, Circle, NTXent, SupCon, lifted
    structure). Under autocast, CosineSimilarity's matmul runs in the autocast dtype (every floating
    input but fp64); LpDistance's torch.cdist keeps the input dtype."""
    device_type = embeddings.device.type
    if distance == "cosine" and embeddings.dtype != torch.float64 and autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return embeddings.dtype


def label_runs(labels):
    """The labels sorted (stably) into runs of equal values: (order, starts, run) with `order` the
    sorting permutation, `starts[k]` whether sorted position k begins a run and `run[k]` its run's
    index in [0, n). No N x N and fixed shapes, so torch.compile traces it."""
    order = torch.sort(labels, stable=True).indices
    ordered = labels[order]
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[1:] = ordered[1:] != ordered[:-1]
    return order, starts, torch.cumsum(starts.long(), 0) - 1


def label_ids(labels):
    """Per row, its label's index in [0, n) (equal labels, equal ids)."""
    order, _, run = label_runs(labels)
    return torch.empty_like(run).scatter_(0, order, run)


def unused_label(labels):
    """An int64 value (0-d tensor) that no label of the non-empty int64 `labels` takes: the lowest
    label - 1, else the highest + 1, else (labels holding both int64 extremes) the first gap above a
    label; without a sync, so a compiled call traces it."""
    extreme = torch.iinfo(torch.int64)
    lo, hi = labels.amin(), labels.amax()
    s = labels.reshape(-1).sort().values
    gap = (s[:-1] < extreme.max) & (s[1:] != s[:-1]) & (s[1:] != s[:-1] + 1)  # s[:-1] + 1 is free
    first_gap = torch.where(gap, s[:-1] + 1, extreme.max).amin() if s.numel() > 1 else lo
    return torch.where(lo > extreme.min, lo - 1, torch.where(hi < extreme.max, hi + 1, first_gap))


def label_counts(labels):
    """Per row, how many rows (itself included) have its label."""
    order, _, run = label_runs(labels)
    sizes = torch.zeros_like(run).index_add(0, run, torch.ones_like(run))
    return torch.empty_like(run).scatter_(0, order, sizes[run])


def row_chunks(n, per_row, budget):
    """[(i0, i1)] splitting n rows so that a chunk holds at most `budget` entries of `per_row`
    each (at least one row)."""
    step = max(1, budget // max(per_row, 1))
    return [(i0, min(n, i0 + step)) for i0 in range(0, n, step)]


@torch.library.custom_op("fused_pairloss::hyper_parameters", mutates_args=())
def hyper_parameters(values: list[float]) -> torch.Tensor:
    """Nothing (an empty tensor): called while torch.compile traces a loss, with its float
    hyper-parameters, so that each becomes a constant of the graph (a float[] argument of an op:
    dynamo specializes its entries). Left symbolic, a value that reaches both an engine op's terms
    (as an expression such as -alpha, baked in as a constant) and the row combination (as an input)
    made inductor's graph cache answer a later value with an earlier value's graph."""
    return torch.empty(0)


hyper_parameters.register_fake(lambda values: torch.empty(0))


def hyper_parameters_as_constants(hyper):
    """`hyper` unchanged; while torch.compile traces, its float entries made constants of the
    graph (hyper_parameters): each value compiles once (docs/api.md)."""
    if torch.compiler.is_compiling():
        hyper_parameters([v for v in hyper.values() if isinstance(v, float)])
    return hyper


def loss_function(fn):
    """Decorator of every function that computes a loss from its hyper-parameters (a functional form,
    a fused call):
    - while torch.compile traces, the call's float keyword arguments are made constants of the graph
      on entry (hyper_parameters_as_constants). On each function, not only at the modules' entry: a
      frame that resumes after a graph break (a miner's weights) reads them anew;
    - forward-mode AD (torch.autograd.forward_ad, torch.func.jvp / jacfwd) raises unless the call
      is the reference backend's: the fused ops have no forward derivative, and their outputs would
      carry a zero tangent;
    - numpy numbers among the keyword arguments are the Python numbers they hold, and so, in eager
      calls, are one-element tensors (not requiring grad) given for a keyword whose default is a
      number (PML's modules take such hyper-parameters)."""
    numeric_defaults = {name for name, p in inspect.signature(fn).parameters.items()
                        if isinstance(p.default, (int, float)) and not isinstance(p.default, bool)}

    def as_number(name, v):
        if isinstance(v, (np.generic, np.ndarray)) and v.ndim == 0:  # torch.compile traces them as arrays
            return v.item()
        if (name in numeric_defaults and isinstance(v, torch.Tensor) and v.numel() == 1 and not v.requires_grad
                and not v.is_complex() and not torch.compiler.is_compiling()):  # (MarginLoss's beta stays a
            return v.item()  # tensor while compiled: its value is read in the graph)
        return v

    @functools.wraps(fn)
    def computing_a_loss(*args, **kwargs):
        kwargs = {k: as_number(k, v) for k, v in kwargs.items()}
        if torch.compiler.is_compiling():
            hyper_parameters_as_constants(kwargs)
        elif _forward_ad_in_use(args, kwargs.values()) and not _reference_backend(args, kwargs.get("backend", "auto")):
            raise NotImplementedError(
                f"{fn.__name__}: forward-mode AD (torch.autograd.forward_ad, torch.func.jvp / jacfwd) is not "
                "supported by the fused ops; reverse mode is (torch.autograd.grad / backward, "
                "torch.autograd.functional.hessian / hvp: double backward; torch.func's transforms are not), and "
                "backend='reference' computes with PyTorch's ops")
        return fn(*args, **kwargs)

    computing_a_loss.loss_function = True
    return computing_a_loss


def _forward_ad_in_use(*values):
    """Whether a tensor among `values` carries a forward-mode tangent: a dual tensor of
    torch.autograd.forward_ad, or one wrapped by a jvp level of torch.func (jvp, jacfwd)."""
    tensors = [v for group in values for v in group if isinstance(v, torch.Tensor)]
    if forward_ad._current_level >= 0 and any(forward_ad.unpack_dual(t).tangent is not None for t in tensors):
        return True
    functorch = torch._C._functorch
    if functorch.peek_interpreter_stack() is None:
        return False
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
    jvp_levels = {i.level() for i in retrieve_all_functorch_interpreters() if i.key() == functorch.TransformType.Jvp}
    for t in tensors:
        while functorch.is_functorch_wrapped_tensor(t):
            if functorch.maybe_get_level(t) in jvp_levels:
                return True
            t = functorch.get_unwrapped(t)
    return False


def _reference_backend(args, backend):
    """Whether the call computes with the reference backend (backend="auto" resolved on the device of
    its first tensor)."""
    if not isinstance(backend, str):
        return False  # a fused backend's plan (listed pairs, a miner's rule)
    if backend == "auto":
        from .._backends import resolve_backend
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
        backend = resolve_backend(backend, device)
    return backend == "reference"


class CompiledRowKernels:
    """A row-chunk op's kernels, given as {op name: fake kernel}: the compiled CPU ones
    (csrc/cpu/rank_rows_cpu.cpp) and on CUDA tensors the Triton ones (ops/triton_rank_rows.py).
    Called with the op's rows: True when kernels compute them (fp32 / fp64, the library built with
    the ops, Triton for CUDA tensors); the fake kernels are registered on the first call."""

    def __init__(self, fakes):
        self.fakes, self.built, self.cuda, self.lock = fakes, None, None, threading.Lock()

    def __call__(self, rows):
        if self.built is None:
            with self.lock:  # two threads' first calls: one registration
                if self.built is None:
                    built = all(_extension.has_kernel(name, "CPU") for name in self.fakes)
                    if built:
                        for name, fake in self.fakes.items():
                            torch.library.register_fake(f"fused_pairloss::{name}")(fake)
                    self.built = built
        if not self.built or rows.dtype not in (torch.float32, torch.float64):
            return False
        if rows.device.type == "cuda":
            return self._cuda_kernels()
        return rows.device.type == "cpu"

    def _cuda_kernels(self) -> bool:
        if self.cuda is None:
            with self.lock:
                if self.cuda is None:
                    try:  # registers the ops' CUDA kernels where Triton imports
                        from . import triton_rank_rows
                    except ImportError:
                        self.cuda = False
                    else:
                        self.cuda = triton_rank_rows.AVAILABLE and all(
                            _extension.has_kernel(name, "CUDA") for name in self.fakes)
        return self.cuda


def register_recomputing_autograd(op, backward_op, differentiable):
    """Autograd of a chunked op `op(q, labels, *args)` whose first output is differentiable in q
    (the losses' row-chunk ops): its backward is `backward_op(grad, q, labels, *args)`, which
    recomputes the chunks; under create_graph=True `differentiable(q, labels, *args)` (the same
    value as a differentiable PyTorch computation) is differentiated instead, so second order is
    right; the backward op itself refuses to be differentiated."""
    def setup_context(ctx, inputs, output):
        q, labels, *args = inputs
        ctx.save_for_backward(q, labels)
        ctx.args = tuple(args)

    def backward(ctx, grad, *unused):
        q, labels = ctx.saved_tensors
        nones = (None,) * (1 + len(ctx.args))
        if grad is None:
            return (None,) + nones
        if torch.is_grad_enabled():  # create_graph=True: a differentiable recomputation (second order)
            qv = q.view_as(q)
            value = differentiable(qv, labels, *ctx.args)
            (grad_q,) = torch.autograd.grad(value, [qv], grad.to(value.dtype), create_graph=True)
            return (grad_q,) + nones
        return (backward_op(grad.contiguous(), q, labels, *ctx.args),) + nones

    def not_differentiable(ctx, *grads):
        raise RuntimeError(f"fused_pairloss: {backward_op._name} (a first-order gradient) is not differentiable")

    op.register_autograd(backward, setup_context=setup_context)
    backward_op.register_autograd(not_differentiable, setup_context=lambda ctx, inputs, output: None)


def zero_loss(embeddings):
    """PML's zero loss: 0 attached to the graph (NaN if the embeddings are NaN)."""
    return torch.sum(embeddings * 0)


def pair_operands(embeddings, labels, ref_emb, ref_labels, exclude_col=None):
    """(q, r, labels_r, exclude_col) for the pair engine: r None means self mode (S symmetric, each
    row's own column excluded). PML's identity rule: self pairs are excluded iff ref_emb is None or
    `ref_labels is labels`; an explicit exclude_col (distributed rows, memory slots) overrides it."""
    if exclude_col is None and (ref_emb is None or (ref_emb is embeddings and ref_labels is labels)):
        return normalize(embeddings), None, None, None
    if exclude_col is None and ref_labels is labels:
        exclude_col = exclusion_for(embeddings.shape[0], embeddings.device)
    return normalize(embeddings), normalize(ref_emb), ref_labels, exclude_col


class Batch:
    """The batch a loss reduces its per-row values over. This one: the rows of this call. The
    distributed wrapper substitutes one whose sums run over every rank's rows (parallel.py)."""

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of a per-row tensor over the batch (0-dim)."""
        return x.sum()

    def count(self, mask: torch.Tensor) -> torch.Tensor:
        """Number of True rows over the batch (0-dim int64)."""
        return mask.sum()

    def rows(self, x: torch.Tensor) -> int:
        """Number of rows of the batch (rows of x here)."""
        return x.shape[0]

    def mean(self, x):
        return self.sum(x) / self.rows(x)

    def mean_above_zero(self, x, zero):
        """PML AvgNonZeroReducer: mean of the entries > 0, `zero` if there are none."""
        above = x > 0
        n = self.count(above)
        mean = self.sum(torch.where(above, x, torch.zeros_like(x))) / n.clamp(min=1)
        return torch.where(n > 0, mean.to(zero.dtype), zero)

    def shared(self, x):
        """x, a value computed from the batch's sums that every row's own computation then uses
        (IntraPairVariance's thresholds): here x itself. Across ranks its gradient is summed over
        the ranks (each rank's rows add their share of dL/dx)."""
        return x

    def too_few_pairs(self, count_pos, count_neg):
        """PML GenericPairLoss: at most one positive and one negative pair in the whole batch."""
        return (self.sum(count_pos) <= 1) & (self.sum(count_neg) <= 1)


LOCAL = Batch()
