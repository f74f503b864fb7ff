"""Rethinking the rank of positives (Li et al., "Rethinking the Optimization of Average Precision:
Only Penalizing Negative Instances before Positive Ones is Enough", AAAI 2022; PML PNPLoss), cosine.

PML's computation: for an anchor a and each p of its positives with a itself (P_a, |P_a| = N_pos),
    rk_ap = sum_{j in N_a} sig(S_aj - S_ap),  sig(x) = 1 / (1 + exp(clamp(-x / anneal, -50, 50)))
(the negatives of a ranked above p; the clamp, PML's, stops the gradient beyond 50 / anneal), then
per variant f(rk): O rk; Ds log(1 + rk); Dq (1 + rk)^-alpha; Iu (1 + rk) log(1 + rk);
Ib (b rk - log(1 + b rk)) / b^2;
    L_a = sum_{p in P_a} f(rk_ap) / N_pos_a,   loss = mean of L_a over the rows with a positive
(Dq: 1 - that; 0 when no row has one). A row without a positive has no P_a at all (PML adds the
diagonal to the positives of the rows that have one).

Cubic compute (N |P_a| N sigmoids), no cubic memory: the op `fused_pairloss::pnp_rows` walks the
anchors in chunks (S of a chunk against every row, the chunk x max|P_a| x N sigmoids, reduced to
L_a) and its backward op recomputes each chunk with the analytic gradient. Each anchor's positives
are listed from the sorted labels (max|P_a| columns, padded). On CPU and CUDA tensors (fp32 /
fp64) the sigmoids of a chunk are row kernels' (the ops pnp_chunk_ranks / _grad on the chunk's S,
NATIVE_CHUNK_ELEMENTS entries of S per chunk, no sigmoid stored): the compiled CPU ones
(csrc/cpu/rank_rows_cpu.cpp) and Triton's on the GPUs (ops/triton_rank_rows.py); elsewhere
PyTorch's. PML builds N x N x N tensors.
"""
from __future__ import annotations

import torch

from .. import _validation as V
from ..ops._common import (LOCAL, CompiledRowKernels, loss_function, label_counts, label_runs, normalize,
                           register_recomputing_autograd, row_chunks, zero_loss)
from ..ops.operands import stat_dtype
from ._base import _PairLoss, check_self_only, run_pair_loss
from ._reference_common import check_distance, nan_in_nan_out
from ._registry import LossEntry

VARIANTS = ("Ds", "Dq", "Iu", "Ib", "O")
# chunk x max|P_a| x N sigmoid entries per step (PyTorch), chunk x N entries of S (the row kernels)
CHUNK_ELEMENTS = 1 << 22
NATIVE_CHUNK_ELEMENTS = 1 << 20
EXPONENT_CLAMP = 50.0  # PML's clamp of -x / anneal


def check_variant(variant):
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {list(VARIANTS)} (as in PML); got {variant!r}")


def _sigmoid(x, anneal):
    """PML's PNPLoss.sigmoid: 1 / (1 + exp(clamp(-x / anneal, -50, 50)))."""
    return 1.0 / (1.0 + torch.exp(torch.clamp(-x / anneal, min=-EXPONENT_CLAMP, max=EXPONENT_CLAMP)))


def _transform(rk, variant, b, alpha):
    """f(rk) of the variant (module docstring)."""
    if variant == "Ds":
        return torch.log(1 + rk)
    if variant == "Dq":
        return 1 / (1 + rk) ** alpha
    if variant == "Iu":
        return (1 + rk) * torch.log(1 + rk)
    if variant == "Ib":
        return 1 / b ** 2 * (b * rk - torch.log(1 + b * rk))
    return rk


def pnp_reference(embeddings, labels, ref_emb=None, ref_labels=None, *, b=2.0, alpha=1.0, anneal=0.01, variant="O",
                  distance="cosine", indices_tuple=None):
    """PML PNPLoss (pnp_loss.py) step by step: the pair indicators (positives with the diagonal),
    the N x N x N differences, the clamped sigmoid over each positive's negatives, the variant,
    the mean over the positives per row and over the rows."""
    check_distance(distance, allowed=("cosine",), loss="pnp_loss")
    check_variant(variant)
    check_self_only(embeddings, labels, ref_emb, ref_labels, "PNPLoss")
    if indices_tuple is not None:
        raise ValueError("PNPLoss: indices_tuple is not supported (as in PML)")
    dtype, device = embeddings.dtype, embeddings.device
    labels = torch.as_tensor(labels, device=device)
    same = labels[:, None] == labels[None, :]
    # the diagonal is a positive of the rows that have another one (PML: I_pos[a1_idx, a1_idx] = 1)
    has_positive = same.sum(1) > 1
    I_pos = (same & has_positive[:, None]).to(dtype)
    I_neg = (~same).to(dtype)
    n_pos = I_pos.sum(1)
    safe = n_pos > 0
    if not bool(safe.any()):
        return zero_loss(embeddings)
    q = normalize(embeddings)
    sims = q @ q.t()
    diff = sims.unsqueeze(1) - sims.unsqueeze(2)  # [a, p, j] = S_aj - S_ap
    rk = (_sigmoid(diff, anneal) * I_neg.unsqueeze(0)).sum(-1)
    rows = (_transform(rk, variant, b, alpha) * I_pos).sum(-1)[safe] / n_pos[safe]
    loss = rows.sum() / safe.sum()
    if variant == "Dq":
        loss = 1 - loss
    return nan_in_nan_out(loss, embeddings, None)


# ---- the op: rk of every anchor's positives, anchors in chunks -------------------------------------
def _positive_lists(labels):
    """(positives A x P, valid A x P): each row's positives with itself, from the sorted labels
    (P = the largest class), padded with the row itself and masked; none for a row without
    another of its label (PML's diagonal is a positive of the rows that have one)."""
    n = labels.shape[0]
    order, starts, _ = label_runs(labels)
    run_start = torch.cummax(torch.where(starts, torch.arange(n, device=labels.device), 0), 0).values
    first = torch.empty_like(labels).scatter_(0, order, run_start)  # per row: where its class starts in order
    counts = label_counts(labels)
    width = int(counts.max()) if n else 0
    k = torch.arange(width, device=labels.device)
    valid = (k[None, :] < counts[:, None]) & (counts[:, None] > 1)
    at = (first[:, None] + k[None, :]).clamp(max=max(n - 1, 0))
    rows = torch.arange(n, device=labels.device)
    return torch.where(valid, order[at], rows[:, None]), valid


def _chunk_terms(q, labels, positives, a0, a1, anneal):
    """The chunk's z = S_aj - S_ap (c x P x N), the clamp's pass mask, the sigmoids over the
    negatives (0 elsewhere) and rk (c x P)."""
    s = q[a0:a1] @ q.t()  # c x N
    s_ap = s.gather(1, positives[a0:a1])  # c x P
    z = s[:, None, :] - s_ap[:, :, None]
    negative = (labels[a0:a1, None] != labels[None, :])[:, None, :]
    sig = torch.where(negative, _sigmoid(z, anneal), torch.zeros_like(z))
    return z, negative, sig, sig.sum(-1)


def _transform_grad(rk, variant, b, alpha):
    """f'(rk) of the variant."""
    if variant == "Ds":
        return 1 / (1 + rk)
    if variant == "Dq":
        return -alpha * (1 + rk) ** (-alpha - 1)
    if variant == "Iu":
        return torch.log(1 + rk) + 1
    if variant == "Ib":
        return (1 - 1 / (1 + b * rk)) / b
    return torch.ones_like(rk)


def _differentiable_rows(q, labels, anneal, variant, b, alpha):
    """L_a (module docstring, before Dq's 1 - mean) as a differentiable computation, in chunks."""
    A = stat_dtype(q.dtype)
    positives, valid = _positive_lists(labels)
    rows = []
    for a0, a1 in row_chunks(q.shape[0], positives.shape[1] * q.shape[0], CHUNK_ELEMENTS):
        rk = _chunk_terms(q.to(A), labels, positives, a0, a1, anneal)[3]
        f = torch.where(valid[a0:a1], _transform(rk, variant, b, alpha), torch.zeros_like(rk))
        rows.append(f.sum(1) / valid[a0:a1].sum(1).clamp(min=1).to(A))
    return torch.cat(rows) if rows else q.new_zeros((0,), dtype=A)


# the row kernels' check on the rows (their fake kernels: rk like positives, and G like S)
_native_chunks = CompiledRowKernels({
    "pnp_chunk_ranks": lambda S, class_ids, positives, first_row, anneal: S.new_empty(positives.shape),
    "pnp_chunk_grad": lambda S, class_ids, positives, grad_rk, first_row, anneal: torch.empty_like(S),
})


class _NativeChunks:
    """The compiled kernels' view of a batch: the chunks, the columns' dense class ids (as the
    rows' dtype) and each row's positive columns (-1 where none)."""

    def __init__(self, qa, labels, positives, valid):
        self.qa, n = qa, qa.shape[0]
        self.ids = torch.unique(labels, return_inverse=True)[1].to(qa.dtype).contiguous()
        self.positives = torch.where(valid, positives, -1).contiguous()
        self.chunks = row_chunks(n, n, NATIVE_CHUNK_ELEMENTS)

    def ranks(self, a0, a1, anneal):
        """(S of the chunk, rk of its rows' positives)."""
        s = (self.qa[a0:a1] @ self.qa.t()).contiguous()
        return s, torch.ops.fused_pairloss.pnp_chunk_ranks(s, self.ids, self.positives[a0:a1].contiguous(), a0,
                                                            anneal)

    def grad(self, s, grad_rk, a0, a1, anneal):
        return torch.ops.fused_pairloss.pnp_chunk_grad(s, self.ids, self.positives[a0:a1].contiguous(),
                                                       grad_rk.contiguous(), a0, anneal)


@torch.library.custom_op("fused_pairloss::pnp_rows", mutates_args=())
def pnp_rows(q: torch.Tensor, labels: torch.Tensor, anneal: float, variant: str, b: float,
             alpha: float) -> torch.Tensor:
    """A[N]: L_a = sum over a's positives p (a itself included) of f(rk_ap) / their number, rk_ap
    the sum over a's negatives j of PML's clamped sigmoid of S_aj - S_ap (module docstring)."""
    A = stat_dtype(q.dtype)
    qa = q.to(A)
    with torch.autocast(q.device.type, enabled=False):
        if not _native_chunks(qa):
            return _differentiable_rows(qa, labels, anneal, variant, b, alpha)
        positives, valid = _positive_lists(labels)
        native = _NativeChunks(qa, labels, positives, valid)
        rows = torch.empty(q.shape[0], dtype=A, device=q.device)
        for a0, a1 in native.chunks:
            rk = native.ranks(a0, a1, anneal)[1]
            v = valid[a0:a1]
            f = torch.where(v, _transform(rk, variant, b, alpha), torch.zeros_like(rk))
            rows[a0:a1] = f.sum(1) / v.sum(1).clamp(min=1).to(A)
        return rows


@pnp_rows.register_fake
def _fake(q, labels, anneal, variant, b, alpha):
    return q.new_empty((q.shape[0],), dtype=stat_dtype(q.dtype))


@torch.library.custom_op("fused_pairloss::pnp_rows_backward", mutates_args=())
def pnp_rows_backward(grad: torch.Tensor, q: torch.Tensor, labels: torch.Tensor, anneal: float, variant: str,
                      b: float, alpha: float) -> torch.Tensor:
    """grad_q of sum(grad * pnp_rows): with g_ap = grad_a f'(rk_ap) / |P_a| and
    u_apj = g_ap sig'(z_apj) over the negatives where PML's clamp passes, dL/dS_aj = sum_p u_apj and
    dL/dS_ap -= sum_j u_apj; grad_q = G q + G^T q, chunk by chunk."""
    A = stat_dtype(q.dtype)
    qa, g = q.to(A), grad.to(A)
    positives, valid = _positive_lists(labels)
    limit = EXPONENT_CLAMP * anneal
    grad_q = torch.zeros_like(qa)
    native = _NativeChunks(qa, labels, positives, valid) if _native_chunks(qa) else None
    chunks = native.chunks if native else row_chunks(q.shape[0], positives.shape[1] * q.shape[0], CHUNK_ELEMENTS)
    with torch.autocast(q.device.type, enabled=False):
        for a0, a1 in chunks:
            if native:
                s, rk = native.ranks(a0, a1, anneal)
            else:
                z, negative, sig, rk = _chunk_terms(qa, labels, positives, a0, a1, anneal)
            v = valid[a0:a1]
            g_ap = torch.where(v, g[a0:a1, None] * _transform_grad(rk, variant, b, alpha)
                               / v.sum(1, keepdim=True).clamp(min=1).to(A), torch.zeros_like(rk))
            if native:
                G = native.grad(s, g_ap, a0, a1, anneal)
            else:
                passes = negative & (z.abs() <= limit)  # inside PML's clamp, whose bounds pass the gradient
                u = torch.where(passes, g_ap[:, :, None] * sig * (1 - sig) / anneal, torch.zeros_like(z))
                G = u.sum(1).scatter_add(1, positives[a0:a1], -u.sum(2))  # c x N
            grad_q[a0:a1] += G @ qa
            grad_q += G.t() @ qa[a0:a1]
    return grad_q.to(q.dtype)


@pnp_rows_backward.register_fake
def _fake_backward(grad, q, labels, anneal, variant, b, alpha):
    return torch.empty_like(q)


register_recomputing_autograd(pnp_rows, pnp_rows_backward, _differentiable_rows)


@loss_function
def pnp_fused(embeddings, labels, ref_emb, ref_labels, *, b=2.0, alpha=1.0, anneal=0.01, variant="O",
              distance="cosine", backend, exclude_col=None, batch=LOCAL):
    check_self_only(embeddings, labels, ref_emb, ref_labels, "PNPLoss")
    labels = torch.as_tensor(labels, device=embeddings.device).to(torch.int64).contiguous()
    rows = pnp_rows(normalize(embeddings).contiguous(), labels, float(anneal), variant, float(b), float(alpha))
    safe = label_counts(labels) > 1  # the rows with a positive: PML's mean is over them
    n_safe = safe.sum()
    loss = rows.sum() / n_safe.clamp(min=1).to(rows.dtype)
    if variant == "Dq":
        loss = 1 - loss
    # no row with a positive: PML's zero loss
    loss = torch.where(n_safe > 0, loss, torch.zeros_like(loss))
    return nan_in_nan_out(loss.to(embeddings.dtype), embeddings, None)


@loss_function
def pnp_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, b=2.0, alpha=1.0, anneal=0.01, variant="O",
             distance="cosine", backend="auto"):
    """PML PNPLoss(b, alpha, anneal, variant) (CosineSimilarity); no ref_emb, no indices_tuple."""
    for name, value in (("b", b), ("alpha", alpha)):
        V.check_real(name, value)
    V.check_positive("anneal", anneal)
    check_variant(variant)
    check_distance(distance, allowed=("cosine",), loss="pnp_loss")
    check_self_only(embeddings, labels, ref_emb, ref_labels, "PNPLoss")
    return run_pair_loss(pnp_reference, pnp_fused, embeddings, labels, ref_emb, ref_labels, backend, b=b,
                         alpha=alpha, anneal=anneal, variant=variant, distance=distance)


class PNPLoss(_PairLoss):
    """Drop-in for pytorch_metric_learning.losses.PNPLoss (CosineSimilarity; labels required; no
    ref_emb and no indices_tuple, as PML)."""
    _refuses_ref = True  # PML: ref_emb is not supported
    VARIANTS = list(VARIANTS)
    _distances = ("cosine",)
    _cosine_only = True
    _reference = staticmethod(pnp_reference)
    _listed_pairs = False
    _fused_in_wrappers = False  # PML's wrappers pass a ref_emb, which PML's PNPLoss refuses

    def __init__(self, b=2, alpha=1, anneal=0.01, variant="O", backend="auto", **kwargs):
        super().__init__()
        check_variant(variant)
        for name, value in (("b", b), ("alpha", alpha)):
            V.check_real(name, value)
        V.check_positive("anneal", anneal)
        self.b, self.alpha, self.anneal, self.variant = b, alpha, anneal, variant
        self._init_pair(backend, kwargs, (b, alpha, anneal, variant))

    def _hyper(self):
        return dict(b=self.b, alpha=self.alpha, anneal=self.anneal, variant=self.variant,
                    distance=self._distance_kind)

    _labels_without_indices = True

    def _functional(self):
        return pnp_loss


ENTRIES = (
    LossEntry(PNPLoss, "pair", functional=pnp_loss, reference=pnp_reference, fused=pnp_fused,
              hyper=("b", "alpha", "anneal", "variant"), ref_emb=False),
)
