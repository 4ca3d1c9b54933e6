"""Read a checkpoint file into a state dict without ever executing code from the file.

Three containers are understood, recognised by their bytes rather than their names:
- safetensors (the hub's `open_clip_model.safetensors`): a JSON header and raw tensors, nothing to execute;
- torch.save zip or legacy files (`.pt`, `.bin`): `torch.load(weights_only=True)`, which only rebuilds tensors
  and plain containers;
- TorchScript archives (OpenAI's released `.pt` files): their `data.pkl` is read by our own unpickler, which
  accepts module objects, tensors and plain values and refuses every other global, so no code in the file runs.
"""

import io
import os
import pickle
import struct
import zipfile
from typing import Any

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


def load_state_dict(path: "str | os.PathLike") -> dict[str, Tensor]:
    """Read `path` (safetensors, torch.save, or TorchScript archive) into a flat `{key: tensor}` dict on the CPU.

    Wrappers are unwrapped (`{"state_dict": ...}`, `module.` prefixes). Raises FileNotFoundError for a missing
    file, UnsafeCheckpointError for a file that could only be read by running code from it, and
    CheckpointError for anything else that is not a readable checkpoint.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        raise CheckpointError(f"{path} is empty; delete it and download or save the checkpoint again")
    try:
        if _is_safetensors(head):
            from safetensors.torch import load_file

            state_dict = load_file(path)
        elif zipfile.is_zipfile(path) and _is_torchscript(path):
            state_dict = _read_torchscript(path)
        else:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except (CheckpointError, MemoryError):
        raise
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise UnsafeCheckpointError(
                f"{path} contains pickled Python objects that would run code when loaded, so it was not loaded. "
                "Re-save its weights with safetensors or torch.save(model.state_dict()) from code you trust."
            ) from e
        raise _unreadable(path, e) from e
    except Exception as e:  # every reader has its own exception types for corrupt bytes; report them as one
        raise _unreadable(path, e) from e
    return _unwrap(state_dict, path)


def _unreadable(path: str, e: Exception) -> CheckpointError:
    return CheckpointError(
        f"could not read {path} as a checkpoint ({type(e).__name__}: {e}); the file may be truncated or corrupt: "
        "delete it and download it again"
    )


def _is_safetensors(head: bytes) -> bool:
    # 8-byte little-endian header size, then a JSON object
    return len(head) > 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < 100_000_000


def _is_torchscript(path: str) -> bool:
    with zipfile.ZipFile(path) as z:
        return any(name.endswith("/constants.pkl") or "/code/" in name for name in z.namelist())


def _unwrap(obj: Any, path: str) -> dict[str, Tensor]:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors")
    if all(isinstance(k, str) and k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
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


class _TorchScriptUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str):
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix = archive, prefix

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("__torch__"):
            return _ScriptObject
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return lambda data, requires_grad, hooks: data
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        if module == "torch.jit._pickle" and name in ("build_intlist", "build_doublelist", "build_boollist", "build_tensorlist", "restore_type_tag"):
            return lambda value, *tag: value
        raise UnsafeCheckpointError(f"refusing to load {module}.{name} from a TorchScript archive")

    def persistent_load(self, pid: Any) -> Tensor:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)):
            raise CheckpointError(f"unexpected persistent id {pid!r} in TorchScript archive")
        _, dtype, key, _location, numel = pid
        data = bytearray(self.archive.read(f"{self.prefix}data/{key}"))
        storage = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
        if storage.numel() != numel:
            raise CheckpointError(f"storage {key} holds {storage.numel()} values, the archive says {numel}")
        return storage


def _rebuild_tensor(storage: Tensor, offset: int, size: tuple, stride: tuple, *args: Any) -> Tensor:
    return torch.as_strided(storage, size, stride, offset).clone()


def _read_torchscript(path: str) -> dict[str, Tensor]:
    with zipfile.ZipFile(path) as z:
        data_pkl = [n for n in z.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if not data_pkl:
            raise CheckpointError(f"{path} looks like a TorchScript archive but has no data.pkl")
        prefix = data_pkl[0][: -len("data.pkl")]
        root = _TorchScriptUnpickler(z.read(data_pkl[0]), z, prefix).load()
    state_dict: dict[str, Tensor] = {}
    _collect(root, "", state_dict)
    return state_dict


def _collect(obj: Any, prefix: str, out: dict[str, Tensor]) -> None:
    """Flatten a tree of module objects into dotted keys, as `Module.state_dict()` names them."""
    if not isinstance(obj, _ScriptObject):
        return
    for name, value in obj.state.items():
        if isinstance(value, Tensor) and name != "attn_mask":  # OpenAI keeps the causal mask as a plain attribute
            out[prefix + name] = value
        elif isinstance(value, _ScriptObject):
            _collect(value, f"{prefix}{name}.", out)


def save_safetensors(state_dict: dict[str, Tensor], path: "str | os.PathLike") -> None:
    """Write a state dict as safetensors (contiguous copies; shared storage is not allowed there)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, os.fspath(path), metadata={"format": "pt"})

