"""Input checks shared by every public entry point. Each error names the argument and what was
expected. Value checks that need a device sync (label ranges) are skipped while torch.compile
traces, so a compiled loss has no graph break, and on meta tensors, which hold no values."""
from __future__ import annotations

import math
import numbers
import warnings

import torch


def _compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - old torch
        return False


def check_embeddings(x, name="embeddings"):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (N, D); got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float32/float64/float16/bfloat16); "
                        f"got dtype {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D of shape (N, D); got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must have N >= 1 rows and D >= 1 columns; got shape {tuple(x.shape)}")


def check_labels(labels, n, name="labels", emb_name="embeddings"):
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a 1-D integer torch.Tensor of length {n}; got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor; got dtype {labels.dtype}")
    if labels.dim() != 1:
        raise ValueError(f"{name} must be 1-D of length {n} (one label per row of {emb_name}); "
                         f"got shape {tuple(labels.shape)}")
    if labels.shape[0] != n:
        raise ValueError(f"{name} must have length {n} (rows of {emb_name}); got length {labels.shape[0]}")


def check_pair_inputs(embeddings, labels, ref_emb, ref_labels):
    check_embeddings(embeddings)
    if labels is None:
        raise ValueError("labels is required (a 1-D integer tensor of length N)")
    check_labels(labels, embeddings.shape[0])
    if ref_emb is None and ref_labels is not None:
        raise ValueError("ref_labels was given without ref_emb; pass both or neither")
    if ref_emb is not None:
        check_embeddings(ref_emb, "ref_emb")
        if ref_labels is None:
            raise ValueError("ref_emb was given without ref_labels; pass both or neither")
        if ref_emb.shape[1] != embeddings.shape[1]:
            raise ValueError(
                f"ref_emb must have the embedding width D={embeddings.shape[1]} of embeddings; "
                f"got shape {tuple(ref_emb.shape)}")
        if ref_emb.dtype != embeddings.dtype:
            raise TypeError(f"ref_emb must have the dtype of embeddings ({embeddings.dtype}); got {ref_emb.dtype}")
        if ref_emb.device != embeddings.device:
            raise ValueError(f"ref_emb must be on the device of embeddings ({embeddings.device}); got {ref_emb.device}")
        check_labels(ref_labels, ref_emb.shape[0], "ref_labels", "ref_emb")
        if ref_labels is labels and ref_emb.shape[0] != embeddings.shape[0]:
            raise ValueError("ref_labels is labels, so ref_emb must have as many rows as embeddings")


def check_positive(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {type(value).__name__}")
    if not value > 0:
        raise ValueError(f"{name} must be > 0; got {value}")


def check_real(name, value, allow_none=False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        what = "a real number or None" if allow_none else "a real number"
        raise TypeError(f"{name} must be {what}; got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite; got {value}")


DISTANCES = ("cosine", "lp")


def check_distance(distance, allowed=DISTANCES):
    """distance: "cosine" (PML CosineSimilarity()) or "lp" (PML LpDistance() with its defaults)."""
    if distance not in allowed:
        raise ValueError(f"distance must be one of {list(allowed)} (PML CosineSimilarity() / LpDistance() with "
                         f"its defaults are fused); got {distance!r}")


def check_margins_ordered(pos_margin, neg_margin, distance):
    """A distance pulls positives below pos_margin and pushes negatives above neg_margin, a
    similarity the other way round: margins in the other order make every pair a violation. PML
    accepts them (its ContrastiveLoss with CosineSimilarity() and the default margins is such a
    case), so this is a warning, not an error."""
    if distance == "lp" and pos_margin > neg_margin:
        why = f"pos_margin={pos_margin} > neg_margin={neg_margin} for a distance (lp)"
    elif distance == "cosine" and pos_margin < neg_margin:
        why = f"pos_margin={pos_margin} < neg_margin={neg_margin} for a similarity (cosine)"
    else:
        return
    if why not in _warned_margins:  # once per setting: the functional forms check on every call
        _warned_margins.add(why)
        warnings.warn(f"fused_pairloss: {why}: every pair violates its margin (the loss is degenerate; PML "
                      "computes it the same way)", stacklevel=4)


_warned_margins = set()


def check_centers(embeddings, labels, centers, centers_per_class, name="centers", classes_first=False,
                  k_name="centers_per_class"):
    """centers: (D, C*K) like PML's fc and W, or (C, D) like PML's ProxyAnchor proxies
    (classes_first); labels in [0, C); K given as the user's argument `k_name`."""
    check_embeddings(embeddings)
    if labels is None:
        raise ValueError("labels is required (a 1-D integer tensor of length N)")
    check_labels(labels, embeddings.shape[0])
    if (isinstance(centers_per_class, bool) or not isinstance(centers_per_class, numbers.Integral)
            or centers_per_class < 1):
        raise ValueError(f"{k_name} must be an int >= 1; got {centers_per_class!r}")
    if not isinstance(centers, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (D, C*K); got {type(centers).__name__}")
    if not centers.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor; got dtype {centers.dtype}")
    d_axis, c_axis = (1, 0) if classes_first else (0, 1)
    if centers.dim() != 2 or centers.shape[d_axis] != embeddings.shape[1]:
        layout = f"(C, D={embeddings.shape[1]})" if classes_first else f"(D={embeddings.shape[1]}, C*K)"
        raise ValueError(f"{name} must be 2-D of shape {layout} (PML's layout); got shape {tuple(centers.shape)}")
    if centers.shape[c_axis] == 0 or centers.shape[c_axis] % centers_per_class != 0:
        raise ValueError(f"{name}'s class axis must have a positive multiple of {k_name}="
                         f"{centers_per_class} entries; got {centers.shape[c_axis]}")
    if centers.dtype != embeddings.dtype:
        raise TypeError(f"{name} must have the dtype of embeddings ({embeddings.dtype}); got {centers.dtype}")
    if centers.device != embeddings.device:
        raise ValueError(f"{name} must be on the device of embeddings ({embeddings.device}); got {centers.device}")
    num_classes = centers.shape[c_axis] // centers_per_class
    if not _compiling() and labels.numel() > 0 and labels.device.type != "meta":  # meta: no values
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"labels must lie in [0, {num_classes}) (num_classes); got values in [{lo}, {hi}]")
    return num_classes
