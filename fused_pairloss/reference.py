"""Pure-PyTorch implementations: the executable definition of every loss (docs/semantics.md).

They materialize the N x M similarity matrix and follow pytorch-metric-learning (PML) 2.9 step by
step (same masks, same masked log-sum-exp, same reductions and quirks), so they agree with PML to
rounding; the test suite checks that. Every fused backend is tested against them.

These are what backend="reference" runs, one per loss under its functional form's name
(`multi_similarity_loss`, ..., `arcface_loss`; pair losses with distance "cosine" or "lp", class
losses with the parameter tensor in PML's own layout). Each is defined in its loss's module
(fused_pairloss/losses/<loss>.py), with a docstring stating the per-row / per-pair math a fused
kernel reproduces; the steps they share are fused_pairloss/losses/_reference_common.py. The
materializing oracles of the fused ops themselves (op-level tests of each backend) are
fused_pairloss/ops/oracle.py.
"""
from .losses import REGISTRY
from .losses._reference_common import multi_similarity_mine
from .losses.soft_triple import sparse_centers_regularizer

globals().update({entry.functional_name: entry.reference for entry in REGISTRY.values()})

__all__ = [entry.functional_name for entry in REGISTRY.values()] + ["multi_similarity_mine",
                                                                    "sparse_centers_regularizer"]
