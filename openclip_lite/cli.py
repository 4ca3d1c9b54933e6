"""The `openclip-lite` command. Thin: it parses arguments and calls the library's functions."""

import argparse
import json
import os
import sys
import tempfile
import warnings
from typing import TYPE_CHECKING, Optional

import numpy as np

from .errors import OpenCLIPLiteError

if TYPE_CHECKING:
    from .milvus import MilvusIndex


def cmd_models(args: argparse.Namespace) -> None:
    from .pretrained import MODELS

    for name, entry in MODELS.items():
        print(f"{name:16s} {entry.image_size:4d}px  hub: {entry.hub_repo}")


def cmd_download(args: argparse.Namespace) -> None:
    from .download import download

    for name in args.names:
        print(download(name, root=args.root, source=args.source))


def cmd_classify(args: argparse.Namespace) -> None:
    import openclip_lite as clip

    images, labels = _images_and_labels(args.images, args.labels)
    templates = clip.IMAGENET_TEMPLATES if args.templates == "imagenet" else [args.templates] if args.templates else None
    model, preprocess = clip.load(args.model, device=args.device, download_root=args.root)
    try:
        probs = clip.classify(model, preprocess, images, labels, templates=templates, truncate=args.truncate)
    except clip.TextTooLongError as e:
        raise clip.TextTooLongError(f"{e} (here: --truncate)") from None
    results = clip.top_k(probs, labels, args.top_k)
    if args.json:
        print(json.dumps([{"image": image, "top_k": [{"label": label, "probability": p} for label, p in row]} for image, row in zip(images, results)], indent=2))
        return
    print(format_table(images, results))


def _images_and_labels(images: list[str], words: list[str]) -> tuple[list[str], list[str]]:
    """`classify`'s image paths and labels from its positionals and the values of --labels.

    --labels takes several values (space- or comma-separated labels), so in `--labels "a cat,a dog" cat.jpg`
    argparse gives it the image too. With no image before --labels, its first value is the labels and the
    words after it are the images."""
    if not images:
        words, images = words[:1], words[1:]
        if not images:
            raise ValueError('give the image files to classify, e.g. openclip-lite classify cat.jpg --labels "a cat,a dog"')
        stray = next((word for word in images if not os.path.exists(word)), None)
        if stray is not None and "," not in words[0]:  # `--labels cat dog x.jpg`: space-separated labels, then images
            raise ValueError(
                f"{stray!r} is not a file: to give the images after --labels, give the labels as one comma-separated "
                f'value (--labels "{words[0]},{stray}" IMAGE...), or give the images before --labels'
            )
    labels = [label.strip() for label in ",".join(words).split(",") if label.strip()]
    if not labels:
        raise ValueError("give at least one label with --labels")
    return images, labels


def format_table(images: list[str], results: list[list[tuple[str, float]]]) -> str:
    """A plain-text table: one block per image, its top labels with probabilities and a bar."""
    lines = []
    for image, row in zip(images, results):
        lines.append(image)
        for rank, (label, p) in enumerate(row, 1):
            lines.append(f"  {rank}. {label:<24s} {100 * p:6.2f}%  {'#' * round(20 * p)}")
    return "\n".join(lines)


def cmd_embed(args: argparse.Namespace) -> None:
    if getattr(args, "engine", "local") == "ray":
        return cmd_embed_ray(args)
    if any(getattr(args, name, None) is not None for name in ("address", "actors", "num_gpus", "shard_size")):
        raise ValueError("--address, --actors, --num-gpus and --shard-size need --engine ray")
    import openclip_lite as clip

    from .search import SkippedImageWarning, check_search_index_target, embed_dim, list_images, save_search_index

    paths = list_images(args.inputs)
    if not paths:
        raise ValueError(f"no image files in {' '.join(args.inputs)} (looked for .jpg .jpeg .png .webp .bmp .gif .tif .tiff, recursively)")
    _check_writable(args.out)  # before the embedding, not after it: a typo in --out must not cost the work
    build_options = {"memory_budget": args.memory_budget} if args.memory_budget else {}
    kind = args.index or ("auto" if args.memory_budget else None)  # a budget alone asks for the kind that fits it
    model, preprocess = clip.load(args.model, device=args.device, download_root=args.root)
    check_search_index_target(args.out, len(paths), embed_dim(model), kind, args.memory_budget)  # likewise
    with warnings.catch_warnings():
        warnings.simplefilter("always", SkippedImageWarning)  # one line per skipped file, even for the same error
        features, kept, skipped = clip.encode_images(
            model,
            preprocess,
            paths,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            progress=True if args.progress else None,
            on_error="raise" if args.strict else "skip",
        )
    if not kept:
        raise ValueError(f"none of the {len(paths)} image files could be read; nothing was written to {args.out}")
    model_name = _model_for_index(args.model)
    kept_paths = [os.path.abspath(paths[i]) for i in kept]
    written = save_search_index(args.out, features, kept_paths, model_name, kind=kind, **build_options)
    skipped_note = f", skipped {len(skipped)} unreadable (see the warnings above)" if skipped else ""
    print(f"embedded {len(kept)} images with {args.model}{skipped_note}: {written} written to {args.out}")


# ---- embed --engine ray (openclip_lite.distributed; the Ray half of `embed`) ----


def cmd_embed_ray(args: argparse.Namespace) -> None:
    """`embed --engine ray`: Parquet shards and a manifest in --out, embedded on a Ray cluster; resumable."""
    from .distributed import DEFAULT_SHARD_SIZE, embed
    from .search import EMBEDDINGS_SUFFIXES

    if args.out.lower().endswith(EMBEDDINGS_SUFFIXES):
        stem = os.path.splitext(args.out)[0]
        raise ValueError(f"--engine ray writes a folder of Parquet shards, and {args.out} names one file; give a folder, e.g. --out {stem}-shards")
    local_only = [
        flag
        for flag, value in (("--index", args.index), ("--memory-budget", args.memory_budget), ("--num-workers", args.num_workers), ("--strict", args.strict), ("--device", args.device))
        if value
    ]
    if local_only:
        raise ValueError(
            f"{', '.join(local_only)} only apply to --engine local; with --engine ray, --out is a folder of Parquet "
            "shards, the devices are the cluster's (--num-gpus) and unreadable images are always skipped and listed"
        )
    source = args.inputs[0] if len(args.inputs) == 1 else args.inputs
    result = embed(
        source, args.model, args.out, batch_size=args.batch_size, actors=args.actors, num_gpus=args.num_gpus, address=args.address, shard_size=args.shard_size or DEFAULT_SHARD_SIZE, download_root=args.root
    )
    print(
        f"embedded {result.count} images with {args.model} into {len(result.shards)} shards in {args.out} "
        f"({len(result.written)} written now, {len(result.reused)} kept from an earlier run)"
        + (f"; skipped {len(result.skipped)} unreadable, listed in {args.out}/manifest.json" if result.skipped else "")
    )


# ---- end of embed --engine ray ----


NO_INDEX = "give the index (what `embed --out` wrote), or --milvus URI --collection NAME"


def _open_milvus(args: argparse.Namespace) -> "MilvusIndex":
    """The collection that `--milvus URI --collection NAME [--token T]` name, open."""
    from .milvus import MilvusIndex, _is_remote

    if not args.collection:
        raise ValueError("--milvus needs --collection NAME")
    if not _is_remote(args.milvus) and not os.path.exists(os.path.expanduser(args.milvus)):  # a Lite file: opening would create an empty one
        raise FileNotFoundError(f"no Milvus Lite file at {args.milvus}; make one with: openclip-lite index to-milvus SHARDS_DIR --uri {args.milvus} --collection {args.collection}")
    return MilvusIndex(args.milvus, args.collection, token=args.token, create=False)


def cmd_search(args: argparse.Namespace) -> None:
    import torch

    import openclip_lite as clip

    from .search import IMAGE_EXTENSIONS, open_search_index

    if args.milvus:  # no index file then: the first positional argument is a query
        args.queries = ([args.index_path] if args.index_path else []) + args.queries
        index, where = _open_milvus(args), f"collection {args.collection!r}"
    elif args.index_path:
        index, where = open_search_index(args.index_path), args.index_path
    else:
        raise ValueError(NO_INDEX)
    if not args.queries and not args.image:
        raise ValueError('give a text query ("two dogs in the snow") and/or --image FILE')
    if any(not query.strip() for query in args.queries):
        raise ValueError('a text query is empty; give words to search for, e.g. "two dogs in the snow"')
    for query in args.queries:  # `--image a.jpg b.jpg` leaves b.jpg as a text query: say so rather than search for it
        if os.path.isfile(query) and os.path.splitext(query)[1].lower() in IMAGE_EXTENSIONS:
            raise ValueError(f"{query!r} is an image file given as a text query; search by it with --image {query} (one --image per file)")
    model_name = args.model or index.model
    if not model_name:
        raise ValueError(f"{where} does not name its model; give it with --model")
    model, preprocess = clip.load(model_name, device=args.device, download_root=args.root)
    queries = []
    if args.queries:
        try:
            queries.append(clip.encode_texts(model, args.queries, truncate=args.truncate))
        except clip.TextTooLongError as e:  # a cut query would find images for its first words only
            raise clip.TextTooLongError(f"{e} (here: --truncate)") from None
    if args.image:
        queries.append(clip.encode_images(model, preprocess, args.image, num_workers=0).features)
    scores, ids = index.search(torch.cat(queries), args.top_k)
    labels = [json.dumps(q, ensure_ascii=False) for q in args.queries] + [f"image {path}" for path in args.image]
    results = []
    for row_scores, row_ids in zip(scores.tolist(), _as_list(ids)):
        kept = [(i, score) for i, score in zip(row_ids, row_scores) if i >= 0]  # -1 pads an index with fewer than k rows
        paths = index.get_paths([i for i, _ in kept]) if hasattr(index, "get_paths") else [index.paths[i] for i, _ in kept]
        results.append([(path, float(score)) for path, (_, score) in zip(paths, kept)])
    if args.json:
        asked = [{"text": q} for q in args.queries] + [{"image": path} for path in args.image]
        answer = [{**query, "results": [{"path": path, "score": score} for path, score in row]} for query, row in zip(asked, results)]
        print(json.dumps(answer, indent=2))
        return
    for label, row in zip(labels, results):
        print(label)
        for rank, (path, score) in enumerate(row, 1):
            print(f"  {rank:3d}. {score:.4f}  {path}")


def cmd_index_to_milvus(args: argparse.Namespace) -> None:
    from .milvus import load_shards_into_milvus

    with load_shards_into_milvus(args.shards, args.uri, args.collection, index_type=args.index_type, token=args.token) as index:
        print(f"{len(index)} vectors of {index.model or 'an unnamed model'} in collection {args.collection!r} at {args.uri}")


def _model_for_index(model: Optional[str]) -> Optional[str]:
    """The model name an index records: a checkpoint file by its absolute path, so the index is usable from any folder."""
    return os.path.abspath(model) if model and os.path.isfile(model) else model


def cmd_index_build(args: argparse.Namespace) -> None:
    from .index import build_index

    options = {"memory_budget": args.memory_budget} if args.memory_budget else {}
    index = build_index(args.shards, kind=args.kind, metric=args.metric, model=_model_for_index(args.model), target_recall=args.target_recall, **options)
    index.save(args.out)
    print(f"{len(index)} vectors of {index.model or 'an unnamed model'} from {args.shards}: {_describe(index)}; written to {args.out}")


def cmd_index_info(args: argparse.Namespace) -> None:
    from .index import load_index

    index = load_index(args.path, mmap=True)  # checks every file, reads no vectors into memory
    on_disk = sum(entry.stat().st_size for entry in os.scandir(args.path) if entry.is_file())
    info = {
        "path": os.path.abspath(args.path),
        "kind": index.kind,
        "metric": index.metric,
        "dim": index.dim,
        "count": len(index),
        "params": index.params,
        "model": index.model,
        "tuned_recall": index.tuned_recall,
        "paths": index.paths is not None,
        "index_bytes": index.nbytes,  # what a memory budget counts: FAISS's structures and the ids
        "file_bytes": on_disk,  # all the files, paths.json included
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return
    for name, value in info.items():
        print(f"{name:13s} {value}")


def _check_writable(out: str) -> None:
    """Raise OSError now if nothing can be written where `out` goes: into it if it is a folder (a FAISS index is
    written inside), else into the folder that holds it or would."""
    folder = os.path.abspath(out) if os.path.isdir(out) else os.path.dirname(os.path.abspath(out))
    while not os.path.exists(folder):  # the folders save_* would create: the first existing one must take them
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise NotADirectoryError(f"cannot write {out}: {folder} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:  # PermissionError, a read-only or virtual file system: its message would name the probe file
        raise type(e)(f"cannot write {out}: no file can be created in {folder} ({e.strerror or e})") from None


def cmd_index_tune(args: argparse.Namespace) -> None:
    from .index import load_index

    index = load_index(args.path)
    features = None
    if args.features:  # the exact vectors, so that recall counts the quantisation error of ivf_sq8 / ivf_pq
        from .shards import open_shards

        shards = open_shards(args.features)
        features = shards.take(np.arange(len(shards)))
    before = dict(index.params)
    args.k = min(args.k, len(index) - 1)  # each vector is a query for the others: at most n - 1 neighbours
    if args.k < 1:
        raise ValueError(f"{args.path} holds {len(index)} vector(s): too few to measure recall on")
    index.tune(target_recall=args.target_recall, k=args.k, features=features)
    index.save(args.path)
    changes = ", ".join(f"{name} {before.get(name)} -> {value}" for name, value in index.params.items() if before.get(name) != value)
    caveat = " against its own quantised vectors (give --features SHARDS_DIR for the exact ones)" if index.kind in ("ivf_sq8", "ivf_pq") and features is None else ""
    print(f"{args.path}: {changes or 'unchanged'}; recall@{args.k} {index.tuned_recall:.3f}{caveat} (target {args.target_recall})")


def _describe(index) -> str:
    """'ivf_pq (nlist=2564, m=234, nbits=8, nprobe=16), recall@10 0.87, 243 MiB'."""
    params = ", ".join(f"{name}={value}" for name, value in index.params.items())
    recall = f", recall@10 {index.tuned_recall:.3f}" if index.tuned_recall is not None else ""
    return f"{index.kind}{f' ({params})' if params else ''}{recall}, {index.nbytes / 2**20:.1f} MiB"


def cmd_serve(args: argparse.Namespace) -> None:
    from .server import serve

    options = {"host": args.host, "port": args.port, "device": args.device, "model": args.model, "download_root": args.root}
    if args.milvus and args.index_path:
        raise ValueError(f"give either INDEX ({args.index_path}) or --milvus URI --collection NAME, not both")
    if args.milvus:
        with _open_milvus(args) as index:  # closing writes Milvus Lite's pending state and frees its LOCK
            serve(index, **options)
    elif args.index_path:
        serve(args.index_path, **options)
    else:
        raise ValueError(NO_INDEX)


def cmd_export(args: argparse.Namespace) -> None:
    import openclip_lite as clip

    from .export import export_onnx

    model, _ = clip.load(args.model, device="cpu", download_root=args.root, image_size=args.image_size)
    config = export_onnx(model, args.onnx, opset=args.opset)
    print(f"exported {args.model} ({config['image_size']}px, {config['exporter']} exporter, opset {config['opset']}) to {args.onnx}: image.onnx, text.onnx, preprocess.json")


def _as_list(ids) -> list:
    return ids.tolist() if hasattr(ids, "tolist") else list(ids)


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"openclip-lite: warning: {message}", file=sys.stderr)


# argparse names a type function in its "invalid <name> value" message, so these raise their own instead


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number from 0 to 65535, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is from 0 to 65535, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="openclip-lite", description="OpenAI's CLIP models: zero-shot classification, embedding and search.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list the released models")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("download", help="fetch released models into the cache, for offline use later")
    p.add_argument("names", nargs="+", help="model names, e.g. ViT-B/32")
    p.add_argument("--root", help="cache directory (default: Hugging Face's cache, or ~/.cache/clip for --source openai)")
    p.add_argument("--source", choices=("hub", "openai"), help="where to download from (default: hub, or $OPENCLIP_LITE_SOURCE)")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("classify", help="zero-shot classify images against text labels")
    p.add_argument("images", nargs="*", help='image files (before --labels, or after a comma-separated --labels "a,b")')
    p.add_argument("--labels", nargs="+", required=True, help='labels, space- or comma-separated: --labels "red circle,blue square"')
    p.add_argument("--templates", help='"imagenet" for the 80 templates of the CLIP paper, or one template with {} (default: "a photo of a {}.")')
    p.add_argument("--top-k", type=_positive_int, default=3, help="labels to show per image (default: 3)")
    p.add_argument("--truncate", action="store_true", help="cut prompts too long for the model's context instead of failing")
    p.add_argument("--model", default="ViT-B/32", help="a released model name or a checkpoint path")
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: the best available)")
    p.add_argument("--root", help="download cache directory")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("embed", help="embed image folders/files into a search index")
    p.add_argument("inputs", nargs="+", help="folders (searched recursively for image files) and/or image files")
    p.add_argument("--out", required=True, help="index.pt or index.safetensors: one embeddings file (exact search); any other name: a FAISS index folder")
    p.add_argument("--model", default="ViT-B/32", help="a released model name or a checkpoint path")
    p.add_argument("--index", metavar="KIND", help="FAISS index kind for a folder --out: flat (default), ivf_flat, ivf_sq8, ivf_pq, hnsw or auto")
    p.add_argument("--memory-budget", metavar="SIZE", help="the most memory the index may use, e.g. 16G or 512M (units of 1024); without --index, picks the kind that fits (auto)")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="images per model call (default: 64)")
    p.add_argument("--num-workers", type=int, metavar="N", help="image decoding processes (default: one per CPU core, at most 16)")
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable image instead of skipping it")
    p.add_argument("--progress", action="store_true", help="always show the progress bar (default: for 1,000 images or more, on a terminal)")
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: the best available)")
    p.add_argument("--root", help="download cache directory")
    # --engine ray: openclip_lite.distributed.embed, Parquet shards + manifest.json in --out (a folder)
    p.add_argument("--engine", choices=("local", "ray"), default="local", help="local: this machine (default); ray: a Ray cluster, writing resumable Parquet shards to --out")
    p.add_argument("--address", help="--engine ray: the Ray cluster, e.g. ray://head:10001 (default: $RAY_ADDRESS, else a local Ray for this run)")
    p.add_argument("--actors", type=int, metavar="N", help="--engine ray: model actors (default: one per GPU, or one per 8 CPU cores)")
    p.add_argument("--num-gpus", type=float, metavar="G", help="--engine ray: GPUs per actor (default: 1 where the cluster has GPUs, else 0)")
    p.add_argument("--shard-size", type=int, metavar="N", help="--engine ray: images per Parquet shard (default: 10,000)")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("search", help="search an index made by `embed` with text and/or images")
    p.add_argument("index_path", metavar="INDEX", nargs="?", help="what `embed --out` wrote (an embeddings file or an index folder)")
    p.add_argument("queries", nargs="*", help='text queries, e.g. "two dogs in the snow"')
    p.add_argument("--milvus", metavar="URI", help="search a Milvus collection instead: a Milvus Lite file (*.db) or http://host:19530")
    p.add_argument("--collection", help="the Milvus collection, with --milvus")
    p.add_argument("--token", help="a Milvus server's token, with --milvus")
    p.add_argument("--image", action="append", default=[], metavar="FILE", help="an image to find similar images to (repeatable)")
    p.add_argument("-k", "--top-k", type=_positive_int, default=10, help="results per query")
    p.add_argument("--truncate", action="store_true", help="cut text queries too long for the model's context instead of failing")
    p.add_argument("--model", help="the model to encode queries with (default: the one that made the index)")
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: the best available)")
    p.add_argument("--root", help="download cache directory")
    p.add_argument("--json", action="store_true", help="print JSON instead of a list")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("serve", help="serve a search page and a JSON API over an index made by `embed`, or a Milvus collection")
    p.add_argument("index_path", metavar="INDEX", nargs="?", help="what `embed --out` wrote (an embeddings file or an index folder)")
    p.add_argument("--milvus", metavar="URI", help="serve a Milvus collection instead: a Milvus Lite file (*.db) or http://host:19530")
    p.add_argument("--collection", help="the Milvus collection, with --milvus")
    p.add_argument("--token", help="a Milvus server's token, with --milvus")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=_port, default=8000, help="port to listen on (default: 8000)")
    p.add_argument("--model", help="the model to encode queries with (default: the one that made the index)")
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: the best available)")
    p.add_argument("--root", help="download cache directory")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("index", help="manage indexes: build one from embedding shards, inspect or tune it, load shards into Milvus")
    index_sub = p.add_subparsers(dest="index_command", required=True)
    q = index_sub.add_parser("to-milvus", help="load the Parquet shards of `embed --engine ray` into a Milvus collection")
    q.add_argument("shards", metavar="SHARDS_DIR", help="the folder `embed --engine ray --out` wrote")
    q.add_argument("--uri", required=True, help="a Milvus Lite file (*.db) or a server, http://host:19530")
    q.add_argument("--collection", required=True, help="the collection to load into (created if missing; an interrupted load of the same shards resumes)")
    q.add_argument("--index-type", help="FLAT, IVF_FLAT, IVF_SQ8 or HNSW (default: the collection's, else FLAT)")
    q.add_argument("--token", help="a Milvus server's token")
    q.set_defaults(func=cmd_index_to_milvus)
    q = index_sub.add_parser("build", help="build a FAISS index from the Parquet shards of `embed --engine ray`, streaming them")
    q.add_argument("shards", metavar="SHARDS_DIR", help="the folder `embed --engine ray --out` wrote (local, or a pyarrow URI such as s3://...)")
    q.add_argument("--out", required=True, metavar="INDEX_DIR", help="the folder to save the index to (what `search` and `serve` open)")
    q.add_argument("--kind", default="auto", choices=("auto", "flat", "ivf_flat", "ivf_sq8", "ivf_pq", "hnsw"), help="default: auto, which picks by size and --memory-budget")
    q.add_argument("--memory-budget", metavar="SIZE", help="the most memory the index may use, e.g. 4G or 512M (units of 1024)")
    q.add_argument("--metric", default="cosine", choices=("cosine", "ip", "l2"), help="the similarity searched by (default: cosine)")
    q.add_argument("--target-recall", type=float, default=0.95, help="recall@10 to tune nprobe / efSearch to (default: 0.95)")
    q.add_argument("--model", help="the model name to record (default: the shards' manifest's)")
    q.set_defaults(func=cmd_index_build)
    q = index_sub.add_parser("info", help="what an index folder holds: kind, parameters, count, model, recall, size")
    q.add_argument("path", metavar="INDEX_DIR", help="an index folder (what `index build` or `embed --index` wrote)")
    q.add_argument("--json", action="store_true", help="print JSON instead of a list")
    q.set_defaults(func=cmd_index_info)
    q = index_sub.add_parser("tune", help="set an index's nprobe / efSearch to the smallest that reaches a recall, and save it")
    q.add_argument("path", metavar="INDEX_DIR", help="the index folder to tune; it is saved in place")
    q.add_argument("--target-recall", type=float, default=0.95, help="recall@k to reach, against exact search (default: 0.95)")
    q.add_argument("-k", type=_positive_int, default=10, help="the k of recall@k (default: 10; at most the index's size - 1)")
    q.add_argument("--features", metavar="SHARDS_DIR", help="the shards the index was built from: recall against their exact vectors (default: the index's own, quantised for ivf_sq8 / ivf_pq)")
    q.set_defaults(func=cmd_index_tune)

    p = sub.add_parser("export", help="export the image and text towers to ONNX, to run without PyTorch")
    p.add_argument("model", metavar="NAME_OR_PATH", help="a released model name or a checkpoint path")
    p.add_argument("--onnx", required=True, metavar="DIR", help="folder to write image.onnx, text.onnx and preprocess.json to")
    p.add_argument("--image-size", type=int, help="export for another input size (position embeddings resampled)")
    p.add_argument("--opset", type=int, help="ONNX opset version, 14 or newer (default: the exporter's); 14-17 use the TorchScript exporter, 18+ the dynamo one")
    p.add_argument("--root", help="download cache directory")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    dashed: list[str] = []
    if args.command == "search" and "--" in extra:  # `search INDEX -k 1 -- "-red"`: the words after "--" are queries
        cut = extra.index("--")
        extra, dashed = extra[:cut], extra[cut + 1 :]
    # argparse fills positionals once, so `search INDEX -k 5 "a query"` leaves the query over: it is a query
    if extra and args.command == "search" and not any(word.startswith("-") for word in extra):
        args.queries += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if dashed:  # after the words before "--", in the order given
        args.queries += dashed
    try:
        with warnings.catch_warnings():  # restores Python's own printer for callers of main() in a process of theirs
            # warnings are messages for the user here (a skipped image, 16-bit pixels clipped, a recall short of its
            # target): one plain line each, not Python's file:line and source line
            warnings.showwarning = _print_warning
            args.func(args)
    except BrokenPipeError:  # `openclip-lite models | head -1`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that Python's exit flush stays quiet
        return 1
    except (OpenCLIPLiteError, OSError, ValueError) as e:  # FileNotFoundError, PermissionError, FileExistsError...
        print(f"openclip-lite: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: the user knows why it stopped; 130 is the shell's code for SIGINT
        print("openclip-lite: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
