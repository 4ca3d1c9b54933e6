"""Read a checkpoint file into a state dict without ever executing code from the file.

Three containers are understood, recognised by their bytes rather than their names:
- safetensors (the hub's `open_clip_model.safetensors`): a JSON header and raw tensors, nothing to execute;
- torch.save zip or legacy files (`.pt`, `.bin`): `torch.load(weights_only=True)`, which only rebuilds tensors
  and plain containers;
- TorchScript archives (OpenAI's released `.pt` files): their `data.pkl` is read by our own unpickler, which
  accepts module objects, tensors and plain values and refuses every other global, so no code in the file runs.

Zip containers (torch.save and TorchScript) carry a CRC32 per entry. torch's own reader does not check it, so a
flipped bit in the weights would load as a silently wrong model; we check every CRC before trusting the bytes.
safetensors and torch's legacy format carry no checksum: corruption inside their tensor bytes cannot be seen
here (files from `download` are verified against their SHA256 instead).
"""

import io
import os
import pickle
import re
import struct
import zipfile
from typing import Any, ClassVar

import torch
from torch import Tensor

from .errors import CheckpointError, UnsafeCheckpointError

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}

# What torch's weights-only unpickler says when a file asks for more than tensors and plain containers; any other
# UnpicklingError means bytes that are not a pickle at all (corrupt, truncated, not a checkpoint).
_UNSAFE_PICKLE_MESSAGES = (
    "Unsupported global",
    "is blocked",
    "unrecognized function",
    "Can only create new object",
    "Can only build",
    "must be imported to load",
)

# A zip entry may expand (deflate) to far more than the file holds. torch writes tensor data uncompressed, so a
# checkpoint's entries add up to about its own size; more than this is a zip bomb, not a checkpoint.
_MAX_EXPANSION = 4
_EXPANSION_SLACK = 1 << 20

# TorchScript module trees are a few levels deep and hold a few thousand objects even for ViT-L/14; bounds far
# above that stop a crafted data.pkl (a cycle, or one object referenced 2**n ways) from hanging the reader.
_MAX_MODULE_DEPTH = 64
_MAX_MODULE_VISITS = 100_000
_READ_CHUNK = 1 << 20  # bytes read from a zip entry at a time

# torch's legacy format starts with this number, pickled; a pickle that starts with anything else is a plain one
_LEGACY_MAGIC = b"\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"


def load_state_dict(path: "str | os.PathLike") -> dict[str, Tensor]:
    """Read `path` (safetensors, torch.save, or TorchScript archive) into a flat `{key: tensor}` dict on the CPU.

    Wrappers are unwrapped (`{"state_dict": ...}`, `{"model": ...}`, `module.` and `_orig_mod.` prefixes).
    Raises FileNotFoundError for a missing file, UnsafeCheckpointError for a file that could only be read by
    running code from it, and CheckpointError for anything else that is not a readable checkpoint (empty,
    truncated, corrupt, a directory).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if not os.path.isfile(path):  # a directory, or a FIFO/device that reading could block on forever
        raise CheckpointError(f"{path} is not a regular file; pass the path of the checkpoint file itself")
    with open(path, "rb") as f:
        head = f.read(32)  # room for the legacy format's magic number after a protocol 4 frame header
    if not head:
        raise CheckpointError(f"{path} is empty; delete it and download or save the checkpoint again")
    try:
        if _is_safetensors(head):
            from safetensors.torch import load_file

            state_dict = load_file(path)
        elif zipfile.is_zipfile(path):
            state_dict = _read_zip(path)
        else:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except (CheckpointError, MemoryError):
        raise
    except pickle.UnpicklingError as e:
        if any(message in str(e) for message in _UNSAFE_PICKLE_MESSAGES):
            wanted = re.search(r"GLOBAL (\S+)", str(e))
            raise UnsafeCheckpointError(
                f"{path} contains pickled Python objects"
                + (f" ({wanted.group(1)})" if wanted else "")
                + " that would run code when loaded, so it was not loaded. Re-save its weights with safetensors or "
                "torch.save(model.state_dict()) from code you trust (see 'Safety' in the README)."
            ) from e
        raise _unreadable(path, e, head) from e
    except Exception as e:  # every reader has its own exception types for corrupt bytes; report them as one
        raise _unreadable(path, e, head) from e
    return _unwrap(state_dict, path)


def _unreadable(path: str, e: Exception, head: bytes) -> CheckpointError:
    if _is_plain_pickle(head):
        return CheckpointError(
            f"{path} is a plain pickle (pickle.dump), not a torch.save, TorchScript or safetensors file; openclip-lite "
            "does not unpickle plain pickles, which can run any code (see 'Safety' in the README). If you trust the "
            "file, unpickle it yourself and save its state dict with torch.save(state_dict, 'model.pt') or "
            "safetensors.torch.save_file(state_dict, 'model.safetensors'), then load that."
        )
    return CheckpointError(
        f"could not read {path} as a checkpoint ({type(e).__name__}: {_reason(e)}); the file may be truncated or "
        "corrupt: delete it and download or save it again"
    )


def _reason(e: Exception) -> str:
    """The first line of what went wrong, without torch's advice to retry with weights_only=False.

    That advice is wrong for a corrupt file and dangerous for an untrusted one; torch puts the actual error after
    "WeightsUnpickler error:".
    """
    text = str(e)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0][:300] if lines else "no details"


def _is_plain_pickle(head: bytes) -> bool:
    # a PROTO opcode (protocols 2 to 5: pickle.dump's defaults) without torch's magic number after it
    return len(head) > 2 and head[0] == 0x80 and 2 <= head[1] <= 5 and _LEGACY_MAGIC not in head


def _is_safetensors(head: bytes) -> bool:
    # 8-byte little-endian header size, then a JSON object
    return len(head) > 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < 100_000_000


def _read_zip(path: str) -> dict[str, Tensor]:
    """A torch.save zip or a TorchScript archive, after checking its sizes and every entry's CRC32."""
    with zipfile.ZipFile(path) as z:
        infos = z.infolist()
        declared = sum(info.file_size for info in infos)
        if declared > _MAX_EXPANSION * os.path.getsize(path) + _EXPANSION_SLACK:
            raise CheckpointError(
                f"{path} is a zip archive whose entries expand to {declared} bytes, far more than the file's size; "
                "it is not a checkpoint (torch stores tensors uncompressed)"
            )
        torchscript = any(info.filename.endswith("/constants.pkl") or "/code/" in info.filename for info in infos)
        if torchscript:  # zipfile checks each CRC as _read_torchscript reads the entries it needs
            return _read_torchscript(path, z)
        bad = z.testzip()
        if bad is not None:
            raise CheckpointError(
                f"{path} is corrupt: the CRC32 of its entry {bad!r} does not match its bytes; delete it and "
                "download or save it again"
            )
    return torch.load(path, map_location="cpu", weights_only=True)


def _unwrap(obj: Any, path: str) -> dict[str, Tensor]:
    for key in ("state_dict", "model"):  # what training scripts save around the weights (with epoch, optimizer...)
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors")
    if not obj:
        raise CheckpointError(f"{path} holds an empty dict, not a state dict of tensors")
    prefixes = ("module.", "_orig_mod.")  # DataParallel / DDP, torch.compile; in either order when both were used
    while prefix := next((p for p in prefixes if all(isinstance(k, str) and k.startswith(p) for k in obj)), None):
        obj = {k[len(prefix) :]: v for k, v in obj.items()}
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"{path} is not a state dict of tensors: entry {bad[0]!r} is a {type(obj[bad[0]]).__name__}")
    return obj


class _ScriptObject:
    """Stands in for a TorchScript module class; keeps only the attribute dict the pickle builds."""

    def __init__(self, *args: Any):
        self.state: dict = {}

    def __setstate__(self, state: Any) -> None:
        self.state = state if isinstance(state, dict) else {}


class _TorchScriptUnpickler(pickle._Unpickler):
    """The pure-Python unpickler with two gates: `find_class` (which globals exist) and BUILD (what gets state).

    The C unpickler would call `__setstate__` on whatever object BUILD is applied to, tensors included
    (`Tensor.__setstate__` can resize storages); here only our module stand-ins take state. A data.pkl holds only
    the module tree, a few kB even for ViT-L/14, so the pure-Python speed does not matter.
    """

    dispatch: ClassVar[dict] = dict(pickle._Unpickler.dispatch)

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, path: str):
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix, self.path = archive, prefix, path
        # each storage is read once, however often data.pkl names it (as torch's reader does): a few MB of file
        # naming one storage thousands of times must not become thousands of copies
        self.storages: dict[str, Tensor] = {}
        self.budget = 0  # bytes the copies of parts of storages may still take: no more than the storages hold

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("__torch__"):
            return _ScriptObject
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return self.rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return lambda data, requires_grad, hooks: data
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        if module == "torch.jit._pickle" and name in ("build_intlist", "build_doublelist", "build_boollist", "build_tensorlist", "restore_type_tag"):
            return lambda value, *tag: value
        raise UnsafeCheckpointError(
            f"{self.path} is a TorchScript archive whose data.pkl asks for {module}.{name}, which a CLIP checkpoint "
            "never needs and which could run code, so it was not loaded. Load it only if you trust it: "
            "torch.jit.load it yourself and pass its state_dict() to build_model."
        )

    def load_build(self) -> None:
        state = self.stack.pop()
        target = self.stack[-1]
        if not isinstance(target, _ScriptObject):
            raise CheckpointError(f"{self.path}: data.pkl sets the state of a {type(target).__name__}, which TorchScript never does")
        target.__setstate__(state)

    dispatch[pickle.BUILD[0]] = load_build

    def persistent_load(self, pid: Any) -> Tensor:
        if not (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], torch.dtype)
            and isinstance(pid[2], str)
            and type(pid[4]) is int
        ):
            raise CheckpointError(f"{self.path}: unexpected persistent id {pid!r} in TorchScript archive")
        _, dtype, key, _location, numel = pid
        if key in self.storages:
            storage = self.storages[key]
            if storage.dtype != dtype or storage.numel() != numel:
                raise CheckpointError(f"{self.path}: storage {key} is named as {numel} values of {dtype} and as {storage.numel()} of {storage.dtype}")
            return storage
        name = f"{self.prefix}data/{key}"
        try:
            info = self.archive.getinfo(name)
        except KeyError:
            raise CheckpointError(f"{self.path}: TorchScript archive has no entry {name}") from None
        itemsize = dtype.itemsize
        if info.file_size != numel * itemsize:  # checked before reading, so a lying size allocates nothing
            raise CheckpointError(f"{self.path}: storage {key} holds {info.file_size} bytes, the archive says {numel} values of {itemsize} bytes")
        # streamed into torch's own (aligned) memory: archive.read would hold the bytes and then a copy of them
        data = torch.empty(info.file_size, dtype=torch.uint8)
        view, filled = memoryview(data.numpy()), 0
        with self.archive.open(info) as entry:  # checks the entry's CRC32 when it reaches the end
            while filled < len(view) and (chunk := entry.read(min(_READ_CHUNK, len(view) - filled))):
                view[filled : filled + len(chunk)] = chunk
                filled += len(chunk)
            if filled < len(view) or entry.read(1):
                raise CheckpointError(f"{self.path}: storage {key} is not {info.file_size} bytes long, as the archive says")
        self.storages[key] = data.view(dtype)
        self.budget += info.file_size
        return self.storages[key]

    def rebuild_tensor(self, storage: Tensor, offset: int, size: tuple, stride: tuple, *args: Any) -> Tensor:
        """`torch._utils._rebuild_tensor_v2` for our storages, after checking the view's extent."""
        if not isinstance(storage, Tensor):
            raise CheckpointError(f"{self.path}: a tensor in the archive is built from a {type(storage).__name__}, not a storage")
        view = torch.as_strided(storage, size, stride, offset)  # raises if the view reaches past the storage
        # a zero stride would let a 4-byte storage claim terabytes, which clone() would then allocate
        if view.numel() > storage.numel():
            raise CheckpointError(f"{self.path}: a tensor of shape {tuple(size)} claims more values than its storage of {storage.numel()} holds")
        if offset == 0 and view.numel() == storage.numel() and view.is_contiguous():
            return view  # the whole storage, as a state dict's tensors are: no second copy of the model
        self.budget -= view.numel() * view.element_size()
        if self.budget < 0:
            raise CheckpointError(f"{self.path}: its tensors copy more data out of its storages than the storages hold, which no checkpoint does")
        return view.clone()  # a part: copied, so that it does not keep the rest of the storage alive


def _read_torchscript(path: str, z: zipfile.ZipFile) -> dict[str, Tensor]:
    data_pkl = [n for n in z.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if not data_pkl:
        raise CheckpointError(f"{path} looks like a TorchScript archive but has no data.pkl")
    prefix = data_pkl[0][: -len("data.pkl")]
    root = _TorchScriptUnpickler(z.read(data_pkl[0]), z, prefix, path).load()
    return _collect(root, path)


def _collect(root: Any, path: str) -> dict[str, Tensor]:
    """Flatten the tree of module objects into dotted keys, in the order `Module.state_dict()` gives them."""
    state_dict: dict[str, Tensor] = {}
    stack = [(root, "", ())] if isinstance(root, _ScriptObject) else []  # (module, key prefix, ids of those above)
    visits = 0
    while stack:
        module, prefix, above = stack.pop()
        visits += 1
        if id(module) in above or len(above) >= _MAX_MODULE_DEPTH or visits > _MAX_MODULE_VISITS:
            raise CheckpointError(f"{path}: the module tree in data.pkl loops or is impossibly deep or large; it is not a checkpoint")
        children = []
        for name, value in module.state.items():
            if not isinstance(name, str):
                continue
            if isinstance(value, Tensor) and name != "attn_mask":  # OpenAI keeps the causal mask as a plain attribute
                state_dict[prefix + name] = value
            elif isinstance(value, _ScriptObject):
                children.append((value, f"{prefix}{name}.", (*above, id(module))))
        stack.extend(reversed(children))  # the first child on top: its keys come first
    return state_dict


def not_a_clip_checkpoint(path: str, state_dict: dict[str, Tensor], error: CheckpointError) -> CheckpointError:
    """`error` (build_model's, for a state dict not in OpenAI's layout) for the file it came from: it names the file,
    and says whose layout the keys are in when they are in a known other one."""
    hint = ""
    if any(key.startswith(("text_model.", "vision_model.")) for key in state_dict):
        hint = (
            " Its keys (text_model.*, vision_model.*) are in Hugging Face transformers' CLIPModel layout, not OpenAI's; "
            "openclip-lite loads OpenAI's layout and open_clip's CLIP checkpoints, which use it (open_clip_model."
            "safetensors). For OpenAI's released weights, load them by name (e.g. 'ViT-B/32')."
        )
    elif any(key.startswith("text.") for key in state_dict):
        hint = (
            " Its keys (text.*) are in open_clip's CustomTextCLIP layout (a model with its own text tower), not "
            "OpenAI's; openclip-lite loads OpenAI's layout and open_clip's CLIP checkpoints, which use it."
        )
    return CheckpointError(f"{path}: {error}{hint}")


def save_safetensors(state_dict: dict[str, Tensor], path: "str | os.PathLike") -> None:
    """Write a state dict as safetensors (contiguous copies; shared storage is not allowed there)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, os.fspath(path), metadata={"format": "pt"})
