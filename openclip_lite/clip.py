"""OpenAI's `clip.clip` module by its names, for code that imports them: `from openclip_lite import clip`.

Prompt learners (CoOp and its family) read OpenAI's download table and build the model themselves:

    url = clip._MODELS["ViT-B/16"]
    model = clip.build_model(torch.jit.load(clip._download(url), map_location="cpu").state_dict())

`_download` fetches OpenAI's archive the way `load(name, source="openai")` does: verified against the SHA256 in its
URL, cached, and offline-aware.
"""

import os
from typing import Optional

from torchvision.transforms import InterpolationMode

from . import available_models, build_model, load, tokenize  # noqa: F401 (build_model: OpenAI's has it, outside __all__)
from .errors import UnknownModelError
from .pretrained import MODELS
from .tokenizer import SimpleTokenizer as _Tokenizer  # OpenAI's private name
from .tokenizer import default_tokenizer
from .transform import _convert_image_to_rgb  # noqa: F401 (OpenAI's private names, which some projects import)
from .transform import preprocess as _transform  # noqa: F401

__all__ = ["available_models", "load", "tokenize"]

BICUBIC = InterpolationMode.BICUBIC
_MODELS: dict[str, str] = {name: model.url for name, model in MODELS.items()}


def _download(url: str, root: "Optional[str | os.PathLike]" = None) -> str:
    """OpenAI's `_download`: the path of the released model at `url` in `root` (None: ~/.cache/clip, as OpenAI's),
    downloaded and SHA256-checked."""
    from .download import download, openai_url  # huggingface_hub and filelock: only when a download is asked for

    for name, model in MODELS.items():
        if url in (model.url, openai_url(model)):
            return download(name, root, source="openai")
    raise UnknownModelError(
        f"{url!r} is not the URL of a released CLIP model; clip._MODELS holds the nine "
        f"({', '.join(MODELS)}). For a checkpoint of your own, pass its path to load()."
    )


def __getattr__(name: str) -> _Tokenizer:
    # OpenAI builds `_tokenizer` when the module is imported; here on first use, so `import openclip_lite` stays cheap
    if name == "_tokenizer":
        return default_tokenizer()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
