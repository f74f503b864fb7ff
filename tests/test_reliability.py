"""Findings of the reliability fuzz (issue: silent wrong results), as regression tests."""
import pytest
import torch

import fused_pairloss as fpl
from kit import check_close

FUSED = [b for b in ("cpu", "triton") if b in fpl.available_backends("cpu")]
pml_losses = pytest.importorskip("pytorch_metric_learning.losses")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("n", [12, 40])
@pytest.mark.parametrize("distance", ["lp", "cosine"])
def test_fp16_all_zero_row_in_contrastive(backend, n, distance):
    """An all-zero fp16 row normalizes to NaN (F.normalize's eps 1e-12 is 0 in fp16); PML's
    AvgNonZeroReducer drops its NaN pair terms and returns a finite loss. The hinge terms drop NaN
    the same way (ops/README.md), so the fused value is PML's and the reference's, not NaN."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, 8, generator=g).half()
    x[3] = 0
    y = torch.randint(0, 3, (n,), generator=g)
    kw = {} if distance == "lp" else dict(pos_margin=1.0, neg_margin=0.0)
    if distance == "cosine":
        from pytorch_metric_learning.distances import CosineSimilarity

        pml = pml_losses.ContrastiveLoss(distance=CosineSimilarity(), **kw)
        ours = fpl.ContrastiveLoss(distance=CosineSimilarity(), backend=backend, **kw)
        ref = fpl.ContrastiveLoss(distance=CosineSimilarity(), backend="reference", **kw)
    else:
        pml, ours, ref = (pml_losses.ContrastiveLoss(), fpl.ContrastiveLoss(backend=backend),
                          fpl.ContrastiveLoss(backend="reference"))
    got, want, pml_val = ours(x, y), ref(x, y), pml(x, y)
    assert torch.isfinite(want) and torch.isfinite(pml_val)
    check_close(got, want, what="fused vs reference")
    check_close(want, pml_val, what="reference vs PML")


@pytest.mark.parametrize("backend", FUSED)
def test_nan_embedding_still_gives_nan_contrastive(backend):
    """A NaN in the input is not a dropped term: NaN in, NaN out (docs/semantics.md)."""
    x = torch.randn(10, 6)
    x[2, 1] = float("nan")
    y = torch.arange(10) % 3
    assert torch.isnan(fpl.ContrastiveLoss(backend=backend)(x, y))

