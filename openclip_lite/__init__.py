"""openclip-lite: OpenAI's CLIP models in pure PyTorch, with OpenAI's API (`import openclip_lite as clip`)."""

import os
import warnings
from typing import Callable, Optional, Union

import torch

from .errors import (
    CheckpointError,
    ChecksumError,
    DeviceError,
    DownloadError,
    EmbedError,
    ExportError,
    ImageError,
    IndexFileError,
    InputError,
    MilvusIndexError,
    MilvusLockedError,
    MissingDependencyError,
    OpenCLIPLiteError,
    ShardError,
    TextTooLongError,
    TextTypeError,
    UnknownModelError,
    UnsafeCheckpointError,
)
from .index import build_index, load_index
from .loss import contrastive_loss
from .model import CLIP, build_model, convert_weights, resize_image_embeddings
from .pretrained import available_models
from .search import encode_images, encode_texts, search
from .tokenizer import SimpleTokenizer, tokenize
from .transform import preprocess as _transform
from .version import __version__
from .zeroshot import DEFAULT_TEMPLATES, IMAGENET_CLASSES, IMAGENET_TEMPLATES, classify, image_features, top_k, zero_shot_classifier

__all__ = [
    "available_models",
    "load",
    "tokenize",
    "build_model",
    "CLIP",
    "SimpleTokenizer",
    "zero_shot_classifier",
    "classify",
    "image_features",
    "top_k",
    "encode_images",
    "encode_texts",
    "search",
    "build_index",
    "load_index",
    "contrastive_loss",
    "DEFAULT_TEMPLATES",
    "IMAGENET_CLASSES",
    "IMAGENET_TEMPLATES",
    "__version__",
    "OpenCLIPLiteError",
    "UnknownModelError",
    "TextTooLongError",
    "TextTypeError",
    "CheckpointError",
    "UnsafeCheckpointError",
    "DownloadError",
    "ChecksumError",
    "DeviceError",
    "ImageError",
    "InputError",
    "IndexFileError",
    "ShardError",
    "EmbedError",
    "MilvusIndexError",
    "MilvusLockedError",
    "ExportError",
    "MissingDependencyError",
]


def load(
    name: "str | os.PathLike",
    device: Union[str, torch.device, None] = None,
    jit: bool = False,
    download_root: Optional[str] = None,
    source: Optional[str] = None,
    dtype: Optional[torch.dtype] = None,
    image_size: Optional[int] = None,
) -> tuple[CLIP, Callable]:
    """Load a CLIP model and the preprocessing that goes with it.

    name : one of `available_models()` (downloaded, verified and cached) or the path of a checkpoint file
        (OpenAI's TorchScript archives, torch state dicts, safetensors; nothing in the file is executed; `~` is
        expanded)
    device : None picks CUDA when available, then MPS, else the CPU
    jit : accepted for compatibility with OpenAI's `clip.load`; TorchScript breaks on current PyTorch, so the
        regular model is returned (with a warning), which is as fast: see `benchmarks/`
    download_root : the cache directory; by default Hugging Face's cache (hub) or ~/.cache/clip (openai)
    source : "hub" (default, or env OPENCLIP_LITE_SOURCE) or "openai" (OpenAI's original URLs)
    dtype : the weights' dtype; by default fp16 on CUDA (as OpenAI's `load`) and fp32 elsewhere
    image_size : another input size (a multiple of the patch size, or of 32 for ResNets): the image position
        embeddings are resampled (`model.resize_image_embeddings`) and `preprocess` is for that size

    Returns (model in eval mode, preprocess: PIL image -> tensor (3, res, res)).
    """
    device = _resolve_device(device)
    if dtype is not None and dtype not in _DTYPES:
        raise InputError(f"dtype must be one of {', '.join(map(str, _DTYPES))} (or None for the device's default), got {dtype!r}")
    if source is not None:  # a bad source is a bad argument for a checkpoint file too, not only for a name
        from .download import resolve_source

        resolve_source(source)
    if jit:
        warnings.warn("jit=True is not supported (TorchScript breaks on current PyTorch); returning the regular model", stacklevel=2)
    name = os.fspath(name)
    if name not in available_models() and os.path.isfile(os.path.expanduser(name)):  # a name first, as OpenAI's: a stray file "RN50" does not hide it
        path = os.path.expanduser(name)
    else:
        from .download import download

        path = download(name, root=download_root, source=source)  # a name that is neither (a folder, no file): UnknownModelError

    from .checkpoint import load_state_dict, not_a_clip_checkpoint

    state_dict = load_state_dict(path)
    try:
        if image_size is not None:
            state_dict = resize_image_embeddings(state_dict, image_size)
        model = build_model(state_dict, copy=False)  # the tensors read from the file are this model's alone
    except CheckpointError as e:  # build_model sees only the tensors: the error names the file here
        raise not_a_clip_checkpoint(path, state_dict, e) from e
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    if dtype != torch.float32:
        convert_weights(model, dtype)
    model = model.to(device)
    return model, _transform(model.visual.input_resolution)


# the dtypes CLIP's weights are cast to (`convert_weights`: LayerNorm and BatchNorm stay fp32 and compute in fp32)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    """The torch.device to load onto, or DeviceError saying why `device` cannot be used here."""
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise DeviceError(f"unknown device {device!r}; use 'cpu', 'cuda', 'cuda:N' or 'mps'") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {str(device)!r} was asked for but CUDA is not available here; use device='cpu'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"device {str(device)!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            why = "MPS needs macOS 12.3+ on Apple silicon" if torch.backends.mps.is_built() else "this PyTorch was built without MPS"
            raise DeviceError(f"device 'mps' was asked for but MPS is not available here ({why}); use device='cpu'")
    elif device.type == "meta":  # a model on meta holds no weights and would return garbage shapes, not features
        raise DeviceError("device 'meta' holds no data, so a model there cannot compute; use 'cpu', 'cuda' or 'mps'")
    elif device.type != "cpu":
        try:  # xpu, hpu and other backends: usable exactly when a tensor can be made there
            torch.empty(0, device=device)
        except Exception as e:  # RuntimeError, AssertionError or ImportError, depending on the backend
            reason = str(e).strip().split("\n")[0][:200]  # torch lists every backend it knows after the first line
            raise DeviceError(f"device {str(device)!r} is not usable here ({reason}); use device='cpu'") from e
    return device


# OpenAI's submodules by their names (`clip.clip._MODELS`, `clip.simple_tokenizer.SimpleTokenizer`); imported last
# because `clip` takes `load` from this module
from . import clip, simple_tokenizer  # noqa: F401
