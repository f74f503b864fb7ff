"""What DistributedLossWrapper (parallel.py) and CrossBatchMemory (memory.py) share: the fused call
of a pair-loss module (`fused_pair_plan`), and the rows of a batch spread across the ranks of a
process group (`RankLayout`: sizes, offsets, all-gather and reduce-scatter; `DistributedBatch`: the
batch reductions of a loss's row combination, all-reduced)."""
from __future__ import annotations

import functools
import inspect

import torch
import torch.distributed as dist

from ._backends import resolve_backend
from .losses import REGISTRY
from .ops._common import Batch

def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _collective(new, old):
    """torch >= 2.10 renamed the tensor collectives (all_gather_into_tensor -> all_gather_single)."""
    return getattr(dist, new, None) or getattr(dist, old)


_all_gather_tensor = _collective("all_gather_single", "all_gather_into_tensor")


_reduce_scatter_tensor = _collective("reduce_scatter_single", "reduce_scatter_tensor")


class RankLayout:
    """How a per-rank tensor of n_local rows lies in the global batch: sizes and offsets of every
    rank (one all-gather of the sizes, unless `sizes` are known), this rank's slice."""

    def __init__(self, n_local: int, device, group=None, sizes=None):
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if sizes is None:
            mine = torch.tensor([n_local], dtype=torch.int64, device=device)
            gathered = torch.empty(self.world, dtype=torch.int64, device=device)
            _all_gather_tensor(gathered, mine, group=group)
            sizes = gathered.tolist()
        self.sizes = [int(s) for s in sizes]
        self.offsets = [sum(self.sizes[:r]) for r in range(self.world)]
        self.total = sum(self.sizes)
        self.max = max(self.sizes)
        self.n = n_local
        self.offset = self.offsets[self.rank]

    @property
    def even(self) -> bool:
        return all(s == self.max for s in self.sizes)

    def own(self, gathered):
        """This rank's rows of a gathered tensor."""
        return gathered[self.offset:self.offset + self.n]

    def others(self, gathered):
        """The other ranks' rows in rank order (PML's all_gather drops the own rank)."""
        return torch.cat([gathered[:self.offset], gathered[self.offset + self.n:]], dim=0)

    def rank_order_of(self, indices_tuple, device):
        """An indices_tuple into PML's gathered batch (this rank's rows, then others(): what PML's
        DistributedMinerWrapper's tuples index) as indices into the batch in rank order."""
        rank_order = self.others(torch.arange(self.total))
        rank_order = torch.cat([torch.arange(self.offset, self.offset + self.n), rank_order]).to(device)
        return tuple(rank_order[torch.as_tensor(t, device=device).long()] for t in indices_tuple)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """All-gather (no autograd) of a tensor of self.n rows into the global order."""
        x = x.detach()
        dtype = x.dtype
        if dtype == torch.bool:  # not every backend gathers bool
            x = x.to(torch.uint8)
        x = x.contiguous()
        tail = tuple(x.shape[1:])
        if self.even:
            out = x.new_empty((self.total,) + tail)
            _all_gather_tensor(out, x, group=self.group)
        else:
            padded = x.new_zeros((self.max,) + tail)
            padded[:self.n] = x
            full = x.new_empty((self.world * self.max,) + tail)
            _all_gather_tensor(full, padded, group=self.group)
            out = torch.cat([full[r * self.max:r * self.max + s] for r, s in enumerate(self.sizes)], dim=0)
        return out.to(dtype) if dtype == torch.bool else out

    def reduce_scatter(self, g: torch.Tensor) -> torch.Tensor:
        """Sum over ranks of a global-batch tensor, this rank's slice of it."""
        g = g.contiguous()
        tail = tuple(g.shape[1:])
        if self.even:
            padded = g
        else:
            padded = g.new_zeros((self.world * self.max,) + tail)
            for r, (o, s) in enumerate(zip(self.offsets, self.sizes)):
                padded[r * self.max:r * self.max + s] = g[o:o + s]
        out = g.new_empty((self.max,) + tail)
        try:
            _reduce_scatter_tensor(out, padded, group=self.group)
        except (RuntimeError, NotImplementedError) as e:  # a backend without reduce_scatter (older gloo)
            if "support" not in str(e).lower():
                raise
            padded = padded.clone()
            dist.all_reduce(padded, group=self.group)
            out = padded[self.rank * self.max:(self.rank + 1) * self.max]
        return out[:self.n]


# dtype codes of the descriptor all-gather (agreed_layout); any other dtype is len(_DTYPE_CODES)
_DTYPE_CODES = {dt: i for i, dt in enumerate((
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool))}
_ABSENT, _NOT_A_TENSOR = -1, -2


def _describe(t):
    """(dim, width, dtype code) of a per-rank input: what must agree across ranks (not the rows)."""
    if t is None:
        return [_ABSENT] * 3
    if not isinstance(t, torch.Tensor):
        return [_NOT_A_TENSOR] * 3
    return [t.dim(), t.shape[1] if t.dim() > 1 else 0, _DTYPE_CODES.get(t.dtype, len(_DTYPE_CODES))]


def _what(desc):
    dim, width, code = desc
    if dim == _ABSENT:
        return "None"
    if dim == _NOT_A_TENSOR:
        return "not a tensor"
    dtype = next((dt for dt, c in _DTYPE_CODES.items() if c == code), "another dtype")
    return f"{dim}-D {dtype}" + (f" of width {width}" if dim > 1 else "")


def agreed_layout(inputs: dict, local_error=None, device=None, group=None) -> RankLayout:
    """The RankLayout of the first of `inputs` (name -> per-rank tensor or None, rows first),
    after checking on every rank that every rank passed the same kind of inputs: one all-gather of
    a descriptor (rows, whether this rank's own checks passed, and dim, width and dtype of each
    input). A collective with mismatched shapes or dtypes would hang or read garbage; instead
    every rank raises: the rank whose checks failed its `local_error`, every other rank a
    ValueError naming that rank; a mismatch (checked first) raises the same ValueError on every
    rank, naming the input and what each rank passed."""
    first = next(iter(inputs.values()))
    rows = first.shape[0] if local_error is None and isinstance(first, torch.Tensor) and first.dim() > 0 else 0
    if device is None:
        device = first.device if isinstance(first, torch.Tensor) else torch.device("cpu")
    mine = [rows, 0 if local_error is None else 1]
    for t in inputs.values():
        mine += _describe(t)
    world = dist.get_world_size(group)
    everyone = torch.empty(world * len(mine), dtype=torch.int64, device=device)
    _all_gather_tensor(everyone, torch.tensor(mine, dtype=torch.int64, device=device), group=group)
    per_rank = everyone.view(world, len(mine)).tolist()
    for k, name in enumerate(inputs):
        descs = [tuple(d[2 + 3 * k:5 + 3 * k]) for d in per_rank]
        if len(set(descs)) > 1:
            passed = ", ".join(f"rank {r}: {_what(d)}" for r, d in enumerate(descs))
            raise ValueError(f"{name} must have the same dims, width (D) and dtype on every rank; got {passed}")
    if local_error is not None:
        raise local_error
    failed = [r for r, d in enumerate(per_rank) if d[1]]
    if failed:
        raise ValueError(f"the inputs of rank(s) {failed} failed their checks (the error is raised there); "
                         "every rank stops here")
    return RankLayout(rows, device, group, sizes=[d[0] for d in per_rank])


class AllGather(torch.autograd.Function):
    """All-gather into the global batch; backward: reduce-scatter (each rank gets the sum over
    ranks of the gradient of its own rows)."""

    @staticmethod
    def forward(ctx, x, layout):
        ctx.layout = layout
        return layout.gather(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.layout.reduce_scatter(grad), None


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks of a per-rank partial sum. Backward: the identity. Every rank computes the
    same global loss from it, and the partial sum enters the global one with derivative 1, so the
    gradient of this rank's partial sum is the incoming gradient itself (an all-reduce here would
    count it world_size times)."""

    @staticmethod
    def forward(ctx, x, group):
        y = x.clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _AllReduceGrad(torch.autograd.Function):
    """Forward: the identity. Backward: the sum over ranks of the incoming gradient. For a global
    value (computed from all-reduced sums) that each rank's rows then use: each rank's backward sees
    only its own rows' share of dL/dx, and the partial sums beneath it need all of it."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable  # a second-order gradient through it raises
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class DistributedBatch(Batch):
    """The batch of rows spread across the ranks of a process group: sums and counts all-reduce
    (the O(N) row statistics' reductions), `rows` is the global number of rows. A loss's row
    combination (`combine(..., batch=)` of fused_pairloss/losses/<loss>.py) run on it gives, on every rank, the value
    of the single-process combination over the gathered batch."""

    def __init__(self, total_rows: int, group=None):
        self.total_rows = int(total_rows)
        self.group = group

    def sum(self, x):
        s = x.sum()
        if s.is_floating_point():
            return _AllReduceSum.apply(s, self.group)
        s = s.clone()
        dist.all_reduce(s, group=self.group)
        return s

    def count(self, mask):
        return self.sum(mask.sum())

    def shared(self, x):
        return _AllReduceGrad.apply(x, self.group)

    def rows(self, x):
        return self.total_rows


def all_gather_uneven(x: torch.Tensor, group=None) -> torch.Tensor:
    """All-gather of per-rank tensors with possibly different numbers of rows, in rank order, with
    autograd (the backward reduce-scatters)."""
    return AllGather.apply(x, RankLayout(x.shape[0], x.device, group))


# the pair-loss modules the fused path computes (exactly these classes: a subclass may change forward;
# a loss whose PML semantics there differ from its label sets, NCA's, is called as PML calls it)
FUSED_PAIR_CALLS = {entry.cls: entry.fused for entry in REGISTRY.values()
                    if entry.kind == "pair" and entry.cls._fused_in_wrappers}
# the fused calls that take the loss's miner_epsilon (MultiSimilarityLoss's)
_TAKE_MINER_EPSILON = {fn for fn in FUSED_PAIR_CALLS.values() if "miner_epsilon" in inspect.signature(fn).parameters}


def fused_pair_plan(loss, device):
    """(fused function, hyper-parameters) when `loss` is one of this library's pair-loss modules
    and its fused engine computes it on `device`: `fn(embeddings, labels, ref_emb, ref_labels, *,
    exclude_col, batch, backend, **hyper)`. None otherwise (a module computing with PML itself,
    the reference backend, a class loss, a PML loss object)."""
    fn = FUSED_PAIR_CALLS.get(type(loss))
    if fn is None or getattr(loss, "_pml", None) is not None or getattr(loss, "_distance_kind", None) is None:
        return None
    if loss._pml_only_assigned():  # assigned after construction: an attribute only PML computes, or objects
        return None
    if not loss._fused_in_wrappers_now():  # settings the wrappers' fused call does not take
        return None
    backend = resolve_backend(loss.backend, device)
    if backend == "reference":
        return None
    hyper = dict(loss._hyper())
    if fn in _TAKE_MINER_EPSILON:
        hyper["miner_epsilon"] = loss.miner_epsilon
    return functools.partial(fn, backend=backend), hyper
