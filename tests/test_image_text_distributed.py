"""ClipLoss and SigLipLoss on 2 and 3 gloo processes (tests/image_text_dist_cases.py, spawned the way
tests/dist_cases.py does): on every rank and in every open_clip mode (ClipLoss local_loss x
gather_with_grad, with and without logit_bias; SigLipLoss dist_impl bidir / shift / reduce / gather)
the loss and the gradients of the rank's image and text features, logit_scale and logit_bias equal
open_clip 3.3's in the same mode (fp64 tightly; fp32 by tests/kit.py's rule). And the modes the
docs call exact: ClipLoss(local_loss=True, gather_with_grad=True) and SigLipLoss in every mode give
each rank world * the gradient of the single-process loss of the whole batch."""
import functools

import pytest
import torch

import dist_cases
import image_text_dist_cases as C
from image_text_kit import open_clip_loss
from kit import check_close

OC = open_clip_loss()
WORLDS = (2, 3)
NAMES = ["image", "text", "logit_scale", "logit_bias"]


@functools.lru_cache(maxsize=None)
def results(world):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        return dist_cases.spawn(world, d, cases=C.cases)


def modes():
    for dtype in C.DTYPES:
        for local_loss, gwg in C.CLIP_MODES:
            for bias in (False, True):
                yield f"clip_{local_loss}_{gwg}_{bias}_{dtype}"
        for impl in C.SIGLIP_MODES:
            yield f"siglip_{impl}_{dtype}"


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", list(modes()))
def test_each_rank_equals_open_clip(world, name):
    for rank, r in enumerate(results(world)):
        case = r[name]
        ours, theirs = case["ours"], case["open_clip"]
        for k, (a, b) in enumerate(zip(ours, theirs)):
            what = f"rank {rank} of {world}, {name}: {'value' if k == 0 else NAMES[k - 1]}"
            assert a.dtype == b.dtype and a.shape == b.shape, what
            if "truth" in case:
                check_close(a, case["truth"][k], b, what=what, dtype=a.dtype)
            else:
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", ["clip_True_True_False_torch.float64"] +
                         [f"siglip_{impl}_torch.float64" for impl in C.SIGLIP_MODES])
def test_exact_modes_give_the_global_gradient(world, name):
    img, txt, t, b = [a.clone().requires_grad_(True) for a in C.global_batch(world)]
    loss = OC.ClipLoss()(img, txt, t) if name.startswith("clip") else OC.SigLipLoss()(img, txt, t, b)
    gi, gt = torch.autograd.grad(loss * world, [img, txt])
    per_rank = [r[name]["ours"] for r in results(world)]
    torch.testing.assert_close(sum(p[0] for p in per_rank), loss.detach() * world, rtol=1e-10, atol=0)
    for rank, p in enumerate(per_rank):
        rows = slice(rank * C.B_LOCAL, (rank + 1) * C.B_LOCAL)
        torch.testing.assert_close(p[1], gi[rows], rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(p[2], gt[rows], rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("world", WORLDS)
def test_rank_and_world_size_checked_against_the_group(world):
    for r in results(world):
        assert "rank=" in r["errors"]["rank"] and "world_size=" in r["errors"]["world_size"]
