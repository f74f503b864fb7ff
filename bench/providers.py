"""What is benchmarked: the losses, their inputs, and every provider of each loss.

A *provider* is one way of computing a loss: a fused backend of fused_pairloss ("cpu", "cuda",
"triton"), the materializing "reference" backend, pytorch-metric-learning ("pml"),
torch.compile of the reference ("compile"), or a plain matmul of the same shape ("matmul", the
practical lower bound: self-mode x @ x.T for the pair losses, x @ w.T for the class losses).

`build(point)` returns a `Case`: the inputs plus `forward()` / `backward(out)` closures. It runs
inside the benchmark worker process (bench/measure.py), never in the parent.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Callable

PAIR_LOSSES = ("ms", "ms_mined", "circle")
CLASS_LOSSES = ("softtriple", "proxycircle")
LOSSES = PAIR_LOSSES + CLASS_LOSSES

FUSED_BACKENDS = ("cpu", "cuda", "triton")
BASE_PROVIDERS = ("reference", "pml", "compile", "matmul")
# Providers that exist only to test the harness: never listed by default.
TEST_PROVIDERS = ("_fail", "_oom", "_sleep", "_crash")
ALL_PROVIDERS = FUSED_BACKENDS + BASE_PROVIDERS + TEST_PROVIDERS

# Loss hyper-parameters: the defaults of SPEC §1 (PML's defaults; ms_mined: PML's miner epsilon).
LOSS_PARAMS = {
    "ms": dict(alpha=2.0, beta=50.0, base=0.5),
    "ms_mined": dict(alpha=2.0, beta=50.0, base=0.5, miner_epsilon=0.1),
    "circle": dict(m=0.4, gamma=80.0),
    "softtriple": dict(la=20.0, gamma=0.1, margin=0.01),
    "proxycircle": dict(m=0.25, gamma=256.0),
}

DTYPES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float64": "float64", "fp64": "float64", "double": "float64",
}


class Unavailable(Exception):
    """The provider does not exist for this loss / device (recorded as SKIP, not an error)."""


def class_shape(loss: str, n: int, ck_scale: float, centers_per_class: int):
    """(C, K) of a class loss at batch size n: C*K ~= ck_scale * n (at least 2 classes)."""
    cols = max(2, int(round(ck_scale * n)))
    if loss == "softtriple":
        k = max(1, int(centers_per_class))
        return max(2, cols // k), k
    return cols, 1


def columns(loss: str, n: int, ck_scale: float, centers_per_class: int) -> int:
    """M, the number of columns of the similarity matrix (N for pair losses, C*K for class ones)."""
    if loss in PAIR_LOSSES:
        return n
    c, k = class_shape(loss, n, ck_scale, centers_per_class)
    return c * k


@dataclass
class Case:
    forward: Callable[[], object]
    backward: Callable[[object], None]
    grads: list = field(default_factory=list)  # tensors whose .grad is reset between runs

    def zero_grad(self):
        for t in self.grads:
            t.grad = None


def _torch_dtype(torch, name):
    return getattr(torch, DTYPES[name])


def make_inputs(point):
    import torch

    dev = torch.device(point["device"])
    dtype = _torch_dtype(torch, point["dtype"])
    n, d, loss = point["n"], point["d"], point["loss"]
    gen = torch.Generator(device="cpu").manual_seed(int(point.get("seed", 0)))
    x = torch.randn(n, d, generator=gen).to(device=dev, dtype=dtype).requires_grad_(True)
    inputs = {"x": x}
    if loss in PAIR_LOSSES:
        n_classes = max(2, n // max(1, int(point.get("samples_per_class", 4))))
        inputs["labels"] = torch.randint(0, n_classes, (n,), generator=gen).to(dev)
    else:
        c, k = class_shape(loss, n, point.get("ck_scale", 1.0), point.get("centers_per_class", 10))
        w = torch.randn(d, c * k, generator=gen).to(device=dev, dtype=dtype)
        inputs["centers"] = torch.nn.Parameter(w)
        inputs["labels"] = torch.randint(0, c, (n,), generator=gen).to(dev)
        inputs["C"], inputs["K"] = c, k
    return inputs


def _default_backward(out):
    out.backward()


def _functional_call(mod, loss, inp, extra):
    """Call fused_pairloss.functional (or .reference: same signatures) for `loss`."""
    p = dict(LOSS_PARAMS[loss])
    x, y = inp["x"], inp["labels"]
    if loss in ("ms", "ms_mined"):
        fn = functools.partial(mod.multi_similarity_loss, **p, **extra)
        return lambda: fn(x, y)
    if loss == "circle":
        fn = functools.partial(mod.circle_loss, **p, **extra)
        return lambda: fn(x, y)
    if loss == "softtriple":
        fn = functools.partial(mod.soft_triple_loss, centers_per_class=inp["K"], **p, **extra)
        return lambda: fn(x, y, inp["centers"])
    if loss == "proxycircle":
        fn = functools.partial(mod.proxy_circle_loss, **p, **extra)
        return lambda: fn(x, y, inp["centers"])
    raise ValueError(loss)


_COMPILED = {}  # loss -> compiled reference function (reused across N within one worker)


def _compiled_reference(loss):
    import torch
    import fused_pairloss.reference as R

    names = {"ms": "multi_similarity_loss", "ms_mined": "multi_similarity_loss",
             "circle": "circle_loss", "softtriple": "soft_triple_loss",
             "proxycircle": "proxy_circle_loss"}
    key = names[loss]
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(getattr(R, key))
    return _COMPILED[key]


def _pml_case(loss, inp):
    try:
        from pytorch_metric_learning import losses, miners
    except ImportError as e:
        raise Unavailable(f"pytorch-metric-learning is not installed: {e}") from e

    p = LOSS_PARAMS[loss]
    x, y = inp["x"], inp["labels"]
    if loss == "ms":
        fn = losses.MultiSimilarityLoss(alpha=p["alpha"], beta=p["beta"], base=p["base"])
        return lambda: fn(x, y)
    if loss == "ms_mined":
        fn = losses.MultiSimilarityLoss(alpha=p["alpha"], beta=p["beta"], base=p["base"])
        miner = miners.MultiSimilarityMiner(epsilon=p["miner_epsilon"])
        return lambda: fn(x, y, miner(x, y))
    if loss == "circle":
        fn = losses.CircleLoss(m=p["m"], gamma=p["gamma"])
        return lambda: fn(x, y)
    if loss == "softtriple":
        fn = losses.SoftTripleLoss(inp["C"], x.shape[1], centers_per_class=inp["K"], la=p["la"],
                                   gamma=p["gamma"], margin=p["margin"])
        fn.fc = inp["centers"]  # our centers, same layout (D, C*K)
        return lambda: fn(x, y)
    raise Unavailable(f"pytorch-metric-learning has no {loss} loss")


def build(point) -> Case:
    import torch

    loss, prov = point["loss"], point["provider"]
    inp = make_inputs(point)
    x = inp["x"]
    grads = [x] + ([inp["centers"]] if "centers" in inp else [])

    if prov in FUSED_BACKENDS:
        try:
            import fused_pairloss.functional as F
        except Exception as e:  # noqa: BLE001
            raise Unavailable(f"fused_pairloss.functional not importable: {e}") from e
        fwd = _functional_call(F, loss, inp, {"backend": prov})
        return Case(fwd, _default_backward, grads)

    if prov == "reference":
        try:
            import fused_pairloss.functional as F
            fwd = _functional_call(F, loss, inp, {"backend": "reference"})
        except ImportError:
            import fused_pairloss.reference as R
            fwd = _functional_call(R, loss, inp, {})
        return Case(fwd, _default_backward, grads)

    if prov == "compile":
        cfn = _compiled_reference(loss)
        p = dict(LOSS_PARAMS[loss])
        y = inp["labels"]
        if loss in PAIR_LOSSES:
            return Case(lambda: cfn(x, y, **p), _default_backward, grads)
        if loss == "softtriple":
            return Case(lambda: cfn(x, y, inp["centers"], centers_per_class=inp["K"], **p),
                        _default_backward, grads)
        return Case(lambda: cfn(x, y, inp["centers"], **p), _default_backward, grads)

    if prov == "pml":
        return Case(_pml_case(loss, inp), _default_backward, grads)

    if prov == "matmul":
        other = x if loss in PAIR_LOSSES else inp["centers"]
        if loss in PAIR_LOSSES:
            fwd = lambda: x @ x.t()  # noqa: E731
        else:
            fwd = lambda: x @ other  # noqa: E731  (= x @ w.T with w = centers.T, (C*K, D))
        m = x.shape[0] if loss in PAIR_LOSSES else other.shape[1]
        gen = torch.Generator(device="cpu").manual_seed(1)
        g = torch.randn(x.shape[0], m, generator=gen).to(device=x.device, dtype=x.dtype)
        return Case(fwd, lambda out: out.backward(g), grads)

    if prov == "_fail":
        def fwd():
            raise RuntimeError("forced failure (test provider _fail)")
        return Case(fwd, _default_backward, grads)

    if prov == "_oom":
        cap = float(point.get("mem_cap_mib") or 256.0)

        def fwd():
            # allocate (and touch) far more than the cap: the harness must record OOM
            nbytes = int((2 * cap + 256) * 2**20)
            blob = torch.ones(nbytes // 4 + 1, dtype=torch.float32, device=x.device)
            return (x.sum() + blob[-1]) * 0
        return Case(fwd, _default_backward, grads)

    if prov == "_sleep":
        def fwd():
            time.sleep(float(point.get("sleep_s", 3600)))
            return x.sum()
        return Case(fwd, _default_backward, grads)

    if prov == "_crash":
        def fwd():
            import os
            import signal

            os.kill(os.getpid(), signal.SIGSEGV)  # a segfaulting kernel
        return Case(fwd, _default_backward, grads)

    raise Unavailable(f"unknown provider {prov!r}")
