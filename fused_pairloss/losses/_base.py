"""What every loss module shares: the base classes with PML's class names' conventions
(constructor arguments, parameter name and layout, forward signatures; docs/api.md), and the call
every functional form makes (validate, pick the backend, run the reference or the fused engine).
The base classes derive from PML's BaseMetricLossFunction where PML is installed (its wrappers
take them), else from nn.Module; `forward` first makes what PML's forward accepts ours
(`pml_labels`, empty batches: docs/api.md "Bad input"), then runs the loss's `_forward`.

PML's own keyword arguments are accepted: `distance=CosineSimilarity()` / `LpDistance()` (PML's
defaults) are fused where the loss allows them; any other distance, a `reducer`,
`embedding_regularizer`, `weight_regularizer` (except SoftTriple's SparseCentersRegularizer, which
is fused) or `collect_stats=True` makes the module compute with PML itself (same value as PML), with
a one-time warning. `distance` and `reducer` are PML's objects either way. An explicit
`indices_tuple`: a pair loss computes over the listed pairs through its own fused function
(ops/listed.py), SoftTriple applies the miner weights to its fused rows; the reference path (N x M,
with a one-time warning) remains for the "reference" backend and the losses whose PML semantics
there are per-row weights.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import math
import numbers
import sys
import warnings

import torch

from .. import _validation as V
from .._backends import check_backend_name, resolve_backend
from ..ops._common import hyper_parameters_as_constants, zero_loss
from ..ops.operands import autocast_enabled
from ._reference_common import fp16_rows_normalized_to_nan, nan_in_nan_out


_warned = set()


def _warn_once(key, message):
    """A warning once per key, pointing at the user's line (V.user_stacklevel)."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=V.user_stacklevel())


def warn_unfused_indices(module):
    """Once per loss class: its indices_tuple is computed by the reference (N x M)."""
    name = type(module).__name__
    _warn_once(f"indices_tuple.{name}", f"fused_pairloss: {name} computes an explicit indices_tuple by the "
               "unfused reference path (it materializes N x M)")


def _users_own(cls, name):
    """Whether `name` of class `cls` is defined by a user's subclass (neither this library's nor PML's)."""
    for klass in cls.__mro__:
        if name in klass.__dict__:
            return klass.__module__.split(".")[0] not in ("fused_pairloss", "pytorch_metric_learning")
    return False


# PML's methods of its loss classes that do not take part in what a loss computes (construction,
# the defaults the constructor reads, which our constructors honour: _users_defaults)
_NOT_COMPUTATION_HOOKS = frozenset({"get_default_distance", "get_default_reducer", "get_default_weight_init_func"})


def _computation_hooks(pml_cls):
    """PML's extension points of a loss: compute_loss, and the methods that PML's class of the loss
    defines below BaseMetricLossFunction (get_per_pair_loss, _compute_loss, scale_logits,
    modify_cosine_of_target_classes, get_logits, ...), which its compute_loss calls."""
    if pml_cls is None:  # a loss of ours alone (ProxyCircle, a declared one): no PML computation to call
        return {"compute_loss"}
    hooks = {"compute_loss", "_sub_loss_names"}
    shared = set(pml_base("BaseMetricLossFunction").__mro__)
    for klass in pml_cls.__mro__:
        if klass not in shared and klass.__module__.startswith("pytorch_metric_learning"):
            hooks.update(name for name, value in vars(klass).items()
                         if callable(value) and not name.startswith("__") and name not in _NOT_COMPUTATION_HOOKS)
    return hooks


_MISSING = object()


def _pml_attribute(module, name):
    """For a user's subclass whose overrides PML's compute_loss calls: what PML's class of the loss
    has and ours does not (its methods, bound to the module; its instance's attributes, such as
    GenericPairLoss's loss_method, from the module's PML twin, its methods re-bound to the
    module so that they call the user's overrides); _MISSING otherwise."""
    static = inspect.getattr_static(module._pml_class(), name, _MISSING)
    if static is not _MISSING:
        return static.__get__(module, type(module)) if hasattr(static, "__get__") else static
    twin = module.__dict__.get("_pml_probe")
    if twin is None:
        return _MISSING
    value = getattr(twin, name, _MISSING)
    if inspect.ismethod(value) and value.__self__ is twin:
        return value.__func__.__get__(module, type(module))
    return value


def _falling_back_to_pml(getattr_first):
    """A __getattr__: `getattr_first` (nn.Module's: parameters, buffers, sub-modules; or a user's own),
    then PML's class's attributes (_pml_attribute). Installed on a user's subclass that overrides
    PML's extension points."""
    def __getattr__(module, name):
        try:
            return getattr_first(module, name)
        except AttributeError:
            if name.startswith("__"):
                raise
            value = _pml_attribute(module, name)
            if value is _MISSING:
                raise
            return value
    __getattr__.falls_back_to_pml = True
    return __getattr__


def with_pml_hooks(loss_cls, pml_cls):
    """PML's extension points (_computation_hooks) that the library's class `loss_cls` does not define,
    set on it as PML's class has them (the package sets them on every registered class, bases first),
    so that they are there as on PML's class and a user's override reaches PML's through super().
    The library's own forward never calls them."""
    if pml_cls is None or "_pml_hooks" in loss_cls.__dict__:
        return
    set_here = set()
    for name in _computation_hooks(pml_cls):
        if not _defined_by_the_library(loss_cls, name):
            setattr(loss_cls, name, inspect.getattr_static(pml_cls, name))
            set_here.add(name)
    loss_cls._pml_hooks = frozenset(set_here)


def _defined_by_the_library(loss_cls, name):
    """Whether the nearest definition of `name` in loss_cls's MRO is the library's own (not one of
    PML's hooks set on a base by with_pml_hooks: SubCenterArcFace takes PML's SubCenterArcFace's,
    not the ArcFace ones set on its base)."""
    for klass in loss_cls.__mro__:
        if name in klass.__dict__:
            return klass.__module__.startswith("fused_pairloss.") and name not in klass.__dict__.get("_pml_hooks", ())
    return False


# PML's distances' is_inverted as their classes set it (a similarity is inverted)
_CLASS_IS_INVERTED = {"CosineSimilarity": True, "DotProductSimilarity": True, "LpDistance": False,
                      "SNRDistance": False}


def _instance_overrides(obj):
    """The callables set on the object itself (not its class's methods): ids, by name."""
    return tuple(sorted((k, id(v)) for k, v in vars(obj).items() if callable(v) and not k.startswith("__")))


_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _hooks_of(module):
    """The keys of the module's own hooks, forward and backward, pre and post. (Not those registered
    on every module, torch.nn.modules.module.register_module_forward_hook: tools such as
    FlopCounterMode's module tracker add them for a while, and every loss would then be PML's
    computation, the hook's outputs unchanged; docs/api.md.)"""
    return tuple(tuple(getattr(module, name, None) or ()) for name in _HOOKS)


def computes_as_its_class(distance):
    """Whether PML's call of this distance object computes what its class and settings say: no hook
    of its own (forward or backward: PML calls the object), no method replaced on the instance,
    is_inverted as its class sets it (PML's losses read it to flip their comparisons). Else PML
    computes."""
    if any(_hooks_of(distance)):
        return False
    if _instance_overrides(distance):
        return False
    inverted = _CLASS_IS_INVERTED.get(type(distance).__name__)
    return inverted is None or getattr(distance, "is_inverted", inverted) == inverted


def _distance_name(distance):
    """A PML distance object (or None / "cosine" / "lp") as the fused engines name it: "cosine" for
    CosineSimilarity() and DotProductSimilarity() on normalized embeddings, "lp" for LpDistance()
    with PML's defaults (normalized, p=2, power=1), None for anything else (PML then computes)."""
    if distance is None or distance in ("cosine", "lp"):
        return distance
    try:
        from pytorch_metric_learning import distances as pml_distances
    except ImportError:  # a distance object without PML installed: not one of ours
        return None
    if not (getattr(distance, "p", None) == 2 and getattr(distance, "power", None) == 1
            and getattr(distance, "normalize_embeddings", False) and computes_as_its_class(distance)):
        return None
    if type(distance) in (pml_distances.CosineSimilarity, pml_distances.DotProductSimilarity):
        return "cosine"
    if type(distance) is pml_distances.LpDistance:
        return "lp"
    return None


def _copy_records(module, pml):
    """PML's record-keeping lists (ModuleWithRecords._record_these: the hyper-parameters PML's
    record-keeper logs; _record_these_stats: the stats it logs and reset_stats zeroes, with their
    initial values) from the PML instance of the same arguments."""
    for names in ("_record_these", "_record_these_stats"):
        if hasattr(pml, names):
            object.__setattr__(module, names, list(getattr(pml, names)))
    for stat in getattr(pml, "_record_these_stats", ()):
        if stat not in module.__dict__ and hasattr(pml, stat):
            object.__setattr__(module, stat, getattr(pml, stat))


def record_distance_stats(distance, query, ref=None):
    """The stats a PML distance with collect_stats records when PML's loss calls it on query against
    ref (BaseDistance.set_default_stats: the rows' mean norms before and after its normalization);
    the fused paths measure in their engines and never call it."""
    if getattr(distance, "collect_stats", False) and hasattr(distance, "set_default_stats"):
        _set_distance_stats(distance, query, ref)


@torch.compiler.disable  # records Python numbers (.item())
def _set_distance_stats(distance, query, ref):
    with torch.no_grad():
        distance.reset_stats()
        query = query.detach()
        ref = query if ref is None else ref.detach()
        distance.set_default_stats(query, ref, distance.maybe_normalize(query), distance.maybe_normalize(ref))


def _entry_of(cls):
    """The registry row (LossEntry) of a loss class or of the nearest of its bases that has one (a
    user's subclass); None if none does."""
    for klass in cls.__mro__:
        entry = next((e for e in getattr(sys.modules.get(klass.__module__), "ENTRIES", ()) if e.cls is klass), None)
        if entry is not None:
            return entry
    return None


def _small_pml_class_loss(cls, kwargs=None):
    """PML's class of the class loss `cls` built with 2 classes of width 2 (and the given PML keyword
    arguments): what PML's construction says without a C x D weight; its random init runs on a
    forked random state, so the caller's stays where PML's constructor would leave it. None where
    PML lacks the class or refuses the arguments at that size."""
    entry = _entry_of(cls)
    if entry is None:
        return None
    try:
        from pytorch_metric_learning import losses as pml_losses
        pml_cls = getattr(pml_losses, entry.cls.__name__)
    except (ImportError, AttributeError):
        return None
    # not the user's weight_init_func: it would run a second time (its own generator, side effects)
    kwargs = {k: v for k, v in (kwargs or {}).items() if k != "weight_init_func"}
    try:
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
            warnings.simplefilter("ignore")
            return pml_cls(**entry.size_kwargs(2, 2), **kwargs)
    except Exception:  # noqa: BLE001 - a courtesy (records, the value's dtype): callers have a default
        return None


def _probe_batch(dtype, device, width, classes):
    """8 rows of `width`, labels 0 0 1 1 2 2 ... (mod classes), no two rows alike (no random draw)."""
    x = torch.tensor([[(i * 7 + j * 3) % 11 - 5.0 for j in range(width)] for i in range(8)], dtype=dtype,
                     device=device)
    return x, torch.arange(8, device=device) // 2 % classes


def _pml_value_dtype(cache, make_twin, embeddings, ours, width=4, classes=4):
    """The dtype of PML's value for these embeddings under autocast: what PML's own class (from
    make_twin, of the module's settings) returns on this device type for a batch it computes a loss
    of, probed once on a small batch and kept in `cache` by the device type and dtypes. Which ops
    autocast runs in fp32 differs between devices (on CUDA exp, log and sum do) and torch versions,
    so it is asked, not tabulated. `ours` without autocast, while torch.compile traces (unless
    probed before), without PML, or where PML refuses the probe."""
    device_type = embeddings.device.type
    if not autocast_enabled(device_type):
        return ours
    key = (device_type, embeddings.dtype, torch.get_autocast_dtype(device_type))
    if key not in cache:
        if V._compiling():
            return ours
        twin = make_twin()
        dtype = None
        if twin is not None:
            x, y = _probe_batch(embeddings.dtype, embeddings.device, width, classes)
            try:
                with torch.no_grad(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    dtype = twin.to(embeddings.device)(x, y).dtype
            except Exception:  # noqa: BLE001, S110 - PML refuses this input: its dtype is not defined
                pass
        cache[key] = dtype
    return cache[key] or ours


def _with_unit_columns(twin):
    """A small class-loss twin with exact unit columns (PML's P2SGrad asserts them in every dtype)."""
    for param in () if twin is None else twin.parameters():
        if param.dim() == 2:
            param.data = torch.eye(*param.shape, dtype=param.dtype, device=param.device)  # under torch.device(...)
    return twin


def _takes_as_cosine(distance, name):
    """Whether a loss that computes with the cosine only takes `distance`: PML's
    assert_distance_type(loss, CosineSimilarity) where PML has the class `name` (any
    CosineSimilarity, subclasses and other settings (power, p) included: those other than
    _distance_name's "cosine" PML computes; a DotProductSimilarity refused), else the fused cosine."""
    try:
        from pytorch_metric_learning import losses as pml_losses
        from pytorch_metric_learning.distances import CosineSimilarity
    except ImportError:
        return _distance_name(distance) == "cosine"
    if not hasattr(pml_losses, name):
        return _distance_name(distance) == "cosine"
    return isinstance(distance, CosineSimilarity)


def _has_short_row(*xs):
    """Whether a row of any of the tensors (None skipped) has a norm <= F.normalize's eps (1e-12), or
    one that overflows the dtype (inf: F.normalize divides the row by it, to zeros): normalized, it is
    not a unit row (an all-zero row stays zero)."""
    def short(x):
        if x.device.type == "meta":  # shapes only: no values to look at
            return False
        norm = torch.linalg.vector_norm(x.detach(), dim=1)
        return bool(((norm <= 1e-12) | torch.isinf(norm)).any())
    return any(short(x) for x in xs if x is not None)


@functools.lru_cache(maxsize=None)
def _pml_installed():
    try:
        import pytorch_metric_learning  # noqa: F401
    except ImportError:
        return False
    return True


def _collect_stats(value):
    """PML's collect_stats: the argument, or PML's global default when None (False without PML)."""
    if value is not None:
        return bool(value)
    try:
        from pytorch_metric_learning.utils import common_functions as c_f
    except ImportError:
        return False
    return bool(c_f.COLLECT_STATS)


def _pml_default_reducer(pml_cls, kwargs):
    """PML's default reducer of a class built with `kwargs` (PML's set_reducer: MultipleReducers over
    its sub-losses, a regularizer's loss among them)."""
    from pytorch_metric_learning.reducers import MultipleReducers
    if pml_cls is None:  # a loss PML does not have
        return None
    names = pml_cls._sub_loss_names(None) + [f"{k}_reg_loss" for k in ("weight", "embedding")
                                             if kwargs.get(f"{k}_regularizer") is not None]
    if len(names) == 1:
        return pml_cls.get_default_reducer(None)
    return MultipleReducers({k: pml_cls.get_default_reducer(None) for k in names})


def _plain_number(value):
    """A hyper-parameter given as a one-element tensor or a numpy number (PML takes them: it stores
    and uses them as given) as the Python number the checks and the fused ops take; anything else
    unchanged (a tensor that requires grad too: the fused ops take no learnable hyper-parameter,
    and the check names it rather than detaching it)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex() and not value.requires_grad:
        return value.item()  # a learnable one (requires_grad) stays a tensor: the checks refuse it, named
    if type(value).__module__ == "numpy" and getattr(value, "shape", None) in ((), (1,)) and hasattr(value, "item"):
        item = value.item()
        return item if isinstance(item, (bool, int, float)) else value
    return value


def _taking_plain_numbers(init):
    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        init(self, *map(_plain_number, args), **{k: _plain_number(v) for k, v in kwargs.items()})
    return __init__


def _same(a, b):
    """Whether two attribute values are the same (numbers compared by value)."""
    if a is b:
        return True
    plain = (bool, int, float, str, type(None))
    return isinstance(a, plain) and isinstance(b, plain) and a == b


# attributes of ours that PML's instance holds in another form (its TorchInitWrapper; a class
# loss's sizes, which PML's instance may leave at its record default), or nn.Module's own
_NOT_HANDED_TO_PML = frozenset({"weight_init_func", "num_classes", "embedding_size", "descriptors_dim", "training"})


def pml_base(name):
    """PML's class pytorch_metric_learning.losses.<name> where PML is installed, else torch.nn.Module:
    the base of ours that PML's DistributedLossWrapper takes (BaseMetricLossFunction, whose
    __init__ gives PML's attributes collect_stats, embedding_regularizer, embedding_reg_weight;
    CrossBatchMemory). Ours override its forward."""
    try:
        from pytorch_metric_learning import losses as pml_losses
    except ImportError:
        return torch.nn.Module
    return getattr(pml_losses, name)


_LossBase = pml_base("BaseMetricLossFunction")


def _set_pml_object(module, name, value):
    """`distance` / `reducer`: PML's objects as PML's losses hold them (submodules, without state:
    no state_dict entries), or a plain value ("cosine" / "lp", None) without PML."""
    if isinstance(value, torch.nn.Module):
        setattr(module, name, value)
    else:
        module._modules.pop(name, None)
        object.__setattr__(module, name, value)


# what PML's losses read from themselves at each call (BaseMetricLossFunction, WeightRegularizerMixin),
# and the sub-modules some of them call (CircleLoss's soft_plus, the softmax losses' cross_entropy)
PML_READ_AT_CALL = ("distance", "reducer", "embedding_regularizer", "embedding_reg_weight", "weight_regularizer",
                    "weight_reg_weight")
PML_MODULES_CALLED = ("soft_plus", "cross_entropy")


def _settings(obj):
    """What a PML object's call reads: its type, plain settings (p, power, normalize_embeddings,
    ...) and its sub-modules' (a MultipleReducers' reducers, a regularizer's distance), compared
    by value (not the stats it records, nor collect_stats); a plain value itself (NaN equal to
    NaN); any other value by identity."""
    if isinstance(obj, torch.nn.Module):
        skip = {"training", "collect_stats", *getattr(obj, "_record_these_stats", ())}
        plain = tuple(sorted((k, _settings(v)) for k, v in vars(obj).items()
                             if not k.startswith("_") and k not in skip
                             and isinstance(v, (bool, int, float, str, type(None)))))
        hooks = (_hooks_of(obj), _instance_overrides(obj))
        return type(obj), plain, tuple((k, _settings(m)) for k, m in obj._modules.items()), hooks
    if isinstance(obj, float) and obj != obj:  # NaN (not math.isnan: a float torch.compile traces symbolically)
        return "nan"
    if isinstance(obj, (bool, int, float, str, type(None))):
        return obj
    return id(obj)


def _hold_objects(module, objects):
    """The objects and values PML reads at each call as the module was set up with them, and their
    settings then (`_reassigned_objects` compares)."""
    object.__setattr__(module, "_held_objects", dict(objects))
    object.__setattr__(module, "_held_settings", {k: _settings(v) for k, v in objects.items()})


class _PmlFallback:
    """What a module does with PML's keyword arguments: the fused ones (a fused distance,
    weight_init_func) are used; anything else (another distance, reducer, regularizer,
    collect_stats=True) builds the PML loss, sharing the module's parameter, and lets it compute
    after a one-time warning.

    Every loss class's constructor takes its numbers also as one-element tensors and numpy numbers,
    as PML's do (`_plain_number`, applied to each subclass's own __init__)."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _taking_plain_numbers(cls.__dict__["__init__"])
        # a user's subclass overriding compute_loss or a method PML's compute_loss calls (docs/api.md
        # "PML's namespaces"): PML's computation on this module, which calls the overrides
        cls._users_computation = (not cls.__module__.startswith("fused_pairloss.") and any(
            _users_own(cls, name) for name in _computation_hooks(cls._pml_class())))
        if cls._users_computation:
            inherited = cls.__getattr__ if hasattr(cls, "__getattr__") else torch.nn.Module.__getattr__
            if "__getattr__" in cls.__dict__ or not getattr(inherited, "falls_back_to_pml", False):
                cls.__getattr__ = _falling_back_to_pml(cls.__dict__.get("__getattr__", inherited))

    def _pml_forward_of_a_users_compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        """A user's subclass that overrides PML's extension points: PML's forward, which calls the
        module's compute_loss (the user's, or PML's class's through ours) with the module's PML
        distance and reducer; None for the library's own classes."""
        if self._users_computation:
            if not _pml_installed():
                raise ValueError(f"{type(self).__name__}: a subclass overriding PML's compute_loss (or what it "
                                 "calls) is computed by PML's forward, which needs pytorch-metric-learning; it is "
                                 "not installed")
            return _LossBase.forward(self, embeddings, labels, indices_tuple, ref_emb, ref_labels)
        return None

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        """PML's compute_loss of this loss's class, run on this module (what a user's subclass reaches
        through super().compute_loss). The library's own forward does not call it."""
        pml_cls = self._pml_class()
        if pml_cls is None and not _pml_installed():
            raise NotImplementedError(f"{type(self).__name__}.compute_loss is PML's, which needs "
                                      "pytorch-metric-learning; it is not installed (call the module)")
        if pml_cls is None:
            return super().compute_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        return pml_cls.compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels)

    def _users_defaults(self, kwargs):
        """The constructor's kwargs with the distance / reducer of a user's subclass that overrides
        get_default_distance / get_default_reducer (PML's constructor calls them when not given)."""
        for key, method in (("distance", "get_default_distance"), ("reducer", "get_default_reducer")):
            if kwargs.get(key) is None and _users_own(type(self), method):
                kwargs = dict(kwargs, **{key: getattr(self, method)()})
        return kwargs

    # PML's defaults of this loss's class (its set_reducer(None), zero_losses and record-keeping read
    # them from the instance): PML's class's own, not its base class's
    def _pml_default(self, method, without_pml):
        """PML's `method` of this loss's class on this module (BaseMetricLossFunction's for a loss PML
        lacks); `without_pml` where PML is not installed (as the module holds it then)."""
        pml_cls = self._pml_class()
        if pml_cls is not None:
            return getattr(pml_cls, method)(self)
        return getattr(super(), method)() if _pml_installed() else without_pml

    def get_default_reducer(self):
        return self._pml_default("get_default_reducer", None)

    def get_default_distance(self):
        return self._pml_default("get_default_distance", self._default_distance)

    def _sub_loss_names(self):
        return self._pml_default("_sub_loss_names", ["loss"])

    @classmethod
    def _pml_class(cls):
        """PML's class of this loss (of its registered base, for a user's subclass), or None (a loss
        PML does not have, a declared loss, or PML not installed)."""
        entry = _entry_of(cls)
        if entry is None or not entry.in_pml:
            return None
        try:
            from pytorch_metric_learning import losses as pml_losses
        except ImportError:
            return None
        return getattr(pml_losses, entry.cls.__name__, None)

    def _float_attributes_as_constants(self):
        """While torch.compile traces: every float attribute of the module (its hyper-parameters,
        also those a path reads directly, such as the miner-weighted or the margin-softmax calls) a
        constant of the graph, before anything computes with it (ops/_common.py
        hyper_parameters_as_constants)."""
        if torch.compiler.is_compiling():
            hyper_parameters_as_constants({k: v for k, v in vars(self).items() if isinstance(v, float)})

    _distances = ("cosine", "lp")   # distances the fused path supports for this loss
    _default_distance = "cosine"    # PML's default for this loss
    _cosine_only = False            # PML asserts CosineSimilarity for this loss
    _inverted_only = False          # PML asserts only a similarity (SoftTriple): others are PML's computation

    _pml_twin = True  # PML's distance / reducer objects from a PML instance (cheap: no parameters)
    _fused_kwargs = ()  # PML keyword arguments the fused path computes itself (PML still gets them on a fallback)
    _kind_of = staticmethod(_distance_name)  # a PML distance object as the fused path names it

    def _setup_kwargs(self, kwargs, pml_args=(), pml_kwargs=None, param_name=None):
        self._pml = None
        kwargs = self._users_defaults(kwargs)
        object.__setattr__(self, "_pml_setup", (kwargs, pml_args, pml_kwargs, param_name))  # _fall_back_now
        name = type(self).__name__
        entry = _entry_of(type(self))  # a user's subclass of one of ours: PML's class of its base
        pml_name = name if entry is None else entry.cls.__name__
        distance = kwargs.get("distance")
        if self._cosine_only and distance is not None and not (
                _takes_as_cosine(distance, pml_name)
                or self._inverted_only and getattr(distance, "is_inverted", False)):
            what = "a similarity (is_inverted)" if self._inverted_only else "CosineSimilarity()"
            raise ValueError(f"{name}: distance must be {what} (as in PML); got {distance!r}")
        fused = self._default_distance if distance is None else self._kind_of(distance)
        # PML's collect_stats: None is PML's global default (c_f.COLLECT_STATS)
        self.collect_stats = _collect_stats(kwargs.get("collect_stats"))
        others = {k: v for k, v in kwargs.items()
                  if k not in ("distance", "weight_init_func", "collect_stats", *self._fused_kwargs)}
        unfused = ([f"distance={distance!r}"] if fused not in self._distances else []) + (
            ["collect_stats=True"] if self.collect_stats else []) + [
            f"{k}={v!r}" for k, v in others.items() if v not in (None, False)]
        if not unfused:
            self._distance_kind = fused
            self._attach_pml_objects(pml_name, kwargs, pml_args, pml_kwargs)
            return
        try:
            from pytorch_metric_learning import losses as pml_losses
        except ImportError as e:
            raise ValueError(f"{name}: {sorted(kwargs)} need pytorch-metric-learning (fused: distance in "
                             f"{list(self._distances)}, no reducer / regularizer arguments)") from e
        pml_kwargs_given = self._pml_fallback_kwargs(kwargs)
        if param_name is not None:  # its weight is replaced by ours: the user's init function runs once, on ours
            pml_kwargs_given = {k: v for k, v in pml_kwargs_given.items() if k != "weight_init_func"}
        with torch.random.fork_rng(devices=[]):  # its weight is replaced by ours: PML's random state is ours
            pml = getattr(pml_losses, pml_name)(*pml_args, **(pml_kwargs or {}), **pml_kwargs_given)
        self._pml_reason = ", ".join(unfused)  # what the fallback warning names
        if param_name is not None:  # one parameter, the module's own (state_dicts stay PML's)
            setattr(pml, param_name, getattr(self, param_name))
        object.__setattr__(self, "_pml", pml)  # not a submodule: no second copy in the state_dict
        self._distance_kind = None
        _set_pml_object(self, "distance", pml.distance)  # PML's objects, PML's computation
        _set_pml_object(self, "reducer", pml.reducer)
        for k in ("embedding_regularizer", "embedding_reg_weight"):  # as given (read, scaled by the user)
            _set_pml_object(self, k, getattr(pml, k))
        _copy_records(self, pml)

    def _pml_fallback_kwargs(self, kwargs):
        """The keyword arguments of PML's class that computes this loss on a fallback: the user's
        (a loss whose own arguments PML spells otherwise adds PML's spelling)."""
        return kwargs

    def _attach_pml_objects(self, name, kwargs, pml_args, pml_kwargs):
        """`distance` and `reducer` as PML's class has them (PML's objects: `Miner(distance=
        loss.distance)` works); the fused computation follows `_distance_kind`. Without PML,
        `distance` is the kind ("cosine" / "lp") and `reducer` None."""
        _set_pml_object(self, "distance", self._distance_kind)
        _set_pml_object(self, "reducer", None)
        try:
            from pytorch_metric_learning import distances as pml_distances
            from pytorch_metric_learning import losses as pml_losses
        except ImportError:
            self._hold_pml_read()  # an assignment since is then set up again, or refused naming PML
            return
        if self._pml_twin:  # PML's own construction: its default distance, reducer (MultipleReducers...)
            with warnings.catch_warnings():  # the loss's own warnings are ours (not twice)
                warnings.simplefilter("ignore")
                twin = getattr(pml_losses, name)(*pml_args, **(pml_kwargs or {}), **kwargs)
            distance, reducer = twin.distance, twin.reducer
            _copy_records(self, twin)
            # asked for its value's dtype under autocast: a copy, so that the stats its objects record
            # are not written into the module's own (the distance it shares with the twin)
            object.__setattr__(self, "_pml_probe", copy.deepcopy(twin))
        else:  # class losses: PML's defaults without building a W of C x D just for this
            pml_cls = getattr(pml_losses, name, None)
            distance = kwargs.get("distance") or (pml_distances.CosineSimilarity() if pml_cls is None
                                                  else pml_cls.get_default_distance(None))
            reducer = _pml_default_reducer(pml_cls, self._pml_fallback_kwargs(kwargs))
            twin = _small_pml_class_loss(type(self), kwargs)
            if twin is not None:  # the names PML's record-keeper logs
                _copy_records(self, twin)
            object.__setattr__(self, "_pml_probe", _with_unit_columns(twin))  # its value's dtype under autocast
        _set_pml_object(self, "distance", distance)
        _set_pml_object(self, "reducer", reducer)
        self._hold_pml_read()

    def _hold_pml_read(self):
        """Hold what PML reads at each call as it is now (after construction: a loss sets its PML
        sub-modules after the setup). Without PML the names the module lacks are held as None, so
        that one assigned later is seen too."""
        names = PML_READ_AT_CALL + PML_MODULES_CALLED
        if _pml_installed():
            _hold_objects(self, {k: getattr(self, k) for k in names if hasattr(self, k)})
        else:
            _hold_objects(self, {k: getattr(self, k, None) for k in names})

    _probe_shape = dict(width=4, classes=4)  # the probe batch's width and labels (class losses: their twin's)

    def _as_pml_dtype(self, value, embeddings):
        """The value in the dtype of PML's under autocast, asked of this module's PML twin (its
        settings: a distance, softplus, ...; docs/api.md); as is otherwise."""
        return value.to(_pml_value_dtype(self.__dict__.setdefault("_value_dtypes", {}),
                                         lambda: getattr(self, "_pml_probe", None), embeddings, value.dtype,
                                         **self._probe_shape))

    # attribute -> the value the fused path computes; another one, also assigned after construction,
    # is PML's computation (TripletMarginLoss's swap, ...)
    _pml_only = {}
    # attributes PML reads at each call that may change in place (AngularLoss's alpha tensor): handed
    # to PML's instance at each of its calls, assigned or not
    _handed_to_pml = ()
    # attributes PML's forward updates (a module's state): read back from PML's instance after a call
    _pml_state = ()

    def _pml_only_assigned(self):
        """Whether, since the module was set up, an attribute only PML computes was given a value
        (the fused path cannot compute it), what PML reads at each call changed
        (_reassigned_objects), or an attribute went beyond the fused computation (_needs_pml_now):
        the module is then set up again as if built with them (_fall_back_now)."""
        return self._pml is None and (any(getattr(self, k) != v for k, v in self._pml_only.items())
                                      or bool(getattr(self, "collect_stats", False))
                                      or bool(self._reassigned_objects()) or bool(self._needs_pml_now()))

    def _needs_pml_now(self):
        """What of the module's present attributes is beyond its fused computation in a way the
        setup's arguments do not say (FastAPLoss's grid, a learnable AngularLoss alpha), in words; None
        if nothing is."""
        return None

    def _reassigned_objects(self):
        """What PML reads at each call (PML_READ_AT_CALL) that changed since the module was set up:
        another object or value assigned, or an object's settings changed in place
        (`distance.power`, a MultipleReducers' sub-reducer, ...)."""
        held = self.__dict__.get("_held_objects") or {}
        settings = self.__dict__.get("_held_settings") or {}
        now = {k: getattr(self, k, None) for k in held}
        return {k: v for k, v in now.items() if v is not held[k] or _settings(v) != settings[k]}

    @torch.compiler.disable  # builds PML's module: not while torch.compile traces a call
    def _fall_back_now(self):
        """Set up again with the attributes assigned since: a distance the fused path computes stays
        fused (with that distance); a reducer, a regularizer or its weight, another distance or a
        PML-only attribute is PML's computation, with the warning naming it."""
        kwargs, pml_args, pml_kwargs, param_name = self._pml_setup
        assigned = {k: getattr(self, k) for k, fused in self._pml_only.items() if getattr(self, k) != fused}
        if getattr(self, "collect_stats", False):  # PML's instance records the stats
            assigned["collect_stats"] = True
        changed = self._reassigned_objects()
        held = list(self.__dict__.get("_held_objects") or {})
        arguments = {k: v for k, v in changed.items() if k in PML_READ_AT_CALL}
        reason = self._needs_pml_now()
        forced = (sorted(changed) if set(changed) - {"distance"} else []) + ([reason] if reason else [])
        if forced and not _pml_installed():  # (its setup below would compute fused again, ignoring them)
            raise ValueError(f"{type(self).__name__}: {', '.join(forced)} (set after construction) need "
                             "pytorch-metric-learning, which computes them; it is not installed")
        if forced:  # PML's computation: no argument taken as a fused one, and its reducer given
            # explicitly (a sub-module PML calls, a grid or a regularizer set to None: no argument
            # says it); the module's attributes reach PML's instance at each call (_sync_pml)
            object.__setattr__(self, "_fused_kwargs", ())
            arguments.setdefault("reducer", self.reducer)
        self._setup_kwargs(dict(kwargs, **assigned, **arguments), pml_args, pml_kwargs, param_name)
        if forced and self._pml is not None:
            self._pml_reason = f"{', '.join(forced)} (set after construction)"
        for k in ("distance", "reducer"):  # the objects as assigned (PML's instance got them), else its own
            if k in changed:
                _set_pml_object(self, k, changed[k])
        _hold_objects(self, {k: getattr(self, k, None) for k in held})

    def __setattr__(self, name, value):
        if isinstance(self.__dict__.get(name), numbers.Real):  # a number assigned as a tensor / numpy number
            value = _plain_number(value)  # (PML takes them), as the constructor's arguments
        if name == "backend":
            check_backend_name(value)
        super().__setattr__(name, value)
        if not name.startswith("_") and "_pml_setup" in self.__dict__:  # after PML's instance could exist
            self.__dict__.setdefault("_assigned", set()).add(name)

    def _sync_pml(self):
        """PML's instance given the attributes assigned on this module since it was set up, where they
        differ from its own (PML's module reads its attributes at each call, so one assigned on ours
        changes the loss as on PML's). Only those: others of ours may stand for what PML's instance
        got as a keyword argument (a regularizer) or hold in its own form."""
        pml = self._pml
        for k in sorted((self.__dict__.get("_assigned", set()) | set(self._handed_to_pml)) - _NOT_HANDED_TO_PML):
            if not hasattr(pml, k):
                continue
            v = getattr(self, k)
            if _same(v, getattr(pml, k)):
                continue
            try:
                setattr(pml, k, v)
            except (TypeError, AttributeError):  # e.g. a plain tensor where PML registered a Parameter
                pass

    @contextlib.contextmanager
    def _synced_pml(self):
        """PML's instance, synced (_sync_pml), computing with the module's parameter as the module
        reads it now, as PML's module reads its own at each call: also a Parameter object replaced
        without __setattr__ (to_empty, conversions that overwrite parameters) and the tensor of a
        parametrization or of torch.func.functional_call, which is handed for this call only."""
        self._sync_pml()
        pml, name = self._pml, self._pml_setup[3]
        if name is None or name not in pml._parameters:
            yield pml
            return
        current, held = getattr(self, name), pml._parameters[name]
        pml._parameters[name] = current
        try:
            yield pml
        finally:
            if not isinstance(current, torch.nn.Parameter):
                pml._parameters[name] = held

    def _run_pml(self, *args):
        _warn_once((type(self).__name__, self._pml_reason),
                   f"fused_pairloss: {type(self).__name__} with {self._pml_reason} is computed by "
                   "pytorch-metric-learning itself (not fused)")
        with self._synced_pml() as pml:
            out = pml(*args)
        for stat in getattr(self._pml, "_record_these_stats", ()):  # the stats PML collected, on this module
            if hasattr(self._pml, stat):
                object.__setattr__(self, stat, getattr(self._pml, stat))
        for k in self._pml_state:
            setattr(self, k, getattr(self._pml, k))
        return out


class _PairLoss(_PmlFallback, _LossBase):
    """Common part of the pair losses: PML's forward signature, indices_tuple, PML kwargs."""

    _reference = None  # reference function taking indices_tuple=

    def _init_pair(self, backend, kwargs, pml_args):
        self.backend = backend
        self._setup_kwargs(kwargs, pml_args)

    def _needs_pml_steps(self, embeddings, ref_emb):
        """Whether rows of these inputs need PML's steps over the call's pairs where a miner's rule
        would run in the engine (an fp16 all-zero row, whose NaN similarities PML's miners drop and
        the engine's mining reads otherwise; SNR's constant rows): the rule is then given to the
        loss as its listed pairs (CrossBatchMemory: PML's steps with the miner)."""
        return fp16_rows_normalized_to_nan(embeddings, ref_emb)

    def _hyper(self):
        raise NotImplementedError

    def _functional(self):
        raise NotImplementedError

    def _check_labels(self, labels):
        """What this loss needs of its labels beyond the pair losses' checks (MarginLoss: indices
        into its per-class beta), on the labels as given (before float labels become ids); the
        wrappers call it before their ranks exchange anything."""

    # PML raises for an indices_tuple and needs labels (PNPLoss, RankedListLoss)
    _labels_without_indices = False

    # PML's value for a batch of no rows: its zero loss, NaN for the losses whose reducer averages
    # an empty per-row loss; None where PML raises (the input checks do)
    _empty_batch_value = 0.0
    # PML asks for labels (or an indices_tuple) before it looks at the batch (NCA: its zero loss of
    # a batch of at most one row comes first)
    _empty_batch_needs_labels = True
    # PML's value for a ref_emb of no rows (its zero loss; NCA: the mean of no row, NaN)
    _empty_ref_value = 0.0
    # PML's ref_not_supported: a ref_emb other than the batch is refused (check_self_only), and one
    # without ref_labels is not read as the batch's
    _refuses_ref = False
    # PML's loss measures the batch against ref_emb (or itself) with its distance, once a call: the
    # distance's stats (collect_stats) are those rows' (record_distance_stats)
    _distance_measures_the_batch = True

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        """PML's forward: PML itself for PML-only arguments; else the inputs PML accepts made ours
        (pml_labels), an empty batch's PML value, then the loss's own `_forward`."""
        self._float_attributes_as_constants()
        users = self._pml_forward_of_a_users_compute_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        if users is not None:
            return users
        if self._pml_only_assigned():
            self._fall_back_now()
        if self._pml is not None:
            return self._run_pml(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        if self._refuses_ref:  # before an empty batch's value, as PML checks its inputs first
            check_self_only(embeddings, labels, ref_emb, ref_labels, type(self).__name__)
        labels, ref_labels = pml_labels(embeddings, labels, ref_emb, ref_labels, not self._refuses_ref)
        if _no_rows(embeddings):
            if labels is None and self._empty_batch_needs_labels and (
                    indices_tuple is None or self._refuses_ref or self._labels_without_indices):
                raise ValueError(f"{type(self).__name__}: labels is required (or an indices_tuple where the loss takes "
                                 "one), as in PML, also for an empty batch")
            V.check_embeddings(embeddings, allow_empty=self._empty_batch_value is not None)
            return empty_batch_loss(embeddings, self._empty_batch_value)
        if _no_rows(ref_emb) and not self._refuses_ref:
            V.check_embeddings(embeddings)
            if ref_labels is not None:
                V.check_labels(ref_labels, 0, "ref_labels", "ref_emb")
            return empty_batch_loss(embeddings, self._empty_ref_value)
        if indices_tuple is not None and not self._labels_without_indices and _is_matrix(embeddings):
            indices_tuple = V.check_indices_tuple(V.index_tensors(indices_tuple, embeddings.device),
                                                  embeddings.shape[0],
                                                  (ref_emb if _is_matrix(ref_emb) else embeddings).shape[0])
        value = self._forward(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        if self._distance_measures_the_batch:
            record_distance_stats(self.distance, embeddings, ref_emb)
        return self._as_pml_dtype(value, embeddings)

    def _forward(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        if self._labels_without_indices:
            if indices_tuple is not None:
                raise ValueError(f"{type(self).__name__}: indices_tuple is not supported (as in PML)")
            if labels is None:
                raise ValueError(f"{type(self).__name__}: labels is required (as in PML)")
        hyper = self._hyper()
        if indices_tuple is not None:
            loss = self._fused_with_miner_rule(embeddings, labels, indices_tuple, ref_emb, ref_labels)
            if loss is None:
                loss = self._fused_with_listed_pairs(embeddings, labels, indices_tuple, ref_emb, ref_labels)
            if loss is None:
                loss = self._reference_with_indices(embeddings, labels, indices_tuple, ref_emb, ref_labels, hyper)
            # NaN in, NaN out also where no listed pair reads the NaN row, or a miner's comparison
            # dropped it (as PML's do); in the loss's dtype (PML's under autocast)
            return nan_in_nan_out(loss, embeddings, ref_emb).to(loss.dtype)
        return self._functional()(embeddings, labels, ref_emb, ref_labels, backend=self.backend, **hyper)

    _pair_based = False  # PML reduces the pair list (duplicates count), not a 0/1 mask (ops/listed.py)
    _listed_pairs = True  # an indices_tuple's pairs through the loss's fused function (ops/listed.py)
    _fused_in_wrappers = True  # DistributedLossWrapper / CrossBatchMemory run its fused call

    def _fused_in_wrappers_now(self):
        """Whether the wrappers' fused call computes the module with its present settings (else they
        call the module as PML's wrappers do)."""
        return True

    def _mines_within(self):
        """Whether the loss's declaration mines its pairs itself (MultiSimilarityLoss's miner_epsilon, a
        declared loss's miner_epsilon): CrossBatchMemory then mines with the self slot and removes the
        self comparisons after, as PML's memory with that miner (its fused call's exclude_after_mining)."""
        return getattr(self, "miner_epsilon", None) is not None

    def _with_sampled_triplets(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        """The call's indices_tuple, or without one PML's sample of triplets (its convert_to_triplets)
        for an integer (or None) `triplets_per_anchor`, as an indices_tuple of triplets
        (TripletMarginLoss, MarginLoss)."""
        check_triplets_per_anchor(self.triplets_per_anchor)  # as assigned
        if indices_tuple is not None or self.triplets_per_anchor == "all":
            return indices_tuple
        V.check_pair_inputs(embeddings, labels, ref_emb, ref_labels)
        resolve_backend(self.backend, embeddings.device)  # still reject unknown backends
        from ._reference_common import sampled_call_triplets
        return sampled_call_triplets(embeddings, labels, ref_emb, ref_labels, self.triplets_per_anchor)

    def _listed_hyper(self):
        return self._hyper()

    # A miner's rule in the engine costs a walk over all N x M pairs; its listed pairs cost O(#pairs D)
    # (about 80 ns a pair against 10 ns a pair of the walk, forward and backward, on the CPU:
    # docs/design.md "Miners in the engine"): the engine when the miner kept at least this fraction.
    ENGINE_PAIR_FRACTION = 1 / 8

    # the loss's fused call is its declaration on the label sets through one pair_stats call, to which
    # a pair miner's rule can be added (ops/stats.MinedBy): MultiSimilarityMiner's, PairMarginMiner's
    _fuses_pair_miners = False

    def _own_fused_fn(self):
        fused_fn = getattr(type(self), "_fused_fn", None)  # a declared loss (fused_pairloss.declare)
        if fused_fn is None:
            entry = _entry_of(type(self))
            fused_fn = None if entry is None else entry.fused
        return fused_fn

    def _fused_with_miner_rule(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        """Our MultiSimilarityMiner's or PairMarginMiner's pairs (fused_pairloss._miners.MinedPairs) on
        the inputs they were mined from, with the loss's distance (or a cosine MultiSimilarityMiner
        beside PML's normalized LpDistance(), a PairMarginMiner with the other of LpDistance() and
        CosineSimilarity(): MinedPairs.translated), when the miner kept at least ENGINE_PAIR_FRACTION of the
        pairs: the loss's fused call with the miner's rule in its engine (the list is not read); None
        otherwise."""
        if (not self._fuses_pair_miners or not hasattr(indices_tuple, "spec_changes")
                or not indices_tuple.fused_for(embeddings, labels, ref_emb, ref_labels, self._distance_kind)
                or getattr(self, "miner_epsilon", None) is not None):
            return None
        n_cols = (embeddings if ref_emb is None else ref_emb).shape[0]
        if len(indices_tuple[0]) + len(indices_tuple[2]) < self.ENGINE_PAIR_FRACTION * embeddings.shape[0] * n_cols:
            return None  # few pairs: the listed pairs are cheaper
        backend = resolve_backend(self.backend, embeddings.device)
        fused_fn = self._own_fused_fn()
        if backend == "reference" or fused_fn is None:
            return None
        from ..ops.stats import MinedBy
        labels = indices_tuple.labels if labels is None else labels
        if ref_emb is not None and ref_labels is None:
            ref_labels = indices_tuple.ref_labels
        labels, ref_labels = V.label_ids(labels, ref_labels)  # the miner's own, float ones included
        V.check_pair_inputs(embeddings, labels, ref_emb, ref_labels)
        if indices_tuple.translated(self._distance_kind) and _has_short_row(embeddings, ref_emb):
            return None  # d^2 = 2 - 2 S needs unit rows; F.normalize leaves a row of norm <= eps short
        if self._needs_pml_steps(embeddings, ref_emb):
            return None
        mined_by = MinedBy(backend, indices_tuple.spec_changes(self._distance_kind))
        return fused_fn(embeddings, labels, ref_emb, ref_labels, backend=mined_by, **self._listed_hyper())

    def _fused_with_listed_pairs(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        """The loss's own fused function over the listed pairs (ops/listed.py: O(#pairs + (N + M) D)), or None
        where the reference path computes it (another backend than a fused one, a PML-only case)."""
        fused_fn = self._own_fused_fn()
        if (not self._listed_pairs or fused_fn is None or not isinstance(indices_tuple, (tuple, list))
                or len(indices_tuple) not in (3, 4)):
            return None
        tuple_alone = check_tuple_inputs(embeddings, labels, ref_emb, ref_labels)
        if resolve_backend(self.backend, embeddings.device) == "reference":
            return None
        if not V._compiling() and fp16_rows_normalized_to_nan(embeddings, ref_emb):
            return None  # an fp16 zero row's NaN terms: PML's steps (SupCon's listed rows read them otherwise)
        from ..ops.listed import ListedPairs
        pairs = ListedPairs(indices_tuple, self._pair_based, embeddings.device, n_rows=embeddings.shape[0],
                            n_cols=(embeddings if ref_emb is None else ref_emb).shape[0])
        if not pairs.count_rule_agrees():  # PML's one-pair rule on listed duplicates: the reference's
            return None
        if tuple_alone:  # the sets are the listed pairs; the labels only say self / ref mode
            labels = torch.zeros(embeddings.shape[0], dtype=torch.int64, device=embeddings.device)
            ref_labels = None if ref_emb is None else torch.zeros(ref_emb.shape[0], dtype=torch.int64,
                                                                  device=embeddings.device)
        return fused_fn(embeddings, labels, ref_emb, ref_labels, backend=pairs, **self._listed_hyper())

    def _reference_with_indices(self, embeddings, labels, indices_tuple, ref_emb, ref_labels, hyper):
        # An explicit indices_tuple (from any PML miner) is honoured by the reference path, as PML.
        warn_unfused_indices(self)
        check_tuple_inputs(embeddings, labels, ref_emb, ref_labels)
        if not isinstance(indices_tuple, (tuple, list)) or len(indices_tuple) not in (3, 4):
            raise ValueError("indices_tuple must be a tuple of 3 (a, p, n) or 4 (a1, p, a2, n) index tensors")
        resolve_backend(self.backend, embeddings.device)  # still reject unknown backends
        return type(self)._reference(embeddings, labels, ref_emb, ref_labels, indices_tuple=indices_tuple, **hyper)

    def extra_repr(self):
        hyper = ", ".join(f"{k}={v}" for k, v in self._hyper().items() if k != "distance")
        return f"{hyper}, distance={self._distance_kind!r}, backend={self.backend!r}"


class _RowWeightedSelfLoss(_PairLoss):
    """A pair loss of the batch against itself (labels required, no ref_emb, as PML) whose
    indices_tuple gives PML's per-row miner weights (lmu.convert_to_weights), applied to the rows
    of its fused call (`row_weights=`): FastAPLoss, SmoothAPLoss."""
    _listed_pairs = False
    _fused_in_wrappers = False  # PML's wrappers pass a ref_emb, which PML refuses here
    _refuses_ref = True

    def _forward(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        if indices_tuple is None:
            return super()._forward(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        name = type(self).__name__
        if labels is None:
            raise ValueError(f"{name}: labels is required (as in PML)")
        V.check_pair_inputs(embeddings, labels, None, None)
        check_self_only(embeddings, labels, ref_emb, ref_labels, name)
        backend = resolve_backend(self.backend, embeddings.device)
        if backend == "reference":
            return type(self)._reference(embeddings, labels, indices_tuple=indices_tuple, **self._hyper())
        from ..ops.operands import stat_dtype
        from ._reference_common import miner_weights
        labels_t = torch.as_tensor(labels, device=embeddings.device)
        weights = miner_weights(indices_tuple, labels_t, stat_dtype(embeddings.dtype))
        return self._own_fused_fn()(embeddings, labels_t, None, None, backend=backend, row_weights=weights,
                                    **self._hyper())


def check_tuple_inputs(embeddings, labels, ref_emb, ref_labels):
    """The input checks of a call with an indices_tuple. PML reads the tuple alone when there are no
    labels, or a ref_emb without ref_labels (whatever its rows): then only the embeddings are
    checked, and True is returned; else the pair inputs' checks, False."""
    if labels is None or (ref_emb is not None and ref_labels is None):
        V.check_embeddings(embeddings)
        if ref_emb is not None:
            V.check_embeddings(ref_emb, "ref_emb")
        return True
    V.check_pair_inputs(embeddings, labels, ref_emb, ref_labels)
    return False


def check_self_only(embeddings, labels, ref_emb, ref_labels, name):
    """PML's ref_not_supported: a ref_emb other than the batch itself is refused."""
    if ref_emb is not None and not (ref_emb is embeddings and ref_labels is labels):
        raise ValueError(f"{name}: ref_emb / ref_labels are not supported (as in PML: ref_emb is not supported "
                         "for this loss function)")


def pml_labels(embeddings, labels, ref_emb, ref_labels, takes_ref=True):
    """The labels as a pair loss's fused and reference paths take them, from what PML accepts:
    labels moved to the embeddings' device (ref_labels to ref_emb's), float / bool labels as int64
    ids (V.label_ids), ref_labels without ref_emb unused, and PML's set_ref_emb rule for a ref_emb
    without ref_labels: the labels stand for ref_emb's rows too (`ref_labels is labels`, so the
    diagonal is no pair), which needs as many rows as embeddings (else the input checks raise; PML
    fails on fewer rows and reads only the first ones of more, depending on the loss)."""
    if ref_emb is None:  # PML's set_ref_emb: the batch is its own ref, ref_labels unused
        ref_labels = None
    same = ref_labels is labels
    labels = _on_device_of(labels, embeddings)  # PML's c_f.to_device: labels go to the embeddings
    ref_labels = labels if same else _on_device_of(ref_labels, ref_emb)
    labels, ref_labels = V.label_ids(labels, ref_labels)
    if (takes_ref and isinstance(ref_emb, torch.Tensor) and ref_labels is None and isinstance(labels, torch.Tensor)
            and isinstance(embeddings, torch.Tensor) and ref_emb.dim() == 2 and embeddings.dim() == 2
            and ref_emb.shape[0] == embeddings.shape[0]):
        ref_labels = labels
    return labels, ref_labels


def _on_device_of(labels, x):
    """PML's c_f.to_device: the labels moved to the device of x."""
    if isinstance(labels, torch.Tensor) and isinstance(x, torch.Tensor) and labels.device != x.device:
        return labels.to(x.device)
    return labels


def _is_matrix(x):
    return isinstance(x, torch.Tensor) and x.dim() == 2


def _no_rows(x):
    return isinstance(x, torch.Tensor) and x.dim() == 2 and x.shape[0] == 0


def empty_batch_loss(embeddings, value):
    """PML's loss of an empty batch (or ref), on the graph of the embeddings: its zero loss (0), or
    the mean of an empty per-row loss (NaN)."""
    return zero_loss(embeddings) + value


def check_listed_rows(embeddings, ref_emb):
    """A loss computing from its listed rows only (the labels unread): the embeddings and the ref
    (the tuple itself is checked by forward, V.check_indices_tuple)."""
    V.check_embeddings(embeddings)
    if ref_emb is not None:
        V.check_embeddings(ref_emb, "ref_emb")


def check_triplets_per_anchor(value):
    """PML's triplets_per_anchor: "all", an int >= 0 (a sample of that many per anchor; 0: none) or
    None (as many per anchor as its label has positives)."""
    if isinstance(value, str) and value == "all" or value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"triplets_per_anchor must be 'all', None or an int >= 0; got {value!r}")


def run_pair_loss(reference_fn, fused_fn, embeddings, labels, ref_emb, ref_labels, backend, **hyper):
    """A pair loss's functional form after its hyper-parameter checks: the inputs' checks, the
    backend, then the reference or the fused call."""
    V.check_pair_inputs(embeddings, labels, ref_emb, ref_labels)
    backend = resolve_backend(backend, embeddings.device)
    if backend == "reference":
        return reference_fn(embeddings, labels, ref_emb, ref_labels, **hyper)
    return fused_fn(embeddings, labels, ref_emb, ref_labels, backend=backend, **hyper)


def _kaiming_like_pml(weight):
    # PML's default weight_init_func: kaiming_uniform_(a=sqrt(5))
    torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


def _check_sizes(**sizes):
    for name, v in sizes.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1; got {v!r}")


def _like(param, embeddings):
    """The parameter on the embeddings' device and dtype (PML's cast_types); the functional API
    validates the rest."""
    if isinstance(embeddings, torch.Tensor) and embeddings.is_floating_point() and (
            param.dtype != embeddings.dtype or param.device != embeddings.device):
        return param.to(device=embeddings.device, dtype=embeddings.dtype)
    return param


class _ClassLoss(_PmlFallback, _LossBase):
    """Common part of the class losses: one parameter in PML's layout, PML's forward (embeddings,
    labels, indices_tuple=None) where PML has it, PML kwargs."""

    _param = "fc"
    _empty_batch_value = math.nan
    _probe_shape = dict(width=2, classes=2)  # the twin's size (_small_pml_class_loss)
    _distances = ("cosine",)
    _cosine_only = True  # SoftTriple, ProxyCircle, CosFace, ArcFace (PML asserts it for its own)
    _pml_twin = False

    _size_name = "embedding_size"  # the constructor argument that gives the parameter's D

    def _init_class(self, shape, backend, kwargs, pml_args, pml_kwargs=None, init=_kaiming_like_pml):
        self.backend = backend
        setattr(self, self._param, torch.nn.Parameter(torch.empty(*shape)))
        # PML's WeightMixin / WeightRegularizerMixin attributes
        self.weight_init_func = kwargs.get("weight_init_func") or init
        self.weight_regularizer = kwargs.get("weight_regularizer")
        self.weight_reg_weight = kwargs.get("weight_reg_weight", 1)
        self.weight_init_func(getattr(self, self._param))
        self._setup_kwargs(kwargs, pml_args, pml_kwargs, param_name=self._param)

    def _call(self, embeddings, labels, weights):
        raise NotImplementedError

    def _fused_with_weights(self, embeddings, labels, indices_tuple, weights):
        """A loss whose miner weights the fused path applies (SoftTriple): its value, else None."""
        return None

    def _reference_with_weights(self, embeddings, labels, indices_tuple):
        raise ValueError(f"{type(self).__name__}: indices_tuple is not supported (PML has no miner weights here)")

    def cast_weights(self, embeddings):
        """PML's cast_types: the parameter itself moves to the embeddings' dtype and device (its
        .data is replaced, as PML does before every forward); returns it."""
        param = getattr(self, self._param)
        if isinstance(embeddings, torch.Tensor) and embeddings.is_floating_point() and (
                param.dtype != embeddings.dtype or param.device != embeddings.device):
            param.data = param.data.to(device=embeddings.device, dtype=embeddings.dtype)
        return param

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        self._float_attributes_as_constants()
        users = self._pml_forward_of_a_users_compute_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        if users is not None:
            return users
        if self._pml_only_assigned():  # a distance / reducer assigned since (PML reads them at each call)
            self._fall_back_now()
        if self._pml is not None:
            return self._run_pml(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        value = self._fused_forward(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        if getattr(self.distance, "collect_stats", False):  # (rows are built only then)
            rows = self._distance_ref_rows()
            if rows is not None:
                record_distance_stats(self.distance, embeddings, rows)
        return self._as_pml_dtype(value, embeddings)

    def _distance_ref_rows(self):
        """The rows PML's loss measures the embeddings against with its distance (the parameter's
        columns, PML's (D, C) layout); None where PML's loss does not call its distance."""
        return getattr(self, self._param).t()

    def _fused_forward(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        name = type(self).__name__
        if labels is None:
            raise ValueError(f"{name}: labels is required (a 1-D integer tensor of length N), as in PML")
        if ref_emb is not None and not (ref_emb is embeddings and ref_labels is labels):  # PML's ref_not_supported
            raise ValueError(f"{name}: ref_emb / ref_labels are not supported (as in PML)")
        labels = _on_device_of(labels, embeddings)  # PML's c_f.to_device
        weights = self.cast_weights(embeddings)
        self._check_width(embeddings, weights)
        if _no_rows(embeddings):  # PML: the mean of no rows' cross-entropy (NaN), ProxyAnchor's zero loss
            V.check_embeddings(embeddings, allow_empty=True)
            return empty_batch_loss(embeddings, self._empty_batch_value) + zero_loss(weights)
        if indices_tuple is not None:
            if _is_matrix(embeddings):  # PML's miner weights count every index as a row of labels
                indices_tuple = V.check_indices_tuple(V.index_tensors(indices_tuple, embeddings.device),
                                                      embeddings.shape[0], embeddings.shape[0])
            fused = self._fused_with_weights(embeddings, labels, indices_tuple, weights)
            if fused is not None:
                return fused
            if type(self)._reference_with_weights is _ClassLoss._reference_with_weights:
                return self._reference_with_weights(embeddings, labels, indices_tuple)  # its error, no warning
            _warn_once(f"class.indices_tuple.{name}", f"fused_pairloss: {name} computes an explicit indices_tuple "
                       "(miner weights) by the unfused reference path (N x C)")
            return self._reference_with_weights(embeddings, labels, indices_tuple)
        return self._call(embeddings, labels, weights)

    def _check_width(self, embeddings, weights):
        """The embeddings' width against the parameter's D, the error naming the constructor's argument."""
        entry = _entry_of(type(self))
        layout = None if entry is None else entry.weight_layout
        if layout is None or not (isinstance(embeddings, torch.Tensor) and embeddings.dim() == 2
                                  and weights.dim() == 2):
            return  # the functional form's checks name what is wrong
        width = weights.shape[0] if layout == "columns" else weights.shape[1]
        if embeddings.shape[1] != width:
            raise ValueError(f"{type(self).__name__}: embeddings have {embeddings.shape[1]} columns, but the loss was "
                             f"built with {self._size_name}={width}")

    def get_logits(self, embeddings):
        """PML's get_logits: the N x C logits (materialized: that is what it returns); PML's own
        when PML computes this module (another distance)."""
        if self._users_computation:  # PML's, on this module: it calls the user's overrides
            return self._pml_class().get_logits(self, embeddings)
        if self._pml_only_assigned():  # a distance assigned or changed since (PML reads it at each call)
            self._fall_back_now()
        if self._pml is not None:
            with self._synced_pml() as pml:
                return pml.get_logits(embeddings)
        return self._logits(embeddings)

    def _logits(self, embeddings):
        raise NotImplementedError


def run_class_loss(reference_fn, fused_fn, embeddings, labels, weights, backend, **hyper):
    """A class loss's functional form after its checks: the backend, then the reference or the fused call."""
    backend = resolve_backend(backend, embeddings.device)
    if backend == "reference":
        return reference_fn(embeddings, labels, weights, **hyper)
    return fused_fn(embeddings, labels, weights, backend=backend, **hyper)
