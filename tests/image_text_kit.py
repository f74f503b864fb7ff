"""open_clip 3.3's loss module (src/open_clip/loss.py) loaded from the installed file alone (the
package's __init__ pulls torchvision / timm), and the inputs of the image-text loss tests."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fused_pairloss.losses._image_text import open_clip_loss_module


def open_clip_loss():
    """open_clip's loss.py as a module, or skip (pip install --no-deps open-clip-torch; constraints.txt)."""
    module = open_clip_loss_module()
    if module is None:
        pytest.skip("open-clip-torch is not installed (make deps installs it, --no-deps)")
    return module


def features(n, d, seed, dtype=torch.float64, normalize=True):
    """(image, text) features, the text correlated with the image (a positive that matters)."""
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(n, d, generator=g, dtype=torch.float64)
    txt = 0.7 * img + 0.7 * torch.randn(n, d, generator=g, dtype=torch.float64)
    if normalize:
        img, txt = F.normalize(img, dim=1), F.normalize(txt, dim=1)
    return img.to(dtype), txt.to(dtype)
