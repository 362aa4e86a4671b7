"""What a pass computes from the per-sample gradients: the confidence terms or the empirical Fisher."""

from __future__ import annotations

import torch

from ...distributed import local_view
from ..common import TensorDict
from .fused import _add_mv, _fuse, _fused_score_sums


class Consumer:
    """What a pass computes from the per-sample gradients. Subclasses override :meth:`dense`.

    ``linear`` consumers only need ``sum_i v_i g_{x,i}`` for a vector ``v`` given by :meth:`direction`; the pass
    then never forms the per-sample gradient of a weight and handles each use of a tied parameter on its own.
    """

    linear = False

    def wants(self, name: str) -> bool:
        return True

    def dense(self, name: str, rows: slice | None, grads: torch.Tensor, sample: int | None = None) -> None:
        """``grads``: ``[batch, *shape]`` per-sample gradients of ``param[rows]`` (all of it when ``rows`` is None),
        or ``[1, *shape]``, the gradient of sample ``sample`` alone (the exact path).

        Rows are numbered as in the full parameter; under FSDP they lie in this rank's shard."""
        raise NotImplementedError

    def direction(self, name: str, rows: slice | None) -> torch.Tensor | None:
        raise NotImplementedError

    def add_linear(self, name: str, values: torch.Tensor) -> None:
        raise NotImplementedError


class ScoreConsumer(Consumer):
    """Accumulates ``a(x) = g_x . w`` and, unless ``linear``, ``n(x) = sum (M F) g_x**2`` over parameters."""

    def __init__(self, terms, batch_size: int, device, norms: bool):
        self.terms = terms
        self.linear = not norms
        self.a = torch.zeros(batch_size, dtype=torch.float32, device=device)
        self.n = torch.zeros(batch_size, dtype=torch.float32, device=device)

    def wants(self, name: str) -> bool:
        return self.terms.has(name)

    def dense(self, name, rows, grads, sample=None):
        w, fm = self.terms.chunk(name, rows)
        flat = grads.reshape(grads.shape[0], -1)
        a, n = (self.a, self.n) if sample is None else (self.a[sample : sample + 1], self.n[sample : sample + 1])
        if not self.linear and w is not None and fm is not None and _fuse(flat):
            sums = _fused_score_sums(flat, w.reshape(-1), fm.reshape(-1))
            if sums is not None:
                a.add_(sums[0].to(a.device))
                n.add_(sums[1].to(n.device))
                return
        if w is not None:  # a layer on another GPU than the batch (device_map) adds a partial sum here
            _add_mv(a, flat, w.reshape(-1))
        if not self.linear and fm is not None:
            flat.square_()
            _add_mv(n, flat, fm.reshape(-1))

    def direction(self, name, rows):
        return self.terms.chunk(name, rows)[0]

    def add_linear(self, name, values):
        self.a += values.to(self.a.device)


class FisherConsumer(Consumer):
    """Sums ``g_x**2`` and ``g_x`` over the samples of each batch, per parameter (fp32)."""

    def __init__(self, params: dict[str, torch.nn.Parameter], with_mean: bool = True):
        self.squares: TensorDict = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        self.sums: TensorDict | None = (
            {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()} if with_mean else None
        )

    def dense(self, name, rows, grads, sample=None):
        if self.sums is not None:
            local_view(self.sums[name], rows).add_(grads.sum(0))
        local_view(self.squares[name], rows).add_(grads.square_().sum(0))
