"""fpl.DistributedLossWrapper on 2 and 3 gloo processes (CPU, torch.multiprocessing spawn, a free
port): every pair loss (both distances, the mined MS) against PML's DistributedLossWrapper and
against one process on the whole batch (values and gradients, even and uneven local sizes, a
separate ref, efficient=True), the non-fused cases against PML's wrapper, the class losses under
plain DDP against one process (and ProxyAnchor against PML's under DDP), CrossBatchMemory inside
the wrapper against one process step by step, and the largest tensor a rank creates. One spawn per
world size runs every case (tests/dist_cases.py); each test checks its case's saved results."""
import functools
import warnings

import pytest
import torch

import dist_cases as C
import fused_pairloss as fpl

pytest.importorskip("pytorch_metric_learning")
from pytorch_metric_learning import losses as L  # noqa: E402

WORLDS = (2, 3)
RTOL, ATOL = 1e-9, 1e-12


@functools.lru_cache(maxsize=None)
def results(world):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        return C.spawn(world, d)


def case_results(world, name):
    return C.case_results(results(world), name)


def close(a, b, what):
    C.close(a, b, what, RTOL, ATOL)


def single_process(loss, x, y, sizes, world, ref=None, miner=None):
    """world * loss(gathered batch) and each rank's slice of its gradient (PML's wrapper's
    definition) from one process."""
    x = x.clone().requires_grad_(True)
    leaves = [x]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if ref is None:
            idx = None if miner is None else miner(x, y)
            v = loss(x, y, idx) * world
        else:
            r = ref[0].clone().requires_grad_(True)
            leaves.append(r)
            v = loss(x, y, None, r, ref[1]) * world
    grads = torch.autograd.grad(v, leaves, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(leaves, grads)]
    return v.detach(), [[C.rows_of(g, sizes, rank) for g in grads] for rank in range(world)]


def check_ranks(per_rank, key, value, grads_per_rank, what):
    for rank, r in enumerate(per_rank):
        v, gs = r[key]
        close(v, value, f"{what} rank {rank} value")
        for k, (g, t) in enumerate(zip(gs, grads_per_rank[rank])):
            close(g, t, f"{what} rank {rank} grad {k}")


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", list(C.pair_losses()))
def test_pair_loss(world, name):
    make_f, make_p, make_miner = C.pair_losses()[name]
    per_rank = case_results(world, name)
    # PML's wrapper, rank by rank (its gathered order differs per rank: the value is order-invariant)
    for rank, r in enumerate(per_rank):
        close(r["even"][0], r["pml"][0], f"{name} rank {rank} value vs PML's wrapper")
        close(r["even"][1][0], r["pml"][1][0], f"{name} rank {rank} grad vs PML's wrapper")
        close(r["pml_wrapping_ours"][0], r["pml"][0], f"{name} rank {rank} value of PML's wrapper around ours")
        close(r["pml_wrapping_ours"][1][0], r["pml"][1][0], f"{name} rank {rank} grad of PML's wrapper around ours")
        close(r["efficient"][0], r["even"][0], f"{name} rank {rank} efficient=True value")
        close(r["efficient"][1][0], r["even"][1][0], f"{name} rank {rank} efficient=True grad")
        if "efficient_tuple" in r:  # with an efficient DistributedMinerWrapper's tuple: PML's efficient call
            close(r["efficient_tuple"][0], r["pml_efficient_tuple"][0], f"{name} rank {rank} efficient tuple value")
            close(r["efficient_tuple"][1][0], r["pml_efficient_tuple"][1][0],
                  f"{name} rank {rank} efficient tuple grad")
    # one process on the whole batch, PML's loss, even and uneven sizes
    miner = None if make_miner is None else make_miner()
    x, y = C.data(1, C.EVEN * world)
    v, g = single_process(make_p(), x, y, [C.EVEN] * world, world, miner=miner)
    check_ranks(per_rank, "even", v, g, f"{name} even")
    sizes = C.UNEVEN[world]
    x, y = C.data(2, sum(sizes))
    v, g = single_process(make_p(), x, y, sizes, world, miner=miner)
    check_ranks(per_rank, "uneven", v, g, f"{name} uneven {sizes}")
    if "empty_rank" in per_rank[0]:
        sizes0 = C.EMPTY_RANK[world]
        x0, y0 = C.data(10, sum(sizes0))
        v, g = single_process(make_p(), x0, y0, sizes0, world, miner=miner)
        check_ranks(per_rank, "empty_rank", v, g, f"{name} a rank without rows {sizes0}")
    if "ref" in per_rank[0]:
        r, ry = C.data(3, sum(sizes))
        v, g = single_process(make_p(), x, y, sizes, world, ref=(r, ry))
        check_ranks(per_rank, "ref", v, g, f"{name} ref")


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", list(C.fallback_losses()) + ["indices_tuple"])
def test_not_fused_does_what_pml_does(world, name):
    per_rank = case_results(world, name)
    for rank, r in enumerate(per_rank):
        close(r["even"][0], r["pml"][0], f"{name} rank {rank} value vs PML's wrapper")
        close(r["even"][1][0], r["pml"][1][0], f"{name} rank {rank} grad vs PML's wrapper")
    if name in C.fallback_losses():
        # efficient=True: PML's efficient call where PML computes; our losses the wrapper does not
        # fuse run on the gathered batch either way (the exact result)
        expected = "even" if name in ("lifted_pairs", "tuplet") else "pml_efficient"
        for rank, r in enumerate(per_rank):
            close(r["efficient"][0], r[expected][0], f"{name} rank {rank} efficient value vs {expected}")
            close(r["efficient"][1][0], r[expected][1][0], f"{name} rank {rank} efficient grad vs {expected}")
            if expected == "pml_efficient":  # a ref_emb without ref_labels
                close(r["efficient_ref"][0], r["pml_efficient_ref"][0], f"{name} rank {rank} efficient ref value")
                close(r["efficient_ref"][1][0], r["pml_efficient_ref"][1][0], f"{name} rank {rank} efficient ref grad")
        # uneven sizes (PML's own wrapper cannot): one process
        sizes = C.UNEVEN[world]
        x, y = C.data(5, sum(sizes))
        v, g = single_process(C.fallback_losses()[name][1](), x, y, sizes, world)
        check_ranks(per_rank, "uneven", v, g, f"{name} uneven")


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", list(C.class_losses()))
def test_class_loss_under_ddp(world, name):
    """Plain DDP, each rank its local rows: the mean-reduced class losses give one process's
    gradients on the whole batch; ProxyAnchor (a log-sum-exp over each class's samples, not
    decomposable over ranks) gives what PML's ProxyAnchorLoss gives under DDP."""
    make_f, make_p = C.class_losses()[name]
    per_rank = case_results(world, name)
    if make_p is not None:
        for rank, r in enumerate(per_rank):
            for k in r["fpl"]:
                close(r["fpl"][k], r["pml"][k], f"{name} rank {rank} {k} vs PML under DDP")
        return
    x, y = C.class_data(7, C.EVEN * world)
    net = C.ddp_net(make_f, 8)
    net(x, y).backward()
    for rank, r in enumerate(per_rank):
        for k, p in net.named_parameters():
            close(r["fpl"][k], p.grad, f"{name} rank {rank} {k} vs one process")


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", list(C.xbm_losses()))
def test_cross_batch_memory_in_wrapper(world, name):
    """Step by step over a wrap-around and an enqueue_mask step: every rank's memory is the one of
    one process fed the gathered batches in rank order, value and gradients are world_size times
    that process's."""
    per_rank = case_results(world, name)
    xbm = C.xbm_losses()[name]()
    for t in range(len(C.XBM_STEPS[world])):
        sizes, x, y, mask = C.xbm_data(world, t)
        x = x.clone().requires_grad_(True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            v = xbm(x, y, enqueue_mask=mask) * world
        (g,) = torch.autograd.grad(v, [x], allow_unused=True)
        g = torch.zeros_like(x) if g is None else g
        for rank, r in enumerate(per_rank):
            rv, rg, mem, qidx, filled, records = r["steps"][t]
            close(rv, v.detach(), f"{name} step {t} rank {rank} value")
            close(rg[0], C.rows_of(g, sizes, rank), f"{name} step {t} rank {rank} grad")
            assert torch.equal(mem, xbm.embedding_memory), f"{name} step {t} rank {rank}: memory differs"
            assert (qidx, filled) == (xbm.queue_idx, xbm.has_been_filled)
            # the miner's stats count every rank's queries (PML's step mines the gathered batch)
            want = C.miner_records(xbm)
            assert (records is None) == (want is None)
            for k, value in (records or {}).items():
                assert (value is None) == (want[k] is None), f"{name} step {t} rank {rank} {k}"
                assert value is None or value == pytest.approx(want[k], rel=1e-12, nan_ok=True), \
                    f"{name} step {t} rank {rank} {k}"


@pytest.mark.parametrize("world", WORLDS)
def test_pmls_wrapper_takes_our_cross_batch_memory(world):
    """PML's DistributedLossWrapper around our CrossBatchMemory: on every rank and step the value,
    gradient and memory of PML's wrapper around PML's CrossBatchMemory (over a wrap-around)."""
    for rank, r in enumerate(case_results(world, "pml_wrapper_xbm")):
        for t, (ours, pml) in enumerate(zip(r["ours"], r["pml"])):
            close(ours[0], pml[0], f"step {t} rank {rank} value")
            close(ours[1][0], pml[1][0], f"step {t} rank {rank} grad")
            assert torch.equal(ours[2], pml[2]), f"step {t} rank {rank}: memory differs"


@pytest.mark.parametrize("world", WORLDS)
def test_cross_batch_memory_in_wrapper_reads_a_miners_tuple_in_pmls_order(world):
    """An indices_tuple of PML's DistributedMinerWrapper indexes PML's gathered order (this rank's
    rows first); our memory gathers in rank order and reads the tuple there: on rank 1 it read it
    as rank order (3.537 against PML's 3.490). On every rank PML's value and gradient."""
    for rank, r in enumerate(case_results(world, "xbm_tuple")):
        for t, (ours, pml) in enumerate(zip(r["ours"], r["pml"])):
            close(ours[0], pml[0], f"step {t} rank {rank} value")
            close(ours[1][0], pml[1][0], f"step {t} rank {rank} grad")


@pytest.mark.parametrize("world", WORLDS)
def test_what_pmls_wrapper_accepts(world):
    """Float labels and a ref_emb without ref_labels, fused, against PML's wrapper around PML's loss;
    our memory in our wrapper with float labels gives the steps of int labels."""
    for rank, r in enumerate(case_results(world, "pml_inputs")):
        for what in ("float_labels", "ref_without_labels"):
            ours, pml = r[f"{what}_ours"], r[f"{what}_pml"]
            close(ours[0], pml[0], f"{what} rank {rank} value")
            close(ours[1][0], pml[1][0], f"{what} rank {rank} grad")
        for t, (a, b) in enumerate(zip(r["xbm_float"], r["xbm_int"])):  # our memory in our wrapper
            close(a[0], b[0], f"memory with float labels step {t} rank {rank} value")
            close(a[1][0], b[1][0], f"memory with float labels step {t} rank {rank} grad")


@pytest.mark.parametrize("world", WORLDS)
def test_no_rank_holds_n_global_squared(world):
    for rank, r in enumerate(case_results(world, "no_n_squared")):
        assert r["biggest"] < r["n_local"] * r["n_global"], (rank, r)


def test_not_distributed_warns_and_returns_the_loss():
    x = torch.randn(12, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (12,))
    with pytest.warns(UserWarning, match="non-distributed"):
        v = fpl.DistributedLossWrapper(fpl.MultiSimilarityLoss())(x, y)
    torch.testing.assert_close(v, fpl.MultiSimilarityLoss()(x, y))


def test_wrapper_rejects_other_modules():
    with pytest.raises(TypeError, match="loss must be"):
        fpl.DistributedLossWrapper(torch.nn.Linear(2, 2))
    fpl.DistributedLossWrapper(L.ContrastiveLoss())  # PML's own losses are accepted (PML's computation)
