"""Circle loss with class-level labels (Sun et al., CVPR 2020, the unified formula with one
positive per sample) on the class engine with K = 1.

Declaration: row term over the non-target classes: gamma relu(sg(s_ic) + m) (s_ic - m), LSE; the
positive's logit -gamma relu(1 + m - sg(sp_i)) (sp_i - (1 - m)) is formed here from target_sim.
Row combination (docs/semantics.md): L_i = softplus(lse_i + lp_i), loss = mean over rows.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import engines
from ._common import LOCAL, normalize
from .spec import ClassLossSpec, PairTerm


def declaration(m, gamma):
    """The proxies are (D, C) as PML's weight layout; the engine normalizes them."""
    return ClassLossSpec(row=PairTerm(scale=gamma, shift=m, weight_offset=m, weight_slope=1.0, lse=True),
                         normalize_weights=True, weights_layout="columns")


def combine(st: engines.ClassStats, embeddings, *, m, gamma, batch=LOCAL):
    sp = st.target_sim
    lp = -gamma * torch.relu(1 + m - sp.detach()) * (sp - (1 - m))
    return batch.mean(F.softplus(st.lse_other + lp)).to(embeddings.dtype)


def proxy_circle_fused(embeddings, labels, proxies, *, m, gamma, backend):
    q = normalize(embeddings)
    st = engines.class_stats(q, proxies, labels, declaration(m, gamma), backend)  # proxies (D, C)
    return combine(st, embeddings, m=m, gamma=gamma)
