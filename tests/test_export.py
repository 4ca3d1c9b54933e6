"""ONNX export: onnxruntime's outputs against our PyTorch model, on random weights in OpenAI's layout.

Our model is itself checked against OpenAI's code in test_model.py; here onnxruntime must give the same
features for batch sizes other than the one the graph was traced with.
"""

import importlib.util
import json
import os
import stat

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from reference import reference_model, relative_error

import openclip_lite as clip
from openclip_lite.cli import main
from openclip_lite.export import ExportError, export_onnx
from openclip_lite.model import build_model
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
    assert config["opset"] == opset_of(directory / "image.onnx") == opset_of(directory / "text.onnx")


def opset_of(path) -> int:
    """The ONNX opset a graph file imports, read from the file itself."""
    (version,) = [entry.version for entry in onnx.load(str(path), load_external_data=False).opset_import if entry.domain == ""]
    return version


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(a tiny ViT's checkpoint, our model loaded from it): small enough to export in a second or two."""
    path = str(tmp_path_factory.mktemp("tiny") / "tiny-vit.pt")
    torch.save(reference_model("tiny-vit").state_dict(), path)
    model, _ = clip.load(path, device="cpu")
    return path, model


@pytest.mark.parametrize("opset", [14, 17, 18])
def test_the_opset_asked_for_is_the_one_written(tiny, tmp_path, capfd, opset):
    """14 to 17 only the TorchScript exporter writes; the dynamo one made them opset 18, or an invalid graph (17)."""
    path, model = tiny
    out = tmp_path / "out"
    if opset == 17:  # the CLI's --opset, as a user gives it
        assert main(["export", path, "--onnx", str(out), "--opset", "17"]) == 0
    else:
        export_onnx(model, out, opset=opset)
    assert sorted(os.listdir(out)) == ["image.onnx", "preprocess.json", "text.onnx"]
    os.mkdir(tmp_path / "made_by_mkdir")  # a new folder gets the umask's permissions, as from os.makedirs
    assert stat.S_IMODE(os.stat(out).st_mode) == stat.S_IMODE(os.stat(tmp_path / "made_by_mkdir").st_mode)
    assert opset_of(out / "image.onnx") == opset_of(out / "text.onnx") == opset
    with open(out / "preprocess.json") as f:
        assert json.load(f)["opset"] == opset
    assert "Traceback" not in capfd.readouterr().err  # choosing the exporter that can write the opset is no failure
    res = model.visual.input_resolution
    image = torch.randn(3, 3, res, res, generator=torch.Generator().manual_seed(opset))
    text = clip.tokenize(TEXTS[:3])
    providers = ["CPUExecutionProvider"]
    (onnx_image,) = ort.InferenceSession(str(out / "image.onnx"), providers=providers).run(None, {"image": image.numpy()})
    (onnx_text,) = ort.InferenceSession(str(out / "text.onnx"), providers=providers).run(None, {"text": text.numpy()})
    with torch.no_grad():
        assert relative_error(torch.from_numpy(onnx_image), model.encode_image(image)) <= 1e-4
        assert relative_error(torch.from_numpy(onnx_text), model.encode_text(text)) <= 1e-4


@pytest.mark.parametrize(
    "opset, dynamo, names",
    [
        (13, None, "14 or newer"),  # scaled_dot_product_attention has no ONNX form before 14
        (9, False, "14 or newer"),
        (17, True, "opset 18 and newer"),  # the dynamo exporter cannot go below 18
        (21, False, "14 to 20"),  # nor the TorchScript one above 20
    ],
)
def test_an_opset_that_cannot_be_written_is_refused_before_anything_is_written(tiny, tmp_path, opset, dynamo, names):
    _, model = tiny
    with pytest.raises(ExportError, match=names):
        export_onnx(model, tmp_path / "out", opset=opset, dynamo=dynamo)
    assert os.listdir(tmp_path) == []


def fail_on_text(module, args, output):
    raise RuntimeError("the text tower cannot be exported")


def test_a_failed_export_leaves_the_folder_as_it_was(tmp_path):
    """The image tower exports, the text tower fails: neither the earlier export nor the new image.onnx may mix."""
    out = tmp_path / "out"
    export_onnx(build_model(reference_model("tiny-vit", seed=1).state_dict()), out, dynamo=False)
    (out / "notes.txt").write_text("a user's own file")
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    model = build_model(reference_model("tiny-vit").state_dict())  # other weights: a new image.onnx differs
    model.transformer.register_forward_hook(fail_on_text)  # the text tower's transformer, not the image's
    with pytest.raises(ExportError, match="text.onnx.*the text tower cannot be exported"):
        export_onnx(model, out, dynamo=False)
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
    assert os.listdir(tmp_path) == ["out"]
    # both exporters, the dynamo one first, into a folder whose parent does not exist either
    with pytest.raises(ExportError, match="text.onnx.*the text tower cannot be exported"), pytest.warns(UserWarning, match="dynamo exporter failed"):
        export_onnx(model, tmp_path / "new" / "onnx")
    assert os.listdir(tmp_path) == ["out"]  # neither the folder nor its parent, nor a temporary folder


def test_a_folder_where_a_file_goes_is_kept(tiny, tmp_path):
    _, model = tiny
    (tmp_path / "out" / "text.onnx").mkdir(parents=True)
    (tmp_path / "out" / "text.onnx" / "mine.txt").write_text("someone's file")
    with pytest.raises(ExportError, match="text.onnx is a folder"):
        export_onnx(model, tmp_path / "out", dynamo=False)
    assert sorted(os.listdir(tmp_path / "out")) == ["text.onnx"]
    assert (tmp_path / "out" / "text.onnx" / "mine.txt").read_text() == "someone's file"


def test_a_file_given_as_the_folder_is_refused(tiny, tmp_path, capsys):
    path, model = tiny
    file = tmp_path / "features.onnx"
    file.write_bytes(b"someone's file")
    for directory in (file, file / "inside"):
        with pytest.raises(ExportError, match="is a file, not a folder"):
            export_onnx(model, directory)
    assert main(["export", path, "--onnx", str(file)]) == 1
    err = capsys.readouterr().err
    assert f"{file} is a file, not a folder" in err and "Errno" not in err
    assert os.listdir(tmp_path) == ["features.onnx"] and file.read_bytes() == b"someone's file"


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


def test_a_resnet_exports_with_the_torchscript_exporter(tmp_path):
    # opsets 14 to 17 go through torch.jit.trace, which records sizes as tensors (the demo model is a ResNet)
    model, _ = clip.load(DEMO, device="cpu")
    export_onnx(model, tmp_path / "out", opset=17)
    assert opset_of(tmp_path / "out" / "image.onnx") == 17
    image = torch.randn(2, 3, model.visual.input_resolution, model.visual.input_resolution, generator=torch.Generator().manual_seed(0))
    (onnx_image,) = ort.InferenceSession(str(tmp_path / "out" / "image.onnx"), providers=["CPUExecutionProvider"]).run(None, {"image": image.numpy()})
    with torch.no_grad():
        assert relative_error(torch.from_numpy(onnx_image), model.encode_image(image)) <= 1e-4


def test_a_folder_that_cannot_be_written_is_an_export_error(tiny):
    # /proc takes no new folders, even from root; the error names the folder given, not the hidden staging one
    with pytest.raises(ExportError, match=r"cannot write into /proc/onnx-out \(.+\); export into a folder of your own"):
        export_onnx(tiny[1], "/proc/onnx-out")
