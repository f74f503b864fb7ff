"""Triton kernels of the class engine (backend "triton"): SoftTriple and ProxyCircle.

Ops `fused_pairloss::triton_class_engine_forward` / `triton_class_engine_backward`, with exactly the
schemas of the C++ class ops (csrc/ops.cpp) and the semantics of ops/README.md. Autograd is
registered by ops/class_engine.py on `forward_op`; `backward_op` is what it calls.

The algorithm is that of a fused linear cross-entropy: a program owns BLOCK_N rows of q and walks
tiles of whole classes of w (never an N x C*K tensor):

  tile sims   s[BLOCK_N, BLOCK_C*KP] = q_rows . w_tile^T with tl.dot, D in chunks of BLOCK_D
              (_triton_common.s_tile, shared with the pair engine)
  pool        S[BLOCK_N, BLOCK_C] = sum_k softmax_k(s/gamma) s     (SoftTriple, K > 1)
  logit       z = la (S - margin [c == y])  |  gamma relu(S + m) (S - m)   (same rounding as
              csrc/common/pair_math.h `ClassLoss`)
  reduce      online log-sum-exp over classes (target included for SoftTriple, excluded for
              ProxyCircle) and target_sim = S[i, y_i].

Parallelism. The forward and the row pass run on a grid (row blocks, class splits): when the batch
has few row blocks (N = 512 is 8 of them, far too few programs for a GPU), each row block's class
tiles are dealt round-robin to SPLITS programs; their partial (max, sum) of the online LSE and
target_sim are merged in torch (O(SPLITS * N)), their partial grad_q summed (O(SPLITS * N * D),
deterministic). The column pass likewise splits the row blocks when there are few class tiles.
SPLITS depends only on the shapes and the GPU's SM count.

Tile layout. A tile holds BLOCK_C classes x KP centers, KP = K rounded up to a power of two (tile
shapes must be powers of two); local column j is center k = j % KP of class c0 + j // KP, i.e. w
row (c0 + j // KP) * K + k, masked when k >= K or the class is past C. One tl.dot gives the whole
[BLOCK_N, BLOCK_C*KP] tile, which is reshaped (a free view, row-major) to [BLOCK_N, BLOCK_C, KP]
for the pool over the last axis. The alternative, K separate [BLOCK_N, BLOCK_C] dots (one per
center), wastes no padded lanes but needs the K tiles alive at once for the softmax and its
backward (or a second pass); with the reshape the padding costs K/KP of the MMA work (10/16 for
the usual K = 10) and everything stays one dot, one reduction. K = 1 (ProxyCircle, SoftTriple with
one center) skips the pool: S = s exactly, as the reference's softmax over one center gives.

Backward recomputes every tile with the same code and the same block sizes (`_tile`), so s, S, z
are bitwise those of the forward. It forms G_ic = dL/dS_ic from the saved lse, then
gs_ick = G_ic p_ick (1 + (s_ick - S_ic)/gamma) (SoftTriple, K > 1) or G_ic, and
  - row pass (grid over row blocks):    grad_q[rows] += gs @ w_tile   (owns its rows)
  - column pass (grid over class tiles): grad_w[tile] += gs^T @ q_rows (owns its classes)
Every program owns its output (its split's partial): deterministic, no atomics. The gradient dots walk D in chunks of BLOCK_G:
when D fits one chunk the accumulator stays in registers; otherwise each chunk of it is
read-modify-written in global memory by the program that owns it (same addresses, same program:
ordered). Gradients accumulate in A and are cast to the input dtype at the end.

Precision (SPEC §3, the pair engine's policy in _triton_common): fp32 inputs use ieee fp32
products unless torch.backends.cuda.matmul.allow_tf32; fp16/bf16 inputs use tensor cores with fp32
accumulation for s, and the gradient dots take gs in fp32 with the inputs upcast exactly (3xTF32),
so the only low-precision rounding of a gradient is its final store; fp64 computes in fp64.
Statistics are in A = fp64 for fp64 inputs, else fp32. Row and center indices are int64, so every
offset index * D is computed in int64.

Runs on CPU tensors through the Triton interpreter (TRITON_INTERPRET=1 set before triton is
imported). There the ops are plain custom ops (the interpreter cannot be traced by wrap_triton
under fake tensors); on GPU they are `torch.library.triton_op`s, visible to torch.compile.
"""
import torch

from . import _kinds
from ._triton_common import AVAILABLE

FORWARD_NAME = "fused_pairloss::triton_class_engine_forward"
BACKWARD_NAME = "fused_pairloss::triton_class_engine_backward"
# Exactly the schemas of csrc/ops.cpp class_engine_forward / class_engine_backward.
FORWARD_SCHEMA = (
    "(Tensor q, Tensor w, Tensor labels, int centers_per_class, int kind, "
    "float p0, float p1, float p2) -> (Tensor lse, Tensor target_sim)"
)
BACKWARD_SCHEMA = (
    "(Tensor grad_lse, Tensor grad_target_sim, Tensor q, Tensor w, Tensor labels, Tensor lse, "
    "int centers_per_class, int kind, float p0, float p1, float p2) -> (Tensor grad_q, Tensor grad_w)"
)

forward_op = None
backward_op = None
INTERPRETED = False

if AVAILABLE:
    import triton
    import triton.language as tl

    from ._triton_common import (block_d, dot_precision, grad_dot_precision, is_interpreter,
                                 lse_update, pair_logit, s_tile, stat_dtype)

    INTERPRETED = is_interpreter()

    @triton.jit
    def _to_acc(p_a: tl.float64, p_b: tl.float64, p_c: tl.float64, ACC: tl.constexpr):
        # Loss constants arrive as fp64 scalars (no host-to-device copy) and are rounded once to
        # the compute dtype, as torch rounds a Python float in `tensor op float`.
        return tl.full([], p_a, ACC), tl.full([], p_b, ACC), tl.full([], p_c, ACC)

    @triton.jit
    def _tile_cols(c0, C, K, KP: tl.constexpr, BLOCK_C: tl.constexpr):
        """Columns of a class tile: (w row of each lane [BLOCK_C*KP] int64, lane valid)."""
        j = tl.arange(0, BLOCK_C * KP)
        k = j % KP
        cls = c0 + j // KP
        return cls.to(tl.int64) * K + k, (cls < C) & (k < K)

    @triton.jit
    def _tile(q_ptr, w_ptr, labels_ptr, row0, c0, N, C, D, K, c_a, c_b, c_c,
              KIND: tl.constexpr, POOL: tl.constexpr, KP: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
              PREC: tl.constexpr):
        """The tile of rows row0.. x classes c0..: (s3, p, S, z, dz, in_lse, is_target);
        s3, p [BLOCK_N, BLOCK_C, KP] (dummies without POOL), the rest [BLOCK_N, BLOCK_C]."""
        rows = row0 + tl.arange(0, BLOCK_N).to(tl.int64)
        row_ok = rows < N
        w_rows, col_ok = _tile_cols(c0, C, K, KP, BLOCK_C)
        s = s_tile(q_ptr, w_ptr, rows, w_rows, row_ok, col_ok, D, D, D,
                   BLOCK_N, BLOCK_C * KP, BLOCK_D, PREC, c_a.dtype)
        cls = c0 + tl.arange(0, BLOCK_C)
        y = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
        is_target = y[:, None] == cls[None, :]
        valid = row_ok[:, None] & (cls < C)[None, :]
        if POOL:
            # SoftTriple: S = sum_k softmax_k(s * (1/gamma)) s, a stable softmax over the KP lanes
            # of each class (padded lanes -inf -> p = 0; padded classes have s = 0, harmless).
            s3 = tl.reshape(s, [BLOCK_N, BLOCK_C, KP])
            k_ok = (tl.arange(0, KP) < K)[None, None, :]
            x = tl.where(k_ok, s3 * c_b, float("-inf"))
            e = tl.exp(x - tl.max(x, axis=2)[:, :, None])
            p = e / tl.sum(e, axis=2)[:, :, None]
            S = tl.sum(p * s3, axis=2)
        else:
            s3 = s  # unused
            p = s  # unused
            S = s  # KP == 1: [BLOCK_N, BLOCK_C]
        if KIND == 0:
            # SoftTriple: z = la (S - margin [c == y]), dz/dS = la, every class in the LSE
            z = c_a * (S - tl.where(is_target, c_c, 0.0))
            dz = tl.zeros_like(S) + c_a
            in_lse = valid
        else:
            # ProxyCircle: z = (gamma relu(m + S)) (S - m) (pair_math.h ClassLoss), c != y only
            z, dz = pair_logit(S, c_a, c_b, c_b, 1.0, True)
            in_lse = valid & (is_target == 0)
        return s3, p, S, z, dz, in_lse, is_target & valid

    @triton.jit
    def _class_fwd_kernel(q_ptr, w_ptr, labels_ptr, max_ptr, sum_ptr, tsim_ptr, N, C, D, K,
                          p_a: tl.float64, p_b: tl.float64, p_c: tl.float64,
                          KIND: tl.constexpr, POOL: tl.constexpr, KP: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                          PREC: tl.constexpr):
        """Program (row block, split): class tiles split, split + SPLITS, ... of its rows; writes
        its partial (LSE max, LSE sum, target_sim) to row `split` of the [SPLITS, N] outputs."""
        ACC: tl.constexpr = max_ptr.dtype.element_ty
        c_a, c_b, c_c = _to_acc(p_a, p_b, p_c, ACC)
        row0 = tl.program_id(0).to(tl.int64) * BLOCK_N
        split = tl.program_id(1)
        n_splits = tl.num_programs(1)
        m_run = tl.full([BLOCK_N], float("-inf"), ACC)
        l_run = tl.zeros([BLOCK_N], ACC)
        t_run = tl.zeros([BLOCK_N], ACC)
        for c0 in range(split * BLOCK_C, C, n_splits * BLOCK_C):
            _s3, _p, S, z, _dz, in_lse, is_target = _tile(
                q_ptr, w_ptr, labels_ptr, row0, c0, N, C, D, K, c_a, c_b, c_c,
                KIND, POOL, KP, BLOCK_N, BLOCK_C, BLOCK_D, PREC)
            m_run, l_run = lse_update(m_run, l_run, z, in_lse)
            t_run += tl.sum(tl.where(is_target, S, 0.0), axis=1)
        rows = row0 + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        out = split.to(tl.int64) * N + rows
        tl.store(max_ptr + out, m_run, mask=row_ok)
        tl.store(sum_ptr + out, l_run, mask=row_ok)
        tl.store(tsim_ptr + out, t_run, mask=row_ok)

    @triton.jit
    def _tile_grad(q_ptr, w_ptr, labels_ptr, glse_ptr, gts_ptr, lse_ptr, row0, c0, N, C, D, K,
                   c_a, c_b, c_c,
                   KIND: tl.constexpr, POOL: tl.constexpr, KP: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                   PREC: tl.constexpr):
        """gs = dL/ds of one recomputed tile, [BLOCK_N, BLOCK_C*KP], in the stat dtype."""
        s3, p, S, z, dz, in_lse, is_target = _tile(
            q_ptr, w_ptr, labels_ptr, row0, c0, N, C, D, K, c_a, c_b, c_c,
            KIND, POOL, KP, BLOCK_N, BLOCK_C, BLOCK_D, PREC)
        rows = row0 + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        g_lse = tl.load(glse_ptr + rows, mask=row_ok, other=0.0)
        g_ts = tl.load(gts_ptr + rows, mask=row_ok, other=0.0)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        # G = grad_lse exp(z - lse) dz/dS (c in the LSE set) + grad_target_sim [c == y];
        # exp only of the selected elements (no overflow from the excluded target)
        e = tl.exp(tl.where(in_lse, z - lse[:, None], float("-inf")))
        G = tl.where(in_lse, (g_lse[:, None] * e) * dz, 0.0)
        G = G + tl.where(is_target, g_ts[:, None], 0.0)
        if POOL:
            # dS/ds_k = p_k (1 + (s_k - S) / gamma)
            gs3 = (G[:, :, None] * p) * (1.0 + (s3 - S[:, :, None]) * c_b)
            gs = tl.reshape(gs3, [BLOCK_N, BLOCK_C * KP])
        else:
            gs = G  # KP == 1
        return gs

    @triton.jit
    def _add_grad(acc, g, x_ptr, x_rows, x_ok, out_ptr, out_rows, out_ok, D,
                  BLOCK_G: tl.constexpr, ONE_CHUNK: tl.constexpr, GPREC: tl.constexpr):
        """(g @ x[x_rows]) added, D in chunks of BLOCK_G, to the register accumulator acc when
        ONE_CHUNK, else to out[out_rows] in memory (rows the calling program owns: its own
        read-add-write, ordered). x is upcast exactly to acc's dtype. Returns acc."""
        for d0 in range(0, D, BLOCK_G):
            d = d0 + tl.arange(0, BLOCK_G)
            d_ok = d < D
            xt = tl.load(x_ptr + x_rows[:, None] * D + d[None, :],
                         mask=x_ok[:, None] & d_ok[None, :], other=0.0).to(acc.dtype)
            if ONE_CHUNK:
                acc = tl.dot(g, xt, acc, input_precision=GPREC, out_dtype=acc.dtype)
            else:
                out = out_ptr + out_rows[:, None] * D + d[None, :]
                o_mask = out_ok[:, None] & d_ok[None, :]
                part = tl.load(out, mask=o_mask, other=0.0)
                part = tl.dot(g, xt, part, input_precision=GPREC, out_dtype=acc.dtype)
                tl.store(out, part, mask=o_mask)
        return acc

    @triton.jit
    def _store_grad(acc, out_ptr, out_rows, out_ok, D, BLOCK_G: tl.constexpr, ONE_CHUNK: tl.constexpr):
        if ONE_CHUNK:
            d = tl.arange(0, BLOCK_G)
            tl.store(out_ptr + out_rows[:, None] * D + d[None, :], acc, mask=out_ok[:, None] & (d < D)[None, :])

    @triton.jit
    def _class_bwd_rows_kernel(q_ptr, w_ptr, labels_ptr, glse_ptr, gts_ptr, lse_ptr, gq_ptr,
                               N, C, D, K,
                               p_a: tl.float64, p_b: tl.float64, p_c: tl.float64,
                               KIND: tl.constexpr, POOL: tl.constexpr, KP: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                               BLOCK_G: tl.constexpr, ONE_CHUNK: tl.constexpr,
                               PREC: tl.constexpr, GPREC: tl.constexpr):
        """Program (row block, split): partial grad_q[split, rows] = sum over the class tiles
        split, split + SPLITS, ... of gs @ w_tile (the caller sums the SPLITS partials)."""
        ACC: tl.constexpr = gq_ptr.dtype.element_ty
        c_a, c_b, c_c = _to_acc(p_a, p_b, p_c, ACC)
        row0 = tl.program_id(0).to(tl.int64) * BLOCK_N
        split = tl.program_id(1)
        n_splits = tl.num_programs(1)
        gq_ptr += split.to(tl.int64) * N * D
        rows = row0 + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        acc = tl.zeros([BLOCK_N, BLOCK_G], ACC)  # used when ONE_CHUNK
        for c0 in range(split * BLOCK_C, C, n_splits * BLOCK_C):
            gs = _tile_grad(q_ptr, w_ptr, labels_ptr, glse_ptr, gts_ptr, lse_ptr, row0, c0,
                            N, C, D, K, c_a, c_b, c_c,
                            KIND, POOL, KP, BLOCK_N, BLOCK_C, BLOCK_D, PREC)
            w_rows, col_ok = _tile_cols(c0, C, K, KP, BLOCK_C)
            acc = _add_grad(acc, gs, w_ptr, w_rows, col_ok, gq_ptr, rows, row_ok, D,
                            BLOCK_G, ONE_CHUNK, GPREC)
        _store_grad(acc, gq_ptr, rows, row_ok, D, BLOCK_G, ONE_CHUNK)

    @triton.jit
    def _class_bwd_cols_kernel(q_ptr, w_ptr, labels_ptr, glse_ptr, gts_ptr, lse_ptr, gw_ptr,
                               N, C, D, K,
                               p_a: tl.float64, p_b: tl.float64, p_c: tl.float64,
                               KIND: tl.constexpr, POOL: tl.constexpr, KP: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                               BLOCK_G: tl.constexpr, ONE_CHUNK: tl.constexpr,
                               PREC: tl.constexpr, GPREC: tl.constexpr):
        """Program (class tile, split): partial grad_w[split, tile] = sum over the row blocks
        split, split + SPLITS, ... of gs^T @ q_rows (the caller sums the SPLITS partials)."""
        ACC: tl.constexpr = gw_ptr.dtype.element_ty
        c_a, c_b, c_c = _to_acc(p_a, p_b, p_c, ACC)
        c0 = tl.program_id(0) * BLOCK_C
        split = tl.program_id(1)
        n_splits = tl.num_programs(1)
        gw_ptr += split.to(tl.int64) * C * K * D
        w_rows, col_ok = _tile_cols(c0, C, K, KP, BLOCK_C)
        acc = tl.zeros([BLOCK_C * KP, BLOCK_G], ACC)  # used when ONE_CHUNK
        for r0 in range(split * BLOCK_N, N, n_splits * BLOCK_N):
            row0 = tl.full([], r0, tl.int64)
            gs = _tile_grad(q_ptr, w_ptr, labels_ptr, glse_ptr, gts_ptr, lse_ptr, row0, c0,
                            N, C, D, K, c_a, c_b, c_c,
                            KIND, POOL, KP, BLOCK_N, BLOCK_C, BLOCK_D, PREC)
            rows = row0 + tl.arange(0, BLOCK_N)
            acc = _add_grad(acc, tl.trans(gs), q_ptr, rows, rows < N, gw_ptr, w_rows, col_ok, D,
                            BLOCK_G, ONE_CHUNK, GPREC)
        _store_grad(acc, gw_ptr, w_rows, col_ok, D, BLOCK_G, ONE_CHUNK)


def _config(N, C, K, D, dtype):
    """Block sizes: a function of the shapes and dtype only, so the forward and both backward
    passes tile (and round) identically. The S chunk BLOCK_D is the engines' fixed per-dtype
    block_d on GPU (larger in the interpreter, where each block op costs a numpy call); gradient
    dots walk D in chunks of BLOCK_G (one chunk, register accumulator, when it covers D). Every
    tl.dot dimension stays >= 16 (the GPU minimum). Returns (launch meta, BLOCK_G, one chunk)."""
    N, C, K, D = int(N), int(C), int(K), int(D)  # block sizes specialize on (symbolic) shapes
    KP = triton.next_power_of_2(K)
    if INTERPRETED:  # numpy per block op: few, large blocks
        block_n, block_ck, max_g = 128, 512, 256
    else:  # untuned starting point (no GPU was available to tune it)
        block_n, block_ck, max_g = 64, 64, 64 if dtype == torch.float64 else 128
    block_n = max(16, min(block_n, triton.next_power_of_2(N)))
    block_c = max(1, block_ck // KP)
    block_c = max(min(block_c, triton.next_power_of_2(C)), -(-16 // KP))  # keep BLOCK_C * KP >= 16
    block_g = max(16, min(triton.next_power_of_2(D), max_g))
    blocks = dict(KP=KP, BLOCK_N=block_n, BLOCK_C=block_c, BLOCK_D=128 if INTERPRETED else block_d(dtype))
    # 8 warps: with 4, ptxas (sm_90, compiled offline) spills hundreds of bytes in the backward
    # kernels at these tiles; with 8 a few dozen at most. Same for all three kernels.
    blocks["num_warps"] = 8
    return blocks, block_g, block_g >= D


def _split_grid(n_owned, n_walked, device):
    """Grid (n_owned, SPLITS) of a pass whose programs own n_owned output blocks and walk n_walked
    tiles each (forward / row pass: row blocks x class tiles; column pass: class tiles x row
    blocks). With few owned blocks the walk is dealt round-robin to SPLITS programs (partials
    merged by the caller) so the GPU fills up. A function of the shapes (and the GPU) only."""
    if INTERPRETED:  # small target: the tests exercise both the split and the unsplit form
        target = 4
    else:
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return n_owned, max(1, min(n_walked, target // n_owned, 64))


def _constants(kind, p0, p1, p2):
    """(a, b, c) of the kernels: SoftTriple (la, 1/gamma, margin); ProxyCircle (gamma, m, unused)."""
    if kind == _kinds.SOFT_TRIPLE:
        return float(p0), 1.0 / float(p1), float(p2)  # PML multiplies by 1/gamma
    return float(p1), float(p0), 0.0


def _check(q, w, labels, K, kind):
    torch._check(q.dim() == 2 and w.dim() == 2, lambda: "q and w must be 2-D")
    torch._check(q.shape[1] == w.shape[1], lambda: f"q and w must have the same D, got {q.shape[1]} and {w.shape[1]}")
    torch._check(q.dtype == w.dtype, lambda: f"q and w must have the same dtype, got {q.dtype} and {w.dtype}")
    torch._check(q.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16),
                 lambda: f"triton class engine: unsupported dtype {q.dtype}")
    torch._check(labels.dim() == 1 and labels.shape[0] == q.shape[0] and labels.dtype == torch.int64,
                 lambda: "labels must be int64 of shape [N]")
    torch._check(kind in (_kinds.SOFT_TRIPLE, _kinds.PROXY_CIRCLE), lambda: f"unknown class loss kind {kind}")
    torch._check(K >= 1 and w.shape[0] % K == 0,
                 lambda: f"w has {w.shape[0]} rows, not a multiple of centers_per_class={K}")
    torch._check(kind != _kinds.PROXY_CIRCLE or K == 1, lambda: "ProxyCircle needs centers_per_class == 1")


def _launch(kernel):
    # A triton_op launches through wrap_triton (torch.compile sees the kernel); the custom_op
    # fallback (interpreter) calls the kernel directly.
    return torch.library.wrap_triton(kernel) if _USE_TRITON_OP else kernel


def _forward(q, w, labels, centers_per_class, kind, p0, p1, p2):
    _check(q, w, labels, centers_per_class, kind)
    q, w, labels = q.contiguous(), w.contiguous(), labels.contiguous()
    N, D = q.shape
    K = centers_per_class
    C = w.shape[0] // K
    A = stat_dtype(q.dtype)
    if N == 0:
        return q.new_empty((0,), dtype=A), q.new_empty((0,), dtype=A)
    blocks, _, _ = _config(N, C, K, D, q.dtype)
    grid = _split_grid(triton.cdiv(N, blocks["BLOCK_N"]), triton.cdiv(C, blocks["BLOCK_C"]), q.device)
    m, l, t = (torch.empty((grid[1], N), dtype=A, device=q.device) for _ in range(3))
    a, b, c = _constants(kind, p0, p1, p2)
    _launch(_class_fwd_kernel)[grid](
        q, w, labels, m, l, t, N, C, D, K, a, b, c,
        KIND=kind, POOL=(kind == _kinds.SOFT_TRIPLE and K > 1), PREC=dot_precision(q.dtype), **blocks)
    if grid[1] == 1:
        m, l, t = m[0], l[0], t[0]
        return m + torch.log(l), t  # l == 0 (empty set): -inf
    # merge the splits' online LSEs (O(SPLITS * N)); NaN stays NaN, an empty set gives -inf
    m_all = m.amax(dim=0)
    m_all = torch.where(torch.isneginf(m_all), torch.zeros_like(m_all), m_all)
    return m_all + torch.log((l * torch.exp(m - m_all)).sum(dim=0)), t.sum(dim=0)


def _backward(grad_lse, grad_target_sim, q, w, labels, lse, centers_per_class, kind, p0, p1, p2):
    _check(q, w, labels, centers_per_class, kind)
    q, w, labels = q.contiguous(), w.contiguous(), labels.contiguous()
    N, D = q.shape
    K = centers_per_class
    C = w.shape[0] // K
    A = stat_dtype(q.dtype)
    grad_lse = grad_lse.to(A).contiguous()
    grad_target_sim = grad_target_sim.to(A).contiguous()
    lse = lse.to(A).contiguous()
    if N == 0 or C == 0 or D == 0:
        return torch.zeros_like(q), torch.zeros_like(w)
    blocks, block_g, one_chunk = _config(N, C, K, D, q.dtype)
    row_blocks, class_tiles = triton.cdiv(N, blocks["BLOCK_N"]), triton.cdiv(C, blocks["BLOCK_C"])
    grid_rows = _split_grid(row_blocks, class_tiles, q.device)
    grid_cols = _split_grid(class_tiles, row_blocks, q.device)
    # accumulated in A, zero-initialized (the chunked form adds into it); one partial per split,
    # summed here (deterministic); cast to the input dtype at the end
    grad_q = torch.zeros((grid_rows[1], N, D), dtype=A, device=q.device)
    grad_w = torch.zeros((grid_cols[1], w.shape[0], D), dtype=A, device=q.device)
    a, b, c = _constants(kind, p0, p1, p2)
    args = (q, w, labels, grad_lse, grad_target_sim, lse)
    scalars = (N, C, D, K, a, b, c)
    meta = dict(KIND=kind, POOL=(kind == _kinds.SOFT_TRIPLE and K > 1), BLOCK_G=block_g,
                ONE_CHUNK=one_chunk, PREC=dot_precision(q.dtype),
                GPREC=grad_dot_precision(q.dtype), **blocks)
    _launch(_class_bwd_rows_kernel)[grid_rows](*args, grad_q, *scalars, **meta)
    _launch(_class_bwd_cols_kernel)[grid_cols](*args, grad_w, *scalars, **meta)
    grad_q = grad_q[0] if grid_rows[1] == 1 else grad_q.sum(dim=0)
    grad_w = grad_w[0] if grid_cols[1] == 1 else grad_w.sum(dim=0)
    return grad_q.to(q.dtype), grad_w.to(w.dtype)


def _fake_forward(q, w, labels, centers_per_class, kind, p0, p1, p2):
    _check(q, w, labels, centers_per_class, kind)
    A = stat_dtype(q.dtype)
    return q.new_empty((q.shape[0],), dtype=A), q.new_empty((q.shape[0],), dtype=A)


def _fake_backward(grad_lse, grad_target_sim, q, w, labels, lse, centers_per_class, kind, p0, p1, p2):
    _check(q, w, labels, centers_per_class, kind)
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(w.shape, dtype=w.dtype, device=w.device))


# On GPU: torch.library.triton_op (torch.compile sees through it). In the interpreter (CPU
# tensors) triton_op's implicit fake kernel cannot trace an interpreted launch, so there the ops
# are custom_ops with explicit fake kernels.
_USE_TRITON_OP = AVAILABLE and not INTERPRETED and hasattr(torch.library, "triton_op")

if AVAILABLE:
    if _USE_TRITON_OP:
        forward_op = torch.library.triton_op(FORWARD_NAME, _forward, mutates_args=(), schema=FORWARD_SCHEMA)
        backward_op = torch.library.triton_op(BACKWARD_NAME, _backward, mutates_args=(), schema=BACKWARD_SCHEMA)
    else:
        forward_op = torch.library.custom_op(FORWARD_NAME, _forward, mutates_args=(), schema=FORWARD_SCHEMA)
        backward_op = torch.library.custom_op(BACKWARD_NAME, _backward, mutates_args=(), schema=BACKWARD_SCHEMA)
        forward_op.register_fake(_fake_forward)
        backward_op.register_fake(_fake_backward)
