"""A single process, DDP, or a model split over devices: whole parameters, ``p.grad`` after backward."""

from __future__ import annotations

from .base import Backend


class LocalBackend(Backend):
    """The default backend: every rank holds whole parameters and the whole LWF state; scoring and ascent batches
    are split across DDP ranks and their sums all-reduced (the :class:`~.base.Backend` defaults)."""

    name = "local"
