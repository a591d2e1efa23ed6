"""Reading GGUF files without llama.cpp (whose loader may abort on oddities): metadata,
and tensor rows dequantized to float32 (gguf-py from the pinned llama.cpp)."""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from .errors import ModelError


@lru_cache(maxsize=8)
def reader(path: str):
    """The (memory-mapped) GGUFReader of a file, opened once."""
    from gguf import GGUFReader
    try:
        return GGUFReader(path)
    except Exception as e:  # a truncated or corrupt file
        raise ModelError(f"cannot parse {path}: {e}") from None


def field(path, key: str):
    """A metadata value (str or number), or None when absent."""
    f = reader(str(path)).fields.get(key)
    if f is None:
        return None
    v = f.parts[f.data[0]]
    return bytes(v).decode() if f.types and f.types[0].name == "STRING" else v[0]


def tensor_rows(path, name: str, rows=None) -> np.ndarray:
    """Tensor `name` as float32: [n_rows, n_cols] (ggml's ne reversed), or only `rows`
    of it; a 1-D tensor (a norm, a bias) as [n]."""
    from gguf import GGMLQuantizationType as QT, quants
    t = next((t for t in reader(str(path)).tensors if t.name == name), None)
    if t is None:
        raise ModelError(f"{path} has no tensor {name}")
    n_cols = int(t.shape[0])
    data = t.data if rows is None else t.data[np.asarray(rows, dtype=np.int64)]
    if t.tensor_type == QT.F32:
        out = np.asarray(data, np.float32)
    elif t.tensor_type == QT.F16:
        out = np.asarray(data, np.float16).astype(np.float32)
    else:
        out = quants.dequantize(data, t.tensor_type).astype(np.float32)
    return out.reshape(-1, n_cols) if len(t.shape) > 1 else out.reshape(-1)


def has_tensor(path, name: str) -> bool:
    return any(t.name == name for t in reader(str(path)).tensors)
