"""Pure-PyTorch implementations: the executable definition of every loss (docs/semantics.md).

They materialize the N x M similarity matrix and follow pytorch-metric-learning (PML) 2.9 step by
step (same masks, same masked log-sum-exp, same reductions and quirks), so they agree with PML to
rounding; the test suite checks that. Every fused backend is tested against this module.

These are what backend="reference" runs: pair losses `multi_similarity_loss`, `circle_loss`,
`ntxent_loss`, `supcon_loss`, `contrastive_loss`, `generalized_lifted_structure_loss` (distance
"cosine" or "lp"), class losses `soft_triple_loss`, `proxy_circle_loss`, `proxy_anchor_loss`,
`normalized_softmax_loss`, `cosface_loss`, `arcface_loss` (the parameter tensor in PML's own
layout). Each docstring states the per-row / per-pair math a fused kernel reproduces. The
materializing oracles of the fused ops themselves (op-level tests of each backend) are
fused_pairloss/ops/oracle.py.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


__all__ = [
    "multi_similarity_loss",
    "circle_loss",
    "ntxent_loss",
    "supcon_loss",
    "contrastive_loss",
    "generalized_lifted_structure_loss",
    "proxy_anchor_loss",
    "normalized_softmax_loss",
    "cosface_loss",
    "arcface_loss",
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


def _pair_counts_from_indices(indices_tuple, shape, device):
    """An explicit PML indices_tuple as matrices of pair multiplicities (int64).

    PML's lmu.convert_to_pairs (loss_and_miner_utils.py:55-70) turns triplets (a, p, n) into the
    pair lists (a, p, a, n), so a triplet miner lists each pair once per triplet it is in. The
    pair-based losses (NTXent, Contrastive: GenericPairLoss.pair_based_loss, generic_pair_loss.py:
    34-41) compute one loss per listed pair, duplicates included, so they need the counts; the
    mat-based ones (MS, Circle, SupCon, GeneralizedLiftedStructure: mat_based_loss, lines 26-32)
    set mask[a1, p] = 1 and only see count > 0. The one-pair rule counts list lengths.
    """
    if len(indices_tuple) == 3:
        a, p, n = indices_tuple
        indices_tuple = (a, p, a, n)
    a1, p, a2, n = (t.to(device=device, dtype=torch.long) for t in indices_tuple)
    pos = torch.zeros(shape, dtype=torch.long, device=device)
    neg = torch.zeros(shape, dtype=torch.long, device=device)
    pos.index_put_((a1, p), torch.ones_like(a1), accumulate=True)
    neg.index_put_((a2, n), torch.ones_like(a2), accumulate=True)
    return pos, neg


_DISTANCES = ("cosine", "lp")


def _check_distance(distance, allowed=_DISTANCES, loss="this loss"):
    if distance not in allowed:
        raise ValueError(f"distance must be one of {', '.join(map(repr, allowed))} for {loss}; "
                         f"got distance={distance!r}")


def _distance_matrix(embeddings, ref_emb, distance):
    """PML `distance(embeddings, ref_emb)` (BaseDistance.forward, base_distance.py:26-42).

    Both sides are L2-normalized, each on its own, also when ref_emb is the batch itself (PML's
    set_ref_emb passes ref_emb=embeddings explicitly, so base_distance.py:34 normalizes it again;
    autograd then sums both paths into the one leaf, as here).
    - "cosine" = CosineSimilarity(): S = q r^T (dot_product_similarity.py:12); is_inverted (larger
      means closer).
    - "lp" = LpDistance() defaults (normalize_embeddings=True, p=2, power=1): d = torch.cdist(q, r)
      (lp_distance.py:24); not inverted. On the unit sphere d = sqrt(2 - 2 S) mathematically, but
      torch.cdist uses sqrt(clamp_min(|q|^2 + |r|^2 - 2 q.r, 1e-30)) (a matmul) when either side
      has more than 25 rows and the direct difference formula otherwise, so the self pair d_ii is
      exactly 0 in the second regime and ~3e-8 (fp64) / ~7e-4 (fp32) in the first. We call
      torch.cdist exactly as PML does, so the two agree bitwise; a fused kernel computing
      d = sqrt(max(2 - 2S, 0)) agrees to rounding except near d = 0. fp16 takes PML's
      pairwise_distance branch (lp_distance.py:16-22; cdist has no fp16 kernel), which adds
      pairwise_distance's eps=1e-6 to the differences.
    """
    q = _normalize(embeddings)
    r = _normalize(ref_emb)
    if distance == "cosine":
        return q @ r.t()
    if q.dtype == torch.float16:
        return F.pairwise_distance(q.unsqueeze(1), r.unsqueeze(0), p=2)
    return torch.cdist(q, r, p=2)


def _margin(x, y, distance):
    """PML BaseDistance.margin (base_distance.py:61-64): how far x is from y in the closer
    direction: y - x for a similarity (inverted), x - y for a distance."""
    return y - x if distance == "cosine" else x - y


def multi_similarity_mine(sim, pos_mask, neg_mask, epsilon, distance="cosine"):
    """PML MultiSimilarityMiner as masks (docs/semantics.md): thresholds over the unmined sets of each row.

    With a similarity (cosine; multi_similarity_miner.py:43-49): keep positives with
    S - e < max_{N_i} S and negatives with S + e > min_{P_i} S. With a distance (lp; lines 50-56,
    the rule mirrored): keep positives with d + e > min_{N_i} d and negatives with
    d - e < max_{P_i} d. A row with no negatives keeps no positive and vice versa (PML's ignore
    values finfo.max / finfo.min never pass; a batch with no positive or no negative pair at all
    returns empty lists, lines 19-21, which these masks reproduce)."""
    sim = sim.detach()
    inf = torch.full_like(sim, float("inf"))
    if distance == "cosine":
        min_pos = torch.where(pos_mask, sim, inf).amin(dim=1, keepdim=True)
        max_neg = torch.where(neg_mask, sim, -inf).amax(dim=1, keepdim=True)
        hard_pos = pos_mask & (sim - epsilon < max_neg)
        hard_neg = neg_mask & (sim + epsilon > min_pos)
    else:
        max_pos = torch.where(pos_mask, sim, -inf).amax(dim=1, keepdim=True)
        min_neg = torch.where(neg_mask, sim, inf).amin(dim=1, keepdim=True)
        hard_pos = pos_mask & (sim + epsilon > min_neg)
        hard_neg = neg_mask & (sim - epsilon < max_pos)
    return hard_pos, hard_neg


def _masked_logsumexp(x, keep_mask, add_one):
    """PML lmu.logsumexp(x, keep_mask, add_one, dim=1), per row (loss_and_miner_utils.py:10-22).
    PML fills with finfo.min, we with -inf: same value (and 0 for an empty row either way)."""
    x = x.masked_fill(~keep_mask, float("-inf"))
    if add_one:
        x = torch.cat([x, torch.zeros(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)
    out = torch.logsumexp(x, dim=1, keepdim=True)
    return out.masked_fill(~torch.any(keep_mask, dim=1, keepdim=True), 0)


def _pair_setup(embeddings, labels, ref_emb, ref_labels, indices_tuple, distance):
    """GenericPairLoss.compute_loss (generic_pair_loss.py:15-21) as matrices: (mat, pos_count,
    neg_count), counts of each pair in PML's pair lists (0/1 without an indices_tuple)."""
    exclude_self = ref_emb is None or ref_labels is labels
    if ref_emb is None:
        ref_emb, ref_labels = embeddings, labels
    mat = _distance_matrix(embeddings, ref_emb, distance)
    if indices_tuple is not None:
        pos, neg = _pair_counts_from_indices(indices_tuple, mat.shape, mat.device)
    else:
        pos, neg = (m.long() for m in _pair_masks(labels, ref_labels, exclude_self))
    return mat, pos, neg


def _too_few_pairs(n_pos, n_neg, device):
    # PML quirk (generic_pair_loss.py:18-19): at most one positive and one negative pair in the
    # whole batch -> zero loss, before any distance is computed.
    return torch.as_tensor((n_pos <= 1) & (n_neg <= 1), device=device)


def _prepare_pairs(embeddings, labels, ref_emb, ref_labels, indices_tuple, miner_epsilon,
                   distance="cosine"):
    """Distance matrix and (mined) pair masks exactly as PML's mat-based GenericPairLoss builds
    them (duplicate pairs of an indices_tuple collapse into the 0/1 masks)."""
    mat, pos_cnt, neg_cnt = _pair_setup(embeddings, labels, ref_emb, ref_labels, indices_tuple,
                                        distance)
    n_pos, n_neg = pos_cnt.sum(), neg_cnt.sum()
    pos, neg = pos_cnt > 0, neg_cnt > 0
    if indices_tuple is None and miner_epsilon is not None:
        pos, neg = multi_similarity_mine(mat, pos, neg, miner_epsilon, distance)
        n_pos, n_neg = pos.sum(), neg.sum()
    return mat, pos, neg, _too_few_pairs(n_pos, n_neg, mat.device)


def _zero_loss(embeddings):
    return torch.sum(embeddings * 0)  # PML reducers' zero_loss: 0, attached to the graph


def _avg_non_zero(losses, embeddings, counts=None):
    """PML AvgNonZeroReducer (threshold_reducer.py:32-46, low=0): mean of the losses > 0 (a NaN
    loss compares false and drops out), or the zero loss if there are none. `counts`: how often
    each entry is listed (PML reduces the pair list, duplicates included)."""
    above = losses > 0
    if counts is not None:
        above = above & (counts > 0)
        weighted = counts * losses
        n_above = torch.where(above, counts, torch.zeros_like(counts)).sum()
    else:
        weighted = losses
        n_above = above.sum()
    total = torch.where(above, weighted, torch.zeros_like(weighted)).sum()
    mean_above = total / n_above.clamp(min=1)
    return torch.where(n_above > 0, mean_above, _zero_loss(embeddings))


def multi_similarity_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, alpha=2.0,
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
    _check_distance(distance, loss="multi_similarity_loss")
    mat, pos, neg, too_few = _prepare_pairs(embeddings, labels, ref_emb, ref_labels,
                                            indices_tuple, miner_epsilon, distance)
    pos_exp = _margin(mat, base, distance)  # cosine: base - S; lp: d - base
    neg_exp = _margin(base, mat, distance)  # cosine: S - base; lp: base - d
    pos_loss = (1.0 / alpha) * _masked_logsumexp(alpha * pos_exp, pos, add_one=True)
    neg_loss = (1.0 / beta) * _masked_logsumexp(beta * neg_exp, neg, add_one=True)
    loss = torch.mean(pos_loss + neg_loss)
    loss = torch.where(too_few, _zero_loss(embeddings), loss)
    if miner_epsilon is not None:
        # Mining compares S with thresholds and a NaN compares false, so a NaN row would silently
        # drop out; adding an exact 0 derived from the inputs keeps "NaN in, NaN out".
        loss = loss + _zero_loss(embeddings) + (0 if ref_emb is None else _zero_loss(ref_emb))
    return loss


def circle_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, m=0.4, gamma=80.0,
                distance="cosine", indices_tuple=None):
    """PML CircleLoss (AvgNonZeroReducer, detached alpha weights). PML asserts
    CosineSimilarity (circle_loss.py:29), so any other distance is a ValueError here."""
    _check_distance(distance, ("cosine",), loss="circle_loss (PML's CircleLoss asserts CosineSimilarity)")
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
    loss = _avg_non_zero(losses, embeddings)
    return torch.where(too_few, _zero_loss(embeddings), loss)


def ntxent_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, temperature=0.07,
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
    _check_distance(distance, loss="ntxent_loss")
    mat, pos_cnt, neg_cnt = _pair_setup(embeddings, labels, ref_emb, ref_labels, indices_tuple,
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
    loss = torch.where((n_pos > 0) & (n_neg > 0), loss, _zero_loss(embeddings))
    return torch.where(_too_few_pairs(n_pos, n_neg, mat.device), _zero_loss(embeddings), loss)


def supcon_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, temperature=0.1,
                distance="cosine", indices_tuple=None):
    """PML SupConLoss (mat-based; AvgNonZeroReducer over rows).

    z_ij = S_ij / T (cosine) or -d_ij / T (lp; supcon_loss.py:18-20). Per row i
    (supcon_loss.py:21-37):
        mx_i = max_j z_ij over ALL columns (detached; the self column and the columns in neither
               set included: in self mode z_ii = 1/T is the max for cosine, ~0 for lp)
        z'_ij = z_ij - mx_i;  den_i = LSE_{j in P_i u N_i} z'_ij (0 if the union is empty)
        L_i = -sum_{j in P_i} (z'_ij - den_i) / (|P_i| + tiny)
            = (|P_i| LSE_{P_i u N_i} z - sum_{P_i} z) / (|P_i| + tiny) mathematically (mx cancels);
    L_i = 0 for a row without positives (and exactly 0 for one positive and no negative).
    loss = mean of the L_i > 0, else 0; 0 (graph-attached) if the batch has no positive or no
    negative pair at all (supcon_loss.py:16, 39) or by the one-pair rule.
    """
    _check_distance(distance, loss="supcon_loss")
    mat, pos, neg, too_few = _prepare_pairs(embeddings, labels, ref_emb, ref_labels,
                                            indices_tuple, None, distance)
    z = (mat if distance == "cosine" else -mat) / temperature
    z = z - z.amax(dim=1, keepdim=True).detach()  # "for numerical stability"
    denominator = _masked_logsumexp(z, pos | neg, add_one=False)
    log_prob = z - denominator
    pos_f = pos.to(z.dtype)
    # PML multiplies by the float mask (a NaN anywhere in the row propagates, as there)
    mean_log_prob_pos = (pos_f * log_prob).sum(dim=1) / (pos_f.sum(dim=1) + torch.finfo(z.dtype).tiny)
    loss = _avg_non_zero(-mean_log_prob_pos, embeddings)
    loss = torch.where(pos.any() & neg.any(), loss, _zero_loss(embeddings))
    return _nan_in_nan_out(torch.where(too_few, _zero_loss(embeddings), loss), embeddings, ref_emb)


def _nan_in_nan_out(loss, embeddings, ref_emb):
    """AvgNonZeroReducer drops a NaN term (NaN > 0 is false), so PML can return a finite loss for a
    NaN input; adding an exact 0 derived from the inputs keeps this project's NaN in, NaN out."""
    return loss + _zero_loss(embeddings) + (0 if ref_emb is None else _zero_loss(ref_emb))


def contrastive_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, pos_margin=0.0,
                     neg_margin=1.0, distance="lp", indices_tuple=None):
    """PML ContrastiveLoss (pair-based; PML's default distance is LpDistance()).

    Per listed pair (contrastive_loss.py:38-48, margin() of base_distance.py:61-64):
      lp:     positive l_ij = relu(d_ij - pos_margin),  negative l_ij = relu(neg_margin - d_ij)
      cosine: positive l_ij = relu(pos_margin - S_ij),  negative l_ij = relu(S_ij - neg_margin)
    Two sub-losses, each reduced by its own AvgNonZeroReducer (MultipleReducers,
    module_with_records_and_reducer.py:26-33): the sum of the pair losses > 0 over their count
    (pairs listed twice count twice), or 0 if none; loss = pos part + neg part
    (multiple_reducers.py:31-32). One-pair rule -> 0.
    """
    _check_distance(distance, loss="contrastive_loss")
    mat, pos_cnt, neg_cnt = _pair_setup(embeddings, labels, ref_emb, ref_labels, indices_tuple,
                                        distance)
    pos_losses = torch.relu(_margin(mat, pos_margin, distance))
    neg_losses = torch.relu(_margin(neg_margin, mat, distance))
    loss = (_avg_non_zero(pos_losses, embeddings, pos_cnt)
            + _avg_non_zero(neg_losses, embeddings, neg_cnt))
    too_few = _too_few_pairs(pos_cnt.sum(), neg_cnt.sum(), mat.device)
    return _nan_in_nan_out(torch.where(too_few, _zero_loss(embeddings), loss), embeddings, ref_emb)


def generalized_lifted_structure_loss(embeddings, labels, ref_emb=None, ref_labels=None, *,
                                      neg_margin=1.0, pos_margin=0.0, distance="lp",
                                      indices_tuple=None):
    """PML GeneralizedLiftedStructureLoss (lifted_structure_loss.py:52-80; mat-based,
    MeanReducer; PML's default distance is LpDistance()).

    Per row i, LSEs without the added one (an empty set gives 0):
      lp:     L_i = relu( LSE_{P_i} (d_ij - pos_margin) + LSE_{N_i} (neg_margin - d_ij) )
      cosine: L_i = relu( LSE_{P_i} (pos_margin - S_ij) + LSE_{N_i} (S_ij - neg_margin) )
    loss = (1/N) sum_i L_i over all rows (a row without positives still adds relu(LSE_{N_i})).
    One-pair rule -> 0.
    """
    _check_distance(distance, loss="generalized_lifted_structure_loss")
    mat, pos, neg, too_few = _prepare_pairs(embeddings, labels, ref_emb, ref_labels,
                                            indices_tuple, None, distance)
    pos_lse = _masked_logsumexp(_margin(mat, pos_margin, distance), pos, add_one=False)
    neg_lse = _masked_logsumexp(_margin(neg_margin, mat, distance), neg, add_one=False)
    loss = torch.mean(torch.relu(pos_lse + neg_lse))
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
    """Circle loss with class-level labels (docs/semantics.md; the paper's unified formula, one positive
    per sample). proxies: (D, C)."""
    sim = _normalize(embeddings) @ _normalize(proxies.t()).t()  # (N, C)
    sg = sim.detach()
    target = F.one_hot(labels, sim.shape[1]).bool()
    sp = sim[target]
    lp = -gamma * torch.relu(1 + m - sg[target]) * (sp - (1 - m))
    ln = gamma * torch.relu(sg + m) * (sim - m)
    lse_n = torch.logsumexp(ln.masked_fill(target, float("-inf")), dim=1)
    return F.softplus(lse_n + lp).mean()


def _miner_weights(indices_tuple, labels, dtype):
    """PML lmu.convert_to_weights(indices_tuple, labels, dtype) (loss_and_miner_utils.py:245-261):
    every index in ALL the tuple's tensors (anchors, positives and negatives alike) counts;
    w_i = count_i / max count, 0 for a sample that is not listed; all ones without a tuple (or
    with only empty tensors)."""
    weights = torch.zeros(labels.shape[0], dtype=dtype, device=labels.device)
    if indices_tuple is None or all(len(x) == 0 for x in indices_tuple):
        return weights + 1
    indices = torch.cat([t.to(labels.device) for t in indices_tuple], dim=0)
    indices, counts = torch.unique(indices, return_counts=True)
    weights[indices] = counts.to(dtype) / torch.max(counts)
    return weights


def proxy_anchor_loss(embeddings, labels, proxies, *, margin=0.1, alpha=32, indices_tuple=None):
    """PML ProxyAnchorLoss (proxy_anchor_loss.py:30-82; DivisorReducer per sub-loss, summed).
    proxies: PML's `proxies`, shape (C, D), cast to the input dtype as PML's cast_types does.

    s_ic = q_i . p_c (CosineSimilarity, both normalized); w_i = miner weight (1 without a tuple)
    and the shift u_i = w_i - 1 (0 or in [-1, 0): PML ADDS it inside the exponent, so an unlisted
    sample is damped by e^-1, not dropped). Per class c, LSEs over the samples (columns of S),
    with the added one (add_one=True; an empty set gives 0):
        pos_c = log(1 + sum_{i: y_i = c}  e^{alpha (margin - s_ic) + u_i})
        neg_c = log(1 + sum_{i: y_i != c} e^{alpha (s_ic + margin) + u_i})
    loss = sum_c pos_c / #{classes with a positive in the batch} + sum_c neg_c / C
    (a zero divisor gives the graph-attached 0 for that part, divisor_reducer.py:21-28).
    """
    dtype = embeddings.dtype
    proxies = proxies.to(dtype)
    C = proxies.shape[0]
    miner_shift = (_miner_weights(indices_tuple, labels, dtype) - 1).unsqueeze(1)
    cos = _normalize(embeddings) @ _normalize(proxies).t()  # (N, C)
    pos_mask = F.one_hot(labels, C).bool()
    neg_mask = ~pos_mask
    n_with_pos = pos_mask.any(dim=0).sum()
    pos_exp = _margin(cos, margin, "cosine")  # margin - s
    neg_exp = _margin(-margin, cos, "cosine")  # s - (-margin)
    # PML: lmu.logsumexp(..., dim=0), i.e. per column; done here per row of the transpose
    pos_term = _masked_logsumexp((alpha * pos_exp + miner_shift).t(), pos_mask.t(), add_one=True)
    neg_term = _masked_logsumexp((alpha * neg_exp + miner_shift).t(), neg_mask.t(), add_one=True)
    pos_loss = torch.where(n_with_pos > 0, pos_term.sum() / n_with_pos.clamp(min=1),
                           _zero_loss(embeddings))
    neg_loss = neg_term.sum() / C  # divisor num_classes >= 1
    return pos_loss + neg_loss


def normalized_softmax_loss(embeddings, labels, W, *, temperature=0.05, indices_tuple=None):
    """PML NormalizedSoftmaxLoss (normalized_softmax_loss.py:25-52; MeanReducer).
    W: PML's `W`, shape (D, C), cast to the input dtype as PML's cast_types does.

    PML's default distance here is DotProductSimilarity(), whose normalize_embeddings defaults to
    True (base_distance.py:8): the embeddings ARE normalized; W is normalized per column
    (get_logits, line 48) and then, as the distance's ref side, per row of W^T again (idempotent up
    to rounding; kept so the bits agree). With s_ic = q_i . w_c:
        L_i = w_i (LSE_c (s_ic / T) - s_{i,y_i} / T)    (cross-entropy times the miner weight)
    loss = (1/N) sum_i L_i (samples with weight 0 still count in N).
    """
    dtype = embeddings.dtype
    W = W.to(dtype)
    normalized_W = F.normalize(W, p=2, dim=0)
    logits = (_normalize(embeddings) @ _normalize(normalized_W.t()).t()) / temperature
    losses = F.cross_entropy(logits, labels, reduction="none")
    return torch.mean(losses * _miner_weights(indices_tuple, labels, dtype))


def _large_margin_softmax(embeddings, labels, W, scale, modify_target, indices_tuple):
    """PML LargeMarginSoftmaxLoss.compute_loss (large_margin_softmax_loss.py:101-128) with
    CosFace's / ArcFace's scale_logits (logits * scale, no norms)."""
    dtype = embeddings.dtype
    W = W.to(dtype)
    N, C = labels.shape[0], W.shape[1]
    mask = torch.zeros(N, C, dtype=dtype, device=embeddings.device)
    mask[torch.arange(N, device=embeddings.device), labels] = 1
    cosine = _normalize(embeddings) @ _normalize(W.t()).t()  # CosineSimilarity(embeddings, W^T)
    cosine_of_target = cosine[mask == 1]
    diff = (modify_target(cosine_of_target) - cosine_of_target).unsqueeze(1)
    logits = (cosine + mask * diff) * scale  # target logit: s + (f(s) - s), as PML (not f(s))
    losses = F.cross_entropy(logits, labels, reduction="none")
    return torch.mean(losses * _miner_weights(indices_tuple, labels, dtype))


def cosface_loss(embeddings, labels, W, *, margin=0.35, scale=64, indices_tuple=None):
    """PML CosFaceLoss (cosface_loss.py; MeanReducer). W: PML's `W`, shape (D, C).

    s_ic = q_i . w_c (both normalized); target logit t_i = s_{i,y_i} + ((s_{i,y_i} - margin)
    - s_{i,y_i}) (= s - margin to rounding), the others s_ic; scaled by `scale`:
        L_i = w_i (LSE_c z_ic - z_{i,y_i}),  z = scale * logits;   loss = (1/N) sum_i L_i.
    """
    return _large_margin_softmax(embeddings, labels, W, scale, lambda s: s - margin, indices_tuple)


def arcface_loss(embeddings, labels, W, *, margin=28.6, scale=64, indices_tuple=None):
    """PML ArcFaceLoss (arcface_loss.py; MeanReducer). W: PML's `W`, shape (D, C); margin in
    degrees (PML's init_margin: np.radians, line 23).

    With m = radians(margin), s = s_{i,y_i} and theta = acos(clamp(s, -1, 1))
    (large_margin_softmax_loss.py:59-60: the clamp passes the gradient at |s| = 1 itself, where
    acos' is infinite, and blocks it for |s| > 1 from rounding), the target logit is
        f(s) = cos(theta + m)               if theta <= pi - m   (arcface_loss.py:35-40)
               cos(theta) - m sin(m)        otherwise ("keep the cost monotonically decreasing")
    (cos(theta) recomputed through acos, not s); then as CosFace with t_i = s + (f(s) - s).
    """
    m = math.radians(margin)  # == np.radians(margin) (x * pi/180 in both)
    threshold = math.pi - m  # PML: np.deg2rad(180) - margin, np.deg2rad(180) == math.pi
    m_sin_m = m * math.sin(m)

    def modify(cosine_of_target):
        angles = torch.acos(torch.clamp(cosine_of_target, -1, 1))
        return torch.where(angles <= threshold, torch.cos(angles + m), torch.cos(angles) - m_sin_m)

    return _large_margin_softmax(embeddings, labels, W, scale, modify, indices_tuple)
