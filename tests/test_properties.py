"""Property tests (hypothesis): every loss of the kit's table (tests/kit.py LOSSES; a new loss
joins through its entry's `hyper`, `ordered`, `pml` and `kinks`) on drawn inputs:
- every fused backend available on CPU tensors ("cpu"; "triton" through its interpreter, smaller
  shapes) against the reference, values and gradients, with the kit's rule (truth: the fp64
  reference on the same inputs; same-dtype reference: the reference in the input's dtype);
- the reference against PML itself in fp64 (the kit's floor; losses without a PML counterpart
  are listed in NO_PML).
Drawn: N and M (1, 2, small odd sizes, up to a few tiles), D, label layouts (few / many /
all-same / all-distinct classes; int64 pair labels negative or near 2^40), self / ref / ref with
`ref_labels is labels` / `ref_emb is embeddings` modes, hyper-parameters over the entry's range,
fp32 / fp64, and the memory layout of the embeddings (contiguous, transposed, column-strided,
row-strided views).

Kinks (docs/design.md "Testing near thresholds"): "normal" inputs are rejected when a relu or
mining comparison of the loss (its kit entry's `kinks`, in fp64) lies within KINK_GAP of its kink;
"grid" inputs have rows of norm 4 with integer entries, so every S is a multiple of 1/16 in every
dtype, and the hyper-parameters are drawn on the same 1/16 grid: exact ties are kept there, they
are decided the same way everywhere. lp losses: pairs closer than MIN_LP_DISTANCE are not drawn.

Example counts: the hypothesis profile (tests/conftest.py): "ci" by default, a long run with
`pytest tests/test_properties.py --hypothesis-profile=long --hypothesis-show-statistics`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, note, settings
from hypothesis import strategies as st

import fused_pairloss as fpl
from fused_pairloss.losses import snr_contrastive

import kit

FUSED_BACKENDS = [b for b in fpl.available_backends("cpu") if b not in ("reference", "triton")]
TRITON = "triton" in fpl.available_backends("cpu")
# the Triton interpreter is slow: fewer examples, smaller shapes
TRITON_EXAMPLES = max(2, settings.default.max_examples // 5)
PAIR_MODES = ("self", "ref", "ref_is_labels", "ref_is_embeddings")
NO_PML = {"proxycircle": "the class-level Circle loss has no PML counterpart (docs/semantics.md)"}
# PML's MultiSimilarityMiner does not apply the identity rule with a separate ref_emb and `ref_labels
# is labels` (it mines (i, i), then its loss asserts or S_ii moves its thresholds): a documented
# difference, tested in test_reference_vs_pml.py; the mined losses meet PML in the other modes
PML_MINER_MODES = tuple(mode for mode in PAIR_MODES if mode != "ref_is_labels")

KINK_GAP = {torch.float64: 1e-9, torch.float32: 3e-5}  # fp32: S is exact to ~1e-6 for D <= 48
MIN_LP_DISTANCE = 0.3  # near-duplicate lp pairs: handled elsewhere
LABEL_MAPS = [(0, 1), (-5, 3), (-(2 ** 40), 1), (2 ** 40 - 2 ** 20, 2 ** 14)]  # label = base + stride * class
LABEL_LAYOUTS = ("few", "many", "same", "distinct")  # classes of the batch: few, many, one, one per row
LAYOUTS = ("contiguous", "transposed", "strided_cols", "strided_rows")
# rows of norm 4 with integer entries: |entry| patterns whose squares sum to 16
NORM4_PATTERNS = ([4], [2, 2, 2, 2], [3, 2, 1, 1, 1], [2, 2, 2, 1, 1, 1, 1], [3] + [1] * 7, [2] * 3 + [1] * 4,
                  [1] * 16)


@dataclass
class Case:
    """What one example draws; the tensors are built from `seed` (materialize)."""
    loss: str
    dtype: torch.dtype
    data: str  # "normal" / "grid"
    n: int
    d: int
    mode: str  # pair losses: PAIR_MODES; class losses: "classes"
    m: int  # ref rows (pair losses, mode "ref") or classes (class losses)
    label_layout: str
    label_map: tuple
    layout: str
    ref_layout: str
    hyper: dict
    seed: int


# ---- strategies ----------------------------------------------------------------------------------
def sizes(hi):
    return st.one_of(st.sampled_from([1, 2, 3, 5, 7]), st.integers(1, hi))


@st.composite
def hyper_params(draw, loss: kit.Loss, grid: bool):
    """loss.kwargs with every `hyper` entry drawn from its range (on the 1/16 grid for grid data),
    the `ordered` ones sorted ascending."""
    kw = dict(loss.kwargs)
    for name, (lo, hi) in loss.hyper.items():
        if grid:
            kw[name] = draw(st.integers(math.ceil(lo * 16), math.floor(hi * 16))) / 16
        else:
            kw[name] = draw(st.floats(lo, hi, allow_nan=False, allow_infinity=False))
    if loss.ordered:
        for name, value in zip(loss.ordered, sorted(kw[k] for k in loss.ordered)):
            kw[name] = value
    return kw


@st.composite
def cases(draw, name, small=False, dtypes=(torch.float32, torch.float64), modes=PAIR_MODES):
    loss = kit.LOSSES[name]
    hi = 40 if small else 64  # rows: past one 32-row tile (the CPU engine's smallest, the interpreter's)
    data = draw(st.sampled_from(["normal", "grid"]))
    # D >= 2: with D = 1 every gradient through the normalization is 0, and only rounding noise is compared
    d_lo = 4 if loss.distance in ("lp", "snr") or data == "grid" else 2
    d = draw(st.integers(d_lo, 24 if small else 48))
    if loss.kind == "pair":
        # PML's NPairsLoss / InstanceLoss take no ref_emb but the batch itself
        mode = draw(st.sampled_from(modes if loss.entry.ref_emb else ("self", "ref_is_embeddings")))
        m = draw(sizes(hi))
        label_map = draw(st.sampled_from(LABEL_MAPS))
    else:  # m: the number of classes; labels are class indices
        mode, m = "classes", draw(st.integers(1, 12 if small else 40))
        label_map = (0, 1)
    return Case(loss=name, dtype=draw(st.sampled_from(dtypes)), data=data, n=draw(sizes(hi)), d=d, mode=mode, m=m,
                label_layout=draw(st.sampled_from(LABEL_LAYOUTS)), label_map=label_map,
                layout=draw(st.sampled_from(LAYOUTS)), ref_layout=draw(st.sampled_from(LAYOUTS)),
                hyper=draw(hyper_params(loss, data == "grid")), seed=draw(st.integers(0, 2 ** 32 - 1)))


# ---- building the tensors ------------------------------------------------------------------------
def grid_rows(n, d, g):
    """Rows of norm exactly 4 with integer entries (patterns that fit in d columns)."""
    patterns = [p for p in NORM4_PATTERNS if len(p) <= d]
    x = torch.zeros(n, d, dtype=torch.float64)
    for i in range(n):
        p = torch.tensor(patterns[int(torch.randint(len(patterns), (1,), generator=g))], dtype=torch.float64)
        sign = torch.randint(0, 2, (len(p),), generator=g).double() * 2 - 1
        x[i, torch.randperm(d, generator=g)[: len(p)]] = p * sign
    return x


def rows(case, n, g):
    """fp64 values (exactly representable in the case's dtype) of n embedding rows."""
    if case.data == "grid":
        return grid_rows(n, case.d, g)
    return torch.randn(n, case.d, generator=g, dtype=torch.float64).to(case.dtype).double()


def class_ids(layout, n, num, g):
    """n class ids in [0, num) in the given layout."""
    if layout == "few":
        return torch.randint(0, min(num, 3), (n,), generator=g)
    if layout == "many":
        return torch.randint(0, num, (n,), generator=g)
    if layout == "same":
        return torch.full((n,), num - 1, dtype=torch.long)
    if n <= num:  # distinct
        return torch.randperm(num, generator=g)[:n]
    return torch.randperm(n, generator=g) % num


def lay_out(x, layout):
    """x (a fresh leaf's values) in a memory layout: (leaf to differentiate, the view passed)."""
    if layout == "contiguous":
        leaf = x.clone().requires_grad_(True)
        return leaf, leaf
    if layout == "transposed":
        leaf = x.t().contiguous().requires_grad_(True)
        return leaf, leaf.t()
    if layout == "strided_cols":
        wide = torch.zeros(x.shape[0], 2 * x.shape[1], dtype=x.dtype)
        wide[:, ::2] = x
        leaf = wide.requires_grad_(True)
        return leaf, leaf[:, ::2]
    tall = torch.zeros(2 * x.shape[0], x.shape[1], dtype=x.dtype)
    tall[::2] = x
    leaf = tall.requires_grad_(True)
    return leaf, leaf[::2]


def unlay(grad, layout):
    """The gradient of the view from the gradient of its leaf (the rest must be 0)."""
    if grad is None:
        return None
    if layout == "contiguous":
        return grad
    if layout == "transposed":
        return grad.t()
    view = grad[:, ::2] if layout == "strided_cols" else grad[::2]
    rest = grad.clone()
    if layout == "strided_cols":
        rest[:, ::2] = 0
    else:
        rest[::2] = 0
    assert not rest.any(), "gradient outside the strided view"
    return view


@dataclass
class Inputs:
    """fp64 values of one example: embeddings, labels, ref (pair) or class weights (class)."""
    x: torch.Tensor
    labels: torch.Tensor
    ref: Optional[torch.Tensor] = None
    ref_labels: Optional[torch.Tensor] = None
    weights: Optional[torch.Tensor] = None


def materialize(case: Case) -> Inputs:
    g = torch.Generator().manual_seed(case.seed)
    loss = kit.LOSSES[case.loss]
    x = rows(case, case.n, g)
    if loss.kind == "class":
        w = loss.weights(case.m, case.d, g, case.dtype).double()
        return Inputs(x, class_ids(case.label_layout, case.n, case.m, g), weights=w)
    base, stride = case.label_map
    num = {"few": 3, "many": max(1, case.n // 2), "same": 1, "distinct": max(case.n, case.m)}[case.label_layout]
    if loss.balanced_labels:  # PML's SmoothAPLoss: equal counts, and labels bincount takes (>= 0)
        labels = kit.balanced_labels(case.n) * abs(stride)
    else:
        labels = base + stride * class_ids(case.label_layout, case.n, num, g)
    if case.mode == "self":
        return Inputs(x, labels)
    if case.mode == "ref_is_embeddings":
        return Inputs(x, labels, x, labels)
    if case.mode == "ref_is_labels":
        return Inputs(x, labels, rows(case, case.n, g), labels)
    ref_labels = base + stride * class_ids(case.label_layout, case.m, num, g)
    return Inputs(x, labels, rows(case, case.m, g), ref_labels)


def geometry(case: Case, inp: Inputs) -> kit.Geometry:
    """The fp64 quantities the kinks are stated in, on the very values the dtype holds."""
    loss = kit.LOSSES[case.loss]
    q = F.normalize(inp.x, dim=1)
    if loss.kind == "class":
        w = inp.weights if loss.entry.weight_layout == "rows" else inp.weights.t()
        wn = F.normalize(w, dim=1)
        return kit.Geometry(s=q @ wn.t(), labels=inp.labels, K=loss.centers_per_class, ww=wn @ wn.t())
    r = q if inp.ref is None else F.normalize(inp.ref, dim=1)
    s = q @ r.t()
    if loss.distance == "snr":  # PML's SNRDistance
        mat = snr_contrastive.snr_matrix(inp.x, inp.x if inp.ref is None else inp.ref)
    else:
        mat = s if loss.distance == "cosine" else (2 - 2 * s).clamp(min=0).sqrt()
    ry = inp.labels if inp.ref_labels is None else inp.ref_labels
    pos, neg = inp.labels[:, None] == ry[None], inp.labels[:, None] != ry[None]
    if inp.ref is None or inp.ref_labels is inp.labels:  # PML's identity rule
        pos &= ~torch.eye(*pos.shape, dtype=torch.bool)
    return kit.Geometry(mat=mat, pos=pos, neg=neg)


def assume_away_from_kinks(case: Case, inp: Inputs):
    """Rejects an example with a kink argument within KINK_GAP of 0 (exact zeros of grid inputs
    stay: those ties are exact everywhere), or, for lp losses, two distinct rows closer than
    MIN_LP_DISTANCE."""
    loss = kit.LOSSES[case.loss]
    geo = geometry(case, inp)
    if loss.distance == "lp":
        d = geo.mat.clone()
        if inp.ref is None or inp.ref is inp.x:
            d.fill_diagonal_(math.inf)
        assume(d.numel() == 0 or float(d.min()) >= MIN_LP_DISTANCE)
    if loss.kinks is not None:
        args = loss.kinks(case.hyper, geo).abs()
        gap = KINK_GAP[case.dtype]
        assume(not bool(((args > 0) & (args < gap)).any()))


# ---- running a loss ------------------------------------------------------------------------------
def call(case: Case, inp: Inputs, fn, dtype, layouts=True):
    """fn on the inputs in `dtype` (in the case's memory layouts if `layouts`, else contiguous):
    (value, gradients of embeddings and of ref / weights when those are separate tensors)."""
    lay_x = case.layout if layouts else "contiguous"
    lay_r = case.ref_layout if layouts else "contiguous"
    x_leaf, x = lay_out(inp.x.to(dtype), lay_x)
    leaves, lays = [x_leaf], [lay_x]
    if inp.weights is not None:
        w = inp.weights.to(dtype).requires_grad_(True)
        leaves.append(w)
        lays.append("contiguous")
        out = fn(x, inp.labels, w)
    elif inp.ref is None:
        out = fn(x, inp.labels)
    elif inp.ref is inp.x:
        out = fn(x, inp.labels, x, inp.labels)
    else:
        r_leaf, r = lay_out(inp.ref.to(dtype), lay_r)
        leaves.append(r_leaf)
        lays.append(lay_r)
        out = fn(x, inp.labels, r, inp.ref_labels)
    assert out.dim() == 0 and out.dtype == dtype, (out.shape, out.dtype)
    if out.requires_grad:
        grads = torch.autograd.grad(out, leaves, allow_unused=True)
    else:
        grads = [None] * len(leaves)
    grads = [torch.zeros_like(leaf) if gr is None else gr for leaf, gr in zip(leaves, grads)]
    return out.detach(), [unlay(gr, lay) for gr, lay in zip(grads, lays)]


def library_fn(case: Case, backend):
    loss = kit.LOSSES[case.loss]
    return lambda *args: loss.fn(*args, backend=backend, **case.hyper)


def on_device(fn, device):
    """fn with its tensor arguments moved to `device` (moves autograd follows back to the CPU
    leaves) and its value moved back."""
    return lambda *args: fn(*[a.to(device) if torch.is_tensor(a) else a for a in args]).cpu()


def check_backend(case: Case, backend, device=None):
    inp = materialize(case)
    assume_away_from_kinks(case, inp)
    note(f"inputs: {inp}")
    fn = library_fn(case, backend) if device is None else on_device(library_fn(case, backend), device)
    got, got_grads = call(case, inp, fn, case.dtype)
    same, same_grads = call(case, inp, library_fn(case, "reference"), case.dtype)
    truth, truth_grads = call(case, inp, library_fn(case, "reference"), torch.float64, layouts=False)
    assert torch.isfinite(truth) and all(torch.isfinite(gr).all() for gr in truth_grads), \
        "the fp64 reference must be finite over the drawn ranges"
    kit.check_close(got, truth, same, what=f"{backend} value", dtype=case.dtype)
    for k, (a, b, t) in enumerate(zip(got_grads, same_grads, truth_grads)):
        kit.check_close(a, t, b, what=f"{backend} grad {k}", dtype=case.dtype)


# ---- properties ----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("name", list(kit.LOSSES))
@given(data=st.data())
def test_fused_backend_matches_reference(name, backend, data):
    check_backend(data.draw(cases(name), label="case"), backend)


@pytest.mark.skipif(not TRITON, reason="the Triton backend is not available on CPU tensors here")
@pytest.mark.parametrize("name", list(kit.LOSSES))
@settings(max_examples=TRITON_EXAMPLES)
@given(data=st.data())
def test_triton_interpreter_matches_reference(name, data):
    check_backend(data.draw(cases(name, small=True), label="case"), "triton")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("name", list(kit.LOSSES))
@settings(max_examples=TRITON_EXAMPLES)  # the GPU round's time budget (bench/gpu_check.sh)
@given(data=st.data())
def test_gpu_backend_matches_reference(name, backend, data):
    """The GPU backends on CUDA tensors against the CPU reference (the GPU round; skipped without a GPU)."""
    check_backend(data.draw(cases(name), label="case"), backend, device="cuda")


@pytest.mark.parametrize("name", [n for n in kit.LOSSES if n not in NO_PML])
@given(data=st.data())
def test_reference_matches_pml(name, data):
    modes = PML_MINER_MODES if "miner_epsilon" in kit.LOSSES[name].hyper else PAIR_MODES
    case = data.draw(cases(name, dtypes=(torch.float64,), modes=modes), label="case")
    inp = materialize(case)
    assume_away_from_kinks(case, inp)
    note(f"inputs: {inp}")
    ours, ours_grads = call(case, inp, library_fn(case, "reference"), torch.float64)
    pml, pml_grads = call(case, inp, kit.LOSSES[name].pml(case.hyper), torch.float64)
    kit.check_close(ours, pml, what="value vs PML")
    for k, (a, t) in enumerate(zip(ours_grads, pml_grads)):
        kit.check_close(a, t, what=f"grad {k} vs PML")


def test_every_loss_is_drawn_fully():
    """Each kit entry gives the property tests a range per hyper-parameter it has and a PML
    counterpart (or a reason in NO_PML); the losses with hinges or mining state their kinks."""
    for name, loss in kit.LOSSES.items():
        assert loss.hyper or not loss.entry.hyper, f"{name}: no hyper-parameter ranges in its kit entry"
        defaults = loss.keyword_defaults
        assert set(loss.hyper) <= set(defaults), (name, set(loss.hyper) - set(defaults))
        assert all(lo <= hi for lo, hi in loss.hyper.values()), name
        assert (loss.pml is None) == (name in NO_PML), name
    for name in ("ms_mined", "contrastive", "contrastive_cos", "lifted", "arcface", "softtriple_reg"):
        assert kit.LOSSES[name].kinks is not None, name
