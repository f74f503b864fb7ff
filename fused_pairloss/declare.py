"""Declare a pair loss of your own and get it fused (docs/declarations.md).

A pair loss here is what this library's own pair losses are: a declaration (`PairLossSpec`: per pair
set a `PairTerm` and the row reductions it needs) that every engine computes without the N x M
matrix (C++ on the CPU, CUDA, Triton), and a row combination in PyTorch from the engine's per-row
statistics (`PairStats`) to the loss. `pair_loss` builds from the two a module class, its
functional form and its materializing reference; the module runs on every backend with autograd,
inside `DistributedLossWrapper` and `CrossBatchMemory` (fused there too), and with a miner's
`indices_tuple` (the listed pairs).

    import fused_pairloss as fpl
    from fused_pairloss.declare import PairLossSpec, PairTerm, pair_loss

    def declaration(margin, distance):
        return PairLossSpec(pos=PairTerm(scale=1.0, shift=0.0, hinge=True, sum=True),
                            neg=PairTerm(scale=-1.0, shift=margin, hinge=True, sum=True), distance=distance)

    def combine(st, embeddings, *, batch, margin):
        return (batch.sum(st.sum_pos) + batch.sum(st.sum_neg)) / batch.rows(st.sum_pos)

    MyLoss = pair_loss("MyLoss", declaration=declaration, combine=combine, hyper={"margin": 1.0},
                       distance="lp")
    loss = MyLoss(margin=0.5)(embeddings, labels)
"""
from __future__ import annotations

import dataclasses
import inspect

import torch

from . import _distributed
from . import _validation as V
from .losses._base import _distance_name, _PairLoss, _set_pml_object, run_pair_loss
from .ops import oracle
from .ops._common import LOCAL, Batch, loss_function, pair_operands, zero_loss
from .ops.engines import PairStats
from .ops.listed import ListedPairs, listed_pair_stats
from .ops.spec import DISTANCES, FLOAT_MAX, FLOAT_TINY, PairHistogram, PairLossSpec, PairTerm, pair_stats_of
from .ops.stats import pair_stats

__all__ = ["PairTerm", "PairLossSpec", "PairHistogram", "PairStats", "Batch", "pair_loss", "check_declaration"]

# names a hyper-parameter cannot take: the call's own arguments and the module's attributes (each
# hyper-parameter becomes a property of the class)
_RESERVED_NAMES = frozenset({"distance", "backend", "embeddings", "labels", "indices_tuple", "ref_emb", "ref_labels",
                             "exclude_col", "batch", "reducer", "collect_stats", "embedding_regularizer",
                             "embedding_reg_weight", "functional", "reference", "declaration", "combine",
                             "exclude_after_mining"}
                            | set(dir(_PairLoss)) | set(dir(torch.nn.Module())))


def check_declaration(spec, where="declaration"):
    """A declaration a user wrote: ValueError / TypeError naming the field that is wrong (PairTerm
    and PairLossSpec check their fields' types and ranges when built; these are the rules between
    fields that only a declared loss must keep)."""
    if not isinstance(spec, PairLossSpec):
        raise TypeError(f"{where} must return a fused_pairloss.declare.PairLossSpec; got {type(spec).__name__}")
    for side in ("pos", "neg"):
        term = getattr(spec, side)
        for field in ("scale", "shift", "weight_offset", "weight_slope", "sum_temperature"):
            _check_finite_float(f"{where}: PairLossSpec.{side}.{field}", getattr(term, field))
        if term.hinge and term.lse:
            raise ValueError(f"{where}: PairLossSpec.{side}: a hinge term is reduced by sum (PML's AvgNonZero), "
                             "not lse")
    if spec.pos_vs_neg_lse and not spec.neg.lse:
        raise ValueError(f"{where}: PairLossSpec.pos_vs_neg_lse needs neg.lse=True (it reads each row's lse_neg)")
    if spec.miner_epsilon is not None:
        _check_finite_float(f"{where}: PairLossSpec.miner_epsilon", spec.miner_epsilon)
    if spec.ntx_tiny is not None and spec.ntx_tiny < FLOAT_TINY:
        # below it the fp32 engines' tiny rounds to a subnormal or 0 (-log sigmoid without it)
        raise ValueError(f"{where}: PairLossSpec.ntx_tiny must be at least float32's smallest normal number "
                         f"{FLOAT_TINY} (the engines add it in fp32 for fp32 inputs); got {spec.ntx_tiny!r}")
    return spec


def _check_finite_float(name, value):
    """Finite as the float the engines compute in (a larger double would be inf there and not in
    the reference)."""
    if not -FLOAT_MAX <= value <= FLOAT_MAX:
        raise ValueError(f"{name} must be finite as a float (|x| <= {FLOAT_MAX:.4g}); got {value!r}")


def pair_loss(name, *, declaration, combine, hyper, distance="cosine", pair_based=False, doc=None):
    """A pair loss from its declaration and row combination: returns its module class (with
    `.functional` and `.reference` attached).

    declaration(**hyper, distance) -> PairLossSpec: the pair terms and reductions.
    combine(stats: PairStats, embeddings, *, batch: Batch, **hyper) -> 0-dim tensor: the loss from
        the per-row statistics, reduced over rows with `batch` (sum, count, rows, mean): the
        distributed wrapper passes one whose reductions run over every rank's rows.
    hyper: the hyper-parameters and their defaults, in constructor order (floats).
    distance: the default distance, "cosine" (S) or "lp" (d); the constructor takes either.
    pair_based: how an indices_tuple's pairs count: True, as often as listed (PML's losses that
        reduce the pair list: Contrastive, NTXent, ...; a triplet miner's tuple lists a pair once per
        triplet); False, each (row, column) pair once (PML's losses that build masks from the list:
        MultiSimilarity, Circle, ...).
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"name must be a Python identifier (the class name); got {name!r}")
    if not callable(declaration) or not callable(combine):
        raise TypeError("declaration and combine must be callables")
    if not isinstance(hyper, dict) or not all(isinstance(k, str) for k in hyper):
        raise TypeError(f"hyper must be a dict of hyper-parameter names to defaults; got {hyper!r}")
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}; got {distance!r}")
    if not isinstance(pair_based, bool):
        raise TypeError(f"pair_based must be a bool; got {pair_based!r}")
    params = inspect.signature(combine).parameters
    if "batch" not in params:
        raise TypeError("combine must take a keyword argument batch (the rows' reductions)")
    positional = [k for k, p in params.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][:2]
    taken = sorted(set(hyper) & set(positional))
    if taken:  # combine(stats, embeddings, batch=..., **hyper) would get them twice
        raise ValueError(f"hyper: {taken} also names combine's positional parameter (the stats, the embeddings): "
                         "name the hyper-parameters otherwise")
    reserved = sorted(k for k in hyper if k in _RESERVED_NAMES or k.startswith("_") or not k.isidentifier())
    if reserved:
        raise ValueError(f"hyper: {reserved} are names the loss's call or class already has (distance, backend, "
                         "the forward's arguments, reducer, functional, reference, torch.nn.Module's attributes) "
                         "or no public identifiers: name the hyper-parameters otherwise")

    def spec_of(hyper_values, dist):
        spec = check_declaration(declaration(**hyper_values, distance=dist), where=f"{name}: declaration")
        if spec.distance != dist:
            raise ValueError(f"{name}: declaration(distance={dist!r}) returned "
                             f"PairLossSpec.distance={spec.distance!r}: pass the distance argument on to the spec")
        return spec

    spec_of(hyper, distance)  # what it computes is checked once, at the defaults

    def finish(loss, embeddings, ref_emb):
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            what = f"shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise TypeError(f"{name}: combine must return a 0-dim tensor (the loss); got {what}")
        # NaN in, NaN out: hinge terms drop NaN (PML's AvgNonZero); an exact 0 of the inputs keeps it
        return loss + zero_loss(embeddings) + (0 if ref_emb is None else zero_loss(ref_emb))

    @loss_function
    def fused(embeddings, labels, ref_emb, ref_labels, *, backend, exclude_col=None, batch=LOCAL, distance=distance,
              exclude_after_mining=False, **hyper_values):
        q, r, labels_r, excl = pair_operands(embeddings, labels, ref_emb, ref_labels, exclude_col)
        spec = spec_of(hyper_values, distance)
        if exclude_after_mining:  # CrossBatchMemory's self slot mines, then leaves (PML's memory + miner)
            spec = dataclasses.replace(spec, exclude_after_mining=True)
        st = pair_stats(q, r, labels, labels_r, excl, spec, backend)
        return finish(combine(st, embeddings, batch=batch, **hyper_values), embeddings, ref_emb)

    def reference(embeddings, labels, ref_emb=None, ref_labels=None, *, distance=distance, indices_tuple=None,
                  **hyper_values):
        """The materializing computation of the same declaration (ops/oracle.py), or over the listed
        pairs with an indices_tuple (ops/listed.py); from the inputs as given, as the engines compute
        (autocast off)."""
        hyper_values = _with_defaults(hyper_values)
        spec = spec_of(hyper_values, distance)
        with torch.autocast(embeddings.device.type, enabled=False):
            q, r, labels_r, excl = pair_operands(embeddings, labels, ref_emb, ref_labels)
            st = _reference_stats(q, r, labels, labels_r, excl, spec, embeddings, ref_emb, indices_tuple)
        return finish(combine(st, embeddings, batch=LOCAL, **hyper_values), embeddings, ref_emb)

    def _with_defaults(hyper_values):
        unknown = set(hyper_values) - set(hyper)
        if unknown:
            raise TypeError(f"{name}: unknown hyper-parameters {sorted(unknown)}; it takes {list(hyper)}")
        return {**hyper, **hyper_values}

    def _reference_stats(q, r, labels, labels_r, excl, spec, embeddings, ref_emb, indices_tuple):
        if indices_tuple is not None:
            n_cols = (embeddings if ref_emb is None else ref_emb).shape[0]
            V.check_indices_tuple(indices_tuple, embeddings.shape[0], n_cols)
            st = listed_pair_stats(q, r, spec, ListedPairs(indices_tuple, pair_based, embeddings.device,
                                                           embeddings.shape[0], n_cols))
        else:
            labels_q = torch.as_tensor(labels, device=q.device).long()
            labels_r = None if labels_r is None else torch.as_tensor(labels_r, device=q.device).long()
            values, counts, aux = oracle.pair_values(q, r, labels_q, labels_r, excl, spec)
            st = PairStats(*pair_stats_of(values, counts, aux))
        return st

    @loss_function
    def functional(embeddings, labels, ref_emb=None, ref_labels=None, *, distance=distance, backend="auto",
                   **hyper_values):
        values = _with_defaults(hyper_values)
        for k, v in values.items():
            V.check_real(k, v)
        V.check_distance(distance)
        return run_pair_loss(reference, fused, embeddings, labels, ref_emb, ref_labels, backend, distance=distance,
                             **values)

    functional.__name__ = functional.__qualname__ = _snake(name)
    reference.__name__ = reference.__qualname__ = _snake(name) + "_reference"

    def __init__(self, *args, backend="auto", distance=distance, **kwargs):
        _PairLoss.__init__(self)
        if len(args) > len(hyper):
            raise TypeError(f"{name} takes at most {len(hyper)} positional hyper-parameters ({list(hyper)})")
        values = dict(hyper, **dict(zip(hyper, args)))
        twice = set(list(hyper)[:len(args)]) & set(kwargs)
        if twice:
            raise TypeError(f"{name} got multiple values for argument {sorted(twice)[0]!r}")
        unknown = set(kwargs) - set(hyper)
        if unknown:
            raise TypeError(f"{name}: unknown arguments {sorted(unknown)}; it takes {list(hyper)}, distance, backend")
        values.update(kwargs)
        for k, v in values.items():
            V.check_real(k, v)
        if distance not in DISTANCES:
            raise ValueError(f"{name}: distance must be one of {DISTANCES}; got {distance!r}")
        spec_of(values, distance)
        self._values = values
        self.backend, self._distance_kind = backend, distance
        _set_pml_object(self, "distance", distance)  # no PML object: the declared kind
        _set_pml_object(self, "reducer", None)
        self._pml, self.collect_stats = None, False

    def _hyper(self):
        return dict(self._values, distance=self._distance_kind)

    def __setattr__(self, key, value):
        if key in _DECLARED_READS and "_values" in self.__dict__:
            value = _declared_setting(name, key, value)
            if key == "distance":
                object.__setattr__(self, "_distance_kind", value)
            _set_pml_object(self, key, value)
            return
        _PairLoss.__setattr__(self, key, value)

    def _pml_only_assigned(self):
        return False  # nothing to fall back on: PML's attributes are taken or refused by __setattr__

    def __copy__(self):  # a copy's hyper-parameters are its own (they live in one dict)
        twin = type(self).__new__(type(self))
        twin.__dict__.update(self.__dict__)
        twin.__dict__["_values"] = dict(self._values)
        return twin

    def _mines_within(self):
        return spec_of(self._values, self._distance_kind).miner_epsilon is not None

    def _has_a_miners_rule(self):
        """A miner's rule in the declaration: its miner_epsilon or its windows (CrossBatchMemory
        computes such a loss by its fused engine only)."""
        spec = spec_of(self._values, self._distance_kind)
        return spec.miner_epsilon is not None or spec.pos_window is not None

    cls = type(name, (_PairLoss,), {
        "__init__": __init__, "__doc__": doc or f"{name}: a pair loss declared with fused_pairloss.declare.pair_loss.",
        "_hyper": _hyper, "_mines_within": _mines_within, "_has_a_miners_rule": _has_a_miners_rule,
        "_functional": lambda self: functional,
        "__setattr__": __setattr__, "__copy__": __copy__, "_pair_based": pair_based,
        "_pml_only_assigned": _pml_only_assigned,
        "_reference": staticmethod(reference), "_fused_fn": staticmethod(fused), "_default_distance": distance,
        "__module__": _caller_module(),
    })
    cls.functional, cls.reference, cls.declaration, cls.combine = (staticmethod(functional), staticmethod(reference),
                                                                   staticmethod(declaration), staticmethod(combine))
    for k in hyper:  # PML-style attributes: loss.margin reads (and sets) the hyper-parameter
        setattr(cls, k, property(lambda self, k=k: self._values[k],
                                 lambda self, v, k=k: self._values.__setitem__(k, v)))
    _distributed.FUSED_PAIR_CALLS[cls] = fused  # the distributed wrapper and CrossBatchMemory fuse it
    return cls


# what a declared loss computes with besides its hyper-parameters: its declared distance (another
# one of DISTANCES may be assigned), no reducer and no regularizer (its combine reduces)
_DECLARED_READS = ("distance", "reducer", "embedding_regularizer")


def _declared_setting(name, key, value):
    """The value a declared loss stores for an assigned `key` of _DECLARED_READS, or an error naming
    it: a declared loss has no PML computation to fall back on."""
    if key == "distance":
        kind = value if isinstance(value, str) else _distance_name(value)
        if kind not in DISTANCES:
            raise ValueError(f"{name}: distance must be one of {DISTANCES} (or PML's LpDistance() / "
                             f"CosineSimilarity()); got {value!r}")
        return kind
    if value is not None:
        raise ValueError(f"{name}: a declared loss reduces as its combine says; {key} must be None; got {value!r}")
    return None


def _snake(name):
    out = "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")
    return out if out.endswith("loss") else out + "_loss"


def _caller_module():
    frame = inspect.currentframe().f_back.f_back
    return frame.f_globals.get("__name__", __name__) if frame is not None else __name__
