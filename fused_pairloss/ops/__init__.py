"""Fused ops: one engine per kind of tiling, losses as plug-ins.

- pair_engine.py   : tiles of S = q r^T (Multi-Similarity, Circle): op dispatch, fake kernels, autograd
- class_engine.py  : tiles of whole classes (SoftTriple, ProxyCircle)
- triton_*.py      : the Triton kernels of both engines
- multi_similarity.py, circle.py, soft_triple.py, proxy_circle.py: each loss's plug-in
  (which engine, which kind, how row statistics combine into the loss)
C++ kernels live in csrc/cpu (backend "cpu") and csrc/cuda (backend "cuda"); the exact contract of
the ops is README.md beside this file.
"""
