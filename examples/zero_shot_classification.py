"""Zero-shot classification of images against free-text labels, printed as a top-k table.

    python examples/zero_shot_classification.py --model examples/assets/demo-model.safetensors examples/assets/*.jpg
    python examples/zero_shot_classification.py photo.jpg --labels dog cat "a diagram" --model ViT-B/32
    python examples/zero_shot_classification.py photo.jpg --imagenet          # the 1000 ImageNet classes, 80 templates

The default labels are the demo model's: the 18 coloured shapes it was trained on.
"""

import argparse
import os
import sys

import openclip_lite as clip
from openclip_lite.cli import format_table

HERE = os.path.dirname(os.path.abspath(__file__))
DEMO_LABELS = [f"{color} {shape}" for color in ("red", "green", "blue", "yellow", "purple", "orange") for shape in ("circle", "square", "triangle")]


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="*", help="image files (default: the sample images in examples/assets)")
    parser.add_argument("--labels", nargs="+", default=DEMO_LABELS, help="candidate labels")
    parser.add_argument("--imagenet", action="store_true", help="classify into the 1000 ImageNet classes with the 80-template ensemble")
    parser.add_argument("--template", action="append", help='a prompt template with {} (repeatable; default "a photo of a {}.")')
    parser.add_argument("--model", default=os.path.join(HERE, "assets", "demo-model.safetensors"), help="a released model name or a checkpoint path (default: the demo model, which knows the default labels)")
    parser.add_argument("--device", help="cpu, cuda or mps (default: the best available)")
    parser.add_argument("--top-k", type=positive_int, default=3)
    args = parser.parse_args()

    images = args.images or sorted(os.path.join(HERE, "assets", f) for f in os.listdir(os.path.join(HERE, "assets")) if f.endswith(".jpg"))
    labels, templates = (list(clip.IMAGENET_CLASSES), clip.IMAGENET_TEMPLATES) if args.imagenet else (args.labels, args.template)

    model, preprocess = clip.load(args.model, device=args.device)
    probs = clip.classify(model, preprocess, images, labels, templates=templates)
    print(format_table([os.path.relpath(image) for image in images], clip.top_k(probs, labels, args.top_k)))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (clip.OpenCLIPLiteError, OSError, ValueError) as e:  # a bad file or name: one line, not a traceback
        sys.exit(f"error: {e}")
