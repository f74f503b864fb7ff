"""The shared test kit: one loss table, one input builder, one tolerance rule, for every backend's
tests (cpu, triton, cuda) at op level and at loss level.

Exactness (docs/design.md "Testing near thresholds"): mining and relu kinks make a pair on the
boundary flip under a different summation order. Exact comparisons are made only on dyadic inputs
(entries k/4, |k| <= 2, a few dims), whose dot products are exact in fp32 and fp64, so S is the same
number in every implementation and every tie is decided the same way: counts and mining
thresholds are then compared bitwise. Everywhere else the rule is `check_close`:
|truth - backend| <= SLACK |truth - same-dtype reference| + floor(dtype) (1 + |truth|), with truth
the fp64 reference on the same inputs.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from fused_pairloss.losses import (REGISTRY, LossEntry, circle, clip, contrastive, fast_ap, histogram,
                                   lifted_structure, margin, margin_softmax, multi_similarity, ntxent, proxy_anchor,
                                   proxy_circle, ranked_list, siglip, soft_triple, supcon, tuplet_margin)
from fused_pairloss.ops import oracle
from fused_pairloss.ops.spec import PAIR_VALUES, ClassLossSpec, PairHistogram, PairLossSpec, PairTerm

INF = float("inf")

# ---- tolerance rule ------------------------------------------------------------------------------
SLACK = 2.0
# floor of the rule, in units of the dtype's epsilon times (1 + |truth|): sums over a few hundred
# terms in a different order may differ by that much even where the same-dtype reference is lucky
FLOOR_EPS = {torch.float64: 4096, torch.float32: 64, torch.float16: 16, torch.bfloat16: 16}


def stat_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def floor(dtype):
    return FLOOR_EPS[dtype] * torch.finfo(dtype).eps


def check_close(got, truth, same_dtype=None, what="", dtype=None):
    """The kit's tolerance rule (module docstring). `dtype` (default got's) sets the floor; without
    a same-dtype reference only the floor applies. Infinite entries must match exactly; NaN where
    truth is NaN."""
    dtype = dtype or got.dtype
    g, t = got.double(), truth.double()
    assert g.shape == t.shape, (what, g.shape, t.shape)
    inf = torch.isinf(t)
    assert torch.equal(torch.isinf(g), inf) and torch.equal(g[inf], t[inf]), f"{what}: infinities differ"
    nan = torch.isnan(t)
    assert torch.equal(torch.isnan(g), nan), f"{what}: NaNs differ"
    ok = ~(inf | nan)
    if not ok.any():
        return
    scale = 1.0 + t[ok].abs().max().item()
    err = (g - t)[ok].abs().max().item()
    bound = floor(dtype) * scale
    if same_dtype is not None:
        bound += SLACK * (same_dtype.double() - t)[ok].abs().max().item()
    assert err <= bound, f"{what}: max error {err:.3e} > bound {bound:.3e} (scale {scale:.3e})"


# ---- inputs --------------------------------------------------------------------------------------
def dyadic(n, d, gen, dtype):
    """Entries k/4, |k| <= 2: every dot product is exact in fp32 and fp64 (d <= 64)."""
    return torch.randint(-2, 3, (n, d), generator=gen).to(dtype) / 4


def normalized(n, d, gen, dtype):
    return F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1).to(dtype)


def labels_for(layout, n, gen):
    if layout == "few":
        return torch.randint(0, 3, (n,), generator=gen)
    if layout == "many":
        return torch.randint(0, max(1, n // 2), (n,), generator=gen)
    if layout == "same":
        return torch.full((n,), 7, dtype=torch.long)
    if layout == "distinct":
        return torch.randperm(n, generator=gen) * 3 - 5  # negative ids too
    raise ValueError(layout)


MODES = ("self", "ref", "ref_excl")


@dataclass
class PairCase:
    """Arguments of a pair-engine op call (r None: self mode)."""
    q: torch.Tensor
    r: Optional[torch.Tensor]
    labels_q: torch.Tensor
    labels_r: Optional[torch.Tensor]
    exclude_col: Optional[torch.Tensor]

    def args(self):
        return self.q, self.r, self.labels_q, self.labels_r, self.exclude_col

    def to(self, dtype=None, device=None):
        conv = (lambda t: None if t is None else t.to(device=device, dtype=dtype or t.dtype))
        keep = (lambda t: None if t is None else t.to(device=device))
        return PairCase(conv(self.q), conv(self.r), keep(self.labels_q), keep(self.labels_r), keep(self.exclude_col))


def pair_case(mode, n, d, layout, dtype, data="dyadic", seed=0, m=None):
    """self: r None; ref: a separate r of m rows (default n + 5 or n // 2), no exclusion; ref_excl:
    n rows, labels_r = labels_q and row i's column i excluded (PML's `ref_labels is labels`), with
    a few rows excluding another column or none."""
    g = torch.Generator().manual_seed(seed)
    gen = dyadic if data == "dyadic" else normalized
    q = gen(n, d, g, dtype)
    lq = labels_for(layout, n, g)
    if mode == "self":
        return PairCase(q, None, lq, None, None)
    if mode == "ref_excl":
        excl = torch.arange(n)
        if n > 2:
            excl[0], excl[1] = -1, (2 if n > 2 else 1)
        return PairCase(q, gen(n, d, g, dtype), lq, lq.clone(), excl)
    m = m if m is not None else (n + 5 if n % 2 else max(1, n // 2))
    return PairCase(q, gen(m, d, g, dtype), lq, labels_for(layout, m, g), None)


def ntxent_below_tiny_case(mode, dtype):
    """NTXent at scale 100 (temperature 0.01) on rows whose pair terms have sigmoid(t) below fp32's
    smallest normal (t = x_p - lse_neg in (-104, -87)), so PML's e^t is a subnormal and the term
    -log(e^t + tiny) is not -log(tiny). Three groups in orthogonal planes (no pair across groups
    reaches beyond S = 0): an anchor at angle 0, its positive at cosine about -0.45 and a negative at
    cosine about 0.5. The declaration pins tiny to fp32's in both dtypes, so the fp64 truth is the
    same function. Returns (case, declaration)."""
    rows, labels = [], []
    for g, (cos_pos, cos_neg) in enumerate([(-0.45, 0.5), (-0.40, 0.52), (-0.47, 0.45)]):
        for k, cos in enumerate((1.0, cos_pos, cos_neg)):
            row = torch.zeros(6, dtype=torch.float64)
            row[2 * g], row[2 * g + 1] = cos, math.sqrt(1 - cos * cos)
            rows.append(row)
            labels.append(2 * g + (k == 2))
    q, lq = torch.stack(rows).to(dtype), torch.tensor(labels)
    declaration = PairLossSpec(pos=PairTerm(100.0), neg=PairTerm(100.0, lse=True), pos_vs_neg_lse=True,
                               ntx_tiny=float(torch.finfo(torch.float32).tiny))
    if mode == "self":
        return PairCase(q, None, lq, None, None), declaration
    return PairCase(q[:5], q, lq[:5], lq, torch.arange(5)), declaration


@dataclass
class ClassCase:
    q: torch.Tensor
    w: torch.Tensor
    labels: torch.Tensor
    K: int

    def args(self):
        return self.q, self.w, self.labels, self.K

    def to(self, dtype=None, device=None):
        return ClassCase(self.q.to(device=device, dtype=dtype or self.q.dtype),
                         self.w.to(device=device, dtype=dtype or self.w.dtype), self.labels.to(device=device), self.K)


def class_case(n, d, C, K, dtype, seed=0, data="normalized"):
    g = torch.Generator().manual_seed(seed)
    gen = dyadic if data == "dyadic" else normalized
    q = gen(n, d, g, dtype)
    w = gen(C * K, d, g, dtype)
    y = torch.randint(0, C, (n,), generator=g)
    y[0] = 0  # the first and the last class are present
    y[-1] = C - 1
    return ClassCase(q, w, y, K)


# ---- declarations for op-level tests (parameters chosen so relu kinks sit on dyadic values) -----
PAIR_DECLARATIONS: Dict[str, PairLossSpec] = {
    "ms": multi_similarity.declaration(2.0, 50.0, 0.5),
    "ms_mine": multi_similarity.declaration(2.0, 50.0, 0.5, miner_epsilon=0.125),
    "ms_mine0": multi_similarity.declaration(2.0, 40.0, 0.5, miner_epsilon=0.0),
    "ms_lp_mine": multi_similarity.declaration(2.0, 10.0, 0.5, miner_epsilon=0.125, distance="lp"),
    # a cosine MultiSimilarityMiner beside an lp loss: mining on -d^2 / 2
    "contrastive_lp_mine_cos": dataclasses.replace(contrastive.declaration(0.25, 1.0, distance="lp"),
                                                   miner_epsilon=0.125, miner_on_cosine=True),
    "circle": circle.declaration(0.25, 80.0),
    "ntxent": ntxent.declaration(0.5),
    "ntxent_lp": ntxent.declaration(0.25, distance="lp"),
    "supcon": supcon.declaration(0.5),
    "contrastive_lp": contrastive.declaration(0.25, 1.0, distance="lp"),
    "contrastive_cos": contrastive.declaration(0.75, 0.25, distance="cosine"),
    "lifted_lp": lifted_structure.declaration(1.0, 0.25, distance="lp"),
    # one set reduced (LSE of the negatives), the other only counted: LiftedStructure, TupletMargin
    "lifted_pairs_lp": lifted_structure.lifted_pairs_declaration(1.0, distance="lp"),
    "tuplet": tuplet_margin.declaration(16.0),
    # exp-weighted sums of both sets (RankedListLoss with Tp != 0; kinks at d = 0.25 and d = 1)
    "ranked_list": ranked_list.declaration(0.75, 1.0, 1.0, 2.0),
    # a plain hinge sum beside an exp-weighted one (RankedListLoss's default Tp = 0)
    "ranked_list_tp0": ranked_list.declaration(0.75, 1.0, 0.0, 2.0),
    # PML CrossBatchMemory with a miner: the excluded column is in the thresholds, never kept
    "ms_mine_after_excl": PairLossSpec(pos=multi_similarity.declaration(2.0, 50.0, 0.5).pos,
                                       neg=multi_similarity.declaration(2.0, 50.0, 0.5).neg,
                                       miner_epsilon=0.125, exclude_after_mining=True),
    # PML's PairMarginMiner as keep windows lo < v < hi (bounds on the dyadic grid: the ties are strict)
    "contrastive_cos_windows": dataclasses.replace(contrastive.declaration(0.75, 0.25, distance="cosine"),
                                                   pos_window=(-INF, 0.5), neg_window=(0.0, INF)),
    "ms_lp_windows": dataclasses.replace(multi_similarity.declaration(2.0, 10.0, 0.5, distance="lp"),
                                         pos_window=(0.5, INF), neg_window=(-INF, 1.25)),
    "ntxent_windows": dataclasses.replace(ntxent.declaration(0.5), pos_window=(-INF, 0.75), neg_window=(-0.25, INF)),
    # fp16's tiny (PML's under fp16), large enough to cap the worst positives' terms at this temperature
    "ntxent_tiny": ntxent.declaration(0.125, similarity_dtype=torch.float16),
}

# declarations with histograms (PairLossSpec.histogram), apart from the table above: their value
# rows differ, so each engine's tests check them on their own. FastAP's (h = d^2 on 0..4),
# HistogramLoss's (PML's bins of S on -1..1) and a cosine one beside sums, whose nodes (-1 + k / 8)
# sit on dyadic values
HIST_DECLARATIONS: Dict[str, PairLossSpec] = {
    "fastap": fast_ap.declaration(10),
    "histogram": histogram.declaration(2 / 16),
    "cosine_with_sums": dataclasses.replace(contrastive.declaration(0.75, 0.25, distance="cosine"),
                                            histogram=PairHistogram(17, 8.0, -1.0)),
}


def pair_declarations_and_modes():
    """(declaration, mode) pairs that mean something: exclude-after-mining is about the excluded
    column of a separate ref."""
    return [(name, mode) for name, spec in PAIR_DECLARATIONS.items() for mode in MODES
            if mode == "ref_excl" or not spec.exclude_after_mining]


def plain_rows(spec: ClassLossSpec) -> ClassLossSpec:
    """The declaration on weights given as plain (normalized) rows (C*K, D): what every engine takes."""
    return dataclasses.replace(spec, normalize_weights=False, weights_layout="rows")


# the losses' own declarations: their weights as PML stores them, normalized by the engine
LOSS_CLASS_DECLARATIONS = {
    # name: (declaration, K)
    "softtriple": (soft_triple.declaration(5, 20.0, 0.1), 5),
    "softtriple_k1": (soft_triple.declaration(1, 20.0, 0.1), 1),
    "proxycircle": (proxy_circle.declaration(0.25, 256.0), 1),
    "proxyanchor": (proxy_anchor.declaration(0.1, 32.0), 1),
    "cosface": (margin_softmax.declaration(64.0), 1),
    "subcenter_arcface": (margin_softmax.declaration(64.0, sub_centers=3), 3),
    "clip": (clip.declaration(), 1),
    "siglip": (siglip.declaration(), 1),
}
CLASS_DECLARATIONS = {name: (plain_rows(spec), K) for name, (spec, K) in LOSS_CLASS_DECLARATIONS.items()}


def as_loss_weights(case: ClassCase, spec: ClassLossSpec, seed=0) -> ClassCase:
    """case's (normalized) weight rows as a loss stores them under `spec`: scaled by random
    factors in [0.5, 4) (the engine normalizes them back), transposed for the "columns" layout."""
    w = case.w
    if spec.normalize_weights:
        g = torch.Generator().manual_seed(seed)
        w = w * (0.5 + 3.5 * torch.rand(w.shape[0], 1, generator=g, dtype=torch.float64)).to(w.dtype)
    if spec.weights_layout == "columns":
        w = w.t().contiguous()
    return ClassCase(case.q, w, case.labels, case.K)


def pair_truth(case: PairCase, spec: PairLossSpec, grad_values=None, need_grad_r=True):
    """(forward, backward) of the pair op by the oracle, in fp64 on the same inputs."""
    c = case.to(torch.float64)
    terms, flags = spec.pack()
    fwd = oracle.pair_engine_forward_oracle(*c.args(), terms, flags)
    if grad_values is None:
        return fwd, None
    bwd = oracle.pair_engine_backward_oracle(grad_values.double(), *c.args(), fwd[0], fwd[2], terms, flags,
                                             need_grad_r)
    return fwd, bwd


# ---- per-row shifts (the pair ops' row_shift: MarginLoss's per-class beta) ------------------------
# declarations the row shift is checked with: hinge sums in both distances (MarginLoss's own), the
# mining walk (thresholds, deferred positives) and NTXent's deferred positives against lse_neg
ROW_SHIFT_DECLARATIONS = {
    "margin_lp": margin.declaration(0.25, 0.0, "lp"),
    "margin_cos": margin.declaration(0.25, 0.0, "cosine"),
    "ms_mine": PAIR_DECLARATIONS["ms_mine"],
    "ntxent": PAIR_DECLARATIONS["ntxent"],
}


def row_shifts(n, seed=0):
    """(n,) fp64 shifts k/8, |k| <= 8 (dyadic: added to a dyadic shift exactly)."""
    g = torch.Generator().manual_seed(seed + 7)
    return torch.randint(-8, 9, (n,), generator=g).double() / 8


def check_row_shift(forward, backward, case: PairCase, spec: PairLossSpec, device=None, seed=0):
    """One op call with a row shift against the oracle with the same shifts (fp64 truth, same-dtype
    reference): forward(q, r, labels_q, labels_r, exclude_col, terms, flags, row_shift) and
    backward(grad_values, q, ..., need_grad_r, row_shift) are the op pair of a backend; device: where
    its tensors go (None: the CPU)."""
    dtype = case.q.dtype
    A = stat_dtype(dtype)
    terms, flags = spec.pack()
    rs = row_shifts(case.q.shape[0], seed)
    on = (lambda t: t) if device is None else (lambda t: None if t is None else t.to(device))
    dcase = case.to(device=device) if device else case
    out = [t.cpu() for t in forward(*dcase.args(), list(terms), flags, on(rs.to(A)))]
    same = oracle.pair_engine_forward_oracle(*case.args(), terms, flags, rs.to(A))
    c64 = case.to(torch.float64)
    truth = oracle.pair_engine_forward_oracle(*c64.args(), terms, flags, rs)
    assert torch.equal(out[1], same[1]), "set sizes and nonzero counts (dyadic inputs: exact)"
    rows = len(PAIR_VALUES)
    for k in range(rows):
        check_close(out[0][k], truth[0][k], same[0][k], what=PAIR_VALUES[k], dtype=A)
    gv = torch.randn(rows, case.q.shape[0], generator=torch.Generator().manual_seed(seed + 1),
                     dtype=torch.float64).to(A)
    grads = [t.cpu() for t in backward(on(gv), *dcase.args(), on(out[0]), on(out[2]), list(terms), flags, True,
                                       on(rs.to(A)))]
    truth_g = oracle.pair_engine_backward_oracle(gv.double(), *c64.args(), truth[0], truth[2], terms, flags, True, rs)
    same_g = oracle.pair_engine_backward_oracle(gv, *case.args(), same[0], same[2], terms, flags, True, rs.to(A))
    check_close(grads[0], truth_g[0], same_g[0], what="grad_q", dtype=dtype)
    if case.r is not None:
        check_close(grads[1], truth_g[1], same_g[1], what="grad_r", dtype=dtype)
    # the shift moves the terms: without it the values differ (the test would pass vacuously otherwise)
    plain = forward(*dcase.args(), list(terms), flags)
    assert not torch.equal(plain[0].cpu()[:4], out[0][:4]), "row_shift changed nothing"


# ---- losses for loss-level tests ------------------------------------------------------------------
@dataclass
class Loss:
    """A loss of the table (`loss`: its class name in fused_pairloss.losses.REGISTRY, which says its
    kind, functional form and weight layout) with the hyper-parameters to test it with. `hyper`,
    `ordered`, `pml` and `kinks` drive the property tests (tests/test_properties.py): a new loss
    joins them by filling these in."""
    name: str
    loss: str
    kwargs: dict = field(default_factory=dict)
    # hyper-parameter -> (low, high): the range the property tests draw it from (what the library
    # and PML accept and what stays finite in fp32); drawn values replace `kwargs`' entries
    hyper: Dict[str, Tuple[float, float]] = field(default_factory=dict)
    # hyper-parameters drawn in ascending order (margins the library requires ordered)
    ordered: Tuple[str, ...] = ()
    # hyper-parameters -> PML's callable with the fn's positional arguments; None: no PML counterpart
    pml: Optional[Callable] = None
    # (hyper-parameters, Geometry) -> fp64 arguments of every relu / mining comparison (kink at 0)
    kinks: Optional[Callable] = None

    @property
    def entry(self) -> LossEntry:
        return REGISTRY[self.loss]

    @property
    def kind(self) -> str:
        return self.entry.kind

    @property
    def balanced_labels(self) -> bool:
        """Every label the same number of times (PML's SmoothAPLoss refuses other batches)."""
        return self.entry.equal_label_counts

    @property
    def fn(self) -> Callable:
        return self.entry.functional

    @property
    def centers_per_class(self) -> int:
        return self.kwargs.get(self.entry.centers_name or "centers_per_class", 1)

    def weights(self, C, D, g, dtype):
        """Class losses: a random parameter in the loss's layout (PML's)."""
        rows = C * self.centers_per_class
        shape = (D, rows) if self.entry.weight_layout == "columns" else (rows, D)
        w = torch.randn(*shape, generator=g, dtype=torch.float64)
        if self.entry.unit_weights:  # PML's renorm (P2SGrad's) twice: a third moves a norm by ~1e-14
            for _ in range(2):
                w = w.renorm(2, 1 if self.entry.weight_layout == "columns" else 0, 1e-5).mul(1e5)
        return w.to(dtype)


    @property
    def modes(self) -> Tuple[str, ...]:
        """The pair modes of `loss_case` the loss takes (PML's NPairsLoss / InstanceLoss: no ref_emb)."""
        return MODES if self.entry.ref_emb else ("self",)

    @property
    def distance(self):
        return self.kwargs.get("distance", self.keyword_defaults.get("distance"))

    @property
    def keyword_defaults(self):
        """The functional form's keyword arguments and their defaults (through its decorator)."""
        return {k: p.default for k, p in inspect.signature(self.fn).parameters.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY}


# ---- what the property tests need per loss: PML's counterpart and the kinks ------------------------
@dataclass
class Geometry:
    """fp64 quantities the kinks are stated in. Pair losses: `mat` (S for cosine, d for lp) and the
    positive / negative masks (self pairs excluded). Class losses: `s` = q . w_ck (N, C*K, centers
    of a class adjacent), `labels`, K and the Gram matrix `ww` of the normalized centers."""
    mat: Optional[torch.Tensor] = None
    pos: Optional[torch.Tensor] = None
    neg: Optional[torch.Tensor] = None
    s: Optional[torch.Tensor] = None
    labels: Optional[torch.Tensor] = None
    K: int = 1
    ww: Optional[torch.Tensor] = None


def _pml_margin(x, y, distance):
    """PML's distance.margin(x, y): y - x for a similarity, x - y for a distance."""
    return y - x if distance == "cosine" else x - y


def _masked_lse0(x, mask):
    """Row LSE over mask; a row with an empty mask gives 0 (PML's masked LSE)."""
    lse = x.masked_fill(~mask, -math.inf).logsumexp(1)
    return torch.where(mask.any(1), lse, torch.zeros_like(lse))


def _ms_miner_kinks(distance):
    """MultiSimilarityMiner(e): positives kept iff u - e < max_neg_i, negatives iff u + e > min_pos_i,
    u = S (cosine) or -d (lp)."""
    def kinks(kw, g):
        u = g.mat if distance == "cosine" else -g.mat
        e = kw["miner_epsilon"]
        max_neg = u.masked_fill(~g.neg, -math.inf).amax(1, keepdim=True)
        min_pos = u.masked_fill(~g.pos, math.inf).amin(1, keepdim=True)
        pos = g.pos & g.neg.any(1, keepdim=True)
        neg = g.neg & g.pos.any(1, keepdim=True)
        return torch.cat([(u - e - max_neg)[pos], (u + e - min_pos)[neg]])
    return kinks


def _contrastive_kinks(distance):
    def kinks(kw, g):
        return torch.cat([_pml_margin(g.mat, kw["pos_margin"], distance)[g.pos],
                          _pml_margin(kw["neg_margin"], g.mat, distance)[g.neg]])
    return kinks


def _lifted_kinks(distance):
    def kinks(kw, g):
        arg = (_masked_lse0(_pml_margin(g.mat, kw["pos_margin"], distance), g.pos)
               + _masked_lse0(_pml_margin(kw["neg_margin"], g.mat, distance), g.neg))
        return arg[g.pos.any(1) | g.neg.any(1)]  # a row without pairs is an exact 0 everywhere
    return kinks


def _lifted_pairs_kinks(distance):
    """LiftedStructureLoss: relu(logaddexp(L_a, L_p) + margin(u_ap, pos_margin)) per positive pair,
    L_x the LSE of margin(neg_margin, u) over row x's negatives (-inf: none; column p > N or p == a:
    none), an empty union giving 0."""
    def kinks(kw, g):
        L = _masked_lse0(_pml_margin(kw["neg_margin"], g.mat, distance), g.neg)
        L = torch.where(g.neg.any(1), L, torch.full_like(L, -math.inf))
        n, m = g.mat.shape
        col = torch.cat([L, L.new_full((max(m - n, 0),), -math.inf)])[:m]
        col = torch.where(torch.arange(m)[None, :] == torch.arange(n)[:, None], -math.inf, col[None, :])
        union = torch.logaddexp(L[:, None].expand(n, m), col)
        union = torch.where(torch.isneginf(union), torch.zeros_like(union), union)
        return (union + _pml_margin(g.mat, kw["pos_margin"], distance))[g.pos]
    return kinks


def _tuplet_kinks(kw, g):
    """acos(S_ap) of a positive pair has an infinite derivative at |S_ap| = 1 (in PML too): such a
    pair is thrown out, an exact 1 of grid inputs included (returned as an argument just above 0)."""
    t = (1 - g.mat.abs())[g.pos]
    return torch.where(t == 0, torch.full_like(t, 1e-30), t)


def _tcm_kinks(kw, g):
    """relu(m+ - S) over the positives, relu(S - m-) over the negatives. A pair exactly on its margin
    is thrown out (returned just above 0), grid inputs included: PML counts it in its mean's
    denominator, the fused count of terms > 0 does not (docs/semantics.md)."""
    t = torch.cat([(g.mat - kw["margin_plus"])[g.pos], (g.mat - kw["margin_minus"])[g.neg]])
    return torch.where(t == 0, torch.full_like(t, 1e-30), t)


def _snr_kinks(kw, g):
    """relu(d - pos_margin), relu(neg_margin - d) on PML's SNR d (g.mat). An exact 0 of grid inputs is
    thrown out too (returned just above 0): the fused d, a dot product of augmented rows, cancels to
    within rounding of it (docs/semantics.md)."""
    t = torch.cat([(g.mat - kw["pos_margin"])[g.pos], (kw["neg_margin"] - g.mat)[g.neg]])
    # a row of equal entries (grid inputs) has no variance: d is not finite, in PML too
    t = torch.cat([t, torch.where(torch.isfinite(g.mat).all(), 1.0, 0.0).reshape(1).to(t)])
    return torch.where(t == 0, torch.full_like(t, 1e-30), t)


def _margin_kinks(distance):
    """MarginLoss: relu(margin(u_ap, beta) + m) per positive pair, relu(margin(beta, u_an) + m) per
    negative pair (each is in the triplets of its row when the row has the other kind)."""
    def kinks(kw, g):
        return torch.cat([_pml_margin(g.mat, kw["beta"], distance)[g.pos] + kw["margin"],
                          _pml_margin(kw["beta"], g.mat, distance)[g.neg] + kw["margin"]])
    return kinks


def _nca_kinks(kw, g):
    """PML's NCALoss of a batch without any positive pair is NaN (the mean over no row): such a draw
    is thrown out (returned as an argument just above 0); softmax losses have no kink otherwise."""
    return g.mat.new_full((1,), 0.0 if bool(g.pos.any()) else 1e-30)


def _supcon_kinks(distance):
    """AvgNonZero keeps the rows with L_i > 0: a row whose positive dominates has L_i within
    rounding of 0, and whether it is counted depends on how L_i is rounded (PML's max-shifted form
    and ours round at other points)."""
    def kinks(kw, g):
        z = (g.mat if distance == "cosine" else -g.mat) / kw["temperature"]
        rows = g.pos.any(1)
        lse = z.masked_fill(~(g.pos | g.neg), -math.inf).logsumexp(1)
        n_pos = g.pos.sum(1)
        loss = (n_pos * lse - z.masked_fill(~g.pos, 0).sum(1)) / n_pos.clamp(min=1)
        return loss[rows]
    return kinks


def _triplet_kinks(distance):
    """relu(margin(d_ap, d_an) + margin) of every triplet (a, p, n) of every anchor."""
    def kinks(kw, g):
        viol = _pml_margin(g.mat[:, :, None], g.mat[:, None, :], distance) + kw["margin"]
        return viol[g.pos[:, :, None] & g.neg[:, None, :]]
    return kinks


def _target_cos(g):
    return g.s[torch.arange(g.s.shape[0]), g.labels]


def _arcface_kinks(kw, g):
    """The branch theta <= pi - m (s_target >= -cos m) and the clamp of acos at |s_target| = 1."""
    s = _target_cos(g)
    return torch.cat([s + math.cos(math.radians(kw["margin"])), 1 - s.abs()])


def _subcenter_arcface_kinks(kw, g):
    """ArcFace's kinks on the pooled target cosine, and every class's two best sub-centers tied
    (the max switches centers)."""
    s3 = g.s.view(g.s.shape[0], -1, g.K)
    top2 = s3.topk(2, dim=2).values
    target = s3.max(dim=2).values[torch.arange(s3.shape[0]), g.labels]
    return torch.cat([target + math.cos(math.radians(kw["margin"])), 1 - target.abs(),
                      (top2[..., 0] - top2[..., 1]).flatten()])


def _ipv_kinks(distance):
    """IntraPairVariance: each pair's hinge against its set's threshold (a factor of the set's mean)."""
    def kinks(kw, g):
        f_pos, f_neg = (1 - kw["pos_eps"], 1 + kw["neg_eps"]) if distance == "cosine" else \
            (1 + kw["pos_eps"], 1 - kw["neg_eps"])
        out = []
        for mask, f in ((g.pos, f_pos), (g.neg, f_neg)):
            if mask.any():
                out.append(f * g.mat[mask].mean() - g.mat[mask])
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)
    return kinks


def _histogram_kinks(kw, g):
    """HistogramLoss: every pair's similarity against the bin edges -1 + k delta (the density is
    piecewise linear in S). A pair whose bin's upper node is past the last (S = 1, or the top of a
    partial last bin) makes PML's scatter go out of range (it raises): a tiny positive argument
    rejects such a draw."""
    delta = kw.get("delta") or 2 / kw.get("n_bins", 100)
    u = (g.mat[g.pos | g.neg] + 1) / delta
    beyond = torch.floor(u) + 1 >= round(1 + 2 / delta)
    return torch.where(beyond, torch.full_like(u, 1e-300), (u - torch.round(u)) * delta)


def _fast_ap_kinks(kw, g):
    """FastAP: every pair's squared distance against the histogram's nodes k 4 / int(num_bins)."""
    delta = 4.0 / int(kw.get("num_bins", 10))
    u = g.mat[g.pos | g.neg] ** 2 / delta
    return (u - torch.round(u)) * delta


def _pnp_kinks(kw, g):
    """PNPLoss: PML's clamp of the sigmoid's exponent at |S_aj - S_ap| = 50 anneal, for every anchor
    a, p among its positives and itself, j among its negatives."""
    positives = g.pos | torch.eye(*g.pos.shape, dtype=torch.bool)
    z = g.mat.unsqueeze(1) - g.mat.unsqueeze(2)  # [a, p, j] = S_aj - S_ap
    keep = positives.unsqueeze(2) & g.neg.unsqueeze(1)
    return z[keep].abs() - 50 * kw.get("anneal", 0.01)


def _dsm_kinks(kw, g):
    """DynamicSoftMargin: every triplet's d_ap - d_an against the bin edges (its CDF weight jumps
    there). A triplet past the histogram's last edge makes PML's scatter go out of range (it
    raises): a tiny positive argument rejects such a draw."""
    min_val, num_bins = kw.get("min_val", -2.0), int(kw.get("num_bins", 10))
    delta = 2 * abs(min_val) / num_bins
    x = (g.mat.unsqueeze(2) - g.mat.unsqueeze(1))[g.pos.unsqueeze(2) & g.neg.unsqueeze(1)]
    u = (x - min_val) / delta
    beyond = (torch.floor(u) + 1 >= num_bins) | (u < 0)
    return torch.where(beyond, torch.full_like(u, 1e-300), (u - torch.round(u)) * delta)


def _rll_kinks(kw, g):
    """RankedList: the positives' d against alpha - margin, the negatives' against alpha and 0."""
    alpha = kw.get("alpha") or 1 + kw["margin"] / 2
    return torch.cat([g.mat[g.pos] - (alpha - kw["margin"]), alpha - g.mat[g.neg], g.mat[g.neg]])


def _acos_clamp_kinks(kw, g):
    """LargeMargin / SphereFace: the clamp of acos at |s_target| = 1 (psi itself is C^1 in theta)."""
    return 1 - _target_cos(g).abs()


def _sparse_centers_kinks(kw, g):
    """SparseCentersRegularizer: sqrt(2 + tiny - min(2 w.w', 2)) per class: kink at w.w' = 1."""
    if not kw.get("center_reg_weight"):
        return torch.zeros(0, dtype=torch.float64)
    C = g.ww.shape[0] // g.K
    same_class = torch.block_diag(*[torch.ones(g.K, g.K, dtype=torch.bool)] * C)
    return (1 - g.ww)[same_class.triu(1)]


def _pml_pair(cls_name, distance=None, **fixed):
    """PML's pair loss as fn(embeddings, labels, ref_emb, ref_labels), with PML's
    MultiSimilarityMiner(miner_epsilon) first when that hyper-parameter is not None."""
    def make(kw):
        from pytorch_metric_learning import distances, losses, miners
        kw = dict(kw)
        kw.pop("distance", None)
        eps = kw.pop("miner_epsilon", None)
        dist = {"cosine": distances.CosineSimilarity, "lp": distances.LpDistance}.get(distance)
        extra = {} if dist is None else dict(distance=dist())
        loss = getattr(losses, cls_name)(**fixed, **extra, **kw)
        miner = None if eps is None else miners.MultiSimilarityMiner(eps, **extra)

        def fn(e, y, r=None, ry=None):
            tuples = None if miner is None else miner(e, y, r, ry)
            return loss(e, y, tuples, r, ry)
        return fn
    return make


def _pml_in_input_dtype(cls_name):
    """PML's pair loss computed with torch's default dtype set to the input's: PML's SmoothAPLoss
    accumulates AP in a torch.zeros buffer of the default dtype (fp32 for an fp64 batch)."""
    def make(kw):
        from pytorch_metric_learning import losses
        loss = getattr(losses, cls_name)(**{k: v for k, v in kw.items() if k != "distance"})

        def fn(e, y, r=None, ry=None):
            default = torch.get_default_dtype()
            torch.set_default_dtype(e.dtype if e.dtype in (torch.float32, torch.float64) else default)
            try:
                return loss(e, y, None, r, ry)
            finally:
                torch.set_default_dtype(default)
        return fn
    return make


def _pml_class(cls_name, attr, distance=None):
    """PML's class loss as fn(embeddings, labels, weights): the module's parameter `attr` is
    replaced by the weights tensor itself, so gradients reach it."""
    def make(kw):
        from pytorch_metric_learning import distances, losses
        from pytorch_metric_learning.regularizers import SparseCentersRegularizer
        kw = dict(kw)
        kw.pop("distance", None)
        if distance == "cosine":
            kw["distance"] = distances.CosineSimilarity()
        reg = kw.pop("center_reg_weight", 0.0)
        K = kw.get("centers_per_class", kw.get("sub_centers", 1))

        def fn(e, y, w):
            C = (w.shape[0] if attr == "proxies" else w.shape[1]) // K
            extra = dict(weight_regularizer=SparseCentersRegularizer(C, K), weight_reg_weight=reg) if reg else {}
            mod = getattr(losses, cls_name)(**REGISTRY[cls_name].size_kwargs(C, e.shape[1]), **kw, **extra)
            delattr(mod, attr)
            setattr(mod, attr, w)
            return mod(e, y)
        return fn
    return make


MS_HYPER = dict(alpha=(0.1, 10.0), beta=(1.0, 100.0), base=(-0.5, 1.0))
ST_HYPER = dict(la=(1.0, 30.0), gamma=(0.02, 1.0), margin=(0.0, 0.5))
LOSSES: Dict[str, Loss] = {l.name: l for l in [
    Loss("ms", "MultiSimilarityLoss", hyper=MS_HYPER, pml=_pml_pair("MultiSimilarityLoss", "cosine")),
    Loss("ms_mined", "MultiSimilarityLoss", dict(miner_epsilon=0.1), hyper=dict(MS_HYPER, miner_epsilon=(0.0, 0.5)),
         pml=_pml_pair("MultiSimilarityLoss", "cosine"), kinks=_ms_miner_kinks("cosine")),
    Loss("ms_lp", "MultiSimilarityLoss", dict(distance="lp", beta=10.0),
         hyper=dict(alpha=(0.1, 10.0), beta=(1.0, 50.0), base=(0.0, 2.0)), pml=_pml_pair("MultiSimilarityLoss", "lp")),
    Loss("circle", "CircleLoss", hyper=dict(m=(-0.2, 0.6), gamma=(1.0, 256.0)), pml=_pml_pair("CircleLoss")),
    Loss("ntxent", "NTXentLoss", hyper=dict(temperature=(0.01, 1.0)), pml=_pml_pair("NTXentLoss", "cosine")),
    Loss("ntxent_lp", "NTXentLoss", dict(distance="lp", temperature=0.2), hyper=dict(temperature=(0.01, 1.0)),
         pml=_pml_pair("NTXentLoss", "lp")),
    Loss("supcon", "SupConLoss", hyper=dict(temperature=(0.01, 1.0)), pml=_pml_pair("SupConLoss", "cosine"),
         kinks=_supcon_kinks("cosine")),
    Loss("contrastive", "ContrastiveLoss", hyper=dict(pos_margin=(0.0, 2.0), neg_margin=(0.0, 2.0)),
         ordered=("pos_margin", "neg_margin"), pml=_pml_pair("ContrastiveLoss", "lp"), kinks=_contrastive_kinks("lp")),
    Loss("contrastive_cos", "ContrastiveLoss", dict(distance="cosine", pos_margin=0.9, neg_margin=0.1),
         hyper=dict(pos_margin=(-1.0, 1.0), neg_margin=(-1.0, 1.0)), ordered=("neg_margin", "pos_margin"),
         pml=_pml_pair("ContrastiveLoss", "cosine"), kinks=_contrastive_kinks("cosine")),
    Loss("lifted", "GeneralizedLiftedStructureLoss", hyper=dict(pos_margin=(0.0, 2.0), neg_margin=(0.0, 2.0)),
         ordered=("pos_margin", "neg_margin"), pml=_pml_pair("GeneralizedLiftedStructureLoss", "lp"),
         kinks=_lifted_kinks("lp")),
    Loss("lifted_pairs", "LiftedStructureLoss", hyper=dict(pos_margin=(0.0, 1.0), neg_margin=(0.0, 2.0)),
         pml=_pml_pair("LiftedStructureLoss", "lp"), kinks=_lifted_pairs_kinks("lp")),
    Loss("lifted_pairs_cos", "LiftedStructureLoss", dict(distance="cosine", pos_margin=0.8, neg_margin=0.2),
         hyper=dict(pos_margin=(-1.0, 1.0), neg_margin=(-1.0, 1.0)), pml=_pml_pair("LiftedStructureLoss", "cosine"),
         kinks=_lifted_pairs_kinks("cosine")),
    Loss("tuplet", "TupletMarginLoss", dict(scale=16.0), hyper=dict(margin=(0.0, 30.0), scale=(1.0, 64.0)),
         pml=_pml_pair("TupletMarginLoss"), kinks=_tuplet_kinks),
    Loss("tcm", "ThresholdConsistentMarginLoss", dict(margin_plus=0.3, margin_minus=0.1),
         hyper=dict(lambda_plus=(0.0, 2.0), lambda_minus=(0.0, 2.0), margin_plus=(-0.5, 1.0), margin_minus=(-0.5, 1.0)),
         pml=_pml_pair("ThresholdConsistentMarginLoss"), kinks=_tcm_kinks),
    Loss("angular", "AngularLoss", dict(alpha=35.0), hyper=dict(alpha=(10.0, 50.0)), pml=_pml_pair("AngularLoss")),
    Loss("snr", "SignalToNoiseRatioContrastiveLoss", dict(pos_margin=0.3, neg_margin=1.5),
         hyper=dict(pos_margin=(0.0, 1.5), neg_margin=(0.5, 3.0)), pml=_pml_pair("SignalToNoiseRatioContrastiveLoss"),
         kinks=_snr_kinks),
    Loss("triplet", "TripletMarginLoss", dict(margin=0.2), hyper=dict(margin=(0.0, 1.0)),
         pml=_pml_pair("TripletMarginLoss", "lp"), kinks=_triplet_kinks("lp")),
    Loss("triplet_cos", "TripletMarginLoss", dict(distance="cosine", margin=0.1), hyper=dict(margin=(0.0, 1.0)),
         pml=_pml_pair("TripletMarginLoss", "cosine"), kinks=_triplet_kinks("cosine")),
    Loss("margin", "MarginLoss", dict(margin=0.2, beta=0.9), hyper=dict(margin=(0.0, 0.5), beta=(0.2, 1.5)),
         pml=_pml_pair("MarginLoss", "lp"), kinks=_margin_kinks("lp")),
    Loss("margin_cos", "MarginLoss", dict(distance="cosine", beta=0.1), hyper=dict(margin=(0.0, 0.5), beta=(-0.5, 0.8)),
         pml=_pml_pair("MarginLoss", "cosine"), kinks=_margin_kinks("cosine")),
    Loss("ipv", "IntraPairVarianceLoss", dict(pos_eps=0.05, neg_eps=0.05), hyper=dict(pos_eps=(0.0, 0.5),
                                                                                   neg_eps=(0.0, 0.5)),
         pml=_pml_pair("IntraPairVarianceLoss", "cosine"), kinks=_ipv_kinks("cosine")),
    Loss("ipv_lp", "IntraPairVarianceLoss", dict(distance="lp", pos_eps=0.05, neg_eps=0.05),
         hyper=dict(pos_eps=(0.0, 0.5), neg_eps=(0.0, 0.5)), pml=_pml_pair("IntraPairVarianceLoss", "lp"),
         kinks=_ipv_kinks("lp")),
    Loss("histogram", "HistogramLoss", dict(n_bins=16), hyper=dict(n_bins=(4.0, 40.0)),
         pml=_pml_pair("HistogramLoss", "cosine"),
         kinks=_histogram_kinks),
    Loss("fastap", "FastAPLoss", dict(num_bins=10), hyper=dict(num_bins=(2.0, 20.0)), pml=_pml_pair("FastAPLoss"),
         kinks=_fast_ap_kinks),
    Loss("smoothap", "SmoothAPLoss", dict(temperature=0.1), hyper=dict(temperature=(0.01, 1.0)),
         pml=_pml_in_input_dtype("SmoothAPLoss")),
    *[Loss(f"pnp_{variant.lower()}", "PNPLoss", dict(anneal=0.05, variant=variant),
           hyper=dict(b=(0.5, 4.0), alpha=(0.5, 2.0), anneal=(0.02, 0.5)), pml=_pml_pair("PNPLoss", "cosine"),
           kinks=_pnp_kinks) for variant in ("O", "Ds", "Dq", "Iu", "Ib")],
    Loss("dsm", "DynamicSoftMarginLoss", dict(num_bins=8), hyper=dict(min_val=(-3.0, -2.0), momentum=(0.0, 1.0)),
         pml=_pml_pair("DynamicSoftMarginLoss", "lp"), kinks=_dsm_kinks),
    Loss("rll", "RankedListLoss", dict(margin=0.4, Tn=2.0, Tp=1.0),
         hyper=dict(margin=(0.1, 1.0), Tn=(0.0, 5.0), imbalance=(0.0, 1.0), Tp=(0.0, 5.0)),
         pml=_pml_pair("RankedListLoss", "lp"), kinks=_rll_kinks),
    Loss("instance", "InstanceLoss", dict(gamma=16.0), hyper=dict(gamma=(1.0, 64.0)), pml=_pml_pair("InstanceLoss")),
    Loss("npairs", "NPairsLoss", pml=_pml_pair("NPairsLoss")),
    Loss("nca", "NCALoss", hyper=dict(softmax_scale=(0.1, 8.0)), pml=_pml_pair("NCALoss"), kinks=_nca_kinks),
    Loss("nca_cos", "NCALoss", dict(distance="cosine"), hyper=dict(softmax_scale=(0.1, 8.0)),
         pml=_pml_pair("NCALoss", "cosine"), kinks=_nca_kinks),
    Loss("softtriple", "SoftTripleLoss", dict(centers_per_class=4), hyper=ST_HYPER,
         pml=_pml_class("SoftTripleLoss", "fc")),
    Loss("softtriple_reg", "SoftTripleLoss", dict(centers_per_class=3, center_reg_weight=0.2),
         hyper=dict(ST_HYPER, center_reg_weight=(0.0, 1.0)), pml=_pml_class("SoftTripleLoss", "fc"),
         kinks=_sparse_centers_kinks),
    Loss("proxycircle", "ProxyCircleLoss", hyper=dict(m=(-0.2, 0.6), gamma=(1.0, 256.0))),
    Loss("proxyanchor", "ProxyAnchorLoss", hyper=dict(margin=(0.0, 0.5), alpha=(1.0, 64.0)),
         pml=_pml_class("ProxyAnchorLoss", "proxies")),
    Loss("normsoftmax", "NormalizedSoftmaxLoss", hyper=dict(temperature=(0.01, 1.0)),
         pml=_pml_class("NormalizedSoftmaxLoss", "W")),
    Loss("cosface", "CosFaceLoss", hyper=dict(margin=(0.0, 0.5), scale=(1.0, 64.0)),
         pml=_pml_class("CosFaceLoss", "W")),
    Loss("arcface", "ArcFaceLoss", hyper=dict(margin=(0.0, 60.0), scale=(1.0, 64.0)),
         pml=_pml_class("ArcFaceLoss", "W"), kinks=_arcface_kinks),
    Loss("subcenter_arcface", "SubCenterArcFaceLoss", dict(sub_centers=3),
         hyper=dict(margin=(0.0, 60.0), scale=(1.0, 64.0)), pml=_pml_class("SubCenterArcFaceLoss", "W"),
         kinks=_subcenter_arcface_kinks),
    Loss("lmsoftmax", "LargeMarginSoftmaxLoss", dict(margin=3, scale=0.5),
         hyper=dict(margin=(1.0, 6.0), scale=(0.1, 2.0)),
         pml=_pml_class("LargeMarginSoftmaxLoss", "W"), kinks=_acos_clamp_kinks),
    Loss("sphereface", "SphereFaceLoss", hyper=dict(margin=(1.0, 6.0), scale=(0.1, 4.0)),
         pml=_pml_class("SphereFaceLoss", "W"), kinks=_acos_clamp_kinks),
    Loss("proxynca", "ProxyNCALoss", dict(softmax_scale=4.0), hyper=dict(softmax_scale=(0.1, 16.0)),
         pml=_pml_class("ProxyNCALoss", "proxies")),
    Loss("proxynca_cos", "ProxyNCALoss", dict(distance="cosine", softmax_scale=8.0),
         hyper=dict(softmax_scale=(0.1, 32.0)), pml=_pml_class("ProxyNCALoss", "proxies", distance="cosine")),
    Loss("p2sgrad", "P2SGradLoss", pml=_pml_class("P2SGradLoss", "weight")),
]}
PAIR_LOSSES = [n for n, l in LOSSES.items() if l.kind == "pair"]
CLASS_LOSSES = [n for n, l in LOSSES.items() if l.kind == "class"]


@dataclass
class LossCase:
    """Inputs of a functional loss call; `params` are the tensors gradients are checked for."""
    args: tuple
    params: tuple


def balanced_labels(n):
    """n labels, each the same number of times (4, 3, 2 or 1), class by class."""
    per_class = next(k for k in (4, 3, 2, 1) if n % k == 0)
    return torch.arange(n // per_class).repeat_interleave(per_class)


def loss_case(loss: Loss, n, d, dtype, mode="self", seed=0, num_classes=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    if loss.kind == "class":
        C = num_classes or max(2, n // 3)
        y = torch.randint(0, C, (n,), generator=g)
        w = loss.weights(C, d, g, dtype).requires_grad_(True)
        return LossCase((x, y, w), (x, w))
    y = balanced_labels(n) if loss.balanced_labels else torch.randint(0, max(2, n // 4), (n,), generator=g)
    if mode == "self":
        return LossCase((x, y), (x,))
    if mode == "ref_excl":  # PML's `ref_labels is labels`
        r = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
        return LossCase((x, y, r, y), (x, r))
    m = n + 3
    r = torch.randn(m, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    ry = torch.randint(0, max(2, n // 4), (m,), generator=g)
    return LossCase((x, y, r, ry), (x, r))


def run_loss(loss: Loss, case: LossCase, backend):
    """(value, grads of case.params) of one functional call."""
    out = loss.fn(*case.args, backend=backend, **loss.kwargs)
    grads = torch.autograd.grad(out, case.params, allow_unused=True)
    return out, [torch.zeros_like(p) if gr is None else gr for p, gr in zip(case.params, grads)]


def cast_case(case: LossCase, dtype):
    """The same inputs in another dtype (labels unchanged), as fresh leaves."""
    conv = {id(p): p.detach().to(dtype).requires_grad_(True) for p in case.params}
    args = tuple(conv.get(id(a), a) for a in case.args)
    return LossCase(args, tuple(conv[id(p)] for p in case.params))


def check_loss_parity(loss: Loss, case: LossCase, backend, what=""):
    """The backend's value and gradients against the fp64 reference (truth) and the reference in
    the case's dtype, with the kit's rule."""
    dtype = case.params[0].dtype
    val, grads = run_loss(loss, case, backend)
    ref_val, ref_grads = run_loss(loss, case, "reference")
    truth_val, truth_grads = run_loss(loss, cast_case(case, torch.float64), "reference")
    assert val.dtype == dtype and val.dim() == 0
    check_close(val, truth_val, ref_val, what=f"{what} value", dtype=dtype)
    for k, (a, b, t) in enumerate(zip(grads, ref_grads, truth_grads)):
        check_close(a, t, b, what=f"{what} grad {k}", dtype=dtype)


def isnan_scalar(x):
    return bool(torch.isnan(x).item()) if torch.is_tensor(x) else math.isnan(x)
