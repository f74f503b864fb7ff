"""The public declaration API (fused_pairloss/declare.py, docs/declarations.md): the documented
example runs (it rebuilds ContrastiveLoss and checks it against ours, in CrossBatchMemory and with
a miner's pairs), every backend against the declared loss's reference, the distributed wrapper,
and invalid declarations named by field."""
import pathlib
import re

import pytest
import torch

import fused_pairloss as fpl
from fused_pairloss.declare import PairHistogram, PairLossSpec, PairTerm, check_declaration, pair_loss

import kit

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "declarations.md"


def doc_example():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 1, "docs/declarations.md has one example"
    return blocks[0]


def test_documented_example_runs():
    namespace = {}
    exec(compile(doc_example(), str(DOC), "exec"), namespace)
    assert issubclass(namespace["MyContrastiveLoss"], torch.nn.Module)


@pytest.fixture(scope="module")
def declared():
    namespace = {}
    exec(compile(doc_example().split("g = torch.Generator()")[0], str(DOC), "exec"), namespace)
    return namespace["MyContrastiveLoss"]


@pytest.mark.parametrize("backend", [b for b in fpl.available_backends("cpu") if b != "reference"])
@pytest.mark.parametrize("mode", ["self", "ref"])
def test_every_backend_against_the_declared_reference(declared, backend, mode):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 8, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 5, (40,), generator=g)
    ref = (None, None) if mode == "self" else (torch.randn(30, 8, generator=g, dtype=torch.float64),
                                                torch.randint(0, 5, (30,), generator=g))
    out = declared(0.1, 0.8, backend=backend)(x, y, None, *ref)
    truth = declared(0.1, 0.8, backend="reference")(x, y, None, *ref)
    (g1,), (g2,) = torch.autograd.grad(out, x), torch.autograd.grad(truth, x)
    kit.check_close(out, truth, what="value")
    kit.check_close(g1, g2, what="grad")


def test_declared_loss_in_the_distributed_wrapper_is_fused(declared, monkeypatch):
    """One process: the wrapper's fused plan runs the declared loss's fused call."""
    from fused_pairloss import _distributed
    calls = []
    fused = _distributed.FUSED_PAIR_CALLS[declared]
    monkeypatch.setitem(_distributed.FUSED_PAIR_CALLS, declared, lambda *a, **k: calls.append(1) or fused(*a, **k))
    plan = _distributed.fused_pair_plan(declared(), torch.device("cpu"))
    assert plan is not None
    x, y = torch.randn(20, 6, dtype=torch.float64), torch.randint(0, 3, (20,))
    fn, hyper = plan
    torch.testing.assert_close(fn(x, y, None, None, **hyper), fpl.ContrastiveLoss()(x, y))
    assert calls


def _multi_similarity_declaration(distance, alpha, beta, base, epsilon):
    return PairLossSpec(pos=PairTerm(scale=-alpha, shift=base, lse=True),
                        neg=PairTerm(scale=beta, shift=base, lse=True), distance=distance, miner_epsilon=epsilon)


def _multi_similarity_combine(st, embeddings, *, batch, alpha, beta, base, epsilon):
    zero = torch.zeros_like(st.lse_pos)
    return batch.mean(torch.logaddexp(st.lse_pos, zero) / alpha + torch.logaddexp(st.lse_neg, zero) / beta)


def test_declared_miner_epsilon_in_cross_batch_memory_mines_as_pmls():
    """A declared loss that mines (miner_epsilon) inside our CrossBatchMemory: the self slot takes part
    in the mining and leaves after, as PML's memory with MultiSimilarityMiner (rows whose only
    positive in the memory is their own slot); 6 steps, the queue wrapping around."""
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
    declared = pair_loss("DeclaredMultiSimilarity", declaration=_multi_similarity_declaration,
                         combine=_multi_similarity_combine, hyper=dict(alpha=2.0, beta=50.0, base=0.5, epsilon=0.8))
    ours = fpl.CrossBatchMemory(declared(), 6, memory_size=12)
    pml = pml_losses.CrossBatchMemory(pml_losses.MultiSimilarityLoss(), 6, memory_size=12,
                                      miner=pml_miners.MultiSimilarityMiner(0.8))
    g = torch.Generator().manual_seed(0)
    for step in range(6):
        x = torch.randn(5, 6, generator=g, dtype=torch.float64, requires_grad=True)
        y = torch.randint(0, 8, (5,), generator=g)
        got, want = ours(x, y), pml(x, y)
        kit.check_close(got, want, what=f"step {step}")
        kit.check_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(want, x)[0], what=f"grad, step {step}")


    # on the reference backend the memory cannot fuse the declared miner: a clear error, not PML's
    reference = fpl.CrossBatchMemory(declared(backend="reference"), 6, memory_size=12)
    with pytest.raises(ValueError, match="give it a fused backend"):
        reference(x, y)
    # a fused backend given an indices_tuple as well: the tuple is the second rule, as for ours
    with pytest.raises(ValueError, match="either indices_tuple or its declaration's miner rule"):
        fpl.CrossBatchMemory(declared(backend="cpu"), 6, memory_size=12)(x, y, pml_miners.PairMarginMiner()(x, y))


def test_declared_loss_attributes_as_pml_reads_them(declared):
    """A declared loss computes with its declared distance: another one assigned (a string of
    DISTANCES, or PML's object) is taken (it was ignored while `distance` read the new one); a
    reducer or an embedding regularizer, which a declared loss cannot compute, is an error naming it.
    copy.copy of it has hyper-parameters of its own."""
    import copy
    pml_distances = pytest.importorskip("pytorch_metric_learning.distances")
    pml_reducers = pytest.importorskip("pytorch_metric_learning.reducers")
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(24, 8, generator=g, dtype=torch.float64), torch.randint(0, 4, (24,), generator=g)
    for value in ("cosine", pml_distances.CosineSimilarity()):
        loss = declared(0.8, 0.3)  # lp by default
        loss.distance = value
        assert loss.distance == "cosine" and "cosine" in repr(loss)
        kit.check_close(loss(x, y), fpl.ContrastiveLoss(0.8, 0.3, distance=pml_distances.CosineSimilarity())(x, y),
                        what=f"distance {value!r}")
    loss = declared()
    for key, value in (("reducer", pml_reducers.SumReducer()), ("distance", pml_distances.DotProductSimilarity(
            normalize_embeddings=False))):
        with pytest.raises(ValueError, match=key):
            setattr(loss, key, value)
    twin = copy.copy(loss)
    twin.neg_margin = 0.5
    assert loss.neg_margin == 1.0
    loss.collect_stats = True  # (it sent the call to a PML fallback a declared loss does not have)
    kit.check_close(loss(x, y), declared()(x, y), what="collect_stats")


@pytest.mark.parametrize("field,bad,match", [
    ("scale", float("nan"), r"PairLossSpec\.neg\.scale must be finite"),
    ("scale", "a", r"PairTerm\.scale must be a real number"),
    ("shift", 1e39, r"PairLossSpec\.neg\.shift must be finite as a float"),
    ("hinge", 1, r"PairTerm\.hinge must be a bool"),
    ("lse", True, r"PairLossSpec\.neg: a hinge term is reduced by sum"),
])
def test_invalid_declarations_name_the_field(field, bad, match):
    neg = dict(scale=-1.0, shift=1.0, hinge=True, sum=True)
    neg[field] = bad

    def spec(distance="lp"):
        return PairLossSpec(pos=PairTerm(scale=1.0, hinge=True, sum=True), neg=PairTerm(**neg), distance=distance)
    with pytest.raises((ValueError, TypeError), match=match):
        check_declaration(spec())
    with pytest.raises((ValueError, TypeError), match=match):
        pair_loss("Bad", declaration=spec, combine=lambda st, e, *, batch: e.sum(), hyper={})


@pytest.mark.parametrize("fields,match", [
    (dict(pos=None), r"PairLossSpec\.pos must be a PairTerm"),
    (dict(pos_vs_neg_lse=1), r"PairLossSpec\.pos_vs_neg_lse must be a bool"),
    (dict(miner_epsilon=True), r"PairLossSpec\.miner_epsilon must be a real number"),
    (dict(histogram=(4, 1.0)), r"PairLossSpec\.histogram must be None or a PairHistogram"),
    (dict(ntx_tiny=1e-30), r"ntx_tiny .* needs pos_vs_neg_lse"),
    (dict(pos_window=(True, 1.0), neg_window=(0.0, 1.0)), r"pos_window must be a tuple"),
])
def test_invalid_spec_fields_are_named(fields, match):
    base = dict(pos=PairTerm(scale=1.0, lse=True), neg=PairTerm(scale=1.0, lse=True))
    with pytest.raises((ValueError, TypeError), match=match):
        PairLossSpec(**{**base, **fields})


@pytest.mark.parametrize("fields,match", [
    (dict(squared="no"), r"PairHistogram\.squared must be a bool"),
    (dict(pml_bins="False"), r"PairHistogram\.pml_bins must be a bool"),
    (dict(inv_width=True), r"PairHistogram\.inv_width must be a real number"),
    (dict(inv_width="2"), r"PairHistogram\.inv_width must be a real number"),
    (dict(lo=None), r"PairHistogram\.lo must be a real number"),
    (dict(nodes=4.0), r"PairHistogram\.nodes must be an int"),
])
def test_invalid_histogram_fields_are_named(fields, match):
    with pytest.raises(TypeError, match=match):
        PairHistogram(**{**dict(nodes=5, inv_width=2.0), **fields})
    import numpy as np
    numpy_fields = PairHistogram(np.int64(5), np.float32(2.0), squared=np.bool_(True))  # numpy numbers are numbers
    assert numpy_fields == PairHistogram(5, 2.0, squared=True) and type(numpy_fields.nodes) is int


def test_declared_loss_checks_what_its_parts_return():
    import numpy as np
    ok = PairLossSpec(pos=PairTerm(scale=1.0, lse=True), neg=PairTerm(scale=1.0, lse=True))
    windows = PairLossSpec(pos=PairTerm(scale=1.0, hinge=True, sum=True), neg=PairTerm(scale=1.0, hinge=True, sum=True),
                           pos_window=(np.float32(0.1), float("inf")), neg_window=(-1.0, np.float64(0.5)))
    assert windows.pos_window[0] == np.float32(0.1)  # numpy numbers are numbers
    with pytest.raises(ValueError, match=r"returned PairLossSpec.distance='cosine'"):
        pair_loss("Deaf", declaration=lambda distance: ok, combine=lambda st, e, *, batch: e.sum(), hyper={},
                  distance="lp")
    for reserved in ("distance", "backend", "training", "forward", "exclude_after_mining"):
        with pytest.raises(ValueError, match=reserved):
            pair_loss("Clash", declaration=lambda distance, **h: ok, combine=lambda st, e, *, batch, **h: e.sum(),
                      hyper={reserved: 1.0})
    rows = pair_loss("Rows", declaration=lambda distance: ok, combine=lambda st, e, *, batch: st.lse_pos, hyper={})
    x, y = torch.randn(8, 4), torch.arange(8) % 2
    for backend in ("cpu", "reference"):
        with pytest.raises(TypeError, match="combine must return a 0-dim tensor"):
            rows(backend=backend)(x, y)


def test_invalid_declaration_arguments_are_named():
    ok = PairLossSpec(pos=PairTerm(scale=1.0, lse=True), neg=PairTerm(scale=1.0, lse=True))
    with pytest.raises(ValueError, match="pos_vs_neg_lse needs neg.lse"):
        check_declaration(PairLossSpec(pos=PairTerm(scale=1.0), neg=PairTerm(scale=1.0), pos_vs_neg_lse=True))
    # a tiny below float32's smallest normal: the fp32 engines rounded it to a subnormal or 0, the
    # reference kept it (three backends, three values)
    with pytest.raises(ValueError, match="ntx_tiny must be at least float32's smallest normal"):
        check_declaration(PairLossSpec(pos=PairTerm(scale=1.0), neg=PairTerm(scale=1.0, lse=True), pos_vs_neg_lse=True,
                                       ntx_tiny=1e-40))
    with pytest.raises(TypeError, match="must return a fused_pairloss.declare.PairLossSpec"):
        pair_loss("Bad", declaration=lambda distance: None, combine=lambda st, e, *, batch: e.sum(), hyper={})
    with pytest.raises(TypeError, match="keyword argument batch"):
        pair_loss("Bad", declaration=lambda distance: ok, combine=lambda st, e: e.sum(), hyper={})
    cls = pair_loss("Fine", declaration=lambda margin, distance: ok, combine=lambda st, e, *, batch, margin: e.sum(),
                    hyper={"margin": 0.1})
    with pytest.raises(TypeError, match="unknown arguments"):
        cls(margn=0.2)
    with pytest.raises(TypeError, match="multiple values for argument 'margin'"):
        cls(0.2, margin=0.5)
    with pytest.raises(ValueError, match=r"\['st'\] also names combine's positional parameter"):
        pair_loss("Clash", declaration=lambda st, distance: ok, combine=lambda st, e, *, batch: e.sum(),
                  hyper={"st": 1.0})
    with pytest.raises(ValueError, match="distance must be one of"):
        cls(distance="manhattan")


def test_declared_reference_takes_defaults_and_ignores_autocast(declared):
    """.reference fills in the defaults as .functional does; under autocast both compute the
    statistics from the inputs as given, so the cpu backend and the reference agree."""
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(32, 8, generator=g), torch.randint(0, 4, (32,), generator=g)
    torch.testing.assert_close(declared.reference(x, y), declared.functional(x, y, backend="reference"))
    with pytest.raises(TypeError, match="unknown hyper-parameters"):
        declared.reference(x, y, margin=0.1)
    for distance in ("lp", "cosine"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cpu = declared(distance=distance, backend="cpu")(x, y)
            ref = declared(distance=distance, backend="reference")(x, y)
        torch.testing.assert_close(cpu, ref, rtol=1e-5, atol=1e-6)


def test_a_windowed_declared_loss_in_cross_batch_memory_on_the_reference_is_named():
    """A declaration with a miner's windows inside CrossBatchMemory needs its fused engine: the
    reference backend's error says so (it spoke of an indices_tuple the user never passed)."""
    inf = float("inf")

    def spec(distance):
        return PairLossSpec(pos=PairTerm(scale=1.0, hinge=True, sum=True),
                            neg=PairTerm(scale=-1.0, shift=1.0, hinge=True, sum=True), distance=distance,
                            pos_window=(0.5, inf), neg_window=(-inf, 1.2))
    windowed = pair_loss("Windowed", declaration=spec, hyper={}, distance="lp",
                         combine=lambda st, e, *, batch: batch.sum(st.sum_pos + st.sum_neg))
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.arange(6) % 3
    with pytest.raises(ValueError, match="give it a fused backend"):
        fpl.CrossBatchMemory(windowed(backend="reference"), 4, memory_size=12)(x, y)
