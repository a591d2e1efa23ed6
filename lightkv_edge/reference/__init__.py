"""PyTorch reference of LightKV and its baselines: the ground truth for parity tests.

Import-light on purpose: torch and numpy only; transformers is needed by `llm` alone and
is imported by the caller's model, not here.
"""

from .baselines import dart_prune, fastv_topk, pool2x2, pool_budget, random_drop, unguided_merge
from .guidance import guidance_scores, guidance_scores_from_qk
from .merge import (MergeResult, grid_layout, lightkv_budget, lightkv_merge,
                    lightkv_merge_images, window_cut)
from .schedule import MergeState, Schedule
from . import variants
from .variants import absorb_reduce, protected_reduce, protected_stage


def __getattr__(name):  # the LLM reference is loaded lazily (it imports transformers)
    if name in ("prefill_with_merge", "PrefillResult"):
        from . import llm
        return getattr(llm, name)
    raise AttributeError(name)


__all__ = [
    "MergeResult", "MergeState", "PrefillResult", "Schedule", "absorb_reduce", "dart_prune",
    "fastv_topk",
    "grid_layout", "guidance_scores", "guidance_scores_from_qk", "lightkv_budget",
    "lightkv_merge", "lightkv_merge_images", "pool2x2", "pool_budget", "prefill_with_merge",
    "protected_reduce", "protected_stage", "random_drop", "unguided_merge", "variants",
    "window_cut",
]
