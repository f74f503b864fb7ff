"""The ops' operands as every backend and the oracle read them: the statistics dtype and the class
weights in the layout a declaration gives them (ops/README.md)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import spec as S


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / statistics dtype of the ops: fp64 for fp64 inputs, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# csrc/common/pair_terms.inl kLpNearPair (the Triton _pair_v spells it 0.03125): pairs with
# d2 < LP_NEAR_PAIR (|q|^2 + |r|^2) take d2 from the rows' difference
LP_NEAR_PAIR = 1.0 / 32


def lp_squared_distances(s, q, r):
    """d2 of rows q x r from their products s, as the kernels compute it (docs/design.md
    "Numerics"): |q_i|^2 + |r_j|^2 - 2 S, or for the near pairs the sum of squared differences of
    the two rows (exactly 0 for identical rows); differentiable, never an N x M x D tensor."""
    nq, nr = (q * q).sum(1), (r * r).sum(1)
    d2 = nq[:, None] + nr[None, :] - 2 * s
    near = (d2 < LP_NEAR_PAIR * (nq[:, None] + nr[None, :])).nonzero(as_tuple=True)
    if near[0].numel():
        d2 = d2.index_put(near, (q[near[0]] - r[near[1]]).square().sum(1))
    return d2


def weight_count(w, flags) -> int:
    """C*K, the number of weight vectors of w as the declaration lays it out."""
    return w.shape[1] if flags & S.WEIGHTS_COLUMNS else w.shape[0]


def weight_rows(w, flags):
    """w as plain rows (C*K, D), normalized where the declaration says so: what the flags
    S.WEIGHT_OPERAND_FLAGS describe, in differentiable PyTorch (the oracle, and the registrar for
    engines that take plain rows)."""
    rows = w.t() if flags & S.WEIGHTS_COLUMNS else w
    return F.normalize(rows, p=2, dim=1) if flags & S.NORMALIZE_WEIGHTS else rows


def recomputation_inputs(saved, needs):
    """A create_graph backward's inputs to its differentiable recomputation: each saved tensor a node
    of its own (two of them may be one tensor, each gets its share), those no gradient is asked of
    constants (None stays None)."""
    return [None if t is None else t.view_as(t) if need else t.detach() for t, need in zip(saved, needs)]


def recomputed_grads(output, inputs, needs, grad_output):
    """The gradients of a recomputation (create_graph) w.r.t. the inputs that need one (zeros where
    the output does not depend on it), None for the others."""
    wanted = [t for t, need in zip(inputs, needs) if need]
    got = iter(torch.autograd.grad(output, wanted, grad_output, create_graph=True, allow_unused=True)
               if wanted else ())
    out = []
    for t, need in zip(inputs, needs):
        g = next(got) if need else None
        out.append(None if not need else torch.zeros_like(t) if g is None else g)
    return out


def autocast_enabled(device_type) -> bool:
    """torch.is_autocast_enabled(device_type), False for a device type autocast does not know (meta)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def logaddexp(a, b):
    """torch.logaddexp(a, b), with a finite second derivative where one side is -inf (an empty set's
    log-sum-exp): torch's is NaN there (its gradient 1 / (1 + exp(b - a)) differentiates to inf /
    inf). There the value is the other side, its gradient 1 (0 to the -inf side), as torch's."""
    a_empty, b_empty = a == float("-inf"), b == float("-inf")
    both = torch.logaddexp(torch.where(a_empty, torch.zeros_like(a), a), torch.where(b_empty, torch.zeros_like(b), b))
    return torch.where(a_empty, b + torch.zeros_like(a), torch.where(b_empty, a + torch.zeros_like(b), both))


def softplus(x):
    """log(1 + e^x) = max(x, 0) + log1p(e^-|x|), exact for every x and its gradient sigmoid(x)
    (F.softplus returns x itself above its threshold of 20); 0 at -inf; the exps bounded by 1, so
    that the second derivative is finite everywhere (torch.logaddexp's is NaN far from 0)."""
    positive = x > 0
    x_pos, x_neg = torch.where(positive, x, 0), torch.where(positive, 0, x)
    return torch.where(positive, x_pos + torch.log1p(torch.exp(-x_pos)), torch.log1p(torch.exp(x_neg)))


# NTXent's pair term is computed as PML's -log(sigmoid(t) + tiny) where log sigmoid(t) is above this,
# else in log space (pair_terms.inl kNtxDirectAbove)
NTX_DIRECT_ABOVE = -1.0


def ntx_pair_loss(t, tiny):
    """NTXent's pair term -log(sigmoid(t) + tiny) (PML's small_val inside the log): as PML computes
    it where log sigmoid(t) > NTX_DIRECT_ABOVE (0 where sigmoid(t) rounds to 1), else in log space,
    -logaddexp(log sigmoid(t), log tiny), also where PML's e^t is a subnormal rather than 0 (t <
    about -87 in fp32; pair_terms.inl ntx_pair_loss). Written with bounded exps, so that its second
    derivative is finite for every t."""
    log_sigmoid, log_tiny = F.logsigmoid(t), math.log(tiny)
    is_direct = ~(log_sigmoid <= NTX_DIRECT_ABOVE)  # NaN too
    # the value -log(sigmoid(t) + tiny), rounded as PML's (0 where sigmoid(t) rounds to 1); the
    # derivatives those of softplus(-t) - log1p(tiny (1 + e^-t)), the same function, whose gradient
    # (about -sigmoid(-t)) is not lost where sigmoid(t) rounds to 1
    t_direct = torch.where(is_direct, t, torch.zeros_like(t))  # a finite exp where unused
    smooth = softplus(-t_direct) - torch.log1p(tiny * (1 + torch.exp(-t_direct)))
    direct = smooth + (-torch.log(torch.sigmoid(t_direct) + tiny) - smooth).detach()
    above = log_sigmoid > log_tiny
    hi, lo = torch.where(above, log_sigmoid, log_tiny), torch.where(above, log_tiny, log_sigmoid)
    log_space = -(hi + torch.log1p(torch.exp(lo - hi)))
    return torch.where(is_direct, direct, log_space)


def lp_distances(d2):
    """d = sqrt(d2) with the root's gradient 0 at d = 0 (torch.cdist's choice)."""
    positive = d2 > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, d2, torch.ones_like(d2))), torch.zeros_like(d2))


def add_row_chunk_squared_distance_grad(grad_q, grad_d2, q, i0, i1):
    """grad_q += the gradient of sum(grad_d2 * d2) for the squared distances d2 of rows i0..i1 of q
    against every row of q: d2_ij = |q_i|^2 + |q_j|^2 - 2 q_i . q_j, so
    grad_q_i += 2 sum_j g_ij (q_i - q_j) and grad_q_j += 2 g_ij (q_j - q_i)."""
    rows = q[i0:i1]
    grad_q[i0:i1] += 2 * (grad_d2.sum(1, keepdim=True) * rows - grad_d2 @ q)
    grad_q += 2 * (grad_d2.sum(0)[:, None] * q - grad_d2.t() @ rows)


def add_row_chunk_distance_grad(grad_q, grad_d, d, q, i0, i1):
    """The same for the distances d = sqrt(d2): dd/dd2 = 1 / (2 d), 0 at d = 0."""
    coef = torch.where(d > 0, grad_d / torch.where(d > 0, 2 * d, torch.ones_like(d)), torch.zeros_like(d))
    add_row_chunk_squared_distance_grad(grad_q, coef, q, i0, i1)
