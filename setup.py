"""Build of fused_pairloss and its one extension, fused_pairloss._C.

_C holds every C++ op, registered with TORCH_LIBRARY(fused_pairloss, m) and loaded with
torch.ops.load_library (no pybind module). CPU sources are always built. CUDA sources are built
whenever torch is a CUDA build and nvcc is found (also with no GPU visible: that is how CI checks
that the CUDA code compiles), or when FORCE_CUDA=1; FPL_NO_CUDA=1 skips them (fast dev builds).
TORCH_CUDA_ARCH_LIST is honoured (default "8.0;9.0" with no visible GPU); MAX_JOBS too (ninja).
Without a working compiler the package still installs and imports with only `reference`.
"""
import glob
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _find_cuda_home():
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    cands = ([os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []) + ["/usr/local/cuda"]
    for cand in cands:  # prefer a root that also has the runtime library
        if os.path.exists(os.path.join(cand, "bin", "nvcc")) and glob.glob(os.path.join(cand, "lib*", "libcudart.so*")):
            return cand
    for cand in cands:
        if os.path.exists(os.path.join(cand, "bin", "nvcc")):
            return cand
    return None


def _extensions():
    # CUDA_HOME must be the toolkit root (bin/nvcc, lib64/libcudart) before cpp_extension is
    # imported: it reads it once, and guesses from `which nvcc` (here /usr/local/bin -> /usr/local).
    cuda_home = _find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:  # no torch at build time: pure-Python install, reference backend only
        return [], {}
    if cuda_home:
        cpp_extension.CUDA_HOME = cuda_home
    want_cuda = os.environ.get("FPL_NO_CUDA", "0") != "1" and (
        os.environ.get("FORCE_CUDA", "0") == "1"
        or (torch.version.cuda is not None and cuda_home is not None)
    )
    if want_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"

    sources = [os.path.join("csrc", "ops.cpp")] + sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # C++ standard: torch's default (C++20 for torch >= 2.12). The CPU kernels need no errno or FP
    # exception semantics (their loops vectorize without them, sqrt included) and round every
    # operation on its own (no contraction into FMAs beyond the GEMMs' explicit ones): the same
    # bits on every instruction set.
    cxx_flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off", "-DFPL_WITH_CPU"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    if want_cuda:
        cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp"))) + sorted(
            glob.glob(os.path.join("csrc", "cuda", "*.cu"))
        )
        # recorded for build_info(); ';' would clash with build_config()'s own separator
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "").replace(";", " ").strip()
        ext = cpp_extension.CUDAExtension(
            "fused_pairloss._C",
            sources + cuda_sources,
            include_dirs=include_dirs,
            extra_compile_args={
                "cxx": cxx_flags + ["-DFPL_WITH_CUDA", f'-DFPL_CUDA_ARCH_LIST="{arch}"'],
                "nvcc": ["-O3", "-lineinfo", "-DFPL_WITH_CUDA"],
            },
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension(
            "fused_pairloss._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = _extensions()

setup(
    name="fused_pairloss",
    packages=find_packages(include=["fused_pairloss", "fused_pairloss.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    package_data={"fused_pairloss": ["ops/README.md"]},
)
