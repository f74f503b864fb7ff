"""Loss declarations: what a fused engine computes for one loss (docs/design.md, "Declarations").

A pair loss is a `PairLossSpec`: one `PairTerm` per pair set (positives, negatives), the distance,
the optional MultiSimilarityMiner rule and NTXent's pair term; a class loss is a `ClassLossSpec`.
Every backend consumes the same declaration: `pack()` turns it into the fused ops' `terms, flags`
arguments, whose layout csrc/common/loss_spec.h reads back (the Triton kernels read the same
fields); `fused_pairloss.ops.oracle` evaluates it with materializing PyTorch for op-level tests.
The layout constants below mirror loss_spec.h; tests/test_ops_registration.py checks that the C++
reading of every packed field (op `describe_pair_spec`) is the one written here.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch

# ---- loss_spec.h PairFlag / ClassFlag --------------------------------------------------------
POS_LSE = 1 << 0
POS_SUM = 1 << 1
POS_HINGE = 1 << 2
NEG_LSE = 1 << 3
NEG_SUM = 1 << 4
NEG_HINGE = 1 << 5
LP_DISTANCE = 1 << 6
MINE = 1 << 7
POS_VS_NEG_LSE = 1 << 8
EXCLUDE_AFTER_MINING = 1 << 9
MINE_ON_COSINE = 1 << 10
HIST_SQUARED = 1 << 11
HIST_PML_BINS = 1 << 12
KEEP_WINDOWS = 1 << 13

ROW_LSE = 1 << 0
COL_POS_LSE = 1 << 1
COL_NEG_LSE = 1 << 2
NORMALIZE_WEIGHTS = 1 << 3
WEIGHTS_COLUMNS = 1 << 4
POOL_MAX = 1 << 5
ROW_SOFTPLUS_SUM = 1 << 6
# how the weights are given rather than what is computed from them: an engine without its own
# support gets them as plain normalized rows from the registrar (ops/engines.py, weight_rows)
WEIGHT_OPERAND_FLAGS = NORMALIZE_WEIGHTS | WEIGHTS_COLUMNS
WEIGHT_LAYOUTS = ("rows", "columns")

# rows of the pair engine's outputs (loss_spec.h PairValueSlot, PairCountSlot, PairAuxSlot); with a
# histogram, values has 2 * nodes more rows (PairLossSpec)
PAIR_VALUES = ("lse_pos", "lse_neg", "sum_pos", "sum_neg", "pos_vs_neg", "weight_pos", "weight_neg")
PAIR_COUNTS = ("count_pos", "count_neg", "nonzero_pos", "nonzero_neg")
PAIR_AUX = ("min_pos", "max_neg", "pos_vs_neg_dlse")
# rows of the class engine's outputs (ClassRowSlot, ClassColSlot)
CLASS_ROWS = ("lse_other", "target_sim")
CLASS_COLS = ("col_lse_pos", "col_lse_neg")
ROW_REDUCTIONS = ("lse", "softplus_sum")

DISTANCES = ("cosine", "lp")
FLOAT_MAX = 3.4028234663852886e38  # the largest float32
FLOAT_TINY = float(torch.finfo(torch.float32).tiny)  # the smallest normal float


def _is_flag(value):
    """A bool, Python's or numpy's (numpy's bool_ is no numbers.Integral)."""
    return isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"))


def _check_number(name, value):
    """A declaration's number is real, not a bool (its range: declare.check_declaration, for a
    user's declaration; our losses' extreme hyper-parameters give PML's inf / NaN)."""
    if _is_flag(value) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {value!r}")


def ntx_tiny_of(packed, accumulation_dtype) -> float:
    """NTXent's tiny from its packed term (loss_spec.h ntx_tiny): the value, or for 0 the smallest
    normal of the dtype the engine accumulates in."""
    return float(packed) or float(torch.finfo(accumulation_dtype).tiny)


@dataclass(frozen=True)
class PairTerm:
    """The function of one pair set and how a row reduces it (loss_spec.h):
    v = S_ij ("cosine") or d_ij ("lp"); x = (scale * w(v)) * (v - shift) with the detached weight
    w(v) = relu(weight_offset + weight_slope * v) (1 by default); x = relu(x) if `hinge` (a NaN x
    taken as 0: a hinge term is reduced as PML's AvgNonZeroReducer, which drops NaN terms).
    Per row: `lse` the log-sum-exp of x over the set, `sum` the sum of x and the count of x > 0;
    the size of the set is always counted.
    `sum_temperature` T != 0 (a hinge term reduced by `sum`): the sum is exp-weighted, over the
    pairs with x > 0 the sum of w x and (slot weight_*) of w, w = exp(T x), differentiated with w
    (RankedListLoss's weighting, docs/design.md "Exp-weighted sums")."""

    scale: float
    shift: float = 0.0
    weight_offset: float = 1.0
    weight_slope: float = 0.0
    hinge: bool = False
    lse: bool = False
    sum: bool = False
    sum_temperature: float = 0.0

    def __post_init__(self):
        for name in ("scale", "shift", "weight_offset", "weight_slope", "sum_temperature"):
            _check_number(f"PairTerm.{name}", getattr(self, name))
        for name in ("hinge", "lse", "sum"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"PairTerm.{name} must be a bool; got {getattr(self, name)!r}")

    def floats(self) -> Tuple[float, float, float, float]:
        return (float(self.scale), float(self.shift), float(self.weight_offset), float(self.weight_slope))

    @property
    def weighted(self) -> bool:
        return self.weight_slope != 0.0 or self.weight_offset != 1.0

    @property
    def exp_weighted(self) -> bool:
        return self.sum_temperature != 0.0


NO_TERM = PairTerm(scale=0.0)


@dataclass(frozen=True)
class PairHistogram:
    """Per row and set, the histogram of h = v (or v^2 with `squared`) on the nodes lo + k / inv_width,
    k = 0 .. nodes - 1, with triangular pulses relu(1 - |h - node_k| inv_width): a pair with
    u = (h - lo) inv_width adds 1 - f to node floor(u) and f = u - floor(u) to the next (nodes out
    of range get nothing). Its gradient is the pulses' slope, 0 on a node (docs/design.md
    "Histograms"). Every engine's; FastAPLoss's histograms of d^2.

    `pml_bins`: PML HistogramLoss's operations instead (loss_spec.h kHistPmlBins): the bin from
    float(h), the node positions float(k) * float(1 / inv_width), every pair in a bin of nodes
    [0, nodes - 1] (the first or the last beyond them), the gradient its bin's slope on a node too."""

    nodes: int
    inv_width: float
    lo: float = 0.0
    squared: bool = False
    pml_bins: bool = False

    def __post_init__(self):
        if _is_flag(self.nodes) or not isinstance(self.nodes, numbers.Integral):
            raise TypeError(f"PairHistogram.nodes must be an int; got {self.nodes!r}")
        object.__setattr__(self, "nodes", int(self.nodes))  # (a numpy integer as the int it holds)
        if not 1 <= self.nodes <= 1 << 20:
            raise ValueError(f"PairHistogram.nodes must be an int in [1, 2^20]; got {self.nodes!r}")
        for name in ("inv_width", "lo"):
            _check_number(f"PairHistogram.{name}", getattr(self, name))
        for name in ("squared", "pml_bins"):
            if not _is_flag(getattr(self, name)):
                raise TypeError(f"PairHistogram.{name} must be a bool; got {getattr(self, name)!r}")
            object.__setattr__(self, name, bool(getattr(self, name)))
        if not 0 < self.inv_width <= FLOAT_MAX:  # the float engine rounds it
            raise ValueError(f"PairHistogram.inv_width must be a number > 0 and at most the largest float; "
                             f"got {self.inv_width!r}")
        if not -FLOAT_MAX <= self.lo <= FLOAT_MAX:
            raise ValueError(f"PairHistogram.lo must be a finite number (as a float); got {self.lo!r}")
        if self.pml_bins and (self.squared or self.nodes < 2):
            raise ValueError("PairHistogram.pml_bins needs nodes >= 2 and squared=False (PML's histogram of v)")


@dataclass(frozen=True)
class PairLossSpec:
    """Declaration of a pair loss for the pair engine (tiles of S = q r^T).

    `miner_epsilon`: PML's MultiSimilarityMiner(epsilon) on u = S (cosine) or u = -d (lp): per row
    min_pos / max_neg over the unmined sets, positives kept if u - eps < max_neg, negatives if
    u + eps > min_pos. `pos_vs_neg_lse` (NTXent): per kept positive, -log(sigmoid(x - lse_neg_i) +
    tiny), summed per row. `exclude_after_mining`: the excluded column (exclude_col) takes part in
    the mining thresholds but is never kept (PML's CrossBatchMemory removes self comparisons after
    its miner ran). `miner_on_cosine` (lp only): the miner measures with CosineSimilarity() beside
    the loss's LpDistance(), on u = -d^2 / 2 = S - 1 (normalized rows: d^2 = 2 - 2 S).
    `histogram`: per row and set the histogram of the pairs' v (PairHistogram; no mining, no
    pos_vs_neg_lse), in the value rows after PAIR_VALUES: the positives' nodes, then the negatives'.
    `pos_window` / `neg_window` (given together, as (lo, hi); no mining, no histogram): PML's
    PairMarginMiner, a pair of the set kept only where lo < v < hi (a NaN v in no window, as PML's
    comparisons drop it; +-inf for an open side). `ntx_tiny`: the tiny of `pos_vs_neg_lse` (PML's
    small_val, the smallest normal of its similarity matrix's dtype); None: the smallest normal of
    the dtype the engine accumulates in (fp16's is larger than float's, in which fp16 is summed)."""

    pos: PairTerm
    neg: PairTerm
    distance: str = "cosine"
    miner_epsilon: Optional[float] = None
    pos_vs_neg_lse: bool = False
    exclude_after_mining: bool = False
    miner_on_cosine: bool = False
    histogram: Optional[PairHistogram] = None
    pos_window: Optional[Tuple[float, float]] = None
    neg_window: Optional[Tuple[float, float]] = None
    ntx_tiny: Optional[float] = None
    # the packed arguments, computed once (a spec is immutable)
    _packed: Tuple[Tuple[float, ...], int] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        for name in ("pos", "neg"):
            if not isinstance(getattr(self, name), PairTerm):
                raise TypeError(f"PairLossSpec.{name} must be a PairTerm; got {getattr(self, name)!r}")
        for name in ("pos_vs_neg_lse", "exclude_after_mining", "miner_on_cosine"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"PairLossSpec.{name} must be a bool; got {getattr(self, name)!r}")
        for name in ("miner_epsilon", "ntx_tiny"):
            if getattr(self, name) is not None:
                _check_number(f"PairLossSpec.{name}", getattr(self, name))
        if self.histogram is not None and not isinstance(self.histogram, PairHistogram):
            raise TypeError(f"PairLossSpec.histogram must be None or a PairHistogram; got {self.histogram!r}")
        if self.distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}; got {self.distance!r}")
        if self.exclude_after_mining and self.miner_epsilon is None:
            raise ValueError("exclude_after_mining needs miner_epsilon")
        if self.miner_on_cosine and (self.miner_epsilon is None or self.distance != "lp"):
            raise ValueError("miner_on_cosine needs miner_epsilon and distance 'lp'")
        for name, t in (("pos", self.pos), ("neg", self.neg)):
            if t.exp_weighted and not (t.sum and t.hinge):
                raise ValueError(f"{name}.sum_temperature needs a hinge term reduced by sum")
        if self.histogram is not None and (self.miner_epsilon is not None or self.pos_vs_neg_lse):
            raise ValueError("histogram cannot be combined with miner_epsilon or pos_vs_neg_lse")
        if (self.pos_window is None) != (self.neg_window is None):
            raise ValueError("pos_window and neg_window go together (both (lo, hi), or both None)")
        windows = self.pos_window is not None
        if windows and (self.miner_epsilon is not None or self.histogram is not None):
            raise ValueError("pos_window / neg_window cannot be combined with miner_epsilon or a histogram")
        for name in ("pos_window", "neg_window") if windows else ():
            w = getattr(self, name)
            if not (isinstance(w, tuple) and len(w) == 2
                    and all(isinstance(b, numbers.Real) and not isinstance(b, bool) and b == b for b in w)):
                raise ValueError(f"{name} must be a tuple (lo, hi) of two numbers (not NaN); got {w!r}")
        if self.ntx_tiny is not None and not 0 < self.ntx_tiny < 1:
            raise ValueError(f"ntx_tiny must be None or a number in (0, 1); got {self.ntx_tiny!r}")
        if self.ntx_tiny is not None and not self.pos_vs_neg_lse:
            raise ValueError("ntx_tiny is the tiny of pos_vs_neg_lse: it needs pos_vs_neg_lse=True")
        flags = 0
        flags |= POS_LSE if self.pos.lse else 0
        flags |= POS_SUM if self.pos.sum else 0
        flags |= POS_HINGE if self.pos.hinge else 0
        flags |= NEG_LSE if self.neg.lse else 0
        flags |= NEG_SUM if self.neg.sum else 0
        flags |= NEG_HINGE if self.neg.hinge else 0
        flags |= LP_DISTANCE if self.distance == "lp" else 0
        flags |= MINE if self.miner_epsilon is not None else 0
        flags |= POS_VS_NEG_LSE if self.pos_vs_neg_lse else 0
        flags |= EXCLUDE_AFTER_MINING if self.exclude_after_mining else 0
        flags |= MINE_ON_COSINE if self.miner_on_cosine else 0
        h = self.histogram
        flags |= HIST_SQUARED if h is not None and h.squared else 0
        flags |= HIST_PML_BINS if h is not None and h.pml_bins else 0
        flags |= KEEP_WINDOWS if windows else 0
        histogram = (0.0, 0.0, 0.0) if h is None else (float(h.nodes), float(h.lo), float(h.inv_width))
        eps = 0.0 if self.miner_epsilon is None else float(self.miner_epsilon)
        temperatures = (float(self.pos.sum_temperature), float(self.neg.sum_temperature))
        inf = float("inf")
        bounds = (tuple(map(float, self.pos_window + self.neg_window)) if windows else (-inf, inf, -inf, inf))
        tiny = (0.0 if self.ntx_tiny is None else float(self.ntx_tiny),)  # 0: the accumulation dtype's
        object.__setattr__(self, "_packed", (self.pos.floats() + self.neg.floats() + (eps,) + temperatures + histogram
                                             + bounds + tiny, flags))

    def pack(self) -> Tuple[Tuple[float, ...], int]:
        """(terms, flags): the fused ops' arguments (loss_spec.h layout)."""
        return self._packed

    @property
    def mine(self) -> bool:
        return self.miner_epsilon is not None

    def tiny(self, accumulation_dtype) -> float:
        """NTXent's tiny as the engines read it (loss_spec.h ntx_tiny)."""
        return ntx_tiny_of(self.ntx_tiny or 0.0, accumulation_dtype)

    @property
    def defer_positives(self) -> bool:
        """Positives reduced after the main walk (they need max_neg or lse_neg of their row)."""
        return self.mine or self.pos_vs_neg_lse

    def describe(self) -> str:
        """The fields as the op `describe_pair_spec` prints its C++ reading of them."""
        eps = 0.0 if self.miner_epsilon is None else float(self.miner_epsilon)
        parts = _term_fields("pos", self.pos) + _term_fields("neg", self.neg) + [
            f"lp_distance={int(self.distance == 'lp')}", f"mine={int(self.mine)}",
            f"miner_epsilon={_num(eps)}", f"pos_vs_neg_lse={int(self.pos_vs_neg_lse)}",
            f"exclude_after_mining={int(self.exclude_after_mining)}",
            f"mine_on_cosine={int(self.miner_on_cosine)}",
            f"pos.sum_temperature={_num(float(self.pos.sum_temperature))}",
            f"neg.sum_temperature={_num(float(self.neg.sum_temperature))}",
            f"hist_nodes={self._packed[0][11]:.0f}", f"hist_lo={_num(self._packed[0][12])}",
            f"hist_inv_width={_num(self._packed[0][13])}", f"hist_squared={int(bool(self._packed[1] & HIST_SQUARED))}",
            f"hist_pml_bins={int(bool(self._packed[1] & HIST_PML_BINS))}",
            f"windows={int(bool(self._packed[1] & KEEP_WINDOWS))}"] + [
            f"{name}={_num(b)}" for name, b in zip(("pos_window_lo", "pos_window_hi", "neg_window_lo", "neg_window_hi"),
                                                    self._packed[0][14:18])] + [
            f"ntx_tiny={_num(self._packed[0][18])}"]
        return ";".join(parts)


@dataclass(frozen=True)
class ClassLossSpec:
    """Declaration of a class (proxy) loss for the class engine (tiles of whole classes of w).

    s_ick = q_i . w_ck; S_ic = s_ic (K = 1), SoftTriple's pooling sum_k softmax_k(s_ick / gamma)
    s_ick (`pool_gamma`) or SubCenterArcFace's max_k s_ick (`pool_max`: torch.max's value, NaN
    first, and its gradient to the first center attaining it); `row`: per row the LSE over the
    non-target classes of the term x of S_ic, or with `row_reduction="softplus_sum"` the sum of
    softplus(x) = log(1 + e^x) over them (SigLIP's sigmoid loss; the row slot "lse_other" holds that
    sum); the target's logit is combined outside, from target_sim; `col_pos` / `col_neg` (K = 1): per
    class c the LSE over the samples with y_i == c / y_i != c of the term of s_ic (ProxyAnchor).

    The weights as the loss stores them (PML's parameter): `weights_layout` "rows" (C*K, D) or
    "columns" (D, C*K); `normalize_weights`: w_ck enters as w_ck / max(||w_ck||, 1e-12) (PML's
    F.normalize), which the engine applies per tile, so no normalized or transposed copy of a large
    weight matrix is made."""

    row: Optional[PairTerm] = None
    col_pos: Optional[PairTerm] = None
    col_neg: Optional[PairTerm] = None
    centers_per_class: int = 1
    pool_gamma: Optional[float] = None
    pool_max: bool = False
    normalize_weights: bool = False
    weights_layout: str = "rows"
    row_reduction: str = "lse"
    _packed: Tuple[Tuple[float, ...], int] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        K = self.centers_per_class
        if self.row_reduction not in ROW_REDUCTIONS:
            raise ValueError(f"row_reduction must be one of {ROW_REDUCTIONS}; got {self.row_reduction!r}")
        if self.row_reduction != "lse" and self.row is None:
            raise ValueError(f"row_reduction {self.row_reduction!r} needs a row term")
        for name in ("row", "col_pos", "col_neg"):
            t = getattr(self, name)
            if t is not None and (t.hinge or t.sum or t.exp_weighted):
                raise ValueError(f"class engine term {name}: only LSE reductions (no hinge / sum)")
        if (self.col_pos is not None or self.col_neg is not None) and K != 1:
            raise ValueError("column reductions need centers_per_class = 1")
        if K > 1 and (self.pool_gamma is None) == (not self.pool_max):
            raise ValueError("centers_per_class > 1 needs one pooling: pool_gamma (SoftTriple's) or pool_max "
                             "(SubCenterArcFace's)")
        if self.weights_layout not in WEIGHT_LAYOUTS:
            raise ValueError(f"weights_layout must be one of {WEIGHT_LAYOUTS}; got {self.weights_layout!r}")
        flags = (ROW_LSE if self.row is not None else 0) | (COL_POS_LSE if self.col_pos is not None else 0) \
            | (COL_NEG_LSE if self.col_neg is not None else 0) \
            | (NORMALIZE_WEIGHTS if self.normalize_weights else 0) \
            | (WEIGHTS_COLUMNS if self.weights_layout == "columns" else 0) \
            | (POOL_MAX if self.pool_max else 0) \
            | (ROW_SOFTPLUS_SUM if self.row_reduction == "softplus_sum" else 0)
        inv_gamma = 1.0 / self.pool_gamma if self.pool_gamma else 0.0
        terms = (self.row or NO_TERM).floats() + (self.col_pos or NO_TERM).floats() \
            + (self.col_neg or NO_TERM).floats() + (inv_gamma,)
        object.__setattr__(self, "_packed", (terms, flags))

    def pack(self) -> Tuple[Tuple[float, ...], int]:
        return self._packed

    def describe(self) -> str:
        inv_gamma = self._packed[0][-1]
        parts = (_term_fields("row", self.row, lse=self.row is not None)
                 + _term_fields("col_pos", self.col_pos, lse=self.col_pos is not None)
                 + _term_fields("col_neg", self.col_neg, lse=self.col_neg is not None)
                 + [f"pool_inv_gamma={_num(inv_gamma)}", f"centers_per_class={self.centers_per_class}",
                    f"normalize_weights={int(self.normalize_weights)}",
                    f"weights_columns={int(self.weights_layout == 'columns')}", f"pool_max={int(self.pool_max)}",
                    f"row_softplus_sum={int(self.row_reduction == 'softplus_sum')}"])
        return ";".join(parts)


def pair_value_rows(terms) -> int:
    """Rows of the pair engine's values for packed terms: PAIR_VALUES and the two histograms."""
    return len(PAIR_VALUES) + 2 * int(terms[11])


def pair_stats_of(values, counts, aux):
    """(values, counts, aux) of the pair engine as the arguments of engines.PairStats, in order."""
    k = len(PAIR_VALUES)
    hist = values[k:].view(2, (values.shape[0] - k) // 2, values.shape[1])
    return (*values[:k].unbind(0), hist[0], hist[1], *counts.unbind(0), aux[0], aux[1])


def unpack_pair(terms, flags: int) -> PairLossSpec:
    """The declaration a packed (terms, flags) encodes (the inverse of PairLossSpec.pack)."""
    terms = [float(t) for t in terms]

    def term(off, lse, sm, hinge, temperature):
        return PairTerm(*terms[off:off + 4], hinge=bool(flags & hinge), lse=bool(flags & lse), sum=bool(flags & sm),
                        sum_temperature=temperature)

    histogram = None if not terms[11] else PairHistogram(int(terms[11]), terms[13], terms[12],
                                                         bool(flags & HIST_SQUARED), bool(flags & HIST_PML_BINS))
    return PairLossSpec(pos=term(0, POS_LSE, POS_SUM, POS_HINGE, terms[9]),
                        neg=term(4, NEG_LSE, NEG_SUM, NEG_HINGE, terms[10]),
                        distance="lp" if flags & LP_DISTANCE else "cosine",
                        miner_epsilon=terms[8] if flags & MINE else None,
                        pos_vs_neg_lse=bool(flags & POS_VS_NEG_LSE),
                        exclude_after_mining=bool(flags & EXCLUDE_AFTER_MINING),
                        miner_on_cosine=bool(flags & MINE_ON_COSINE), histogram=histogram,
                        pos_window=tuple(terms[14:16]) if flags & KEEP_WINDOWS else None,
                        neg_window=tuple(terms[16:18]) if flags & KEEP_WINDOWS else None,
                        ntx_tiny=terms[18] or None)


def unpack_class(terms, flags: int, centers_per_class: int) -> ClassLossSpec:
    """The declaration a packed (terms, flags, centers_per_class) encodes."""
    terms = [float(t) for t in terms]

    def term(off, bit):
        return PairTerm(*terms[off:off + 4], lse=True) if flags & bit else None

    return ClassLossSpec(row=term(0, ROW_LSE), col_pos=term(4, COL_POS_LSE), col_neg=term(8, COL_NEG_LSE),
                         centers_per_class=int(centers_per_class),
                         pool_gamma=(1.0 / terms[12]) if terms[12] else None, pool_max=bool(flags & POOL_MAX),
                         normalize_weights=bool(flags & NORMALIZE_WEIGHTS),
                         weights_layout="columns" if flags & WEIGHTS_COLUMNS else "rows",
                         row_reduction="softplus_sum" if flags & ROW_SOFTPLUS_SUM else "lse")


def _num(x: float) -> str:
    """A float as C++ prints it with precision 17 (%.17g), 'inf' / 'nan' spelled the same way."""
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.17g}"


def _term_fields(name, term, lse=None):
    t = term or NO_TERM
    return [f"{name}.scale={_num(t.scale)}", f"{name}.shift={_num(t.shift)}",
            f"{name}.weight_offset={_num(t.weight_offset)}", f"{name}.weight_slope={_num(t.weight_slope)}",
            f"{name}.lse={int(t.lse if lse is None else lse)}",
            f"{name}.sum={int(t.sum and lse is None)}", f"{name}.hinge={int(t.hinge and lse is None)}"]
