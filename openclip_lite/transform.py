"""Image loading and preprocessing, equal to OpenAI's to the last bit."""

import os

from PIL import Image
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

from .errors import ImageError

# the statistics of OpenAI's training images, carried over from OpenAI's `clip` package
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def _convert_image_to_rgb(image: Image.Image) -> Image.Image:
    return image.convert("RGB")


def preprocess(n_px: int) -> Compose:
    """PIL image of any mode and size -> float tensor (3, n_px, n_px), normalised.

    The same steps in the same order as OpenAI's `_transform`: resize the shorter side with bicubic filtering,
    center-crop, convert to RGB (after resizing, as OpenAI does: changing the order changes the pixels), scale to
    [0, 1] and normalise with OpenAI's mean and std.
    """
    return Compose(
        [
            Resize(n_px, interpolation=InterpolationMode.BICUBIC),
            CenterCrop(n_px),
            _convert_image_to_rgb,
            ToTensor(),
            Normalize(MEAN, STD),
        ]
    )


def open_image(path: "str | os.PathLike") -> Image.Image:
    """Open and fully decode an image file, or raise ImageError naming the file and the reason.

    PIL opens lazily, so a truncated file would otherwise fail later, far from its name. PIL's
    decompression-bomb limit stays in force: an image past it is an error, not a memory blow-up.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except Image.DecompressionBombError as e:
        raise ImageError(f"{path} is too large to decode safely ({e}); downscale it first") from e
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # PIL's errors for unreadable or truncated files
        raise ImageError(f"cannot read {path} as an image ({e})") from e
