"""The multi-process cases of tests/test_distributed_faults.py, run by tests/dist_cases.py's spawn:
every pair loss in DistributedLossWrapper with a rank that has no rows and with a NaN row on one
rank of an uneven batch; CrossBatchMemory wrapping around its memory several times; inputs that
differ across ranks (D, dtype, label dtype), which must raise on every rank."""
from __future__ import annotations

import traceback

import torch

import dist_cases as C

EMPTY_RANK = C.EMPTY_RANK                   # rows per rank, one rank without rows
NAN_SIZES = {2: [7, 3], 3: [4, 1, 6]}       # uneven; rank 1's first row is NaN
XBM_MEMORY = 8
# rows per rank per step: 33 (2 ranks) / 29 (3 ranks) rows through a memory of 8 (several
# wrap-arounds, batches that straddle the end of the memory, a rank without rows)
XBM_STEPS = {2: [[3, 2], [4, 3], [0, 5], [2, 2], [5, 1], [3, 3]],
             3: [[2, 1, 2], [3, 0, 3], [1, 2, 1], [2, 2, 2], [0, 3, 2], [1, 1, 1]]}
MISMATCHES = ("width", "dtype", "label_dtype")
# which path of the wrapper a mismatch goes through
MISMATCH_LOSSES = ("fused", "pml_path", "xbm")


def nan_rank_data(world):
    sizes = NAN_SIZES[world]
    x, y = C.data(21, sum(sizes))
    x[sizes[0]] = float("nan")
    return sizes, x, y


def xbm_losses():
    import fused_pairloss as fpl
    from pytorch_metric_learning import miners

    return {
        "ms": lambda: fpl.CrossBatchMemory(fpl.MultiSimilarityLoss(), C.D, XBM_MEMORY),
        "ms_miner": lambda: fpl.CrossBatchMemory(fpl.MultiSimilarityLoss(), C.D, XBM_MEMORY,
                                                 miner=miners.MultiSimilarityMiner(0.1)),
        "supcon": lambda: fpl.CrossBatchMemory(fpl.SupConLoss(), C.D, XBM_MEMORY),
        "ntxent": lambda: fpl.CrossBatchMemory(fpl.NTXentLoss(), C.D, XBM_MEMORY),
        "contrastive": lambda: fpl.CrossBatchMemory(fpl.ContrastiveLoss(), C.D, XBM_MEMORY),
    }


def xbm_data(world, step):
    sizes = XBM_STEPS[world][step]
    x, y = C.data(300 + step, sum(sizes))
    return sizes, x, y


def mismatched_inputs(rank, kind):
    """This rank's (embeddings, labels): rank 1 differs from the others in `kind`."""
    x, y = C.data(40 + rank, 5)
    if rank == 1:
        if kind == "width":
            x = torch.cat([x, x[:, :2]], dim=1)
        elif kind == "dtype":
            x = x.float()
        elif kind == "label_dtype":
            y = y.int()
    return x, y


def mismatch_module(which):
    import fused_pairloss as fpl
    from pytorch_metric_learning import losses as L

    if which == "fused":
        return fpl.MultiSimilarityLoss()
    if which == "pml_path":  # PML's computation: the gathered batch
        return L.TripletMarginLoss()
    return fpl.CrossBatchMemory(fpl.MultiSimilarityLoss(), C.D, XBM_MEMORY)


def run_fault_cases(rank, world):
    import fused_pairloss as fpl

    out = {}

    def case(name, fn):
        try:
            out[name] = fn()
        except Exception:  # recorded, reported by the parent test of that case
            out[name] = {"error": traceback.format_exc()}

    def wrapped_value_and_grad(make, x, sizes, y):
        xr = C._leaf(C.rows_of(x, sizes, rank))
        v = fpl.DistributedLossWrapper(make())(xr, C.rows_of(y, sizes, rank))
        return v.detach(), C._grads(v, [xr])[0]

    for name, (make_f, _, _) in C.pair_losses().items():
        def pair_case(make_f=make_f):
            x0, y0 = C.data(20, sum(EMPTY_RANK[world]))
            sizes, xn, yn = nan_rank_data(world)
            return {"empty_rank": wrapped_value_and_grad(make_f, x0, EMPTY_RANK[world], y0),
                    "nan_row": wrapped_value_and_grad(make_f, xn, sizes, yn)}

        case(f"pair/{name}", pair_case)

    for name, make in xbm_losses().items():
        def xbm_case(make=make):
            xbm = make()
            wrapped = fpl.DistributedLossWrapper(xbm)
            steps = []
            for t in range(len(XBM_STEPS[world])):
                sizes, x, y = xbm_data(world, t)
                xr = C._leaf(C.rows_of(x, sizes, rank))
                v = wrapped(xr, C.rows_of(y, sizes, rank))
                steps.append((v.detach(), C._grads(v, [xr])[0], xbm.embedding_memory.clone(),
                              xbm.label_memory.clone(), xbm.queue_idx, xbm.has_been_filled))
            return {"steps": steps}

        case(f"xbm/{name}", xbm_case)

    for which in MISMATCH_LOSSES:
        for kind in MISMATCHES:
            def mismatch_case(which=which, kind=kind):
                x, y = mismatched_inputs(rank, kind)
                try:
                    fpl.DistributedLossWrapper(mismatch_module(which))(x.requires_grad_(True), y)
                except Exception as e:
                    raised = {"type": type(e).__name__, "message": str(e)}
                else:
                    raised = None
                # the group is still in step: a normal call afterwards works on every rank
                xa, ya = C.data(50, 4 * world)
                after = fpl.DistributedLossWrapper(fpl.MultiSimilarityLoss())(
                    C.rows_of(xa, [4] * world, rank), C.rows_of(ya, [4] * world, rank))
                return {"raised": raised, "after": after.detach()}

            case(f"mismatch/{which}/{kind}", mismatch_case)

    for which in ("fused", "xbm"):
        def class_label_case(which=which):
            """MarginLoss(num_classes=5) looks beta up by the anchors' labels: rank 1 holds two rows of
            label 7 (anchors of triplets; a lone row of it would have none, and PML reads no beta there)."""
            loss = fpl.MarginLoss(num_classes=5)
            module = loss if which == "fused" else fpl.CrossBatchMemory(loss, C.D, 32)  # room for 3 ranks' rows
            x, y = C.data(60 + rank, 5)
            if rank == 1:
                y[2] = y[3] = 7
            try:
                fpl.DistributedLossWrapper(module)(x.requires_grad_(True), y)
            except Exception as e:
                return {"raised": {"type": type(e).__name__, "message": str(e)}}
            return {"raised": None}

        case(f"class_label/{which}", class_label_case)
    return out
