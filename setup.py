"""Build of fused_pairloss and its one extension, fused_pairloss._C.

_C holds every C++ op, registered with TORCH_LIBRARY(fused_pairloss, m) and loaded with
torch.ops.load_library (no pybind module, no CPython API: the wheel is tagged cp310-abi3, one wheel
for every CPython >= 3.10, built per torch minor). CPU sources are always built. CUDA sources are
built whenever torch is a CUDA build and nvcc is found (also with no GPU visible: that is how CI
checks that the CUDA code compiles), or when FORCE_CUDA=1; FPL_NO_CUDA=1 skips them (fast dev
builds). MAX_JOBS is honoured (ninja).

CUDA archs: TORCH_CUDA_ARCH_LIST when set; else, with no GPU visible (a build machine, CI), the
release list WHEEL_CUDA_ARCHS below (the one place it is written; `make wheel` builds it, `make test`
sets a shorter TORCH_CUDA_ARCH_LIST); else (a source build on a GPU machine) torch's default, the
visible GPUs' archs. FPL_CUDA_ARCHS=wheel forces the release list even with a GPU visible.

torch: the range the sources support is `[tool.fused_pairloss] torch` in pyproject.toml (a build
against an older torch stops with a message, a newer one warns). The wheel then requires the torch
minor it was compiled against (`torch>=2.14,<2.15` for a 2.14 build: libtorch has no stable C++ ABI
across minors, see docs/torch-abi.md), and records what it was built with in
fused_pairloss/_C_build.json beside the library, which fused_pairloss checks before loading it.
Without torch at build time the package installs pure-Python (the `reference` backend only).
"""
import glob
import json
import os
import re
import shutil
import sys
import warnings

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))

# The CUDA archs of a release wheel: SASS for each, PTX for the newest (JIT for later GPUs).
WHEEL_CUDA_ARCHS = "8.0;8.6;8.9;9.0;10.0;12.0+PTX"
# The file written beside the library (read by fused_pairloss/_extension.py).
BUILD_RECORD = "_C_build.json"


def _read_version():
    with open(os.path.join(ROOT, "fused_pairloss", "_version.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def _supported_torch():
    """The `torch = "..."` specifier of pyproject.toml's [tool.fused_pairloss] table."""
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        text = f.read()
    table = re.search(r"^\[tool\.fused_pairloss\]\s*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
    m = re.search(r'^torch\s*=\s*"([^"]+)"', table.group(1), re.M) if table else None
    if not m:
        raise RuntimeError("pyproject.toml: [tool.fused_pairloss] torch = \"...\" is missing")
    return m.group(1).replace(" ", "")


def _release(version):
    """'2.14.1+cu130' -> (2, 14, 1)"""
    return tuple(int(x) for x in re.match(r"(\d+(?:\.\d+)*)", version).group(1).split("."))


def _outside(version, spec):
    """Which clause of `spec` (only >=, >, <, <= on release numbers) `version` breaks, or None."""
    v = _release(version)
    for clause in spec.split(","):
        op, bound = re.match(r"(>=|<=|>|<)(.+)", clause).groups()
        b = _release(bound)
        n = max(len(v), len(b))
        vv, bb = v + (0,) * (n - len(v)), b + (0,) * (n - len(b))
        ok = {">=": vv >= bb, ">": vv > bb, "<": vv < bb, "<=": vv <= bb}[op]
        if not ok:
            return op
    return None


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
    """(ext_modules, cmdclass, install_requires, options)"""
    spec = _supported_torch()
    pure = ([], {}, [f"torch{spec}", "numpy"], {})
    # CUDA_HOME must be the toolkit root (bin/nvcc, lib64/libcudart) before cpp_extension is
    # imported: it reads it once, and guesses from `which nvcc` (here /usr/local/bin -> /usr/local).
    cuda_home = _find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:  # no torch at build time: pure-Python install, reference backend only
        return pure
    broken = _outside(torch.__version__, spec)
    if broken in (">=", ">") and os.environ.get("FPL_ALLOW_ANY_TORCH", "0") != "1":
        raise RuntimeError(
            f"fused_pairloss {_read_version()} builds against torch{spec} (pyproject.toml, "
            f"[tool.fused_pairloss]); this torch is {torch.__version__}. Upgrade torch "
            f"(FPL_ALLOW_ANY_TORCH=1 tries anyway: how the lower bound was checked).")
    if broken:
        warnings.warn(f"fused_pairloss: torch {torch.__version__} is newer than the tested range "
                      f"torch{spec}; building anyway (the wheel will require torch "
                      f"{'.'.join(map(str, _release(torch.__version__)[:2]))}.*)", stacklevel=2)
    if cuda_home:
        cpp_extension.CUDA_HOME = cuda_home
    want_cuda = os.environ.get("FPL_NO_CUDA", "0") != "1" and (
        os.environ.get("FORCE_CUDA", "0") == "1"
        or (torch.version.cuda is not None and cuda_home is not None)
    )
    if want_cuda and (os.environ.get("FPL_CUDA_ARCHS") == "wheel" or (
            not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available())):
        os.environ["TORCH_CUDA_ARCH_LIST"] = WHEEL_CUDA_ARCHS

    # No CPython API in _C (ops go through the dispatcher): build it against the limited API where
    # this torch's cpp_extension supports that (torch >= 2.6), and tag the wheel abi3.
    major, minor = _release(torch.__version__)[:2]
    limited = (major, minor) >= (2, 6) and os.environ.get("FPL_NO_LIMITED_API", "0") != "1"
    ext_kw = {"py_limited_api": True} if limited else {}
    options = {"bdist_wheel": {"py_limited_api": "cp310"}} if limited else {}

    sources = [os.path.join("csrc", "ops.cpp")] + sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # C++ standard: torch's default (C++20 for torch >= 2.12). The CPU kernels need no errno or FP
    # exception semantics (their loops vectorize without them, sqrt included) and round every
    # operation on its own (no contraction into FMAs beyond the GEMMs' explicit ones): the same
    # bits on every instruction set.
    cxx_flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off", "-DFPL_WITH_CPU"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    arch = ""
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
            **ext_kw,
        )
    else:
        ext = cpp_extension.CppExtension(
            "fused_pairloss._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
            **ext_kw,
        )

    record = {
        "fused_pairloss": _read_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cxx11_abi": bool(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True)),
        "cuda": bool(want_cuda),
        "cuda_arch_list": arch,
        "py_limited_api": bool(limited),
    }

    class BuildExt(cpp_extension.BuildExtension.with_options(use_ninja=True)):
        """build_ext that also writes the build record beside the library. FPL_BUILD_TEMP names
        the folder of the objects (ninja's incremental state), so that builds with different
        flags (the Makefile's CI and release wheels) do not rebuild each other's."""

        def finalize_options(self):
            if os.environ.get("FPL_BUILD_TEMP"):
                self.build_temp = os.environ["FPL_BUILD_TEMP"]
            super().finalize_options()

        def run(self):
            super().run()
            for e in self.extensions:
                out = os.path.join(os.path.dirname(self.get_ext_fullpath(e.name)), BUILD_RECORD)
                os.makedirs(os.path.dirname(out), exist_ok=True)
                with open(out, "w") as f:
                    json.dump(record, f, indent=1, sort_keys=True)
                    f.write("\n")

        def get_outputs(self):
            return super().get_outputs() + [
                os.path.join(os.path.dirname(self.get_ext_fullpath(e.name)), BUILD_RECORD)
                for e in self.extensions]

    # An sdist carries the source range; a wheel (any build of the extension) the minor it needs.
    if "sdist" in sys.argv[1:]:
        requires = pure[2]
    else:
        requires = [f"torch>={major}.{minor},<{major}.{minor + 1}", "numpy"]
    return [ext], {"build_ext": BuildExt}, requires, options


ext_modules, cmdclass, install_requires, options = _extensions()

setup(
    packages=find_packages(include=["fused_pairloss", "fused_pairloss.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=install_requires,
    options=options,
    package_data={"fused_pairloss": ["ops/README.md"]},
)
