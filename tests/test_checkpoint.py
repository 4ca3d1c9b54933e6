"""checkpoint.load_state_dict (and build_model behind it): every container reads back the reference weights; a
malicious file runs no code; a broken or foreign file is one CheckpointError that names the file or the key.

The fuzz tests feed the reader random bytes and truncated or bit-flipped copies of a real small checkpoint in each
container. Zip containers carry a CRC32 per entry, which we check (torch's reader does not), so a damaged zip either
fails or loads the original weights exactly. safetensors and torch's legacy format carry no checksum: a flipped bit
in their tensor bytes loads as a different value, which is documented and tested as such.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import pickletools
import random
import re
import shlex
import struct
import zipfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import ReferenceCLIP, reference_model
from torch import nn

import openclip_lite as clip
from openclip_lite.checkpoint import load_state_dict, save_safetensors
from openclip_lite.errors import CheckpointError, OpenCLIPLiteError, UnsafeCheckpointError
from openclip_lite.model import NON_WEIGHT_KEYS, build_model

CONTAINERS = ["state_dict", "legacy", "torchscript", "safetensors"]
ZIP_CONTAINERS = ["state_dict", "torchscript"]  # the ones with a CRC32 per entry
# a CLIP small enough to fuzz (0.5 MB): embed 16, 16 px images in 8 px patches, 8 tokens, a 100-word vocabulary
MICRO = (16, 16, 1, 64, 8, 8, 100, 64, 1, 1)
READER_ERRORS = (CheckpointError, FileNotFoundError)  # what load_state_dict documents (UnsafeCheckpointError included)
FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


def save(model: nn.Module, container: str, path) -> None:
    """`model` in one of the containers CLIP checkpoints come in."""
    if container == "state_dict":
        torch.save(model.state_dict(), path)
    elif container == "legacy":  # torch.save's format before 1.6: one pickle stream, no zip, no checksum
        torch.save(model.state_dict(), path, _use_new_zipfile_serialization=False)
    elif container == "torchscript":  # how OpenAI released its models
        res, n_ctx = model.visual.input_resolution, model.context_length
        image = torch.randn(1, 3, res, res, generator=torch.Generator().manual_seed(0))
        text = torch.arange(1, n_ctx + 1).view(1, n_ctx) % model.vocab_size
        traced = torch.jit.trace_module(model, {"encode_image": image, "encode_text": text}, check_trace=False)
        traced.save(str(path))
    else:  # the hub's layout
        save_safetensors({k: v for k, v in model.state_dict().items() if k not in NON_WEIGHT_KEYS}, path)


@dataclasses.dataclass(repr=False)  # hypothesis prints the arguments of a failing example: keep that short
class Micro:
    files: dict  # container -> (path, the file's bytes)
    weights: dict  # the state dict saved in each


@pytest.fixture(scope="module")
def micro(tmp_path_factory) -> Micro:
    """One micro CLIP saved in every container."""
    torch.manual_seed(0)
    model = ReferenceCLIP(*MICRO).float().eval()
    folder = tmp_path_factory.mktemp("micro")
    files = {}
    for container in CONTAINERS:
        path = folder / f"micro.{container}"
        save(model, container, path)
        files[container] = (path, path.read_bytes())
    return Micro(files, model.state_dict())


@pytest.fixture(scope="module", params=["tiny-vit", "tiny-rn"])
def tiny(request, tmp_path_factory):
    """(arch, reference model, {container: path})."""
    arch = request.param
    ref = reference_model(arch)
    folder = tmp_path_factory.mktemp(arch)
    paths = {}
    for container in CONTAINERS:
        paths[container] = folder / f"{arch}.{container}"
        save(ref, container, paths[container])
    return arch, ref, paths


# ------------------------------------------------------------------------------------------- what must load


@pytest.mark.parametrize("container", CONTAINERS)
def test_every_container_loads_the_reference_state_dict(tiny, container):
    _, ref, paths = tiny
    expected = {k: v for k, v in ref.state_dict().items() if k not in NON_WEIGHT_KEYS}
    state_dict = load_state_dict(paths[container])
    assert sorted(state_dict) == sorted(expected)
    for key, value in expected.items():
        assert state_dict[key].dtype == value.dtype and torch.equal(state_dict[key], value), key
    model = build_model(state_dict)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())


def test_torchscript_reader_equals_torch_jit_load(tiny):
    """Our reader (no code run) and torch's own TorchScript loader (which runs the archive's code) agree."""
    _, _, paths = tiny
    theirs = torch.jit.load(str(paths["torchscript"]), map_location="cpu").state_dict()
    ours = load_state_dict(paths["torchscript"])
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_wrappers_are_unwrapped(micro, tmp_path):
    expected = micro.weights
    wrappers = [
        {"state_dict": expected, "epoch": 3},
        {f"module.{k}": v for k, v in expected.items()},  # DataParallel, DDP
        {"model": expected, "epoch": 3},  # a training script's checkpoint (timm, many others)
        {"model": {f"_orig_mod.{k}": v for k, v in expected.items()}},  # a torch.compile'd model's state dict
        {f"_orig_mod.module.{k}": v for k, v in expected.items()},  # torch.compile around DDP
    ]
    for i, wrapped in enumerate(wrappers):
        torch.save(wrapped, tmp_path / f"{i}.pt")
        state_dict = load_state_dict(tmp_path / f"{i}.pt")
        assert sorted(state_dict) == sorted(expected) and all(torch.equal(state_dict[k], v) for k, v in expected.items())


# ------------------------------------------------------------------------------- files that would run code


class WriteFile:
    """Unpickling this opens `path` for writing, which creates it."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


class Shell:
    """Unpickling this runs `touch path` in a shell."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.path)}",))


PAYLOADS = {"open": WriteFile, "os.system": Shell}


@pytest.mark.parametrize("payload", PAYLOADS)
@pytest.mark.parametrize("container", ["state_dict", "legacy"])
def test_torch_save_pickle_that_would_create_a_file_is_refused(micro, tmp_path, payload, container):
    weights = micro.weights
    marker, path = tmp_path / "pwned", tmp_path / "evil.pt"
    torch.save({**weights, "extra": PAYLOADS[payload](marker)}, path, _use_new_zipfile_serialization=container == "state_dict")
    torch.load(path, weights_only=False)  # the control: an unsafe load does run the payload
    assert marker.exists()
    marker.unlink()
    with pytest.raises(UnsafeCheckpointError, match="evil.pt") as raised:
        load_state_dict(path)
    assert "run code" in str(raised.value) and "weights_only=False" not in str(raised.value)
    with pytest.raises(UnsafeCheckpointError):
        clip.load(str(path), device="cpu")
    assert not marker.exists()


def torchscript_with_data_pkl(real_archive, data_pkl: bytes, path, extra: dict | None = None) -> None:
    """A copy of a real TorchScript archive with its data.pkl replaced (and entries added)."""
    with zipfile.ZipFile(real_archive) as src, zipfile.ZipFile(path, "w") as dst:
        prefix = next(n for n in src.namelist() if n.endswith("/data.pkl"))[: -len("data.pkl")]
        for info in src.infolist():
            dst.writestr(info, data_pkl if info.filename == prefix + "data.pkl" else src.read(info))
        for name, data in (extra or {}).items():
            dst.writestr(prefix + name, data)


@pytest.mark.parametrize("protocol", [2, 4])  # GLOBAL, and STACK_GLOBAL from protocol 4
@pytest.mark.parametrize("payload", PAYLOADS)
def test_torchscript_archive_with_malicious_global_is_refused(micro, tmp_path, payload, protocol):
    files = micro.files
    marker, path = tmp_path / "pwned", tmp_path / "evil_ts.pt"
    data_pkl = pickle.dumps(PAYLOADS[payload](marker), protocol=protocol)
    pickle.loads(data_pkl)  # the control: plain unpickling runs the payload
    assert marker.exists()
    marker.unlink()
    torchscript_with_data_pkl(files["torchscript"][0], data_pkl, path)
    with pytest.raises(UnsafeCheckpointError, match="evil_ts.pt") as raised:
        load_state_dict(path)
    assert ("posix.system" in str(raised.value) or "os.system" in str(raised.value)) if payload == "os.system" else "open" in str(raised.value)
    assert not marker.exists()


# Hand-written pickles for what a normal pickler would never write: opcodes, a few helpers.
def op_global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def op_value(value) -> bytes:
    """The opcodes that push a plain value (int, str, tuple of those), without memo entries."""
    return pickletools.optimize(pickle.dumps(value, protocol=2))[2:-1]


def op_storage(key: str, numel: int) -> bytes:
    return b"(" + op_value("storage") + op_global("torch", "FloatStorage") + op_value(key) + op_value("cpu") + op_value(numel) + b"tQ"


def op_tensor(storage: bytes, size: tuple, stride: tuple) -> bytes:
    return (
        op_global("torch._utils", "_rebuild_tensor_v2")
        + b"("
        + storage
        + op_value(0)
        + op_value(size)
        + op_value(stride)
        + b"\x89"  # NEWFALSE: requires_grad
        + op_global("collections", "OrderedDict")
        + b")R"
        + b"tR"
    )


def op_module(state: bytes) -> bytes:
    """A TorchScript module object whose attribute dict is built by `state` (which leaves one dict)."""
    return op_global("__torch__.m", "M") + b")\x81" + state + b"b"


FOUR_FLOATS = {"data/crafted": struct.pack("<4f", 1, 2, 3, 4)}
# case: (data.pkl body, extra archive entries, what the error must say: our check, not some later failure)
CRAFTED = {
    # a zero stride lets 4 floats claim a terabyte, which copying would allocate
    "zero stride": (
        op_module(b"}" + op_value("weight") + op_tensor(op_storage("crafted", 4), (1 << 38,), (0,)) + b"s"),
        FOUR_FLOATS,
        "claims more values than its storage",
    ),
    # a storage that says it holds far more values than its entry has bytes
    "lying numel": (
        op_module(b"}" + op_value("weight") + op_tensor(op_storage("crafted", 1 << 40), (4,), (1,)) + b"s"),
        FOUR_FLOATS,
        "holds 16 bytes",
    ),
    # BUILD applied to a tensor: Tensor.__setstate__ would resize its storage to whatever the file says
    "state on a tensor": (
        op_module(b"}" + op_value("weight") + op_tensor(op_storage("crafted", 4), (4,), (1,)) + op_value((None, 0, (1 << 20,), (1,))) + b"bs"),
        FOUR_FLOATS,
        "sets the state of a Tensor",
    ),
    # a module that contains itself
    "cycle": (op_global("__torch__.m", "M") + b")\x81q\x00}" + op_value("child") + b"h\x00sb", {}, "loops"),
    # 60 levels of a module referencing the one below twice: 2**60 paths to walk
    "exponential tree": (
        op_module(b"}")
        + b"q\x00"
        + b"".join(op_module(b"}(" + op_value("a") + b"h" + bytes([i]) + op_value("b") + b"h" + bytes([i]) + b"u") + b"q" + bytes([i + 1]) for i in range(60)),
        {},
        "impossibly deep or large",
    ),
    # parts of one storage copied again and again: a few bytes of file asking for gigabytes of copies
    "parts copied over and over": (
        op_module(b"}(" + b"".join(op_value(f"w{i}") + op_tensor(op_storage("crafted", 4), (2,), (1,)) for i in range(3)) + b"u"),
        FOUR_FLOATS,
        "copy more data out of its storages than the storages hold",
    ),
    # an entry that is not a storage
    "foreign persistent id": (op_module(b"}" + op_value("weight") + op_value(("module", "os", "system")) + b"Qs"), {}, "persistent id"),
}


@pytest.mark.timeout(30)  # a missing bound would hang here, walking 2**60 paths or allocating a terabyte
@pytest.mark.parametrize("case", CRAFTED)
def test_crafted_torchscript_pickles_are_refused_quickly(micro, tmp_path, case):
    body, storages, reason = CRAFTED[case]
    path = tmp_path / "crafted.pt"
    torchscript_with_data_pkl(micro.files["torchscript"][0], b"\x80\x02" + body + b".", path, storages)
    with pytest.raises(CheckpointError, match=f"crafted.pt.*{reason}"):
        load_state_dict(path)


def test_a_storage_named_many_times_is_read_once(micro, tmp_path):
    # torch's reader shares one storage between its references; a copy per reference would turn a small file
    # naming one storage thousands of times into thousands of copies of it
    body = op_module(b"}(" + b"".join(op_value(f"w{i}") + op_tensor(op_storage("crafted", 4), (4,), (1,)) for i in range(1000)) + b"u")
    path = tmp_path / "shared.pt"
    torchscript_with_data_pkl(micro.files["torchscript"][0], b"\x80\x02" + body + b".", path, FOUR_FLOATS)
    state_dict = load_state_dict(path)
    assert len(state_dict) == 1000 and all(torch.equal(v, torch.tensor([1.0, 2, 3, 4])) for v in state_dict.values())
    assert len({v.untyped_storage().data_ptr() for v in state_dict.values()}) == 1


@pytest.mark.timeout(30)
def test_zip_bomb_is_refused_without_inflating_it(tmp_path):
    path = tmp_path / "bomb.pt"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z, z.open("archive/data/0", "w") as entry:
        for _ in range(64):
            entry.write(bytes(1 << 20))  # 64 MiB of zeros, about 64 kB compressed
    assert os.path.getsize(path) < 1 << 20
    with pytest.raises(CheckpointError, match="bomb.pt.*expand"):
        load_state_dict(path)


# --------------------------------------------------------------------------- files that are not checkpoints


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        load_state_dict(tmp_path / "nothing.pt")


def test_directory_and_empty_file(tmp_path):
    with pytest.raises(CheckpointError, match="not a regular file"):
        load_state_dict(tmp_path)
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.pt is empty"):
        load_state_dict(tmp_path / "empty.pt")


@pytest.mark.parametrize("content", [b"\x00", b"not a checkpoint\n" * 100, b"PK\x03\x04" + bytes(100), "random"])
def test_bytes_that_are_no_checkpoint(tmp_path, content):
    path = tmp_path / "junk.bin"
    path.write_bytes(random.Random(0).randbytes(10_000) if content == "random" else content)
    with pytest.raises(CheckpointError, match="junk.bin") as raised:
        load_state_dict(path)
    # torch's advice to retry with weights_only=False is wrong for a corrupt file and dangerous for a foreign one
    assert "weights_only" not in str(raised.value)
    assert not isinstance(raised.value, UnsafeCheckpointError)


@pytest.mark.parametrize("fraction", [0.0001, 0.01, 0.5, 0.99, 0.99999])
@pytest.mark.parametrize("container", CONTAINERS)
def test_truncated_checkpoint(micro, tmp_path, container, fraction):
    files = micro.files
    data = files[container][1]
    path = tmp_path / "cut.pt"
    path.write_bytes(data[: max(1, int(len(data) * fraction))])
    with pytest.raises(CheckpointError, match="cut.pt"):
        load_state_dict(path)


@pytest.mark.parametrize("container", ZIP_CONTAINERS)
def test_zip_crc_is_checked(micro, tmp_path, container):
    """torch's zip reader ignores CRC32s, so a flipped bit in the weights would load as a wrong model; ours refuses."""
    files = micro.files
    source, data = files[container]
    with zipfile.ZipFile(source) as z:
        info = max(z.infolist(), key=lambda i: i.file_size if "/data/" in i.filename else 0)  # the largest tensor
    header = data[info.header_offset : info.header_offset + 30]
    start = info.header_offset + 30 + struct.unpack("<H", header[26:28])[0] + struct.unpack("<H", header[28:30])[0]
    damaged = bytearray(data)
    damaged[start + info.file_size // 2] ^= 0x10
    path = tmp_path / "flipped.pt"
    path.write_bytes(damaged)
    if container == "state_dict":  # the control: torch itself loads the damaged file without a word
        torch.load(path, weights_only=True)
    with pytest.raises(CheckpointError, match=f"flipped.pt.*{info.filename.split('/', 1)[1]}"):
        load_state_dict(path)


def test_safetensors_has_no_checksum_so_a_flipped_weight_loads(micro, tmp_path):
    """Documented limit: safetensors (like torch's legacy format) has no checksum; downloads are verified by SHA256."""
    files, weights = micro.files, micro.weights
    data = bytearray(files["safetensors"][1])
    data[-1] ^= 0x01  # the last byte of the last tensor
    path = tmp_path / "flipped.safetensors"
    path.write_bytes(data)
    state_dict = load_state_dict(path)
    changed = [k for k in state_dict if not torch.equal(state_dict[k], weights[k])]
    assert len(changed) == 1


def test_another_models_state_dict(tmp_path):
    other = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8, 10))
    path = tmp_path / "other.pt"
    torch.save(other.state_dict(), path)
    with pytest.raises(CheckpointError, match="not a CLIP"):
        build_model(load_state_dict(path))
    with pytest.raises(CheckpointError, match="not a CLIP"):
        clip.load(str(path), device="cpu")


@pytest.mark.parametrize(
    "content, entry",
    [({"weight": 3}, "weight"), ({"a": torch.zeros(1), "names": ["x"]}, "names"), ([torch.zeros(1)], "list"), ({}, "empty")],
)
def test_not_a_dict_of_tensors(tmp_path, content, entry):
    path = tmp_path / "odd.pt"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match=f"odd.pt.*{entry}"):
        load_state_dict(path)


KEYS = [
    "visual.proj",  # tells ViT from ResNet
    "visual.conv1.weight",
    "visual.positional_embedding",
    "visual.transformer.resblocks.0.attn.in_proj_weight",
    "positional_embedding",
    "token_embedding.weight",
    "text_projection",
    "ln_final.weight",
    "transformer.resblocks.1.mlp.c_fc.bias",
    "logit_scale",
]


@pytest.fixture(scope="module")
def vit_weights():
    return {k: v for k, v in reference_model("tiny-vit").state_dict().items() if k not in NON_WEIGHT_KEYS}


@pytest.mark.parametrize("key", KEYS)
def test_missing_key_is_named(vit_weights, key):
    state_dict = {k: v for k, v in vit_weights.items() if k != key}
    with pytest.raises(CheckpointError, match=re.escape(key) if key != "visual.proj" else "missing"):
        build_model(state_dict)


@pytest.mark.parametrize(
    "key, reshape",
    [(key, reshape) for key in KEYS for reshape in ("wider", "transposed", "flat") if not (reshape == "transposed" and key in ("ln_final.weight", "transformer.resblocks.1.mlp.c_fc.bias", "logit_scale"))],
)
def test_misshapen_key_is_named(vit_weights, key, reshape):
    value = vit_weights[key]
    if reshape == "wider":
        value = torch.zeros([*value.shape[:-1], value.shape[-1] + 1]) if value.dim() else torch.zeros(2)
    elif reshape == "transposed":
        value = value.transpose(0, -1).contiguous()
        assert value.shape != vit_weights[key].shape
    else:
        value = value.reshape(-1, 1) if value.dim() != 2 else value.reshape(-1)
    with pytest.raises(CheckpointError, match=re.escape(key)):
        build_model({**vit_weights, key: value})


@pytest.mark.parametrize(
    "key",
    [
        k
        for k in ("visual.conv1.weight", "visual.positional_embedding", "positional_embedding", "token_embedding.weight")
    ],
)
def test_zero_length_dimension_is_a_checkpoint_error(vit_weights, key):
    value = vit_weights[key]
    with pytest.raises(CheckpointError, match=re.escape(key)):
        build_model({**vit_weights, key: torch.zeros([0, *value.shape[1:]])})


@pytest.mark.parametrize("tower, key", [("text", "ln_final.weight"), ("image", "visual.conv1.weight")])
@pytest.mark.parametrize("width", [32, 129])
def test_a_width_that_does_not_split_into_heads_is_a_checkpoint_error(vit_weights, tower, key, width):
    # one head per 64 channels, as OpenAI's build_model: 32 makes no head, 129 does not split into two; every
    # tensor of the tower is resized consistently (64 -> width, 3x and 4x it too), so only the width is wrong
    sizes = {64: width, 192: 3 * width, 256: 4 * width}
    state_dict = {}
    for name, value in vit_weights.items():
        if name.startswith("visual.") == (tower == "image") and name != "logit_scale":
            value = torch.zeros([sizes.get(d, d) for d in value.shape])
        state_dict[name] = value
    with pytest.raises(CheckpointError, match=re.escape(key) + f".* {width} wide"):
        build_model(state_dict)


@pytest.mark.parametrize("width", [1, 7])
def test_a_resnet_whose_attention_pool_does_not_split_into_heads_is_a_checkpoint_error(width):
    # the pool is width * 32 wide with width // 2 heads: 1 makes none, 7 (224 wide, 3 heads) does not split
    config = (32, 64, (1, 1, 1, 1), width, None, 77, 49408, 64, 1, 2)
    with pytest.raises(CheckpointError, match=f"visual.layer1.0.conv1.weight.* {width * 32} wide"):
        build_model(ReferenceCLIP(*config).state_dict())


@pytest.mark.parametrize("prefix", ["transformer.resblocks.", "visual.transformer.resblocks."])
def test_a_tower_without_blocks_is_a_checkpoint_error(vit_weights, prefix):
    # each tower reads its output from its last block, so a tower with none is not a CLIP (and must not load as one)
    state_dict = {k: v for k, v in vit_weights.items() if not k.startswith(prefix)}
    with pytest.raises(CheckpointError, match="has no blocks"):
        build_model(state_dict)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_wrong_dtype_entry_is_named(vit_weights, dtype):
    key = "transformer.resblocks.0.attn.in_proj_weight"
    with pytest.raises(CheckpointError, match=re.escape(key) + ".*dtype"):
        build_model({**vit_weights, key: vit_weights[key].to(dtype)})


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes_load_as_float32(vit_weights, dtype):
    converted = {k: v.to(dtype) if v.is_floating_point() else v for k, v in vit_weights.items()}
    model = build_model(converted)
    assert all(model.state_dict()[k].equal(v.float()) for k, v in converted.items())


def test_every_error_is_an_openclip_lite_error_and_the_builtin():
    assert issubclass(CheckpointError, OpenCLIPLiteError) and issubclass(CheckpointError, ValueError)
    assert issubclass(UnsafeCheckpointError, CheckpointError)
    assert issubclass(clip.UnknownModelError, ValueError) and issubclass(clip.UnknownModelError, RuntimeError)


# ------------------------------------------------------------------------------------------------------ fuzz


def expect_only_documented_errors(path, original: dict | None) -> None:
    """Read `path` as `clip.load` does: only the reader's documented errors (naming the file), then only
    CheckpointError from build_model. A zip that loads at all must hold `original` exactly."""
    try:
        state_dict = load_state_dict(path)
    except READER_ERRORS as e:
        assert str(path) in str(e), str(e)
        return
    if original is not None:
        assert sorted(state_dict) == sorted(original)
        assert all(torch.equal(state_dict[k], original[k]) for k in original)
    try:
        build_model(state_dict)
    except CheckpointError:
        pass


@pytest.mark.timeout(120)  # no hang: a stuck example fails the test
@FUZZ
@given(data=st.binary(min_size=1, max_size=4096))
def test_fuzz_random_bytes(tmp_path_factory, data):
    path = tmp_path_factory.getbasetemp() / "fuzz-random.bin"
    path.write_bytes(data)
    expect_only_documented_errors(path, None)


def offsets(length: int):
    """Anywhere, with extra weight on the headers at either end, where a flipped bit changes the most."""
    return st.one_of(st.integers(0, min(4095, length - 1)), st.integers(max(0, length - 4096), length - 1), st.integers(0, length - 1))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("container", CONTAINERS)
@FUZZ
@given(data=st.data())
def test_fuzz_truncation(micro, tmp_path_factory, container, data):
    files, weights = micro.files, micro.weights
    original = files[container][1]
    path = tmp_path_factory.getbasetemp() / f"fuzz-cut.{container}"
    path.write_bytes(original[: data.draw(offsets(len(original)), label="length")])
    expect_only_documented_errors(path, weights if container in ZIP_CONTAINERS else None)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("container", CONTAINERS)
@FUZZ
@given(data=st.data())
def test_fuzz_bit_flips(micro, tmp_path_factory, container, data):
    files, weights = micro.files, micro.weights
    damaged = bytearray(files[container][1])
    for _ in range(data.draw(st.integers(1, 4), label="flips")):
        damaged[data.draw(offsets(len(damaged)), label="offset")] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    path = tmp_path_factory.getbasetemp() / f"fuzz-flip.{container}"
    path.write_bytes(damaged)
    expected = {k: v for k, v in weights.items() if k not in NON_WEIGHT_KEYS} if container in ZIP_CONTAINERS else None
    expect_only_documented_errors(path, expected)


def test_a_torchscript_archive_is_read_into_one_copy_of_the_weights(tmp_path):
    """OpenAI's .pt files are TorchScript archives: reading one must not hold the bytes twice (entry + tensor) nor
    copy each tensor out of its storage; the peak over the loading process's baseline is one model, not two."""
    import subprocess
    import sys

    ref = reference_model("ViT-B/32")
    image, text = torch.randn(1, 3, 224, 224), clip.tokenize(["a dog"])
    path = tmp_path / "ViT-B-32.pt"
    torch.jit.trace_module(ref, {"encode_image": image, "encode_text": text}, check_trace=False).save(str(path))
    weights = sum(t.numel() * t.element_size() for t in ref.state_dict().values())
    # VmHWM, not ru_maxrss: a child's ru_maxrss keeps the peak of the forked copy of this (large) test process
    code = """
import re, sys, torch
from openclip_lite.checkpoint import load_state_dict
def status(key):
    return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
before = status("VmRSS")
state_dict = load_state_dict(sys.argv[1])
print(status("VmHWM") - before, sum(t.numel() * t.element_size() for t in state_dict.values()), before)
"""
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    growth, loaded, before = map(int, result.stdout.split())
    assert loaded == weights
    assert growth < 1.3 * weights, f"reading {weights / 2**20:.0f} MiB of weights took {growth / 2**20:.0f} MiB at the peak (over {before / 2**20:.0f} MiB)"


@pytest.mark.parametrize("protocol, content", [(4, "tensors"), (5, "tensors"), (2, "values")])
def test_a_plain_pickle_is_said_to_be_one(tmp_path, protocol, content):
    path = tmp_path / "weights.pkl"
    with open(path, "wb") as f:
        pickle.dump({"weight": torch.zeros(2)} if content == "tensors" else {"epoch": 3}, f, protocol=protocol)
    with pytest.raises(CheckpointError, match=r"weights.pkl is a plain pickle \(pickle.dump\)") as raised:
        load_state_dict(path)
    message = str(raised.value)
    assert "torch.save(state_dict" in message and "save_file(state_dict" in message
    assert "truncated or corrupt" not in message and not isinstance(raised.value, UnsafeCheckpointError)


def transformers_keys() -> dict:
    """The start of a transformers CLIPModel's state dict (`save_pretrained`'s model.safetensors)."""
    names = [
        "logit_scale",
        "text_model.embeddings.position_embedding.weight",
        "text_model.embeddings.token_embedding.weight",
        "text_model.encoder.layers.0.self_attn.k_proj.weight",
        "text_model.final_layer_norm.weight",
        "text_projection.weight",
        "vision_model.embeddings.class_embedding",
        "vision_model.embeddings.patch_embedding.weight",
        "vision_model.post_layernorm.weight",
        "visual_projection.weight",
    ]
    return {name: torch.zeros(4, 4) for name in names}


def custom_text_clip_keys() -> dict:
    """A real open_clip CustomTextCLIP's state dict (the text tower under `text.`), tiny."""
    import open_clip

    vision = dict(layers=1, width=64, patch_size=16, image_size=32, head_width=64)
    text = dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=1)
    return open_clip.model.CustomTextCLIP(embed_dim=64, vision_cfg=vision, text_cfg=text).state_dict()


@pytest.mark.parametrize(
    "layout, hint",
    [
        ("transformers", "are in Hugging Face transformers' CLIPModel layout, not OpenAI's"),
        ("CustomTextCLIP", "are in open_clip's CustomTextCLIP layout"),
        ("another model", None),
    ],
)
def test_a_file_in_another_layout_is_named_with_its_layout(tmp_path, layout, hint):
    state_dict = {"transformers": transformers_keys, "CustomTextCLIP": custom_text_clip_keys}.get(layout, lambda: {"fc.weight": torch.zeros(2, 2)})()
    path = tmp_path / "model.safetensors"
    save_safetensors(state_dict, path)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))}: not a CLIP") as raised:
        clip.load(str(path), device="cpu")
    message = str(raised.value)
    if hint is None:
        assert "transformers" not in message and "CustomTextCLIP" not in message
    else:
        assert hint in message and "openclip-lite loads OpenAI's layout and open_clip's CLIP checkpoints" in message


def test_another_models_state_dict_shows_its_keys(tmp_path):
    from torchvision.models import resnet18

    path = tmp_path / "resnet18.pt"
    torch.save(resnet18().state_dict(), path)
    with pytest.raises(CheckpointError, match=r"not a CLIP state dict.*missing key 'ln_final.weight' \(its keys begin conv1.weight, bn1.weight"):
        build_model(load_state_dict(path))
