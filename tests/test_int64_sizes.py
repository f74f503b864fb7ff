"""Sizes past int32 (docs/design.md "Sizes"): walks of more than 2^31 pairs (N x M, N x C*K) index
correctly, and the one limit every backend shares (M < 2^31: the per-row counts are int32) and the
GPU grid limits raise a clear error instead of wrapping.

The crossing tests keep the tensors small (D = 2) and let the products cross 2^31: N = 65536 rows
against M = 32769 columns (or classes) is 2^31 + 2^16 pairs. The per-row statistics and gradient of
row i depend on row i and r only (the CPU engines' S_ij is a function of the two rows, and a row's
reductions walk the same column tiles in the same order whatever the other rows), so they are
checked bitwise against the same op on a few rows alone; the counts against their closed form. The
limit tests pass expanded (stride 0) tensors of 2^31 rows, which cost no memory: the checks run
before anything reads them.

Not crossed here: M x D, N x D or C*K x D past 2^31 elements (8 GiB of fp32 at least, and the CPU
engines keep padded fp32 copies of the operands), nor any crossing on the CUDA emulation (one
thread per CUDA thread: 2^31 pairs would take hours) or the Triton interpreter (numpy per block):
their index arithmetic is int64 by construction (csrc/cuda, ops/triton_engines.py) and audited, and
their size checks are tested here.
"""
import os

import pytest
import torch

import fused_pairloss as fpl
from fused_pairloss.ops import triton_engines
from fused_pairloss.ops.spec import PAIR_VALUES
from fused_pairloss.ops.spec import ClassLossSpec, PairLossSpec, PairTerm

import test_cuda_backend

# fixture: the CUDA kernels and their host glue compiled as plain C++ (skips without the CUDA headers)
emu = test_cuda_backend.emu

CPU_BUILT = fpl.build_info()["cpu"]
needs_cpu = pytest.mark.skipif(not CPU_BUILT and not os.environ.get("CI"),
                               reason="fused_pairloss._C (CPU kernels) not built: "
                                      + str(fpl.build_info()["library_error"]))
op = torch.ops.fused_pairloss
INT32_MAX = 2**31 - 1
N_BIG, M_BIG, D = 65536, 32769, 2  # N * M = 2^31 + 2^16 pairs

PAIR_SPEC = PairLossSpec(pos=PairTerm(scale=-2.0, shift=0.5, lse=True, sum=True),
                         neg=PairTerm(scale=40.0, shift=0.5, lse=True, sum=True, hinge=True))
CLASS_SPEC = ClassLossSpec(row=PairTerm(scale=16.0, shift=0.1, lse=True), col_pos=PairTerm(scale=-8.0, shift=0.1),
                           col_neg=PairTerm(scale=8.0, shift=0.1))


def _rows(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)


def _sample_rows(n):
    """A few rows spread over the whole range, the first and last included."""
    return torch.unique(torch.cat([torch.tensor([0, 1, n // 2, n - 2, n - 1]),
                                   torch.randint(0, n, (27,), generator=torch.Generator().manual_seed(3))]))


@needs_cpu
def test_cpu_pair_engine_walk_past_2_31_pairs():
    """Ref mode, N x M > 2^31 pairs: forward statistics, counts and grad_q of sampled rows equal the
    same op on those rows alone (bitwise), and every row's set sizes are their closed form."""
    q, r = _rows(N_BIG, D, 0), _rows(M_BIG, D, 1)
    g = torch.Generator().manual_seed(2)
    lq, lr = torch.randint(0, 5, (N_BIG,), generator=g), torch.randint(0, 5, (M_BIG,), generator=g)
    excl = torch.randint(-1, M_BIG, (N_BIG,), generator=g)
    excl[-1] = M_BIG - 1  # the last row excludes the last column
    terms, flags = PAIR_SPEC.pack()
    terms = list(terms)
    values, counts, aux = op.pair_engine_forward(q, r, lq, lr, excl, terms, flags)

    # closed form of the set sizes (no mining): P_i = same label minus the excluded column, N_i the rest
    per_label = torch.bincount(lr, minlength=5)
    excluded = (excl >= 0) & (lr[excl.clamp(min=0)] == lq)
    assert torch.equal(counts[0].long(), per_label[lq] - excluded.long())
    assert torch.equal(counts[1].long(), M_BIG - per_label[lq])

    idx = _sample_rows(N_BIG)
    sub = op.pair_engine_forward(q[idx], r, lq[idx], lr, excl[idx], terms, flags)
    assert torch.equal(values[:, idx], sub[0]) and torch.equal(counts[:, idx], sub[1])
    assert torch.equal(aux[:, idx], sub[2])
    assert torch.isfinite(values[:4]).all()

    gv = torch.randn(len(PAIR_VALUES), N_BIG, generator=g)
    grad_q, _ = op.pair_engine_backward(gv, q, r, lq, lr, excl, values, aux, terms, flags, False)
    sub_q, _ = op.pair_engine_backward(gv[:, idx].contiguous(), q[idx], r, lq[idx], lr, excl[idx], sub[0], sub[2],
                                       terms, flags, False)
    assert torch.equal(grad_q[idx], sub_q)
    assert grad_q.abs().sum() > 0


@needs_cpu
def test_cpu_class_engine_walk_past_2_31_logits():
    """N x C > 2^31 logits (K = 1, row and column terms): sampled rows' lse_other / target_sim and
    sampled classes' column LSEs against fp64 torch on those rows / classes; sampled rows of grad_q
    against the same op on those rows alone."""
    N, C = N_BIG, M_BIG
    q, w = _rows(N, D, 4), _rows(C, D, 5)
    y = torch.randint(0, C, (N,), generator=torch.Generator().manual_seed(6))
    y[:64] = C - 1  # the last class has samples
    terms, flags = CLASS_SPEC.pack()
    terms = list(terms)
    rows, cols = op.class_engine_forward(q, w, y, 1, terms, flags)

    def term(t, s):
        return t.scale * (s - t.shift)

    q64, w64 = q.double(), w.double()
    idx = _sample_rows(N)
    s = q64[idx] @ w64.T  # (rows, C)
    tgt = torch.nn.functional.one_hot(y[idx], C).bool()
    ref_lse = torch.logsumexp(term(CLASS_SPEC.row, s).masked_fill(tgt, float("-inf")), dim=1)
    torch.testing.assert_close(rows[0, idx].double(), ref_lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rows[1, idx].double(), s[tgt], rtol=0, atol=1e-6)
    cls = torch.tensor([0, 1, C // 2, C - 2, C - 1])
    sc = q64 @ w64[cls].T  # (N, classes)
    mine = y[:, None] == cls[None, :]
    ref_pos = torch.logsumexp(term(CLASS_SPEC.col_pos, sc).masked_fill(~mine, float("-inf")), dim=0)
    ref_neg = torch.logsumexp(term(CLASS_SPEC.col_neg, sc).masked_fill(mine, float("-inf")), dim=0)
    torch.testing.assert_close(cols[0, cls].double(), ref_pos, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cols[1, cls].double(), ref_neg, rtol=1e-5, atol=1e-5)

    g = torch.Generator().manual_seed(7)
    grad_rows, grad_cols = torch.randn(2, N, generator=g), torch.randn(2, C, generator=g)
    grad_q, _ = op.class_engine_backward(grad_rows, grad_cols, q, w, y, rows, cols, 1, terms, flags, False)
    sub_q, _ = op.class_engine_backward(grad_rows[:, idx].contiguous(), grad_cols, q[idx], w, y[idx],
                                        rows[:, idx].contiguous(), cols, 1, terms, flags, False)
    torch.testing.assert_close(grad_q[idx], sub_q, rtol=1e-6, atol=1e-6)
    assert grad_q.abs().sum() > 0


# ---- limits: expanded operands of 2^31 rows (no memory) -------------------------------------------
def _expanded(n, d=1):
    return torch.zeros(1, d).expand(n, d), torch.zeros(1, dtype=torch.int64).expand(n)


def _pair_args_with_m(M):
    q, lq = _expanded(4)
    r, lr = _expanded(M)
    terms, flags = PAIR_SPEC.pack()
    return q, r, lq, lr, None, list(terms), flags


LIMIT = "2147483647 \\(2\\^31 - 1\\): the per-row set sizes \\(counts\\) are int32"


@needs_cpu
@pytest.mark.parametrize("M", [INT32_MAX + 1, 2**33])
def test_cpu_pair_engine_rejects_m_past_int32(M):
    with pytest.raises(RuntimeError, match=f"{M} rows of r .* exceed the limit of {LIMIT}"):
        op.pair_engine_forward(*_pair_args_with_m(M))
    q, lq = _expanded(M)  # self mode: M = N
    terms, flags = PAIR_SPEC.pack()
    with pytest.raises(RuntimeError, match=f"{M} rows of r \\(self mode: of q\\) exceed the limit"):
        op.pair_engine_forward(q, None, lq, None, None, list(terms), flags)


@pytest.mark.skipif(not triton_engines.AVAILABLE, reason="triton not available")
def test_triton_pair_engine_rejects_m_past_int32():
    with pytest.raises(RuntimeError, match=f"{INT32_MAX + 1} rows of r .* exceed the limit of {LIMIT}"):
        torch.ops.fused_pairloss.triton_pair_engine_forward(*_pair_args_with_m(INT32_MAX + 1))


def test_triton_grid_limit_message():
    with pytest.raises(RuntimeError, match="N \\(rows of q\\) = 137438953409 needs 2147483648 programs of 64, more "
                                           "than the grid limit of 2147483647; the limit is 137438953408"):
        triton_engines._check_grid(64 * INT32_MAX + 1, 64, "N (rows of q)")
    triton_engines._check_grid(64 * INT32_MAX, 64, "N (rows of q)")


def test_cuda_glue_size_limits(emu):
    """The CUDA glue (csrc/cuda/glue.h, run through the emulation build): M past int32, and grids
    past gridDim.x (one CTA per 64 rows of q; per class tile), before any kernel or copy."""
    with pytest.raises(RuntimeError, match=f"{INT32_MAX + 1} rows of r .* exceed the limit of {LIMIT}"):
        emu.pair_engine_forward(*_pair_args_with_m(INT32_MAX + 1))
    n = 64 * INT32_MAX + 1
    q, lq = _expanded(n)
    r, lr = _expanded(4)
    terms, flags = PAIR_SPEC.pack()
    grid = f"= {n} needs 2147483648 CTAs of 64, more than CUDA's grid limit of 2147483647"
    with pytest.raises(RuntimeError, match=f"N \\(rows of q\\) {grid}"):
        emu.pair_engine_forward(q, r, lq, lr, None, list(terms), flags)
    ct, cflags = CLASS_SPEC.pack()
    w, _ = _expanded(4)
    with pytest.raises(RuntimeError, match=f"N \\(rows of q\\) {grid}"):
        emu.class_engine_forward(q, w, lq, 1, list(ct), cflags)
    q, lq = _expanded(4)
    w, _ = _expanded(64 * INT32_MAX + 1)
    with pytest.raises(RuntimeError, match=f"C \\(classes\\) {grid}"):
        emu.class_engine_forward(q, w, lq, 1, list(ct), cflags)
