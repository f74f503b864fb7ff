"""Distances of duplicate and near-duplicate pairs (docs/design.md "Numerics"): the fused engines
take d2 = |q|^2 + |r|^2 - 2 S, except for the near pairs, whose d2 they sum from the rows'
differences, so identical rows are exactly 0 apart (as PML's torch.cdist on batches of up to 25
rows) and two rows 1e-3 apart keep their digits. Before, ContrastiveLoss with duplicated samples
differed from PML by up to 10% (the duplicate pair counted as a nonzero term of its average)."""
import pytest
import torch
import torch.nn.functional as F

import fused_pairloss as fpl
from kit import check_close

FUSED = [b for b in ("cpu", "triton") if b in fpl.available_backends("cpu")]
DTYPES = (torch.float32, torch.float64)
pml_losses = pytest.importorskip("pytorch_metric_learning.losses")


def grads_of(fn, params):
    out = fn()
    return out, torch.autograd.grad(out, params)


def duplicated_batch(n_distinct, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_distinct, d, generator=g, dtype=torch.float64).to(dtype)
    return torch.cat([x, x]).requires_grad_(True), torch.arange(n_distinct).repeat(2)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", DTYPES)
def test_contrastive_with_duplicated_samples_matches_pml(backend, dtype):
    """The reported case: N=16, 8 samples twice (fp32 was 1.3354 against PML's 1.4796)."""
    x, y = duplicated_batch(8, 32, dtype)
    val, (gx,) = grads_of(lambda: fpl.ContrastiveLoss(backend=backend)(x, y), [x])
    pml_val, (pml_gx,) = grads_of(lambda: pml_losses.ContrastiveLoss()(x, y), [x])
    check_close(val, pml_val, what="value")
    check_close(gx, pml_gx, what="grad")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", DTYPES)
def test_ref_emb_holding_copies_of_the_batch(backend, dtype):
    """A memory bank holds the batch itself (CrossBatchMemory does): each row meets its copy at d = 0."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 16, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    y = torch.randint(0, 3, (8,), generator=g)
    other = torch.randn(8, 16, generator=g, dtype=torch.float64).to(dtype)
    ref, ref_y = torch.cat([x.detach(), other]), torch.cat([y, torch.randint(0, 3, (8,), generator=g)])
    val, (gx,) = grads_of(lambda: fpl.ContrastiveLoss(backend=backend)(x, y, ref_emb=ref, ref_labels=ref_y), [x])
    pml_val, (pml_gx,) = grads_of(lambda: pml_losses.ContrastiveLoss()(x, y, ref_emb=ref, ref_labels=ref_y), [x])
    check_close(val, pml_val, what="value")
    check_close(gx, pml_gx, what="grad")


def accurate_contrastive(x, y, pos_margin=0.0, neg_margin=1.0):
    """PML's ContrastiveLoss with distances from the rows' differences (torch.cdist's direct path, the
    one PML takes up to 25 rows), in x's dtype: the truth for batches where PML's cdist takes the
    matmul path."""
    q = F.normalize(x, dim=1)
    d = torch.cdist(q, q, compute_mode="donot_use_mm_for_euclid_dist")
    same = y[:, None] == y[None, :]
    pos = same & ~torch.eye(len(y), dtype=torch.bool)
    losses = [torch.relu(d[pos] - pos_margin), torch.relu(neg_margin - d[~same])]
    return sum(t[t > 0].sum() / (t > 0).sum().clamp(min=1) for t in losses)


@pytest.mark.parametrize("backend", FUSED)
def test_large_batch_with_duplicates_against_accurate_distances(backend):
    """N=64: PML's cdist would take its matmul path (~3e-4 between identical rows in fp32); ours are
    accurate, so the value is that of the exact distances (docs/semantics.md)."""
    x, y = duplicated_batch(32, 24, torch.float32, seed=2)
    val, (gx,) = grads_of(lambda: fpl.ContrastiveLoss(backend=backend)(x, y), [x])
    x64 = x.detach().double().requires_grad_(True)
    truth, (truth_gx,) = grads_of(lambda: accurate_contrastive(x64, y), [x64])
    same, (same_gx,) = grads_of(lambda: accurate_contrastive(x, y), [x])
    check_close(val, truth, same, what="value")
    check_close(gx, truth_gx, same_gx, what="grad")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("gap", [1e-3, 1e-5])
def test_near_pair_distance_keeps_its_digits(backend, gap):
    """Two unit rows `gap` apart: ContrastiveLoss of the one positive pair is their distance. With
    2 - 2 S it was 9.766e-4 for 1e-3 in fp32; now within a few ulps of the fp64 truth."""
    g = torch.Generator().manual_seed(3)
    a = F.normalize(torch.randn(1, 64, generator=g, dtype=torch.float64), dim=1)
    b = F.normalize(a + gap * F.normalize(torch.randn(1, 64, generator=g, dtype=torch.float64), dim=1), dim=1)
    y = torch.tensor([0, 0])
    for dtype in DTYPES:
        x = torch.cat([a, b]).to(dtype)
        truth = (F.normalize(x.double(), dim=1)[0] - F.normalize(x.double(), dim=1)[1]).norm()
        got = fpl.ContrastiveLoss(backend=backend)(x, y)
        rel = abs(got.double() - truth).item() / truth.item()
        assert rel < 64 * torch.finfo(dtype).eps, (dtype, got.item(), truth.item())


@pytest.mark.parametrize("backend", FUSED)
def test_duplicate_pairs_are_exactly_zero_at_op_level(backend):
    """The pair engine's distance of identical rows is 0, so Contrastive's hinge counts them as zero
    terms: the counts of x > 0 over the positives are those of the distinct pairs only."""
    x, y = duplicated_batch(6, 8, torch.float32, seed=4)
    q = F.normalize(x.detach(), dim=1)
    from fused_pairloss.losses import contrastive
    from fused_pairloss.ops import stats

    st = stats.pair_stats(q, None, y, None, None, contrastive.declaration(0.0, 1.0, "lp"), backend)
    assert torch.equal(st.count_pos, torch.ones(12, dtype=torch.int32))  # each row's copy
    assert torch.equal(st.nonzero_pos, torch.zeros(12, dtype=torch.int32))
    assert torch.equal(st.sum_pos, torch.zeros(12))


@pytest.fixture
def isa_cap():
    """Caps the CPU kernels' instruction set; restores the selection in force afterwards."""
    op = torch.ops.fused_pairloss
    before = op.cpu_isa()
    yield op.cpu_isa
    op.cpu_isa(before)


@pytest.mark.skipif("cpu" not in FUSED, reason="the cpu backend is not built")
def test_near_pairs_give_the_same_bits_on_every_isa(isa_cap):
    """The near pairs' sums have no FMA and run in k order: avx512, avx2 and base agree bitwise on them."""
    x, y = duplicated_batch(20, 40, torch.float32, seed=5)
    g = torch.Generator().manual_seed(6)
    near = x.detach() + 1e-3 * torch.randn(x.shape, generator=g)  # near-duplicates of every row
    q = F.normalize(torch.cat([x.detach(), near]), dim=1)
    labels = torch.cat([y, y])
    from fused_pairloss.losses import contrastive
    from fused_pairloss.ops import stats

    spec = contrastive.declaration(0.0, 2.0, "lp")  # every negative inside the margin: no kink at all
    results = []
    for isa in ("avx512", "avx2", "base"):
        if isa_cap(isa) != isa:
            continue
        st = stats.pair_stats(q, None, labels, None, None, spec, "cpu")
        results.append(st.sum_pos)
    if len(results) < 2:
        pytest.skip("this CPU has one instruction set of the three")
    for other in results[1:]:
        assert torch.equal(other, results[0])
