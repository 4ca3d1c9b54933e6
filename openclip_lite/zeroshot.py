"""Zero-shot classification: CLIP's prompt recipe, one call."""

import os
import string
from collections.abc import Iterable
from typing import Callable, Optional, Union

import torch
from PIL import Image
from torch import Tensor

from .errors import InputError, TextTypeError
from .imagenet import IMAGENET_CLASSES, IMAGENET_TEMPLATES
from .search import encode_texts
from .transform import open_image

__all__ = ["DEFAULT_TEMPLATES", "IMAGENET_CLASSES", "IMAGENET_TEMPLATES", "zero_shot_classifier", "classify", "top_k"]

DEFAULT_TEMPLATES = ("a photo of a {}.",)

SingleImage = Union[str, "os.PathLike[str]", Image.Image]
ImageInput = Union[Tensor, SingleImage, Iterable[SingleImage]]


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, not {batch_size}")


def _as_str_list(values: Iterable[str], what: str) -> list[str]:
    """`values` as a list of str; a list rather than the iterable given, so a generator is read only once."""
    # a str is an iterable of one-letter strings: classifying into "d", "o", "g" is never what was meant
    if isinstance(values, str) or not isinstance(values, Iterable):
        raise TextTypeError(f"{what} must be a list of strings, got a single {type(values).__name__}")
    values = list(values)
    for value in values:
        if not isinstance(value, str):
            raise TextTypeError(f"{what} must be strings, got {value!r} ({type(value).__name__})")
    return values


def _check_template(template: str) -> None:
    """Raise ValueError unless `template.format(name)` puts `name` in exactly one place and nothing else changes."""
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template) if name is not None]
    except ValueError:  # a lone "{" or "}"
        fields = None
    # one bare {}: no field would give every class the same prompt, "{0}"/"{:>9}"/"{!r}" are not the recipe
    if fields != [("", "", None)]:
        raise InputError(
            f"template {template!r} needs exactly one {{}} where the class name goes and no other {{...}} field; "
            "write {{ or }} for a literal brace"
        )


@torch.no_grad()
def zero_shot_classifier(
    model: torch.nn.Module,
    classnames: Iterable[str],
    templates: Iterable[str] = DEFAULT_TEMPLATES,
    batch_size: int = 256,
    truncate: bool = False,
) -> Tensor:
    """The zero-shot weights, shape = (embed_dim, num_classes), float32, on the model's device.

    For each class every template is filled with the class name and encoded; the features are L2-normalised,
    averaged and normalised again (the prompt ensembling of the CLIP paper).

    classnames, templates : lists (any iterables) of str, at least one each; a template has one {} for the name
    batch_size : prompts per forward pass; the weights do not depend on it
    truncate : cut prompts longer than the model's context length instead of raising TextTooLongError
    """
    classnames = _as_str_list(classnames, "class names")
    templates = _as_str_list(templates, "templates")
    if not classnames:
        raise InputError("zero-shot classification needs at least one class name")
    if not templates:
        raise InputError("zero-shot classification needs at least one template; leave templates out for the default")
    for template in templates:
        _check_template(template)
    _check_batch_size(batch_size)
    texts = [template.format(name) for name in classnames for template in templates]
    features = encode_texts(model, texts, batch_size=batch_size, truncate=truncate)  # tokenized to the model's context
    features = features.view(len(classnames), len(templates), -1).mean(dim=1)
    return (features / features.norm(dim=-1, keepdim=True)).t().contiguous()


@torch.no_grad()
def image_features(model: torch.nn.Module, preprocess: Callable, images: ImageInput, batch_size: int = 64) -> Tensor:
    """L2-normalised image features, shape = (num_images, embed_dim), float32.

    images : a preprocessed batch (num_images, 3, res, res); or one PIL image or file path (str or os.PathLike),
        or a list (any iterable) of them
    """
    _check_batch_size(batch_size)
    device = _device(model)
    if isinstance(images, Tensor):
        batches = [images[start : start + batch_size] for start in range(0, len(images), batch_size)]
    else:
        if isinstance(images, (str, os.PathLike, Image.Image)):
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
    labels: Iterable[str],
    templates: Optional[Iterable[str]] = None,
    batch_size: int = 64,
    truncate: bool = False,
) -> Tensor:
    """Zero-shot class probabilities, shape = (num_images, num_labels), float32, rows summing to 1.

    softmax(logit_scale.exp() * normalised image features @ zero_shot_classifier(labels, templates)), where
    templates None means "a photo of a {}." (an empty list raises, as in `zero_shot_classifier`). `images` as in
    `image_features`, `batch_size` images per forward pass; `truncate` as in `zero_shot_classifier`.
    """
    _check_batch_size(batch_size)  # before the text tower runs
    classifier = zero_shot_classifier(model, labels, DEFAULT_TEMPLATES if templates is None else templates, truncate=truncate)
    logits = model.logit_scale.exp().float() * image_features(model, preprocess, images, batch_size) @ classifier
    return logits.softmax(dim=-1)


def top_k(probs: Tensor, labels: Iterable[str], k: int = 5) -> list[list[tuple[str, float]]]:
    """For each row of `probs`, the k most likely (label, probability) pairs, best first.

    probs : shape = (num_images, num_labels), as `classify` returns; a 1-D (num_labels,) is one row, so the answer
        is then a list of one list
    labels : the name of each column, in order (exactly num_labels of them)
    k : at least 1; a row has min(k, num_labels) pairs
    """
    labels = _as_str_list(labels, "labels")
    if probs.dim() == 1:
        probs = probs.unsqueeze(0)
    if probs.dim() != 2:
        raise InputError(f"probs must have shape (num_images, num_labels), got {tuple(probs.shape)}")
    if probs.shape[1] != len(labels):
        raise InputError(f"probs has {probs.shape[1]} columns but {len(labels)} labels were given; give one label per column, in order")
    if k < 1:
        raise InputError(f"k must be at least 1, not {k}")
    values, indices = probs.topk(min(k, probs.shape[1]), dim=-1)
    return [[(labels[i], float(v)) for v, i in zip(row_values, row_indices)] for row_values, row_indices in zip(values.tolist(), indices.tolist())]
