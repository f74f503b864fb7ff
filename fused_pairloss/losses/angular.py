"""Angular loss (Wang et al., "Deep Metric Learning with Angular Loss", ICCV 2017; PML AngularLoss).

PML's computation, per positive pair (a, p) (all of them, or an indices_tuple's a1, p), with
x^ = x / |x|, t = tan(alpha)^2 and r_n the ref rows as given (PML does not normalize them here):
    f_apn = 4 t (x^_a + x^_p) . r_n - 2 (1 + t) x^_a . x^_p   over every n with y_n != y_a,
    l_ap = log(1 + sum_n exp(f_apn)),   loss = mean of l_ap (MeanReducer over positive pairs).

The sum over negatives is a row of the derived query x^_a + x^_p: each chunk of positive pairs
becomes a chunk of rows of the pair engine in ref mode (rows x^_a + x^_p with label y_a, columns r,
the negatives' LSE of 4 t S), so l_ap = logaddexp(0, L_ap - 2 (1 + t) x^_a . x^_p). It couples a
positive with every negative: the engine walks #positive pairs x M (about |P_i| times a pair loss's
N x M; half of it for the batch against itself, where (a, p) and (p, a) are one value), memory
O(chunk D + (N + M) D). The op `fused_pairloss::angular_rows` sums l_ap per anchor
row (fixed output shape, so torch.compile traces it) and its backward op recomputes each chunk and
runs the engine's backward on it.
"""
from __future__ import annotations

import math

import torch

from .. import _validation as V
from ..ops import engines
from ..ops._common import LOCAL, loss_function, logaddexp, normalize, rows_of, zero_loss
from ..ops.operands import recomputation_inputs, recomputed_grads, stat_dtype
from ..ops.positive_pairs import label_positive_pairs
from ..ops.spec import PairLossSpec, PairTerm
from ..ops.stats import backward_op, forward_op
from ._base import _PairLoss, check_listed_rows, run_pair_loss
from ._reference_common import check_distance, masked_logsumexp, pair_count_matrices, pml_pair_lists
from ._registry import LossEntry

# derived query rows (positive pairs) per engine call
CHUNK_PAIRS = 1 << 13


def _constants(alpha_degrees):
    """(4 tan^2 alpha, 2 (1 + tan^2 alpha)) in float64, as PML's float64 alpha tensor gives them."""
    tan_alpha = math.tan(math.radians(alpha_degrees))
    t = tan_alpha * tan_alpha  # (a negative base under ** made torch.compile raise)
    return 4.0 * t, 2.0 * (1.0 + t)


def angular_reference(embeddings, labels, ref_emb=None, ref_labels=None, *, alpha=40.0, distance="lp",
                      indices_tuple=None):
    """PML AngularLoss(alpha in degrees) (angular_loss.py) step by step: the pair lists, the anchors and
    positives normalized, (x^_a + x^_p) times the raw ref rows, the masked log(1 + sum exp) over the
    columns with another label than the anchor's, the mean over the positive pairs."""
    check_distance(distance, allowed=("lp",), loss="angular_loss")
    if labels is None:
        raise ValueError("AngularLoss: labels is required (as in PML)")
    ref, ref_lab = (embeddings, labels) if ref_emb is None else (ref_emb, ref_labels)
    labels_t = torch.as_tensor(labels, device=embeddings.device)
    ref_t = labels_t if ref_lab is labels else torch.as_tensor(ref_lab, device=embeddings.device)
    a1, p, a2, _ = pml_pair_lists(*pair_count_matrices(labels, ref_emb, ref_labels, indices_tuple,
                                                       (embeddings.shape[0], ref.shape[0]), embeddings.device))
    if a1.numel() == 0 or a2.numel() == 0:
        return zero_loss(embeddings)
    c_neg, c_ap = _constants(alpha)
    anchors, positives = normalize(embeddings[a1]), normalize(ref[p])
    ap_dot = (anchors * positives).sum(1, keepdim=True)
    final = c_neg * ((anchors + positives) @ ref.t()) - c_ap * ap_dot
    keep = labels_t[a1][:, None] != ref_t[None, :]
    return masked_logsumexp(final, keep, add_one=True).mean()


def declaration(c_neg):
    return PairLossSpec(pos=PairTerm(scale=0.0), neg=PairTerm(scale=float(c_neg), lse=True), distance="cosine")


def _chunk_forward(q_hat, r_hat, r_raw, labels_q, labels_r, rows, cols, c_neg, c_ap, backend):
    """(derived queries, engine outputs, z) of one chunk of positive pairs (rows, cols):
    z = LSE_n c_neg (q^_a + r^_p) . r_n - c_ap q^_a . r^_p."""
    terms, flags = declaration(c_neg).pack()
    derived = (q_hat[rows] + r_hat[cols]).contiguous()
    no_exclusion = torch.full_like(rows, -1)
    values, _, aux = forward_op(engines.PAIR, backend)(derived, r_raw, labels_q[rows].contiguous(), labels_r,
                                                       no_exclusion, list(terms), flags)
    z = values[1] - c_ap * (q_hat[rows] * r_hat[cols]).sum(1)
    return derived, values, aux, z, (terms, flags, no_exclusion)


def _pair_chunks(n_pairs):
    return [(k0, min(n_pairs, k0 + CHUNK_PAIRS)) for k0 in range(0, n_pairs, CHUNK_PAIRS)]


def _op_pairs(labels_q, labels_r, exclude_col, symmetric):
    """The positive pairs the op walks: all of them, or, for the batch against itself (`symmetric`),
    each unordered pair once: (a, p) and (p, a) have one derived query, one negative set (one
    label) and one x^_a . x^_p, so one value, added to both rows."""
    rows, cols = label_positive_pairs(labels_q, labels_r, exclude_col)
    if symmetric:
        keep = rows < cols
        rows, cols = rows[keep], cols[keep]
    return rows, cols


def _add_to_rows(sums, rows, cols, values, symmetric):
    sums = sums.index_add(0, rows, values)
    return sums.index_add(0, cols, values) if symmetric else sums


@torch.library.custom_op("fused_pairloss::angular_rows", mutates_args=())
def angular_rows(q_hat: torch.Tensor, r_hat: torch.Tensor, r_raw: torch.Tensor, labels_q: torch.Tensor,
                 labels_r: torch.Tensor, exclude_col: torch.Tensor, c_neg: float, c_ap: float, backend: str,
                 symmetric: bool) -> torch.Tensor:
    """Per anchor row a: sum over its positives p (labels equal, p != exclude_col[a]) of
    logaddexp(0, z_ap), z_ap = LSE_{n: y_n != y_a} c_neg (q^_a + r^_p) . r_n - c_ap q^_a . r^_p, with
    q^ the normalized anchors, r^ the normalized ref rows (positives) and r_raw the ref rows as given
    (negatives, as PML reads them); in the statistics' dtype. `symmetric`: q^ and r^ are the same
    rows, r_raw their rows as given and the labels one (the batch against itself, _op_pairs)."""
    A = stat_dtype(q_hat.dtype)
    qa, rh, rr = q_hat.to(A), r_hat.to(A), r_raw.to(A).contiguous()
    rows, cols = _op_pairs(labels_q, labels_r, exclude_col, symmetric)
    sums = torch.zeros(q_hat.shape[0], dtype=A, device=q_hat.device)
    for k0, k1 in _pair_chunks(rows.shape[0]):
        ri, ci = rows[k0:k1], cols[k0:k1]
        z = _chunk_forward(qa, rh, rr, labels_q, labels_r, ri, ci, c_neg, c_ap, backend)[3]
        sums = _add_to_rows(sums, ri, ci, logaddexp(torch.zeros_like(z), z), symmetric)
    return sums


@angular_rows.register_fake
def _fake(q_hat, r_hat, r_raw, labels_q, labels_r, exclude_col, c_neg, c_ap, backend, symmetric):
    return q_hat.new_empty((q_hat.shape[0],), dtype=stat_dtype(q_hat.dtype))


@torch.library.custom_op("fused_pairloss::angular_rows_backward", mutates_args=())
def angular_rows_backward(grad: torch.Tensor, q_hat: torch.Tensor, r_hat: torch.Tensor, r_raw: torch.Tensor,
                          labels_q: torch.Tensor, labels_r: torch.Tensor, exclude_col: torch.Tensor, c_neg: float,
                          c_ap: float, backend: str, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor,
                                                                               torch.Tensor]:
    """(grad_q_hat, grad_r_hat, grad_r_raw) of angular_rows' sums weighted by `grad`: per chunk the
    forward again, then the pair's weight w = grad_a sigmoid(z) into the engine's backward through
    lse_neg (the derived query's gradient goes to q^_a and r^_p, the columns' to r_raw), and -c_ap w
    through q^_a . r^_p."""
    A = stat_dtype(q_hat.dtype)
    qa, rh, rr, g = q_hat.to(A), r_hat.to(A), r_raw.to(A).contiguous(), grad.to(A)
    rows, cols = _op_pairs(labels_q, labels_r, exclude_col, symmetric)
    grad_q, grad_rh, grad_rr = torch.zeros_like(qa), torch.zeros_like(rh), torch.zeros_like(rr)
    engine_backward = backward_op(engines.PAIR, backend)
    for k0, k1 in _pair_chunks(rows.shape[0]):
        ri, ci = rows[k0:k1], cols[k0:k1]
        derived, values, aux, z, (terms, flags, excl) = _chunk_forward(qa, rh, rr, labels_q, labels_r, ri, ci, c_neg,
                                                                       c_ap, backend)
        g_pair = g[ri] + g[ci] if symmetric else g[ri]  # the pair's value is in both rows' sums
        weight = g_pair * torch.sigmoid(z)  # d logaddexp(0, z) / dz
        grad_values = torch.zeros_like(values)
        grad_values[1] = weight
        g_derived, g_cols = engine_backward(grad_values, derived, rr, labels_q[ri].contiguous(), labels_r, excl,
                                            values, aux, list(terms), flags, True)
        g_dot = (-c_ap * weight)[:, None]
        grad_q.index_add_(0, ri, g_derived.to(A) + g_dot * rh[ci])
        grad_rh.index_add_(0, ci, g_derived.to(A) + g_dot * qa[ri])
        grad_rr += g_cols.to(A)
    return grad_q.to(q_hat.dtype), grad_rh.to(r_hat.dtype), grad_rr.to(r_raw.dtype)


@angular_rows_backward.register_fake
def _fake_backward(grad, q_hat, r_hat, r_raw, labels_q, labels_r, exclude_col, c_neg, c_ap, backend, symmetric):
    return torch.empty_like(q_hat), torch.empty_like(r_hat), torch.empty_like(r_raw)


def _setup_context(ctx, inputs, output):
    q_hat, r_hat, r_raw, labels_q, labels_r, exclude_col, c_neg, c_ap, backend, symmetric = inputs
    ctx.save_for_backward(q_hat, r_hat, r_raw, labels_q, labels_r, exclude_col)
    ctx.args = (c_neg, c_ap, backend, symmetric)


def _differentiable_sums(q_hat, r_hat, r_raw, labels_q, labels_r, exclude_col, c_neg, c_ap, backend, symmetric):
    """angular_rows' sums through the engine's differentiable call, chunk by chunk (create_graph)."""
    from ..ops.stats import pair_stats
    rows, cols = _op_pairs(labels_q, labels_r, exclude_col, symmetric)
    sums = torch.zeros(q_hat.shape[0], dtype=stat_dtype(q_hat.dtype), device=q_hat.device)
    for k0, k1 in _pair_chunks(rows.shape[0]):
        ri, ci = rows[k0:k1], cols[k0:k1]
        qa, rp = rows_of(q_hat, ri), rows_of(r_hat, ci)
        st = pair_stats(qa + rp, r_raw, labels_q[ri], labels_r, torch.full_like(ri, -1), declaration(c_neg), backend)
        z = st.lse_neg - c_ap * (qa * rp).sum(1).to(st.lse_neg.dtype)
        sums = _add_to_rows(sums, ri, ci, logaddexp(torch.zeros_like(z), z), symmetric)
    return sums


def _backward(ctx, grad):
    saved = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: a differentiable recomputation (second order)
        needs = ctx.needs_input_grad[:3]
        inputs = recomputation_inputs(saved[:3], needs)  # r_hat may be q_hat itself
        sums = _differentiable_sums(*inputs, *saved[3:], *ctx.args)
        gq, grh, grr = recomputed_grads(sums, inputs, needs, grad.to(sums.dtype))
    else:
        gq, grh, grr = angular_rows_backward(grad.contiguous(), *saved, *ctx.args)
    return gq, grh, grr, None, None, None, None, None, None, None


def _not_differentiable(ctx, *grads):
    raise RuntimeError("fused_pairloss: angular_rows_backward (a first-order gradient) is not differentiable")


angular_rows.register_autograd(_backward, setup_context=_setup_context)
angular_rows_backward.register_autograd(_not_differentiable, setup_context=lambda ctx, inputs, output: None)


def _label_counts(labels_q, labels_r, exclude_col):
    """Per row: its number of positives (same label, the excluded column left out) and of negatives,
    from the sorted labels of r (no pair list)."""
    sorted_r = torch.sort(labels_r)[0]
    same = torch.searchsorted(sorted_r, labels_q, right=True) - torch.searchsorted(sorted_r, labels_q)
    valid = exclude_col >= 0
    excluded_same = valid & (labels_r[exclude_col.clamp(min=0)] == labels_q)
    return same - excluded_same.long(), labels_r.shape[0] - same


@loss_function
def angular_fused(embeddings, labels, ref_emb, ref_labels, *, alpha=40.0, distance="lp", backend, exclude_col=None,
                  batch=LOCAL):
    """The op over the label sets; PML's MeanReducer over the positive pairs, 0 without a positive or
    a negative pair."""
    self_mode = ref_emb is None or (ref_emb is embeddings and ref_labels is labels)
    ref, ref_lab = (embeddings, labels) if ref_emb is None else (ref_emb, ref_labels)
    labels_q = torch.as_tensor(labels, device=embeddings.device).long()
    labels_r = labels_q if ref_lab is labels else torch.as_tensor(ref_lab, device=embeddings.device).long()
    given_exclusion = exclude_col
    if exclude_col is None:
        exclude_col = (torch.arange(labels_q.shape[0], device=embeddings.device) if self_mode or ref_lab is labels
                       else torch.full_like(labels_q, -1))
    c_neg, c_ap = _constants(alpha)
    q_hat = normalize(embeddings)
    r_hat = q_hat if ref_emb is None else normalize(ref)
    # the batch against itself (PML's identity rule, no caller's exclusion): each unordered pair once
    symmetric = ref_emb is None and given_exclusion is None
    sums = angular_rows(q_hat, r_hat, ref, labels_q, labels_r, exclude_col, c_neg, c_ap, backend, symmetric)
    n_pos, n_neg = _label_counts(labels_q, labels_r, exclude_col)
    n_pairs, n_negs = batch.sum(n_pos), batch.sum(n_neg)
    loss = torch.where((n_pairs > 0) & (n_negs > 0), (batch.sum(sums) / n_pairs.clamp(min=1)).to(embeddings.dtype),
                       zero_loss(embeddings))
    return loss + zero_loss(embeddings) + (0 if ref_emb is None else zero_loss(ref_emb))


def angular_listed(embeddings, labels, ref_emb, ref_labels, indices_tuple, *, alpha, backend):
    """A miner's pairs: its positive pairs (a1, p), duplicates counted, in chunks through the
    engine's differentiable call (memory O(#pairs D)); the negatives are still every ref column with
    another label (PML's keep_mask), and a tuple without negative pairs gives PML's zero loss."""
    from ..ops.stats import pair_stats
    ref = embeddings if ref_emb is None else ref_emb
    ref_lab = labels if ref_emb is None else ref_labels
    labels_q = torch.as_tensor(labels, device=embeddings.device).long()
    labels_r = torch.as_tensor(ref_lab, device=embeddings.device).long()
    a1, p, a2, _ = (torch.as_tensor(t, device=embeddings.device).long().reshape(-1)
                    for t in (indices_tuple if len(indices_tuple) == 4 else
                              (indices_tuple[0], indices_tuple[1], indices_tuple[0], indices_tuple[2])))
    if a1.numel() == 0 or a2.numel() == 0:
        return zero_loss(embeddings)
    c_neg, c_ap = _constants(alpha)
    q_hat, r_hat = normalize(embeddings), normalize(ref)
    rows, cols, repeats = a1, p, None
    if not V._compiling():  # a triplet tuple lists each (a, p) once per negative: one walk per distinct pair
        distinct, repeats = torch.unique(a1 * ref.shape[0] + p, return_counts=True)
        rows, cols = distinct // ref.shape[0], distinct % ref.shape[0]
    total = 0
    for k0, k1 in _pair_chunks(rows.shape[0]):
        ri, ci = rows[k0:k1], cols[k0:k1]
        qa, rp = rows_of(q_hat, ri), rows_of(r_hat, ci)
        st = pair_stats(qa + rp, ref, labels_q[ri], labels_r, torch.full_like(ri, -1), declaration(c_neg), backend)
        z = st.lse_neg - c_ap * (qa * rp).sum(1)
        terms = logaddexp(torch.zeros_like(z), z)
        total = total + (terms if repeats is None else terms * repeats[k0:k1].to(terms.dtype)).sum()
    return (total / a1.shape[0]).to(embeddings.dtype)


@loss_function
def angular_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, alpha=40.0, distance="lp", backend="auto"):
    """PML AngularLoss(alpha in degrees); PML's LpDistance() (normalized, p=2, power=1) only."""
    V.check_real("alpha", alpha)
    check_distance(distance, allowed=("lp",), loss="angular_loss")
    return run_pair_loss(angular_reference, angular_fused, embeddings, labels, ref_emb, ref_labels, backend,
                         alpha=alpha, distance=distance)


class AngularLoss(_PairLoss):
    """Drop-in for pytorch_metric_learning.losses.AngularLoss (LpDistance() only, as PML asserts).
    `alpha` is PML's tensor in radians (the constructor takes degrees)."""
    _distance_measures_the_batch = False  # PML's loss does not call its distance on the batch
    _distances = ("lp",)
    _default_distance = "lp"
    _reference = staticmethod(angular_reference)
    # the wrappers call it as PML does (PML's CrossBatchMemory passes pairs: the listed path)
    _fused_in_wrappers = False

    def __init__(self, alpha=40, backend="auto", **kwargs):
        super().__init__()
        V.check_real("alpha", alpha)
        self._alpha_degrees = alpha
        # PML's attribute: torch.tensor(np.radians(alpha)), the tensor PML reads at each call (changed
        # in place, it changes the loss; an nn.Parameter is registered as on PML's module)
        self.alpha = torch.tensor(math.radians(alpha), dtype=torch.float64)
        self._init_pair(backend, kwargs, (alpha,))

    def __setattr__(self, name, value):
        if name == "alpha" and not torch.is_tensor(value):  # a number: PML's tensor of it
            value = torch.tensor(float(value), dtype=torch.float64)
        super().__setattr__(name, value)
        if name == "alpha":
            self._sync_alpha_degrees()

    _handed_to_pml = ("alpha",)  # PML reads the tensor at each call: ours, changed in place or not

    def _sync_alpha_degrees(self):
        """The Python number the fused path (and torch.compile's guards) reads, from the tensor (a
        meta tensor, built under torch.device("meta"), has none: the last one stays)."""
        if not V._compiling() and self.alpha.device.type != "meta":
            self._alpha_degrees = math.degrees(float(self.alpha.detach()))

    def _needs_pml_now(self):
        # a learned alpha (PML's computation gives its gradient), or one of another dtype (PML's tan
        # in that dtype; the fused constants are float64's)
        if self.alpha.requires_grad or self.alpha.dtype != torch.float64:
            return "a learnable or non-float64 alpha"
        return None

    def _hyper(self):
        self._sync_alpha_degrees()  # an in-place change of the tensor
        return dict(alpha=self._alpha_degrees, distance=self._distance_kind)

    def _functional(self):
        return angular_loss

    def _forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        if labels is None:
            raise ValueError("AngularLoss: labels is required (as in PML), also with an indices_tuple")
        return super()._forward(embeddings, labels, indices_tuple, ref_emb, ref_labels)

    def _fused_with_listed_pairs(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        from .._backends import resolve_backend
        backend = resolve_backend(self.backend, embeddings.device)
        if backend == "reference" or not isinstance(indices_tuple, (tuple, list)) or len(indices_tuple) not in (3, 4):
            return None
        V.check_pair_inputs(embeddings, labels, ref_emb, ref_labels)
        check_listed_rows(embeddings, ref_emb)
        return angular_listed(embeddings, labels, ref_emb, ref_labels, indices_tuple, alpha=self._alpha_degrees,
                              backend=backend)


ENTRIES = (
    LossEntry(AngularLoss, "pair", functional=angular_loss, reference=angular_reference, fused=angular_fused,
              hyper=("alpha",)),
)
