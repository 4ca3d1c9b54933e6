"""Zero-shot classification with the exported ONNX graphs: onnxruntime, PIL and numpy, no PyTorch model.

    openclip-lite export examples/assets/demo-model.safetensors --onnx demo-onnx
    python examples/onnx_inference.py demo-onnx examples/assets/*.jpg
    python examples/onnx_inference.py vit-b-32-onnx photo.jpg --labels dog cat "a diagram"

The folder is what `openclip-lite export` (or `openclip_lite.export.export_onnx`) wrote: image.onnx, text.onnx and
preprocess.json. Only the tokenizer comes from openclip-lite; importing it imports torch, but no model runs there
(to drop torch entirely, ship tokenizer.py and its vocabulary file and return numpy ids).
"""

import argparse
import json
import os
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image

from openclip_lite import tokenize

DEMO_LABELS = [f"{color} {shape}" for color in ("red", "green", "blue", "yellow", "purple", "orange") for shape in ("circle", "square", "triangle")]


def preprocess(image: Image.Image, size: int, mean: list, std: list) -> np.ndarray:
    """PIL image -> float32 (3, size, size), the same pixels as `openclip_lite.transform.preprocess(size)`.

    torchvision's steps written out: the shorter side to `size` (the longer one truncated, not rounded) with
    PIL's bicubic filter, a center crop (offsets rounded), RGB, /255, then (x - mean) / std in float32.
    """
    width, height = image.size
    if width <= height:
        new_size = (size, int(size * height / width))
    else:
        new_size = (int(size * width / height), size)
    image = image.resize(new_size, Image.BICUBIC)
    left, top = round((new_size[0] - size) / 2.0), round((new_size[1] - size) / 2.0)
    image = image.crop((left, top, left + size, top + size)).convert("RGB")
    pixels = np.asarray(image, dtype=np.float32) / np.float32(255)
    pixels = (pixels - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return pixels.transpose(2, 0, 1)


def normalize(features: np.ndarray) -> np.ndarray:
    return features / np.linalg.norm(features, axis=-1, keepdims=True)


def softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return exp / exp.sum(axis=-1, keepdims=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("onnx_dir", help="the folder `openclip-lite export --onnx` wrote")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--labels", nargs="+", default=DEMO_LABELS, help="candidate labels (default: the demo model's 18 shapes)")
    parser.add_argument("--template", default="a photo of a {}.", help="prompt template with {}")
    parser.add_argument("--top-k", type=int, default=3)
    args = parser.parse_args()

    with open(os.path.join(args.onnx_dir, "preprocess.json")) as f:
        config = json.load(f)
    providers = ["CPUExecutionProvider"]
    image_session = ort.InferenceSession(os.path.join(args.onnx_dir, "image.onnx"), providers=providers)
    text_session = ort.InferenceSession(os.path.join(args.onnx_dir, "text.onnx"), providers=providers)

    tokens = tokenize([args.template.format(label) for label in args.labels], context_length=config["context_length"]).numpy().astype(np.int32)
    text_features = normalize(text_session.run(None, {"text": tokens})[0])
    pixels = np.stack([preprocess(Image.open(path), config["image_size"], config["mean"], config["std"]) for path in args.images])
    image_features = normalize(image_session.run(None, {"image": pixels})[0])

    probs = softmax(config["logit_scale"] * image_features @ text_features.T)
    for path, row in zip(args.images, probs):
        print(path)
        for rank, i in enumerate(np.argsort(-row)[: args.top_k], 1):
            print(f"  {rank}. {args.labels[i]:<24s} {100 * row[i]:6.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
