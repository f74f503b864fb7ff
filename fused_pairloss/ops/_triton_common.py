"""Helpers shared by the Triton engines (pair engine and class engine).

Python side: is triton importable, is the interpreter on, which dot precision and stat dtype a
dtype gets. Triton side (`@triton.jit`, only defined when triton imports): the similarity tile
S = a_I b_J^T summed over D in fixed chunks, the online log-sum-exp update, and the per-element
"general pair weighting" logit of csrc/common/pair_math.h (`PairLogit`), so every Triton kernel
computes a logit and a similarity element exactly the same way.
"""
from __future__ import annotations

import os

import torch

try:  # the module must import without triton: then nothing Triton-side is defined
    import triton
    import triton.language as tl

    AVAILABLE = True
except Exception:  # ImportError, or a broken triton install
    triton = None
    tl = None
    AVAILABLE = False


def is_interpreter() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return True
    try:  # triton >= 3.4 keeps the setting in knobs (read once at import)
        return bool(triton.knobs.runtime.interpret)
    except Exception:
        return False


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / statistics dtype A of the ops (fp64 for fp64 inputs, else fp32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dot_precision(dtype: torch.dtype) -> str:
    """`input_precision` of the S = q r^T dot: true fp32 products for fp32 unless the user enabled
    TF32 the PyTorch way; for other dtypes Triton's default (it only matters for fp32 operands)."""
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return "tf32"


def grad_dot_precision(dtype: torch.dtype) -> str:
    """`input_precision` of the G @ x gradient dots. Their operands are fp32 (G, and x upcast to
    fp32 for fp16/bf16 inputs, exactly): fp32 inputs follow dot_precision; fp16/bf16 use 3xTF32
    (tensor cores, about fp32 accuracy), so the only low-precision rounding is the final store."""
    if dtype == torch.float32:
        return dot_precision(dtype)
    if dtype == torch.float64:
        return "ieee"
    return "tf32x3"


def block_d(dtype: torch.dtype) -> int:
    """D chunk of the S dot. Fixed per dtype (never autotuned) so that every kernel sums an S
    element in the same order: recomputed S is bitwise identical between forward and backward."""
    if dtype in (torch.float16, torch.bfloat16):
        return 64
    if dtype == torch.float64:
        return 16
    return 32


if AVAILABLE:
    # The interpreter stores bf16 as raw uint16 and its tl.dot multiplies those: upcast (exactly)
    # to fp32 first there. Compiled kernels never take this branch.
    BF16_DOT_UPCAST = tl.constexpr(is_interpreter())

    @triton.jit
    def s_tile(a_ptr, b_ptr, a_idx, b_idx, a_mask, b_mask, D, stride_a, stride_b,
               BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
               PREC: tl.constexpr, ACC_DT: tl.constexpr):
        """S[BLOCK_A, BLOCK_B] = a[a_idx] . b[b_idx] over D (a_idx / b_idx int64 row indices),
        accumulated in ACC_DT chunk by chunk of BLOCK_D. Every kernel calls this with the same
        BLOCK_D and the same orientation, so an element is always summed the same way."""
        acc = tl.zeros([BLOCK_A, BLOCK_B], dtype=ACC_DT)
        a_row = a_ptr + a_idx[:, None] * stride_a
        b_row = b_ptr + b_idx[:, None] * stride_b
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            dm = dd < D
            a = tl.load(a_row + dd[None, :], mask=a_mask[:, None] & dm[None, :], other=0.0)
            b = tl.load(b_row + dd[None, :], mask=b_mask[:, None] & dm[None, :], other=0.0)
            if BF16_DOT_UPCAST:
                if a.dtype == tl.bfloat16:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
            acc = tl.dot(a, tl.trans(b), acc, input_precision=PREC, out_dtype=ACC_DT)
        return acc

    @triton.jit
    def relu_nan(x):
        """relu that keeps NaN (as torch.relu and pair_math.h relu_nan)."""
        return tl.where((x > 0) | (x != x), x, 0.0)

    @triton.jit
    def pair_logit(s, scale, shift, w_a, w_b, WEIGHTED: tl.constexpr):
        """pair_math.h PairLogit: logit = (scale * weight(S)) * (S - shift), weight = relu(w_a +
        w_b S) (detached) or 1; returns (logit, d logit / dS)."""
        if WEIGHTED:
            d = scale * relu_nan(w_a + w_b * s)
        else:
            d = tl.zeros_like(s) + scale
        return d * (s - shift), d

    @triton.jit
    def lse_update(m, l, x, mask):
        """Online LSE over axis 1: fold the masked elements of x[R, C] into the running
        (max m[R], rescaled sum l[R]). Empty rows keep (-inf, 0)."""
        xm = tl.where(mask, x, float("-inf"))
        m_new = tl.maximum(m, tl.max(xm, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_new = l * tl.exp(m - m_safe) + tl.sum(tl.exp(xm - m_safe[:, None]), axis=1)
        return m_new, l_new

    @triton.jit
    def lse_value(m, l):
        """log-sum-exp from (max, sum): -inf for an empty set, NaN stays NaN."""
        return tl.where(l == 0, float("-inf"), m + tl.log(tl.where(l == 0, 1.0, l)))
