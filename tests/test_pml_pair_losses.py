"""PML's MarginLoss, LiftedStructureLoss, TupletMarginLoss, NPairsLoss and InstanceLoss against
PML's own classes where the kit's table (tests/kit.py) does not reach: a learned beta's gradient,
a per-class beta and PML's fallback (sampled triplets), every PML miner's tuple, PML's errors, the
attributes PML users read, state_dicts both ways, and the positive-pair op (opcheck, many chunks,
the miner's listed pairs)."""
import math
import warnings

import pytest
import torch

import fused_pairloss as fpl
from fused_pairloss.ops import positive_pairs
from kit import check_close

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
from pytorch_metric_learning.distances import CosineSimilarity  # noqa: E402


def inputs(n, d, classes, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    return x, torch.randint(0, classes, (n,), generator=g)


def value_and_grads(fn, params):
    out = fn()
    grads = torch.autograd.grad(out, params, allow_unused=True)
    return out, [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def check_against_pml(ours, pml, args, params, pml_params, dtype):
    """Values and gradients (params of ours, the matching pml_params of PML's) with the kit's rule:
    PML in fp64 is the truth, PML in the case's dtype the same-dtype reference."""
    val, grads = value_and_grads(lambda: ours(*args), params)
    pml_val, pml_grads = value_and_grads(lambda: pml(*args), pml_params)
    conv = {id(p): p.detach().double().requires_grad_(True) for p in params if p.dtype == dtype}
    args64 = [conv.get(id(a), a) for a in args]
    pml64 = [conv.get(id(p), p) for p in pml_params]
    truth, truth_grads = value_and_grads(lambda: pml(*args64), pml64)
    check_close(val, truth, pml_val, what="value", dtype=dtype)
    for k, (a, b, t) in enumerate(zip(grads, pml_grads, truth_grads)):
        # a parameter of another dtype (MarginLoss's float32 beta) has its gradient summed in it
        check_close(a, t, b, what=f"grad {k}", dtype=a.dtype if a.dtype != dtype else dtype)


# ---- MarginLoss -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("distance", ["lp", "cosine"])
@pytest.mark.parametrize("mode", ["self", "ref"])
@pytest.mark.parametrize("num_classes", [None, 5], ids=["one_beta", "per_class"])
def test_margin_learned_beta_matches_pml(dtype, distance, mode, num_classes):
    """learn_beta=True, nu > 0, one beta or one per class (PML's num_classes, spread so that the
    classes' hinges differ): the value and the gradients of the embeddings and of beta (from the
    rows' nonzero counts) equal PML's; beta's state_dict entry is PML's and loads both ways."""
    kw = dict(margin=0.2, nu=0.3, beta=0.8 if distance == "lp" else 0.2, learn_beta=True, num_classes=num_classes)
    if distance == "cosine":
        kw["distance"] = CosineSimilarity()
    ours, pml = fpl.MarginLoss(**kw), pml_losses.MarginLoss(**kw)
    assert set(ours.state_dict()) == set(pml.state_dict()) == {"beta"}
    if num_classes:
        with torch.no_grad():
            pml.beta.copy_(pml.beta + torch.linspace(-0.3, 0.3, num_classes))
        ours.load_state_dict(pml.state_dict())
        assert ours._pml is None  # fused, not PML's computation
    x, y = inputs(40, 12, 5, dtype, seed=1)
    if mode == "self":
        args, params = (x, y), [x]
    else:
        r, ry = inputs(30, 12, 5, dtype, seed=2)
        args, params = (x, y, None, r, ry), [x, r]
    val, grads = value_and_grads(lambda: ours(*args), params + [ours.beta])
    pml_val, pml_grads = value_and_grads(lambda: pml(*args), params + [pml.beta])
    check_close(val, pml_val.to(dtype), pml_val, what="value", dtype=dtype)
    for k, (a, b) in enumerate(zip(grads, pml_grads)):
        # beta is a float32 parameter whatever the inputs' dtype (PML's), and its gradient is summed in it
        check_close(a, b, what=f"grad {k}", dtype=a.dtype)
    assert float(grads[-1].abs().sum()) > 0  # beta's gradient is checked, not a zero against a zero
    if num_classes:
        assert int((grads[-1] != 0).sum()) > 1  # and per class
        pml.load_state_dict(ours.state_dict())


@pytest.mark.parametrize("distance", ["lp", "cosine"])
def test_margin_fixed_per_class_beta_matches_pml(distance):
    """num_classes without learn_beta: PML's beta is a plain tensor attribute (outside the
    state_dict), assigned on both; no regularizer term."""
    kw = dict(margin=0.1, nu=0.5, num_classes=4) if distance == "lp" else dict(
        margin=0.1, nu=0.5, num_classes=4, beta=0.1, distance=CosineSimilarity())
    ours, pml = fpl.MarginLoss(**kw), pml_losses.MarginLoss(**kw)
    ours.beta = pml.beta = pml.beta + torch.tensor([-0.2, 0.0, 0.1, 0.25])
    x, y = inputs(36, 8, 4, torch.float64, seed=6)
    check_against_pml(ours, pml, (x, y), [x], [x], torch.float64)
    assert ours._pml is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("num_classes", [None, 16], ids=["one_beta", "per_class"])
def test_margin_learned_beta_half_precision(dtype, num_classes):
    """Half-precision embeddings with a learned beta: 128 rows of 8 per class make about 1.2e5
    triplets, past fp16's range, so the counts, the divisor and the regularizer are summed in the
    stat dtype. Value and gradients against PML in fp64 (beta a float32 parameter, as PML's)."""
    kw = dict(margin=0.2, nu=0.1, learn_beta=True, num_classes=num_classes)
    ours, pml = fpl.MarginLoss(**kw), pml_losses.MarginLoss(**kw)
    x64 = torch.randn(128, 8, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    y = torch.arange(128) % 16
    x = x64.to(dtype).requires_grad_(True)
    val, grads = value_and_grads(lambda: ours(x, y), [x, ours.beta])
    xt = x.detach().double().requires_grad_(True)
    truth, truth_grads = value_and_grads(lambda: pml(xt, y), [xt, pml.beta])
    assert val.dtype == dtype and torch.isfinite(val)
    check_close(val, truth, what="value", dtype=dtype)
    check_close(grads[0], truth_grads[0], what="grad x", dtype=dtype)
    check_close(grads[1], truth_grads[1], what="grad beta", dtype=dtype)
    assert float(truth_grads[1].abs().min()) > 0


def test_margin_per_class_beta_labels_are_indices():
    """A per-class beta is looked up by the anchors' labels (PML: beta[labels[anchor_idx]]): an
    anchor of triplets with a label outside [-num_classes, num_classes) names labels, a row without
    triplets may hold any label (PML reads no beta there), negative labels index from the end, and
    labels must be integers (also inside CrossBatchMemory; PML: IndexError)."""
    x, _ = inputs(8, 4, 3, torch.float64, seed=7)
    loss, pml = fpl.MarginLoss(num_classes=3), pml_losses.MarginLoss(num_classes=3)
    with pytest.raises(ValueError, match=r"labels.*num_classes=3.*\[3\]"):
        loss(x, torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]))
    lone = torch.tensor([0, 1, 2, 0, 1, 2, 0, 9])  # label 9 on a row without a positive
    check_close(loss(x, lone), pml(x, lone), what="a lone out-of-range label")
    y = torch.tensor([0, 1, -1, 0, 1, -1, 0, 1])
    check_close(loss(x, y), pml(x, y), what="negative labels")
    with pytest.raises(TypeError, match="labels.*integers"):
        loss(x, torch.tensor([0.0, 1, 2, 0, 1, 2, 0, 1]))
    with pytest.raises(TypeError, match="labels.*integers"):
        fpl.CrossBatchMemory(loss, 4, memory_size=16)(x, torch.tensor([0.0, 1, 2, 0, 1, 2, 0, 1]))


@pytest.mark.parametrize("ref_labels", ["float", "non_integral_float", "bool"])
def test_margin_per_class_beta_with_float_ref_labels(ref_labels):
    """Integer labels beside float / bool ref_labels: PML compares them with == and still indexes
    beta with the labels themselves (they must not become ids)."""
    x, y = inputs(12, 6, 3, torch.float64, seed=9)
    r, _ = inputs(10, 6, 3, torch.float64, seed=10)
    yr = {"float": torch.tensor([0.0, 1, 2, 1, 2] * 2), "non_integral_float": torch.tensor([0.5, 1, 2, 1, 2] * 2),
          "bool": torch.tensor([True, False] * 5)}[ref_labels]
    ours, pml = fpl.MarginLoss(num_classes=3, learn_beta=True, nu=0.1), pml_losses.MarginLoss(
        num_classes=3, learn_beta=True, nu=0.1)
    with torch.no_grad():
        pml.beta.copy_(torch.tensor([0.4, 0.9, 1.5]))
    ours.load_state_dict(pml.state_dict())
    check_against_pml(ours, pml, (x, y, None, r, yr), [x, ours.beta], [x, pml.beta], torch.float64)


def test_margin_per_class_ref_labels_edges():
    """Integer labels PML's == cannot tell apart in the ref_labels' dtype are refused, naming
    ref_labels; huge labels and non-integral ref values need a stand-in that is no label; an inf
    beta gives PML's inf, all-NaN betas PML's 0 (no nonzero term), not NaN."""
    x, _ = inputs(6, 4, 3, torch.float64, seed=11)
    r, _ = inputs(6, 4, 3, torch.float64, seed=12)
    with pytest.raises(ValueError, match="ref_labels"):
        fpl.MarginLoss(num_classes=300)(x, torch.tensor([257, 257, 1, 1, 2, 2]), None, r,
                                        torch.tensor([256.0, 256, 1, 2, 257, 3]).bfloat16())
    y, yr = torch.tensor([0, 0, 1, 1, 2, -2**60]), torch.tensor([0.0, 1, 2, 0.5, 1, 2], dtype=torch.float64)
    ours, pml = fpl.MarginLoss(num_classes=3), pml_losses.MarginLoss(num_classes=3)
    check_close(ours(x, y, None, r, yr), pml(x, y, None, r, yr), what="huge labels")
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    for beta in ([1.2, float("inf"), 1.2], [float("inf")], [float("nan")] * 3):
        kw = dict(num_classes=len(beta) if len(beta) > 1 else None, learn_beta=True, nu=0.1)
        ours, pml = fpl.MarginLoss(**kw), pml_losses.MarginLoss(**kw)
        with torch.no_grad():
            ours.beta.copy_(torch.tensor(beta))
            pml.beta.copy_(torch.tensor(beta))
        (a, ga), (b, gb) = value_and_grads(lambda: ours(x, y), [ours.beta]), value_and_grads(lambda: pml(x, y),
                                                                                              [pml.beta])
        assert torch.equal(a, b.to(a.dtype)), (beta, a, b)
        if beta[0] == beta[0]:  # beta's gradient too (from the counts, finite for an inf beta)
            check_close(ga[0], gb[0], what=f"grad beta {beta}")


def test_torch_compile_traces_a_per_class_beta_with_float_ref_labels():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(13)
    x, r = torch.randn(12, 6, generator=g), torch.randn(10, 6, generator=g)
    y, yr = torch.tensor([0, 1, 2] * 4), torch.tensor([0.0, 1, 2, 1, 2] * 2)
    loss = fpl.MarginLoss(num_classes=3, learn_beta=True, nu=0.1)
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, y, None, r, yr), loss(x, y, None, r, yr))
    pml = pml_losses.MarginLoss(num_classes=3, learn_beta=True, nu=0.1)
    check_close(loss(x, y, None, r, yr), pml(x, y, None, r, yr), what="value")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("mode", ["self", "ref"])
@pytest.mark.parametrize("kw", [dict(num_classes=5, learn_beta=True), dict(learn_beta=True), dict()],
                         ids=["per_class", "learned", "fixed"])
def test_margin_sampling_matches_pml(kw, mode, dtype):
    """Sampled triplets (an integer triplets_per_anchor): PML's sample (the same draws from torch's
    generator), computed from the triplets' rows without a warning; values and gradients (beta's
    too) equal to PML's, the state_dicts loading both ways."""
    ours = fpl.MarginLoss(nu=0.1, triplets_per_anchor=4, **kw)
    pml = pml_losses.MarginLoss(nu=0.1, triplets_per_anchor=4, **kw)
    if ours.beta.numel() > 1:
        with torch.no_grad():
            ours.beta.copy_(torch.linspace(0.6, 1.4, ours.beta.numel()))
    pml.load_state_dict(ours.state_dict())
    ours.load_state_dict(pml.state_dict())
    x, y = inputs(30, 8, 5, dtype, seed=3)
    args, params = (x, y), [x]
    if mode == "ref":
        r, ry = inputs(24, 8, 5, dtype, seed=4)
        args, params = (x, y, None, r, ry), [x, r]
    learned = [ours.beta] if ours.learn_beta else []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        torch.manual_seed(0)
        val, grads = value_and_grads(lambda: ours(*args), params + learned)
    torch.manual_seed(0)
    pml_val, pml_grads = value_and_grads(lambda: pml(*args), params + ([pml.beta] if pml.learn_beta else []))
    check_close(val, pml_val.double(), what="value", dtype=dtype)
    for k, (a, b) in enumerate(zip(grads, pml_grads)):  # beta's own dtype (fp32) for its gradient
        check_close(a, b.double(), what=f"grad {k}", dtype=a.dtype)


MINERS = {
    "multi_similarity": lambda: pml_miners.MultiSimilarityMiner(0.2),
    "pair_margin": lambda: pml_miners.PairMarginMiner(0.6, 0.9),
    "batch_hard": lambda: pml_miners.BatchHardMiner(),
    "batch_easy_hard": lambda: pml_miners.BatchEasyHardMiner(),
    "triplet_margin": lambda: pml_miners.TripletMarginMiner(0.3),
}


@pytest.mark.parametrize("miner", list(MINERS))
@pytest.mark.parametrize("cls,kw", [("MarginLoss", dict(beta=0.9)), ("MarginLoss", dict(learn_beta=True, nu=0.2)),
                                    ("MarginLoss", dict(learn_beta=True, nu=0.2, num_classes=5)),
                                    ("LiftedStructureLoss", {}), ("TupletMarginLoss", dict(scale=16)),
                                    ("NPairsLoss", {}), ("ThresholdConsistentMarginLoss", dict(margin_plus=0.3)),
                                    ("AngularLoss", dict(alpha=35))])
def test_miner_tuples_match_pml(cls, kw, miner):
    """A PML miner's tuple (pairs or triplets), also labels=None for the losses PML allows it:
    values and gradients equal PML's."""
    x, y = inputs(40, 8, 5, torch.float64, seed=4)
    ours, pml = getattr(fpl.losses, cls)(**kw), getattr(pml_losses, cls)(**kw)
    idx = MINERS[miner]()(x.detach(), y)
    learned = [ours.beta] if kw.get("learn_beta") else []
    pml_learned = [pml.beta] if kw.get("learn_beta") else []
    check_against_pml(ours, pml, (x, y, idx), [x] + learned, [x] + pml_learned, torch.float64)
    if "num_classes" in kw:  # a per-class beta is looked up by label: PML fails without labels, we name them
        with pytest.raises(ValueError, match="labels"):
            ours(x, None, idx)
    elif cls not in ("NPairsLoss", "AngularLoss"):  # PML's NPairsLoss and AngularLoss require labels
        check_close(ours(x, None, idx), pml(x, None, idx), what="labels=None")


def test_margin_without_triplets_is_pml_zero():
    x, y = inputs(6, 4, 6, torch.float64, seed=5)
    y = torch.arange(6)  # no positive pair
    out = fpl.MarginLoss(learn_beta=True, nu=1.0)(x, y)
    assert out.item() == 0.0 and out.grad_fn is not None


# ---- LiftedStructureLoss, TupletMarginLoss ---------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("cls,kw", [("LiftedStructureLoss", dict(neg_margin=0.8, pos_margin=0.1)),
                                    ("LiftedStructureLoss", dict(neg_margin=0.2, pos_margin=0.8,
                                                                 distance=CosineSimilarity())),
                                    ("TupletMarginLoss", dict(margin=10.0, scale=32)), ("AngularLoss", {})])
@pytest.mark.parametrize("mode", ["ref_larger", "ref_smaller"])
def test_positive_pair_losses_ref_sizes_match_pml(cls, kw, mode, dtype):
    """PML reads a positive pair's column index as a row index of the batch (LiftedStructureLoss's
    n_per_p): a ref with more rows than the batch, and one with fewer."""
    x, y = inputs(30, 8, 4, dtype, seed=6)
    r, ry = inputs(45 if mode == "ref_larger" else 17, 8, 4, dtype, seed=7)
    ours, pml = getattr(fpl.losses, cls)(**kw), getattr(pml_losses, cls)(**kw)
    check_against_pml(ours, pml, (x, y, None, r, ry), [x, r], [x, r], dtype)


def test_tuplet_margin_attributes_are_pmls():
    ours, pml = fpl.TupletMarginLoss(margin=7.5, scale=32), pml_losses.TupletMarginLoss(margin=7.5, scale=32)
    assert ours.margin == pytest.approx(float(pml.margin), rel=1e-15) and ours.scale == pml.scale
    ours.margin = math.radians(3.0)
    pml.margin = math.radians(3.0)
    x, y = inputs(20, 6, 4, torch.float64, seed=8)
    check_close(ours(x, y), pml(x, y), what="after setting margin in radians")
    with pytest.raises(ValueError, match="CosineSimilarity"):
        fpl.TupletMarginLoss(distance=pml_losses.LiftedStructureLoss().distance)  # LpDistance


@pytest.mark.parametrize("term,lp", [("lifted_structure", True), ("lifted_structure", False),
                                     ("tuplet_margin", False)])
@pytest.mark.parametrize("self_mode", [True, False])
def test_positive_pair_op_opcheck(term, lp, self_mode):
    g = torch.Generator().manual_seed(9)
    q = torch.nn.functional.normalize(torch.randn(13, 5, generator=g, dtype=torch.float64), dim=1)
    r = q if self_mode else torch.nn.functional.normalize(torch.randn(9, 5, generator=g, dtype=torch.float64), dim=1)
    lq = torch.randint(0, 3, (13,), generator=g)
    lr = lq if self_mode else torch.randint(0, 3, (9,), generator=g)
    excl = torch.arange(13) if self_mode else torch.full((13,), -1)
    row = torch.randn(13, generator=g, dtype=torch.float64)
    col = torch.randn(r.shape[0], generator=g, dtype=torch.float64)
    args = (q.clone().requires_grad_(True), r.clone().requires_grad_(True), lq, lr, excl,
            row.requires_grad_(True), col.requires_grad_(True), term, 0.5, 0.1, lp)
    torch.library.opcheck(positive_pairs.positive_pair_rows, args)
    out = positive_pairs.positive_pair_rows(*args)
    torch.library.opcheck(positive_pairs.positive_pair_rows_backward,
                          (torch.ones_like(out), q, r, lq, lr, excl, row.detach(), col.detach(), term, 0.5, 0.1, lp,
                           [True, True, True, True]))
    assert torch.autograd.gradcheck(lambda *t: positive_pairs.positive_pair_rows(*t[:2], lq, lr, excl, *t[2:],
                                                                                 term, 0.5, 0.1, lp),
                                    (args[0], args[1], args[5], args[6]))


def test_positive_pair_op_in_many_chunks(monkeypatch):
    """Pairs split into several chunks of gathers give one chunk's values and gradients."""
    x, y = inputs(60, 8, 3, torch.float64, seed=10)
    loss = fpl.LiftedStructureLoss()
    one, one_grads = value_and_grads(lambda: loss(x, y), [x])
    monkeypatch.setattr(positive_pairs, "CHUNK_PAIRS", 37)
    many, many_grads = value_and_grads(lambda: loss(x, y), [x])
    check_close(many, one, what="value")
    check_close(many_grads[0], one_grads[0], what="grad")


# ---- NPairsLoss, InstanceLoss ------------------------------------------------------------------------
@pytest.mark.parametrize("cls", ["NPairsLoss", "InstanceLoss"])
def test_self_only_losses_refuse_what_pml_refuses(cls):
    x, y = inputs(12, 4, 3, torch.float32, seed=11)
    r, ry = inputs(12, 4, 3, torch.float32, seed=12)
    ours, pml = getattr(fpl.losses, cls)(), getattr(pml_losses, cls)()
    for call in (lambda m: m(x, y, None, r, ry), lambda m: m(x, None)):
        with pytest.raises(ValueError):
            call(pml)
        with pytest.raises(ValueError, match=cls):
            call(ours)
    check_close(ours(x, y, None, x, y), pml(x, y, None, x, y), what="ref_emb is embeddings")
    if cls == "InstanceLoss":
        idx = pml_miners.MultiSimilarityMiner(0.2)(x, y)
        with pytest.raises(ValueError, match="indices_tuple"):
            ours(x, y, idx)


def test_n_pairs_num_pairs_is_pmls():
    x, y = inputs(20, 4, 6, torch.float64, seed=13)
    ours, pml = fpl.NPairsLoss(), pml_losses.NPairsLoss()
    check_close(ours(x, y), pml(x, y), what="value")
    assert ours.num_pairs == pml.num_pairs > 0


def test_instance_gamma_and_other_distances():
    ours = fpl.InstanceLoss(gamma=32)
    assert ours.gamma == 32 and type(ours.distance).__name__ == "CosineSimilarity"
    with pytest.raises(ValueError, match="CosineSimilarity"):
        fpl.InstanceLoss(distance=pml_losses.MarginLoss().distance)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fused path: no fallback warning
        x, y = inputs(10, 4, 3, torch.float32, seed=14)
        ours(x, y)


# ---- ThresholdConsistentMarginLoss -------------------------------------------------------------------
def test_tcm_with_a_ref_is_computed_as_pml_computes_it(monkeypatch):
    """PML's TCM takes both ends of a pair from embeddings, also with a ref_emb (its indices then
    read rows of the batch): reproduced unfused, with a one-time warning at the caller's line."""
    monkeypatch.setattr(fpl.losses._base, "_warned", set())
    x, y = inputs(30, 8, 4, torch.float64, seed=15)
    r, ry = inputs(20, 8, 4, torch.float64, seed=16)
    ours, pml = fpl.ThresholdConsistentMarginLoss(margin_plus=0.4), pml_losses.ThresholdConsistentMarginLoss(
        margin_plus=0.4)
    with pytest.warns(UserWarning, match="ThresholdConsistentMarginLoss with a ref_emb") as record:
        check_against_pml(ours, pml, (x, y, None, r, ry), [x], [x], torch.float64)
    assert record[0].filename == __file__
    idx = pml_miners.MultiSimilarityMiner(0.2)(x.detach(), y, r, ry)
    check_against_pml(ours, pml, (x, y, idx, r, ry), [x], [x], torch.float64)


# ---- AngularLoss ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("self_mode", [True, False])
def test_angular_op_opcheck_and_chunks(self_mode, monkeypatch):
    """The op (derived queries through the engine) and its backward op: opcheck; gradcheck; several
    chunks of pairs give one chunk's result; PML reads the negatives' raw rows (norms not 1)."""
    from fused_pairloss.losses import angular
    g = torch.Generator().manual_seed(17)
    x = 2 * torch.randn(13, 5, generator=g, dtype=torch.float64)
    r_raw = x if self_mode else 3 * torch.randn(9, 5, generator=g, dtype=torch.float64)
    q_hat = torch.nn.functional.normalize(x, dim=1)
    r_hat = torch.nn.functional.normalize(r_raw, dim=1)
    lq = torch.randint(0, 3, (13,), generator=g)
    lr = lq if self_mode else torch.randint(0, 3, (9,), generator=g)
    excl = torch.arange(13) if self_mode else torch.full((13,), -1)
    c_neg, c_ap = angular._constants(35.0)
    leaves = [t.clone().requires_grad_(True) for t in (q_hat, r_hat, r_raw)]
    for symmetric in ((False, True) if self_mode else (False,)):
        args = (lq, lr, excl, c_neg, c_ap, "cpu", symmetric)
        torch.library.opcheck(angular.angular_rows, (*leaves, *args))
        out = angular.angular_rows(q_hat, r_hat, r_raw, *args)
        torch.library.opcheck(angular.angular_rows_backward, (torch.ones_like(out), q_hat, r_hat, r_raw, *args))
        assert torch.autograd.gradcheck(lambda *t: angular.angular_rows(*t, *args), leaves)
    if self_mode:  # each unordered pair once: the same sums
        check_close(angular.angular_rows(q_hat, q_hat, r_raw, lq, lr, excl, c_neg, c_ap, "cpu", True),
                    angular.angular_rows(q_hat, q_hat, r_raw, lq, lr, excl, c_neg, c_ap, "cpu", False),
                    what="symmetric walk")
    x, y = inputs(50, 8, 4, torch.float64, seed=18)
    loss = fpl.AngularLoss()
    one, one_grads = value_and_grads(lambda: loss(x, y), [x])
    monkeypatch.setattr(angular, "CHUNK_PAIRS", 29)
    many, many_grads = value_and_grads(lambda: loss(x, y), [x])
    check_close(many, one, what="value")
    check_close(many_grads[0], one_grads[0], what="grad")


def test_angular_attributes_are_pmls():
    ours, pml = fpl.AngularLoss(alpha=30), pml_losses.AngularLoss(alpha=30)
    assert torch.equal(ours.alpha, pml.alpha)
    with pytest.raises(ValueError, match="labels"):
        ours(torch.randn(4, 3), None, pml_miners.MultiSimilarityMiner()(torch.randn(4, 3), torch.tensor([0, 0, 1, 1])))
