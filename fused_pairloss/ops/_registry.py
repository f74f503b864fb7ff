"""One engine's op families and their registration, shared by pair_engine.py and class_engine.py.

Each engine has a C++ op pair (`fused_pairloss::<engine>_forward/backward`, with CPU and CUDA
kernels from csrc/) and a Triton twin (`ops/triton_<engine>.py`). Both get the same autograd rule;
the C++ ops also get their fake kernels here (the Triton module registers its own). Registration
happens once, the C++ part at import (so opcheck and torch.compile see it), the Triton part on
first use (importing triton is slow).
"""
from __future__ import annotations

import torch

from .. import _extension


class EngineOps:
    def __init__(self, engine, fake_forward, fake_backward, setup_context, make_backward,
                 triton_module):
        self.engine = engine  # "pair_engine" / "class_engine"
        # returns the Triton twin's module; a plain `from . import ...` in the engine's file, which
        # torch.compile can trace (importlib.import_module it refuses)
        self._load_triton = triton_module
        self._fakes = (fake_forward, fake_backward)
        self._setup_context = setup_context
        self._make_backward = make_backward
        self._registered = set()
        self.register_cpp()

    def register_cpp(self):
        if "cpp" in self._registered or _extension.load() is None:
            return
        fwd, bwd = f"fused_pairloss::{self.engine}_forward", f"fused_pairloss::{self.engine}_backward"
        torch.library.register_fake(fwd)(self._fakes[0])
        torch.library.register_fake(bwd)(self._fakes[1])
        backward_op = getattr(torch.ops.fused_pairloss, f"{self.engine}_backward")
        torch.library.register_autograd(fwd, self._make_backward(backward_op),
                                        setup_context=self._setup_context)
        self._registered.add("cpp")

    def _triton_module(self):
        mod = self._load_triton()
        if not getattr(mod, "AVAILABLE", False):
            raise RuntimeError(f"the Triton {self.engine.replace('_', ' ')} is not available (is triton installed?)")
        if "triton" not in self._registered:
            torch.library.register_autograd(mod.forward_op, self._make_backward(mod.backward_op),
                                            setup_context=self._setup_context)
            self._registered.add("triton")
        return mod

    def forward_op(self, backend):
        """The forward op of `backend` ("cpu" / "cuda" share the C++ op; "triton" its own)."""
        if backend == "triton":
            return self._triton_module().forward_op
        self.register_cpp()
        return getattr(torch.ops.fused_pairloss, f"{self.engine}_forward")
