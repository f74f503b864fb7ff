"""fpl.DistributedLossWrapper under faults, on 3 gloo processes (tests/dist_fault_cases.py, one
spawn; 3 ranks give a middle rank without rows, a rank whose only row is NaN, and a rank that
differs from the ones before and after it; 2-rank layouts are in tests/test_distributed.py). Every
pair loss with a rank that has no rows and with a NaN row on one rank of an uneven batch gives on
every rank the value and gradients of one process on the concatenated batch (NaN where that process
gives NaN); CrossBatchMemory wrapping around its memory several times gives one process's memory,
values and gradients step by step; inputs that differ across ranks (D, dtype, label dtype) raise a
ValueError naming what differs on every rank, and the group stays usable. The workers' collectives
time out after 30 s and the processes are killed after 120 s, so a hang fails the test."""
import functools
import warnings

import pytest
import torch

import dist_cases as C
import dist_fault_cases as F

pytest.importorskip("pytorch_metric_learning")

WORLDS = (3,)  # one spawn of about 20 s: the time budget of these tests
RTOL, ATOL = 1e-9, 1e-12


@functools.lru_cache(maxsize=None)
def results(world):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        return C.spawn(world, d, timeout=120, cases=F.run_fault_cases, collective_timeout_s=30)


def case_results(world, name):
    return C.case_results(results(world), name)


def close(a, b, what):
    C.close(a, b, what, RTOL, ATOL, equal_nan=True)


def one_process(loss, x, y, sizes, world):
    """world * loss(concatenated batch) and each rank's rows of its gradient."""
    x = x.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        v = loss(x, y) * world
    (g,) = torch.autograd.grad(v, [x])
    return v.detach(), [C.rows_of(g, sizes, rank) for rank in range(world)]


def check_ranks(per_rank, key, value, grads, what):
    for rank, r in enumerate(per_rank):
        v, g = r[key]
        close(v, value, f"{what} rank {rank} value")
        close(g, grads[rank], f"{what} rank {rank} grad")


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", list(C.pair_losses()))
def test_pair_loss_with_an_empty_rank_and_a_nan_row(world, name):
    make_f, make_p, _ = C.pair_losses()[name]
    if name.startswith("ms_mined"):  # PML's miner then PML's loss (the wrapper fuses both)
        make_p = make_f
    per_rank = case_results(world, f"pair/{name}")
    sizes = F.EMPTY_RANK[world]
    x, y = C.data(20, sum(sizes))
    value, grads = one_process(make_p(), x, y, sizes, world)
    check_ranks(per_rank, "empty_rank", value, grads, f"{name} a rank without rows {sizes}")
    # NaN: against one process of this library (PML drops NaN in some reductions; docs/semantics.md)
    sizes, x, y = F.nan_rank_data(world)
    value, grads = one_process(make_f(), x, y, sizes, world)
    assert torch.isnan(value), f"{name}: one process gives {value} for a NaN row"
    check_ranks(per_rank, "nan_row", value, grads, f"{name} a NaN row, sizes {sizes}")


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", list(F.xbm_losses()))
def test_cross_batch_memory_wrapping_around(world, name):
    per_rank = case_results(world, f"xbm/{name}")
    xbm = F.xbm_losses()[name]()
    wraps = 0
    for t in range(len(F.XBM_STEPS[world])):
        sizes, x, y = F.xbm_data(world, t)
        before = xbm.queue_idx
        value, grads = one_process(xbm, x, y, sizes, world)
        wraps += before + sum(sizes) >= F.XBM_MEMORY
        for rank, r in enumerate(per_rank):
            v, g, memory, label_memory, queue_idx, filled = r["steps"][t]
            close(v, value, f"{name} step {t} rank {rank} value")
            close(g, grads[rank], f"{name} step {t} rank {rank} grad")
            assert torch.equal(memory, xbm.embedding_memory) and torch.equal(label_memory, xbm.label_memory), \
                f"{name} step {t} rank {rank}: memory differs"
            assert (queue_idx, filled) == (xbm.queue_idx, xbm.has_been_filled)
    assert wraps >= 3, f"the steps wrap around the memory {wraps} times"


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("which", ["fused", "xbm"])
def test_a_per_class_beta_label_out_of_range_raises_on_every_rank(world, which):
    """The anchors' labels are checked from the global count of bad ones, so every rank raises (no
    rank waits in a collective): rank 1 names its label, the others another rank's."""
    per_rank = case_results(world, f"class_label/{which}")
    for rank, r in enumerate(per_rank):
        raised = r["raised"]
        assert raised is not None and raised["type"] == "ValueError", (rank, raised)
        assert raised["message"].startswith("labels: MarginLoss with a per-class beta"), raised["message"]
        assert ("[7]" if rank == 1 else "another rank") in raised["message"], (rank, raised["message"])


MISMATCH_WORDS = {"width": "width (D)", "dtype": "torch.float32", "label_dtype": "torch.int32"}


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("kind", F.MISMATCHES)
@pytest.mark.parametrize("which", F.MISMATCH_LOSSES)
def test_mismatch_across_ranks_raises_on_every_rank(world, which, kind):
    per_rank = case_results(world, f"mismatch/{which}/{kind}")
    name = "labels" if kind == "label_dtype" else "embeddings"
    for rank, r in enumerate(per_rank):
        raised = r["raised"]
        assert raised is not None, f"rank {rank}: no error"
        assert raised["type"] == "ValueError", (rank, raised)
        assert raised["message"].startswith(f"{name} must have the same"), (rank, raised["message"])
        assert MISMATCH_WORDS[kind] in raised["message"] and "rank 1" in raised["message"], (rank, raised["message"])
    for rank, r in enumerate(per_rank[1:], start=1):
        assert torch.equal(r["after"], per_rank[0]["after"]) and torch.isfinite(r["after"]), rank
