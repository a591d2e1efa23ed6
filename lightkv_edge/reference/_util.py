"""Small shared helpers: numpy/torch round-tripping and argument validation.

Every public reference function accepts torch tensors or numpy arrays and returns the same
kind; the arithmetic itself is always torch. Validation errors are ValueError with a
one-line message, so the CLI and the native parity tests can rely on them.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

FLOAT_DTYPES = (torch.float32, torch.float64)


def to_torch(a, what: str) -> tuple[torch.Tensor, bool]:
    """Return (tensor, came_from_numpy). Lists/tuples are treated like numpy input."""
    if isinstance(a, torch.Tensor):
        return a, False
    if isinstance(a, (np.ndarray, list, tuple)) or np.isscalar(a):
        arr = np.asarray(a)
        if arr.dtype == object:
            raise ValueError(f"{what} must be numeric, got an object array")
        arr = np.ascontiguousarray(arr)
        if not arr.flags.writeable:  # torch.from_numpy warns on read-only memory
            arr = arr.copy()
        return torch.from_numpy(arr), True
    raise ValueError(f"{what} must be a torch tensor or numpy array, got {type(a).__name__}")


def back(t: torch.Tensor, numpy_out: bool):
    """Return `t` as the caller's kind (numpy arrays always come back on the CPU)."""
    return t.detach().cpu().numpy() if numpy_out else t


def check_matrix(x, what: str = "x") -> tuple[torch.Tensor, bool]:
    """x must be a finite, non-empty float32/float64 [N, D] matrix."""
    t, is_np = to_torch(x, what)
    if t.dim() != 2:
        raise ValueError(f"{what} must be 2-D [N, D], got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{what} must be float32 or float64, got {t.dtype}")
    if t.shape[0] == 0:
        raise ValueError(f"{what} must hold at least one token (N == 0)")
    if t.shape[1] == 0:
        raise ValueError(f"{what} must have at least one feature (D == 0)")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{what} contains NaN or Inf")
    return t, is_np


def check_scores(scores, n: int, device) -> torch.Tensor | None:
    """scores: None or [n] finite, >= 0. Returned as float64 on `device`."""
    if scores is None:
        return None
    s, _ = to_torch(scores, "scores")
    if s.dim() != 1 or s.shape[0] != n:
        raise ValueError(f"scores must have shape [{n}], got {tuple(s.shape)}")
    if not (s.dtype.is_floating_point or s.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"scores must be a real array, got {s.dtype}")
    s = s.to(device=device, dtype=torch.float64)
    if not bool(torch.isfinite(s).all()):
        raise ValueError("scores contain NaN or Inf")
    if bool((s < 0).any()):
        raise ValueError("scores must be >= 0")
    return s


def check_int(v, what: str, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise ValueError(f"{what} must be an integer, got {v!r}")
    if int(v) < lo:
        raise ValueError(f"{what} must be >= {lo}, got {v}")
    return int(v)


def check_ratio(ratio) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):
        raise ValueError(f"ratio must be a real number in [0, 1), got {ratio!r}")
    r = float(ratio)
    if not (0.0 <= r < 1.0):  # also rejects NaN
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    return r


def check_threshold(threshold) -> float | None:
    if threshold is None:
        return None
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise ValueError(f"threshold must be a real number or None, got {threshold!r}")
    if math.isnan(float(threshold)):
        raise ValueError("threshold must not be NaN")
    return float(threshold)


def check_grid(grid, n: int) -> tuple[int, int] | None:
    if grid is None:
        return None
    try:
        rows, cols = grid
    except (TypeError, ValueError):
        raise ValueError(f"grid must be (rows, cols) or None, got {grid!r}") from None
    rows = check_int(rows, "grid rows", 1)
    cols = check_int(cols, "grid cols", 1)
    if rows * cols != n:
        raise ValueError(f"grid {rows}x{cols} = {rows * cols} tokens does not match N = {n}")
    return rows, cols
