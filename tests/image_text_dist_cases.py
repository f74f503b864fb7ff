"""The gloo cases of tests/test_image_text_distributed.py: on every rank, fpl.ClipLoss in every
(local_loss, gather_with_grad) mode and fpl.SigLipLoss in every dist_impl next to open_clip 3.3's
own class in the same mode, on this rank's slice of one global batch; values and the gradients of
the rank's image and text features, logit_scale and logit_bias are saved for the parent."""
from __future__ import annotations

import torch

B_LOCAL, D = 5, 6
CLIP_MODES = [(False, False), (False, True), (True, False), (True, True)]
SIGLIP_MODES = ["bidir", "shift", "reduce", "gather"]
DTYPES = [torch.float64, torch.float32]


def global_batch(world, dtype=torch.float64):
    from image_text_kit import features

    img, txt = features(B_LOCAL * world, D, 21, torch.float64)
    return img.to(dtype), txt.to(dtype), torch.tensor(9.5, dtype=dtype), torch.tensor(-2.0, dtype=dtype)


def _run(loss, img, txt, t, b, rank, with_bias):
    x = [a.clone().requires_grad_(True) for a in (img[rank * B_LOCAL:(rank + 1) * B_LOCAL],
                                                  txt[rank * B_LOCAL:(rank + 1) * B_LOCAL], t, b)]
    out = loss(*x) if with_bias else loss(*x[:3])
    grads = torch.autograd.grad(out, x, allow_unused=True)
    return [out.detach()] + [torch.zeros_like(a) if g is None else g for a, g in zip(x, grads)]


def cases(rank, world):
    import fused_pairloss as fpl
    from image_text_kit import open_clip_loss

    OC = open_clip_loss()
    out = {}
    for dtype in DTYPES:
        img, txt, t, b = global_batch(world, dtype)
        for local_loss, gwg in CLIP_MODES:
            kw = dict(local_loss=local_loss, gather_with_grad=gwg, rank=rank, world_size=world)
            for bias in (False, True):
                name = f"clip_{local_loss}_{gwg}_{bias}_{dtype}"
                out[name] = {"ours": _run(fpl.ClipLoss(**kw), img, txt, t, b, rank, bias),
                             "open_clip": _run(OC.ClipLoss(**kw), img, txt, t, b, rank, bias)}
                if dtype == torch.float32:
                    img64, txt64, t64, b64 = global_batch(world)
                    out[name]["truth"] = _run(OC.ClipLoss(**kw), img64, txt64, t64, b64, rank, bias)
        for impl in SIGLIP_MODES:
            kw = dict(rank=rank, world_size=world, dist_impl=impl)
            name = f"siglip_{impl}_{dtype}"
            out[name] = {"ours": _run(fpl.SigLipLoss(**kw), img, txt, t, b, rank, True),
                         "open_clip": _run(OC.SigLipLoss(**kw), img, txt, t, b, rank, True)}
            if dtype == torch.float32:
                out[name]["truth"] = _run(OC.SigLipLoss(**kw), *global_batch(world), rank, True)
    img, txt, t, b = global_batch(world)
    errors = {}
    for name, make in (("rank", lambda: fpl.ClipLoss(rank=(rank + 1) % world, world_size=world)),
                       ("world_size", lambda: fpl.SigLipLoss(rank=rank, world_size=world + 1))):
        try:
            make()(img[:B_LOCAL], txt[:B_LOCAL], t, b)
            errors[name] = None
        except ValueError as e:
            errors[name] = str(e)
    out["errors"] = errors
    return out

