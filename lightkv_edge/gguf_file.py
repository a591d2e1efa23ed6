"""GGUF metadata without llama.cpp's model loader (which may abort on oddities): the keys the
engine checks before it loads a model, read by ggml's own gguf reader through liblightkv.

The reader parses the header, the key/values and the tensor infos in C (a 152k-token
vocabulary is a few milliseconds there, seconds in a Python parser) and reads no tensor data;
a truncated or corrupt file is refused with ggml's reason, never an abort.
"""
from __future__ import annotations

from .errors import ModelError


def fields(path, keys) -> dict:
    """{key: value (str, int, float, bool) or None when absent}; ModelError on a bad file."""
    from . import native
    try:
        return native.gguf_fields(path, list(keys))
    except ValueError as e:
        raise ModelError(str(e)) from None   # names the file and ggml's reason


def field(path, key: str):
    """A metadata value (str, int, float or bool), or None when absent."""
    return fields(path, [key])[key]



def has_tensor(path, name: str) -> bool:
    """Whether the file has a tensor of that name (no tensor data read)."""
    from . import native
    try:
        return native.gguf_has_tensor(path, name)
    except ValueError as e:
        raise ModelError(str(e)) from None
