"""What is benchmarked: the losses, their inputs, and every provider of each loss.

A *provider* is one way of computing a loss: a fused backend of fused_pairloss ("cpu", "cuda",
"triton"), the materializing "reference" backend, pytorch-metric-learning ("pml"),
torch.compile of the reference ("compile"), or a plain matmul of the same shape ("matmul", the
practical lower bound: self-mode x @ x.T for the pair losses, x @ w.T for the class losses).

`build(point)` returns a `Case`: the inputs plus `forward()` / `backward(out)` closures. It runs
inside the benchmark worker process (bench/measure.py), never in the parent.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from fused_pairloss.losses import REGISTRY


@dataclass(frozen=True)
class BenchLoss:
    """One benchmarked loss: a loss of the table (its class name in fused_pairloss.losses.REGISTRY,
    which gives its kind, functional / reference name, PML's class and defaults, the weight
    parameter's name and layout) with hyper-parameters added to PML's defaults."""
    loss: str
    extra: dict = field(default_factory=dict)
    # a learned beta per class (MarginLoss's num_classes): the input "beta", one per label of the batch
    per_class_beta: bool = False

    @property
    def entry(self):
        return REGISTRY[self.loss]

    @property
    def kind(self) -> str:
        return self.entry.kind

    @property
    def function(self) -> str:
        """The name in fused_pairloss.functional and fused_pairloss.reference."""
        return self.entry.functional_name

    @property
    def params(self) -> dict:
        return dict(self.entry.defaults, **self.extra)

    @property
    def pml(self):
        """PML's class name (None: PML has none)."""
        return self.entry.pml_name

    @property
    def weights_rows(self) -> bool:
        """The weight parameter is (C*K, D) (ProxyAnchor's proxies), else (D, C*K) (PML's fc / W)."""
        return self.entry.weight_layout == "rows"

    @property
    def pooled(self) -> bool:
        """K centers per class (SoftTriple)."""
        return self.entry.pooled


BENCH_LOSSES = {
    "ms": BenchLoss("MultiSimilarityLoss"),
    "ms_mined": BenchLoss("MultiSimilarityLoss", dict(miner_epsilon=0.1)),
    "circle": BenchLoss("CircleLoss"),
    "ntxent": BenchLoss("NTXentLoss"),
    "supcon": BenchLoss("SupConLoss"),
    "contrastive": BenchLoss("ContrastiveLoss"),
    "lifted": BenchLoss("GeneralizedLiftedStructureLoss"),
    "triplet": BenchLoss("TripletMarginLoss"),
    "triplet_swap": BenchLoss("TripletMarginLoss", dict(swap=True)),
    "triplet_smooth": BenchLoss("TripletMarginLoss", dict(smooth_loss=True)),
    "triplet_sampled": BenchLoss("TripletMarginLoss", dict(triplets_per_anchor=8)),
    "margin": BenchLoss("MarginLoss"),
    "margin_per_class": BenchLoss("MarginLoss", dict(learn_beta=True, nu=0.1), per_class_beta=True),
    "lifted_pairs": BenchLoss("LiftedStructureLoss"),
    "tuplet": BenchLoss("TupletMarginLoss"),
    "nca": BenchLoss("NCALoss"),
    "npairs": BenchLoss("NPairsLoss"),
    "instance": BenchLoss("InstanceLoss"),
    "tcm": BenchLoss("ThresholdConsistentMarginLoss"),
    "angular": BenchLoss("AngularLoss"),
    "snr": BenchLoss("SignalToNoiseRatioContrastiveLoss"),
    "ipv": BenchLoss("IntraPairVarianceLoss"),
    "histogram": BenchLoss("HistogramLoss"),
    "fastap": BenchLoss("FastAPLoss"),
    "smoothap": BenchLoss("SmoothAPLoss"),
    "pnp": BenchLoss("PNPLoss"),
    "dsm": BenchLoss("DynamicSoftMarginLoss"),
    "rll": BenchLoss("RankedListLoss"),
    "softtriple": BenchLoss("SoftTripleLoss"),
    "proxycircle": BenchLoss("ProxyCircleLoss"),
    "proxyanchor": BenchLoss("ProxyAnchorLoss"),
    "normsoftmax": BenchLoss("NormalizedSoftmaxLoss"),
    "cosface": BenchLoss("CosFaceLoss"),
    "arcface": BenchLoss("ArcFaceLoss"),
    "subcenter_arcface": BenchLoss("SubCenterArcFaceLoss"),
    "lmsoftmax": BenchLoss("LargeMarginSoftmaxLoss"),
    "sphereface": BenchLoss("SphereFaceLoss"),
    "proxynca": BenchLoss("ProxyNCALoss"),
    "p2sgrad": BenchLoss("P2SGradLoss"),
}
PAIR_LOSSES = tuple(n for n, b in BENCH_LOSSES.items() if b.kind == "pair")
CLASS_LOSSES = tuple(n for n, b in BENCH_LOSSES.items() if b.kind == "class")
LOSSES = PAIR_LOSSES + CLASS_LOSSES
# the default sweep (`--loss` chooses any of LOSSES)
DEFAULT_LOSSES = ("ms", "ms_mined", "circle", "ntxent", "supcon", "contrastive", "softtriple", "proxycircle")

FUSED_BACKENDS = ("cpu", "cuda", "triton")
BASE_PROVIDERS = ("reference", "pml", "compile", "matmul")
# Providers that exist only to test the harness: never listed by default.
TEST_PROVIDERS = ("_fail", "_oom", "_sleep", "_crash")
ALL_PROVIDERS = FUSED_BACKENDS + BASE_PROVIDERS + TEST_PROVIDERS

# Loss hyper-parameters (kept as a name for the harness' reports)
LOSS_PARAMS = {name: b.params for name, b in BENCH_LOSSES.items()}

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
    if BENCH_LOSSES[loss].pooled:
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
        per_class = max(1, int(point.get("samples_per_class", 4)))
        n_classes = max(2, n // per_class)
        if BENCH_LOSSES[loss].entry.equal_label_counts:  # class by class, equal counts (SmoothAP)
            per_class = next(k for k in range(per_class, 0, -1) if n % k == 0)
            inputs["labels"] = torch.arange(n // per_class).repeat_interleave(per_class).to(dev)
        else:
            inputs["labels"] = torch.randint(0, n_classes, (n,), generator=gen).to(dev)
        if BENCH_LOSSES[loss].per_class_beta:
            beta = 1.2 + 0.1 * torch.randn(n_classes, generator=gen)
            inputs["beta"] = torch.nn.Parameter(beta.to(device=dev, dtype=dtype))
    else:
        c, k = class_shape(loss, n, point.get("ck_scale", 1.0), point.get("centers_per_class", 10))
        shape = (c * k, d) if BENCH_LOSSES[loss].weights_rows else (d, c * k)
        w = torch.randn(*shape, generator=gen)
        if BENCH_LOSSES[loss].entry.unit_weights:  # the functional form takes unit vectors only (P2SGrad)
            w = w / w.norm(dim=1 if BENCH_LOSSES[loss].weights_rows else 0, keepdim=True)
        w = w.to(device=dev, dtype=dtype)
        inputs["centers"] = torch.nn.Parameter(w)  # the loss's weight, in PML's layout
        inputs["labels"] = torch.randint(0, c, (n,), generator=gen).to(dev)
        inputs["C"], inputs["K"] = c, k
    return inputs


def _default_backward(out):
    out.backward()


def _call(fn, loss, inp, extra):
    """A closure calling a functional-style loss function (fused_pairloss.functional, .reference
    or a compiled reference: same signatures) on the point's inputs."""
    b = BENCH_LOSSES[loss]
    kw = dict(b.params, **extra)
    x, y = inp["x"], inp["labels"]
    if "beta" in inp:
        kw["beta"] = inp["beta"]
    if b.kind == "pair":
        return lambda: fn(x, y, **kw)
    if b.pooled:
        kw[b.entry.centers_name] = inp["K"]
    return lambda: fn(x, y, inp["centers"], **kw)


def _functional_call(mod, loss, inp, extra):
    return _call(getattr(mod, BENCH_LOSSES[loss].function), loss, inp, extra)


_COMPILED = {}  # function name -> compiled reference function (reused across N within one worker)


def _compiled_reference(loss):
    import torch
    import fused_pairloss.reference as R

    key = BENCH_LOSSES[loss].function
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(getattr(R, key))
    return _COMPILED[key]


def _pml_case(loss, inp):
    try:
        from pytorch_metric_learning import losses, miners
    except ImportError as e:
        raise Unavailable(f"pytorch-metric-learning is not installed: {e}") from e

    b = BENCH_LOSSES[loss]
    if b.pml is None:
        raise Unavailable(f"pytorch-metric-learning has no {loss} loss")
    x, y = inp["x"], inp["labels"]
    p = {k: v for k, v in b.params.items() if k != "miner_epsilon"}
    if b.kind == "pair":
        fn = getattr(losses, b.pml)(**p, **({"num_classes": inp["beta"].numel()} if "beta" in inp else {}))
        if "beta" in inp:
            fn.beta = inp["beta"]  # our beta, as the module's parameter
        if "miner_epsilon" in b.params:
            miner = miners.MultiSimilarityMiner(epsilon=b.params["miner_epsilon"])
            return lambda: fn(x, y, miner(x, y))
        return lambda: fn(x, y)
    if b.pooled:
        p[b.entry.centers_name] = inp["K"]
    fn = getattr(losses, b.pml)(**b.entry.size_kwargs(inp["C"], x.shape[1]), **p)
    # our weight tensor, in the same layout, as the module's parameter
    setattr(fn, b.entry.weight_name, inp["centers"])
    return lambda: fn(x, y)


def build(point) -> Case:
    import torch

    loss, prov = point["loss"], point["provider"]
    inp = make_inputs(point)
    x = inp["x"]
    grads = [x] + ([inp["centers"]] if "centers" in inp else [])
    if "beta" in inp and prov != "matmul":  # a learned per-class beta (the matmul baseline has none)
        grads.append(inp["beta"])

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
        return Case(_call(_compiled_reference(loss), loss, inp, {}), _default_backward, grads)

    if prov == "pml":
        return Case(_pml_case(loss, inp), _default_backward, grads)

    if prov == "matmul":
        if loss in PAIR_LOSSES:
            fwd, m = (lambda: x @ x.t()), x.shape[0]  # noqa: E731
        else:  # x @ w.T with w the (C*K, D) centers
            w = inp["centers"]
            wt = w.t() if BENCH_LOSSES[loss].weights_rows else w
            fwd, m = (lambda: x @ wt), wt.shape[1]  # noqa: E731
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
