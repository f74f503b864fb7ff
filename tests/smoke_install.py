"""Smoke test of an INSTALLED fused_pairloss (a wheel or an sdist install), run as a script from
outside the source tree:

    python tests/smoke_install.py [--prefix DIR] [--cuda-archs "8.0 9.0" | --no-cuda]

Checks that the package imports from DIR (not from a checkout), that build_info() reports the C++
CPU kernels (and the CUDA kernels with exactly those archs, or none with --no-cuda) built against
this torch, and runs a fused loss of each engine forward and backward on CPU (backend="cpu"),
against backend="reference". Prints build_info() as JSON; exit status 0 when all holds.
Uses the public API only, so it also runs against older torch releases (the lower-bound checks of
pyproject.toml's [tool.fused_pairloss] torch range, docs/torch-abi.md).
"""
import argparse
import json
import os
import sys
import warnings


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--prefix", help="the package must be imported from below this folder")
    ap.add_argument("--cuda-archs", help="the CUDA arch list the library must report ('8.0 9.0')")
    ap.add_argument("--no-cuda", action="store_true", help="the library must have no CUDA kernels")
    args = ap.parse_args(argv)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import torch

        import fused_pairloss as fpl
        import fused_pairloss.functional as F
    load_warnings = [str(w.message) for w in caught if "fused_pairloss" in str(w.message)]

    pkg = os.path.dirname(os.path.abspath(fpl.__file__))
    info = fpl.build_info()
    print(json.dumps(info, indent=1, sort_keys=True, default=str))
    assert not load_warnings, load_warnings
    assert not os.path.exists(os.path.join(os.path.dirname(pkg), "setup.py")), \
        f"imported from a source checkout: {pkg}"
    if args.prefix:
        prefix = os.path.realpath(args.prefix)
        assert os.path.realpath(pkg).startswith(prefix + os.sep), f"imported {pkg}, not from {prefix}"
    assert info["version"] == fpl.__version__
    assert info["cpu"], f"no C++ CPU kernels: {info['library_error']}"
    assert info["built_with_torch"] == torch.__version__, (info["built_with_torch"], torch.__version__)
    if args.no_cuda:
        assert not info["cuda"] and not info["cuda_arch_list"], info
    if args.cuda_archs is not None:
        want = args.cuda_archs.replace(";", " ").split()
        assert info["cuda"], f"no CUDA kernels in the library: {info}"
        assert (info["cuda_arch_list"] or "").split() == want, (info["cuda_arch_list"], want)
        assert (info["built_cuda_arch_list"] or "").split() == want, (info["built_cuda_arch_list"], want)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, 6, (64,), generator=g)
    centers = torch.randn(16, 6 * 3, generator=g, dtype=torch.float64)
    cases = {
        "multi_similarity": lambda xx, cc, b: F.multi_similarity_loss(xx, y, backend=b),
        "multi_similarity_mined": lambda xx, cc, b: F.multi_similarity_loss(xx, y, miner_epsilon=0.1, backend=b),
        "soft_triple": lambda xx, cc, b: F.soft_triple_loss(xx, y, cc, centers_per_class=3, backend=b),
    }
    for name, fn in cases.items():
        out = {}
        for backend in ("cpu", "reference"):
            xx = x.clone().requires_grad_(True)
            cc = centers.clone().requires_grad_(True)
            loss = fn(xx, cc, backend)
            loss.backward()
            out[backend] = (loss.detach(), xx.grad, cc.grad)
        for a, b in zip(out["cpu"], out["reference"]):
            if b is None:
                assert a is None, name
                continue
            assert torch.isfinite(a).all(), name
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=name)
        print(f"{name}: loss {out['cpu'][0].item():.6f} (cpu == reference, forward and backward)")
    print("smoke_install: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
