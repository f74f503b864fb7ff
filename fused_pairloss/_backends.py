"""Backend selection: which implementations exist for a device, and what "auto" means."""
from __future__ import annotations

import functools
import importlib
import os

import torch

from . import _extension

BACKENDS = ("reference", "cpu", "triton", "cuda")
# "auto" preference per device type: the fused backends first (fastest first), reference last.
_AUTO_ORDER = {"cpu": ("cpu",), "cuda": ("triton", "cuda")}


@functools.lru_cache(maxsize=None)
def _triton_version():
    try:
        import triton  # noqa: F401

        return triton.__version__
    except Exception:  # ImportError, or a broken install
        return None


@functools.lru_cache(maxsize=None)
def _triton_modules_ok() -> bool:
    if _triton_version() is None:
        return False
    try:
        mod = importlib.import_module("fused_pairloss.ops.triton_engines")
    except ImportError:
        return False
    return bool(getattr(mod, "AVAILABLE", False))


@functools.lru_cache(maxsize=None)  # fixed once the library is loaded; asked on every eager call
def _cpp_backend_built(dispatch_key: str) -> bool:
    """Both engines have kernels for this dispatch key in the loaded library."""
    return all(_extension.has_kernel(op, dispatch_key)
               for op in ("pair_engine_forward", "pair_engine_backward",
                          "class_engine_forward", "class_engine_backward"))


def _device_type(device) -> str:
    if isinstance(device, torch.Tensor):
        device = device.device
    return torch.device(device).type


def available_backends(device="cpu") -> list:
    """Backends that can run on `device` here (subset of reference, cpu, triton, cuda)."""
    dev = _device_type(device)
    out = ["reference"]
    if dev == "cpu" and _cpp_backend_built("CPU"):
        out.append("cpu")
    if _triton_modules_ok():
        if (dev == "cuda" and torch.cuda.is_available()) or (
            dev == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
        ):
            out.append("triton")
    if dev == "cuda" and torch.cuda.is_available() and _cpp_backend_built("CUDA"):
        out.append("cuda")
    return out


def check_backend_name(backend):
    """A module's `backend` when it is set (its availability on the inputs' device is checked at the
    call): 'auto' or one of BACKENDS."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, one of {('auto',) + BACKENDS}; got {type(backend).__name__}")
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {list(BACKENDS)}; got {backend!r}")
    return backend


def _assume_constant_result(fn):
    # Backend choice depends only on (backend, device) and the install: under torch.compile it is
    # evaluated once at trace time and baked in as a constant (no graph break).
    try:
        return torch.compiler.assume_constant_result(fn)
    except AttributeError:  # pragma: no cover - very old torch
        return fn


@_assume_constant_result
def resolve_backend(backend, device) -> str:
    """Validate `backend` for tensors on `device`; "auto" -> fastest fused backend, else reference."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, one of {('auto',) + BACKENDS}; got {type(backend).__name__}")
    dev = _device_type(device)
    avail = available_backends(device)
    if backend == "auto":
        for name in _AUTO_ORDER.get(dev, ()):
            if name in avail:
                return name
        return "reference"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {list(BACKENDS)}; got {backend!r}")
    if backend not in avail:
        why = ""
        if backend == "cpu" and dev != "cpu":
            why = " (the 'cpu' backend runs on CPU tensors only)"
        elif backend == "cuda" and dev != "cuda":
            why = " (the 'cuda' backend runs on CUDA tensors only)"
        elif backend in ("cpu", "cuda") and _extension.load_error():
            why = f" ({_extension.load_error()})"
        elif backend == "triton" and dev == "cpu":
            why = (" (on CPU tensors Triton runs only through its interpreter: set TRITON_INTERPRET=1 before "
                   "importing triton)")
        elif backend == "triton":
            why = " (triton is not installed)" if _triton_version() is None else ""
        raise ValueError(
            f"backend {backend!r} is not available for {dev} tensors{why}; available: {avail}"
        )
    return backend


def build_info() -> dict:
    """What this install was built with and can run."""
    from ._version import __version__

    cfg = _extension.build_config()
    record = _extension.build_record() or {}
    return {
        "version": __version__,
        "cpu": _cpp_backend_built("CPU"),
        "cuda": _cpp_backend_built("CUDA"),
        "cuda_arch_list": cfg.get("cuda_arch_list", "") or None,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _triton_version(),
        "library": _extension.load(),
        "library_error": _extension.load_error(),
        # what the library was built with (setup.py's record beside it; None: no record)
        "built_with_torch": record.get("torch"),
        "built_with_torch_cuda": record.get("torch_cuda"),
        "built_cuda_arch_list": record.get("cuda_arch_list") or None,
    }
