"""The steps of PML that several reference losses share, as PyTorch on the materialized N x M
matrix: the pair masks (and an explicit indices_tuple's pair counts), the distance matrix, PML's
distance.margin, the MultiSimilarityMiner, the masked log-sum-exp, PML's reducers and quirks.

Each loss's own reference (the executable definition of the loss, docs/semantics.md) is in its
module, fused_pairloss/losses/<loss>.py; fused_pairloss.reference re-exports them all.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._validation import _compiling, check_indices_tuple
from ..ops._common import normalize, zero_loss
from ..ops.listed import ListedPairs, join_on_anchor
from ..ops.stats import MinedBy


def pair_masks(labels, ref_labels, exclude_self):
    """PML get_all_pairs_indices as masks: positives exclude j == i iff `exclude_self`."""
    matches = labels.unsqueeze(1) == ref_labels.unsqueeze(0)
    diffs = ~matches
    if exclude_self:
        matches = matches.clone()
        matches.fill_diagonal_(False)
    return matches, diffs


def pair_counts_from_indices(indices_tuple, shape, device):
    """An explicit PML indices_tuple as matrices of pair multiplicities (int64).

    PML's lmu.convert_to_pairs (loss_and_miner_utils.py:55-70) turns triplets (a, p, n) into the
    pair lists (a, p, a, n), so a triplet miner lists each pair once per triplet it is in. The
    pair-based losses (NTXent, Contrastive: GenericPairLoss.pair_based_loss, generic_pair_loss.py:
    34-41) compute one loss per listed pair, duplicates included, so they need the counts; the
    mat-based ones (MS, Circle, SupCon, GeneralizedLiftedStructure: mat_based_loss, lines 26-32)
    set mask[a1, p] = 1 and only see count > 0. The one-pair rule counts list lengths.
    """
    check_indices_tuple(indices_tuple, shape[0], shape[1])
    if len(indices_tuple) == 3:
        a, p, n = indices_tuple
        indices_tuple = (a, p, a, n)
    a1, p, a2, n = (t.to(device=device, dtype=torch.long) for t in indices_tuple)
    pos = torch.zeros(shape, dtype=torch.long, device=device)
    neg = torch.zeros(shape, dtype=torch.long, device=device)
    pos.index_put_((a1, p), torch.ones_like(a1), accumulate=True)
    neg.index_put_((a2, n), torch.ones_like(a2), accumulate=True)
    return pos, neg


DISTANCES = ("cosine", "lp")


def check_distance(distance, allowed=DISTANCES, loss="this loss"):
    if distance not in allowed:
        raise ValueError(f"distance must be one of {', '.join(map(repr, allowed))} for {loss}; "
                         f"got distance={distance!r}")


def distance_matrix(embeddings, ref_emb, distance):
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
    q = normalize(embeddings)
    r = normalize(ref_emb)
    if distance == "cosine":
        return q @ r.t()
    return lp_distances(q, r)


def lp_distances(q, r):
    """PML LpDistance's matrix of the rows as given (already normalized): torch.cdist, or for fp16
    (and bf16: no cdist kernel either; PML raises there) pairwise_distance (distance_matrix)."""
    if q.dtype in (torch.float16, torch.bfloat16):
        return F.pairwise_distance(q.unsqueeze(1), r.unsqueeze(0), p=2)
    return torch.cdist(q, r, p=2)


def distance_margin(x, y, distance):
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
    returns empty lists, lines 19-21, which these masks reproduce). PML takes the extremes from
    torch.sort, which puts NaN last: a row's maximum is NaN where the set holds one (no pair passes
    against it), its minimum that of the others (an fp16 all-zero row normalizes to NaN)."""
    sim = sim.detach()
    inf = torch.full_like(sim, float("inf"))
    not_nan = ~torch.isnan(sim)
    if distance == "cosine":
        min_pos = torch.where(pos_mask & not_nan, sim, inf).amin(dim=1, keepdim=True)
        max_neg = torch.where(neg_mask, sim, -inf).amax(dim=1, keepdim=True)
        hard_pos = pos_mask & (sim - epsilon < max_neg)
        hard_neg = neg_mask & (sim + epsilon > min_pos)
    else:
        max_pos = torch.where(pos_mask, sim, -inf).amax(dim=1, keepdim=True)
        min_neg = torch.where(neg_mask & not_nan, sim, inf).amin(dim=1, keepdim=True)
        hard_pos = pos_mask & (sim + epsilon > min_neg)
        hard_neg = neg_mask & (sim - epsilon < max_pos)
    return hard_pos, hard_neg


def masked_logsumexp(x, keep_mask, add_one):
    """PML lmu.logsumexp(x, keep_mask, add_one, dim=1), per row (loss_and_miner_utils.py:10-22).
    PML fills with finfo.min, we with -inf: same value (and 0 for an empty row either way)."""
    x = x.masked_fill(~keep_mask, float("-inf"))
    if add_one:
        x = torch.cat([x, torch.zeros(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)
    out = torch.logsumexp(x, dim=1, keepdim=True)
    return out.masked_fill(~torch.any(keep_mask, dim=1, keepdim=True), 0)


def pair_count_matrices(labels, ref_emb, ref_labels, indices_tuple, shape, device):
    """PML's pair lists (lmu.convert_to_pairs) as (pos_count, neg_count) matrices of `shape`: an
    indices_tuple's pairs with their multiplicity, else the label sets (0/1) under PML's identity
    rule (the self pairs are no positives when ref_emb is None or ref_labels is labels)."""
    if indices_tuple is not None:
        return pair_counts_from_indices(indices_tuple, shape, device)
    exclude_self = ref_emb is None or ref_labels is labels
    labels_t = torch.as_tensor(labels, device=device)
    ref_t = labels_t if ref_emb is None or ref_labels is labels else torch.as_tensor(ref_labels, device=device)
    return tuple(m.long() for m in pair_masks(labels_t, ref_t, exclude_self))


def pair_setup(embeddings, labels, ref_emb, ref_labels, indices_tuple, distance):
    """GenericPairLoss.compute_loss (generic_pair_loss.py:15-21) as matrices: (mat, pos_count,
    neg_count), counts of each pair in PML's pair lists (0/1 without an indices_tuple)."""
    mat = distance_matrix(embeddings, embeddings if ref_emb is None else ref_emb, distance)
    return (mat, *pair_count_matrices(labels, ref_emb, ref_labels, indices_tuple, mat.shape, mat.device))


def pml_pair_lists(pos_cnt, neg_cnt):
    """PML's (a1, p, a2, n) from pair-count matrices: each pair repeated by its count, in torch.where
    (row-major) order; PML's own order is the tuple's, which a mean or a per-anchor LSE does not see."""
    a1, p = torch.where(pos_cnt > 0)
    a2, n = torch.where(neg_cnt > 0)
    rep_p, rep_n = pos_cnt[a1, p], neg_cnt[a2, n]
    return (a1.repeat_interleave(rep_p), p.repeat_interleave(rep_p), a2.repeat_interleave(rep_n),
            n.repeat_interleave(rep_n))


def too_few_pairs(n_pos, n_neg, device):
    # PML quirk (generic_pair_loss.py:18-19): at most one positive and one negative pair in the
    # whole batch -> zero loss, before any distance is computed.
    return torch.as_tensor((n_pos <= 1) & (n_neg <= 1), device=device)


def prepare_pairs(embeddings, labels, ref_emb, ref_labels, indices_tuple, miner_epsilon,
                  distance="cosine"):
    """Distance matrix and (mined) pair masks exactly as PML's mat-based GenericPairLoss builds
    them (duplicate pairs of an indices_tuple collapse into the 0/1 masks)."""
    mat, pos_cnt, neg_cnt = pair_setup(embeddings, labels, ref_emb, ref_labels, indices_tuple,
                                       distance)
    n_pos, n_neg = pos_cnt.sum(), neg_cnt.sum()
    pos, neg = pos_cnt > 0, neg_cnt > 0
    if indices_tuple is None and miner_epsilon is not None:
        pos, neg = multi_similarity_mine(mat, pos, neg, miner_epsilon, distance)
        n_pos, n_neg = pos.sum(), neg.sum()
    return mat, pos, neg, too_few_pairs(n_pos, n_neg, mat.device)


def avg_non_zero(losses, embeddings, counts=None):
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
    if not _compiling() and n_above.device.type != "meta" and not bool(n_above > 0):
        # PML's zero loss on the embeddings, off the losses' graph: a term NaN from 0 / 0 (SNR's
        # constant rows) gives no NaN gradient through its division
        return zero_loss(embeddings)
    total = torch.where(above, weighted, torch.zeros_like(weighted)).sum()
    mean_above = total / n_above.clamp(min=1)
    return torch.where(n_above > 0, mean_above, zero_loss(embeddings))


def nan_in_nan_out(loss, embeddings, ref_emb):
    """AvgNonZeroReducer drops a NaN term (NaN > 0 is false), so PML can return a finite loss for a
    NaN input; adding an exact 0 derived from the inputs keeps this project's NaN in, NaN out."""
    return loss + zero_loss(embeddings) + (0 if ref_emb is None else zero_loss(ref_emb))


def miner_weights(indices_tuple, labels, dtype, using_ref=False):
    """PML lmu.convert_to_weights(indices_tuple, labels, dtype, using_ref) (loss_and_miner_utils.py:
    245-261): every index in ALL the tuple's tensors (anchors, positives and negatives alike), or
    with `using_ref` (a query set against another reference) only the anchors, counts;
    w_i = count_i / max count, 0 for a sample that is not listed; all ones without a tuple (or
    with only empty tensors)."""
    weights = torch.zeros(labels.shape[0], dtype=dtype, device=labels.device)
    if indices_tuple is not None:  # with a ref, the partners index its rows
        check_indices_tuple(indices_tuple, labels.shape[0], None if using_ref else labels.shape[0])
    if indices_tuple is None or all(len(x) == 0 for x in indices_tuple):
        return weights + 1
    if using_ref:  # PML's get_anchors
        listed = [indices_tuple[0]] if len(indices_tuple) == 3 else [indices_tuple[0], indices_tuple[2]]
    else:
        listed = indices_tuple
    indices = torch.cat([t.to(labels.device) for t in listed], dim=0)
    indices, counts = torch.unique(indices, return_counts=True)
    weights[indices] = counts.to(dtype) / torch.max(counts)
    return weights


def sampled_triplets(labels, ref_labels, per_anchor):
    """PML's lmu.get_random_triplet_indices without weights (convert_to_triplets with an integer
    t_per_anchor; None: as many draws per anchor as its label has positives), drawing from torch's
    default generator in PML's order, so a seeded call samples PML's triplets: per label of the batch
    in ascending order, for each of its anchors `per_anchor` positives uniformly among the label's
    positives (less the anchor itself where ref_labels is labels or None: PML's identity rule),
    then as many negatives uniformly among the label's negatives. Labels without a positive or a
    negative are skipped. Returns (a, p, n) int64 on the labels' device; O(N per_anchor) memory."""
    own = ref_labels is None or ref_labels is labels
    ref = labels if own else ref_labels
    found = []
    for label in torch.unique(labels):
        positives = torch.nonzero(ref == label).flatten()
        anchors = positives if own else torch.nonzero(labels == label).flatten()
        negatives = torch.nonzero(ref != label).flatten()
        n_a, n_p = anchors.numel(), positives.numel()
        if n_p < (2 if own else 1) or negatives.numel() < 1:
            continue
        k = n_p if per_anchor is None else int(per_anchor)
        # the anchors' candidates: the label's positives, less the anchor's own entry (own mode)
        draw_p = torch.randint(0, n_a - 1 if own else n_p, (n_a * k,))
        anchor_of = torch.arange(n_a).view(-1, 1).repeat(1, k).view(n_a * k)
        if own:  # a draw at or past the anchor's own position is the next positive
            draw_p = draw_p + (draw_p >= anchor_of).to(draw_p.dtype)
        draw_n = torch.randint(0, negatives.numel(), (n_a * k,))
        found.append((anchors[anchor_of.to(anchors.device)], positives[draw_p.to(anchors.device)],
                      negatives[draw_n.to(anchors.device)]))
    if not found:
        empty = torch.zeros(0, dtype=torch.int64, device=labels.device)
        return empty, empty.clone(), empty.clone()
    return tuple(torch.cat(x).to(torch.int64) for x in zip(*found))


def sampled_call_triplets(embeddings, labels, ref_emb, ref_labels, per_anchor):
    """sampled_triplets of a loss call's labels, on the embeddings' device: the anchor's own entry
    left out where ref_emb is None or ref_labels is labels (PML's identity rule)."""
    device = embeddings.device
    own = ref_emb is None or ref_labels is labels
    ref = None if own else torch.as_tensor(ref_labels, device=device)
    return tuple(t.to(device) for t in sampled_triplets(torch.as_tensor(labels, device=device), ref, per_anchor))


def pml_pairs_of_call(labels, ref_labels, exclude_col, backend):
    """The pairs a fused call computes over, as PML's (a1, p, a2, n): a ListedPairs backend's (each
    as often as listed), or with an exclude_col the label pairs less row i's column exclude_col_i
    (CrossBatchMemory's remove_self_comparisons); None: the label sets under PML's identity rule.
    A miner's rule in the engine (MinedBy) has no such list: the modules and CrossBatchMemory give
    those calls their listed pairs instead (_needs_pml_steps)."""
    if isinstance(backend, MinedBy):
        raise NotImplementedError("PML's steps over a miner's rule: give the call the miner's listed pairs")
    if isinstance(backend, ListedPairs):
        (a1, p, n_p), (a2, n, n_n) = backend.pos, backend.neg
        return a1.repeat_interleave(n_p), p.repeat_interleave(n_p), a2.repeat_interleave(n_n), n.repeat_interleave(n_n)
    if exclude_col is None:
        return None
    pos, neg = pair_masks(torch.as_tensor(labels, device=exclude_col.device),
                          torch.as_tensor(ref_labels, device=exclude_col.device), exclude_self=False)
    rows = torch.nonzero(exclude_col >= 0).squeeze(1)
    pos = pos.index_put((rows, exclude_col[rows]), torch.zeros_like(rows, dtype=torch.bool))
    return pml_pair_lists(pos.long(), neg.long())


def fp16_rows_normalized_to_nan(*tensors):
    """Whether normalizing turns a row of these tensors that holds no NaN into NaN: an all-zero fp16
    row, whose F.normalize eps (1e-12) rounds to 0 (0 / 0), as PML's distances normalize it (its
    reducers then drop or keep the NaN terms). The losses whose fused combination would read those
    terms otherwise take PML's steps (the reference with pml_pairs_of_call). Other dtypes: False,
    without a sync."""
    for t in tensors:
        if t is not None and t.dtype == torch.float16:
            t = t.detach()
            if bool((normalize(t).isnan().any(1) & ~t.isnan().any(1)).any()):
                return True
    return False


def convert_to_triplets(indices_tuple, labels, ref_labels=None):
    """PML lmu.convert_to_triplets(indices_tuple, labels, ref_labels, t_per_anchor="all")
    (loss_and_miner_utils.py): all triplets of the labels (a, p, n in torch.where order, the diagonal
    no positive when `ref_labels is labels` or None), a triplet tuple as it is, or pairs joined on
    the anchor. Without PML."""
    if indices_tuple is None:
        ref = labels if ref_labels is None else ref_labels
        matches = labels[:, None] == ref[None, :]
        diffs = ~matches
        if ref is labels:
            matches = matches.clone()
            matches.fill_diagonal_(False)
        return torch.where(matches[:, :, None] & diffs[:, None, :])
    if len(indices_tuple) == 3:
        return indices_tuple
    a1, p, a2, n = indices_tuple
    p_idx, n_idx = join_on_anchor(a1, a2)
    return a1[p_idx], p[p_idx], n[n_idx]
