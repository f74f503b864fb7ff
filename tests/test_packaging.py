"""Packaging: the wheel `make test` built (FPL_TEST_WHEEL), the sdist, the import-time torch check.

`make test` builds the wheel once (CI archs), installs it into .venv and runs the whole suite
against it; this file checks that it is that wheel being tested, what the wheel carries (metadata,
tags, no torch libraries), that it installs into a fresh virtual environment beside the same torch
and works there from outside the source tree (tests/smoke_install.py), that an sdist builds and
installs (CPU kernels only, to keep it short), and that a library built for another torch is not
loaded but explained. The wheel and sdist tests are skipped without FPL_TEST_WHEEL (a plain pytest
run in a dev checkout); FPL_TEST_SDIST=0 skips the sdist install.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile

import pytest
import torch

import fused_pairloss as fpl
from fused_pairloss import _extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "tests", "smoke_install.py")
WHEEL = os.environ.get("FPL_TEST_WHEEL", "")
CUDA_ARCHS = os.environ.get("FPL_TEST_CUDA_ARCHS", "")
needs_wheel = pytest.mark.skipif(not WHEEL, reason="FPL_TEST_WHEEL is not set (`make test` sets it)")


def _torch_minor():
    return tuple(int(v) for v in re.match(r"(\d+)\.(\d+)", torch.__version__).groups())


def _pinned_torch():
    major, minor = _torch_minor()
    return f"torch<{major}.{minor + 1},>={major}.{minor}"


def _supported_torch():
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        table = re.search(r"^\[tool\.fused_pairloss\]\s*$(.*?)(?=^\[|\Z)", f.read(), re.M | re.S).group(1)
    return re.search(r'^torch\s*=\s*"([^"]+)"', table, re.M).group(1)


def _clauses(spec):
    return sorted(c.strip() for c in spec.split(","))


def _requires_dist(metadata_text):
    return [line.split(":", 1)[1].strip() for line in metadata_text.splitlines()
            if line.startswith("Requires-Dist:") and "extra ==" not in line]


def _fresh_venv(path):
    """A venv whose interpreter also sees this environment's site-packages (torch and the rest,
    through a .pth file) but installs into its own, which comes first on sys.path."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    py = os.path.join(str(path), "bin", "python")
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    with open(os.path.join(site, "_fpl_test_parent_env.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    return py, site


def _pip_into(py, *args, env=None):
    """This environment's pip, installing into the interpreter `py`'s environment."""
    cmd = [sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--ignore-installed",
           "--no-build-isolation", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _smoke(py, cwd, *args):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FUSED_PAIRLOSS_LIBRARY")}
    proc = subprocess.run([py, SMOKE, *args], cwd=str(cwd), capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout


# ---- the suite runs against the installed wheel --------------------------------------------------
@needs_wheel
def test_suite_imports_the_installed_wheel():
    pkg = os.path.realpath(os.path.dirname(fpl.__file__))
    assert pkg != os.path.realpath(os.path.join(ROOT, "fused_pairloss")), f"the suite imported the source tree: {pkg}"
    assert pkg.startswith(os.path.realpath(sysconfig.get_paths()["platlib"]) + os.sep), pkg
    info = fpl.build_info()
    assert info["cpu"], info["library_error"]
    assert info["built_with_torch"] == torch.__version__
    assert info["version"] == fpl.__version__
    assert os.path.basename(WHEEL).startswith(f"fused_pairloss-{fpl.__version__}-")
    if CUDA_ARCHS:
        assert info["cuda"] and info["cuda_arch_list"].split() == CUDA_ARCHS.replace(";", " ").split()


@needs_wheel
def test_wheel_contents_and_metadata():
    name = os.path.basename(WHEEL)
    # one wheel for every CPython >= 3.10 (no CPython API in _C), repaired to a manylinux tag
    assert re.match(r"fused_pairloss-[^-]+-cp310-abi3-manylinux_2_\d+_x86_64(\.manylinux\S+)?\.whl$", name), name
    with zipfile.ZipFile(WHEEL) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        record = json.loads(z.read("fused_pairloss/_C_build.json"))
    libs = [n for n in names if n.endswith(".so") or ".so." in n]
    assert [n for n in libs if n.startswith("fused_pairloss/_C")] == ["fused_pairloss/_C.abi3.so"], libs
    # torch's libraries (and the libgomp / CUDA runtime torch loads) are not grafted into the wheel
    grafted = [n for n in libs if re.search(r"/(libtorch|libc10|libgomp|libcudart|libcuda\.)", n)]
    assert not grafted, grafted
    assert re.search(rf"^Version: {re.escape(fpl.__version__)}$", meta, re.M)
    torch_reqs = [r for r in _requires_dist(meta) if r.startswith("torch")]
    assert torch_reqs == [_pinned_torch()], torch_reqs  # the torch minor the binary was built against
    assert record["torch"] == torch.__version__ and record["fused_pairloss"] == fpl.__version__
    assert record["cuda"] == bool(CUDA_ARCHS)
    assert record["cuda_arch_list"].split() == CUDA_ARCHS.replace(";", " ").split()


@needs_wheel
def test_wheel_in_a_fresh_venv(tmp_path):
    """pip install the wheel into a new venv beside this torch; import it from outside the tree."""
    py, site = _fresh_venv(tmp_path / "venv")
    _pip_into(py, WHEEL)
    args = ["--prefix", site] + (["--cuda-archs", CUDA_ARCHS] if CUDA_ARCHS else ["--no-cuda"])
    out = _smoke(py, tmp_path, *args)
    assert "smoke_install: OK" in out
    # the installed metadata's torch requirement is met by the torch beside it
    check = subprocess.run([py, "-m", "pip", "check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


@needs_wheel
@pytest.mark.skipif(os.environ.get("FPL_TEST_SDIST", "1") == "0", reason="FPL_TEST_SDIST=0")
def test_sdist_builds_and_installs(tmp_path):
    """python -m build --sdist; the sdist holds every tracked source; pip installs it (CPU kernels
    only: FPL_NO_CUDA=1 keeps this to about a minute) into a fresh venv, where it works."""
    out = tmp_path / "sdist"
    proc = subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "-o", str(out), ROOT],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (sdist,) = out.glob("fused_pairloss-*.tar.gz")
    assert sdist.name == f"fused_pairloss-{fpl.__version__}.tar.gz"
    top = f"fused_pairloss-{fpl.__version__}/"
    with tarfile.open(sdist) as t:
        members = {m.name[len(top):] for m in t.getmembers() if m.isfile()}
        pkg_info = t.extractfile(top + "PKG-INFO").read().decode()
    git = shutil.which("git")
    tracked = subprocess.run([git, "-C", ROOT, "ls-files", "csrc", "fused_pairloss", "tests"],
                             capture_output=True, text=True).stdout.split() if git else []
    need = set(tracked) | {"setup.py", "pyproject.toml", "README.md", "MANIFEST.in", "constraints.txt",
                           "CHANGELOG.md", "csrc/ops.cpp", "csrc/common/loss_spec.h", "csrc/common/pair_terms.inl",
                           "csrc/cpu/kernels_isa.inc"}
    missing = sorted(n for n in need if n not in members)
    assert not missing, f"not in the sdist: {missing}"
    assert not [n for n in members if n.endswith(".so") or n.endswith("_C_build.json")]
    # the sdist states the source range (pyproject.toml); its builds pin the minor they compiled against
    (torch_req,) = [r for r in _requires_dist(pkg_info) if r.startswith("torch")]
    assert _clauses(torch_req[len("torch"):]) == _clauses(_supported_torch()), (torch_req, _supported_torch())
    assert re.search(r"^Dynamic: requires-dist$", pkg_info, re.M | re.I), pkg_info

    py, site = _fresh_venv(tmp_path / "venv")
    env = dict(os.environ, FPL_NO_CUDA="1", MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    env.pop("FPL_BUILD_TEMP", None)
    _pip_into(py, str(sdist), env=env)
    assert "smoke_install: OK" in _smoke(py, tmp_path, "--prefix", site, "--no-cuda")
    (meta,) = [os.path.join(site, d, "METADATA") for d in os.listdir(site)
               if d.startswith("fused_pairloss-") and d.endswith(".dist-info")]
    with open(meta) as f:
        assert [r for r in _requires_dist(f.read()) if r.startswith("torch")] == [_pinned_torch()]


# ---- a library built for another torch is explained, not loaded ---------------------------------
def test_torch_mismatch_messages():
    rec = {"torch": "2.14.1+cu130", "torch_cuda": "13.0", "cuda": True}
    assert _extension.torch_mismatch(rec, "2.14.0+cu130", "13.0") is None
    assert _extension.torch_mismatch(None, "1.0", None) is None  # no record: a dev build
    why = _extension.torch_mismatch(rec, "2.15.0+cu130", "13.0")
    assert "built for torch 2.14.1+cu130" in why and "need torch 2.14.x" in why and "2.15.0" in why
    assert "'reference' and 'triton' backends work" in why
    assert "CPU-only build" in _extension.torch_mismatch(rec, "2.14.1+cpu", None)
    assert "CUDA 12.8" in _extension.torch_mismatch(rec, "2.14.1+cu128", "12.8")
    cpu_rec = dict(rec, cuda=False)
    assert _extension.torch_mismatch(cpu_rec, "2.14.1+cpu", None) is None


def _installed_package_copy(tmp_path, **record_changes):
    """A copy of the loaded fused_pairloss package (library included) whose build record says
    something else, on a PYTHONPATH of its own."""
    lib = _extension.load()
    if lib is None or _extension.build_record() is None:
        pytest.skip(f"no built library with a build record here: {_extension.load_error()}")
    src = os.path.dirname(lib)
    dst = tmp_path / "pkgs" / "fused_pairloss"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
    rec = dict(_extension.build_record(), **record_changes)
    with open(dst / _extension.BUILD_RECORD, "w") as f:
        json.dump(rec, f)
    return tmp_path / "pkgs"


_MISMATCH_CHILD = r"""
import json, warnings, torch
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    import fused_pairloss as fpl
msgs = [str(x.message) for x in w if "fused_pairloss" in str(x.message)]
x = torch.randn(32, 8, dtype=torch.float64, requires_grad=True)
y = torch.randint(0, 4, (32,))
loss = fpl.functional.multi_similarity_loss(x, y)  # auto: reference here
loss.backward()
try:
    fpl.functional.multi_similarity_loss(x, y, backend="cpu")
    err = None
except ValueError as e:
    err = str(e)
info = fpl.build_info()
print(json.dumps({"warnings": msgs, "cpu": info["cpu"], "error": info["library_error"],
                  "avail": fpl.available_backends(), "ask_cpu": err,
                  "finite": bool(torch.isfinite(x.grad).all()), "built": info["built_with_torch"]}))
"""


@pytest.mark.parametrize("change", [{"torch": "2.3.0"}, {"torch": "99.0.0+cu130"}])
def test_library_for_another_torch_is_not_loaded(tmp_path, change):
    pkgs = _installed_package_copy(tmp_path, **change)
    env = {k: v for k, v in os.environ.items() if k != "FUSED_PAIRLOSS_LIBRARY"}
    env["PYTHONPATH"] = str(pkgs)
    proc = subprocess.run([sys.executable, "-c", _MISMATCH_CHILD], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(out["warnings"]) == 1 and f"built for torch {change['torch']}" in out["warnings"][0], out
    assert "backends are off" in out["warnings"][0]
    assert out["cpu"] is False and "not loaded" in out["error"] and out["built"] == change["torch"]
    assert "cpu" not in out["avail"] and out["finite"]
    assert "built for torch" in out["ask_cpu"] and "available: ['reference'" in out["ask_cpu"]
