"""A row block's a(x) and n(x) from one compiled kernel (:class:`~hf_lwf.method.persample.consumers.ScoreConsumer`)."""

from __future__ import annotations

import logging

import torch


logger = logging.getLogger(__package__)  # one logger for the engine

FUSE_SUMS = "cuda"
"""The device type on which a(x) and n(x) of a row block come from one compiled kernel that reads the block once
(:func:`_fused_score_sums`); None: never. Eager, the block is read three times (``addmv``, ``square_``, ``addmv``):
on a GPU, where the block is fp32 ``[batch, rows, in]`` written by a tensor-core matmul, those passes cost more than
the matmul. The CPU keeps eager kernels (no compiler needed; its blocks stay in the cache anyway)."""
_FUSED: dict = {}


def _fuse(block: torch.Tensor) -> bool:
    return FUSE_SUMS is not None and block.device.type == FUSE_SUMS and _FUSED.get("fn") is not False


def _score_sums(block: torch.Tensor, w: torch.Tensor, fm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(block @ w, block**2 @ fm)`` for a ``[batch, k]`` block: its samples' parts of a(x) and n(x)."""
    return (block * w).sum(1), (block * block * fm).sum(1)


def _fused_score_sums(block, w, fm) -> tuple[torch.Tensor, torch.Tensor] | None:
    """:func:`_score_sums` compiled (``torch.compile``, dynamic shapes: one kernel for every block); None once
    compiling or running it has failed (logged once; the eager kernels take over)."""
    try:
        if "fn" not in _FUSED:
            _FUSED["fn"] = torch.compile(_score_sums, dynamic=True, fullgraph=True)
        return _FUSED["fn"](block, w, fm)
    except Exception as error:  # noqa: BLE001 - any compile or run failure: the eager path, for the whole process
        _FUSED["fn"] = False
        logger.warning(f"Per-sample gradients: the compiled a(x)/n(x) reduction failed ({error!r}); eager kernels "
                       "read each block three times instead.")
        return None


def _add_mv(out: torch.Tensor, matrix: torch.Tensor, vector: torch.Tensor) -> None:
    """``out += matrix @ vector`` (one fused kernel when all three share a device)."""
    if out.device == matrix.device:
        out.addmv_(matrix, vector)
    else:
        out.add_((matrix @ vector).to(out.device))
