"""ONNX export: onnxruntime's outputs against our PyTorch model, on random weights in OpenAI's layout.

Our model is itself checked against OpenAI's code in test_model.py; here onnxruntime must give the same
features for batch sizes other than the one the graph was traced with.
"""

import importlib.util
import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from reference import reference_model, relative_error

import openclip_lite as clip
from openclip_lite.cli import main
from openclip_lite.export import export_onnx
from openclip_lite.transform import MEAN, STD, preprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "examples", "assets", "demo-model.safetensors")
TEXTS = ["a photo of a dog.", "", "a much longer caption about a small cat sitting on a red mat in the sun", "red circle", "a", "x " * 40, "two dogs"]


@pytest.fixture(scope="module", params=["ViT-B/32", "RN50", "demo"])
def exported(request, tmp_path_factory):
    """(our model, the folder it was exported to): ViT-B/32 through the CLI, the others through `export_onnx`."""
    directory = tmp_path_factory.mktemp("onnx")
    if request.param == "demo":
        if not os.path.exists(DEMO):
            pytest.skip(f"{DEMO} is not there yet (tools/train_demo_model.py makes it)")
        path = DEMO
    else:
        path = str(directory / "model.pt")
        torch.save(reference_model(request.param).state_dict(), path)
    model, _ = clip.load(path, device="cpu")
    if request.param == "ViT-B/32":
        assert main(["export", path, "--onnx", str(directory / "out")]) == 0
    else:
        export_onnx(model, directory / "out")
    return model, directory / "out"


@pytest.mark.parametrize("batch", [1, 7])
def test_onnxruntime_equals_torch(exported, batch):
    model, directory = exported
    res = model.visual.input_resolution
    image = torch.randn(batch, 3, res, res, generator=torch.Generator().manual_seed(batch))
    text = clip.tokenize(TEXTS[:batch])
    assert text.dtype == torch.int32  # what the graph takes: tokenize's output as it is
    providers = ["CPUExecutionProvider"]
    image_session = ort.InferenceSession(str(directory / "image.onnx"), providers=providers)
    text_session = ort.InferenceSession(str(directory / "text.onnx"), providers=providers)
    with torch.no_grad():
        image_features, text_features = model.encode_image(image), model.encode_text(text)
    (onnx_image,) = image_session.run(None, {"image": image.numpy()})
    (onnx_text,) = text_session.run(None, {"text": text.numpy()})
    assert onnx_image.shape == tuple(image_features.shape) and onnx_text.shape == tuple(text_features.shape)
    assert relative_error(torch.from_numpy(onnx_image), image_features) <= 1e-4
    assert relative_error(torch.from_numpy(onnx_text), text_features) <= 1e-4


def test_graphs_pass_the_checker_with_a_dynamic_batch(exported):
    _, directory = exported
    for name, dtype in (("image", onnx.TensorProto.FLOAT), ("text", onnx.TensorProto.INT32)):
        path = str(directory / f"{name}.onnx")
        onnx.checker.check_model(path, full_check=True)  # by path: the way that works past 2 GB too
        graph = onnx.load(path, load_external_data=False).graph
        (inp,), (out,) = graph.input, graph.output
        assert (inp.name, inp.type.tensor_type.elem_type) == (name, dtype)
        assert out.name == f"{name}_features"
        batch = inp.type.tensor_type.shape.dim[0]
        assert batch.dim_param and not batch.HasField("dim_value"), "the batch dimension is fixed"


def test_preprocess_json(exported):
    model, directory = exported
    with open(directory / "preprocess.json") as f:
        config = json.load(f)
    assert config["image_size"] == model.visual.input_resolution
    assert config["mean"] == list(MEAN) and config["std"] == list(STD)
    assert config["interpolation"] == "bicubic"
    assert config["context_length"] == model.context_length
    assert config["logit_scale"] == pytest.approx(float(model.logit_scale.detach().exp()), rel=1e-6)
    assert config["exporter"] in ("dynamo", "torchscript")


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("mode, size", [("RGB", (300, 200)), ("RGB", (201, 333)), ("L", (64, 64)), ("RGBA", (50, 71)), ("P", (640, 479))])
def test_numpy_preprocess_equals_ours(mode, size):
    example = load_example("onnx_inference")
    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    for n_px in (64, 224):
        expected = preprocess(n_px)(image).numpy()
        np.testing.assert_array_equal(example.preprocess(image, n_px, MEAN, STD), expected)
