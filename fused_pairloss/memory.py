"""CrossBatchMemory (Wang et al., "Cross-Batch Memory for Embedding Learning", CVPR 2020): PML's
loss wrapper of the same name, arguments, buffers and semantics, computed by the fused pair engine
against the memory.

Each call writes the batch (or its `enqueue_mask` rows) into a ring buffer of detached embeddings
and labels, then computes the loss of the (other) batch rows against the memory. The fused path
passes the memory as `ref_emb`: B x M tiles, O((B + M) D) memory for any memory size, never a
B x M matrix; the memory needs no gradient, so the engine's backward skips its column pass. A
row's comparison with its own, just written, memory slot is removed through `exclude_col` (the
slot index), the rule the engines use for every self exclusion.
"""
from __future__ import annotations

import functools

import torch

from . import _validation as V
from ._distributed import FUSED_PAIR_CALLS, DistributedBatch, agreed_layout, fused_pair_plan
from .losses._base import (_collect_stats, _distance_name, _has_short_row, _on_device_of, pml_base,
                           record_distance_stats)
from .losses._reference_common import convert_to_triplets, nan_in_nan_out
from .losses.triplet_margin import TripletMarginLoss, all_triplet_distance_means, miner_triplet_counts
from .ops._common import LOCAL, zero_loss
from .ops.stats import MinedBy

__all__ = ["CrossBatchMemory"]

# PML 2.9 CrossBatchMemory.supported_losses()
SUPPORTED_LOSSES = ("AngularLoss", "CircleLoss", "ContrastiveLoss", "GeneralizedLiftedStructureLoss",
                    "IntraPairVarianceLoss", "LiftedStructureLoss", "MarginLoss", "MultiSimilarityLoss", "NCALoss",
                    "NTXentLoss", "SignalToNoiseRatioContrastiveLoss", "SupConLoss", "TripletMarginLoss",
                    "TupletMarginLoss")


def _check_size(name, value):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= 1; got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be an int >= 1; got {value}")


def _pair_miner_rule(miner, distance):
    """The declaration's fields that say a pair miner's rule (ops/stats.MinedBy) for a loss measuring
    with `distance`, else None. MultiSimilarityMiner (PML's or ours) with the loss's distance, or
    with the cosine beside an lp loss (mined on -d^2 / 2 = S - 1, unit rows): PML mines against the
    memory, the self slot included, and removes the self comparisons after (exclude_after_mining).
    PairMarginMiner (PML's or ours) with no collect_stats (PML's means over all pairs are not among
    the engine's statistics), with the loss's distance or the other of lp and cosine (its margins
    moved through d^2 = 2 - 2 S, unit rows: _miners.margin_windows): its margins as keep windows on
    the loss's v, the self slot left out (the windows are a rule on each pair alone)."""
    try:
        from pytorch_metric_learning import miners as pml_miners
    except ImportError:
        return None
    from . import _miners

    kind = _distance_name(miner.distance)
    if type(miner) in (pml_miners.MultiSimilarityMiner, _miners.MultiSimilarityMiner):
        on_cosine = distance == "lp" and kind == "cosine"
        if kind != distance and not on_cosine:
            return None
        return dict(miner_epsilon=float(miner.epsilon), miner_on_cosine=on_cosine, exclude_after_mining=True)
    if type(miner) in (pml_miners.PairMarginMiner, _miners.PairMarginMiner):
        if miner.collect_stats or kind not in ("lp", "cosine") or distance not in ("lp", "cosine"):
            return None
        windows = _miners.margin_windows(miner, distance)  # None for a NaN margin
        return None if windows is None else dict(pos_window=windows[0], neg_window=windows[1])
    return None


def _own_slot_v(q, r, exclude_col, distance, dtype):
    """v of each query against its own just-written memory slot: d = 0 (the engines' d of two equal
    rows), or S = q . r_slot; rows without a slot (exclude_col -1) get a value that is never read."""
    if distance == "lp":
        return torch.zeros(q.shape[0], dtype=dtype, device=q.device)
    own = r[exclude_col.clamp(min=0)].to(dtype)
    return (own * q.to(dtype)).sum(1)


def pair_miner_counts(st, q, r, exclude_col, *, rule, distance):
    """Per row, the positive and the negative pairs a pair miner keeps mining the rows q against r,
    the excluded column (the row's own memory slot, a positive) included, from the statistics `st`
    of the declaration with the miner's `rule` (_pair_miner_rule): the engine's counts, plus the own
    slot where the rule keeps it: MultiSimilarityMiner's iff u - eps < max_neg (u = S, or -d or
    -d^2 / 2, both 0 for the slot), PairMarginMiner's iff v is in the positives' window."""
    with torch.no_grad():
        v = _own_slot_v(q, r, exclude_col, distance, st.max_neg.dtype)
        if "miner_epsilon" in rule:
            kept_own = (-v if distance == "lp" else v) - rule["miner_epsilon"] < st.max_neg
        else:
            lo, hi = rule["pos_window"]
            kept_own = (v > lo) & (v < hi)
        kept_own = kept_own & (exclude_col >= 0)
        return st.count_pos + kept_own.to(st.count_pos.dtype), st.count_neg


def _triplet_miner_window(miner, distance):
    """The window on the triplet margin of a TripletMarginMiner (PML's, or ours) whose distance is
    the loss's: PML removes the self comparisons after mining, which for triplets is leaving the
    self slot out of the positives (exclude_col), the window being a rule on each triplet alone.
    Else None."""
    try:
        from pytorch_metric_learning.miners import TripletMarginMiner
    except ImportError:
        return None
    from ._miners import TripletMarginMiner as FusedTripletMarginMiner, triplet_window

    if type(miner) not in (TripletMarginMiner, FusedTripletMarginMiner) or _distance_name(miner.distance) != distance:
        return None
    return triplet_window(miner.margin, miner.type_of_triplets)


def get_all_pairs_indices(labels, ref_labels):
    """PML lmu.get_all_pairs_indices with a separate ref (no diagonal removal)."""
    matches = labels.unsqueeze(1) == ref_labels.unsqueeze(0)
    a1, p = torch.where(matches)
    a2, n = torch.where(~matches)
    return a1, p, a2, n


def remove_self_comparisons(indices_tuple, curr_batch_idx, ref_size):
    """PML lmu.remove_self_comparisons (ref_is_subset=False), step by step, including its rule for
    a batch of one row (s == e: the self pair is kept)."""
    s, e = curr_batch_idx[0], curr_batch_idx[-1]

    def keep(a, p):
        curr_batch = torch.any(p.unsqueeze(1) == curr_batch_idx, dim=1)
        a_c, p_c = a[curr_batch], p[curr_batch] - s
        if e <= s:
            p_c[p_c <= e - s] += ref_size
        without = curr_batch.clone()
        without[torch.where(curr_batch)[0][a_c == p_c]] = False
        return without | ~curr_batch

    if len(indices_tuple) == 3:
        a, p, n = indices_tuple
        k = keep(a, p)
        return a[k], p[k], n[k]
    a1, p, a2, n = indices_tuple
    k = keep(a1, p)
    return a1[k], p[k], a2, n


def _check_loss_labels(loss, labels):
    """The wrapped loss's own label requirements (_PairLoss._check_labels; a PML loss checks its own)."""
    check = getattr(loss, "_check_labels", None)
    if check is not None:
        check(labels)


# PML's CrossBatchMemory as the base where PML is installed (PML's DistributedLossWrapper takes its
# subclasses as memories: it gathers the batch and calls the memory once). Every method PML's steps
# call is this class's own; its __init__ is not run (it would allocate the memory again).
class CrossBatchMemory(pml_base("CrossBatchMemory")):
    """Drop-in for pytorch_metric_learning.losses.CrossBatchMemory(loss, embedding_size,
    memory_size=1024, miner=None).

    forward(embeddings, labels, indices_tuple=None, enqueue_mask=None): as PML. The batch is
    written to the memory (ring buffer `embedding_memory` (memory_size, embedding_size),
    `label_memory` (memory_size,), both buffers in the state_dict as in PML; `queue_idx` the next
    slot, `has_been_filled`), then the loss of the batch against the filled part of the memory is
    returned, each row's comparison with its own slot removed. With `enqueue_mask` only its rows
    are written and only the others are the queries (no self removal). `reset_queue()` empties it.

    Fused (no B x M matrix; the memory's gradient pass skipped) when `loss` is one of this
    library's pair losses computed by a fused backend and `miner` is None, or a
    MultiSimilarityMiner(epsilon) (PML's or ours) for a pair loss that fuses our miners' rules
    (MultiSimilarity, Circle, NTXent, SupCon, Contrastive, GeneralizedLiftedStructure, Margin): PML
    mines against the memory, the self slot included, and removes the self comparisons afterwards;
    the fused engine does the same (the declaration's `exclude_after_mining`). A
    MultiSimilarityLoss(miner_epsilon=e) here means the same as miner=MultiSimilarityMiner(e). Or a
    PairMarginMiner (PML's or ours, no collect_stats) for those losses: its margins as the
    declaration's keep windows, the self slot left out (a rule on each pair alone). Each with the
    loss's distance, and also a cosine MultiSimilarityMiner beside an lp loss (mined on
    -d^2 / 2 = S - 1) and a PairMarginMiner with the other of LpDistance() and CosineSimilarity()
    (its margins moved through d^2 = 2 - 2 S); in these two a step with a row that does not
    normalize to a unit row is PML's computation. Or a TripletMarginMiner (PML's or ours, with the
    loss's distance) for a TripletMarginLoss: its window on the triplet margin in the all-triplets
    op, the self slot left out of the positives.
    Any other miner, an explicit indices_tuple, a PML loss object, or the reference backend: PML's
    computation (all pair indices, or a MultiSimilarityLoss's miner_epsilon as that miner's, self
    comparisons removed, the loss with the indices), exact.
    On the fused paths the miner is not called but records PML's stats (`_miner_recorder`).

    PML's rules kept as they are: a queued batch of one row keeps its self comparison (PML's
    remove_self_comparisons treats curr_batch_idx[0] == curr_batch_idx[-1] as a wrap-around), and
    enqueueing zero rows marks the memory as filled. Inside fused_pairloss.DistributedLossWrapper
    the gathered batch is enqueued in rank order, the same memory on every rank (PML issue #639).
    """

    def __init__(self, loss, embedding_size, memory_size=1024, miner=None, collect_stats=None):
        torch.nn.Module.__init__(self)
        if type(loss).__name__ not in SUPPORTED_LOSSES and type(loss) not in FUSED_PAIR_CALLS:  # or a declared one
            raise TypeError(f"loss: CrossBatchMemory not supported for {type(loss).__name__} (PML supports "
                            f"{', '.join(SUPPORTED_LOSSES)})")
        _check_size("embedding_size", embedding_size)
        _check_size("memory_size", memory_size)
        self.loss = loss
        self.miner = miner
        self.embedding_size = embedding_size
        self.memory_size = memory_size
        self.collect_stats = _collect_stats(collect_stats)  # PML's: None is its global default
        self.reset_queue()
        # PML's record-keeping attributes (ModuleWithRecords), which record-keeper reads
        self._record_these = ["embedding_size", "memory_size", "queue_idx"]

    @staticmethod
    def supported_losses():
        return list(SUPPORTED_LOSSES)

    def reset_queue(self):
        self.register_buffer("embedding_memory", torch.zeros(self.memory_size, self.embedding_size))
        self.register_buffer("label_memory", torch.zeros(self.memory_size).long())
        self.has_been_filled = False
        self.queue_idx = 0

    def extra_repr(self):
        return f"embedding_size={self.embedding_size}, memory_size={self.memory_size}"

    # ---- PML's steps ------------------------------------------------------------------------------
    def add_to_memory(self, embeddings, labels, batch_size):
        self.curr_batch_idx = torch.arange(self.queue_idx, self.queue_idx + batch_size,
                                           device=labels.device) % self.memory_size
        self.embedding_memory[self.curr_batch_idx] = embeddings.detach()
        self.label_memory[self.curr_batch_idx] = labels.detach()
        prev_queue_idx = self.queue_idx
        self.queue_idx = (self.queue_idx + batch_size) % self.memory_size
        if (not self.has_been_filled) and (self.queue_idx <= prev_queue_idx):
            self.has_been_filled = True

    def _memory(self):
        if not self.has_been_filled:
            return self.embedding_memory[:self.queue_idx], self.label_memory[:self.queue_idx]
        return self.embedding_memory, self.label_memory

    def create_indices_tuple(self, embeddings, labels, E_mem, L_mem, input_indices_tuple, do_remove_self_comparisons):
        return self._create_indices_tuple(self.miner, embeddings, labels, E_mem, L_mem, input_indices_tuple,
                                          do_remove_self_comparisons)

    def _create_indices_tuple(self, miner, embeddings, labels, E_mem, L_mem, input_indices_tuple,
                              do_remove_self_comparisons):
        """PML's create_indices_tuple with the given miner (None: all pairs)."""
        if miner:
            indices_tuple = miner(embeddings, labels, E_mem, L_mem)
        else:
            indices_tuple = get_all_pairs_indices(labels, L_mem)
        if do_remove_self_comparisons:
            indices_tuple = remove_self_comparisons(indices_tuple, self.curr_batch_idx, self.memory_size)
        if input_indices_tuple is not None:  # PML's lmu.convert_to_pairs / _triplets, c_f.concatenate_indices_tuples
            if len(input_indices_tuple) == 3 and len(indices_tuple) == 4:
                a, p, n = input_indices_tuple
                input_indices_tuple = (a, p, a, n)
            elif len(input_indices_tuple) == 4 and len(indices_tuple) == 3:
                input_indices_tuple = convert_to_triplets(input_indices_tuple, labels)
            indices_tuple = tuple(torch.cat([x, y.to(x.device)]) for x, y in zip(indices_tuple, input_indices_tuple))
        return indices_tuple

    # ---- validation and placement -----------------------------------------------------------------
    def _check(self, embeddings, labels, indices_tuple, enqueue_mask, rows_to_queue=None, allow_empty=False):
        if not (allow_empty and isinstance(embeddings, torch.Tensor) and embeddings.dim() == 2
                and embeddings.shape[0] == 0 and embeddings.is_floating_point()):
            V.check_embeddings(embeddings)
        if embeddings.shape[1] != self.embedding_size:
            raise ValueError(f"embeddings must have embedding_size={self.embedding_size} columns; got shape "
                             f"{tuple(embeddings.shape)}")
        if labels is None:
            raise ValueError("labels is required (a 1-D integer tensor of length N)")
        V.check_labels(labels, embeddings.shape[0])
        if labels.device != embeddings.device:
            raise ValueError(f"labels must be on the device of embeddings ({embeddings.device}); got {labels.device}")
        if indices_tuple is not None and enqueue_mask is not None:
            raise ValueError("indices_tuple and enqueue_mask are mutually exclusive")
        n = embeddings.shape[0]
        if enqueue_mask is not None:
            if not isinstance(enqueue_mask, torch.Tensor) or enqueue_mask.dtype != torch.bool:
                raise TypeError(f"enqueue_mask must be a bool tensor of length {n}; got "
                                f"{getattr(enqueue_mask, 'dtype', type(enqueue_mask).__name__)}")
            if enqueue_mask.shape != (n,):
                raise ValueError(f"enqueue_mask must have shape ({n},) (one entry per row of embeddings); got "
                                 f"{tuple(enqueue_mask.shape)}")
            if enqueue_mask.device != embeddings.device:
                raise ValueError(f"enqueue_mask must be on the device of embeddings ({embeddings.device}); got "
                                 f"{enqueue_mask.device}")
        queued = rows_to_queue if rows_to_queue is not None else (
            n if enqueue_mask is None else int(enqueue_mask.sum()))
        if queued > self.memory_size:
            raise ValueError(f"memory_size={self.memory_size} is smaller than the {queued} rows to enqueue")

    def _place(self, embeddings, labels):
        # as PML: the memory follows the embeddings' device and dtype, the labels' dtype
        self.embedding_memory = self.embedding_memory.to(device=embeddings.device, dtype=embeddings.dtype)
        self.label_memory = self.label_memory.to(device=embeddings.device, dtype=labels.dtype)

    def _plan(self, indices_tuple, device):
        """(fn, hyper) of the fused path, or None for PML's computation."""
        if indices_tuple is not None:
            return None
        plan = fused_pair_plan(self.loss, device)
        if plan is None:
            return None
        fn, hyper = plan
        if self.miner is not None and type(self.loss) is TripletMarginLoss:
            window = _triplet_miner_window(self.miner, self.loss._distance_kind)
            if window is None:
                return None
            hyper["window"] = window
            return fn, hyper
        if self.miner is not None:  # the miner's rule in the loss's engine
            rule = _pair_miner_rule(self.miner, self.loss._distance_kind)
            if rule is not None and self.loss._mines_within():
                raise ValueError(f"pass either miner={type(self.miner).__name__}(...) or the loss's miner_epsilon, "
                                 "not both")
            if rule is None or not getattr(self.loss, "_fuses_pair_miners", False):
                return None
            return functools.partial(fn.func, backend=MinedBy(fn.keywords["backend"], rule)), hyper
        if self.loss._mines_within():
            hyper["exclude_after_mining"] = True
        return fn, hyper

    def _plan_for_rows(self, plan, batch_rows, batch_labels, memory_rows, memory_labels):
        """The fused plan, or None (PML's computation) where these rows need it: a miner's rule moved
        to the loss's other distance (a cosine MultiSimilarityMiner beside an lp loss mines on
        -d^2 / 2 = S - 1; a PairMarginMiner's margins move through d^2 = 2 - 2 S) needs rows that
        normalize to unit rows (F.normalize leaves a row of norm <= eps short); a miner's rule in
        the fused step (the miner's, or the loss's own miner_epsilon) cannot be read by the PML
        steps the loss takes for some rows (_needs_pml_steps); a miner in half precision keeps the
        pairs of its rounded matrix, and a triplet window's edge at 0 is decided by PML's matrix's
        rounding where a positive and a negative are copies (the rules of our miners' results,
        _miners._Mined)."""
        if plan is None:
            return None
        mined = isinstance(plan[0].keywords["backend"], MinedBy)
        if self.miner is not None and (mined or "window" in plan[1]):
            from ._miners import _copies_under_other_labels, _mined_in_half_precision
            if _mined_in_half_precision(self.miner.distance, batch_rows, memory_rows):
                return None
            if (0.0 in plan[1].get("window", ()) and _copies_under_other_labels(
                    torch.cat([batch_rows, memory_rows]), torch.cat([batch_labels, memory_labels.to(batch_labels)]))):
                return None
        if (mined and _distance_name(self.miner.distance) != self.loss._distance_kind
                and _has_short_row(batch_rows, memory_rows)):
            return None
        if (mined or plan[1].get("exclude_after_mining")) and self.loss._needs_pml_steps(batch_rows, memory_rows):
            return None
        return plan

    def _self_slots(self, rows):
        """exclude_col of the queued rows: their memory slots (PML's rule: none for one row)."""
        if len(self.curr_batch_idx) <= 1:
            return torch.full((rows,), -1, dtype=torch.int64, device=self.curr_batch_idx.device)
        return self.curr_batch_idx

    # ---- forward --------------------------------------------------------------------------------
    def forward(self, embeddings, labels, indices_tuple=None, enqueue_mask=None):
        # PML takes float / bool labels too, and moves them to the embeddings' device
        _check_loss_labels(self.loss, labels)
        labels = _on_device_of(V.integral_labels(labels), embeddings)
        self._check(embeddings, labels, indices_tuple, enqueue_mask)
        self._place(embeddings, labels)
        plan = self._plan(indices_tuple, embeddings.device)
        if enqueue_mask is not None:
            emb_for_queue, labels_for_queue = embeddings[enqueue_mask], labels[enqueue_mask]
            embeddings, labels = embeddings[~enqueue_mask], labels[~enqueue_mask]
            remove_self = False
        else:
            emb_for_queue, labels_for_queue = embeddings, labels
            remove_self = True
        self.add_to_memory(emb_for_queue, labels_for_queue, len(emb_for_queue))
        E_mem, L_mem = self._memory()
        plan = self._plan_for_rows(plan, embeddings, labels, E_mem, L_mem)
        if plan is None:
            loss, miner = self.loss, self.miner
            declared = getattr(type(loss), "declaration", None) is not None  # fused_pairloss.declare
            if declared and loss._has_a_miners_rule() and indices_tuple is not None:
                raise ValueError(f"{type(loss).__name__}: pass either indices_tuple or its declaration's miner rule "
                                 "(miner_epsilon or windows), not both")
            if declared and loss._has_a_miners_rule():
                raise ValueError(f"{type(loss).__name__}: a declared loss that mines (its declaration's miner_epsilon "
                                 "or windows) "
                                 "is computed in CrossBatchMemory by its fused engine only; its backend "
                                 f"{loss.backend!r} is the reference on {embeddings.device} (or its rows are not unit "
                                 "rows): give it a fused backend")
            epsilon = None if declared else getattr(loss, "miner_epsilon", None)  # (a declared one: a hyper-parameter)
            if epsilon is not None and indices_tuple is None:
                # the loss's miner_epsilon means miner=MultiSimilarityMiner(epsilon) here (the fused
                # step's rule): PML's steps with that miner, and the loss without its own
                if miner is not None:
                    raise ValueError(f"pass either miner={type(miner).__name__}(...) or the loss's miner_epsilon, "
                                     "not both")
                from pytorch_metric_learning.miners import MultiSimilarityMiner
                miner = MultiSimilarityMiner(epsilon=epsilon, distance=loss.distance)
            indices_tuple = self._create_indices_tuple(miner, embeddings, labels, E_mem, L_mem, indices_tuple,
                                                       remove_self)
            if epsilon is None or miner is self.miner:
                return loss(embeddings, labels, indices_tuple, E_mem, L_mem)
            object.__setattr__(loss, "miner_epsilon", None)  # for this call only: the module stays the user's
            try:
                return loss(embeddings, labels, indices_tuple, E_mem, L_mem)
            finally:
                object.__setattr__(loss, "miner_epsilon", epsilon)
        fn, hyper = plan
        excl = self._self_slots(len(embeddings)) if remove_self else None
        value = self._fused(fn, hyper, embeddings, labels, E_mem, L_mem, excl, LOCAL)
        # the stats of the distances PML's steps call (collect_stats): the miner's and the loss's,
        # on the query rows against the memory
        for measuring in (self.miner, self.loss):
            if measuring is not None and getattr(measuring, "_distance_measures_the_batch", True):
                record_distance_stats(getattr(measuring, "distance", None), embeddings, E_mem)
        return value

    def _miner_recorder(self, backend, hyper, batch, rule=None):
        """PML's step calls the miner on the queries against the memory, the self slots included,
        and the miner records what it kept: num_pos_pairs / num_neg_pairs, or num_triplets (and
        with collect_stats TripletMarginMiner's means over all triplets). The fused step mines
        inside the loss; the `record` callback it is given counts the miner's pairs or triplets
        from the engine's row statistics (the self slots added back), and sums them over `batch`
        (every rank's queries). `rule`: a pair miner's rule (_pair_miner_rule). None without a miner."""
        miner = self.miner
        if miner is None:
            return None
        miner.reset_stats()
        distance = self.loss._distance_kind
        if "window" not in hyper:
            def record(st, q, r, excl):
                pos, neg = pair_miner_counts(st, q, r, excl, rule=rule, distance=distance)
                miner.num_pos_pairs, miner.num_neg_pairs = int(batch.sum(pos)), int(batch.sum(neg))
            return record

        def record(in_window, q, r, labels_q, labels_r, excl):
            counts = miner_triplet_counts(in_window, q, r, labels_q, labels_r, excl, lp=distance == "lp",
                                          window=hyper["window"])
            miner.num_triplets = int(batch.sum(counts))
            if miner.collect_stats:
                no_exclusion = torch.full_like(labels_q, -1)
                self._record_triplet_means(all_triplet_distance_means(
                    q, labels_q, r, labels_r, distance=distance, exclude_col=no_exclusion, backend=backend,
                    batch=batch))
        return record

    def _record_triplet_means(self, means):
        """TripletMarginMiner's collect_stats: PML's means over all triplets, (u_ap, u_an) or None
        (no triplet: NaN, as PML's mean of nothing)."""
        miner = self.miner
        miner.pos_pair_dist, miner.neg_pair_dist = (float("nan"),) * 2 if means is None else means
        miner.avg_triplet_margin = (miner.pos_pair_dist - miner.neg_pair_dist if miner.distance.is_inverted
                                    else miner.neg_pair_dist - miner.pos_pair_dist)

    def _record_nothing_mined(self, hyper):
        """The miner's records of a step without queries (PML's miner on no rows): zero counts,
        NaN means."""
        miner = self.miner
        if miner is None:
            return
        miner.reset_stats()
        if "window" not in hyper:
            miner.num_pos_pairs = miner.num_neg_pairs = 0
            return
        miner.num_triplets = 0
        if miner.collect_stats:
            self._record_triplet_means(None)

    def _fused(self, fn, hyper, embeddings, labels, E_mem, L_mem, excl, batch):
        if excl is None:  # exclude_col=None would mean PML's identity rule; here: no exclusion
            excl = torch.full((embeddings.shape[0],), -1, dtype=torch.int64, device=embeddings.device)
        backend = fn.keywords["backend"]
        if isinstance(backend, MinedBy):  # the engine call reports its statistics to the miner's recorder
            record = self._miner_recorder(backend.backend, hyper, batch, rule=backend.changes)
            fn = functools.partial(fn.func, backend=MinedBy(backend.backend, backend.changes, record=record))
        else:
            record = self._miner_recorder(backend, hyper, batch)
            if record is not None:
                hyper = dict(hyper, record=record)
        # the memory is detached (no column pass); its labels are copied (O(M)) so that the next
        # step's write into the buffer does not touch a tensor saved for this step's backward
        loss = fn(embeddings, labels, E_mem.detach(), L_mem.clone(), exclude_col=excl, batch=batch, **hyper)
        if isinstance(backend, MinedBy):  # NaN in, NaN out also through the miner's comparisons
            loss = nan_in_nan_out(loss, embeddings, E_mem.detach()).to(loss.dtype)
        return self.loss._as_pml_dtype(loss, embeddings)  # PML's dtype under autocast, as the loss's own call

    def _forward_distributed(self, embeddings, labels, indices_tuple=None, enqueue_mask=None, group=None):
        """The step of DistributedLossWrapper(CrossBatchMemory) (without the world_size factor):
        every rank enqueues the gathered batch in rank order (the same memory everywhere) and
        computes its own query rows against the memory; the loss's batch reductions all-reduce."""
        try:
            _check_loss_labels(self.loss, labels)
            labels = _on_device_of(V.integral_labels(labels), embeddings)
            self._check(embeddings, labels, indices_tuple, enqueue_mask, rows_to_queue=0, allow_empty=True)
            error = None
        except (ValueError, TypeError) as e:  # raised after the other ranks learn of it (no hang)
            error = e
            labels = V.int64_like(labels)  # the same dtype on every rank, so the layout check names this error
        layout = agreed_layout(dict(embeddings=embeddings, labels=labels, enqueue_mask=enqueue_mask), error,
                               group=group)
        X, Y = layout.gather(embeddings), layout.gather(labels)
        mask = None if enqueue_mask is None else layout.gather(enqueue_mask)
        plan = self._plan(indices_tuple, embeddings.device)
        # the gathered batch and the memory: a superset of the memory after this step
        plan = self._plan_for_rows(plan, X, Y, *self._memory())
        if plan is None:  # PML's computation on the gathered batch, this rank's rows with their graph
            all_emb = torch.cat([X[:layout.offset], embeddings, X[layout.offset + layout.n:]], dim=0)
            if indices_tuple is not None:
                indices_tuple = layout.rank_order_of(indices_tuple, embeddings.device)  # the memory's order
            return self.forward(all_emb, Y, indices_tuple, mask)
        queued = layout.total if mask is None else int(mask.sum())
        if queued > self.memory_size:
            raise ValueError(f"memory_size={self.memory_size} is smaller than the {queued} rows to enqueue "
                             f"(the batch gathered from {layout.world} ranks)")
        self._place(embeddings, labels)
        fn, hyper = plan
        if mask is None:
            self.add_to_memory(X, Y, layout.total)
            slots = self._self_slots(layout.total)
            excl = slots[layout.offset:layout.offset + layout.n]
            query, query_labels, total_queries = embeddings, labels, layout.total
        else:
            self.add_to_memory(X[mask], Y[mask], queued)
            excl = None
            query, query_labels = embeddings[~enqueue_mask], labels[~enqueue_mask]
            total_queries = int((~mask).sum())
        E_mem, L_mem = self._memory()
        batch = DistributedBatch(total_queries, group)
        if total_queries == 0:
            self._record_nothing_mined(hyper)
            return zero_loss(query)
        return self._fused(fn, hyper, query, query_labels, E_mem, L_mem, excl, batch)
