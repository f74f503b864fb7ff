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



# (loss, constructor arguments, noise, norm of the embeddings): batches whose rows sit near their
# class's weight column (or cluster), so that the loss is 1e-8 to 1e-4 while the target logit is 10-60
SMALL_LOSS_CASES = {
    "NormalizedSoftmaxLoss": (dict(temperature=0.05), 0.15, 1),
    "CosFaceLoss": ({}, 0.15, 1),
    "ArcFaceLoss": ({}, 0.15, 1),
    "SubCenterArcFaceLoss": (dict(sub_centers=2), 0.15, 1),
    "SoftTripleLoss": (dict(centers_per_class=2), 0.15, 1),
    "ProxyNCALoss": (dict(softmax_scale=10), 0.15, 1),
    "LargeMarginSoftmaxLoss": ({}, 0.05, 40),
    "NCALoss": (dict(softmax_scale=20), 0.15, 1),
    "InstanceLoss": (dict(gamma=16), 0.15, 1),  # one label per row: its own column the target
}


@pytest.mark.parametrize("name", list(SMALL_LOSS_CASES))
def test_a_small_cross_entropy_keeps_its_digits(name):
    """L_i = logaddexp(lse_i, z_i) - z_i cancels to the rounding of |z_i| where the target dominates
    (a near-converged batch: 1e-3 relative error in fp32 with z = 40 and L = 1e-6, where PML's own
    fp32 value is off by 1e-4 to 1e-2); computed as softplus(lse_i - z_i) the fp32 value keeps the
    digits of the fp64 truth (PML in fp64, same weights)."""
    kw, noise, norm = SMALL_LOSS_CASES[name]
    C, D, N = 4, 16, 16
    y = torch.arange(N) % (N if name == "InstanceLoss" else C)
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.one_hot(y, D).double() + noise * torch.randn(N, D, generator=g, dtype=torch.float64)
    x = norm * x
    if name in ("NCALoss", "InstanceLoss"):
        ours, pml = getattr(fpl, name)(**kw), getattr(pml_losses, name)(**kw)
    else:
        ours = getattr(fpl, name)(num_classes=C, embedding_size=D, **kw)
        pml = getattr(pml_losses, name)(num_classes=C, embedding_size=D, **kw)
        K = kw.get("sub_centers", kw.get("centers_per_class", 1))
        with torch.no_grad():  # class c's weight vectors (sub-centers, centers) along axis c
            for p in ours.parameters():
                along = torch.eye(D, dtype=p.dtype)[:, torch.arange(C * K) // K]
                p.copy_(along.t() if p.shape[1] == D else along)
        pml.load_state_dict(ours.state_dict())
    truth = pml.double()(x, y).item()
    assert 1e-9 < truth < 1e-2, truth  # the case is the small-loss regime
    got = ours(x.float(), y).item()
    assert abs(got - truth) <= 2e-5 * truth, (got, truth)


@pytest.mark.parametrize("backend", [*FUSED[:1], "chunked"])
@pytest.mark.parametrize("name", ["ClipLoss", "ClipLoss_local"])
def test_a_small_clip_loss_keeps_its_digits(name, backend):
    """CLIP's rows and columns likewise (image-text pairs well aligned at logit scale 100, the loss
    5e-7): logaddexp(lse, x_ii) - x_ii was 9.5e-2 off in fp32 (open_clip's own fp32 value 6.7e-4);
    softplus of the LSE over the other columns minus x_ii keeps the fp64 truth's digits, on the
    compiled engine and on the PyTorch row-chunk path (which took LSE(all) - x_ii, clamped at 0),
    and so does the gradient of the logit scale."""
    g = torch.Generator().manual_seed(6)
    image = torch.nn.functional.normalize(torch.randn(32, 16, generator=g, dtype=torch.float64), dim=1)
    text = torch.nn.functional.normalize(image + 0.15 * torch.randn(32, 16, generator=g, dtype=torch.float64), dim=1)
    image, text = image.float(), text.float()  # the truth on the fp32 inputs themselves
    scale = torch.tensor(100.0)
    kwargs = dict(local_loss=True, all_image_features=image, all_text_features=text) if name.endswith("local") else {}
    from fused_pairloss.losses.clip import clip_fused, clip_reference
    wide = {k: (v.double() if torch.is_tensor(v) else v) for k, v in kwargs.items()}
    scale64 = scale.double().requires_grad_(True)
    truth = clip_reference(image.double(), text.double(), scale64, **wide)
    truth_grad, = torch.autograd.grad(truth, scale64)
    assert 1e-9 < truth.item() < 1e-5, truth
    scale = scale.requires_grad_(True)
    got = clip_fused(image, text, scale, backend=backend, **kwargs)
    got_grad, = torch.autograd.grad(got, scale)
    assert abs(got.item() - truth.item()) <= 1e-4 * truth.item(), (got, truth)
    assert abs(got_grad.item() - truth_grad.item()) <= 1e-3 * abs(truth_grad.item()), (got_grad, truth_grad)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_tuplet_margin_with_a_copied_row(backend, dtype):
    """A row and its copy (a memory bank holding the batch): the fused S of the pair can round just
    above 1 where PML's is exactly 1; the term takes S_ap within [-1, 1], so the loss is PML's, not
    NaN. Seeds on which PML's own S rounds beyond 1 (its loss NaN, in the case's dtype or in fp64)
    are left out."""
    compared = 0
    for seed in range(24):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(1, 8, generator=g, dtype=torch.float64)
        x = torch.cat([x, x, torch.randn(3, 8, generator=g, dtype=torch.float64)]).to(dtype)
        y = torch.tensor([0, 0, 1, 1, 1])
        pml, truth = pml_losses.TupletMarginLoss()(x, y), pml_losses.TupletMarginLoss()(x.double(), y)
        if not (pml.isfinite() and truth.isfinite()):
            continue
        compared += 1
        ours = fpl.TupletMarginLoss(backend=backend)(x, y)
        check_close(ours, truth, pml, what=f"seed {seed}", dtype=dtype)
    assert compared >= 8
