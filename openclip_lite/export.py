"""ONNX export of the two towers, so that a CLIP model runs without PyTorch (onnxruntime and friends).

`export_onnx(model, directory)` writes three files:

    image.onnx       image  float32 (batch, 3, res, res), preprocessed -> image_features float32 (batch, embed_dim)
    text.onnx        text   int32 (batch, context_length), `tokenize`'s output -> text_features float32 (batch, embed_dim)
    preprocess.json  what a runtime needs besides the graphs: image size, mean, std, interpolation, logit scale

Both outputs are the unnormalised `encode_image` / `encode_text`, with a dynamic batch dimension. The text graph
runs all context_length positions: `encode_text` stops at the batch's last end-of-text token, a shape that
depends on the data, which a static graph cannot express; causal attention makes the two equal.
"""

import copy
import json
import os
import warnings
from typing import Optional

import torch
from torch import Tensor, nn

from .errors import require
from .model import CLIP
from .tokenizer import tokenize
from .transform import MEAN, STD

IMAGE_FILE, TEXT_FILE, CONFIG_FILE = "image.onnx", "text.onnx", "preprocess.json"
# protobuf's limit on one file: past it the weights must go beside the graph as external data
_PROTOBUF_LIMIT = 2**31 - 2**20


class ImageEncoder(nn.Module):
    """image : shape = (batch_size, 3, res, res) -> `encode_image`, (batch_size, embed_dim)"""

    def __init__(self, model: CLIP):
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> Tensor:
        return self.model.encode_image(image)


class TextEncoder(nn.Module):
    """text : token ids (batch_size, context_length) -> `encode_text` over every position, (batch_size, embed_dim)"""

    def __init__(self, model: CLIP):
        super().__init__()
        self.model = model

    def forward(self, text: Tensor) -> Tensor:
        return self.model.encode_text(text, full_context=True)


def export_onnx(model: CLIP, directory: "str | os.PathLike", opset: Optional[int] = None, dynamo: Optional[bool] = None) -> dict:
    """Write image.onnx, text.onnx and preprocess.json for `model` into `directory` (created if missing).

    The graphs are exported from an fp32 copy on the CPU whatever the model's device and dtype, so they run on
    any onnxruntime build (a model already fp32 on the CPU is used as is, and put in eval mode). `dynamo` None tries `torch.onnx.export`'s default (dynamo) exporter and falls back to
    the TorchScript one, with a warning, if it raises; True or False forces one.

    Returns the contents of preprocess.json, which names the exporter that was used.
    """
    onnx = require("onnx", "onnx")
    require("onnxscript", "onnx")  # the dynamo exporter's backend; imported lazily by torch, with a vaguer error
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    model = _fp32_cpu(model)
    res = model.visual.input_resolution
    image_bytes = _bytes(model.visual.parameters())
    examples = {
        # a batch of 2: torch.export specialises a dimension whose example size is 1
        IMAGE_FILE: (ImageEncoder(model).eval(), "image", torch.randn(2, 3, res, res, generator=torch.Generator().manual_seed(0)), image_bytes),
        TEXT_FILE: (TextEncoder(model).eval(), "text", tokenize(["a photo of a dog.", "a diagram"], context_length=model.context_length), _bytes(model.parameters()) - image_bytes),
    }
    exporters = []
    for filename, (module, input_name, example, size) in examples.items():
        path = os.path.join(directory, filename)
        output_name = input_name + "_features"
        exporters.append(_export(module, example, path, input_name, output_name, opset, dynamo, external_data=size > _PROTOBUF_LIMIT))
        onnx.checker.check_model(path)  # by path: works past protobuf's 2 GB limit
    config = {
        "image_size": res,
        "mean": list(MEAN),
        "std": list(STD),
        "interpolation": "bicubic",
        "resize": "shorter side to image_size, then center crop to image_size x image_size, then RGB",
        "context_length": model.context_length,
        "embed_dim": model.text_projection.shape[1],
        # the multiplier of cosine similarities, exp of the `logit_scale` parameter (100 for OpenAI's models)
        "logit_scale": float(model.logit_scale.detach().exp()),
        "inputs": {"image": "float32 (batch, 3, image_size, image_size)", "text": "int32 (batch, context_length)"},
        "outputs": {"image_features": "float32 (batch, embed_dim)", "text_features": "float32 (batch, embed_dim)"},
        "exporter": exporters[0] if len(set(exporters)) == 1 else dict(zip(examples, exporters)),
    }
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2)
    return config


def _fp32_cpu(model: CLIP) -> CLIP:
    """The model itself if it is already fp32 on the CPU, else a copy that is."""
    params = list(model.parameters())
    if all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params):
        return model.eval()
    return copy.deepcopy(model).float().cpu().eval()


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def _export(module: nn.Module, example: Tensor, path: str, input_name: str, output_name: str, opset: Optional[int], dynamo: Optional[bool], external_data: bool) -> str:
    """Export one tower with a dynamic batch dimension; returns the exporter used, "dynamo" or "torchscript".

    external_data : write the weights beside the graph (path + ".data"); needed past protobuf's 2 GB limit,
        avoided below it so that a tower is one self-contained file
    """
    common = {"input_names": [input_name], "output_names": [output_name], "opset_version": opset, "verbose": False}
    if dynamo is not False:
        try:
            with torch.no_grad():
                torch.onnx.export(
                    module,
                    (example,),
                    path,
                    dynamo=True,
                    dynamic_shapes={input_name: {0: torch.export.Dim("batch", min=1)}},
                    external_data=external_data,
                    **common,
                )
            return "dynamo"
        except Exception as e:  # the dynamo exporter raises many kinds of errors; any of them means: try the other
            if dynamo:
                raise
            warnings.warn(f"the dynamo ONNX exporter failed ({type(e).__name__}: {e}); using the TorchScript exporter", stacklevel=3)
    with torch.no_grad():
        torch.onnx.export(module, (example,), path, dynamo=False, dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}}, **common)
    return "torchscript"
