"""Multi-Similarity loss (Wang et al., CVPR 2019; PML MultiSimilarityLoss) on the pair engine.

Declaration (docs/semantics.md): cosine: pos x = -alpha (S - base), neg x = beta (S - base); lp
distance: pos x = alpha (d - base), neg x = -beta (d - base) (PML's distance.margin); both sets
reduced by LSE; optionally PML's MultiSimilarityMiner(epsilon).
Row combination: L_i = softplus(lse_pos_i) / alpha + softplus(lse_neg_i) / beta (PML's logsumexp
with add_one), loss = mean over all rows; PML's few-pairs rule.
"""
from __future__ import annotations

import torch

from .. import _validation as V
from ..ops import engines
from ..ops._common import LOCAL, loss_function, logaddexp, pair_operands, similarity_dtype, zero_loss
from ..ops.spec import PairLossSpec, PairTerm
from ..ops.stats import pair_stats
from ._base import _PairLoss, run_pair_loss
from ._reference_common import (check_distance, distance_margin, fp16_rows_normalized_to_nan, masked_logsumexp,
                                prepare_pairs)
from ._registry import LossEntry


def multi_similarity_reference(embeddings, labels, ref_emb=None, ref_labels=None, *, alpha=2.0,
                               beta=50.0, base=0.5, miner_epsilon=None, distance="cosine",
                               indices_tuple=None):
    """PML MultiSimilarityLoss (MeanReducer); `miner_epsilon` = PML MultiSimilarityMiner(e),
    mining with the same distance (PML: MultiSimilarityMiner(e, distance=LpDistance()) for "lp").

    Per row i (PML multi_similarity_loss.py:25-40, margin() of base_distance.py:61-64):
      cosine: L_i = (1/alpha) log(1 + sum_{P_i} e^{-alpha (S_ij - base)})
                  + (1/beta)  log(1 + sum_{N_i} e^{ beta (S_ij - base)})
      lp:     L_i = (1/alpha) log(1 + sum_{P_i} e^{ alpha (d_ij - base)})
                  + (1/beta)  log(1 + sum_{N_i} e^{-beta (d_ij - base)})
    (an empty set gives 0); loss = (1/N) sum_i L_i over all rows; one-pair rule -> 0.
    """
    check_distance(distance, loss="multi_similarity_loss")
    mat, pos, neg, too_few = prepare_pairs(embeddings, labels, ref_emb, ref_labels,
                                           indices_tuple, miner_epsilon, distance)
    pos_exp = distance_margin(mat, base, distance)  # cosine: base - S; lp: d - base
    neg_exp = distance_margin(base, mat, distance)  # cosine: S - base; lp: base - d
    pos_loss = (1.0 / alpha) * masked_logsumexp(alpha * pos_exp, pos, add_one=True)
    neg_loss = (1.0 / beta) * masked_logsumexp(beta * neg_exp, neg, add_one=True)
    loss = torch.mean(pos_loss + neg_loss)
    loss = torch.where(too_few, zero_loss(embeddings), loss)
    if miner_epsilon is not None:
        # Mining compares S with thresholds and a NaN compares false, so a NaN row would silently
        # drop out; adding an exact 0 derived from the inputs keeps "NaN in, NaN out".
        loss = loss + zero_loss(embeddings) + (0 if ref_emb is None else zero_loss(ref_emb))
    return loss.to(similarity_dtype(embeddings, distance))


def declaration(alpha, beta, base, miner_epsilon=None, distance="cosine", exclude_after_mining=False):
    """exclude_after_mining: the excluded column takes part in the mining thresholds (PML's
    CrossBatchMemory runs its miner against the memory, self slot included, then removes the self
    comparisons)."""
    sign = 1.0 if distance == "lp" else -1.0  # PML: margin(x, y) = y - x for a similarity
    return PairLossSpec(pos=PairTerm(scale=sign * alpha, shift=base, lse=True),
                        neg=PairTerm(scale=-sign * beta, shift=base, lse=True),
                        distance=distance, miner_epsilon=miner_epsilon,
                        exclude_after_mining=bool(exclude_after_mining and miner_epsilon is not None))


def combine(st: engines.PairStats, embeddings, *, alpha, beta, mined, batch=LOCAL):
    zero = torch.zeros_like(st.lse_pos)
    # softplus(x) = log(1 + e^x) = logaddexp(x, 0); exact at -inf (empty set -> 0)
    rows = logaddexp(st.lse_pos, zero) / alpha + logaddexp(st.lse_neg, zero) / beta
    loss = batch.mean(rows).to(embeddings.dtype)
    loss = torch.where(batch.too_few_pairs(st.count_pos, st.count_neg), zero_loss(embeddings), loss)
    if mined:  # NaN in, NaN out also through the mining comparisons
        loss = loss + zero_loss(embeddings)
    return loss


@loss_function
def multi_similarity_fused(embeddings, labels, ref_emb, ref_labels, *, alpha, beta, base, miner_epsilon,
                           distance="cosine", backend, exclude_col=None, batch=LOCAL, exclude_after_mining=False):
    if (miner_epsilon is not None and batch is LOCAL and exclude_col is None and isinstance(backend, str)
            and not V._compiling() and fp16_rows_normalized_to_nan(embeddings, ref_emb)):
        # PML's miner drops an fp16 zero row's NaN similarities, which the engine's mining reads
        # otherwise: PML's steps
        return multi_similarity_reference(embeddings, labels, ref_emb, ref_labels, alpha=alpha, beta=beta, base=base,
                                          miner_epsilon=miner_epsilon, distance=distance)
    q, r, labels_r, excl = pair_operands(embeddings, labels, ref_emb, ref_labels, exclude_col)
    st = pair_stats(q, r, labels, labels_r, excl,
                    declaration(alpha, beta, base, miner_epsilon, distance, exclude_after_mining), backend)
    loss = combine(st, embeddings, alpha=alpha, beta=beta, mined=miner_epsilon is not None, batch=batch)
    if miner_epsilon is not None and ref_emb is not None:
        loss = loss + zero_loss(ref_emb)
    return loss.to(similarity_dtype(embeddings, distance))  # PML's dtype under autocast


@loss_function
def multi_similarity_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, alpha=2.0, beta=50.0, base=0.5,
                          miner_epsilon=None, distance="cosine", backend="auto"):
    """PML MultiSimilarityLoss(alpha, beta, base); with miner_epsilon=e, PML's
    MultiSimilarityMiner(e) (same distance) applied first. Returns a 0-dim tensor in the input dtype."""
    V.check_positive("alpha", alpha)
    V.check_positive("beta", beta)
    V.check_real("base", base)
    V.check_real("miner_epsilon", miner_epsilon, allow_none=True)
    V.check_distance(distance)
    return run_pair_loss(multi_similarity_reference, multi_similarity_fused, embeddings, labels, ref_emb, ref_labels,
                         backend, alpha=alpha, beta=beta, base=base, miner_epsilon=miner_epsilon, distance=distance)


class MultiSimilarityLoss(_PairLoss):
    """Drop-in for pytorch_metric_learning.losses.MultiSimilarityLoss; miner_epsilon=e replaces
    PML's MultiSimilarityMiner(e) + MultiSimilarityLoss (the miner uses the loss's distance)."""
    _reference = staticmethod(multi_similarity_reference)
    _fuses_pair_miners = True  # our MultiSimilarityMiner's and PairMarginMiner's pairs: their rule in the engine

    def __init__(self, alpha=2, beta=50, base=0.5, miner_epsilon=None, backend="auto", **kwargs):
        super().__init__()
        V.check_positive("alpha", alpha)
        V.check_positive("beta", beta)
        V.check_real("base", base)
        V.check_real("miner_epsilon", miner_epsilon, allow_none=True)
        self.alpha, self.beta, self.base, self.miner_epsilon = alpha, beta, base, miner_epsilon
        self._init_pair(backend, kwargs, (alpha, beta, base))

    def _hyper(self):
        return dict(alpha=self.alpha, beta=self.beta, base=self.base, distance=self._distance_kind)

    def _functional(self):
        return multi_similarity_loss

    def _listed_hyper(self):  # with an indices_tuple PML's loss does not mine
        return dict(self._hyper(), miner_epsilon=None)

    def _forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        if indices_tuple is not None and self.miner_epsilon is not None:
            raise ValueError("pass either indices_tuple or miner_epsilon, not both")
        if indices_tuple is None:
            return multi_similarity_loss(embeddings, labels, ref_emb, ref_labels,
                                         miner_epsilon=self.miner_epsilon, backend=self.backend,
                                         **self._hyper())
        return super()._forward(embeddings, labels, indices_tuple, ref_emb, ref_labels)

    def _run_pml(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        """PML's computation (a reducer, a regularizer, another distance): with miner_epsilon, PML's
        MultiSimilarityMiner(miner_epsilon) with the loss's distance, then PML's loss on its pairs."""
        if self.miner_epsilon is not None:
            if indices_tuple is not None:
                raise ValueError("pass either indices_tuple or miner_epsilon, not both")
            from pytorch_metric_learning.miners import MultiSimilarityMiner
            miner = MultiSimilarityMiner(self.miner_epsilon, distance=self.distance)
            indices_tuple = miner(embeddings, labels, ref_emb, ref_labels)
        return super()._run_pml(embeddings, labels, indices_tuple, ref_emb, ref_labels)

    def extra_repr(self):
        return super().extra_repr() + f", miner_epsilon={self.miner_epsilon}"


ENTRIES = (
    LossEntry(MultiSimilarityLoss, "pair", functional=multi_similarity_loss, reference=multi_similarity_reference,
              fused=multi_similarity_fused, hyper=("alpha", "beta", "base")),
)
