"""Circle loss with class-level labels (Sun et al., CVPR 2020, the unified formula with one
positive per sample) on the class engine with K = 1.

Plug-in: kind PROXY_CIRCLE: the engine returns lse_i = LSE_{c != y_i} gamma relu(sg(s_ic) + m)
(s_ic - m) and sp_i = s_{i,y_i}. Row combination (SPEC §2):
L_i = softplus(lse_i - gamma relu(1 + m - sg(sp_i)) (sp_i - (1 - m))), loss = mean over rows.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _kinds, class_engine
from ._common import normalize


def proxy_circle_fused(embeddings, labels, proxies, *, m, gamma, backend):
    q = normalize(embeddings)
    p = normalize(proxies.t())  # (C, D)
    lse_neg, sp = class_engine.row_stats(q, p, labels, centers_per_class=1,
                                         kind=_kinds.PROXY_CIRCLE, params=(m, gamma, 0.0),
                                         backend=backend)
    lp = -gamma * torch.relu(1 + m - sp.detach()) * (sp - (1 - m))
    return F.softplus(lse_neg + lp).mean().to(embeddings.dtype)
