"""GPU kernels of the cubic ranking losses' sigmoids (Triton): the CUDA implementations of the ops
`fused_pairloss::smooth_ap_chunk_ranks / _grad` and `pnp_chunk_ranks / _grad`, whose CPU kernels
are csrc/cpu/rank_rows_cpu.cpp (same schemas and semantics; that file's header states them).

The losses' ops (losses/smooth_ap.py, losses/pnp.py) compute a chunk of rows of S with a GEMM and
hand it to these kernels, so a chunk's b N (SmoothAP) or P N (PNP) sigmoids per row are never
stored: a program owns a row of the chunk and a block of its p's (ranks) or a tile of its columns
(gradient) and recomputes the sigmoids it needs.
- SmoothAP ranks: per (row a, p) R = 1 + sum_{j != p} sig, P = 1 + the same over a's block, sig =
  1 / (1 + exp((S_ap - S_aj) / t)); AP_a = (1 / b) sum_p P / R on the host (c x b numbers).
- SmoothAP gradient: the ranks pass also gives per p the sums of sig (1 - sig) over all columns and
  over the block; the host turns them into each p's weights dL/dR_p, dL/dP_p (rank_rows_cpu.cpp);
  the gradient kernel adds w_pj = sig (1 - sig) (dL/dR_p + [j in block] dL/dP_p) / t over p into
  G_aj, and the host takes each p's total sum_j w_pj from G_{a, b0 + p} (a scatter of c x b).
- PNP: the same with a's listed positive columns p (-1: none) and its negatives j, PML's sigmoid
  of the clamped exponent, the clamp's pass mask in the gradient.
Every program owns its outputs (no atomics; deterministic). Sums run in the rows' dtype (fp32 /
fp64), in tile order: a rounding apart from the CPU kernels' lane order.

Used on CUDA tensors by both GPU backends ("triton" and "cuda"): there is no CUDA C++ version.
Under the Triton interpreter (tests) the host functions run on CPU tensors and are called directly.
"""
from __future__ import annotations

import torch

try:  # the module imports without triton: then AVAILABLE stays False
    import triton
    import triton.language as tl

    _IMPORTED = True
except Exception:  # ImportError, or a broken triton install
    triton = None
    tl = None
    _IMPORTED = False

AVAILABLE = False

__all__ = ["AVAILABLE", "smooth_ap_chunk_ranks", "smooth_ap_chunk_grad", "pnp_chunk_ranks", "pnp_chunk_grad"]


def _check_rows(op, S, first_row, scale_name, scale):
    """rank_rows_cpu.cpp check_rows_of_S: a contiguous chunk of rows [first_row, first_row + c) of
    an N-column S (fp32 / fp64) and a positive scale whose inverse is finite in S's dtype."""
    if S.dim() != 2 or not S.is_contiguous() or S.dtype not in (torch.float32, torch.float64):
        raise RuntimeError(f"{op}: S must be a contiguous 2-D float32 or float64 tensor (a chunk of rows of S)")
    c, n = S.shape
    if not (first_row >= 0 and first_row + c <= n):
        raise RuntimeError(f"{op}: rows [{first_row}, {first_row + c}) are not rows of a batch of {n}")
    if not scale > 0:
        raise RuntimeError(f"{op}: {scale_name} must be > 0; got {scale}")
    inv = torch.tensor(1.0 / scale, dtype=S.dtype)
    if not bool(torch.isfinite(inv)):
        raise RuntimeError(f"{op}: 1 / {scale_name} must be finite in S's dtype; got {scale_name} {scale}")


def _check_chunk(op, S, first_row, block, temperature):
    _check_rows(op, S, first_row, "temperature", temperature)
    n = S.shape[1]
    if not (block >= 1 and n % block == 0):
        raise RuntimeError(f"{op}: block must divide the number of columns ({n}); got {block}")


def _check_pnp(op, S, class_ids, positives, first_row, anneal):
    _check_rows(op, S, first_row, "anneal", anneal)
    c, n = S.shape
    if class_ids.shape != (n,) or class_ids.dtype != S.dtype or class_ids.device != S.device:
        raise RuntimeError(f"{op}: class_ids must be a vector of S's columns, dtype and device")
    if positives.dim() != 2 or positives.shape[0] != c or positives.dtype != torch.int64 \
            or positives.device != S.device:
        raise RuntimeError(f"{op}: positives must be an int64 tensor with a row per row of S, on S's device")
    if positives.numel() and not bool(((positives >= -1) & (positives < n)).all()):
        raise RuntimeError(f"{op}: positives must be columns of S or -1")


if _IMPORTED:
    _BLOCK_J = 64  # columns per tile (both kernels' walks)
    _BLOCK_P = 32  # p's (SmoothAP) or positives (PNP) per program of the ranks kernels / per step of the
    # gradient kernels

    @triton.jit
    def _smooth_ap_ranks_kernel(s_ptr, out_ptr, N, first_row, block, k_inv_t: tl.float64,
                                DERIV: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_J: tl.constexpr):
        """Program (row i, p block): out[i, p] = (R, P[, sum sig (1 - sig), its block part]) for the
        p's of the block (columns b0 + p), over the columns j != b0 + p."""
        ACC: tl.constexpr = s_ptr.dtype.element_ty
        inv_t = tl.full([], k_inv_t, ACC)  # rounded once to S's dtype by the host already
        i = tl.program_id(0).to(tl.int64)
        p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
        p_ok = p < block
        a = first_row + i
        b0 = a - a % block
        col_p = b0 + p
        row = s_ptr + i * N
        sp = tl.load(row + col_p, mask=p_ok, other=0.0)
        total = tl.zeros([BLOCK_P], ACC)
        in_block = tl.zeros([BLOCK_P], ACC)
        d_total = tl.zeros([BLOCK_P], ACC)
        d_block = tl.zeros([BLOCK_P], ACC)
        for j0 in range(0, N, BLOCK_J):
            j = j0 + tl.arange(0, BLOCK_J).to(tl.int64)
            j_ok = j < N
            sj = tl.load(row + j, mask=j_ok, other=0.0)
            on = p_ok[:, None] & j_ok[None, :] & (j[None, :] != col_p[:, None])
            sig = tl.where(on, 1.0 / (1.0 + tl.exp((sp[:, None] - sj[None, :]) * inv_t)), 0.0)
            blk = ((j >= b0) & (j < b0 + block))[None, :]
            total += tl.sum(sig, axis=1)
            in_block += tl.sum(tl.where(blk, sig, 0.0), axis=1)
            if DERIV:
                ds = sig * (1.0 - sig)
                d_total += tl.sum(ds, axis=1)
                d_block += tl.sum(tl.where(blk, ds, 0.0), axis=1)
        out = out_ptr + (i * block + p) * 4
        tl.store(out, 1.0 + total, mask=p_ok)
        tl.store(out + 1, 1.0 + in_block, mask=p_ok)
        if DERIV:
            tl.store(out + 2, d_total, mask=p_ok)
            tl.store(out + 3, d_block, mask=p_ok)

    @triton.jit
    def _smooth_ap_grad_kernel(s_ptr, coef_ptr, g_ptr, N, first_row, block, k_inv_t: tl.float64,
                               BLOCK_P: tl.constexpr, BLOCK_J: tl.constexpr):
        """Program (row i, column tile): G[i, j] = sum_p sig (1 - sig) coef_p(j), j != b0 + p, with
        coef_p(j) = coef[i, p, 1] in the block, coef[i, p, 0] outside (dL/dR_p / t, (dL/dR_p +
        dL/dP_p) / t)."""
        ACC: tl.constexpr = s_ptr.dtype.element_ty
        inv_t = tl.full([], k_inv_t, ACC)
        i = tl.program_id(0).to(tl.int64)
        j = tl.program_id(1).to(tl.int64) * BLOCK_J + tl.arange(0, BLOCK_J)
        j_ok = j < N
        a = first_row + i
        b0 = a - a % block
        row = s_ptr + i * N
        sj = tl.load(row + j, mask=j_ok, other=0.0)
        blk = ((j >= b0) & (j < b0 + block))[None, :]
        acc = tl.zeros([BLOCK_J], ACC)
        for p0 in range(0, block, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            p_ok = p < block
            col_p = b0 + p
            sp = tl.load(row + col_p, mask=p_ok, other=0.0)
            c_out = tl.load(coef_ptr + (i * block + p) * 2, mask=p_ok, other=0.0)
            c_in = tl.load(coef_ptr + (i * block + p) * 2 + 1, mask=p_ok, other=0.0)
            on = p_ok[:, None] & j_ok[None, :] & (j[None, :] != col_p[:, None])
            sig = 1.0 / (1.0 + tl.exp((sp[:, None] - sj[None, :]) * inv_t))
            w = tl.where(on, sig * (1.0 - sig) * tl.where(blk, c_in[:, None], c_out[:, None]), 0.0)
            acc += tl.sum(w, axis=0)
        tl.store(g_ptr + i * N + j, acc, mask=j_ok)

    @triton.jit
    def _clamp_keep_nan(e):
        """PML's clamp of PNP's exponent to [-50, 50]; NaN stays NaN (as the CPU kernels' compares)."""
        return tl.where(e != e, e, tl.minimum(tl.maximum(e, -50.0), 50.0))

    @triton.jit
    def _pnp_ranks_kernel(s_ptr, ids_ptr, pos_ptr, out_ptr, N, P, first_row, k_inv_a: tl.float64,
                          DERIV: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_J: tl.constexpr):
        """Program (row i, block of its positives k): out[i, k] = (rk[, sum sig (1 - sig) pass]) over
        the negatives j (ids_j != the row's id) of sig = 1 / (1 + exp(clamp((S_ap - S_aj) / anneal,
        -50, 50))), pass = the clamp passes its gradient; 0 where pos = -1."""
        ACC: tl.constexpr = s_ptr.dtype.element_ty
        inv_a = tl.full([], k_inv_a, ACC)
        i = tl.program_id(0).to(tl.int64)
        k = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
        k_ok = k < P
        pos = tl.load(pos_ptr + i * P + k, mask=k_ok, other=-1)
        p_ok = pos >= 0
        row = s_ptr + i * N
        own = tl.load(ids_ptr + first_row + i)
        sp = tl.load(row + pos, mask=p_ok, other=0.0)
        rk = tl.zeros([BLOCK_P], ACC)
        d_rk = tl.zeros([BLOCK_P], ACC)
        for j0 in range(0, N, BLOCK_J):
            j = j0 + tl.arange(0, BLOCK_J).to(tl.int64)
            j_ok = j < N
            sj = tl.load(row + j, mask=j_ok, other=0.0)
            neg = j_ok & (tl.load(ids_ptr + j, mask=j_ok, other=0.0) != own)
            on = p_ok[:, None] & neg[None, :]
            e = (sp[:, None] - sj[None, :]) * inv_a
            sig = tl.where(on, 1.0 / (1.0 + tl.exp(_clamp_keep_nan(e))), 0.0)
            rk += tl.sum(sig, axis=1)
            if DERIV:
                passes = on & (e >= -50.0) & (e <= 50.0)
                d_rk += tl.sum(tl.where(passes, sig * (1.0 - sig), 0.0), axis=1)
        out = out_ptr + (i * P + k) * 2
        tl.store(out, rk, mask=k_ok)
        if DERIV:
            tl.store(out + 1, d_rk, mask=k_ok)

    @triton.jit
    def _pnp_grad_kernel(s_ptr, ids_ptr, pos_ptr, coef_ptr, g_ptr, N, P, first_row, k_inv_a: tl.float64,
                         BLOCK_P: tl.constexpr, BLOCK_J: tl.constexpr):
        """Program (row i, column tile): G[i, j] = sum_k coef[i, k] sig (1 - sig) over the row's
        positives k, for the negatives j where the clamp passes (coef = g_ap / anneal)."""
        ACC: tl.constexpr = s_ptr.dtype.element_ty
        inv_a = tl.full([], k_inv_a, ACC)
        i = tl.program_id(0).to(tl.int64)
        j = tl.program_id(1).to(tl.int64) * BLOCK_J + tl.arange(0, BLOCK_J)
        j_ok = j < N
        row = s_ptr + i * N
        own = tl.load(ids_ptr + first_row + i)
        sj = tl.load(row + j, mask=j_ok, other=0.0)
        neg = j_ok & (tl.load(ids_ptr + j, mask=j_ok, other=0.0) != own)
        acc = tl.zeros([BLOCK_J], ACC)
        for k0 in range(0, P, BLOCK_P):
            k = k0 + tl.arange(0, BLOCK_P)
            k_ok = k < P
            pos = tl.load(pos_ptr + i * P + k, mask=k_ok, other=-1)
            p_ok = pos >= 0
            sp = tl.load(row + pos, mask=p_ok, other=0.0)
            coef = tl.load(coef_ptr + i * P + k, mask=k_ok, other=0.0)
            e = (sp[:, None] - sj[None, :]) * inv_a
            passes = p_ok[:, None] & neg[None, :] & (e >= -50.0) & (e <= 50.0)
            sig = 1.0 / (1.0 + tl.exp(_clamp_keep_nan(e)))
            acc += tl.sum(tl.where(passes, coef[:, None] * (sig * (1.0 - sig)), 0.0), axis=0)
        tl.store(g_ptr + i * N + j, acc, mask=j_ok)

    def _inv(scale, dtype):
        """1 / scale rounded once to S's dtype (as the CPU kernels' T(1.0 / scale))."""
        return float(torch.tensor(1.0 / scale, dtype=dtype))

    def _smooth_ap_ranks(S, first_row, block, temperature, deriv):
        c, n = S.shape
        out = torch.empty((c, block, 4), dtype=S.dtype, device=S.device)
        if c:
            _smooth_ap_ranks_kernel[(c, triton.cdiv(block, _BLOCK_P))](
                S, out, n, first_row, block, _inv(temperature, S.dtype), DERIV=deriv, BLOCK_P=_BLOCK_P,
                BLOCK_J=_BLOCK_J)
        return out

    def smooth_ap_chunk_ranks(S, first_row, block, temperature):
        """AP of each row of the chunk (rank_rows_cpu.cpp)."""
        _check_chunk("smooth_ap_chunk_ranks", S, first_row, block, temperature)
        r = _smooth_ap_ranks(S, first_row, block, temperature, False)
        return (r[:, :, 1] / r[:, :, 0]).sum(1) / block

    def smooth_ap_chunk_grad(S, grad_ap, first_row, block, temperature):
        """G = d(sum_a grad_ap[a] AP_a) / dS of the chunk's rows (rank_rows_cpu.cpp)."""
        _check_chunk("smooth_ap_chunk_grad", S, first_row, block, temperature)
        if grad_ap.shape != (S.shape[0],) or grad_ap.dtype != S.dtype or grad_ap.device != S.device:
            raise RuntimeError("smooth_ap_chunk_grad: grad_ap must be a vector of S's rows, dtype and device")
        c, n = S.shape
        G = torch.empty_like(S)
        if c == 0:
            return G
        r = _smooth_ap_ranks(S, first_row, block, temperature, True)
        R, Pb, d_all, d_blk = r.unbind(2)
        inv_t = _inv(temperature, S.dtype)
        g = (grad_ap / block)[:, None]
        d_block_rank = g / R
        d_rank = -g * Pb / (R * R)
        c_out, c_in = d_rank * inv_t, (d_rank + d_block_rank) * inv_t
        coef = torch.stack([c_out, c_in], 2).contiguous()
        _smooth_ap_grad_kernel[(c, triton.cdiv(n, _BLOCK_J))](S, coef, G, n, first_row, block, inv_t,
                                                              BLOCK_P=_BLOCK_P, BLOCK_J=_BLOCK_J)
        # each p's total: out over the columns outside the block, in inside it
        totals = c_out * (d_all - d_blk) + c_in * d_blk
        rows = torch.arange(first_row, first_row + c, device=S.device)
        block_cols = (rows - rows % block)[:, None] + torch.arange(block, device=S.device)[None, :]
        return G.scatter_add_(1, block_cols, -totals)

    def _pnp_ranks(S, class_ids, positives, first_row, anneal, deriv):
        c, n = S.shape
        P = positives.shape[1]
        out = torch.zeros((c, P, 2), dtype=S.dtype, device=S.device)
        if c and P:
            _pnp_ranks_kernel[(c, triton.cdiv(P, _BLOCK_P))](
                S, class_ids.contiguous(), positives.contiguous(), out, n, P, first_row, _inv(anneal, S.dtype),
                DERIV=deriv, BLOCK_P=_BLOCK_P, BLOCK_J=_BLOCK_J)
        return out

    def pnp_chunk_ranks(S, class_ids, positives, first_row, anneal):
        """rk of each listed positive of the chunk's rows (rank_rows_cpu.cpp)."""
        _check_pnp("pnp_chunk_ranks", S, class_ids, positives, first_row, anneal)
        return _pnp_ranks(S, class_ids, positives, first_row, anneal, False)[:, :, 0].contiguous()

    def pnp_chunk_grad(S, class_ids, positives, grad_rk, first_row, anneal):
        """G = d(sum grad_rk rk) / dS of the chunk's rows (rank_rows_cpu.cpp)."""
        _check_pnp("pnp_chunk_grad", S, class_ids, positives, first_row, anneal)
        if grad_rk.shape != positives.shape or grad_rk.dtype != S.dtype or grad_rk.device != S.device:
            raise RuntimeError("pnp_chunk_grad: grad_rk must have positives' shape and S's dtype and device")
        c, n = S.shape
        P = positives.shape[1]
        G = torch.zeros_like(S)
        if c == 0 or P == 0:
            return G
        inv_a = _inv(anneal, S.dtype)
        coef = torch.where(positives >= 0, grad_rk * inv_a, torch.zeros_like(grad_rk)).contiguous()
        d_rk = _pnp_ranks(S, class_ids, positives, first_row, anneal, True)[:, :, 1]
        _pnp_grad_kernel[(c, triton.cdiv(n, _BLOCK_J))](S, class_ids.contiguous(), positives.contiguous(), coef, G,
                                                        n, P, first_row, inv_a, BLOCK_P=_BLOCK_P, BLOCK_J=_BLOCK_J)
        valid = positives >= 0
        return G.scatter_add_(1, torch.where(valid, positives, 0), torch.where(valid, -coef * d_rk, 0.0))

    def _register():
        """The ops' CUDA kernels (the ops are the compiled library's; without it nothing to register)."""
        from .. import _extension

        if _extension.load() is None:
            return False
        kernels = {"smooth_ap_chunk_ranks": smooth_ap_chunk_ranks, "smooth_ap_chunk_grad": smooth_ap_chunk_grad,
                   "pnp_chunk_ranks": pnp_chunk_ranks, "pnp_chunk_grad": pnp_chunk_grad}
        for name, fn in kernels.items():
            if not _extension.has_kernel(name, "CUDA"):
                torch.library.register_kernel(f"fused_pairloss::{name}", "cuda", fn)
        return True

    AVAILABLE = _register()
