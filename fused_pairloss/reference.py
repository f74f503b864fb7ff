"""Pure-PyTorch implementations: the executable definition of every loss (SPEC §2).

They materialize the N x M similarity matrix and follow pytorch-metric-learning (PML) 2.9 step by
step (same masks, same masked log-sum-exp, same reductions and quirks), so they agree with PML to
rounding; the test suite checks that. Every fused backend is tested against this module.

These are what backend="reference" runs. The materializing oracles of the fused ops themselves
(for op-level tests of each backend) are fused_pairloss/ops/oracle.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


__all__ = [
    "multi_similarity_loss",
    "circle_loss",
    "soft_triple_loss",
    "proxy_circle_loss",
    "sparse_centers_regularizer",
]


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, p=2, dim=1)  # eps 1e-12, as PML's CosineSimilarity


def _pair_masks(labels, ref_labels, exclude_self):
    """PML get_all_pairs_indices as masks: positives exclude j == i iff `exclude_self`."""
    matches = labels.unsqueeze(1) == ref_labels.unsqueeze(0)
    diffs = ~matches
    if exclude_self:
        matches = matches.clone()
        matches.fill_diagonal_(False)
    return matches, diffs


def _masks_from_indices(indices_tuple, shape, device):
    """An explicit PML indices_tuple (pairs a1, p, a2, n or triplets a, p, n) as pair masks."""
    if len(indices_tuple) == 3:
        a, p, n = indices_tuple
        indices_tuple = (a, p, a, n)
    a1, p, a2, n = (t.to(device=device, dtype=torch.long) for t in indices_tuple)
    pos = torch.zeros(shape, dtype=torch.bool, device=device)
    neg = torch.zeros(shape, dtype=torch.bool, device=device)
    pos[a1, p] = True
    neg[a2, n] = True
    return pos, neg, a1.numel(), a2.numel()


def multi_similarity_mine(sim, pos_mask, neg_mask, epsilon):
    """PML MultiSimilarityMiner as masks (SPEC §2): thresholds over the unmined sets of each row."""
    sim = sim.detach()
    min_pos = torch.where(pos_mask, sim, torch.full_like(sim, float("inf"))).amin(dim=1, keepdim=True)
    max_neg = torch.where(neg_mask, sim, torch.full_like(sim, float("-inf"))).amax(dim=1, keepdim=True)
    hard_pos = pos_mask & (sim - epsilon < max_neg)
    hard_neg = neg_mask & (sim + epsilon > min_pos)
    return hard_pos, hard_neg


def _masked_logsumexp(x, keep_mask, add_one):
    """PML lmu.logsumexp(x, keep_mask, add_one, dim=1), per row."""
    x = x.masked_fill(~keep_mask, float("-inf"))
    if add_one:
        x = torch.cat([x, torch.zeros(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)
    out = torch.logsumexp(x, dim=1, keepdim=True)
    return out.masked_fill(~torch.any(keep_mask, dim=1, keepdim=True), 0)


def _prepare_pairs(embeddings, labels, ref_emb, ref_labels, indices_tuple, miner_epsilon):
    """Similarity matrix and (mined) pair masks exactly as PML's GenericPairLoss builds them."""
    exclude_self = ref_emb is None or ref_labels is labels
    if ref_emb is None:
        ref_emb, ref_labels = embeddings, labels
    sim = _normalize(embeddings) @ _normalize(ref_emb).t()
    if indices_tuple is not None:
        pos, neg, n_pos, n_neg = _masks_from_indices(indices_tuple, sim.shape, sim.device)
    else:
        pos, neg = _pair_masks(labels, ref_labels, exclude_self)
        if miner_epsilon is not None:
            pos, neg = multi_similarity_mine(sim, pos, neg, miner_epsilon)
        n_pos, n_neg = pos.sum(), neg.sum()
    # PML quirk: at most one positive and one negative pair in the whole batch -> loss 0.
    too_few_pairs = torch.as_tensor((n_pos <= 1) & (n_neg <= 1), device=sim.device)
    return sim, pos, neg, too_few_pairs


def _zero_loss(embeddings):
    return torch.sum(embeddings * 0)  # PML reducers' zero_loss: 0, attached to the graph


def multi_similarity_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, alpha=2.0,
                          beta=50.0, base=0.5, miner_epsilon=None, indices_tuple=None):
    """PML MultiSimilarityLoss (MeanReducer); `miner_epsilon` = PML MultiSimilarityMiner(e)."""
    sim, pos, neg, too_few = _prepare_pairs(embeddings, labels, ref_emb, ref_labels,
                                            indices_tuple, miner_epsilon)
    pos_loss = (1.0 / alpha) * _masked_logsumexp(alpha * (base - sim), pos, add_one=True)
    neg_loss = (1.0 / beta) * _masked_logsumexp(beta * (sim - base), neg, add_one=True)
    loss = torch.mean(pos_loss + neg_loss)
    loss = torch.where(too_few, _zero_loss(embeddings), loss)
    if miner_epsilon is not None:
        # Mining compares S with thresholds and a NaN compares false, so a NaN row would silently
        # drop out; adding an exact 0 derived from the inputs keeps "NaN in, NaN out".
        loss = loss + _zero_loss(embeddings) + (0 if ref_emb is None else _zero_loss(ref_emb))
    return loss


def circle_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, m=0.4, gamma=80.0,
                indices_tuple=None):
    """PML CircleLoss (AvgNonZeroReducer, detached alpha weights)."""
    sim, pos, neg, too_few = _prepare_pairs(embeddings, labels, ref_emb, ref_labels,
                                            indices_tuple, None)
    op, on, delta_p, delta_n = 1 + m, -m, 1 - m, m
    sg = sim.detach()
    logits = torch.zeros_like(sim)
    logits = torch.where(pos, -gamma * torch.relu(op - sg) * (sim - delta_p), logits)
    logits = torch.where(neg, gamma * torch.relu(sg - on) * (sim - delta_n), logits)
    lse_pos = _masked_logsumexp(logits, pos, add_one=False)
    lse_neg = _masked_logsumexp(logits, neg, add_one=False)
    losses = F.softplus(lse_pos + lse_neg).squeeze(1)
    has_both = pos.any(dim=1) & neg.any(dim=1)
    losses = losses * has_both.to(losses.dtype)
    # AvgNonZeroReducer: mean over losses > 0, zero loss if there are none
    above = losses > 0
    n_above = above.sum()
    mean_above = torch.where(above, losses, torch.zeros_like(losses)).sum() / n_above.clamp(min=1)
    loss = torch.where(n_above > 0, mean_above, _zero_loss(embeddings))
    return torch.where(too_few, _zero_loss(embeddings), loss)


def sparse_centers_regularizer(centers, centers_per_class):
    """PML SparseCentersRegularizer on fc (D, C*K): mean over same-class center pairs k < k' of
    sqrt(2 + tiny - min(2 cos, 2)), divided by C*K*(K-1) (PML's DivisorReducer)."""
    K = centers_per_class
    w = _normalize(centers.t())
    CK = w.shape[0]
    sims = w @ w.t()
    cls = torch.arange(CK, device=w.device) // K
    same = (cls.unsqueeze(1) == cls.unsqueeze(0)) & torch.ones(CK, CK, dtype=torch.bool, device=w.device).triu(1)
    tiny = torch.finfo(centers.dtype).tiny
    reg = torch.sqrt(2.0 + tiny - torch.clamp(2.0 * sims[same], max=2))
    return reg.sum() / (2 * same.sum())


def soft_triple_loss(embeddings, labels, centers, *, centers_per_class=10, la=20.0, gamma=0.1,
                     margin=0.01, center_reg_weight=0.0):
    """PML SoftTripleLoss (MeanReducer); centers = PML's `fc`, shape (D, C*K)."""
    K = centers_per_class
    C = centers.shape[1] // K
    sim_to_centers = _normalize(embeddings) @ _normalize(centers.t()).t()
    sim_to_centers = sim_to_centers.view(-1, C, K)
    prob = F.softmax(sim_to_centers * (1.0 / gamma), dim=2)
    sim_to_classes = torch.sum(prob * sim_to_centers, dim=2)
    margin_mat = torch.zeros_like(sim_to_classes)
    margin_mat[torch.arange(margin_mat.shape[0], device=margin_mat.device), labels] = margin
    loss = F.cross_entropy(la * (sim_to_classes - margin_mat), labels, reduction="none").mean()
    if center_reg_weight:
        loss = loss + center_reg_weight * sparse_centers_regularizer(centers, K)
    return loss


def proxy_circle_loss(embeddings, labels, proxies, *, m=0.25, gamma=256.0):
    """Circle loss with class-level labels (SPEC §2; the paper's unified formula, one positive
    per sample). proxies: (D, C)."""
    sim = _normalize(embeddings) @ _normalize(proxies.t()).t()  # (N, C)
    sg = sim.detach()
    target = F.one_hot(labels, sim.shape[1]).bool()
    sp = sim[target]
    lp = -gamma * torch.relu(1 + m - sg[target]) * (sp - (1 - m))
    ln = gamma * torch.relu(sg + m) * (sim - m)
    lse_n = torch.logsumexp(ln.masked_fill(target, float("-inf")), dim=1)
    return F.softplus(lse_n + lp).mean()
