"""The Ray path's overhead: `distributed.embed` beside `encode_images` on the same machine, model and JPEG files.

    python benchmarks/ray_embed.py [--arch ViT-B/32] [--images 2000] [--size 320x240] [--batch-size 64]
                                   [--repeats 2] [--small 128] [--actors N] [--num-cpus N] [--dir DIR]

A model of `arch`'s shape (or the demo model's, `--arch demo`) with random weights (the numbers do not depend on the weights), on the CPU unless
--device cuda (then `embed` asks for one GPU per actor). Numbers, in images per second:

- local: `encode_images(model, preprocess, paths)` with its default DataLoader workers, the files in the page
  cache (the yardstick);
- ray: `embed(paths, checkpoint, output)` on a Ray started once beforehand (its start is timed apart), each run
  into a new output folder, so every run pays the per-call costs: a new actor pool (a process that imports torch
  and builds the model), Ray Data's planning, the Parquet writes;
- ray, marginal: (images - small) / (time(images) - time(small)), the rate once the per-call costs are paid,
  which is what a large job sees; the per-call cost is time(small) - small / marginal rate.

overhead = 1 - rate / local rate. Each timing is the best of --repeats, taken in turns, after a warm-up run.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from multiprocessing import Pool

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

import openclip_lite as clip
from openclip_lite.model import CLIP
from openclip_lite.pretrained import ARCHITECTURES
from openclip_lite.search import list_images, usable_cpus

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the demo model's shape (tools/train_demo_model.py): a model so light that decoding and Ray's own work dominate
DEMO = {"embed_dim": 64, "image_resolution": 64, "vision_layers": 3, "vision_width": 64, "vision_patch_size": 8, "context_length": 77, "vocab_size": 49408, "transformer_width": 64, "transformer_heads": 1, "transformer_layers": 2}


def photo_like(job: tuple[str, int, tuple[int, int]]) -> None:
    """A JPEG with smooth colour fields, hard-edged shapes and noise: decoding work like a photo's."""
    path, seed, size = job
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y = (int(v) for v in rng.integers(0, size))
        w, h = int(rng.integers(10, size[0] // 2)), int(rng.integers(10, size[1] // 2))
        draw.ellipse([x, y, x + w, y + h], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    image = image.filter(ImageFilter.GaussianBlur(1.0))
    noise = rng.normal(0, 6, (size[1], size[0], 3))
    Image.fromarray(np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8)).save(path, quality=90)


def write_jpegs(folder: str, count: int, size: tuple[int, int]) -> list[str]:
    paths = [os.path.join(folder, f"{i:07d}.jpg") for i in range(count)]
    with Pool(os.cpu_count()) as pool:
        pool.map(photo_like, [(path, i, size) for i, path in enumerate(paths)], chunksize=16)
    return paths


def best_of(repeats: int, run) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def load_average() -> str:
    try:
        return " ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="ViT-B/32", choices=[*ARCHITECTURES, "demo"], help="demo: the demo model's shape (64 px)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--small", type=int, default=128, help="images of the short run that measures the per-call cost")
    parser.add_argument("--size", default="320x240", help="the JPEGs' width x height")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--actors", type=int, help="embed's actors (default: its own choice)")
    parser.add_argument("--num-cpus", type=float, help="embed's num_cpus per actor (default: its own choice)")
    parser.add_argument("--dir", help="use the images of this folder instead of writing new ones")
    args = parser.parse_args()

    import pyarrow
    import ray

    from openclip_lite.distributed import embed

    with tempfile.TemporaryDirectory() as temporary:
        if args.dir:
            paths = list_images(args.dir)[: args.images]
        else:
            width, height = (int(v) for v in args.size.lower().split("x"))
            paths = write_jpegs(temporary, args.images, (width, height))
        kilobytes = sum(os.path.getsize(p) for p in paths) / len(paths) / 1e3

        device = torch.device(args.device)
        model = CLIP(**DEMO) if args.arch == "demo" else CLIP(*ARCHITECTURES[args.arch])
        checkpoint = os.path.join(temporary, "model.pt")
        torch.save(model.state_dict(), checkpoint)
        model, preprocess = clip.load(checkpoint, device=device)
        cores = usable_cpus()
        print(
            f"{args.arch} ({model.visual.input_resolution}px, {model.dtype}, {device}), {len(paths)} JPEGs of {args.size} "
            f"({kilobytes:.0f} kB), batch {args.batch_size}; {cores} cores, {platform.processor() or platform.machine()}; "
            f"python {platform.python_version()}, torch {torch.__version__}, ray {ray.__version__}, pyarrow {pyarrow.__version__}"
        )
        print(f"load average before: {load_average()}")

        def local(subset: list[str]) -> None:
            clip.encode_images(model, preprocess, subset, batch_size=args.batch_size, progress=False)

        local(paths[: 2 * args.batch_size])  # warm-up: worker processes, page cache, kernels
        start = time.perf_counter()
        ray.init(num_cpus=cores, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": REPO}}, log_to_driver=False)
        print(f"ray.init (a local Ray, once):    {time.perf_counter() - start:8.1f} s", flush=True)
        outputs = os.path.join(temporary, "shards")

        def distributed(subset: list[str]) -> None:
            shutil.rmtree(outputs, ignore_errors=True)
            embed(subset, checkpoint, outputs, batch_size=args.batch_size, actors=args.actors, num_cpus=args.num_cpus, num_gpus=1 if args.device == "cuda" else 0, progress=False)

        distributed(paths[: args.small])  # warm-up: Ray's worker processes, imports
        # the three timings take turns, so that a change in the machine's load falls on all of them alike
        local_time = small_time = ray_time = float("inf")
        for _ in range(args.repeats):
            local_time = min(local_time, best_of(1, lambda: local(paths)))
            small_time = min(small_time, best_of(1, lambda: distributed(paths[: args.small])))
            ray_time = min(ray_time, best_of(1, lambda: distributed(paths)))
        ray.shutdown()
        local_rate = len(paths) / local_time
        print(f"local  encode_images:            {local_rate:8.1f} images/s  ({local_time:.1f} s)")
        ray_rate = len(paths) / ray_time
        marginal = (len(paths) - args.small) / max(ray_time - small_time, 1e-9)
        per_call = small_time - args.small / marginal
        print(f"ray    embed, whole call:        {ray_rate:8.1f} images/s  ({ray_time:.1f} s)   overhead {1 - ray_rate / local_rate:6.1%}")
        print(f"ray    embed, marginal:          {marginal:8.1f} images/s               overhead {1 - marginal / local_rate:6.1%}")
        print(f"ray    embed, per-call cost:     {per_call:8.1f} s   ({args.small} images took {small_time:.1f} s)")
        print(f"load average after: {load_average()}")


if __name__ == "__main__":
    sys.exit(main())
