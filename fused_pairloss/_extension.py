"""Loading of the C++ library fused_pairloss._C (ops registered with TORCH_LIBRARY).

FUSED_PAIRLOSS_LIBRARY=/path/to/lib.so loads that file instead (development builds). A missing or
broken library is not an error: the package then offers the `reference` backend (and `triton`).

The library is compiled against one torch minor (libtorch has no stable C++ ABI across minors), and
setup.py writes what it was built with into _C_build.json beside it. That record is compared with
the running torch BEFORE torch.ops.load_library, so a wheel on the wrong torch gives one clear
warning (and the reference/Triton backends) instead of an undefined-symbol error or a crash.
FUSED_PAIRLOSS_IGNORE_TORCH_VERSION=1 loads it anyway (for experiments).
"""
from __future__ import annotations

import glob
import json
import os
import re
import warnings

import torch

BUILD_RECORD = "_C_build.json"  # written by setup.py (BuildExt) beside the library

_loaded_path = None
_load_error = None
_record = None


def _minor(version):
    """'2.14.1+cu130' -> (2, 14)"""
    m = re.match(r"(\d+)\.(\d+)", version or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def _read_record(path):
    rec = os.path.join(os.path.dirname(path), BUILD_RECORD)
    try:
        with open(rec) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None  # a development build without a record: nothing to check against


def torch_mismatch(record, torch_version=None, torch_cuda=None):
    """Why a library built as `record` cannot load into this torch, or None when it can."""
    if not record:
        return None
    here = torch.__version__ if torch_version is None else torch_version
    here_cuda = torch.version.cuda if torch_version is None else torch_cuda
    built = record.get("torch")
    fix = ("; the 'reference' and 'triton' backends work. Install the fused_pairloss wheel built "
           "for this torch, or build it from source against this torch (`pip install "
           "--no-build-isolation fused_pairloss-<version>.tar.gz`, or `.` in a checkout)")
    if _minor(built) != _minor(here):
        return (f"its C++/CUDA kernels were built for torch {built} and need torch "
                f"{'.'.join(map(str, _minor(built) or ()))}.x; this is torch {here}" + fix)
    if record.get("cuda"):
        if here_cuda is None:
            return (f"its library has CUDA kernels (built with torch {built}, CUDA "
                    f"{record.get('torch_cuda')}) and needs a CUDA build of torch; this torch "
                    f"{here} is a CPU-only build" + fix)
        if str(record.get("torch_cuda", "")).split(".")[0] != str(here_cuda).split(".")[0]:
            return (f"its CUDA kernels were built with CUDA {record.get('torch_cuda')} (torch "
                    f"{built}); this torch {here} uses CUDA {here_cuda}" + fix)
    return None


def load():
    """Load the library once; returns its path or None."""
    global _loaded_path, _load_error, _record
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
    _record = _read_record(path)
    why = torch_mismatch(_record)
    if why and os.environ.get("FUSED_PAIRLOSS_IGNORE_TORCH_VERSION", "0") != "1":
        _load_error = f"{path} not loaded: {why}"
        warnings.warn(f"fused_pairloss: the fused 'cpu'/'cuda' backends are off: {why}", stacklevel=3)
        return None
    try:
        torch.ops.load_library(path)
        _loaded_path = path
    except (OSError, RuntimeError) as e:  # pragma: no cover - depends on the install
        _load_error = f"could not load {path}: {e}"
        warnings.warn(f"fused_pairloss: {_load_error}; only the reference/triton backends are available", stacklevel=2)
        return None
    _warn_on_unknown_isa_cap()
    return _loaded_path


CPU_ISA_CAPS = ("base", "avx2", "avx512")


def _warn_on_unknown_isa_cap():
    """The library reads FPL_CPU_ISA when it loads and ignores a value it does not know; say so."""
    cap = os.environ.get("FPL_CPU_ISA")
    if cap is not None and cap not in CPU_ISA_CAPS:
        warnings.warn(f"fused_pairloss: FPL_CPU_ISA={cap!r} is not one of {', '.join(CPU_ISA_CAPS)} and is ignored; "
                      f"the CPU engines run {torch.ops.fused_pairloss.cpu_isa()}", stacklevel=3)


def build_record():
    """What the library was built with (setup.py's record beside it), or None (no record)."""
    load()
    return dict(_record) if _record else None


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
