"""The multi-process cases of tests/test_distributed.py: the losses, the data, and the worker that
each spawned gloo process runs (one spawn per world size runs every case; the parent test compares
the saved per-rank results with PML's wrapper and with one process on the whole batch)."""
from __future__ import annotations

import os
import socket
import sys
import traceback
import warnings

import torch
import torch.distributed as dist

D = 6
N_CLASSES = 5
EVEN = 10  # rows per rank in the even cases
UNEVEN = {2: [13, 6], 3: [9, 4, 12]}
EMPTY_RANK = {2: [0, 9], 3: [5, 0, 6]}  # one rank has no rows
# CrossBatchMemory steps: rows per rank per step (memory 16: wraps in the third step; the last
# step has a rank without rows)
XBM_STEPS = {2: [[5, 3], [4, 4], [2, 6], [6, 1], [0, 4]], 3: [[3, 2, 3], [2, 4, 2], [1, 3, 4], [4, 1, 2], [2, 0, 3]]}
XBM_MEMORY = 16
XBM_MASK_STEP = 3  # this step passes an enqueue_mask


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def data(seed, n, d=D, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, N_CLASSES, (n,), generator=g)
    return x, y


def rows_of(t, sizes, rank):
    off = sum(sizes[:rank])
    return t[off:off + sizes[rank]]


# ---- pair losses: (fpl module, PML loss, PML miner or None) ---------------------------------------
def pair_losses():
    import fused_pairloss as fpl
    from pytorch_metric_learning import distances as Dm
    from pytorch_metric_learning import losses as L
    from pytorch_metric_learning import miners

    lp, cos = Dm.LpDistance, Dm.CosineSimilarity
    return {
        "ms": (lambda: fpl.MultiSimilarityLoss(), lambda: L.MultiSimilarityLoss(), None),
        "ms_lp": (lambda: fpl.MultiSimilarityLoss(beta=10, distance=lp()),
                  lambda: L.MultiSimilarityLoss(beta=10, distance=lp()), None),
        "ms_mined": (lambda: fpl.MultiSimilarityLoss(miner_epsilon=0.1), lambda: L.MultiSimilarityLoss(),
                     lambda: miners.MultiSimilarityMiner(0.1)),
        "ms_mined_lp": (lambda: fpl.MultiSimilarityLoss(beta=10, miner_epsilon=0.1, distance=lp()),
                        lambda: L.MultiSimilarityLoss(beta=10, distance=lp()),
                        lambda: miners.MultiSimilarityMiner(0.1, distance=lp())),
        "circle": (lambda: fpl.CircleLoss(), lambda: L.CircleLoss(), None),
        "ntxent": (lambda: fpl.NTXentLoss(), lambda: L.NTXentLoss(), None),
        "ntxent_lp": (lambda: fpl.NTXentLoss(0.2, distance=lp()), lambda: L.NTXentLoss(0.2, distance=lp()), None),
        "supcon": (lambda: fpl.SupConLoss(), lambda: L.SupConLoss(), None),
        "supcon_lp": (lambda: fpl.SupConLoss(0.2, distance=lp()), lambda: L.SupConLoss(0.2, distance=lp()), None),
        "contrastive": (lambda: fpl.ContrastiveLoss(), lambda: L.ContrastiveLoss(), None),
        "contrastive_cos": (lambda: fpl.ContrastiveLoss(0.9, 0.1, distance=cos()),
                            lambda: L.ContrastiveLoss(0.9, 0.1, distance=cos()), None),
        "lifted": (lambda: fpl.GeneralizedLiftedStructureLoss(), lambda: L.GeneralizedLiftedStructureLoss(), None),
        "lifted_cos": (lambda: fpl.GeneralizedLiftedStructureLoss(0.2, 0.8, distance=cos()),
                       lambda: L.GeneralizedLiftedStructureLoss(0.2, 0.8, distance=cos()), None),
        "triplet": (lambda: fpl.TripletMarginLoss(0.2), lambda: L.TripletMarginLoss(0.2), None),
        "triplet_cos": (lambda: fpl.TripletMarginLoss(0.1, distance=cos()),
                        lambda: L.TripletMarginLoss(0.1, distance=cos()), None),
        "margin": (lambda: fpl.MarginLoss(0.2, beta=0.9), lambda: L.MarginLoss(0.2, beta=0.9), None),
        # a learned per-class beta: the rows' betas as the engine's row shifts
        "margin_per_class": (lambda: fpl.MarginLoss(0.2, nu=0.1, learn_beta=True, num_classes=N_CLASSES),
                             lambda: L.MarginLoss(0.2, nu=0.1, learn_beta=True, num_classes=N_CLASSES), None),
        "snr": (lambda: fpl.SignalToNoiseRatioContrastiveLoss(pos_margin=0.3, neg_margin=1.5),
                lambda: L.SignalToNoiseRatioContrastiveLoss(pos_margin=0.3, neg_margin=1.5), None),
        "nca": (lambda: fpl.NCALoss(softmax_scale=2), lambda: L.NCALoss(softmax_scale=2), None),
        "ipv": (lambda: fpl.IntraPairVarianceLoss(0.05, 0.05), lambda: L.IntraPairVarianceLoss(0.05, 0.05), None),
        "angular": (lambda: fpl.AngularLoss(), lambda: L.AngularLoss(), None),
        "tcm": (lambda: fpl.ThresholdConsistentMarginLoss(margin_plus=0.3, margin_minus=0.1),
                lambda: L.ThresholdConsistentMarginLoss(margin_plus=0.3, margin_minus=0.1), None),
    }


# not fused: the wrapper does what PML's does
def fallback_losses():
    import fused_pairloss as fpl
    from pytorch_metric_learning import losses as L
    from pytorch_metric_learning import reducers

    return {
        "pml_module": (lambda: fpl.MultiSimilarityLoss(reducer=reducers.MeanReducer()),
                       lambda: L.MultiSimilarityLoss(reducer=reducers.MeanReducer())),
        "reference_backend": (lambda: fpl.CircleLoss(backend="reference"), lambda: L.CircleLoss()),
        "pml_loss_object": (lambda: L.TripletMarginLoss(), lambda: L.TripletMarginLoss()),
        # fused by their own forward on the gathered batch as ref_emb, as PML calls them
        "lifted_pairs": (lambda: fpl.LiftedStructureLoss(), lambda: L.LiftedStructureLoss()),
        "tuplet": (lambda: fpl.TupletMarginLoss(scale=16), lambda: L.TupletMarginLoss(scale=16)),
    }


def class_losses():
    """(fpl module, PML module or None): the class-weight losses under plain DDP."""
    import fused_pairloss as fpl
    from pytorch_metric_learning import losses as L

    C = 4
    return {
        "softtriple": (lambda: fpl.SoftTripleLoss(C, D, centers_per_class=3), None),
        "proxycircle": (lambda: fpl.ProxyCircleLoss(C, D), None),
        "normsoftmax": (lambda: fpl.NormalizedSoftmaxLoss(C, D), None),
        "cosface": (lambda: fpl.CosFaceLoss(C, D), None),
        "arcface": (lambda: fpl.ArcFaceLoss(C, D), None),
        "proxyanchor": (lambda: fpl.ProxyAnchorLoss(C, D), lambda: L.ProxyAnchorLoss(C, D)),
    }


def xbm_losses():
    """(fpl CrossBatchMemory factory)."""
    import fused_pairloss as fpl
    from pytorch_metric_learning import losses as L
    from pytorch_metric_learning import miners

    return {
        "xbm_ms": lambda: fpl.CrossBatchMemory(fpl.MultiSimilarityLoss(), D, XBM_MEMORY),
        "xbm_ms_miner": lambda: fpl.CrossBatchMemory(fpl.MultiSimilarityLoss(), D, XBM_MEMORY,
                                                     miner=miners.MultiSimilarityMiner(0.1)),
        "xbm_supcon": lambda: fpl.CrossBatchMemory(fpl.SupConLoss(), D, XBM_MEMORY),
        "xbm_ipv": lambda: fpl.CrossBatchMemory(fpl.IntraPairVarianceLoss(0.05, 0.05), D, XBM_MEMORY),
        "xbm_unfused": lambda: fpl.CrossBatchMemory(L.TripletMarginLoss(), D, XBM_MEMORY),
        "xbm_triplet_miner": lambda: fpl.CrossBatchMemory(fpl.TripletMarginLoss(0.1), D, XBM_MEMORY,
                                                          miner=fpl.miners.TripletMarginMiner(0.3, collect_stats=True)),
        # a pair miner's rule in another loss's engine: PML's cosine MS miner beside an lp loss, and
        # PairMarginMiner's keep windows
        "xbm_contrastive_ms_miner": lambda: fpl.CrossBatchMemory(fpl.ContrastiveLoss(0.1, 1.2), D, XBM_MEMORY,
                                                                 miner=miners.MultiSimilarityMiner(0.1)),
        "xbm_contrastive_pair_margin": lambda: fpl.CrossBatchMemory(fpl.ContrastiveLoss(0.1, 1.2), D, XBM_MEMORY,
                                                                    miner=fpl.miners.PairMarginMiner(1.0, 1.5)),
    }


def miner_records(xbm):
    """What the CrossBatchMemory's miner recorded in the last step (PML's stats), None without one."""
    if xbm.miner is None:
        return None
    names = ("num_pos_pairs", "num_neg_pairs", "num_triplets", "pos_pair_dist", "neg_pair_dist")
    return {k: getattr(xbm.miner, k, None) for k in names}


class Net(torch.nn.Module):
    """A trunk and a class loss in one module, so DDP averages both gradients."""

    def __init__(self, loss):
        super().__init__()
        self.trunk = torch.nn.Linear(3, D).double()
        self.loss = loss.double()

    def forward(self, x, y):
        return self.loss(self.trunk(x), y)


def ddp_net(make_loss, seed):
    torch.manual_seed(seed)
    return Net(make_loss())


def class_data(seed, n):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randint(0, 4, (n,), generator=g)


def xbm_data(world, step, seed=0):
    sizes = XBM_STEPS[world][step]
    x, y = data(1000 + 17 * step + seed, sum(sizes))
    g = torch.Generator().manual_seed(50 + step)
    mask = (torch.rand(sum(sizes), generator=g) < 0.5) if step == XBM_MASK_STEP else None
    return sizes, x, y, mask


def _leaf(t):
    return t.clone().requires_grad_(True)


def _grads(value, leaves):
    grads = torch.autograd.grad(value, leaves, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(leaves, grads)]


def run_cases(rank, world):
    """Every case on this rank: {case name: result dict} (or the traceback of its failure)."""
    import fused_pairloss as fpl
    from pytorch_metric_learning.utils import distributed as pml_dist

    out = {}

    def case(name, fn):
        try:
            out[name] = fn()
        except Exception:  # recorded, reported by the parent test of that case
            out[name] = {"error": traceback.format_exc()}

    for name, (make_f, make_p, make_miner) in pair_losses().items():
        def pair_case(make_f=make_f, make_p=make_p, make_miner=make_miner, name=name):
            res = {}
            # even sizes: against PML's wrapper (whose all_gather needs equal sizes)
            x, y = data(1, EVEN * world)
            xr, yr = _leaf(rows_of(x, [EVEN] * world, rank)), rows_of(y, [EVEN] * world, rank)
            v = fpl.DistributedLossWrapper(make_f())(xr, yr)
            res["even"] = (v.detach(), _grads(v, [xr]))
            xp = _leaf(xr.detach())
            idx = None if make_miner is None else pml_dist.DistributedMinerWrapper(make_miner())(xp, yr)
            vp = pml_dist.DistributedLossWrapper(make_p())(xp, yr, idx)
            res["pml"] = (vp.detach(), _grads(vp, [xp]))
            # PML's wrapper around our loss (ours is a BaseMetricLossFunction): our loss on its gathered rows
            xo = _leaf(xr.detach())
            vo = pml_dist.DistributedLossWrapper(make_f())(xo, yr)
            res["pml_wrapping_ours"] = (vo.detach(), _grads(vo, [xo]))
            # efficient=True: the same exact result
            xe = _leaf(xr.detach())
            ve = fpl.DistributedLossWrapper(make_f(), efficient=True)(xe, yr)
            res["efficient"] = (ve.detach(), _grads(ve, [xe]))
            # efficient=True with an efficient miner wrapper's tuple: PML's efficient call (not for a
            # loss with miner_epsilon, which takes no tuple, nor TCM, whose PML class indexes the
            # batch with the ref's indices and fails there)
            if "mined" not in name and name != "tcm":
                from pytorch_metric_learning import miners as pml_miners
                tup = pml_dist.DistributedMinerWrapper(pml_miners.MultiSimilarityMiner(0.3), efficient=True)(
                    xr.detach(), yr)
                xe, xp = _leaf(xr.detach()), _leaf(xr.detach())
                ve = fpl.DistributedLossWrapper(make_f(), efficient=True)(xe, yr, tup)
                vp = pml_dist.DistributedLossWrapper(make_p(), efficient=True)(xp, yr, tup)
                res["efficient_tuple"] = (ve.detach(), _grads(ve, [xe]))
                res["pml_efficient_tuple"] = (vp.detach(), _grads(vp, [xp]))
            # uneven sizes: against one process on the whole batch (the parent computes it)
            sizes = UNEVEN[world]
            x, y = data(2, sum(sizes))
            xr, yr = _leaf(rows_of(x, sizes, rank)), rows_of(y, sizes, rank)
            v = fpl.DistributedLossWrapper(make_f())(xr, yr)
            res["uneven"] = (v.detach(), _grads(v, [xr]))
            if name in ("ms", "ntxent", "circle"):  # a rank without rows
                sizes0 = EMPTY_RANK[world]
                x0, y0 = data(10, sum(sizes0))
                xr0 = _leaf(rows_of(x0, sizes0, rank))
                v = fpl.DistributedLossWrapper(make_f())(xr0, rows_of(y0, sizes0, rank))
                res["empty_rank"] = (v.detach(), _grads(v, [xr0]))
            if name in ("ms", "contrastive"):  # a separate ref, gathered too
                r, ry = data(3, sum(sizes))
                xr2, rr = _leaf(xr.detach()), _leaf(rows_of(r, sizes, rank))
                v = fpl.DistributedLossWrapper(make_f())(xr2, yr, None, rr, rows_of(ry, sizes, rank))
                res["ref"] = (v.detach(), _grads(v, [xr2, rr]))
            return res

        case(name, pair_case)

    for name, (make_f, make_p) in fallback_losses().items():
        def fallback_case(make_f=make_f, make_p=make_p):
            x, y = data(4, EVEN * world)
            xr, yr = _leaf(rows_of(x, [EVEN] * world, rank)), rows_of(y, [EVEN] * world, rank)
            xp = _leaf(xr.detach())
            v = fpl.DistributedLossWrapper(make_f())(xr, yr)
            vp = pml_dist.DistributedLossWrapper(make_p())(xp, yr)
            sizes = UNEVEN[world]
            x, y = data(5, sum(sizes))
            xu = _leaf(rows_of(x, sizes, rank))
            vu = fpl.DistributedLossWrapper(make_f())(xu, rows_of(y, sizes, rank))
            # efficient=True where PML computes: PML's efficient call
            xe, xpe = _leaf(xr.detach()), _leaf(xr.detach())
            ve = fpl.DistributedLossWrapper(make_f(), efficient=True)(xe, yr)
            vpe = pml_dist.DistributedLossWrapper(make_p(), efficient=True)(xpe, yr)
            out = {"even": (v.detach(), _grads(v, [xr])), "pml": (vp.detach(), _grads(vp, [xp])),
                   "uneven": (vu.detach(), _grads(vu, [xu])),
                   "efficient": (ve.detach(), _grads(ve, [xe])), "pml_efficient": (vpe.detach(), _grads(vpe, [xpe]))}
            # a ref_emb without ref_labels: PML's efficient call reads the batch's labels for it
            r = rows_of(data(7, EVEN * world)[0], [EVEN] * world, rank)
            xe, xpe = _leaf(xr.detach()), _leaf(xr.detach())
            ve = fpl.DistributedLossWrapper(make_f(), efficient=True)(xe, yr, None, r)
            vpe = pml_dist.DistributedLossWrapper(make_p(), efficient=True)(xpe, yr, None, r)
            out["efficient_ref"] = (ve.detach(), _grads(ve, [xe]))
            out["pml_efficient_ref"] = (vpe.detach(), _grads(vpe, [xpe]))
            return out

        case(name, fallback_case)

    def indices_case():
        # an explicit indices_tuple (indices into PML's gathered order): PML's computation
        from pytorch_metric_learning import losses as L
        from pytorch_metric_learning import miners

        x, y = data(6, EVEN * world)
        xr, yr = _leaf(rows_of(x, [EVEN] * world, rank)), rows_of(y, [EVEN] * world, rank)
        idx = pml_dist.DistributedMinerWrapper(miners.PairMarginMiner(0.2, 0.8))(xr, yr)
        xp = _leaf(xr.detach())
        v = fpl.DistributedLossWrapper(fpl.ContrastiveLoss())(xr, yr, idx)
        vp = pml_dist.DistributedLossWrapper(L.ContrastiveLoss())(xp, yr, idx)
        return {"even": (v.detach(), _grads(v, [xr])), "pml": (vp.detach(), _grads(vp, [xp]))}

    case("indices_tuple", indices_case)

    for name, (make_f, make_p) in class_losses().items():
        def class_case(make_f=make_f, make_p=make_p):
            from torch.nn.parallel import DistributedDataParallel as DDP

            x, y = class_data(7, EVEN * world)
            xr, yr = rows_of(x, [EVEN] * world, rank), rows_of(y, [EVEN] * world, rank)
            res, init = {}, None
            for which, make in (("fpl", make_f), ("pml", make_p)):
                if make is None:
                    continue
                net = ddp_net(make, 8)
                if init is None:
                    init = {k: v.clone() for k, v in net.state_dict().items()}
                net.load_state_dict(init)  # PML's module: the same parameters (state_dicts load both ways)
                net = DDP(net)
                net(xr, yr).backward()
                res[which] = {k: p.grad.detach().clone() for k, p in net.module.named_parameters()}
            return res

        case(name, class_case)

    for name, make in xbm_losses().items():
        def xbm_case(make=make):
            xbm = make()
            wrapped = fpl.DistributedLossWrapper(xbm)
            steps = []
            for t in range(len(XBM_STEPS[world])):
                sizes, x, y, mask = xbm_data(world, t)
                xr, yr = _leaf(rows_of(x, sizes, rank)), rows_of(y, sizes, rank)
                m = None if mask is None else rows_of(mask, sizes, rank)
                v = wrapped(xr, yr, enqueue_mask=m)
                steps.append((v.detach(), _grads(v, [xr]), xbm.embedding_memory.clone(), xbm.queue_idx,
                              xbm.has_been_filled, miner_records(xbm)))
            return {"steps": steps}

        case(name, xbm_case)

    def pml_wrapper_xbm_case():
        # PML's wrapper around our CrossBatchMemory (ours is a PML CrossBatchMemory) and around PML's,
        # equal rows per rank (PML's all_gather); PML's gathered order puts the local rows first
        from pytorch_metric_learning import losses as L

        memories = {"ours": fpl.CrossBatchMemory(fpl.ContrastiveLoss(), D, memory_size=XBM_MEMORY),
                    "pml": L.CrossBatchMemory(L.ContrastiveLoss(), D, memory_size=XBM_MEMORY)}
        out = {}
        for who, xbm in memories.items():
            wrapped = pml_dist.DistributedLossWrapper(xbm)
            steps = []
            for t in range(5):
                x, y = data(20 + t, 4 * world)
                xr, yr = _leaf(rows_of(x, [4] * world, rank)), rows_of(y, [4] * world, rank)
                v = wrapped(xr, yr)
                steps.append((v.detach(), _grads(v, [xr]), xbm.embedding_memory.clone()))
            out[who] = steps
        return out

    case("pml_wrapper_xbm", pml_wrapper_xbm_case)

    def xbm_tuple_case():
        # a tuple from PML's DistributedMinerWrapper indexes PML's gathered order (this rank's rows
        # first): our memory in our wrapper against PML's memory in PML's wrapper, a first step (on
        # later ones PML reads the tuple's partners as memory slots, which hold rows in another
        # order here: docs/training.md)
        from pytorch_metric_learning import losses as L
        from pytorch_metric_learning import miners

        out = {}
        for who, wrapped in (("ours", fpl.DistributedLossWrapper(fpl.CrossBatchMemory(fpl.ContrastiveLoss(), D, 16))),
                             ("pml", pml_dist.DistributedLossWrapper(L.CrossBatchMemory(L.ContrastiveLoss(), D, 16)))):
            steps = []
            for t in range(1):
                x, y = data(50 + t, 4 * world)
                xr, yr = _leaf(rows_of(x, [4] * world, rank)), rows_of(y, [4] * world, rank)
                mined = pml_dist.DistributedMinerWrapper(miners.MultiSimilarityMiner(0.2))(xr.detach(), yr)
                v = wrapped(xr, yr, mined)
                steps.append((v.detach(), _grads(v, [xr])))
            out[who] = steps
        return out

    case("xbm_tuple", xbm_tuple_case)

    def pml_inputs_case():
        # what PML's wrapper accepts: float labels, a ref_emb without ref_labels (read with the labels);
        # ours fused against PML's wrapper around PML's loss, equal rows per rank
        from pytorch_metric_learning import losses as L

        x, y = data(30, EVEN * world)
        r, _ = data(31, EVEN * world)
        xr, yr = rows_of(x, [EVEN] * world, rank), rows_of(y, [EVEN] * world, rank)
        rr = rows_of(r, [EVEN] * world, rank)
        out = {}
        for what, args in (("float_labels", lambda: (yr.double(),)), ("ref_without_labels", lambda: (yr, None, rr))):
            for who, wrapper in (("ours", fpl.DistributedLossWrapper(fpl.ContrastiveLoss())),
                                 ("pml", pml_dist.DistributedLossWrapper(L.ContrastiveLoss()))):
                xo = _leaf(xr.detach())
                v = wrapper(xo, *args())
                out[f"{what}_{who}"] = (v.detach(), _grads(v, [xo]))
        # our wrapper around our memory with float labels: the steps of int labels
        for who, convert in (("float", lambda t: t.double()), ("int", lambda t: t)):
            wrapped = fpl.DistributedLossWrapper(fpl.CrossBatchMemory(fpl.ContrastiveLoss(), D, memory_size=XBM_MEMORY))
            steps = []
            for t in range(3):
                xs, ys = data(40 + t, 4 * world)
                xo = _leaf(rows_of(xs, [4] * world, rank))
                v = wrapped(xo, convert(rows_of(ys, [4] * world, rank)))
                steps.append((v.detach(), _grads(v, [xo])))
            out[f"xbm_{who}"] = steps
        return out

    case("pml_inputs", pml_inputs_case)

    def no_n_squared_case():
        # the fused path never builds anything of N_global x N_global elements: a 2-D tensor
        # check on every autograd-saved / created tensor is done by the parent on sizes only;
        # here: the largest tensor the forward and backward create, via a dispatch mode
        from torch.utils._python_dispatch import TorchDispatchMode

        n_local = 40
        n_global = n_local * world
        biggest = [0]

        class Watch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                r = func(*args, **(kwargs or {}))
                for t in (r if isinstance(r, (tuple, list)) else [r]):
                    if isinstance(t, torch.Tensor):
                        biggest[0] = max(biggest[0], t.numel())
                return r

        x, y = data(9, n_global, d=4)
        xr, yr = _leaf(rows_of(x, [n_local] * world, rank)), rows_of(y, [n_local] * world, rank)
        with Watch():
            v = fpl.DistributedLossWrapper(fpl.MultiSimilarityLoss(miner_epsilon=0.1))(xr, yr)
            _grads(v, [xr])
        return {"biggest": biggest[0], "n_global": n_global, "n_local": n_local}

    case("no_n_squared", no_n_squared_case)
    return out


def worker(rank, world, port, outdir, cases=None, collective_timeout_s=None):
    """Runs `cases(rank, world)` (default run_cases) in a gloo group; a collective that waits longer
    than collective_timeout_s raises there instead of blocking."""
    import datetime

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    timeout = {} if collective_timeout_s is None else {"timeout": datetime.timedelta(seconds=collective_timeout_s)}
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, **timeout)
    try:
        results = (cases or run_cases)(rank, world)
        torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    # the results are saved: skip the interpreter's teardown (measured 4-6 s per process on the
    # project's 2-core machine), which holds up the parent's join
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(world, outdir, timeout=240, cases=None, collective_timeout_s=None):
    """Run `worker` on `world` gloo processes; returns the per-rank results. `cases`: a module-level
    function (rank, world) -> results (default run_cases); the processes are killed after `timeout`
    seconds (a TimeoutError)."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(worker, args=(world, free_port(), outdir, cases, collective_timeout_s), nprocs=world,
                             join=False, start_method="spawn")
    import time

    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"the {world} gloo workers did not finish in {timeout} s")
    return [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False) for r in range(world)]


# ---- what the test files read from the ranks' results -------------------------------------------
def case_results(all_results, name):
    """Per rank, the results of case `name`; a rank's error fails the test (naming the rank)."""
    import pytest

    per_rank = [r[name] for r in all_results]
    for rank, r in enumerate(per_rank):
        if "error" in r:
            pytest.fail(f"rank {rank} of {len(all_results)}: {r['error']}")
    return per_rank


def close(a, b, what, rtol, atol, equal_nan=False):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, equal_nan=equal_nan, msg=lambda m: f"{what}: {m}")
