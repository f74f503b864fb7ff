"""Train a tiny two-tower (image / text) model with CLIP's or SigLIP's loss, from fused_pairloss
(--impl fused) or open_clip 3.3 (--impl open_clip), and report per step the loss, logit_scale
(and logit_bias) and the held-out image -> text top-1 retrieval accuracy.

    python examples/train_image_text.py --loss clip --steps 20
    python examples/train_image_text.py --loss siglip --impl open_clip
    torchrun --nproc-per-node 2 examples/train_image_text.py --loss clip      # DDP, gloo / NCCL

Data: synthetic pairs, no download: a latent z ~ N(0, I) per pair, the "image" A z + noise and the
"caption" B z + noise (fixed random A, B), so that matching pairs share information the towers must
learn to align. The towers are MLPs ending in L2-normalized features; logit_scale (stored as its
log, initialized as open_clip's CLIP: log(1/0.07); SigLIP: log(10)) and SigLIP's logit_bias (-10)
are learned with them, as in open_clip's models. The swap is one import: fpl.ClipLoss /
fpl.SigLipLoss for open_clip.loss.ClipLoss / SigLipLoss, same arguments, same call.

Under torchrun each rank takes its slice of every global batch; ClipLoss runs with
local_loss=True, gather_with_grad=True and SigLipLoss with dist_impl="bidir" (the modes that give
the gradient of the global batch's loss, docs/training.md), and DDP averages the gradients.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loss", choices=("clip", "siglip"), default="clip")
    p.add_argument("--impl", choices=("fused", "open_clip"), default="fused")
    p.add_argument("--backend", default="auto", help="fused backend: auto, cpu, triton, cuda, reference")
    p.add_argument("--batch-size", type=int, default=256, help="global batch size (split over the ranks)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--latent", type=int, default=16)
    p.add_argument("--input-size", type=int, default=64)
    p.add_argument("--embedding-size", type=int, default=32)
    p.add_argument("--eval-size", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the history here (rank 0)")
    return p.parse_args(argv)


def open_clip_loss_module():
    """open_clip's loss.py alone (the package's __init__ imports torchvision and timm)."""
    from fused_pairloss.losses._image_text import open_clip_loss_module as load
    module = load()
    if module is None:
        raise SystemExit("--impl open_clip needs open-clip-torch (pip install --no-deps open-clip-torch==3.3.0)")
    return module


class Pairs:
    """Synthetic image / caption pairs sharing a latent."""

    def __init__(self, latent, size, seed):
        g = torch.Generator().manual_seed(seed)
        self.A = torch.randn(latent, size, generator=g) / math.sqrt(latent)
        self.B = torch.randn(latent, size, generator=g) / math.sqrt(latent)

    def batch(self, n, g):
        z = torch.randn(n, self.A.shape[0], generator=g)
        img = z @ self.A + 0.3 * torch.randn(n, self.A.shape[1], generator=g)
        txt = z @ self.B + 0.3 * torch.randn(n, self.B.shape[1], generator=g)
        return img, txt


class TwoTower(torch.nn.Module):
    def __init__(self, size, dim, loss):
        super().__init__()
        self.image = torch.nn.Sequential(torch.nn.Linear(size, 128), torch.nn.GELU(), torch.nn.Linear(128, dim))
        self.text = torch.nn.Sequential(torch.nn.Linear(size, 128), torch.nn.GELU(), torch.nn.Linear(128, dim))
        # open_clip's initializations: CLIP log(1/0.07); SigLIP log(10) and bias -10
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(10.0) if loss == "siglip" else math.log(1 / 0.07)))
        self.logit_bias = torch.nn.Parameter(torch.tensor(-10.0)) if loss == "siglip" else None

    def forward(self, img, txt):
        return F.normalize(self.image(img), dim=-1), F.normalize(self.text(txt), dim=-1)


def make_loss(args, rank, world):
    if args.impl == "fused":
        import fused_pairloss as fpl

        lib, extra = fpl, dict(backend=args.backend)
    else:
        lib, extra = open_clip_loss_module(), {}
    if args.loss == "clip":
        return lib.ClipLoss(local_loss=world > 1, gather_with_grad=world > 1, rank=rank, world_size=world, **extra)
    return lib.SigLipLoss(rank=rank, world_size=world, dist_impl="bidir", **extra)


@torch.no_grad()
def retrieval_top1(model, img, txt):
    fi, ft = model(img, txt)
    return (fi @ ft.T).argmax(1).eq(torch.arange(img.shape[0])).float().mean().item()


def main(argv=None):
    args = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must split evenly over {world} ranks (open_clip's rule)")
    torch.manual_seed(args.seed)
    data = Pairs(args.latent, args.input_size, args.seed)
    model = TwoTower(args.input_size, args.embedding_size, args.loss)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    loss_fn = make_loss(args, rank, world)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    g = torch.Generator().manual_seed(args.seed + 1)
    eval_img, eval_txt = data.batch(args.eval_size, torch.Generator().manual_seed(args.seed + 2))
    local = args.batch_size // world
    history = []
    if rank == 0:
        print(f"[train_image_text] loss={args.loss} impl={args.impl} world={world} batch={args.batch_size}", flush=True)
    for step in range(args.steps):
        img, txt = data.batch(args.batch_size, g)  # every rank draws the global batch, keeps its slice
        img, txt = img[rank * local:(rank + 1) * local], txt[rank * local:(rank + 1) * local]
        t0 = time.perf_counter()
        fi, ft = net(img, txt)
        scale = model.logit_scale.exp()
        loss = loss_fn(fi, ft, scale, model.logit_bias) if args.loss == "siglip" else loss_fn(fi, ft, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ms = 1e3 * (time.perf_counter() - t0)
        rec = dict(step=step, loss=float(loss.detach()), logit_scale=float(scale.detach()),
                   logit_bias=None if model.logit_bias is None else float(model.logit_bias.detach()),
                   top1=retrieval_top1(model, eval_img, eval_txt), step_ms=ms)
        history.append(rec)
        if rank == 0:
            bias = "" if rec["logit_bias"] is None else f" bias {rec['logit_bias']:.3f}"
            print(f"step {step:3d}  loss {rec['loss']:.4f}  scale {rec['logit_scale']:.3f}{bias}  "
                  f"top-1 {rec['top1']:.3f}  {ms:.1f} ms", flush=True)
    if rank == 0 and args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(args=vars(args), world=world, history=history), fh)
    if world > 1:
        dist.destroy_process_group()
    return history


if __name__ == "__main__":
    main()
