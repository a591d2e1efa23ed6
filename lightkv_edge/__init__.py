"""lightkv-edge: vision-language chat on llama.cpp with LightKV token merging.

Import-light on purpose: the native libraries and llama_cpp load only when something
needs them (see lightkv_edge._libs).
"""
__version__ = "0.1.0"

__all__ = ["__version__", "VisionChat"]


def __getattr__(name):
    if name == "VisionChat":
        from .engine import VisionChat
        return VisionChat
    raise AttributeError(name)
