"""Triton engines (backend "triton"): the ops `fused_pairloss::triton_pair_engine_forward/_backward`
and `fused_pairloss::triton_class_engine_forward/_backward`.

Same schemas (csrc/ops.cpp, `triton_` prefix) and semantics (ops/README.md) as the C++ ops; the
materializing oracles (ops/oracle.py) define the expected outputs. No kernel knows which loss it
runs: the declaration `terms, flags` (ops/spec.py) reaches the kernels as
- terms: fp64 scalar kernel arguments, each rounded once in-kernel to the stat dtype A (as
  csrc/common/loss_spec.h rounds them, and as torch rounds a Python float in `tensor op float`);
- flags: decoded here, in Python, into named `tl.constexpr` switches (POS_LSE, NEG_HINGE, LP, MINE,
  ...), so each declaration compiles to its own straight-line kernel.
No per-call host-to-device copy, no N x M (N x C*K) tensor. Fake kernels and the autograd rule are
those of ops/engines.py (`engines.PAIR` / `engines.CLASS`), attached when this module is imported.

Pair engine (tiles of S = q r^T), programs own BLOCK_M rows (or BLOCK_N columns) and walk the other
side's tiles; per row an online log-sum-exp (running max + rescaled sum), sums, counts:
- forward `_pair_fwd_kernel`, up to three walks over a row block's column tiles:
    THRESH (MINE): min_pos / max_neg of the unmined sets (torch.amin/amax semantics: NaN sticks);
    MAIN: the kept sets (mining masks from the thresholds): LSE / sum / nonzero count per set, sizes;
      with a histogram (HIST) each tile's pulses summed per node over its columns (only the nodes a
      pair of the tile reaches) and added into the row's value rows, which the host zeroed;
    NTX (POS_VS_NEG_LSE): sum over the kept positives of -log(sigmoid(x - lse_neg_i) + tiny) and its
      d/d lse_neg. It needs the row's final lse_neg, so it is a walk of its own after MAIN; it skips
      every column tile without a positive of the row block (decided from the labels before S is
      computed), so its cost is one S GEMM over the tiles that hold positives: about 1/(number of
      classes) of a full walk for balanced labels, a full walk (+1 GEMM-equivalent) at worst.
  Forward cost: 1 GEMM-equivalent, +1 with mining, + the NTX walk.
  With SPLIT = 1 (enough row blocks to fill the GPU) one launch runs all walks in each program
  (thresholds and lse_neg stay in registers). With SPLIT > 1, a row block's column tiles are dealt
  round-robin (tile s, s + SPLIT, ...) to SPLIT programs, one launch per walk: each writes partial
  statistics [SPLIT, k, N], combined in torch in a fixed order (amin / amax, logsumexp, sums)
  between the launches; min / max are exact, so split and unsplit runs make the same mining masks.
- backward `_pair_bwd_rows_kernel`: grad_q[I] = sum_J G_IJ r_J (+ the lp norms' share -q_I sum_J G_IJ).
  Self mode: S is symmetric, so the recomputed tile S_IJ gives G_IJ (row I's statistics) and G_JI
  (row J's statistics, mining masks of row J, the same S bits), and grad_q = (G + G^T) q is one
  deterministic row pass (2 GEMM-equivalents), no atomics. Ref mode adds `_pair_bwd_cols_kernel`
  (programs own columns J, recompute S_IJ in the forward's orientation, grad_r[J] = sum_I G_IJ q_I),
  skipped when need_grad_r is False. HIST adds the pulses' slope to G (the incoming gradients of
  the pair's two nodes, gathered).
Class engine (tiles of whole classes of w; a tile is BLOCK_C classes x KP lanes, KP = K rounded up
to a power of two, one tl.dot, reshaped to [BLOCK_N, BLOCK_C, KP] for the pooling: SoftTriple's
softmax, SubCenterArcFace's max):
- forward `_class_fwd_rows_kernel` (ROW_LSE, or with ROW_SP the row's softplus sum, and target_sim;
  programs own row blocks, walk class tiles, split like the pair engine) and, with column terms
  (K = 1), `_class_fwd_cols_kernel`
  (programs own class tiles and walk row blocks: column LSEs; target_sim too when there is no row
  term, so ProxyAnchor costs one GEMM). Row and column terms together: 2 GEMM-equivalents.
- backward `_class_bwd_rows_kernel` (grad_q) and `_class_bwd_cols_kernel` (grad_w; skipped when
  need_grad_w is False), G from the row and column statistics, dS/ds of the pooling.

Shared by every kernel (one structure for both engines):
- `_s_tile`: an S element is always a[i] . b[j] summed over D in chunks of a fixed BLOCK_D per dtype
  (never autotuned), q (rows) first, so recomputed S is bitwise the forward's in every pass and every
  config; autotuning only varies BLOCK_M / BLOCK_N / warps / stages (all GPU configs >= 64 x 64 tiles
  and >= 4 warps: the same dot instruction family).
- precision: fp32 inputs use true fp32 products ("ieee") unless torch.backends.cuda.matmul.allow_tf32;
  fp16 / bf16 use tensor cores with fp32 accumulation for S; the gradient dots take G in A with the
  inputs upcast exactly (fp16/bf16: 3xTF32), so the only low-precision rounding of a gradient is its
  final store; fp64 computes in fp64.
- `_acc_grad` / `_finish_grad`: gradient dots over D in chunks of BLOCK_G; when D fits one chunk the
  accumulator stays in registers, else each chunk is read-modify-written in global memory by the one
  program that owns those rows (ordered, deterministic; autotuning resets it with reset_to_zero).
  Split walks write one partial per split, summed in torch in split order. The only atomics are
  the histograms' adds (`_hist_add`), into slots no other program owns.
- `_splits`: how many programs share a walk, a function of the shapes and the SM count only.
- int64 index arithmetic for every row / column offset (index * D, slot * N) and every walk and
  tile start (program ids are cast before they are multiplied): Triton passes an integer argument
  as int32 when it fits, so a product of two of them would wrap past 2^31.
- Limits (docs/backends.md): M < 2^31 (counts are int32, as on every backend) and at most 2^31 - 1
  programs along the grid's first axis (`_check_grid`).
- `_launch`: torch.library.wrap_triton under triton_op (torch.compile sees the kernels), a direct
  launch under the interpreter, one at a time (the interpreter patches triton.language in the
  kernels' module globals for the length of a launch, so two threads' launches would break each
  other).

Registration: on a GPU the ops are `torch.library.triton_op`s; under the interpreter
(TRITON_INTERPRET=1 set before triton is imported; CPU tensors) they are `custom_op`s with the fake
kernels of ops/engines.py (triton_op's traced fake cannot run an interpreted launch).

Not validated here (the C++ ops check them with a device sync): exclude_col values outside [-1, M)
exclude nothing; class labels outside [0, C) match no class (target_sim 0, every class in the LSE).
"""
from __future__ import annotations

import os
import threading

import torch

from . import engines
from . import spec as S
from .operands import NTX_DIRECT_ABOVE as _NTX_DIRECT_ABOVE, stat_dtype

try:  # the module imports without triton: then AVAILABLE stays False
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    _IMPORTED = True
except Exception:  # ImportError, or a broken triton install
    triton = None
    tl = None
    libdevice = None
    _IMPORTED = False

__all__ = ["AVAILABLE", "INTERPRETED", "SCHEMAS", "forward_op", "backward_op"]

AVAILABLE = False

# Exactly the schemas of csrc/ops.cpp (the op names gain the prefix `triton_`).
SCHEMAS = {
    "pair_engine_forward": (
        "(Tensor q, Tensor? r, Tensor labels_q, Tensor? labels_r, Tensor? exclude_col, float[] terms, "
        "int flags, Tensor? row_shift=None) -> (Tensor values, Tensor counts, Tensor aux)"),
    "pair_engine_backward": (
        "(Tensor grad_values, Tensor q, Tensor? r, Tensor labels_q, Tensor? labels_r, "
        "Tensor? exclude_col, Tensor values, Tensor aux, float[] terms, int flags, bool need_grad_r, "
        "Tensor? row_shift=None) -> (Tensor grad_q, Tensor grad_r)"),
    "class_engine_forward": (
        "(Tensor q, Tensor w, Tensor labels, int centers_per_class, float[] terms, int flags) "
        "-> (Tensor rows, Tensor cols)"),
    "class_engine_backward": (
        "(Tensor grad_rows, Tensor grad_cols, Tensor q, Tensor w, Tensor labels, Tensor rows, "
        "Tensor cols, int centers_per_class, float[] terms, int flags, bool need_grad_w) "
        "-> (Tensor grad_q, Tensor grad_w)"),
}

_OPS: dict = {}


def forward_op(name: str):
    """The forward op of engine `name` ("pair_engine" / "class_engine")."""
    return _OPS[f"{name}_forward"]


def backward_op(name: str):
    return _OPS[f"{name}_backward"]


def is_interpreter() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return True
    try:  # triton >= 3.4 keeps the setting in knobs (read once at import)
        return bool(triton.knobs.runtime.interpret)
    except Exception:
        return False


INTERPRETED = _IMPORTED and is_interpreter()
_USE_TRITON_OP = _IMPORTED and not INTERPRETED and hasattr(torch.library, "triton_op")

_PAIR_TERMS = 2 * 4 + 11
_KERNEL_TERMS = 2 * 4 + 3  # the pair terms' floats, miner_epsilon, the sums' temperatures
_WINDOW_TERMS = slice(14, 18)  # then the keep windows' bounds (after NTXent's tiny)
_NTX_TINY_TERM = 18  # NTXent's tiny; 0: the accumulation dtype's smallest normal
_PAIR_VALUES = len(S.PAIR_VALUES)
_CLASS_TERMS = 3 * 4 + 1
_PAIR_FLAG_MASK = ((1 << 11) - 1) | S.KEEP_WINDOWS | S.HIST_SQUARED | S.HIST_PML_BINS
# no weight-operand bits (plain rows)
_CLASS_FLAG_MASK = S.ROW_LSE | S.COL_POS_LSE | S.COL_NEG_LSE | S.POOL_MAX | S.ROW_SOFTPLUS_SUM
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# ---- precision and tiling policy (host side) -----------------------------------------------------
def dot_precision(dtype: torch.dtype) -> str:
    """`input_precision` of the S dot: true fp32 products for fp32 unless the user enabled TF32 the
    PyTorch way; fp64 exact; fp16 / bf16 tensor cores (the setting only matters for fp32 operands)."""
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    if dtype == torch.float64:
        return "ieee"
    return "tf32"


def grad_dot_precision(dtype: torch.dtype) -> str:
    """`input_precision` of the G @ x gradient dots, whose operands are in A (G, and x upcast
    exactly): fp32 follows dot_precision, fp64 exact, fp16 / bf16 3xTF32 (tensor cores, about fp32
    accuracy), so the only low-precision rounding of a gradient is its final store."""
    if dtype in (torch.float32, torch.float64):
        return dot_precision(dtype)
    return "tf32x3"


def block_d(dtype: torch.dtype) -> int:
    """D chunk of the S dot. Fixed per dtype (never autotuned, the same in both engines' kernels and
    in every pass) so that an S element is always summed in the same order."""
    if dtype in (torch.float16, torch.bfloat16):
        return 64
    if dtype == torch.float64:
        return 16
    return 32


def _block_g(D: int, dtype: torch.dtype):
    """(BLOCK_G, ONE_CHUNK): D chunk of the gradient dots; one chunk = register accumulator."""
    cap = 256 if INTERPRETED else (64 if dtype == torch.float64 else 128)
    bg = max(16, min(triton.next_power_of_2(max(int(D), 1)), cap))
    return bg, bg >= int(D)


_MIN_TILE = 64  # tile edge the split policy counts in (independent of the autotuned config)


def _splits(owned: int, walked: int, device) -> int:
    """How many programs share the walk of one owned block (row block, class tile) over `walked`
    tiles: enough programs to fill the GPU (~2 per SM) when there are few owned blocks, each walking
    >= 4 tiles. 1 under the interpreter (tests force other values). Shapes and SM count only."""
    if INTERPRETED or device.type != "cuda" or owned <= 0:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if owned >= sms:
        return 1
    return max(1, min(triton.cdiv(2 * sms, owned), walked // 4, 64))


# Triton's interpreter swaps triton.language's functions in a kernel's module globals while a
# launch runs and restores them afterwards: launches from two threads at once fail ("Did you forget
# to add @triton.jit?") or run with the other's state. Interpreted launches take this lock.
_INTERPRETER_LAUNCH_LOCK = threading.Lock()


class _SerializedLaunch:
    """kernel[grid](*args) under _INTERPRETER_LAUNCH_LOCK."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            with _INTERPRETER_LAUNCH_LOCK:
                return launch(*args, **kwargs)

        return run


def _launch(kernel):
    """A triton_op launches through wrap_triton (torch.compile sees the kernel); the custom_op
    fallback (interpreter) calls the kernel directly, one launch at a time."""
    if _USE_TRITON_OP:
        return torch.library.wrap_triton(kernel)
    return _SerializedLaunch(kernel) if INTERPRETED else kernel


def _pair_switches(flags: int, terms) -> dict:
    """The declaration's flags (and whether its sums are exp-weighted) as the kernels' constexpr switches."""
    f = int(flags)
    return dict(POS_EXPW=bool(f & S.POS_SUM) and float(terms[9]) != 0.0,
                NEG_EXPW=bool(f & S.NEG_SUM) and float(terms[10]) != 0.0,
                POS_LSE=bool(f & S.POS_LSE), POS_SUM=bool(f & S.POS_SUM), POS_HINGE=bool(f & S.POS_HINGE),
                NEG_LSE=bool(f & S.NEG_LSE), NEG_SUM=bool(f & S.NEG_SUM), NEG_HINGE=bool(f & S.NEG_HINGE),
                LP=bool(f & S.LP_DISTANCE), MINE=bool(f & S.MINE), NTX=bool(f & S.POS_VS_NEG_LSE),
                EAM=bool(f & S.EXCLUDE_AFTER_MINING), MCOS=bool(f & S.MINE_ON_COSINE), WIN=bool(f & S.KEEP_WINDOWS),
                HIST=float(terms[11]) > 0, HSQ=bool(f & S.HIST_SQUARED), HPML=bool(f & S.HIST_PML_BINS))


def _pair_kernel_consts(terms, A) -> tuple:
    """The declaration's scalars as the pair kernels take them, after the shapes: the terms' floats,
    miner_epsilon, the temperatures, NTXent's tiny (loss_spec.h ntx_tiny), the keep windows' bounds,
    then the histogram's nodes, lo, inv_width, and PML's delta = 1 / inv_width (rounded to float in
    the kernels, as loss_spec.h hist_delta_f)."""
    nodes, lo, inv_width = int(terms[11]), float(terms[12]), float(terms[13])
    return (tuple(float(t) for t in terms[:_KERNEL_TERMS]) + (S.ntx_tiny_of(terms[_NTX_TINY_TERM], A),)
            + tuple(float(t) for t in terms[_WINDOW_TERMS])
            + (nodes, lo, inv_width if nodes else 1.0, 1.0 / inv_width if nodes else 1.0))


def _pool_kind(K: int, flags: int) -> int:
    """The class tile's pooling: 0 none (K = 1), 1 SoftTriple's softmax, 2 SubCenterArcFace's max."""
    return 0 if K == 1 else 2 if int(flags) & S.POOL_MAX else 1


def _class_switches(flags: int) -> dict:
    f = int(flags)
    return dict(ROW_LSE=bool(f & S.ROW_LSE), ROW_SP=bool(f & S.ROW_SOFTPLUS_SUM), COL_POS=bool(f & S.COL_POS_LSE),
                COL_NEG=bool(f & S.COL_NEG_LSE))


# ---- argument checks (torch._check: they also run under fake tensors) ----------------------------
def _check_pair(q, r, labels_q, labels_r, exclude_col, terms, flags, row_shift=None):
    if row_shift is not None:
        torch._check(row_shift.dim() == 1 and row_shift.shape[0] == q.shape[0] and row_shift.dtype.is_floating_point,
                     lambda: f"pair_engine (triton): row_shift must be floating point of shape ({q.shape[0]},)")
        torch._check(row_shift.device == q.device, lambda: "pair_engine (triton): row_shift must be on q's device")
    torch._check(len(terms) == _PAIR_TERMS,
                 lambda: f"pair_engine (triton): terms must have {_PAIR_TERMS} entries, got {len(terms)}")
    # the histogram's fields, as common/loss_spec.h validates them
    nodes, lo, inv_width, fmax = float(terms[11]), float(terms[12]), float(terms[13]), torch.finfo(torch.float32).max
    torch._check(nodes.is_integer() and 0 <= nodes <= 2**20,
                 lambda: "pair_engine (triton): hist_nodes must be an integer in [0, 2^20]")
    torch._check(nodes == 0 or 0 < inv_width <= fmax,
                 lambda: "pair_engine (triton): hist_inv_width must be a number > 0 and at most the largest float")
    torch._check(nodes == 0 or -fmax <= lo <= fmax,
                 lambda: "pair_engine (triton): hist_lo must be a finite number (as a float)")
    torch._check(nodes == 0 or not (flags & (S.MINE | S.POS_VS_NEG_LSE)),
                 lambda: "pair_engine (triton): a histogram cannot be combined with mining or NTXent")
    torch._check(nodes > 0 or not (flags & S.HIST_SQUARED),
                 lambda: "pair_engine (triton): hist-squared needs a histogram")
    torch._check(nodes == 0 or not (flags & S.KEEP_WINDOWS),
                 lambda: "pair_engine (triton): keep windows cannot be combined with a histogram")
    torch._check(not (flags & S.HIST_PML_BINS) or (nodes >= 2 and not (flags & S.HIST_SQUARED)),
                 lambda: "pair_engine (triton): hist-pml-bins needs a histogram of 2 nodes or more, of v (not squared)")
    torch._check(0 <= float(terms[_NTX_TINY_TERM]) < 1, lambda: "pair_engine (triton): ntx_tiny must be in [0, 1)")
    torch._check((int(flags) & ~_PAIR_FLAG_MASK) == 0,
                 lambda: f"pair_engine (triton): unknown pair flag bits {int(flags) & ~_PAIR_FLAG_MASK}")
    for k, (name, sum_bit, hinge_bit) in enumerate((("pos", S.POS_SUM, S.POS_HINGE), ("neg", S.NEG_SUM, S.NEG_HINGE))):
        torch._check(float(terms[9 + k]) == 0.0 or (bool(flags & sum_bit) and bool(flags & hinge_bit)),
                     lambda: f"pair_engine (triton): {name}.sum_temperature needs a hinge term reduced by sum")
    torch._check(not (flags & S.EXCLUDE_AFTER_MINING) or bool(flags & S.MINE),
                 lambda: "pair_engine (triton): exclude-after-mining needs mining")
    torch._check(not (flags & S.MINE_ON_COSINE) or (bool(flags & S.MINE) and bool(flags & S.LP_DISTANCE)),
                 lambda: "pair_engine (triton): mine-on-cosine needs mining and the lp distance")
    torch._check(not (flags & S.KEEP_WINDOWS) or not (flags & S.MINE),
                 lambda: "pair_engine (triton): keep windows cannot be combined with mining")
    torch._check(all(float(b) == float(b) for b in terms[_WINDOW_TERMS]),
                 lambda: "pair_engine (triton): the keep windows' bounds must not be NaN")
    torch._check(q.dim() == 2, lambda: f"pair_engine (triton): q must be 2-D (N, D), got shape {tuple(q.shape)}")
    torch._check(q.dtype in _DTYPES, lambda: f"pair_engine (triton): unsupported dtype {q.dtype}")
    torch._check(labels_q.dim() == 1 and labels_q.shape[0] == q.shape[0],
                 lambda: f"pair_engine (triton): labels_q must have shape ({q.shape[0]},)")
    torch._check((r is None) == (labels_r is None), lambda: "pair_engine (triton): r and labels_r go together")
    _check_pair_sizes(q.shape[0], q.shape[0] if r is None else r.shape[0])
    if r is None:
        torch._check(exclude_col is None,
                     lambda: "pair_engine (triton): exclude_col is implied (the diagonal) in self mode")
        return
    torch._check(r.dim() == 2 and r.shape[1] == q.shape[1],
                 lambda: f"pair_engine (triton): r must have shape (M, {q.shape[1]}), got {tuple(r.shape)}")
    torch._check(r.dtype == q.dtype, lambda: "pair_engine (triton): q and r must have the same dtype")
    torch._check(labels_r.dim() == 1 and labels_r.shape[0] == r.shape[0],
                 lambda: f"pair_engine (triton): labels_r must have shape ({r.shape[0]},)")
    if exclude_col is not None:
        torch._check(exclude_col.dim() == 1 and exclude_col.shape[0] == q.shape[0]
                     and exclude_col.dtype == torch.int64,
                     lambda: f"pair_engine (triton): exclude_col must be int64 of shape ({q.shape[0]},)")


def _check_class(q, w, labels, K, terms, flags):
    torch._check(len(terms) == _CLASS_TERMS,
                 lambda: f"class_engine (triton): terms must have {_CLASS_TERMS} entries, got {len(terms)}")
    torch._check((int(flags) & S.WEIGHT_OPERAND_FLAGS) == 0,
                 lambda: "class_engine (triton): takes w as normalized rows (C*K, D); the weight-operand flags are "
                         "applied by fused_pairloss.ops.engines.class_stats")
    torch._check((int(flags) & ~_CLASS_FLAG_MASK) == 0,
                 lambda: f"class_engine (triton): unknown class flag bits {int(flags) & ~_CLASS_FLAG_MASK}")
    torch._check(K >= 1, lambda: f"class_engine (triton): centers_per_class must be >= 1, got {K}")
    torch._check(not (flags & (S.COL_POS_LSE | S.COL_NEG_LSE)) or K == 1,
                 lambda: "class_engine (triton): column reductions need centers_per_class = 1")
    torch._check(q.dim() == 2 and w.dim() == 2, lambda: "class_engine (triton): q and w must be 2-D")
    torch._check(q.shape[1] == w.shape[1],
                 lambda: f"class_engine (triton): q and w must have the same D, got {q.shape[1]} and {w.shape[1]}")
    torch._check(q.dtype == w.dtype,
                 lambda: f"class_engine (triton): q and w must have the same dtype, got {q.dtype} and {w.dtype}")
    torch._check(q.dtype in _DTYPES, lambda: f"class_engine (triton): unsupported dtype {q.dtype}")
    torch._check(w.shape[0] % K == 0,
                 lambda: f"class_engine (triton): w has {w.shape[0]} rows, not a multiple of centers_per_class={K}")
    torch._check(labels.dim() == 1 and labels.shape[0] == q.shape[0] and labels.dtype == torch.int64,
                 lambda: f"class_engine (triton): labels must be int64 of shape ({q.shape[0]},)")


_MAX_PAIR_COLUMNS = 2**31 - 1  # common/op_checks.h kMaxPairColumns: counts are int32
_MAX_GRID_X = 2**31 - 1  # programs along the grid's first axis (CUDA's gridDim.x)


def _check_pair_sizes(N, M):
    torch._check(M <= _MAX_PAIR_COLUMNS,
                 lambda: f"pair_engine: {M} rows of r (self mode: of q) exceed the limit of {_MAX_PAIR_COLUMNS} "
                         f"(2^31 - 1): the per-row set sizes (counts) are int32; N = {N}")


def _check_grid(n, per_program, what):
    programs = -(-n // per_program)
    torch._check(programs <= _MAX_GRID_X,
                 lambda: f"fused_pairloss (triton): {what} = {n} needs {programs} programs of {per_program}, more "
                         f"than the grid limit of {_MAX_GRID_X}; the limit is {_MAX_GRID_X * per_program}")


def _stats(t, rows, n, A, name):
    torch._check(t.dim() == 2 and t.shape[0] == rows and t.shape[1] == n,
                 lambda: f"{name} must have shape ({rows}, {n}), got {tuple(t.shape)}")
    return t.to(A).contiguous()


if _IMPORTED:
    # The interpreter's tl.dot is numpy's matmul, whose BLAS sums an element of a tile otherwise at
    # another position of the tile (or another tile shape): there the S dot is products summed over
    # the chunk (one reduction per element, the same at every position), as a compiled kernel's
    # dot sums an element the same way wherever it sits. Compiled kernels never take this branch.
    _SUMMED_DOT = tl.constexpr(INTERPRETED)
    _NEG_INF = tl.constexpr(float("-inf"))
    _POS_INF = tl.constexpr(float("inf"))
    _NAN = tl.constexpr(float("nan"))
    NTX_DIRECT_ABOVE = tl.constexpr(_NTX_DIRECT_ABOVE)  # pair_terms.inl kNtxDirectAbove
    _HIST_ROW0 = tl.constexpr(len(S.PAIR_VALUES))  # the pair engine's first histogram row in values
    _MUL_RN = tl.constexpr(not INTERPRETED)  # libdevice's mul_rn (the interpreter has no libdevice)

    # ============================================================ shared element / tile functions
    @triton.jit
    def _c(x, ACC: tl.constexpr):
        """An fp64 scalar argument (a declaration constant) rounded once to the stat dtype."""
        return tl.full([], x, ACC)

    @triton.jit
    def _s_tile(a_ptr, b_ptr, a_idx, b_idx, a_ok, b_ok, D, stride_a, stride_b,
                BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
                PREC: tl.constexpr, ACC: tl.constexpr):
        """S[BLOCK_A, BLOCK_B] = a[a_idx] . b[b_idx] (int64 row indices), accumulated in ACC chunk by
        chunk of BLOCK_D. Every kernel of both engines calls it with the same BLOCK_D and the q / batch
        side as `a`, so an element is always summed the same way."""
        acc = tl.zeros([BLOCK_A, BLOCK_B], dtype=ACC)
        a_row = a_ptr + a_idx[:, None] * stride_a
        b_row = b_ptr + b_idx[:, None] * stride_b
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            dm = dd < D
            a = tl.load(a_row + dd[None, :], mask=a_ok[:, None] & dm[None, :], other=0.0)
            b = tl.load(b_row + dd[None, :], mask=b_ok[:, None] & dm[None, :], other=0.0)
            if _SUMMED_DOT:
                acc += tl.sum(a.to(ACC)[:, None, :] * b.to(ACC)[None, :, :], axis=2)
            else:
                acc = tl.dot(a, tl.trans(b), acc, input_precision=PREC, out_dtype=ACC)
        return acc

    @triton.jit
    def _relu_nan(x):
        """torch.relu: NaN stays NaN (pair_terms.inl relu_keep_nan)."""
        return tl.where((x > 0) | (x != x), x, 0.0)

    @triton.jit
    def _sqrt(x):
        if x.dtype == tl.float32:
            return tl.sqrt_rn(x)  # IEEE-rounded (tl.sqrt is an approximation on GPUs)
        else:
            return tl.sqrt(x)

    @triton.jit
    def _div(a, b):
        if b.dtype == tl.float32:
            return tl.div_rn(a, b)
        else:
            return a / b

    @triton.jit
    def _term(v, scale, shift, w_off, w_slope, HINGE: tl.constexpr):
        """(x, dx/dv) of a pair term (loss_spec.h): x = (scale * w(v)) * (v - shift), w(v) =
        relu(w_off + w_slope v) detached; hinge: relu(x) with a NaN x taken as 0 (dropped, as PML's
        AvgNonZeroReducer drops it: pair_terms.inl term_value), and dx/dv = 0 where x <= 0."""
        d = scale * _relu_nan(w_off + w_slope * v)
        x = d * (v - shift)
        if HINGE:
            x = tl.where(x > 0, x, 0.0)
            d = tl.where(x > 0, d, 0.0)
        return x, d

    @triton.jit
    def _lse_fold(m, l, x, mask, AXIS: tl.constexpr):
        """Online LSE along AXIS: fold the masked elements of x into the running (max m, rescaled sum
        l). Empty sets keep (-inf, 0); a NaN member makes the sum NaN (and it stays NaN)."""
        xm = tl.where(mask, x, _NEG_INF)
        m_new = tl.maximum(m, tl.max(xm, axis=AXIS))
        m_safe = tl.where(m_new == _NEG_INF, 0.0, m_new)
        e = tl.exp(xm - tl.expand_dims(m_safe, AXIS))
        return m_new, l * tl.exp(m - m_safe) + tl.sum(e, axis=AXIS)

    @triton.jit
    def _lse_fold2(mp, lp, xp, inp, mn, ln, xn, inn):
        """`_lse_fold` (axis 1) of two disjoint sets at once: one exp per element."""
        mp_new = tl.maximum(mp, tl.max(tl.where(inp, xp, _NEG_INF), axis=1))
        mn_new = tl.maximum(mn, tl.max(tl.where(inn, xn, _NEG_INF), axis=1))
        mp_safe = tl.where(mp_new == _NEG_INF, 0.0, mp_new)
        mn_safe = tl.where(mn_new == _NEG_INF, 0.0, mn_new)
        e = tl.exp(tl.where(inp, xp - mp_safe[:, None], tl.where(inn, xn - mn_safe[:, None], _NEG_INF)))
        lp = lp * tl.exp(mp - mp_safe) + tl.sum(tl.where(inp, e, 0.0), axis=1)
        ln = ln * tl.exp(mn - mn_safe) + tl.sum(tl.where(inn, e, 0.0), axis=1)
        return mp_new, lp, mn_new, ln

    @triton.jit
    def _lse_value(m, l):
        """log-sum-exp from (max, sum): -inf for an empty set, NaN stays NaN."""
        return tl.where(l == 0, _NEG_INF, m + tl.log(tl.where(l == 0, 1.0, l)))

    @triton.jit
    def _acc_grad(acc, g, x_ptr, x_idx, x_ok, x_stride, out_ptr, out_idx, out_ok, D,
                  BLOCK_G: tl.constexpr, ONE_CHUNK: tl.constexpr, GPREC: tl.constexpr):
        """Add g @ x[x_idx] (x upcast exactly to acc's dtype), D in chunks of BLOCK_G, to the register
        accumulator acc (ONE_CHUNK) or to out[out_idx] in memory (rows this program owns: its own
        ordered read-add-write). Returns acc."""
        for d0 in range(0, D, BLOCK_G):
            d = d0 + tl.arange(0, BLOCK_G)
            d_ok = d < D
            xt = tl.load(x_ptr + x_idx[:, None] * x_stride + d[None, :],
                         mask=x_ok[:, None] & d_ok[None, :], other=0.0).to(acc.dtype)
            if ONE_CHUNK:
                acc = tl.dot(g, xt, acc, input_precision=GPREC, out_dtype=acc.dtype)
            else:
                out = out_ptr + out_idx[:, None] * D + d[None, :]
                o_mask = out_ok[:, None] & d_ok[None, :]
                part = tl.load(out, mask=o_mask, other=0.0)
                part = tl.dot(g, xt, part, input_precision=GPREC, out_dtype=acc.dtype)
                tl.store(out, part, mask=o_mask)
        return acc

    @triton.jit
    def _finish_grad(acc, gsum, own_ptr, own_idx, own_ok, own_stride, out_ptr, D,
                     NORM: tl.constexpr, BLOCK_G: tl.constexpr, ONE_CHUNK: tl.constexpr):
        """Store the register accumulator (ONE_CHUNK; cast to out's dtype) and, with NORM (lp), add the
        norms' share -gsum_i x_i of the owned rows x = own[own_idx] (torch's _euclidean_dist_backward)."""
        if ONE_CHUNK:
            d = tl.arange(0, BLOCK_G)
            mask = own_ok[:, None] & (d < D)[None, :]
            if NORM:
                x = tl.load(own_ptr + own_idx[:, None] * own_stride + d[None, :], mask=mask, other=0.0)
                acc = acc - gsum[:, None] * x.to(acc.dtype)
            tl.store(out_ptr + own_idx[:, None] * D + d[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            if NORM:
                for d0 in range(0, D, BLOCK_G):
                    d = d0 + tl.arange(0, BLOCK_G)
                    mask = own_ok[:, None] & (d < D)[None, :]
                    out = out_ptr + own_idx[:, None] * D + d[None, :]
                    x = tl.load(own_ptr + own_idx[:, None] * own_stride + d[None, :], mask=mask, other=0.0)
                    part = tl.load(out, mask=mask, other=0.0)
                    tl.store(out, part - gsum[:, None] * x.to(part.dtype), mask=mask)

    # ================================================================== pair engine: element math
    @triton.jit
    def _pair_sets(lq, lr, ex, rows, cols, rmask, cmask, EXCL: tl.constexpr):
        """(same, P, N) masks of a tile: same label (unmined positives incl. the excluded column),
        same label minus the excluded column, different label. EXCL: 0 none, 1 the diagonal (self
        mode), 2 per-row column `ex` (ref mode, -1 for none)."""
        valid = rmask[:, None] & cmask[None, :]
        eq = lq[:, None] == lr[None, :]
        same = eq & valid
        neg = (lq[:, None] != lr[None, :]) & valid
        if EXCL == 1:
            pos = same & (rows[:, None] != cols[None, :])
        elif EXCL == 2:
            pos = same & (ex[:, None] != cols[None, :])
        else:
            pos = same
        return same, pos, neg

    @triton.jit
    def _rows_d2(q_ptr, r_ptr, rows, cols, rmask, cmask, D, stride_q, stride_r,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr):
        """Squared distances of a tile from the rows' differences, summed over k in order in ACC (as
        the C++ engines' near pairs: pair_terms.inl)."""
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
        for k in range(0, D):
            a = tl.load(q_ptr + rows * stride_q + k, mask=rmask, other=0.0).to(ACC)
            b = tl.load(r_ptr + cols * stride_r + k, mask=cmask, other=0.0).to(ACC)
            diff = a[:, None] - b[None, :]
            acc += diff * diff
        return acc

    @triton.jit
    def _pair_v(q_ptr, r_ptr, rows, cols, rmask, cmask, nq, nr, D, stride_q, stride_r,
                LP: tl.constexpr, EXCL: tl.constexpr, PREC: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr):
        """v of a tile: S, or PML's LpDistance sqrt(max(d2, 0)) (NaN stays) with d2 = |q_i|^2 + |r_j|^2 -
        2 S, the near pairs' d2 from the rows' differences (docs/design.md "Numerics"; a tile holds
        one only for duplicates and near-duplicates; the self pair of self mode (EXCL 1) is 0)."""
        s = _s_tile(q_ptr, r_ptr, rows, cols, rmask, cmask, D, stride_q, stride_r,
                    BLOCK_M, BLOCK_N, BLOCK_D, PREC, ACC)
        if LP:
            norms = nq[:, None] + nr[None, :]
            d2 = norms - 2.0 * s
            near = (d2 < norms * 0.03125) & rmask[:, None] & cmask[None, :]  # 1/32: pair_terms.inl kLpNearPair
            if EXCL == 1:
                self_pair = rows[:, None] == cols[None, :]
                d2 = tl.where(self_pair, 0.0, d2)
                near = near & ~self_pair
            if tl.max(near.to(tl.int32)) > 0:
                d2 = tl.where(near, _rows_d2(q_ptr, r_ptr, rows, cols, rmask, cmask, D, stride_q, stride_r,
                                             BLOCK_M, BLOCK_N, ACC), d2)
            s = tl.where(d2 != d2, d2, tl.where(d2 > 0, _sqrt(tl.where(d2 > 0, d2, 1.0)), 0.0))
        return s

    @triton.jit
    def _load_or_zeros(ptr, idx, ok, ON: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
        if ON:
            x = tl.load(ptr + idx, mask=ok, other=0.0)
        else:
            x = tl.zeros([BLOCK], ACC)
        return x

    @triton.jit
    def _row_shifts(psh, nsh, rs_ptr, rows, rmask, RSHIFT: tl.constexpr, BLOCK_M: tl.constexpr, ACC: tl.constexpr):
        """The terms' shifts of a tile's rows, a column: the declaration's plus each row's own (the
        op's row_shift with RSHIFT, else 0, so the type is the same either way)."""
        rsh = _load_or_zeros(rs_ptr, rows, rmask, RSHIFT, BLOCK_M, ACC)
        return psh + rsh[:, None], nsh + rsh[:, None]

    @triton.jit
    def _pair_side(lab_ptr, ex_ptr, norm_ptr, idx, ok, EXCL: tl.constexpr, LP: tl.constexpr,
                   BLOCK: tl.constexpr, ACC: tl.constexpr):
        """Labels, excluded column (EXCL 2; else the index itself) and squared norms (lp) of rows idx."""
        lab = tl.load(lab_ptr + idx, mask=ok, other=0)
        if EXCL == 2:
            ex = tl.load(ex_ptr + idx, mask=ok, other=-1)
        else:
            ex = idx
        return lab, ex, _load_or_zeros(norm_ptr, idx, ok, LP, BLOCK, ACC)

    @triton.jit
    def _mining_u(v, LP: tl.constexpr, MCOS: tl.constexpr):
        """The miner compares similarities: u = S, or u = -d (exact) for the distance, or for a cosine
        miner beside the distance (MCOS) u = -d^2 / 2 = S - 1 on normalized rows."""
        if LP:
            if MCOS:
                u = -(v * v) * 0.5
            else:
                u = -v
        else:
            u = v
        return u

    @triton.jit
    def _pair_consts(k_ps, k_psh, k_pwo, k_pws, k_ns, k_nsh, k_nwo, k_nws, k_eps, k_tp, k_tn, k_tiny,
                     ACC: tl.constexpr):
        return (_c(k_ps, ACC), _c(k_psh, ACC), _c(k_pwo, ACC), _c(k_pws, ACC), _c(k_ns, ACC), _c(k_nsh, ACC),
                _c(k_nwo, ACC), _c(k_nws, ACC), _c(k_eps, ACC), _c(k_tp, ACC), _c(k_tn, ACC), _c(k_tiny, ACC))

    @triton.jit
    def _exp_weight(k, x, T):
        """w = exp(T x) of the kept pairs with x > 0 (an exp-weighted sum, loss_spec.h), 1 elsewhere."""
        return tl.exp(T * tl.where(k & (x > 0), x, 0.0))

    @triton.jit
    def _pair_dterms(v, ps, psh, pwo, pws, ns, nsh, nwo, nws, POS_HINGE: tl.constexpr, NEG_HINGE: tl.constexpr,
                     LP: tl.constexpr):
        """(x_pos, x_neg, dx_pos/dS, dx_neg/dS) of a tile: dx/dv times dv/dS (lp: -1/d, 0 at d = 0)."""
        xp, dxp = _term(v, ps, psh, pwo, pws, POS_HINGE)
        xn, dxn = _term(v, ns, nsh, nwo, nws, NEG_HINGE)
        if LP:
            dv = tl.where((v > 0) | (v != v), _div(tl.zeros_like(v) - 1.0, v), 0.0)
            dxp = dxp * dv
            dxn = dxn * dv
        return xp, xn, dxp, dxn

    @triton.jit
    def _mined(pos, neg, u, mnp, mxn, eps, MINE: tl.constexpr):
        """Kept pairs (MultiSimilarityMiner): positives with u - eps < max_neg, negatives with
        u + eps > min_pos (thresholds pre-broadcast: [R, 1] or [1, C])."""
        if MINE:
            pos = pos & (u - eps < mxn)
            neg = neg & (u + eps > mnp)
        return pos, neg

    @triton.jit
    def _windowed(kp, kn, v, pwl, pwh, nwl, nwh, WIN: tl.constexpr):
        """PairMarginMiner's keep windows (loss_spec.h kKeepWindows): kept where lo < v < hi of the set's
        window (a NaN v in none)."""
        if WIN:
            kp = kp & (v > pwl) & (v < pwh)
            kn = kn & (v > nwl) & (v < nwh)
        return kp, kn

    @triton.jit
    def _mul_rn(a, b):
        """a * b rounded on its own: the GPU compiler contracts a plain product and a following add
        into an FMA, which would move a histogram node (and a pair's bin) off the CPU kernels' and
        PML's (numpy, under the interpreter, never contracts)."""
        if _MUL_RN:
            return libdevice.mul_rn(a, b)
        else:
            return a * b

    @triton.jit
    def _hist_pulses(v, hlo, hiw, hdf, hlof, NODES, HSQ: tl.constexpr, HPML: tl.constexpr):
        """Each pair's place in the histogram (loss_spec.h hist_nodes, kernels_isa.inc histogram_add):
        node a = ra gets wa, node b = ra + 1 gets wb where ok_a / ok_b; `inside` marks the pairs with
        a node in reach (NaN pairs never: they make node 0 NaN). Plain: u = (h - lo) inv_width, h = v
        or v^2, ra = floor(u), wb = u - ra, wa = 1 - wb, nodes outside [0, NODES) dropped. PML's bins
        (HPML): ra = floor((float(v) - lo) / delta) in float, clamped to [0, NODES - 2], node
        positions float(k) * delta; wb = ((v - lo) - node_ra) inv_width, wa = (float(node_b + lo) - v)
        inv_width."""
        nan = v != v
        if HPML:
            vs = tl.where(nan, 0.0, v)
            t = _div(vs.to(tl.float32) - hlof, hdf)
            ra = tl.minimum(tl.maximum(tl.floor(t), 0.0), NODES - 2).to(tl.int32)
            node_a = _mul_rn(ra.to(tl.float32), hdf)
            node_b = _mul_rn((ra + 1).to(tl.float32), hdf)
            wb = ((vs - hlo) - node_a.to(v.dtype)) * hiw
            wa = ((node_b + hlof).to(v.dtype) - vs) * hiw
            inside = ~nan
            ok_a = inside
            ok_b = inside
        else:
            if HSQ:
                h = _mul_rn(v, v)
            else:
                h = v
            u = (h - hlo) * hiw
            inside = (u > -1.0) & (u < NODES)
            us = tl.where(inside, u, 0.0)
            fl = tl.floor(us)
            ra = fl.to(tl.int32)
            wb = us - fl
            wa = 1.0 - wb
            ok_a = inside & (ra >= 0)
            ok_b = inside & (ra + 1 < NODES)
        return ra, wa, wb, ok_a, ok_b, inside

    @triton.jit
    def _hist_add(hb, N, NODES, ra, wa, wb, ok_a, ok_b, keep, rmask):
        """Add the kept pairs' pulses of a tile to their rows' histogram (node k at hb + k N, hb the
        rows' pointers; slots zeroed by the host), visiting only the nodes some pair reaches. Atomic
        adds: the slots are this program's alone (or its split's), so no other program races them;
        the atomics keep the adds of one program's threads from racing each other."""
        a = keep & ok_a
        b = keep & ok_b
        lo = tl.minimum(tl.min(tl.where(a, ra, NODES)), tl.min(tl.where(b, ra + 1, NODES)))
        hi = tl.maximum(tl.max(tl.where(a, ra + 1, 0)), tl.max(tl.where(b, ra + 2, 0)))
        for k in range(lo, hi):
            w = tl.where(a & (ra == k), wa, 0.0) + tl.where(b & (ra + 1 == k), wb, 0.0)
            tl.atomic_add(hb + k * N, tl.sum(w, axis=1), mask=rmask, sem="relaxed")

    @triton.jit
    def _hist_grad(gh_ptr, N, NODES, v, kp, kn, idx, hlo, hiw, hdf, hlof,
                   HSQ: tl.constexpr, HPML: tl.constexpr, LP: tl.constexpr):
        """d/dS of sum_k g_k hist_k for a tile (kernels_isa.inc histogram_grad_row): the slope of the
        pair's segment, (g_b - g_a) inv_width, times dh/dv (1, or 2 v) and dv/dS (lp: -1/d). g of
        row idx (pre-broadcast [R, 1] or [1, C]) at gh_ptr + (set NODES + k) N + idx. Plain: 0 on a
        node (f = 0) and a node out of range reads as 0; PML's bins: the segment's slope on the node
        too."""
        ra, wa, wb, ok_a, ok_b, inside = _hist_pulses(v, hlo, hiw, hdf, hlof, NODES, HSQ, HPML)
        act = (kp | kn) & inside
        if not HPML:
            act = act & (wb != 0)
        base = gh_ptr + idx + tl.where(kp, 0, NODES).to(tl.int64) * N
        ga = tl.load(base + ra.to(tl.int64) * N, mask=act & ok_a, other=0.0)
        gb = tl.load(base + (ra + 1).to(tl.int64) * N, mask=act & ok_b, other=0.0)
        if HSQ:
            dh = (v + v) * hiw
        else:
            dh = tl.zeros_like(v) + hiw
        if LP:
            dh = dh * tl.where((v > 0) | (v != v), _div(tl.zeros_like(v) - 1.0, v), 0.0)
        return tl.where(act, (gb - ga) * dh, 0.0)

    @triton.jit
    def _log1p(y):
        """log(1 + y) for y >= 0, accurate for small y (Goldberg's trick; no log1p in the interpreter)."""
        u = 1.0 + y
        return tl.where(u == 1.0, y, tl.log(u) * (y / tl.where(u == 1.0, 1.0, u - 1.0)))

    @triton.jit
    def _sigmoid(t):
        """exp(-softplus(-t)) (pair_terms.inl ntx_sigmoid); NaN stays NaN."""
        a = tl.abs(t)
        sp = tl.where(t < 0, -t, 0.0) + _log1p(tl.exp(-a))
        return tl.where(t != t, t, tl.exp(-sp))

    @triton.jit
    def _softplus(x):
        """log(1 + e^x) (pair_terms.inl softplus_value); NaN stays NaN."""
        return tl.where(x > 0, x, 0.0) + _log1p(tl.exp(-tl.abs(x)))

    @triton.jit
    def _ntx_loss(t, tiny):
        """NTXent's pair term -log(sigmoid(t) + tiny), t = x - lse_neg_i: as PML computes it where
        log sigmoid(t) > NTX_DIRECT_ABOVE, else in log space, -logaddexp(log sigmoid(t), log tiny)
        (pair_terms.inl ntx_pair_loss)."""
        ls = -_softplus(-t)
        lt = tl.log(tiny)
        hi = tl.where(ls > lt, ls, lt)
        lo = tl.where(ls > lt, lt, ls)
        log_space = -(hi + _log1p(tl.exp(lo - hi)))
        return tl.where(ls <= NTX_DIRECT_ABOVE, log_space, -tl.log(_sigmoid(t) + tiny))

    @triton.jit
    def _ntx_dloss(t, tiny):
        """-sigmoid (1 - sigmoid) / (sigmoid + tiny) (pair_terms.inl ntx_pair_dloss)."""
        ls = -_softplus(-t)
        sg = _sigmoid(t)
        direct = -(sg * _sigmoid(-t)) / (sg + tiny)
        return tl.where(ls <= NTX_DIRECT_ABOVE, -_sigmoid(-t) * tl.exp(ls + _ntx_loss(t, tiny)), direct)

    @triton.jit
    def _pair_grad(kp, kn, xp, xn, db_p, db_n, glp, gln, gsp, gsn, gx, lsp, lsn, gwp, gwn, tp, tn, tiny,
                   POS_LSE: tl.constexpr, POS_SUM: tl.constexpr, NEG_LSE: tl.constexpr,
                   NEG_SUM: tl.constexpr, NTX: tl.constexpr, POS_EXPW: tl.constexpr, NEG_EXPW: tl.constexpr):
        """G = dL/dS on a tile for the kept pairs kp / kn, as kernels_isa.inc pair_backward_impl:
        (grad_lse_s exp(x - lse_s) [LSE] + grad_sum_s [SUM]) * db_s, db_s = dx_s/dv dv/dS (an exp-weighted
        sum, w = exp(T x): w (grad_sum_s (1 + T x) + grad_weight_s T) in place of grad_sum_s), and for
        kept positives (NTX) + grad_pos_vs_neg dphi(x - lse_neg) db_pos. The row statistics come
        pre-broadcast ([R, 1] or [1, C]), so the same code gives G_IJ (statistics of I) and G_JI^T
        (statistics of J) in self mode; gln already holds grad_lse_neg + grad_pos_vs_neg * aux[2].
        exp only of the LSE members (no overflow from pairs outside them); a pair in no set gets
        (0 + 0) * db_neg, which is 0 unless its S is NaN (NaN propagates as in the C++ kernels)."""
        if POS_LSE and NEG_LSE:
            arg = tl.where(kp, xp - lsp, tl.where(kn, xn - lsn, _NEG_INF))
        elif POS_LSE:
            arg = tl.where(kp, xp - lsp, _NEG_INF)
        elif NEG_LSE:
            arg = tl.where(kn, xn - lsn, _NEG_INF)
        if POS_LSE or NEG_LSE:
            g = tl.where(kp, glp, gln) * tl.exp(arg)
        else:
            g = tl.zeros_like(xp)
        if POS_EXPW:
            g = tl.where(kp, g + _exp_weight(kp, xp, tp) * (gsp * (1.0 + tp * xp) + gwp * tp), g)
        elif POS_SUM:
            g = tl.where(kp, g + gsp, g)
        if NEG_EXPW:
            g = tl.where(kn, g + _exp_weight(kn, xn, tn) * (gsn * (1.0 + tn * xn) + gwn * tn), g)
        elif NEG_SUM:
            g = tl.where(kn, g + gsn, g)
        g = g * tl.where(kp, db_p, db_n)
        if NTX:
            g = tl.where(kp, g + (gx * _ntx_dloss(xp - lsn, tiny)) * db_p, g)
        return g

    @triton.jit
    def _load_row_stats(st_ptr, idx, ok, N):
        """The backward's per-row statistics [11, N] (host `_pair_backward`): grad lse_pos, grad
        lse_neg (+ NTXent's share), grad sum_pos, grad sum_neg, grad pos_vs_neg, lse_pos, lse_neg,
        min_pos, max_neg, grad weight_pos, grad weight_neg."""
        N = tl.cast(N, tl.int64)  # k * N passes 2^31 for N > 2^28
        glp = tl.load(st_ptr + idx, mask=ok, other=0.0)
        gln = tl.load(st_ptr + N + idx, mask=ok, other=0.0)
        gsp = tl.load(st_ptr + 2 * N + idx, mask=ok, other=0.0)
        gsn = tl.load(st_ptr + 3 * N + idx, mask=ok, other=0.0)
        gx = tl.load(st_ptr + 4 * N + idx, mask=ok, other=0.0)
        lsp = tl.load(st_ptr + 5 * N + idx, mask=ok, other=0.0)
        lsn = tl.load(st_ptr + 6 * N + idx, mask=ok, other=0.0)
        mnp = tl.load(st_ptr + 7 * N + idx, mask=ok, other=0.0)
        mxn = tl.load(st_ptr + 8 * N + idx, mask=ok, other=0.0)
        gwp = tl.load(st_ptr + 9 * N + idx, mask=ok, other=0.0)
        gwn = tl.load(st_ptr + 10 * N + idx, mask=ok, other=0.0)
        return glp, gln, gsp, gsn, gx, lsp, lsn, mnp, mxn, gwp, gwn

    # ======================================================================= pair engine: kernels
    @triton.jit
    def _pair_fwd_kernel(q_ptr, r_ptr, lq_ptr, lr_ptr, ex_ptr, nq_ptr, nr_ptr, rs_ptr, thr_ptr, lsen_ptr,
                         val_ptr, cnt_ptr, aux_ptr, N, M, D, stride_q, stride_r,
                         split_v, split_c, split_a,
                         k_ps: tl.float64, k_psh: tl.float64, k_pwo: tl.float64, k_pws: tl.float64,
                         k_ns: tl.float64, k_nsh: tl.float64, k_nwo: tl.float64, k_nws: tl.float64,
                         k_eps: tl.float64, k_tp: tl.float64, k_tn: tl.float64, k_tiny: tl.float64,
                         k_pwl: tl.float64, k_pwh: tl.float64, k_nwl: tl.float64, k_nwh: tl.float64,
                         NODES, k_hlo: tl.float64, k_hiw: tl.float64, k_hdf: tl.float64,
                         WALK_THRESH: tl.constexpr, WALK_MAIN: tl.constexpr, WALK_NTX: tl.constexpr,
                         EXCL: tl.constexpr, LP: tl.constexpr, MINE: tl.constexpr, EAM: tl.constexpr,
                         RSHIFT: tl.constexpr,
                         MCOS: tl.constexpr, WIN: tl.constexpr, NTX: tl.constexpr, POS_LSE: tl.constexpr,
                         POS_SUM: tl.constexpr, POS_HINGE: tl.constexpr, NEG_LSE: tl.constexpr, NEG_SUM: tl.constexpr,
                         NEG_HINGE: tl.constexpr, POS_EXPW: tl.constexpr, NEG_EXPW: tl.constexpr,
                         HIST: tl.constexpr, HSQ: tl.constexpr, HPML: tl.constexpr,
                         PREC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Program (row block, split s) walks the column tiles s, s + SPLIT, ... and writes its row
        statistics to slice s of values / counts / aux (layout of the op's outputs; SPLIT = 1: the
        outputs themselves). Walks: THRESH (mining thresholds; else, with MINE, read from thr_ptr),
        MAIN (with HIST also the histograms, added into value rows the host zeroed), NTX (lse_neg
        from MAIN in registers, else read from lsen_ptr). RSHIFT: rs_ptr holds the rows' shifts."""
        ACC: tl.constexpr = val_ptr.dtype.element_ty
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < N
        split = tl.program_id(1).to(tl.int64)
        n_first = split * BLOCK_N  # int64 walks: n0 + n_step must not wrap for M near 2^31
        n_step = tl.num_programs(1) * BLOCK_N
        N = tl.cast(N, tl.int64)  # the slots k * N of the outputs pass 2^31 for N > 2^28
        vb = val_ptr + split * split_v + rows
        cb = cnt_ptr + split * split_c + rows
        ab = aux_ptr + split * split_a + rows
        lq, ex, nq = _pair_side(lq_ptr, ex_ptr, nq_ptr, rows, rmask, EXCL, LP, BLOCK_M, ACC)
        ps, psh, pwo, pws, ns, nsh, nwo, nws, eps, tp, tn, tiny = _pair_consts(
            k_ps, k_psh, k_pwo, k_pws, k_ns, k_nsh, k_nwo, k_nws, k_eps, k_tp, k_tn, k_tiny, ACC)
        psh, nsh = _row_shifts(psh, nsh, rs_ptr, rows, rmask, RSHIFT, BLOCK_M, ACC)
        pwl, pwh, nwl, nwh = _c(k_pwl, ACC), _c(k_pwh, ACC), _c(k_nwl, ACC), _c(k_nwh, ACC)
        hlo, hiw = _c(k_hlo, ACC), _c(k_hiw, ACC)
        hdf, hlof = _c(k_hdf, tl.float32), _c(k_hlo, tl.float32)

        min_pos = tl.full([BLOCK_M], _POS_INF, ACC)
        max_neg = tl.full([BLOCK_M], _NEG_INF, ACC)
        if WALK_THRESH:  # mining thresholds over the unmined sets (u = v, or -d for lp)
            nan_p = tl.zeros([BLOCK_M], tl.int32)
            nan_n = tl.zeros([BLOCK_M], tl.int32)
            for n0 in range(n_first, M, n_step):
                cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
                cmask = cols < M
                lr = tl.load(lr_ptr + cols, mask=cmask, other=0)
                same, pos, neg = _pair_sets(lq, lr, ex, rows, cols, rmask, cmask, EXCL)
                nr = _load_or_zeros(nr_ptr, cols, cmask, LP, BLOCK_N, ACC)
                v = _pair_v(q_ptr, r_ptr, rows, cols, rmask, cmask, nq, nr, D, stride_q, stride_r,
                            LP, EXCL, PREC, BLOCK_D, BLOCK_M, BLOCK_N, ACC)
                u = _mining_u(v, LP, MCOS)
                if EAM:
                    pm = same
                else:
                    pm = pos
                num = u == u
                min_pos = tl.minimum(min_pos, tl.min(tl.where(pm & num, u, _POS_INF), axis=1))
                max_neg = tl.maximum(max_neg, tl.max(tl.where(neg & num, u, _NEG_INF), axis=1))
                nan_p = tl.maximum(nan_p, tl.max(tl.where(pm & ~num, 1, 0), axis=1))
                nan_n = tl.maximum(nan_n, tl.max(tl.where(neg & ~num, 1, 0), axis=1))
            min_pos = tl.where(nan_p > 0, _NAN, min_pos)
            max_neg = tl.where(nan_n > 0, _NAN, max_neg)
            tl.store(ab, min_pos, mask=rmask)
            tl.store(ab + N, max_neg, mask=rmask)
        elif MINE:
            min_pos = tl.load(thr_ptr + rows, mask=rmask, other=_POS_INF)
            max_neg = tl.load(thr_ptr + N + rows, mask=rmask, other=_NEG_INF)

        lse_neg = tl.full([BLOCK_M], _NEG_INF, ACC)
        if WALK_MAIN:
            mp = tl.full([BLOCK_M], _NEG_INF, ACC)
            lp = tl.zeros([BLOCK_M], ACC)
            mn = tl.full([BLOCK_M], _NEG_INF, ACC)
            ln = tl.zeros([BLOCK_M], ACC)
            sp = tl.zeros([BLOCK_M], ACC)
            sn = tl.zeros([BLOCK_M], ACC)
            wp = tl.zeros([BLOCK_M], ACC)
            wn = tl.zeros([BLOCK_M], ACC)
            cp = tl.zeros([BLOCK_M], tl.int32)
            cn = tl.zeros([BLOCK_M], tl.int32)
            zp = tl.zeros([BLOCK_M], tl.int32)
            zn = tl.zeros([BLOCK_M], tl.int32)
            nan_hp = tl.zeros([BLOCK_M], tl.int32)  # HIST: a kept pair with a NaN v
            nan_hn = tl.zeros([BLOCK_M], tl.int32)
            for n0 in range(n_first, M, n_step):
                cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
                cmask = cols < M
                lr = tl.load(lr_ptr + cols, mask=cmask, other=0)
                same, pos, neg = _pair_sets(lq, lr, ex, rows, cols, rmask, cmask, EXCL)
                nr = _load_or_zeros(nr_ptr, cols, cmask, LP, BLOCK_N, ACC)
                v = _pair_v(q_ptr, r_ptr, rows, cols, rmask, cmask, nq, nr, D, stride_q, stride_r,
                            LP, EXCL, PREC, BLOCK_D, BLOCK_M, BLOCK_N, ACC)
                u = _mining_u(v, LP, MCOS)
                kp, kn = _mined(pos, neg, u, min_pos[:, None], max_neg[:, None], eps, MINE)
                kp, kn = _windowed(kp, kn, v, pwl, pwh, nwl, nwh, WIN)
                xp, _dp = _term(v, ps, psh, pwo, pws, POS_HINGE)
                xn, _dn = _term(v, ns, nsh, nwo, nws, NEG_HINGE)
                if POS_LSE and NEG_LSE:
                    mp, lp, mn, ln = _lse_fold2(mp, lp, xp, kp, mn, ln, xn, kn)
                elif POS_LSE:
                    mp, lp = _lse_fold(mp, lp, xp, kp, 1)
                elif NEG_LSE:
                    mn, ln = _lse_fold(mn, ln, xn, kn, 1)
                if POS_EXPW:  # exp-weighted: w x and w over x > 0 (hinge terms: x >= 0)
                    e = _exp_weight(kp, xp, tp)
                    sp += tl.sum(tl.where(kp, e * xp, 0.0), axis=1)
                    wp += tl.sum(tl.where(kp & (xp > 0), e, 0.0), axis=1)
                elif POS_SUM:
                    sp += tl.sum(tl.where(kp, xp, 0.0), axis=1)
                if NEG_EXPW:
                    e = _exp_weight(kn, xn, tn)
                    sn += tl.sum(tl.where(kn, e * xn, 0.0), axis=1)
                    wn += tl.sum(tl.where(kn & (xn > 0), e, 0.0), axis=1)
                elif NEG_SUM:
                    sn += tl.sum(tl.where(kn, xn, 0.0), axis=1)
                if POS_SUM:
                    zp += tl.sum((kp & (xp > 0)).to(tl.int32), axis=1)
                if NEG_SUM:
                    zn += tl.sum((kn & (xn > 0)).to(tl.int32), axis=1)
                cp += tl.sum(kp.to(tl.int32), axis=1)
                cn += tl.sum(kn.to(tl.int32), axis=1)
                if HIST:  # positives' histogram in value rows 7.., the negatives' NODES rows later
                    ra, wa, wb, ok_a, ok_b, _inside = _hist_pulses(v, hlo, hiw, hdf, hlof, NODES, HSQ, HPML)
                    _hist_add(vb + _HIST_ROW0 * N, N, NODES, ra, wa, wb, ok_a, ok_b, kp, rmask)
                    _hist_add(vb + (_HIST_ROW0 + NODES) * N, N, NODES, ra, wa, wb, ok_a, ok_b, kn, rmask)
                    nan_hp = tl.maximum(nan_hp, tl.max((kp & (v != v)).to(tl.int32), axis=1))
                    nan_hn = tl.maximum(nan_hn, tl.max((kn & (v != v)).to(tl.int32), axis=1))
            if HIST:  # NaN in, NaN out: node 0 of a row with a NaN pair
                tl.atomic_add(vb + _HIST_ROW0 * N, tl.where(nan_hp > 0, _NAN, 0.0).to(ACC), mask=rmask, sem="relaxed")
                tl.atomic_add(vb + (_HIST_ROW0 + NODES) * N, tl.where(nan_hn > 0, _NAN, 0.0).to(ACC), mask=rmask,
                              sem="relaxed")
            lse_neg = _lse_value(mn, ln)
            tl.store(vb, _lse_value(mp, lp), mask=rmask)
            tl.store(vb + N, lse_neg, mask=rmask)
            tl.store(vb + 2 * N, sp, mask=rmask)
            tl.store(vb + 3 * N, sn, mask=rmask)
            tl.store(vb + 5 * N, wp, mask=rmask)
            tl.store(vb + 6 * N, wn, mask=rmask)
            tl.store(cb, cp, mask=rmask)
            tl.store(cb + N, cn, mask=rmask)
            tl.store(cb + 2 * N, zp, mask=rmask)
            tl.store(cb + 3 * N, zn, mask=rmask)
            # the slots of walks the declaration does not have
            if not MINE:
                tl.store(ab, min_pos, mask=rmask)
                tl.store(ab + N, max_neg, mask=rmask)
            if not NTX:
                tl.store(vb + 4 * N, tl.zeros([BLOCK_M], ACC), mask=rmask)
                tl.store(ab + 2 * N, tl.zeros([BLOCK_M], ACC), mask=rmask)
        elif WALK_NTX:
            lse_neg = tl.load(lsen_ptr + rows, mask=rmask, other=_NEG_INF)

        if WALK_NTX:  # NTXent: the kept positives against the row's final lse_neg
            ntx = tl.zeros([BLOCK_M], ACC)
            dl = tl.zeros([BLOCK_M], ACC)
            for n0 in range(n_first, M, n_step):
                cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
                cmask = cols < M
                lr = tl.load(lr_ptr + cols, mask=cmask, other=0)
                same, pos, neg = _pair_sets(lq, lr, ex, rows, cols, rmask, cmask, EXCL)
                if tl.sum(pos.to(tl.int32)) > 0:  # tiles without a positive: skipped (labels only)
                    nr = _load_or_zeros(nr_ptr, cols, cmask, LP, BLOCK_N, ACC)
                    v = _pair_v(q_ptr, r_ptr, rows, cols, rmask, cmask, nq, nr, D, stride_q, stride_r,
                                LP, EXCL, PREC, BLOCK_D, BLOCK_M, BLOCK_N, ACC)
                    u = _mining_u(v, LP, MCOS)
                    kp, kn = _mined(pos, neg, u, min_pos[:, None], max_neg[:, None], eps, MINE)
                    kp, kn = _windowed(kp, kn, v, pwl, pwh, nwl, nwh, WIN)
                    xp, _dp = _term(v, ps, psh, pwo, pws, POS_HINGE)
                    t = xp - lse_neg[:, None]
                    ntx += tl.sum(tl.where(kp, _ntx_loss(t, tiny), 0.0), axis=1)
                    dl -= tl.sum(tl.where(kp, _ntx_dloss(t, tiny), 0.0), axis=1)
            tl.store(vb + 4 * N, ntx, mask=rmask)
            tl.store(ab + 2 * N, dl, mask=rmask)

    @triton.jit
    def _pair_bwd_rows_kernel(q_ptr, r_ptr, lq_ptr, lr_ptr, ex_ptr, nq_ptr, nr_ptr, rs_ptr, st_ptr, gh_ptr, out_ptr,
                              N, M, D, stride_q, stride_r, split_o,
                              k_ps: tl.float64, k_psh: tl.float64, k_pwo: tl.float64, k_pws: tl.float64,
                              k_ns: tl.float64, k_nsh: tl.float64, k_nwo: tl.float64, k_nws: tl.float64,
                              k_eps: tl.float64, k_tp: tl.float64, k_tn: tl.float64, k_tiny: tl.float64,
                              k_pwl: tl.float64, k_pwh: tl.float64, k_nwl: tl.float64, k_nwh: tl.float64,
                              NODES, k_hlo: tl.float64, k_hiw: tl.float64, k_hdf: tl.float64,
                              SELF: tl.constexpr, EXCL: tl.constexpr, LP: tl.constexpr, MINE: tl.constexpr,
                              RSHIFT: tl.constexpr, MCOS: tl.constexpr, WIN: tl.constexpr, NTX: tl.constexpr,
                              POS_LSE: tl.constexpr,
                              POS_SUM: tl.constexpr, POS_HINGE: tl.constexpr, NEG_LSE: tl.constexpr,
                              NEG_SUM: tl.constexpr,
                              NEG_HINGE: tl.constexpr, POS_EXPW: tl.constexpr, NEG_EXPW: tl.constexpr,
                              HIST: tl.constexpr, HSQ: tl.constexpr, HPML: tl.constexpr,
                              PREC: tl.constexpr, GPREC: tl.constexpr,
                              BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr, ONE_CHUNK: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """grad_q[I] (slice s of the output) = sum over the column tiles J = s, s + SPLIT, ... of
        G_IJ r_J (ref mode) or (G_IJ + G_JI) q_J (self mode: r = q), plus the lp norms' share. HIST:
        the histograms' incoming gradients [2 NODES, N] at gh_ptr."""
        ACC: tl.constexpr = st_ptr.dtype.element_ty
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < N
        out_ptr += tl.program_id(1).to(tl.int64) * split_o
        lq, ex, nq = _pair_side(lq_ptr, ex_ptr, nq_ptr, rows, rmask, EXCL, LP, BLOCK_M, ACC)
        ps, psh, pwo, pws, ns, nsh, nwo, nws, eps, tp, tn, tiny = _pair_consts(
            k_ps, k_psh, k_pwo, k_pws, k_ns, k_nsh, k_nwo, k_nws, k_eps, k_tp, k_tn, k_tiny, ACC)
        pwl, pwh, nwl, nwh = _c(k_pwl, ACC), _c(k_pwh, ACC), _c(k_nwl, ACC), _c(k_nwh, ACC)
        hlo, hiw = _c(k_hlo, ACC), _c(k_hiw, ACC)
        hdf, hlof = _c(k_hdf, tl.float32), _c(k_hlo, tl.float32)
        N64 = tl.cast(N, tl.int64)
        glp, gln, gsp, gsn, gx, lsp, lsn, mnp, mxn, gwp, gwn = _load_row_stats(st_ptr, rows, rmask, N)
        psh_i, nsh_i = _row_shifts(psh, nsh, rs_ptr, rows, rmask, RSHIFT, BLOCK_M, ACC)
        acc = tl.zeros([BLOCK_M, BLOCK_G], ACC)
        gsum = tl.zeros([BLOCK_M], ACC)
        for n0 in range(tl.program_id(1).to(tl.int64) * BLOCK_N, M, tl.num_programs(1) * BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
            cmask = cols < M
            lr = tl.load(lr_ptr + cols, mask=cmask, other=0)
            same, pos, neg = _pair_sets(lq, lr, ex, rows, cols, rmask, cmask, EXCL)
            nr = _load_or_zeros(nr_ptr, cols, cmask, LP, BLOCK_N, ACC)
            v = _pair_v(q_ptr, r_ptr, rows, cols, rmask, cmask, nq, nr, D, stride_q, stride_r,
                        LP, EXCL, PREC, BLOCK_D, BLOCK_M, BLOCK_N, ACC)
            u = _mining_u(v, LP, MCOS)
            xp, xn, db_p, db_n = _pair_dterms(v, ps, psh_i, pwo, pws, ns, nsh_i, nwo, nws, POS_HINGE, NEG_HINGE, LP)
            kp, kn = _mined(pos, neg, u, mnp[:, None], mxn[:, None], eps, MINE)
            kp, kn = _windowed(kp, kn, v, pwl, pwh, nwl, nwh, WIN)
            g = _pair_grad(kp, kn, xp, xn, db_p, db_n, glp[:, None], gln[:, None],
                           gsp[:, None], gsn[:, None], gx[:, None], lsp[:, None], lsn[:, None],
                           gwp[:, None], gwn[:, None], tp, tn, tiny,
                           POS_LSE, POS_SUM, NEG_LSE, NEG_SUM, NTX, POS_EXPW, NEG_EXPW)
            if HIST:
                g += _hist_grad(gh_ptr, N64, NODES, v, kp, kn, rows[:, None], hlo, hiw, hdf, hlof, HSQ, HPML, LP)
            if SELF:  # G_JI from row J's statistics and mining masks, on the same (symmetric) S tile
                glp_j, gln_j, gsp_j, gsn_j, gx_j, lsp_j, lsn_j, mnp_j, mxn_j, gwp_j, gwn_j = _load_row_stats(
                    st_ptr, cols, cmask, N)
                if RSHIFT:  # row J's terms have their own shifts (a row of the tile)
                    rsh_j = tl.load(rs_ptr + cols, mask=cmask, other=0.0)
                    xp, xn, db_p, db_n = _pair_dterms(v, ps, psh + rsh_j[None, :], pwo, pws, ns,
                                                      nsh + rsh_j[None, :], nwo, nws, POS_HINGE, NEG_HINGE, LP)
                kp_j, kn_j = _mined(pos, neg, u, mnp_j[None, :], mxn_j[None, :], eps, MINE)
                kp_j, kn_j = _windowed(kp_j, kn_j, v, pwl, pwh, nwl, nwh, WIN)
                g += _pair_grad(kp_j, kn_j, xp, xn, db_p, db_n, glp_j[None, :], gln_j[None, :],
                                gsp_j[None, :], gsn_j[None, :], gx_j[None, :], lsp_j[None, :],
                                lsn_j[None, :], gwp_j[None, :], gwn_j[None, :], tp, tn, tiny,
                                POS_LSE, POS_SUM, NEG_LSE, NEG_SUM, NTX, POS_EXPW, NEG_EXPW)
                if HIST:
                    g += _hist_grad(gh_ptr, N64, NODES, v, kp_j, kn_j, cols[None, :], hlo, hiw, hdf, hlof,
                                    HSQ, HPML, LP)
            if LP:
                gsum += tl.sum(g, axis=1)
            acc = _acc_grad(acc, g, r_ptr, cols, cmask, stride_r, out_ptr, rows, rmask, D,
                            BLOCK_G, ONE_CHUNK, GPREC)
        _finish_grad(acc, gsum, q_ptr, rows, rmask, stride_q, out_ptr, D, LP, BLOCK_G, ONE_CHUNK)

    @triton.jit
    def _pair_bwd_cols_kernel(q_ptr, r_ptr, lq_ptr, lr_ptr, ex_ptr, nq_ptr, nr_ptr, rs_ptr, st_ptr, gh_ptr, out_ptr,
                              N, M, D, stride_q, stride_r, split_o,
                              k_ps: tl.float64, k_psh: tl.float64, k_pwo: tl.float64, k_pws: tl.float64,
                              k_ns: tl.float64, k_nsh: tl.float64, k_nwo: tl.float64, k_nws: tl.float64,
                              k_eps: tl.float64, k_tp: tl.float64, k_tn: tl.float64, k_tiny: tl.float64,
                              k_pwl: tl.float64, k_pwh: tl.float64, k_nwl: tl.float64, k_nwh: tl.float64,
                              NODES, k_hlo: tl.float64, k_hiw: tl.float64, k_hdf: tl.float64,
                              EXCL: tl.constexpr, LP: tl.constexpr, MINE: tl.constexpr, RSHIFT: tl.constexpr,
                              MCOS: tl.constexpr, WIN: tl.constexpr, NTX: tl.constexpr, POS_LSE: tl.constexpr,
                              POS_SUM: tl.constexpr, POS_HINGE: tl.constexpr, NEG_LSE: tl.constexpr,
                              NEG_SUM: tl.constexpr,
                              NEG_HINGE: tl.constexpr, POS_EXPW: tl.constexpr, NEG_EXPW: tl.constexpr,
                              HIST: tl.constexpr, HSQ: tl.constexpr, HPML: tl.constexpr,
                              PREC: tl.constexpr, GPREC: tl.constexpr,
                              BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr, ONE_CHUNK: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """grad_r[J] (slice s) = sum over the row tiles I = s, s + SPLIT, ... of G_IJ^T q_I (ref
        mode), S_IJ recomputed in the forward's orientation, plus the lp norms' share."""
        ACC: tl.constexpr = st_ptr.dtype.element_ty
        cols = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < M
        out_ptr += tl.program_id(1).to(tl.int64) * split_o
        lr = tl.load(lr_ptr + cols, mask=cmask, other=0)
        nr = _load_or_zeros(nr_ptr, cols, cmask, LP, BLOCK_N, ACC)
        ps, psh, pwo, pws, ns, nsh, nwo, nws, eps, tp, tn, tiny = _pair_consts(
            k_ps, k_psh, k_pwo, k_pws, k_ns, k_nsh, k_nwo, k_nws, k_eps, k_tp, k_tn, k_tiny, ACC)
        pwl, pwh, nwl, nwh = _c(k_pwl, ACC), _c(k_pwh, ACC), _c(k_nwl, ACC), _c(k_nwh, ACC)
        hlo, hiw = _c(k_hlo, ACC), _c(k_hiw, ACC)
        hdf, hlof = _c(k_hdf, tl.float32), _c(k_hlo, tl.float32)
        N64 = tl.cast(N, tl.int64)
        acc = tl.zeros([BLOCK_N, BLOCK_G], ACC)
        gsum = tl.zeros([BLOCK_N], ACC)
        for m0 in range(tl.program_id(1).to(tl.int64) * BLOCK_M, N, tl.num_programs(1) * BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
            rmask = rows < N
            lq, ex, nq = _pair_side(lq_ptr, ex_ptr, nq_ptr, rows, rmask, EXCL, LP, BLOCK_M, ACC)
            glp, gln, gsp, gsn, gx, lsp, lsn, mnp, mxn, gwp, gwn = _load_row_stats(st_ptr, rows, rmask, N)
            psh_i, nsh_i = _row_shifts(psh, nsh, rs_ptr, rows, rmask, RSHIFT, BLOCK_M, ACC)
            same, pos, neg = _pair_sets(lq, lr, ex, rows, cols, rmask, cmask, EXCL)
            v = _pair_v(q_ptr, r_ptr, rows, cols, rmask, cmask, nq, nr, D, stride_q, stride_r,
                        LP, EXCL, PREC, BLOCK_D, BLOCK_M, BLOCK_N, ACC)
            u = _mining_u(v, LP, MCOS)
            xp, xn, db_p, db_n = _pair_dterms(v, ps, psh_i, pwo, pws, ns, nsh_i, nwo, nws, POS_HINGE, NEG_HINGE, LP)
            kp, kn = _mined(pos, neg, u, mnp[:, None], mxn[:, None], eps, MINE)
            kp, kn = _windowed(kp, kn, v, pwl, pwh, nwl, nwh, WIN)
            g = _pair_grad(kp, kn, xp, xn, db_p, db_n, glp[:, None], gln[:, None],
                           gsp[:, None], gsn[:, None], gx[:, None], lsp[:, None], lsn[:, None],
                           gwp[:, None], gwn[:, None], tp, tn, tiny,
                           POS_LSE, POS_SUM, NEG_LSE, NEG_SUM, NTX, POS_EXPW, NEG_EXPW)
            if HIST:
                g += _hist_grad(gh_ptr, N64, NODES, v, kp, kn, rows[:, None], hlo, hiw, hdf, hlof, HSQ, HPML, LP)
            if LP:
                gsum += tl.sum(g, axis=0)
            acc = _acc_grad(acc, tl.trans(g), q_ptr, rows, rmask, stride_q, out_ptr, cols, cmask, D,
                            BLOCK_G, ONE_CHUNK, GPREC)
        _finish_grad(acc, gsum, r_ptr, cols, cmask, stride_r, out_ptr, D, LP, BLOCK_G, ONE_CHUNK)

    # ===================================================================== class engine: kernels
    @triton.jit
    def _tile_cols(c0, C, K, KP: tl.constexpr, BLOCK_C: tl.constexpr):
        """Lanes of a class tile: (w row of each lane [BLOCK_C*KP] int64, lane valid); lane j is
        center k = j % KP of class c0 + j // KP."""
        j = tl.arange(0, BLOCK_C * KP)
        k = j % KP
        cls = c0 + j // KP
        return cls.to(tl.int64) * K + k, (cls < C) & (k < K)

    @triton.jit
    def _class_tile(q_ptr, w_ptr, rows, row_ok, c0, C, D, K, ig,
                    POOL: tl.constexpr, KP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                    BLOCK_D: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr):
        """(s3, p, S) of the tile rows x classes c0..: S [BLOCK_N, BLOCK_C] the pooled similarity
        (POOL 1, SoftTriple: sum_k softmax_k(s * inv_gamma) s over the KP lanes of a class, padded
        lanes -inf -> p = 0; POOL 2, SubCenterArcFace: max_k s as torch.max, a NaN first, p the
        one-hot of the first lane attaining it) or s itself (POOL 0, KP = 1); s3, p
        [BLOCK_N, BLOCK_C, KP] (dummies without POOL)."""
        w_rows, col_ok = _tile_cols(c0, C, K, KP, BLOCK_C)
        s = _s_tile(q_ptr, w_ptr, rows, w_rows, row_ok, col_ok, D, D, D,
                    BLOCK_N, BLOCK_C * KP, BLOCK_D, PREC, ACC)
        if POOL == 2:
            s3 = tl.reshape(s, [BLOCK_N, BLOCK_C, KP])
            k = tl.arange(0, KP)[None, None, :]
            key = tl.where(k < K, tl.where(s3 != s3, _POS_INF, s3), _NEG_INF)
            first = tl.min(tl.where(key == tl.max(key, axis=2)[:, :, None], k, KP), axis=2)
            pick = k == first[:, :, None]
            p = tl.where(pick, 1.0, 0.0).to(ACC)
            S_ = tl.sum(tl.where(pick, s3, 0.0), axis=2)
        elif POOL == 1:
            s3 = tl.reshape(s, [BLOCK_N, BLOCK_C, KP])
            k_ok = (tl.arange(0, KP) < K)[None, None, :]
            x = tl.where(k_ok, s3 * ig, _NEG_INF)
            e = tl.exp(x - tl.max(x, axis=2)[:, :, None])
            p = e * (1.0 / tl.sum(e, axis=2))[:, :, None]
            S_ = tl.sum(p * s3, axis=2)
        else:
            s3 = s
            p = s
            S_ = s
        return s3, p, S_

    @triton.jit
    def _class_fwd_rows_kernel(q_ptr, w_ptr, y_ptr, out_ptr, N, C, D, K, split_o,
                               k_rs: tl.float64, k_rsh: tl.float64, k_rwo: tl.float64, k_rws: tl.float64,
                               k_ig: tl.float64,
                               ROW_LSE: tl.constexpr, ROW_SP: tl.constexpr, POOL: tl.constexpr, KP: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                               PREC: tl.constexpr):
        """Program (row block, split s): class tiles s, s + SPLIT, ...; writes its partial rows
        (lse over c != y_i of the row term, or with ROW_SP the sum of its softplus; target_sim) to
        slice s of out [SPLIT, 2, N]."""
        ACC: tl.constexpr = out_ptr.dtype.element_ty
        rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        y = tl.load(y_ptr + rows, mask=row_ok, other=-1)
        rs, rsh, rwo, rws, ig = _c(k_rs, ACC), _c(k_rsh, ACC), _c(k_rwo, ACC), _c(k_rws, ACC), _c(k_ig, ACC)
        m = tl.full([BLOCK_N], _NEG_INF, ACC)
        l = tl.zeros([BLOCK_N], ACC)
        t = tl.zeros([BLOCK_N], ACC)
        for c0 in range(tl.program_id(1).to(tl.int64) * BLOCK_C, C, tl.num_programs(1) * BLOCK_C):
            _s3, _p, S_ = _class_tile(q_ptr, w_ptr, rows, row_ok, c0, C, D, K, ig,
                                      POOL, KP, BLOCK_N, BLOCK_C, BLOCK_D, PREC, ACC)
            cls = c0 + tl.arange(0, BLOCK_C)
            valid = row_ok[:, None] & (cls < C)[None, :]
            tg = (y[:, None] == cls[None, :]) & valid
            if ROW_LSE:
                x, _dx = _term(S_, rs, rsh, rwo, rws, False)
                if ROW_SP:
                    l += tl.sum(tl.where(valid & ~tg, _softplus(x), 0.0), axis=1)
                else:
                    m, l = _lse_fold(m, l, x, valid & ~tg, 1)
            t += tl.sum(tl.where(tg, S_, 0.0), axis=1)
        ob = out_ptr + tl.program_id(1).to(tl.int64) * split_o + rows
        if ROW_SP:
            tl.store(ob, l, mask=row_ok)
        else:
            tl.store(ob, _lse_value(m, l), mask=row_ok)
        tl.store(ob + N, t, mask=row_ok)

    @triton.jit
    def _class_fwd_cols_kernel(q_ptr, w_ptr, y_ptr, out_ptr, rows_ptr, N, C, D, split_o,
                               k_ps: tl.float64, k_psh: tl.float64, k_pwo: tl.float64, k_pws: tl.float64,
                               k_ns: tl.float64, k_nsh: tl.float64, k_nwo: tl.float64, k_nws: tl.float64,
                               COL_POS: tl.constexpr, COL_NEG: tl.constexpr, WRITE_TSIM: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                               PREC: tl.constexpr):
        """Program (class tile, split s), K = 1: row blocks s, s + SPLIT, ...; writes its partial
        column LSEs (pos: rows of the class, neg: the others) to slice s of out [SPLIT, 2, C]. With
        WRITE_TSIM also target_sim_i of the rows whose class is in the tile (one writer per row)."""
        ACC: tl.constexpr = out_ptr.dtype.element_ty
        c0 = tl.program_id(0).to(tl.int64) * BLOCK_C
        cls = c0 + tl.arange(0, BLOCK_C)
        col_ok = cls < C
        ps, psh, pwo, pws = _c(k_ps, ACC), _c(k_psh, ACC), _c(k_pwo, ACC), _c(k_pws, ACC)
        ns, nsh, nwo, nws = _c(k_ns, ACC), _c(k_nsh, ACC), _c(k_nwo, ACC), _c(k_nws, ACC)
        mp = tl.full([BLOCK_C], _NEG_INF, ACC)
        lp = tl.zeros([BLOCK_C], ACC)
        mn = tl.full([BLOCK_C], _NEG_INF, ACC)
        ln = tl.zeros([BLOCK_C], ACC)
        for r0 in range(tl.program_id(1).to(tl.int64) * BLOCK_N, N, tl.num_programs(1) * BLOCK_N):
            rows = r0 + tl.arange(0, BLOCK_N).to(tl.int64)
            row_ok = rows < N
            y = tl.load(y_ptr + rows, mask=row_ok, other=-1)
            _s3, _p, s = _class_tile(q_ptr, w_ptr, rows, row_ok, c0, C, D, 1, 0.0,
                                     False, 1, BLOCK_N, BLOCK_C, BLOCK_D, PREC, ACC)
            valid = row_ok[:, None] & col_ok[None, :]
            tg = (y[:, None] == cls[None, :]) & valid
            if COL_POS:
                xp, _dp = _term(s, ps, psh, pwo, pws, False)
                mp, lp = _lse_fold(mp, lp, xp, tg, 0)
            if COL_NEG:
                xn, _dn = _term(s, ns, nsh, nwo, nws, False)
                mn, ln = _lse_fold(mn, ln, xn, valid & ~tg, 0)
            if WRITE_TSIM:
                mine = row_ok & (y >= c0) & (y < c0 + BLOCK_C) & (y < C)
                tl.store(rows_ptr + N + rows, tl.sum(tl.where(tg, s, 0.0), axis=1), mask=mine)
        ob = out_ptr + tl.program_id(1).to(tl.int64) * split_o + cls
        tl.store(ob, _lse_value(mp, lp), mask=col_ok)
        tl.store(ob + C, _lse_value(mn, ln), mask=col_ok)

    @triton.jit
    def _class_grad_tile(q_ptr, w_ptr, y_ptr, rst_ptr, cst_ptr, rows, row_ok, c0, N, C, D, K,
                         rs, rsh, rwo, rws, ps, psh, pwo, pws, ns, nsh, nwo, nws, ig,
                         ROW_LSE: tl.constexpr, ROW_SP: tl.constexpr, COL_POS: tl.constexpr,
                         COL_NEG: tl.constexpr, POOL: tl.constexpr, KP: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
                         ACC: tl.constexpr):
        """gs = dL/ds of one recomputed tile, [BLOCK_N, BLOCK_C*KP] in ACC (ops/README.md,
        kernels_isa.inc class_grad): row stats rst [3, N] = grad lse_other, grad target_sim,
        lse_other; column stats cst [4, C] = grad col_lse_pos, grad col_lse_neg, col_lse_pos, col_lse_neg."""
        N = tl.cast(N, tl.int64)  # the slots k * N, k * C of rst / cst
        C = tl.cast(C, tl.int64)
        s3, p, S_ = _class_tile(q_ptr, w_ptr, rows, row_ok, c0, C, D, K, ig,
                                POOL, KP, BLOCK_N, BLOCK_C, BLOCK_D, PREC, ACC)
        cls = c0 + tl.arange(0, BLOCK_C)
        col_ok = cls < C
        y = tl.load(y_ptr + rows, mask=row_ok, other=-1)
        valid = row_ok[:, None] & col_ok[None, :]
        tg = (y[:, None] == cls[None, :]) & valid
        other = valid & ~tg
        G = tl.zeros([BLOCK_N, BLOCK_C], ACC)
        if ROW_LSE:
            g_row = tl.load(rst_ptr + rows, mask=row_ok, other=0.0)
            lse = tl.load(rst_ptr + 2 * N + rows, mask=row_ok, other=0.0)
            x, dx = _term(S_, rs, rsh, rwo, rws, False)
            if ROW_SP:  # d sum softplus / dx = sigmoid(x)
                e = tl.where(other, 1.0 / (1.0 + tl.exp(-x)), 0.0)
            else:  # d LSE / dx = exp(x - LSE)
                e = tl.exp(tl.where(other, x - lse[:, None], _NEG_INF))
            G = tl.where(other, (g_row[:, None] * e) * dx, 0.0)
        if COL_POS:
            g_cp = tl.load(cst_ptr + cls, mask=col_ok, other=0.0)
            l_cp = tl.load(cst_ptr + 2 * C + cls, mask=col_ok, other=0.0)
            x, dx = _term(S_, ps, psh, pwo, pws, False)
            e = tl.exp(tl.where(tg, x - l_cp[None, :], _NEG_INF))
            G = tl.where(tg, G + (g_cp[None, :] * e) * dx, G)
        if COL_NEG:
            g_cn = tl.load(cst_ptr + C + cls, mask=col_ok, other=0.0)
            l_cn = tl.load(cst_ptr + 3 * C + cls, mask=col_ok, other=0.0)
            x, dx = _term(S_, ns, nsh, nwo, nws, False)
            e = tl.exp(tl.where(other, x - l_cn[None, :], _NEG_INF))
            G = tl.where(other, G + (g_cn[None, :] * e) * dx, G)
        g_ts = tl.load(rst_ptr + N + rows, mask=row_ok, other=0.0)
        G = G + tl.where(tg, g_ts[:, None], 0.0)
        if POOL == 2:  # dS/ds_k = [k is the maximum's first lane]
            gs = tl.reshape(tl.where(p != 0.0, G[:, :, None], 0.0), [BLOCK_N, BLOCK_C * KP])
        elif POOL == 1:  # dS/ds_k = p_k (1 + (s_k - S) inv_gamma)
            gs3 = (G[:, :, None] * p) * (1.0 + (s3 - S_[:, :, None]) * ig)
            gs = tl.reshape(gs3, [BLOCK_N, BLOCK_C * KP])
        else:
            gs = G
        return gs

    @triton.jit
    def _class_bwd_rows_kernel(q_ptr, w_ptr, y_ptr, rst_ptr, cst_ptr, out_ptr, N, C, D, K, split_o,
                               k_rs: tl.float64, k_rsh: tl.float64, k_rwo: tl.float64, k_rws: tl.float64,
                               k_ps: tl.float64, k_psh: tl.float64, k_pwo: tl.float64, k_pws: tl.float64,
                               k_ns: tl.float64, k_nsh: tl.float64, k_nwo: tl.float64, k_nws: tl.float64,
                               k_ig: tl.float64,
                               ROW_LSE: tl.constexpr, ROW_SP: tl.constexpr, COL_POS: tl.constexpr,
                               COL_NEG: tl.constexpr, POOL: tl.constexpr, KP: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr,
                               ONE_CHUNK: tl.constexpr, PREC: tl.constexpr, GPREC: tl.constexpr):
        """grad_q[rows] (slice s) = sum over the class tiles s, s + SPLIT, ... of gs @ w_tile."""
        ACC: tl.constexpr = rst_ptr.dtype.element_ty
        rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        out_ptr += tl.program_id(1).to(tl.int64) * split_o
        rs, rsh, rwo, rws = _c(k_rs, ACC), _c(k_rsh, ACC), _c(k_rwo, ACC), _c(k_rws, ACC)
        ps, psh, pwo, pws = _c(k_ps, ACC), _c(k_psh, ACC), _c(k_pwo, ACC), _c(k_pws, ACC)
        ns, nsh, nwo, nws = _c(k_ns, ACC), _c(k_nsh, ACC), _c(k_nwo, ACC), _c(k_nws, ACC)
        ig = _c(k_ig, ACC)
        acc = tl.zeros([BLOCK_N, BLOCK_G], ACC)
        for c0 in range(tl.program_id(1).to(tl.int64) * BLOCK_C, C, tl.num_programs(1) * BLOCK_C):
            gs = _class_grad_tile(q_ptr, w_ptr, y_ptr, rst_ptr, cst_ptr, rows, row_ok, c0, N, C, D, K,
                                  rs, rsh, rwo, rws, ps, psh, pwo, pws, ns, nsh, nwo, nws, ig,
                                  ROW_LSE, ROW_SP, COL_POS, COL_NEG, POOL, KP, BLOCK_N, BLOCK_C, BLOCK_D, PREC,
                                  ACC)
            w_rows, col_ok = _tile_cols(c0, C, K, KP, BLOCK_C)
            acc = _acc_grad(acc, gs, w_ptr, w_rows, col_ok, D, out_ptr, rows, row_ok, D,
                            BLOCK_G, ONE_CHUNK, GPREC)
        _finish_grad(acc, acc, q_ptr, rows, row_ok, D, out_ptr, D, False, BLOCK_G, ONE_CHUNK)

    @triton.jit
    def _class_bwd_cols_kernel(q_ptr, w_ptr, y_ptr, rst_ptr, cst_ptr, out_ptr, N, C, D, K, split_o,
                               k_rs: tl.float64, k_rsh: tl.float64, k_rwo: tl.float64, k_rws: tl.float64,
                               k_ps: tl.float64, k_psh: tl.float64, k_pwo: tl.float64, k_pws: tl.float64,
                               k_ns: tl.float64, k_nsh: tl.float64, k_nwo: tl.float64, k_nws: tl.float64,
                               k_ig: tl.float64,
                               ROW_LSE: tl.constexpr, ROW_SP: tl.constexpr, COL_POS: tl.constexpr,
                               COL_NEG: tl.constexpr, POOL: tl.constexpr, KP: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr,
                               ONE_CHUNK: tl.constexpr, PREC: tl.constexpr, GPREC: tl.constexpr):
        """grad_w[tile] (slice s) = sum over the row blocks s, s + SPLIT, ... of gs^T @ q_rows."""
        ACC: tl.constexpr = rst_ptr.dtype.element_ty
        c0 = tl.program_id(0).to(tl.int64) * BLOCK_C
        out_ptr += tl.program_id(1).to(tl.int64) * split_o
        rs, rsh, rwo, rws = _c(k_rs, ACC), _c(k_rsh, ACC), _c(k_rwo, ACC), _c(k_rws, ACC)
        ps, psh, pwo, pws = _c(k_ps, ACC), _c(k_psh, ACC), _c(k_pwo, ACC), _c(k_pws, ACC)
        ns, nsh, nwo, nws = _c(k_ns, ACC), _c(k_nsh, ACC), _c(k_nwo, ACC), _c(k_nws, ACC)
        ig = _c(k_ig, ACC)
        w_rows, col_ok = _tile_cols(c0, C, K, KP, BLOCK_C)
        acc = tl.zeros([BLOCK_C * KP, BLOCK_G], ACC)
        for r0 in range(tl.program_id(1).to(tl.int64) * BLOCK_N, N, tl.num_programs(1) * BLOCK_N):
            rows = r0 + tl.arange(0, BLOCK_N).to(tl.int64)
            row_ok = rows < N
            gs = _class_grad_tile(q_ptr, w_ptr, y_ptr, rst_ptr, cst_ptr, rows, row_ok, c0, N, C, D, K,
                                  rs, rsh, rwo, rws, ps, psh, pwo, pws, ns, nsh, nwo, nws, ig,
                                  ROW_LSE, ROW_SP, COL_POS, COL_NEG, POOL, KP, BLOCK_N, BLOCK_C, BLOCK_D, PREC,
                                  ACC)
            acc = _acc_grad(acc, tl.trans(gs), q_ptr, rows, row_ok, D, out_ptr, w_rows, col_ok, D,
                            BLOCK_G, ONE_CHUNK, GPREC)
        _finish_grad(acc, acc, w_ptr, w_rows, col_ok, D, out_ptr, D, False, BLOCK_G, ONE_CHUNK)

    # =============================================================================== configs
    # Autotuning varies only tile sizes / warps / stages of the pair kernels: never BLOCK_D or the
    # dot orientation, so an S element is summed identically in every kernel and every config. All
    # GPU configs use tiles >= 64 x 64 and 8 warps (the same tensor-core instruction family). Offline
    # ptxas (sm_90, no GPU here) at 4 warps spilled 0.2-1.7 KB (forward / self-mode row pass) and
    # more at 64 x 128; at 64 x 64 with 8 warps the forward does not spill and the row pass ~160 B.
    # Untuned starting points: no GPU was available to time them.
    def _cfg(bm, bn, warps, stages):
        return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)

    if INTERPRETED:  # numpy per block op: small tiles so that small tests cross several tiles
        _FWD_CONFIGS = [_cfg(32, 32, 4, 1)]
        _BWD_CONFIGS = [_cfg(32, 32, 4, 1)]
    else:
        _FWD_CONFIGS = [_cfg(64, 64, 8, 3), _cfg(64, 64, 8, 4), _cfg(128, 64, 8, 3), _cfg(64, 128, 8, 3)]
        _BWD_CONFIGS = [_cfg(64, 64, 8, 2), _cfg(64, 64, 8, 3)]
    _MIN_BLOCK = min(min(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in _FWD_CONFIGS + _BWD_CONFIGS)
    _KEY = ["N", "M", "D"]
    _pair_fwd = triton.autotune(configs=_FWD_CONFIGS, key=_KEY)(_pair_fwd_kernel)
    # with a histogram (never with mining or NTXent: a MAIN walk only, which stores every other value
    # row) the kernel adds into its value rows: zeroed between the autotuner's trial runs
    _pair_fwd_hist = triton.autotune(configs=_FWD_CONFIGS, key=_KEY, reset_to_zero=["val_ptr"])(_pair_fwd_kernel)
    # the chunked gradient form adds into its output: reset between the autotuner's trial runs
    _pair_bwd_rows = triton.autotune(configs=_BWD_CONFIGS, key=_KEY, reset_to_zero=["out_ptr"])(
        _pair_bwd_rows_kernel)
    _pair_bwd_cols = triton.autotune(configs=_BWD_CONFIGS, key=_KEY, reset_to_zero=["out_ptr"])(
        _pair_bwd_cols_kernel)

    def _class_blocks(N, C, K, dtype):
        """Class engine tiles: a function of the shapes and dtype only, the same in every pass. A tile
        is BLOCK_C classes x KP lanes; every tl.dot dimension stays >= 16. 8 warps on GPU (with 4,
        ptxas spilled in the backward kernels at these tiles). Untuned (no GPU was available)."""
        N, C, K = int(N), int(C), int(K)
        KP = triton.next_power_of_2(K)
        block_n, lanes = (32, 32) if INTERPRETED else (64, 64)
        block_n = max(16, min(block_n, triton.next_power_of_2(max(N, 1))))
        block_c = max(1, lanes // KP)
        block_c = max(min(block_c, triton.next_power_of_2(max(C, 1))), -(-16 // KP))
        return dict(KP=KP, BLOCK_N=block_n, BLOCK_C=block_c, BLOCK_D=block_d(dtype), num_warps=8)

    # ================================================================================ op bodies
    def _row_shift_operand(row_shift, q, A):
        """The rows' shifts in the accumulation dtype, or a dummy pointer (RSHIFT off: never read)."""
        return q if row_shift is None else row_shift.detach().to(A).contiguous()

    def _pair_operands(q, r, labels_q, labels_r, exclude_col, LP, A):
        """(q, r, labels_q, labels_r, exclude_col or dummy, EXCL, |q|^2, |r|^2 or dummies)."""
        q = q.contiguous()
        labels_q = labels_q.contiguous()
        if r is None:
            r, labels_r, ex, excl = q, labels_q, labels_q, 1
        else:
            r, labels_r = r.contiguous(), labels_r.contiguous()
            ex, excl = (exclude_col.contiguous(), 2) if exclude_col is not None else (labels_q, 0)
        if LP:  # squared norms in A (the same call in every pass: the same bits)
            nq = q.to(A).square().sum(1)
            nr = nq if r is q else r.to(A).square().sum(1)
        else:
            nq = nr = q
        return q, r, labels_q, labels_r, ex, excl, nq, nr

    def _pair_forward(q, r, labels_q, labels_r, exclude_col, terms, flags, row_shift=None):
        _check_pair(q, r, labels_q, labels_r, exclude_col, terms, flags, row_shift)
        sw = _pair_switches(flags, terms)
        A = stat_dtype(q.dtype)
        N, D = q.shape
        q, r_, lq, lr, ex, excl, nq, nr = _pair_operands(q, r, labels_q, labels_r, exclude_col, sw["LP"], A)
        M = r_.shape[0]
        dev = q.device
        rows = S.pair_value_rows(terms)  # PAIR_VALUES, then the histograms (zeroed: the kernels add into them)
        new_values = torch.zeros if sw["HIST"] else torch.empty
        fwd = _pair_fwd_hist if sw["HIST"] else _pair_fwd
        if N == 0:
            return (torch.zeros((rows, 0), dtype=A, device=dev),
                    torch.empty((4, 0), dtype=torch.int32, device=dev), torch.empty((3, 0), dtype=A, device=dev))
        consts = _pair_kernel_consts(terms, A)
        _check_grid(N, _MIN_BLOCK, "N (rows of q)")
        splits = _splits(triton.cdiv(N, _MIN_TILE), triton.cdiv(M, _MIN_TILE), dev)
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), splits)  # noqa: E731
        rs = _row_shift_operand(row_shift, q, A)
        meta = dict(EXCL=excl, RSHIFT=row_shift is not None, PREC=dot_precision(q.dtype), BLOCK_D=block_d(q.dtype),
                    **sw)
        operands = (q, r_, lq, lr, ex, nq, nr, rs)
        dims = (N, M, D, q.stride(0), r_.stride(0))
        if splits == 1:  # one launch: every walk in each program, the final statistics
            values = new_values((rows, N), dtype=A, device=dev)
            counts = torch.empty((4, N), dtype=torch.int32, device=dev)
            aux = torch.empty((3, N), dtype=A, device=dev)
            _launch(fwd)[grid](*operands, values, values, values, counts, aux, *dims, 0, 0, 0, *consts,
                                     WALK_THRESH=sw["MINE"], WALK_MAIN=True, WALK_NTX=sw["NTX"], **meta)
            return values, counts, aux
        # split walks: one launch per walk, partial statistics [splits, k, N] combined in a fixed order
        pv = new_values((splits, rows, N), dtype=A, device=dev)
        pc = torch.empty((splits, 4, N), dtype=torch.int32, device=dev)
        pa = torch.empty((splits, 3, N), dtype=A, device=dev)
        part = (pv, pc, pa, *dims, rows * N, 4 * N, 3 * N, *consts)
        thr = pa  # unread without MINE
        if sw["MINE"]:
            _launch(_pair_fwd)[grid](*operands, pa, pa, *part, WALK_THRESH=True, WALK_MAIN=False,
                                     WALK_NTX=False, **meta)
            thr = torch.stack([pa[:, 0].amin(0), pa[:, 1].amax(0)])
        _launch(fwd)[grid](*operands, thr, pa, *part, WALK_THRESH=False, WALK_MAIN=True,
                                 WALK_NTX=False, **meta)
        lse = torch.logsumexp(pv[:, 0:2], dim=0)
        if sw["NTX"]:
            _launch(_pair_fwd)[grid](*operands, thr, lse[1].contiguous(), *part, WALK_THRESH=False,
                                     WALK_MAIN=False, WALK_NTX=True, **meta)
        values = torch.cat([lse, pv[:, 2:].sum(0)])
        counts = pc.sum(0, dtype=torch.int32)
        aux = torch.cat([pa[:, 0:1].amin(0), pa[:, 1:2].amax(0), pa[:, 2:3].sum(0)])
        return values, counts, aux

    def _grad_pass(kernel, x, own, splits, owned_blocks, A, before, dims, consts, meta):
        """Launch a gradient pass of either engine: its programs own `own` rows of the output (shaped
        like x; owned_blocks(meta) row blocks of them) and walk the other side split over `splits`
        programs. SPLIT = 1 with a register accumulator stores the gradient in x's dtype directly;
        else one partial in A per split (zeroed for the chunked form, which adds into it), summed
        here in split order."""
        D = x.shape[1]
        dev = x.device
        block_g, one_chunk = _block_g(D, x.dtype)
        if splits == 1 and one_chunk:
            out = torch.empty((own, D), dtype=x.dtype, device=dev)
        elif one_chunk:
            out = torch.empty((splits, own, D), dtype=A, device=dev)
        else:
            out = torch.zeros((splits, own, D), dtype=A, device=dev)
        grid = lambda m: (owned_blocks(m), splits)  # noqa: E731
        _launch(kernel)[grid](*before, out, *dims, own * D, *consts, BLOCK_G=block_g, ONE_CHUNK=one_chunk,
                              GPREC=grad_dot_precision(x.dtype), **meta)
        if out.dim() == 2:
            return out
        return (out[0] if splits == 1 else out.sum(0)).to(x.dtype)

    def _pair_backward(grad_values, q, r, labels_q, labels_r, exclude_col, values, aux, terms, flags,
                       need_grad_r, row_shift=None):
        _check_pair(q, r, labels_q, labels_r, exclude_col, terms, flags, row_shift)
        sw = _pair_switches(flags, terms)
        A = stat_dtype(q.dtype)
        N = q.shape[0]
        rows = S.pair_value_rows(terms)
        gv = _stats(grad_values, rows, N, A, "pair_engine_backward (triton): grad_values")
        vals = _stats(values, rows, N, A, "pair_engine_backward (triton): values")
        ax = _stats(aux, 3, N, A, "pair_engine_backward (triton): aux")
        self_mode = r is None
        q_, r_, lq, lr, ex, excl, nq, nr = _pair_operands(q, r, labels_q, labels_r, exclude_col, sw["LP"], A)
        M = r_.shape[0]
        # NTXent: d(pair terms)/d(lse_neg) joins the gradient of lse_neg
        g_lse_neg = gv[1] + gv[4] * ax[2] if sw["NTX"] else gv[1]
        st = torch.stack([gv[0], g_lse_neg, gv[2], gv[3], gv[4], vals[0], vals[1], ax[0], ax[1], gv[5],
                          gv[6]]).contiguous()
        consts = _pair_kernel_consts(terms, A)
        meta = dict(EXCL=excl, RSHIFT=row_shift is not None, PREC=dot_precision(q.dtype), BLOCK_D=block_d(q.dtype),
                    **sw)
        meta.pop("EAM")
        g_hist = gv[_PAIR_VALUES:].contiguous() if sw["HIST"] else st  # [2 nodes, N]; unread without HIST
        operands = (q_, r_, lq, lr, ex, nq, nr, _row_shift_operand(row_shift, q, A), st, g_hist)
        dims = (N, M, q.shape[1], q_.stride(0), r_.stride(0))
        _check_grid(N, _MIN_BLOCK, "N (rows of q)")
        _check_grid(M, _MIN_BLOCK, "M (rows of r)")
        if N == 0 or q.shape[1] == 0:
            grad_q = torch.zeros_like(q)
        else:
            splits = _splits(triton.cdiv(N, _MIN_TILE), triton.cdiv(M, _MIN_TILE), q.device)
            grad_q = _grad_pass(_pair_bwd_rows, q_, N, splits, lambda m: triton.cdiv(N, m["BLOCK_M"]), A,
                                operands, dims, consts, dict(meta, SELF=self_mode))
        if self_mode or not need_grad_r:
            return grad_q, q.new_empty((0,))
        if M == 0 or q.shape[1] == 0:
            return grad_q, torch.zeros_like(r_)
        splits = _splits(triton.cdiv(M, _MIN_TILE), triton.cdiv(N, _MIN_TILE), q.device)
        grad_r = _grad_pass(_pair_bwd_cols, r_, M, splits, lambda m: triton.cdiv(M, m["BLOCK_N"]), A,
                            operands, dims, consts, meta)
        return grad_q, grad_r

    def _class_forward(q, w, labels, centers_per_class, terms, flags):
        K = int(centers_per_class)
        _check_class(q, w, labels, K, terms, flags)
        sw = _class_switches(flags)
        A = stat_dtype(q.dtype)
        q, w, labels = q.contiguous(), w.contiguous(), labels.contiguous()
        N, D = q.shape
        C = w.shape[0] // K
        dev = q.device
        t = [float(x) for x in terms]
        columns = sw["COL_POS"] or sw["COL_NEG"]
        blocks = _class_blocks(N, C, K, q.dtype)
        prec = dot_precision(q.dtype)
        if N == 0 or C == 0:
            rows = torch.full((2, N), float("-inf"), dtype=A, device=dev)
            rows[1].zero_()
            return rows, torch.full((2, C), float("-inf"), dtype=A, device=dev)
        row_blocks, class_tiles = triton.cdiv(N, blocks["BLOCK_N"]), triton.cdiv(C, blocks["BLOCK_C"])
        _check_grid(N, blocks["BLOCK_N"], "N (rows of q)")
        _check_grid(C, blocks["BLOCK_C"], "C (classes)")
        if sw["ROW_LSE"] or not columns:
            splits = _splits(row_blocks, class_tiles, dev)
            part = torch.empty((splits, 2, N), dtype=A, device=dev) if splits > 1 else \
                torch.empty((2, N), dtype=A, device=dev)
            _launch(_class_fwd_rows_kernel)[(row_blocks, splits)](
                q, w, labels, part, N, C, D, K, 2 * N, *t[0:4], t[12], ROW_LSE=sw["ROW_LSE"], ROW_SP=sw["ROW_SP"],
                POOL=_pool_kind(K, flags), PREC=prec, **blocks)
            if splits > 1:  # the splits' partial rows, merged in split order
                other = part[:, 0].sum(0) if sw["ROW_SP"] else torch.logsumexp(part[:, 0], 0)
                rows = torch.stack([other, part[:, 1].sum(0)])
            else:
                rows = part
        else:  # target_sim comes from the column kernel
            rows = torch.empty((2, N), dtype=A, device=dev)
            rows[0].fill_(float("-inf"))
            rows[1].zero_()
        if not columns:
            return rows, torch.full((2, C), float("-inf"), dtype=A, device=dev)
        cblocks = dict(blocks)
        cblocks.pop("KP")  # K = 1
        splits = _splits(class_tiles, row_blocks, dev)
        part = torch.empty((splits, 2, C), dtype=A, device=dev) if splits > 1 else \
            torch.empty((2, C), dtype=A, device=dev)
        _launch(_class_fwd_cols_kernel)[(class_tiles, splits)](
            q, w, labels, part, rows, N, C, D, 2 * C, *t[4:12], COL_POS=sw["COL_POS"], COL_NEG=sw["COL_NEG"],
            WRITE_TSIM=not sw["ROW_LSE"], PREC=prec, **cblocks)
        cols = part if splits == 1 else torch.logsumexp(part, 0)
        return rows, cols

    def _class_backward(grad_rows, grad_cols, q, w, labels, rows, cols, centers_per_class, terms, flags,
                        need_grad_w):
        K = int(centers_per_class)
        _check_class(q, w, labels, K, terms, flags)
        sw = _class_switches(flags)
        A = stat_dtype(q.dtype)
        q, w, labels = q.contiguous(), w.contiguous(), labels.contiguous()
        N, D = q.shape
        C = w.shape[0] // K
        gr = _stats(grad_rows, 2, N, A, "class_engine_backward (triton): grad_rows")
        gc = _stats(grad_cols, 2, C, A, "class_engine_backward (triton): grad_cols")
        rv = _stats(rows, 2, N, A, "class_engine_backward (triton): rows")
        cv = _stats(cols, 2, C, A, "class_engine_backward (triton): cols")
        rst = torch.cat([gr, rv[0:1]]).contiguous()  # grad lse_other, grad target_sim, lse_other
        cst = torch.cat([gc, cv]).contiguous()       # grad col lse pos / neg, col lse pos / neg
        t = [float(x) for x in terms]
        blocks = _class_blocks(N, C, K, q.dtype)
        meta = dict(PREC=dot_precision(q.dtype), POOL=_pool_kind(K, flags), **sw, **blocks)
        operands = (q, w, labels, rst, cst)
        dims = (N, C, D, K)
        if N == 0 or C == 0 or D == 0:
            return torch.zeros_like(q), (torch.zeros_like(w) if need_grad_w else q.new_empty((0,)))
        row_blocks, class_tiles = triton.cdiv(N, blocks["BLOCK_N"]), triton.cdiv(C, blocks["BLOCK_C"])
        _check_grid(N, blocks["BLOCK_N"], "N (rows of q)")
        _check_grid(C, blocks["BLOCK_C"], "C (classes)")
        splits = _splits(row_blocks, class_tiles, q.device)
        grad_q = _grad_pass(_class_bwd_rows_kernel, q, N, splits, lambda m: row_blocks, A, operands, dims, t, meta)
        if not need_grad_w:
            return grad_q, q.new_empty((0,))
        splits = _splits(class_tiles, row_blocks, q.device)
        grad_w = _grad_pass(_class_bwd_cols_kernel, w, w.shape[0], splits, lambda m: class_tiles, A, operands,
                            dims, t, meta)
        return grad_q, grad_w

    # ============================================================================= registration
    def _register():
        impls = {"pair_engine_forward": (_pair_forward, engines.pair_fake_forward),
                 "pair_engine_backward": (_pair_backward, engines.pair_fake_backward),
                 "class_engine_forward": (_class_forward, engines.class_fake_forward),
                 "class_engine_backward": (_class_backward, engines.class_fake_backward)}
        for name, (impl, fake) in impls.items():
            qualname = f"fused_pairloss::triton_{name}"
            if _USE_TRITON_OP:
                op = torch.library.triton_op(qualname, impl, mutates_args=(), schema=SCHEMAS[name])
            else:
                op = torch.library.custom_op(qualname, impl, mutates_args=(), schema=SCHEMAS[name])
                op.register_fake(fake)
            _OPS[name] = op
        engines.PAIR.register_triton(_OPS["pair_engine_forward"], _OPS["pair_engine_backward"])
        engines.CLASS.register_triton(_OPS["class_engine_forward"], _OPS["class_engine_backward"])

    _register()
    AVAILABLE = True
