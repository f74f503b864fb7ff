"""Loading of the C++ library fused_pairloss._C (ops registered with TORCH_LIBRARY).

FUSED_PAIRLOSS_LIBRARY=/path/to/lib.so loads that file instead (development builds). A missing or
broken library is not an error: the package then offers the `reference` backend (and `triton`).
"""
from __future__ import annotations

import glob
import os
import warnings

import torch

_loaded_path = None
_load_error = None


def load():
    """Load the library once; returns its path or None."""
    global _loaded_path, _load_error
    if _loaded_path is not None or _load_error is not None:
        return _loaded_path
    path = os.environ.get("FUSED_PAIRLOSS_LIBRARY")
    if not path:
        here = os.path.dirname(os.path.abspath(__file__))
        candidates = sorted(glob.glob(os.path.join(here, "_C*.so")) + glob.glob(os.path.join(here, "_C*.pyd")))
        path = candidates[0] if candidates else None
    if path is None:
        _load_error = "fused_pairloss._C was not built (no C++ compiler or torch at install time)"
        return None
    try:
        torch.ops.load_library(path)
        _loaded_path = path
    except (OSError, RuntimeError) as e:  # pragma: no cover - depends on the install
        _load_error = f"could not load {path}: {e}"
        warnings.warn(f"fused_pairloss: {_load_error}; only the reference/triton backends are available", stacklevel=2)
    return _loaded_path


def has_kernel(op_name: str, dispatch_key: str) -> bool:
    if load() is None:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_pairloss::{op_name}", dispatch_key)
    except RuntimeError:
        return False


def build_config() -> dict:
    if load() is None:
        return {}
    raw = torch.ops.fused_pairloss.build_config()
    return dict(kv.split("=", 1) for kv in raw.split(";") if "=" in kv)


def load_error():
    load()
    return _load_error
