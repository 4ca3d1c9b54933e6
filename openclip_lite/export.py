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
import re
import shutil
import uuid
import warnings
from typing import Optional

import torch
from torch import Tensor, nn

from .errors import ExportError, require
from .model import CLIP
from .tokenizer import tokenize
from .transform import MEAN, STD

IMAGE_FILE, TEXT_FILE, CONFIG_FILE = "image.onnx", "text.onnx", "preprocess.json"
# protobuf's limit on one file: past it the weights must go beside the graph as external data
_PROTOBUF_LIMIT = 2**31 - 2**20
# both towers attend with scaled_dot_product_attention, which ONNX can express from opset 14 on
MIN_OPSET = 14
# the dynamo exporter implements opset 18 and newer; asked for less it writes 18 and converts down, which fails
# (no LayerNormalization before 17, Split's num_outputs before 18) or leaves the graph at 18
_DYNAMO_MIN_OPSET = 18
# the newest opset torch's TorchScript exporter supports (torch.onnx's ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)
_TORCHSCRIPT_MAX_OPSET = 20


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
    any onnxruntime build (a model already fp32 on the CPU is used as is, and put in eval mode).

    opset : the ONNX opset of both graphs, MIN_OPSET (14) or newer; None for the exporter's default. The graphs
        are checked to be valid and of that opset.
    dynamo : None uses `torch.onnx.export`'s dynamo exporter for opset 18 and newer (and the default), falling
        back to the TorchScript one, with a warning, if it fails; and the TorchScript exporter for opsets 14 to
        17, which the dynamo one cannot write. True or False forces one.

    The files are written into a temporary folder beside their destination and moved into `directory` only once
    both graphs are exported and checked: a failed export raises ExportError and leaves `directory` as it was
    (an earlier export there included). Other files in `directory` are kept.

    Returns the contents of preprocess.json, which names the exporter and the opset that were used.
    """
    onnx = require("onnx", "onnx")
    require("onnxscript", "onnx")  # the dynamo exporter's backend; imported lazily by torch, with a vaguer error
    directory = os.fspath(directory)
    exporters = _exporters(opset, dynamo, onnx.defs.onnx_opset_version())
    # not tempfile.mkdtemp: its folder is private (0700), and a new `directory` is this folder renamed
    staging = os.path.join(_nearest_folder(directory), f".openclip-lite-export-{uuid.uuid4().hex[:12]}")
    try:
        os.mkdir(staging)
    except OSError as e:  # a read-only or system folder: the error names the user's folder, not the hidden one
        raise ExportError(f"cannot write into {directory} ({e.strerror or e}); export into a folder of your own") from e
    try:
        config = _export_into(model, staging, opset, exporters)
        _move_into_place(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return config


def _exporters(opset: Optional[int], dynamo: Optional[bool], onnx_max_opset: int) -> list:
    """The exporters to try in order for `opset`, or ExportError for an opset that none of them can write."""
    if opset is None:
        return {None: ["dynamo", "torchscript"], True: ["dynamo"], False: ["torchscript"]}[dynamo]
    if opset < MIN_OPSET:
        raise ExportError(
            f"opset {opset} is too old for CLIP: its attention (scaled_dot_product_attention) needs opset {MIN_OPSET} or newer: "
            "choose one of those, or leave it out for the exporter's default"
        )
    if opset > onnx_max_opset:
        raise ExportError(f"opset {opset} is newer than the installed onnx knows ({onnx_max_opset}); choose an older one, {MIN_OPSET} or newer")
    if dynamo and opset < _DYNAMO_MIN_OPSET:
        raise ExportError(f"the dynamo exporter writes opset {_DYNAMO_MIN_OPSET} and newer, not {opset}; use the TorchScript exporter (dynamo=False or None) for it")
    if dynamo is False and opset > _TORCHSCRIPT_MAX_OPSET:
        raise ExportError(f"the TorchScript exporter writes opsets {MIN_OPSET} to {_TORCHSCRIPT_MAX_OPSET}, not {opset}; use the dynamo exporter (dynamo=True or None) for it")
    if dynamo is not None:
        return ["dynamo" if dynamo else "torchscript"]
    if opset < _DYNAMO_MIN_OPSET:
        return ["torchscript"]
    return ["dynamo", "torchscript"] if opset <= _TORCHSCRIPT_MAX_OPSET else ["dynamo"]


def _nearest_folder(directory: str) -> str:
    """`directory` if it exists, else its nearest existing ancestor: where the temporary folder goes, so that the
    files move into place by a rename on the same file system. ExportError if it or an ancestor is a file."""
    path = os.path.abspath(directory)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        what = directory if path == os.path.abspath(directory) else f"{path}, in the path {directory},"
        raise ExportError(f"{what} is a file, not a folder; give a folder to write {IMAGE_FILE}, {TEXT_FILE} and {CONFIG_FILE} to")
    return path


def _export_into(model: CLIP, folder: str, opset: Optional[int], exporters: list) -> dict:
    """Export both towers and preprocess.json into `folder`; returns the config."""
    model = _fp32_cpu(model)
    res = model.visual.input_resolution
    image_bytes = _bytes(model.visual.parameters())
    examples = {
        # a batch of 2: torch.export specialises a dimension whose example size is 1
        IMAGE_FILE: (ImageEncoder(model).eval(), "image", torch.randn(2, 3, res, res, generator=torch.Generator().manual_seed(0)), image_bytes),
        TEXT_FILE: (TextEncoder(model).eval(), "text", tokenize(["a photo of a dog.", "a diagram"], context_length=model.context_length), _bytes(model.parameters()) - image_bytes),
    }
    used, opsets = [], []
    for filename, (module, input_name, example, size) in examples.items():
        path = os.path.join(folder, filename)
        exporter, written_opset = _export(module, example, path, input_name, input_name + "_features", opset, exporters, external_data=size > _PROTOBUF_LIMIT)
        used.append(exporter)
        opsets.append(written_opset)
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
        "exporter": used[0] if len(set(used)) == 1 else dict(zip(examples, used)),
        "opset": opsets[0] if len(set(opsets)) == 1 else dict(zip(examples, opsets)),
    }
    with open(os.path.join(folder, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2)
    return config


def _move_into_place(staging: str, directory: str) -> None:
    """Move the exported files from `staging` into `directory`: the whole folder by one rename where `directory`
    does not exist yet, else file by file, keeping other files. The files they replace are set aside in `staging`
    first and put back if a move fails (a file open elsewhere on Windows), so `directory` never mixes exports."""
    try:
        if not os.path.isdir(directory):
            os.makedirs(os.path.dirname(os.path.abspath(directory)), exist_ok=True)
            os.rename(staging, directory)
            return
        names = sorted(os.listdir(staging), key=lambda name: name == CONFIG_FILE)
        # an earlier export's weights beside a graph that now holds its own go too
        old = [name for name in names + [IMAGE_FILE + ".data", TEXT_FILE + ".data"] if os.path.lexists(os.path.join(directory, name))]
        folders = [name for name in old if os.path.isdir(os.path.join(directory, name))]
        if folders:  # not an earlier export's file: someone's folder, which must not be replaced
            raise ExportError(f"{os.path.join(directory, folders[0])} is a folder; move it, or export into another folder")
        aside = os.path.join(staging, ".previous")
        os.mkdir(aside)
        moved: list[tuple[str, str]] = []  # (from, to), undone in reverse on failure
        try:
            for name in dict.fromkeys(old):
                moved.append((os.path.join(directory, name), os.path.join(aside, name)))
                os.replace(*moved[-1])
            for name in names:
                moved.append((os.path.join(staging, name), os.path.join(directory, name)))
                os.replace(*moved[-1])
        except OSError:
            for source, target in reversed(moved):
                if os.path.lexists(target):
                    os.replace(target, source)
            raise
    except OSError as e:
        raise ExportError(f"could not move the export into {directory} ({e}); it is as it was before") from e


def _fp32_cpu(model: CLIP) -> CLIP:
    """The model itself if it is already fp32 on the CPU, else a copy that is."""
    params = list(model.parameters())
    if all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params):
        return model.eval()
    return copy.deepcopy(model).float().cpu().eval()


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def _export(module: nn.Module, example: Tensor, path: str, input_name: str, output_name: str, opset: Optional[int], exporters: list, external_data: bool) -> tuple:
    """Export one tower with a dynamic batch dimension, trying `exporters` in order until one writes a valid
    graph of `opset`; returns (the exporter used, the opset written).

    external_data : write the weights beside the graph (path + ".data"); needed past protobuf's 2 GB limit,
        avoided below it so that a tower is one self-contained file
    """
    failures = []
    for exporter, next_exporter in zip(exporters, exporters[1:] + [None]):
        try:
            with torch.no_grad():
                _export_with(exporter, module, example, path, input_name, output_name, opset, external_data)
            return exporter, _check_graph(path, opset)
        except Exception as e:  # the exporters raise many kinds of errors; any of them means: try the next one
            failures.append(f"the {exporter} exporter failed ({_reason(e)})")
            for leftover in (path, path + ".data"):  # an invalid graph, and the weights it wrote beside it
                if os.path.exists(leftover):
                    os.remove(leftover)
            if next_exporter is None:
                at = f" at opset {opset}" if opset is not None else ""
                raise ExportError(f"could not export {os.path.basename(path)}{at}: {'; '.join(failures)}") from e
            warnings.warn(f"{failures[-1]} on {os.path.basename(path)}; using the {next_exporter} exporter", stacklevel=4)
    raise ExportError("no exporter to try")  # not reached: _exporters never returns an empty list


def _export_with(exporter: str, module: nn.Module, example: Tensor, path: str, input_name: str, output_name: str, opset: Optional[int], external_data: bool) -> None:
    """One `torch.onnx.export` call with a dynamic batch dimension, by the "dynamo" or the "torchscript" exporter."""
    common = {"input_names": [input_name], "output_names": [output_name], "opset_version": opset, "verbose": False}
    if exporter == "dynamo":
        batch = torch.export.Dim("batch", min=1)
        torch.onnx.export(module, (example,), path, dynamo=True, dynamic_shapes={input_name: {0: batch}}, external_data=external_data, **common)
        return
    with warnings.catch_warnings():
        # chosen on purpose, not a user's mistake: torch's notice that this exporter is the legacy one, and the tracer's
        # note that the input checks in encode_image / encode_text become constants (they hold for any batch size)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message="The feature will be removed", category=DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # the graphs index with arange and argmax positions, never negative: the case this warns of does not arise
        warnings.filterwarnings("ignore", message="Exporting aten::index operator of advanced indexing", category=UserWarning)
        torch.onnx.export(module, (example,), path, dynamo=False, dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}}, **common)


def _check_graph(path: str, opset: Optional[int]) -> int:
    """Check the graph at `path` with onnx's checker and return its opset; ExportError if it is not `opset`."""
    import onnx

    onnx.checker.check_model(path)  # by path: works past protobuf's 2 GB limit
    imports = onnx.load(path, load_external_data=False).opset_import
    written = next(entry.version for entry in imports if entry.domain in ("", "ai.onnx"))
    if opset is not None and written != opset:
        raise ExportError(f"the graph is opset {written}, not the {opset} asked for")
    return written


def _reason(error: BaseException) -> str:
    """The first line of the error at the root of `error`'s chain: torch wraps the one that says what went wrong
    (an unsupported operator, a failed check) in a generic "failed to export" with coloured text."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
