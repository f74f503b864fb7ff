"""Train an embedding network on scikit-learn's bundled digits (8x8 images, 10 classes, no download)
with a metric-learning loss from pytorch-metric-learning (--impl pml) or fused_pairloss (--impl
fused), and report per epoch the training loss, Recall@1 and MAP@R on a held-out split, the time
per step and the peak memory.

    python examples/train.py --impl fused --loss ms --epochs 5
    python examples/train.py --impl pml   --loss ms --memory-size 1024      # CrossBatchMemory
    torchrun --nproc-per-node 2 examples/train.py --impl fused --loss circle  # DDP (gloo / NCCL)

The swap is one import: fpl.<Loss> for pml.losses.<Loss>, fpl.CrossBatchMemory for
pml.losses.CrossBatchMemory, fpl.DistributedLossWrapper for
pml.utils.distributed.DistributedLossWrapper; constructor arguments and calls are PML's.
Under torchrun each rank takes its slice of every global batch (the last one uneven), the model is
wrapped in DistributedDataParallel, the pair losses in DistributedLossWrapper (world_size times the
loss of the gathered batch, so DDP's averaging gives the single-process gradients); the class
losses' weights sit in the DDP module with the trunk (plain DDP averages them).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F

PAIR_LOSSES = ("ms", "ms_mined", "circle", "ntxent", "supcon", "contrastive", "lifted")
CLASS_LOSSES = ("softtriple", "proxyanchor", "normsoftmax", "cosface", "arcface", "proxycircle")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impl", choices=("pml", "fused"), default="fused")
    p.add_argument("--loss", choices=PAIR_LOSSES + CLASS_LOSSES, default="ms")
    p.add_argument("--backend", default="auto", help="fused backend: auto, cpu, triton, cuda, reference")
    p.add_argument("--batch-size", type=int, default=256, help="global batch size (split over the ranks)")
    p.add_argument("--memory-size", type=int, default=0, help="CrossBatchMemory size (0: no memory; pair losses)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--embedding-size", type=int, default=64)
    p.add_argument("--max-steps", type=int, default=0, help="stop each epoch after this many steps (0: all)")
    p.add_argument("--device", default="auto", help="auto (cuda:<local rank> if available), cpu, cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.add_argument("--json", default=None, help="write the per-epoch metrics here (rank 0)")
    return p.parse_args(argv)


# ---- data ---------------------------------------------------------------------------------------
def load_digits_split(seed):
    """Digits, features in [0, 1], a stratified 70 / 30 split (train / held-out)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.3, stratify=y, random_state=seed)
    as_t = (lambda a, dt: torch.as_tensor(a, dtype=dt))
    return (as_t(xtr, torch.float32) / 16, as_t(ytr, torch.long), as_t(xte, torch.float32) / 16,
            as_t(yte, torch.long))


# ---- metrics (PML AccuracyCalculator's definitions, query set = reference set) -------------------
@torch.no_grad()
def retrieval_metrics(emb, labels):
    """Recall@1 (precision_at_1) and MAP@R with the query excluded from its own neighbours."""
    e = F.normalize(emb.double(), dim=1)
    sim = e @ e.t()
    sim.fill_diagonal_(-float("inf"))
    order = sim.argsort(dim=1, descending=True)
    same = labels[order] == labels.unsqueeze(1)  # row i: is the k-th neighbour of i of i's class
    r1 = same[:, 0].double().mean().item()
    R = (labels.unsqueeze(1) == labels.unsqueeze(0)).sum(1) - 1  # same-class references
    k = torch.arange(1, same.shape[1] + 1, device=emb.device)
    within = k.unsqueeze(0) <= R.unsqueeze(1)
    hits = same & within
    prec = hits.double().cumsum(1) / k
    ap = (prec * hits).sum(1) / R.clamp(min=1)
    return r1, ap[R > 0].mean().item()


# ---- model and loss -----------------------------------------------------------------------------
class Trunk(torch.nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(d_in, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                       torch.nn.ReLU(), torch.nn.Linear(256, d_out))

    def forward(self, x):
        return self.net(x)


class WithClassLoss(torch.nn.Module):
    """Trunk and class loss in one module: DDP averages the class weights' gradients too."""

    def __init__(self, trunk, loss):
        super().__init__()
        self.trunk, self.loss = trunk, loss

    def forward(self, x, y):
        return self.loss(self.trunk(x), y)


def make_loss(args, num_classes):
    """(loss, miner or None): PML's classes or this library's, the same arguments."""
    E = args.embedding_size
    if args.impl == "fused":
        import fused_pairloss as lib

        kw = {"backend": args.backend}
    else:
        from pytorch_metric_learning import losses as lib

        kw = {}
    miner = None
    name = args.loss
    if name == "ms":
        loss = lib.MultiSimilarityLoss(**kw)
    elif name == "ms_mined":
        if args.impl == "fused":
            loss = lib.MultiSimilarityLoss(miner_epsilon=0.1, **kw)
        else:
            from pytorch_metric_learning import miners

            loss, miner = lib.MultiSimilarityLoss(), miners.MultiSimilarityMiner(0.1)
    elif name == "circle":
        loss = lib.CircleLoss(**kw)
    elif name == "ntxent":
        loss = lib.NTXentLoss(**kw)
    elif name == "supcon":
        loss = lib.SupConLoss(**kw)
    elif name == "contrastive":
        loss = lib.ContrastiveLoss(**kw)
    elif name == "lifted":
        loss = lib.GeneralizedLiftedStructureLoss(**kw)
    elif name == "softtriple":
        loss = lib.SoftTripleLoss(num_classes, E, **kw)
    elif name == "proxyanchor":
        loss = lib.ProxyAnchorLoss(num_classes, E, **kw)
    elif name == "normsoftmax":
        loss = lib.NormalizedSoftmaxLoss(num_classes, E, **kw)
    elif name == "cosface":
        loss = lib.CosFaceLoss(num_classes, E, **kw)
    elif name == "arcface":
        loss = lib.ArcFaceLoss(num_classes, E, **kw)
    elif name == "proxycircle":
        if args.impl != "fused":
            raise SystemExit("proxycircle has no PML counterpart: use --impl fused")
        loss = lib.ProxyCircleLoss(num_classes, E, **kw)
    else:  # pragma: no cover - argparse choices
        raise SystemExit(f"unknown loss {name}")
    return loss, miner


def wrap_memory(args, loss, miner):
    if not args.memory_size:
        return loss, miner
    if args.loss in CLASS_LOSSES:
        raise SystemExit("--memory-size is for the pair losses")
    if args.impl == "fused":
        import fused_pairloss as fpl

        return fpl.CrossBatchMemory(loss, args.embedding_size, memory_size=args.memory_size, miner=miner), None
    from pytorch_metric_learning import losses as L

    return L.CrossBatchMemory(loss, args.embedding_size, memory_size=args.memory_size, miner=miner), None


def wrap_distributed(args, loss, miner):
    if args.impl == "fused":
        import fused_pairloss as fpl

        return fpl.DistributedLossWrapper(loss), miner  # fused: miner is None (miner_epsilon)
    from pytorch_metric_learning.utils import distributed as pml_dist

    return (pml_dist.DistributedLossWrapper(loss),
            None if miner is None else pml_dist.DistributedMinerWrapper(miner))


# ---- distributed setup --------------------------------------------------------------------------
def setup(args):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if args.device == "auto":
        device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device(f"cuda:{local}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return world, rank, device


def peak_memory_mib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main(argv=None):
    args = parse_args(argv)
    world, rank, device = setup(args)
    torch.manual_seed(args.seed)  # the same initial weights on every rank (DDP broadcasts rank 0's anyway)
    xtr, ytr, xte, yte = load_digits_split(args.seed)
    num_classes = int(ytr.max()) + 1
    trunk = Trunk(xtr.shape[1], args.embedding_size)
    loss_fn, miner = make_loss(args, num_classes)
    class_loss = args.loss in CLASS_LOSSES
    model = WithClassLoss(trunk, loss_fn) if class_loss else trunk
    model = model.to(device)
    if not class_loss:
        loss_fn, miner = wrap_memory(args, loss_fn, miner)
        loss_fn = loss_fn.to(device)
    params = [{"params": trunk.parameters()}]
    if class_loss:
        params.append({"params": loss_fn.parameters(), "lr": args.lr * 10})  # PML's examples: faster proxies
    opt = torch.optim.Adam(params, lr=args.lr)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        if not class_loss:
            loss_fn, miner = wrap_distributed(args, loss_fn, miner)
    xtr, ytr = xtr.to(device), ytr.to(device)
    eval_trunk = trunk

    gen = torch.Generator().manual_seed(args.seed)  # the same permutation on every rank
    steps_per_epoch = -(-len(xtr) // args.batch_size)
    if args.max_steps:
        steps_per_epoch = min(steps_per_epoch, args.max_steps)
    show = rank == 0
    pml_even = args.impl == "pml" and world > 1 and not class_loss
    if show and pml_even and (len(xtr) % args.batch_size) % world:
        print("note: PML's DistributedLossWrapper gathers equal sizes only: the last batch drops "
              f"{(len(xtr) % args.batch_size) % world} rows", flush=True)
    if show:
        print(f"digits: {len(xtr)} train / {len(xte)} held-out, {num_classes} classes | impl={args.impl} "
              f"loss={args.loss} backend={args.backend} batch={args.batch_size} memory={args.memory_size} "
              f"world={world} device={device} threads={torch.get_num_threads()}", flush=True)
    history = []
    for epoch in range(1, args.epochs + 1):
        model.train()
        perm = torch.randperm(len(xtr), generator=gen).to(device)
        total, times = 0.0, []
        bar = range(steps_per_epoch)
        if show and not args.no_progress:
            from tqdm import tqdm

            bar = tqdm(bar, desc=f"epoch {epoch}/{args.epochs}", leave=False, file=sys.stdout)
        for s in bar:
            idx = perm[s * args.batch_size:(s + 1) * args.batch_size]
            if pml_even:  # PML's all_gather needs equal sizes: drop the last batch's remainder rows
                idx = idx[:len(idx) - len(idx) % world]
            # this rank's slice of the global batch (the last batch: uneven slices)
            idx = idx.tensor_split(world)[rank]
            x, y = xtr[idx], ytr[idx]
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            if class_loss:
                loss = model(x, y)
            else:
                emb = model(x)
                indices = None if miner is None else miner(emb, y)
                loss = loss_fn(emb, y, indices) if indices is not None else loss_fn(emb, y)
            loss.backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
            # the value every rank returns: world_size x the gathered batch's loss (pair losses
            # under the wrapper) or this rank's loss (class losses under DDP)
            total += loss.item() / (world if (world > 1 and not class_loss) else 1)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{loss.item():.4f}")
        if hasattr(bar, "close"):
            bar.close()
        eval_trunk.eval()
        with torch.no_grad():
            emb = eval_trunk(xte.to(device))
        r1, map_r = retrieval_metrics(emb, yte.to(device))
        step_ms = 1e3 * sorted(times)[len(times) // 2]  # median (robust to a busy machine)
        rec = dict(epoch=epoch, loss=total / max(1, len(times)), recall_at_1=r1, map_at_r=map_r,
                   step_ms=step_ms, peak_mib=peak_memory_mib(device))
        history.append(rec)
        if show:
            print(f"epoch {epoch}/{args.epochs}  loss {rec['loss']:.4f}  R@1 {r1:.4f}  MAP@R {map_r:.4f}  "
                  f"step {step_ms:.2f} ms  peak {'GPU' if device.type == 'cuda' else 'RSS'} "
                  f"{rec['peak_mib']:.0f} MiB", flush=True)
    if show and args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), world=world, device=str(device), history=history), f, indent=1)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return history


if __name__ == "__main__":
    warnings.filterwarnings("ignore", message=".*not fused.*")
    main()
