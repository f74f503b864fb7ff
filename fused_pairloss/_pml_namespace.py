"""PML's namespaces (losses, miners, distances, reducers, regularizers) with this library's classes
where it has them and PML's own otherwise, so that `from fused_pairloss import losses, miners`
replaces `from pytorch_metric_learning import losses, miners` (PML stays an optional dependency)."""
from __future__ import annotations

import importlib
import inspect


def pml_fallback(namespace: str, module_name: str):
    """The module-level `__getattr__` and `__dir__` of a namespace module: a name the module does not
    define is PML's `pytorch_metric_learning.<namespace>.<name>`, or an AttributeError saying so."""

    def pml_module():
        try:
            return importlib.import_module(f"pytorch_metric_learning.{namespace}")
        except ImportError:
            return None

    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)
        pml = pml_module()
        if pml is None:
            raise AttributeError(f"{module_name} has no {name!r} of its own, and pytorch-metric-learning (whose "
                                 f"{namespace}.{name} it would be) is not installed")
        try:
            return getattr(pml, name)
        except AttributeError:
            raise AttributeError(f"neither fused_pairloss nor pytorch_metric_learning.{namespace} has {name!r}") \
                from None

    def __dir__():
        pml = pml_module()
        mod = importlib.import_module(module_name)
        return sorted(set(vars(mod)) | (set(dir(pml)) if pml is not None else set()))

    return __getattr__, __dir__


def star_names(namespace: str, ours=(), ours_need_pml=False):
    """`__all__` of a namespace module: this library's names and the public names of PML's
    `pytorch_metric_learning.<namespace>` other than its submodules, so that `from fused_pairloss.<namespace>
    import *` stands for `from pytorch_metric_learning.<namespace> import *` (a module `__getattr__`
    takes no part in a star import). Without PML: ours, unless they are built on PML's classes
    (`ours_need_pml`: the miners)."""
    try:
        pml = importlib.import_module(f"pytorch_metric_learning.{namespace}")
    except ImportError:
        return [] if ours_need_pml else sorted(ours)
    return sorted(set(ours) | {name for name, value in vars(pml).items()
                               if not name.startswith("_") and not inspect.ismodule(value)})
