"""PML's five most used miners, each PML's own class with its mining done in chunks of anchor rows
(docs/api.md "Miners"): the same arguments, defaults, attributes, recorded stats and output (PML's
index tuples in PML's order), without PML's N x M (MultiSimilarity: five of them) or N x M x M
(TripletMargin) intermediates: memory O(chunk x M) plus the output.

Every one of them mines row by row (a row's output depends on its row of the distance matrix and
on the labels only), so the chunks' outputs, concatenated, are PML's. The distances are PML's
distance object applied to a chunk of rows; a BLAS product of a chunk may round differently from
the whole product in the last bit, so a pair within rounding of a miner's threshold may be decided
differently from PML (docs/semantics.md "Miners").

BatchHardMiner and BatchEasyHardMiner with the hard / easy strategies (no ranges) on CPU take each
row's extremes from the C++ op row_extremes (the engines' distances, strip by strip).
MultiSimilarityMiner on CPU sorts only the pairs it keeps, with the C++ op ascending_kept_columns
(PML sorts both sets' whole rows): the same order, as long as two kept values of a row are not
equal; such a row is sorted as PML does.

TripletMarginMiner lists its triplets per anchor and positive (O(N P M) work, P the positives of a
row; PML builds the N x M x M candidate mask) and returns them as a `MinedTriplets`: PML's tuple,
which also carries the miner's window on the triplet margin, so that our TripletMarginLoss computes
over the same triplets in the all-triplets op without reading the list.
"""
from __future__ import annotations

import functools
import math

import torch
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning.utils import common_functions as c_f

from . import _validation as V
from .ops.operands import autocast_enabled


# entries of one chunk's N_chunk x M (pair miners) or N_chunk x M x M (triplets) intermediates
CHUNK_ELEMENTS = 1 << 20
TRIPLET_CHUNK_ELEMENTS = 1 << 22


def _row_chunks(n, m, per_row, budget):
    """[i0, i1) chunks of rows, budget / per_row rows each (all rows against at most 25 columns:
    torch.cdist picks its method by the row counts, and with more than 25 it is PML's matmul form
    whatever the chunk)."""
    step = n if m <= 25 else max(1, budget // max(per_row, 1))
    return [(i0, min(n, i0 + step)) for i0 in range(0, n, max(step, 1))]


def _empty(device):
    return torch.tensor([], device=device, dtype=torch.long)


def _checked_mine(pml_cls):
    """A miner's mine(), after the checks of its inputs (2-D floating-point tensors, a ref_emb of the
    embeddings' width and dtype: a ValueError / TypeError naming the argument, where PML fails deep
    in its distance). A call with a ref_emb of more rows than the embeddings and no ref_labels is
    PML's class's own mine: PML reads the labels for the ref's first rows and mines the others by
    its own steps' accidents (its MultiSimilarityMiner keeps them as positives and negatives alike)."""
    def wrap(mine):
        @functools.wraps(mine)
        def wrapped(self, embeddings, labels, ref_emb, ref_labels):
            V.check_embeddings(embeddings, allow_empty=True)
            if ref_emb is not embeddings:
                V.check_embeddings(ref_emb, "ref_emb", allow_empty=True)
                if ref_emb.shape[1] != embeddings.shape[1]:
                    raise ValueError(f"ref_emb must have the embedding width D={embeddings.shape[1]} of embeddings; "
                                     f"got shape {tuple(ref_emb.shape)}")
                if ref_emb.dtype != embeddings.dtype:
                    raise TypeError(f"ref_emb must have the dtype of embeddings ({embeddings.dtype}); "
                                    f"got {ref_emb.dtype}")
            if ref_labels is None and ref_emb.shape[0] > embeddings.shape[0]:
                return pml_cls.mine(self, embeddings, labels, ref_emb, ref_labels)
            out = mine(self, embeddings, labels, ref_emb, ref_labels)
            from .losses._base import record_distance_stats  # PML's mine measures all rows at once
            record_distance_stats(self.distance, embeddings, ref_emb)
            return out
        return wrapped
    return wrap


class _Rows:
    """The mining inputs as PML's BaseMiner.forward hands them to mine(), and chunks of their rows:
    the distance rows and the label masks with PML's identity rules (the diagonal is no positive
    when ref_labels is labels; MultiSimilarity also ignores it when ref_emb is embeddings)."""

    def __init__(self, miner, embeddings, labels, ref_emb, ref_labels):
        if ref_labels is None:  # PML's get_matches_and_diffs: the labels stand for the ref's rows
            if ref_emb.shape[0] < embeddings.shape[0]:  # a wider one is PML's own mine (see the decorator)
                raise ValueError(f"ref_emb was given without ref_labels: the labels then stand for ref_emb's rows "
                                 f"(PML's reading, which fails with an IndexError on fewer), so it needs at least "
                                 f"{embeddings.shape[0]} rows; got {ref_emb.shape[0]}")
            ref_labels = labels
        self.miner, self.embeddings, self.labels, self.ref_emb, self.ref_labels = (miner, embeddings, labels,
                                                                                   ref_emb, ref_labels)
        self.N, self.M = embeddings.shape[0], ref_emb.shape[0]
        self.self_labels = ref_labels is labels
        self.self_emb = ref_emb is embeddings

    def chunk(self, i0, i1):
        mat = self.miner.distance(self.embeddings[i0:i1], self.ref_emb)
        matches = self.labels[i0:i1, None] == self.ref_labels[None, :]
        diffs = ~matches
        if self.self_labels:
            matches[torch.arange(i1 - i0, device=mat.device), torch.arange(i0, i1, device=mat.device)] = False
        return mat, matches, diffs

    def diagonal(self, i0, i1):
        """(rows, columns) of the chunk's diagonal entries (self mode)."""
        k = torch.arange(i1 - i0, device=self.embeddings.device)
        return k, k + i0

    def same_label_counts(self):
        """Per row, the columns of its label (itself included), from the label counts."""
        values, counts = torch.unique(self.ref_labels, return_counts=True)
        return (self.labels[:, None] == values[None, :]).to(counts.dtype) @ counts

    def _own_column(self):
        """Per row, 1 where the diagonal counted among its label's columns (self mode; a NaN label
        matches no column, its own neither), else 0."""
        if not self.self_labels:
            return 0
        return (self.labels == self.labels).to(torch.int64)

    def pair_totals(self):
        """PML's len(a1) and len(a2): all positive and all negative pairs."""
        same = self.same_label_counts()
        positives = int((same - self._own_column()).sum())
        return positives, self.N * self.M - int(same.sum())

    def most_positives(self):
        """The largest positive set of a row (less itself when the diagonal is excluded)."""
        per_row = self.same_label_counts() - self._own_column()
        return int(per_row.max()) if per_row.numel() else 0


class PairMarginMiner(pml_miners.PairMarginMiner):
    __doc__ = "PML's PairMarginMiner, mined in chunks of rows (fused_pairloss._miners)."

    @_checked_mine(pml_miners.PairMarginMiner)
    def mine(self, embeddings, labels, ref_emb, ref_labels):
        rows = _Rows(self, embeddings, labels, ref_emb, ref_labels)
        out, sums = [[], [], [], []], [0.0, 0, 0.0, 0]
        for i0, i1 in _row_chunks(rows.N, rows.M, rows.M, CHUNK_ELEMENTS):
            mat, matches, diffs = rows.chunk(i0, i1)
            # PML lists every pair of a set, then keeps those past the margin: the same pairs in the
            # same (row-major) order as listing the kept ones directly
            if self.distance.is_inverted:
                pos_keep, neg_keep = matches & (mat < self.pos_margin), diffs & (mat > self.neg_margin)
            else:
                pos_keep, neg_keep = matches & (mat > self.pos_margin), diffs & (mat < self.neg_margin)
            a1, p = torch.where(pos_keep)
            a2, n = torch.where(neg_keep)
            for k, t in enumerate((a1 + i0, p, a2 + i0, n)):
                out[k].append(t)
            if self.collect_stats:
                sums = [sums[0] + mat[matches].double().sum().item(), sums[1] + int(matches.sum()),
                        sums[2] + mat[diffs].double().sum().item(), sums[3] + int(diffs.sum())]
        if self.collect_stats:  # PML: the means over all pairs
            self.pos_pair_dist = sums[0] / sums[1] if sums[1] > 0 else 0
            self.neg_pair_dist = sums[2] / sums[3] if sums[3] > 0 else 0
        pairs = tuple(torch.cat(t) if t else _empty(embeddings.device) for t in out)
        return MinedByMargins(pairs, self, embeddings, labels, ref_emb, ref_labels)


class MultiSimilarityMiner(pml_miners.MultiSimilarityMiner):
    __doc__ = "PML's MultiSimilarityMiner, mined in chunks of rows (fused_pairloss._miners)."

    def _pml_rule(self, dtype):
        """PML's rule (its mine()) on a chunk's rows: the value its sorted rows give the entries out of
        the positives and out of the negatives, whether each set's hardest entry is its largest, and
        the comparisons that keep a positive v (against the hardest negative) and a negative v
        (against the hardest positive)."""
        eps = self.epsilon
        if self.distance.is_inverted:  # S: the hardest negative is the largest, the hardest positive the smallest
            return ((c_f.pos_inf(dtype), c_f.neg_inf(dtype)), (False, True), lambda v, hn: v - eps < hn,
                    lambda v, hp: v + eps > hp)
        return ((c_f.neg_inf(dtype), c_f.pos_inf(dtype)), (True, False), lambda v, hn: v + eps > hn,
                lambda v, hp: v - eps < hp)

    @staticmethod
    def _sets(matches, diffs, diagonal):
        """PML's sets of a chunk's rows: a sorted row ignores the other set's pairs (and the diagonal
        when ref_emb is embeddings: `diagonal`), so with ref_labels labels and another ref_emb its
        diagonal is in both."""
        pos_in, neg_in = ~diffs, ~matches
        if diagonal is not None:
            pos_in[diagonal] = False
            neg_in[diagonal] = False
        return pos_in, neg_in

    def _hard_pairs_in_order(self, order_op, mat, matches, diffs, diagonal):
        """PML's hard positives and negatives of a chunk of finite values, each row's in PML's order,
        sorting only the kept entries (order_op: the op ascending_kept_columns) and, where two kept
        values of a row are equal (torch.sort orders those its own way), that row as PML does: each
        row's hardest negative and positive by a masked max / min, PML's comparisons on the unsorted
        values. Returns [(rows, columns) of the positives, (rows, columns) of the negatives]."""
        ignores, largest, pos_rule, neg_rule = self._pml_rule(mat.dtype)
        sets = self._sets(matches, diffs, diagonal)
        pos_hardest, neg_hardest = (mat.masked_fill(~members, ignore).amax(1, keepdim=True) if top else
                                    mat.masked_fill(~members, ignore).amin(1, keepdim=True)
                                    for members, ignore, top in zip(sets, ignores, largest))
        out = []
        for members, ignore, rule, other in zip(sets, ignores, (pos_rule, neg_rule), (neg_hardest, pos_hardest)):
            rows, columns, counts, tied = order_op(mat, members & rule(mat, other))
            tied = torch.nonzero(tied).flatten()
            if len(tied):  # PML's sort of those rows: the same kept columns, in torch.sort's order
                sorted_v, sorted_i = torch.sort(mat[tied].masked_fill(~members[tied], ignore), dim=1)
                row, at = torch.where(rule(sorted_v, other[tied]))
                start = torch.cumsum(counts, 0) - counts  # of each row's entries
                first_of_row = torch.cumsum(counts[tied], 0) - counts[tied]  # in `row`
                columns[start[tied[row]] + torch.arange(len(row)) - first_of_row[row]] = sorted_i[row, at]
            out.append((rows, columns))
        return out

    def _pml_steps(self, mat, matches, diffs, diagonal):
        """PML's steps on a chunk: both sets' whole rows sorted, the hardest at their ends. Returns
        [(rows, columns) of the positives, (rows, columns) of the negatives]."""
        ignores, largest, pos_rule, neg_rule = self._pml_rule(mat.dtype)
        (pos_v, pos_i), (neg_v, neg_i) = (torch.sort(mat.masked_fill(~members, ignore), dim=1)
                                          for members, ignore in zip(self._sets(matches, diffs, diagonal), ignores))
        pos_hardest, neg_hardest = (v[:, -1:] if top else v[:, :1] for v, top in zip((pos_v, neg_v), largest))
        out = []
        for order, hard in ((pos_i, pos_rule(pos_v, neg_hardest)), (neg_i, neg_rule(neg_v, pos_hardest))):
            row, at = torch.where(hard)
            out.append((row, order[row, at]))
        return out

    @_checked_mine(pml_miners.MultiSimilarityMiner)
    def mine(self, embeddings, labels, ref_emb, ref_labels):
        from .ops.triplets import ascending_kept_columns_op
        rows = _Rows(self, embeddings, labels, ref_emb, ref_labels)
        n_pos, n_neg = rows.pair_totals()
        if n_pos == 0 or n_neg == 0:
            return MinedByEpsilon(tuple(_empty(labels.device) for _ in range(4)), self, embeddings, labels, ref_emb,
                                  ref_labels)
        order_op = ascending_kept_columns_op(embeddings.device)
        out = [[], [], [], []]
        for i0, i1 in _row_chunks(rows.N, rows.M, rows.M, CHUNK_ELEMENTS):
            mat, matches, diffs = rows.chunk(i0, i1)
            diagonal = rows.diagonal(i0, i1) if rows.self_emb else None
            if order_op is not None and mat.dtype in (torch.float32, torch.float64) and bool(mat.isfinite().all()):
                pairs = self._hard_pairs_in_order(order_op, mat, matches, diffs, diagonal)
            else:  # other devices and dtypes, and chunks with a non-finite value
                pairs = self._pml_steps(mat, matches, diffs, diagonal)
            for k, (r, c) in enumerate(pairs):
                out[2 * k].append(r + i0)
                out[2 * k + 1].append(c)
        return MinedByEpsilon(tuple(torch.cat(t) for t in out), self, embeddings, labels, ref_emb, ref_labels)


class BatchEasyHardMiner(pml_miners.BatchEasyHardMiner):
    __doc__ = "PML's BatchEasyHardMiner, mined in chunks of rows (fused_pairloss._miners)."

    def _x_per_row(self, xtype, mat, pairs, val_range=None, semihard_thresholds=None):
        """PML's get_x_per_row on a chunk: the per-row min / max over the pairs (a bool mask)."""
        inf = c_f.pos_inf(mat.dtype) if xtype == "min" else c_f.neg_inf(mat.dtype)
        drop = ~pairs
        if semihard_thresholds is not None:
            drop |= (mat <= semihard_thresholds.unsqueeze(1)) if xtype == "min" else \
                (mat >= semihard_thresholds.unsqueeze(1))
        if val_range is not None:
            drop |= (mat > val_range[1]) | (mat < val_range[0])
        non_inf_rows = torch.any(~drop, dim=1)
        mat = mat.masked_fill(drop, inf)
        return (torch.min if xtype == "min" else torch.max)(mat, dim=1), non_inf_rows

    def _extreme(self, strategy):
        """PML's get_mine_function: min or max per row, for a positive strategy (another one raises
        there, as here: a strategy assigned after construction is not checked before)."""
        if strategy in (self.HARD, self.SEMIHARD):
            return "min" if self.distance.is_inverted else "max"
        if strategy == self.EASY:
            return "max" if self.distance.is_inverted else "min"
        raise NotImplementedError(f"pos_strategy={strategy!r}: PML mines {self.HARD!r}, {self.SEMIHARD!r}, "
                                  f"{self.EASY!r} or {self.ALL!r}")

    def _positives(self, mat, matches, negative_dists=None):
        return self._x_per_row(self._extreme(self.pos_strategy), mat, matches, self.allowed_pos_range,
                               negative_dists)

    def _negatives(self, mat, diffs, positive_dists=None):
        strategy = self.EASY if self.neg_strategy in (self.HARD, self.SEMIHARD) else self.HARD
        return self._x_per_row(self._extreme(strategy), mat, diffs, self.allowed_neg_range, positive_dists)

    def _fused_extremes(self, rows):
        """The hard / easy strategies without ranges, on CPU with the C++ kernels: the per-row
        extremes from the op row_extremes (strips of the engines' distances, no N x M), else None."""
        from .losses._base import _distance_name
        from .ops.triplets import row_extremes_op
        strategies = (self.HARD, self.EASY)
        kind = _distance_name(self.distance)
        op = row_extremes_op(rows.embeddings.device)
        if (op is None or kind not in ("lp", "cosine") or self.pos_strategy not in strategies
                or self.neg_strategy not in strategies or self.allowed_pos_range is not None
                or self.allowed_neg_range is not None):
            return None
        low_precision = any(t.dtype not in (torch.float32, torch.float64) for t in (rows.embeddings, rows.ref_emb))
        if low_precision or (kind == "cosine" and autocast_enabled(rows.embeddings.device.type)):
            # PML mines on its own fp16 / bf16 matrix (autocast's, for the cosine's matmul), whose
            # roundings tie many pairs, which its torch.max breaks to the first index; the op's
            # distances are more precise, so its extremes would differ: PML's steps
            return None
        q = torch.nn.functional.normalize(rows.embeddings, dim=1)
        r = q if rows.self_emb else torch.nn.functional.normalize(rows.ref_emb, dim=1)
        if not (bool(torch.isfinite(q).all()) and (r is q or bool(torch.isfinite(r).all()))):
            return None  # PML's torch.max picks a NaN as the extreme; the op's comparisons skip it
        if rows.self_labels:  # PML's identity rule: the diagonal is no positive
            excl = torch.arange(rows.N, device=q.device)
        else:
            excl = torch.full((rows.N,), -1, dtype=torch.int64, device=q.device)
        labels, ref_labels = rows.labels, rows.ref_labels
        if V._needs_ids(labels) or V._needs_ids(ref_labels):  # float / bool labels: ids equal where they are
            if any(t.is_floating_point() and bool(torch.isnan(t).any()) for t in (labels, ref_labels)):
                return None  # a NaN label equals none, not even itself: PML's comparisons, its steps
            labels, ref_labels = V.label_ids(labels, ref_labels)
        # in u = d (lp) or -S: the hardest positive has the largest u, the hardest negative the smallest
        pos_u, pos_i, neg_u, neg_i = op(q, r, labels, ref_labels, excl, kind == "lp",
                                        self.pos_strategy == self.HARD, self.neg_strategy == self.EASY)
        sign = 1.0 if kind == "lp" else -1.0  # back to PML's matrix: d, or S = -u
        return (sign * pos_u).to(q.dtype), pos_i, pos_i >= 0, (sign * neg_u).to(q.dtype), neg_i, neg_i >= 0

    @_checked_mine(pml_miners.BatchEasyHardMiner)
    def mine(self, embeddings, labels, ref_emb, ref_labels):
        rows = _Rows(self, embeddings, labels, ref_emb, ref_labels)
        fused = self._fused_extremes(rows)
        if fused is not None:
            pos_d, pos_i, p_keep, neg_d, neg_i, n_keep = fused
            keep = torch.where(p_keep & n_keep)
            a = torch.arange(rows.N, device=embeddings.device)[keep]
            if self.collect_stats:
                self.set_stats(pos_d[keep], neg_d[keep])
            return a, pos_i[keep], a, neg_i[keep]
        ALL, SEMI = self.ALL, self.SEMIHARD
        pos_s, neg_s = self.pos_strategy, self.neg_strategy
        out, stats = [[], [], [], []], [[], []]
        for i0, i1 in _row_chunks(rows.N, rows.M, rows.M, CHUNK_ELEMENTS):
            mat, matches, diffs = rows.chunk(i0, i1)
            a = torch.arange(i0, i1, device=mat.device)
            if pos_s == SEMI and neg_s != ALL:
                (neg_d, neg_i), n_keep = self._negatives(mat, diffs)
                (pos_d, pos_i), p_keep = self._positives(mat, matches, neg_d)
            elif neg_s == SEMI and pos_s != ALL:
                (pos_d, pos_i), p_keep = self._positives(mat, matches)
                (neg_d, neg_i), n_keep = self._negatives(mat, diffs, pos_d)
            else:
                if pos_s != ALL:
                    (pos_d, pos_i), p_keep = self._positives(mat, matches)
                if neg_s != ALL:
                    (neg_d, neg_i), n_keep = self._negatives(mat, diffs)
            if ALL not in (pos_s, neg_s):
                keep = torch.where(p_keep & n_keep)
                parts = (a[keep], pos_i[keep], a[keep], neg_i[keep])
                stats_parts = (pos_d[keep], neg_d[keep])
            elif pos_s == ALL and neg_s != ALL:
                a1, p = torch.where(matches)
                parts = (a1 + i0, p, a[n_keep], neg_i[n_keep])
                stats_parts = (mat[a1, p], neg_d[n_keep])
            elif pos_s != ALL and neg_s == ALL:
                a2, n = torch.where(diffs)
                parts = (a[p_keep], pos_i[p_keep], a2 + i0, n)
                stats_parts = (pos_d[p_keep], mat[a2, n])
            else:
                a1, p = torch.where(matches)
                a2, n = torch.where(diffs)
                parts = (a1 + i0, p, a2 + i0, n)
                stats_parts = (mat[a1, p], mat[a2, n])
            for k, t in enumerate(parts):
                out[k].append(t)
            if self.collect_stats:
                stats[0].append(stats_parts[0])
                stats[1].append(stats_parts[1])
        dev = embeddings.device
        result = [torch.cat(t) if t else _empty(dev) for t in out]
        if self.collect_stats:
            self.set_stats(*(torch.cat(s) if s else torch.tensor([], device=dev) for s in stats))
        if ALL not in (pos_s, neg_s):  # PML returns the anchors' one tensor twice
            result[2] = result[0]
        return tuple(result)


class BatchHardMiner(BatchEasyHardMiner, pml_miners.BatchHardMiner):
    __doc__ = "PML's BatchHardMiner (the hardest positive and negative of each anchor), mined in chunks of rows."

    @_checked_mine(pml_miners.BatchHardMiner)
    def mine(self, embeddings, labels, ref_emb, ref_labels):  # PML's __init__ sets both strategies to "hard"
        a1, p, a2, n = super().mine(embeddings, labels, ref_emb, ref_labels)
        return a1, p, n


def triplet_window(miner_margin, type_of_triplets):
    """TripletMarginMiner's kept triplets as a window (lo, hi] on its triplet margin u_an - u_ap
    (PML: an - ap for a distance, ap - an for a similarity; u = d or -S)."""
    m = float(miner_margin)
    windows = {"hard": (float("-inf"), min(m, 0.0)), "semihard": (0.0, m), "easy": (m, float("inf"))}
    return windows.get(type_of_triplets, (float("-inf"), m))  # another name (assigned since): PML's "all"


# how close to an exact point of S (1: a row's copies; 0: rows of disjoint supports) a PairMarginMiner's
# margin moved between d and S may lie before the moved edge's rounding (fp32: about 1e-7) decides the
# pairs that sit exactly there (margin_windows)
EXACT_POINT_BAND = 1e-5


def margin_windows(miner, distance=None):
    """A PairMarginMiner's kept pairs as keep windows (pos_window, neg_window) on v (PairLossSpec):
    d > pos_margin and d < neg_margin for a distance, S < pos_margin and S > neg_margin for a
    similarity (PML flips the comparisons for an inverted distance).

    `distance` ("lp" / "cosine", default the miner's own): the windows on that v. PML's normalized
    LpDistance() and CosineSimilarity() measure unit rows, where d^2 = 2 - 2 S, so either's margins
    move to the other's v: d > m is S < 1 - m^2 / 2 (m >= 0), d < m is S > 1 - m^2 / 2 (m > 0),
    S < m is d > sqrt(2 - 2 m) (m <= 1), S > m is d < sqrt(2 - 2 m) (m < 1); a margin that every
    pair passes gives (-inf, inf), one that none passes the empty window (0, 0).

    None for a NaN margin: PML keeps no pair of its set, which no window says; and for a margin
    moved to the other v whose edge lies within EXACT_POINT_BAND of the identity (d = 0, S = 1) or of
    orthogonality (S = 0, d = sqrt 2): copies of a row sit at the one (a duplicated sample, a memory
    holding the batch), where PML's d is exactly 0 and its S 1 within rounding, rows of disjoint
    supports (non-negative sparse embeddings) at the other, where PML's S is exactly 0, so the moved
    edge would decide them otherwise. The caller reads the list instead."""
    inf, pos, neg = float("inf"), float(miner.pos_margin), float(miner.neg_margin)
    if pos != pos or neg != neg:
        return None
    kind = "cosine" if miner.distance.is_inverted else "lp"
    if distance is None or distance == kind:
        return ((-inf, pos), (neg, inf)) if kind == "cosine" else ((pos, inf), (-inf, neg))
    band = EXACT_POINT_BAND
    if kind == "lp" and (0 <= pos * pos / 2 < band or 0 < neg * neg / 2 < band
                         or any(m > 0 and abs(1 - m * m / 2) <= band for m in (pos, neg))):
        return None
    if kind == "cosine" and any(abs(m - 1) <= band or abs(m) <= band for m in (pos, neg)):
        return None
    everything, nothing = (-inf, inf), (0.0, 0.0)
    if kind == "lp":  # on S
        return ((-inf, 1 - pos * pos / 2) if pos >= 0 else everything,
                (1 - neg * neg / 2, inf) if neg > 0 else nothing)
    return ((math.sqrt(2 - 2 * pos), inf) if pos <= 1 else everything,  # on d
            (-inf, math.sqrt(2 - 2 * neg)) if neg < 1 else nothing)


def _versions(*inputs):
    """The in-place version counters of the tensors among `inputs` (None for anything else): a
    miner's inputs changed in place since it mined (an optimizer step, a refilled label buffer) no
    longer hold its pairs, which the loss then reads from the list, as PML does. An inference
    tensor has no counter: a fresh object, equal to no other, so its pairs are always read."""
    return tuple(None if not isinstance(t, torch.Tensor) else object() if t.is_inference() else t._version
                 for t in inputs)


def _index_versions(indices):
    """The version counters of a miner's own index tensors; None for one made under
    torch.inference_mode (no counter, and outside that mode it cannot be edited in place)."""
    return tuple(None if t.is_inference() else t._version for t in indices)


def _copies_under_other_labels(rows, labels):
    """Whether two rows normalize to the same bits (copies, or one a power-of-two multiple of the
    other) while their labels differ (NaN labels differ from everything)."""
    if rows.shape[0] < 2:
        return False
    _, group = torch.unique(torch.nn.functional.normalize(rows.detach(), dim=1), dim=0, return_inverse=True)
    label_ids = torch.unique(labels, return_inverse=True)[1].reshape(-1).to(group.device)
    label_ids = torch.where(labels.reshape(-1) == labels.reshape(-1), label_ids,  # each NaN its own label
                            -1 - torch.arange(label_ids.numel(), device=group.device))
    n_groups = int(group.max()) + 1
    lowest = torch.full((n_groups,), label_ids.numel(), dtype=torch.int64, device=group.device)
    highest = torch.full((n_groups,), -label_ids.numel() - 1, dtype=torch.int64, device=group.device)
    lowest = lowest.scatter_reduce(0, group, label_ids, "amin")
    highest = highest.scatter_reduce(0, group, label_ids, "amax")
    return bool((lowest != highest).any())


def _mined_in_half_precision(distance, embeddings, ref_emb):
    """True when PML's miner measured in fp16 / bf16: half inputs, or the cosine's matmul under
    autocast. Its list then holds the roundings of that matrix, which the engines' fp32 / fp64
    values do not reproduce near the rule's edges: the loss reads the list."""
    from .losses._base import _distance_name
    inputs = (embeddings,) if ref_emb is None else (embeddings, ref_emb)
    if any(t.dtype not in (torch.float32, torch.float64) for t in inputs):
        return True
    return _distance_name(distance) == "cosine" and autocast_enabled(embeddings.device.type)


class _Mined(tuple):
    """A miner's result: a real tuple, PML's indices in PML's order, that also says how they were
    mined (the inputs and the distance), so that our losses can apply the miner's rule in their
    fused engines instead of reading the list (docs/api.md "Miners")."""

    def __new__(cls, indices, miner, embeddings, labels, ref_emb, ref_labels):
        out = super().__new__(cls, indices)
        if ref_labels is None:  # PML mined a ref_emb without ref_labels with the labels (_Rows)
            ref_labels = labels
        from .losses._base import _settings
        out.distance = miner.distance
        out.distance_settings = _settings(miner.distance)  # as mined (a change since: the list is read)
        out.embeddings, out.labels, out.ref_emb, out.ref_labels = embeddings, labels, ref_emb, ref_labels
        out.versions = _versions(embeddings, labels, ref_emb, ref_labels)  # as mined (changed in place since: read)
        out.index_versions = _index_versions(out)  # its own index tensors edited in place since: the list is read
        out.half_precision = _mined_in_half_precision(miner.distance, embeddings, ref_emb)
        return out

    def __reduce__(self):
        # pickled or copied: PML's plain tuple (the inputs it refers to are not carried along)
        return tuple, (tuple(self),)

    def with_indices(self, indices):
        """The same result holding `indices` (copies of its own index tensors, with their counters)."""
        out = tuple.__new__(type(self), indices)
        out.__dict__.update(self.__dict__)
        out.index_versions = _index_versions(out)
        return out

    def fused_for(self, embeddings, labels, ref_emb, ref_labels, distance):
        """True when a loss call on these inputs, with this distance ("lp" / "cosine"), may use the
        miner's rule: the miner saw the same tensors and measured with the same distance."""
        from .losses._base import _distance_name, _settings
        same_ref = (ref_emb is None and self.ref_emb is self.embeddings) or ref_emb is self.ref_emb
        same_ref_labels = (ref_labels is None and self.ref_labels is self.labels) or ref_labels is self.ref_labels
        return (not self.half_precision and embeddings is self.embeddings
                and (labels is None or labels is self.labels) and same_ref
                and same_ref_labels and _distance_name(self.distance) == distance
                and _settings(self.distance) == self.distance_settings
                and _versions(self.embeddings, self.labels, self.ref_emb, self.ref_labels) == self.versions
                and _index_versions(self) == self.index_versions)


class MinedTriplets(_Mined):
    """TripletMarginMiner's (a, p, n), with the miner's window on the triplet margin, which our
    TripletMarginLoss computes over in its all-triplets op."""

    def __new__(cls, triplets, miner, embeddings, labels, ref_emb, ref_labels):
        out = super().__new__(cls, triplets, miner, embeddings, labels, ref_emb, ref_labels)
        out.window = triplet_window(miner.margin, miner.type_of_triplets)
        return out

    def fused_for(self, embeddings, labels, ref_emb, ref_labels, distance):
        """Also not where the window has an edge at 0 ("hard", "semihard", a margin of 0) and a ref
        row has a copy under another label: a triplet whose positive and negative are such copies
        has u_an - u_ap = 0 exactly, which PML's matrix rounds to either side (its columns' bits
        depend on their position) and the engine does not: the list is read."""
        if not super().fused_for(embeddings, labels, ref_emb, ref_labels, distance):
            return False
        return 0.0 not in self.window or not _copies_under_other_labels(self.ref_emb, self.ref_labels)


class MinedPairs(_Mined):
    """A pair miner's (a1, p, a2, n) with its rule, which the pair losses whose engine applies it to
    the label sets (`spec_changes`: fields of the declaration, ops/spec.PairLossSpec) compute over
    without reading the list. Only where PML's miner and the engine apply the same identity rule:
    the batch against itself, or a ref with other embeddings and other labels (docs/semantics.md
    "Miners")."""

    def fused_for(self, embeddings, labels, ref_emb, ref_labels, distance):
        separate_ref = self.ref_emb is not self.embeddings and self.ref_labels is not self.labels
        self_mode = self.ref_emb is self.embeddings and self.ref_labels is self.labels
        return (self_mode or separate_ref) and super().fused_for(embeddings, labels, ref_emb, ref_labels, distance)

    def on_cosine(self, distance):
        """True when the engine mines on the cosine beside the loss's lp `distance` (MinedByEpsilon)."""
        return False

    def translated(self, distance):
        """True when the rule is moved from the miner's distance to the loss's `distance` through
        d^2 = 2 - 2 S, which needs unit rows (the loss then checks that every row normalizes to one)."""
        return self.on_cosine(distance)

    def spec_changes(self, distance):
        raise NotImplementedError


class MinedByEpsilon(MinedPairs):
    """MultiSimilarityMiner's pairs, with its epsilon: the declaration's miner_epsilon (PML's rule on
    the label sets, docs/semantics.md "Multi-Similarity"), also for the miner's default
    CosineSimilarity() beside a loss's LpDistance() (both on normalized rows: the engine mines on
    -d^2 / 2 = S - 1, miner_on_cosine; the loss checks that every row normalizes to a unit row)."""

    def __new__(cls, pairs, miner, embeddings, labels, ref_emb, ref_labels):
        out = super().__new__(cls, pairs, miner, embeddings, labels, ref_emb, ref_labels)
        out.epsilon = float(miner.epsilon)
        return out

    def fused_for(self, embeddings, labels, ref_emb, ref_labels, distance):
        return super().fused_for(embeddings, labels, ref_emb, ref_labels,
                                 "cosine" if self.on_cosine(distance) else distance)

    def on_cosine(self, distance):
        """True when the miner measured with the cosine and the loss (`distance`) with PML's
        normalized LpDistance()."""
        from .losses._base import _distance_name
        return distance == "lp" and _distance_name(self.distance) == "cosine"

    def spec_changes(self, distance):
        return dict(miner_epsilon=self.epsilon, miner_on_cosine=self.on_cosine(distance))


class MinedByMargins(MinedPairs):
    """PairMarginMiner's pairs, with its margins as the declaration's keep windows on v (d or S):
    positives kept where d > pos_margin (S < pos_margin), negatives where d < neg_margin
    (S > neg_margin), strict and NaN-dropping as PML's comparisons. With the miner's distance, or
    PML's normalized LpDistance() beside a cosine loss and CosineSimilarity() beside an lp loss, the
    margins moved through d^2 = 2 - 2 S (margin_windows; unit rows)."""

    def __new__(cls, pairs, miner, embeddings, labels, ref_emb, ref_labels):
        out = super().__new__(cls, pairs, miner, embeddings, labels, ref_emb, ref_labels)
        out.windows = {d: margin_windows(miner, d) for d in ("lp", "cosine")}
        return out

    def translated(self, distance):
        from .losses._base import _distance_name
        return {distance, _distance_name(self.distance)} == {"lp", "cosine"}

    def fused_for(self, embeddings, labels, ref_emb, ref_labels, distance):
        from .losses._base import _distance_name
        if self.windows.get(distance) is None:  # neither lp nor cosine, or a NaN margin: the list
            return False
        return super().fused_for(embeddings, labels, ref_emb, ref_labels,
                                 _distance_name(self.distance) if self.translated(distance) else distance)

    def spec_changes(self, distance):
        pos_window, neg_window = self.windows[distance]
        return dict(pos_window=pos_window, neg_window=neg_window)


class TripletMarginMiner(pml_miners.TripletMarginMiner):
    """PML's TripletMarginMiner, its triplets listed per anchor row and positive (PML lists all
    N M^2 candidates first): a chunk's N_chunk x P x M window mask, P the most positives of a row.
    The result is a MinedTriplets: PML's tuple, which our TripletMarginLoss fuses."""

    def __init__(self, margin=0.2, type_of_triplets="all", **kwargs):
        if type_of_triplets not in ("all", "hard", "semihard", "easy"):
            raise ValueError("TripletMarginMiner: type_of_triplets must be 'all', 'hard', 'semihard' or 'easy'; "
                             f"got {type_of_triplets!r}")
        super().__init__(margin=margin, type_of_triplets=type_of_triplets, **kwargs)

    @_checked_mine(pml_miners.TripletMarginMiner)
    def mine(self, embeddings, labels, ref_emb, ref_labels):
        rows = _Rows(self, embeddings, labels, ref_emb, ref_labels)
        inverted = self.distance.is_inverted
        out, stats = [[], [], []], [0.0, 0.0, 0]
        max_pos = rows.most_positives()
        for i0, i1 in _row_chunks(rows.N, rows.M, max(max_pos, 1) * rows.M, TRIPLET_CHUNK_ELEMENTS):
            mat, matches, diffs = rows.chunk(i0, i1)
            P = int(matches.sum(1).max()) if matches.numel() else 0
            # the positives of each row in column order (PML's order: a, then p, then n)
            cols = torch.sort(torch.where(matches, torch.arange(rows.M, device=mat.device), rows.M), dim=1)[0][:, :P]
            real = cols < rows.M
            cols = cols.clamp(max=max(rows.M - 1, 0))
            ap = torch.gather(mat, 1, cols)                                   # B x P
            margin = (ap[:, :, None] - mat[:, None, :]) if inverted else (mat[:, None, :] - ap[:, :, None])
            if self.type_of_triplets == "easy":
                keep = margin > self.margin
            else:
                keep = margin <= self.margin
                if self.type_of_triplets == "hard":
                    keep &= margin <= 0
                elif self.type_of_triplets == "semihard":
                    keep &= margin > 0
            keep &= real[:, :, None] & diffs[:, None, :]
            b, j, n = torch.where(keep)
            out[0].append(b + i0)
            out[1].append(cols[b, j])
            out[2].append(n)
            if self.collect_stats:  # sums over all triplets: ap once per negative, an once per positive
                n_neg, n_pos = diffs.sum(1).to(torch.float64), real.sum(1).to(torch.float64)
                stats[0] += float((torch.where(real, ap, 0).double().sum(1) * n_neg).sum())
                stats[1] += float((torch.where(diffs, mat, 0).double().sum(1) * n_pos).sum())
                stats[2] += int((n_neg * n_pos).sum())
        if self.collect_stats:  # PML: the means over all triplets (NaN without one)
            self.pos_pair_dist, self.neg_pair_dist = ((stats[0] / stats[2], stats[1] / stats[2]) if stats[2] > 0
                                                      else (float("nan"), float("nan")))
            self.avg_triplet_margin = (self.pos_pair_dist - self.neg_pair_dist if inverted
                                       else self.neg_pair_dist - self.pos_pair_dist)
        triplets = tuple(torch.cat(t) if t else _empty(embeddings.device) for t in out)
        return MinedTriplets(triplets, self, embeddings, labels, ref_emb, ref_labels)


MINERS = {cls.__name__: cls for cls in (TripletMarginMiner, MultiSimilarityMiner, PairMarginMiner, BatchHardMiner,
                                        BatchEasyHardMiner)}
__all__ = [*MINERS, "MinedTriplets", "MinedPairs", "MinedByEpsilon", "MinedByMargins"]
