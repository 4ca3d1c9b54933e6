"""Image loading and preprocessing, equal to OpenAI's to the last bit."""

import io
import os
import warnings

from PIL import Image
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

from .errors import ImageError

# the statistics of OpenAI's training images, carried over from OpenAI's `clip` package
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


# modes with more than 8 bits per channel, which PIL's convert("RGB") clips to 0..255
_HIGH_BIT_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def _check_image(image: Image.Image) -> Image.Image:
    """Pass the image through unchanged; raise ImageError for one with no pixels (Resize would divide by zero on
    it) and warn for pixel values that the RGB conversion will clip."""
    if not isinstance(image, Image.Image):
        return image
    if image.width == 0 or image.height == 0:
        raise ImageError(f"{_describe(image)} has size {image.width}x{image.height}: it has no pixels to encode")
    if image.mode in _HIGH_BIT_DEPTH_MODES:
        # checked here, before Resize, whose bicubic overshoot takes 8-bit data a little past 255
        low, high = image.getextrema()
        if low < 0 or high > 255:  # the same pixels as OpenAI's clip, but most of the picture is lost; say so
            warnings.warn(
                f"{_describe(image)} has mode {image.mode} with values from {low} to {high}; converting it to RGB "
                "clips them to 0..255, as OpenAI's clip does. Scale it to 8 bits first to keep the picture.",
                stacklevel=2,
            )
    return image


class _CheckedResize(Resize):
    """torchvision's Resize after `_check_image`, so that every step sits at the index it has in OpenAI's Compose
    (`preprocess.transforms[0]` is the Resize, with its `.size`, as code written for OpenAI's expects)."""

    def forward(self, img):
        return super().forward(_check_image(img))


def _convert_image_to_rgb(image: Image.Image) -> Image.Image:
    try:
        return image.convert("RGB")
    except ValueError as e:  # PIL has no path to RGB from a few modes ("La")
        raise ImageError(
            f"{_describe(image)} has mode {image.mode!r}, which PIL cannot convert to RGB ({e}); convert it to a "
            "mode that can be first (for 'La': image.convert('LA'))"
        ) from e


def _describe(image: Image.Image) -> str:
    filename = getattr(image, "filename", None)  # set by Image.open, lost by Resize
    return str(filename) if filename else "the image"


def preprocess(n_px: int) -> Compose:
    """PIL image of any mode and size -> float tensor (3, n_px, n_px), normalised.

    The same steps in the same order as OpenAI's `_transform`: resize the shorter side with bicubic filtering,
    center-crop, convert to RGB (after resizing, as OpenAI does: changing the order changes the pixels), scale to
    [0, 1] and normalise with OpenAI's mean and std. Where OpenAI's code would crash or silently lose the picture
    we say so instead, without changing any pixel: ImageError for a zero-size image or a mode with no path to RGB,
    a warning for 16-bit or float pixels that the RGB conversion clips.

    Equal to OpenAI's under the same Pillow: the pixels themselves are PIL's, and Pillow 13 changed the order of
    its two resize passes for images about twice as tall as wide, so both packages' pixels for those differ
    between Pillow 12 and 13.
    """
    return Compose(
        [
            _CheckedResize(n_px, interpolation=InterpolationMode.BICUBIC),
            CenterCrop(n_px),
            _convert_image_to_rgb,
            ToTensor(),
            Normalize(MEAN, STD),
        ]
    )


def open_image(path: "str | os.PathLike") -> Image.Image:
    """Open and fully decode an image file, or raise ImageError naming the file and the reason.

    PIL opens lazily, so a truncated file would otherwise fail later, far from its name. PIL's
    decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`) stays in force: an image past twice the limit is an
    ImageError, not a memory blow-up (past the limit itself PIL warns). Raises FileNotFoundError for a missing
    file, TypeError for something that is not a path, ImageError for everything else.
    """
    try:
        path = os.fspath(path)
    except TypeError:
        raise TypeError(f"expected the path of an image file (str or os.PathLike), got {type(path).__name__}") from None
    if not os.path.exists(path):
        raise FileNotFoundError(f"image file not found: {path}")
    if not os.path.isfile(path):  # a directory, or a FIFO that reading would block on
        raise ImageError(f"{path} is not a regular file; pass the path of an image file")
    return decode_image(path, path)


def decode_image(source: "str | os.PathLike | io.BytesIO", name: str) -> Image.Image:
    """Fully decode `source` (a path or an in-memory file), or raise ImageError naming `name` and the reason."""
    try:
        with Image.open(source) as image:
            image.load()
            return image
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name} is too large to decode safely ({e}); downscale it first") from e
    except MemoryError:
        raise
    except Exception as e:  # PIL's decoders raise OSError, SyntaxError, struct.error, TypeError... on malformed files
        raise ImageError(f"cannot read {name} as an image ({type(e).__name__}: {e})") from e
