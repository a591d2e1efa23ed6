"""lightkv-edge: vision-language chat on llama.cpp with LightKV token merging.

Import-light on purpose: the native libraries and llama_cpp load only when something
needs them (see lightkv_edge._libs). Importing the package does one cheap thing: it points
llama-cpp-python's library variables at our build, so that `import lightkv_edge` followed
by `import llama_cpp` loads the llama.cpp built here (as the README promises).
"""
__version__ = "0.1.0"

from ._libs import point_llama_cpp_here as _point_llama_cpp_here  # noqa: E402

_point_llama_cpp_here()

__all__ = ["__version__", "VisionChat"]


def __getattr__(name):
    if name == "VisionChat":
        from .engine import VisionChat
        return VisionChat
    raise AttributeError(name)
