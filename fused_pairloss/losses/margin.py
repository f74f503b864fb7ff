"""Margin loss (Wu et al., "Sampling Matters in Deep Embedding Learning", ICCV 2017; PML MarginLoss).

Per triplet (a, p, n) with u = d (LpDistance, PML's default) or u = S (cosine; PML's
distance.margin(x, y) = y - x for a similarity), beta the boundary and m the margin:
    pos_apn = relu(margin(u_ap, beta) + m),   neg_apn = relu(margin(beta, u_an) + m),
PML's DivisorReducer: sum over the triplets of pos + neg, divided by the number of nonzero pos and
neg terms (0 when that is 0); plus beta * nu when beta is learned.

All triplets without enumerating them: pos_apn depends on (a, p) only and neg_apn on (a, n) only,
so with P_a / N_a the positives / negatives of row a,
    sum_{p,n} (pos_apn + neg_apn) = |N_a| sum_p pos_ap + |P_a| sum_n neg_an,
and the nonzero count is |N_a| #{pos_ap > 0} + |P_a| #{neg_an > 0}. Declaration: per set a hinge
term summed per row (x = d - (beta - m), x = beta + m - d for lp), beta a number of the declaration.

A learned or per-class beta (PML's num_classes; beta_a = beta[y_a], the anchor's class): the same
declaration with beta = 0 and row a's shift beta_a (the engine's row_shift, a constant to it), and
beta_a's gradient from the row's counts, (|P_a| #{neg_an > 0} - |N_a| #{pos_an > 0}) / divisor (lp;
the other sign for cosine), added through (beta_a - beta_a.detach()) * gradient. PML's regularizer:
beta * nu for one beta, nu sum_triplets beta_a / divisor for a per-class one.
"""
from __future__ import annotations

import torch

from .. import _validation as V
from ..ops import engines
from ..ops._common import LOCAL, loss_function, pair_operands, unused_label, zero_loss
from ..ops.spec import PairLossSpec, PairTerm
from ..ops.stats import pair_stats
from ._base import _PairLoss, check_listed_rows, check_triplets_per_anchor, run_pair_loss
from ._reference_common import check_distance, nan_in_nan_out
from ._registry import LossEntry
from .triplet_margin import pml_triplets


def _beta_tensor(beta, like):
    """beta as PML uses it: c_f.to_device(beta, device=..., dtype=embeddings.dtype), shape (1,) or (C,)."""
    return torch.as_tensor(beta).to(device=like.device, dtype=like.dtype).reshape(-1)


def margin_reference(embeddings, labels, ref_emb=None, ref_labels=None, *, margin=0.2, nu=0.0, beta=1.2,
                     learn_beta=False, distance="lp", indices_tuple=None):
    """PML MarginLoss(margin, nu, beta, learn_beta) with triplets_per_anchor="all" (margin_loss.py),
    step by step: the triplets (all of them under PML's identity rule, or the listed ones joined on
    the anchor as lmu.convert_to_triplets), beta per triplet (one value, or beta[labels[a]] for a
    per-class beta), pos / neg terms, DivisorReducer of their sum by the nonzero count, the beta
    regularizer beta * nu when learned (already reduced for one beta, per triplet by the divisor for
    a per-class one), the sub-losses summed in the embeddings' dtype (PML's MultipleReducers)."""
    check_distance(distance, loss="margin_loss")
    zero = zero_loss(embeddings)
    a, u_ap, u_an, _ = pml_triplets(embeddings, labels, ref_emb, ref_labels, indices_tuple, distance)
    if a.numel() == 0:  # PML's zero_losses: both sub-losses sum(embeddings * 0)
        return nan_in_nan_out(zero + zero, embeddings, ref_emb)
    beta_t = _beta_tensor(beta, embeddings)
    b = beta_t if beta_t.numel() == 1 else beta_t[torch.as_tensor(labels, device=embeddings.device)[a]]
    lp = distance == "lp"
    pos = torch.relu((u_ap - b if lp else b - u_ap) + margin)
    neg = torch.relu((b - u_an if lp else u_an - b) + margin)
    divisor = (pos > 0).sum() + (neg > 0).sum()
    margin_part = (pos + neg).sum() / divisor if divisor != 0 else zero
    reg = zero
    if learn_beta:
        if beta_t.numel() == 1:
            reg = (beta_t * nu).reshape(())
        else:
            reg = (b * nu).sum() / divisor if divisor != 0 else zero
    return nan_in_nan_out((margin_part + reg).to(embeddings.dtype), embeddings, ref_emb)


def declaration(margin, beta, distance="lp"):
    b, m = float(beta), float(margin)
    hinged = dict(hinge=True, sum=True)
    if distance == "lp":  # pos: d - (beta - m), neg: (beta + m) - d
        pos, neg = PairTerm(1.0, b - m, **hinged), PairTerm(-1.0, b + m, **hinged)
    else:  # pos: (beta + m) - S, neg: S - (beta - m)
        pos, neg = PairTerm(-1.0, b + m, **hinged), PairTerm(1.0, b - m, **hinged)
    return PairLossSpec(pos=pos, neg=neg, distance=distance)


class _ZeroWithGradient(torch.autograd.Function):
    """0 with the derivative 1: carries a gradient computed elsewhere (x - x.detach(), also for an
    infinite x, where that is NaN)."""

    @staticmethod
    def forward(x):
        return torch.zeros_like(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad


def combine(st: engines.PairStats, embeddings, *, beta, nu, learn_beta, distance, batch=LOCAL, row_beta=None):
    """Module docstring: the triplet sums from the rows' pair sums and counts, in the stat dtype
    (half-precision counts and their products overflow), the loss in the embeddings' dtype.
    row_beta (N,): the rows' betas when the engine took them as row shifts (a learned or per-class
    beta; differentiable to it), else None (beta a constant of the declaration)."""
    n_pos, n_neg = st.count_pos.long(), st.count_neg.long()
    A, E = st.sum_pos.dtype, embeddings.dtype
    used = (n_pos > 0) & (n_neg > 0)  # the anchors of triplets: only their terms (and betas) are read
    total = batch.sum(torch.where(used, n_neg.to(A) * st.sum_pos + n_pos.to(A) * st.sum_neg, 0.0))
    pos_nonzero = batch.sum(n_neg * st.nonzero_pos.long())
    neg_nonzero = batch.sum(n_pos * st.nonzero_neg.long())
    divisor = pos_nonzero + neg_nonzero
    zero = zero_loss(embeddings)
    margin_part = torch.where(divisor > 0, total / divisor.clamp(min=1).to(A), 0.0)
    if row_beta is not None:
        per_divisor = torch.where(divisor > 0, 1.0 / divisor.clamp(min=1).to(A), 0.0)
        if row_beta.requires_grad:  # row shifts are constants to the engine: the gradient from the counts
            sign = 1.0 if distance == "lp" else -1.0
            grad = sign * (n_pos * st.nonzero_neg.long() - n_neg * st.nonzero_pos.long()).to(A) * per_divisor
            margin_part = margin_part + batch.sum(torch.where(used, _ZeroWithGradient.apply(row_beta) * grad, 0.0))
        if learn_beta and _is_per_class(beta):  # PML: beta_a * nu per triplet, reduced by the divisor (0 if 0)
            reg = batch.sum(torch.where(used, (n_pos * n_neg).to(A) * row_beta, 0.0))
            margin_part = margin_part + torch.where(divisor > 0, reg * nu * per_divisor, 0.0)
        # NaN in, NaN out: the engine's hinges drop the NaN terms of a NaN beta, PML's sum keeps them
        nan_beta = batch.sum(torch.where(used & torch.isnan(row_beta), row_beta.detach(), 0.0))
        margin_part = margin_part + torch.where(divisor > 0, nan_beta, 0.0)
    loss = margin_part.to(E)
    if learn_beta and not _is_per_class(beta):  # PML: beta * nu, already reduced (summed in E, as PML's)
        loss = loss + _beta_tensor(beta, embeddings).reshape(()) * nu
    return torch.where(batch.sum(n_pos * n_neg) > 0, loss, zero + zero)


@loss_function
def margin_fused(embeddings, labels, ref_emb, ref_labels, *, margin, nu=0.0, beta=1.2, learn_beta=False,
                 distance="lp", backend, exclude_col=None, batch=LOCAL):
    if torch.is_tensor(beta) and beta.numel() != 1 and beta.dim() != 1:
        raise ValueError(f"beta: one beta, or a 1-D tensor of per-class betas; got shape {tuple(beta.shape)}")
    q, r, labels_r, excl = pair_operands(embeddings, labels, ref_emb, ref_labels, exclude_col)
    per_class = _is_per_class(beta)
    # a tensor beta while torch.compile traces is a graph input (its value unknown, changed in place
    # between calls as PML's attribute may be): row shifts too
    if not (per_class or (torch.is_tensor(beta) and (beta.requires_grad or V._compiling()))):
        st = pair_stats(q, r, labels, labels_r, excl, declaration(margin, _scalar(beta), distance), backend)
        loss = combine(st, embeddings, beta=beta, nu=nu, learn_beta=learn_beta, distance=distance, batch=batch)
        # hinge terms drop NaN: NaN in, NaN out through an exact 0 of the inputs
        return loss + zero_loss(embeddings) + (0 if ref_emb is None else zero_loss(ref_emb))
    # the rows' betas as row shifts, rounded to the embeddings' dtype as PML's beta is; beta's gradient
    # through them in the stat dtype, every rank's rows taking their share (batch.shared)
    device = embeddings.device
    if per_class:
        C = beta.numel()
        y = _label_indices(labels, beta).to(device)
        in_range = (y >= -C) & (y < C)
        rows = torch.where(in_range, y, 0)  # PML reads beta[y_a] for the anchors of triplets only (checked below)
    else:
        rows = torch.zeros(embeddings.shape[0], dtype=torch.int64, device=device)
    row_beta = batch.shared(beta.to(device=device, dtype=engines.stat_dtype(embeddings.dtype)).reshape(-1))[rows]
    row_shift = _beta_tensor(beta, embeddings)[rows]
    if per_class:  # a label outside beta: NaN (while compiling, where the check below does not run)
        row_beta = torch.where(in_range, row_beta, float("nan"))
        row_shift = torch.where(in_range, row_shift, float("nan"))
    st = pair_stats(q, r, labels, labels_r, excl, declaration(margin, 0.0, distance), backend, row_shift=row_shift)
    if per_class and not V._compiling():
        # every rank counts the global number, so every rank raises (no rank waits in a collective)
        outside = ~in_range & (st.count_pos > 0) & (st.count_neg > 0)
        if int(batch.count(outside)) > 0:
            seen = sorted(set(y[outside].tolist()))[:5]
            raise ValueError(f"labels: MarginLoss with a per-class beta has num_classes={C}, so the anchors of "
                             f"triplets need labels in [-{C}, {C}) (PML reads beta[labels]); got "
                             + (f"{seen}" if seen else "such labels on another rank"))
    loss = combine(st, embeddings, beta=beta, nu=nu, learn_beta=learn_beta, distance=distance, batch=batch,
                   row_beta=row_beta)
    return loss + zero_loss(embeddings) + (0 if ref_emb is None else zero_loss(ref_emb))


def _is_per_class(beta):
    return torch.is_tensor(beta) and beta.dim() == 1 and beta.numel() != 1


def _label_indices(labels, beta):
    """labels as indices into a per-class beta (PML: beta[labels[anchor]]): integers, int64."""
    labels = torch.as_tensor(labels)
    if V._needs_ids(labels) or labels.dtype.is_complex:  # float or bool (PML: IndexError)
        raise TypeError(f"labels: MarginLoss with a per-class beta (num_classes={beta.numel()}) looks beta up by "
                        f"label, so labels must be integers; got {labels.dtype}")
    return labels.to(dtype=torch.int64)


def _integer_ref_labels(labels, ref_labels):
    """Float / bool ref_labels beside integer labels, as int64 equal to a label exactly where PML's
    == makes them equal: so the labels (beta's indices) need not become ids. Integral values (below
    2^63) stay themselves, the others one number that is no label (they equal no label; ref rows
    are never anchors). PML's == compares in the promoted dtype, so this needs every label exact in
    it (else a ValueError naming ref_labels). NaN is left to the label checks (eager calls)."""
    if not ref_labels.dtype.is_floating_point:
        return ref_labels.to(torch.int64)
    compiling = V._compiling()
    if not compiling and bool(torch.isnan(ref_labels).any()):
        return ref_labels
    common = torch.promote_types(labels.dtype, ref_labels.dtype)
    if not compiling and bool((labels.to(common).to(torch.int64) != labels).any()):
        raise ValueError(f"ref_labels: {ref_labels.dtype} ref_labels cannot tell some labels apart (PML's == "
                         f"rounds the labels to {common}), while MarginLoss's per-class beta is indexed by each "
                         "label: pass integer ref_labels")
    r = ref_labels.double()
    integral = torch.isfinite(r) & (r == torch.round(r)) & (r.abs() < 2.0 ** 63)
    if labels.numel():
        no_label = unused_label(labels.to(torch.int64))
    else:
        no_label = torch.zeros((), dtype=torch.int64, device=labels.device)
    return torch.where(integral, torch.where(integral, r, 0.0).to(torch.int64), no_label.to(r.device))


def _scalar(beta):
    """A constant beta as the declaration's number (eager calls; a tensor's value at this call)."""
    t = torch.as_tensor(beta).detach()
    if t.numel() != 1:
        raise ValueError(f"beta: one beta, or a 1-D tensor of per-class betas; got shape {tuple(t.shape)}")
    return float(t.reshape(()))


@loss_function
def margin_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, margin=0.2, nu=0.0, beta=1.2,
                learn_beta=False, distance="lp", backend="auto"):
    """PML MarginLoss(margin, nu, beta, learn_beta) over all triplets; beta a float, a one-element
    tensor or a (num_classes,) tensor of per-class betas looked up by the anchors' labels (a learned
    one gets its gradient); PML's default distance LpDistance ("lp")."""
    V.check_real("margin", margin)
    V.check_real("nu", nu)
    if not torch.is_tensor(beta):
        V.check_real("beta", beta)
    V.check_distance(distance)
    return run_pair_loss(margin_reference, margin_fused, embeddings, labels, ref_emb, ref_labels, backend,
                         margin=margin, nu=nu, beta=beta, learn_beta=learn_beta, distance=distance)


class MarginLoss(_PairLoss):
    """Drop-in for pytorch_metric_learning.losses.MarginLoss (default distance LpDistance). One beta
    or a per-class beta (num_classes), learned or not, is fused; an integer triplets_per_anchor
    samples PML's triplets (the same draws: _reference_common.sampled_triplets) and computes them
    from their rows."""
    _default_distance = "lp"
    _reference = staticmethod(margin_reference)
    _fuses_pair_miners = True  # our MultiSimilarityMiner's and PairMarginMiner's pairs: their rule in the engine
    _listed_pairs = False  # listed triplets from their rows (_reference_with_indices)
    _fused_kwargs = ("num_classes",)

    def __init__(self, margin=0.2, nu=0, beta=1.2, triplets_per_anchor="all", learn_beta=False, num_classes=None,
                 backend="auto", **kwargs):
        super().__init__()
        V.check_real("margin", margin)
        V.check_real("nu", nu)
        V.check_real("beta", beta)
        check_triplets_per_anchor(triplets_per_anchor)
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                        or num_classes < 0):
            raise ValueError(f"num_classes must be None or an int >= 0; got {num_classes!r}")
        self.margin, self.nu, self.learn_beta = margin, nu, bool(learn_beta)
        self.triplets_per_anchor = triplets_per_anchor
        # PML's initialize_beta: shape (1,) or (num_classes,), a Parameter when learned
        beta_t = torch.tensor([float(beta)])
        if num_classes:
            beta_t = torch.ones(num_classes) * beta_t
        self.beta = torch.nn.Parameter(beta_t) if self.learn_beta else beta_t
        if num_classes is not None:  # fused; PML gets it on a fallback
            kwargs = dict(kwargs, num_classes=num_classes)
        self.backend = backend
        self._setup_kwargs(kwargs, (margin, nu, beta),
                           dict(learn_beta=self.learn_beta, triplets_per_anchor=triplets_per_anchor),
                           param_name="beta")

    def _hyper(self):
        return dict(margin=self.margin, nu=self.nu, beta=self.beta, learn_beta=self.learn_beta,
                    distance=self._distance_kind)

    def _functional(self):
        return margin_loss

    def _reference_with_indices(self, embeddings, labels, indices_tuple, ref_emb, ref_labels, hyper):
        # the listed triplets' rows only (O(#triplets D)): no N x M matrix, so no warning
        check_listed_rows(embeddings, ref_emb)
        return margin_reference(embeddings, labels, ref_emb, ref_labels, indices_tuple=indices_tuple, **hyper)

    def _forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        if labels is None and indices_tuple is None:
            raise ValueError("MarginLoss needs labels or an indices_tuple (PML: labels and indices_tuple "
                             "cannot both be None)")
        # PML's sample (an integer triplets_per_anchor), computed from its triplets' rows
        indices_tuple = self._with_sampled_triplets(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        return super()._forward(embeddings, labels, indices_tuple, ref_emb, ref_labels)

    def _fused_in_wrappers_now(self):
        return self.triplets_per_anchor == "all"  # a sample is drawn by the call PML's wrappers make

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        if _is_per_class(self.beta) and labels is None and indices_tuple is not None:
            raise ValueError(f"labels: MarginLoss with a per-class beta (num_classes={self.beta.numel()}) looks "
                             "beta up by the anchors' labels, so it needs labels with an indices_tuple too")
        self._check_labels(labels)  # a per-class beta's labels are integers from here on
        if (_is_per_class(self.beta) and ref_emb is not None and torch.is_tensor(labels) and ref_labels is not labels
                and V._needs_ids(ref_labels)):
            # float / bool ref_labels would make the labels ids too; beta is indexed by the labels themselves
            ref_labels = _integer_ref_labels(labels, ref_labels)
        return super().forward(embeddings, labels, indices_tuple, ref_emb, ref_labels)

    def _check_labels(self, labels):
        if _is_per_class(self.beta) and labels is not None:  # PML indexes beta with the labels themselves
            _label_indices(labels, self.beta)

    def extra_repr(self):
        return super().extra_repr() + f", triplets_per_anchor={self.triplets_per_anchor!r}"


ENTRIES = (
    LossEntry(MarginLoss, "pair", functional=margin_loss, reference=margin_reference, fused=margin_fused,
              hyper=("margin", "nu", "beta")),
)
