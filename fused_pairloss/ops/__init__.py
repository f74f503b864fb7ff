"""The fused engines, independent of any loss (the losses are fused_pairloss/losses/):

- spec.py          : a loss's declaration (PairLossSpec, ClassLossSpec) and its packing into the ops' arguments
- engines.py       : both engines' op registration: fake kernels, autograd, the statistics they return
- stats.py         : the calls a loss makes (pair_stats, class_stats): the backend's op
- triton_engines.py: the Triton kernels of both engines (backend "triton")
- triton_rank_rows.py: the Triton kernels of SmoothAP's and PNP's row ops on CUDA tensors (both GPU backends)
- oracle.py        : materializing oracles of every op (op-level tests)
- _common.py       : operands, PML's zero loss, the Batch reductions a row combination is written in
C++ kernels live in csrc/cpu (backend "cpu") and csrc/cuda (backend "cuda"); the exact contract of
the ops is README.md beside this file.
"""
