"""preprocess against OpenAI's `_transform`, bit for bit, on every PIL mode and odd sizes."""

import numpy as np
import pytest
import torch
from PIL import Image
from reference import openai_clip

from openclip_lite.transform import preprocess

MODES = ["1", "L", "P", "RGB", "RGBA", "CMYK", "I;16", "LA", "I", "F", "YCbCr", "LAB", "HSV", "RGBX", "La", "PA"]
# (250, 734): a portrait that Pillow 13 resizes vertically first (python-pillow/Pillow#9549), Pillow 12 horizontally
SIZES = [(224, 224), (1, 1), (3, 2), (320, 240), (700, 5), (5, 700), (225, 224), (250, 734)]


def image(mode: str, size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (size[1], size[0]), dtype=np.uint16))  # mode I;16
    if mode == "P":
        return rgb.convert("P", palette=Image.Palette.ADAPTIVE)
    if mode == "La":
        return rgb.convert("LA").convert("La")
    if mode == "PA":
        return rgb.convert("P").convert("PA")
    return rgb.convert(mode)


@pytest.mark.parametrize("mode, n_px", [(mode, 224) for mode in MODES] + [("RGB", 336), ("P", 288)])
def test_preprocess_equals_openai(mode, n_px):
    ours, reference = preprocess(n_px), openai_clip.clip._transform(n_px)
    for i, size in enumerate(SIZES):
        img = image(mode, size, seed=i)
        try:
            expected = reference(img)
        except Exception as e:  # noqa: BLE001 (a mode OpenAI's code cannot handle: ours must fail the same way, not differently)
            with pytest.raises(type(e)):
                ours(img)
            continue
        actual = ours(img)
        assert actual.shape == (3, n_px, n_px) and actual.dtype == torch.float32
        assert torch.equal(actual, expected), (mode, size)


def test_steps_at_openai_indices():
    # code written for OpenAI's Compose reads steps by index: transforms[0].size, transforms[-1].mean
    ours, reference = preprocess(224).transforms, openai_clip.clip._transform(224).transforms
    assert len(ours) == len(reference)
    for step, expected in zip(ours, reference):
        assert isinstance(step, type(expected)) or (callable(step) and callable(expected) and not isinstance(expected, torch.nn.Module))
    assert ours[0].size == reference[0].size and ours[1].size == reference[1].size and ours[-1].mean == reference[-1].mean
