"""Zero-shot classification: CLIP's prompt recipe, one call."""

from collections.abc import Sequence
from typing import Callable, Optional, Union

import torch
from PIL import Image
from torch import Tensor

from .imagenet import IMAGENET_CLASSES, IMAGENET_TEMPLATES
from .tokenizer import tokenize
from .transform import open_image

__all__ = ["DEFAULT_TEMPLATES", "IMAGENET_CLASSES", "IMAGENET_TEMPLATES", "zero_shot_classifier", "classify", "top_k"]

DEFAULT_TEMPLATES = ("a photo of a {}.",)

ImageInput = Union[Tensor, Sequence[Union[str, Image.Image]]]


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def zero_shot_classifier(
    model: torch.nn.Module, classnames: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES, batch_size: int = 256
) -> Tensor:
    """The zero-shot weights, shape = (embed_dim, num_classes), float32, on the model's device.

    For each class every template is filled with the class name and encoded; the features are L2-normalised,
    averaged and normalised again (the prompt ensembling of the CLIP paper).
    """
    if isinstance(classnames, str) or isinstance(templates, str):
        raise TypeError("classnames and templates must be lists of strings, not a single string")
    if not classnames or not templates:
        raise ValueError("zero-shot classification needs at least one class name and one template")
    for name in classnames:
        if not isinstance(name, str):
            raise TypeError(f"class names must be strings, got {name!r} ({type(name).__name__})")
    for template in templates:
        # exactly one empty slot: a template without one would give every class the same prompt
        if not isinstance(template, str) or template.count("{}") != 1 or template.replace("{}", "").count("{") != template.replace("{}", "").count("{{"):
            raise ValueError(f"a template must be a string with one {{}} where the class name goes, got {template!r}")
    texts = [template.format(name) for name in classnames for template in templates]
    features = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenize(texts[start : start + batch_size]).to(_device(model))
        f = model.encode_text(tokens).float()
        features.append(f / f.norm(dim=-1, keepdim=True))
    features = torch.cat(features).view(len(classnames), len(templates), -1).mean(dim=1)
    return (features / features.norm(dim=-1, keepdim=True)).t().contiguous()


@torch.no_grad()
def image_features(model: torch.nn.Module, preprocess: Callable, images: ImageInput, batch_size: int = 64) -> Tensor:
    """L2-normalised image features, shape = (num_images, embed_dim), float32.

    images : a preprocessed batch (num_images, 3, res, res), or a list of PIL images and/or file paths
    """
    device = _device(model)
    if isinstance(images, Tensor):
        batches = [images[start : start + batch_size] for start in range(0, len(images), batch_size)]
    else:
        if isinstance(images, (str, Image.Image)):
            images = [images]
        loaded = [open_image(image) if not isinstance(image, Image.Image) else image for image in images]
        batches = [torch.stack([preprocess(image) for image in loaded[start : start + batch_size]]) for start in range(0, len(loaded), batch_size)]
    features = [model.encode_image(batch.to(device)).float() for batch in batches]
    features = torch.cat(features) if features else torch.empty(0, model.visual.output_dim, device=device)
    return features / features.norm(dim=-1, keepdim=True)


@torch.no_grad()
def classify(
    model: torch.nn.Module,
    preprocess: Callable,
    images: ImageInput,
    labels: Sequence[str],
    templates: Optional[Sequence[str]] = None,
    batch_size: int = 64,
) -> Tensor:
    """Zero-shot class probabilities, shape = (num_images, num_labels), float32, rows summing to 1.

    softmax(logit_scale.exp() * normalised image features @ zero_shot_classifier(labels, templates)), where
    templates default to "a photo of a {}.". `images` as in `image_features`.
    """
    classifier = zero_shot_classifier(model, labels, templates or DEFAULT_TEMPLATES)
    logits = model.logit_scale.exp().float() * image_features(model, preprocess, images, batch_size) @ classifier
    return logits.softmax(dim=-1)


def top_k(probs: Tensor, labels: Sequence[str], k: int = 5) -> list[list[tuple[str, float]]]:
    """For each row of `probs` (num_images, num_labels), the k most likely (label, probability) pairs, best first."""
    values, indices = probs.topk(min(k, probs.shape[-1]), dim=-1)
    return [[(labels[i], float(v)) for v, i in zip(row_values, row_indices)] for row_values, row_indices in zip(values.tolist(), indices.tolist())]
