"""Where the model looks: the class token's last-layer attention over the image, overlaid on it and saved as a PNG.

    python examples/attention_map.py                                     # the demo model on a sample image
    python examples/attention_map.py photo.jpg --model ViT-B/32 --out attention.png
    python examples/attention_map.py --image-size 128                    # a 4x4 map from the demo model's 2x2

The map is the attention of the class token (ViT) or of the attention pool's query (ResNet) over the image
positions in the last layer, averaged over heads, from `model.forward_intermediates(..., output_attentions=True)`.
"""

import argparse
import os
import sys

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import CenterCrop, InterpolationMode, Resize

import openclip_lite as clip
from openclip_lite.transform import open_image

HERE = os.path.dirname(os.path.abspath(__file__))
DEMO_MODEL = os.path.join(HERE, "assets", "demo-model.safetensors")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def class_token_attention(model: clip.CLIP, image: torch.Tensor) -> np.ndarray:
    """image : shape = (1, 3, res, res), preprocessed -> the last layer's class-token attention, (grid, grid), summing to 1"""
    with torch.no_grad():
        out = model.forward_intermediates(image=image, image_indices=[-1], output_attentions=True)
    maps = out["image_attentions"][-1][0]  # (heads, queries, 1 + grid ** 2); ResNet: one query, the pool's
    weights = maps[:, 0, 1:].mean(dim=0)  # the class token's row, without its attention to itself
    grid = round(weights.numel() ** 0.5)
    weights = weights / weights.sum()
    return weights.view(grid, grid).cpu().numpy()


def heat_colors(values: np.ndarray) -> np.ndarray:
    """values in [0, 1], shape (h, w) -> uint8 RGB (h, w, 3), dark blue through red to yellow"""
    red = np.clip(2.0 * values, 0, 1)
    green = np.clip(2.0 * values - 1.0, 0, 1)
    blue = np.clip(0.6 - 1.2 * np.abs(values - 0.25), 0, 1)
    return (255 * np.stack([red, green, blue], axis=-1)).astype(np.uint8)


def overlay(image: Image.Image, attention: np.ndarray, alpha: float = 0.55) -> Image.Image:
    """The attention, scaled to its maximum and resized smoothly to the image, blended over it."""
    heat = Image.fromarray((attention / attention.max()).astype(np.float32), mode="F").resize(image.size, Image.BICUBIC)
    colors = Image.fromarray(heat_colors(np.clip(np.asarray(heat), 0, 1)))
    return Image.blend(image.convert("RGB"), colors, alpha)


def default_image() -> str:
    assets = os.path.join(HERE, "assets")
    images = sorted(f for f in os.listdir(assets) if f.lower().endswith(IMAGE_SUFFIXES)) if os.path.isdir(assets) else []
    if not images:
        raise SystemExit(f"no sample image in {assets}; give one: python examples/attention_map.py photo.jpg")
    return os.path.join(assets, images[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image", nargs="?", help="an image file (default: the first sample image in examples/assets)")
    parser.add_argument("--model", default=DEMO_MODEL, help="a released model name or a checkpoint path (default: the demo model)")
    parser.add_argument("--out", default="attention.png", help="where to save the overlay (PNG)")
    parser.add_argument("--image-size", type=int, help="run at another input size for a finer map (position embeddings resampled)")
    parser.add_argument("--device", help="cpu, cuda or mps (default: the best available)")
    args = parser.parse_args()

    if args.model == DEMO_MODEL and not os.path.exists(DEMO_MODEL):
        raise SystemExit(f"{DEMO_MODEL} is not there; make it with python tools/train_demo_model.py, or give --model ViT-B/32")
    path = args.image or default_image()
    model, preprocess = clip.load(args.model, device=args.device, image_size=args.image_size)
    image = open_image(path)
    attention = class_token_attention(model, preprocess(image).unsqueeze(0).to(model.visual.conv1.weight.device))

    # the region the model saw (the shorter side resized, the center cropped, as `preprocess` does), drawn at
    # least 384 px wide so that a small model's map is visible
    display = max(model.visual.input_resolution, 384)
    seen = CenterCrop(display)(Resize(display, interpolation=InterpolationMode.BICUBIC)(image))
    overlay(seen, attention).save(args.out)
    row, col = np.unravel_index(attention.argmax(), attention.shape)
    grid = attention.shape[0]
    print(f"{path}: {grid}x{grid} attention map, strongest at row {row}, column {col} ({100 * attention.max():.1f}% of it); saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
