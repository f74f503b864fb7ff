"""The all-triplets op on Triton (the "triton" backend of TripletMarginLoss): the schema of
`ops/triplets.triplet_rows` (docs/design.md "Triplets"; ops/README.md), as the custom ops
`fused_pairloss::triton_triplet_forward` / `triton_triplet_backward`; and the triplet bins of
DynamicSoftMarginLoss (`ops/triplets.triplet_bins`'s schema) as `triton_triplet_bins_forward` /
`triton_triplet_bins_backward`: the same tiles and passes with the bins' term (below).

Per anchor row i, its positives p (same label, p != exclude_col_i) are few: they are gathered on
the host (r's labels sorted once, a row's positives one contiguous run of that order), and a small
kernel computes their u_ip (d, or -S; the distance rule of the tiles, docs/design.md "Numerics",
with S a sum of products in chunks of BLOCK_D: the same value as the tile's tl.dot up to rounding,
and in full fp32 where the tiles' products are TF32).
The kernels then stream the column tiles of r against a block of rows, the tile's u from the
engines' S tile (`_pair_v`), and for each negative n (labels differ) and each positive p of its row
take the hinge x = A_p - u_n, A_p = u_ip + margin:

- forward: sums_i = sum_{p,n} relu(x), counts_i = #{x > 0}, in_window_i = #{(p, n)} in the miner's
  window (window_lo < u_n - u_ip <= window_hi; every pair without one);
- backward, rows pass: G_in = g_i c_in du/dS on the negatives, c_in = #{p : x > 0} (-c_in is
  d sums_i / d u_n), grad_q += G r (+ the lp norms' share), and k_ip = #{n : x > 0}
  (d sums_i / d A_p); columns pass, after it: grad_r += G^T q with G also on the positives,
  -g_i k_ip du/dS (the slot p of column j in row i's list from j's rank among its label's
  columns). The positives' share of grad_q comes from the gathered pairs on the host (a product
  per row chunk, no scatter).

Each of the P positives of a row is one elementwise pass over the tile (the C++ kernel's "vector
pass per positive"; at 64 x 64 tiles and D = 128, about one tile GEMM's work per 100 positives):
a call where some row has more than MAX_POSITIVES computes with the PyTorch op `triplet_rows`
instead (buckets and a binary search per row). One program per row block (or column block) walks
the whole other side: no split, so a small N (a CrossBatchMemory batch against a large memory)
gives few programs; deterministic, no atomics. The ops are opaque custom ops (torch.compile sees
their fake kernels): the positives' count is data-dependent. Memory O((N + M) D + N P).

The bins: the forward adds each (p, n)'s count, fraction and x = u_ip - u_n into its row's [rows,
bins] sums (fp64) through a one-hot of its bin (rows x columns x bins at a time: at most MAX_BINS
bins, beyond which the PyTorch op computes), the host turns them into PML's increments; the
backward's term weight is the bin's entry of a per-row table from the incoming gradient, so k_ip
becomes kw_ip = sum_n w (float) and g_i c_in becomes sum_p w.
"""
from __future__ import annotations

import torch

from . import triplets
from . import triton_engines as TE
from ._common import row_chunks
from .operands import stat_dtype

__all__ = ["AVAILABLE", "MAX_POSITIVES", "forward_op", "backward_op", "bins_forward_op", "positives", "label_ranks"]

MAX_POSITIVES = 512  # positives of a row beyond which the call computes with the PyTorch op (module docstring)
GATHER_ELEMENTS = 1 << 22  # rows x P x D entries of one host chunk of the positives' gradient

AVAILABLE = False
_OPS: dict = {}


def forward_op():
    return _OPS["forward"]


def backward_op():
    return _OPS["backward"]


def bins_forward_op():
    return _OPS["bins_forward"]


def positives(labels_q, labels_r, exclude_col):
    """(cols [N, P] int64, real [N, P] bool): row i's positive columns, in r's label order (ties in
    column order), the rows with fewer than P padded (real False, col 0)."""
    n, m = labels_q.shape[0], labels_r.shape[0]
    dev = labels_q.device
    if n == 0 or m == 0:
        return torch.zeros((n, 0), dtype=torch.int64, device=dev), torch.zeros((n, 0), dtype=torch.bool, device=dev)
    order = torch.argsort(labels_r, stable=True)
    sorted_labels = labels_r[order].contiguous()
    start = torch.searchsorted(sorted_labels, labels_q, right=False)
    span = torch.searchsorted(sorted_labels, labels_q, right=True) - start
    width = int(span.max())
    k = torch.arange(width, device=dev)
    real = k[None, :] < span[:, None]
    cols = order[(start[:, None] + k[None, :]).clamp(max=m - 1)]
    real &= cols != exclude_col[:, None]
    # the excluded column leaves a gap: move every row's real entries to the front, in order
    front = torch.argsort((~real).to(torch.int8), dim=1, stable=True)
    cols, real = cols.gather(1, front), real.gather(1, front)
    P = int(real.sum(1).max()) if width else 0
    return torch.where(real, cols, 0)[:, :P].contiguous(), real[:, :P].contiguous()


def label_ranks(labels_q, labels_r, exclude_col):
    """(rank_r [M], excl_rank [N]): each column's rank among the columns of its label in column
    order (its place in a row's positive list), and per row that rank of its excluded column when
    the column has the row's label (else -1): positive j of row i sits at rank_j - [excl_rank_i <
    rank_j]."""
    m = labels_r.shape[0]
    rank = torch.zeros(m, dtype=torch.int64, device=labels_r.device)
    if m:
        order = torch.argsort(labels_r, stable=True)
        sorted_labels = labels_r[order].contiguous()
        run_start = torch.searchsorted(sorted_labels, sorted_labels, right=False)
        rank[order] = torch.arange(m, device=labels_r.device) - run_start
    inside = (exclude_col >= 0) & (exclude_col < m)
    ec = torch.where(inside, exclude_col, 0)
    same = inside & (labels_r[ec] == labels_q) if m else inside
    excl_rank = torch.where(same, rank[ec] if m else ec, -1)
    return rank, excl_rank.contiguous()


if TE.AVAILABLE:
    import triton
    import triton.language as tl

    from .triton_engines import _acc_grad, _finish_grad, _pair_v

    @triton.jit
    def _triplet_pos_u_kernel(q_ptr, r_ptr, cols_ptr, nq_ptr, nr_ptr, a_ptr, NP, P, D, LP: tl.constexpr,
                              PREC: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
        """a[i, p] = u of row i and its gathered positive column cols[i, p] (-1: none, a = NaN): the
        diagonal of a BLOCK x BLOCK tile of `_pair_v` over the block's pairs' rows and columns, the
        tile shape of the triplet kernels (_blocks), so that u is summed as the tiles sum a
        negative's: a positive and a negative of one row that are copies tie here as in PML."""
        ACC: tl.constexpr = a_ptr.dtype.element_ty
        idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = idx < NP
        col = tl.load(cols_ptr + idx, mask=ok, other=-1)
        real = ok & (col >= 0)
        row = tl.where(real, idx // P, 0)
        col = tl.where(real, col, 0)
        if LP:
            nq = tl.load(nq_ptr + row, mask=real, other=0.0)
            nr = tl.load(nr_ptr + col, mask=real, other=0.0)
        else:
            nq = tl.zeros([BLOCK], ACC)
            nr = tl.zeros([BLOCK], ACC)
        v = _pair_v(q_ptr, r_ptr, row, col, real, real, nq, nr, D, D, D, LP, 0, PREC, BLOCK_D,
                    BLOCK, BLOCK, ACC)
        diagonal = tl.arange(0, BLOCK)[:, None] == tl.arange(0, BLOCK)[None, :]
        v = tl.sum(tl.where(diagonal, v, 0.0), axis=1)  # one entry per row: exact
        if LP:
            u = v
        else:
            u = -v
        tl.store(a_ptr + idx, tl.where(real, u, float("nan")), mask=ok)

    @triton.jit
    def _triplet_tile(q_ptr, r_ptr, lq, nq, rows, row_ok, c0, M, D, lr_ptr, nr_ptr, LP: tl.constexpr,
                      PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                      ACC: tl.constexpr):
        """(u, negatives, cols, col_ok) of the tile rows x columns c0..: u = d or -S."""
        cols = c0 + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = cols < M
        lr = tl.load(lr_ptr + cols, mask=col_ok, other=0)
        if LP:
            nr = tl.load(nr_ptr + cols, mask=col_ok, other=0.0)
        else:
            nr = tl.zeros([BLOCK_N], ACC)
        v = _pair_v(q_ptr, r_ptr, rows, cols, row_ok, col_ok, nq, nr, D, D, D, LP, 0, PREC, BLOCK_D,
                    BLOCK_M, BLOCK_N, ACC)
        if LP:
            u = v
        else:
            u = -v
        neg = (lq[:, None] != lr[None, :]) & row_ok[:, None] & col_ok[None, :]
        return u, neg, cols, col_ok

    @triton.jit
    def _triplet_rows(lq_ptr, nq_ptr, rows, row_ok, LP: tl.constexpr, BLOCK_M: tl.constexpr, ACC: tl.constexpr):
        """Labels and (lp) squared norms of a block of rows of q."""
        lq = tl.load(lq_ptr + rows, mask=row_ok, other=0)
        if LP:
            nq = tl.load(nq_ptr + rows, mask=row_ok, other=0.0)
        else:
            nq = tl.zeros([BLOCK_M], ACC)
        return lq, nq

    @triton.jit
    def _triplet_pair(a_ptr, rows, row_ok, p, P, u, neg, margin, lo, hi, WINDOW: tl.constexpr):
        """Positive p of each row against the tile's negatives: (in the window, x = A_p - u > 0 there, x)."""
        a = tl.load(a_ptr + rows * P + p, mask=row_ok, other=float("nan"))
        if WINDOW:
            t = u - a[:, None]
            inw = neg & (t > lo) & (t <= hi)
        else:
            inw = neg & (u == u) & (a == a)[:, None]
        x = (a + margin)[:, None] - u
        return inw, inw & (x > 0), x

    @triton.jit
    def _triplet_fwd_kernel(q_ptr, r_ptr, lq_ptr, lr_ptr, nq_ptr, nr_ptr, a_ptr, sums_ptr, counts_ptr, win_ptr,
                            N, M, D, P, k_margin: tl.float64, k_lo: tl.float64, k_hi: tl.float64,
                            LP: tl.constexpr, WINDOW: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """Program: a row block against every column tile; sums, counts, in_window of its rows."""
        ACC: tl.constexpr = sums_ptr.dtype.element_ty
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        lq, nq = _triplet_rows(lq_ptr, nq_ptr, rows, row_ok, LP, BLOCK_M, ACC)
        margin, lo, hi = tl.full([], k_margin, ACC), tl.full([], k_lo, ACC), tl.full([], k_hi, ACC)
        sums = tl.zeros([BLOCK_M], ACC)
        counts = tl.zeros([BLOCK_M], tl.int64)
        in_window = tl.zeros([BLOCK_M], tl.int64)
        for c0 in range(0, M, BLOCK_N):
            u, neg, _cols, _ok = _triplet_tile(q_ptr, r_ptr, lq, nq, rows, row_ok, c0, M, D, lr_ptr, nr_ptr, LP,
                                               PREC, BLOCK_M, BLOCK_N, BLOCK_D, ACC)
            for p in range(0, P):
                inw, on, x = _triplet_pair(a_ptr, rows, row_ok, p, P, u, neg, margin, lo, hi, WINDOW)
                sums += tl.sum(tl.where(on, x, 0.0), axis=1)
                counts += tl.sum(on.to(tl.int64), axis=1)
                in_window += tl.sum(inw.to(tl.int64), axis=1)
        tl.store(sums_ptr + rows, sums, mask=row_ok)
        tl.store(counts_ptr + rows, counts, mask=row_ok)
        tl.store(win_ptr + rows, in_window, mask=row_ok)

    @triton.jit
    def _bin_pair(a_ptr, rows, row_ok, p, P, u, neg, bin_lo, bin_width, bins):
        """Positive p of each row against the tile's negatives in PML's bins (ops/README.md
        triplet_bins): (kept, x = a_p - u_n, the bin k = clamp(floor t, 0, bins - 1), t)."""
        a = tl.load(a_ptr + rows * P + p, mask=row_ok, other=float("nan"))
        x = a[:, None] - u
        on = neg & (x == x)
        t = tl.where(on, (x - bin_lo) / bin_width, 0.0)
        k = tl.minimum(tl.maximum(tl.floor(t), 0.0), (bins - 1).to(t.dtype)).to(tl.int32)
        return on, x, k, t

    @triton.jit
    def _term_weights(a_ptr, w_ptr, rows, row_ok, p, P, u, neg, margin, lo, hi, bin_lo, bin_width, bins,
                      WINDOW: tl.constexpr, BINS: tl.constexpr):
        """d loss / d u_n of positive p's terms on the tile, without the row's g: 1 where the hinge
        term is > 0 (in the window), or the bins' weight w[i, k] of the pair's bin."""
        if BINS:
            on, _x, k, _t = _bin_pair(a_ptr, rows, row_ok, p, P, u, neg, bin_lo, bin_width, bins)
            return tl.load(w_ptr + rows[:, None] * bins + k, mask=on, other=0.0).to(u.dtype)
        else:
            _inw, on, _x = _triplet_pair(a_ptr, rows, row_ok, p, P, u, neg, margin, lo, hi, WINDOW)
            return on.to(u.dtype)

    @triton.jit
    def _triplet_grad_tile(a_ptr, w_ptr, g, rows, row_ok, P, u, neg, margin, lo, hi, bin_lo, bin_width, bins,
                           LP: tl.constexpr, WINDOW: tl.constexpr, BINS: tl.constexpr):
        """G = dL/dS of the tile's negatives: g_i c_in du/dS, c_in = #{p : A_p > u_n in the window}
        (du/dS = -1/d for lp, 0 at d = 0; -1 for the cosine, so G = g c (1/d or 1)); the bins:
        c_in = sum_p w (the weights hold g), G = c / d."""
        c = tl.zeros(u.shape, u.dtype)
        for p in range(0, P):
            c += _term_weights(a_ptr, w_ptr, rows, row_ok, p, P, u, neg, margin, lo, hi, bin_lo, bin_width, bins,
                               WINDOW, BINS)
        if BINS:
            G = c
        else:
            G = g[:, None] * c
        if LP:
            G = tl.where(u > 0, G / tl.where(u > 0, u, 1.0), 0.0)
        return G

    @triton.jit
    def _triplet_bins_fwd_kernel(q_ptr, r_ptr, lq_ptr, lr_ptr, nq_ptr, nr_ptr, a_ptr, acc_ptr, N, M, D, P, bins,
                                 k_bin_lo: tl.float64, k_bin_width: tl.float64, PREC: tl.constexpr,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                                 NB: tl.constexpr):
        """Program: a row block against every column tile (lp); per row and bin (NB >= bins) the
        count, the fractions t - trunc t and the x of its (p, n) in that bin, into acc [N, 3, NB]
        (fp64: a count stays exact past 2^24 pairs)."""
        ACC: tl.constexpr = a_ptr.dtype.element_ty
        SUMS: tl.constexpr = acc_ptr.dtype.element_ty
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        lq, nq = _triplet_rows(lq_ptr, nq_ptr, rows, row_ok, True, BLOCK_M, ACC)
        bin_lo, bin_width = tl.full([], k_bin_lo, ACC), tl.full([], k_bin_width, ACC)
        slots = tl.arange(0, NB)
        n_acc = tl.zeros([BLOCK_M, NB], SUMS)
        f_acc = tl.zeros([BLOCK_M, NB], SUMS)
        x_acc = tl.zeros([BLOCK_M, NB], SUMS)
        for c0 in range(0, M, BLOCK_N):
            u, neg, _cols, _ok = _triplet_tile(q_ptr, r_ptr, lq, nq, rows, row_ok, c0, M, D, lr_ptr, nr_ptr, True,
                                               PREC, BLOCK_M, BLOCK_N, BLOCK_D, ACC)
            for p in range(0, P):
                on, x, k, t = _bin_pair(a_ptr, rows, row_ok, p, P, u, neg, bin_lo, bin_width, bins)
                f = t - tl.where(t >= 0, tl.floor(t), tl.ceil(t))
                hit = (k[:, :, None] == slots[None, None, :]) & on[:, :, None]  # rows x columns x bins
                n_acc += tl.sum(hit.to(SUMS), axis=1)
                f_acc += tl.sum(tl.where(hit, f[:, :, None].to(SUMS), 0.0), axis=1)
                x_acc += tl.sum(tl.where(hit, x[:, :, None].to(SUMS), 0.0), axis=1)
        base = acc_ptr + rows[:, None] * (3 * NB) + slots[None, :]
        tl.store(base, n_acc, mask=row_ok[:, None])
        tl.store(base + NB, f_acc, mask=row_ok[:, None])
        tl.store(base + 2 * NB, x_acc, mask=row_ok[:, None])

    @triton.jit
    def _triplet_bwd_rows_kernel(q_ptr, r_ptr, lq_ptr, lr_ptr, nq_ptr, nr_ptr, a_ptr, g_ptr, w_ptr, k_ptr, out_ptr,
                                 N, M, D, P, k_margin: tl.float64, k_lo: tl.float64, k_hi: tl.float64, bins,
                                 k_bin_lo: tl.float64, k_bin_width: tl.float64,
                                 LP: tl.constexpr, WINDOW: tl.constexpr, BINS: tl.constexpr, GRAD: tl.constexpr,
                                 PREC: tl.constexpr, GPREC: tl.constexpr, BLOCK_M: tl.constexpr,
                                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr,
                                 ONE_CHUNK: tl.constexpr):
        """Program: a row block against every column tile; k_ip = #{n : A_p > u_n} of its rows (into
        k, [N, P] int32, which it owns; the bins: sum_n w into k, [N, P] A) and, with GRAD, its rows
        of grad_q = G r - rowsum(G) q (lp)."""
        ACC: tl.constexpr = g_ptr.dtype.element_ty
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        lq, nq = _triplet_rows(lq_ptr, nq_ptr, rows, row_ok, LP, BLOCK_M, ACC)
        g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
        margin, lo, hi = tl.full([], k_margin, ACC), tl.full([], k_lo, ACC), tl.full([], k_hi, ACC)
        bin_lo, bin_width = tl.full([], k_bin_lo, ACC), tl.full([], k_bin_width, ACC)
        acc = tl.zeros([BLOCK_M, BLOCK_G], ACC)
        gsum = tl.zeros([BLOCK_M], ACC)
        for c0 in range(0, M, BLOCK_N):
            u, neg, cols, col_ok = _triplet_tile(q_ptr, r_ptr, lq, nq, rows, row_ok, c0, M, D, lr_ptr, nr_ptr, LP,
                                                 PREC, BLOCK_M, BLOCK_N, BLOCK_D, ACC)
            for p in range(0, P):
                w = _term_weights(a_ptr, w_ptr, rows, row_ok, p, P, u, neg, margin, lo, hi, bin_lo, bin_width, bins,
                                  WINDOW, BINS)
                kp = k_ptr + rows * P + p
                if BINS:
                    tl.store(kp, tl.load(kp, mask=row_ok, other=0.0) + tl.sum(w, axis=1), mask=row_ok)
                else:
                    tl.store(kp, tl.load(kp, mask=row_ok, other=0) + tl.sum(w.to(tl.int32), axis=1), mask=row_ok)
            if GRAD:
                G = _triplet_grad_tile(a_ptr, w_ptr, g, rows, row_ok, P, u, neg, margin, lo, hi, bin_lo, bin_width,
                                       bins, LP, WINDOW, BINS)
                acc = _acc_grad(acc, G, r_ptr, cols, col_ok, D, out_ptr, rows, row_ok, D, BLOCK_G, ONE_CHUNK,
                                GPREC)
                gsum += tl.sum(G, axis=1)
        if GRAD:
            _finish_grad(acc, gsum, q_ptr, rows, row_ok, D, out_ptr, D, LP, BLOCK_G, ONE_CHUNK)

    @triton.jit
    def _triplet_bwd_cols_kernel(q_ptr, r_ptr, lq_ptr, lr_ptr, nq_ptr, nr_ptr, a_ptr, g_ptr, w_ptr, k_ptr, ex_ptr,
                                 rank_ptr, er_ptr, out_ptr,
                                 N, M, D, P, k_margin: tl.float64, k_lo: tl.float64, k_hi: tl.float64, bins,
                                 k_bin_lo: tl.float64, k_bin_width: tl.float64,
                                 LP: tl.constexpr, WINDOW: tl.constexpr, BINS: tl.constexpr, PREC: tl.constexpr,
                                 GPREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                 BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr, ONE_CHUNK: tl.constexpr):
        """Program: a column block against every row block (the forward's tile orientation, so the
        same u bits), after the rows pass (k complete); its columns of grad_r = G^T q - colsum(G) r
        (lp), G on the negatives as the rows pass and on the positives -g_i k[i, slot] du/dS, the
        slot the column's rank among its label's columns (rank), less one when the row's excluded
        column ranks before it (er: that rank, or -1)."""
        ACC: tl.constexpr = g_ptr.dtype.element_ty
        c0 = tl.program_id(0).to(tl.int64) * BLOCK_N
        cols = c0 + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = cols < M
        lr_c = tl.load(lr_ptr + cols, mask=col_ok, other=0)
        rank = tl.load(rank_ptr + cols, mask=col_ok, other=0)
        margin, lo, hi = tl.full([], k_margin, ACC), tl.full([], k_lo, ACC), tl.full([], k_hi, ACC)
        bin_lo, bin_width = tl.full([], k_bin_lo, ACC), tl.full([], k_bin_width, ACC)
        acc = tl.zeros([BLOCK_N, BLOCK_G], ACC)
        gsum = tl.zeros([BLOCK_N], ACC)
        for r0 in range(0, N, BLOCK_M):
            rows = r0 + tl.arange(0, BLOCK_M).to(tl.int64)
            row_ok = rows < N
            lq, nq = _triplet_rows(lq_ptr, nq_ptr, rows, row_ok, LP, BLOCK_M, ACC)
            g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
            u, neg, _cols, _ok = _triplet_tile(q_ptr, r_ptr, lq, nq, rows, row_ok, c0, M, D, lr_ptr, nr_ptr, LP,
                                               PREC, BLOCK_M, BLOCK_N, BLOCK_D, ACC)
            G = _triplet_grad_tile(a_ptr, w_ptr, g, rows, row_ok, P, u, neg, margin, lo, hi, bin_lo, bin_width, bins,
                                   LP, WINDOW, BINS)
            ex = tl.load(ex_ptr + rows, mask=row_ok, other=-1)
            er = tl.load(er_ptr + rows, mask=row_ok, other=-1)
            pos = (lq[:, None] == lr_c[None, :]) & (ex[:, None] != cols[None, :]) & row_ok[:, None] & col_ok[None, :]
            slot = rank[None, :] - ((er[:, None] >= 0) & (er[:, None] < rank[None, :])).to(tl.int64)
            kv = tl.load(k_ptr + rows[:, None] * P + slot, mask=pos, other=0).to(ACC)
            if BINS:
                Gp = -kv
            else:
                Gp = -g[:, None] * kv
            if LP:
                Gp = tl.where(u > 0, Gp / tl.where(u > 0, u, 1.0), 0.0)
            G = G + tl.where(pos, Gp, 0.0)
            acc = _acc_grad(acc, tl.trans(G), q_ptr, rows, row_ok, D, out_ptr, cols, col_ok, D, BLOCK_G, ONE_CHUNK,
                            GPREC)
            gsum += tl.sum(G, axis=0)
        _finish_grad(acc, gsum, r_ptr, cols, col_ok, D, out_ptr, D, LP, BLOCK_G, ONE_CHUNK)

    # ---- host ---------------------------------------------------------------------------------------
    def _blocks():
        """Fixed tiles (untuned: no GPU was available); small under the interpreter so that small tests
        cross several tiles."""
        if TE.INTERPRETED:
            return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2)

    def _operands(q, r, labels_q, labels_r, exclude_col, lp):
        """The kernels' inputs in the stat dtype A, the gathered positives and their u ([N, P], NaN
        where not real), or None when a row has more than MAX_POSITIVES positives."""
        A = stat_dtype(q.dtype)
        qa, ra = q.detach().to(A).contiguous(), r.detach().to(A).contiguous()
        cols, real = positives(labels_q, labels_r, exclude_col)
        if cols.shape[1] > MAX_POSITIVES:
            return None
        nq = (qa * qa).sum(1) if lp else qa.new_zeros(1)
        nr = (ra * ra).sum(1) if lp else ra.new_zeros(1)
        a = torch.empty(cols.shape, dtype=A, device=q.device)
        if a.numel():
            b = _blocks()  # the tiles' shape and warps: their dot sums an element the same way
            TE._launch(_triplet_pos_u_kernel)[(triton.cdiv(a.numel(), b["BLOCK_M"]),)](
                qa, ra, torch.where(real, cols, -1), nq, nr, a, a.numel(), a.shape[1], qa.shape[1], LP=bool(lp),
                PREC=TE.dot_precision(q.dtype), BLOCK=b["BLOCK_M"], BLOCK_D=TE.block_d(q.dtype),
                num_warps=b["num_warps"], num_stages=b["num_stages"])
        return A, qa, ra, labels_q.contiguous(), labels_r.contiguous(), nq, nr, a, cols, real

    def _forward(q, r, labels_q, labels_r, exclude_col, margin, lp, window_lo, window_hi):
        TE._check_pair_sizes(q.shape[0], r.shape[0])
        ops = _operands(q, r, labels_q, labels_r, exclude_col, lp)
        if ops is None:
            return triplets.triplet_rows(q, r, labels_q, labels_r, exclude_col, margin, lp, window_lo, window_hi)
        A, qa, ra, lq, lr, nq, nr, a, _cols, _real = ops
        N, M, D = qa.shape[0], ra.shape[0], qa.shape[1]
        sums = torch.zeros(N, dtype=A, device=q.device)
        counts = torch.zeros(N, dtype=torch.int64, device=q.device)
        in_window = torch.zeros(N, dtype=torch.int64, device=q.device)
        if N == 0 or M == 0 or a.shape[1] == 0:
            return sums, counts, in_window
        b = _blocks()
        TE._launch(_triplet_fwd_kernel)[(triton.cdiv(N, b["BLOCK_M"]),)](
            qa, ra, lq, lr, nq, nr, a, sums, counts, in_window, N, M, D, a.shape[1], float(margin),
            float(window_lo), float(window_hi), LP=bool(lp), WINDOW=triplets._has_window(window_lo, window_hi),
            PREC=TE.dot_precision(q.dtype), BLOCK_D=TE.block_d(q.dtype), **b)
        return sums, counts, in_window

    def _backward(grad_sums, q, r, labels_q, labels_r, exclude_col, margin, lp, window_lo, window_hi,
                  need_grad_q, need_grad_r):
        ops = _operands(q, r, labels_q, labels_r, exclude_col, lp)
        if ops is None:
            return triplets.triplet_rows_backward(grad_sums, q, r, labels_q, labels_r, exclude_col, margin, lp,
                                                  window_lo, window_hi, need_grad_q, need_grad_r)
        A, qa, ra, lq, lr, nq, nr, a, cols, real = ops
        N, M, D, P = qa.shape[0], ra.shape[0], qa.shape[1], a.shape[1]
        g = grad_sums.to(A).contiguous()
        grad_q = torch.zeros_like(qa) if need_grad_q else None
        grad_r = torch.zeros_like(ra) if need_grad_r else None
        if N and M and P and D:
            k = torch.zeros((N, P), dtype=torch.int32, device=q.device)
            _backward_passes(qa, ra, lq, lr, nq, nr, a, g, qa.new_zeros(1), k, exclude_col, grad_q, grad_r,
                             (float(margin), float(window_lo), float(window_hi), 1, 0.0, 1.0),
                             dict(LP=bool(lp), WINDOW=triplets._has_window(window_lo, window_hi), BINS=False), q.dtype)
            if need_grad_q:
                _add_positives_grad(grad_q, g[:, None] * k.to(g.dtype), qa, ra, a, cols, real, lp)
        empty = q.new_empty  # one per gradient not needed: an op's outputs may not alias
        return ((empty((0,)) if grad_q is None else grad_q.to(q.dtype)),
                (empty((0,)) if grad_r is None else grad_r.to(r.dtype)))

    def _backward_passes(qa, ra, lq, lr, nq, nr, a, g, w, k, exclude_col, grad_q, grad_r, scalars, kinds, dtype):
        """The rows pass (k, and grad_q when asked for) then the columns pass (grad_r when asked for);
        scalars: margin, window lo / hi, then the bins' count, lo and width."""
        N, M, D, P = qa.shape[0], ra.shape[0], qa.shape[1], a.shape[1]
        b = _blocks()
        block_g, one_chunk = TE._block_g(D, dtype)
        args = (N, M, D, P, *scalars)
        meta = dict(PREC=TE.dot_precision(dtype), GPREC=TE.grad_dot_precision(dtype), BLOCK_D=TE.block_d(dtype),
                    BLOCK_G=block_g, ONE_CHUNK=one_chunk, **kinds, **b)
        out_q = grad_q if grad_q is not None else qa.new_zeros(1)
        TE._launch(_triplet_bwd_rows_kernel)[(triton.cdiv(N, b["BLOCK_M"]),)](
            qa, ra, lq, lr, nq, nr, a, g, w, k, out_q, *args, GRAD=grad_q is not None, **meta)
        if grad_r is not None:
            rank, excl_rank = label_ranks(lq, lr, exclude_col)
            TE._launch(_triplet_bwd_cols_kernel)[(triton.cdiv(M, b["BLOCK_N"]),)](
                qa, ra, lq, lr, nq, nr, a, g, w, k, exclude_col.contiguous(), rank, excl_rank, grad_r, *args, **meta)

    # ---- the bins (DynamicSoftMargin; ops/README.md triplet_bins) --------------------------------------
    MAX_BINS = 64  # bins beyond which a call computes with the PyTorch op (the forward's rows x columns x bins)

    def _bins_operands(q, r, labels_q, labels_r, exclude_col, bins):
        if bins > MAX_BINS:
            return None
        return _operands(q, r, labels_q, labels_r, exclude_col, True)

    def _bins_forward(q, r, labels_q, labels_r, exclude_col, lo, width, bins):
        TE._check_pair_sizes(q.shape[0], r.shape[0])
        ops = _bins_operands(q, r, labels_q, labels_r, exclude_col, bins)
        if ops is None:
            return triplets.triplet_bins(q, r, labels_q, labels_r, exclude_col, lo, width, bins)
        A, qa, ra, lq, lr, nq, nr, a, _cols, _real = ops
        N, M, D, P = qa.shape[0], ra.shape[0], qa.shape[1], a.shape[1]
        nb = triton.next_power_of_2(bins)
        acc = torch.zeros((N, 3, nb), dtype=torch.float64, device=q.device)
        if N and M and P:
            b = _blocks()
            TE._launch(_triplet_bins_fwd_kernel)[(triton.cdiv(N, b["BLOCK_M"]),)](
                qa, ra, lq, lr, nq, nr, a, acc, N, M, D, P, bins, float(lo), float(width),
                PREC=TE.dot_precision(q.dtype), BLOCK_D=TE.block_d(q.dtype), NB=nb, **b)
        # PML's increments: the pairs of bin k give 1 - f to m = min(k, bins - 2) and f to m + 1
        n, f, x = acc[:, 0, :bins], acc[:, 1, :bins], acc[:, 2, :bins]
        m = torch.arange(bins, device=q.device).clamp(max=bins - 2)
        inc = torch.zeros((N, bins), dtype=acc.dtype, device=q.device).index_add_(1, m, n - f).index_add_(1, m + 1, f)
        return torch.stack([inc, x], 1).to(A).contiguous(), n.sum(1).round().to(torch.int64)

    def _bins_backward(grad_bins, q, r, labels_q, labels_r, exclude_col, lo, width, bins, need_grad_q, need_grad_r):
        ops = _bins_operands(q, r, labels_q, labels_r, exclude_col, bins)
        if ops is None:
            return triplets.triplet_bins_backward(grad_bins, q, r, labels_q, labels_r, exclude_col, lo, width, bins,
                                                  need_grad_q, need_grad_r)
        A, qa, ra, lq, lr, nq, nr, a, cols, real = ops
        N, M, D, P = qa.shape[0], ra.shape[0], qa.shape[1], a.shape[1]
        weight = triplets.bin_weights(grad_bins.to(A), width, bins).contiguous()
        grad_q = torch.zeros_like(qa) if need_grad_q else None
        grad_r = torch.zeros_like(ra) if need_grad_r else None
        if N and M and P and D:
            kw = torch.zeros((N, P), dtype=A, device=q.device)
            _backward_passes(qa, ra, lq, lr, nq, nr, a, qa.new_zeros(N), weight, kw, exclude_col, grad_q, grad_r,
                             (0.0, float("-inf"), float("inf"), bins, float(lo), float(width)),
                             dict(LP=True, WINDOW=False, BINS=True), q.dtype)
            if need_grad_q:
                _add_positives_grad(grad_q, kw, qa, ra, a, cols, real, True)
        empty = q.new_empty  # one per gradient not needed: an op's outputs may not alias
        return ((empty((0,)) if grad_q is None else grad_q.to(q.dtype)),
                (empty((0,)) if grad_r is None else grad_r.to(r.dtype)))

    def _add_positives_grad(grad_q, gk, qa, ra, a, cols, real, lp):
        """The positives' share of grad_q (grad_r's is the columns pass's), from the gathered pairs in
        row chunks: dL/du_ip = gk_ip (g_i k_ip for the hinges, kw_ip for the bins), so with W = gk
        (W / d for lp, 0 at d = 0): cosine (u = -S) grad_q_i -= sum_p W r_p; lp (u = |q_i - r_p|)
        grad_q_i += sum_p W (q_i - r_p)."""
        n, P = cols.shape
        for i0, i1 in row_chunks(n, P * qa.shape[1], GATHER_ELEMENTS):
            W = torch.where(real[i0:i1], gk[i0:i1], 0.0)
            if lp:
                d = a[i0:i1]
                W = torch.where(d > 0, W / torch.where(d > 0, d, 1.0), 0.0)
            if not bool((W != 0).any()):
                continue
            rp = torch.where(real[i0:i1, :, None], ra[cols[i0:i1]], 0.0)  # chunk x P x D
            w_r = torch.bmm(W[:, None, :], rp).squeeze(1)  # sum_p W_ip r_p
            grad_q[i0:i1] += (W.sum(1, keepdim=True) * qa[i0:i1] - w_r) if lp else -w_r

    def _register():
        schema_fwd = ("(Tensor q, Tensor r, Tensor labels_q, Tensor labels_r, Tensor exclude_col, float margin, "
                      "bool lp, float window_lo, float window_hi) -> (Tensor sums, Tensor counts, Tensor in_window)")
        schema_bwd = ("(Tensor grad_sums, Tensor q, Tensor r, Tensor labels_q, Tensor labels_r, Tensor exclude_col, "
                      "float margin, bool lp, float window_lo, float window_hi, bool need_grad_q, "
                      "bool need_grad_r) -> (Tensor grad_q, Tensor grad_r)")
        fwd = torch.library.custom_op("fused_pairloss::triton_triplet_forward", _forward, mutates_args=(),
                                      schema=schema_fwd)
        bwd = torch.library.custom_op("fused_pairloss::triton_triplet_backward", _backward, mutates_args=(),
                                      schema=schema_bwd)
        triplets.register_rows_op(fwd, bwd)
        schema_fwd = ("(Tensor q, Tensor r, Tensor labels_q, Tensor labels_r, Tensor exclude_col, float lo, "
                      "float width, int bins) -> (Tensor bins, Tensor counts)")
        schema_bwd = ("(Tensor grad_bins, Tensor q, Tensor r, Tensor labels_q, Tensor labels_r, Tensor exclude_col, "
                      "float lo, float width, int bins, bool need_grad_q, bool need_grad_r) "
                      "-> (Tensor grad_q, Tensor grad_r)")
        bins_fwd = torch.library.custom_op("fused_pairloss::triton_triplet_bins_forward", _bins_forward,
                                           mutates_args=(), schema=schema_fwd)
        bins_bwd = torch.library.custom_op("fused_pairloss::triton_triplet_bins_backward", _bins_backward,
                                           mutates_args=(), schema=schema_bwd)
        triplets.register_bins_op(bins_fwd, bins_bwd)
        _OPS.update(forward=fwd, backward=bwd, bins_forward=bins_fwd, bins_backward=bins_bwd)

    _register()
    AVAILABLE = True
