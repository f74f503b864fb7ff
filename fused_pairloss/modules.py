"""nn.Module wrappers with PML's class names, constructor arguments, defaults, parameter names and
layouts, and forward signatures (docs/api.md).

PML's own keyword arguments are accepted: `distance=CosineSimilarity()` / `LpDistance()` (PML's
defaults) are fused where the loss allows them; any other distance, a `reducer`,
`embedding_regularizer`, `weight_regularizer` (except SoftTriple's SparseCentersRegularizer, which
is fused) or `collect_stats=True` makes the module compute with PML itself (same value as PML), with
a one-time warning; an explicit `indices_tuple` goes through the unfused reference path.
"""
from __future__ import annotations

import math
import warnings

import torch

from . import _validation as V
from . import functional, reference

_warned = set()


def _warn_once(key, message, stacklevel=4):
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=stacklevel)


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
            and getattr(distance, "normalize_embeddings", False)):
        return None
    if type(distance) in (pml_distances.CosineSimilarity, pml_distances.DotProductSimilarity):
        return "cosine"
    if type(distance) is pml_distances.LpDistance:
        return "lp"
    return None


class _PmlFallback:
    """What a module does with PML's keyword arguments: the fused ones (a fused distance,
    weight_init_func) are used; anything else (another distance, reducer, regularizer,
    collect_stats=True) builds the PML loss, sharing the module's parameter, and lets it compute
    after a one-time warning."""

    _distances = ("cosine", "lp")   # distances the fused path supports for this loss
    _default_distance = "cosine"    # PML's default for this loss
    _cosine_only = False            # PML asserts CosineSimilarity for this loss

    def _setup_kwargs(self, kwargs, pml_args=(), pml_kwargs=None, param_name=None):
        self._pml = None
        name = type(self).__name__
        distance = kwargs.get("distance")
        if self._cosine_only and distance is not None and _distance_name(distance) != "cosine":
            raise ValueError(f"{name}: distance must be CosineSimilarity() (as in PML); got {distance!r}")
        fused = self._default_distance if distance is None else _distance_name(distance)
        others = {k: v for k, v in kwargs.items() if k not in ("distance", "weight_init_func")}
        if fused in self._distances and not any(v not in (None, False) for v in others.values()):
            self.distance = fused
            return
        try:
            from pytorch_metric_learning import losses as pml_losses
        except ImportError as e:
            raise ValueError(f"{name}: {sorted(kwargs)} need pytorch-metric-learning (fused: distance in "
                             f"{list(self._distances)}, no reducer / regularizer arguments)") from e
        pml = getattr(pml_losses, name)(*pml_args, **(pml_kwargs or {}), **kwargs)
        if param_name is not None:  # one parameter, the module's own (state_dicts stay PML's)
            setattr(pml, param_name, getattr(self, param_name))
        object.__setattr__(self, "_pml", pml)  # not a submodule: no second copy in the state_dict
        self.distance = None

    def _run_pml(self, *args):
        _warn_once(type(self).__name__ + ".pml",
                   f"fused_pairloss: {type(self).__name__} with these PML arguments is computed by "
                   "pytorch-metric-learning itself (not fused)", stacklevel=5)
        return self._pml(*args)


class _PairLoss(_PmlFallback, torch.nn.Module):
    """Common part of the pair losses: PML's forward signature, indices_tuple, PML kwargs."""

    _reference = None  # reference function taking indices_tuple=

    def _init_pair(self, backend, kwargs, pml_args):
        self.backend = backend
        self._setup_kwargs(kwargs, pml_args)

    def _hyper(self):
        raise NotImplementedError

    def _functional(self):
        raise NotImplementedError

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        if self._pml is not None:
            return self._run_pml(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        hyper = self._hyper()
        if indices_tuple is not None:
            return self._reference_with_indices(embeddings, labels, indices_tuple, ref_emb, ref_labels, hyper)
        return self._functional()(embeddings, labels, ref_emb, ref_labels, backend=self.backend, **hyper)

    def _reference_with_indices(self, embeddings, labels, indices_tuple, ref_emb, ref_labels, hyper):
        # An explicit indices_tuple (from any PML miner) is honoured by the reference path, as PML.
        _warn_once("indices_tuple", "fused_pairloss: an explicit indices_tuple is computed by the unfused "
                   "reference path (it materializes N x M); use miner_epsilon for the fused MS miner",
                   stacklevel=5)  # _reference_with_indices, forward, _call_impl, caller
        V.check_pair_inputs(embeddings, labels, ref_emb, ref_labels)
        if not isinstance(indices_tuple, (tuple, list)) or len(indices_tuple) not in (3, 4):
            raise ValueError("indices_tuple must be a tuple of 3 (a, p, n) or 4 (a1, p, a2, n) index tensors")
        from ._backends import resolve_backend

        resolve_backend(self.backend, embeddings.device)  # still reject unknown backends
        return type(self)._reference(embeddings, labels, ref_emb, ref_labels, indices_tuple=indices_tuple, **hyper)

    def extra_repr(self):
        hyper = ", ".join(f"{k}={v}" for k, v in self._hyper().items() if k != "distance")
        return f"{hyper}, distance={self.distance!r}, backend={self.backend!r}"


class MultiSimilarityLoss(_PairLoss):
    """Drop-in for pytorch_metric_learning.losses.MultiSimilarityLoss; miner_epsilon=e replaces
    PML's MultiSimilarityMiner(e) + MultiSimilarityLoss (the miner uses the loss's distance)."""
    _reference = staticmethod(reference.multi_similarity_loss)

    def __init__(self, alpha=2, beta=50, base=0.5, miner_epsilon=None, backend="auto", **kwargs):
        super().__init__()
        V.check_positive("alpha", alpha)
        V.check_positive("beta", beta)
        V.check_real("base", base)
        V.check_real("miner_epsilon", miner_epsilon, allow_none=True)
        self.alpha, self.beta, self.base, self.miner_epsilon = alpha, beta, base, miner_epsilon
        self._init_pair(backend, kwargs, (alpha, beta, base))
        if self._pml is not None and miner_epsilon is not None:
            raise ValueError("miner_epsilon is fused only with distance=CosineSimilarity() / LpDistance() and no "
                             "reducer / regularizer arguments; pass PML's MultiSimilarityMiner's indices_tuple")

    def _hyper(self):
        return dict(alpha=self.alpha, beta=self.beta, base=self.base, distance=self.distance)

    def _functional(self):
        return functional.multi_similarity_loss

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        if indices_tuple is not None and self.miner_epsilon is not None:
            raise ValueError("pass either indices_tuple or miner_epsilon, not both")
        if self._pml is None and indices_tuple is None:
            return functional.multi_similarity_loss(embeddings, labels, ref_emb, ref_labels,
                                                    miner_epsilon=self.miner_epsilon, backend=self.backend,
                                                    **self._hyper())
        return super().forward(embeddings, labels, indices_tuple, ref_emb, ref_labels)

    def extra_repr(self):
        return super().extra_repr() + f", miner_epsilon={self.miner_epsilon}"


class CircleLoss(_PairLoss):
    """Drop-in for pytorch_metric_learning.losses.CircleLoss (pair-wise labels; cosine only, as PML)."""
    _distances = ("cosine",)
    _cosine_only = True
    _reference = staticmethod(reference.circle_loss)

    def __init__(self, m=0.4, gamma=80, backend="auto", **kwargs):
        super().__init__()
        V.check_real("m", m)
        V.check_positive("gamma", gamma)
        self.m, self.gamma = m, gamma
        self._init_pair(backend, kwargs, (m, gamma))

    def _hyper(self):
        return dict(m=self.m, gamma=self.gamma)

    def _functional(self):
        return functional.circle_loss


class NTXentLoss(_PairLoss):
    """Drop-in for pytorch_metric_learning.losses.NTXentLoss."""
    _reference = staticmethod(reference.ntxent_loss)

    def __init__(self, temperature=0.07, backend="auto", **kwargs):
        super().__init__()
        V.check_positive("temperature", temperature)
        self.temperature = temperature
        self._init_pair(backend, kwargs, (temperature,))

    def _hyper(self):
        return dict(temperature=self.temperature, distance=self.distance)

    def _functional(self):
        return functional.ntxent_loss


class SupConLoss(_PairLoss):
    """Drop-in for pytorch_metric_learning.losses.SupConLoss."""
    _reference = staticmethod(reference.supcon_loss)

    def __init__(self, temperature=0.1, backend="auto", **kwargs):
        super().__init__()
        V.check_positive("temperature", temperature)
        self.temperature = temperature
        self._init_pair(backend, kwargs, (temperature,))

    def _hyper(self):
        return dict(temperature=self.temperature, distance=self.distance)

    def _functional(self):
        return functional.supcon_loss


class ContrastiveLoss(_PairLoss):
    """Drop-in for pytorch_metric_learning.losses.ContrastiveLoss (default distance LpDistance)."""
    _default_distance = "lp"
    _reference = staticmethod(reference.contrastive_loss)

    def __init__(self, pos_margin=0, neg_margin=1, backend="auto", **kwargs):
        super().__init__()
        V.check_real("pos_margin", pos_margin)
        V.check_real("neg_margin", neg_margin)
        self.pos_margin, self.neg_margin = pos_margin, neg_margin
        self._init_pair(backend, kwargs, (pos_margin, neg_margin))
        if self.distance is not None:
            V.check_margins_ordered(pos_margin, neg_margin, self.distance)

    def _hyper(self):
        return dict(pos_margin=self.pos_margin, neg_margin=self.neg_margin, distance=self.distance)

    def _functional(self):
        return functional.contrastive_loss


class GeneralizedLiftedStructureLoss(_PairLoss):
    """Drop-in for pytorch_metric_learning.losses.GeneralizedLiftedStructureLoss (default LpDistance)."""
    _default_distance = "lp"
    _reference = staticmethod(reference.generalized_lifted_structure_loss)

    def __init__(self, neg_margin=1, pos_margin=0, backend="auto", **kwargs):
        super().__init__()
        V.check_real("pos_margin", pos_margin)
        V.check_real("neg_margin", neg_margin)
        self.neg_margin, self.pos_margin = neg_margin, pos_margin
        self._init_pair(backend, kwargs, (neg_margin, pos_margin))
        if self.distance is not None:
            V.check_margins_ordered(pos_margin, neg_margin, self.distance)

    def _hyper(self):
        return dict(neg_margin=self.neg_margin, pos_margin=self.pos_margin, distance=self.distance)

    def _functional(self):
        return functional.generalized_lifted_structure_loss


# ---- class losses -------------------------------------------------------------------------------
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


class _ClassLoss(_PmlFallback, torch.nn.Module):
    """Common part of the class losses: one parameter in PML's layout, PML's forward (embeddings,
    labels, indices_tuple=None) where PML has it, PML kwargs."""

    _param = "fc"
    _distances = ("cosine",)
    _cosine_only = True  # SoftTriple, ProxyCircle, CosFace, ArcFace (PML asserts it for its own)

    def _init_class(self, shape, backend, kwargs, pml_args, pml_kwargs=None, init=_kaiming_like_pml):
        self.backend = backend
        setattr(self, self._param, torch.nn.Parameter(torch.empty(*shape)))
        (kwargs.get("weight_init_func") or init)(getattr(self, self._param))
        self._setup_kwargs(kwargs, pml_args, pml_kwargs, param_name=self._param)

    def _call(self, embeddings, labels, weights):
        raise NotImplementedError

    def _reference_with_weights(self, embeddings, labels, indices_tuple):
        raise ValueError(f"{type(self).__name__}: indices_tuple is not supported (PML has no miner weights here)")

    def forward(self, embeddings, labels, indices_tuple=None):
        if self._pml is not None:
            return self._run_pml(embeddings, labels, indices_tuple)
        if indices_tuple is not None:
            _warn_once("class.indices_tuple", "fused_pairloss: an explicit indices_tuple (miner weights) is "
                       "computed by the unfused reference path", stacklevel=4)
            return self._reference_with_weights(embeddings, labels, indices_tuple)
        return self._call(embeddings, labels, _like(getattr(self, self._param), embeddings))


class SoftTripleLoss(_ClassLoss):
    """Drop-in for pytorch_metric_learning.losses.SoftTripleLoss; parameter `fc` (D, C*K) in PML's
    layout (column c*K+k is center k of class c), so PML state_dicts load. The center regularizer:
    center_reg_weight=w, or PML's weight_regularizer=SparseCentersRegularizer(C, K) with
    weight_reg_weight=w (both fused)."""

    def __init__(self, num_classes, embedding_size, centers_per_class=10, la=20, gamma=0.1, margin=0.01,
                 center_reg_weight=0.0, backend="auto", **kwargs):
        super().__init__()
        _check_sizes(num_classes=num_classes, embedding_size=embedding_size, centers_per_class=centers_per_class)
        V.check_positive("la", la)
        V.check_positive("gamma", gamma)
        V.check_real("margin", margin)
        V.check_real("center_reg_weight", center_reg_weight)
        kwargs = dict(kwargs)
        reg = kwargs.get("weight_regularizer")
        if reg is not None and _is_sparse_centers(reg, num_classes, centers_per_class):
            kwargs.pop("weight_regularizer")
            center_reg_weight = kwargs.pop("weight_reg_weight", 1)
            V.check_real("weight_reg_weight", center_reg_weight)
        elif reg is None:
            kwargs.pop("weight_reg_weight", None)  # PML ignores it without a regularizer
        if center_reg_weight and centers_per_class < 2:
            raise ValueError("center_reg_weight > 0 needs centers_per_class >= 2")
        self.num_classes, self.embedding_size = num_classes, embedding_size
        self.centers_per_class, self.la, self.gamma, self.margin = centers_per_class, la, gamma, margin
        self.center_reg_weight = center_reg_weight
        if "weight_regularizer" in kwargs and center_reg_weight:
            raise ValueError("pass center_reg_weight or PML's weight_regularizer, not both")
        self._init_class((embedding_size, num_classes * centers_per_class), backend, kwargs,
                         (num_classes, embedding_size, centers_per_class, la, gamma, margin))

    def _call(self, embeddings, labels, fc):
        return functional.soft_triple_loss(embeddings, labels, fc, centers_per_class=self.centers_per_class,
                                           la=self.la, gamma=self.gamma, margin=self.margin,
                                           center_reg_weight=self.center_reg_weight, backend=self.backend)

    def forward(self, embeddings, labels):  # PML's SoftTripleLoss takes no indices_tuple either
        return super().forward(embeddings, labels)

    def extra_repr(self):
        return (f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, "
                f"centers_per_class={self.centers_per_class}, la={self.la}, gamma={self.gamma}, "
                f"margin={self.margin}, center_reg_weight={self.center_reg_weight}, backend={self.backend!r}")


def _is_sparse_centers(reg, num_classes, centers_per_class):
    """PML's SparseCentersRegularizer(num_classes, centers_per_class) with its defaults: the
    regularizer the fused SoftTriple computes (center_reg_weight)."""
    try:
        from pytorch_metric_learning.distances import CosineSimilarity
        from pytorch_metric_learning.reducers import DivisorReducer
        from pytorch_metric_learning.regularizers import SparseCentersRegularizer
    except ImportError:
        return False
    if not (type(reg) is SparseCentersRegularizer and type(reg.reducer) is DivisorReducer
            and type(reg.distance) is CosineSimilarity):
        return False
    # its (num_classes, centers_per_class) live only in its mask (the attributes of those names
    # are PML's zero-initialized records)
    K = centers_per_class
    mask = reg.same_class_mask
    if K < 2 or tuple(mask.shape) != (num_classes * K, num_classes * K):
        return False
    block = torch.ones(K, K, dtype=torch.bool).triu(1)
    return bool(mask.sum() == num_classes * block.sum()) and bool(mask[:K, :K].equal(block))


class ProxyCircleLoss(_ClassLoss):
    """Circle loss with class-level labels: one learnable proxy per class, parameter `fc` (D, C)."""

    def __init__(self, num_classes, embedding_size, m=0.25, gamma=256.0, backend="auto"):
        super().__init__()
        _check_sizes(num_classes=num_classes, embedding_size=embedding_size)
        V.check_real("m", m)
        V.check_positive("gamma", gamma)
        self.num_classes, self.embedding_size, self.m, self.gamma = num_classes, embedding_size, m, gamma
        self._init_class((embedding_size, num_classes), backend, {}, ())

    def _call(self, embeddings, labels, fc):
        return functional.proxy_circle_loss(embeddings, labels, fc, m=self.m, gamma=self.gamma, backend=self.backend)

    def forward(self, embeddings, labels):
        return super().forward(embeddings, labels)

    def extra_repr(self):
        return (f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, m={self.m}, "
                f"gamma={self.gamma}, backend={self.backend!r}")


class ProxyAnchorLoss(_ClassLoss):
    """Drop-in for pytorch_metric_learning.losses.ProxyAnchorLoss; parameter `proxies` (C, D).
    Another distance than the cosine is computed by PML itself."""
    _param = "proxies"
    _cosine_only = False

    def __init__(self, num_classes, embedding_size, margin=0.1, alpha=32, backend="auto", **kwargs):
        super().__init__()
        _check_sizes(num_classes=num_classes, embedding_size=embedding_size)
        V.check_real("margin", margin)
        V.check_positive("alpha", alpha)
        self.num_classes, self.embedding_size, self.margin, self.alpha = num_classes, embedding_size, margin, alpha
        self._init_class((num_classes, embedding_size), backend, kwargs, (num_classes, embedding_size, margin, alpha),
                         init=lambda p: torch.nn.init.kaiming_normal_(p, mode="fan_out"))

    def _call(self, embeddings, labels, proxies):
        return functional.proxy_anchor_loss(embeddings, labels, proxies, margin=self.margin, alpha=self.alpha,
                                            backend=self.backend)

    def _reference_with_weights(self, embeddings, labels, indices_tuple):
        return reference.proxy_anchor_loss(embeddings, labels, _like(self.proxies, embeddings), margin=self.margin,
                                           alpha=self.alpha, indices_tuple=indices_tuple)

    def extra_repr(self):
        return (f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, margin={self.margin}, "
                f"alpha={self.alpha}, backend={self.backend!r}")


class _MarginSoftmax(_ClassLoss):
    _param = "W"

    def _init_margin(self, num_classes, embedding_size, backend, kwargs, pml_kwargs):
        _check_sizes(num_classes=num_classes, embedding_size=embedding_size)
        self.num_classes, self.embedding_size = num_classes, embedding_size
        # PML's WeightRegularizerMixin default weight_init_func: normal_
        self._init_class((embedding_size, num_classes), backend, kwargs, (num_classes, embedding_size), pml_kwargs,
                         init=torch.nn.init.normal_)

    def _reference_with_weights(self, embeddings, labels, indices_tuple):
        return self._reference_fn(embeddings, labels, _like(self.W, embeddings), indices_tuple=indices_tuple,
                                  **self._hyper())

    def _call(self, embeddings, labels, W):
        return self._functional_fn(embeddings, labels, W, backend=self.backend, **self._hyper())

    def extra_repr(self):
        hyper = ", ".join(f"{k}={v}" for k, v in self._hyper().items())
        return (f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, {hyper}, "
                f"backend={self.backend!r}")


class NormalizedSoftmaxLoss(_MarginSoftmax):
    """Drop-in for pytorch_metric_learning.losses.NormalizedSoftmaxLoss; parameter `W` (D, C).
    PML's default distance, DotProductSimilarity on normalized embeddings, is the cosine."""
    _cosine_only = False
    _reference_fn = staticmethod(reference.normalized_softmax_loss)
    _functional_fn = staticmethod(functional.normalized_softmax_loss)

    def __init__(self, num_classes, embedding_size, temperature=0.05, backend="auto", **kwargs):
        super().__init__()
        V.check_positive("temperature", temperature)
        self.temperature = temperature
        self._init_margin(num_classes, embedding_size, backend, kwargs, dict(temperature=temperature))

    def _hyper(self):
        return dict(temperature=self.temperature)


class CosFaceLoss(_MarginSoftmax):
    """Drop-in for pytorch_metric_learning.losses.CosFaceLoss; parameter `W` (D, C)."""
    _reference_fn = staticmethod(reference.cosface_loss)
    _functional_fn = staticmethod(functional.cosface_loss)

    def __init__(self, num_classes, embedding_size, margin=0.35, scale=64, backend="auto", **kwargs):
        super().__init__()
        V.check_real("margin", margin)
        V.check_positive("scale", scale)
        self.margin, self.scale = margin, scale
        self._init_margin(num_classes, embedding_size, backend, kwargs, dict(margin=margin, scale=scale))

    def _hyper(self):
        return dict(margin=self.margin, scale=self.scale)


class ArcFaceLoss(_MarginSoftmax):
    """Drop-in for pytorch_metric_learning.losses.ArcFaceLoss (margin in degrees); parameter `W` (D, C)."""
    _reference_fn = staticmethod(reference.arcface_loss)
    _functional_fn = staticmethod(functional.arcface_loss)

    def __init__(self, num_classes, embedding_size, margin=28.6, scale=64, backend="auto", **kwargs):
        super().__init__()
        V.check_real("margin", margin)
        V.check_positive("scale", scale)
        self.margin, self.scale = margin, scale
        self._init_margin(num_classes, embedding_size, backend, kwargs, dict(margin=margin, scale=scale))

    def _hyper(self):
        return dict(margin=self.margin, scale=self.scale)
