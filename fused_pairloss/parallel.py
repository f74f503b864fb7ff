"""Distributed training: `DistributedLossWrapper`, PML's wrapper of the same name and arguments,
computed so that no rank ever holds an N_global x N_global anything.

PML's wrapper (default mode) gathers every rank's batch, computes the single-process loss on the
gathered batch and multiplies it by world_size, so that DDP's gradient averaging gives the
single-process gradients. Here each rank computes only its own rows against the gathered batch:

- forward: the local embeddings are all-gathered (uneven sizes padded) into the global batch
  X = [rank 0's rows, rank 1's rows, ...] (the same order on every rank); the fused pair engine runs
  the local rows q = x_r against the reference X (N_local x N_global tiles, O((N_local + N_global) D)
  memory), each row's own pair excluded by its global index (`exclude_col` = offset_r + i); the
  loss's row combination (`combine` in fused_pairloss/losses/<loss>.py) runs on a
  `DistributedBatch`, whose sums and counts all-reduce the O(N) row statistics, so every rank
  computes the same global value.
- backward: the all-reduce of a row-statistic sum has the identity as its backward (every rank
  holds the same global loss, and d(global sum)/d(local part) = 1: summing the incoming gradients
  again would count each rank's gradient world_size times); the engine's backward gives the local
  rows' gradient as anchors (row pass) and the gradient of X from the local anchors (column pass);
  the all-gather's backward reduce-scatters the latter (sum over ranks, each rank its own slice;
  all-reduce + slice where the backend lacks reduce_scatter), which completes the own rows'
  gradient. Collectives per step: all-gather of the sizes, of the labels and of the embeddings, a
  few scalar all-reduces (forward), one reduce-scatter (backward).

Cases the fused path does not cover (an explicit indices_tuple, a module that computes with PML
itself, the reference backend, class losses, PML's own loss objects) do what PML's wrapper does:
the gathered batch (this rank's rows first, the others detached, as PML's all_gather) and the full
loss on it, times world_size; exact, and N_global x N_global as in PML.
"""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

from . import _validation as V
from ._distributed import (AllGather, DistributedBatch, RankLayout, agreed_layout, all_gather_uneven,
                           fused_pair_plan, is_distributed)
from .losses._base import _ClassLoss, _PairLoss
from .memory import CrossBatchMemory
from .ops.engines import exclusion_for

__all__ = ["DistributedLossWrapper", "DistributedBatch", "is_distributed", "all_gather_uneven"]


def check_local_inputs(embeddings, labels, ref_emb=None, ref_labels=None):
    """The pair losses' input checks, except that a rank may hold no rows (an epoch's last batch
    split over more ranks than it has rows)."""
    if isinstance(embeddings, torch.Tensor) and embeddings.dim() == 2 and embeddings.shape[0] == 0 \
            and embeddings.shape[1] > 0 and embeddings.is_floating_point():
        if labels is None:
            raise ValueError("labels is required (a 1-D integer tensor of length N)")
        V.check_labels(labels, 0)
        if ref_emb is not None and ref_emb.shape[0] > 0:
            V.check_pair_inputs(ref_emb, ref_labels, None, None)
        return
    V.check_pair_inputs(embeddings, labels, ref_emb, ref_labels)


def _check_wrappable(loss):
    if isinstance(loss, (_PairLoss, _ClassLoss, CrossBatchMemory)):
        return
    try:
        from pytorch_metric_learning.losses import BaseMetricLossFunction
        from pytorch_metric_learning.losses import CrossBatchMemory as PmlXBM
    except ImportError:
        BaseMetricLossFunction = PmlXBM = ()
    if BaseMetricLossFunction and isinstance(loss, (BaseMetricLossFunction, PmlXBM)):
        return
    raise TypeError("loss must be a fused_pairloss loss, fused_pairloss.CrossBatchMemory, or a "
                    f"pytorch-metric-learning loss / CrossBatchMemory; got {type(loss).__name__}")


class DistributedLossWrapper(torch.nn.Module):
    """Drop-in for pytorch_metric_learning.utils.distributed.DistributedLossWrapper(loss, efficient).

    Returns, on every rank, world_size times the single-process loss of the gathered batch (PML's
    default mode), so DDP's gradient averaging gives the single-process gradients; the gradients of
    the gathered rows go back to the ranks that own them. For this library's pair losses of
    `_distributed.FUSED_PAIR_CALLS` (MultiSimilarity incl. miner_epsilon, Circle, NTXent, SupCon,
    Contrastive, GeneralizedLiftedStructure, TripletMargin, Margin, SignalToNoiseRatioContrastive,
    IntraPairVariance; cosine and lp, and declared losses) each rank computes only its rows against the
    gathered batch with the fused engine: N_local x N_global work, O((N_local + N_global) D)
    memory, no N_global x N_global matrix anywhere. Local batch sizes may differ between ranks
    (an epoch's last batch). `fused_pairloss.CrossBatchMemory` is supported the same way (the
    gathered batch is enqueued in rank order, the same on every rank; PML enqueues each rank's own
    rows first, so its ranks' memories differ, PML issue #639).

    On the fused path `efficient=True` is accepted and gives the same exact result. (PML's efficient
    mode computes only the local rows as anchors against the gathered batch and lets the gradient
    of the other ranks' rows go unused, which is not the single-process gradient: PML issues #712
    and #448. The fused path always computes the local rows only and is exact.) Where PML computes
    (below), efficient=True is PML's efficient call (the local rows against the gathered batch as
    the ref: the tuple of an efficient DistributedMinerWrapper indexes that; without a tuple, all
    pairs of the local rows against it less their own columns, as PML).

    Not fused, computed as PML's wrapper does (the gathered batch, this rank's rows first, the
    others detached, and the whole loss on it): an explicit `indices_tuple` (its indices refer to
    that order, as in PML), a module that computes with PML itself (PML reducer / regularizer /
    distance arguments), `backend="reference"`, PML's own loss objects, and the class losses. The
    class losses (SoftTriple, ProxyCircle, ProxyAnchor, NormalizedSoftmax, CosFace, ArcFace) need
    no wrapper: under plain DDP (class weights replicated, each rank its local rows) the mean-reduced
    ones give the single-process gradients for equal local batch sizes. ProxyAnchor's loss is a
    log-sum-exp over each class's samples in the whole batch, which does not decompose over ranks:
    under DDP it gives what PML's ProxyAnchorLoss gives under DDP (the average of per-rank losses).
    Wrapping a class loss here does what PML's wrapper does, which also multiplies the class
    weights' gradients by world_size.

    Without an initialized process group it warns and returns the loss as is (as PML).
    """

    def __init__(self, loss, efficient=False):
        super().__init__()
        _check_wrappable(loss)
        self.loss = loss
        self.efficient = bool(efficient)

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None,
                enqueue_mask=None):
        xbm = _is_memory(self.loss)
        if not is_distributed():
            warnings.warn("DistributedLossWrapper is being used in a non-distributed setting. "
                          "Returning the loss as is.", stacklevel=V.user_stacklevel())
            if xbm:
                return self.loss(embeddings, labels, indices_tuple, enqueue_mask)
            return self.loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        world = dist.get_world_size()
        if xbm:
            if ref_emb is not None or ref_labels is not None:
                raise ValueError("CrossBatchMemory is not compatible with ref_emb and ref_labels")
            if world <= 1:
                return self.loss(embeddings, labels, indices_tuple, enqueue_mask)
            if hasattr(self.loss, "_forward_distributed"):
                return self.loss._forward_distributed(embeddings, labels, indices_tuple, enqueue_mask) * world
            return self._pml_cross_batch(embeddings, labels, indices_tuple, enqueue_mask) * world
        if enqueue_mask is not None:
            raise ValueError("enqueue_mask is for a CrossBatchMemory loss")
        if world <= 1:
            return self.loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        plan = None
        if indices_tuple is None and labels is not None and isinstance(embeddings, torch.Tensor):
            plan = fused_pair_plan(self.loss, embeddings.device)
        if plan is None:
            return self._pml_regular(embeddings, labels, indices_tuple, ref_emb, ref_labels) * world
        # PML's dtype under autocast, as the loss's own call
        return self.loss._as_pml_dtype(self._fused(plan, embeddings, labels, ref_emb, ref_labels), embeddings) * world

    # ---- the fused path -------------------------------------------------------------------------
    def _fused(self, plan, embeddings, labels, ref_emb, ref_labels):
        fn, hyper = plan
        # PML's set_ref_emb: a ref_emb without ref_labels is read with the labels (its diagonal no pair)
        labels_for_ref = ref_emb is not None and ref_labels is None
        try:
            self.loss._check_labels(labels)
            labels = V.integral_labels(labels)
            ref_labels = labels if labels_for_ref else V.integral_labels(ref_labels, "ref_labels")
            check_local_inputs(embeddings, labels, ref_emb, ref_labels)
            error = None
        except (ValueError, TypeError) as e:  # raised after the other ranks learn of it (no hang)
            error = e
            # the same dtype on every rank, so the layout check names this rank's error
            labels, ref_labels = V.int64_like(labels), V.int64_like(ref_labels)
        layout = agreed_layout(dict(embeddings=embeddings, labels=labels, ref_emb=ref_emb, ref_labels=ref_labels),
                               error)
        batch = DistributedBatch(layout.total)
        labels = labels.to(embeddings.device)
        if labels_for_ref:  # ref_emb's rows laid out as the batch's: global row i against ref row i excluded
            R = AllGather.apply(ref_emb, layout)
            excl = exclusion_for(embeddings.shape[0], embeddings.device, offset=layout.offset)
            return fn(embeddings, labels, R, layout.gather(labels), exclude_col=excl, batch=batch, **hyper)
        if ref_emb is None:
            X = AllGather.apply(embeddings, layout)
            Y = layout.gather(labels)
            excl = exclusion_for(embeddings.shape[0], embeddings.device, offset=layout.offset)
            return fn(embeddings, labels, X, Y, exclude_col=excl, batch=batch, **hyper)
        # a separate ref: gathered as well (PML: no self exclusion, the gathered ref labels are a new tensor)
        ref_layout = RankLayout(ref_emb.shape[0], ref_emb.device)
        R = AllGather.apply(ref_emb, ref_layout)
        RY = ref_layout.gather(ref_labels.to(ref_emb.device))
        return fn(embeddings, labels, R, RY, exclude_col=None, batch=batch, **hyper)

    # ---- PML's behaviour (not fused) --------------------------------------------------------------
    @staticmethod
    def _pml_gather(x):
        """PML's gather: this rank's tensor (with its graph) first, the others' detached."""
        if x is None:
            return None
        layout = RankLayout(x.shape[0], x.device)
        return torch.cat([x, layout.others(layout.gather(x))], dim=0)

    def _pml_regular(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        agreed_layout(dict(embeddings=embeddings, labels=labels, ref_emb=ref_emb, ref_labels=ref_labels))
        if labels is not None:
            labels = labels.to(embeddings.device)
        all_emb, all_labels = self._pml_gather(embeddings), self._pml_gather(labels)
        all_ref, all_ref_labels = None, None
        if ref_emb is not None:
            if ref_labels is not None:
                ref_labels = ref_labels.to(ref_emb.device)
            all_ref, all_ref_labels = self._pml_gather(ref_emb), self._pml_gather(ref_labels)
        if self.efficient and (indices_tuple is not None or self._pml_computes()):
            # PML's efficient call: this rank's rows against the gathered ref (or batch), which is
            # what the anchors of an efficient DistributedMinerWrapper's tuple index; without a
            # tuple, PML's: all pairs of the local rows against it, less their own columns
            if all_ref is None:
                all_ref, all_ref_labels = all_emb, all_labels
            elif all_ref_labels is None:  # PML's select_ref_or_regular: the batch's labels for the ref
                all_ref_labels = all_labels
            if indices_tuple is None:
                from pytorch_metric_learning.utils.distributed import get_indices_tuple
                indices_tuple = get_indices_tuple(labels, all_ref_labels)
            return self.loss(embeddings, labels, indices_tuple, all_ref, all_ref_labels)
        return self.loss(all_emb, all_labels, indices_tuple, all_ref, all_ref_labels)

    def _pml_computes(self):
        """Whether the loss is PML's computation: a PML loss object, a module of ours computing with
        PML itself, the reference backend (efficient=True is then PML's efficient call; our other
        losses, which the wrapper does not fuse, run on the gathered batch: the exact result)."""
        if getattr(self.loss, "_pml", None) is not None or not hasattr(self.loss, "_pml"):
            return True
        return getattr(self.loss, "backend", "auto") == "reference"  # asked for ("auto" may resolve to it)

    def _pml_cross_batch(self, embeddings, labels, indices_tuple, enqueue_mask):
        agreed_layout(dict(embeddings=embeddings, labels=labels, enqueue_mask=enqueue_mask))
        labels = labels.to(embeddings.device)
        mask = None if enqueue_mask is None else self._pml_gather(enqueue_mask.to(embeddings.device))
        return self.loss(self._pml_gather(embeddings), self._pml_gather(labels), indices_tuple, mask)


def _is_memory(loss):
    if isinstance(loss, CrossBatchMemory):
        return True
    try:
        from pytorch_metric_learning.losses import CrossBatchMemory as PmlXBM
    except ImportError:
        return False
    return isinstance(loss, PmlXBM)
