"""Triplet margin loss (Weinberger & Saul 2009; Schroff et al., FaceNet 2015; PML TripletMarginLoss).

Per triplet (anchor a, positive p, negative n) with u = d (LpDistance) or u = -S (cosine, PML's
distance.margin for a similarity): l_apn = relu(u_ap - u_an + margin); PML's AvgNonZeroReducer:
the mean of the l > 0, 0 if none. "all" triplets: every (a, p, n) with label_p == label_a (p != a
in self mode) and label_n != label_a.

All triplets without enumerating them (PML builds an N x M x M mask and O(N M^2) indices): per
anchor, with A_p = u_ap + margin over its positives and B_n = u_an over its negatives,
    sum_{p,n} relu(A_p - B_n) = sum_p (k_p A_p - sum_{n: B_n < A_p} B_n),   k_p = #{n: B_n < A_p},
and the count of nonzero terms is sum_p k_p (fused_pairloss/ops/triplets.py; docs/design.md
"Triplets"): on the "cpu" backend the C++ kernel triplet_engine_forward, elsewhere the PyTorch op
triplet_rows, both in strips of rows recomputed by their backward: memory O(strip x M + (N + M) D),
never N x M or triplets. A pair tuple's triplets (a miner's (a1, p, a2, n)) by the same sums over
its listed pairs (listed_pairs_triplet_margin), never joined into triplets.
"""
from __future__ import annotations

import torch

from .. import _validation as V
from .._backends import resolve_backend
from ..ops._common import LOCAL, loss_function, normalize, pair_operands, pairs_of, similarity_dtype, zero_loss
from ..ops.listed import join_on_anchor, pair_values
from ..ops.operands import stat_dtype
from ..ops.spec import PairLossSpec, PairTerm
from ..ops.stats import pair_stats
from ..ops.triplets import NO_WINDOW, bins_op, rows_op, triplet_coupled_rows
from ._base import _PairLoss, check_listed_rows, check_triplets_per_anchor, run_pair_loss
from ._reference_common import check_distance, distance_matrix, nan_in_nan_out, sampled_call_triplets
from ._registry import LossEntry

# ---- reference: PML step by step -------------------------------------------------------------
def all_triplets(labels, ref_labels, exclude_self):
    """PML lmu.get_all_triplets_indices (loss_and_miner_utils.py): (a, p, n) in torch.where order."""
    matches = labels[:, None] == ref_labels[None, :]
    if exclude_self:
        matches = matches.clone()
        matches.fill_diagonal_(False)
    diffs = labels[:, None] != ref_labels[None, :]
    return torch.where(matches[:, :, None] & diffs[:, None, :])


def triplet_distances(embeddings, ref_emb, a, p, n, distance):
    """PML's mat[a, p], mat[a, n] of the listed triplets, never N x M and never a row per triplet
    (ops/listed.py: row gathers in chunks, or row strips of S for a dense list; memory
    O(#triplets + (N + M) D)): d from the rows' difference for "lp", the dot product for "cosine"."""
    q, r = normalize(embeddings), normalize(ref_emb)
    lp = distance == "lp"
    return pair_values(q, r, a, p, lp), pair_values(q, r, a, n, lp)


def pml_triplets(embeddings, labels, ref_emb, ref_labels, indices_tuple, distance, swap=False):
    """(a, u_ap, u_an, u_pn) of PML's triplets (lmu.convert_to_triplets with "all"): all of them
    under PML's identity rule, their distances from the materialized matrix as PML's; or the listed
    ones (triplets, or pairs joined on the anchor), their distances from the listed rows. u_pn
    (swap; else None) is PML's mat[p, n]: row p of the batch against ref n (check_swap_positives)."""
    self_mode = ref_emb is None or (ref_emb is embeddings and ref_labels is labels)
    ref, ref_lab = (embeddings, labels) if ref_emb is None else (ref_emb, ref_labels)
    if indices_tuple is None:
        labels_t = torch.as_tensor(labels, device=embeddings.device)
        ref_t = labels_t if ref_lab is labels else torch.as_tensor(ref_lab, device=embeddings.device)
        a, p, n = all_triplets(labels_t, ref_t, exclude_self=self_mode or ref_lab is labels)
        mat = distance_matrix(embeddings, ref, distance)
        if swap:
            check_swap_positives(p, embeddings.shape[0])
        return a, pairs_of(mat, a, p), pairs_of(mat, a, n), (pairs_of(mat, p, n) if swap else None)
    if len(indices_tuple) == 4:  # lmu.convert_to_triplets: pairs joined on the anchor
        a1, p1, a2, n2 = (torch.as_tensor(t, device=embeddings.device).long() for t in indices_tuple)
        pi, ni = join_on_anchor(a1, a2)
        a, p, n = a1[pi], p1[pi], n2[ni]
    else:
        a, p, n = (torch.as_tensor(t, device=embeddings.device).long() for t in indices_tuple)
    u_pn = None
    if swap:
        check_swap_positives(p, embeddings.shape[0])
        u_pn = pair_values(normalize(embeddings), normalize(ref), p, n, distance == "lp")
    return a, *triplet_distances(embeddings, ref, a, p, n, distance), u_pn


def check_swap_positives(positives, n_rows):
    """PML's swap reads u_pn as mat[positive_idx, negative_idx], row p of the batch's matrix (in
    ref mode the batch's row p against ref n, the positive being ref's row p): a positive index
    past the batch's rows fails there (an IndexError); a ValueError naming swap here."""
    if positives.numel() and int(positives.max()) >= n_rows:
        raise ValueError(f"TripletMarginLoss(swap=True) reads the positive-negative distance as PML does, "
                         f"mat[positive_idx, negative_idx] of embeddings against ref_emb, which needs every "
                         f"positive index below embeddings' {n_rows} rows; got positive index "
                         f"{int(positives.max())} of ref_emb")


# anchors with at most this many thresholds (positive pairs) compare each negative pair with them
# directly, one vector pass per threshold slot; with more, the sorted-key search below
DIRECT_THRESHOLDS = 16


def _below_counts(anchor_a, A, anchor_b, B):
    """Per entry t of A: k_t = #{j : anchor_b[j] = anchor_a[t], B_j < A_t}; per entry j of B: c_j =
    #{t : anchor_a[t] = anchor_b[j], A_t > B_j} (int64). Few thresholds per anchor (at most
    DIRECT_THRESHOLDS, a miner's positive pairs with a few samples per class): each anchor's
    thresholds in a row of a table, padded with -inf, and every B_j compared with its anchor's row,
    slot by slot; else _below_counts_sorted."""
    n_anchors = int(torch.maximum(anchor_a.max(), anchor_b.max())) + 1
    per_anchor = torch.bincount(anchor_a, minlength=n_anchors)
    slots = int(per_anchor.max())
    if slots > DIRECT_THRESHOLDS:
        return _below_counts_sorted(anchor_a, A, anchor_b, B)
    order = torch.sort(anchor_a, stable=True).indices
    anchor_sorted = anchor_a[order]
    slot = torch.arange(A.numel(), device=A.device) - (torch.cumsum(per_anchor, 0) - per_anchor)[anchor_sorted]
    table = torch.full((slots, n_anchors), float("-inf"), dtype=A.dtype, device=A.device)
    table[slot, anchor_sorted] = A[order]
    c = torch.zeros_like(anchor_b)
    k_table = torch.empty((slots, n_anchors), dtype=torch.int64, device=A.device)
    for s in range(slots):
        above = table[s].index_select(0, anchor_b) > B
        c += above
        # counts < 2^53: exact in the float64 weights of bincount (no index of the masked entries)
        k_table[s] = torch.bincount(anchor_b, weights=above.to(torch.float64), minlength=n_anchors).to(torch.int64)
    k = torch.empty_like(anchor_a)
    k[order] = k_table[slot, anchor_sorted]
    return k, c


def _below_counts_sorted(anchor_a, A, anchor_b, B):
    """_below_counts for many thresholds per anchor, sorting A only (B, a miner's negative pairs, is
    the long one). With L(x) = #{A < x} and R(x) = #{A <= x} over all of A, B_j < A_t exactly when
    R(B_j) <= L(A_t): the integer keys anchor W + 2 L(A_t) + 1 and anchor W + 2 R(B_j) (W = 2 #A + 2)
    are never equal and order each anchor's values as the values. pos_j, the number of A keys below
    B_j's, places it among its anchor's sorted thresholds [start, end): c_j = end - pos_j, and k_t
    counts the negatives of its anchor with pos_j <= t (a histogram of pos, cumulated)."""
    width = 2 * A.numel() + 2
    values = torch.sort(A).values
    key_a = anchor_a * width + 2 * torch.searchsorted(values, A) + 1
    key_b = anchor_b * width + 2 * torch.searchsorted(values, B, right=True)
    sorted_a, order = torch.sort(key_a)
    pos = torch.searchsorted(sorted_a, key_b)
    end = torch.searchsorted(sorted_a, (anchor_b + 1) * width)
    c = end - pos
    below_some = pos < end  # a threshold of its anchor lies above it
    cum = torch.cumsum(torch.bincount(pos[below_some], minlength=A.numel()), 0)
    first = torch.searchsorted(sorted_a, sorted_a // width * width)  # the first threshold of t's anchor
    before = torch.where(first > 0, cum[(first - 1).clamp(min=0)], torch.zeros_like(first))
    k = torch.empty_like(order)
    k[order] = cum[:A.numel()] - before
    return k, c


def listed_pairs_triplet_margin(embeddings, ref_emb, indices_tuple, *, margin, distance):
    """TripletMarginLoss over a pair tuple (a1, p, a2, n): PML's triplets (lmu.convert_to_triplets:
    every listed positive pair with every listed negative pair of its anchor, duplicates included)
    without enumerating them, by the triplet engine's rule (docs/design.md "Triplets"): with u = d
    (or -S), A = u_ap + margin per positive pair and B = u_an per negative pair, the sum of the terms
    A_p - B_n > 0 is sum_p k_p A_p - sum_n c_n B_n and their count sum_p k_p (_below_counts; the
    counts are constants of the autograd, so the gradients are k_p and -c_n as the engine's). The
    pairs' u from ops/listed.pair_values (on the CPU the engines' bits). Memory O(#pairs + (N + M) D),
    time O(#pairs (D + s)) (s: _below_counts). None where the reference computes it: no positive or no negative
    pair. A u that is not finite (a row that is not) gives NaN, as the loss over the label sets."""
    a1, p, a2, n = (torch.as_tensor(t, device=embeddings.device).long().reshape(-1) for t in indices_tuple)
    if a1.numel() == 0 or a2.numel() == 0:
        return None
    A = stat_dtype(embeddings.dtype)
    q = normalize(embeddings).to(A)
    r = q if ref_emb is None else normalize(ref_emb).to(A)
    lp = distance == "lp"
    sign = 1.0 if lp else -1.0  # u = d, or -S
    u_ap, u_an = sign * pair_values(q, r, a1, p, lp), sign * pair_values(q, r, a2, n, lp)
    thresholds = u_ap + margin
    if not bool(torch.isfinite(thresholds).all() & torch.isfinite(u_an).all()):
        loss = ((thresholds.sum() + u_an.sum()) * 0).to(embeddings.dtype)  # NaN, with the graph of the u
    else:
        with torch.no_grad():
            k, c = _below_counts(a1, thresholds.detach(), a2, u_an.detach())
        count = int(k.sum())
        if count == 0:
            loss = zero_loss(embeddings)
        else:  # in float64: the two sums are about count x |u|, their difference only the violations
            total = (k.double() * thresholds.double()).sum() - (c.double() * u_an.double()).sum()
            loss = (total / count).to(embeddings.dtype)
    return nan_in_nan_out(loss, embeddings, ref_emb).to(similarity_dtype(embeddings, distance))


def triplet_margin_reference(embeddings, labels, ref_emb=None, ref_labels=None, *, margin=0.05, distance="lp",
                             swap=False, smooth_loss=False, indices_tuple=None):
    """PML TripletMarginLoss(margin, swap, smooth_loss) over all or the listed triplets.

    Triplets: the listed ones (indices_tuple (a, p, n), or pairs (a1, p, a2, n) joined on the
    anchor, lmu.convert_to_triplets; a sample, sampled_triplets), else all of them (PML's identity
    rule for the self pair). With swap the negative's distance is the smaller of u_an and u_pn
    (the larger similarity: PML's distance.smallest_dist), u_pn read as PML's mat[p, n]. Per
    triplet l = relu(margin(ap, an) + margin), or softplus with smooth_loss, margin(x, y) = x - y
    for "lp", y - x for "cosine" (base_distance.py:61-64); AvgNonZeroReducer: mean of the l > 0,
    0 if none. With all triplets the distances come from the materialized matrix, as PML's; with
    listed triplets from the listed rows (memory O(#triplets D)).
    """
    check_distance(distance, loss="triplet_margin_loss")
    a, ap, an, pn = pml_triplets(embeddings, labels, ref_emb, ref_labels, indices_tuple, distance, swap)
    if a.numel() == 0:
        return nan_in_nan_out(zero_loss(embeddings), embeddings, ref_emb)
    if swap:
        an = torch.minimum(an, pn) if distance == "lp" else torch.maximum(an, pn)
    violation = (ap - an if distance == "lp" else an - ap) + margin
    losses = torch.nn.functional.softplus(violation) if smooth_loss else torch.relu(violation)
    kept = losses > 0
    loss = losses[kept].mean() if kept.any() else zero_loss(embeddings)
    # PML's dtype under autocast (its matmul similarity's)
    return nan_in_nan_out(loss, embeddings, ref_emb).to(similarity_dtype(embeddings, distance))


def triplet_operands(embeddings, labels, ref_emb, ref_labels, exclude_col=None):
    """(q, r, labels_q, labels_r, exclude_col) of the triplet ops: normalized rows, int64 labels, the
    own column excluded in self mode (PML's identity rule otherwise, ops/_common.py pair_operands)."""
    q, r, labels_r, excl = pair_operands(embeddings, labels, ref_emb, ref_labels, exclude_col)
    labels_q = labels.to(device=q.device, dtype=torch.int64)
    if r is None:
        return q, q, labels_q, labels_q, torch.arange(q.shape[0], device=q.device)
    labels_r = labels_r.to(device=q.device, dtype=torch.int64)
    excl = torch.full_like(labels_q, -1) if excl is None else excl.to(device=q.device, dtype=torch.int64)
    return q, r, labels_q, labels_r, excl


def triplet_engine_op(kind, backend, device):
    """The forward op of the triplet engine's "rows" (the hinge sums) or "bins" (DynamicSoftMargin's)
    for a backend: Triton's on "triton" (ops/triton_triplets.py), else ops/triplets.py's (the
    compiled kernels on "cpu" / "cuda", else the PyTorch op)."""
    if backend == "triton":
        from ..ops import triton_triplets

        if not triton_triplets.AVAILABLE:
            raise RuntimeError("the Triton engines are not available (is triton installed?)")
        return triton_triplets.forward_op() if kind == "rows" else triton_triplets.bins_forward_op()
    return rows_op(backend, device) if kind == "rows" else bins_op(backend, device)


# entries of one chunk's rows x M products in miner_triplet_counts, and the half d^2 below which a
# pair's d comes from the rows' difference there
SELF_SLOT_CHUNK_ELEMENTS = 1 << 20
SELF_SLOT_NEAR = 1e-3


@loss_function
def triplet_margin_fused(embeddings, labels, ref_emb, ref_labels, *, margin, distance="lp", backend,
                         swap=False, smooth_loss=False, exclude_col=None, batch=LOCAL, window=NO_WINDOW,
                         record=None):
    """All triplets (or a TripletMarginMiner's: `window`) through the op triplet_rows (module
    docstring); with swap or smooth_loss, whose terms couple a positive and a negative, through the
    op triplet_coupled_rows (PyTorch, streamed: O(N P M) work, no triplet memory). AvgNonZero over
    `batch` (the distributed wrapper sums over every rank's rows). `record(in_window, q, r,
    labels_q, labels_r, exclude_col)`: called with the op's per-row in-window counts and operands
    (CrossBatchMemory counts its miner's triplets from them)."""
    operands = triplet_operands(embeddings, labels, ref_emb, ref_labels, exclude_col)
    if swap or smooth_loss:
        if window != NO_WINDOW or record is not None:
            raise ValueError("TripletMarginLoss with swap or smooth_loss: a miner's window is not fused")
        if swap and ref_emb is not None:
            check_swap_positives(_triplet_positive_columns(*operands[2:]), embeddings.shape[0])
        sums, counts = triplet_coupled_rows(*operands, float(margin), distance == "lp", bool(swap), bool(smooth_loss))
    else:
        op = triplet_engine_op("rows", backend, embeddings.device)
        sums, counts, in_window = op(*operands, float(margin), distance == "lp", *window)
        if record is not None:
            record(in_window, *operands)
    n = batch.sum(counts)
    zero = zero_loss(embeddings)
    loss = torch.where(n > 0, (batch.sum(sums) / n.clamp(min=1)).to(embeddings.dtype), zero)
    # AvgNonZeroReducer drops NaN terms: keep NaN in, NaN out (docs/semantics.md)
    loss = loss + zero + (0 if ref_emb is None else zero_loss(ref_emb))
    return loss.to(similarity_dtype(embeddings, distance))  # PML's dtype under autocast


def _triplet_positive_columns(labels_q, labels_r, exclude_col):
    """The columns of r that are the positive of some triplet: ref rows with an anchor's label, when
    r holds two labels or more (else no anchor has both a positive and a negative). The excluded
    column, an anchor's own row in ref mode, is below N: it never decides."""
    if torch.unique(labels_r).numel() < 2:
        return labels_r[:0]
    return torch.nonzero(torch.isin(labels_r, labels_q)).flatten()


def miner_triplet_counts(in_window, q, r, labels_q, labels_r, exclude_col, *, lp, window):
    """Per anchor row, the triplets a TripletMarginMiner with this `window` on the triplet margin
    keeps mining the rows q against r, the excluded column included (its num_triplets is their
    sum): the op's in_window, which leaves each row's excluded column (its own memory slot) out of
    the positives, plus the triplets with that positive, the negatives n with
    lo < u_n - u_own <= hi (u = d or -S; u_own = 0 for d, a row against its own copy). As a range of
    one product per pair: the cosine's S_n in [S_own - hi, S_own - lo); for d, with
    s' = q . r_n - |r_n|^2 / 2 (a product of rows with one more column) and d^2 = |q|^2 - 2 s', the
    range of s' that puts d in (lo, hi]. Pairs with d^2 < 2 SELF_SLOT_NEAR (unit rows) take their d
    from the rows' difference, as the op's near pairs do (two equal rows are at exactly 0; farther
    pairs differ from the op's d by a rounding). NaN pairs are in no window. One pass over r in
    chunks of rows, no N x M matrix."""
    lo, hi = window
    extra = torch.zeros_like(in_window)
    rows = torch.nonzero(exclude_col >= 0).flatten()
    if rows.numel() == 0 or (lp and hi < 0):
        return in_window
    A = stat_dtype(q.dtype)
    step = max(1, SELF_SLOT_CHUNK_ELEMENTS // max(r.shape[0], 1))
    with torch.no_grad():
        qa, ra = q.detach().to(A), r.detach().to(A)
        nq = (qa * qa).sum(1)
        if lp:
            ones = torch.ones(qa.shape[0], 1, dtype=A, device=qa.device)
            qa, rb = torch.cat([qa, ones], 1), torch.cat([ra, -0.5 * (ra * ra).sum(1, keepdim=True)], 1)
        else:
            rb = ra
        for k0 in range(0, rows.numel(), step):
            i = rows[k0:k0 + step]
            s = qa[i] @ rb.t()
            if lp:  # lo < d <=> lo < 0 or d^2 > lo^2; d <= hi <=> d^2 <= hi^2 (hi >= 0)
                s.scatter_(1, exclude_col[i, None], float("-inf"))  # the own slot: no negative, not near
                half = 0.5 * nq[i, None]
                kept = s >= half - 0.5 * hi * hi if hi != float("inf") else s == s  # NaN: in no window
                if lo >= 0:
                    kept &= s < half - 0.5 * lo * lo
            else:
                s_own = s.gather(1, exclude_col[i, None])  # from the same product: equal rows, equal S
                kept = (s >= s_own - hi) & (s < s_own - lo)
            kept &= labels_q[i, None] != labels_r[None, :]
            if lp:  # near d = 0: d from the rows' difference (the row maxima say whether any pair is)
                near_limit = 0.5 * nq[i, None] - SELF_SLOT_NEAR
                top = s.amax(1, keepdim=True)  # NaN where the row holds one: then look at every pair
                if bool(((top > near_limit) | torch.isnan(top)).any()):
                    near = torch.nonzero(s > near_limit, as_tuple=True)
                    d = (qa[i][near[0], :-1] - ra[near[1]]).square().sum(1).sqrt()
                    kept[near] = (d > lo) & (d <= hi) & (labels_q[i][near[0]] != labels_r[near[1]])
            extra[i] = torch.count_nonzero(kept, dim=1).to(extra.dtype)
    return in_window + extra


def all_triplet_distance_means(embeddings, labels, ref_emb, ref_labels, *, distance, backend, exclude_col,
                               batch=LOCAL):
    """TripletMarginMiner's collect_stats over all triplets (a, p, n) of the rows: the means of
    u_ap and u_an (u = d, or S for the cosine), from each row's sums and sizes of its positive and
    negative sets (sum_a (sum_p u_ap) |N_a| / sum_a |P_a| |N_a|, and likewise), forward only;
    None without a triplet."""
    q, r, labels_r, excl = pair_operands(embeddings, labels, ref_emb, ref_labels, exclude_col)
    sums = PairLossSpec(pos=PairTerm(scale=1.0, sum=True), neg=PairTerm(scale=1.0, sum=True), distance=distance)
    with torch.no_grad():
        st = pair_stats(q, r, labels, labels_r, excl, sums, backend)
    n_pos, n_neg = st.count_pos.to(torch.float64), st.count_neg.to(torch.float64)
    triplets = float(batch.sum(n_pos * n_neg))
    if triplets == 0:
        return None
    return (float(batch.sum(st.sum_pos.double() * n_neg)) / triplets,
            float(batch.sum(st.sum_neg.double() * n_pos)) / triplets)


def _ref_is_labels(mined):
    """ref mode where ref_labels is labels: PML's identity rule leaves the diagonal out of the positives."""
    if mined.ref_emb is not mined.embeddings and mined.ref_labels is mined.labels:
        return dict(exclude_col=torch.arange(mined.embeddings.shape[0], device=mined.embeddings.device))
    return {}


@loss_function
def triplet_margin_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, margin=0.05, distance="lp",
                        swap=False, smooth_loss=False, triplets_per_anchor="all", backend="auto"):
    """PML TripletMarginLoss(margin, swap, smooth_loss, triplets_per_anchor); PML's default distance
    LpDistance ("lp"). An integer triplets_per_anchor (or None) samples PML's triplets
    (sampled_triplets: the same draws from torch's default generator) and computes them from their
    rows (O(N k D)); "all" are never enumerated."""
    V.check_real("margin", margin)
    V.check_distance(distance)
    check_triplets_per_anchor(triplets_per_anchor)
    hyper = dict(margin=margin, distance=distance, swap=bool(swap), smooth_loss=bool(smooth_loss))
    if triplets_per_anchor != "all":
        V.check_pair_inputs(embeddings, labels, ref_emb, ref_labels)
        resolve_backend(backend, embeddings.device)  # still reject unknown backends
        triplets = sampled_call_triplets(embeddings, labels, ref_emb, ref_labels, triplets_per_anchor)
        return triplet_margin_reference(embeddings, labels, ref_emb, ref_labels, indices_tuple=triplets, **hyper)
    return run_pair_loss(triplet_margin_reference, triplet_margin_fused, embeddings, labels, ref_emb, ref_labels,
                         backend, **hyper)


class TripletMarginLoss(_PairLoss):
    """Drop-in for pytorch_metric_learning.losses.TripletMarginLoss (default distance LpDistance).
    All triplets are computed without enumerating them (with swap or smooth_loss streamed: O(N P M)
    work, no triplet memory); an integer triplets_per_anchor samples PML's triplets (the same draws)
    and computes them from their rows; listed triplets from their rows only (O(#triplets D)), a pair
    tuple's triplets counted per listed pair (O(#pairs); joined into triplets with swap or
    smooth_loss, as PML)."""
    _default_distance = "lp"
    _reference = staticmethod(triplet_margin_reference)
    _listed_pairs = False  # listed triplets: _reference_with_indices (their rows only); pairs: below

    def __init__(self, margin=0.05, swap=False, smooth_loss=False, triplets_per_anchor="all", backend="auto",
                 **kwargs):
        super().__init__()
        V.check_real("margin", margin)
        check_triplets_per_anchor(triplets_per_anchor)
        self.margin, self.swap, self.smooth_loss = margin, swap, smooth_loss
        self.triplets_per_anchor = triplets_per_anchor
        self._init_pair(backend, kwargs, (margin, swap, smooth_loss, triplets_per_anchor))

    def _hyper(self):
        return dict(margin=self.margin, distance=self._distance_kind, swap=bool(self.swap),
                    smooth_loss=bool(self.smooth_loss))

    def _fused_in_wrappers_now(self):
        # the wrappers' fused calls take all triplets' hinge: swap reads PML's mat[p, n] of the
        # caller's rows, and the coupled op takes no miner's window (memory.py)
        return not (self.swap or self.smooth_loss) and self.triplets_per_anchor == "all"

    def _functional(self):
        return triplet_margin_loss

    def _reference_with_indices(self, embeddings, labels, indices_tuple, ref_emb, ref_labels, hyper):
        # the listed triplets' rows only: no N x M matrix, so no warning
        check_listed_rows(embeddings, ref_emb)
        return triplet_margin_reference(embeddings, labels, ref_emb, ref_labels, indices_tuple=indices_tuple, **hyper)

    def _forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        if labels is None and indices_tuple is None:
            raise ValueError("TripletMarginLoss needs labels or an indices_tuple")
        # PML's sample (an integer triplets_per_anchor), computed from its triplets' rows
        indices_tuple = self._with_sampled_triplets(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        coupled = self.swap or self.smooth_loss
        if not coupled and _is_mined_triplets(indices_tuple) and indices_tuple.fused_for(
                embeddings, labels, ref_emb, ref_labels, self._distance_kind):
            return self._fused_with_miner(indices_tuple)
        return super()._forward(embeddings, labels, indices_tuple, ref_emb, ref_labels)

    def _fused_with_listed_pairs(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        """A pair tuple (a1, p, a2, n), any miner's: its triplets counted without enumerating them
        (listed_pairs_triplet_margin); None for listed triplets (their rows, _reference_with_indices),
        on the reference backend and where that function defers to the reference."""
        if not isinstance(indices_tuple, (tuple, list)) or len(indices_tuple) != 4 or self.swap or self.smooth_loss:
            return None
        if resolve_backend(self.backend, embeddings.device) == "reference":
            return None
        # PML reads the tuple only (convert_to_triplets ignores the labels): what it accepts, we do
        check_listed_rows(embeddings, ref_emb)
        return listed_pairs_triplet_margin(embeddings, ref_emb, indices_tuple, margin=self.margin,
                                           distance=self._distance_kind)

    def _fused_with_miner(self, mined):
        """Our TripletMarginMiner's triplets: its window on the triplet margin in the op, nothing listed."""
        emb = mined.embeddings
        # self mode only where PML's identity rule holds (the batch under its own labels); the batch
        # as its ref under other labels is ref mode, its diagonal a pair as in PML
        self_mode = mined.ref_emb is emb and mined.ref_labels is mined.labels
        ref_emb = None if self_mode else mined.ref_emb
        # the miner's labels as given (float / bool ones as ids; `ref_labels is labels` kept)
        labels, ref_labels = V.label_ids(mined.labels, None if self_mode else mined.ref_labels)
        V.check_pair_inputs(emb, labels, ref_emb, ref_labels)
        backend = resolve_backend(self.backend, emb.device)
        if backend == "reference":
            return self._reference_with_indices(emb, labels, mined, ref_emb, ref_labels, self._hyper())
        return triplet_margin_fused(emb, labels, ref_emb, ref_labels, margin=self.margin,
                                    distance=self._distance_kind, backend=backend, window=mined.window,
                                    **_ref_is_labels(mined))

    def extra_repr(self):
        return super().extra_repr() + f", triplets_per_anchor={self.triplets_per_anchor!r}"


def _is_mined_triplets(indices_tuple):
    """A TripletMarginMiner result of ours (fused_pairloss._miners.MinedTriplets; that module needs
    PML and reaches this one: recognized by what it offers)."""
    return hasattr(indices_tuple, "fused_for") and hasattr(indices_tuple, "window")


ENTRIES = (
    LossEntry(TripletMarginLoss, "pair", functional=triplet_margin_loss, reference=triplet_margin_reference,
              fused=triplet_margin_fused, hyper=("margin",)),
)
