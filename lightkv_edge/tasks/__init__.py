"""Synthetic visual question tasks (the embedded model's training and benchmark data)."""
from . import shapes

__all__ = ["shapes"]
