"""Triton pair engine (backend "triton"): ops `fused_pairloss::triton_pair_engine_forward/backward`.

Same schemas and semantics as the C++ `pair_engine_forward/backward` (ops/README.md). The loss is a
plug-in: `kind` only selects the constants of the two logits (pair_math.h `make_pair_loss`) and
whether they carry Circle's detached weight; one set of kernels serves every pair loss.

Kernels (FlashAttention pattern, S = q r^T never stored):
- forward: a program owns BLOCK_M rows and walks the column tiles; each S tile is summed over D in
  fixed BLOCK_D chunks (`s_tile`), label masks come from the two label vectors, and per row an
  online LSE (running max + rescaled sum) is kept for the positive and the negative set, with the
  set sizes. With mining, a first walk computes min_pos / max_neg per row, then the LSE walk.
- backward, row pass: a program owns BLOCK_M rows and one BLOCK_DO slice of D and accumulates
  grad_q[I] += G_IJ r_J. Self mode (r None) uses S's symmetry: the same recomputed tile S_IJ gives
  G_IJ from row I's statistics and G_JI from row J's, so grad_q = (G + G^T) q is one deterministic
  pass without atomics. Ref mode adds a column pass (program owns columns J) for grad_r.
- every kernel computes an S element with the same `s_tile` call (same BLOCK_D, same orientation:
  q rows first), and autotuning only varies BLOCK_M / BLOCK_N / warps / stages, so the mining masks
  of the backward are those of the forward.

Precision: fp32 uses true fp32 dots unless torch.backends.cuda.matmul.allow_tf32; fp16/bf16 use
tensor cores with fp32 accumulation; statistics in fp32 (fp64 for fp64 inputs).
Without a GPU, set TRITON_INTERPRET=1 before importing triton to run on CPU tensors.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _kinds
from ._triton_common import AVAILABLE as _TRITON_IMPORTS

__all__ = ["AVAILABLE", "forward_op", "backward_op"]

AVAILABLE = False
forward_op = None
backward_op = None

# Schemas: exactly those of csrc/ops.cpp (names differ: triton_ prefix).
FORWARD_SCHEMA = (
    "(Tensor q, Tensor? r, Tensor labels_q, Tensor? labels_r, bool exclude_diag, int kind, "
    "float p0, float p1, float p2, bool mine, float miner_eps) -> (Tensor lse_pos, Tensor lse_neg, "
    "Tensor count_pos, Tensor count_neg, Tensor min_pos, Tensor max_neg)")
BACKWARD_SCHEMA = (
    "(Tensor grad_lse_pos, Tensor grad_lse_neg, Tensor q, Tensor? r, Tensor labels_q, "
    "Tensor? labels_r, Tensor lse_pos, Tensor lse_neg, Tensor min_pos, Tensor max_neg, "
    "bool exclude_diag, int kind, float p0, float p1, float p2, bool mine, float miner_eps) "
    "-> (Tensor grad_q, Tensor grad_r)")


def _pair_constants(kind, p0, p1, p2, miner_eps):
    """(weighted, [pos scale, shift, w_a, w_b, neg scale, shift, w_a, w_b, eps]) as pair_math.h
    make_pair_loss (computed in double, rounded to the stat dtype once when the tensor is made)."""
    if kind == _kinds.MULTI_SIMILARITY:
        alpha, beta, base = p0, p1, p2
        return False, [-alpha, base, 0.0, 0.0, beta, base, 0.0, 0.0, miner_eps]
    if kind == _kinds.CIRCLE:
        m, gamma = p0, p1
        return True, [-gamma, 1.0 - m, 1.0 + m, -1.0, gamma, m, m, 1.0, miner_eps]
    raise ValueError(f"triton pair engine: unknown kind {kind} (0 Multi-Similarity, 1 Circle)")


def _check_inputs(q, r, labels_q, labels_r):
    if q.dim() != 2:
        raise ValueError(f"q must be (N, D), got shape {tuple(q.shape)}")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"triton pair engine: unsupported dtype {q.dtype}")
    if labels_q.shape != (q.shape[0],):
        raise ValueError("labels_q must have shape (N,)")
    if r is not None:
        if r.dim() != 2 or r.shape[1] != q.shape[1] or r.dtype != q.dtype:
            raise ValueError("r must be (M, D) with q's D and dtype")
        if labels_r is None or labels_r.shape != (r.shape[0],):
            raise ValueError("labels_r must have shape (M,) when r is given")


if _TRITON_IMPORTS:
    import triton
    import triton.language as tl

    from ._triton_common import (block_d, dot_precision, grad_dot_precision, is_interpreter,
                                 lse_value, pair_logit, s_tile, stat_dtype)

    _INTERPRET = is_interpreter()

    # ---------------------------------------------------------------- per-tile plug-in math --
    @triton.jit
    def _load_params(prm_ptr):
        return (tl.load(prm_ptr + 0), tl.load(prm_ptr + 1), tl.load(prm_ptr + 2),
                tl.load(prm_ptr + 3), tl.load(prm_ptr + 4), tl.load(prm_ptr + 5),
                tl.load(prm_ptr + 6), tl.load(prm_ptr + 7), tl.load(prm_ptr + 8))

    @triton.jit
    def _pair_sets(lab_i, lab_j, idx_i, idx_j, ok_i, ok_j, EXCLUDE_DIAG: tl.constexpr):
        """(P, N) masks of a tile: same label (minus the excluded self pair) / different label."""
        valid = ok_i[:, None] & ok_j[None, :]
        same = lab_i[:, None] == lab_j[None, :]
        pos = same & valid
        if EXCLUDE_DIAG:
            pos = pos & (idx_i[:, None] != idx_j[None, :])
        neg = (lab_i[:, None] != lab_j[None, :]) & valid
        return pos, neg

    @triton.jit
    def _grad_tile(s, pos, neg, g_pos, g_neg, lse_pos, lse_neg, min_pos, max_neg,
                   ps, psh, pwa, pwb, ns, nsh, nwa, nwb, eps,
                   WEIGHTED: tl.constexpr, MINE: tl.constexpr):
        """G = dL/dS on a tile; the row statistics come pre-broadcast ([R, 1] or [1, C]) so the
        same code gives G_IJ (stats of I) and G_JI^T (stats of J) in self mode."""
        if MINE:
            pos = pos & (s - eps < max_neg)
            neg = neg & (s + eps > min_pos)
        lp, dlp = pair_logit(s, ps, psh, pwa, pwb, WEIGHTED)
        ln, dln = pair_logit(s, ns, nsh, nwa, nwb, WEIGHTED)
        # P and N are disjoint: one exp per element (exp throughput bounds these kernels), and
        # only of selected elements (no inf / overflow from pairs outside both sets)
        e = tl.exp(tl.where(pos, lp - lse_pos, tl.where(neg, ln - lse_neg, float("-inf"))))
        g = tl.where(pos, g_pos * e * dlp, tl.where(neg, g_neg * e * dln, 0.0))
        return g

    @triton.jit
    def _lse_update_pair(mp, lp, xp, pos, mn, ln, xn, neg):
        """Online LSE of the positive and the negative set of a tile at once (pos, neg disjoint):
        the same update as `lse_update` for each, with one exp per element instead of two."""
        mp_new = tl.maximum(mp, tl.max(tl.where(pos, xp, float("-inf")), axis=1))
        mn_new = tl.maximum(mn, tl.max(tl.where(neg, xn, float("-inf")), axis=1))
        mp_safe = tl.where(mp_new == float("-inf"), 0.0, mp_new)
        mn_safe = tl.where(mn_new == float("-inf"), 0.0, mn_new)
        e = tl.exp(tl.where(pos, xp - mp_safe[:, None],
                            tl.where(neg, xn - mn_safe[:, None], float("-inf"))))
        lp = lp * tl.exp(mp - mp_safe) + tl.sum(tl.where(pos, e, 0.0), axis=1)
        ln = ln * tl.exp(mn - mn_safe) + tl.sum(tl.where(neg, e, 0.0), axis=1)
        return mp_new, lp, mn_new, ln

    # ---------------------------------------------------------------------------- kernels --
    @triton.jit
    def _fwd_kernel(q_ptr, r_ptr, lq_ptr, lr_ptr, prm_ptr, thr_min_ptr, thr_max_ptr,
                    lse_pos_ptr, lse_neg_ptr, cnt_pos_ptr, cnt_neg_ptr, min_pos_ptr, max_neg_ptr,
                    N, M, D, stride_q, stride_r, SPLIT,
                    EXCLUDE_DIAG: tl.constexpr, WEIGHTED: tl.constexpr, MINE: tl.constexpr,
                    THRESH_GIVEN: tl.constexpr, DO_LSE: tl.constexpr,
                    PREC: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Program (row block, split s) walks column tiles s, s + SPLIT, ... and writes its row
        statistics at [s, rows] of the outputs (SPLIT = 1: the final statistics). Mining: either
        computes min_pos / max_neg itself first (THRESH_GIVEN False, only with SPLIT = 1) or
        reads them (THRESH_GIVEN); DO_LSE False = the thresholds-only pass."""
        ACC_DT = prm_ptr.dtype.element_ty
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < N
        split = tl.program_id(1)
        n_first = split * BLOCK_N
        n_step = SPLIT * BLOCK_N
        out = split.to(tl.int64) * N + rows
        lq = tl.load(lq_ptr + rows, mask=rmask, other=0)
        ps, psh, pwa, pwb, ns, nsh, nwa, nwb, eps = _load_params(prm_ptr)

        min_pos = tl.full([BLOCK_M], float("inf"), ACC_DT)
        max_neg = tl.full([BLOCK_M], float("-inf"), ACC_DT)
        if MINE:
            if THRESH_GIVEN:
                min_pos = tl.load(thr_min_ptr + rows, mask=rmask, other=float("inf"))
                max_neg = tl.load(thr_max_ptr + rows, mask=rmask, other=float("-inf"))
            else:  # first walk: mining thresholds over the unmined sets
                for n0 in range(n_first, M, n_step):
                    cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
                    cmask = cols < M
                    lr = tl.load(lr_ptr + cols, mask=cmask, other=0)
                    pos, neg = _pair_sets(lq, lr, rows, cols, rmask, cmask, EXCLUDE_DIAG)
                    s = s_tile(q_ptr, r_ptr, rows, cols, rmask, cmask, D, stride_q, stride_r,
                               BLOCK_M, BLOCK_N, BLOCK_D, PREC, ACC_DT)
                    min_pos = tl.minimum(min_pos, tl.min(tl.where(pos, s, float("inf")), axis=1))
                    max_neg = tl.maximum(max_neg, tl.max(tl.where(neg, s, float("-inf")), axis=1))
                tl.store(min_pos_ptr + out, min_pos, mask=rmask)
                tl.store(max_neg_ptr + out, max_neg, mask=rmask)

        if DO_LSE:
            mp = tl.full([BLOCK_M], float("-inf"), ACC_DT)
            lp_sum = tl.zeros([BLOCK_M], ACC_DT)
            mn = tl.full([BLOCK_M], float("-inf"), ACC_DT)
            ln_sum = tl.zeros([BLOCK_M], ACC_DT)
            cp = tl.zeros([BLOCK_M], tl.int32)
            cn = tl.zeros([BLOCK_M], tl.int32)
            for n0 in range(n_first, M, n_step):
                cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
                cmask = cols < M
                lr = tl.load(lr_ptr + cols, mask=cmask, other=0)
                pos, neg = _pair_sets(lq, lr, rows, cols, rmask, cmask, EXCLUDE_DIAG)
                s = s_tile(q_ptr, r_ptr, rows, cols, rmask, cmask, D, stride_q, stride_r,
                           BLOCK_M, BLOCK_N, BLOCK_D, PREC, ACC_DT)
                if MINE:
                    pos = pos & (s - eps < max_neg[:, None])
                    neg = neg & (s + eps > min_pos[:, None])
                lpos, _ = pair_logit(s, ps, psh, pwa, pwb, WEIGHTED)
                lneg, _ = pair_logit(s, ns, nsh, nwa, nwb, WEIGHTED)
                mp, lp_sum, mn, ln_sum = _lse_update_pair(mp, lp_sum, lpos, pos,
                                                          mn, ln_sum, lneg, neg)
                cp += tl.sum(pos.to(tl.int32), axis=1)
                cn += tl.sum(neg.to(tl.int32), axis=1)
            tl.store(lse_pos_ptr + out, lse_value(mp, lp_sum), mask=rmask)
            tl.store(lse_neg_ptr + out, lse_value(mn, ln_sum), mask=rmask)
            tl.store(cnt_pos_ptr + out, cp, mask=rmask)
            tl.store(cnt_neg_ptr + out, cn, mask=rmask)

    @triton.jit
    def _bwd_rows_kernel(gp_ptr, gn_ptr, q_ptr, r_ptr, lq_ptr, lr_ptr,
                         lsep_ptr, lsen_ptr, minp_ptr, maxn_ptr, prm_ptr, out_ptr,
                         N, M, D, stride_q, stride_r, stride_o, stride_split, SPLIT,
                         SELF: tl.constexpr, EXCLUDE_DIAG: tl.constexpr, WEIGHTED: tl.constexpr,
                         MINE: tl.constexpr, PREC: tl.constexpr, GPREC: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """grad_q[I, dslice] = sum_J G_IJ r_J (ref mode) or sum_J (G_IJ + G_JI) q_J (self mode);
        program (I, dslice, s) sums the column tiles s, s + SPLIT, ... into out[s] (summed after)."""
        ACC_DT = prm_ptr.dtype.element_ty
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < N
        do = tl.program_id(1).to(tl.int64) * BLOCK_DO + tl.arange(0, BLOCK_DO)
        domask = do < D
        lq = tl.load(lq_ptr + rows, mask=rmask, other=0)
        ps, psh, pwa, pwb, ns, nsh, nwa, nwb, eps = _load_params(prm_ptr)
        gp_i = tl.load(gp_ptr + rows, mask=rmask, other=0.0)[:, None]
        gn_i = tl.load(gn_ptr + rows, mask=rmask, other=0.0)[:, None]
        lsep_i = tl.load(lsep_ptr + rows, mask=rmask, other=0.0)[:, None]
        lsen_i = tl.load(lsen_ptr + rows, mask=rmask, other=0.0)[:, None]
        minp_i = tl.load(minp_ptr + rows, mask=rmask, other=0.0)[:, None]
        maxn_i = tl.load(maxn_ptr + rows, mask=rmask, other=0.0)[:, None]

        split = tl.program_id(2)
        acc = tl.zeros([BLOCK_M, BLOCK_DO], ACC_DT)
        for n0 in range(split * BLOCK_N, M, SPLIT * BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
            cmask = cols < M
            lr = tl.load(lr_ptr + cols, mask=cmask, other=0)
            pos, neg = _pair_sets(lq, lr, rows, cols, rmask, cmask, EXCLUDE_DIAG)
            s = s_tile(q_ptr, r_ptr, rows, cols, rmask, cmask, D, stride_q, stride_r,
                       BLOCK_M, BLOCK_N, BLOCK_D, PREC, ACC_DT)
            g = _grad_tile(s, pos, neg, gp_i, gn_i, lsep_i, lsen_i, minp_i, maxn_i,
                           ps, psh, pwa, pwb, ns, nsh, nwa, nwb, eps, WEIGHTED, MINE)
            if SELF:  # G_JI from row J's statistics on the same (symmetric) S tile
                gp_j = tl.load(gp_ptr + cols, mask=cmask, other=0.0)[None, :]
                gn_j = tl.load(gn_ptr + cols, mask=cmask, other=0.0)[None, :]
                lsep_j = tl.load(lsep_ptr + cols, mask=cmask, other=0.0)[None, :]
                lsen_j = tl.load(lsen_ptr + cols, mask=cmask, other=0.0)[None, :]
                minp_j = tl.load(minp_ptr + cols, mask=cmask, other=0.0)[None, :]
                maxn_j = tl.load(maxn_ptr + cols, mask=cmask, other=0.0)[None, :]
                g += _grad_tile(s, pos, neg, gp_j, gn_j, lsep_j, lsen_j, minp_j, maxn_j,
                                ps, psh, pwa, pwb, ns, nsh, nwa, nwb, eps, WEIGHTED, MINE)
            x = tl.load(r_ptr + cols[:, None] * stride_r + do[None, :],
                        mask=cmask[:, None] & domask[None, :], other=0.0)
            acc = tl.dot(g, x.to(ACC_DT), acc, input_precision=GPREC, out_dtype=ACC_DT)
        out_ptr += split.to(tl.int64) * stride_split
        tl.store(out_ptr + rows[:, None] * stride_o + do[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & domask[None, :])

    @triton.jit
    def _bwd_cols_kernel(gp_ptr, gn_ptr, q_ptr, r_ptr, lq_ptr, lr_ptr,
                         lsep_ptr, lsen_ptr, minp_ptr, maxn_ptr, prm_ptr, out_ptr,
                         N, M, D, stride_q, stride_r, stride_o, stride_split, SPLIT,
                         EXCLUDE_DIAG: tl.constexpr, WEIGHTED: tl.constexpr,
                         MINE: tl.constexpr, PREC: tl.constexpr, GPREC: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """grad_r[J, dslice] = sum_I G_IJ q_I (ref mode); S tiles in the forward's orientation."""
        ACC_DT = prm_ptr.dtype.element_ty
        cols = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < M
        do = tl.program_id(1).to(tl.int64) * BLOCK_DO + tl.arange(0, BLOCK_DO)
        domask = do < D
        lr = tl.load(lr_ptr + cols, mask=cmask, other=0)
        ps, psh, pwa, pwb, ns, nsh, nwa, nwb, eps = _load_params(prm_ptr)

        split = tl.program_id(2)
        acc = tl.zeros([BLOCK_N, BLOCK_DO], ACC_DT)
        for m0 in range(split * BLOCK_M, N, SPLIT * BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
            rmask = rows < N
            lq = tl.load(lq_ptr + rows, mask=rmask, other=0)
            gp_i = tl.load(gp_ptr + rows, mask=rmask, other=0.0)[:, None]
            gn_i = tl.load(gn_ptr + rows, mask=rmask, other=0.0)[:, None]
            lsep_i = tl.load(lsep_ptr + rows, mask=rmask, other=0.0)[:, None]
            lsen_i = tl.load(lsen_ptr + rows, mask=rmask, other=0.0)[:, None]
            minp_i = tl.load(minp_ptr + rows, mask=rmask, other=0.0)[:, None]
            maxn_i = tl.load(maxn_ptr + rows, mask=rmask, other=0.0)[:, None]
            pos, neg = _pair_sets(lq, lr, rows, cols, rmask, cmask, EXCLUDE_DIAG)
            s = s_tile(q_ptr, r_ptr, rows, cols, rmask, cmask, D, stride_q, stride_r,
                       BLOCK_M, BLOCK_N, BLOCK_D, PREC, ACC_DT)
            g = _grad_tile(s, pos, neg, gp_i, gn_i, lsep_i, lsen_i, minp_i, maxn_i,
                           ps, psh, pwa, pwb, ns, nsh, nwa, nwb, eps, WEIGHTED, MINE)
            x = tl.load(q_ptr + rows[:, None] * stride_q + do[None, :],
                        mask=rmask[:, None] & domask[None, :], other=0.0)
            acc = tl.dot(tl.trans(g), x.to(ACC_DT), acc, input_precision=GPREC, out_dtype=ACC_DT)
        out_ptr += split.to(tl.int64) * stride_split
        tl.store(out_ptr + cols[:, None] * stride_o + do[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=cmask[:, None] & domask[None, :])

    # --------------------------------------------------------------------------- configs --
    # Autotuning varies only tile sizes / warps / stages: never BLOCK_D or the dot orientation,
    # so an S element is summed identically in every kernel and every config (see module doc).
    # All GPU configs use tiles >= 64 x 64 and >= 4 warps, so every kernel lowers its S dot to the
    # same tensor-core instruction family.
    def _cfg(bm, bn, warps, stages):
        return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)

    if _INTERPRET:
        _FWD_CONFIGS = [_cfg(64, 64, 4, 1)]
        _BWD_CONFIGS = [_cfg(64, 64, 4, 1)]
    else:
        _FWD_CONFIGS = [_cfg(64, 64, 4, 3), _cfg(128, 64, 4, 3), _cfg(64, 128, 4, 3),
                        _cfg(128, 128, 8, 3), _cfg(128, 64, 8, 4)]
        _BWD_CONFIGS = [_cfg(64, 64, 4, 3), _cfg(128, 64, 8, 3), _cfg(64, 128, 4, 3),
                        _cfg(64, 64, 4, 2)]

    # Tuned per shape and per variant (tensor dtypes are part of every key).
    _KEY = ["N", "M", "D", "WEIGHTED", "MINE", "PREC", "SPLIT"]
    _fwd = triton.autotune(configs=_FWD_CONFIGS, key=_KEY + ["THRESH_GIVEN", "DO_LSE"])(_fwd_kernel)
    _bwd_rows = triton.autotune(configs=_BWD_CONFIGS, key=_KEY + ["SELF"])(_bwd_rows_kernel)
    _bwd_cols = triton.autotune(configs=_BWD_CONFIGS, key=_KEY)(_bwd_cols_kernel)

    def _block_do(D):
        return max(16, min(triton.next_power_of_2(max(D, 1)), 256 if _INTERPRET else 128))

    def _num_splits(blocks, tiles, device):
        """How many programs share one row block's walk over the other side's tiles: enough
        programs to fill the GPU (~2 per SM) when there are few row blocks, each walking >= 4
        tiles. Partial results are combined in a fixed order (deterministic)."""
        if _INTERPRET or device.type != "cuda" or blocks <= 0:
            return 1
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        if blocks >= sms:
            return 1
        return max(1, min(triton.cdiv(2 * sms, blocks), tiles // 4))

    _MIN_TILE = 64  # smallest BLOCK_M / BLOCK_N of any config (sizes the split heuristic)

    def _launch(kernel):
        # Under torch.compile a triton_op's kernels must be launched through wrap_triton; the
        # custom_op fallback (interpreter) calls kernels directly.
        return torch.library.wrap_triton(kernel) if _USE_TRITON_OP else kernel

    # ------------------------------------------------------------------------- op bodies --
    def _forward_impl(q: Tensor, r: Optional[Tensor], labels_q: Tensor, labels_r: Optional[Tensor],
                      exclude_diag: bool, kind: int, p0: float, p1: float, p2: float, mine: bool,
                      miner_eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        _check_inputs(q, r, labels_q, labels_r)
        weighted, consts = _pair_constants(kind, p0, p1, p2, miner_eps)
        A = stat_dtype(q.dtype)
        n, d = q.shape
        q = q.contiguous()
        labels_q = labels_q.contiguous()
        if r is None:
            r, labels_r, exclude_diag = q, labels_q, True
        else:
            r, labels_r = r.contiguous(), labels_r.contiguous()
        m = r.shape[0]
        new = lambda *shape, dt=A: torch.empty(shape, dtype=dt, device=q.device)  # noqa: E731
        inf = lambda: torch.full((n,), float("inf"), dtype=A, device=q.device)  # noqa: E731
        if n == 0:
            return new(0), new(0), new(0, dt=torch.int32), new(0, dt=torch.int32), new(0), new(0)
        prm = torch.tensor(consts, dtype=A, device=q.device)
        splits = _num_splits(triton.cdiv(n, _MIN_TILE), triton.cdiv(m, _MIN_TILE), q.device)
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), splits)  # noqa: E731
        common = dict(EXCLUDE_DIAG=bool(exclude_diag), WEIGHTED=weighted, MINE=bool(mine),
                      PREC=dot_precision(q.dtype), BLOCK_D=block_d(q.dtype))
        dims = (n, m, d, q.stride(0), r.stride(0), splits)
        if splits == 1:  # one kernel: (mining walk +) LSE walk, final statistics
            lse_pos, lse_neg, min_pos, max_neg = new(n), new(n), inf(), -inf()
            count_pos, count_neg = new(n, dt=torch.int32), new(n, dt=torch.int32)
            _launch(_fwd)[grid](
                q, r, labels_q, labels_r, prm, min_pos, max_neg, lse_pos, lse_neg, count_pos,
                count_neg, min_pos, max_neg, *dims, THRESH_GIVEN=False, DO_LSE=True, **common)
            return lse_pos, lse_neg, count_pos, count_neg, min_pos, max_neg
        # split walks: partial statistics [splits, n], combined in a fixed order
        min_pos, max_neg = inf(), -inf()
        if mine:
            pmin, pmax = new(splits, n), new(splits, n)
            _launch(_fwd)[grid](
                q, r, labels_q, labels_r, prm, min_pos, max_neg, pmin, pmax, pmin, pmax, pmin,
                pmax, *dims, THRESH_GIVEN=False, DO_LSE=False, **common)
            min_pos, max_neg = pmin.amin(dim=0), pmax.amax(dim=0)
        plp, pln = new(splits, n), new(splits, n)
        pcp, pcn = new(splits, n, dt=torch.int32), new(splits, n, dt=torch.int32)
        _launch(_fwd)[grid](
            q, r, labels_q, labels_r, prm, min_pos, max_neg, plp, pln, pcp, pcn, plp, pln,
            *dims, THRESH_GIVEN=True, DO_LSE=True, **common)
        return (torch.logsumexp(plp, dim=0), torch.logsumexp(pln, dim=0),
                pcp.sum(dim=0, dtype=torch.int32), pcn.sum(dim=0, dtype=torch.int32),
                min_pos, max_neg)

    def _backward_impl(grad_lse_pos: Tensor, grad_lse_neg: Tensor, q: Tensor, r: Optional[Tensor],
                       labels_q: Tensor, labels_r: Optional[Tensor], lse_pos: Tensor,
                       lse_neg: Tensor, min_pos: Tensor, max_neg: Tensor, exclude_diag: bool,
                       kind: int, p0: float, p1: float, p2: float, mine: bool,
                       miner_eps: float) -> Tuple[Tensor, Tensor]:
        _check_inputs(q, r, labels_q, labels_r)
        weighted, consts = _pair_constants(kind, p0, p1, p2, miner_eps)
        A = stat_dtype(q.dtype)
        self_mode = r is None
        n, d = q.shape
        q = q.contiguous()
        labels_q = labels_q.contiguous()
        if self_mode:
            r_, labels_r_, exclude_diag = q, labels_q, True
        else:
            r_, labels_r_ = r.contiguous(), labels_r.contiguous()
        m = r_.shape[0]
        stats = [t.to(A).contiguous() for t in (grad_lse_pos, grad_lse_neg, lse_pos, lse_neg,
                                                min_pos, max_neg)]
        prm = torch.tensor(consts, dtype=A, device=q.device)
        bdo = _block_do(d)
        flags = dict(EXCLUDE_DIAG=bool(exclude_diag), WEIGHTED=weighted, MINE=bool(mine),
                     PREC=dot_precision(q.dtype), GPREC=grad_dot_precision(q.dtype),
                     BLOCK_D=block_d(q.dtype), BLOCK_DO=bdo)
        operands = (stats[0], stats[1], q, r_, labels_q, labels_r_, *stats[2:], prm)
        strides = (q.stride(0), r_.stride(0))

        def run(kernel, own, other, out_like, **extra):
            # own: rows of the output, other: the walked side. Split walks sum into fp32 (fp64)
            # partials [splits, own, D] that are added in a fixed order.
            if own == 0 or d == 0:
                return torch.zeros_like(out_like)
            chunks = triton.cdiv(d, bdo)
            splits = _num_splits(triton.cdiv(own, _MIN_TILE) * chunks,
                                 triton.cdiv(other, _MIN_TILE), q.device)
            out = torch.empty_like(out_like) if splits == 1 else \
                torch.empty((splits, own, d), dtype=A, device=q.device)
            blk = "BLOCK_M" if kernel is _bwd_rows else "BLOCK_N"
            grid = lambda meta: (triton.cdiv(own, meta[blk]), chunks, splits)  # noqa: E731
            _launch(kernel)[grid](*operands, out, n, m, d, *strides, d,
                                  out.stride(0) if splits > 1 else 0, splits, **flags, **extra)
            return out if splits == 1 else out.sum(dim=0).to(out_like.dtype)

        grad_q = run(_bwd_rows, n, m, q, SELF=self_mode)
        grad_r = q.new_empty((0,)) if self_mode else run(_bwd_cols, m, n, r_)
        return grad_q, grad_r

    def _fake_forward(q, r, labels_q, labels_r, exclude_diag, kind, p0, p1, p2, mine, miner_eps):
        n, A = q.shape[0], stat_dtype(q.dtype)
        f = lambda dt: q.new_empty((n,), dtype=dt)  # noqa: E731
        return f(A), f(A), f(torch.int32), f(torch.int32), f(A), f(A)

    def _fake_backward(grad_lse_pos, grad_lse_neg, q, r, labels_q, labels_r, lse_pos, lse_neg,
                       min_pos, max_neg, exclude_diag, kind, p0, p1, p2, mine, miner_eps):
        return torch.empty_like(q), (torch.empty_like(r) if r is not None else q.new_empty((0,)))

    # ------------------------------------------------------------------------ registration --
    # On GPU: torch.library.triton_op (torch.compile sees through it and can inline the kernels).
    # In the interpreter (CPU tensors), triton_op runs eagerly but its implicit fake kernel cannot
    # trace an interpreted launch, so there it is a custom_op with explicit fake kernels.
    _USE_TRITON_OP = (not _INTERPRET) and hasattr(torch.library, "triton_op")

    def _define(make, name, fn, schema):
        try:
            return make(name, fn, mutates_args=(), schema=schema)
        except TypeError:  # a torch without the `schema` argument: inferred from annotations
            return make(name, fn, mutates_args=())

    def _register():
        make = torch.library.triton_op if _USE_TRITON_OP else torch.library.custom_op
        fwd = _define(make, "fused_pairloss::triton_pair_engine_forward", _forward_impl,
                      FORWARD_SCHEMA)
        bwd = _define(make, "fused_pairloss::triton_pair_engine_backward", _backward_impl,
                      BACKWARD_SCHEMA)
        if not _USE_TRITON_OP:
            fwd.register_fake(_fake_forward)
            bwd.register_fake(_fake_backward)
        return fwd, bwd

    forward_op, backward_op = _register()
    AVAILABLE = True
