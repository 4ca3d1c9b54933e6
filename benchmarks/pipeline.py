"""Image embedding throughput: JPEG files on disk -> features, beside the encoder alone on ready tensors.

    python benchmarks/pipeline.py [--arch ViT-B/16] [--device cuda] [--images 5000] [--num-workers 16]
                                  [--batch-size 256] [--size 500x375] [--dir DIR]

Three numbers, in images per second, for a model of `arch`'s shape with random weights (fp16 on CUDA, as `load`
gives; fp32 elsewhere):

- encoder: `model.encode_image` on batches already preprocessed and on the device, synchronised (the ceiling);
- loader: `encode_images` with a stand-in model that does no work, i.e. reading, decoding and preprocessing the
  files in the DataLoader's workers plus the copy to the device (the other ceiling);
- pipeline: `encode_images` on the files, end to end: what a user gets.

and first, the cost of one worker's share: what a DataLoader worker does for one file (read, decode, resize, crop,
to uint8 pixels), timed in this process on one thread, and the most that all cores could feed at that cost.

The pipeline / encoder ratio says how much of the accelerator the file pipeline keeps busy (goal: 80% for ViT-B/16
on an H100 with 16 CPU cores). The JPEGs are written first (`--size` pixels, photo-like: smooth colour fields,
edges and noise, quality 90), so they are read from the page cache, as in any second pass over a dataset; `--dir`
reuses a folder of images instead. Each timing is the best of `--repeats` runs after a warm-up.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from multiprocessing import Pool

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

import openclip_lite as clip
from openclip_lite.model import CLIP, convert_weights
from openclip_lite.pretrained import ARCHITECTURES
from openclip_lite.search import _ImageDataset, _split_normalisation, list_images, usable_cpus
from openclip_lite.transform import preprocess as make_preprocess


def photo_like(seed: int, size: tuple[int, int]) -> Image.Image:
    """Smooth colour fields, a few hard-edged shapes and sensor-like noise: JPEG work similar to a photo's."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y = rng.integers(0, size[0]), rng.integers(0, size[1])
        w, h = rng.integers(10, size[0] // 2), rng.integers(10, size[1] // 2)
        draw.ellipse([x, y, x + w, y + h], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    image = image.filter(ImageFilter.GaussianBlur(1.0))
    noise = rng.normal(0, 12, (size[1], size[0], 3))
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8))


def _write(job: tuple[str, int, tuple[int, int]]) -> None:
    path, seed, size = job
    photo_like(seed, size).save(path, quality=90)


def write_jpegs(folder: str, count: int, size: tuple[int, int]) -> list[str]:
    paths = [os.path.join(folder, f"{i:07d}.jpg") for i in range(count)]
    with Pool(os.cpu_count()) as pool:
        pool.map(_write, [(path, i, size) for i, path in enumerate(paths)], chunksize=16)
    return paths


def random_model(arch: str, device: torch.device) -> CLIP:
    model = CLIP(*ARCHITECTURES[arch])
    if device.type == "cuda":
        convert_weights(model, torch.float16)  # as `load` does on CUDA
    return model.eval().to(device)


class IdleModel(torch.nn.Module):
    """Stands in for CLIP in `encode_images`, doing nothing, to time the loading alone."""

    def __init__(self, embed_dim: int, device: torch.device):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1, device=device))
        self.text_projection = torch.nn.Parameter(torch.zeros(1, embed_dim, device=device))

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels[:, 0, 0, :1].expand(-1, self.text_projection.shape[1]) + 1


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_of(repeats: int, run, device: torch.device) -> float:
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def worker_cost(paths: list[str], preprocess, count: int = 200) -> float:
    """Seconds one DataLoader worker spends per file (`encode_images`' own worker code), best of 3, one thread."""
    head, _ = _split_normalisation(preprocess)
    dataset = _ImageDataset(paths[:count], head, uint8_output=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a worker process runs torch on one thread
    try:
        return best_of(3, lambda: [dataset[i] for i in range(len(dataset))], torch.device("cpu")) / len(dataset)
    finally:
        torch.set_num_threads(threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="ViT-B/16", choices=list(ARCHITECTURES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=5000, help="JPEG files to write and embed")
    parser.add_argument("--num-workers", type=int, help="DataLoader workers (default: encode_images' own, one per core)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--size", default="500x375", help="the JPEGs' width x height (ImageNet's typical size)")
    parser.add_argument("--dir", help="embed the images of this folder instead of writing new ones")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory() as temporary:
        if args.dir:
            paths = list_images(args.dir)[: args.images]
        else:
            width, height = (int(v) for v in args.size.lower().split("x"))
            start = time.perf_counter()
            paths = write_jpegs(temporary, args.images, (width, height))
            megabytes = sum(os.path.getsize(p) for p in paths) / 1e6
            print(f"wrote {len(paths)} JPEGs of {width}x{height} ({megabytes / len(paths) * 1e3:.0f} kB each) in {time.perf_counter() - start:.1f}s")

        model = random_model(args.arch, device)
        preprocess = make_preprocess(model.visual.input_resolution)
        workers = args.num_workers
        cores = usable_cpus()
        print(
            f"{args.arch}, {model.dtype}, {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
            + f", batch {args.batch_size}, {len(paths)} images, {cores} CPUs, workers: {'auto' if workers is None else workers}"
        )

        per_file = worker_cost(paths, preprocess)
        print(
            f"one worker: {per_file * 1e3:.2f} ms per file ({1 / per_file:.0f} images/s per core); "
            f"{cores} cores could feed at most {cores / per_file:.0f} images/s"
        )

        # the encoder alone: one batch of real preprocessed images, on the device, run as often as there are images
        batch = torch.stack([preprocess(Image.open(p)) for p in paths[: args.batch_size]]).to(device, model.dtype)
        steps = max(1, len(paths) // len(batch))
        with torch.inference_mode():
            model.encode_image(batch)  # warm-up: kernels chosen, memory allocated

            def encoder() -> None:
                for _ in range(steps):
                    model.encode_image(batch)

            encoder_rate = steps * len(batch) / best_of(args.repeats, encoder, device)

        def run(m: torch.nn.Module) -> None:
            clip.encode_images(m, preprocess, paths, batch_size=args.batch_size, num_workers=workers, progress=False)

        idle = IdleModel(model.text_projection.shape[1], device)
        clip.encode_images(model, preprocess, paths[: 2 * args.batch_size], batch_size=args.batch_size, num_workers=workers)  # warm-up
        loader_rate = len(paths) / best_of(args.repeats, lambda: run(idle), device)
        pipeline_rate = len(paths) / best_of(args.repeats, lambda: run(model), device)

    print(f"encoder  (preprocessed tensors on {device}): {encoder_rate:9.1f} images/s")
    print(f"loader   (files -> pixels on {device}, no model): {loader_rate:9.1f} images/s")
    print(f"pipeline (files -> features, end to end): {pipeline_rate:9.1f} images/s")
    print(f"pipeline / encoder = {pipeline_rate / encoder_rate:.1%}")


if __name__ == "__main__":
    main()
