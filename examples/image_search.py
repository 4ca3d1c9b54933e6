"""Text-to-image and image-to-image search over a folder, with the library's functions (what `openclip-lite embed`
and `openclip-lite search` do, as a script to read and adapt).

    python examples/image_search.py "red circle"
    python examples/image_search.py --image examples/assets/blue_square.jpg
    python examples/image_search.py --model ViT-B/32 --images ~/Pictures "two dogs in the snow"

By default it searches the sample images in examples/assets/ with the demo model there, a tiny CLIP that knows
coloured shapes ("red circle", "blue square", "green triangle", ...; made by tools/train_demo_model.py).
"""

import argparse
import os
import sys

import torch

import openclip_lite as clip
from openclip_lite.search import list_images

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("query", nargs="?", help='a text query, e.g. "red circle"')
    parser.add_argument("--image", help="an image to find similar images to, instead of a text query")
    parser.add_argument("--images", default=ASSETS, help="the folder to search (default: examples/assets)")
    parser.add_argument("--model", default=os.path.join(ASSETS, "demo-model.safetensors"), help="a model name or checkpoint (default: the demo model)")
    parser.add_argument("-k", type=int, default=5, help="how many results to show")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if (args.query is None) == (args.image is None):
        parser.error('give either a text query ("red circle") or --image FILE')
    if args.model.endswith(".safetensors") and not os.path.isfile(args.model):
        sys.exit(f"{args.model} does not exist; make it with: python tools/train_demo_model.py")

    model, preprocess = clip.load(args.model, device=args.device)

    # 1. embed every image of the folder; unreadable files are skipped with a warning, and `kept` says which stayed
    paths = list_images(args.images)
    if not paths:
        raise ValueError(f"no image files in {args.images}")
    features, kept, skipped = clip.encode_images(model, preprocess, paths, on_error="skip")
    paths = [paths[i] for i in kept]
    print(f"{len(paths)} images embedded" + (f", {len(skipped)} skipped" if skipped else ""))

    # 2. embed the query the same way: text through the text tower, an image through the image tower
    if args.query is not None:
        query = clip.encode_texts(model, [args.query])
    else:
        query = clip.encode_images(model, preprocess, [args.image]).features

    # 3. exact top-k by cosine similarity
    with torch.no_grad():
        scores, indices = clip.search(query, features, k=args.k)
    for rank, (score, i) in enumerate(zip(scores[0].tolist(), indices[0].tolist()), 1):
        print(f"{rank:2d}. {score:.3f}  {os.path.relpath(paths[i], args.images)}")


if __name__ == "__main__":
    try:
        main()
    except (clip.OpenCLIPLiteError, OSError, ValueError) as e:  # a bad file, folder or name: one line, not a traceback
        sys.exit(f"error: {e}")
