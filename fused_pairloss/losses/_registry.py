"""The entry a loss module registers (its `ENTRIES`, collected into `fused_pairloss.losses.REGISTRY`):
what the package exports, the functional and reference namespaces, the distributed wrapper, the
cross-batch memory, the test kit and the benchmarks read about a loss."""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

KINDS = ("pair", "class")
WEIGHT_LAYOUTS = ("columns", "rows")


@dataclass(frozen=True)
class LossEntry:
    """One public loss.

    cls: the nn.Module, with PML's class name, arguments and defaults.
    kind: "pair" (pair engine; forward(embeddings, labels, indices_tuple, ref_emb, ref_labels)) or
        "class" (class engine; one weight parameter).
    functional / reference: the functional form (fused_pairloss.functional) and the materializing
        reference (fused_pairloss.reference), both exported under the functional form's name.
    fused: pair losses: the engine call `fn(embeddings, labels, ref_emb, ref_labels, *, backend,
        exclude_col, batch, **hyper)` (DistributedLossWrapper and CrossBatchMemory run it).
    hyper: the hyper-parameters PML's constructor takes (after the sizes of a class loss), in its
        order; `defaults` reads their defaults from the functional form.
    in_pml: PML has a class of this name (ProxyCircleLoss: no).
    ref_emb: the fused path compares the batch with a separate ref_emb (PML's NPairsLoss and
        InstanceLoss refuse one; its ThresholdConsistentMarginLoss reads both ends of a pair from
        embeddings, which the reference reproduces).
    weight_layout: class losses: the parameter as PML stores it, "columns" (D, C*K) or "rows" (C, D).
    unit_weights: class losses whose functional form takes weight vectors of unit norm only
        (P2SGradLoss: its module renormalizes the parameter before each call).
    equal_label_counts: pair losses that take only batches with every label the same number of
        times (PML's SmoothAPLoss).
    """
    cls: type
    kind: str
    functional: Callable
    reference: Callable
    fused: Optional[Callable] = None
    hyper: Tuple[str, ...] = ()
    in_pml: bool = True
    ref_emb: bool = True
    weight_layout: Optional[str] = None
    unit_weights: bool = False
    equal_label_counts: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"{self.name}: kind must be one of {KINDS}; got {self.kind!r}")
        if self.kind == "pair" and self.fused is None:
            raise ValueError(f"{self.name}: a pair loss needs its fused call")
        if (self.kind == "class") != (self.weight_layout in WEIGHT_LAYOUTS):
            raise ValueError(f"{self.name}: weight_layout must be one of {WEIGHT_LAYOUTS} for a class loss only")
        missing = [h for h in self.hyper if h not in self._parameters()]
        if missing:
            raise ValueError(f"{self.name}: {missing} are not arguments of {self.functional.__name__}")

    def _parameters(self):
        return inspect.signature(self.functional).parameters

    @property
    def name(self) -> str:
        """The class name (PML's)."""
        return self.cls.__name__

    @property
    def functional_name(self) -> str:
        """The name of the functional form and of the reference in their namespaces."""
        return self.functional.__name__

    @property
    def pml_name(self) -> Optional[str]:
        return self.name if self.in_pml else None

    @property
    def weight_name(self) -> Optional[str]:
        """Class losses: the parameter's attribute name ("fc", "proxies", "W"), as in PML."""
        return self.cls._param if self.kind == "class" else None

    @property
    def centers_name(self) -> Optional[str]:
        """K centers per class: the functional form's argument for K, PML's name ("centers_per_class"
        for SoftTriple, "sub_centers" for SubCenterArcFace); None for one vector per class."""
        return next((n for n in ("centers_per_class", "sub_centers") if n in self._parameters()), None)

    @property
    def pooled(self) -> bool:
        return self.centers_name is not None

    def size_kwargs(self, num_classes, embedding_size) -> dict:
        """Class losses: the constructor's size arguments by PML's names, which PML's class takes as
        keywords too: (num_classes, embedding_size), P2SGradLoss (descriptors_dim, num_classes)."""
        params = inspect.signature(self.cls.__init__).parameters
        size_name = "descriptors_dim" if "descriptors_dim" in params else "embedding_size"
        return {"num_classes": num_classes, size_name: embedding_size}

    @property
    def defaults(self) -> dict:
        """PML's default hyper-parameters (the functional form's defaults of `hyper`)."""
        params = self._parameters()
        return {h: params[h].default for h in self.hyper}
