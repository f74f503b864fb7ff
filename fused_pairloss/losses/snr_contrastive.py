"""Signal-to-noise-ratio contrastive loss (Yuan et al., "Signal-To-Noise Ratio: A Robust Distance
Metric for Deep Metric Learning", CVPR 2019; PML SignalToNoiseRatioContrastiveLoss).

PML's ContrastiveLoss with its SNRDistance: on the normalized rows x (PML's normalize_embeddings),
d_ij = var(x_i - r_j) / var(x_i); positive l_ij = relu(d_ij - pos_margin), negative
l_ij = relu(neg_margin - d_ij); AvgNonZeroReducer per sub-loss (as ContrastiveLoss).

The SNR as a dot product: with centered rows c_i = x_i - mean(x_i) and n_i = |c_i|^2 (the (D - 1)
of the variances cancels), d_ij = (n_i + n_j - 2 c_i . c_j) / n_i = 1 + u_i . v_j for the rows
u_i = [-2 c_i / n_i, 1 / n_i] and v_j = [c_j, n_j]. The rows c_j sum to 0, so c_i . c_j = sum_{k <
D-1} (c_ik - c_i,D-1) c_jk: the last coordinate drops out, and u, v have D entries, as the rows (an
operand one entry wider would be padded to the next 16). So the pair engine runs Contrastive's
declaration, its shifts less the 1, on u . v (the "cosine" kind: a plain dot product), in ref mode
even for the batch itself (d is not symmetric), and autograd takes the gradient back through u and
v (and through the centering, which makes the dropped coordinate's share exact).
The dot product cancels near d = 0 (about the dtype's epsilon, absolute), where PML's difference of
rows does not: docs/semantics.md. With pos_margin = 0, PML counts the positives with d > 0, which
are all but a row's exact copies (d exactly 0 in PML): that count (`exact_copy_counts`, from
hashes of the rows' bits) replaces the engine's, whose d at a copy is rounding noise.
A constant query row (all-zero, or all its entries equal: n_i is 0 or the rounding of its mean) has
PML's d_ij = var(x_i - r_j) / var(x_i) = inf (NaN against a constant column: 0 / 0, which PML's
reducer drops), which 1 / n_i does not reproduce (its terms come out NaN, which the engine's hinge
drops, or rounding noise): such a call is PML's steps (the reference) over the same pairs, PML's
gradient included. Not while torch.compile traces (no sync to look) nor inside the distributed
wrapper (its ranks reduce together): there such a row gives the dot product's terms, dropped or of
the size 1 / eps^2, not PML's inf (docs/semantics.md).
"""
from __future__ import annotations

import functools

import torch

from .. import _validation as V
from ..ops._common import LOCAL, loss_function, normalize, zero_loss
from ..ops.listed import ListedPairs
from ..ops.spec import PairLossSpec, PairTerm
from ..ops.stats import pair_stats
from ._base import _PairLoss, computes_as_its_class, run_pair_loss
from ._reference_common import (avg_non_zero, fp16_rows_normalized_to_nan, nan_in_nan_out, pair_count_matrices,
                                pml_pairs_of_call, too_few_pairs)
from ._registry import LossEntry
from .contrastive import combine

DISTANCES = ("snr",)


def _check_distance(distance):
    if distance not in DISTANCES:
        raise ValueError(f"distance must be 'snr' (PML's SNRDistance(), which this loss asserts); got {distance!r}")


def snr_matrix(embeddings, ref):
    """PML SNRDistance()(embeddings, ref) (snr_distance.py): var of the row differences over the
    anchor's variance, on the normalized rows."""
    q, r = normalize(embeddings), normalize(ref)
    return torch.var(q[:, None, :] - r[None, :, :], dim=2) / torch.var(q, dim=1)[:, None]


def snr_contrastive_reference(embeddings, labels, ref_emb=None, ref_labels=None, *, pos_margin=0.0,
                              neg_margin=1.0, distance="snr", indices_tuple=None):
    """PML SignalToNoiseRatioContrastiveLoss(pos_margin, neg_margin) step by step: the SNR matrix,
    the pair lists' counts (PML's identity rule; an indices_tuple's pairs with their multiplicity),
    relu(d - pos_margin) and relu(neg_margin - d), AvgNonZero of each, PML's one-pair rule."""
    _check_distance(distance)
    mat = snr_matrix(embeddings, embeddings if ref_emb is None else ref_emb)
    pos, neg = pair_count_matrices(labels, ref_emb, ref_labels, indices_tuple, mat.shape, mat.device)
    loss = (avg_non_zero(torch.relu(mat - pos_margin), embeddings, pos)
            + avg_non_zero(torch.relu(neg_margin - mat), embeddings, neg))
    too_few = too_few_pairs(pos.sum(), neg.sum(), mat.device)
    return nan_in_nan_out(torch.where(too_few, zero_loss(embeddings), loss), embeddings, ref_emb)


def snr_operands(embeddings, ref):
    """(u, v) with 1 + u_i . v_j = d_ij (module docstring), D columns each, differentiable; from the
    inputs as given also under autocast (which would mix fp16 and bf16 for a half-precision input
    under the other half type's autocast)."""
    with torch.autocast(embeddings.device.type, enabled=False):
        return _snr_operands(embeddings, ref)


def _snr_operands(embeddings, ref):
    c = normalize(embeddings)
    c = c - c.mean(1, keepdim=True)
    n = (c * c).sum(1, keepdim=True)
    u = torch.cat([-2 * (c[:, :-1] - c[:, -1:]) / n, 1 / n], dim=1)
    cr = normalize(ref)
    cr = cr - cr.mean(1, keepdim=True)
    v = torch.cat([cr[:, :-1], (cr * cr).sum(1, keepdim=True)], dim=1)
    return u, v


def has_constant_row(embeddings):
    """Whether a normalized row of `embeddings` has all its entries equal (module docstring): PML's
    var of it is 0, its centered row here the rounding of its mean. O(N D), one sync."""
    q = normalize(embeddings.detach())
    return bool((q.amax(1) == q.amin(1)).any())


def needs_pml_steps(embeddings, ref_emb):
    """The rows the fused call leaves to PML's steps: a constant query row, an fp16 zero row."""
    return has_constant_row(embeddings) or fp16_rows_normalized_to_nan(embeddings, ref_emb)


def declaration(pos_margin, neg_margin):
    # Contrastive's terms on the distance d = 1 + u . v, read as the dot product u . v it is:
    # relu(d - pos_margin) = relu(u . v - (pos_margin - 1)), relu(neg_margin - d) likewise
    return PairLossSpec(pos=PairTerm(scale=1.0, shift=float(pos_margin) - 1.0, hinge=True, sum=True),
                        neg=PairTerm(scale=-1.0, shift=float(neg_margin) - 1.0, hinge=True, sum=True),
                        distance="cosine")


@loss_function
def snr_contrastive_fused(embeddings, labels, ref_emb, ref_labels, *, pos_margin=0.0, neg_margin=1.0, distance="snr",
                          backend, exclude_col=None, batch=LOCAL):
    if batch is LOCAL and not V._compiling() and needs_pml_steps(embeddings, ref_emb):
        # a constant query row, or an fp16 zero row (NaN terms PML's reducer drops): PML's steps
        # over the same pairs (module docstring)
        return snr_contrastive_reference(embeddings, labels, ref_emb, ref_labels, pos_margin=pos_margin,
                                         neg_margin=neg_margin, distance=distance,
                                         indices_tuple=pml_pairs_of_call(labels, ref_labels, exclude_col, backend))
    self_mode = ref_emb is None or (ref_emb is embeddings and ref_labels is labels)
    ref, ref_lab = (embeddings, labels) if ref_emb is None else (ref_emb, ref_labels)
    labels_q = torch.as_tensor(labels, device=embeddings.device)
    labels_r = labels_q if ref_lab is labels else torch.as_tensor(ref_lab, device=embeddings.device)
    if exclude_col is None and not self_mode and ref_emb is embeddings and pos_margin >= 0:
        # the batch is its own ref under other label objects: PML's d_ii is exactly 0, so a positive
        # there adds relu(0 - pos_margin) = 0 and is not counted; the dot product's d_ii is 0 only to
        # rounding (and would be counted): leave those positives out
        diagonal = torch.arange(labels_q.shape[0], device=embeddings.device)
        exclude_col = torch.where(labels_q == labels_r, diagonal, -1)
    if exclude_col is None:  # PML's identity rule, in ref mode (d is not symmetric)
        exclude_col = (torch.arange(labels_q.shape[0], device=embeddings.device) if self_mode or ref_lab is labels
                       else torch.full((labels_q.shape[0],), -1, dtype=torch.int64, device=embeddings.device))
    u, v = snr_operands(embeddings, ref)
    st = pair_stats(u, v, labels_q, labels_r, exclude_col, declaration(pos_margin, neg_margin), backend)
    if float(pos_margin) == 0.0 and not isinstance(backend, ListedPairs) and not V._compiling():
        # PML counts the positives with d > 0: all but the exact copies of the row (d exactly 0
        # there, the dot product's rounding noise here, counted about half the time)
        copies = exact_copy_counts(embeddings, ref, labels_q, labels_r, exclude_col)
        st = st._replace(nonzero_pos=(st.count_pos - copies).to(st.nonzero_pos.dtype))
    return nan_in_nan_out(combine(st, embeddings, batch=batch), embeddings, ref_emb)


_INT_OF = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
           torch.bfloat16: torch.int16}


@functools.lru_cache(maxsize=16)
def _hash_weights(width, device):
    """Two rows of random odd int64 weights (a fixed seed), made once per width and device."""
    g = torch.Generator().manual_seed(0x5EED)
    return (torch.randint(-2 ** 62, 2 ** 62, (2, width), generator=g, dtype=torch.int64) | 1).to(device)


def _row_keys(x):
    """Two 64-bit hashes of each row's bits (random odd weights, sums wrapping around): a row and
    its bitwise copy share them, other rows with probability about 2^-128. -0.0 reads as 0.0."""
    bits = (x.detach() + 0.0).contiguous().view(_INT_OF[x.dtype]).to(torch.int64)
    return [(bits * w).sum(1) for w in _hash_weights(x.shape[1], x.device)]


def exact_copy_counts(embeddings, ref, labels_q, labels_r, exclude_col):
    """Per query row, its positives (same label, not the excluded column) whose normalized row is a
    bitwise copy of its own: PML's var(x_i - r_j) is exactly 0 there. O((N + M) D), no N x M."""
    q = normalize(embeddings.detach())
    n = q.shape[0]
    hashes_q = _row_keys(q)
    hashes_r = hashes_q if ref is embeddings else _row_keys(normalize(ref.detach()))
    keys = torch.cat([torch.stack([*hashes_q, labels_q.to(torch.int64)], 1),
                      torch.stack([*hashes_r, labels_r.to(device=q.device, dtype=torch.int64)], 1)])
    group = torch.unique(keys, dim=0, return_inverse=True)[1]
    group_q, group_r = group[:n], group[n:]
    copies = torch.bincount(group_r, minlength=int(group.max()) + 1 if group.numel() else 0)[group_q]
    if exclude_col is not None:  # the excluded column is no pair
        excluded = (exclude_col >= 0) & (group_r[exclude_col.clamp(min=0)] == group_q)
        copies = copies - excluded.to(copies.dtype)
    return copies


@loss_function
def signal_to_noise_ratio_contrastive_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, pos_margin=0.0,
                                           neg_margin=1.0, distance="snr", backend="auto"):
    """PML SignalToNoiseRatioContrastiveLoss(pos_margin, neg_margin) with its SNRDistance()."""
    V.check_real("pos_margin", pos_margin)
    V.check_real("neg_margin", neg_margin)
    _check_distance(distance)
    return run_pair_loss(snr_contrastive_reference, snr_contrastive_fused, embeddings, labels, ref_emb, ref_labels,
                         backend, pos_margin=pos_margin, neg_margin=neg_margin, distance=distance)


def _snr_distance_kind(distance):
    """PML's SNRDistance() with its defaults (rows normalized in the L2 norm, power 1) -> "snr"; None
    otherwise."""
    if distance is None or distance == "snr":
        return "snr"
    try:
        from pytorch_metric_learning.distances import SNRDistance
    except ImportError:
        return None
    if (type(distance) is SNRDistance and getattr(distance, "normalize_embeddings", False)
            and getattr(distance, "p", None) == 2 and getattr(distance, "power", None) == 1
            and computes_as_its_class(distance)):
        return "snr"
    return None


class SignalToNoiseRatioContrastiveLoss(_PairLoss):
    """Drop-in for pytorch_metric_learning.losses.SignalToNoiseRatioContrastiveLoss (SNRDistance)."""
    _distances = DISTANCES
    _default_distance = "snr"
    _reference = staticmethod(snr_contrastive_reference)
    _pair_based = True  # ContrastiveLoss reduces the pair lists: a listed pair counts as often as it is listed

    def __init__(self, pos_margin=0, neg_margin=1, backend="auto", **kwargs):
        super().__init__()
        V.check_real("pos_margin", pos_margin)
        V.check_real("neg_margin", neg_margin)
        self.pos_margin, self.neg_margin = pos_margin, neg_margin
        self.backend = backend  # PML's class takes its margins as keyword arguments only
        self._setup_kwargs(kwargs, (), dict(pos_margin=pos_margin, neg_margin=neg_margin))

    @staticmethod
    def _kind_of(distance):
        return _snr_distance_kind(distance)

    def _needs_pml_steps(self, embeddings, ref_emb):
        return needs_pml_steps(embeddings, ref_emb)

    def _hyper(self):
        return dict(pos_margin=self.pos_margin, neg_margin=self.neg_margin, distance=self._distance_kind)

    def _functional(self):
        return signal_to_noise_ratio_contrastive_loss

    def _fused_with_listed_pairs(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        if (self.pos_margin >= 0 and isinstance(indices_tuple, (tuple, list)) and len(indices_tuple) in (3, 4)
                and not V._compiling()):
            indices_tuple = without_copied_positives(indices_tuple, embeddings,
                                                     embeddings if ref_emb is None else ref_emb)
        return super()._fused_with_listed_pairs(embeddings, labels, indices_tuple, ref_emb, ref_labels)


def without_copied_positives(indices_tuple, embeddings, ref):
    """A listed tuple (PML's convert_to_pairs: a triplet's (a, p) and (a, n)) without its positive
    pairs (a, p) whose normalized rows are bitwise copies (a row against itself included): PML's
    d_ap is exactly 0 there, so with pos_margin >= 0 such a pair adds no term and is not counted,
    where the dot product's d_ap is 0 only to rounding. Compared through the rows' hashes: O((N +
    M) D + #pairs). Kept where leaving them out would trigger PML's too-few-pairs rule (every list
    of at most one)."""
    a1, p, a2, n = indices_tuple if len(indices_tuple) == 4 else (indices_tuple[0], indices_tuple[1],
                                                                  indices_tuple[0], indices_tuple[2])
    device = embeddings.device
    a1, p = torch.as_tensor(a1, device=device), torch.as_tensor(p, device=device)
    if (a1.numel() == 0 or a1.shape != p.shape or a1.dim() != 1 or a1.is_floating_point() or p.is_floating_point()
            or bool((a1 < 0).any() | (a1 >= embeddings.shape[0]).any() | (p < 0).any() | (p >= ref.shape[0]).any())):
        return indices_tuple  # nothing to leave out, or what the listed pairs' checks name (or convert)
    q = normalize(embeddings.detach())
    keys_q = torch.stack(_row_keys(q), 1)
    keys_r = keys_q if ref is embeddings else torch.stack(_row_keys(normalize(ref.detach())), 1)
    finite = torch.isfinite(q).all(1)[a1]  # a NaN row's pairs stay: NaN in, NaN out
    copied = (keys_q[a1] == keys_r[p]).all(1) & finite
    if not bool(copied.any()):
        return indices_tuple
    kept = (a1[~copied], p[~copied], a2, n)
    if all(len(x) <= 1 for x in kept) and not all(len(x) <= 1 for x in (a1, p, a2, n)):
        return indices_tuple
    return kept


ENTRIES = (
    LossEntry(SignalToNoiseRatioContrastiveLoss, "pair", functional=signal_to_noise_ratio_contrastive_loss,
              reference=snr_contrastive_reference, fused=snr_contrastive_fused, hyper=("pos_margin", "neg_margin")),
)
