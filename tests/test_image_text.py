"""ClipLoss and SigLipLoss (fused_pairloss/losses/clip.py, siglip.py; ops fused_pairloss::clip_lse,
siglip_rows, ops/image_text.py) on one process: the reference against open_clip 3.3's loss.py and
the fused path against the reference (values and gradients of image, text, logit_scale,
logit_bias; fp32 and fp64; tests/kit.py's rule), many row chunks, bf16 inputs, NaN, opcheck,
torch.compile, second order, the largest tensor, bad input."""
import pytest
import torch

import fused_pairloss as fpl
from fused_pairloss.losses import _image_text as IT
from fused_pairloss.losses import clip, siglip
from fused_pairloss.ops import image_text
from fused_pairloss.ops.stats import class_stats
from image_text_kit import features, open_clip_loss
from kit import check_close

OC = open_clip_loss()
LOSSES = {
    "clip": (lambda **kw: fpl.ClipLoss(**kw), lambda: OC.ClipLoss()),
    "siglip": (lambda **kw: fpl.SigLipLoss(**kw), lambda: OC.SigLipLoss()),
}


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of a few rows: the column LSE is merged over many chunks, the positives of a chunk sit
    at its own offset."""
    monkeypatch.setattr(image_text, "CHUNK_ELEMENTS", 64)
    monkeypatch.setattr(image_text, "MIN_CHUNK_ROWS", 1)


def leaves(n, d, seed, dtype, scale=14.3, bias=-3.0, normalize=True):
    img, txt = features(n, d, seed, dtype, normalize)
    t = torch.tensor(scale, dtype=dtype)
    b = torch.tensor(bias, dtype=dtype)
    return [x.clone().requires_grad_(True) for x in (img, txt, t, b)]


def value_and_grads(loss, args):
    out = loss(*args)
    grads = torch.autograd.grad(out, args, allow_unused=True)
    return out, [torch.zeros_like(a) if g is None else g for a, g in zip(args, grads)]


def as64(args):
    return [a.detach().double().requires_grad_(True) for a in args]


def check_all(got, truth, same, dtype, what):
    check_close(got[0], truth[0], same[0], what=f"{what} value", dtype=dtype)
    for name, a, t, s in zip(("image", "text", "logit_scale", "logit_bias"), got[1], truth[1], same[1]):
        check_close(a, t, s, what=f"{what} grad {name}", dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", ["clip", "siglip"])
@pytest.mark.parametrize("n,d,normalize,scale", [(37, 16, True, 14.3), (1, 8, True, 100.0), (24, 12, False, 2.5)])
def test_against_open_clip(name, dtype, n, d, normalize, scale, small_chunks):
    ours, theirs = LOSSES[name]
    args = leaves(n, d, 3, dtype, scale=scale, normalize=normalize)
    oc = theirs()
    oc_val = value_and_grads(oc, args)
    truth = value_and_grads(oc, as64(args))
    reference = value_and_grads(ours(backend="reference"), args)
    fused = value_and_grads(ours(), args)
    assert fused[0].dtype == oc_val[0].dtype and fused[0].shape == ()
    check_all(reference, truth, oc_val, dtype, "reference vs open_clip")
    ref64 = value_and_grads(ours(backend="reference"), as64(args))
    check_all(fused, ref64, reference, dtype, "fused vs reference")


CLIP_COMPUTATIONS = [b for b in fpl.available_backends("cpu") if b != "reference"] + [IT.CHUNKED]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("computation", CLIP_COMPUTATIONS)
@pytest.mark.parametrize("local_loss", [False, True])
def test_clip_computations_match_the_reference(computation, local_loss, dtype, small_chunks):
    """Each way CLIP is computed (the class engine on every backend here, both directions in one
    walk; the PyTorch row-chunk op) against the reference, on one process's square block and on
    the blocks of rank 1 of 3 with local_loss (its rows against every rank's features: offset 12)."""
    img, txt, t, _ = leaves(12, 16, 21, dtype, normalize=False)
    kw = {}
    if local_loss:
        others = [x.detach() for x in leaves(24, 16, 22, dtype, normalize=False)[:2]]
        kw = dict(all_image_features=torch.cat([others[0][:12], img, others[0][12:]]),
                  all_text_features=torch.cat([others[1][:12], txt, others[1][12:]]), local_loss=True, rank=1)
    args = [img, txt, t]

    def run(fn, args):
        def loss(i, x, s):
            extra = {}
            if local_loss:  # the gathered blocks hold this rank's leaves (gradients flow into them)
                extra = dict(kw, all_image_features=torch.cat([kw["all_image_features"][:12].to(i.dtype), i,
                                                               kw["all_image_features"][24:].to(i.dtype)]),
                             all_text_features=torch.cat([kw["all_text_features"][:12].to(x.dtype), x,
                                                          kw["all_text_features"][24:].to(x.dtype)]))
            return fn(i, x, s, **extra)
        return value_and_grads(loss, args)

    fused = run(lambda *a, **k: clip.clip_fused(*a, backend=computation, **k), args)
    same = run(clip.clip_reference, args)
    truth = run(clip.clip_reference, as64(args))
    for what, g, tr, sm in zip(("value", "image", "text", "logit_scale"), [fused[0]] + fused[1], [truth[0]] + truth[1],
                               [same[0]] + same[1]):
        check_close(g, tr, sm, what=f"{computation} {what}", dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("computation", CLIP_COMPUTATIONS)
@pytest.mark.parametrize("negative_only", [False, True])
def test_siglip_computations_match_the_reference(computation, negative_only, dtype, small_chunks):
    """Each way SigLIP's block is computed (the class engine on every backend here, the PyTorch
    row-chunk op) against the reference: the own block (positives on the diagonal) and another
    rank's block (negative_only), values and the gradients of image, text, logit_scale, logit_bias;
    unnormalized features and a large scale, so the logits span both tails of the softplus."""
    args = leaves(40, 16, 23, dtype, scale=30.0, bias=-4.0, normalize=False)

    def run(fn, args):
        return value_and_grads(lambda *a: fn(*a, negative_only=negative_only), args)

    fused = run(lambda *a, **k: siglip.siglip_fused(*a, backend=computation, **k), args)
    same = run(siglip.siglip_reference, args)
    truth = run(siglip.siglip_reference, as64(args))
    check_all(fused, truth, same, dtype, f"{computation}")


@pytest.mark.parametrize("backend", [b for b in fpl.available_backends("cpu") if b != "reference"])
def test_siglip_engine_softplus_over_the_logit_range(backend):
    """The engine's sum of softplus(x) and its gradient sigmoid(x), one logit per row over
    [-87, 87] (fp32: below -87 the terms are under 1.6e-38 and count as 0), against fp64: within a
    few fp32 rounding errors of each value (the CPU engine's own exp and log1p in float)."""
    x = torch.cat([torch.linspace(-87, 87, 20001), torch.tensor([0.0, 1e-30, -1e-30, 1e-6])])
    q = x[:, None].clone().requires_grad_(True)
    w = torch.tensor([[1.0], [0.0]])  # x_i . w_0 = x_i, the non-target column; w_1 the label's
    st = class_stats(q, w, torch.ones(len(x), dtype=torch.long), siglip.declaration(), backend)
    (grad,) = torch.autograd.grad(st.lse_other.sum(), q)
    x64 = x.double()
    for got, want in ((st.lse_other, torch.logaddexp(x64, torch.zeros_like(x64))), (grad[:, 0], torch.sigmoid(x64))):
        err = (got.double() - want).abs() / want
        assert err.max() <= 4 * torch.finfo(torch.float32).eps, (backend, x[err.argmax()].item(), err.max().item())


def test_clip_without_bias_and_output_dict():
    args = leaves(20, 8, 5, torch.float64)[:3]
    out = fpl.ClipLoss()(*args, output_dict=True)
    assert set(out) == {"contrastive_loss"}
    torch.testing.assert_close(out["contrastive_loss"], OC.ClipLoss()(*args), rtol=1e-12, atol=0)
    out = fpl.SigLipLoss()(*leaves(20, 8, 5, torch.float64), output_dict=True)
    assert set(out) == {"contrastive_loss"}


def test_functional_forms_and_scalar_forms():
    img, txt, t, b = leaves(16, 8, 6, torch.float64)
    expected = OC.ClipLoss()(img, txt, t)
    torch.testing.assert_close(fpl.functional.clip_loss(img, txt, t), expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(fpl.functional.clip_loss(img, txt, t.reshape(1)), expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(fpl.functional.clip_loss(img, txt, 14.3), expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(fpl.functional.siglip_loss(img, txt, t, b), OC.SigLipLoss()(img, txt, t, b),
                               rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_meta_device(name):
    """Features on the meta device (shapes only, as a model's dry run): a 0-dim meta loss."""
    ours, _ = LOSSES[name]
    img, txt = torch.randn(8, 4, device="meta"), torch.randn(8, 4, device="meta")
    out = ours()(img, txt, torch.tensor(10.0, device="meta"), torch.tensor(-1.0, device="meta"))
    assert out.device.type == "meta" and out.shape == ()


@pytest.mark.parametrize("features_dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_autocast_returns_open_clips_dtype(name, autocast_dtype, features_dtype):
    """Under torch.autocast the loss has the dtype open_clip's returns (its products in the autocast
    dtype, its cross-entropy / logsigmoid as autocast decides), the functional form's too; the value
    is the fp32 one, within the autocast dtype's rounding of open_clip's."""
    ours, theirs = LOSSES[name]
    img, txt, t, b = (x.detach() for x in leaves(24, 16, 5, torch.float32))
    img, txt = img.to(features_dtype), txt.to(features_dtype)
    functional = fpl.functional.clip_loss if name == "clip" else fpl.functional.siglip_loss
    with torch.autocast("cpu", dtype=autocast_dtype):
        val, want = ours()(img, txt, t, b), theirs()(img, txt, t, b)
        plain = functional(img, txt, t, b)
        empty, want_empty = ours()(img[:0], txt[:0], t, b), theirs()(img[:0], txt[:0], t, b)  # NaN, both
    assert val.dtype == want.dtype == plain.dtype
    assert empty.dtype == want_empty.dtype
    truth = theirs()(img.double(), txt.double(), t.double(), b.double())
    assert abs(val.double() - truth).item() <= 2 ** -7 * (1 + truth.abs().item())


def test_chunked_clip_loss_is_not_negative():
    """The PyTorch row-chunk path (no compiled engine) takes LSE - x_pos from two products: where
    the loss rounds to 0 their rounding gave -3e-5 (B = 2, fp32, scale 1000); it is 0 there."""
    from fused_pairloss.losses.clip import clip_fused
    smallest = []
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        x = torch.nn.functional.normalize(torch.randn(2, 6, generator=g), dim=1)
        y = torch.nn.functional.normalize(x + 0.1 * torch.randn(2, 6, generator=g), dim=1)
        smallest.append(clip_fused(x, y, torch.tensor(1000.0), backend="chunked").item())
    assert min(smallest) >= 0.0, smallest


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_features_of_two_dtypes_under_autocast_as_open_clip(name):
    """open_clip's product takes image and text features of two dtypes under autocast (it casts
    both); so do we, with open_clip's steps (its scaling before the cast, its labels in the image
    features' dtype): open_clip's value, dtype and gradients. Outside autocast, an error naming
    text_features (open_clip's matmul refuses them too)."""
    ours, theirs = LOSSES[name]
    img, txt, t, b = leaves(12, 8, 3, torch.float32)
    txt_bf16 = txt.detach().bfloat16().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        val, want = ours()(img, txt_bf16, t, b), theirs()(img, txt_bf16, t, b)
    assert val.dtype == want.dtype
    torch.testing.assert_close(val, want, rtol=0, atol=0)
    for g, w in zip(torch.autograd.grad(val, [img, txt_bf16]), torch.autograd.grad(want, [img, txt_bf16])):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    with pytest.raises(TypeError, match="text_features"):
        ours()(img, txt_bf16, t, b)


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_bf16_accumulates_in_fp32(name):
    ours, theirs = LOSSES[name]
    img, txt, t, b = leaves(40, 16, 7, torch.bfloat16)
    val = ours()(img, txt, t, b)
    assert val.dtype == torch.bfloat16
    # the truth: open_clip on the same (bf16-rounded) features in fp64
    truth = theirs()(img.double(), txt.double(), t.double(), b.double())
    assert abs(val.double() - truth).item() <= 2 * 2 ** -8 * (1 + truth.abs().item())
    grads = torch.autograd.grad(val, [img, txt])
    args64 = as64([img, txt, t, b])
    truth_grads = torch.autograd.grad(theirs()(*args64), args64[:2])
    for g, tg in zip(grads, truth_grads):
        assert (g.double() - tg).abs().max() <= 2 * 2 ** -8 * tg.abs().max()
    assert all(g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", ["clip", "siglip"])
@pytest.mark.parametrize("where", ["image", "text", "logit_scale"])
def test_nan_in_nan_out(name, where, small_chunks):
    ours, _ = LOSSES[name]
    img, txt, t, b = [a.detach() for a in leaves(12, 6, 8, torch.float32)]
    if where == "image":
        img[3, 2] = float("nan")
    elif where == "text":
        txt[5, 0] = float("nan")
    else:
        t = torch.tensor(float("nan"))
    assert torch.isnan(ours()(img, txt, t, b))


def test_nan_bias_gives_nan():
    img, txt, t, b = [a.detach() for a in leaves(8, 6, 8, torch.float32)]
    for loss in (fpl.ClipLoss(), fpl.SigLipLoss()):
        assert torch.isnan(loss(img, txt, t, torch.tensor(float("nan"))))


@pytest.mark.parametrize("bad", ["nan_bias", "inf_bias", "nan_image"])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_clip_nonfinite_gradients_are_open_clips(bad, backend):
    """b cancels in CLIP's softmaxes, but a non-finite b (or a NaN loss, for b's own gradient) makes
    open_clip's gradients NaN: the same leaves are NaN here."""
    _, theirs = LOSSES["clip"]
    img, txt, t, b = [a.detach() for a in leaves(8, 6, 8, torch.float64)]
    if bad == "nan_image":
        img[2, 1] = float("nan")
    else:
        b = torch.tensor(float("nan") if bad == "nan_bias" else float("inf"), dtype=torch.float64)
    args = [a.clone().requires_grad_() for a in (img, txt, t, b)]
    ours_grads = torch.autograd.grad(fpl.ClipLoss(backend=backend)(*args), args)
    their_grads = torch.autograd.grad(theirs()(*args), args)
    for ours_g, their_g in zip(ours_grads, their_grads):
        assert torch.equal(torch.isnan(ours_g), torch.isnan(their_g))


def _value_and_leaf_grads(loss, args):
    """The loss and its gradients (zeros where unused) w.r.t. the arguments that require grad."""
    out = loss(*args)
    leaves_ = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    grads = torch.autograd.grad(out, leaves_, allow_unused=True)
    return out, [torch.zeros_like(a) if g is None else g for a, g in zip(leaves_, grads)]


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_what_open_clip_accepts_on_one_process(backend):
    """Inputs open_clip takes: SigLIP without a bias, an integer logit_scale tensor, rank and
    use_horovod on one process (open_clip reads neither there), an empty batch (open_clip's NaN,
    zero gradients), an fp64 bias beyond bf16's range (the engine's bias columns)."""
    img, txt, t, b = leaves(12, 8, 9, torch.float64)
    for ours, theirs, args in (
            (fpl.SigLipLoss(backend=backend), OC.SigLipLoss(), (img, txt, t, None)),
            (fpl.ClipLoss(backend=backend), OC.ClipLoss(), (img, txt, torch.tensor(14))),
            (fpl.SigLipLoss(backend=backend), OC.SigLipLoss(), (img, txt, torch.tensor(14), b)),
            (fpl.ClipLoss(rank=1, use_horovod=True, backend=backend), OC.ClipLoss(rank=1, use_horovod=True),
             (img, txt, t)),
            (fpl.SigLipLoss(rank=3, backend=backend), OC.SigLipLoss(rank=3), (img, txt, t, b)),
            *((fpl.SigLipLoss(backend=backend), OC.SigLipLoss(), (img, txt, t, torch.tensor(huge, dtype=torch.float64)))
              for huge in (1e39, -1e300))):
        got, want = _value_and_leaf_grads(ours, args), _value_and_leaf_grads(theirs, args)
        torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=0)
        for g, w in zip(got[1], want[1]):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    empty = [torch.zeros(0, 8, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    for ours, theirs in ((fpl.ClipLoss(backend=backend), OC.ClipLoss()), (fpl.SigLipLoss(backend=backend),
                                                                         OC.SigLipLoss())):
        got, want = _value_and_leaf_grads(ours, empty + [t, b]), _value_and_leaf_grads(theirs, empty + [t, b])
        assert torch.isnan(got[0]) and torch.isnan(want[0])
        for g, w in zip(got[1], want[1]):
            assert torch.equal(g, w)


def test_open_clip_methods_for_subclasses():
    """get_logits / get_ground_truth / _loss and the label cache, as open_clip's."""
    img, txt, t, b = leaves(10, 8, 10, torch.float64)
    ours, theirs = fpl.ClipLoss(cache_labels=True), OC.ClipLoss(cache_labels=True)
    for u, v in zip(ours.get_logits(img, txt, t, b), theirs.get_logits(img, txt, t, b)):
        torch.testing.assert_close(u, v, rtol=0, atol=0)
    assert torch.equal(ours.get_ground_truth(img.device, 10), theirs.get_ground_truth(img.device, 10))
    assert ours.prev_num_logits == theirs.prev_num_logits == 10 and set(ours.labels) == set(theirs.labels)
    ours, theirs = fpl.SigLipLoss(), OC.SigLipLoss()
    torch.testing.assert_close(ours.get_logits(img, txt, t, b), theirs.get_logits(img, txt, t, b), rtol=0, atol=0)
    for negative_only in (False, True):
        assert torch.equal(ours.get_ground_truth(img.device, img.dtype, 10, negative_only),
                           theirs.get_ground_truth(img.device, img.dtype, 10, negative_only))
        torch.testing.assert_close(ours._loss(img, txt, t, b, negative_only=negative_only),
                                   theirs._loss(img, txt, t, b, negative_only=negative_only), rtol=1e-12, atol=0)


def test_chunk_rows():
    """8 MiB chunks, at least 256 rows while that stays within 32 MiB."""
    assert [image_text._chunk_rows(m) for m in (4096, 8192, 16384, 32768, 65536, 1 << 20)] == [512, 256, 256, 256,
                                                                                                128, 8]


def test_never_a_batch_by_batch_tensor(monkeypatch):
    """The largest tensor the fused forward and backward create, with chunks of 4 rows of 64."""
    from torch.utils._python_dispatch import TorchDispatchMode

    monkeypatch.setattr(image_text, "CHUNK_ELEMENTS", 4 * 64)
    monkeypatch.setattr(image_text, "MIN_CHUNK_ROWS", 1)
    biggest = [0]

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            r = func(*args, **(kwargs or {}))
            for x in (r if isinstance(r, (tuple, list)) else [r]):
                if isinstance(x, torch.Tensor):
                    biggest[0] = max(biggest[0], x.numel())
            return r

    for make, _ in LOSSES.values():
        args = leaves(64, 8, 9, torch.float32)
        with Watch():
            out = make()(*args)
            torch.autograd.grad(out, args)
    # a chunk of logits, or the features (SigLIP's engine operands: B x (D + 2) padded)
    assert biggest[0] <= max(4 * 64, 64 * siglip.operand_width(8)), biggest[0]


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_second_order(name, small_chunks):
    """Hessian-vector products through create_graph=True equal open_clip's."""
    ours, theirs = LOSSES[name]
    args = leaves(10, 5, 11, torch.float64)
    g = torch.Generator().manual_seed(1)
    vs = [torch.randn(a.shape, generator=g, dtype=torch.float64) for a in args]

    def hvp(loss):
        grads = torch.autograd.grad(loss(*args), args, create_graph=True, allow_unused=True)
        dot = sum((gr * v).sum() for gr, v in zip(grads, vs) if gr is not None)
        return torch.autograd.grad(dot, args, allow_unused=True)

    for a, b in zip(hvp(ours()), hvp(theirs())):
        if a is None or b is None:
            assert (a is None or a.abs().max() < 1e-12) and (b is None or b.abs().max() < 1e-12)
            continue
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_backward_ops_raise_when_differentiated():
    img, txt, t, b = leaves(6, 4, 12, torch.float64)
    row, col = image_text.clip_lse(img, txt, t, True, 0)
    gq, gr, gt = image_text.clip_lse_backward(torch.ones_like(row), torch.ones_like(col), img, txt, t, row.detach(),
                                              col.detach(), True, 0, True, True)
    with pytest.raises(RuntimeError, match="not differentiable"):
        gq.sum().backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype):
    img, txt, t, b = [a.detach() for a in leaves(9, 5, 13, dtype)]
    for req in (True, False):
        args = [img.clone().requires_grad_(req), txt.clone().requires_grad_(req), t.clone().requires_grad_(req)]
        torch.library.opcheck(image_text.clip_lse, (*args, True, 0))
        for off in (0, 3, -2):
            torch.library.opcheck(image_text.clip_lse, (*args, False, off))
        for off in (0, None, 3, -2):
            torch.library.opcheck(image_text.siglip_rows, (*args, b.clone().requires_grad_(req), off))
    A = torch.float64 if dtype == torch.float64 else torch.float32
    row, col = image_text.clip_lse(img, txt, t, True, 0)
    torch.library.opcheck(image_text.clip_lse_backward,
                          (torch.rand(9, dtype=A), torch.rand(9, dtype=A), img, txt, t, row, col, True, 0, True, False))
    torch.library.opcheck(image_text.siglip_rows_backward,
                          (torch.rand(9, dtype=A), img, txt, t, b, 0, False, True))


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_torch_compile_fullgraph(name):
    ours, theirs = LOSSES[name]
    loss = ours()
    img, txt, t, b = leaves(16, 8, 14, torch.float32)

    def step(img, txt, t, b):
        out = loss(img, txt, t, b)
        return out, torch.autograd.grad(out, [img, txt, t, b])

    compiled = torch.compile(lambda *a: loss(*a), fullgraph=True, backend="aot_eager")
    out = compiled(img, txt, t, b)
    torch.testing.assert_close(out, loss(img, txt, t, b))
    grads = torch.autograd.grad(out, [img, txt, t, b])
    expected = step(img, txt, t, b)[1]
    for a, e in zip(grads, expected):
        torch.testing.assert_close(a, e)


def test_chunk_positions_of_the_siglip_positive(monkeypatch):
    """pos_offset: positives at column i + offset where that lies inside the block, none elsewhere."""
    img, txt, t, b = [a.detach() for a in leaves(7, 4, 15, torch.float64)]
    for off in (-3, 0, 2, 6, 7, None):
        for chunk in (1 << 22, 4):
            monkeypatch.setattr(image_text, "CHUNK_ELEMENTS", chunk)
            monkeypatch.setattr(image_text, "MIN_CHUNK_ROWS", 1)
            rows = image_text.siglip_rows(img, txt, t, b, off)
            x = t * img @ txt.T + b
            z = -torch.ones_like(x)
            if off is not None:
                for i in range(7):
                    if 0 <= i + off < 7:
                        z[i, i + off] = 1
            torch.testing.assert_close(rows, torch.nn.functional.softplus(-z * x).sum(1), rtol=1e-12, atol=0)


# ---- bad input ---------------------------------------------------------------------------------
def _bad_calls():
    img, txt, t, b = [a.detach() for a in leaves(6, 4, 16, torch.float32)]
    return [
        ("text_features", lambda: fpl.ClipLoss()(img, txt[:5], t), ValueError),
        ("text_features", lambda: fpl.SigLipLoss()(img, txt[:, :3], t, b), ValueError),
        ("text_features", lambda: fpl.ClipLoss()(img, txt.double(), t), TypeError),
        ("image_features", lambda: fpl.ClipLoss()(img[0], txt[0], t), ValueError),
        ("image_features", lambda: fpl.SigLipLoss()(img.long(), txt.long(), t, b), TypeError),
        ("image_features", lambda: fpl.ClipLoss()("x", txt, t), TypeError),
        ("logit_scale", lambda: fpl.ClipLoss()(img, txt, torch.ones(2)), ValueError),
        ("logit_scale", lambda: fpl.SigLipLoss()(img, txt, torch.ones(3, 1), b), ValueError),
        ("logit_scale", lambda: fpl.ClipLoss()(img, txt, "a"), TypeError),
        ("logit_bias", lambda: fpl.SigLipLoss()(img, txt, t, torch.tensor(True)), TypeError),
        ("logit_bias", lambda: fpl.SigLipLoss()(img, txt, t, torch.zeros(2)), ValueError),
        ("rank", lambda: fpl.ClipLoss(rank=2, world_size=2), ValueError),
        ("rank", lambda: fpl.SigLipLoss(rank=-1, world_size=2), ValueError),
        ("world_size", lambda: fpl.SigLipLoss(world_size=0), ValueError),
        ("world_size", lambda: fpl.ClipLoss(world_size=1.5), TypeError),
        ("world_size", lambda: fpl.ClipLoss(rank=1, world_size=2)(img, txt, t), ValueError),  # no process group
        ("dist_impl", lambda: fpl.SigLipLoss(dist_impl="ring"), ValueError),
        ("chunk_size", lambda: fpl.SigLipLoss(chunk_size=-1), ValueError),
        ("use_horovod", lambda: fpl.ClipLoss(use_horovod=True, rank=0, world_size=2), ValueError),
        ("image_features", lambda: fpl.ClipLoss(rank=0, world_size=2)(img[:0], txt[:0], t), ValueError),
        ("backend", lambda: fpl.ClipLoss(backend="nope")(img, txt, t), ValueError),
    ]


@pytest.mark.parametrize("k", range(len(_bad_calls())))
def test_bad_input_names_the_argument(k):
    name, call, exc = _bad_calls()[k]
    with pytest.raises(exc, match=name):
        call()


def test_modules_are_not_in_the_pml_table():
    assert "ClipLoss" not in fpl.losses.REGISTRY and "SigLipLoss" not in fpl.losses.REGISTRY
    assert clip.ClipLoss is fpl.ClipLoss and siglip.SigLipLoss is fpl.SigLipLoss


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_gpu_losses_match_reference(name, dtype, backend):
    """On CUDA tensors: ClipLoss and SigLipLoss on the class engine of each GPU backend ("auto"
    picks one), against the reference (fp64 the truth)."""
    ours, _ = LOSSES[name]
    args = [a.detach().cuda().requires_grad_(True) for a in leaves(300, 64, 13, dtype)]
    fused = value_and_grads(ours(backend=backend), args)
    same = value_and_grads(ours(backend="reference"), args)
    truth = value_and_grads(ours(backend="reference"), as64(args))
    check_all(fused, truth, same, dtype, f"{name} {backend}")


@pytest.mark.gpu
def test_gpu_siglip_bias_survives_tf32():
    """With TF32 products enabled, the logit bias (two operand columns, its bf16 part and the
    rest) reaches the logits with fp32 accuracy: the loss stays within TF32's error on the
    features' products, far below the 5e-3 per logit that rounding b = -10 to 10 bits would cost."""
    img, txt, t, b = [a.detach().cuda() for a in leaves(512, 128, 14, torch.float32, scale=10.0, bias=-10.37)]
    truth = siglip.siglip_reference(img.double(), txt.double(), t.double(), b.double())
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        for backend in [x for x in ("triton", "cuda") if x in fpl.available_backends("cuda")]:
            val = fpl.SigLipLoss(backend=backend)(img, txt, t, b)
            assert abs(val.double() - truth).item() <= 1e-4 * truth.abs().item(), backend
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("computation", CLIP_COMPUTATIONS)
def test_frozen_towers_train_the_scale_and_bias(computation):
    """Features that need no gradient (frozen towers), logit_scale and logit_bias that do: each
    computation's backward (the row-chunk op's returns two distinct empty feature gradients)."""
    img, txt, t, b = leaves(12, 8, 24, torch.float64)
    img, txt = img.detach(), txt.detach()
    for name, fn, ref, args in (("clip", clip.clip_fused, clip.clip_reference, (img, txt, t)),
                                ("siglip", siglip.siglip_fused, siglip.siglip_reference, (img, txt, t, b))):
        params = list(args[2:])
        got = torch.autograd.grad(fn(*args, backend=computation), params)
        want = torch.autograd.grad(ref(*args), params)
        for g, w in zip(got, want):
            check_close(g, w, what=f"{name} {computation}")


def test_siglip_row_chunk_op_keeps_softplus_tail_in_fp64():
    """softplus(x) above 20 is x + log1p(e^-x), not x (F.softplus's threshold): open_clip's
    -logsigmoid keeps the e^-21 in fp64, and so does the row-chunk op."""
    q = torch.eye(2, dtype=torch.float64)
    rows = image_text.siglip_rows(q, -q, torch.tensor(21.0, dtype=torch.float64),
                                  torch.tensor(0.0, dtype=torch.float64), 0)
    x = torch.tensor([[-21.0, 0.0], [0.0, -21.0]], dtype=torch.float64)  # logits; z = +1 on the diagonal
    z = 2 * torch.eye(2, dtype=torch.float64) - 1
    torch.testing.assert_close(rows, -torch.nn.functional.logsigmoid(z * x).sum(1), rtol=1e-15, atol=0)
