"""The `openclip-lite` command, run as a user runs it: a subprocess of the installed console script."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import Optional

import pytest
from hub_server import FileServer
from parquet_shards import write_shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(ROOT, "examples", "assets")
DEMO = os.path.join(ASSETS, "demo-model.safetensors")
LABELS = "red circle,blue square,green triangle,yellow circle,purple square,orange triangle"


def command(*args: str) -> list[str]:
    words = [shutil.which("openclip-lite") or sys.executable, *args]
    if words[0] == sys.executable:  # not installed as a console script: run the module
        words[1:1] = ["-m", "openclip_lite.cli"]
    return words


def run(*args: str, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    return subprocess.run(command(*args), capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})}, cwd=ROOT, check=False)


def samples() -> list[str]:
    return sorted(os.path.join(ASSETS, f) for f in os.listdir(ASSETS) if f.endswith(".jpg"))


def test_models_lists_the_nine_in_openai_order():
    result = run("models")
    assert result.returncode == 0, result.stderr
    names = [line.split()[0] for line in result.stdout.splitlines()]
    assert names == ["RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B/32", "ViT-B/16", "ViT-L/14", "ViT-L/14@336px"]


def test_classify_prints_a_table_with_the_right_top_label():
    images = samples()
    result = run("classify", *images, "--labels", LABELS, "--model", DEMO, "--device", "cpu", "--top-k", "2")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for image in images:
        first = lines[lines.index(image) + 1]
        label = re.match(r"\s+1\. (.+?)\s+\d+\.\d+%", first).group(1)
        assert label == os.path.basename(image)[: -len(".jpg")].replace("_", " "), result.stdout


def test_classify_json():
    image = os.path.join(ASSETS, "red_circle.jpg")
    result = run("classify", image, "--labels", "red circle", "blue square", "--model", DEMO, "--device", "cpu", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out[0]["image"] == image
    assert out[0]["top_k"][0]["label"] == "red circle"
    assert sum(row["probability"] for row in out[0]["top_k"]) == pytest.approx(1.0, abs=1e-5)


def test_classify_long_labels_need_truncate():
    image = os.path.join(ASSETS, "red_circle.jpg")
    long_label = "red circle " + "and more words " * 30  # past the 77-token context
    result = run("classify", image, "--labels", f"{long_label},blue square", "--model", DEMO, "--device", "cpu")
    assert result.returncode == 1 and "--truncate" in result.stderr and "Traceback" not in result.stderr
    result = run("classify", image, "--labels", f"{long_label},blue square", "--model", DEMO, "--device", "cpu", "--truncate", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)[0]["top_k"][0]["label"] == long_label.strip()


def test_classify_missing_image_is_one_clear_error(tmp_path):
    result = run("classify", str(tmp_path / "nope.jpg"), "--labels", "a,b", "--model", DEMO, "--device", "cpu")
    assert result.returncode == 1
    assert "nope.jpg" in result.stderr and "Traceback" not in result.stderr


def test_unknown_model_is_one_clear_error():
    result = run("classify", os.path.join(ASSETS, "red_circle.jpg"), "--labels", "a,b", "--model", "ViT-B/33", "--device", "cpu")
    assert result.returncode == 1
    assert "ViT-B/33" in result.stderr and "ViT-B/32" in result.stderr and "Traceback" not in result.stderr


def test_download_of_a_checkpoint_file_says_to_load_it():
    result = run("download", DEMO)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"is a local file ({DEMO})" in result.stderr and f"--model {DEMO}" in result.stderr
    assert "no file at" not in result.stderr


def test_ctrl_c_during_download_is_one_line_and_exit_code_130(tmp_path):
    from openclip_lite.pretrained import MODELS

    model = MODELS["RN50"]
    with FileServer() as server:
        path = f"/clip/models/{model.sha256}/{model.filename}"
        server.add(path, b"not the weights, never sent")
        server.delay_s = 120  # the body is held back: the download is in flight when Ctrl-C comes
        env = {**os.environ, "OPENCLIP_LITE_OPENAI_URL": server.url + "/clip/models"}
        env.pop("HF_HUB_OFFLINE", None), env.pop("OPENCLIP_LITE_OFFLINE", None)
        root = tmp_path / "cache"
        # Ctrl-C made KeyboardInterrupt in the child also where this test run was started in the background (CI):
        # SIGINT is ignored there, and a Python started so never raises it
        catch_ctrl_c = "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); from openclip_lite.cli import main; sys.exit(main())"
        args = [sys.executable, "-c", catch_ctrl_c, "download", "RN50", "--source", "openai", "--root", str(root)]
        child = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        try:
            deadline = time.monotonic() + 120
            while not server.requests("GET", path) and child.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            assert server.requests("GET", path), child.communicate(timeout=5)
            child.send_signal(signal.SIGINT)
            _, stderr = child.communicate(timeout=60)
        finally:
            if child.poll() is None:
                child.kill()
    assert child.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "openclip-lite: interrupted" and "Traceback" not in stderr
    assert sorted(os.listdir(root)) == [model.filename + ".lock"]  # no partial file left behind


def test_example_script_runs_offline():
    script = os.path.join(ROOT, "examples", "zero_shot_classification.py")
    result = subprocess.run(
        [sys.executable, script, "--model", DEMO, "--device", "cpu", *samples()],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", "OPENCLIP_LITE_OFFLINE": "1"}, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "red circle" in result.stdout and "%" in result.stdout


def test_shards_to_milvus_then_search_by_image(tmp_path):
    """`index to-milvus` loads embedding shards into Milvus Lite; `search --milvus` finds an image by itself."""
    import openclip_lite as clip

    model, preprocess = clip.load(DEMO, device="cpu")
    images = samples()
    features = clip.encode_images(model, preprocess, images, num_workers=0).features
    shards = tmp_path / "shards"
    write_shards(shards, images, features, [len(images)], {"model": DEMO, "dim": features.shape[1], "count": len(images)})
    uri = str(tmp_path / "milvus.db")

    result = run("index", "to-milvus", str(shards), "--uri", uri, "--collection", "shapes")
    assert result.returncode == 0, result.stderr
    assert f"{len(images)} vectors" in result.stdout

    query = os.path.join(ASSETS, "green_triangle.jpg")
    result = run("search", "--milvus", uri, "--collection", "shapes", "--image", query, "-k", "3", "--device", "cpu", "--json")
    assert result.returncode == 0, result.stderr
    top = json.loads(result.stdout)[0]["results"][0]
    assert top["path"] == query and top["score"] == pytest.approx(1.0, abs=1e-4)


def test_search_with_milvus_needs_a_collection(tmp_path):
    result = run("search", "--milvus", str(tmp_path / "m.db"), "a red circle")
    assert result.returncode == 1 and "--collection" in result.stderr
    # a mistyped Milvus Lite file: an error, and no empty database left under that name
    result = run("search", "--milvus", str(tmp_path / "typo.db"), "--collection", "shapes", "a red circle")
    assert result.returncode == 1 and "no Milvus Lite file at" in result.stderr and "Traceback" not in result.stderr
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------------- FAISS indexes


def write_photos(folder, n: int = 120) -> list[str]:
    """n small JPEGs of random coloured rectangles: different enough that each is its own nearest neighbour."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    folder.mkdir()
    paths = []
    for i in range(n):
        image = Image.new("RGB", (64, 64), tuple(int(c) for c in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(image)
        for _ in range(3):
            x0, y0 = (int(v) for v in rng.integers(0, 48, 2))
            draw.rectangle([x0, y0, x0 + 16, y0 + 16], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        paths.append(str(folder / f"{i:03d}.jpg"))
        image.save(paths[-1], quality=95)
    return paths


def info(index: str) -> dict:
    result = run("index", "info", index, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_embed_into_an_index_kind_then_info_tune_and_search(tmp_path):
    photos = write_photos(tmp_path / "photos")
    index = str(tmp_path / "photos-index")
    embed = ["embed", str(tmp_path / "photos"), "--model", DEMO, "--device", "cpu", "--num-workers", "0"]
    result = run(*embed, "--out", index, "--index", "ivf_flat", "--memory-budget", "4G")  # 4G: sizes as build_index reads them
    assert result.returncode == 0, result.stderr
    assert f"embedded {len(photos)} images" in result.stdout
    described = info(index)
    assert (described["kind"], described["count"], described["model"], described["paths"]) == ("ivf_flat", 120, DEMO, True)
    assert set(described["params"]) == {"nlist", "nprobe"} and 0 < described["index_bytes"] < described["file_bytes"]

    result = run("search", index, "--image", photos[17], "-k", "3", "--device", "cpu", "--json")
    assert result.returncode == 0, result.stderr
    top = json.loads(result.stdout)[0]["results"][0]
    assert top["path"] == os.path.abspath(photos[17]) and top["score"] == pytest.approx(1.0, abs=1e-4)

    # recall 1.0 asks for every cell: IVF-Flat then searches exactly
    result = run("index", "tune", index, "--target-recall", "1.0")
    assert result.returncode == 0 and "recall@10 1.000" in result.stdout, result.stdout + result.stderr
    tuned = info(index)
    assert tuned["tuned_recall"] == 1.0 and tuned["params"]["nprobe"] <= tuned["params"]["nlist"]

    result = run(*embed, "--out", str(tmp_path / "tiny-index"), "--memory-budget", "1K")  # a budget alone: auto
    assert result.returncode == 1 and "too small" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "tiny-index").exists()


def test_index_build_from_shards_then_search(tmp_path):
    import openclip_lite as clip

    photos = write_photos(tmp_path / "photos")
    model, preprocess = clip.load(DEMO, device="cpu")
    features = clip.encode_images(model, preprocess, photos, num_workers=0).features
    shards = tmp_path / "shards"
    write_shards(shards, photos, features, [70, 50], {"model": DEMO, "dim": features.shape[1], "count": len(photos)})

    index = str(tmp_path / "index")
    result = run("index", "build", str(shards), "--out", index, "--kind", "hnsw")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"120 vectors of {DEMO} from {shards}: hnsw (M=32")
    assert (info(index)["kind"], info(index)["count"]) == ("hnsw", 120)
    result = run("search", index, "--image", photos[99], "-k", "2", "--device", "cpu", "--json")  # model from the index
    assert result.returncode == 0, result.stderr
    top = json.loads(result.stdout)[0]["results"][0]
    assert top["path"] == photos[99] and top["score"] == pytest.approx(1.0, abs=1e-4)

    result = run("index", "tune", index, "--features", str(shards), "--target-recall", "0.9")  # the exact vectors
    assert result.returncode == 0 and "recall@10" in result.stdout, result.stderr
    assert info(index)["tuned_recall"] >= 0.9

    result = run("index", "build", str(tmp_path / "photos"), "--out", str(tmp_path / "bad"))
    assert result.returncode == 1 and "no Parquet shards" in result.stderr

    # a model given by a relative path is kept absolute, as embed keeps it: the index is searchable from anywhere
    result = run("index", "build", str(shards), "--out", str(tmp_path / "flat"), "--kind", "flat", "--model", os.path.relpath(DEMO, ROOT))
    assert result.returncode == 0, result.stderr
    assert info(str(tmp_path / "flat"))["model"] == DEMO


# ---------------------------------------------------------------------------------------------------- messages


def test_classify_images_may_follow_comma_separated_labels():
    images = [os.path.join(ASSETS, "red_circle.jpg"), os.path.join(ASSETS, "blue_square.jpg")]
    result = run("classify", "--labels", "red circle,blue square", *images, "--model", DEMO, "--device", "cpu", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert [row["image"] for row in out] == images
    assert [row["top_k"][0]["label"] for row in out] == ["red circle", "blue square"]
    assert {label["label"] for label in out[0]["top_k"]} == {"red circle", "blue square"}  # the images are no labels

    # space-separated labels, then images: not told apart, so the error says how to write it
    result = run("classify", "--labels", "red circle", "blue square", images[0], "--model", DEMO, "--device", "cpu")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "'blue square' is not a file" in result.stderr and '--labels "red circle,blue square" IMAGE...' in result.stderr
    result = run("classify", "--labels", "red circle,blue square", "--model", DEMO, "--device", "cpu")
    assert result.returncode == 1 and "give the image files to classify" in result.stderr


def test_index_build_of_a_file_says_it_takes_a_shards_folder(tmp_path):
    import torch

    from openclip_lite.search import save_embeddings

    embeddings = tmp_path / "photos.safetensors"
    save_embeddings(embeddings, torch.nn.functional.normalize(torch.ones(2, 4), dim=1), ["a.jpg", "b.jpg"], DEMO)
    result = run("index", "build", str(embeddings), "--out", str(tmp_path / "index"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"{embeddings} is a file, not a folder of embedding shards" in result.stderr and "does not exist" not in result.stderr
    assert "embed SOURCE --engine ray --out FOLDER" in result.stderr
    assert f"--out {tmp_path / 'photos'}-index --index auto" in result.stderr
    assert not (tmp_path / "index").exists()


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc, where no file can be created")
def test_embed_to_an_unwritable_place_names_the_out_path():
    out = "/proc/nope/x.safetensors"  # even root cannot create a file in /proc
    result = run("embed", os.path.join(ASSETS, "red_circle.jpg"), "--out", out, "--model", DEMO, "--device", "cpu")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"openclip-lite: error: cannot write {out}: no file can be created in /proc (No such file or directory)"


def test_warnings_are_one_plain_line_in_every_command(tmp_path):
    import numpy as np
    from PIL import Image

    path = tmp_path / "deep.png"
    pixels = np.linspace(0, 65535, 32 * 32).astype(np.uint16).reshape(32, 32)  # 16-bit values past 255: clipped
    Image.fromarray(pixels).save(path)
    classify = run("classify", str(path), "--labels", "red circle,blue square", "--model", DEMO, "--device", "cpu")
    embed = run("embed", str(path), "--out", str(tmp_path / "deep.safetensors"), "--model", DEMO, "--device", "cpu", "--num-workers", "0")
    for result in (classify, embed):
        assert result.returncode == 0, result.stderr
        assert result.stderr.splitlines() == [
            (
                f"openclip-lite: warning: {path} has mode I;16 with values from 0 to 65535; converting it to RGB "
                "clips them to 0..255, as OpenAI's clip does. Scale it to 8 bits first to keep the picture."
            )
        ]


def test_bad_numbers_are_told_without_internal_names():
    image = os.path.join(ASSETS, "red_circle.jpg")
    result = run("classify", image, "--labels", "a,b", "--top-k", "abc")
    assert result.returncode == 2
    assert "argument --top-k: expected a positive whole number, got 'abc'" in result.stderr and "_positive_int" not in result.stderr
    result = run("serve", "photos.safetensors", "--port", "abc")
    assert result.returncode == 2
    assert "argument --port: expected a port number from 0 to 65535, got 'abc'" in result.stderr and "_port" not in result.stderr


def test_every_argument_has_help():
    import argparse

    from openclip_lite.cli import build_parser

    def parsers(parser):
        yield parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from parsers(sub)

    lacking = [
        f"{parser.prog} {'/'.join(action.option_strings) or action.dest}"
        for parser in parsers(build_parser())
        for action in parser._actions
        if not action.help and not isinstance(action, argparse._SubParsersAction)
    ]
    assert lacking == []
    result = run("classify", "--help")
    assert result.returncode == 0 and "labels to show per image" in result.stdout


def test_embeddings_file_gets_the_mode_of_any_new_file(tmp_path):
    out = tmp_path / "shapes.safetensors"
    result = run("embed", os.path.join(ASSETS, "red_circle.jpg"), "--out", str(out), "--model", DEMO, "--device", "cpu", "--num-workers", "0")
    assert result.returncode == 0, result.stderr
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() creates files, not safetensors' 0600
    assert [p.name for p in tmp_path.iterdir()] == ["shapes.safetensors"]  # written under a temporary name, renamed


def test_embed_never_overwrites_what_is_not_embeddings(tmp_path):
    model = tmp_path / "mycopy.safetensors"
    shutil.copy(DEMO, model)
    notes = tmp_path / "notes.pt"
    notes.write_bytes(b"my notes")
    kept = model.read_bytes()
    embed = ["embed", *samples()[:2], "--model", str(model), "--device", "cpu", "--num-workers", "0"]
    for out in (model, notes):
        result = run(*embed, "--out", str(out))
        assert result.returncode == 1 and "is not an embeddings file" in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert model.read_bytes() == kept and notes.read_bytes() == b"my notes"

    out = tmp_path / "photos.safetensors"  # a re-run replaces its own earlier file
    for count in (2, 1):
        result = run("embed", *samples()[:count], "--out", str(out), "--model", DEMO, "--device", "cpu", "--num-workers", "0")
        assert result.returncode == 0 and f"embedded {count} images" in result.stdout, result.stderr

    # a checkpoint given to search as the index: the hint makes a new file with it as the model, never over it
    result = run("search", str(model), "a red circle")
    assert result.returncode == 1 and f"--model {model}" in result.stderr and f"--out {model}" not in result.stderr


def test_search_queries_too_long_after_dashes_and_in_any_script(tmp_path):
    out = tmp_path / "shapes.safetensors"
    result = run("embed", *samples(), "--out", str(out), "--model", DEMO, "--device", "cpu", "--num-workers", "0")
    assert result.returncode == 0, result.stderr
    long = "a photo of " * 30 + "a blue square"  # cut at 77 tokens, it would not mention the square
    result = run("search", str(out), long, "--device", "cpu")
    assert result.returncode == 1 and "--truncate" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    result = run("search", str(out), long, "--truncate", "--device", "cpu", "-k", "1")
    assert result.returncode == 0, result.stderr
    result = run("search", str(out), "-k", "1", "--device", "cpu", "a blue square", "--", "-red circle", "红色 circle")
    assert result.returncode == 0, result.stderr
    labels = [line for line in result.stdout.splitlines() if not line.startswith(" ")]
    assert labels == ['"a blue square"', '"-red circle"', '"红色 circle"']  # in the order given, as written
