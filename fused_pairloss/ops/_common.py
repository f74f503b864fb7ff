"""Small pieces shared by the loss plug-ins."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def normalize(x):
    return F.normalize(x, p=2, dim=1)  # eps 1e-12 (SPEC §2), in the input dtype as PML


def zero_loss(embeddings):
    """PML's zero loss: 0 attached to the graph (NaN if the embeddings are NaN)."""
    return torch.sum(embeddings * 0)


def pair_operands(embeddings, labels, ref_emb, ref_labels):
    """(q, r, labels_r, exclude_diag): r None means self mode (S symmetric). PML's identity rule:
    self pairs are excluded iff ref_emb is None or `ref_labels is labels`."""
    if ref_emb is None or (ref_emb is embeddings and ref_labels is labels):
        return normalize(embeddings), None, None, True
    return normalize(embeddings), normalize(ref_emb), ref_labels, ref_labels is labels


def too_few_pairs(count_pos, count_neg):
    """PML GenericPairLoss quirk: <= 1 positive and <= 1 negative pair in the whole batch."""
    return (count_pos.sum() <= 1) & (count_neg.sum() <= 1)
