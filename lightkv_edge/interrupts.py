"""Ctrl-C that never tears native state apart.

Python runs a SIGINT handler between bytecodes. Two places make that unsafe here:
- between a native call and the bookkeeping that records its effect (a token decoded into
  the KV cache, but the position counter not yet advanced): the next turn then fails;
- inside a ctypes callback that native code calls (llama.cpp's log and progress
  callbacks): the KeyboardInterrupt is printed as "Exception ignored" and lost.

`deferred()` holds Ctrl-C for a block: the signal is only recorded, and raised as
KeyboardInterrupt when the block ends, after its bookkeeping. Native code that can stop
early asks `requested()` (llama.cpp's model loader does, through its progress callback).
Only the main thread receives signals, so elsewhere the block runs unchanged.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

_state = threading.local()


def requested() -> bool:
    """Whether Ctrl-C came during the current deferred block."""
    return bool(getattr(_state, "pending", False))


@contextmanager
def deferred():
    """Run a block with Ctrl-C held; raise KeyboardInterrupt at its end if one came.
    Nested blocks belong to the outermost one."""
    if threading.current_thread() is not threading.main_thread() or \
            getattr(_state, "depth", 0) > 0:
        _state.depth = getattr(_state, "depth", 0) + 1
        try:
            yield
        finally:
            _state.depth -= 1
        return

    def record(signum, frame):
        _state.pending = True

    previous = signal.signal(signal.SIGINT, record)
    _state.depth, _state.pending = 1, False
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _state.depth = 0
        pending, _state.pending = _state.pending, False
    if pending:
        if previous is signal.default_int_handler:
            raise KeyboardInterrupt
        if callable(previous):
            previous(signal.SIGINT, None)
