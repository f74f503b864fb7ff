"""CUDA C++ backend (backend "cuda", csrc/cuda): pair engine and class engine.

Three layers:
- CPU, always: when the installed library was built with CUDA (build_info()["cuda"]), all four
  ops have CUDA kernels registered (CI builds the CUDA code on a machine with no GPU and checks it
  this way).
- CPU, when g++ and the CUDA headers are there: the kernels of csrc/cuda compiled as plain C++ by
  csrc/cuda/emu (one std::thread per CUDA thread, emulated barriers, shuffles and WMMA fragments)
  and compared with the materializing oracles (fused_pairloss.reference.*_engine_*_reference).
  This runs the real tiling, masks, transposed / symmetrized self-mode tiles and both backward
  passes on a machine without a GPU.
- GPU (@pytest.mark.gpu, skipped without one): the same op-level parity on the device, loss-level
  parity through the public API against backend="reference" (fp32; fp16/bf16: error vs an fp64
  reference at most 2x the reference backend's own error in that dtype), determinism, large scales.

Near thresholds (SPEC §3): op-level cases use "dyadic" rows (16 entries of +-1/4: unit norm, every
S = k/16 exact in any summation order) with miner_eps = 1/8 and Circle m = 1/4, so many pairs sit
exactly on the mining / relu boundaries and both sides must decide them the same way.
"""
import ctypes
import glob
import hashlib
import os
import shutil
import subprocess
import tempfile

import pytest
import torch

import fused_pairloss as fpl
from fused_pairloss import functional as Fn
from fused_pairloss import reference as R
from fused_pairloss.ops import _kinds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
MS, CIRCLE = _kinds.MULTI_SIMILARITY, _kinds.CIRCLE
SOFT_TRIPLE, PROXY_CIRCLE = _kinds.SOFT_TRIPLE, _kinds.PROXY_CIRCLE
LOWP = (torch.float16, torch.bfloat16)

# (kind, p0, p1, p2, mine, miner_eps)
PAIR_LOSSES = {
    "ms": (MS, 2.0, 50.0, 0.5, False, 0.0),
    "ms_mined": (MS, 2.0, 50.0, 0.5, True, 0.125),
    "circle": (CIRCLE, 0.25, 80.0, 0.0, False, 0.0),
}
# (K, kind, p0, p1, p2)
CLASS_LOSSES = {
    "softtriple_k1": (1, SOFT_TRIPLE, 20.0, 0.1, 0.01),
    "softtriple_k3": (3, SOFT_TRIPLE, 20.0, 0.1, 0.01),
    "softtriple_k10": (10, SOFT_TRIPLE, 20.0, 0.1, 0.01),
    "proxy_circle": (1, PROXY_CIRCLE, 0.25, 256.0, 0.0),
}


def dyadic(n, d, gen, dtype):
    """n unit rows, 16 entries +-1/4 each (d >= 16): S = q.r = k/16, exact."""
    x = torch.zeros(n, d, dtype=torch.float64)
    for i in range(n):
        idx = torch.randperm(d, generator=gen)[:16]
        x[i, idx] = (torch.randint(0, 2, (16,), generator=gen) * 2 - 1).double() / 4
    return x.to(dtype)


def gaussian(n, d, gen, dtype):
    return torch.nn.functional.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1).to(dtype)


def pair_case(mode, n, m, d, gen, dtype):
    q = dyadic(n, d, gen, dtype)
    lq = torch.randint(0, 5, (n,), generator=gen)
    if mode == "self":
        return q, None, lq, None, True
    if mode == "ref_excl":  # PML: ref_labels is labels -> i == j excluded (N == M)
        return q, dyadic(n, d, gen, dtype), lq, lq.clone(), True
    return q, dyadic(m, d, gen, dtype), lq, torch.randint(0, 5, (m,), generator=gen), False


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def grad_tols(dtype):
    return {torch.float32: 1e-5, torch.float64: 1e-10, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]


def assert_stats_equal(out, ref, dtype):
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    names = ("lse_pos", "lse_neg", "count_pos", "count_neg", "min_pos", "max_neg")
    for name, a, b in zip(names, out, ref):
        a, b = a.cpu(), b.cpu()
        assert a.dtype == b.dtype, name
        if name.startswith("count") or name in ("min_pos", "max_neg"):  # exact (dyadic S)
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=name)


def assert_grad_close(a, b, dtype, name):
    a, b = a.cpu().double(), b.cpu().double()
    assert a.shape == b.shape, name
    scale = max(b.abs().max().item(), 1e-30)
    tol = grad_tols(dtype)
    torch.testing.assert_close(a / scale, b / scale, rtol=tol, atol=tol, msg=name)


# ---------------------------------------------------------------------------------------------
# 1. The built library registers the CUDA kernels (CPU-runnable; CI's check of the CUDA build)
# ---------------------------------------------------------------------------------------------
def test_cuda_kernels_registered_when_built_with_cuda():
    info = fpl.build_info()
    if not info["cuda"]:
        pytest.skip(f"the loaded library has no CUDA kernels (library={info['library']}, "
                    f"error={info['library_error']})")
    for op in ("pair_engine_forward", "pair_engine_backward", "class_engine_forward",
               "class_engine_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_pairloss::{op}", "CUDA"), op
    assert info["cuda_arch_list"], "a CUDA build records the archs it was compiled for"


# ---------------------------------------------------------------------------------------------
# 2. CPU emulation of the CUDA kernels (csrc/cuda/emu)
# ---------------------------------------------------------------------------------------------
def _cuda_include_dir():
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    try:
        from torch.utils.cpp_extension import CUDA_HOME
        homes.insert(1, CUDA_HOME)
    except Exception:  # pragma: no cover
        pass
    for h in homes:
        if h and os.path.exists(os.path.join(h, "include", "cuda_fp16.h")):
            return os.path.join(h, "include")
    return None


@pytest.fixture(scope="module")
def emu():
    cxx = shutil.which("g++")
    inc = _cuda_include_dir()
    if cxx is None or inc is None:
        pytest.skip("the CUDA kernel emulation needs g++ and the CUDA headers (cuda_fp16.h)")
    srcs = [os.path.join(CSRC, "cuda", "emu", f"emu_{n}.cpp") for n in ("pair", "class", "api")]
    deps = sorted(glob.glob(os.path.join(CSRC, "cuda", "*")) + glob.glob(os.path.join(CSRC, "cuda", "emu", "*"))
                  + [os.path.join(CSRC, "common", "pair_math.h")])
    h = hashlib.sha1()
    for p in deps:
        if os.path.isfile(p):
            with open(p, "rb") as f:
                h.update(f.read())
    out_dir = os.path.join(tempfile.gettempdir(), f"fpl_cuda_emu_{h.hexdigest()[:16]}")
    lib_path = os.path.join(out_dir, "libfpl_cuda_emu.so")
    if not os.path.exists(lib_path):
        os.makedirs(out_dir, exist_ok=True)
        flags = ["-std=c++20", "-O1", "-fPIC", "-pthread", f"-I{CSRC}", f"-I{inc}"]
        procs, objs = [], []
        for s in srcs:
            o = os.path.join(out_dir, os.path.basename(s) + ".o")
            objs.append(o)
            procs.append(subprocess.Popen([cxx, *flags, "-c", s, "-o", o], stderr=subprocess.PIPE, text=True))
        for p, s in zip(procs, srcs):
            _, err = p.communicate()
            assert p.returncode == 0, f"emulation build of {s} failed:\n{err[-4000:]}"
        tmp = lib_path + f".{os.getpid()}"
        subprocess.run([cxx, "-shared", "-pthread", "-o", tmp, *objs], check=True)
        os.replace(tmp, lib_path)
    return _Emu(ctypes.CDLL(lib_path))


class _Emu:
    """The launchers of csrc/cuda/launchers.h on CPU tensors, with the ops' signatures."""
    DT = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}

    def __init__(self, lib):
        self.lib = lib
        self.vec16 = True

    @staticmethod
    def _p(t):
        return ctypes.c_void_p(t.data_ptr() if t is not None else 0)

    def _vec(self, a, b):
        return int(self.vec16 and a.data_ptr() % 16 == 0 and b.data_ptr() % 16 == 0
                   and (a.shape[1] * a.element_size()) % 16 == 0)

    def pair_engine_forward(self, q, r, lq, lr, exclude_diag, kind, p0, p1, p2, mine, eps):
        self_mode = r is None
        rr, llr = (q, lq) if self_mode else (r, lr)
        (n, d), m, A = q.shape, rr.shape[0], acc_dtype(q.dtype)
        out = [torch.empty(n, dtype=A), torch.empty(n, dtype=A), torch.empty(n, dtype=torch.int32),
               torch.empty(n, dtype=torch.int32), torch.empty(n, dtype=A), torch.empty(n, dtype=A)]
        i64, f64, p = ctypes.c_int64, ctypes.c_double, self._p
        rc = self.lib.fpl_emu_pair_forward(
            self.DT[q.dtype], p(q), p(rr), p(lq), p(llr), i64(n), i64(m), i64(d), int(self_mode),
            self._vec(q, rr), i64(kind), f64(p0), f64(p1), f64(p2), int(mine), f64(eps),
            int(exclude_diag or self_mode), *[p(t) for t in out])
        assert rc == 0
        return tuple(out)

    def pair_engine_backward(self, gp, gn, q, r, lq, lr, lse_pos, lse_neg, min_pos, max_neg,
                             exclude_diag, kind, p0, p1, p2, mine, eps):
        self_mode = r is None
        rr, llr = (q, lq) if self_mode else (r, lr)
        (n, d), m, A = q.shape, rr.shape[0], acc_dtype(q.dtype)
        gq = torch.zeros(n, d, dtype=A)
        gr = None if self_mode else torch.zeros(m, d, dtype=A)
        st = [t.to(A).contiguous() for t in (gp, gn, lse_pos, lse_neg, min_pos, max_neg)]
        i64, f64, p = ctypes.c_int64, ctypes.c_double, self._p
        rc = self.lib.fpl_emu_pair_backward(
            self.DT[q.dtype], p(st[0]), p(st[1]), p(q), p(rr), p(lq), p(llr), p(st[2]), p(st[3]),
            p(st[4]), p(st[5]), i64(n), i64(m), i64(d), int(self_mode), self._vec(q, rr), i64(kind),
            f64(p0), f64(p1), f64(p2), int(mine), f64(eps), int(exclude_diag or self_mode), p(gq), p(gr))
        assert rc == 0
        return gq.to(q.dtype), (q.new_empty(0) if self_mode else gr.to(q.dtype))

    def class_engine_forward(self, q, w, labels, K, kind, p0, p1, p2):
        (n, d), c, A = q.shape, w.shape[0] // K, acc_dtype(q.dtype)
        lse, ts = torch.empty(n, dtype=A), torch.empty(n, dtype=A)
        i64, f64, p = ctypes.c_int64, ctypes.c_double, self._p
        rc = self.lib.fpl_emu_class_forward(
            self.DT[q.dtype], p(q), p(w), p(labels), i64(n), i64(c), i64(K), i64(d), self._vec(q, w),
            i64(kind), f64(p0), f64(p1), f64(p2), p(lse), p(ts))
        assert rc == 0
        return lse, ts

    def class_engine_backward(self, gl, gt, q, w, labels, lse, K, kind, p0, p1, p2):
        (n, d), c, A = q.shape, w.shape[0] // K, acc_dtype(q.dtype)
        gq, gw = torch.zeros(n, d, dtype=A), torch.zeros(w.shape[0], d, dtype=A)
        gl, gt, lse = (t.to(A).contiguous() for t in (gl, gt, lse))
        i64, f64, p = ctypes.c_int64, ctypes.c_double, self._p
        rc = self.lib.fpl_emu_class_backward(
            self.DT[q.dtype], p(gl), p(gt), p(q), p(w), p(labels), p(lse), i64(n), i64(c), i64(K),
            i64(d), self._vec(q, w), i64(kind), f64(p0), f64(p1), f64(p2), p(gq), p(gw))
        assert rc == 0
        return gq.to(q.dtype), gw.to(w.dtype)


class _GpuOps:
    """The registered CUDA kernels, on CUDA copies of the inputs."""

    def __getattr__(self, name):
        op = getattr(torch.ops.fused_pairloss, name)

        def call(*args):
            args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
            out = op(*args)
            torch.cuda.synchronize()
            return tuple(o.cpu() for o in out)

        return call


def check_pair_op(ops, mode, loss, dtype, n=70, m=90, d=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, r, lq, lr, excl = pair_case(mode, n, m, d, gen, dtype)
    args = (excl, *PAIR_LOSSES[loss])
    out = ops.pair_engine_forward(q, r, lq, lr, *args)
    ref = R.pair_engine_forward_reference(q, r, lq, lr, *args)
    assert_stats_equal(out, ref, dtype)
    A = acc_dtype(dtype)
    gp = torch.rand(n, generator=gen, dtype=torch.float64).to(A)
    gn = torch.rand(n, generator=gen, dtype=torch.float64).to(A)
    saved = (ref[0], ref[1], ref[4], ref[5])
    g = ops.pair_engine_backward(gp, gn, q, r, lq, lr, *saved, *args)
    gref = R.pair_engine_backward_reference(gp, gn, q, r, lq, lr, *saved, *args)
    assert g[0].dtype == dtype
    assert_grad_close(g[0], gref[0], dtype, "grad_q")
    if r is None:
        assert g[1].numel() == 0
    else:
        assert_grad_close(g[1], gref[1], dtype, "grad_r")
    return g


def check_class_op(ops, loss, dtype, n=70, c=13, d=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    K, kind, p0, p1, p2 = CLASS_LOSSES[loss]
    q = gaussian(n, d, gen, dtype)
    w = gaussian(c * K, d, gen, dtype)
    labels = torch.randint(0, c, (n,), generator=gen)
    args = (K, kind, p0, p1, p2)
    out = ops.class_engine_forward(q, w, labels, *args)
    ref = R.class_engine_forward_reference(q, w, labels, *args)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    for name, a, b in zip(("lse", "target_sim"), out, ref):
        torch.testing.assert_close(a.cpu(), b, rtol=tol, atol=tol, msg=name)
    A = acc_dtype(dtype)
    gl = torch.rand(n, generator=gen, dtype=torch.float64).to(A)
    gt = torch.randn(n, generator=gen, dtype=torch.float64).to(A)
    g = ops.class_engine_backward(gl, gt, q, w, labels, ref[0], *args)
    gref = R.class_engine_backward_reference(gl, gt, q, w, labels, ref[0], *args)
    assert_grad_close(g[0], gref[0], dtype, "grad_q")
    assert_grad_close(g[1], gref[1], dtype, "grad_w")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("loss", list(PAIR_LOSSES))
@pytest.mark.parametrize("mode", ["self", "ref", "ref_excl"])
def test_emulated_pair_engine_matches_oracle(emu, mode, loss, dtype):
    check_pair_op(emu, mode, loss, dtype)


@pytest.mark.parametrize("mode", ["self", "ref"])
def test_emulated_pair_engine_fp64_and_ragged_shapes(emu, mode):
    # fp64 FMA path; 3 row blocks (several diagonal tiles in self mode); D = 37: scalar loads
    check_pair_op(emu, mode, "ms_mined", torch.float64, n=130, m=75, d=37, seed=1)
    check_pair_op(emu, mode, "circle", torch.float32, n=130, m=75, d=37, seed=2)


def test_emulated_pair_engine_vector_and_scalar_loads_agree(emu):
    gen = torch.Generator().manual_seed(3)
    q = gaussian(70, 64, gen, torch.float16)
    lq = torch.randint(0, 4, (70,), generator=gen)
    args = (True, *PAIR_LOSSES["ms_mined"])
    emu.vec16 = True
    a = emu.pair_engine_forward(q, None, lq, None, *args)
    emu.vec16 = False
    try:
        b = emu.pair_engine_forward(q, None, lq, None, *args)
    finally:
        emu.vec16 = True
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_emulated_pair_backward_is_deterministic(emu):
    g1 = check_pair_op(emu, "ref", "ms_mined", torch.float32, seed=4)
    g2 = check_pair_op(emu, "ref", "ms_mined", torch.float32, seed=4)
    assert torch.equal(g1[0], g2[0]) and torch.equal(g1[1], g2[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("loss", list(CLASS_LOSSES))
def test_emulated_class_engine_matches_oracle(emu, loss, dtype):
    check_class_op(emu, loss, dtype)


def test_emulated_class_engine_many_tiles(emu):
    # K = 64: one class per tile; 2 row blocks
    CLASS_LOSSES_K64 = (64, SOFT_TRIPLE, 20.0, 0.1, 0.01)
    gen = torch.Generator().manual_seed(5)
    q, w = gaussian(70, 24, gen, torch.float32), gaussian(3 * 64, 24, gen, torch.float32)
    labels = torch.randint(0, 3, (70,), generator=gen)
    out = emu.class_engine_forward(q, w, labels, *CLASS_LOSSES_K64)
    ref = R.class_engine_forward_reference(q, w, labels, *CLASS_LOSSES_K64)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)
    gl, gt = torch.rand(70, generator=gen), torch.randn(70, generator=gen)
    g = emu.class_engine_backward(gl, gt, q, w, labels, ref[0], *CLASS_LOSSES_K64)
    gref = R.class_engine_backward_reference(gl, gt, q, w, labels, ref[0], *CLASS_LOSSES_K64)
    assert_grad_close(g[0], gref[0], torch.float32, "grad_q")
    assert_grad_close(g[1], gref[1], torch.float32, "grad_w")


# ---------------------------------------------------------------------------------------------
# 3. GPU
# ---------------------------------------------------------------------------------------------
def _needs_cuda_backend():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if "cuda" not in fpl.available_backends("cuda"):
        pytest.skip(f"the cuda backend is not available: {fpl.build_info()}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("loss", list(PAIR_LOSSES))
@pytest.mark.parametrize("mode", ["self", "ref", "ref_excl"])
def test_gpu_pair_engine_matches_oracle(mode, loss, dtype):
    _needs_cuda_backend()
    check_pair_op(_GpuOps(), mode, loss, dtype, n=300, m=200, d=136)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("loss", list(CLASS_LOSSES))
def test_gpu_class_engine_matches_oracle(loss, dtype):
    _needs_cuda_backend()
    check_class_op(_GpuOps(), loss, dtype, n=300, c=50, d=136)


def _loss_and_grads(fn, tensors, kwargs, backend, dtype):
    leaves = [t.detach().to("cuda", dtype).requires_grad_() if t.is_floating_point() else t.to("cuda")
              for t in tensors]
    loss = fn(*leaves, **kwargs, backend=backend)
    assert loss.dtype == dtype
    wrt = [t for t in leaves if t.requires_grad]
    grads = torch.autograd.grad(loss, wrt)
    return loss.detach().double().cpu(), [g.double().cpu() for g in grads]


def _pair_loss_case(name, ref_mode, gen):
    n, d = 96, 64
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 6, (n,), generator=gen)
    tensors = [x, y]
    if name.startswith("ms_mined"):  # exact S (dyadic rows) so mining decisions are exact
        tensors[0] = dyadic(n, d, gen, torch.float64)
    if ref_mode:
        tensors += [torch.randn(80, d, generator=gen, dtype=torch.float64), torch.randint(0, 6, (80,), generator=gen)]
    fn, kwargs = {
        "ms": (Fn.multi_similarity_loss, {}),
        "ms_mined": (Fn.multi_similarity_loss, {"miner_epsilon": 0.1}),
        "circle": (Fn.circle_loss, {}),
    }[name]
    return fn, tensors, kwargs


def _class_loss_case(name, gen):
    n, d, c = 96, 64, 20
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=gen)
    if name == "proxy_circle":
        return Fn.proxy_circle_loss, [x, y, torch.randn(d, c, generator=gen, dtype=torch.float64)], {}
    K = {"softtriple_k1": 1, "softtriple_k3": 3}[name]
    centers = torch.randn(d, c * K, generator=gen, dtype=torch.float64)
    return Fn.soft_triple_loss, [x, y, centers], {"centers_per_class": K,
                                                  "center_reg_weight": 0.2 if K > 1 else 0.0}


def _check_loss_parity(fn, tensors, kwargs, dtype):
    got = _loss_and_grads(fn, tensors, kwargs, "cuda", dtype)
    ref = _loss_and_grads(fn, tensors, kwargs, "reference", dtype)
    if dtype == torch.float32:
        torch.testing.assert_close(got[0], ref[0], rtol=1e-4, atol=1e-5)
        for a, b in zip(got[1], ref[1]):
            assert_grad_close(a, b, torch.float32, "grad")
        return
    exact = _loss_and_grads(fn, tensors, kwargs, "reference", torch.float64)
    eps = torch.finfo(dtype).eps
    for a, b, e in zip([got[0], *got[1]], [ref[0], *ref[1]], [exact[0], *exact[1]]):
        err_cuda = (a - e).norm().item()
        err_ref = (b - e).norm().item()
        assert err_cuda <= 2 * err_ref + eps * e.norm().item() + 1e-12, (err_cuda, err_ref)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("ref_mode", [False, True])
@pytest.mark.parametrize("name", ["ms", "ms_mined", "circle"])
def test_gpu_pair_losses_match_reference(name, ref_mode, dtype):
    _needs_cuda_backend()
    fn, tensors, kwargs = _pair_loss_case(name, ref_mode, torch.Generator().manual_seed(10))
    _check_loss_parity(fn, tensors, kwargs, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["softtriple_k1", "softtriple_k3", "proxy_circle"])
def test_gpu_class_losses_match_reference(name, dtype):
    _needs_cuda_backend()
    fn, tensors, kwargs = _class_loss_case(name, torch.Generator().manual_seed(11))
    _check_loss_parity(fn, tensors, kwargs, dtype)


@pytest.mark.gpu
def test_gpu_backward_is_deterministic_and_large_scales_stay_finite():
    _needs_cuda_backend()
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(1000, 128, generator=gen).cuda().requires_grad_()
    y = torch.randint(0, 50, (1000,), generator=gen).cuda()
    grads = []
    for _ in range(2):
        loss = Fn.multi_similarity_loss(x, y, beta=50.0, miner_epsilon=0.1, backend="cuda")
        grads.append(torch.autograd.grad(loss, x)[0])
    assert torch.isfinite(loss) and torch.equal(grads[0], grads[1])
    p = torch.randn(128, 50, generator=gen).cuda().requires_grad_()
    loss = Fn.proxy_circle_loss(x, y, p, gamma=256.0, backend="cuda")
    gx, gp = torch.autograd.grad(loss, (x, p))
    assert torch.isfinite(loss) and torch.isfinite(gx).all() and torch.isfinite(gp).all()
