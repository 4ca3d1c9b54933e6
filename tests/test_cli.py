"""The `openclip-lite` command, run as a user runs it: a subprocess of the installed console script."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(ROOT, "examples", "assets")
DEMO = os.path.join(ASSETS, "demo-model.safetensors")
LABELS = "red circle,blue square,green triangle,yellow circle,purple square,orange triangle"


def run(*args: str, env: dict = None) -> subprocess.CompletedProcess:
    command = [shutil.which("openclip-lite") or sys.executable, *args]
    if command[0] == sys.executable:  # not installed as a console script: run the module
        command[1:1] = ["-m", "openclip_lite.cli"]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})}, cwd=ROOT)


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


def test_classify_missing_image_is_one_clear_error(tmp_path):
    result = run("classify", str(tmp_path / "nope.jpg"), "--labels", "a,b", "--model", DEMO, "--device", "cpu")
    assert result.returncode == 1
    assert "nope.jpg" in result.stderr and "Traceback" not in result.stderr


def test_unknown_model_is_one_clear_error():
    result = run("classify", os.path.join(ASSETS, "red_circle.jpg"), "--labels", "a,b", "--model", "ViT-B/33", "--device", "cpu")
    assert result.returncode == 1
    assert "ViT-B/33" in result.stderr and "ViT-B/32" in result.stderr and "Traceback" not in result.stderr


def test_example_script_runs_offline():
    script = os.path.join(ROOT, "examples", "zero_shot_classification.py")
    result = subprocess.run(
        [sys.executable, script, "--model", DEMO, "--device", "cpu", *samples()],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", "OPENCLIP_LITE_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert "red circle" in result.stdout and "%" in result.stdout


def test_shards_to_milvus_then_search_by_image(tmp_path):
    """`index to-milvus` loads embedding shards into Milvus Lite; `search --milvus` finds an image by itself."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    import openclip_lite as clip

    model, preprocess = clip.load(DEMO, device="cpu")
    images = samples()
    features = clip.encode_images(model, preprocess, images, num_workers=0).features
    shards = tmp_path / "shards"
    shards.mkdir()
    table = pa.table({"path": images, "embedding": pa.array(features.tolist(), type=pa.list_(pa.float32()))})
    pq.write_table(table, shards / "part-00000.parquet")
    (shards / "manifest.json").write_text(json.dumps({"model": DEMO, "dim": features.shape[1], "count": len(images)}))
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
