"""open_clip 3.3's loss module (src/open_clip/loss.py) loaded from the installed file alone (the
package's __init__ pulls torchvision / timm), and the inputs of the image-text loss tests."""
from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F


def _no_deps_spec():
    """open_clip where `make deps` puts it: pip install --no-deps --target <venv>/no-deps."""
    import os
    import sys

    init = os.path.join(sys.prefix, "no-deps", "open_clip", "__init__.py")
    if not os.path.exists(init):
        return None
    return importlib.util.spec_from_file_location("open_clip", init,
                                                  submodule_search_locations=[os.path.dirname(init)])


def open_clip_loss():
    """open_clip's loss.py as a module, or skip (pip install --no-deps open-clip-torch; constraints.txt)."""
    spec = importlib.util.find_spec("open_clip") or _no_deps_spec()
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open-clip-torch is not installed (make deps installs it, --no-deps)")
    import os

    path = os.path.join(list(spec.submodule_search_locations)[0], "loss.py")
    mod_spec = importlib.util.spec_from_file_location("open_clip_loss", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


def features(n, d, seed, dtype=torch.float64, normalize=True):
    """(image, text) features, the text correlated with the image (a positive that matters)."""
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(n, d, generator=g, dtype=torch.float64)
    txt = 0.7 * img + 0.7 * torch.randn(n, d, generator=g, dtype=torch.float64)
    if normalize:
        img, txt = F.normalize(img, dim=1), F.normalize(txt, dim=1)
    return img.to(dtype), txt.to(dtype)
