"""Circle loss, pair-wise labels (Sun et al., CVPR 2020; PML CircleLoss) on the pair engine.

Declaration (docs/semantics.md): pos x = -gamma relu(1+m - sg(S)) (S - (1-m)), neg x = gamma
relu(sg(S) + m) (S - m) (detached weights), both reduced by LSE.
Row combination: L_i = softplus(lse_pos_i + lse_neg_i) (0 when a set is empty: lse is -inf there),
loss = mean of the L_i > 0 (PML AvgNonZeroReducer), 0 if there are none; PML's few-pairs rule.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _validation as V
from ..ops import engines
from ..ops._common import LOCAL, loss_function, pair_operands, similarity_dtype, zero_loss
from ..ops.spec import PairLossSpec, PairTerm
from ..ops.stats import pair_stats
from ._base import _PairLoss, run_pair_loss
from ._reference_common import avg_non_zero, check_distance, masked_logsumexp, prepare_pairs
from ._registry import LossEntry


def circle_reference(embeddings, labels, ref_emb=None, ref_labels=None, *, m=0.4, gamma=80.0,
                     distance="cosine", indices_tuple=None):
    """PML CircleLoss (AvgNonZeroReducer, detached alpha weights). PML asserts
    CosineSimilarity (circle_loss.py:29), so any other distance is a ValueError here."""
    check_distance(distance, ("cosine",), loss="circle_loss (PML's CircleLoss asserts CosineSimilarity)")
    sim, pos, neg, too_few = prepare_pairs(embeddings, labels, ref_emb, ref_labels,
                                           indices_tuple, None)
    op, on, delta_p, delta_n = 1 + m, -m, 1 - m, m
    sg = sim.detach()
    logits = torch.zeros_like(sim)
    logits = torch.where(pos, -gamma * torch.relu(op - sg) * (sim - delta_p), logits)
    logits = torch.where(neg, gamma * torch.relu(sg - on) * (sim - delta_n), logits)
    lse_pos = masked_logsumexp(logits, pos, add_one=False)
    lse_neg = masked_logsumexp(logits, neg, add_one=False)
    losses = F.softplus(lse_pos + lse_neg).squeeze(1)
    has_both = pos.any(dim=1) & neg.any(dim=1)
    losses = losses * has_both.to(losses.dtype)
    loss = avg_non_zero(losses, embeddings)
    loss = torch.where(too_few, zero_loss(embeddings), loss)
    # a NaN in ref_emb makes every row NaN, which AvgNonZero drops (PML: 0); NaN in, NaN out. A NaN
    # query row alone drops out as in PML.
    loss = loss + (0 if ref_emb is None else zero_loss(ref_emb))
    return loss.to(similarity_dtype(embeddings, "cosine"))


def declaration(m, gamma):
    # PML: -gamma * relu(op - S) * (S - delta_p), op = 1+m, delta_p = 1-m
    pos = PairTerm(scale=-gamma, shift=1.0 - m, weight_offset=1.0 + m, weight_slope=-1.0, lse=True)
    # PML:  gamma * relu(S - on) * (S - delta_n), on = -m, delta_n = m
    neg = PairTerm(scale=gamma, shift=m, weight_offset=m, weight_slope=1.0, lse=True)
    return PairLossSpec(pos=pos, neg=neg)


def combine(st: engines.PairStats, embeddings, *, batch=LOCAL):
    rows = F.softplus(st.lse_pos + st.lse_neg)
    # PML's row losses are in its similarity matrix's dtype: in fp16 a row below half its smallest
    # subnormal (3e-8) is 0 there, and its AvgNonZero drops it
    rows = torch.where(rows.detach().to(similarity_dtype(embeddings, "cosine")) > 0, rows, torch.zeros_like(rows))
    zero = zero_loss(embeddings)
    loss = batch.mean_above_zero(rows, zero)
    return loss.where(~batch.too_few_pairs(st.count_pos, st.count_neg), zero)


@loss_function
def circle_fused(embeddings, labels, ref_emb, ref_labels, *, m, gamma, backend, exclude_col=None, batch=LOCAL):
    q, r, labels_r, excl = pair_operands(embeddings, labels, ref_emb, ref_labels, exclude_col)
    st = pair_stats(q, r, labels, labels_r, excl, declaration(m, gamma), backend)
    loss = combine(st, embeddings, batch=batch)
    # as the reference: a NaN in the ref (in the distributed wrapper, the gathered batch: a NaN row
    # on any rank) makes the loss NaN
    loss = loss + (0 if ref_emb is None else zero_loss(ref_emb))
    return loss.to(similarity_dtype(embeddings, "cosine"))  # PML's dtype under autocast


@loss_function
def circle_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, m=0.4, gamma=80.0, backend="auto"):
    """PML CircleLoss(m, gamma) (pair-wise labels, cosine similarity)."""
    V.check_real("m", m)
    V.check_positive("gamma", gamma)
    return run_pair_loss(circle_reference, circle_fused, embeddings, labels, ref_emb, ref_labels, backend,
                         m=m, gamma=gamma)


class CircleLoss(_PairLoss):
    """Drop-in for pytorch_metric_learning.losses.CircleLoss (pair-wise labels; cosine only, as PML)."""
    _distances = ("cosine",)
    _cosine_only = True
    _reference = staticmethod(circle_reference)
    _fuses_pair_miners = True  # our MultiSimilarityMiner's and PairMarginMiner's pairs: their rule in the engine

    def __init__(self, m=0.4, gamma=80, backend="auto", **kwargs):
        super().__init__()
        V.check_real("m", m)
        V.check_positive("gamma", gamma)
        self.m, self.gamma = m, gamma
        self._init_pair(backend, kwargs, (m, gamma))
        self.soft_plus = torch.nn.Softplus(beta=1)  # PML's attribute (no state)
        self._hold_pml_read()

    # PML's derived attributes (read-only here: the loss follows m)
    op = property(lambda self: 1 + self.m)
    on = property(lambda self: -self.m)
    delta_p = property(lambda self: 1 - self.m)
    delta_n = property(lambda self: self.m)

    def _hyper(self):
        return dict(m=self.m, gamma=self.gamma)

    def _functional(self):
        return circle_loss


ENTRIES = (
    LossEntry(CircleLoss, "pair", functional=circle_loss, reference=circle_reference, fused=circle_fused,
              hyper=("m", "gamma")),
)
