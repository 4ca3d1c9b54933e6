"""The exceptions openclip-lite raises on bad input.

Each one subclasses the builtin a caller would already catch (ValueError for bad values, RuntimeError where
OpenAI's `clip` raised RuntimeError), so code written against `clip` keeps working, and
`except OpenCLIPLiteError` catches everything we raise on purpose.
"""


class OpenCLIPLiteError(Exception):
    """Base class of every error openclip-lite raises on purpose."""


class UnknownModelError(OpenCLIPLiteError, ValueError, RuntimeError):
    """A model name that is neither one of the released models nor a file."""


class CheckpointError(OpenCLIPLiteError, ValueError):
    """A file that is not a readable CLIP checkpoint (corrupt, truncated, another model, missing keys)."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that could only be read by executing code from the file (an arbitrary pickle)."""


class InputError(OpenCLIPLiteError, ValueError, RuntimeError):
    """An input the model cannot take: images of another size or not (batch, 3, H, W), token ids not (batch, n) or
    longer than the context; an argument `load` cannot take (a download source, dtype or image_size outside its
    choices); or any other value outside what a function takes (k < 1, a template without one {}, a memory budget
    no index fits). A ValueError, and a RuntimeError as OpenAI's model raised for these."""


class DownloadError(OpenCLIPLiteError, RuntimeError):
    """A download that failed: HTTP error, cut connection, offline without a cached copy."""


class ChecksumError(DownloadError):
    """A downloaded file whose SHA256 does not match the published one."""


class TextTooLongError(OpenCLIPLiteError, RuntimeError):
    """A text whose tokens do not fit the context length (a RuntimeError, as OpenAI's `clip.tokenize` raises)."""


class TextTypeError(OpenCLIPLiteError, TypeError):
    """Something other than a str (or a list of str) given to the tokenizer."""


class ImageError(OpenCLIPLiteError, ValueError):
    """An image that cannot be opened or decoded."""


class IndexFileError(OpenCLIPLiteError, ValueError):
    """A saved index that cannot be read: missing, truncated, corrupt, not an openclip-lite index, or newer."""


class ShardError(OpenCLIPLiteError, ValueError):
    """A folder of embedding shards that cannot be read: no shards, missing columns, ragged or absent vectors."""


class DeviceError(OpenCLIPLiteError, ValueError, RuntimeError):
    """A device that does not exist or is not usable here (`device="cuda"` without CUDA, a misspelt name).

    A ValueError for a bad argument, and a RuntimeError as torch raises for an unusable device, so either
    `except` keeps working.
    """


class EmbedError(OpenCLIPLiteError, RuntimeError):
    """A distributed embedding run that cannot go on: an output folder holding other files, rows lost."""


class MilvusIndexError(OpenCLIPLiteError, ValueError):
    """A bad argument for a Milvus index (index type, knob, dimension, collection), caught before Milvus sees it."""


class MilvusLockedError(OpenCLIPLiteError, RuntimeError):
    """A Milvus Lite directory whose LOCK file another process holds."""


class ExportError(OpenCLIPLiteError, ValueError):
    """An ONNX export that cannot be done: an opset the exporters cannot write, a destination that is not a
    folder, a tower that fails to export. The destination is left as it was."""


class MissingDependencyError(OpenCLIPLiteError, ImportError):
    """An optional extra that is not installed; the message names the pip command to run."""


def require(module: str, extra: str):
    """Import an optional dependency, or raise MissingDependencyError naming the extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(
            f"{module} is not installed; run: pip install \"openclip-lite[{extra}]\""
        ) from e
