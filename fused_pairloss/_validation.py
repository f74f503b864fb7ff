"""Input checks shared by every public entry point. Each error names the argument and what was
expected. Value checks that need a device sync (label ranges) are skipped while torch.compile
traces, so a compiled loss has no graph break, and on meta tensors, which hold no values."""
from __future__ import annotations

import math
import numbers
import os
import sys
import warnings

import torch


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def user_stacklevel():
    """warnings.warn's stacklevel, for a warning raised in this package, that points at the first
    frame outside fused_pairloss, torch and pytorch_metric_learning: the user's line, however many
    of our and torch's (Module.__call__) frames lie between."""
    skip = [_PACKAGE_DIR, os.path.dirname(os.path.abspath(torch.__file__)) + os.sep]
    pml = sys.modules.get("pytorch_metric_learning")
    if pml is not None and getattr(pml, "__file__", None):
        skip.append(os.path.dirname(os.path.abspath(pml.__file__)) + os.sep)
    frame, level = sys._getframe(1), 1  # level 1: the function that calls warnings.warn
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(tuple(skip)):
        frame, level = frame.f_back, level + 1
    return level


def _compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - old torch
        return False


def check_embeddings(x, name="embeddings", allow_empty=False):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (N, D); got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float32/float64/float16/bfloat16); "
                        f"got dtype {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D of shape (N, D); got shape {tuple(x.shape)}")
    if (x.shape[0] == 0 and not allow_empty) or x.shape[1] == 0:
        raise ValueError(f"{name} must have N >= 1 rows and D >= 1 columns; got shape {tuple(x.shape)}")


_WIDE_UNSIGNED = tuple(getattr(torch, name) for name in ("uint16", "uint32", "uint64") if hasattr(torch, name))


def check_labels(labels, n, name="labels", emb_name="embeddings", device=None):
    """`device`: the device of the rows the labels belong to (the functional forms do not move them;
    the modules move them first, as PML's c_f.to_device)."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a 1-D integer torch.Tensor of length {n}; got {type(labels).__name__}")
    if device is not None and labels.device != device:
        raise ValueError(f"{name} must be on the device of {emb_name} ({device}); got {labels.device}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor; got dtype {labels.dtype}")
    if labels.dim() != 1:
        raise ValueError(f"{name} must be 1-D of length {n} (one label per row of {emb_name}); "
                         f"got shape {tuple(labels.shape)}")
    if labels.shape[0] != n:
        raise ValueError(f"{name} must have length {n} (rows of {emb_name}); got length {labels.shape[0]}")


def _needs_ids(labels):
    return isinstance(labels, torch.Tensor) and (labels.is_floating_point() or labels.dtype == torch.bool)


def label_ids(labels, ref_labels=None):
    """PML compares labels with == only, so it takes float and bool labels too: such labels (either
    argument) become int64 ids, equal exactly where the labels are equal (ops/_common.label_ids over
    both together); `ref_labels is labels` stays true. Integer labels pass unchanged. A NaN label, which
    equals nothing (not even itself, unlike any id), is a ValueError naming its argument."""
    if not (_needs_ids(labels) or _needs_ids(ref_labels)):
        return labels, ref_labels
    same = ref_labels is labels
    given = [(name, x) for name, x in (("labels", labels), ("ref_labels", None if same else ref_labels))
             if isinstance(x, torch.Tensor)]
    for name, x in given:
        if x.is_complex():
            return labels, ref_labels  # check_labels names it
        if x.is_floating_point() and not _compiling() and x.device.type != "meta" and bool(torch.isnan(x).any()):
            raise ValueError(f"{name} must not contain NaN (PML compares labels with ==, and NaN equals no label)")
    from .ops._common import label_ids as dense_label_ids  # the engines' own ids (sorted runs)
    dtype = given[0][1].dtype
    for _, x in given[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    dtype = torch.int64 if dtype == torch.bool else dtype
    ids = dense_label_ids(torch.cat([x.reshape(-1).to(dtype) for _, x in given]))
    out, start = {}, 0
    for name, x in given:
        out[name] = ids[start:start + x.numel()].reshape(x.shape)
        start += x.numel()
    ids_labels = out.get("labels", labels)
    return ids_labels, (ids_labels if same else out.get("ref_labels", ref_labels))


def integral_labels(labels, name="labels"):
    """Float and bool labels as int64 for the wrappers (CrossBatchMemory keeps labels across steps,
    DistributedLossWrapper across ranks, where per-call ids (label_ids) would not agree): bool as
    0 / 1, a float label that is a whole number as that number; any other float is a ValueError
    naming the argument. Other labels pass unchanged."""
    if not _needs_ids(labels):
        return labels
    if labels.is_floating_point() and not _compiling() and labels.device.type != "meta":
        whole = torch.isfinite(labels) & (labels == torch.round(labels)) & (labels.abs() < 2.0 ** 62)
        if not bool(whole.all()):
            raise ValueError(f"{name}: float labels must be whole numbers below 2^62 in magnitude here (kept as "
                             "int64 across steps / ranks); got a value that is not")
    return labels.to(torch.int64)


def int64_like(labels):
    """Float / bool labels cast to int64 without a check (the dtype that integral_labels gives), for
    a rank that reports its own error while the others compare dtypes; anything else unchanged."""
    return labels.to(torch.int64) if _needs_ids(labels) else labels


def check_pair_inputs(embeddings, labels, ref_emb, ref_labels):
    check_embeddings(embeddings)
    if labels is None:
        raise ValueError("labels is required (a 1-D integer tensor of length N)")
    check_labels(labels, embeddings.shape[0], device=embeddings.device)
    if ref_emb is None and ref_labels is not None:
        raise ValueError("ref_labels was given without ref_emb; pass both or neither")
    if ref_emb is not None:
        check_embeddings(ref_emb, "ref_emb")
        if ref_labels is None:
            raise ValueError("ref_emb was given without ref_labels: the functional forms need ref_labels (the "
                             "modules take the labels for ref_emb's rows too, as PML, where ref_emb has as many "
                             "rows as embeddings)")
        if ref_emb.shape[1] != embeddings.shape[1]:
            raise ValueError(
                f"ref_emb must have the embedding width D={embeddings.shape[1]} of embeddings; "
                f"got shape {tuple(ref_emb.shape)}")
        if ref_emb.dtype != embeddings.dtype:
            raise TypeError(f"ref_emb must have the dtype of embeddings ({embeddings.dtype}); got {ref_emb.dtype}")
        if ref_emb.device != embeddings.device:
            raise ValueError(f"ref_emb must be on the device of embeddings ({embeddings.device}); got {ref_emb.device}")
        check_labels(ref_labels, ref_emb.shape[0], "ref_labels", "ref_emb", device=ref_emb.device)
        if ref_labels is labels and ref_emb.shape[0] != embeddings.shape[0]:
            raise ValueError("ref_labels is labels, so ref_emb must have as many rows as embeddings")


_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8)


def index_tensors(indices_tuple, device):
    """An indices_tuple whose entries are Python lists or numpy arrays of indices (PML's losses index
    with them too) as tensors on `device` (an empty one int64), and whose index tensors made under
    torch.inference_mode, used outside it, as copies (autograd cannot save an inference tensor for
    the backward of a gather), and index tensors on another device moved to `device` (PML's losses
    index a CUDA matrix with CPU indices too); anything else as given, for check_indices_tuple to
    judge."""
    def listed(t):
        return isinstance(t, (list, tuple)) or (hasattr(t, "__array__") and not isinstance(t, torch.Tensor))
    if not isinstance(indices_tuple, (tuple, list)):
        return indices_tuple
    if not torch.is_inference_mode_enabled() and any(
            isinstance(t, torch.Tensor) and t.is_inference() for t in indices_tuple):
        copies = [t.clone() if isinstance(t, torch.Tensor) and t.is_inference() else t for t in indices_tuple]
        # a miner's result (fused_pairloss._miners._Mined) keeps what it says about its mining
        indices_tuple = indices_tuple.with_indices(copies) if hasattr(indices_tuple, "with_indices") else tuple(copies)
    device = torch.device(device)
    if any(isinstance(t, torch.Tensor) and t.device != device and "meta" not in (t.device.type, device.type)
           for t in indices_tuple):
        moved = [t.to(device) if isinstance(t, torch.Tensor) and t.device.type != "meta" else t
                 for t in indices_tuple]
        indices_tuple = indices_tuple.with_indices(moved) if hasattr(indices_tuple, "with_indices") else tuple(moved)
    if not any(listed(t) for t in indices_tuple):
        return indices_tuple
    out = []
    for t in indices_tuple:
        if listed(t):
            t = torch.as_tensor(t, device=device)
            t = t.long() if t.numel() == 0 else t
        out.append(t)
    return tuple(out)


def check_indices_tuple(indices_tuple, n_rows, n_cols):
    """A miner's output as PML's losses index with it: a tuple (or list) of 3 (a, p, n) or 4 (a1, p,
    a2, n) 1-D integer tensors (empty ones of any dtype, as PML builds for float labels), each
    anchor with its partner (a, p, n of one length; a1 with p, a2 with n); anchors in [0, n_rows)
    (the embeddings' rows), partners in [0, n_cols) (the ref's rows; None: not checked here).
    TypeError / ValueError naming indices_tuple. Returns the tuple, its empty tensors of another
    dtype as int64 ones."""
    if not isinstance(indices_tuple, (tuple, list)):
        raise TypeError("indices_tuple must be a tuple of 3 (a, p, n) or 4 (a1, p, a2, n) index tensors (a "
                        f"miner's output); got {type(indices_tuple).__name__}")
    if len(indices_tuple) not in (3, 4):
        raise ValueError("indices_tuple must be a tuple of 3 (a, p, n) or 4 (a1, p, a2, n) index tensors; got "
                         f"{len(indices_tuple)} entries")
    for k, t in enumerate(indices_tuple):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"indices_tuple[{k}] must be a tensor of indices; got {type(t).__name__}")
        if t.numel() and t.dtype not in _INDEX_DTYPES:  # uint8 and bool index tensors are masks to torch
            raise TypeError(f"indices_tuple[{k}] must hold integer indices (int64, int32, int16 or int8); "
                            f"got {t.dtype}")
        if t.dim() != 1:
            raise ValueError(f"indices_tuple[{k}] must be 1-D; got shape {tuple(t.shape)}")
    a1, p, a2, n = indices_tuple if len(indices_tuple) == 4 else (indices_tuple[0], indices_tuple[1],
                                                                     indices_tuple[0], indices_tuple[2])
    _check_index_ranges((a1, p, a2, n), n_rows, n_cols)
    if any(t.dtype not in _INDEX_DTYPES for t in indices_tuple):  # empty ones
        return tuple(t if t.dtype in _INDEX_DTYPES else t.long() for t in indices_tuple)
    return indices_tuple


def _check_index_ranges(pairs, n_rows, n_cols):
    """(a1, p, a2, n) of equal lengths pairwise, against the rows of embeddings (n_rows) and of the
    ref (n_cols; None: unchecked): ValueError naming indices_tuple (a tuple mined on another batch,
    say). The ranges need a sync: skipped while torch.compile traces and on meta tensors."""
    a1, p, a2, n = pairs
    if len(a1) != len(p) or len(a2) != len(n):
        raise ValueError(f"indices_tuple: anchors and their partners must pair up; got lengths "
                         f"{len(a1)}, {len(p)}, {len(a2)}, {len(n)}")
    if _compiling():
        return
    for name, t, bound in (("anchor", a1, n_rows), ("positive", p, n_cols), ("anchor", a2, n_rows),
                           ("negative", n, n_cols)):
        if bound is not None and t.numel() and t.device.type != "meta" and (int(t.min()) < 0 or int(t.max()) >= bound):
            raise ValueError(f"indices_tuple: {name} indices must lie in [0, {bound}) (the rows of "
                             f"{'embeddings' if name == 'anchor' else 'ref_emb (or embeddings)'}); got "
                             f"[{int(t.min())}, {int(t.max())}]: was it mined on another batch?")


def check_positive(name, value):
    """A finite real number > 0 (temperatures, scales, alphas). While torch.compile traces: a real
    number > 0 (a traced symbol compares, but math.isfinite cannot take it)."""
    check_real(name, value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {type(value).__name__}")
    if not value > 0:
        raise ValueError(f"{name} must be > 0; got {value}")


def check_real(name, value, allow_none=False):
    if value is None and allow_none:
        return
    if _compiling():
        # torch.compile traces a float that changed between calls (or with dynamic=True) as a
        # symbol, which math.isfinite cannot take; the engines' declarations specialize it
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


def check_margins_ordered(pos_margin, neg_margin, distance, loss, functional=None):
    """A distance pulls positives below pos_margin and pushes negatives above neg_margin, a
    similarity the other way round. Margins in the other order are most likely the defaults meant
    for the other kind (ContrastiveLoss with CosineSimilarity() and its default margins 0 and 1,
    where no negative ever counts). PML computes the loss as given, so this is a warning, once per
    loss and setting, pointing at the user's line (a module's, at its construction, stands for its
    `functional` form's, which its calls run)."""
    if distance == "lp" and pos_margin > neg_margin:
        why = f"pos_margin={pos_margin} > neg_margin={neg_margin} for a distance (LpDistance)"
    elif distance == "cosine" and pos_margin < neg_margin:
        why = f"pos_margin={pos_margin} < neg_margin={neg_margin} for a similarity (CosineSimilarity)"
    else:
        return
    if _compiling():  # (a warning cannot be traced; an eager call or the construction gives it)
        return
    if (loss, why) not in _warned_margins:  # once: the functional forms check on every call
        _warned_margins.add((loss, why))
        warnings.warn(f"fused_pairloss: {loss}: {why}: the margins are in the order meant for the other kind of "
                      "distance (PML computes the loss as given; so does fused_pairloss)",
                      stacklevel=user_stacklevel())
    if functional is not None:
        _warned_margins.add((functional, why))


_warned_margins = set()


def check_centers(embeddings, labels, centers, centers_per_class, name="centers", classes_first=False,
                  k_name="centers_per_class"):
    """centers: (D, C*K) like PML's fc and W, or (C, D) like PML's ProxyAnchor proxies
    (classes_first); labels in [0, C); K given as the user's argument `k_name`."""
    check_embeddings(embeddings)
    if labels is None:
        raise ValueError("labels is required (a 1-D integer tensor of length N)")
    check_labels(labels, embeddings.shape[0], device=embeddings.device)
    if labels.dtype in _WIDE_UNSIGNED:  # (torch indexes with none of them)
        raise TypeError(f"labels must be a signed integer tensor (or uint8) of class indices; got {labels.dtype}")
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
