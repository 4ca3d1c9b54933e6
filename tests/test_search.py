"""Batch embedding and search against OpenAI's code (random weights) and against brute force."""

import json
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from reference import openai_clip, reference_model, relative_error

import openclip_lite as clip
from openclip_lite.checkpoint import save_safetensors
from openclip_lite.cli import main
from openclip_lite.errors import ImageError
from openclip_lite.search import (
    SkippedImageWarning,
    list_images,
    load_embeddings,
    open_search_index,
    save_embeddings,
    save_search_index,
)

# (relative path, PIL mode, size): every extension, modes that need converting, sizes below and above the
# resolution, portrait and landscape, a nested folder and an upper-case extension
IMAGES = [
    ("a.jpg", "RGB", (64, 48)),
    ("b.png", "RGBA", (30, 45)),
    ("c.png", "L", (33, 33)),
    ("d.gif", "P", (50, 70)),
    ("e.webp", "RGB", (81, 40)),
    ("f.bmp", "RGB", (20, 20)),
    ("nested/g.tiff", "RGB", (45, 60)),
    ("nested/deeper/h.JPG", "RGB", (120, 90)),
    ("nested/i.jpeg", "CMYK", (40, 52)),
]


def make_image(mode: str, size: tuple, seed: int) -> Image.Image:
    """Smooth random colours plus noise, so that resizing and JPEG both have something to do."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize(size, Image.BILINEAR)
    noise = rng.integers(-20, 21, (size[1], size[0], 3))
    return Image.fromarray(np.clip(np.asarray(coarse, dtype=np.int64) + noise, 0, 255).astype(np.uint8)).convert(mode)


def write_images(folder) -> list[str]:
    paths = []
    for seed, (name, mode, size) in enumerate(IMAGES):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        make_image(mode, size, seed).save(path)
        paths.append(str(path))
    return paths


def write_broken(folder) -> tuple[str, str]:
    """A JPEG cut in half and a text file named .jpg."""
    buffer = folder / "whole.tmp"
    make_image("RGB", (64, 64), 99).save(buffer, format="JPEG")
    data = buffer.read_bytes()
    buffer.unlink()
    truncated, text = folder / "truncated.jpg", folder / "nested" / "notes.jpg"
    truncated.write_bytes(data[: len(data) // 2])
    text.write_text("this is not an image\n")
    return str(truncated), str(text)


def reference_features(ref, paths) -> torch.Tensor:
    """OpenAI's preprocess and encode_image on the files, normalised: the numbers we must reproduce."""
    preprocess = openai_clip.clip._transform(ref.visual.input_resolution)
    with torch.no_grad():
        features = ref.encode_image(torch.stack([preprocess(Image.open(path)) for path in paths]))
    return features / features.norm(dim=-1, keepdim=True)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """arch -> (reference model, our model loaded from its torch.save file, our preprocess, checkpoint path),
    made on first use."""
    made = {}

    def get(arch: str):
        if arch not in made:
            ref = reference_model(arch)
            checkpoint = tmp_path_factory.mktemp(arch) / "model.pt"
            torch.save(ref.state_dict(), checkpoint)
            model, preprocess = clip.load(str(checkpoint), device="cpu")
            made[arch] = ref, model, preprocess, str(checkpoint)
        return made[arch]

    return get


@pytest.fixture(scope="module")
def vit(models):
    return models("tiny-vit")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    write_images(folder)
    (folder / "notes.txt").write_text("not listed: not an image extension")
    (folder / ".hidden.jpg").write_text("not listed: hidden")
    (folder / ".cache").mkdir()
    make_image("RGB", (20, 20), 0).save(folder / ".cache" / "thumb.jpg")
    return folder


# ---------------------------------------------------------------------------------------------------- listing


def test_list_images_is_recursive_sorted_and_filtered(folder):
    listed = list_images(str(folder))
    assert [os.path.relpath(p, folder) for p in listed] == sorted(name for name, _, _ in IMAGES)
    # a file named directly is kept whatever its extension, and inputs keep their order
    assert list_images([str(folder / "notes.txt"), str(folder / "a.jpg")]) == [str(folder / "notes.txt"), str(folder / "a.jpg")]
    with pytest.raises(FileNotFoundError, match="missing"):
        list_images(str(folder / "missing"))
    # overlapping inputs list each file once, where it first comes: no duplicate rows in an index
    again = list_images([str(folder / "a.jpg"), str(folder), os.path.join(str(folder), ".", "")])
    assert again == [str(folder / "a.jpg")] + [p for p in listed if os.path.basename(p) != "a.jpg"]


# ---------------------------------------------------------------------------------------------------- images


# every batch size (1, 3, 7, all 9) with and without workers on the ViT; the ResNet at two points
CASES = [("tiny-vit", b, w) for b in (1, 3, 7, 64) for w in (0, 2)] + [("tiny-rn", 3, 2), ("tiny-rn", 64, 0)]


@pytest.mark.parametrize("arch, batch_size, num_workers", CASES)
def test_encode_images_matches_reference(models, folder, arch, batch_size, num_workers):
    ref, model, preprocess, _ = models(arch)
    paths = list_images(str(folder))
    features, kept, skipped = clip.encode_images(model, preprocess, paths, batch_size=batch_size, num_workers=num_workers)
    assert kept == list(range(len(paths))) and skipped == []
    assert features.shape == (len(paths), ref.text_projection.shape[1]) and features.dtype == torch.float32
    expected = reference_features(ref, paths)
    assert relative_error(features, expected) < 1e-5
    for row, expected_row in zip(features, expected):  # every image, not just the bulk
        assert relative_error(row, expected_row) < 1e-5


@pytest.mark.parametrize("arch", ["tiny-vit", "tiny-rn"])
def test_pipeline_pixels_are_exactly_preprocess(models, folder, arch):
    # the workers send uint8 pixels and the normalisation runs on the batch: the model must see bit-identical
    # input to preprocess(image), so with the same batch the features are bit-identical
    _, model, preprocess, _ = models(arch)
    paths = list_images(str(folder))
    features = clip.encode_images(model, preprocess, paths, batch_size=len(paths), num_workers=0).features
    with torch.no_grad():
        direct = model.encode_image(torch.stack([preprocess(Image.open(path)) for path in paths])).float()
    assert torch.equal(features, direct / direct.norm(dim=-1, keepdim=True))


def plain_preprocess(image):  # not a Compose: runs whole in the workers (module level, so workers can pickle it)
    return openai_clip.clip._transform(32)(image)


@pytest.mark.parametrize("kind", ["openai_preprocess", "plain_callable"])
def test_encode_images_takes_pil_images_and_any_preprocess(vit, folder, kind):
    ref, model, _, _ = vit
    paths = list_images(str(folder))
    inputs = [Image.open(path) if i % 2 else path for i, path in enumerate(paths)]
    preprocess = openai_clip.clip._transform(32) if kind == "openai_preprocess" else plain_preprocess
    features, kept, _ = clip.encode_images(model, preprocess, inputs, batch_size=4, num_workers=2)
    assert kept == list(range(len(paths)))
    assert relative_error(features, reference_features(ref, paths)) < 1e-5
    single = clip.encode_images(model, preprocess, paths[0]).features  # one input, not in a list
    assert relative_error(single, reference_features(ref, paths[:1])) < 1e-5


@pytest.mark.parametrize("num_workers", [0, 2])
def test_broken_files_are_skipped_with_a_warning_naming_each(vit, tmp_path, num_workers, capsys):
    ref, model, preprocess, _ = vit
    good = write_images(tmp_path)
    bad = write_broken(tmp_path)
    paths = list_images(str(tmp_path))
    with pytest.warns(SkippedImageWarning) as record:
        features, kept, skipped = clip.encode_images(model, preprocess, paths, batch_size=3, num_workers=num_workers, on_error="skip", progress=True)
    messages = [str(w.message) for w in record if w.category is SkippedImageWarning]
    assert len(messages) == 2 and all(any(path in m for m in messages) for path in bad)
    assert [paths[i] for i, _ in skipped] == sorted(bad) and all(paths[i] in reason for i, reason in skipped)
    assert [paths[i] for i in kept] == sorted(good)  # every good image kept, in order
    assert relative_error(features, reference_features(ref, [paths[i] for i in kept])) < 1e-5
    assert "embedding images" in capsys.readouterr().err  # the progress bar


@pytest.mark.parametrize("num_workers", [0, 2])
def test_warnings_in_workers_reach_the_caller(vit, tmp_path, num_workers):
    # a 16-bit image is clipped to 8 bits (as OpenAI's preprocessing does) with a warning; a worker's warning went
    # to the worker's stderr, where the caller could neither catch nor filter it
    _, model, preprocess, _ = vit
    deep = tmp_path / "deep.png"
    Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).save(deep)
    paths = [*write_images(tmp_path)[:3], str(deep)]
    with pytest.warns(UserWarning, match="deep.png has mode I") as record:
        clip.encode_images(model, preprocess, paths, batch_size=2, num_workers=num_workers)
    assert sum("deep.png" in str(w.message) for w in record) == 1


def test_broken_files_raise_by_default(vit, tmp_path):
    _, model, preprocess, _ = vit
    good = write_images(tmp_path)
    truncated, _ = write_broken(tmp_path)
    for workers in (0, 2):
        with pytest.raises(ImageError, match="truncated.jpg"):
            clip.encode_images(model, preprocess, [good[0], truncated, good[1]], batch_size=2, num_workers=workers)
    with pytest.raises(FileNotFoundError, match="gone.jpg"):
        clip.encode_images(model, preprocess, [good[0], str(tmp_path / "gone.jpg")])
    with pytest.raises(ValueError, match="on_error"):
        clip.encode_images(model, preprocess, good, on_error="ignore")


def test_tensors_and_folders_are_not_taken_for_images(vit, tmp_path):
    _, model, preprocess, _ = vit
    with pytest.raises(TypeError, match="model.encode_image"):
        clip.encode_images(model, preprocess, torch.zeros(2, 3, 32, 32))
    write_images(tmp_path / "photos")
    with pytest.raises(IsADirectoryError, match="list_images"):
        clip.encode_images(model, preprocess, tmp_path / "photos", on_error="skip")


def test_empty_input_gives_empty_features(vit):
    ref, model, preprocess, _ = vit
    features, kept, skipped = clip.encode_images(model, preprocess, [])
    assert features.shape == (0, ref.text_projection.shape[1]) and kept == [] and skipped == []


# ---------------------------------------------------------------------------------------------------- texts

TEXTS = ["a dog", "two dogs in the snow, seen from far away on a bright winter morning", "", "a red circle", "a photo of a cat."]


@pytest.mark.parametrize("batch_size", [1, 2, 256])
def test_encode_texts_matches_reference(vit, batch_size):
    ref, model, _, _ = vit
    with torch.no_grad():
        expected = ref.encode_text(openai_clip.tokenize(TEXTS))
    expected = expected / expected.norm(dim=-1, keepdim=True)
    features = clip.encode_texts(model, TEXTS, batch_size=batch_size)
    assert features.shape == expected.shape and features.dtype == torch.float32
    for row, expected_row in zip(features, expected):  # in the order given, though batched by length
        assert relative_error(row, expected_row) < 1e-5
    assert relative_error(clip.encode_texts(model, TEXTS[1]), expected[1:2]) < 1e-5


# ---------------------------------------------------------------------------------------------------- search


def brute_force(queries: torch.Tensor, index: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every cosine similarity at once, then topk: what chunked search must reproduce."""
    return (F.normalize(queries.double(), dim=-1) @ F.normalize(index.double(), dim=-1).T).topk(k, dim=1)


@pytest.fixture(scope="module")
def random_index():
    g = torch.Generator().manual_seed(0)
    index = torch.randn(2000, 48, generator=g) * torch.rand(2000, 1, generator=g) * 5  # rows of many norms
    queries = torch.randn(9, 48, generator=g)
    return queries, index


@pytest.mark.parametrize("k", [1, 10, 100])
def test_search_equals_brute_force(random_index, k):
    queries, index = random_index
    scores, indices = clip.search(queries, index, k=k)
    expected_scores, expected_indices = brute_force(queries, index, k)
    assert scores.shape == indices.shape == (len(queries), k) and indices.dtype == torch.long
    assert torch.equal(indices, expected_indices)
    torch.testing.assert_close(scores.double(), expected_scores, rtol=0, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 7, 100, 1999, 2000, 5000])
def test_chunked_search_equals_unchunked(random_index, chunk_size):
    queries, index = random_index
    scores, indices = clip.search(queries, index, k=10, chunk_size=chunk_size)
    whole_scores, whole_indices = clip.search(queries, index, k=10, chunk_size=len(index))
    assert torch.equal(indices, whole_indices)
    torch.testing.assert_close(scores, whole_scores, rtol=0, atol=1e-6)


def test_search_edge_cases(random_index):
    queries, index = random_index
    scores, indices = clip.search(queries[0], index[:5], k=10)  # one query as (dim,), k above n
    assert scores.shape == (1, 5) and sorted(indices[0].tolist()) == [0, 1, 2, 3, 4]
    scores, indices = clip.search(queries.numpy(), index.half(), k=3)  # numpy queries, fp16 index
    assert torch.equal(indices, brute_force(queries, index.half().float(), 3)[1])
    with pytest.raises(ValueError, match="48 dimensions but the index has 40"):
        clip.search(queries, index[:, :40])
    for k in (0, 2.0, True, "3"):
        with pytest.raises(ValueError, match="k must be a positive integer"):
            clip.search(queries, index, k=k)


def test_search_refuses_rows_without_a_direction(random_index):
    # a NaN row would come first for every query (NaN sorts first in topk), a zero query finds arbitrary rows
    queries, index = random_index
    broken = index.clone()
    broken[1500, 3] = float("nan")
    with pytest.raises(ValueError, match="index row 1500 holds NaN"):
        clip.search(queries, broken, chunk_size=1000)
    bad_queries = queries.clone()
    bad_queries[3, 0] = float("inf")
    with pytest.raises(ValueError, match="query 3 is all zeros or holds NaN or infinite"):
        clip.search(bad_queries, index)
    with pytest.raises(ValueError, match="query 0 is all zeros"):
        clip.search(torch.zeros(48), index)
    broken[1500, 3] = float("inf")  # found from the answers, wherever the row falls in the chunks
    for chunk_size in (1, 7, 1000, 5000):
        with pytest.raises(ValueError, match="index row 1500 holds NaN"):
            clip.search(queries, broken, k=1, chunk_size=chunk_size)


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 1000])
def test_equal_scores_come_in_row_order(chunk_size):
    # one-hot rows: every dot product is one exact multiplication, so equal rows tie exactly in every chunking
    rows = torch.tensor([2, 0, 1, 0, 2, 1, 0, 0, 1, 2, 0])
    index = torch.eye(4)[rows]
    query = torch.tensor([3.0, 2.0, 1.0, 0.0])
    expected = [i for value in (0, 1, 2) for i in range(len(rows)) if rows[i] == value]  # by score, then by row
    _, indices = clip.search(query, index, k=len(rows), chunk_size=chunk_size)
    assert indices[0].tolist() == expected


@pytest.mark.slow
def test_search_a_million_rows():
    g = torch.Generator().manual_seed(1)
    index, queries = torch.randn(1_000_000, 16, generator=g), torch.randn(3, 16, generator=g)
    indices = clip.search(queries, index, k=5)[1]
    assert torch.equal(indices, brute_force(queries, index, 5)[1])


@pytest.mark.cuda
def test_search_on_gpu_in_bounded_memory():
    g = torch.Generator().manual_seed(2)
    cpu_index, queries = torch.randn(200_000, 64, generator=g), torch.randn(50, 64, generator=g)
    expected = clip.search(queries, cpu_index, k=10)[1]
    assert torch.equal(clip.search(queries, cpu_index, k=10, device="cuda")[1].cpu(), expected)  # streamed
    index = cpu_index.cuda()
    assert torch.equal(clip.search(queries.cuda(), index, k=10)[1].cpu(), expected)
    big = torch.randn(1_000_000, 512, device="cuda", dtype=torch.float16)  # 1 GB
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    clip.search(torch.randn(4096, 512, device="cuda"), big, k=10)
    # scores of 1024 queries x 32768 rows (128 MiB) plus one float32 chunk and its normalised copy (2 x 64 MiB)
    assert torch.cuda.max_memory_allocated() - before < 600 * 2**20


# ---------------------------------------------------------------------------------------------------- files


def test_embeddings_file_round_trip_and_format(tmp_path):
    from safetensors import safe_open

    features = F.normalize(torch.randn(4, 8), dim=-1)
    paths = ["/a/b.jpg", "/ü/日本.png", 'quote".jpg', "/x/new\nline.jpg"]
    path = tmp_path / "index.pt"
    save_embeddings(path, features, paths, "ViT-B/32")
    loaded = load_embeddings(path)
    assert torch.equal(loaded.features, features) and loaded.paths == paths and loaded.model == "ViT-B/32"
    assert len(loaded) == 4
    with safe_open(str(path), framework="pt") as f:  # a plain safetensors file, readable by any safetensors reader
        assert f.metadata()["model"] == "ViT-B/32" and set(f.keys()) == {"features", "paths"}
    scores, ids = open_search_index(path).search(features[2:3], 1)
    assert ids.tolist() == [[2]] and abs(scores.item() - 1) < 1e-6
    with pytest.raises(ValueError, match="must match"):
        save_embeddings(path, features, paths[:3], "ViT-B/32")
    with pytest.raises(ValueError, match="single embeddings file"):
        save_search_index(tmp_path / "x.safetensors", features, paths, "m", kind="hnsw")
    broken = features.clone()
    broken[1, 0] = float("nan")
    with pytest.raises(ValueError, match="features row 1 holds NaN"):
        save_embeddings(tmp_path / "nan.pt", broken, paths, "m")
    assert not (tmp_path / "nan.pt").exists()
    save_embeddings(tmp_path / "unnamed.pt", features[:2], [tmp_path / "a.jpg", "b.jpg"], None)  # Paths, no model
    unnamed = load_embeddings(tmp_path / "unnamed.pt")
    assert unnamed.paths == [str(tmp_path / "a.jpg"), "b.jpg"] and unnamed.model == ""
    with pytest.raises(TypeError):
        save_embeddings(tmp_path / "ints.pt", features[:2], [1, 2], "m")


class _Payload:
    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_search_never_unpickles(tmp_path):
    # a pickle that creates a folder when loaded: opening it as an index must refuse without running it
    payload = _Payload()
    payload.marker = str(tmp_path / "code-ran")
    evil = tmp_path / "index.pt"
    evil.write_bytes(pickle.dumps(payload))
    torch.save({"features": torch.zeros(1, 8)}, tmp_path / "torch.pt")
    with pytest.raises((ValueError, OSError)):
        open_search_index(evil)
    assert not os.path.exists(payload.marker)
    with pytest.raises((ValueError, OSError)):
        open_search_index(tmp_path / "torch.pt")
    checkpoint = tmp_path / "model.safetensors"  # a safetensors file that is a model, not embeddings
    save_safetensors({"w": torch.zeros(2)}, checkpoint)
    with pytest.raises(ValueError, match="not openclip-lite embeddings"):
        load_embeddings(checkpoint)


# ---------------------------------------------------------------------------------------------------- command line


def results(stdout: str) -> dict[str, list[tuple[str, float]]]:
    """Parse `openclip-lite search` output: query line -> [(path, score)]."""
    blocks: dict[str, list] = {}
    for line in stdout.splitlines():
        if not line.startswith("  "):
            query = line
            blocks[query] = []
        else:
            _, score, path = line.split(maxsplit=2)
            blocks[query].append((path, float(score)))
    return blocks


def test_cli_embed_and_search(vit, tmp_path, capsys):
    checkpoint = vit[3]
    good = write_images(tmp_path / "photos")
    bad = write_broken(tmp_path / "photos")
    out = tmp_path / "index.pt"
    assert main(["embed", str(tmp_path / "photos"), "--out", str(out), "--model", checkpoint, "--device", "cpu", "--num-workers", "2", "--batch-size", "4"]) == 0
    captured = capsys.readouterr()
    assert f"embedded {len(good)} images" in captured.out and "skipped 2" in captured.out
    assert all(path in captured.err for path in bad)
    assert load_embeddings(out).model == checkpoint
    strict = ["embed", str(tmp_path / "photos"), "--out", str(tmp_path / "strict.pt"), "--model", checkpoint, "--device", "cpu", "--strict"]
    assert main(strict) == 1 and min(bad) in capsys.readouterr().err and not (tmp_path / "strict.pt").exists()

    query = good[5]
    assert main(["search", str(out), "two dogs in the snow", "--image", query, "-k", "3", "--device", "cpu"]) == 0
    blocks = results(capsys.readouterr().out)
    assert list(blocks) == ['"two dogs in the snow"', f"image {query}"]
    assert len(blocks['"two dogs in the snow"']) == 3
    assert {path for path, _ in blocks['"two dogs in the snow"']} <= {os.path.abspath(p) for p in good}
    top_path, top_score = blocks[f"image {query}"][0]
    assert top_path == os.path.abspath(query) and abs(top_score - 1) < 1e-3
    assert blocks[f"image {query}"][1][1] < top_score

    assert main(["search", str(out), "--image", good[0], "--json", "--device", "cpu"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer[0]["image"] == good[0] and answer[0]["results"][0]["path"] == os.path.abspath(good[0]) and len(answer[0]["results"]) == len(good)


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["search", str(tmp_path / "none.pt"), "a dog"]) == 1
    assert "no index or embeddings file" in capsys.readouterr().err
    (tmp_path / "empty.safetensors").write_bytes(b"")  # an interrupted copy: said to be no embeddings file, not "not a folder"
    assert main(["search", str(tmp_path / "empty.safetensors"), "a dog"]) == 1
    assert "is not an embeddings file" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["embed", str(tmp_path / "empty"), "--out", str(tmp_path / "x.pt"), "--model", "ViT-B/32"]) == 1
    assert "no image files" in capsys.readouterr().err


def test_cli_query_after_options_and_bad_numbers(vit, tmp_path, capsys):
    checkpoint = vit[3]
    good = write_images(tmp_path / "photos")
    out = tmp_path / "index.pt"
    assert main(["embed", str(tmp_path / "photos"), "--out", str(out), "--model", checkpoint, "--device", "cpu", "--num-workers", "0"]) == 0
    capsys.readouterr()
    assert main(["search", str(out), " "]) == 1 and "a text query is empty" in capsys.readouterr().err
    # `--image a.jpg b.jpg` leaves b.jpg a text query: refused with the fix, not searched for as words
    assert main(["search", str(out), "--image", good[0], good[1]]) == 1 and f"--image {good[1]}" in capsys.readouterr().err
    # the query after an option is still a query (argparse alone would call it an unrecognized argument)
    assert main(["search", str(out), "-k", "2", "--device", "cpu", "two dogs in the snow"]) == 0
    blocks = results(capsys.readouterr().out)
    assert list(blocks) == ['"two dogs in the snow"'] and len(blocks['"two dogs in the snow"']) == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["search", str(out), "--no-such-flag", "a dog"])
    assert exit_info.value.code == 2 and "--no-such-flag" in capsys.readouterr().err
    bad_numbers = {
        "-k 0": (["search", str(out), "-k", "0", "a dog"], "must be at least 1, got 0"),
        "--top-k -1": (["classify", good[0], "--labels", "a,b", "--top-k", "-1"], "must be at least 1, got -1"),
        "--port 99999": (["serve", str(out), "--port", "99999"], "a port is from 0 to 65535, got 99999"),
    }
    for argv, message in bad_numbers.values():
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_cli_embed_checks_out_before_embedding(tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    write_images(tmp_path / "photos")
    # the model name is never looked up: the unwritable --out is found first
    argv = ["embed", str(tmp_path / "photos"), "--out", str(tmp_path / "a-file" / "index.pt"), "--model", "no-such-model"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "a-file" in err and "no-such-model" not in err and len(err.strip().splitlines()) == 1


def test_cli_embed_checks_index_options_before_embedding(vit, tmp_path, capsys):
    # each of these was refused only after every image had been embedded, and the work was lost
    write_images(tmp_path / "photos")
    write_broken(tmp_path / "photos")  # embedding would print a "skipped" line for each
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("not an index")
    base = ["embed", str(tmp_path / "photos"), "--model", vit[3], "--device", "cpu", "--num-workers", "0"]
    for extra, message in [
        (["--out", str(tmp_path / "idx"), "--index", "bogus"], "unknown index kind 'bogus'"),
        (["--out", str(tmp_path / "notes")], "non-empty directory that holds no index"),
        (["--out", str(tmp_path / "idx"), "--index", "hnsw", "--memory-budget", "1K"], "over memory_budget"),
        (["--out", str(tmp_path / "idx.pt"), "--index", "hnsw"], "names a single embeddings file"),
    ]:
        assert main(base + extra) == 1
        err = capsys.readouterr().err
        assert message in err and "skipped" not in err, err
    assert not (tmp_path / "idx").exists() and not (tmp_path / "idx.pt").exists()


def test_cli_embed_with_ray_needs_a_folder_not_a_file_name(tmp_path, capsys):
    write_images(tmp_path / "photos")
    assert main(["embed", str(tmp_path / "photos"), "--engine", "ray", "--out", str(tmp_path / "r.safetensors"), "--model", "no-such-model"]) == 1
    assert "--out " + str(tmp_path / "r-shards") in capsys.readouterr().err and not (tmp_path / "r.safetensors").exists()


def test_saving_embeddings_never_replaces_another_file(tmp_path):
    # `embed --out` mistyped as the model's checkpoint, or any other file, must keep that file
    features = F.normalize(torch.randn(2, 8), dim=-1)
    checkpoint = tmp_path / "model.safetensors"
    save_safetensors({"visual.proj": torch.zeros(2, 2)}, checkpoint)
    notes = tmp_path / "notes.pt"
    notes.write_bytes(b"my notes")
    for path in (checkpoint, notes):
        before = path.read_bytes()
        with pytest.raises(ValueError, match="exists and is not an embeddings file"):
            save_embeddings(path, features, ["a.jpg", "b.jpg"], "ViT-B/32")
        assert path.read_bytes() == before
    # an earlier embeddings file is what a re-run replaces, even one cut short
    out = tmp_path / "photos.safetensors"
    save_embeddings(out, features, ["a.jpg", "b.jpg"], "ViT-B/32")
    out.write_bytes(out.read_bytes()[:-16])
    save_embeddings(out, features[:1], ["c.jpg"], "ViT-B/32")
    assert load_embeddings(out).paths == ["c.jpg"]
    empty = tmp_path / "empty.safetensors"  # an empty file holds nothing to keep (a tempfile made for the output)
    empty.touch()
    save_embeddings(empty, features, ["a.jpg", "b.jpg"], "ViT-B/32")
    assert load_embeddings(empty).paths == ["a.jpg", "b.jpg"]
