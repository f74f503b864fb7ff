"""Smooth-AP (Brown et al., ECCV 2020; PML SmoothAPLoss), cosine similarity.

PML's computation, which reads the batch as consecutive blocks rather than by label: with U the
number of distinct labels (every label must have the same count, as PML checks), the rows form
blocks of b = U consecutive rows; for an anchor a in block B(a) and each p in B(a) (a itself
included), with z_apj = (S_aj - S_ap) / temperature,
    R_ap = 1 + sum_{j != p} sigmoid(z_apj)              (j over the whole batch),
    P_ap = 1 + sum_{j in B(a), j != p} sigmoid(z_apj),
    AP_a = (1 / b) sum_{p in B(a)} P_ap / R_ap,   L_a = (1 - AP_a) w_a,   loss = mean of L_a
(w: PML's miner weights). For batches laid out class by class with as many samples per class as
classes, the blocks are the classes (the paper's setting).

Cubic compute (N b N sigmoids), no cubic memory: the op `fused_pairloss::smooth_ap_rows` walks the
anchors in chunks (S of a chunk against every row, the chunk x b x N sigmoids, reduced to AP per
anchor) and its backward op recomputes each chunk with the analytic gradient, so at most one
chunk's intermediates (CHUNK_ELEMENTS entries) exist at a time. On CPU and CUDA tensors (fp32 /
fp64) the sigmoids of a chunk are row kernels' (the ops smooth_ap_chunk_ranks / _grad on the
chunk's S, NATIVE_CHUNK_ELEMENTS entries of S per chunk, no sigmoid stored): the compiled CPU ones
(csrc/cpu/rank_rows_cpu.cpp, one padded row per thread) and Triton's on the GPUs
(ops/triton_rank_rows.py); elsewhere PyTorch's. PML builds N x N x N tensors.
"""
from __future__ import annotations

import torch

from .. import _validation as V
from ..ops._common import (LOCAL, CompiledRowKernels, loss_function, normalize,
                           register_recomputing_autograd, row_chunks)
from ..ops.operands import stat_dtype
from ._base import _RowWeightedSelfLoss, check_self_only, run_pair_loss
from ._reference_common import check_distance, miner_weights, nan_in_nan_out
from ._registry import LossEntry

# chunk x b x N sigmoid entries per step (PyTorch), chunk x N entries of S (the row kernels)
CHUNK_ELEMENTS = 1 << 22
NATIVE_CHUNK_ELEMENTS = 1 << 20


def _loss_dtype(embeddings):
    """PML accumulates AP in a torch.zeros buffer of the default dtype: fp16 / bf16 batches get an
    fp32 loss; fp64 keeps fp64 here (a deliberate difference, docs/semantics.md)."""
    return torch.promote_types(embeddings.dtype, torch.get_default_dtype())


def block_size(labels):
    """b = the number of distinct labels, after PML's check that every label has the same count."""
    counts = torch.bincount(torch.as_tensor(labels).long() - int(torch.as_tensor(labels).min()))
    counts = counts[counts > 0]
    if counts.unique().numel() != 1:
        raise ValueError("All classes must have the same number of elements in the labels (as in PML's "
                         f"SmoothAPLoss); got the counts {counts.cpu().tolist()}")
    return int(counts.numel())


def smooth_ap_reference(embeddings, labels, ref_emb=None, ref_labels=None, *, temperature=0.01, distance="cosine",
                        indices_tuple=None):
    """PML SmoothAPLoss (smooth_ap.py) step by step: the N x N x N ranks of every p in every row, the
    ranks within the consecutive blocks, AP per anchor, (1 - AP) times the miner weights, their mean."""
    check_distance(distance, allowed=("cosine",), loss="smooth_ap_loss")
    check_self_only(embeddings, labels, ref_emb, ref_labels, "SmoothAPLoss")
    labels = torch.as_tensor(labels, device=embeddings.device)
    b = block_size(labels)
    n = embeddings.shape[0]
    sims = normalize(embeddings) @ normalize(embeddings).t()
    off_diagonal = 1.0 - torch.eye(n, dtype=sims.dtype, device=sims.device)
    diff = sims.unsqueeze(1) - sims.unsqueeze(2)  # [a, p, j] = S_aj - S_ap
    ranks = (torch.sigmoid(diff / temperature) * off_diagonal).sum(-1) + 1
    blocks = normalize(embeddings).view(n // b, b, -1)
    block_sims = blocks @ blocks.transpose(1, 2)
    block_diff = block_sims.unsqueeze(2) - block_sims.unsqueeze(3)  # [i, a', p', j'] = S_a'j' - S_a'p'
    block_mask = 1.0 - torch.eye(b, dtype=sims.dtype, device=sims.device)
    pos_ranks = (torch.sigmoid(block_diff / temperature) * block_mask).sum(-1) + 1  # [i, a', p']
    rows = torch.arange(n, device=sims.device)
    block_cols = (rows // b * b)[:, None] + torch.arange(b, device=sims.device)[None, :]
    all_ranks = ranks.gather(1, block_cols)
    ap = (pos_ranks.reshape(n, b) / all_ranks).sum(1) / b
    loss = ((1 - ap) * miner_weights(indices_tuple, labels, ap.dtype)).mean()
    return nan_in_nan_out(loss.to(_loss_dtype(embeddings)), embeddings, None)


# ---- the op: AP per anchor, anchors in chunks ----------------------------------------------------
def _chunk_terms(q_chunk, q, a0, b, temperature):
    """The chunk's sigmoids (c x b x N, 0 at j = p), the ranks R and P (c x b), and the block
    columns (c x b)."""
    c, n = q_chunk.shape[0], q.shape[0]
    s = q_chunk @ q.t()  # c x N
    rows = torch.arange(a0, a0 + c, device=q.device)
    block_cols = (rows // b * b)[:, None] + torch.arange(b, device=q.device)[None, :]  # c x b
    s_ap = s.gather(1, block_cols)  # c x b
    sig = torch.sigmoid((s[:, None, :] - s_ap[:, :, None]) / temperature)  # c x b x N
    not_p = torch.arange(n, device=q.device)[None, None, :] != block_cols[:, :, None]
    sig = torch.where(not_p, sig, torch.zeros_like(sig))
    all_ranks = sig.sum(-1) + 1
    pos_ranks = sig.gather(2, block_cols[:, None, :].expand(c, b, b)).sum(-1) + 1
    return sig, all_ranks, pos_ranks, block_cols


def _chunk_ap(q_chunk, q, a0, b, temperature):
    """AP of anchors a0 .. a0 + len(q_chunk) (module docstring), differentiable."""
    _, all_ranks, pos_ranks, _ = _chunk_terms(q_chunk, q, a0, b, temperature)
    return (pos_ranks / all_ranks).sum(1) / b


# the row kernels' check on the rows (their fake kernels: S's rows' AP, and G like S)
_native_chunks = CompiledRowKernels({
    "smooth_ap_chunk_ranks": lambda S, first_row, block, temperature: S.new_empty((S.shape[0],)),
    "smooth_ap_chunk_grad": lambda S, grad_ap, first_row, block, temperature: torch.empty_like(S),
})


def _chunks(qa, block):
    """[(a0, a1)] of the anchors: chunks of S rows for the compiled kernels, of sigmoids else."""
    n = qa.shape[0]
    if _native_chunks(qa):
        return row_chunks(n, n, NATIVE_CHUNK_ELEMENTS)
    return row_chunks(n, block * n, CHUNK_ELEMENTS)


@torch.library.custom_op("fused_pairloss::smooth_ap_rows", mutates_args=())
def smooth_ap_rows(q: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """A[N]: Smooth-AP of every anchor row of the normalized rows q, in blocks of as many rows as
    `labels` has distinct values (PML's layout, module docstring)."""
    block = block_size(labels)
    A = stat_dtype(q.dtype)
    qa = q.to(A)
    out = torch.empty(q.shape[0], dtype=A, device=q.device)
    native = _native_chunks(qa)
    with torch.no_grad(), torch.autocast(q.device.type, enabled=False):
        for a0, a1 in _chunks(qa, block):
            if native:
                s = (qa[a0:a1] @ qa.t()).contiguous()
                out[a0:a1] = torch.ops.fused_pairloss.smooth_ap_chunk_ranks(s, a0, block, temperature)
            else:
                out[a0:a1] = _chunk_ap(qa[a0:a1], qa, a0, block, temperature)
    return out


@smooth_ap_rows.register_fake
def _fake(q, labels, temperature):
    return q.new_empty((q.shape[0],), dtype=stat_dtype(q.dtype))


@torch.library.custom_op("fused_pairloss::smooth_ap_rows_backward", mutates_args=())
def smooth_ap_rows_backward(grad: torch.Tensor, q: torch.Tensor, labels: torch.Tensor,
                            temperature: float) -> torch.Tensor:
    """grad_q of sum(grad * smooth_ap_rows), each anchor chunk recomputed: with u_apj the gradient
    of z_apj = (S_aj - S_ap) / t, u = [j != p] (dL/dR_ap + [j in B(a)] dL/dP_ap) sig (1 - sig),
    dL/dP_ap = g_a / (b R_ap), dL/dR_ap = -g_a P_ap / (b R_ap^2); then dL/dS_aj = (sum_p u_apj - [j in
    B(a)] sum_j' u_a,j,j') / t and grad_q = G q + G^T q, chunk by chunk."""
    block = block_size(labels)
    A = stat_dtype(q.dtype)
    qa, g = q.to(A), grad.to(A)
    grad_q = torch.zeros_like(qa)
    native = _native_chunks(qa)
    with torch.autocast(q.device.type, enabled=False):
        for a0, a1 in _chunks(qa, block):
            if native:
                s = (qa[a0:a1] @ qa.t()).contiguous()
                G = torch.ops.fused_pairloss.smooth_ap_chunk_grad(s, g[a0:a1].contiguous(), a0, block, temperature)
            else:
                G = _chunk_grad(qa[a0:a1], qa, a0, block, temperature, g[a0:a1])
            grad_q[a0:a1] += G @ qa
            grad_q += G.t() @ qa[a0:a1]
    return grad_q.to(q.dtype)


def _chunk_grad(q_chunk, q, a0, b, temperature, g):
    """dL/dS of the chunk's rows (c x N) for L = sum_a g_a AP_a (smooth_ap_rows_backward)."""
    sig, all_ranks, pos_ranks, block_cols = _chunk_terms(q_chunk, q, a0, b, temperature)
    ga = g[:, None] / b
    d_pos = ga / all_ranks  # c x b
    d_all = -ga * pos_ranks / all_ranks ** 2
    in_block = torch.zeros(sig.shape[0], 1, sig.shape[2], dtype=torch.bool, device=q.device)
    in_block = in_block.scatter(2, block_cols[:, None, :], True)  # c x 1 x N
    u = (d_all[:, :, None] + torch.where(in_block, d_pos[:, :, None], 0.0)) * sig * (1 - sig)
    return u.sum(1).scatter_add(1, block_cols, -u.sum(2)) / temperature


def _differentiable_ap(q, labels, temperature):
    """smooth_ap_rows as a differentiable computation, chunk by chunk (create_graph=True only)."""
    block = block_size(labels)
    A = stat_dtype(q.dtype)
    return torch.cat([_chunk_ap(q[a0:a1].to(A), q.to(A), a0, block, temperature)
                      for a0, a1 in row_chunks(q.shape[0], block * q.shape[0], CHUNK_ELEMENTS)])


@smooth_ap_rows_backward.register_fake
def _fake_backward(grad, q, labels, temperature):
    return torch.empty_like(q)


register_recomputing_autograd(smooth_ap_rows, smooth_ap_rows_backward, _differentiable_ap)


@loss_function
def smooth_ap_fused(embeddings, labels, ref_emb, ref_labels, *, temperature=0.01, distance="cosine", backend,
                    exclude_col=None, batch=LOCAL, row_weights=None):
    check_self_only(embeddings, labels, ref_emb, ref_labels, "SmoothAPLoss")
    labels = torch.as_tensor(labels, device=embeddings.device).to(torch.int64).contiguous()
    ap = smooth_ap_rows(normalize(embeddings).contiguous(), labels, float(temperature))
    rows = 1 - ap if row_weights is None else (1 - ap) * row_weights
    return nan_in_nan_out(rows.mean().to(_loss_dtype(embeddings)), embeddings, None)


@loss_function
def smooth_ap_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, temperature=0.01, distance="cosine",
                   backend="auto"):
    """PML SmoothAPLoss(temperature) (CosineSimilarity); every label the same count; no ref_emb."""
    V.check_positive("temperature", temperature)
    check_distance(distance, allowed=("cosine",), loss="smooth_ap_loss")
    check_self_only(embeddings, labels, ref_emb, ref_labels, "SmoothAPLoss")
    if labels is not None and not V._compiling():
        V.check_pair_inputs(embeddings, labels, ref_emb, ref_labels)
        block_size(labels)  # PML's check of the label counts, before any work
    return run_pair_loss(smooth_ap_reference, smooth_ap_fused, embeddings, labels, ref_emb, ref_labels, backend,
                         temperature=temperature, distance=distance)


class SmoothAPLoss(_RowWeightedSelfLoss):
    """Drop-in for pytorch_metric_learning.losses.SmoothAPLoss (CosineSimilarity; labels required,
    every label with the same count; no ref_emb, as PML). An indices_tuple gives PML's miner
    weights on the fused rows."""
    _empty_batch_value = None  # PML raises (its labels must form classes of one size)
    _distances = ("cosine",)
    _cosine_only = True
    _reference = staticmethod(smooth_ap_reference)

    def __init__(self, temperature=0.01, backend="auto", **kwargs):
        super().__init__()
        V.check_positive("temperature", temperature)
        self.temperature = temperature
        self._init_pair(backend, kwargs, (temperature,))

    def _hyper(self):
        return dict(temperature=self.temperature, distance=self._distance_kind)

    def _functional(self):
        return smooth_ap_loss


ENTRIES = (
    LossEntry(SmoothAPLoss, "pair", functional=smooth_ap_loss, reference=smooth_ap_reference, fused=smooth_ap_fused,
              hyper=("temperature",), ref_emb=False, equal_label_counts=True),
)
