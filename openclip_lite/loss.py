"""The contrastive loss CLIP was trained with, for users who fine-tune."""

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import InputError


def contrastive_loss(logits_per_image: Tensor) -> Tensor:
    """Symmetric cross-entropy over the (n, n) logits matrix, where the i-th image belongs with the i-th text.

    logits_per_image : shape = (n, n), as returned by `CLIP.forward`
    returns the mean of the image->text and text->image cross-entropies, a scalar
    """
    if logits_per_image.ndim != 2 or logits_per_image.shape[0] != logits_per_image.shape[1]:
        raise InputError(f"contrastive_loss needs a square (n, n) logits matrix, got shape {tuple(logits_per_image.shape)}")
    labels = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_image.t(), labels)) / 2
