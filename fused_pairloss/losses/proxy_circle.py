"""Circle loss with class-level labels (Sun et al., CVPR 2020, the unified formula with one
positive per sample) on the class engine with K = 1.

Declaration: row term over the non-target classes: gamma relu(sg(s_ic) + m) (s_ic - m), LSE; the
positive's logit -gamma relu(1 + m - sg(sp_i)) (sp_i - (1 - m)) is formed here from target_sim.
Row combination (docs/semantics.md): L_i = softplus(lse_i + lp_i), loss = mean over rows.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _validation as V
from ..ops import engines
from ..ops._common import LOCAL, loss_function, normalize
from ..ops.spec import ClassLossSpec, PairTerm
from ..ops.stats import class_stats
from ._base import _ClassLoss, _check_sizes, run_class_loss
from ._registry import LossEntry


def proxy_circle_reference(embeddings, labels, proxies, *, m=0.25, gamma=256.0):
    """Circle loss with class-level labels (docs/semantics.md; the paper's unified formula, one positive
    per sample). proxies: (D, C)."""
    sim = normalize(embeddings) @ normalize(proxies.t()).t()  # (N, C)
    sg = sim.detach()
    target = F.one_hot(labels, sim.shape[1]).bool()
    sp = sim[target]
    lp = -gamma * torch.relu(1 + m - sg[target]) * (sp - (1 - m))
    ln = gamma * torch.relu(sg + m) * (sim - m)
    lse_n = torch.logsumexp(ln.masked_fill(target, float("-inf")), dim=1)
    # in the input dtype also under autocast (the matmul's dtype), as the fused value (no PML class to follow)
    return F.softplus(lse_n + lp).mean().to(embeddings.dtype)


def declaration(m, gamma):
    """The proxies are (D, C) as PML's weight layout; the engine normalizes them."""
    return ClassLossSpec(row=PairTerm(scale=gamma, shift=m, weight_offset=m, weight_slope=1.0, lse=True),
                         normalize_weights=True, weights_layout="columns")


def combine(st: engines.ClassStats, embeddings, *, m, gamma, batch=LOCAL):
    sp = st.target_sim
    lp = -gamma * torch.relu(1 + m - sp.detach()) * (sp - (1 - m))
    return batch.mean(F.softplus(st.lse_other + lp)).to(embeddings.dtype)


@loss_function
def proxy_circle_fused(embeddings, labels, proxies, *, m, gamma, backend):
    q = normalize(embeddings)
    st = class_stats(q, proxies, labels, declaration(m, gamma), backend)  # proxies (D, C)
    return combine(st, embeddings, m=m, gamma=gamma)


@loss_function
def proxy_circle_loss(embeddings, labels, proxies, *, m=0.25, gamma=256.0, backend="auto"):
    """Circle loss with class-level labels; proxies (D, C), one learnable proxy per class."""
    V.check_centers(embeddings, labels, proxies, 1, name="proxies")
    V.check_real("m", m)
    V.check_positive("gamma", gamma)
    return run_class_loss(proxy_circle_reference, proxy_circle_fused, embeddings, labels, proxies, backend,
                          m=m, gamma=gamma)


class ProxyCircleLoss(_ClassLoss):
    """Circle loss with class-level labels: one learnable proxy per class, parameter `fc` (D, C)."""
    _empty_batch_value = 0.0  # no rows, no pairs: a zero loss, as ProxyAnchor's in PML

    def __init__(self, num_classes, embedding_size, m=0.25, gamma=256.0, backend="auto"):
        super().__init__()
        _check_sizes(num_classes=num_classes, embedding_size=embedding_size)
        V.check_real("m", m)
        V.check_positive("gamma", gamma)
        self.num_classes, self.embedding_size, self.m, self.gamma = num_classes, embedding_size, m, gamma
        self._init_class((embedding_size, num_classes), backend, {}, ())

    def _call(self, embeddings, labels, fc):
        return proxy_circle_loss(embeddings, labels, fc, m=self.m, gamma=self.gamma, backend=self.backend)

    def _logits(self, embeddings):
        """The cosine of every row with every proxy (N x C)."""
        return normalize(embeddings) @ F.normalize(self.cast_weights(embeddings), dim=0)

    def extra_repr(self):
        return (f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, m={self.m}, "
                f"gamma={self.gamma}, backend={self.backend!r}")


ENTRIES = (
    LossEntry(ProxyCircleLoss, "class", functional=proxy_circle_loss, reference=proxy_circle_reference,
              hyper=("m", "gamma"), weight_layout="columns", in_pml=False),
)
