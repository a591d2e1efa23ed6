"""The errors a user can cause; the CLI prints their message as one line, exit code 2."""


class LightKVError(Exception):
    """Base class: bad input or an unusable model/image, with a one-line message."""


class InputError(LightKVError, ValueError):
    """An argument, image or prompt that cannot be used."""


class ModelError(LightKVError):
    """A model file that is missing, unreadable or not what was expected."""
