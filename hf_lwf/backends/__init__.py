"""Where LWF's per-parameter state lives and how its collective steps run: one backend per training engine.

The backend is detected once per run (:func:`detect_backend`) and answers every engine question the run object
asks: the checks a configuration must pass, the layout of F and theta_ref, how they are restored and saved, which
scoring terms and empirical Fisher serve the engine's parameters, and how an ascent step reads gradients and writes
the weights. Nothing above this package branches on the engine.

* :class:`~.local.LocalBackend`: a single process, DDP, and models split over devices (whole parameters).
* :class:`~.fsdp2.FSDP2Backend`: FSDP2 ``fully_shard`` (``DTensor`` row shards).
* :class:`~.zero.ZeroBackend`: DeepSpeed ZeRO-2 (whole parameters, partitioned optimizer) and ZeRO-3 (flat slices).
"""

from __future__ import annotations

import os

import torch

from ..distributed import is_sharded
from .base import Ascent, Backend
from .local import LocalBackend


__all__ = ["Ascent", "Backend", "LocalBackend", "detect_backend", "engine_of"]


def engine_of(args, model: torch.nn.Module | None = None) -> str | None:
    """``"deepspeed"``, ``"fsdp"`` or None: the sharded engine ``args`` (or the accelerate launcher) selects, or that
    ``model`` was sharded with by hand."""
    if getattr(args, "deepspeed", None) or getattr(args, "deepspeed_plugin", None) is not None:
        return "deepspeed"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "deepspeed"
    if getattr(args, "fsdp", None) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp"
    if model is not None and is_sharded(model):
        return "fsdp" if not any(hasattr(p, "ds_id") for p in model.parameters()) else "deepspeed"
    return None


def detect_backend(args, model: torch.nn.Module | None = None) -> Backend:
    """The backend of a run from its training arguments (and model), first match wins: DeepSpeed, FSDP2, local.

    Optional engines are imported only when selected."""
    engine = engine_of(args, model)
    if engine == "deepspeed":
        from .zero import ZeroBackend

        return ZeroBackend.from_args(args)
    if engine == "fsdp":
        from .fsdp2 import FSDP2Backend

        return FSDP2Backend.from_args(args, model)
    return LocalBackend()
