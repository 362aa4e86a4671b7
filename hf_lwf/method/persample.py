"""Per-sample gradient quantities from one batched forward+backward.

Confidence scoring needs, for every sample x of a batch, ``a(x) = sum_i w_i g_{x,i}`` and
``n(x) = sum_i (M F)_i g_{x,i}**2``; the empirical Fisher needs ``sum_x g_{x,i}**2``. None of them needs a
whole-model gradient per sample. One forward of the batch records, for every module that owns trainable
parameters, its inputs; one backward of ``sum_x l_x`` records the gradient of its output (for sample x it is
``d l_x / d out_x``, since samples do not interact). From these, each module gives its per-sample parameter
gradients, layer by layer:

* ``nn.Linear`` (and so LoRA's A/B): ``G_x = sum_t b_t a_t^T``; bias ``sum_t b_t``.
* ``transformers``' ``Conv1D`` (GPT-2, transposed weight): ``G_x = sum_t a_t b_t^T``.
* ``nn.Embedding``: rows of the sample's tokens, ``G_x[v] = sum_{t: id_t = v} b_t`` (``padding_idx`` excluded).
* ``nn.LayerNorm``: weight ``sum_t b_t * xhat_t``, bias ``sum_t b_t``; Llama-style ``*RMSNorm`` the same, once
  ``out == weight * xhat`` has been checked for its class.
* anything else (RMSNorm, ...): ``torch.func.vmap`` of the gradient of ``<module(a_x), b_x>`` with respect to
  the module's own parameters, or, if that transform fails, a per-sample backward through that module only.

The per-sample gradient of a weight is formed in chunks of rows (at most ``chunk_elements`` numbers at once),
reduced to the per-sample scalars (or the Fisher sums) and dropped at once. A parameter used by several modules
(tied ``lm_head``/embedding) has one gradient per sample, the *sum* of the uses: its chunks are summed over
uses before they are squared. Only the parameters' own per-sample gradients are formed; the autograd pass itself
runs with the parameters frozen, so it computes input gradients only.

Under FSDP2 every rank runs the same batch (FSDP gathers each layer's weights for its forward and backward, as in
training) and forms the per-sample gradients of the rows of its own shard only: the consumers receive row blocks
numbered as in the full parameter, and their per-sample sums are partial sums that the caller adds across ranks.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from ..distributed import local_rows, local_view
from .common import TensorDict, without_input_require_grads


try:  # transformers' GPT-2 style linear layer: ``y = x @ W + b`` with ``W`` of shape [in, out]
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = None


DEFAULT_CHUNK_ELEMENTS = 1 << 25
"""Default bound on the per-sample gradient numbers formed at once (32 Mi fp32 numbers, 128 MiB)."""


class Consumer:
    """What a pass computes from the per-sample gradients. Subclasses override :meth:`dense`.

    ``linear`` consumers only need ``sum_i v_i g_{x,i}`` for a vector ``v`` given by :meth:`direction`; the pass
    then never forms the per-sample gradient of a weight and handles each use of a tied parameter on its own.
    """

    linear = False

    def wants(self, name: str) -> bool:
        return True

    def dense(self, name: str, rows: slice | None, grads: torch.Tensor) -> None:
        """``grads``: ``[batch, *shape]`` per-sample gradients of ``param[rows]`` (all of it when ``rows`` is None).

        Rows are numbered as in the full parameter; under FSDP they lie in this rank's shard."""
        raise NotImplementedError

    def direction(self, name: str, rows: slice | None) -> torch.Tensor | None:
        raise NotImplementedError

    def add_linear(self, name: str, values: torch.Tensor) -> None:
        raise NotImplementedError


class _Use:
    """One call of a module during the recorded forward."""

    __slots__ = ("module", "kind", "args", "kwargs", "grad", "cache")

    def __init__(self, module, kind, args, kwargs):
        self.module, self.kind, self.args, self.kwargs = module, kind, args, kwargs
        self.grad: torch.Tensor | None = None
        self.cache: dict[str, torch.Tensor] | None = None


def _kind(module: torch.nn.Module) -> str:
    if isinstance(module, torch.nn.Linear):
        return "linear"
    if Conv1D is not None and isinstance(module, Conv1D):
        return "conv1d"
    if isinstance(module, torch.nn.Embedding):
        return "embedding"
    if isinstance(module, torch.nn.LayerNorm):
        return "layernorm"
    if "RMSNorm" in type(module).__name__ and _rms_eps(module) is not None and _RMS_RULE.get(type(module), True):
        return "rmsnorm"
    return "generic"


_RMS_RULE: dict[type, bool] = {}
"""Per RMSNorm class: whether ``out == weight * xhat`` held when first checked (else: the generic fallback)."""


def _rms_eps(module) -> float | None:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return None
    for name in ("variance_epsilon", "eps"):
        value = getattr(module, name, None)
        if isinstance(value, float):
            return value
    return None


def _rms_normalized(module, x: torch.Tensor) -> torch.Tensor:
    """``x / rms(x)`` the way Llama-style RMSNorms compute it (fp32, then back to the input dtype)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + _rms_eps(module))
    return h.to(x.dtype)


_ROW_KINDS = {("linear", "weight"), ("conv1d", "weight"), ("embedding", "weight")}


class _Capture:
    """Forward hooks that record each owning module's inputs, tensor hooks that record its output gradients."""

    def __init__(self, model, params: dict[str, torch.nn.Parameter], consumer: Consumer, batch_size: int,
                 chunk_elements: int):
        self.consumer, self.chunk_elements, self.batch_size = consumer, chunk_elements, batch_size
        self.params = params
        self.own = {n: local_rows(p) for n, p in params.items()}  # this rank's rows of each sharded parameter
        name_of = {id(p): n for n, p in params.items()}
        self.owned: dict[torch.nn.Module, list[tuple[str, str]]] = {}
        for module in model.modules():
            own = [(local, name_of[id(p)]) for local, p in module.named_parameters(recurse=False) if id(p) in name_of]
            if own:
                self.owned[module] = own
        self.uses: dict[str, list[_Use]] = {n: [] for n in params}
        self.pending: dict[str, int] = {n: 0 for n in params}
        self.roots: list[torch.Tensor] = []
        self.active = False
        self.handles = []

    def __enter__(self):
        for module in self.owned:
            # prepend: before DeepSpeed ZeRO-3's post-forward hook releases the module's gathered weights
            self.handles.append(module.register_forward_hook(self._forward_hook, with_kwargs=True, prepend=True))
        self.active = True
        return self

    def __exit__(self, *exc):
        self.active = False
        for handle in self.handles:
            handle.remove()
        self.handles, self.uses, self.roots = [], {}, []

    # ------------------------------------------------------------------------------------------ hooks
    def _forward_hook(self, module, args, kwargs, output):
        if not self.active:
            return None
        if not isinstance(output, torch.Tensor) or not args or not isinstance(args[0], torch.Tensor):
            raise NotImplementedError(
                f"Per-sample gradients: {type(module).__name__} owns trainable parameters but is not called with a "
                "tensor input and a tensor output."
            )
        batch, replaced = self.batch_size, None
        if output.dim() == 0 or output.shape[0] != batch or args[0].dim() == 0 or args[0].shape[0] != batch:
            if output.dim() == 0 or output.shape[0] != 1 or args[0].dim() == 0 or args[0].shape[0] != 1:
                raise NotImplementedError(
                    f"Per-sample gradients: {type(module).__name__} is called on a tensor whose first dimension is "
                    f"not the batch ({batch})."
                )
            # Shared across the batch (GPT-2's position embedding): the output gradient of the broadcast tensor
            # would already be summed over samples, so give each sample its own copy.
            args = (args[0].expand(batch, *args[0].shape[1:]), *args[1:])
            output = replaced = output.expand(batch, *output.shape[1:])
        kind = _kind(module)
        if kind == "rmsnorm" and type(module) not in _RMS_RULE:  # check the rule once per class
            expected = module.weight.detach() * _rms_normalized(module, args[0].detach())
            _RMS_RULE[type(module)] = bool(torch.allclose(expected.float(), output.detach().float(), rtol=1e-4, atol=1e-6))
            kind = _kind(module)
        use = _Use(module, kind, args, kwargs)
        for _, name in self.owned[module]:
            self.uses[name].append(use)
            self.pending[name] += 1
        if not output.requires_grad:  # nothing upstream needs a gradient: start the backward graph here
            replaced = output.detach().requires_grad_()
            self.roots.append(replaced)
            output = replaced
        for tensor in (args[0], output):  # leaves made to require grad elsewhere (an input-require-grads hook)
            if tensor.requires_grad and tensor.grad_fn is None and not any(tensor is r for r in self.roots):
                self.roots.append(tensor)
        output.register_hook(lambda g, use=use: self._backward_hook(use, g))
        return replaced

    def _backward_hook(self, use: _Use, grad_output: torch.Tensor) -> None:
        use.grad = grad_output.detach()
        for local, name in self.owned[use.module]:
            if self.consumer.linear:
                self._linear(use, local, name)
                self.pending[name] -= 1
                continue
            self.pending[name] -= 1
            if self.pending[name] == 0:
                self._finish(name)
        if self.consumer.linear:
            use.args = use.kwargs = use.grad = None

    def flush(self) -> None:
        """Finish the parameters some of whose uses got no gradient (outputs that do not reach the loss)."""
        for name in list(self.uses):
            if self.uses[name] and not self.consumer.linear:
                self._finish(name)

    # ------------------------------------------------------------------------------------ per-sample math
    def _finish(self, name: str) -> None:
        uses = [u for u in self.uses.pop(name) if u.grad is not None]
        self.uses[name] = []
        if not uses:
            return
        param, own = self.params[name], self.own[name]
        if own is not None and own.start == own.stop:  # an empty shard (a small tensor on a late rank)
            return
        shape = getattr(param, "ds_shape", param.shape)  # a ZeRO-3 parameter's own shape is empty between uses
        locals_ = [self._local(u, name) for u in uses]
        chunkable = len(shape) >= 2 and all((u.kind, loc) in _ROW_KINDS for u, loc in zip(uses, locals_))
        if not chunkable:
            total = None
            for use, local in zip(uses, locals_):
                g = self._grad(use, local, None)
                total = g if total is None else total.add_(g)
            self.consumer.dense(name, own, total if own is None else total[:, own])
            return
        batch = self.batch_size
        row_numel = math.prod(shape[1:])
        step = max(1, self.chunk_elements // max(1, batch * row_numel))
        first, last = (0, shape[0]) if own is None else (own.start, own.stop)
        # Dense uses first; embedding rows are then added into their block in place (no dense copy of their own).
        ordered = sorted(zip(uses, locals_), key=lambda pair: pair[0].kind == "embedding")
        for start in range(first, last, step):
            rows = slice(start, min(start + step, last))
            total = None
            for use, local in ordered:
                if use.kind == "embedding" and total is not None:
                    self._embedding_grad(use, use.grad.float(), rows, out=total)
                    continue
                g = self._grad(use, local, rows)
                total = g if total is None else total.add_(g)
            self.consumer.dense(name, rows, total)

    def _local(self, use: _Use, name: str) -> str:
        return next(local for local, n in self.owned[use.module] if n == name)

    def _grad(self, use: _Use, local: str, rows: slice | None) -> torch.Tensor:
        """Per-sample gradient ``[batch, *param[rows].shape]`` of the module's parameter ``local`` from this use."""
        batch = self.batch_size
        b = use.grad.float()
        x = use.args[0]
        if use.kind in ("linear", "conv1d"):
            b = b.reshape(batch, -1, b.shape[-1])
            if local == "bias":
                return b.sum(1)
            a = x.float().reshape(batch, -1, x.shape[-1])
            if use.kind == "linear":  # weight [out, in]: rows are output features
                return torch.bmm((b if rows is None else b[..., rows]).transpose(1, 2), a)
            return torch.bmm((a if rows is None else a[..., rows]).transpose(1, 2), b)  # Conv1D [in, out]
        if use.kind == "embedding":
            return self._embedding_grad(use, b, rows)
        if use.kind == "layernorm":
            module = use.module
            b = b.reshape(batch, -1, *module.normalized_shape)
            if local == "bias":
                return b.sum(1)
            xhat = F.layer_norm(x.float(), module.normalized_shape, None, None, module.eps)
            return (b * xhat.reshape_as(b)).sum(1)
        if use.kind == "rmsnorm" and local == "weight":
            xhat = _rms_normalized(use.module, x.detach()).float()
            return (b * xhat).reshape(batch, -1, b.shape[-1]).sum(1)
        return self._generic_grad(use, local)

    def _embedding_grad(self, use: _Use, b: torch.Tensor, rows: slice | None, out: torch.Tensor | None = None
                        ) -> torch.Tensor:
        module = use.module
        ids = use.args[0].reshape(self.batch_size, -1)
        b = b.reshape(self.batch_size, -1, b.shape[-1])
        start, stop = (0, module.num_embeddings) if rows is None else (rows.start, rows.stop)
        keep = (ids >= start) & (ids < stop)
        if module.padding_idx is not None:
            keep &= ids != module.padding_idx
        sample = torch.arange(self.batch_size, device=ids.device).unsqueeze(1).expand_as(ids)
        if out is None:
            out = torch.zeros(self.batch_size, stop - start, b.shape[-1], dtype=torch.float32, device=b.device)
        out.index_put_((sample[keep], ids[keep] - start), b[keep], accumulate=True)
        return out

    def _generic_grad(self, use: _Use, local: str) -> torch.Tensor:
        if use.cache is None:
            use.cache = _module_per_sample_grads(use.module, [n for n, _ in self.owned[use.module]], use.args,
                                                 use.kwargs, use.grad, self)
        return use.cache.pop(local)

    def _linear(self, use: _Use, local: str, name: str) -> None:
        """``sum_i v_i g_{x,i}`` for this use only (linear consumers): no per-sample weight gradient formed.

        Under FSDP ``v`` covers this rank's rows only, and so does the sum."""
        consumer, batch, own = self.consumer, self.batch_size, self.own[name]
        if own is not None and own.start == own.stop:
            return
        v = consumer.direction(name, own)
        if v is None:
            return
        if use.kind in ("linear", "conv1d", "embedding") and local == "weight":
            b = use.grad
            if use.kind == "embedding":
                ids = use.args[0].reshape(batch, -1)
                keep = torch.ones_like(ids, dtype=torch.bool)
                if use.module.padding_idx is not None:
                    keep &= ids != use.module.padding_idx
                if own is not None:
                    keep &= (ids >= own.start) & (ids < own.stop)
                    ids = (ids - own.start).clamp(0, own.stop - own.start - 1)
                rows = F.embedding(ids, v.to(b.dtype)) * keep.unsqueeze(-1)
                values = (rows.float() * b.float().reshape(batch, -1, b.shape[-1])).sum((1, 2))
            else:
                x = use.args[0]
                a = x.reshape(batch, -1, x.shape[-1]).to(v.dtype)
                b = b.reshape(batch, -1, b.shape[-1]).to(v.dtype)
                if use.kind == "linear":  # weight [out, in]: the shard holds output rows
                    projected = a @ v.t()
                    b = b if own is None else b[..., own]
                else:  # Conv1D weight [in, out]: the shard holds input rows
                    projected = (a if own is None else a[..., own]) @ v
                values = (projected * b).sum((1, 2))
            consumer.add_linear(name, values.float())
            return
        g = self._grad(use, local, None)
        g = g if own is None else g[:, own]
        consumer.add_linear(name, g.reshape(batch, -1) @ v.reshape(-1).float())


def _module_per_sample_grads(module, locals_, args, kwargs, grad_output, capture) -> dict[str, torch.Tensor]:
    """Per-sample gradients of ``module``'s own parameters ``locals_`` from its recorded input and output gradient."""
    batch = capture.batch_size
    params = {n: p.detach() for n, p in module.named_parameters(recurse=False) if n in locals_}
    capture.active = False
    try:
        try:
            def inner(p, x, g):
                out = functional_call(module, p, (x.unsqueeze(0), *args[1:]), kwargs)
                return (out.float() * g.unsqueeze(0)).sum()

            grads = vmap(grad(inner), in_dims=(None, 0, 0))(params, args[0], grad_output.float())
            return {n: g.float() for n, g in grads.items()}
        except Exception:  # noqa: BLE001 - any transform failure: the plain per-sample backward below
            pass
        out = {n: [] for n in params}
        live = {n: p.detach().requires_grad_() for n, p in params.items()}
        with torch.enable_grad():
            for i in range(batch):
                y = functional_call(module, live, (args[0][i : i + 1], *args[1:]), kwargs)
                gs = torch.autograd.grad((y.float() * grad_output[i : i + 1].float()).sum(), list(live.values()),
                                         allow_unused=True)
                for (n, p), g in zip(live.items(), gs):
                    out[n].append(torch.zeros_like(p, dtype=torch.float32) if g is None else g.float())
        return {n: torch.stack(v) for n, v in out.items()}
    finally:
        capture.active = True


@contextlib.contextmanager
def _frozen(params):
    """Parameters stop requiring grad, so the recorded backward computes input gradients only."""
    params = [p for p in params if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def per_sample_pass(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    consumer: Consumer,
    loss_fn: Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor],
    params: dict[str, torch.nn.Parameter],
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    loss_scale: float = 1.0,
) -> torch.Tensor:
    """One forward+backward of ``sum_x loss_fn(model, batch)[x]`` feeding the per-sample gradients of ``params``
    to ``consumer``. Returns the per-sample losses. The caller chooses train/eval mode.

    ``loss_scale``: the sum is multiplied by it before the backward (fp16: small gradients do not underflow), so
    every per-sample gradient the consumer sees is ``loss_scale`` times the true one; the caller divides."""
    wanted = {n: p for n, p in params.items() if consumer.wants(n)}
    capture = _Capture(model, wanted, consumer, batch["input_ids"].shape[0], chunk_elements)
    with without_input_require_grads(model), _frozen(params.values()), torch.enable_grad(), capture:
        losses = loss_fn(model, batch)
        if capture.roots and losses.requires_grad:
            torch.autograd.grad(losses.sum() * loss_scale, capture.roots, allow_unused=True)
        capture.flush()
    return losses.detach()


# ------------------------------------------------------------------------------------------- consumers
class ScoreConsumer(Consumer):
    """Accumulates ``a(x) = g_x . w`` and, unless ``linear``, ``n(x) = sum (M F) g_x**2`` over parameters."""

    def __init__(self, terms, batch_size: int, device, norms: bool):
        self.terms = terms
        self.linear = not norms
        self.a = torch.zeros(batch_size, dtype=torch.float32, device=device)
        self.n = torch.zeros(batch_size, dtype=torch.float32, device=device)

    def wants(self, name: str) -> bool:
        return self.terms.has(name)

    def dense(self, name, rows, grads):
        w, fm = self.terms.chunk(name, rows)
        flat = grads.reshape(grads.shape[0], -1)
        if w is not None:  # .to: a layer on another GPU than the batch (device_map) adds a partial sum here
            self.a += (flat @ w.reshape(-1)).to(self.a.device)
        if not self.linear and fm is not None:
            flat.square_()
            self.n += (flat @ fm.reshape(-1)).to(self.n.device)

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

    def dense(self, name, rows, grads):
        if self.sums is not None:
            local_view(self.sums[name], rows).add_(grads.sum(0))
        local_view(self.squares[name], rows).add_(grads.square_().sum(0))
