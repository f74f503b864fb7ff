"""NT-Xent loss (Chen et al., SimCLR 2020; PML NTXentLoss) on the pair engine.

Declaration: x = S / t (distance: -d / t), negatives reduced by LSE, each kept positive by NTXent's
pair term -log(e^x / (e^x + sum_neg e^x') + tiny) = -log(sigmoid(x - lse_neg_i) + tiny), which
needs the row's final lse_neg (the engine reduces the positives in a second walk).
Combination: PML's MeanReducer over the positive pairs (sum of the pair terms / number of positive
pairs); 0 when the batch has no positive or no negative pair; PML's few-pairs rule.
"""
from __future__ import annotations

import torch

from .. import _validation as V
from ..ops import engines
from ..ops._common import LOCAL, loss_function, pair_operands, similarity_dtype, zero_loss
from ..ops.spec import PairLossSpec, PairTerm
from ..ops.stats import pair_stats
from ._base import _PairLoss, run_pair_loss
from ._reference_common import check_distance, pair_setup, too_few_pairs
from ._registry import LossEntry


def ntxent_reference(embeddings, labels, ref_emb=None, ref_labels=None, *, temperature=0.07,
                     distance="cosine", indices_tuple=None):
    """PML NTXentLoss (pair-based; MeanReducer over the positive-pair list, "pos_pair").

    Logits z_ij = S_ij / T (cosine) or -d_ij / T (lp: PML negates non-inverted distances,
    ntxent_loss.py:20-22). Per positive pair (i, j), with i's negatives N_i as the denominator
    (ntxent_loss.py:24-35; n_per_p matches negatives by anchor only, the other positives of i are
    not in it):
        M_ij = max(z_ij, max_{k in N_i} z_ik)                         (detached; z_ij if N_i empty)
        l_ij = -log( e^{z_ij - M_ij} / (e^{z_ij - M_ij} + sum_{k in N_i} e^{z_ik - M_ij}) + tiny )
    with tiny = finfo(dtype).tiny (PML's small_val, inside the log). Without the tiny this is
    softplus(LSE_{N_i} z - z_ij), so a fused kernel needs the row statistic LSE_{N_i} z from a
    first pass (here: max m_i and sum e^{z - m_i}); a positive whose anchor has no negative gives
    l_ij = -log(1 + tiny) = 0 but still counts in the mean.
    loss = sum over the listed positive pairs of l_ij / (number of listed positive pairs)
    (duplicates of an explicit indices_tuple count each time); 0 (graph-attached) when there is no
    positive or no negative pair at all (ntxent_loss.py:17, 43) or by the one-pair rule.
    """
    check_distance(distance, loss="ntxent_loss")
    mat, pos_cnt, neg_cnt = pair_setup(embeddings, labels, ref_emb, ref_labels, indices_tuple,
                                       distance)
    n_pos, n_neg = pos_cnt.sum(), neg_cnt.sum()
    z = (mat if distance == "cosine" else -mat) / temperature
    is_neg = neg_cnt > 0
    zd = z.detach()
    # row statistic of i's negatives: their max m_i and sum_k count_ik e^{z_ik - m_i}
    row_max_neg = torch.where(is_neg, zd, float("-inf")).amax(dim=1, keepdim=True)
    row_has_neg = is_neg.any(dim=1, keepdim=True)
    m_i = torch.where(row_has_neg, row_max_neg, torch.zeros_like(row_max_neg))
    neg_sum = (neg_cnt * torch.exp(z.masked_fill(~is_neg, float("-inf")) - m_i)).sum(dim=1, keepdim=True)
    # per pair: PML's max_val (detached), then e^{z_ik - M_ij} = e^{z_ik - m_i} e^{m_i - M_ij}
    max_val = torch.maximum(zd, row_max_neg)
    scale = torch.exp(torch.where(row_has_neg, row_max_neg, max_val) - max_val)  # <= 1; 1 if N_i empty
    numerator = torch.exp(z - max_val)
    denominator = neg_sum * scale + numerator
    pair_losses = -torch.log(numerator / denominator + torch.finfo(z.dtype).tiny)
    is_pos = pos_cnt > 0
    total = torch.where(is_pos, pos_cnt * pair_losses, torch.zeros_like(pair_losses)).sum()
    loss = total / n_pos.clamp(min=1)
    loss = torch.where((n_pos > 0) & (n_neg > 0), loss, zero_loss(embeddings))
    loss = torch.where(too_few_pairs(n_pos, n_neg, mat.device), zero_loss(embeddings), loss)
    return loss.to(similarity_dtype(embeddings, distance))


def declaration(temperature, distance="cosine", similarity_dtype=torch.float32):
    """PML's tiny is the smallest normal of its similarity matrix's dtype (`similarity_dtype`):
    fp16's for fp16 inputs or under fp16 autocast, where the engines accumulate in float."""
    scale = (1.0 if distance == "cosine" else -1.0) / temperature  # PML negates distances
    tiny = float(torch.finfo(similarity_dtype).tiny) if similarity_dtype == torch.float16 else None
    return PairLossSpec(pos=PairTerm(scale=scale), neg=PairTerm(scale=scale, lse=True), distance=distance,
                        pos_vs_neg_lse=True, ntx_tiny=tiny)


def combine(st: engines.PairStats, embeddings, *, batch=LOCAL):
    zero = zero_loss(embeddings)
    n_pos, n_neg = batch.sum(st.count_pos), batch.sum(st.count_neg)
    loss = (batch.sum(st.pos_vs_neg) / n_pos.clamp(min=1)).to(embeddings.dtype)
    loss = torch.where((n_pos > 0) & (n_neg > 0), loss, zero)
    return torch.where(batch.too_few_pairs(st.count_pos, st.count_neg), zero, loss)


@loss_function
def ntxent_fused(embeddings, labels, ref_emb, ref_labels, *, temperature, distance="cosine", backend,
                 exclude_col=None, batch=LOCAL):
    q, r, labels_r, excl = pair_operands(embeddings, labels, ref_emb, ref_labels, exclude_col)
    dtype = similarity_dtype(embeddings, distance)  # PML's under autocast
    st = pair_stats(q, r, labels, labels_r, excl, declaration(temperature, distance, dtype), backend)
    return combine(st, embeddings, batch=batch).to(dtype)


@loss_function
def ntxent_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, temperature=0.07, distance="cosine",
                backend="auto"):
    """PML NTXentLoss(temperature): per positive pair, a softmax against the row's negatives."""
    V.check_positive("temperature", temperature)
    V.check_distance(distance)
    return run_pair_loss(ntxent_reference, ntxent_fused, embeddings, labels, ref_emb, ref_labels, backend,
                         temperature=temperature, distance=distance)


class NTXentLoss(_PairLoss):
    """Drop-in for pytorch_metric_learning.losses.NTXentLoss."""
    _pair_based = True  # PML's GenericPairLoss(mat_based_loss=False): the pair list
    _reference = staticmethod(ntxent_reference)
    _fuses_pair_miners = True  # our MultiSimilarityMiner's and PairMarginMiner's pairs: their rule in the engine

    def __init__(self, temperature=0.07, backend="auto", **kwargs):
        super().__init__()
        V.check_positive("temperature", temperature)
        self.temperature = temperature
        self._init_pair(backend, kwargs, (temperature,))

    def _hyper(self):
        return dict(temperature=self.temperature, distance=self._distance_kind)

    def _functional(self):
        return ntxent_loss


ENTRIES = (
    LossEntry(NTXentLoss, "pair", functional=ntxent_loss, reference=ntxent_reference, fused=ntxent_fused,
              hyper=("temperature",)),
)
