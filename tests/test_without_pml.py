"""pytorch-metric-learning is an optional dependency: without it (blocked in a subprocess as an
uninstalled package is) every loss computes what it computes with PML installed, the reference
backend and CrossBatchMemory's indices_tuple path included (they imported PML's utilities), and an
attribute assigned after construction that only PML computes is refused naming it (it was ignored:
the default loss, no warning)."""
import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import fused_pairloss as fpl
from fused_pairloss.losses import REGISTRY

pytest.importorskip("pytorch_metric_learning")

CALLS = textwrap.dedent("""
    import warnings
    import torch
    import fused_pairloss as fpl
    from fused_pairloss.losses import REGISTRY

    def construct(name):
        entry = REGISTRY[name]
        if entry.kind == "class":
            torch.manual_seed(0)
            return entry.cls(**entry.size_kwargs(3, 6))
        return entry.cls(**(dict(margin=0.4, Tn=2.0) if name == "RankedListLoss" else {}))

    def values():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(12, 6, generator=g, dtype=torch.float64)
        y = torch.arange(12) % 3
        pairs = (torch.tensor([0, 1]), torch.tensor([3, 4]), torch.tensor([0, 1]), torch.tensor([1, 2]))
        out = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name, entry in REGISTRY.items():
                if entry.kind in ("pair", "class"):
                    out[name] = construct(name)(x, y).item()
            out["histogram_pairs"] = fpl.HistogramLoss()(x, y, pairs).item()
            out["histogram_reference"] = fpl.HistogramLoss(backend="reference")(x, y).item()
            out["dsm_pairs"] = fpl.DynamicSoftMarginLoss()(x, y, pairs).item()
            out["dsm_no_labels"] = fpl.DynamicSoftMarginLoss()(x).item()
            out["memory_pairs"] = fpl.CrossBatchMemory(fpl.ContrastiveLoss(), 6, memory_size=24)(x, y, pairs).item()
        return out
""")

BLOCKED = textwrap.dedent("""
    import json, sys

    class _NotInstalled:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "pytorch_metric_learning":
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    sys.meta_path.insert(0, _NotInstalled())
""") + CALLS + textwrap.dedent("""
    out = values()
    assigned = fpl.ContrastiveLoss()  # without PML its distance is the name of the fused one
    assigned.distance = "cosine"
    x = torch.randn(12, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assigned_cosine = assigned(x, torch.arange(12) % 3).item()
    refused = {}
    for attribute, value in (("reducer", torch.nn.Identity()), ("embedding_regularizer", torch.nn.Identity())):
        loss = fpl.TripletMarginLoss()
        setattr(loss, attribute, value)
        try:
            loss(torch.randn(8, 4), torch.arange(8) % 2)
            refused[attribute] = "computed"
        except ValueError as e:
            refused[attribute] = str(e)
    class Users(fpl.MultiSimilarityLoss):
        def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
            return {}
    try:
        Users()(torch.randn(8, 4), torch.arange(8) % 2)
        refused["a users compute_loss"] = "computed"
    except ValueError as e:
        refused["a users compute_loss"] = str(e)
    star = {}
    for namespace in ("losses", "miners", "distances", "reducers", "regularizers"):
        exec(f"from fused_pairloss.{namespace} import *", star)  # (it raised for the miners)
    print(json.dumps(dict(values=out, refused=refused, assigned_cosine=assigned_cosine)))
""")


@pytest.fixture(scope="module")
def without_pml():
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", BLOCKED], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_loss_computes_without_pml_as_with_it(without_pml):
    namespace = {}
    exec(CALLS, namespace)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with_pml = namespace["values"]()
    assert set(without_pml["values"]) == set(with_pml)
    for name, value in with_pml.items():
        assert without_pml["values"][name] == pytest.approx(value, rel=1e-12, abs=1e-12), name
    assert len(with_pml) > len([n for n, e in REGISTRY.items() if e.kind in ("pair", "class")])
    cosine = fpl.ContrastiveLoss(distance="cosine")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 6, generator=g, dtype=torch.float64)
    assert without_pml["assigned_cosine"] == pytest.approx(cosine(x, torch.arange(12) % 3).item(), rel=1e-12)


def test_an_attribute_only_pml_computes_is_refused_without_it(without_pml):
    for attribute, message in without_pml["refused"].items():
        assert attribute.split()[-1] in message and "pytorch-metric-learning" in message, (attribute, message)
