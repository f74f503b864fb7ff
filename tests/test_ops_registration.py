"""Every fused op is a torch.library op with a fake kernel and registered autograd: opcheck them;
and the C++ reading of a packed loss declaration is the one spec.py writes."""
import os

import pytest
import torch

import fused_pairloss as fpl
from fused_pairloss.ops import engines  # noqa: F401  (registers the fake kernels and autograd)
from fused_pairloss.ops import spec as S

import kit

CPU_BUILT = fpl.build_info()["cpu"]
IN_CI = bool(os.environ.get("CI"))
op = torch.ops.fused_pairloss


@pytest.fixture(autouse=True)
def _require_cpu():
    if not CPU_BUILT:
        if IN_CI:
            pytest.fail("CI must build fused_pairloss._C: " + str(fpl.build_info()["library_error"]))
        pytest.skip("fused_pairloss._C not built: " + str(fpl.build_info()["library_error"]))


def _grad_leaf(t):
    return None if t is None else t.clone().requires_grad_(True)


@pytest.mark.parametrize("decl,mode", kit.pair_declarations_and_modes()
                         + [(d, m) for d in kit.HIST_DECLARATIONS for m in ("self", "ref")])
def test_opcheck_pair_engine(decl, mode):
    spec = {**kit.PAIR_DECLARATIONS, **kit.HIST_DECLARATIONS}[decl]
    terms, flags = spec.pack()
    case = kit.pair_case(mode, 13, 7, "few", torch.float32, "normalized", seed=0, m=9 if mode == "ref" else None)
    q, r, lq, lr, ex = case.args()
    torch.library.opcheck(op.pair_engine_forward.default,
                          (_grad_leaf(q), _grad_leaf(r), lq, lr, ex, list(terms), flags))
    values, _, aux = op.pair_engine_forward(q, r, lq, lr, ex, list(terms), flags)
    for need_r in (True, False):
        torch.library.opcheck(op.pair_engine_backward.default,
                              (torch.ones_like(values), q, r, lq, lr, ex, values, aux, list(terms), flags, need_r))


@pytest.mark.parametrize("mode", kit.MODES)
@pytest.mark.parametrize("decl", ["margin_lp", "ms_mine"])
def test_opcheck_pair_engine_row_shift(decl, mode):
    """The ops' optional row_shift (a constant operand: no gradient to it)."""
    terms, flags = kit.ROW_SHIFT_DECLARATIONS[decl].pack()
    case = kit.pair_case(mode, 13, 7, "few", torch.float32, "normalized", seed=0, m=9 if mode == "ref" else None)
    q, r, lq, lr, ex = case.args()
    rs = kit.row_shifts(13).float()
    torch.library.opcheck(op.pair_engine_forward.default,
                          (_grad_leaf(q), _grad_leaf(r), lq, lr, ex, list(terms), flags, rs))
    values, _, aux = op.pair_engine_forward(q, r, lq, lr, ex, list(terms), flags, rs)
    torch.library.opcheck(op.pair_engine_backward.default,
                          (torch.ones_like(values), q, r, lq, lr, ex, values, aux, list(terms), flags, True, rs))
    for bad in (rs[:-1], rs.long(), rs[None]):
        with pytest.raises(RuntimeError, match="row_shift"):
            op.pair_engine_forward(q, r, lq, lr, ex, list(terms), flags, bad)


CLASS_OPCHECK = {**kit.CLASS_DECLARATIONS, **{f"{k}_loss_weights": v for k, v in kit.LOSS_CLASS_DECLARATIONS.items()}}


@pytest.mark.parametrize("decl", list(CLASS_OPCHECK))
def test_opcheck_class_engine(decl):
    spec, K = CLASS_OPCHECK[decl]
    terms, flags = spec.pack()
    case = kit.as_loss_weights(kit.class_case(11, 6, 5, K, torch.float32, seed=1), spec)
    torch.library.opcheck(op.class_engine_forward.default,
                          (_grad_leaf(case.q), _grad_leaf(case.w), case.labels, K, list(terms), flags))
    rows, cols = op.class_engine_forward(*case.args(), list(terms), flags)
    for need_w in (True, False):
        torch.library.opcheck(op.class_engine_backward.default,
                              (torch.ones_like(rows), torch.ones_like(cols), case.q, case.w, case.labels, rows, cols,
                               K, list(terms), flags, need_w))


@pytest.mark.parametrize("decl", list(kit.PAIR_DECLARATIONS) + list(kit.HIST_DECLARATIONS))
def test_cpp_reads_the_pair_declaration_spec_py_writes(decl):
    spec = {**kit.PAIR_DECLARATIONS, **kit.HIST_DECLARATIONS}[decl]
    terms, flags = spec.pack()
    assert op.describe_pair_spec(list(terms), flags) == spec.describe()
    assert S.unpack_pair(terms, flags).pack() == (terms, flags)


@pytest.mark.parametrize("decl", list(CLASS_OPCHECK))
def test_cpp_reads_the_class_declaration_spec_py_writes(decl):
    spec, K = CLASS_OPCHECK[decl]
    terms, flags = spec.pack()
    assert op.describe_class_spec(list(terms), flags, K) == spec.describe()
    assert S.unpack_class(terms, flags, K).pack()[1] == flags


def test_every_pair_flag_reaches_cpp():
    """Each flag bit and each float field, set alone, shows up in the C++ reading."""
    base = S.PairLossSpec(pos=S.PairTerm(scale=1.0), neg=S.PairTerm(scale=1.0))
    variants = [
        S.PairLossSpec(pos=S.PairTerm(scale=-3.5, shift=0.25, weight_offset=1.5, weight_slope=-1.0, lse=True),
                       neg=S.PairTerm(scale=2.0)),
        S.PairLossSpec(pos=S.PairTerm(scale=1.0, sum=True, hinge=True), neg=S.PairTerm(scale=1.0, lse=True, sum=True,
                                                                                          hinge=True)),
        S.PairLossSpec(pos=S.PairTerm(scale=1.0), neg=S.PairTerm(scale=1.0, shift=-0.125), distance="lp",
                       miner_epsilon=0.3, pos_vs_neg_lse=True, exclude_after_mining=True),
        S.PairLossSpec(pos=S.PairTerm(scale=1.0), neg=S.PairTerm(scale=1.0, shift=-0.125), distance="lp",
                       miner_epsilon=0.3, pos_vs_neg_lse=True, exclude_after_mining=True, miner_on_cosine=True),
        S.PairLossSpec(pos=S.PairTerm(scale=1.0), neg=S.PairTerm(scale=1.0), pos_window=(-0.25, float("inf")),
                       neg_window=(float("-inf"), 0.75)),
        S.PairLossSpec(pos=S.PairTerm(scale=1.0), neg=S.PairTerm(scale=1.0, lse=True), pos_vs_neg_lse=True,
                       ntx_tiny=2.0 ** -14),
    ]
    seen = {base.describe()}
    for v in variants:
        terms, flags = v.pack()
        text = op.describe_pair_spec(list(terms), flags)
        assert text == v.describe() and text not in seen
        seen.add(text)


def test_invalid_declarations_are_rejected():
    q = torch.randn(4, 3)
    y = torch.zeros(4, dtype=torch.long)
    with pytest.raises(RuntimeError, match="terms must have"):
        op.pair_engine_forward(q, None, y, None, None, [1.0, 2.0], 0)
    with pytest.raises(RuntimeError, match="unknown pair flag"):
        op.pair_engine_forward(q, None, y, None, None, [0.0] * 19, 1 << 14)
    with pytest.raises(RuntimeError, match="pos.sum_temperature needs a hinge term reduced by sum"):
        op.pair_engine_forward(q, None, y, None, None, [0.0] * 9 + [1.0] + [0.0] * 9, S.POS_SUM)
    with pytest.raises(ValueError, match="neg.sum_temperature needs a hinge term reduced by sum"):
        S.PairLossSpec(pos=S.PairTerm(1.0), neg=S.PairTerm(1.0, lse=True, sum_temperature=2.0))
    no_windows = [0.0] * 4 + [0.0]  # and the default ntx_tiny
    hist = [0.0] * 11 + [4.0, 0.0, 2.0] + no_windows  # 4 nodes
    with pytest.raises(RuntimeError, match="a histogram cannot be combined with mining or NTXent"):
        op.pair_engine_forward(q, None, y, None, None, hist, S.MINE)
    with pytest.raises(RuntimeError, match="hist_inv_width must be a number > 0"):
        op.pair_engine_forward(q, None, y, None, None, hist[:13] + [0.0] + no_windows, 0)
    with pytest.raises(RuntimeError, match="hist_nodes must be an integer"):
        op.pair_engine_forward(q, None, y, None, None, [0.0] * 11 + [2.5, 0.0, 2.0] + no_windows, 0)
    with pytest.raises(ValueError, match="histogram cannot be combined with miner_epsilon"):
        S.PairLossSpec(pos=S.NO_TERM, neg=S.NO_TERM, miner_epsilon=0.1, histogram=S.PairHistogram(4, 2.0))
    with pytest.raises(ValueError, match="PairHistogram.inv_width must be a number > 0"):
        S.PairHistogram(4, float("inf"))
    with pytest.raises(RuntimeError, match="hist_lo must be a finite number"):
        op.pair_engine_forward(q, None, y, None, None, [0.0] * 11 + [4.0, float("nan"), 2.0] + no_windows, 0)
    with pytest.raises(RuntimeError, match="keep windows cannot be combined with mining"):
        op.pair_engine_forward(q, None, y, None, None, [0.0] * 19, S.MINE | S.KEEP_WINDOWS)
    with pytest.raises(RuntimeError, match="keep windows cannot be combined with a histogram"):
        op.pair_engine_forward(q, None, y, None, None, hist, S.KEEP_WINDOWS)
    with pytest.raises(RuntimeError, match="bounds must not be NaN"):
        op.pair_engine_forward(q, None, y, None, None, [0.0] * 14 + [0.0, float("nan"), 0.0, 1.0, 0.0], S.KEEP_WINDOWS)
    with pytest.raises(RuntimeError, match="ntx_tiny must be in"):
        op.pair_engine_forward(q, None, y, None, None, [0.0] * 18 + [1.5], 0)
    with pytest.raises(ValueError, match="ntx_tiny must be None or a number in"):
        S.PairLossSpec(pos=S.NO_TERM, neg=S.NO_TERM, ntx_tiny=0.0)
    with pytest.raises(ValueError, match="pos_window and neg_window go together"):
        S.PairLossSpec(pos=S.NO_TERM, neg=S.NO_TERM, pos_window=(0.0, 1.0))
    with pytest.raises(ValueError, match="cannot be combined with miner_epsilon"):
        S.PairLossSpec(pos=S.NO_TERM, neg=S.NO_TERM, miner_epsilon=0.1, pos_window=(0.0, 1.0), neg_window=(0.0, 1.0))
    with pytest.raises(ValueError, match="neg_window must be a tuple"):
        S.PairLossSpec(pos=S.NO_TERM, neg=S.NO_TERM, pos_window=(0.0, 1.0), neg_window=(float("nan"), 1.0))
    with pytest.raises(RuntimeError, match="column reductions need"):
        op.class_engine_forward(q, torch.randn(6, 3), y, 2, [0.0] * 13, S.COL_POS_LSE)
    with pytest.raises(RuntimeError, match="exclude_col values"):
        op.pair_engine_forward(q, q, y, y, torch.tensor([0, 1, 2, 9]), [0.0] * 19, 0)


def test_opcheck_hyper_parameters():
    """fused_pairloss::hyper_parameters (ops/_common.py): an empty tensor, its fake kernel the same."""
    from fused_pairloss.ops import _common
    torch.library.opcheck(_common.hyper_parameters, ([0.5, 2.0],))
    assert _common.hyper_parameters([1.0]).numel() == 0
