"""The errors a user can cause; the CLI prints their message as one line, exit code 2.

The library's messages speak of its own parameters (`keep`, `ctx_size`); an error about
one parameter names it in `param`, so the command line can point at its flag instead.
"""


class LightKVError(Exception):
    """Base class: bad input or an unusable model/image, with a one-line message."""

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.param = param


class InputError(LightKVError, ValueError):
    """An argument, image or prompt that cannot be used."""


class ModelError(LightKVError):
    """A model file that is missing, unreadable or not what was expected."""


class ClosedError(LightKVError):
    """A VisionChat used after close()."""
