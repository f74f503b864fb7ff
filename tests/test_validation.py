"""Input validation (issue #2 item 4) through the functional API and the modules: each bad input
raises ValueError or TypeError, never a crash deep inside a kernel, and the message names the
argument that is wrong."""
import functools

import pytest
import torch

import fused_pairloss as fpl
from fused_pairloss import _validation as V
from fused_pairloss import functional as Fn

D = 6
X = torch.randn(8, D)
Y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
REF = torch.randn(5, D)
RY = torch.tensor([0, 1, 2, 3, 4])

# regexes: the argument's name as a word ("labels" must not be satisfied by "ref_labels")
LABELS = r"(?<!ref_)\blabels\b"
REF_LABELS = r"\bref_labels\b"
EMB = r"(?<!ref_)\bembeddings\b"
REF_EMB = r"\bref_emb\b"


def _pair_fns():
    """(name, fn(emb, labels, ref_emb, ref_labels)) for every pair-loss entry point."""
    return [
        ("ms_functional", lambda e, y, r=None, ry=None, **k: Fn.multi_similarity_loss(
            e, y, r, ry, backend="reference", **k)),
        ("ms_functional_mined", lambda e, y, r=None, ry=None, **k: Fn.multi_similarity_loss(
            e, y, r, ry, miner_epsilon=0.1, backend="reference", **k)),
        ("circle_functional", lambda e, y, r=None, ry=None, **k: Fn.circle_loss(e, y, r, ry, backend="reference", **k)),
        ("ms_module", lambda e, y, r=None, ry=None: fpl.MultiSimilarityLoss(backend="reference")(e, y, None, r, ry)),
        ("circle_module", lambda e, y, r=None, ry=None: fpl.CircleLoss(backend="reference")(e, y, None, r, ry)),
        ("ms_module_auto", lambda e, y, r=None, ry=None: fpl.MultiSimilarityLoss()(e, y, ref_emb=r, ref_labels=ry)),
        ("circle_module_auto", lambda e, y, r=None, ry=None: fpl.CircleLoss()(e, y, ref_emb=r, ref_labels=ry)),
    ]


PAIR_FNS = _pair_fns()
PAIR_IDS = [n for n, _ in PAIR_FNS]

PAIR_CASES = {
    # name: (args, exception, regex)
    "labels_too_short": ((X, Y[:-1]), ValueError, LABELS),
    "labels_too_long": ((X, torch.cat([Y, Y])), ValueError, LABELS),
    "labels_2d": ((X, Y[:, None]), ValueError, LABELS),
    "labels_0d": ((X[:1], torch.tensor(0)), ValueError, LABELS),
    "labels_float": ((X, Y.float()), TypeError, LABELS),
    "labels_none": ((X, None), ValueError, LABELS),
    "labels_list": ((X, Y.tolist()), TypeError, LABELS),
    "embeddings_1d": ((X[0], Y[:1]), ValueError, EMB),
    "embeddings_3d": ((X[None], Y), ValueError, EMB),
    "embeddings_int": ((X.long(), Y), TypeError, EMB),
    "embeddings_bool": ((X > 0, Y), TypeError, EMB),
    "embeddings_numpy": ((X.numpy(), Y), TypeError, EMB),
    "embeddings_empty": ((X[:0], Y[:0]), ValueError, EMB),
    "ref_emb_without_ref_labels": ((X, Y, REF, None), ValueError, REF_LABELS),
    "ref_labels_without_ref_emb": ((X, Y, None, RY), ValueError, REF_EMB),
    "ref_emb_other_width": ((X, Y, torch.randn(5, D + 1), RY), ValueError, REF_EMB),
    "ref_emb_1d": ((X, Y, REF[0], RY[:1]), ValueError, REF_EMB),
    "ref_emb_int": ((X, Y, REF.long(), RY), TypeError, REF_EMB),
    "ref_emb_other_dtype": ((X, Y, REF.double(), RY), TypeError, REF_EMB),
    "ref_labels_wrong_length": ((X, Y, REF, RY[:-1]), ValueError, REF_LABELS),
    "ref_labels_2d": ((X, Y, REF, RY[:, None]), ValueError, REF_LABELS),
    "ref_labels_float": ((X, Y, REF, RY.float()), TypeError, REF_LABELS),
    "ref_labels_is_labels_other_rows": ((X, Y, REF, Y), ValueError, REF_EMB),
}


# what PML's forward accepts, so the modules do (tests/test_pml_surface.py compares them with PML);
# the functional forms, our own API, refuse them
PML_ACCEPTS = ("labels_float", "embeddings_empty", "ref_labels_without_ref_emb", "ref_labels_float")


@pytest.mark.parametrize("entry,case", [(e, c) for e in PAIR_FNS for c in PAIR_CASES
                                        if not ("module" in e[0] and c in PML_ACCEPTS)],
                         ids=[f"{e[0]}-{c}" for e in PAIR_FNS for c in PAIR_CASES
                              if not ("module" in e[0] and c in PML_ACCEPTS)])
def test_pair_losses_reject(entry, case):
    _, fn = entry
    args, exc, regex = PAIR_CASES[case]
    with pytest.raises(exc, match=regex):
        fn(*args)


def test_pair_inputs_that_are_valid_pass():
    """The cases above differ from valid inputs only in the broken argument."""
    for _, fn in PAIR_FNS:
        assert fn(X, Y).dim() == 0
        assert fn(X, Y, REF, RY).dim() == 0
        assert fn(X, Y, torch.randn(8, D), Y).dim() == 0
        assert fn(X, Y.int(), REF, RY.to(torch.int16)).dim() == 0  # any integer dtype


@pytest.mark.parametrize("kw,exc,name", [
    (dict(alpha=0.0), ValueError, "alpha"), (dict(alpha=-1.0), ValueError, "alpha"),
    (dict(beta=0), ValueError, "beta"), (dict(alpha="2"), TypeError, "alpha"),
    (dict(base=None), TypeError, "base"), (dict(miner_epsilon="0.1"), TypeError, "miner_epsilon"),
])
def test_multi_similarity_hyperparameters(kw, exc, name):
    with pytest.raises(exc, match=rf"\b{name}\b"):
        Fn.multi_similarity_loss(X, Y, backend="reference", **kw)
    if name in ("alpha", "beta", "miner_epsilon"):
        with pytest.raises(exc, match=rf"\b{name}\b"):
            fpl.MultiSimilarityLoss(**kw)


@pytest.mark.parametrize("kw,exc,name", [
    (dict(gamma=0.0), ValueError, "gamma"), (dict(gamma=-80.0), ValueError, "gamma"),
    (dict(m="0.4"), TypeError, "m"), (dict(gamma=None), TypeError, "gamma"),
])
def test_circle_hyperparameters(kw, exc, name):
    with pytest.raises(exc, match=rf"\b{name}\b"):
        Fn.circle_loss(X, Y, backend="reference", **kw)
    with pytest.raises(exc, match=rf"\b{name}\b"):
        fpl.CircleLoss(**kw)


def test_indices_tuple_malformed():
    with pytest.raises(ValueError, match="indices_tuple"):
        fpl.MultiSimilarityLoss(backend="reference")(X, Y, (torch.tensor([0]), torch.tensor([1])))
    with pytest.raises(TypeError, match="indices_tuple"):
        fpl.CircleLoss(backend="reference")(X, Y, torch.tensor([0, 1, 2]))


_A, _P, _N = torch.tensor([0, 2, 4]), torch.tensor([1, 3, 5]), torch.tensor([2, 4, 6])
MALFORMED_TUPLES = {
    "float": ((_A.float() + 0.7, _P.float(), _N.float()), TypeError, "integer"),
    "stacked": (torch.stack([_A, _P, _N]), TypeError, "tuple"),
    # lists of indices are taken as tensors (PML's triplet losses index with them); of floats, not
    "float_lists": (((_A + 0.5).tolist(), _P.tolist(), _N.tolist()), TypeError, "integer"),
    "column": ((_A[:, None], _P[:, None], _N[:, None]), ValueError, "1-D"),
    "two": ((_A, _P), ValueError, "3 .* or 4"),
    "five": ((_A, _P, _A, _N, _N), ValueError, "3 .* or 4"),
    "uneven": ((_A, _P[:2], _A, _N), ValueError, "pair up"),
    "out_of_range": ((_A, _P + 10, _N), ValueError, "another batch"),
    "negative": ((_A - 1, _P, _N), ValueError, r"\[0, 8\)"),
    "uint8": ((_A.to(torch.uint8), _P.to(torch.uint8), _N.to(torch.uint8)), TypeError, "integer"),
}
INDEXED_LOSSES = {
    "MultiSimilarityLoss": lambda: fpl.MultiSimilarityLoss(), "ContrastiveLoss": lambda: fpl.ContrastiveLoss(),
    "NCALoss": lambda: fpl.NCALoss(), "FastAPLoss": lambda: fpl.FastAPLoss(),
    "SmoothAPLoss": lambda: fpl.SmoothAPLoss(), "HistogramLoss": lambda: fpl.HistogramLoss(),
    "IntraPairVarianceLoss": lambda: fpl.IntraPairVarianceLoss(), "NPairsLoss": lambda: fpl.NPairsLoss(),
    "DynamicSoftMarginLoss": lambda: fpl.DynamicSoftMarginLoss(), "TripletMarginLoss": lambda: fpl.TripletMarginLoss(),
    "MarginLoss": lambda: fpl.MarginLoss(), "AngularLoss": lambda: fpl.AngularLoss(),
    "ArcFaceLoss": lambda: fpl.ArcFaceLoss(4, D), "SoftTripleLoss": lambda: fpl.SoftTripleLoss(4, D),
    "ProxyNCALoss": lambda: fpl.ProxyNCALoss(4, D), "ProxyAnchorLoss": lambda: fpl.ProxyAnchorLoss(4, D),
}


@pytest.mark.parametrize("case", list(MALFORMED_TUPLES))
@pytest.mark.parametrize("loss", list(INDEXED_LOSSES))
def test_malformed_indices_tuple_named_on_every_path(loss, case):
    """Every loss that takes an indices_tuple (the listed pairs, the reference, the miner weights of
    the class losses) refuses a malformed one with an error naming indices_tuple, before any work."""
    indices_tuple, exc, regex = MALFORMED_TUPLES[case]
    with pytest.raises(exc, match=f"indices_tuple.*{regex}|{regex}.*indices_tuple"):
        INDEXED_LOSSES[loss]()(X, Y, indices_tuple)


@pytest.mark.parametrize("loss", list(INDEXED_LOSSES))
def test_empty_float_indices_tuple_is_an_empty_tuple(loss):
    """PML builds empty index tensors of the labels' dtype (float labels): no pair, as PML."""
    empty = tuple(torch.tensor([]) for _ in range(3))
    out = INDEXED_LOSSES[loss]()(X, Y, empty)
    assert out.dim() == 0


def test_hyperparameter_checks_hold_while_compiling():
    """A constant hyper-parameter out of range is refused in a compiled call too."""
    fn = torch.compile(lambda e, y, t: Fn.ntxent_loss(e, y, temperature=t, backend="reference"), backend="eager")
    with pytest.raises(Exception, match="temperature must be > 0"):
        fn(X, Y, -1.0)


@pytest.mark.parametrize("miner", ["MultiSimilarityMiner", "PairMarginMiner", "TripletMarginMiner", "BatchHardMiner",
                                   "BatchEasyHardMiner"])
def test_miners_name_bad_embeddings(miner):
    make = getattr(fpl.miners, miner)
    with pytest.raises(TypeError, match=EMB):
        make()(X.numpy(), Y)
    with pytest.raises(ValueError, match=EMB):
        make()(X[:, :, None], Y)
    with pytest.raises(ValueError, match=REF_EMB):
        make()(X, Y, torch.randn(5, D + 1), RY)
    with pytest.raises(TypeError, match=REF_EMB):
        make()(X, Y, REF.double(), RY)


# ----------------------------------------------------------------------------------------------
# SoftTriple and ProxyCircle
# ----------------------------------------------------------------------------------------------
C, K = 4, 3
FC = torch.randn(D, C * K)
YC = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
PROX = torch.randn(D, C)


def _st(e, y, centers=FC, **kw):
    kw.setdefault("centers_per_class", K)
    return Fn.soft_triple_loss(e, y, centers, backend="reference", **kw)


def _pc(e, y, proxies=PROX, **kw):
    return Fn.proxy_circle_loss(e, y, proxies, backend="reference", **kw)


CLASS_CASES = {
    "labels_negative": ((X, torch.tensor([-1, 1, 2, 3, 3, 2, 1, 0])), ValueError, LABELS),
    "labels_equal_C": ((X, torch.tensor([0, 1, 2, 3, 4, 2, 1, 0])), ValueError, LABELS),
    "labels_huge": ((X, torch.tensor([0, 1, 2, 3, 10 ** 6, 2, 1, 0])), ValueError, LABELS),
    "labels_wrong_length": ((X, YC[:-1]), ValueError, LABELS),
    "labels_2d": ((X, YC[:, None]), ValueError, LABELS),
    "labels_float": ((X, YC.float()), TypeError, LABELS),
    "labels_none": ((X, None), ValueError, LABELS),
    "embeddings_1d": ((X[0], YC[:1]), ValueError, EMB),
    "embeddings_int": ((X.long(), YC), TypeError, EMB),
}


@pytest.mark.parametrize("case", list(CLASS_CASES))
@pytest.mark.parametrize("which", ["soft_triple", "proxy_circle", "soft_triple_module", "proxy_circle_module"])
def test_class_losses_reject(which, case):
    args, exc, regex = CLASS_CASES[case]
    if which == "soft_triple":
        fn = _st
    elif which == "proxy_circle":
        fn = _pc
    elif which == "soft_triple_module":
        fn = fpl.SoftTripleLoss(C, D, centers_per_class=K, backend="reference")
    else:
        fn = fpl.ProxyCircleLoss(C, D, backend="reference")
    with pytest.raises(exc, match=regex):
        fn(*args)


def test_class_losses_valid_edges_pass():
    y = torch.tensor([0, 3, 0, 3, 0, 3, 0, 3])  # labels 0 and C-1 are valid
    assert _st(X, y).dim() == 0
    assert _pc(X, y).dim() == 0
    assert fpl.SoftTripleLoss(C, D, centers_per_class=K, backend="reference")(X, y).dim() == 0
    assert fpl.ProxyCircleLoss(C, D, backend="reference")(X, y).dim() == 0


@pytest.mark.parametrize("centers,kw,exc,regex", [
    (torch.randn(D, C * K + 1), {}, ValueError, r"\bcenters\b.*centers_per_class|centers_per_class.*\bcenters\b"),
    (torch.randn(D, 2), {}, ValueError, r"\bcenters\b"),
    (torch.randn(D + 1, C * K), {}, ValueError, r"\bcenters\b"),
    (torch.randn(C * K), {}, ValueError, r"\bcenters\b"),
    (torch.randn(D, 0), {}, ValueError, r"\bcenters\b"),
    (FC.long(), {}, TypeError, r"\bcenters\b"),
    (FC.double(), {}, TypeError, r"\bcenters\b"),
    (FC.numpy(), {}, TypeError, r"\bcenters\b"),
    (FC, dict(centers_per_class=0), ValueError, r"\bcenters_per_class\b"),
    (FC, dict(centers_per_class=1.5), ValueError, r"\bcenters_per_class\b"),
    (torch.randn(D, C), dict(centers_per_class=1, center_reg_weight=0.2), ValueError, r"centers_per_class"),
    (FC, dict(la=0.0), ValueError, r"\bla\b"),
    (FC, dict(gamma=-0.1), ValueError, r"\bgamma\b"),
    (FC, dict(margin="x"), TypeError, r"\bmargin\b"),
    (FC, dict(center_reg_weight=None), TypeError, r"\bcenter_reg_weight\b"),
])
def test_soft_triple_centers_and_hyperparameters(centers, kw, exc, regex):
    with pytest.raises(exc, match=regex):
        _st(X, YC, centers, **kw)


@pytest.mark.parametrize("proxies,kw,exc,regex", [
    (torch.randn(D + 1, C), {}, ValueError, r"\bproxies\b"),
    (torch.randn(C), {}, ValueError, r"\bproxies\b"),
    (PROX.long(), {}, TypeError, r"\bproxies\b"),
    (PROX.double(), {}, TypeError, r"\bproxies\b"),
    (PROX, dict(gamma=0.0), ValueError, r"\bgamma\b"),
    (PROX, dict(m=None), TypeError, r"\bm\b"),
])
def test_proxy_circle_proxies_and_hyperparameters(proxies, kw, exc, regex):
    with pytest.raises(exc, match=regex):
        _pc(X, YC, proxies, **kw)


@pytest.mark.parametrize("ctor,kw,name", [
    (fpl.SoftTripleLoss, dict(num_classes=0, embedding_size=D), "num_classes"),
    (fpl.SoftTripleLoss, dict(num_classes=2.0, embedding_size=D), "num_classes"),
    (fpl.SoftTripleLoss, dict(num_classes=C, embedding_size=0), "embedding_size"),
    (fpl.SoftTripleLoss, dict(num_classes=C, embedding_size=D, centers_per_class=0), "centers_per_class"),
    (fpl.SoftTripleLoss, dict(num_classes=C, embedding_size=D, la=0), "la"),
    (fpl.SoftTripleLoss, dict(num_classes=C, embedding_size=D, gamma=0), "gamma"),
    (fpl.SoftTripleLoss, dict(num_classes=C, embedding_size=D, centers_per_class=1, center_reg_weight=0.2),
     "centers_per_class"),
    (fpl.ProxyCircleLoss, dict(num_classes=0, embedding_size=D), "num_classes"),
    (fpl.ProxyCircleLoss, dict(num_classes=C, embedding_size=-1), "embedding_size"),
    (fpl.ProxyCircleLoss, dict(num_classes=C, embedding_size=D, gamma=0.0), "gamma"),
])
def test_class_module_constructors(ctor, kw, name):
    with pytest.raises((ValueError, TypeError), match=rf"\b{name}\b"):
        ctor(**kw)


def test_soft_triple_module_embedding_width_mismatch():
    mod = fpl.SoftTripleLoss(C, D + 2, centers_per_class=K, backend="reference")
    with pytest.raises(ValueError, match=r"D=6|embedding|centers"):
        mod(X, YC)


# ----------------------------------------------------------------------------------------------
# backends
# ----------------------------------------------------------------------------------------------
def _all_entry_points():
    return {
        "ms": lambda b: Fn.multi_similarity_loss(X, Y, backend=b),
        "ms_mined": lambda b: Fn.multi_similarity_loss(X, Y, miner_epsilon=0.1, backend=b),
        "circle": lambda b: Fn.circle_loss(X, Y, backend=b),
        "soft_triple": lambda b: Fn.soft_triple_loss(X, YC, FC, centers_per_class=K, backend=b),
        "proxy_circle": lambda b: Fn.proxy_circle_loss(X, YC, PROX, backend=b),
        "ms_module": lambda b: fpl.MultiSimilarityLoss(backend=b)(X, Y),
        "circle_module": lambda b: fpl.CircleLoss(backend=b)(X, Y),
        "soft_triple_module": lambda b: fpl.SoftTripleLoss(C, D, centers_per_class=K, backend=b)(X, YC),
        "proxy_circle_module": lambda b: fpl.ProxyCircleLoss(C, D, backend=b)(X, YC),
        "ms_module_indices": lambda b: fpl.MultiSimilarityLoss(backend=b)(
            X, Y, (torch.tensor([0, 1]), torch.tensor([1, 0]), torch.tensor([0, 1]), torch.tensor([2, 3]))),
    }


ENTRY = _all_entry_points()


@pytest.mark.parametrize("entry", list(ENTRY))
@pytest.mark.parametrize("backend", ["gpu", "Reference", "", "fused"])
def test_unknown_backend(entry, backend):
    with pytest.raises(ValueError, match=r"\bbackend\b") as ei:
        ENTRY[entry](backend)
    msg = str(ei.value)
    assert repr(backend) in msg
    for name in ("reference", "cpu", "triton", "cuda"):
        assert name in msg  # lists the valid names


@pytest.mark.parametrize("entry", ["ms", "circle", "soft_triple", "proxy_circle"])
def test_backend_not_a_string(entry):
    with pytest.raises(TypeError, match=r"\bbackend\b"):
        ENTRY[entry](None)


@pytest.mark.parametrize("entry", list(ENTRY))
def test_cuda_backend_on_cpu_tensors(entry):
    with pytest.raises(ValueError, match=r"'cuda'") as ei:
        ENTRY[entry]("cuda")
    msg = str(ei.value)
    avail = fpl.available_backends("cpu")
    assert "reference" in avail
    assert str(avail) in msg, f"the message must list the available backends {avail}: {msg}"
    assert "cpu" in msg.lower()


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_unavailable_backend_names_the_available_ones(backend):
    avail = fpl.available_backends("cpu")
    if backend in avail:
        pytest.skip(f"{backend!r} is available here")
    for name, fn in ENTRY.items():
        with pytest.raises(ValueError, match=rf"'{backend}'") as ei:
            fn(backend)
        assert str(avail) in str(ei.value), name


def test_reference_and_auto_always_work_on_cpu():
    for name, fn in ENTRY.items():
        if name == "ms_module_indices":
            continue
        a = fn("reference")
        b = fn("auto")
        assert a.dim() == 0 and b.dim() == 0
        assert torch.isfinite(a) and torch.isfinite(b), name


# ---- the pair and class families: each entry point with its own hyper-parameters ---------------
NEW_PAIR = {
    "ntxent": Fn.ntxent_loss,
    "supcon": Fn.supcon_loss,
    "contrastive": Fn.contrastive_loss,
    "lifted": Fn.generalized_lifted_structure_loss,
}


@pytest.mark.parametrize("case", list(PAIR_CASES))
@pytest.mark.parametrize("name", list(NEW_PAIR))
def test_new_pair_losses_reject_bad_inputs(name, case):
    args, exc, regex = PAIR_CASES[case]
    with pytest.raises(exc, match=regex):
        NEW_PAIR[name](*args, backend="reference")


@pytest.mark.parametrize("fn,kw,exc,arg", [
    (Fn.ntxent_loss, dict(temperature=0.0), ValueError, "temperature"),
    (Fn.ntxent_loss, dict(temperature=-1.0), ValueError, "temperature"),
    (Fn.supcon_loss, dict(temperature="0.1"), TypeError, "temperature"),
    (Fn.ntxent_loss, dict(distance="euclidean"), ValueError, "distance"),
    (Fn.multi_similarity_loss, dict(distance="dot"), ValueError, "distance"),
    (Fn.contrastive_loss, dict(neg_margin=float("inf")), ValueError, "neg_margin"),
    (Fn.multi_similarity_loss, dict(base=float("nan")), ValueError, "base"),
    (Fn.circle_loss, dict(m=float("inf")), ValueError, r"\bm\b"),
    (Fn.ntxent_loss, dict(temperature=float("inf")), ValueError, "temperature"),
    (Fn.multi_similarity_loss, dict(beta=float("inf")), ValueError, "beta"),
    (Fn.nca_loss, dict(softmax_scale=0.0), ValueError, "softmax_scale"),
    (Fn.nca_loss, dict(softmax_scale=-1.0), ValueError, "softmax_scale"),
    (Fn.fast_ap_loss, dict(num_bins=float("inf")), ValueError, "num_bins"),
    (Fn.fast_ap_loss, dict(num_bins=float("nan")), ValueError, "num_bins"),
    (Fn.dynamic_soft_margin_loss, dict(num_bins=float("inf")), ValueError, "num_bins"),
])
def test_pair_hyperparameters_named_in_errors(fn, kw, exc, arg):
    with pytest.raises(exc, match=arg):
        fn(X, Y, backend="reference", **kw)


W = torch.randn(D, 4)  # (D, C) like PML's W
PROXIES = torch.randn(4, D)  # (C, D) like PML's ProxyAnchor proxies
CLASS_FNS = {
    "normalized_softmax": (Fn.normalized_softmax_loss, W, "W"),
    "cosface": (Fn.cosface_loss, W, "W"),
    "arcface": (Fn.arcface_loss, W, "W"),
    "proxy_anchor": (Fn.proxy_anchor_loss, PROXIES, "proxies"),
    "subcenter_arcface": (functools.partial(Fn.subcenter_arcface_loss, sub_centers=1), W, "W"),
    "large_margin_softmax": (Fn.large_margin_softmax_loss, W, "W"),
    "sphereface": (Fn.sphereface_loss, W, "W"),
    "proxy_nca": (Fn.proxy_nca_loss, PROXIES, "proxies"),
    "p2s_grad": (Fn.p2s_grad_loss, W / W.norm(dim=0), "weight"),
}


@pytest.mark.parametrize("name", list(CLASS_FNS))
def test_new_class_losses_reject_bad_weights_and_labels(name):
    fn, w, arg = CLASS_FNS[name]
    with pytest.raises(ValueError, match=arg):
        fn(X, Y, w.t(), backend="reference")  # the other layout
    with pytest.raises(TypeError, match=arg):
        fn(X, Y, w.double(), backend="reference")  # dtype
    with pytest.raises(TypeError, match=arg):
        fn(X, Y, w.tolist(), backend="reference")
    with pytest.raises(ValueError, match=LABELS):
        fn(X, Y + 10, w, backend="reference")  # labels outside [0, C)
    with pytest.raises(ValueError, match=LABELS):
        fn(X, Y - 1, w, backend="reference")


@pytest.mark.parametrize("fn,w,kw,exc,arg", [
    (Fn.normalized_softmax_loss, W, dict(temperature=0), ValueError, "temperature"),
    (Fn.cosface_loss, W, dict(margin=float("nan")), ValueError, "margin"),
    (Fn.arcface_loss, W, dict(margin=float("inf")), ValueError, "margin"),
    (Fn.arcface_loss, W, dict(scale=-1.0), ValueError, "scale"),
    (Fn.proxy_anchor_loss, PROXIES, dict(alpha=0), ValueError, "alpha"),
    (Fn.proxy_anchor_loss, PROXIES, dict(alpha=float("inf")), ValueError, "alpha"),
    (Fn.large_margin_softmax_loss, W, dict(margin=float("inf")), ValueError, "margin"),
    (Fn.proxy_anchor_loss, PROXIES, dict(margin=float("-inf")), ValueError, "margin"),
    (Fn.subcenter_arcface_loss, W, dict(sub_centers=0), ValueError, "sub_centers"),
    (Fn.subcenter_arcface_loss, W, dict(sub_centers=3), ValueError, "sub_centers"),  # 4 columns
    (Fn.large_margin_softmax_loss, W, dict(margin=0), ValueError, "margin"),
    (Fn.sphereface_loss, W, dict(scale=0), ValueError, "scale"),
    (Fn.proxy_nca_loss, PROXIES, dict(softmax_scale=float("nan")), ValueError, "softmax_scale"),
    (Fn.proxy_nca_loss, PROXIES, dict(distance="lp"), ValueError, "distance"),
    (Fn.p2s_grad_loss, W, {}, ValueError, "weight"),  # columns not of unit norm
])
def test_class_hyperparameters_named_in_errors(fn, w, kw, exc, arg):
    with pytest.raises(exc, match=arg):
        fn(X, Y, w, backend="reference", **kw)


@pytest.mark.parametrize("kw,arg", [(dict(n_bins=0), "n_bins"), (dict(delta=-0.1), "delta"),
                                    (dict(n_bins=10, delta=0.4), "delta and n_bins")])
def test_histogram_bins_named_in_errors(kw, arg):
    with pytest.raises(ValueError, match=arg):
        Fn.histogram_loss(X, Y, backend="reference", **kw)
    with pytest.raises(ValueError, match=arg):
        fpl.HistogramLoss(**kw)


@pytest.mark.parametrize("cls,args,kw,arg", [
    (fpl.NTXentLoss, (), dict(temperature=0), "temperature"),
    (fpl.SupConLoss, (), dict(temperature=-0.5), "temperature"),
    (fpl.ProxyAnchorLoss, (0, 4), {}, "num_classes"),
    (fpl.CosFaceLoss, (3, 0), {}, "embedding_size"),
    (fpl.ArcFaceLoss, (3, 4), dict(scale=0), "scale"),
    (fpl.NormalizedSoftmaxLoss, (3, 4), dict(temperature=float("nan")), "temperature"),
])
def test_new_module_constructors_name_the_argument(cls, args, kw, arg):
    with pytest.raises(ValueError, match=arg):
        cls(*args, **kw)


@pytest.mark.parametrize("make", [
    lambda: Fn.contrastive_loss(X, Y, pos_margin=1.0, neg_margin=0.5, backend="reference"),
    lambda: Fn.contrastive_loss(X, Y, pos_margin=0.1, neg_margin=0.5, distance="cosine", backend="reference"),
    lambda: Fn.generalized_lifted_structure_loss(X, Y, pos_margin=2.0, neg_margin=1.0, backend="reference"),
    lambda: fpl.ContrastiveLoss(pos_margin=2, neg_margin=1),
    lambda: fpl.GeneralizedLiftedStructureLoss(neg_margin=0, pos_margin=1),
])
def test_margins_in_the_degenerate_order_warn_as_pml_accepts_them(make, monkeypatch):
    """Margins in the order meant for the other kind of distance (e.g. ContrastiveLoss with
    CosineSimilarity() and the default margins): PML computes them, so a warning naming the
    margins, not an error."""
    monkeypatch.setattr(V, "_warned_margins", set())  # once per setting
    with pytest.warns(UserWarning, match="pos_margin"):
        make()


def test_backend_names_are_checked_at_construction():
    """A misspelt backend is named when the module is built (or the attribute set), not at the
    first call."""
    for make in (lambda: fpl.ContrastiveLoss(backend="CPU"), lambda: fpl.ClipLoss(backend="CPU"),
                 lambda: fpl.SigLipLoss(backend="gpu")):
        with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
            make()
    with pytest.raises(TypeError, match="backend must be a str"):
        fpl.CosFaceLoss(3, 4, backend=1)
    loss = fpl.TripletMarginLoss()
    with pytest.raises(ValueError, match="backend"):
        loss.backend = "Triton"


def test_functional_labels_on_another_device_are_named():
    """The functional forms do not move labels (the modules do, as PML): labels on another device
    than their rows' are a ValueError naming them."""
    x, y = torch.randn(6, 4), torch.arange(6) % 3
    with pytest.raises(ValueError, match=r"labels must be on the device of embeddings"):
        Fn.contrastive_loss(x, y.to("meta"))
    with pytest.raises(ValueError, match=r"ref_labels must be on the device of ref_emb"):
        Fn.contrastive_loss(x, y, x.flip(0), y.to("meta"))
    with pytest.raises(ValueError, match=r"labels must be on the device of embeddings"):
        Fn.cosface_loss(x, y.to("meta"), torch.randn(4, 3))


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64])
def test_class_loss_labels_of_wide_unsigned_dtypes_are_named(dtype):
    x = torch.randn(6, 4)
    with pytest.raises(TypeError, match=r"labels must be a signed integer tensor"):
        fpl.CosFaceLoss(3, 4)(x, (torch.arange(6) % 3).to(dtype))


def test_functional_takes_one_element_tensor_hyper_parameters():
    """As the modules, the functional forms take a hyper-parameter given as a one-element tensor."""
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.arange(12) % 3
    torch.testing.assert_close(Fn.triplet_margin_loss(x, y, margin=torch.tensor(0.3, dtype=torch.float64)),
                               Fn.triplet_margin_loss(x, y, margin=0.3), rtol=0, atol=0)
    torch.testing.assert_close(Fn.soft_triple_loss(x, y, torch.randn(4, 6, dtype=torch.float64),
                                                   centers_per_class=torch.tensor(2)).isfinite(), torch.tensor(True))


def test_ref_emb_without_ref_labels_in_a_functional_form_says_what_it_needs():
    x, y = torch.randn(8, 4), torch.arange(8) % 3
    with pytest.raises(ValueError, match="the functional forms need ref_labels"):
        Fn.contrastive_loss(x, y, x.flip(0))


def test_tcm_pairs_of_ref_rows_beyond_the_batch_name_ref_emb():
    """ThresholdConsistentMarginLoss takes both ends of a pair from embeddings (as PML, whose call
    then fails with an IndexError): a ref with more rows is named."""
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.arange(16) % 4
    r, ry = torch.randn(20, 6, dtype=torch.float64), torch.arange(20) % 4
    with pytest.raises(ValueError, match="ref_emb: ThresholdConsistentMarginLoss takes both ends"):
        Fn.threshold_consistent_margin_loss(x, y, r, ry)


def test_dynamic_soft_margin_functional_state_is_returned_and_checked():
    """return_histogram=True gives the state after the call, which the next call takes as
    histogram=: three calls equal PML's module's three calls, and its hist_."""
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 4, dtype=torch.float64, generator=g), torch.arange(16) % 3
    pml = pml_losses.DynamicSoftMarginLoss(min_val=-4.0, num_bins=12)
    state = None
    for step in range(3):
        value, state = Fn.dynamic_soft_margin_loss(x + 0.1 * step, y, min_val=-4.0, num_bins=12, histogram=state,
                                                   return_histogram=True)
        torch.testing.assert_close(value, pml(x + 0.1 * step, y))
        torch.testing.assert_close(state, pml.hist_)
    with pytest.raises(ValueError, match=r"histogram must have shape \(10,\)"):
        Fn.dynamic_soft_margin_loss(x, y, histogram=torch.zeros(5))
    with pytest.raises(TypeError, match="histogram must be None or a floating-point tensor"):
        Fn.dynamic_soft_margin_loss(x, y, histogram=[0.0] * 10)

