"""The ops' operands as every backend and the oracle read them: the statistics dtype and the class
weights in the layout a declaration gives them (ops/README.md)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import spec as S


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / statistics dtype of the ops: fp64 for fp64 inputs, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def weight_count(w, flags) -> int:
    """C*K, the number of weight vectors of w as the declaration lays it out."""
    return w.shape[1] if flags & S.WEIGHTS_COLUMNS else w.shape[0]


def weight_rows(w, flags):
    """w as plain rows (C*K, D), normalized where the declaration says so: what the flags
    S.WEIGHT_OPERAND_FLAGS describe, in differentiable PyTorch (the oracle, and the registrar for
    engines that take plain rows)."""
    rows = w.t() if flags & S.WEIGHTS_COLUMNS else w
    return F.normalize(rows, p=2, dim=1) if flags & S.NORMALIZE_WEIGHTS else rows
