"""Functional API (docs/api.md): one function per loss, `<name>_loss(embeddings, labels, ...,
backend="auto")`: validate, pick the backend, run the loss.

backend="reference" runs the loss's reference (materializes N x M); "cpu", "triton", "cuda" run the
fused engines; "auto" picks the fastest fused backend for the tensors' device, else the reference.
Each function is defined in its loss's module (fused_pairloss/losses/<loss>.py); this namespace
holds every one of the loss table, and open_clip's image-text losses `clip_loss` and `siglip_loss`
(their own signature: image_features, text_features, logit_scale, logit_bias).
"""
from .losses import REGISTRY
from .losses.clip import clip_loss
from .losses.siglip import siglip_loss

globals().update({entry.functional_name: entry.functional for entry in REGISTRY.values()})

__all__ = [entry.functional_name for entry in REGISTRY.values()] + ["clip_loss", "siglip_loss"]
