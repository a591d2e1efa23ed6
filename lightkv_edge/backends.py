"""The ggml devices our build can run on, asked from ggml itself at run time."""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import lru_cache

from . import _libs


@dataclass(frozen=True)
class Device:
    name: str          # e.g. "CPU", "CUDA0", "Metal"
    description: str   # e.g. the CPU model or GPU name
    kind: str          # "cpu", "gpu", "igpu" or "accel"


_KINDS = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel"}


@lru_cache(maxsize=1)
def devices() -> tuple[Device, ...]:
    ggml = ctypes.CDLL(str(_libs.lib_path("ggml")))
    ggml.ggml_backend_dev_count.restype = ctypes.c_size_t
    ggml.ggml_backend_dev_get.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    for fn in ("ggml_backend_dev_name", "ggml_backend_dev_description"):
        getattr(ggml, fn).restype = ctypes.c_char_p
        getattr(ggml, fn).argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_dev_type.restype = ctypes.c_int
    ggml.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    out = []
    for i in range(ggml.ggml_backend_dev_count()):
        dev = ggml.ggml_backend_dev_get(i)
        out.append(Device(ggml.ggml_backend_dev_name(dev).decode(),
                          ggml.ggml_backend_dev_description(dev).decode(),
                          _KINDS.get(ggml.ggml_backend_dev_type(dev), "?")))
    return tuple(out)
