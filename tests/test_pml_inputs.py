"""What PML's forward accepts, the modules accept (docs/api.md "Bad input"), each against PML itself:
float and bool labels, a ref_emb without ref_labels, ref_labels without a ref_emb, an empty batch,
hyper-parameters given as tensors or numpy numbers; and the warnings point at the caller's line."""
import math
import warnings

import numpy as np
import pytest
import torch

import fused_pairloss as fpl
from fused_pairloss.losses import REGISTRY
from fused_pairloss.losses import _base

from kit import LOSSES, PAIR_LOSSES

L = pytest.importorskip("pytorch_metric_learning.losses")
from pytorch_metric_learning import distances, miners, reducers  # noqa: E402
from pytorch_metric_learning.distances import CosineSimilarity, LpDistance  # noqa: E402

# the pair losses of the test kit as PML modules take them (a MultiSimilarity miner is its own test)
MODULE_LOSSES = [n for n in PAIR_LOSSES if "miner_epsilon" not in LOSSES[n].kwargs]
# PML's NCALoss and AngularLoss fail on a ref_emb without ref_labels (AttributeError); NPairs,
# Instance, SmoothAP, FastAP, RankedList, PNP refuse a ref_emb
REF_WITHOUT_LABELS = [n for n in MODULE_LOSSES if LOSSES[n].entry.ref_emb
                      and LOSSES[n].loss not in ("NCALoss", "AngularLoss", "SmoothAPLoss", "FastAPLoss",
                                                 "RankedListLoss", "PNPLoss")]


def modules(name, **overrides):
    """(ours, PML's) module of a kit loss, with PML's distance objects."""
    kw = dict(LOSSES[name].kwargs, **overrides)
    distance = kw.pop("distance", None)
    if distance is not None:
        kw["distance"] = {"cosine": CosineSimilarity, "lp": LpDistance}[distance]()
    cls = LOSSES[name].loss
    return getattr(fpl.losses, cls)(**kw), getattr(L, cls)(**kw)


def batch(seed=0, n=12):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.arange(n) % 3


def value_and_grad(loss, x, *args, **kw):
    x = x.clone().requires_grad_(True)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(x.dtype)  # PML's SmoothAPLoss sums in a buffer of the default dtype
    try:
        value = loss(x, *args, **kw)
    finally:
        torch.set_default_dtype(previous)
    grad, = torch.autograd.grad(value, x, allow_unused=True)
    return value.detach(), grad


def assert_same(ours, pml):
    for a, b in zip(ours, pml):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("name", [n for n in MODULE_LOSSES if n != "smoothap"])  # PML's bincount refuses them
def test_float_and_bool_labels_as_pml(name):
    x, y = batch(1)
    for labels in (y.double() / 2, y == 0):  # PML compares labels with == only
        ours, pml = modules(name)
        assert_same(value_and_grad(ours, x, labels), value_and_grad(pml, x, labels))


def test_proxy_nca_takes_the_labels_pml_compares():
    """PML's ProxyNCALoss compares the labels with its proxies' classes (never indexes with them):
    float and bool labels, and labels that are no class (the row's p = 0, dropped by PML's mean)."""
    x, y = batch(4, n=16)
    ours, pml = fpl.ProxyNCALoss(3, 6), L.ProxyNCALoss(3, 6)
    pml.load_state_dict(ours.state_dict())
    idx = miners.MultiSimilarityMiner()(x, y)
    for labels in (y.double(), y == 1, torch.where(y == 0, 3, y), y.double() + 0.5 * (y == 2)):
        assert_same(value_and_grad(ours, x, labels), value_and_grad(pml, x, labels))
        assert_same(value_and_grad(ours, x, labels, idx), value_and_grad(pml, x, labels, idx))


@pytest.mark.parametrize("name", REF_WITHOUT_LABELS)
def test_ref_emb_without_ref_labels_as_pml(name):
    """PML: the labels stand for ref_emb's rows too, and the diagonal is no pair (ref_labels is
    labels)."""
    x, y = batch(2)
    r = batch(3)[0]
    ours, pml = modules(name)
    assert_same(value_and_grad(ours, x, y, ref_emb=r), value_and_grad(pml, x, y, ref_emb=r))


@pytest.mark.parametrize("name", ["contrastive", "triplet", "ms", "nca"])
def test_ref_labels_without_ref_emb_is_ignored_as_pml(name):
    x, y = batch(4)
    ours, pml = modules(name)
    other = torch.arange(12) % 5
    assert_same(value_and_grad(ours, x, y, ref_labels=other), value_and_grad(pml, x, y, ref_labels=other))


def test_a_ref_emb_without_ref_labels_of_other_rows_names_ref_labels():
    x, y = batch(5)
    with pytest.raises(ValueError, match="ref_labels"):
        fpl.ContrastiveLoss()(x, y, ref_emb=x[:5])


def test_nan_labels_name_labels():
    x, y = batch(6)
    labels = y.double()
    labels[3] = math.nan
    with pytest.raises(ValueError, match="labels must not contain NaN"):
        fpl.ContrastiveLoss()(x, labels)


def _constructed(cls_name):
    if REGISTRY[cls_name].kind == "class":
        sizes = REGISTRY[cls_name].size_kwargs(3, 6)
        return getattr(fpl.losses, cls_name)(**sizes), getattr(L, cls_name, None) and getattr(L, cls_name)(**sizes)
    kw = dict(margin=0.4, Tn=2.0) if cls_name == "RankedListLoss" else {}
    return getattr(fpl.losses, cls_name)(**kw), getattr(L, cls_name)(**kw)


@pytest.mark.parametrize("cls_name", [n for n in REGISTRY if REGISTRY[n].kind in ("pair", "class")])
def test_an_empty_batch_gives_pmls_value(cls_name):
    ours, pml = _constructed(cls_name)
    x = torch.randn(0, 6, dtype=torch.float64, requires_grad=True)
    y = torch.zeros(0, dtype=torch.long)
    if cls_name == "SmoothAPLoss":  # PML refuses it (its classes of one size)
        for loss in (ours, pml):
            with pytest.raises(ValueError):
                loss(x, y)
        return
    value = ours(x, y)
    expected = pml(x, y) if pml is not None else torch.zeros((), dtype=torch.float64)
    torch.testing.assert_close(value, expected, equal_nan=True, rtol=0, atol=0)
    grad, = torch.autograd.grad(value, x)
    assert grad.shape == x.shape


@pytest.mark.parametrize("cls_name", [n for n in REGISTRY if REGISTRY[n].kind == "pair"])
def test_an_empty_ref_emb_as_pml(cls_name):
    """PML's zero loss, NCA's NaN, or a ValueError where PML refuses a ref_emb."""
    ours, pml = _constructed(cls_name)
    x, y = batch(7)
    r, ry = x[:0], y[:0]
    try:
        expected = pml(x, y, ref_emb=r, ref_labels=ry)
    except ValueError:
        with pytest.raises(ValueError):
            ours(x, y, ref_emb=r, ref_labels=ry)
        return
    torch.testing.assert_close(ours(x, y, ref_emb=r, ref_labels=ry), expected.detach(), equal_nan=True,
                               rtol=0, atol=0)


@pytest.mark.parametrize("name", [n for n in MODULE_LOSSES if any(
    isinstance(v, (int, float)) and not isinstance(v, bool) for v in LOSSES[n].kwargs.values())])
@pytest.mark.parametrize("wrap", [lambda v: torch.tensor(v, dtype=torch.float64 if isinstance(v, float) else None),
                                  np.asarray, lambda v: np.float64(v) if isinstance(v, float)
                                  else np.int64(v)], ids=["tensor", "numpy_array", "numpy_scalar"])
def test_tensor_and_numpy_hyper_parameters_as_pml(name, wrap):
    numbers = {k: v for k, v in LOSSES[name].kwargs.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    x, y = batch(8)
    plain, _ = modules(name)
    wrapped, _ = modules(name, **{k: wrap(v) for k, v in numbers.items()})
    assert_same(value_and_grad(wrapped, x, y), value_and_grad(plain, x, y))


def test_class_loss_sizes_as_numpy_and_tensor_numbers():
    x, y = batch(9)
    plain = fpl.ArcFaceLoss(3, 6)
    for args in ((np.int64(3), np.int64(6)), (torch.tensor(3), torch.tensor(6))):
        other = fpl.ArcFaceLoss(*args)
        other.load_state_dict(plain.state_dict())
        assert_same((other(x, y),), (plain(x, y),))


def test_warnings_point_at_the_callers_line_and_name_the_argument(monkeypatch):
    monkeypatch.setattr(_base, "_warned", set())
    x, y = batch(10)
    with pytest.warns(UserWarning, match=r"ContrastiveLoss with reducer=MeanReducer\(\)") as w:
        fpl.ContrastiveLoss(reducer=reducers.MeanReducer())(x, y)
    assert [r.filename for r in w] == [__file__]
    idx = miners.MultiSimilarityMiner()(x, y)
    with pytest.warns(UserWarning, match="indices_tuple") as w:
        fpl.ProxyAnchorLoss(3, 6)(x.float(), y, idx)
    assert [r.filename for r in w] == [__file__]


def test_ranked_list_warns_once_as_pml():
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        fpl.RankedListLoss(margin=0.4, Tn=10)
    assert [str(r.message)[:20] for r in w] == ["Values of Tp or Tn a"]
    assert w[0].filename == __file__


@pytest.mark.parametrize("cls_name", [n for n in REGISTRY if REGISTRY[n].kind in ("pair", "class")
                                      and REGISTRY[n].in_pml])
def test_submodules_and_attributes_as_pmls(cls_name):
    """distance, reducer (and cross_entropy) are submodules as in PML; PML's regularizer attributes exist."""
    ours, pml = _constructed(cls_name)
    assert sorted(k for k, _ in ours.named_modules()) == sorted(k for k, _ in pml.named_modules())
    assert isinstance(ours, L.BaseMetricLossFunction)
    for attr in ("embedding_regularizer", "embedding_reg_weight", "collect_stats"):
        assert getattr(ours, attr) == getattr(pml, attr), attr
    if REGISTRY[cls_name].kind == "class" and cls_name != "P2SGradLoss":  # PML's P2SGrad has no weight regularizer
        for attr in ("weight_regularizer", "weight_reg_weight"):
            assert getattr(ours, attr) == getattr(pml, attr), attr
    # the record-keeper's list of hyper-parameters, each readable; PML leaves a few at its record
    # default 0 that it never sets (NormalizedSoftmax's num_classes, ...), where ours are the values
    assert getattr(ours, "_record_these", None) == getattr(pml, "_record_these", None)
    for k in getattr(pml, "_record_these", None) or ():
        assert getattr(ours, k) == getattr(pml, k) or getattr(pml, k) == 0, k


def test_pmls_distributed_wrapper_takes_ours():
    from pytorch_metric_learning.utils.distributed import DistributedLossWrapper
    x, y = batch(11)
    with pytest.warns(UserWarning, match="non-distributed"):  # PML's: one process, the loss as is
        value = DistributedLossWrapper(fpl.ContrastiveLoss())(x, y)
    torch.testing.assert_close(value, L.ContrastiveLoss()(x, y))
    memory = fpl.CrossBatchMemory(fpl.ContrastiveLoss(), 6, memory_size=16)
    assert isinstance(memory, L.CrossBatchMemory)
    DistributedLossWrapper(memory)


def test_collected_stats_are_set_on_the_module():
    x, y = batch(12)
    ours, pml = fpl.ArcFaceLoss(3, 6, collect_stats=True), L.ArcFaceLoss(3, 6, collect_stats=True)
    pml.load_state_dict(ours.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's own warning
        torch.testing.assert_close(ours(x, y), pml(x, y))
    assert ours.avg_angle == pytest.approx(pml.avg_angle)


@pytest.mark.parametrize("make,name", [(lambda: fpl.ArcFaceLoss(3, 8), "embedding_size"),
                                       (lambda: fpl.ProxyAnchorLoss(3, 8), "embedding_size"),
                                       (lambda: fpl.P2SGradLoss(8, 3), "descriptors_dim")])
def test_a_class_loss_of_another_width_names_the_constructor_argument(make, name):
    x, y = batch(13)
    with pytest.raises(ValueError, match=f"built with {name}=8"):
        make()(x, y)


def test_soft_triple_takes_any_similarity_as_pml():
    from pytorch_metric_learning.distances import DotProductSimilarity
    x, y = batch(14)
    dot = dict(distance=DotProductSimilarity(normalize_embeddings=False), centers_per_class=2)
    ours, pml = fpl.SoftTripleLoss(3, 6, **dot), L.SoftTripleLoss(3, 6, **dot)
    pml.load_state_dict(ours.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(ours(x, y), pml(x, y))
    with pytest.raises(ValueError, match="similarity"):
        fpl.SoftTripleLoss(3, 6, distance=LpDistance())


AUTOCAST_DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", AUTOCAST_DEVICES)
@pytest.mark.parametrize("cls_name", [n for n in REGISTRY if REGISTRY[n].kind == "pair" and REGISTRY[n].in_pml])
def test_pair_loss_dtype_under_autocast_is_pmls(cls_name, device):
    """Half-precision inputs under either half type's autocast: the module's value has the dtype of
    PML's (asked of PML's class on the device: CUDA's autocast runs exp, log and sum in fp32, the
    CPU's not), wherever PML runs."""
    g = torch.Generator().manual_seed(17)
    x, y = torch.randn(16, 8, generator=g).to(device), (torch.arange(16) // 4).to(device)
    kw = dict(margin=0.4, Tn=2.0) if cls_name == "RankedListLoss" else {}
    checked = 0
    for in_dtype in (torch.float32, torch.bfloat16, torch.float16):
        for autocast_dtype in (torch.bfloat16, torch.float16):
            ours, pml = getattr(fpl.losses, cls_name)(**kw).to(device), getattr(L, cls_name)(**kw).to(device)
            with torch.autocast(device, dtype=autocast_dtype), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    pml_value = pml(x.to(in_dtype), y)
                except Exception:  # noqa: BLE001 - PML refuses some (cdist in bf16, ...)
                    continue
                assert ours(x.to(in_dtype), y).dtype == pml_value.dtype, (in_dtype, autocast_dtype)
                checked += 1
    assert checked >= 2


@pytest.mark.parametrize("device", AUTOCAST_DEVICES)
@pytest.mark.parametrize("cls_name", [n for n in REGISTRY if REGISTRY[n].kind == "class" and REGISTRY[n].in_pml])
def test_class_loss_dtype_under_autocast_is_pmls(cls_name, device):
    """PML's cross-entropy (MSE for P2SGrad) runs in fp32 under autocast: the value is fp32 for
    half-precision inputs, ProxyAnchor's and (fp16) ProxyNCA's stay in the input dtype; the
    module's value has PML's dtype in every case PML runs, and the random state after construction
    is PML's."""
    x, y = (t.to(device) for t in batch(16))
    checked = 0
    for in_dtype in (torch.bfloat16, torch.float16):
        for autocast_dtype in (torch.bfloat16, torch.float16):
            ours, pml = (m.to(device) for m in _constructed(cls_name))
            pml.load_state_dict(ours.state_dict())
            with torch.autocast(device, dtype=autocast_dtype), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    pml_value = pml(x.to(in_dtype), y)
                except Exception:  # noqa: BLE001 - PML refuses some half-precision weights (P2SGrad's unit check)
                    continue
                assert ours(x.to(in_dtype), y).dtype == pml_value.dtype, (in_dtype, autocast_dtype)
                checked += 1
    assert checked >= 2
    torch.manual_seed(5)
    getattr(fpl.losses, cls_name)(**REGISTRY[cls_name].size_kwargs(3, 6))
    after_ours = torch.rand(3)
    torch.manual_seed(5)
    getattr(L, cls_name)(**REGISTRY[cls_name].size_kwargs(3, 6))
    assert torch.equal(after_ours, torch.rand(3))


@pytest.mark.parametrize("cls_name", [n for n in REGISTRY if REGISTRY[n].kind in ("pair", "class")])
def test_modules_pickle(cls_name):
    """torch.save of a whole module (its attributes: PML's objects, the init function) works."""
    import io
    ours, _ = _constructed(cls_name)
    torch.save(ours, io.BytesIO())


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["contrastive", "triplet", "ms", "nca"])
def test_labels_on_another_device_as_pml(name):
    """PML moves the labels to the embeddings' device (c_f.to_device): CUDA embeddings, CPU labels."""
    x, y = batch(15)
    x = x.cuda()
    ours, pml = modules(name)
    assert_same(value_and_grad(ours, x, y), value_and_grad(pml, x, y))
    arc, arc_pml = fpl.ArcFaceLoss(3, 6).cuda(), L.ArcFaceLoss(3, 6).cuda()
    arc_pml.load_state_dict(arc.state_dict())
    assert_same((arc(x, y),), (arc_pml(x, y),))
    xbm, xbm_pml = (lib.CrossBatchMemory(lib.MultiSimilarityLoss(), 6, memory_size=32) for lib in (fpl, L))
    for step in range(3):
        assert_same((xbm(x + step, y),), (xbm_pml(x + step, y),))


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["angular", "ipv", "triplet", "contrastive", "lifted"])
def test_indices_on_another_device_as_pml(name):
    """PML's losses index a CUDA matrix with CPU indices: an indices_tuple on the CPU beside CUDA
    embeddings is taken (moved to their device), with PML's value."""
    from pytorch_metric_learning.utils import loss_and_miner_utils as lmu
    x, y = batch(16)
    triplets = lmu.get_all_triplets_indices(y)
    ours, pml = modules(name)
    assert_same(value_and_grad(ours, x.cuda(), y.cuda(), triplets), value_and_grad(pml, x.cuda(), y.cuda(), triplets))


def test_a_learnable_hyper_parameter_is_refused_by_name():
    """PML would train it; the fused ops take numbers: an error naming it, not a silent detach."""
    with pytest.raises(TypeError, match="margin"):
        fpl.TripletMarginLoss(margin=torch.nn.Parameter(torch.tensor(0.2)))


def test_our_miners_tuple_of_float_labels_without_labels_as_pml():
    x, y = batch(16)
    ours = fpl.ContrastiveLoss()(x, None, fpl.miners.MultiSimilarityMiner(0.5)(x, y.double()))
    theirs = L.ContrastiveLoss()(x, None, miners.MultiSimilarityMiner(0.5)(x, y.double()))
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["tcm", "ipv", "contrastive", "triplet"])
def test_a_tuple_with_a_ref_emb_without_ref_labels_as_pml(name):
    """PML reads the tuple only, whatever ref_emb's rows."""
    x, y = batch(17)
    r = batch(18, n=7)[0]
    idx = miners.MultiSimilarityMiner(0.5)(x, y, r, torch.arange(7) % 3)
    ours, pml = modules(name)
    assert_same(value_and_grad(ours, x, y, idx, ref_emb=r), value_and_grad(pml, x, y, idx, ref_emb=r))


def test_wrapper_labels_and_ref_errors_name_the_argument():
    from fused_pairloss import _validation as V
    with pytest.raises(ValueError, match="whole numbers"):
        V.integral_labels(torch.tensor([1e19, 2e19, -1e19]))  # would overflow int64 and merge classes
    assert V.integral_labels(torch.tensor([3.0, -2.0])).tolist() == [3, -2]
    x, y = batch(19)
    with pytest.raises(ValueError, match="ref_labels"):  # an empty ref with labels of other rows
        fpl.ContrastiveLoss()(x, y, ref_emb=x[:0], ref_labels=y[:3])
    with pytest.raises(ValueError, match="ref_labels"):  # PML would read a 7-row ref with 12 labels
        fpl.miners.PairMarginMiner()(x, y, x[:7])


# ---- half precision (PML's dtypes of its similarity matrix) --------------------------------------------
def _fp16_case(seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(24, 8, generator=g), torch.arange(24) % 6


@pytest.mark.parametrize("how", ["fp16_inputs", "fp16_autocast"])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_ntxent_half_precision_uses_pmls_tiny(how, backend):
    """NTXent's tiny is the smallest normal of PML's similarity dtype (fp16's, 6e-5: it caps each
    pair term at 9.7), not of the dtype the engine sums in: PML's value and gradient."""
    x, y = _fp16_case()
    results = []
    for loss in (fpl.NTXentLoss(backend=backend), L.NTXentLoss()):
        xx = (x.half() if how == "fp16_inputs" else x).clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.float16, enabled=how == "fp16_autocast"):
            value = loss(xx, y)
        results.append((value, torch.autograd.grad(value.float(), xx)[0]))
    (a, ga), (b, gb) = results
    assert a.dtype == b.dtype == torch.float16
    assert abs(float(a) - float(b)) <= 4e-3 * abs(float(b))  # fp16 rounding of PML's own sums
    assert (ga.float() - gb.float()).abs().max() <= 2e-2 * gb.float().abs().max()
    # the cap matters here: without it (fp32's tiny) the value moves by more than the tolerance
    assert abs(float(L.NTXentLoss()(x, y)) - float(b)) > 0.1


def test_loss_dtype_under_autocast_with_our_miners_pairs():
    """A fused miner's rule keeps PML's dtype under autocast (the cosine matrix's: bf16)."""
    x, y = _fp16_case(4)
    for name in ("MultiSimilarityLoss", "CircleLoss", "NTXentLoss", "SupConLoss"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours = getattr(fpl, name)()(x, y, fpl.miners.MultiSimilarityMiner()(x, y))
            theirs = getattr(L, name)()(x, y, miners.MultiSimilarityMiner()(x, y))
        assert ours.dtype == theirs.dtype == torch.bfloat16, name


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_nca_fp16_as_pml(backend):
    """PML's LpDistance takes fp16 through pairwise_distance (torch.cdist has no fp16 kernel): the
    reference too, so NCA in fp16 with a miner's tuple, a ref of other labels, or the reference
    backend gives PML's value."""
    x, y = _fp16_case(5)
    x = x.half()
    idx = miners.BatchHardMiner()(x, y)
    for args in ((x, y), (x, y, idx), (x, y, None, x, (y + 1) % 6)):
        ours = fpl.NCALoss(backend=backend)(*args)
        theirs = L.NCALoss()(*args)
        assert ours.dtype == theirs.dtype and abs(float(ours) - float(theirs)) <= 4e-3 * abs(float(theirs))


@pytest.mark.parametrize("cls_name", ["CosFaceLoss", "ArcFaceLoss", "LargeMarginSoftmaxLoss", "SphereFaceLoss",
                                      "SubCenterArcFaceLoss", "CircleLoss", "TupletMarginLoss", "InstanceLoss"])
def test_cosine_only_losses_refuse_a_dot_product_as_pml(cls_name):
    """PML asserts a CosineSimilarity for these (DotProductSimilarity, even normalized, is refused):
    ours raise a ValueError naming distance."""
    from pytorch_metric_learning.distances import DotProductSimilarity
    entry = REGISTRY[cls_name]
    sizes = entry.size_kwargs(3, 6) if entry.kind == "class" else {}
    with pytest.raises(AssertionError):
        getattr(L, cls_name)(**sizes, distance=DotProductSimilarity())
    with pytest.raises(ValueError, match="distance"):
        getattr(fpl.losses, cls_name)(**sizes, distance=DotProductSimilarity())


def test_autocast_dtype_follows_the_modules_settings_and_wrappers():
    """PML's dtype is asked of a twin with the module's own settings (ProxyNCA with a cosine runs
    another softmax path than with its default LpDistance), for a user's subclass too, and the
    fused CrossBatchMemory step returns it as the loss's own call does."""
    x, y = batch(18, n=8)
    for in_dtype in (torch.float16, torch.bfloat16):
        with torch.autocast("cpu", dtype=torch.bfloat16), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours = fpl.ProxyNCALoss(3, 6, distance=CosineSimilarity())
            pml = L.ProxyNCALoss(3, 6, distance=CosineSimilarity())
            pml.load_state_dict(ours.state_dict())
            assert ours(x.to(in_dtype), y).dtype == pml(x.to(in_dtype), y).dtype

            class MyArcFace(fpl.ArcFaceLoss):
                pass
            assert MyArcFace(3, 6)(x.to(in_dtype), y).dtype == L.ArcFaceLoss(3, 6)(x.to(in_dtype), y).dtype
            for name in ("TripletMarginLoss", "GeneralizedLiftedStructureLoss", "MultiSimilarityLoss"):
                xbm, xbm_pml = (lib.CrossBatchMemory(getattr(lib, name)(), 6, memory_size=16) for lib in (fpl, L))
                xbm.embedding_memory = xbm.embedding_memory.to(in_dtype)
                xbm_pml.embedding_memory = xbm_pml.embedding_memory.to(in_dtype)
                assert xbm(x.to(in_dtype), y).dtype == xbm_pml(x.to(in_dtype), y).dtype, name


def test_a_users_subclass_builds_and_its_init_function_runs_once():
    class MyNPairs(fpl.NPairsLoss):
        pass
    x, y = batch(19, n=8)
    y = torch.arange(8) // 2
    assert_same(value_and_grad(MyNPairs(), x, y), value_and_grad(L.NPairsLoss(), x, y))
    calls = []

    def init(weight):
        calls.append(weight.shape)
        torch.nn.init.normal_(weight)
    fpl.ArcFaceLoss(3, 6, weight_init_func=init)
    assert calls == [torch.Size([6, 3])]


def test_extreme_hyper_parameters_give_pmls_value():
    """A temperature of 1e-39 (a scale beyond float's range in the declaration) is PML's NaN, not an
    error about a field the user never wrote."""
    x, y = batch(20)
    for make in (lambda lib: lib.NTXentLoss(temperature=1e-39), lambda lib: lib.ContrastiveLoss(neg_margin=1e39)):
        a, b = make(fpl.losses)(x, y), make(L)(x, y)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0, equal_nan=True)


def test_snr_names_an_index_of_another_batch():
    x, y = batch(21, n=6)
    idx = (torch.tensor([0, 9]), torch.tensor([1, 2]), torch.tensor([0, 1]), torch.tensor([3, 4]))
    with pytest.raises(ValueError, match="indices_tuple"):
        fpl.SignalToNoiseRatioContrastiveLoss()(x, y, idx)


def test_attributes_assigned_after_construction_as_pml():
    """An attribute only PML computes, set later, makes the module PML's computation; a module PML
    computes gets the attributes assigned on it; DynamicSoftMarginLoss's state is PML's there."""
    x, y = batch(22, n=16)
    cases = [("TripletMarginLoss", {}, dict(swap=True)), ("TripletMarginLoss", {}, dict(smooth_loss=True)),
             ("TripletMarginLoss", dict(swap=True, margin=0.5), dict(margin=0.05)),  # back to the default
             ("TripletMarginLoss", dict(swap=True), dict(margin=0.5)),
             ("TripletMarginLoss", dict(swap=True), dict(swap=False)),
             ("MarginLoss", dict(num_classes=3), dict(margin=0.5, nu=0.3)),
             ("LiftedStructureLoss", dict(collect_stats=True), dict(neg_margin=0.4))]
    for name, ctor, later in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours, pml = getattr(fpl.losses, name)(**ctor), getattr(L, name)(**{**ctor, **later})
            for k, v in later.items():
                setattr(ours, k, v)
            assert_same(value_and_grad(ours, x, y), value_and_grad(pml, x, y))
    with warnings.catch_warnings():  # assigned back and forth, a tensor beta, a reducer then a PML-only one
        warnings.simplefilter("ignore")
        ours = fpl.losses.TripletMarginLoss()
        for k, v in (("swap", True), ("swap", False), ("reducer", reducers.MeanReducer()), ("swap", True)):
            setattr(ours, k, v)
            pml = L.TripletMarginLoss(swap=ours.swap, reducer=ours.reducer)
            assert_same(value_and_grad(ours, x, y), value_and_grad(pml, x, y))
        ours, pml = fpl.losses.MarginLoss(collect_stats=True), L.MarginLoss(collect_stats=True)
        ours.beta = pml.beta = torch.tensor([0.3])
        assert_same(value_and_grad(ours, x, y), value_and_grad(pml, x, y))
        xbm, xbm_pml = (lib.CrossBatchMemory(lib.TripletMarginLoss(), 6, memory_size=32) for lib in (fpl, L))
        xbm.loss.swap = xbm_pml.loss.swap = True
        assert_same(value_and_grad(xbm, x, y), value_and_grad(xbm_pml, x, y))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours, pml = fpl.losses.DynamicSoftMarginLoss(collect_stats=True), L.DynamicSoftMarginLoss(collect_stats=True)
        for _ in range(2):
            assert_same(value_and_grad(ours, x, y), value_and_grad(pml, x, y))
        torch.testing.assert_close(ours.hist_, pml.hist_)
        ours.hist_ = pml.hist_ = torch.full_like(pml.hist_, 0.1)
        assert_same(value_and_grad(ours, x, y), value_and_grad(pml, x, y))


def test_regularizer_arguments_read_and_scaled_as_pmls():
    """embedding_regularizer / embedding_reg_weight given to the constructor read as given (PML's
    attributes), and a weight scaled later (a decay schedule) changes the loss as on PML's."""
    from pytorch_metric_learning.regularizers import LpRegularizer
    x, y = batch(35, n=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for make in (lambda lib: lib.ContrastiveLoss(embedding_regularizer=LpRegularizer(), embedding_reg_weight=0.3),
                     lambda lib: lib.ArcFaceLoss(4, 6, embedding_regularizer=LpRegularizer(),
                                                 embedding_reg_weight=0.3)):
            ours, pml = make(fpl), make(L)
            pml.load_state_dict(ours.state_dict())
            assert isinstance(ours.embedding_regularizer, LpRegularizer) and ours.embedding_reg_weight == 0.3
            ours.embedding_reg_weight *= 0.5
            pml.embedding_reg_weight *= 0.5
            assert_same(value_and_grad(ours, x, y), value_and_grad(pml, x, y))


def test_class_loss_regularizer_reducer_and_init_function_as_pmls():
    """SoftTripleLoss with PML's SparseCentersRegularizer (fused): PML's MultipleReducers as
    `reducer`, whose sub-reducer set in place is PML's computation; a class loss PML computes (a
    reducer) calls the user's weight_init_func once, as PML's."""
    from pytorch_metric_learning.regularizers import SparseCentersRegularizer
    x, y = batch(36, n=12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours, pml = (lib.SoftTripleLoss(4, 6, centers_per_class=3, weight_regularizer=SparseCentersRegularizer(4, 3))
                     for lib in (fpl, L))
        pml.load_state_dict(ours.state_dict())
        assert sorted(ours.reducer.reducers) == sorted(pml.reducer.reducers) == ["loss", "weight_reg_loss"]
        ours.reducer.reducers["weight_reg_loss"] = reducers.SumReducer()
        pml.reducer.reducers["weight_reg_loss"] = reducers.SumReducer()
        assert_same(value_and_grad(ours, x, y), value_and_grad(pml, x, y))
        for lib in (fpl, L):
            calls = []
            lib.ArcFaceLoss(4, 6, weight_init_func=lambda w: calls.append(1) or torch.nn.init.normal_(w),
                            reducer=reducers.SumReducer())
            assert len(calls) == 1, lib.__name__


def test_dynamic_soft_margin_num_bins_set_before_the_first_call():
    """num_bins set before the first call: the bins follow it (docs/api.md), the empty state takes its
    size, the loss is that of a module built with it; once the state holds a histogram, another
    num_bins is a ValueError naming it."""
    x, y = batch(31, n=16)
    for kw in ({}, dict(reducer=reducers.MeanReducer())):  # fused; PML's computation (its delta is ours)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours, built = fpl.DynamicSoftMarginLoss(**kw), fpl.DynamicSoftMarginLoss(num_bins=20, **kw)
            ours.num_bins = 20
            torch.testing.assert_close(ours(x, y), built(x, y))
            assert ours.hist_.shape == (20,)
            ours.min_val, built.min_val = -3.0, -3.0
            torch.testing.assert_close(ours(x, y), built(x, y))
    ours.num_bins = 10
    with pytest.raises(ValueError, match="num_bins=10 does not match the histogram state hist_"):
        ours(x, y)
    ours, built = fpl.DynamicSoftMarginLoss(), fpl.DynamicSoftMarginLoss()
    ours.num_bins = np.int64(10)  # as the constructor takes it
    torch.testing.assert_close(ours(x, y), built(x, y))
    ours.min_val, ours.num_bins = -1.9, 19
    assert ours.delta == pytest.approx(0.2)  # derived, read-only
    with pytest.raises(AttributeError, match="set min_val or num_bins"):
        ours.delta = 0.5
    with warnings.catch_warnings():  # PML's computation: the state stored detached, a second step runs
        warnings.simplefilter("ignore")
        ours = fpl.DynamicSoftMarginLoss(reducer=reducers.MeanReducer())
        for _ in range(2):
            xx = x.detach().clone().requires_grad_(True)
            ours(xx, y).backward()
            assert not ours.hist_.requires_grad


@pytest.mark.parametrize("name", ["TripletMarginLoss", "MultiSimilarityLoss", "CircleLoss", "NTXentLoss"])
def test_distance_and_reducer_assigned_after_construction(name):
    """PML's losses read `distance` and `reducer` at each call: one assigned on ours after
    construction is computed as PML's (a distance the fused path has, fused with it; a reducer by
    PML), also after a first call. (CircleLoss, cosine only, refuses another distance as at construction.)"""
    x, y = batch(23, n=16)
    for attr, make in (("distance", distances.LpDistance), ("distance", distances.DotProductSimilarity),
                       ("reducer", reducers.SumReducer)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours, pml = getattr(fpl.losses, name)(), getattr(L, name)()
            if ours._cosine_only and attr == "distance":
                ours.distance = make()
                with pytest.raises(ValueError, match="distance"):
                    ours(x, y)
                continue
            ours(x, y)  # set up and called once before the assignment
            setattr(ours, attr, make())
            setattr(pml, attr, make())
            assert_same(value_and_grad(ours, x, y), value_and_grad(pml, x, y))
            assert_same(value_and_grad(ours, x, y), value_and_grad(pml, x, y))  # and stays so


@pytest.mark.parametrize("name", ["TripletMarginLoss", "ContrastiveLoss", "MultiSimilarityLoss"])
def test_distance_settings_changed_in_place(name):
    """PML's call reads its distance's settings (power, p, normalize_embeddings) each time: one
    changed in place on ours is computed as PML's, and changed back, as PML's again."""
    x, y = batch(24, n=16)
    for attr, value in (("power", 2), ("p", 1), ("normalize_embeddings", False)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours, pml = getattr(fpl.losses, name)(), getattr(L, name)()
            ours(x, y)
            for v in (value, getattr(pml.distance, attr)):
                setattr(ours.distance, attr, v)
                setattr(pml.distance, attr, v)
                assert_same(value_and_grad(ours, x, y), value_and_grad(pml, x, y))


@pytest.mark.parametrize("name", ["ArcFaceLoss", "NormalizedSoftmaxLoss", "SoftTripleLoss"])
def test_class_loss_reducer_assigned_after_construction(name):
    x, y = batch(25, n=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = getattr(fpl.losses, name)(num_classes=3, embedding_size=x.shape[1]).double()
        pml = getattr(L, name)(num_classes=3, embedding_size=x.shape[1]).double()
        pml.load_state_dict(ours.state_dict())
        ours(x, y % 3)
        ours.reducer, pml.reducer = reducers.SumReducer(), reducers.SumReducer()
        assert_same(value_and_grad(ours, x, y % 3), value_and_grad(pml, x, y % 3))


def test_regularizers_and_sub_reducers_assigned_after_construction():
    """PML reads its regularizers, their weights and its reducer's sub-reducers at each call: set
    on ours after construction (and after a first call), computed as PML's; SoftTriple's fused
    SparseCentersRegularizer too, and get_logits after a distance's settings changed in place."""
    from pytorch_metric_learning import regularizers as R
    x, y = batch(26, n=12)

    def pair(name, *args, **kw):
        ours, pml = getattr(fpl.losses, name)(*args, **kw).double(), getattr(L, name)(*args, **kw).double()
        pml.load_state_dict(ours.state_dict())
        ours(x, y)
        return ours, pml
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in ("ContrastiveLoss", "MarginLoss"):
            ours, pml = pair(name)
            ours.embedding_regularizer, pml.embedding_regularizer = R.LpRegularizer(), R.LpRegularizer()
            assert_same(value_and_grad(ours, x, y), value_and_grad(pml, x, y))
            ours, pml = pair(name)
            key = next(iter(pml.reducer.reducers))
            ours.reducer.reducers[key], pml.reducer.reducers[key] = reducers.SumReducer(), reducers.SumReducer()
            assert_same(value_and_grad(ours, x, y), value_and_grad(pml, x, y))
        ours, pml = pair("ProxyAnchorLoss", 3, x.shape[1])
        ours.weight_regularizer, pml.weight_regularizer = R.RegularFaceRegularizer(), R.RegularFaceRegularizer()
        assert_same(value_and_grad(ours, x, y), value_and_grad(pml, x, y))
        sparse = dict(centers_per_class=2, weight_reg_weight=0.5)
        ours, pml = pair("SoftTripleLoss", 3, x.shape[1], weight_regularizer=R.SparseCentersRegularizer(3, 2), **sparse)
        for k, v in (("weight_reg_weight", 4), ("weight_regularizer", None)):
            setattr(ours, k, v)
            setattr(pml, k, v)
            assert_same(value_and_grad(ours, x, y), value_and_grad(pml, x, y))
        ours, pml = fpl.losses.ProxyAnchorLoss(3, x.shape[1]).double(), L.ProxyAnchorLoss(3, x.shape[1])
        pml.double().load_state_dict(ours.state_dict())
        ours.distance.normalize_embeddings = pml.distance.normalize_embeddings = False  # before any call
        torch.testing.assert_close(ours.get_logits(x), pml.get_logits(x), rtol=1e-12, atol=1e-12)


def test_what_pml_reads_at_each_call_set_after_construction():
    """FastAPLoss's num_bins (PML keeps the num_edges it derived) and num_edges, AngularLoss's alpha
    tensor changed in place, the sub-modules PML calls (CircleLoss's soft_plus, NPairsLoss's and
    ArcFaceLoss's cross_entropy) replaced or changed in place: PML's values."""
    x, y = batch(27, n=12)
    cases = [("FastAPLoss", (), lambda m: setattr(m, "num_bins", 5)),
             ("FastAPLoss", (), lambda m: setattr(m, "num_edges", 7)),
             ("FastAPLoss", (), lambda m: setattr(m, "num_bins", 10.7)),
             ("AngularLoss", (), lambda m: m.alpha.fill_(0.3)),
             ("CircleLoss", (), lambda m: setattr(m, "soft_plus", torch.nn.Softplus(beta=5))),
             ("CircleLoss", (), lambda m: setattr(m.soft_plus, "beta", 5)),
             ("NPairsLoss", (), lambda m: setattr(m.cross_entropy, "label_smoothing", 0.3)),
             ("ArcFaceLoss", (3, 6), lambda m: setattr(m.cross_entropy, "label_smoothing", 0.3))]
    for name, args, change in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours, pml = getattr(fpl.losses, name)(*args).double(), getattr(L, name)(*args).double()
            pml.load_state_dict(ours.state_dict())
            ours(x, y % 3)
            change(ours)
            change(pml)
            assert_same(value_and_grad(ours, x, y % 3), value_and_grad(pml, x, y % 3))


def test_changes_after_construction_edge_cases(monkeypatch):
    """SoftTripleLoss's fused regularizer set to None (its default weight); AngularLoss's alpha
    changed in place, then a reducer assigned (PML's instance reads ours), or made learnable (PML
    gives its gradient); SubCenterArcFaceLoss.get_outliers after a distance change; and no
    re-setup from the stats a reducer records (PML's global COLLECT_STATS, under autocast)."""
    from pytorch_metric_learning import regularizers as R
    from pytorch_metric_learning.utils import common_functions as c_f
    x, y = batch(28, n=12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = fpl.losses.SoftTripleLoss(3, 6, centers_per_class=2, weight_regularizer=R.SparseCentersRegularizer(3, 2))
        pml = L.SoftTripleLoss(3, 6, centers_per_class=2, weight_regularizer=R.SparseCentersRegularizer(3, 2))
        ours, pml = ours.double(), pml.double()
        pml.load_state_dict(ours.state_dict())
        ours.weight_regularizer = pml.weight_regularizer = None
        assert_same(value_and_grad(ours, x, y), value_and_grad(pml, x, y))
        ours, pml = fpl.losses.AngularLoss(), L.AngularLoss()
        for m in (ours, pml):
            m.alpha.fill_(math.radians(55))
        assert_same(value_and_grad(ours, x, y), value_and_grad(pml, x, y))
        ours.reducer, pml.reducer = reducers.SumReducer(), reducers.SumReducer()
        assert_same(value_and_grad(ours, x, y), value_and_grad(pml, x, y))
        ours, pml = fpl.losses.AngularLoss(), L.AngularLoss()
        ours.alpha = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
        pml.alpha = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
        grads = [torch.autograd.grad(m(x, y), m.alpha)[0] for m in (ours, pml)]
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-12)
        ours = fpl.losses.SubCenterArcFaceLoss(num_classes=3, embedding_size=6).double()
        pml = L.SubCenterArcFaceLoss(num_classes=3, embedding_size=6).double()
        pml.load_state_dict(ours.state_dict())
        ours.distance.power = pml.distance.power = 2
        for a, b in zip(ours.get_outliers(x, y, threshold=60), pml.get_outliers(x, y, threshold=60)):
            assert torch.equal(a, b)
    monkeypatch.setattr(c_f, "COLLECT_STATS", True)
    ours = fpl.losses.ContrastiveLoss(collect_stats=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        for _ in range(3):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                ours(x.float(), y)
            assert ours._pml is None


def test_compiled_angular_loss_follows_an_assigned_alpha():
    loss = fpl.losses.AngularLoss()
    x, y = batch(29, n=12)
    x = x.float()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    compiled(x, y)
    loss.alpha = math.radians(50)
    torch.testing.assert_close(compiled(x, y), L.AngularLoss(alpha=50)(x, y), rtol=1e-5, atol=1e-6)


def test_angular_alpha_as_pml_holds_it():
    """AngularLoss's alpha as an nn.Parameter (registered, in the state_dict, its gradient PML's)
    and as a float32 tensor (PML's tan in float32): PML's values, state_dicts loading both ways."""
    x, y = batch(30, n=12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours, pml = fpl.losses.AngularLoss(), L.AngularLoss()
        for m in (ours, pml):
            m.alpha = torch.nn.Parameter(torch.tensor(0.6, dtype=torch.float64))
        assert [n for n, _ in ours.named_parameters()] == ["alpha"] and list(ours.state_dict()) == ["alpha"]
        ours.load_state_dict(pml.state_dict())
        vals = [m(x, y) for m in (ours, pml)]
        grads = [torch.autograd.grad(v, m.alpha)[0] for v, m in zip(vals, (ours, pml))]
        torch.testing.assert_close(vals[0], vals[1], rtol=1e-12, atol=0)
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=0)
        ours, pml = fpl.losses.AngularLoss(), L.AngularLoss()
        ours.alpha, pml.alpha = torch.tensor(0.6), torch.tensor(0.6)
        assert_same(value_and_grad(ours, x, y), value_and_grad(pml, x, y))


def test_autocast_probe_records_nothing_in_the_modules_distance(monkeypatch):
    """The dtype probe under autocast is a copy of PML's twin: the stats it records (PML's global
    COLLECT_STATS) stay in the copy; the distance the module shares with its twin holds the batch's,
    as PML's does."""
    from pytorch_metric_learning.utils import common_functions as c_f
    monkeypatch.setattr(c_f, "COLLECT_STATS", True)
    x, y = batch(31, n=12)
    x = x.float() * 3
    loss, pml = fpl.losses.ContrastiveLoss(collect_stats=False), L.ContrastiveLoss(collect_stats=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss(x, y), pml(x, y)
    assert loss.distance.initial_avg_query_norm == pml.distance.initial_avg_query_norm > 1


@pytest.mark.parametrize("when", ["constructed", "assigned"])
@pytest.mark.parametrize("what", ["reducer", "embedding_regularizer", "distance"])
def test_miner_epsilon_kept_in_pmls_computation(what, when):
    """MultiSimilarityLoss(miner_epsilon=e) with a reducer, a regularizer or another distance (PML's
    computation): PML's MultiSimilarityMiner(e) with the loss's distance, then PML's loss."""
    from pytorch_metric_learning import regularizers
    x, y = batch(41)
    value = {"reducer": reducers.SumReducer(), "embedding_regularizer": regularizers.LpRegularizer(),
             "distance": CosineSimilarity(power=2)}[what]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if when == "constructed":
            ours = fpl.losses.MultiSimilarityLoss(miner_epsilon=0.1, **{what: value})
        else:
            ours = fpl.losses.MultiSimilarityLoss(miner_epsilon=0.1)
            ours(x, y)
            setattr(ours, what, value)
        got = value_and_grad(ours, x, y)
    pml = L.MultiSimilarityLoss(**{what: value})
    miner = miners.MultiSimilarityMiner(0.1, distance=pml.distance)
    assert_same(got, value_and_grad(lambda e, lab: pml(e, lab, miner(e, lab)), x, y))
    with pytest.raises(ValueError, match="miner_epsilon"):
        ours(x, y, miners.MultiSimilarityMiner(0.1)(x, y))


DISTANCE_STATS = ["initial_avg_query_norm", "initial_avg_ref_norm", "final_avg_query_norm", "final_avg_ref_norm"]
SIZES = dict(num_classes=3, embedding_size=6)
CLASS_LOSSES = {"SoftTripleLoss": SIZES, "ProxyAnchorLoss": SIZES, "ProxyNCALoss": SIZES,
                "NormalizedSoftmaxLoss": SIZES, "CosFaceLoss": SIZES, "ArcFaceLoss": SIZES,
                "SubCenterArcFaceLoss": SIZES, "LargeMarginSoftmaxLoss": SIZES, "SphereFaceLoss": SIZES,
                "P2SGradLoss": dict(descriptors_dim=6, num_classes=3)}


def distance_stats(distance):
    return [getattr(distance, s, None) for s in DISTANCE_STATS]


@pytest.mark.parametrize("name", MODULE_LOSSES + list(CLASS_LOSSES))
def test_a_distance_collecting_stats_records_pmls(name):
    """A loss's distance with collect_stats: the stats PML's loss leaves in it (the rows it
    measures: the batch against ref_emb, a class loss's parameter, NPairsLoss's pairs; none where
    PML's loss does not call it), the loss still fused."""
    if name in CLASS_LOSSES:
        kw = CLASS_LOSSES[name]
        ours, pml = getattr(fpl.losses, name)(**kw).double(), getattr(L, name)(**kw).double()
        ours.load_state_dict(pml.state_dict())
    else:
        ours, pml = modules(name)
    for loss in (ours, pml):
        loss.distance.collect_stats = True
    x, y = batch(43, n=12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fused: no fallback warning
        ours(x * (1 + torch.arange(12, dtype=x.dtype)[:, None]), y)
    pml(x * (1 + torch.arange(12, dtype=x.dtype)[:, None]), y)
    want = distance_stats(pml.distance)
    assert distance_stats(ours.distance) == (want if None in want else pytest.approx(want, rel=1e-12))


@pytest.mark.parametrize("name,args", [("ArcFaceLoss", (3, 6)), ("NPairsLoss", ()), ("AngularLoss", ())])
def test_collect_stats_set_after_construction_and_reset_as_pml(name, args):
    """collect_stats set on a fused module after a call: PML's stats recorded from then on (PML's
    computation, as built with it); the record lists PML's logging reads, and reset_stats."""
    x, y = batch(44)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours, pml = getattr(fpl.losses, name)(*args).double(), getattr(L, name)(*args).double()
        if args:
            ours.load_state_dict(pml.state_dict())
        ours(x, y)
        ours.collect_stats = pml.collect_stats = True
        assert_same(value_and_grad(ours, x, y), value_and_grad(pml, x, y))
        built_with = getattr(fpl.losses, name)(*args, collect_stats=True)
        pml_built_with = getattr(L, name)(*args, collect_stats=True)
    assert built_with._record_these_stats == pml_built_with._record_these_stats
    stat = pml_built_with._record_these_stats[0]
    assert getattr(ours, stat) == pytest.approx(getattr(pml, stat), rel=1e-12)
    built_with.reset_stats()
    assert getattr(built_with, stat) == 0


@pytest.mark.parametrize("name", ["TripletMarginLoss", "MarginLoss"])
@pytest.mark.parametrize("as_", ["lists", "numpy"])
def test_an_indices_tuple_of_lists_as_pml(name, as_):
    """Python lists or numpy arrays of indices, which PML's triplet losses index with."""
    x, y = batch(45, n=10)
    listed = ([0, 1, 2, 2], [3, 4, 5, 5], [6, 7, 8, 9])
    t = listed if as_ == "lists" else tuple(np.array(v) for v in listed)
    ours, pml = getattr(fpl.losses, name)(), getattr(L, name)()
    assert_same(value_and_grad(ours, x, y, t), value_and_grad(pml, x, y, listed))


@pytest.mark.parametrize("name, attr", [("MultiSimilarityLoss", "alpha"), ("ContrastiveLoss", "neg_margin"),
                                        ("TripletMarginLoss", "margin")])
def test_a_number_assigned_as_a_tensor_or_numpy_number(name, attr):
    """A hyper-parameter assigned after construction as a 0-d tensor or a numpy number (PML computes
    with them) gives PML's loss, also compiled (a tensor raised a TypeError; a numpy number raised
    under torch.compile, which traces it as an array)."""
    x, y = batch(31, n=16)
    for value in (torch.tensor(0.7, dtype=torch.float64), np.float64(0.7), np.float32(0.7)):
        torch._dynamo.reset()
        ours, pml = getattr(fpl.losses, name)(), getattr(L, name)()
        setattr(ours, attr, value)
        setattr(pml, attr, value)
        expected = pml(x, y)
        torch.testing.assert_close(ours(x, y), expected)
        torch.testing.assert_close(torch.compile(ours, fullgraph=True, backend="aot_eager")(x, y), expected)


def test_a_functional_form_takes_numpy_numbers_compiled():
    """numpy numbers as a functional form's keyword arguments, made inside or outside the compiled
    function (dynamo traces both as arrays): the Python number's loss."""
    x, y = batch(32, n=16)
    expected = fpl.functional.multi_similarity_loss(x, y, alpha=2.5)
    torch._dynamo.reset()
    inside = torch.compile(lambda x, y: fpl.functional.multi_similarity_loss(x, y, alpha=np.float32(2.5)),
                           fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(inside(x, y), expected)
    outside = torch.compile(lambda x, y, a: fpl.functional.multi_similarity_loss(x, y, alpha=a),
                            fullgraph=True, backend="aot_eager")
    for a in (2.5, 3.0):
        torch.testing.assert_close(outside(x, y, np.float64(a)), fpl.functional.multi_similarity_loss(x, y, alpha=a))


@pytest.mark.parametrize("name", [n for n in MODULE_LOSSES if n != "smoothap"])  # PML's bincount refuses them
def test_labels_at_both_int64_extremes_as_pml(name):
    """Labels holding both int64 extremes beside a sample without positives: a loss that gives such
    samples a label of their own finds one no label takes (min - 1 and max + 1 wrap around)."""
    x, _ = batch(20, n=10)
    extreme = torch.iinfo(torch.int64)
    labels = torch.tensor([extreme.min, extreme.min, extreme.max, extreme.max, 5, 0, 0, 5, 7, 0])
    ours, pml = modules(name)
    assert_same(value_and_grad(ours, x, labels), value_and_grad(pml, x, labels))


def _doubled(module, inputs, output):
    return output * 2.0


def _doubled_gradient(module, grad_input, grad_output):
    return tuple(None if g is None else 2.0 * g for g in grad_input)


@pytest.mark.parametrize("name,make", [("TripletMarginLoss", distances.LpDistance),
                                       ("ContrastiveLoss", distances.CosineSimilarity),
                                       ("NCALoss", lambda: distances.LpDistance(power=2)),
                                       ("SignalToNoiseRatioContrastiveLoss", distances.SNRDistance)])
@pytest.mark.parametrize("how", ["hook", "hook_later", "backward_hook", "compute_mat", "is_inverted"])
def test_a_distance_that_computes_otherwise_than_its_class_is_pmls(name, make, how):
    """PML's losses call their distance object (its forward and backward hooks run, and a
    compute_mat set on the instance is called) and read its is_inverted: such a distance, also made
    so after a first call, is computed by PML, not as its class's fused distance."""
    x, y = batch(26, n=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        made = []
        for lib in (fpl.losses, L):
            d = make()
            if how == "hook":
                d.register_forward_hook(_doubled)
            loss = getattr(lib, name)(distance=d)
            loss(x, y)
            if how == "hook_later":
                d.register_forward_hook(_doubled)
            elif how == "backward_hook":
                d.register_full_backward_hook(_doubled_gradient)
            elif how == "compute_mat":
                d.compute_mat = (lambda f: lambda q, r: 2.0 * f(q, r))(d.compute_mat)
            elif how == "is_inverted":
                d.is_inverted = not d.is_inverted
            made.append(loss)
        ours, pml = made
        assert_same(value_and_grad(ours, x, y), value_and_grad(pml, x, y))


def test_a_hook_on_every_module_leaves_the_losses_fused():
    """A hook registered on every module for a while (a profiler's module tracker) is not a reason
    to compute with PML: the loss stays fused during and after it."""
    x, y = batch(27, n=16)
    loss = fpl.losses.ContrastiveLoss()
    loss(x, y)
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, inputs, output: None)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            loss(x, y)
    finally:
        handle.remove()
    assert loss._pml is None


def test_a_hooked_distance_in_our_batch_miner_is_pmls():
    x, y = batch(27, n=16)
    mined = []
    for lib in (fpl.miners, miners):
        d = distances.LpDistance()
        d.register_forward_hook(lambda m, i, o: -o)
        mined.append(lib.BatchHardMiner(distance=d)(x, y))
    assert all(torch.equal(a, b) for a, b in zip(*mined))


def test_nca_fuses_a_dot_product_on_normalized_rows():
    """DotProductSimilarity() on PML's normalized rows is the cosine, fused as the docs say."""
    x, y = batch(28, n=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        ours = fpl.losses.NCALoss(distance=distances.DotProductSimilarity())
        value = value_and_grad(ours, x, y)
    assert ours._pml is None
    assert_same(value, value_and_grad(L.NCALoss(distance=distances.DotProductSimilarity()), x, y))
